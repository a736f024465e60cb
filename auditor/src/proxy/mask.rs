//! Masking values in results: the DataRow rewriter and the masking functions.
//!
//! A column is masked as its type allows, in the format Bind chose for it, so the client
//! still decodes the row: text-like types (text, varchar, char, name, json, jsonb) get the
//! function's text; integers get an integer (hash: a keyed hash in the type's range, so
//! joins and GROUP BY still work; partial: the last digits; redact: 0); every other type
//! gets NULL. The rewritten row has its lengths recomputed; a row that does not parse is
//! an error (the proxy then fails the connection: it never forwards what it cannot mask).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::detect::Scanner;
use crate::audit::keyed::KeyedHash;
use crate::policy::model::ColumnPattern;
pub use crate::policy::model::MaskFunction;

/// How one result column is masked.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMask {
    pub how: MaskFunction,
    pub type_oid: u32,
    /// The column comes in the binary format.
    pub binary: bool,
    /// Detectors: only what they find in the value is masked (each with its rule's
    /// function), not the whole value.
    pub scan: Option<Arc<[Arc<Scanner>]>>,
}

impl ColumnMask {
    pub fn whole(how: MaskFunction, type_oid: u32, binary: bool) -> ColumnMask {
        ColumnMask {
            how,
            type_oid,
            binary,
            scan: None,
        }
    }
}

/// A mask rule in force in a session.
#[derive(Debug, Clone)]
pub struct Rule {
    pub policy: Arc<str>,
    pub name: Arc<str>,
    pub columns: Vec<ColumnPattern>,
    pub how: MaskFunction,
    pub blocks_unknown: bool,
    /// Its detectors and patterns: what they find is masked inside values (in its
    /// `columns`, or in every text column when it names none).
    pub scan: Option<Arc<Scanner>>,
}

impl Rule {
    /// The rule as the proxy applies it; Err when a pattern does not compile (the policy
    /// linter refuses such a policy before it is loaded).
    pub fn of(policy: &str, r: &crate::policy::model::MaskRule) -> Result<Rule, String> {
        Ok(Rule {
            policy: policy.into(),
            name: r.name.as_str().into(),
            columns: r.columns.clone(),
            how: r.function(),
            blocks_unknown: r.blocks_unknown(),
            scan: Scanner::shared(&r.name, &r.detectors, &r.patterns, r.function())?,
        })
    }

    /// Its detectors, when it names no columns: they look in every text column.
    pub fn everywhere(&self) -> Option<&Arc<Scanner>> {
        self.scan.as_ref().filter(|_| self.columns.is_empty())
    }
}

/// What the catalog said, as the session sees it: which result columns (table OID and
/// attribute number, as RowDescription reports them) are masked, the columns of views
/// that read masked columns (resolved through their definitions: a view's column is
/// reported with the view's OID), the user-defined functions (their bodies are unknown),
/// and the newest relation.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub columns: HashMap<(u32, i16), (usize, Arc<str>)>,
    /// Views (and materialized views, and the planner's statistics) that read masked
    /// columns.
    pub views: HashSet<u32>,
    /// Those whose definitions were resolved: their columns not in `view_columns` read
    /// no masked column.
    pub resolved_views: HashSet<u32>,
    /// Masked columns of resolved views.
    pub view_columns: HashMap<(u32, i16), ViewColumn>,
    /// Relation names (lower case as stored) of masked tables and of those views.
    pub names: HashSet<String>,
    /// The names of views whose columns' sources are unknown (their columns may be
    /// masked values under other names).
    pub view_names: HashSet<String>,
    /// Names of masked columns, of tables and of resolved views.
    pub column_names: HashSet<String>,
    pub functions: HashSet<String>,
    /// The largest relation OID when the catalog was read: a result column of a newer
    /// relation is of unknown source until the next read.
    pub max_oid: u32,
}

/// A masked column of a view.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewColumn {
    /// A masked column passed through (renamed, through other views): masked by its rule.
    Rule(usize, Arc<str>),
    /// Computed from masked columns: masked whole.
    Whole,
}

impl Plan {
    /// Whether a column read (of a statement's or a view's output) may be a masked one:
    /// by name (a masked column's name, of any relation), a whole row, or a column of a
    /// view whose sources are unknown.
    pub fn reads_masked(&self, r: &crate::policy::lineage::Ref) -> bool {
        r.column == "*"
            || self.column_names.contains(&r.column)
            || r.rel
                .as_ref()
                .is_some_and(|rel| self.view_names.contains(rel))
    }

    /// Whether a value with this lineage may derive from a masked column.
    pub fn depends(&self, l: &crate::policy::lineage::Lineage) -> bool {
        l.opaque || l.reads.iter().any(|r| self.reads_masked(r))
    }
}

/// Builds the plan from the catalog query's rows.
#[derive(Default)]
pub struct PlanBuilder {
    plan: Plan,
    /// Masked table columns by relation and column name.
    by_name: HashMap<(String, String), (usize, Arc<str>)>,
    /// Definitions of the views that read masked columns: OID, name, definition.
    definitions: Vec<(u32, String, String)>,
    pub error: Option<String>,
}

impl PlanBuilder {
    /// One row of [`catalog_query`]: kind, oid, attnum, schema, relation, column (a view's
    /// definition for kind `d`).
    pub fn row(&mut self, body: &[u8], rules: &[Rule]) {
        let Some(cols) = text_columns(body) else {
            self.error = Some("the catalog's answer does not parse".into());
            return;
        };
        let [kind, oid, attnum, schema, rel, att] = cols.as_slice() else {
            self.error = Some("the catalog's answer has the wrong shape".into());
            return;
        };
        let oid: u32 = oid.parse::<i64>().unwrap_or(0) as u32;
        match kind.as_str() {
            "c" => {
                let attnum: i16 = attnum.parse().unwrap_or(0);
                // The rule that names it (the SQL filter is theirs; the first one wins).
                let Some(i) = rules.iter().position(|r| {
                    r.columns.iter().any(|c| {
                        c.table.matches(schema, rel) && crate::policy::model::glob(&c.column, att)
                    })
                }) else {
                    return;
                };
                let label: Arc<str> = format!("{schema}.{rel}.{att}").into();
                self.plan.columns.insert((oid, attnum), (i, label.clone()));
                self.by_name
                    .entry((rel.clone(), att.clone()))
                    .or_insert((i, label));
                self.plan.names.insert(rel.clone());
                self.plan.column_names.insert(att.clone());
            }
            "v" => {
                self.plan.views.insert(oid);
                self.plan.names.insert(rel.clone());
                self.plan.view_names.insert(rel.clone());
            }
            "d" => self.definitions.push((oid, rel.clone(), att.clone())),
            "f" => {
                self.plan.functions.insert(rel.clone());
            }
            "m" => self.plan.max_oid = oid,
            _ => {}
        }
    }

