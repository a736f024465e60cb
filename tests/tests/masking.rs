//! Masking in the inline proxy: a workload under an `enforce` policy with mask rules reads
//! a table of e-mail addresses, card numbers, phone numbers and ages through psql (text
//! results, the simple and extended protocols) and asyncpg (binary results, a statement
//! executed again without a new Describe, a portal fetched in pieces). No raw value of a
//! masked column reaches the client in any form (rows, RETURNING, cursors, errors), nor
//! the audit trail or the daemon's output; what the proxy cannot mask (expressions over
//! masked columns, whole rows, COPY, copying into another table) is refused; unmasked
//! columns are byte for byte what Postgres sent.

use std::process::Command;

use auditor_tests::{can_run, check, run, statements_of, str_of, Cgroup, Daemon, Postgres};

const POLICY: &str = r#"
name: agents
selector:
  matchLabels:
    cgroup.path: CGROUP
mode: enforce
mask:
  - name: contact
    columns: [customers.email]
    using: email
  - name: cards
    columns: [public.customers.card]
    using: partial
    keep: 4
  - name: phones
    columns: [customers.phone]
  - name: ages
    columns: [customers.age]
    using: hash
  - name: found
    detectors: [email, card_number, iban]
    patterns: ["ACCT-[0-9]{6}"]
  - name: activity
    columns: [pg_catalog.pg_stat_activity.query]
---
name: lenient
selector:
  matchLabels:
    cgroup.path: LENIENT
mode: enforce
mask:
  - name: contact
    columns: [customers.email, customers.card, customers.phone]
    on_unknown: mask
"#;

