//! What each output column of a query reads, from Postgres's own parse tree: for masking,
//! which computed columns derive from masked ones (`SELECT lower(email), count(*)` masks
//! the first, not the second) and which columns of a view are masked columns under other
//! names.
//!
//! Names are resolved the way Postgres resolves them, through the FROM list, sub-selects,
//! CTEs (with their column aliases), joins, set operations and sub-links, and in doubt
//! towards reading more: an unqualified name that several relations may hold reads from
//! each of them, a name a sub-select does not output reads every output of it, a relation
//! whose columns cannot be told (a function in FROM, a recursive CTE's own rows) makes
//! what reads it opaque. The decision which names are masked is the caller's (the proxy's
//! catalog).

use std::collections::BTreeSet;

use serde_json::Value;

use super::facts::{list, strings, unwrap_node};

/// A column read: `rel.column`, `rel.*` (a whole row), or with no relation when the name
/// cannot be tied to one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ref {
    pub rel: Option<String>,
    /// `*` for a whole row.
    pub column: String,
}

/// One output column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Its name, as Postgres names it (an alias, the column, the function).
    pub name: String,
    /// A plain column reference, passed through unchanged (Postgres describes it with its
    /// table and column, through sub-selects and CTEs).
    pub plain: bool,
    /// The columns its value is computed from.
    pub reads: BTreeSet<Ref>,
    /// What it reads cannot be told.
    pub opaque: bool,
}

impl Output {
    /// What it reads.
    pub fn lineage(&self) -> Lineage {
        Lineage {
            reads: self.reads.clone(),
            opaque: self.opaque,
        }
    }

    fn absorb(&mut self, other: &Lineage) {
        self.reads.extend(other.reads.iter().cloned());
        self.opaque |= other.opaque;
    }
}

/// Output columns in order; a `*` over a relation stands for its columns, whose number
/// the parse tree does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    One(Output),
    /// `*` or `t.*` over a table or view: its columns, plain.
    Table(String),
    /// Columns of unknown number, reading this.
    Rest(Lineage),
}

/// What a value reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    pub reads: BTreeSet<Ref>,
    pub opaque: bool,
}

impl Lineage {
    fn add(&mut self, other: Lineage) {
        self.reads.extend(other.reads);
        self.opaque |= other.opaque;
    }

    fn of_slots(slots: &[Slot]) -> Lineage {
        let mut l = Lineage::default();
        for s in slots {
            match s {
                Slot::One(o) => {
                    l.reads.extend(o.reads.iter().cloned());
                    l.opaque |= o.opaque;
                }
                Slot::Table(rel) => {
                    l.reads.insert(Ref {
                        rel: Some(rel.clone()),
                        column: "*".into(),
                    });
                }
                Slot::Rest(r) => l.add(r.clone()),
            }
        }
        l
    }
}

/// The outputs of a statement's result (a SELECT, VALUES, or the RETURNING list of an
/// INSERT, UPDATE or DELETE, or a cursor's query); None for a statement that returns no
/// rows of data, or when its tree has no shape this module knows.
pub fn of_statement(kind: &str, body: &Value) -> Option<Vec<Slot>> {
    match kind {
        "SelectStmt" => Some(select(body, None)),
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" => {
            let ret = body.get("returning_clause").filter(|v| !v.is_null())?;
            let mut scope = Scope::new(None);
            scope.with(body);
            if let Some(rel) = body.get("relation").filter(|v| !v.is_null()) {
                scope.range_var(rel);
            }
            for field in ["from_clause", "using_clause"] {
                for (k, item) in list(body, field) {
                    scope.add_from_item(&k, &item);
                }
            }
            Some(scope.targets(ret, "exprs"))
        }
        "DeclareCursorStmt" | "PrepareStmt" => {
            let (k, q) = body.get("query").and_then(unwrap_node)?;
            of_statement(k, q)
        }
        _ => None,
    }
}

/// The outputs of a query string holding one statement (a view's definition).
pub fn of_query(sql: &str) -> Option<Vec<Slot>> {
    let parsed = pg_query::parse(sql, 0).ok()?;
    if parsed.protobuf.stmts.len() != 1 {
        return None;
    }
    let tree = serde_json::to_value(&parsed.protobuf).ok()?;
    let st = tree.get("stmts")?.get(0)?.get("stmt")?;
    let (k, b) = unwrap_node(st)?;
    of_statement(k, b)
}

