//! TLS connections end to end: Postgres with ssl=on and a certificate made by the test,
//! clients with sslmode=require, plaintext taken at OpenSSL by uprobes. Counts are exact.
//!
//! Which end delivers the plaintext is varied on purpose:
//! - both ends hooked (libpq and the Postgres server): one session, decoded once;
//! - the client end only (through a TLS front whose OpenSSL runs over memory buffers, so
//!   its calls have no socket under them and cannot be tied to the connection);
//! - the server end only (a client doing the same);
//! - neither: the session is recorded as `tls_unreadable`, with its process and cgroup.

use std::{
    collections::HashSet,
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use auditor_tests::{
    assert_no_duplicates, can_run, check, pg_tls_helper, str_of, Cgroup, Daemon, Postgres, TlsProxy,
};
use serde_json::Value;

fn statements<'a>(events: &'a [Value], app: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| str_of(e, "kind") == "statement" && str_of(e, "application_name") == app)
        .collect()
}

fn assert_tls_statement(e: &Value) {
    assert_eq!(e["tls"].as_bool(), Some(true), "{e}");
    assert_eq!(str_of(e, "capture"), "ebpf_tls", "{e}");
}

#[test]
fn pgbench_over_tls_recorded_exactly() {
    if !can_run("pgbench_over_tls_recorded_exactly") {
        return;
    }
    let pg = Postgres::start_tls(&[]).unwrap();
    check(
        pg.pgbench()
            .env("PGSSLMODE", "require")
            .args(["-i", "-q", "-s", "2", "postgres"]),
    )
    .unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("pgbench-tls").unwrap();

    const CLIENTS: u32 = 4;
    const PER_CLIENT: u32 = 1500; // 6,000 transactions per mode
    for mode in ["simple", "extended", "prepared"] {
        let app = format!("tls_{mode}");
        let mut cmd = pg.pgbench();
        cmd.args(["-n", "-M", mode, "-c", &CLIENTS.to_string(), "-j", "2"])
            .args(["-t", &PER_CLIENT.to_string(), "postgres"])
            .env("PGSSLMODE", "require")
            .env("PGAPPNAME", &app);
        cg.enter(&mut cmd);
        let out = check(&mut cmd).unwrap();
        assert!(
            out.contains("number of transactions actually processed: 6000/6000"),
            "{out}"
        );
    }
    daemon.wait_sessions_ended(&cg.name);
    let events = daemon.stop_without_gaps();
    for mode in ["simple", "extended", "prepared"] {
        let app = format!("tls_{mode}");
        let recorded = statements(&events, &app);
        let executed = pg.logged_statements(&app).unwrap();
        assert!(executed >= 42_000, "{app}: server logged {executed}");
        assert_eq!(recorded.len(), executed, "{app}: recorded vs executed");
        for e in &recorded {
            assert_tls_statement(e);
            assert_eq!(str_of(e, "comm"), "pgbench");
            assert_eq!(str_of(e, "cgroup_path"), cg.name);
            assert_eq!(str_of(e, "db_user"), "postgres");
            assert!(e["server_pid"].as_u64().unwrap_or(0) > 0, "{e}");
        }
        let sessions: HashSet<&str> = recorded.iter().map(|e| str_of(e, "session_id")).collect();
        assert_eq!(sessions.len(), CLIENTS as usize + 1, "{app}");
        // No session of this workload is left unreadable.
        assert!(!events.iter().any(|e| str_of(e, "application_name") == app
            && e["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "tls_unreadable")));
    }
}

#[test]
fn psql_over_tls_identity_and_redaction() {
    if !can_run("psql_over_tls_identity_and_redaction") {
        return;
    }
    let pg = Postgres::start_tls(&[]).unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("psql-tls").unwrap();
    let mut cmd = pg.psql();
    cmd.env("PGSSLMODE", "require")
        .env("PGAPPNAME", "psql_tls")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cg.enter(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"CREATE TABLE t (id int, card text);\n\
              INSERT INTO t VALUES (1, '4111111111111111');\n\
              SELECT card FROM t WHERE card = '4111111111111111';\n\
              SELECT nope FROM t;\n",
        )
        .unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success());
    daemon.wait_sessions_ended(&cg.name);
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    let recorded = statements(&events, "psql_tls");
    assert_eq!(recorded.len(), 4, "{recorded:#?}");
    for e in &recorded {
        assert_tls_statement(e);
        assert_eq!(e["pid"].as_u64(), Some(pid as u64));
        assert_eq!(str_of(e, "cgroup_path"), cg.name);
        assert!(
            !e.to_string().contains("4111111111111111"),
            "literal leaked: {e}"
        );
    }
    assert_eq!(str_of(recorded[3], "error_code"), "42703");
    let start = events
        .iter()
        .find(|e| {
            str_of(e, "kind") == "session_start" && str_of(e, "application_name") == "psql_tls"
        })
        .expect("session_start");
    assert_eq!(start["tls"].as_bool(), Some(true));
    assert!(start["flags"].as_array().unwrap().is_empty(), "{start}");
}

#[test]
fn tls_plaintext_from_one_end_only() {
    if !can_run("tls_plaintext_from_one_end_only") {
        return;
    }
    let pg = Postgres::start_tls(&[]).unwrap();
    let proxy = TlsProxy::start(&pg).unwrap();

    // Client end only: psql (libpq, hooked) -> the memory-BIO TLS front. Only the front's
    // port is watched, so the front's own plain connection to Postgres is not a session.
    {
        let mut daemon = Daemon::start(proxy.port, "").unwrap();
        let cg = Cgroup::new("client-end").unwrap();
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port.to_string(),
            "-U",
            "postgres",
        ])
        .env("PGSSLMODE", "require")
        .env("PGAPPNAME", "client_end")
        .args(["-c", "SELECT 1", "-c", "SELECT 2", "postgres"]);
        cg.enter(&mut cmd);
        check(&mut cmd).unwrap();
        daemon.wait_sessions_ended(&cg.name);
        daemon.stop().unwrap();
        let events = daemon.events().unwrap();
        let recorded = statements(&events, "client_end");
        assert_eq!(recorded.len(), 2, "{events:#?}");
        for e in &recorded {
            assert_tls_statement(e);
            assert_eq!(str_of(e, "comm"), "psql");
            assert_eq!(str_of(e, "cgroup_path"), cg.name);
        }
    }

    // Server end only: a client whose OpenSSL runs over memory buffers -> Postgres.
    {
        let mut daemon = Daemon::start(pg.port, "").unwrap();
        let cg = Cgroup::new("server-end").unwrap();
        let mut cmd = pg_tls_helper();
        cmd.args(["client", "--bio", "memory", "--port", &pg.port.to_string()])
            .args([
                "--app",
                "server_end",
                "--query",
                "SELECT 10",
                "--query",
                "SELECT 20",
            ]);
        cg.enter(&mut cmd);
        let child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        daemon.wait_sessions_ended(&cg.name);
        daemon.stop().unwrap();
        let events = daemon.events().unwrap();
        let recorded = statements(&events, "server_end");
        assert_eq!(recorded.len(), 2, "{events:#?}");
        for e in &recorded {
            assert_tls_statement(e);
            // The client's identity still comes from its end of the connection.
            assert_eq!(e["pid"].as_u64(), Some(pid as u64));
            assert_eq!(str_of(e, "cgroup_path"), cg.name);
            assert!(e["server_pid"].as_u64().unwrap_or(0) > 0);
        }
    }
}

