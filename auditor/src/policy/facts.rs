//! What a query string does, read from Postgres's own parse tree (pg_query): every
//! statement of it, with sub-selects, CTEs, EXPLAIN'd and PREPARE'd statements, function
//! arguments and expressions of every kind. Rules are judged on these facts, never on the
//! text alone.
//!
//! The tree is walked whole and generically (its serialised form), not through a list of
//! the node types somebody thought of: a table or function call hidden in an expression
//! the walker was not told about is still found.

use std::collections::BTreeSet;

use serde_json::Value;

/// A relation or function name as the statement wrote it (schema empty when unqualified).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.schema.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}.{}", self.schema, self.name)
        }
    }
}

/// A column reference: `email`, `u.email`, `s.users.email`, `*`, `u.*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ColumnUse {
    /// What qualifies it (alias, table, schema.table), empty when unqualified.
    pub qualifier: Vec<String>,
    /// The column; None for `*`.
    pub column: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// Statements in the query string.
    pub statements: usize,
    /// Every command anywhere in it (a DELETE in a CTE counts).
    pub commands: BTreeSet<String>,
    pub tables: BTreeSet<QualifiedName>,
    pub functions: BTreeSet<QualifiedName>,
    pub columns: BTreeSet<ColumnUse>,
    /// Creates, alters or drops schema objects, or changes privileges.
    pub ddl: bool,
    /// An UPDATE or DELETE without WHERE.
    pub without_where: bool,
    /// COPY ... TO/FROM PROGRAM.
    pub copy_program: bool,
    /// DO, CALL, SQL-level EXECUTE, LOAD: the parse tree does not show what runs.
    pub opaque: bool,
    /// What the statement returns to the client (its select list, RETURNING, a cursor's
    /// query), for masking: the column names read by outputs that are computed (an
    /// expression, not a plain column), `*` for a star inside one.
    pub computed_refs: BTreeSet<String>,
    /// An output whose source cannot be told from names: a set operation (UNION), a
    /// sub-select or function in FROM or as a value, a CTE or whole-row reference inside
    /// an expression, an output of a sub-select or CTE that is itself computed.
    pub computed_opaque: bool,
    /// Reads a cursor (FETCH, MOVE) or a prepared statement (EXECUTE) by name: what it
    /// returns was decided by an earlier statement.
    pub reads_by_name: bool,
    /// Column names an UPDATE's SET expressions read (`SET note = email` copies `email`).
    pub written_refs: BTreeSet<String>,
    /// Values read may be written elsewhere (CREATE TABLE AS, SELECT INTO, INSERT …
    /// SELECT, UPDATE … FROM, MERGE, COPY … TO): masking cannot follow them.
    pub copies_data: bool,
    /// What each output column of its result reads (a query string of one statement that
    /// returns rows of data): masking decides per output which computed columns derive
    /// from masked ones.
    pub outputs: Option<Vec<super::lineage::Slot>>,
}

impl Facts {
    /// A FunctionCall message: a function by oid, whatever it does.
    pub fn function_call() -> Facts {
        Facts {
            statements: 1,
            commands: ["FUNCTION CALL".to_string()].into(),
            opaque: true,
            ..Facts::default()
        }
    }

    /// The facts of a query string; None when pg_query cannot parse it.
    pub fn of(sql: &str) -> Option<Facts> {
        let parsed = pg_query::parse(sql, 0).ok()?;
        let tree = serde_json::to_value(&parsed.protobuf).ok()?;
        let mut facts = Facts {
            statements: parsed.protobuf.stmts.len(),
            ..Facts::default()
        };
        walk(&tree, &mut facts);
        if let Some(Value::Array(stmts)) = tree.get("stmts") {
            for st in stmts {
                if let Some(Value::Object(node)) = st.get("stmt").and_then(|s| s.get("node")) {
                    for (kind, body) in node {
                        outputs(kind, body, &mut facts);
                        // Names resolved through sub-selects and CTEs (`lower(e)` of a
                        // sub-select's `email AS e` reads `email`).
                        let slots = super::lineage::of_statement(kind, body);
                        for s in slots.iter().flatten() {
                            let l = match s {
                                super::lineage::Slot::One(o) if !o.plain => o.lineage(),
                                super::lineage::Slot::Rest(l) => l.clone(),
                                _ => continue,
                            };
                            facts.computed_opaque |= l.opaque;
                            facts
                                .computed_refs
                                .extend(l.reads.into_iter().map(|r| r.column));
                        }
                        if stmts.len() == 1 {
                            facts.outputs = slots;
                        }
                    }
                }
            }
        }
        Some(facts)
    }
}