/// Which output each of `n` described columns is: None where the slots cannot be lined up
/// with them (two `*` of unknown width, or a count that does not add up). A column of a
/// `Table` slot is `Err(())`, plain by construction.
pub fn align(slots: &[Slot], n: usize) -> Option<Vec<Result<Lineage, ()>>> {
    let known = slots.iter().filter(|s| matches!(s, Slot::One(_))).count();
    let open = slots.len() - known;
    let width = match open {
        0 if known == n => 0,
        1 if n >= known => n - known,
        _ => return None,
    };
    let mut out = Vec::with_capacity(n);
    for s in slots {
        match s {
            Slot::One(o) => out.push(Ok(o.lineage())),
            Slot::Table(_) => out.extend((0..width).map(|_| Err(()))),
            Slot::Rest(l) => out.extend((0..width).map(|_| Ok(l.clone()))),
        }
    }
    (out.len() == n).then_some(out)
}

/// What a FROM item offers to names.
#[derive(Debug, Clone)]
enum Source {
    /// A table or view (its columns are not known here).
    Relation(String),
    /// A sub-select, CTE or VALUES: its outputs.
    Derived(Vec<Slot>),
    /// Columns of unknown source (a function, a recursive CTE's own rows).
    Opaque(Lineage),
}

#[derive(Debug, Clone)]
struct Entry {
    /// The names it may be qualified by.
    names: Vec<String>,
    source: Source,
}

struct Scope<'a> {
    entries: Vec<Entry>,
    ctes: Vec<(String, Source)>,
    parent: Option<&'a Scope<'a>>,
}