#[test]
fn masked_columns_never_leave_in_the_clear() {
    if !can_run("masked_columns_never_leave_in_the_clear") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let seed = std::process::id();
    let emails: Vec<String> = (1..=4)
        .map(|i| format!("person{i}.{seed}@example.com"))
        .collect();
    let cards: Vec<String> = (1..=4)
        .map(|i| format!("4{:015}", u64::from(seed) * 10 + i))
        .collect();
    let phones: Vec<String> = (1..=4).map(|i| format!("+1-555-{seed}-{i:04}")).collect();
    let mut setup = String::from(
        "CREATE TABLE customers (id int PRIMARY KEY, email text UNIQUE, card varchar(19), \
         phone text, note text, age int);",
    );
    for i in 0..4 {
        setup.push_str(&format!(
            "INSERT INTO customers VALUES ({}, '{}', '{}', '{}', 'note {} ü', {});",
            i + 1,
            emails[i],
            cards[i],
            phones[i],
            i + 1,
            30 + i
        ));
    }
    setup.push_str("CREATE VIEW customer_contacts AS SELECT id, email, phone FROM customers;");
    // Free text holding sensitive values: found by the detectors wherever they are.
    let luhn_complete = |head: String| -> String {
        let sum: u32 = head
            .chars()
            .rev()
            .enumerate()
            .map(|(i, c)| {
                let d = c.to_digit(10).unwrap();
                if i % 2 == 0 {
                    let x = d * 2;
                    if x > 9 {
                        x - 9
                    } else {
                        x
                    }
                } else {
                    d
                }
            })
            .sum();
        format!("{head}{}", (10 - sum % 10) % 10)
    };
    let ticket_email = format!("writer.{seed}@example.org");
    let ticket_card = luhn_complete(format!("5{:014}", u64::from(seed) * 7));
    let ticket_iban = "GB82 WEST 1234 5698 7654 32".to_string();
    let ticket_acct = format!("ACCT-{:06}", seed % 1_000_000);
    setup.push_str(&format!(
        "CREATE TABLE tickets (id int, body text, meta jsonb); \
         INSERT INTO tickets VALUES (1, 'Reach me at {ticket_email}, card {ticket_card}, \
         IBAN {ticket_iban}, {ticket_acct}. Thanks', '{{\"contact\": \"{ticket_email}\", \"n\": 7}}');"
    ));
    setup.push_str("CREATE VIEW renamed AS SELECT email AS e FROM customer_contacts;");
    setup.push_str(
        "CREATE VIEW shouting AS SELECT id, upper(note) AS loud, lower(phone) AS quiet FROM customers;",
    );
    check(pg.psql().args(["-c", &setup])).unwrap();

    let agent = Cgroup::new("masked").unwrap();
    let lenient = Cgroup::new("lenient").unwrap();
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("agents.yaml"),
        POLICY
            .replace("CGROUP", &agent.name)
            .replace("LENIENT", &lenient.name),
    )
    .unwrap();
    let pin_dir = format!("/sys/fs/bpf/auditor-test-mask-{}", std::process::id());
    let _detach = auditor_tests::DetachOnDrop::new(&pin_dir);
    let mut daemon = Daemon::start(
        pg.port,
        &format!(
            "policies_dir: {}\nproxy: {{port: {}, pin_dir: {pin_dir}}}\n",
            policies.path().display(),
            auditor_tests::free_port()
        ),
    )
    .unwrap();

    let psql = |sql: &str| {
        let mut cmd = pg.psql();
        cmd.args(["-At", "-v", "ON_ERROR_STOP=0", "-c", sql])
            .env("PGAPPNAME", "mask_psql");
        agent.enter(&mut cmd);
        let (_, out, err) = run(&mut cmd);
        (out, err)
    };
    let seen = std::cell::RefCell::new(String::new());
    let masked = |sql: &str| {
        let (out, err) = psql(sql);
        assert!(err.is_empty(), "{sql}: {err}");
        seen.borrow_mut().push_str(&out);
        out
    };
    // Plain columns, through aliases, a sub-select, a CTE, a view, RETURNING.
    let all = masked("SELECT * FROM customers ORDER BY id");
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 4, "{all}");
    for (i, line) in lines.iter().enumerate() {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], (i + 1).to_string());
        assert!(f[1].ends_with("@masked.invalid"), "{line}");
        assert_eq!(f[2], format!("************{}", &cards[i][12..]), "{line}");
        assert_eq!(f[3], "****", "{line}");
        assert_eq!(f[4], format!("note {} ü", i + 1), "unmasked: as sent");
        assert_ne!(f[5], (30 + i).to_string(), "{line}");
        f[5].parse::<i32>()
            .expect("a masked integer stays an integer");
    }
    // The keyed hash is consistent: the same value masks the same way.
    let again = masked("SELECT email AS e, age FROM customers ORDER BY id");
    let first: Vec<String> = lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            format!("{}|{}", f[1], f[5])
        })
        .collect();
    assert_eq!(again.lines().collect::<Vec<_>>(), first);
    for sql in [
        "SELECT e FROM (SELECT email AS e FROM customers) s ORDER BY 1",
        "WITH x AS (SELECT email, phone FROM customers) SELECT email, phone FROM x",
        "SELECT * FROM customer_contacts",
        "SELECT c.email FROM customers c JOIN customers d ON c.id = d.id",
        "UPDATE customers SET note = note WHERE id = 1 RETURNING email, card",
        "BEGIN; DECLARE cur CURSOR FOR SELECT email FROM customers; FETCH 2 FROM cur; FETCH 2 FROM cur; COMMIT",
        "SELECT count(*), max(id) FROM customers",
    ] {
        let out = masked(sql);
        assert!(!out.is_empty(), "{sql}");
    }
    // The planner's statistics hold column values: masked whole.
    check(pg.psql().args(["-c", "ANALYZE customers"])).unwrap();
    let stats = masked(
        "SELECT attname, histogram_bounds FROM pg_stats WHERE tablename = 'customers' AND attname = 'email'",
    );
    // (Masked whole with the first rule's function: an e-mail-like name, a NULL array.)
    assert!(stats.ends_with("@masked.invalid|\n"), "{stats}");
    let counted = masked("SELECT count(*) FROM customers");
    assert_eq!(
        counted, "4\n",
        "an aggregate of no masked column is not masked"
    );

    // Computed from masked columns (expressions, whole rows, aggregates, set operations,
    // sub-selects, CTEs, views that rename): the parse tree decides it, and those
    // computed columns are masked whole (no raw value in any output: checked below for
    // everything seen).
    for sql in [
        "SELECT lower(email) FROM customers",
        "SELECT email || '' FROM customers",
        "SELECT substr(card, 1, 50) FROM customers",
        "SELECT CASE WHEN id > 0 THEN phone END FROM customers",
        "SELECT coalesce(email, 'x') FROM customers",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT c FROM customers c",
        "SELECT (c).email FROM customers c",
        "SELECT (customers).* FROM customers",
        "SELECT x.e FROM (SELECT c AS r, c.email AS e FROM customers c) x",
        "SELECT array_agg(email) FROM customers",
        "SELECT string_agg(email, ',') FROM customers",
        "SELECT json_agg(c.*) FROM customers c",
        "SELECT email FROM customers UNION SELECT 'x'",
        "SELECT e FROM (SELECT lower(email) AS e FROM customers) s",
        "WITH x AS (SELECT email || '' AS e FROM customers) SELECT e FROM x",
        "SELECT (SELECT email FROM customers LIMIT 1)",
        "SELECT histogram_bounds::text FROM pg_stats WHERE tablename = 'customers'",
        "SELECT lower(e) FROM renamed",
        "COPY (SELECT lower(email) FROM customers) TO STDOUT",
    ] {
        let (out, err) = psql(sql);
        seen.borrow_mut().push_str(&out);
        seen.borrow_mut().push_str(&err);
        assert!(err.is_empty(), "{sql}: {err}");
        for raw in emails.iter().chain(&cards).chain(&phones) {
            assert!(!out.contains(raw.as_str()), "{sql}: {raw} in {out}");
        }
    }
    let lowered = masked("SELECT id, lower(email) FROM customers ORDER BY id");
    assert!(
        lowered.starts_with("1|") && lowered.contains("@masked.invalid"),
        "{lowered}"
    );
    // Each output by what it reads: a computed column of no masked column is as sent.
    let each =
        masked("SELECT id, upper(note), lower(phone), count(*) OVER () FROM customers ORDER BY id");
    for (i, line) in each.lines().enumerate() {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], (i + 1).to_string(), "{line}");
        assert_eq!(f[1], format!("NOTE {} Ü", i + 1), "unmasked: {line}");
        assert!(f[2].ends_with("@masked.invalid"), "{line}");
        assert_eq!(f[3], "4", "{line}");
    }
    assert_eq!(each.lines().count(), 4, "{each}");
    // A sub-select or CTE that renames a masked column, read by an expression outside
    // (phones: no detector looks for them, only the column's rule).
    for sql in [
        "SELECT lower(p) FROM (SELECT phone AS p FROM customers) s",
        "WITH x AS (SELECT phone AS p FROM customers) SELECT p || '' FROM x",
        "WITH x(p) AS (SELECT phone FROM customers) SELECT upper(x.p) FROM x",
        "SELECT lower(quiet), loud FROM shouting",
    ] {
        let out = masked(sql);
        assert_eq!(out.lines().count(), 4, "{sql}: {out}");
        for raw in &phones {
            assert!(!out.contains(raw.as_str()), "{sql}: {raw} in {out}");
        }
    }
    // Views are resolved to their base columns: a view's column passing a masked column
    // on is masked by that column's rule, one computed from it whole, the rest as sent
    // (through a view of a view too).
    let contacts = masked("SELECT * FROM customer_contacts ORDER BY id");
    for (i, line) in contacts.lines().enumerate() {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], (i + 1).to_string(), "unmasked: {line}");
        assert!(f[1].ends_with("@masked.invalid"), "{line}");
        assert_eq!(f[2], "****", "{line}");
    }
    let shouting = masked("SELECT * FROM shouting ORDER BY id");
    for (i, line) in shouting.lines().enumerate() {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f[0], (i + 1).to_string(), "{line}");
        assert_eq!(f[1], format!("NOTE {} Ü", i + 1), "unmasked: {line}");
        assert!(f[2].ends_with("@masked.invalid"), "{line}");
    }
    let renamed = masked("SELECT e FROM renamed");
    assert_eq!(renamed.lines().count(), 4, "{renamed}");
    assert!(
        renamed.lines().all(|l| l.ends_with("@masked.invalid")),
        "{renamed}"
    );
    // An error about a value computed from a masked column: its message hidden whole.
    let (_, err) = psql("SELECT email::int FROM customers");
    seen.borrow_mut().push_str(&err);
    assert!(err.contains("(message hidden by the auditor"), "{err}");

    // What the proxy cannot mask is refused, and the session goes on.
    let mut refused = Vec::new();
    for sql in [
        "COPY customers TO STDOUT WITH (ENCODING 'LATIN1')",
        "COPY customers TO '/tmp/leak'",
        "CREATE TABLE leak AS SELECT email FROM customers",
        "SELECT email INTO leak2 FROM customers",
        "INSERT INTO customers (id, email) SELECT id + 100, email FROM customers",
        "UPDATE customers SET note = email WHERE id = 1",
        "UPDATE customers SET email = (SELECT email FROM customers WHERE id = 2) WHERE id = 1",
        "DO $$ BEGIN RAISE NOTICE '%', (SELECT email FROM customers LIMIT 1); END $$",
        "SELECT query_to_xml('SELECT phone FROM customers', true, false, '')",
        "SELECT table_to_xml('customers', true, false, '')",
    ] {
        let (out, err) = psql(sql);
        seen.borrow_mut().push_str(&out);
        seen.borrow_mut().push_str(&err);
        assert!(
            err.contains("ERROR:  statement blocked by policy \"agents\""),
            "{sql}: {out}{err}"
        );
        refused.push(sql);
    }
    // A unique violation echoes the value in its detail: hidden.
    let (out, err) = psql(&format!(
        "INSERT INTO customers (id, email) VALUES (99, '{}')",
        emails[0]
    ));
    seen.borrow_mut().push_str(&out);
    seen.borrow_mut().push_str(&err);
    assert!(err.contains("duplicate key value"), "{err}");
    assert!(err.contains("hidden by the auditor"), "{err}");

    // COPY out of a masked table or query: rewritten row by row, in every format; the
    // unmasked columns as Postgres wrote them.
    let by_id = |text: &str| -> Vec<Vec<String>> {
        let mut rows: Vec<Vec<String>> = text
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect();
        rows.sort_by_key(|r| r[0].parse::<i64>().unwrap_or(0));
        rows
    };
    let (_, direct_copy, _) = run(pg.psql().args(["-c", "COPY customers TO STDOUT"]));
    let copied = by_id(&masked("COPY customers TO STDOUT"));
    let direct_rows = by_id(&direct_copy);
    assert_eq!(copied.len(), 4, "{copied:?}");
    for (c, d) in copied.iter().zip(&direct_rows) {
        assert_eq!((&c[0], &c[4]), (&d[0], &d[4]), "unmasked columns as sent");
        assert!(c[1].ends_with("@masked.invalid"), "{c:?}");
        assert!(
            c[2].starts_with("****") && c[2].ends_with(&d[2][d[2].len() - 4..]),
            "{c:?}"
        );
        assert_eq!(c[3], "****");
        c[5].parse::<i64>()
            .expect("a masked integer stays an integer");
    }
    let csv = masked(
        "COPY (SELECT id, email, note FROM customers ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",
    );
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("id,email,note"));
    for (i, l) in lines.enumerate() {
        assert!(l.starts_with(&format!("{},\"", i + 1)), "{l}");
        assert!(l.contains("@masked.invalid\","), "{l}");
        assert!(l.ends_with(&format!("note {} ü", i + 1)), "{l}");
    }
    let binary = masked("COPY customers TO STDOUT WITH (FORMAT binary)");
    assert!(binary.starts_with("PGCOPY"), "{binary}");
    assert!(binary.contains("@masked.invalid"), "{binary}");
    let view = masked("COPY (SELECT * FROM customer_contacts) TO STDOUT");
    assert_eq!(view.lines().count(), 4, "{view}");
    // A COPY whose query fails fails as it would without the proxy (inside a transaction
    // block too), and the session goes on.
    let mut cmd = pg.psql();
    cmd.args(["-At", "-v", "ON_ERROR_STOP=0"])
        .args([
            "-c",
            "BEGIN",
            "-c",
            "COPY (SELECT nosuch FROM customers) TO STDOUT",
        ])
        .args(["-c", "SELECT 1", "-c", "ROLLBACK", "-c", "SELECT 2"])
        .env("PGAPPNAME", "mask_psql");
    agent.enter(&mut cmd);
    let (_, out, err) = run(&mut cmd);
    // (Quoted parts of an error about masked data are hidden, as always.)
    assert!(
        err.contains("ERROR:  column \"****\" does not exist"),
        "{err}"
    );
    assert!(err.contains("current transaction is aborted"), "{err}");
    assert!(out.ends_with("2\n"), "{out}");

    // Detectors: what they find inside free text is masked there, the rest kept, in rows,
    // JSON, COPY, expressions and the messages of errors.
    let found = masked("SELECT id, body, meta FROM tickets");
    assert_eq!(
        found,
        "1|Reach me at ****, card ****, IBAN ****, ****. Thanks|{\"n\": 7, \"contact\": \"****\"}\n"
    );
    let copied = masked("COPY tickets TO STDOUT");
    assert_eq!(
        copied,
        "1\tReach me at ****, card ****, IBAN ****, ****. Thanks\t{\"n\": 7, \"contact\": \"****\"}\n"
    );
    let lowered = masked("SELECT lower(body) FROM tickets");
    assert!(
        lowered.starts_with("reach me at ****, card ****"),
        "{lowered}"
    );
    let (_, err) = psql("SELECT body::int FROM tickets");
    seen.borrow_mut().push_str(&err);
    assert!(
        err.contains("invalid input syntax for type integer: \"Reach me at ****, card ****"),
        "{err}"
    );

    // Other sessions' statements in pg_stat_activity, when the policy names the column.
    let mut sleeper = pg.psql();
    sleeper
        .args(["-c", &format!("SELECT 'sleeper-{seed}', pg_sleep(3)")])
        .stdout(std::process::Stdio::null());
    let mut sleeper = sleeper.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let activity = masked(
        "SELECT query FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    );
    sleeper.wait().unwrap();
    assert!(!activity.is_empty(), "the sleeper was running");
    assert!(activity.lines().all(|l| l == "****"), "{activity}");

    // The same table read directly (no policy): the unmasked columns are byte for byte
    // what the proxied session got.
    let (_, direct, _) =
        run(pg
            .psql()
            .args(["-At", "-c", "SELECT id, note FROM customers ORDER BY id"]));
    let proxied = masked("SELECT id, note FROM customers ORDER BY id");
    assert_eq!(proxied, direct);

    // `on_unknown: mask`: what the proxy cannot follow runs, masked whole; a notice from
    // code it cannot follow is hidden whole.
    let lenient_psql = |sql: &str| {
        let mut cmd = pg.psql();
        cmd.args(["-At", "-c", sql])
            .env("PGAPPNAME", "mask_lenient");
        lenient.enter(&mut cmd);
        let (ok, out, err) = run(&mut cmd);
        seen.borrow_mut().push_str(&out);
        seen.borrow_mut().push_str(&err);
        (ok, out, err)
    };
    let (ok, out, err) = lenient_psql("SELECT lower(email), id FROM customers ORDER BY id");
    assert!(ok, "{err}");
    assert_eq!(out.lines().next(), Some("****|1"), "{out}");
    let (ok, _, err) = lenient_psql(
        "DO $$ BEGIN RAISE NOTICE 'found %', (SELECT email FROM customers WHERE id = 1); END $$",
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("NOTICE:  (message hidden by the auditor"),
        "{err}"
    );
    let (ok, out, err) = lenient_psql("COPY customers TO STDOUT");
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");

    // asyncpg: binary results, re-executed statements, a portal in pieces.
    let mut cmd = Command::new(auditor_tests::python3());
    cmd.arg(auditor_tests::workspace_root().join("tests/helpers/drivers/asyncpg_mask.py"))
        .arg(pg.port.to_string());
    agent.enter(&mut cmd);
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "{out}{err}");
    assert!(out.ends_with("done\n"), "{out}");
    assert!(out.contains("refused 42501"), "{out}");
    assert!(out.contains("@masked.invalid"), "{out}");
    let upper = out
        .lines()
        .find(|l| l.starts_with("upper "))
        .expect("upper");
    assert!(upper.contains("@masked.invalid"), "{upper}");
    assert!(out.contains("note 1 ü"), "{out}");
    // pgjdbc: a named statement executed again without Describe (binary integers), a
    // portal in pieces, CopyManager.
    let mut cmd = auditor_tests::pgjdbc_command("PgjdbcMask");
    cmd.arg(pg.port.to_string());
    agent.enter(&mut cmd);
    let (ok, jdbc, err) = run(&mut cmd);
    assert!(ok, "{jdbc}{err}");
    assert!(jdbc.ends_with("done\n"), "{jdbc}");
    assert!(jdbc.contains("refused 42501"), "{jdbc}");
    let lines =
        |prefix: &str| -> Vec<&str> { jdbc.lines().filter(|l| l.starts_with(prefix)).collect() };
    assert_eq!(lines("plain ").len(), 4, "{jdbc}");
    assert_eq!(lines("prepared ").len(), 8, "{jdbc}");
    assert_eq!(lines("fetched ").len(), 4, "{jdbc}");
    assert_eq!(lines("lowered ").len(), 4, "{jdbc}");
    for l in lines("plain ")
        .into_iter()
        .chain(lines("prepared "))
        .chain(lines("fetched "))
        .chain(lines("lowered "))
    {
        assert!(l.contains("@masked.invalid"), "{l}");
    }
    assert!(lines("copy 4 ")[0].contains("@masked.invalid"), "{jdbc}");
    assert!(lines("unmasked 1|note 1 ü").len() == 1, "{jdbc}");
    seen.borrow_mut().push_str(&jdbc);
    seen.borrow_mut().push_str(&err);
    for fmt in ["binary", "csv"] {
        let copy = out
            .lines()
            .find(|l| l.starts_with(&format!("copy {fmt} ")))
            .unwrap_or_else(|| panic!("no {fmt} COPY: {out}"));
        assert!(copy.contains("@masked.invalid"), "{copy}");
    }
    seen.borrow_mut().push_str(&out);
    seen.borrow_mut().push_str(&err);

    daemon.wait_sessions_ended(&agent.name);
    daemon.wait_sessions_ended(&lenient.name);
    let output = daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    auditor_tests::assert_no_duplicates(&events);
    let trail = serde_json::to_string(&events).unwrap();
    let on_disk = auditor_tests::raw_log(&daemon.log_dir());
    let said = output.join("\n");
    for raw in emails.iter().chain(&cards).chain(&phones).chain([
        &ticket_email,
        &ticket_card,
        &ticket_iban,
        &ticket_acct,
    ]) {
        assert!(
            !seen.borrow().contains(raw.as_str()),
            "{raw} reached the client"
        );
        assert!(!trail.contains(raw.as_str()), "{raw} is in the trail");
        assert!(
            !auditor_tests::contains_bytes(&on_disk, raw),
            "{raw} is in the log's files"
        );
        assert!(
            !said.contains(raw.as_str()),
            "{raw} is in the daemon's output"
        );
    }
    let ours = statements_of(&events, &agent.name);
    assert!(ours.iter().all(|e| str_of(e, "capture") == "proxy"));
    let star = ours
        .iter()
        .find(|e| str_of(e, "statement") == "SELECT * FROM customers ORDER BY id")
        .expect("recorded");
    assert_eq!(str_of(star, "decision"), "masked", "{star}");
    // Which columns the proxy masked, and how many values of each (never the values).
    let masked_of = |e: &serde_json::Value| -> Vec<(String, u64)> {
        let cols = e["masked_columns"].as_array().cloned().unwrap_or_default();
        let counts = e["masked_values"].as_array().cloned().unwrap_or_default();
        assert_eq!(cols.len(), counts.len(), "{e}");
        cols.iter()
            .zip(&counts)
            .map(|(c, n)| (c.as_str().unwrap().to_string(), n.as_u64().unwrap()))
            .collect()
    };
    let in_public = |cols: &[&str], n: u64| -> Vec<(String, u64)> {
        cols.iter()
            .map(|c| (format!("public.customers.{c}"), n))
            .collect()
    };
    assert_eq!(
        masked_of(star),
        in_public(&["email", "card", "phone", "age"], 4),
        "{star}"
    );
    let of = |sql: &str| -> Vec<&serde_json::Value> {
        ours.iter()
            .copied()
            .filter(|e| str_of(e, "statement") == sql)
            .collect()
    };
    let fetches = of("FETCH 2 FROM cur");
    assert_eq!(fetches.len(), 2, "both FETCHes recorded");
    for fetch in fetches {
        assert_eq!(masked_of(fetch), in_public(&["email"], 2), "{fetch}");
    }
    let view = of("SELECT * FROM customer_contacts ORDER BY id");
    assert_eq!(
        masked_of(view[0]),
        in_public(&["email", "phone"], 4),
        "a view's columns by their base columns: {}",
        view[0]
    );
    let copy = of("COPY customers TO STDOUT");
    assert_eq!(
        masked_of(copy[0]),
        in_public(&["email", "card", "phone", "age"], 4),
        "{}",
        copy[0]
    );
    assert_eq!(str_of(copy[0], "decision"), "masked");
    let tickets = of("SELECT id, body, meta FROM tickets");
    assert_eq!(
        masked_of(tickets[0]),
        [("body".to_string(), 1), ("meta".to_string(), 1)],
        "{}",
        tickets[0]
    );
    let count = of("SELECT count(*) FROM customers");
    assert!(masked_of(count[0]).is_empty(), "{}", count[0]);
    let blocked = ours
        .iter()
        .filter(|e| str_of(e, "decision") == "blocked")
        .count();
    assert!(blocked >= refused.len(), "{blocked} < {}", refused.len());
}
