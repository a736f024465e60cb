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
        Some(facts)
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

fn is_opaque(node: &str) -> bool {
    matches!(node, "DoStmt" | "CallStmt" | "ExecuteStmt" | "LoadStmt")
}

fn strings(list: Option<&Value>) -> Vec<String> {
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