fn select(body: &Value, parent: Option<&Scope>) -> Vec<Slot> {
    let mut scope = Scope::new(parent);
    scope.with(body);
    if body.get("op").and_then(Value::as_i64).unwrap_or(1) != 1 {
        // UNION, INTERSECT, EXCEPT: each output reads the same output of both sides
        // (Postgres describes them without a source).
        let side = |s: &str| {
            body.get(s)
                .filter(|v| !v.is_null())
                .map(|b| select(b, Some(&scope)))
                .unwrap_or_default()
        };
        let (l, r) = (side("larg"), side("rarg"));
        let ones = |v: &[Slot]| v.iter().all(|s| matches!(s, Slot::One(_)));
        if l.len() == r.len() && ones(&l) && ones(&r) {
            return l
                .into_iter()
                .zip(r)
                .map(|(a, b)| match (a, b) {
                    (Slot::One(mut a), Slot::One(b)) => {
                        a.plain = false;
                        a.reads.extend(b.reads);
                        a.opaque |= b.opaque;
                        Slot::One(a)
                    }
                    _ => unreachable!("both sides are single outputs"),
                })
                .collect();
        }
        let mut all = Lineage::of_slots(&l);
        all.add(Lineage::of_slots(&r));
        return vec![Slot::Rest(all)];
    }
    if let Some(Value::Array(rows)) = body.get("values_lists") {
        if !rows.is_empty() {
            let mut outs: Vec<Output> = Vec::new();
            for row in rows {
                let items = unwrap_node(row)
                    .filter(|(k, _)| *k == "List")
                    .and_then(|(_, l)| l.get("items"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (i, item) in items.iter().enumerate() {
                    if outs.len() <= i {
                        outs.push(Output {
                            name: format!("column{}", i + 1),
                            ..Output::default()
                        });
                    }
                    let l = scope.expr(item);
                    outs[i].absorb(&l);
                }
            }
            return outs.into_iter().map(Slot::One).collect();
        }
    }
    for (k, item) in list(body, "from_clause") {
        scope.add_from_item(&k, &item);
    }
    scope.targets(body, "target_list")
}

impl<'a> Scope<'a> {
    fn new(parent: Option<&'a Scope<'a>>) -> Self {
        Scope {
            entries: Vec::new(),
            ctes: Vec::new(),
            parent,
        }
    }

    /// A WITH clause's CTEs, each seeing those before it.
    fn with(&mut self, body: &Value) {
        let Some(w) = body.get("with_clause").filter(|v| !v.is_null()) else {
            return;
        };
        let recursive = w.get("recursive").and_then(Value::as_bool) == Some(true);
        for (k, cte) in list(w, "ctes") {
            if k != "CommonTableExpr" {
                continue;
            }
            let name = cte
                .get("ctename")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if recursive {
                // Its own rows, read inside its definition: of unknown source.
                self.ctes.push((
                    name.clone(),
                    Source::Opaque(Lineage {
                        opaque: true,
                        ..Lineage::default()
                    }),
                ));
            }
            let source = match cte.get("ctequery").and_then(unwrap_node) {
                Some((qk, q)) => {
                    let slots = match qk {
                        "SelectStmt" => select(q, Some(self)),
                        // A data-modifying CTE: what its RETURNING returns.
                        _ => of_statement(qk, q).unwrap_or_default(),
                    };
                    Source::Derived(renamed(slots, &strings(cte.get("aliascolnames"))))
                }
                None => Source::Opaque(Lineage {
                    opaque: true,
                    ..Lineage::default()
                }),
            };
            if recursive {
                if let Some(last) = self.ctes.last_mut() {
                    // Its outputs also read what its recursion reads: unknown.
                    last.1 = match source {
                        Source::Derived(slots) => {
                            let mut l = Lineage::of_slots(&slots);
                            l.opaque = true;
                            Source::Opaque(l)
                        }
                        other => other,
                    };
                }
            } else {
                self.ctes.push((name, source));
            }
        }
    }

    fn cte(&self, name: &str) -> Option<Source> {
        if let Some((_, s)) = self.ctes.iter().rev().find(|(n, _)| n == name) {
            return Some(s.clone());
        }
        self.parent.and_then(|p| p.cte(name))
    }

    fn range_var(&mut self, rv: &Value) {
        let rel = rv
            .get("relname")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let schema = rv.get("schemaname").and_then(Value::as_str).unwrap_or("");
        let alias = rv.pointer("/alias/aliasname").and_then(Value::as_str);
        let colnames = strings(rv.pointer("/alias/colnames"));
        let source = match (schema.is_empty()).then(|| self.cte(&rel)).flatten() {
            Some(Source::Derived(slots)) => Source::Derived(renamed(slots, &colnames)),
            Some(other) => other,
            None if colnames.is_empty() => Source::Relation(rel.clone()),
            // Columns renamed by the alias: the new names read the relation's columns in
            // an order not known here.
            None => Source::Opaque(Lineage {
                reads: [Ref {
                    rel: Some(rel.clone()),
                    column: "*".into(),
                }]
                .into(),
                opaque: false,
            }),
        };
        let mut names = vec![rel];
        if let Some(a) = alias {
            names.push(a.to_string());
        }
        self.entries.push(Entry { names, source });
    }

    fn add_from_item(&mut self, kind: &str, item: &Value) {
        let alias = item.pointer("/alias/aliasname").and_then(Value::as_str);
        let colnames = strings(item.pointer("/alias/colnames"));
        match kind {
            "RangeVar" => self.range_var(item),
            "JoinExpr" => {
                for side in ["larg", "rarg"] {
                    if let Some((k, b)) = item.get(side).and_then(unwrap_node) {
                        self.add_from_item(k, b);
                    }
                }
                if let Some(a) = alias {
                    // `(a JOIN b) AS j`: j's columns are those of both sides.
                    let mut l = Lineage::default();
                    for e in &self.entries {
                        l.add(e.whole());
                    }
                    self.entries.push(Entry {
                        names: vec![a.to_string()],
                        source: Source::Opaque(l),
                    });
                }
            }
            "RangeSubselect" => {
                let slots = match item.get("subquery").and_then(unwrap_node) {
                    Some(("SelectStmt", q)) => select(q, Some(self)),
                    _ => vec![Slot::Rest(Lineage {
                        opaque: true,
                        ..Lineage::default()
                    })],
                };
                self.entries.push(Entry {
                    names: alias.map(str::to_string).into_iter().collect(),
                    source: Source::Derived(renamed(slots, &colnames)),
                });
            }
            "RangeFunction" => {
                // A built-in set-returning function reads its arguments (a user-defined
                // one is judged apart: its body is unknown).
                let l = self.expr(item.get("functions").unwrap_or(&Value::Null));
                self.entries.push(Entry {
                    names: alias.map(str::to_string).into_iter().collect(),
                    source: Source::Opaque(l),
                });
            }
            _ => {
                // XMLTABLE, JSON_TABLE, TABLESAMPLE and what else: unknown.
                let mut l = self.expr(item);
                l.opaque = true;
                self.entries.push(Entry {
                    names: alias.map(str::to_string).into_iter().collect(),
                    source: Source::Opaque(l),
                });
            }
        }
    }

    /// An output list.
    fn targets(&self, body: &Value, field: &str) -> Vec<Slot> {
        let mut out = Vec::new();
        for (k, t) in list(body, field) {
            if k != "ResTarget" {
                continue;
            }
            let alias = t
                .get("name")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let Some((vk, v)) = t.get("val").and_then(unwrap_node) else {
                continue;
            };
            if vk == "ColumnRef" {
                let fields = list(v, "fields");
                if fields.last().is_some_and(|(k, _)| k == "AStar") {
                    out.extend(self.star(&fields));
                    continue;
                }
                let (l, plain) = self.column(&fields);
                out.push(Slot::One(Output {
                    name: alias
                        .map(str::to_string)
                        .or_else(|| fields.last().and_then(|(_, f)| sval(f)))
                        .unwrap_or_default(),
                    plain,
                    reads: l.reads,
                    opaque: l.opaque,
                }));
                continue;
            }
            let l = self.expr(v);
            out.push(Slot::One(Output {
                name: alias
                    .map(str::to_string)
                    .unwrap_or_else(|| default_name(vk, v)),
                plain: false,
                reads: l.reads,
                opaque: l.opaque,
            }));
        }
        out
    }

    /// `*` or `q.*` as an output list entry: the columns it expands to.
    fn star(&self, fields: &[(String, Value)]) -> Vec<Slot> {
        let expand = |e: &Entry| match &e.source {
            Source::Relation(rel) => vec![Slot::Table(rel.clone())],
            Source::Derived(slots) => slots.clone(),
            Source::Opaque(l) => vec![Slot::Rest(l.clone())],
        };
        if fields.len() == 1 {
            return self.entries.iter().flat_map(expand).collect();
        }
        let q = sval(&fields[fields.len() - 2].1).unwrap_or_default();
        match self.find(&q) {
            Some(e) => expand(e),
            None => vec![Slot::Rest(Lineage {
                reads: [Ref {
                    rel: Some(q),
                    column: "*".into(),
                }]
                .into(),
                opaque: false,
            })],
        }
    }

    /// The entry a qualifier names, here or in an enclosing query.
    fn find(&self, q: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.names.iter().any(|n| n == q))
            .or_else(|| self.parent.and_then(|p| p.find(q)))
    }

    /// A column reference (not a star): what it reads, and whether it is a plain column.
    fn column(&self, fields: &[(String, Value)]) -> (Lineage, bool) {
        let names: Vec<String> = fields.iter().filter_map(|(_, f)| sval(f)).collect();
        if names.len() != fields.len() || names.is_empty() {
            // `x.*` inside an expression, or what is not a plain name.
            return match fields.last() {
                Some((k, _)) if k == "AStar" => (self.whole(fields), false),
                _ => (
                    Lineage {
                        opaque: true,
                        ..Lineage::default()
                    },
                    false,
                ),
            };
        }
        let column = names.last().expect("not empty").clone();
        if names.len() == 1 {
            return self.unqualified(&column);
        }
        let q = &names[names.len() - 2];
        match self.find(q) {
            // No such column where names can be told: every output it has.
            Some(e) => e.column(&column).unwrap_or_else(|| (e.whole(), false)),
            // `schema.table.column` of a relation outside the FROM list, or a field of a
            // composite column: by name.
            None => (
                Lineage {
                    reads: [
                        Ref {
                            rel: Some(q.clone()),
                            column: column.clone(),
                        },
                        Ref { rel: None, column },
                        Ref {
                            rel: None,
                            column: q.clone(),
                        },
                    ]
                    .into(),
                    opaque: false,
                },
                false,
            ),
        }
    }

    /// An unqualified name: a column of any relation of the FROM list that may hold it
    /// (then of the enclosing queries'), or a whole row if it names a relation.
    fn unqualified(&self, column: &str) -> (Lineage, bool) {
        let mut l = Lineage::default();
        let mut plain = true;
        let mut found = false;
        for e in &self.entries {
            if let Some((c, p)) = e.column(column) {
                found = true;
                plain &= p;
                l.add(c);
            }
            if e.names.iter().any(|n| n == column) {
                // `SELECT c FROM customers c`: the whole row.
                l.add(e.whole());
                plain = false;
                found = true;
            }
        }
        if !found {
            match self.parent {
                Some(p) => return p.unqualified(column),
                None => {
                    l.reads.insert(Ref {
                        rel: None,
                        column: column.to_string(),
                    });
                    plain = false;
                }
            }
        }
        (l, plain)
    }

    /// `*` or `q.*` inside an expression: whole rows.
    fn whole(&self, fields: &[(String, Value)]) -> Lineage {
        if fields.len() == 1 {
            let mut l = Lineage::default();
            for e in &self.entries {
                l.add(e.whole());
            }
            return l;
        }
        let q = sval(&fields[fields.len() - 2].1).unwrap_or_default();
        match self.find(&q) {
            Some(e) => e.whole(),
            None => Lineage {
                reads: [Ref {
                    rel: Some(q),
                    column: "*".into(),
                }]
                .into(),
                opaque: false,
            },
        }
    }

    /// What an expression reads: every column reference in it, and what its sub-selects
    /// output.
    fn expr(&self, v: &Value) -> Lineage {
        let mut l = Lineage::default();
        self.expr_into(v, &mut l);
        l
    }

    fn expr_into(&self, v: &Value, l: &mut Lineage) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| self.expr_into(i, l)),
            Value::Object(map) => {
                for (key, body) in map {
                    match key.as_str() {
                        "ColumnRef" => {
                            let fields = list(body, "fields");
                            if fields.last().is_some_and(|(k, _)| k == "AStar") {
                                l.add(self.whole(&fields));
                            } else {
                                l.add(self.column(&fields).0);
                            }
                        }
                        "SubLink" => {
                            if let Some(("SelectStmt", q)) =
                                body.get("subselect").and_then(unwrap_node)
                            {
                                l.add(Lineage::of_slots(&select(q, Some(self))));
                            } else {
                                l.opaque = true;
                            }
                            // The tested expression of `x IN (…)` and the like.
                            if let Some(t) = body.get("testexpr") {
                                self.expr_into(t, l);
                            }
                        }
                        "SelectStmt" => l.add(Lineage::of_slots(&select(body, Some(self)))),
                        _ => self.expr_into(body, l),
                    }
                }
            }
            _ => {}
        }
    }
}