/// The node a `{"node": {Kind: body}}` wrapper holds.
pub(super) fn unwrap_node(v: &Value) -> Option<(&str, &Value)> {
    let Value::Object(m) = v.get("node")? else {
        return None;
    };
    m.iter().next().map(|(k, b)| (k.as_str(), b))
}

pub(super) fn list(v: &Value, field: &str) -> Vec<(String, Value)> {
    match v.get(field) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| unwrap_node(i).map(|(k, b)| (k.to_string(), b.clone())))
            .collect(),
        _ => Vec::new(),
    }
}

/// What a top-level statement returns or copies (see [`Facts::computed_refs`]).
fn outputs(kind: &str, body: &Value, facts: &mut Facts) {
    match kind {
        "SelectStmt" => {
            if body.get("into_clause").is_some_and(|v| !v.is_null()) {
                facts.copies_data = true;
            }
            select_outputs(body, facts);
        }
        "InsertStmt" => {
            if let Some((_, sel)) = body.get("select_stmt").and_then(unwrap_node) {
                let reads = !list(sel, "from_clause").is_empty()
                    || sel.get("with_clause").is_some_and(|v| !v.is_null())
                    || sel.get("op").and_then(Value::as_i64).unwrap_or(1) != 1
                    || contains(sel, "SubLink");
                facts.copies_data |= reads;
            }
            returning(body, facts);
        }
        "UpdateStmt" => {
            facts.copies_data |= !list(body, "from_clause").is_empty()
                || body
                    .get("target_list")
                    .is_some_and(|t| contains(t, "SubLink"));
            if let Some(t) = body.get("target_list") {
                let mut inner = Facts::default();
                computed(t, &[], &mut inner);
                facts.written_refs.extend(inner.computed_refs);
            }
            returning(body, facts);
        }
        "DeleteStmt" => returning(body, facts),
        "MergeStmt" | "CreateTableAsStmt" => facts.copies_data = true,
        "CopyStmt" if body.get("is_from").and_then(Value::as_bool) != Some(true) => {
            facts.copies_data = true;
        }
        "DeclareCursorStmt" => {
            if let Some((k, q)) = body.get("query").and_then(unwrap_node) {
                outputs(k, q, facts);
            }
        }
        "PrepareStmt" => {
            if let Some((k, q)) = body.get("query").and_then(unwrap_node) {
                outputs(k, q, facts);
            }
        }
        "ExplainStmt" => {
            // The plan, not the rows; EXPLAIN ANALYZE of a write still copies.
            if let Some((k, q)) = body.get("query").and_then(unwrap_node) {
                let mut inner = Facts::default();
                outputs(k, q, &mut inner);
                facts.copies_data |= inner.copies_data;
            }
        }
        "ExecuteStmt" | "FetchStmt" => facts.reads_by_name = true,
        _ => {}
    }
}

fn returning(body: &Value, facts: &mut Facts) {
    if let Some(r) = body.get("returning_clause").filter(|v| !v.is_null()) {
        targets(r, "exprs", &[], facts);
    }
    if body.get("with_clause").is_some_and(|v| !v.is_null()) {
        with_outputs(body, facts);
    }
}