    pub fn finish(mut self) -> Result<Plan, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.resolve_views();
        Ok(self.plan)
    }

    /// Each view's columns, from its definition (parsed like a statement): a plain
    /// column of a masked table column (or of a masked column of another view) is masked
    /// by that column's rule; a column computed from masked ones, whole; the rest not at
    /// all. A definition that does not parse, or a view of two views of the same name,
    /// leaves the view's columns all masked whole.
    fn resolve_views(&mut self) {
        use crate::policy::lineage::{of_query, Slot};
        let mut parsed: HashMap<String, (u32, Vec<crate::policy::lineage::Output>)> =
            HashMap::new();
        let mut ambiguous: HashSet<String> = HashSet::new();
        for (oid, rel, def) in &self.definitions {
            let outputs = of_query(def).and_then(|slots| {
                slots
                    .into_iter()
                    .map(|s| match s {
                        Slot::One(o) => Some(o),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            });
            match outputs {
                Some(o) if !parsed.contains_key(rel) => {
                    parsed.insert(rel.clone(), (*oid, o));
                }
                Some(_) => {
                    ambiguous.insert(rel.clone());
                }
                None => {}
            }
        }
        for rel in &ambiguous {
            parsed.remove(rel);
        }
        // The views being resolved are not of unknown source while they are.
        for rel in parsed.keys() {
            self.plan.view_names.remove(rel);
        }
        // Views over views: resolved until nothing changes, first the columns passed on
        // (by their rules, through any depth of views), then those masked whole (which
        // join the names computed columns are judged by, so may mask more).
        let mut masked: HashMap<(String, String), ViewColumn> = HashMap::new();
        for passed_on_only in [true, false] {
            loop {
                let mut changed = false;
                for (rel, (_, outputs)) in &parsed {
                    for o in outputs {
                        let key = (rel.clone(), o.name.clone());
                        if masked.contains_key(&key) {
                            continue;
                        }
                        let col = if o.plain && o.reads.len() == 1 && !o.opaque {
                            let r = o.reads.iter().next().expect("one");
                            let by_rel = r.rel.as_ref().and_then(|src| {
                                let k = (src.clone(), r.column.clone());
                                self.by_name
                                    .get(&k)
                                    .map(|(i, label)| ViewColumn::Rule(*i, label.clone()))
                                    .or_else(|| masked.get(&k).cloned())
                            });
                            // Else by name (a masked column's name, of any relation; a
                            // column of a view whose sources are unknown).
                            by_rel.or_else(|| {
                                (!passed_on_only && self.plan.reads_masked(r))
                                    .then_some(ViewColumn::Whole)
                            })
                        } else {
                            (!passed_on_only && self.plan.depends(&o.lineage()))
                                .then_some(ViewColumn::Whole)
                        };
                        if let Some(c) = col {
                            masked.insert(key, c);
                            self.plan.column_names.insert(o.name.clone());
                            changed = true;
                        }
                    }
                }
                if !changed {
                    break;
                }
            }
        }
        for (rel, (oid, outputs)) in &parsed {
            for (i, o) in outputs.iter().enumerate() {
                if let Some(c) = masked.get(&(rel.clone(), o.name.clone())) {
                    self.plan
                        .view_columns
                        .insert((*oid, i as i16 + 1), c.clone());
                }
            }
            self.plan.resolved_views.insert(*oid);
        }
    }
}

/// The text values of a DataRow (NULL as empty).
fn text_columns(body: &[u8]) -> Option<Vec<String>> {
    match crate::pg::backend::decode(b'D', body).ok()? {
        crate::pg::backend::BackendMessage::DataRow(values) => Some(
            values
                .iter()
                .map(|v| {
                    v.map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default()
                })
                .collect(),
        ),
        _ => None,
    }
}

/// A SQL string literal no setting can change the meaning of (dollar quoting).
fn literal(s: &str) -> Option<String> {
    (!s.contains("$m$")).then(|| format!("$m${s}$m$"))
}

/// A glob (`*` at the end) as a LIKE pattern with `!` as its escape.
fn like(glob: &str) -> Option<String> {
    let (body, star) = match glob.strip_suffix('*') {
        Some(b) => (b, true),
        None => (glob, false),
    };
    let mut p = String::new();
    for c in body.chars() {
        if matches!(c, '!' | '%' | '_') {
            p.push('!');
        }
        p.push(c);
    }
    if star {
        p.push('%');
    }
    literal(&p)
}

/// The proxy's question about the catalog, asked inside the session (so names resolve as
/// the session sees them, with its privileges), between the client's requests: the
/// masked columns (of tables, foreign tables, views and materialized views: a rule may
/// name `pg_catalog.pg_stat_activity.query`), the views that read them (through other
/// views too: pg_depend of their rewrite rules, column by column or whole-row) with their
/// definitions (resolved to base columns in [`PlanBuilder::finish`]), the planner's statistics (whose
/// most common values and histograms are column values: treated like such views), the
/// user-defined functions, and the newest relation's OID. None when a rule's name cannot
/// be quoted.
pub fn catalog_query(rules: &[Rule]) -> Option<String> {
    let mut filters = Vec::new();
    for r in rules {
        for c in &r.columns {
            let mut f = format!(
                "(a.attname::text LIKE {} ESCAPE '!' AND c.relname::text LIKE {} ESCAPE '!'",
                like(&c.column)?,
                like(&c.table.name)?
            );
            if let Some(schema) = &c.table.schema {
                f.push_str(&format!(
                    " AND n.nspname::text LIKE {} ESCAPE '!'",
                    like(schema)?
                ));
            }
            f.push(')');
            filters.push(f);
        }
    }
    if filters.is_empty() {
        filters.push("false".into());
    }
    Some(format!(
        "/* auditor: masking catalog */ WITH RECURSIVE masked(relid, attnum, nsp, rel, att) AS (\
         SELECT c.oid, a.attnum, n.nspname, c.relname, a.attname \
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f', 'v', 'm') AND ({})), \
         views(relid) AS (\
         SELECT r.ev_class FROM pg_catalog.pg_depend d \
         JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
         JOIN masked m ON d.refobjid = m.relid AND d.refobjsubid IN (0, m.attnum) \
         WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
         AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
         UNION SELECT r.ev_class FROM pg_catalog.pg_depend d \
         JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid JOIN views v ON d.refobjid = v.relid \
         WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
         AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND r.ev_class <> v.relid) \
         SELECT 'c', relid::pg_catalog.int8, attnum::pg_catalog.int4, nsp::text, rel::text, att::text FROM masked \
         UNION ALL SELECT 'v', v.relid::pg_catalog.int8, 0, n.nspname::text, c.relname::text, '' \
         FROM views v JOIN pg_catalog.pg_class c ON c.oid = v.relid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         UNION ALL SELECT 'd', v.relid::pg_catalog.int8, 0, n.nspname::text, c.relname::text, \
         pg_catalog.pg_get_viewdef(v.relid) \
         FROM views v JOIN pg_catalog.pg_class c ON c.oid = v.relid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('v', 'm') \
         UNION ALL SELECT 'v', c.oid::pg_catalog.int8, 0, 'pg_catalog', c.relname::text, '' \
         FROM pg_catalog.pg_class c WHERE c.relnamespace = 'pg_catalog'::pg_catalog.regnamespace \
         AND c.relname IN ('pg_stats', 'pg_stats_ext', 'pg_stats_ext_exprs', 'pg_statistic', 'pg_statistic_ext_data') \
         UNION ALL SELECT 'f', p.oid::pg_catalog.int8, 0, n.nspname::text, p.proname::text, '' \
         FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
         UNION ALL SELECT 'm', (SELECT pg_catalog.max(oid::pg_catalog.int8) FROM pg_catalog.pg_class), 0, '', '', ''",
        filters.join(" OR ")
    ))
}