impl Entry {
    /// What its column of this name reads, and whether it is plain; None if it has no
    /// column of that name (as far as names can be told: an output whose name this
    /// module does not know, or a `*` it passes on, may be any).
    fn column(&self, column: &str) -> Option<(Lineage, bool)> {
        match &self.source {
            Source::Relation(rel) => Some((
                Lineage {
                    reads: [Ref {
                        rel: Some(rel.clone()),
                        column: column.to_string(),
                    }]
                    .into(),
                    opaque: false,
                },
                true,
            )),
            Source::Derived(slots) => {
                let exact: Vec<&Output> = slots
                    .iter()
                    .filter_map(|s| match s {
                        Slot::One(o) if o.name == column => Some(o),
                        _ => None,
                    })
                    .collect();
                if let [o] = exact.as_slice() {
                    return Some((o.lineage(), o.plain));
                }
                let mut l = Lineage::default();
                let mut plain = exact.is_empty();
                let mut any = false;
                for s in slots {
                    match s {
                        Slot::One(o) if o.name == column || o.name.is_empty() => {
                            l.reads.extend(o.reads.iter().cloned());
                            l.opaque |= o.opaque;
                            plain = false;
                            any = true;
                        }
                        Slot::One(_) => {}
                        Slot::Table(rel) => {
                            l.reads.insert(Ref {
                                rel: Some(rel.clone()),
                                column: column.to_string(),
                            });
                            any = true;
                        }
                        Slot::Rest(r) => {
                            l.add(r.clone());
                            plain = false;
                            any = true;
                        }
                    }
                }
                any.then_some((l, plain))
            }
            Source::Opaque(l) => Some((l.clone(), false)),
        }
    }