fn with_outputs(body: &Value, facts: &mut Facts) {
    let Some(w) = body.get("with_clause").filter(|v| !v.is_null()) else {
        return;
    };
    for (k, cte) in list(w, "ctes") {
        if k != "CommonTableExpr" {
            continue;
        }
        if let Some((qk, q)) = cte.get("ctequery").and_then(unwrap_node) {
            let mut inner = Facts::default();
            outputs(qk, q, &mut inner);
            // A computed CTE column is read by name outside: its lineage is lost.
            if inner.computed_opaque || !inner.computed_refs.is_empty() {
                facts.computed_opaque = true;
            }
            facts.copies_data |= inner.copies_data;
        }
    }
}

/// The aliases and relation names in a FROM list (a one-field reference to one of them
/// inside an expression is a whole row).
fn from_names(from: &[(String, Value)], out: &mut Vec<String>) {
    for (k, item) in from {
        match k.as_str() {
            "RangeVar" => {
                if let Some(n) = item.get("relname").and_then(Value::as_str) {
                    out.push(n.to_string());
                }
                if let Some(a) = item.pointer("/alias/aliasname").and_then(Value::as_str) {
                    out.push(a.to_string());
                }
            }
            "JoinExpr" => {
                for side in ["larg", "rarg"] {
                    if let Some((k, b)) = item.get(side).and_then(unwrap_node) {
                        from_names(&[(k.to_string(), b.clone())], out);
                    }
                }
                if let Some(a) = item.pointer("/alias/aliasname").and_then(Value::as_str) {
                    out.push(a.to_string());
                }
            }
            _ => {
                if let Some(a) = item.pointer("/alias/aliasname").and_then(Value::as_str) {
                    out.push(a.to_string());
                }
            }
        }
    }
}

fn select_outputs(body: &Value, facts: &mut Facts) {
    with_outputs(body, facts);
    if body.get("op").and_then(Value::as_i64).unwrap_or(1) != 1 {
        // UNION, INTERSECT, EXCEPT: the server describes their columns without a source.
        facts.computed_opaque = true;
        for side in ["larg", "rarg"] {
            if let Some(b) = body.get(side).filter(|v| !v.is_null()) {
                select_outputs(b, facts);
            }
        }
        return;
    }
    let from = list(body, "from_clause");
    for (k, item) in &from {
        from_item(k, item, facts);
    }
    let mut names = Vec::new();
    from_names(&from, &mut names);
    targets(body, "target_list", &names, facts);
}

fn from_item(kind: &str, item: &Value, facts: &mut Facts) {
    match kind {
        "RangeVar" => {}
        "JoinExpr" => {
            for side in ["larg", "rarg"] {
                if let Some((k, b)) = item.get(side).and_then(unwrap_node) {
                    from_item(k, b, facts);
                }
            }
        }
        "RangeSubselect" => {
            if let Some((_, q)) = item.get("subquery").and_then(unwrap_node) {
                let mut inner = Facts::default();
                select_outputs(q, &mut inner);
                if inner.computed_opaque || !inner.computed_refs.is_empty() {
                    facts.computed_opaque = true;
                }
                facts.copies_data |= inner.copies_data;
            }
        }
        // Functions and anything else in FROM: their columns have no table source.
        _ => facts.computed_opaque = true,
    }
}

/// An output list: plain column references keep their source (the server describes
/// them with their table and column); anything else is computed.
fn targets(body: &Value, field: &str, from: &[String], facts: &mut Facts) {
    for (k, t) in list(body, field) {
        if k != "ResTarget" {
            continue;
        }
        let Some((vk, v)) = t.get("val").and_then(unwrap_node) else {
            continue;
        };
        match vk {
            "ColumnRef" => {
                // `u` alone, naming a relation of the FROM list, is a whole row.
                let fields = list(v, "fields");
                if fields.len() == 1
                    && fields[0].0 == "String"
                    && fields[0]
                        .1
                        .get("sval")
                        .and_then(Value::as_str)
                        .is_some_and(|n| from.iter().any(|f| f == n))
                {
                    facts.computed_opaque = true;
                }
            }
            "AConst" | "ParamRef" => {}
            "SubLink" => facts.computed_opaque = true,
            _ => computed(v, from, facts),
        }
    }
}