/// Why a statement is refused in a session that masks, if it is.
pub fn refusal(plan: &Plan, rules: &[Rule], f: &crate::policy::Facts) -> Option<(usize, String)> {
    if !touches(plan, f) {
        return None;
    }
    if f.copies_data
        || f.written_refs
            .iter()
            .any(|c| c == "*" || plan.column_names.contains(c))
    {
        return Some((
            0,
            "it reads masked columns and would copy their values where the proxy cannot mask them (a table, a file, COPY)".into(),
        ));
    }
    if runs_unknown_code(plan, f) {
        if let Some(i) = rules.iter().position(|r| r.blocks_unknown) {
            return Some((
                i,
                "it runs code whose results the proxy cannot follow (a DO block, CALL, a user-defined function) in a session that reads masked data; the rule's on_unknown is block".into(),
            ));
        }
    }
    None
}

/// Whether a statement that touches masked data runs code the parse tree does not show
/// (DO, CALL, a user-defined function): what its results derive from cannot be decided,
/// and the rule's `on_unknown` decides. (Expressions, whole rows, set operations,
/// sub-selects and views are decided: their computed columns are masked whole.)
pub fn runs_unknown_code(plan: &Plan, f: &crate::policy::Facts) -> bool {
    touches(plan, f)
        && ((f.opaque && !f.reads_by_name)
            || f.functions.iter().any(|q| plan.functions.contains(&q.name)))
}

/// Whether a statement may read masked values: it names a masked table or a view that
/// reads one, calls a user-defined function, runs code the parse tree does not show, or
/// reads a cursor or prepared statement by name.
pub fn touches(plan: &Plan, f: &crate::policy::Facts) -> bool {
    f.opaque
        || f.reads_by_name
        || f.tables.iter().any(|t| plan.names.contains(&t.name))
        || f.functions.iter().any(|q| plan.functions.contains(&q.name))
}

/// Whether a statement that touches masked data may return values computed from them
/// (the server then describes the column without its source): an expression reading a
/// masked column's name or `*`, a whole row, a set operation, a sub-select or function
/// whose outputs are computed, a user-defined function, code the parse tree does not show.
/// A cursor or prepared statement read by name was judged when it was made.
pub fn unknown_lineage(plan: &Plan, f: &crate::policy::Facts) -> bool {
    let reads_view = f.tables.iter().any(|t| plan.view_names.contains(&t.name));
    touches(plan, f)
        && ((f.opaque && !f.reads_by_name)
            || f.computed_opaque
            || f.computed_refs
                .iter()
                .any(|c| c == "*" || plan.column_names.contains(c))
            // A view's columns (of one not resolved) may be masked columns under other
            // names.
            || (reads_view && !f.computed_refs.is_empty())
            || f.functions.iter().any(|q| plan.functions.contains(&q.name)))
}

/// Whether a result's computed columns are masked whole: its lineage is unknown, or it
/// comes from a cursor or prepared statement made earlier (whose columns may be computed
/// if its rule's on_unknown is mask).
pub fn masks_computed(plan: &Plan, f: &crate::policy::Facts) -> bool {
    unknown_lineage(plan, f) || (touches(plan, f) && f.reads_by_name)
}

/// Which computed columns of a result (no table source in its description) are masked
/// whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Computed {
    None,
    All,
    /// By the result's column index: those whose own expression reads a masked column.
    Each(Vec<bool>),
}

impl Computed {
    fn at(&self, i: usize) -> bool {
        match self {
            Computed::None => false,
            Computed::All => true,
            Computed::Each(v) => v.get(i).copied().unwrap_or(true),
        }
    }
}

/// Which computed columns of a result of `n` columns are masked: per output when the
/// statement's outputs line up with its described columns (each masked if what it
/// reads may be masked); else all of them or none, by [`masks_computed`]. What runs
/// code the parse tree does not show, or reads a cursor or prepared statement by name,
/// has all of them masked.
pub fn computed_masks(plan: &Plan, f: &crate::policy::Facts, n: usize) -> Computed {
    if !touches(plan, f) {
        return Computed::None;
    }
    let unknown_code =
        f.opaque || f.reads_by_name || f.functions.iter().any(|q| plan.functions.contains(&q.name));
    if !unknown_code {
        if let Some(lined) = f
            .outputs
            .as_deref()
            .and_then(|o| crate::policy::lineage::align(o, n))
        {
            return Computed::Each(
                lined
                    .iter()
                    // A column of a `*` over a relation is plain: described with its
                    // source (if the server says otherwise, masked).
                    .map(|l| l.as_ref().map_or(true, |l| plan.depends(l)))
                    .collect(),
            );
        }
    }
    if masks_computed(plan, f) {
        Computed::All
    } else {
        Computed::None
    }
}

/// The masks of a result's columns: a masked column by its source (a view's column
/// resolved to the masked column it passes on, by that column's rule); a computed column
/// of a view, a column of a view not resolved or of a relation newer than the plan, whole;
/// a computed column (no source) whole as `computed` says. The first rule's function
/// masks what is masked whole. None when nothing in the result is masked.
pub fn result_masks(
    plan: &Plan,
    rules: &[Rule],
    columns: &[crate::conversation::Column],
    computed: &Computed,
) -> Option<Arc<[Option<ColumnMask>]>> {
    // The rules masking whole columns by their source.
    let fallback = rules
        .iter()
        .find(|r| !r.columns.is_empty() && r.scan.is_none())
        .map(|r| r.how);
    // Detectors of rules naming no columns: in every text column.
    let everywhere: Vec<Arc<Scanner>> =
        rules.iter().filter_map(Rule::everywhere).cloned().collect();
    let masks: Vec<Option<ColumnMask>> = columns
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let whole = |how| Some(ColumnMask::whole(how, c.type_oid, c.format == 1));
            let rule = match (
                plan.columns.get(&(c.table_oid, c.column)),
                plan.view_columns.get(&(c.table_oid, c.column)),
            ) {
                (Some((i, _)), _) | (None, Some(ViewColumn::Rule(i, _))) => rules.get(*i),
                (None, Some(ViewColumn::Whole)) => match fallback {
                    Some(how) => return whole(how),
                    None => None,
                },
                (None, None) => None,
            };
            let by_source = match rule {
                Some(r) if r.scan.is_none() => return whole(r.how),
                Some(r) => r.scan.clone(),
                // A whole row (`SELECT c FROM customers c`: the table's OID, attribute 0)
                // of a table with masked columns, or in a statement of unknown lineage.
                None if c.table_oid != 0
                    && c.column == 0
                    && (computed.at(ci)
                        || plan.columns.keys().any(|k| k.0 == c.table_oid)
                        || plan.view_columns.keys().any(|k| k.0 == c.table_oid)) =>
                {
                    if let Some(how) = fallback {
                        return whole(how);
                    }
                    None
                }
                None if c.table_oid != 0
                    && ((plan.views.contains(&c.table_oid)
                        && !plan.resolved_views.contains(&c.table_oid))
                        || c.table_oid > plan.max_oid) =>
                {
                    if let Some(how) = fallback {
                        return whole(how);
                    }
                    None
                }
                None if c.table_oid == 0 && computed.at(ci) => {
                    if let Some(how) = fallback {
                        return whole(how);
                    }
                    None
                }
                None => None,
            };
            if !is_text_like(c.type_oid) {
                return None;
            }
            let scans: Vec<Arc<Scanner>> = by_source
                .into_iter()
                .chain(everywhere.iter().cloned())
                .collect();
            (!scans.is_empty()).then(|| ColumnMask {
                how: scans[0].how,
                type_oid: c.type_oid,
                binary: c.format == 1,
                scan: Some(scans.into()),
            })
        })
        .collect();
    masks.iter().any(Option::is_some).then(|| masks.into())
}