    /// The whole row.
    fn whole(&self) -> Lineage {
        match &self.source {
            Source::Relation(rel) => Lineage {
                reads: [Ref {
                    rel: Some(rel.clone()),
                    column: "*".into(),
                }]
                .into(),
                opaque: false,
            },
            Source::Derived(slots) => Lineage::of_slots(slots),
            Source::Opaque(l) => l.clone(),
        }
    }
}

/// Outputs renamed by a column alias list (`AS s(a, b)`, `WITH x(a, b)`).
fn renamed(mut slots: Vec<Slot>, names: &[String]) -> Vec<Slot> {
    if names.is_empty() {
        return slots;
    }
    if !slots.iter().all(|s| matches!(s, Slot::One(_))) {
        // Renaming columns of unknown number: every name reads all of them.
        let l = Lineage::of_slots(&slots);
        return names
            .iter()
            .map(|n| {
                Slot::One(Output {
                    name: n.clone(),
                    plain: false,
                    reads: l.reads.clone(),
                    opaque: l.opaque,
                })
            })
            .chain(std::iter::once(Slot::Rest(l.clone())))
            .collect();
    }
    for (s, n) in slots.iter_mut().zip(names) {
        if let Slot::One(o) = s {
            o.name = n.clone();
        }
    }
    slots
}