/// The column names a computed output reads.
fn computed(v: &Value, from: &[String], facts: &mut Facts) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| computed(i, from, facts)),
        Value::Object(map) => {
            for (key, body) in map {
                match key.as_str() {
                    "SubLink" | "RangeFunction" => facts.computed_opaque = true,
                    "ColumnRef" => {
                        let fields = list(body, "fields");
                        if let Some((k, last)) = fields.last() {
                            if k == "AStar" {
                                facts.computed_refs.insert("*".into());
                            } else if let Some(n) = last.get("sval").and_then(Value::as_str) {
                                if fields.len() == 1 && from.iter().any(|f| f == n) {
                                    facts.computed_opaque = true;
                                }
                                facts.computed_refs.insert(n.to_string());
                            }
                        }
                    }
                    _ => computed(body, from, facts),
                }
            }
        }
        _ => {}
    }
}

/// Whether a node of this kind is anywhere under `v`.
fn contains(v: &Value, kind: &str) -> bool {
    match v {
        Value::Array(items) => items.iter().any(|i| contains(i, kind)),
        Value::Object(map) => map.iter().any(|(k, b)| k == kind || contains(b, kind)),
        _ => false,
    }
}

fn is_ddl(node: &str) -> bool {
    if !node.ends_with("Stmt") {
        return false;
    }
    const PREFIXES: [&str; 16] = [
        "Create",
        "Alter",
        "Drop",
        "Rename",
        "Comment",
        "Grant",
        "Truncate",
        "Reindex",
        "SecLabel",
        "ImportForeignSchema",
        "Define",
        "CompositeType",
        "Rule",
        "View",
        "Index",
        "ReassignOwned",
    ];
    PREFIXES.iter().any(|p| node.starts_with(p))
}

/// Built-in functions that run a query given as text or read a relation, schema,
/// database or cursor named by a value (and dblink's, if installed).
fn runs_sql(f: &QualifiedName) -> bool {
    if !(f.schema.is_empty() || f.schema == "pg_catalog" || f.schema == "public") {
        return false;
    }
    let n = f.name.as_str();
    n.starts_with("query_to_xml")
        || n.starts_with("table_to_xml")
        || n.starts_with("cursor_to_xml")
        || n.starts_with("schema_to_xml")
        || n.starts_with("database_to_xml")
        || n.starts_with("dblink")
        || matches!(
            n,
            "query_to_xmlschema" | "table_to_xmlschema" | "cursor_to_xmlschema"
        )
}

fn is_opaque(node: &str) -> bool {
    matches!(node, "DoStmt" | "CallStmt" | "ExecuteStmt" | "LoadStmt")
}

pub(super) fn strings(list: Option<&Value>) -> Vec<String> {
    let Some(Value::Array(items)) = list else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|n| n.get("node")?.get("String")?.get("sval")?.as_str())
        .map(str::to_string)
        .collect()
}

fn qualified(mut parts: Vec<String>) -> Option<QualifiedName> {
    let name = parts.pop()?;
    // catalog.schema.name: the catalog is the database, not part of the name.
    let schema = parts.pop().unwrap_or_default();
    Some(QualifiedName { schema, name })
}

fn walk(v: &Value, facts: &mut Facts) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk(i, facts)),
        Value::Object(map) => {
            // Typed fields (an UPDATE's relation, a CALL's function) are not tagged with
            // their node type: RangeVar and FuncCall are known by their fields.
            if map.contains_key("relname") && map.contains_key("relpersistence") {
                node("RangeVar", v, facts);
            } else if map.contains_key("funcname") && map.contains_key("agg_star") {
                node("FuncCall", v, facts);
            }
            for (key, body) in map {
                if key.starts_with(|c: char| c.is_ascii_uppercase())
                    && key != "RangeVar"
                    && key != "FuncCall"
                {
                    node(key, body, facts);
                }
                walk(body, facts);
            }
        }
        _ => {}
    }
}