#[test]
fn tls_nobody_can_read_is_recorded_unreadable() {
    if !can_run("tls_nobody_can_read_is_recorded_unreadable") {
        return;
    }
    let pg = Postgres::start_tls(&[]).unwrap();
    let proxy = TlsProxy::start(&pg).unwrap();
    let mut daemon = Daemon::start(proxy.port, "").unwrap();
    let cg = Cgroup::new("unreadable").unwrap();
    let mut cmd = pg_tls_helper();
    cmd.args([
        "client",
        "--bio",
        "memory",
        "--port",
        &proxy.port.to_string(),
    ])
    .args(["--app", "unreadable", "--query", "SELECT 'hidden'"]);
    cg.enter(&mut cmd);
    let child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    daemon.wait_sessions_ended(&cg.name);
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["pid"].as_u64() == Some(pid as u64))
        .collect();
    let start = mine
        .iter()
        .find(|e| str_of(e, "kind") == "session_start")
        .unwrap_or_else(|| panic!("no session for the unreadable client: {events:#?}"));
    assert!(
        start["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "tls_unreadable"),
        "{start}"
    );
    assert_eq!(start["tls"].as_bool(), Some(true));
    assert_eq!(str_of(start, "cgroup_path"), cg.name);
    assert_eq!(str_of(start, "comm"), "python3");
    assert_eq!(start["server_port"].as_u64(), Some(proxy.port as u64));
    assert!(mine.iter().all(|e| str_of(e, "kind") != "statement"));
    assert!(mine.iter().any(|e| str_of(e, "kind") == "session_end"));
}