/// The name Postgres gives an output without an alias (FigureColname, in part): a
/// function's name, a cast's operand's; empty where this module does not know it (such
/// an output may be any name read from outside).
fn default_name(kind: &str, v: &Value) -> String {
    match kind {
        "FuncCall" => strings(v.get("funcname")).pop().unwrap_or_default(),
        "TypeCast" => match v.get("arg").and_then(unwrap_node) {
            Some(("ColumnRef", c)) => list(c, "fields")
                .last()
                .and_then(|(_, f)| sval(f))
                .unwrap_or_default(),
            Some((k, b)) => default_name(k, b),
            None => String::new(),
        },
        "CaseExpr" => "case".into(),
        "CoalesceExpr" => "coalesce".into(),
        _ => String::new(),
    }
}

fn sval(v: &Value) -> Option<String> {
    v.get("sval").and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outs(sql: &str) -> Vec<Slot> {
        of_query(sql).unwrap_or_else(|| panic!("no outputs for {sql}"))
    }

    fn one(s: &Slot) -> &Output {
        match s {
            Slot::One(o) => o,
            other => panic!("not one output: {other:?}"),
        }
    }

    fn cols(o: &Output) -> Vec<String> {
        o.reads
            .iter()
            .map(|r| format!("{}.{}", r.rel.as_deref().unwrap_or("?"), r.column))
            .collect()
    }

    #[test]
    fn per_output() {
        let s = outs("SELECT lower(email), count(*), id FROM customers GROUP BY 1, 3");
        assert_eq!(s.len(), 3);
        assert_eq!(cols(one(&s[0])), ["customers.email"]);
        assert!(!one(&s[0]).plain);
        assert!(cols(one(&s[1])).is_empty());
        assert!(one(&s[2]).plain);
        assert_eq!(one(&s[0]).name, "lower");
    }

    #[test]
    fn through_sub_selects_and_ctes_that_rename() {
        for sql in [
            "SELECT lower(e) FROM (SELECT email AS e FROM customers) s",
            "WITH x AS (SELECT email AS e FROM customers) SELECT lower(e) FROM x",
            "WITH x(e) AS (SELECT email FROM customers) SELECT lower(x.e) FROM x",
            "SELECT lower(s.e) FROM (SELECT email FROM customers) s(e)",
            "SELECT lower(e) FROM (SELECT * FROM (SELECT email AS e FROM customers) a) b",
            "SELECT upper(t.e) FROM customers c JOIN (SELECT id, email AS e FROM customers) t USING (id)",
        ] {
            let s = outs(sql);
            let o = one(&s[0]);
            assert!(
                o.reads.iter().any(|r| r.column == "email"),
                "{sql}: {:?}",
                o
            );
            assert!(!o.plain, "{sql}");
        }
        // A plain column passed through a sub-select stays plain.
        let s = outs("SELECT e FROM (SELECT email AS e FROM customers) s");
        assert!(one(&s[0]).plain);
        assert_eq!(cols(one(&s[0])), ["customers.email"]);
    }

    #[test]
    fn whole_rows_set_operations_and_sub_links() {
        let s = outs("SELECT c, row_to_json(c), (c).email FROM customers c");
        for o in &s {
            assert!(cols(one(o)).contains(&"customers.*".to_string()), "{o:?}");
            assert!(!one(o).plain);
        }
        let s = outs("SELECT id FROM customers UNION SELECT length(email) FROM customers");
        assert_eq!(cols(one(&s[0])), ["customers.email", "customers.id"]);
        assert!(!one(&s[0]).plain);
        let s = outs("SELECT id, (SELECT email FROM customers LIMIT 1) FROM orders");
        assert_eq!(cols(one(&s[1])), ["customers.email"]);
        assert_eq!(cols(one(&s[0])), ["orders.id"]);
        // Correlated: the inner name resolves outside.
        let s = outs("SELECT (SELECT o.total FROM orders o WHERE o.id = c.id) FROM customers c");
        assert_eq!(cols(one(&s[0])), ["orders.total"]);
    }

    #[test]
    fn stars_and_alignment() {
        let s = outs("SELECT *, lower(email) FROM customers");
        assert!(matches!(s[0], Slot::Table(_)));
        let a = align(&s, 6).expect("one star: aligned");
        assert!(a[..5].iter().all(Result::is_err));
        assert!(a[5].as_ref().is_ok_and(|l| !l.reads.is_empty()));
        assert!(align(&s, 0).is_none());
        let two = outs("SELECT *, * FROM customers");
        assert!(align(&two, 10).is_none());
        let s = outs("SELECT * FROM (SELECT id, lower(email) FROM customers) s");
        let a = align(&s, 2).expect("known width");
        assert!(a[0]
            .as_ref()
            .unwrap()
            .reads
            .iter()
            .all(|r| r.column == "id"));
        assert!(a[1]
            .as_ref()
            .unwrap()
            .reads
            .iter()
            .any(|r| r.column == "email"));
    }

    #[test]
    fn functions_in_from_recursive_ctes_returning() {
        let s = outs("SELECT lower(email), g FROM customers, generate_series(1, 3) g");
        assert!(one(&s[0]).reads.iter().any(|r| r.column == "email"));
        let s = outs(
            "WITH RECURSIVE r(n, e) AS (SELECT 1, email FROM customers UNION ALL SELECT n + 1, e FROM r WHERE n < 3) SELECT e FROM r",
        );
        assert!(one(&s[0]).opaque);
        let s = of_query("UPDATE customers SET note = 'x' WHERE id = 1 RETURNING lower(email), id")
            .unwrap();
        assert_eq!(cols(one(&s[0])), ["customers.email"]);
        assert!(one(&s[1]).plain);
        assert!(of_query("UPDATE customers SET note = 'x'").is_none());
        let s = outs("VALUES (1, 'a'), (2, 'b')");
        assert_eq!(s.len(), 2);
        assert_eq!(one(&s[1]).name, "column2");
    }

    #[test]
    fn a_view_definition() {
        // As pg_get_viewdef writes one.
        let s = outs(
            " SELECT c.id,\n    c.email AS contact,\n    upper(c.note) AS shout,\n    lower(c.email) AS low\n   FROM customers c;",
        );
        let names: Vec<&str> = s.iter().map(|o| one(o).name.as_str()).collect();
        assert_eq!(names, ["id", "contact", "shout", "low"]);
        assert!(one(&s[1]).plain);
        assert_eq!(cols(one(&s[1])), ["customers.email"]);
        assert_eq!(cols(one(&s[2])), ["customers.note"]);
        assert!(!one(&s[3]).plain);
    }
}