/// The label of a masked result column, for the trail (`schema.table.column`, or the
/// column's name when its source is unknown).
pub fn label_of(plan: &Plan, c: &crate::conversation::Column) -> Arc<str> {
    match (
        plan.columns.get(&(c.table_oid, c.column)),
        plan.view_columns.get(&(c.table_oid, c.column)),
    ) {
        (Some((_, label)), _) | (None, Some(ViewColumn::Rule(_, label))) => label.clone(),
        _ => c.name.as_str().into(),
    }
}

/// Whether detectors look inside values of this type.
pub fn is_text_like(type_oid: u32) -> bool {
    matches!(
        type_oid,
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN | oid::JSON | oid::JSONB
    )
}

/// Type OIDs the rewriter knows.
mod oid {
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const UNKNOWN: u32 = 705;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const JSONB: u32 = 3802;
}

/// The fixed text of `redact`.
pub const REDACTED: &str = "****";

/// The masking functions, keyed per installation (the hash).
#[derive(Clone)]
pub struct Masker {
    mac: KeyedHash,
}

impl Masker {
    pub fn new(key: &[u8]) -> Masker {
        let mut domain = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        domain.update(b"auditor mask key v1");
        let derived = domain.finalize().into_bytes();
        Masker {
            mac: KeyedHash::new(&derived),
        }
    }

    fn digest(&self, value: &[u8]) -> [u8; 32] {
        self.mac.digest(value)
    }

