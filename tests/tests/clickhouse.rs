//! ClickHouse delivery end to end: a real ClickHouse (Debian's 18.16) on its own ports, the
//! daemon with its spool, pgbench against a real Postgres. Counts are exact.

use std::time::{Duration, Instant};

use auditor_tests::{can_run, check, ClickHouse, Daemon, Postgres};

fn count(ch: &ClickHouse, sql: &str) -> u64 {
    ch.query(sql)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn clickhouse_outage_during_pgbench_loses_nothing() {
    if !can_run("clickhouse_outage_during_pgbench_loses_nothing") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    check(pg.pgbench().args(["-i", "-q", "-s", "1", "postgres"])).unwrap();
    let mut ch = ClickHouse::start().unwrap();
    let mut daemon = Daemon::start(
        pg.port,
        &format!(
            "clickhouse:\n  enabled: true\n  url: {}\n  database: audit_test\n  batch_period_ms: 200\n",
            ch.url()
        ),
    )
    .unwrap();

    // pgbench runs for 12 s; ClickHouse is killed after 3 s and comes back 5 s later.
    let mut bench = pg.pgbench();
    bench
        .args([
            "-n", "-M", "extended", "-c", "2", "-j", "2", "-T", "12", "postgres",
        ])
        .env("PGAPPNAME", "ch_fault");
    let run = std::thread::spawn(move || check(&mut bench));
    std::thread::sleep(Duration::from_secs(3));
    let before = count(&ch, "SELECT count() FROM audit_test.events");
    ch.kill();
    std::thread::sleep(Duration::from_secs(5));
    ch.restart().unwrap();
    let out = run.join().unwrap().unwrap();
    assert!(
        out.contains("number of transactions actually processed"),
        "{out}"
    );

    let executed = pg.logged_statements("ch_fault").unwrap() as u64;
    assert!(executed > 1000, "{executed}");
    let q = "SELECT count() FROM audit_test.statements WHERE application_name = 'ch_fault'";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = count(&ch, q);
    while got < executed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        got = count(&ch, q);
    }
    let output = daemon.stop().unwrap();
    let got = count(&ch, q);
    assert!(before > 0, "nothing reached ClickHouse before the outage");
    assert_eq!(
        got, executed,
        "statements in ClickHouse vs executed\n{output:#?}"
    );
    // Each event once in the views, whatever was retried.
    let unique = count(
        &ch,
        "SELECT uniqExact(event_id) FROM audit_test.events WHERE application_name = 'ch_fault' AND kind = 'statement'",
    );
    assert_eq!(unique, executed);
    // The same events as the local log, beside it.
    let local = daemon
        .events()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "statement" && e["application_name"] == "ch_fault")
        .count() as u64;
    assert_eq!(local, executed);
    // The migrations were recorded once each: the table, the views, message_bytes, the
    // policy columns, the approval columns, the masked value counts, the local log's heads.
    assert_eq!(
        count(&ch, "SELECT count() FROM audit_test.schema_migrations"),
        7
    );
    assert_eq!(
        count(
            &ch,
            "SELECT count() FROM system.columns WHERE database = 'audit_test' \
             AND table = 'statements' AND name = 'masked_values'"
        ),
        1,
        "the views were made again with the new column"
    );
    let sessions = count(
        &ch,
        "SELECT count() FROM audit_test.sessions WHERE application_name = 'ch_fault'",
    );
    assert_eq!(sessions, 3, "two clients and pgbench's own connection");
}