fn node(kind: &str, body: &Value, facts: &mut Facts) {
    let text = |field: &str| body.get(field).and_then(Value::as_str).unwrap_or("");
    if kind.ends_with("Stmt") {
        let command = crate::sql::command_of_node(kind);
        if !command.is_empty() {
            facts.commands.insert(command);
        }
        facts.ddl |= is_ddl(kind);
        facts.opaque |= is_opaque(kind);
    }
    match kind {
        "RangeVar" => {
            facts.tables.insert(QualifiedName {
                schema: text("schemaname").to_string(),
                name: text("relname").to_string(),
            });
        }
        "FuncCall" => {
            if let Some(name) = qualified(strings(body.get("funcname"))) {
                // Built-in functions that run SQL given as text (or read a table or cursor
                // by name): what they read is not in the tree.
                facts.opaque |= runs_sql(&name);
                facts.functions.insert(name);
            }
        }
        "UpdateStmt" | "DeleteStmt" => {
            facts.without_where |= body.get("where_clause").is_none_or(Value::is_null);
        }
        "DropStmt" => {
            // DROP TABLE a.b, c: the names are lists of strings, not RangeVars.
            if let Some(Value::Array(objects)) = body.get("objects") {
                for o in objects {
                    let list = o
                        .get("node")
                        .and_then(|n| n.get("List"))
                        .and_then(|l| l.get("items"));
                    if let Some(name) = qualified(strings(list)) {
                        facts.tables.insert(name);
                    }
                }
            }
        }
        "CopyStmt" => {
            facts.copy_program |= body.get("is_program").and_then(Value::as_bool) == Some(true);
        }
        "ColumnRef" => {
            let Some(Value::Array(fields)) = body.get("fields") else {
                return;
            };
            let mut parts: Vec<Option<String>> = fields
                .iter()
                .map(|f| {
                    f.get("node")?
                        .get("String")?
                        .get("sval")?
                        .as_str()
                        .map(str::to_string)
                })
                .collect();
            let column = parts.pop().flatten();
            facts.columns.insert(ColumnUse {
                qualifier: parts.into_iter().flatten().collect(),
                column,
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(sql: &str) -> Facts {
        Facts::of(sql).unwrap_or_else(|| panic!("parses: {sql}"))
    }

    fn tables(sql: &str) -> Vec<String> {
        f(sql).tables.iter().map(|t| t.to_string()).collect()
    }

    fn functions(sql: &str) -> Vec<String> {
        f(sql).functions.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn output_lineage_for_masking() {
        let refs = |sql: &str| {
            let x = f(sql);
            (
                x.computed_refs.into_iter().collect::<Vec<_>>().join(","),
                x.computed_opaque,
                x.copies_data,
            )
        };
        let plain = (String::new(), false, false);
        assert_eq!(refs("SELECT email, u.id, * FROM users u"), plain);
        assert_eq!(refs("SELECT 1, $1, email FROM users"), plain);
        assert_eq!(
            refs("SELECT e FROM (SELECT email AS e FROM users) s"),
            plain
        );
        assert_eq!(
            refs("WITH x AS (SELECT email FROM users) SELECT email FROM x"),
            plain
        );
        assert_eq!(
            refs("SELECT email FROM users WHERE id IN (SELECT max(id) FROM t)"),
            plain
        );
        assert_eq!(
            refs("SELECT lower(email) FROM users"),
            ("email".into(), false, false)
        );
        assert_eq!(
            refs("SELECT count(*) FROM users"),
            (String::new(), false, false)
        );
        assert_eq!(
            refs("SELECT CASE WHEN id > 1 THEN email ELSE name END FROM users"),
            ("email,id,name".into(), false, false)
        );
        assert!(refs("SELECT row_to_json(u) FROM users u").1);
        assert!(refs("SELECT u FROM users u").1);
        assert_eq!(refs("SELECT json_agg(u.*) FROM users u").0, "*");
        assert!(refs("SELECT e FROM (SELECT lower(email) AS e FROM users) s").1);
        assert!(refs("WITH x AS (SELECT email || '' AS e FROM users) SELECT e FROM x").1);
        assert!(refs("SELECT email FROM users UNION SELECT 'a'").1);
        assert!(refs("SELECT (SELECT email FROM users LIMIT 1)").1);
        assert!(refs("SELECT * FROM get_users()").1);
        assert_eq!(
            refs("INSERT INTO t (a) VALUES (1) RETURNING upper(a)"),
            ("a".into(), false, false)
        );
        assert_eq!(
            refs("DELETE FROM users WHERE id = 1 RETURNING email"),
            plain
        );
        assert_eq!(
            refs("DECLARE c CURSOR FOR SELECT lower(email) FROM users").0,
            "email"
        );
        assert!(refs("CREATE TABLE t2 AS SELECT email FROM users").2);
        assert!(refs("SELECT email INTO t2 FROM users").2);
        assert!(refs("INSERT INTO t2 SELECT email FROM users").2);
        assert!(!refs("INSERT INTO users (email) VALUES ('a')").2);
        assert!(refs("UPDATE t2 SET e = u.email FROM users u").2);
        assert!(!refs("UPDATE users SET email = 'x' WHERE id = 1").2);
        assert!(!refs("UPDATE users SET note = note WHERE id = 1").2);
        assert_eq!(
            f("UPDATE users SET note = email || name WHERE id = 1").written_refs,
            ["email".to_string(), "name".to_string()].into()
        );
        assert!(refs("COPY users TO STDOUT").2);
        assert!(refs("COPY (SELECT email FROM users) TO STDOUT").2);
        assert!(!refs("COPY users FROM STDIN").2);
        assert!(refs("EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT email FROM users").2);
        assert!(!refs("EXPLAIN SELECT lower(email) FROM users").2);
        assert!(f("FETCH 10 FROM c").reads_by_name);
        assert!(f("EXECUTE p(1)").reads_by_name);
        assert_eq!(
            refs("PREPARE p AS SELECT lower(email) FROM users").0,
            "email"
        );
    }

    #[test]
    fn tables_everywhere() {
        assert_eq!(tables("SELECT 1"), Vec::<String>::new());
        assert_eq!(tables("select * from Users"), ["users"]);
        assert_eq!(tables("SELECT * FROM \"Users\""), ["Users"]);
        assert_eq!(
            tables("SELECT * FROM crm.\"Card Numbers\""),
            ["crm.Card Numbers"]
        );
        assert_eq!(tables("SELECT * FROM db.crm.users"), ["crm.users"]);
        assert_eq!(
            tables("SELECT 1 + (SELECT count(*) FROM secrets) FROM t"),
            ["secrets", "t"]
        );
        assert_eq!(
            tables("SELECT * FROM t WHERE id IN (SELECT id FROM secrets)"),
            ["secrets", "t"]
        );
        assert_eq!(
            tables("SELECT coalesce((SELECT x FROM secrets LIMIT 1), 'a')"),
            ["secrets"]
        );
        // A CTE named like the table it reads: the table is still named (fail closed).
        assert_eq!(
            tables("WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets"),
            ["secrets"]
        );
        assert_eq!(tables("EXPLAIN ANALYZE DELETE FROM audit"), ["audit"]);
        assert_eq!(
            tables("COPY (SELECT * FROM s.cards) TO STDOUT"),
            ["s.cards"]
        );
        assert_eq!(tables("PREPARE p AS SELECT * FROM cards"), ["cards"]);
        assert_eq!(tables("TABLE cards"), ["cards"]);
        assert_eq!(tables("SELECT 1; DROP TABLE t"), ["t"]);
        assert_eq!(tables("DROP TABLE a.b, c"), ["c", "a.b"]);
        // Typed fields: the relation of UPDATE, DELETE, INSERT, COPY, ALTER.
        assert_eq!(tables("UPDATE s.orders SET a = 1"), ["s.orders"]);
        assert_eq!(
            tables("INSERT INTO log SELECT * FROM cards"),
            ["cards", "log"]
        );
        assert_eq!(tables("COPY cards TO STDOUT"), ["cards"]);
        assert_eq!(tables("ALTER TABLE cards ADD COLUMN x int"), ["cards"]);
        assert_eq!(tables("LOCK TABLE cards"), ["cards"]);
        assert_eq!(tables("TRUNCATE cards, orders"), ["cards", "orders"]);
    }

    #[test]
    fn functions_everywhere() {
        assert_eq!(
            functions("SELECT pg_read_file('/etc/passwd')"),
            ["pg_read_file"]
        );
        assert_eq!(
            functions("SELECT 1 + length(pg_catalog.pg_read_file('x'))"),
            ["length", "pg_catalog.pg_read_file"]
        );
        assert_eq!(
            functions("SELECT CASE WHEN true THEN lo_export(1, '/tmp/x') END"),
            ["lo_export"]
        );
        assert_eq!(
            functions("SELECT * FROM dblink('h', 'select 1') AS t(a int)"),
            ["dblink"]
        );
        assert_eq!(
            functions("SELECT x FROM t WHERE NOT (a = 1 AND pg_sleep(10) IS NULL)"),
            ["pg_sleep"]
        );
        assert_eq!(functions("SELECT ARRAY[pg_ls_dir('.')]"), ["pg_ls_dir"]);
        assert_eq!(functions("CALL admin.rotate_keys()"), ["admin.rotate_keys"]);
        assert_eq!(
            functions("UPDATE t SET a = pg_read_file('x') WHERE b = lo_export(1, 'y')"),
            ["lo_export", "pg_read_file"]
        );
        assert_eq!(
            functions(
                "INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = dblink('h', 'q')"
            ),
            ["dblink"]
        );
    }

    #[test]
    fn commands_and_kinds() {
        let x = f("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d");
        assert!(x.commands.contains("DELETE") && x.commands.contains("SELECT"));
        assert!(x.without_where);
        assert!(!f("DELETE FROM t WHERE id = 1").without_where);
        assert!(f("update t set a = 1").without_where);
        assert!(!f("UPDATE t SET a = 1 WHERE CURRENT OF c").without_where);
        assert!(f("EXPLAIN ANALYZE DELETE FROM t").without_where);
        assert!(f("COPY t TO PROGRAM 'curl x'").copy_program);
        assert!(f("COPY t FROM PROGRAM 'cat /etc/passwd'").copy_program);
        assert!(!f("COPY t TO STDOUT").copy_program);
        for ddl in [
            "CREATE TABLE x (a int)",
            "ALTER TABLE x ADD COLUMN b int",
            "DROP TABLE x",
            "TRUNCATE x",
            "GRANT SELECT ON x TO y",
            "CREATE INDEX ON x (a)",
            "CREATE VIEW v AS SELECT 1",
            "COMMENT ON TABLE x IS 'y'",
            "ALTER TABLE x RENAME TO y",
            "CREATE TABLE y AS SELECT 1",
            "SELECT 1; DROP TABLE t",
        ] {
            assert!(f(ddl).ddl, "{ddl}");
        }
        for not_ddl in ["SELECT 1", "INSERT INTO x VALUES (1)", "SET x = 1", "BEGIN"] {
            assert!(!f(not_ddl).ddl, "{not_ddl}");
        }
        for opaque in [
            "DO $$BEGIN PERFORM 1; END$$",
            "CALL p()",
            "EXECUTE p(1)",
            "LOAD 'x'",
        ] {
            assert!(f(opaque).opaque, "{opaque}");
        }
        assert_eq!(f("SELECT 1; SELECT 2;").statements, 2);
        assert_eq!(f("SELECT 1").statements, 1);
        assert!(Facts::of("SELEC 1").is_none());
    }

    #[test]
    fn columns() {
        let x = f("SELECT u.email, name, * FROM users u WHERE s.users.id = 1");
        let cols: Vec<String> = x
            .columns
            .iter()
            .map(|c| {
                let mut parts = c.qualifier.clone();
                parts.push(c.column.clone().unwrap_or("*".into()));
                parts.join(".")
            })
            .collect();
        assert_eq!(cols, ["*", "name", "s.users.id", "u.email"]);
    }
}