    /// The masked text of a text value (always UTF-8).
    fn text(&self, how: &MaskFunction, value: &[u8]) -> String {
        let mut out = Vec::new();
        self.text_into(how, value, &mut out);
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Appends the masked text of a text value to `out` (UTF-8), without building it
    /// apart first: the rewriter's hot path.
    fn text_into(&self, how: &MaskFunction, value: &[u8], out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hex = |out: &mut Vec<u8>, bytes: &[u8]| {
            for b in bytes {
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
        };
        match how {
            MaskFunction::Redact | MaskFunction::Null => out.extend_from_slice(REDACTED.as_bytes()),
            // Never more than half of a value is kept; characters, not bytes.
            MaskFunction::Partial { keep } if value.is_ascii() => {
                let n = value.len();
                let keep = (*keep as usize).min(n / 2);
                out.resize(out.len() + (n - keep), b'*');
                out.extend_from_slice(&value[n - keep..]);
            }
            MaskFunction::Partial { keep } => {
                let s = String::from_utf8_lossy(value);
                let n = s.chars().count();
                let keep = (*keep as usize).min(n / 2);
                out.resize(out.len() + (n - keep), b'*');
                let mut tail = String::new();
                tail.extend(s.chars().skip(n - keep));
                out.extend_from_slice(tail.as_bytes());
            }
            MaskFunction::Hash => hex(out, &self.digest(value)[..8]),
            MaskFunction::Email => {
                hex(out, &self.digest(value)[..5]);
                out.extend_from_slice(b"@masked.invalid");
            }
        }
    }

    /// Writes the masked value of one column (its length prefix and bytes, or -1 for
    /// NULL) to `out`. Returns whether anything of it was masked (a detector may find
    /// nothing: the value is written as it came).
    pub fn mask_value(&self, m: &ColumnMask, value: &[u8], out: &mut Vec<u8>) -> bool {
        let put = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
            out.extend_from_slice(bytes);
        };
        if let Some(scans) = &m.scan {
            return self.mask_found(scans, m, value, out);
        }
        if m.how == MaskFunction::Null {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            return true;
        }
        match m.type_oid {
            oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN => {
                // The length, written once the text is.
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                self.text_into(&m.how, value, out);
                let len = (out.len() - at - 4) as i32;
                out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            }
            oid::CHAR => put(out, b"*"),
            oid::JSON | oid::JSONB => {
                let inner = if m.binary && m.type_oid == oid::JSONB {
                    value.get(1..).unwrap_or_default()
                } else {
                    value
                };
                let text = serde_json::Value::String(self.text(&m.how, inner)).to_string();
                if m.binary && m.type_oid == oid::JSONB {
                    let mut b = vec![1u8];
                    b.extend_from_slice(text.as_bytes());
                    put(out, &b);
                } else {
                    put(out, text.as_bytes());
                }
            }
            oid::INT2 | oid::INT4 | oid::INT8 => {
                let (bits, width) = match m.type_oid {
                    oid::INT2 => (15, 2),
                    oid::INT4 => (31, 4),
                    _ => (63, 8),
                };
                let max = (1u64 << bits) - 1;
                let n: u64 = match &m.how {
                    MaskFunction::Hash => {
                        let d = self.digest(value);
                        u64::from_be_bytes(d[..8].try_into().unwrap_or_default()) & max
                    }
                    MaskFunction::Partial { keep } => {
                        // The last `keep` decimal digits of the value.
                        let digits: String = if m.binary {
                            int_of(value).map(|v| v.unsigned_abs().to_string())
                        } else {
                            Some(
                                String::from_utf8_lossy(value)
                                    .chars()
                                    .filter(|c| c.is_ascii_digit())
                                    .collect(),
                            )
                        }
                        .unwrap_or_default();
                        let keep = (*keep as usize).min(digits.len() / 2);
                        digits[digits.len() - keep..].parse().unwrap_or(0)
                    }
                    _ => 0,
                };
                if m.binary {
                    put(out, &n.to_be_bytes()[8 - width..]);
                } else {
                    put(out, n.to_string().as_bytes());
                }
            }
            // A type the rewriter cannot write a valid masked value of: NULL.
            _ => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        true
    }

    /// A value with what the detectors find in it masked (each by its rule's function),
    /// the rest kept byte for byte. JSON stays JSON: a value whose rewrite would not be
    /// valid JSON any more (a number found outside a string) is masked whole.
    fn mask_found(
        &self,
        scans: &[Arc<Scanner>],
        m: &ColumnMask,
        value: &[u8],
        out: &mut Vec<u8>,
    ) -> bool {
        let jsonb_binary = m.binary && m.type_oid == oid::JSONB;
        let text = if jsonb_binary {
            value.get(1..).unwrap_or_default()
        } else {
            value
        };
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        let mut found = Vec::new();
        for (i, s) in scans.iter().enumerate() {
            found.clear();
            s.find(text, &mut found);
            spans.extend(found.iter().map(|&(a, b)| (a, b, i)));
        }
        if spans.is_empty() {
            out.extend_from_slice(&(value.len() as i32).to_be_bytes());
            out.extend_from_slice(value);
            return false;
        }
        super::detect::merge(&mut spans);
        if spans.iter().any(|s| scans[s.2].how == MaskFunction::Null) {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            return true;
        }
        let mut rewritten = Vec::with_capacity(value.len() + 32);
        if jsonb_binary {
            rewritten.push(value.first().copied().unwrap_or(1));
        }
        let mut at = 0;
        for &(a, b, i) in &spans {
            rewritten.extend_from_slice(&text[at..a]);
            self.text_into(&scans[i].how, &text[a..b], &mut rewritten);
            at = b;
        }
        rewritten.extend_from_slice(&text[at..]);
        let is_json = matches!(m.type_oid, oid::JSON | oid::JSONB);
        if is_json
            && serde_json::from_slice::<serde::de::IgnoredAny>(
                &rewritten[usize::from(jsonb_binary)..],
            )
            .is_err()
        {
            return self.mask_value(
                &ColumnMask::whole(scans[0].how, m.type_oid, m.binary),
                value,
                out,
            );
        }
        out.extend_from_slice(&(rewritten.len() as i32).to_be_bytes());
        out.extend_from_slice(&rewritten);
        true
    }

    /// Rewrites one DataRow body: each column with a mask gets its masked value (NULLs
    /// stay NULL), the others are copied byte for byte. The whole message (tag, length,
    /// body) is appended to `out`; returns how many values were masked, and adds them per
    /// column to `counts` (one per column; empty: not counted per column).
    pub fn rewrite_row(
        &self,
        body: &[u8],
        masks: &[Option<ColumnMask>],
        out: &mut Vec<u8>,
        counts: &mut [u64],
    ) -> Result<u32, RowError> {
        let values = match crate::pg::backend::decode(b'D', body) {
            Ok(crate::pg::backend::BackendMessage::DataRow(v)) => v,
            Ok(_) => return Err(RowError::Malformed("not a DataRow".into())),
            Err(e) => return Err(RowError::Malformed(e.to_string())),
        };
        if values.len() != masks.len() {
            return Err(RowError::Columns {
                row: values.len(),
                described: masks.len(),
            });
        }
        let start = out.len();
        out.push(b'D');
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&body[..2]);
        let mut masked = 0;
        for (i, (m, value)) in masks.iter().zip(values.iter()).enumerate() {
            match (m, value) {
                (Some(m), Some(v)) => {
                    if self.mask_value(m, v, out) {
                        masked += 1;
                        if let Some(c) = counts.get_mut(i) {
                            *c += 1;
                        }
                    }
                }
                (_, None) => out.extend_from_slice(&(-1i32).to_be_bytes()),
                (None, Some(v)) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
        let len = (out.len() - start - 1) as u32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        Ok(masked)
    }
}

fn int_of(b: &[u8]) -> Option<i64> {
    Some(match b.len() {
        2 => i16::from_be_bytes(b.try_into().ok()?) as i64,
        4 => i32::from_be_bytes(b.try_into().ok()?) as i64,
        8 => i64::from_be_bytes(b.try_into().ok()?),
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RowError {
    #[error("{0}")]
    Malformed(String),
    #[error("a DataRow has {row} columns where the result was described with {described}")]
    Columns { row: usize, described: usize },
}

/// Hides values an error or notice may echo, in a request that read masked data: the
/// quoted parts of its message (`invalid input syntax for type integer: "alice@…"`), and
/// its detail, hint and context whole (`Key (email)=(…) already exists`).
pub fn scrub_notice_field(code: u8, value: &[u8]) -> Option<Vec<u8>> {
    match code {
        b'D' | b'H' | b'W' | b'q' => {
            Some(b"(hidden by the auditor: it may show masked values)".to_vec())
        }
        b'M' => {
            let text = String::from_utf8_lossy(value);
            let mut out = String::with_capacity(text.len());
            let mut quoted = false;
            for c in text.chars() {
                if c == '"' {
                    if !quoted {
                        out.push('"');
                        out.push_str(REDACTED);
                    } else {
                        out.push('"');
                    }
                    quoted = !quoted;
                } else if !quoted {
                    out.push(c);
                }
            }
            if quoted {
                out.push('"');
            }
            Some(out.into_bytes())
        }
        _ => None,
    }
}

fn notice_fields(body: &[u8]) -> Option<crate::pg::backend::NoticeFields<'_>> {
    match crate::pg::backend::decode(b'N', body).ok()? {
        crate::pg::backend::BackendMessage::NoticeResponse(f) => Some(f),
        _ => None,
    }
}

/// Whether an error was raised by user code (PL/pgSQL's RAISE: SQLSTATE class P0), whose
/// message may be anything.
pub fn raised_by_code(body: &[u8]) -> bool {
    notice_fields(body)
        .and_then(|f| f.get(b'C'))
        .is_some_and(|c| c.starts_with(b"P0"))
}

/// An ErrorResponse or NoticeResponse body with what may echo values hidden (`whole`:
/// its message too, not only the quoted parts). One that does not parse becomes a bare
/// error saying so.
pub fn scrub_notice(body: &[u8], whole: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let Some(fields) = notice_fields(body) else {
        out.extend_from_slice(b"SERROR\0C08P01\0M(hidden by the auditor: malformed)\0\0");
        return out;
    };
    for (code, value) in fields.iter() {
        out.push(code);
        if whole && code == b'M' {
            out.extend_from_slice(b"(message hidden by the auditor: it may show masked values)");
        } else {
            match scrub_notice_field(code, value) {
                Some(v) => out.extend_from_slice(&v),
                None => out.extend_from_slice(value),
            }
        }
        out.push(0);
    }
    out.push(0);
    out
}

/// An ErrorResponse or NoticeResponse body with what the rules' detectors find in its
/// fields masked; None when they find nothing (or no rule has detectors).
pub fn scan_notice(masker: &Masker, rules: &[Rule], body: &[u8]) -> Option<Vec<u8>> {
    let scans: Vec<Arc<Scanner>> = rules.iter().filter_map(|r| r.scan.clone()).collect();
    if scans.is_empty() {
        return None;
    }
    let fields = notice_fields(body)?;
    let m = ColumnMask {
        how: scans[0].how,
        type_oid: oid::TEXT,
        binary: false,
        scan: Some(scans.into()),
    };
    let mut out = Vec::with_capacity(body.len());
    let mut changed = false;
    let mut value = Vec::new();
    for (code, v) in fields.iter() {
        out.push(code);
        value.clear();
        // (The severity and SQLSTATE are not values.)
        if !matches!(code, b'S' | b'V' | b'C') && masker.mask_value(&m, v, &mut value) {
            changed = true;
            if value.len() >= 4 && value[..4] != (-1i32).to_be_bytes() {
                out.extend(value[4..].iter().filter(|b| **b != 0));
            }
        } else {
            out.extend_from_slice(v);
        }
        out.push(0);
    }
    out.push(0);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b
    }

    fn values(msg: &[u8]) -> Vec<Option<Vec<u8>>> {
        assert_eq!(msg[0], b'D');
        let len = u32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, msg.len(), "the length covers the body exactly");
        let body = &msg[5..];
        let n = u16::from_be_bytes([body[0], body[1]]) as usize;
        let mut at = 2;
        let mut out = Vec::new();
        for _ in 0..n {
            let l = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
            at += 4;
            if l < 0 {
                out.push(None);
            } else {
                out.push(Some(body[at..at + l as usize].to_vec()));
                at += l as usize;
            }
        }
        assert_eq!(at, body.len());
        out
    }

    fn mask(how: MaskFunction, type_oid: u32, binary: bool) -> Option<ColumnMask> {
        Some(ColumnMask {
            how,
            type_oid,
            binary,
            scan: None,
        })
    }

    /// A plan from catalog rows as the catalog query returns them: customers (oid 100)
    /// with email (2, rule 0) and phone (3, rule 1); views over it (oids 200, 201).
    fn plan_of(views: &[(u32, &str, &str)]) -> (Plan, Vec<Rule>) {
        let pattern = |t: &str| -> ColumnPattern {
            serde_json::from_str(&format!("\"{t}\"")).expect("a column pattern")
        };
        let rule = |name: &str, col: &str, how| Rule {
            policy: "p".into(),
            name: name.into(),
            columns: vec![pattern(col)],
            how,
            blocks_unknown: true,
            scan: None,
        };
        let rules = vec![
            rule("contact", "customers.email", MaskFunction::Email),
            rule("phones", "customers.phone", MaskFunction::Redact),
        ];
        let mut b = PlanBuilder::default();
        let mut add = |cols: [&str; 6]| {
            let vals: Vec<Option<&[u8]>> = cols.iter().map(|c| Some(c.as_bytes())).collect();
            b.row(&row(&vals), &rules);
        };
        add(["c", "100", "2", "public", "customers", "email"]);
        add(["c", "100", "3", "public", "customers", "phone"]);
        add(["c", "100", "1", "public", "customers", "id"]);
        for (oid, name, def) in views {
            let oid = oid.to_string();
            add(["v", &oid, "0", "public", name, ""]);
            add(["d", &oid, "0", "public", name, def]);
        }
        add(["m", "300", "0", "", "", ""]);
        (b.finish().expect("a plan"), rules)
    }

    fn col(table_oid: u32, column: i16) -> crate::conversation::Column {
        crate::conversation::Column {
            name: "c".into(),
            table_oid,
            column,
            type_oid: 25,
            type_size: -1,
            type_modifier: -1,
            format: 0,
        }
    }

    #[test]
    fn views_resolve_to_their_base_columns() {
        let (plan, rules) = plan_of(&[
            (
                200,
                "contacts",
                " SELECT c.id,\n    c.email AS contact,\n    lower(c.phone) AS quiet,\n    upper(c.note) AS loud\n   FROM customers c;",
            ),
            // A view of a view, listed first: resolved all the same.
            (201, "renamed", " SELECT contacts.contact AS e, contacts.id\n   FROM contacts;"),
        ]);
        let cols: Vec<_> = (1..=4).map(|i| col(200, i)).collect();
        let m = result_masks(&plan, &rules, &cols, &Computed::None).expect("masked");
        assert!(m[0].is_none(), "id as sent: {plan:?}");
        assert_eq!(m[1].as_ref().map(|m| m.how), Some(MaskFunction::Email));
        assert!(m[2].is_some(), "computed from a masked column: whole");
        assert!(m[3].is_none(), "computed from none");
        assert_eq!(&*label_of(&plan, &cols[1]), "public.customers.email");
        let m = result_masks(&plan, &rules, &[col(201, 1), col(201, 2)], &Computed::None)
            .expect("masked");
        assert_eq!(m[0].as_ref().map(|m| m.how), Some(MaskFunction::Email));
        assert!(m[1].is_none());
        // Its masked columns' names join those computed columns are judged by.
        assert!(plan.column_names.contains("e") && plan.column_names.contains("contact"));
        // A definition that does not parse leaves the view masked whole.
        let (plan, rules) = plan_of(&[(200, "broken", "SELECT FROM WHERE (")]);
        let m = result_masks(&plan, &rules, &[col(200, 1)], &Computed::None).expect("masked");
        assert!(m[0].is_some());
    }

    #[test]
    fn computed_columns_by_what_each_reads() {
        let (plan, _) = plan_of(&[]);
        let computed = |sql: &str, n: usize| {
            let f = crate::policy::Facts::of(sql).expect("parses");
            computed_masks(&plan, &f, n)
        };
        assert_eq!(
            computed(
                "SELECT lower(email), count(*), upper(note) FROM customers GROUP BY 1, 3",
                3
            ),
            Computed::Each(vec![true, false, false])
        );
        // Renamed in a sub-select or CTE, read by an expression outside.
        for sql in [
            "SELECT lower(p) FROM (SELECT phone AS p FROM customers) s",
            "WITH x AS (SELECT phone AS p FROM customers) SELECT p || '' FROM x",
        ] {
            assert_eq!(computed(sql, 1), Computed::Each(vec![true]), "{sql}");
            let f = crate::policy::Facts::of(sql).unwrap();
            assert!(
                masks_computed(&plan, &f),
                "{sql}: the statement-wide answer too"
            );
        }
        // A star of unknown width beside computed columns: lined up by the count.
        assert_eq!(
            computed("SELECT *, lower(email) FROM customers", 7),
            Computed::Each(vec![true, true, true, true, true, true, true])
        );
        // What cannot be lined up: all computed columns, as the statement says.
        assert_eq!(
            computed("SELECT *, *, lower(email) FROM customers", 5),
            Computed::All
        );
        assert_eq!(computed("SELECT id FROM orders", 1), Computed::None);
        // SQL run from text: opaque, refused where the rule blocks the unknown.
        let f = crate::policy::Facts::of(
            "SELECT query_to_xml('select phone from customers', true, false, '')",
        )
        .unwrap();
        assert!(touches(&plan, &f) && runs_unknown_code(&plan, &f));
    }

    #[test]
    fn each_function_on_text_and_integers() {
        let m = Masker::new(b"k");
        let body = row(&[
            Some(b"alice@example.com"),
            Some(b"4111111111111111"),
            Some(b"42"),
            None,
            Some(&12345678i32.to_be_bytes()),
            Some(b"{\"a\": 1}"),
        ]);
        let masks = [
            mask(MaskFunction::Email, oid::TEXT, false),
            mask(MaskFunction::Partial { keep: 4 }, oid::VARCHAR, false),
            None,
            mask(MaskFunction::Redact, oid::TEXT, false),
            mask(MaskFunction::Partial { keep: 4 }, oid::INT4, true),
            mask(MaskFunction::Redact, oid::JSONB, false),
        ];
        let mut out = Vec::new();
        assert_eq!(m.rewrite_row(&body, &masks, &mut out, &mut []), Ok(4));
        let v = values(&out);
        let email = String::from_utf8(v[0].clone().unwrap()).unwrap();
        assert!(
            email.ends_with("@masked.invalid") && !email.contains("alice"),
            "{email}"
        );
        assert_eq!(v[1].as_deref(), Some(&b"************1111"[..]));
        assert_eq!(v[2].as_deref(), Some(&b"42"[..]), "unmasked: byte for byte");
        assert_eq!(v[3], None, "NULL stays NULL");
        assert_eq!(v[4].as_deref(), Some(&5678i32.to_be_bytes()[..]));
        assert_eq!(v[5].as_deref(), Some(&b"\"****\""[..]), "valid JSON");
        // Hash: consistent for a key, different across keys, valid for the type.
        let h = |key: &[u8], t: u32, bin: bool, v: &[u8]| {
            let mut out = Vec::new();
            Masker::new(key)
                .rewrite_row(
                    &row(&[Some(v)]),
                    &[mask(MaskFunction::Hash, t, bin)],
                    &mut out,
                    &mut [],
                )
                .unwrap();
            values(&out)[0].clone().unwrap()
        };
        assert_eq!(
            h(b"k", oid::TEXT, false, b"x"),
            h(b"k", oid::TEXT, false, b"x")
        );
        assert_ne!(
            h(b"k", oid::TEXT, false, b"x"),
            h(b"j", oid::TEXT, false, b"x")
        );
        assert_eq!(h(b"k", oid::INT8, true, &7i64.to_be_bytes()).len(), 8);
        let text = String::from_utf8(h(b"k", oid::INT2, false, b"7")).unwrap();
        assert!(text.parse::<i16>().unwrap() >= 0, "{text}");
        // A type it cannot write: NULL.
        let mut out = Vec::new();
        m.rewrite_row(
            &row(&[Some(b"2024-01-01")]),
            &[mask(MaskFunction::Redact, 1082, false)],
            &mut out,
            &mut [],
        )
        .unwrap();
        assert_eq!(values(&out), vec![None]);
    }

    #[test]
    fn detectors_mask_what_they_find_and_keep_the_rest() {
        use crate::policy::model::Detector;
        let scanner = |how| {
            Arc::new(
                Scanner::new("found", &[Detector::Email, Detector::CardNumber], &[], how)
                    .unwrap()
                    .unwrap(),
            )
        };
        let m = Masker::new(b"k");
        let scan = |t: u32, bin: bool, how| ColumnMask {
            how,
            type_oid: t,
            binary: bin,
            scan: Some(vec![scanner(how)].into()),
        };
        let run = |mask: &ColumnMask, v: &[u8]| {
            let mut out = Vec::new();
            let changed = m.mask_value(mask, v, &mut out);
            (changed, values_of_one(&out))
        };
        let redact = scan(oid::TEXT, false, MaskFunction::Redact);
        assert_eq!(
            run(&redact, b"mail a@b.co or 4111-1111-1111-1111 now"),
            (true, Some(b"mail **** or **** now".to_vec()))
        );
        assert_eq!(
            run(&redact, b"nothing here"),
            (false, Some(b"nothing here".to_vec()))
        );
        // JSON: inside a string, replaced in place; a number found is masked whole.
        let json = scan(oid::JSONB, false, MaskFunction::Redact);
        assert_eq!(
            run(&json, br#"{"to": "a@b.co", "n": 1}"#),
            (true, Some(br#"{"to": "****", "n": 1}"#.to_vec()))
        );
        assert_eq!(
            run(&json, br#"{"card": 4111111111111111}"#),
            (true, Some(br#""****""#.to_vec()))
        );
        let binary = scan(oid::JSONB, true, MaskFunction::Redact);
        assert_eq!(
            run(&binary, b"\x01[\"a@b.co\"]"),
            (true, Some(b"\x01[\"****\"]".to_vec()))
        );
        // `null`: a value with something found becomes NULL.
        assert_eq!(
            run(&scan(oid::TEXT, false, MaskFunction::Null), b"a@b.co"),
            (true, None)
        );
        // The rule's function applies to what is found.
        let (_, v) = run(&scan(oid::TEXT, false, MaskFunction::Email), b"to a@b.co.");
        let v = String::from_utf8(v.unwrap()).unwrap();
        assert!(
            v.starts_with("to ") && v.ends_with("@masked.invalid."),
            "{v}"
        );
    }

    /// The one value a mask_value output holds (None: NULL).
    fn values_of_one(out: &[u8]) -> Option<Vec<u8>> {
        let len = i32::from_be_bytes(out[..4].try_into().unwrap());
        (len >= 0).then(|| out[4..4 + len as usize].to_vec())
    }

    #[test]
    fn partial_never_keeps_more_than_half() {
        let m = Masker::new(b"k");
        let mut out = Vec::new();
        m.rewrite_row(
            &row(&[Some(b"abc")]),
            &[mask(MaskFunction::Partial { keep: 4 }, oid::TEXT, false)],
            &mut out,
            &mut [],
        )
        .unwrap();
        assert_eq!(values(&out)[0].as_deref(), Some(&b"**c"[..]));
    }

    #[test]
    fn malformed_rows_are_errors() {
        let m = Masker::new(b"k");
        let masks = [None, mask(MaskFunction::Redact, oid::TEXT, false)];
        let mut out = Vec::new();
        assert_eq!(
            m.rewrite_row(&row(&[Some(b"a")]), &masks, &mut out, &mut []),
            Err(RowError::Columns {
                row: 1,
                described: 2
            })
        );
        let mut short = row(&[Some(b"a"), Some(b"bcd")]);
        short.pop();
        assert!(matches!(
            m.rewrite_row(&short, &masks, &mut out, &mut []),
            Err(RowError::Malformed(_))
        ));
        let mut long = row(&[Some(b"a"), Some(b"bcd")]);
        long.push(0);
        assert!(matches!(
            m.rewrite_row(&long, &masks, &mut out, &mut []),
            Err(RowError::Malformed(_))
        ));
        assert!(out.is_empty(), "nothing half-written");
        let huge = [0, 1, 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            m.rewrite_row(&huge, &masks[1..], &mut out, &mut []),
            Err(RowError::Malformed(_))
        ));
        assert!(out.is_empty(), "nothing half-written");
    }

    /// Arbitrary rows, types, formats and functions: the output is always one valid
    /// DataRow with exact lengths, the unmasked values byte for byte, NULLs kept, and no
    /// masked value's bytes where a masked text-like value was (for values long enough to
    /// be told apart).
    #[test]
    fn rewritten_rows_are_always_valid() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let types = [
            oid::TEXT,
            oid::VARCHAR,
            oid::BPCHAR,
            oid::NAME,
            oid::CHAR,
            oid::JSON,
            oid::JSONB,
            oid::INT2,
            oid::INT4,
            oid::INT8,
            1082,
            1700,
            17,
        ];
        let m = Masker::new(b"property");
        for _ in 0..20_000 {
            let n = rng.gen_range(0..12usize);
            let mut vals: Vec<Option<Vec<u8>>> = Vec::new();
            let mut masks = Vec::new();
            for _ in 0..n {
                let t = types[rng.gen_range(0..types.len())];
                let len = rng.gen_range(0..40usize);
                let mut v: Vec<u8> = (0..len).map(|_| rng.gen::<u8>()).collect();
                if is_text_like(t) && rng.gen_ratio(1, 3) {
                    // Detectors in free text (JSON: inside a string, or a number).
                    let words: String = (0..len).map(|_| rng.gen_range('a'..='z')).collect();
                    let found = if rng.gen_bool(0.5) {
                        " ann@example.org "
                    } else {
                        ""
                    };
                    v = match t {
                        oid::JSON | oid::JSONB if rng.gen_bool(0.3) => {
                            br#"{"n": 4111111111111111}"#.to_vec()
                        }
                        oid::JSON | oid::JSONB => {
                            format!("{{\"k\": \"{words}{found}\"}}").into_bytes()
                        }
                        _ => format!("{words}{found}{words}").into_bytes(),
                    };
                    let binary = rng.gen_bool(0.5);
                    if binary && t == oid::JSONB {
                        v.insert(0, 1);
                    }
                    vals.push(Some(v));
                    masks.push(Some(ColumnMask {
                        how: MaskFunction::Redact,
                        type_oid: t,
                        binary,
                        scan: Some(
                            vec![Arc::new(
                                Scanner::new(
                                    "found",
                                    &[
                                        crate::policy::model::Detector::Email,
                                        crate::policy::model::Detector::CardNumber,
                                    ],
                                    &[],
                                    MaskFunction::Redact,
                                )
                                .unwrap()
                                .unwrap(),
                            )]
                            .into(),
                        ),
                    }));
                    continue;
                }
                vals.push((!rng.gen_ratio(1, 8)).then_some(v));
                masks.push(rng.gen_bool(0.5).then(|| ColumnMask {
                    how: match rng.gen_range(0..5) {
                        0 => MaskFunction::Redact,
                        1 => MaskFunction::Partial {
                            keep: rng.gen_range(0..8),
                        },
                        2 => MaskFunction::Hash,
                        3 => MaskFunction::Null,
                        _ => MaskFunction::Email,
                    },
                    type_oid: t,
                    binary: rng.gen_bool(0.5),
                    scan: None,
                }));
            }
            let refs: Vec<Option<&[u8]>> = vals.iter().map(|v| v.as_deref()).collect();
            let body = row(&refs);
            let mut out = Vec::new();
            let mut counts = vec![0u64; n];
            let masked = m.rewrite_row(&body, &masks, &mut out, &mut counts).unwrap();
            let got = values(&out);
            assert_eq!(got.len(), n);
            assert_eq!(counts.iter().sum::<u64>(), u64::from(masked));
            let mut expect_masked = 0;
            for i in 0..n {
                match (&masks[i], &vals[i]) {
                    (_, None) => assert_eq!((got[i].as_ref(), counts[i]), (None, 0)),
                    (None, Some(v)) => assert_eq!((got[i].as_ref(), counts[i]), (Some(v), 0)),
                    (Some(mk), Some(v)) if mk.scan.is_some() => {
                        let g = got[i].as_ref().expect("redacted, never NULL");
                        let inner = |b: &[u8]| {
                            if mk.binary && mk.type_oid == oid::JSONB {
                                b[1..].to_vec()
                            } else {
                                b.to_vec()
                            }
                        };
                        let hit = v.windows(15).any(|w| w == b"ann@example.org")
                            || v.windows(16).any(|w| w == b"4111111111111111");
                        assert_eq!(
                            counts[i],
                            u64::from(hit),
                            "{:?}",
                            String::from_utf8_lossy(v)
                        );
                        expect_masked += u32::from(hit);
                        if hit {
                            assert!(!g.windows(15).any(|w| w == b"ann@example.org"));
                            if matches!(mk.type_oid, oid::JSON | oid::JSONB) {
                                serde_json::from_slice::<serde_json::Value>(&inner(g)).unwrap();
                            }
                        } else {
                            assert_eq!(g, v, "nothing found: as sent");
                        }
                    }
                    (Some(mk), Some(v)) => {
                        assert_eq!(counts[i], 1, "a masked value is counted in its column");
                        expect_masked += 1;
                        if v.len() >= 12 && !matches!(mk.how, MaskFunction::Partial { .. }) {
                            assert_ne!(got[i].as_ref(), Some(v));
                        }
                        if let Some(g) = &got[i] {
                            match mk.type_oid {
                                oid::INT2 | oid::INT4 | oid::INT8 if mk.binary => {
                                    assert!(matches!(g.len(), 2 | 4 | 8))
                                }
                                oid::INT2 | oid::INT4 | oid::INT8 => {
                                    std::str::from_utf8(g).unwrap().parse::<i64>().unwrap();
                                }
                                oid::JSON => {
                                    serde_json::from_slice::<serde_json::Value>(g).unwrap();
                                }
                                oid::JSONB if !mk.binary => {
                                    serde_json::from_slice::<serde_json::Value>(g).unwrap();
                                }
                                oid::JSONB => {
                                    assert_eq!(g[0], 1);
                                    serde_json::from_slice::<serde_json::Value>(&g[1..]).unwrap();
                                }
                                _ => {
                                    std::str::from_utf8(g).unwrap();
                                }
                            }
                        }
                    }
                }
            }
            assert_eq!(masked, expect_masked);
        }
    }

    #[test]
    fn notices_lose_what_may_echo_values() {
        assert_eq!(
            scrub_notice_field(
                b'M',
                br#"invalid input syntax for type integer: "alice@example.com""#
            ),
            Some(br#"invalid input syntax for type integer: "****""#.to_vec())
        );
        assert!(
            scrub_notice_field(b'D', b"Key (email)=(a@b.c) already exists.")
                .is_some_and(|v| !v.windows(5).any(|w| w == b"a@b.c"))
        );
        assert_eq!(scrub_notice_field(b'C', b"23505"), None);
        let raise = b"SERROR\0CP0001\0Malice@example.com\0\0";
        assert!(raised_by_code(raise));
        let out = scrub_notice(raise, true);
        assert!(!out.windows(5).any(|w| w == b"alice"));
        assert!(out.starts_with(b"SERROR\0CP0001\0M(message hidden"));
        assert_eq!(out.last(), Some(&0));
        let unique = b"SERROR\0C23505\0Mduplicate key value violates unique constraint \"u\"\0DKey (email)=(a@b.c) already exists.\0\0";
        assert!(!raised_by_code(unique));
        let out = scrub_notice(unique, false);
        assert!(!out.windows(5).any(|w| w == b"a@b.c"));
        assert!(out.windows(9).any(|w| w == b"duplicate"));
    }
}