#[test]
fn client_with_its_own_libssl_started_after_the_daemon() {
    if !can_run("client_with_its_own_libssl_started_after_the_daemon") {
        return;
    }
    let pg = Postgres::start_tls(&[]).unwrap();
    let proxy = TlsProxy::start(&pg).unwrap();
    let mut daemon = Daemon::start(proxy.port, "").unwrap();
    // A private copy of the system's libssl: a different file, unknown to the daemon until
    // the client loads it (as a Python wheel's bundled libssl would be).
    let libdir = tempfile::tempdir().unwrap();
    let system = [
        "/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    ]
    .into_iter()
    .chain([
        "/lib/aarch64-linux-gnu/libssl.so.3",
        "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    ])
    .find(|p| std::path::Path::new(p).exists())
    .expect("the system's libssl.so.3");
    let copy = libdir.path().join("libssl.so.3");
    std::fs::copy(system, &copy).unwrap();

    // The client loads its libraries, then connects through the memory-BIO front: the only
    // plaintext of this session is what the copy's hooks take.
    let mut cmd = pg_tls_helper();
    cmd.env("LD_LIBRARY_PATH", libdir.path())
        .args(["client", "--bio", "socket", "--wait", "0.5"])
        .args(["--port", &proxy.port.to_string(), "--app", "own_libssl"])
        .args(["--query", "SELECT 'a'", "--query", "SELECT 'b'"]);
    check(&mut cmd).unwrap();
    let mut cmd = Command::new("psql");
    cmd.env("LD_LIBRARY_PATH", libdir.path())
        .env("PGSSLMODE", "require")
        .env("PGAPPNAME", "own_libssl_psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-c", "SELECT 3", "postgres"]);
    check(&mut cmd).unwrap();
    // The stats written at shutdown are final.
    daemon.stop().unwrap();
    let stats = daemon.stats().unwrap();
    let events = daemon.events().unwrap();
    let libraries: Vec<&str> = stats["tls_libraries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let copy_shown = copy.display().to_string();
    assert!(
        libraries.iter().any(|l| *l == copy_shown),
        "{copy_shown} not hooked: {libraries:?}"
    );
    let recorded = statements(&events, "own_libssl");
    assert_eq!(recorded.len(), 2, "{events:#?}");
    for e in &recorded {
        assert_tls_statement(e);
        assert_eq!(str_of(e, "comm"), "python3");
    }
    // psql using the same copy: the file is hooked once, for every process mapping it.
    let psql = statements(&events, "own_libssl_psql");
    assert_eq!(psql.len(), 1, "{events:#?}");
    assert_tls_statement(psql[0]);
}

#[test]
fn executable_with_openssl_linked_statically() {
    if !can_run("executable_with_openssl_linked_statically") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("static_tls_client");
    let src = auditor_tests::workspace_root().join("tests/helpers/static_tls_client.c");
    let lib = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu"]
        .into_iter()
        .find(|d| std::path::Path::new(d).join("libssl.a").exists())
        .expect("libssl.a (libssl-dev)");
    check(
        Command::new("gcc")
            .args(["-O1", "-o"])
            .arg(&exe)
            .arg(&src)
            .arg(format!("{lib}/libssl.a"))
            .arg(format!("{lib}/libcrypto.a"))
            .args(["-lpthread", "-ldl"]),
    )
    .unwrap();
    let quick = dir.path().join("static_tls_client_quick");
    std::fs::copy(&exe, &quick).unwrap();

    let pg = Postgres::start_tls(&[]).unwrap();
    let proxy = TlsProxy::start(&pg).unwrap();
    let mut daemon = Daemon::start(proxy.port, "").unwrap();
    let cg = Cgroup::new("static-tls").unwrap();
    // No libssl.so is mapped: only hooks found in the executable see its plaintext (the
    // front's OpenSSL runs over memory buffers). It waits 300 ms before connecting, as a
    // service does while it starts; the hook takes milliseconds.
    let port = proxy.port.to_string();
    let mut cmd = Command::new(&exe);
    cmd.args([&port, "static_client", "300", "SELECT 1", "SELECT 'two'"]);
    cg.enter(&mut cmd);
    check(&mut cmd).unwrap();
    // Another new executable that talks at once: hooked in time, late (decoded from the
    // next message, flagged mid_stream) or not at all (tls_unreadable); never silent.
    let mut cmd = Command::new(&quick);
    cmd.args([
        &port,
        "static_quick",
        "0",
        "SELECT 3",
        "SELECT 4",
        "SELECT 5",
    ]);
    cg.enter(&mut cmd);
    let child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let quick_pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    // Hooking is asynchronous to the client: wait until the stats show it (or 10 s), then
    // stop (which takes every record the kernel holds) and read the final stats.
    let exe_shown = exe.display().to_string();
    let hooked = |stats: &Value| {
        stats["tls_libraries"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l.as_str() == Some(exe_shown.as_str())))
    };
    daemon.wait_for_stats(Duration::from_secs(10), hooked);
    daemon.stop().unwrap();
    let stats = daemon.stats().unwrap();
    let events = daemon.events().unwrap();
    assert_no_duplicates(&events);
    assert!(hooked(&stats), "{exe_shown} not hooked: {stats}");
    let recorded = statements(&events, "static_client");
    assert_eq!(recorded.len(), 2, "{events:#?}");
    for e in &recorded {
        assert_tls_statement(e);
        assert_eq!(str_of(e, "cgroup_path"), cg.name);
    }
    let quick_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["pid"].as_u64() == Some(quick_pid as u64))
        .collect();
    let start = quick_events
        .iter()
        .find(|e| str_of(e, "kind") == "session_start")
        .unwrap_or_else(|| panic!("the quick client left no session: {events:#?}"));
    let flags: Vec<&str> = start["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    let quick_statements: Vec<&&Value> = quick_events
        .iter()
        .filter(|e| str_of(e, "kind") == "statement")
        .collect();
    match quick_statements.len() {
        3 => assert!(flags.is_empty() || flags == ["mid_stream"], "{start}"),
        0 => assert!(
            flags.contains(&"tls_unreadable") || flags.contains(&"mid_stream"),
            "{start}"
        ),
        n => assert!(n < 3 && flags.contains(&"mid_stream"), "{quick_events:#?}"),
    }
    eprintln!(
        "static_tls_client_quick: {} of 3 statements, session flags {flags:?}",
        quick_statements.len()
    );
}