#[test]
fn spool_survives_a_daemon_restart_while_clickhouse_is_down() {
    if !can_run("spool_survives_a_daemon_restart_while_clickhouse_is_down") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let mut ch = ClickHouse::start().unwrap();
    let url = ch.url();
    ch.kill();
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "clickhouse:\n  enabled: true\n  url: {url}\n  database: audit_restart\n  batch_period_ms: 200\n"
    );
    // First daemon: ClickHouse is down the whole time; the events are spooled.
    let mut first = Daemon::start_in(state.path(), pg.port, &config).unwrap();
    let mut psql = pg.psql();
    psql.env("PGAPPNAME", "spooled")
        .args(["-c", "SELECT 1", "-c", "SELECT 2", "-c", "SELECT 3"]);
    check(&mut psql).unwrap();
    // Stop spools everything the kernel holds before it returns.
    first.stop().unwrap();
    // Second daemon, ClickHouse back: the spool is delivered.
    ch.restart().unwrap();
    let mut second = Daemon::start_in(state.path(), pg.port, &config).unwrap();
    let q = "SELECT count() FROM audit_restart.statements WHERE application_name = 'spooled'";
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&ch, q) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    second.stop().unwrap();
    assert_eq!(count(&ch, q), 3);
}

#[test]
fn auditor_query_answers_from_clickhouse() {
    if !can_run("auditor_query_answers_from_clickhouse") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let ch = ClickHouse::start().unwrap();
    let cg = auditor_tests::Cgroup::new("query-app").unwrap();
    // A dry run for this workload: its DDL would have been blocked.
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("p.yaml"),
        format!(
            "name: query-guard\nselector:\n  matchLabels:\n    cgroup.path: {}\nmode: dry-run\nblock:\n  - name: no-ddl\n    when: {{ddl: true}}\n",
            cg.name
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(
        pg.port,
        &format!(
            "clickhouse:\n  enabled: true\n  url: {}\n  database: audit_query\n  batch_period_ms: 200\npolicies_dir: {}\n",
            ch.url(),
            policies.path().display()
        ),
    )
    .unwrap();
    let mut psql = pg.psql();
    psql.env("PGAPPNAME", "query_test").args([
        "-c",
        "CREATE TABLE accounts (id int, owner text)",
        "-c",
        "INSERT INTO accounts VALUES (1, 'alice')",
        "-c",
        "SELECT owner FROM accounts WHERE id = 1",
        "-c",
        "SELECT no_such_column FROM accounts",
    ]);
    cg.enter(&mut psql);
    let _ = psql.output().unwrap(); // the last statement fails on purpose
                                    // Another workload, which the label filter must leave out.
    check(
        pg.psql()
            .env("PGAPPNAME", "other")
            .args(["-c", "SELECT 42"]),
    )
    .unwrap();
    let q = "SELECT count() FROM audit_query.statements WHERE application_name IN ('query_test', 'other')";
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&ch, q) < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop().unwrap();
    assert_eq!(count(&ch, q), 5);

    let config = daemon.state.join("config.yaml");
    let query = |args: &[&str]| -> String {
        let mut c = std::process::Command::new(auditor_tests::auditor_bin());
        c.arg("query").args(args).arg("--config").arg(&config);
        check(&mut c).unwrap()
    };
    let label = format!("cgroup.path={}", cg.name);
    let sessions = query(&["sessions", "--since", "1h", "--label", &label]);
    assert_eq!(
        sessions.lines().count(),
        2,
        "header and one session:\n{sessions}"
    );
    assert!(
        sessions.contains("query_test") && !sessions.contains("other"),
        "{sessions}"
    );

    let workload = format!("cgroup:{}", cg.name);
    let statements = query(&["statements", "--workload", &workload, "--format", "tsv"]);
    assert_eq!(
        statements.lines().count(),
        5,
        "header and four statements:\n{statements}"
    );
    assert!(
        !statements.contains("alice"),
        "literals are redacted:\n{statements}"
    );

    // The console's session replay reads the same trail: the session, then its events in
    // order, from this server's (compat) columns.
    let cfg = auditor::config::Config::load(&config).unwrap();
    let trail = auditor::console::trail::Trail::ClickHouse(cfg.clickhouse.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = rt.block_on(trail.sessions()).unwrap();
    let row = listed
        .iter()
        .find(|r| r.app == "query_test")
        .unwrap_or_else(|| panic!("no query_test session: {listed:?}"));
    assert_eq!(
        (row.statements, row.errors, row.ended),
        (4, 1, true),
        "{row:?}"
    );
    let events = rt.block_on(trail.events(&row.id[..13])).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"session_start"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"session_end"), "{kinds:?}");
    let texts: Vec<String> = events
        .iter()
        .filter(|e| e.kind.as_str() == "statement")
        .map(|e| e.statement.to_string())
        .collect();
    assert!(texts[0].starts_with("CREATE TABLE accounts"), "{texts:?}");
    assert!(texts[1].starts_with("INSERT INTO accounts"), "{texts:?}");
    assert!(texts[3].contains("no_such_column"), "{texts:?}");
    assert!(events
        .windows(2)
        .all(|w| w[0].ts <= w[1].ts || w[1].kind.as_str() == "statement"));
    assert_eq!(&*events[1].decision, "would_block", "{:?}", events[1]);
    assert_eq!(
        events[0].labels.get("cgroup.path").map(String::as_str),
        Some(cg.name.as_str())
    );
    let page = auditor::console::html::replay(&row.id, &events);
    assert!(
        page.contains("CREATE TABLE accounts") && page.contains("42703"),
        "{page}"
    );
    assert!(!page.contains("alice"), "literals are redacted: {page}");

    let errors = query(&["errors", "--since", "1h", "--label", &label]);
    assert_eq!(errors.lines().count(), 2, "{errors}");
    assert!(errors.contains("42703"), "{errors}");

    let ddl = query(&["ddl", "--since", "1h"]);
    assert_eq!(ddl.lines().count(), 2, "{ddl}");
    assert!(ddl.contains("CREATE TABLE"), "{ddl}");

    let decisions = query(&["decisions", "--since", "1h", "--format", "tsv"]);
    assert_eq!(decisions.lines().count(), 2, "{decisions}");
    assert!(
        decisions.contains("would_block\tquery-guard/no-ddl"),
        "{decisions}"
    );
    assert!(decisions.contains("CREATE TABLE"), "{decisions}");

    let json = query(&["top", "--label", &label, "--format", "json"]);
    assert!(json.lines().count() >= 3, "{json}");
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v.get("fingerprint").is_some(), "{v}");
    }

    // A bad filter is an error that says what is wrong, not a crash.
    let mut c = std::process::Command::new(auditor_tests::auditor_bin());
    c.args(["query", "sessions", "--since", "3 fortnights"]);
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unit"),
        "{out:?}"
    );

    // The local log against the heads ClickHouse received from this host: intact...
    let verify = || {
        std::process::Command::new(auditor_tests::auditor_bin())
            .args(["verify", "--against-clickhouse", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&daemon.state)
            .output()
            .unwrap()
    };
    let out = verify();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(
        said.contains("clickhouse: the ") && said.contains("heads it received are in the log"),
        "{said}"
    );
    // ...and cut short after its first block (the daemon's start: every block of records
    // after it, each of which ClickHouse was told of), with its head removed too, as
    // someone covering their tracks would: ClickHouse's copy of the head names the cut.
    let log = daemon.state.join("log");
    let seg = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "alog"))
        .unwrap();
    let buf = std::fs::read(&seg).unwrap();
    let mut at = auditor::sink::local::segment::HEADER_LEN;
    let mut seals = Vec::new();
    while let Some((frame, next)) = auditor::sink::local::segment::next_frame(&buf, at) {
        if matches!(frame, auditor::sink::local::segment::Frame::Seal(_)) {
            seals.push(next);
        }
        at = next;
    }
    assert!(seals.len() >= 3, "start, records, stop: {seals:?}");
    std::fs::write(&seg, &buf[..seals[0]]).unwrap();
    std::fs::remove_file(log.join("HEAD")).unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        said.contains("truncated: ClickHouse received block"),
        "{said}"
    );
}
