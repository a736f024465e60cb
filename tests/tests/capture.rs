//! Plaintext capture end to end: real eBPF, a real Postgres 15, real psql and pgbench, each
//! workload in its own cgroup v2 subgroup. Counts are exact.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use auditor_tests::{
    assert_no_duplicates, can_run, check, free_port, pg_tls_helper, pg_tls_helper_in, str_of,
    Cgroup, Daemon, Netns, Postgres,
};
use serde_json::Value;

fn statements<'a>(events: &'a [Value], cgroup: &str, app: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| str_of(e, "kind") == "statement")
        .filter(|e| str_of(e, "cgroup_path") == cgroup && str_of(e, "application_name") == app)
        .collect()
}

/// The events of application `app`, in order, and their kinds.
fn of_app<'a>(events: &'a [Value], app: &str) -> (Vec<&'a Value>, Vec<&'a str>) {
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "application_name") == app)
        .collect();
    let kinds = mine.iter().map(|e| str_of(e, "kind")).collect();
    (mine, kinds)
}

/// Runs TPC-B-like pgbench in `mode` as `app` inside `cg`; every transaction must succeed.
fn run_pgbench(
    mut cmd: Command,
    cg: &Cgroup,
    mode: &str,
    app: &str,
    clients: u32,
    per_client: u32,
) {
    cmd.args(["-n", "-M", mode, "-c", &clients.to_string(), "-j", "2"])
        .args(["-t", &per_client.to_string(), "postgres"])
        .env("PGAPPNAME", app);
    cg.enter(&mut cmd);
    let out = check(&mut cmd).unwrap();
    let total = clients * per_client;
    assert!(
        out.contains(&format!(
            "number of transactions actually processed: {total}/{total}"
        )),
        "{out}"
    );
}

#[test]
fn pgbench_simple_extended_prepared_recorded_exactly() {
    if !can_run("pgbench_simple_extended_prepared_recorded_exactly") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    check(pg.pgbench().args(["-i", "-q", "-s", "2"]).arg("postgres")).unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("pgbench").unwrap();

    const CLIENTS: u32 = 4;
    const PER_CLIENT: u32 = 2500; // 10,000 transactions per mode
    for mode in ["simple", "extended", "prepared"] {
        let app = format!("pgbench_{mode}");
        run_pgbench(pg.pgbench(), &cg, mode, &app, CLIENTS, PER_CLIENT);
    }
    // Let the daemon catch up, then stop it: everything is flushed on SIGINT.
    daemon.wait_sessions_ended(&cg.name);
    let events = daemon.stop_without_gaps();

    for mode in ["simple", "extended", "prepared"] {
        let app = format!("pgbench_{mode}");
        let recorded = statements(&events, &cg.name, &app);
        let executed = pg.logged_statements(&app).unwrap();
        // TPC-B-like: 7 statements per transaction, plus pgbench's own setup queries.
        assert!(executed >= 70_000, "{app}: server logged {executed}");
        assert_eq!(
            recorded.len(),
            executed,
            "{app}: recorded vs executed by the server"
        );
        let protocol = if mode == "simple" {
            "simple"
        } else {
            "extended"
        };
        let updates = recorded
            .iter()
            .filter(|e| str_of(e, "command") == "UPDATE")
            .count();
        assert_eq!(updates, 30_000, "{app}: three UPDATEs per transaction");
        for e in &recorded {
            assert_eq!(str_of(e, "db_user"), "postgres");
            assert_eq!(str_of(e, "database"), "postgres");
            assert_eq!(str_of(e, "comm"), "pgbench");
            assert_eq!(str_of(e, "error_code"), "");
            assert_eq!(str_of(e, "capture"), "ebpf");
            if str_of(e, "command") == "UPDATE" {
                assert_eq!(e["rows"].as_u64(), Some(1), "{e}");
                assert_eq!(str_of(e, "protocol"), protocol);
                assert_eq!(str_of(e, "tx_status"), "in_transaction", "{e}");
            }
            // Every statement was followed by its ReadyForQuery.
            let tx = str_of(e, "tx_status");
            if str_of(e, "command") == "COMMIT" {
                assert_eq!(tx, "idle", "{e}");
            } else {
                assert!(["idle", "in_transaction"].contains(&tx), "{e}");
            }
        }
        // One session per client connection plus pgbench's main connection.
        let sessions: HashSet<&str> = recorded.iter().map(|e| str_of(e, "session_id")).collect();
        assert_eq!(sessions.len(), CLIENTS as usize + 1, "{app}");
    }
}

#[test]
fn psql_outcomes_identity_and_redaction() {
    if !can_run("psql_outcomes_identity_and_redaction") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("psql").unwrap();
    let script = "\
CREATE TABLE cards (id int PRIMARY KEY, owner text, number text);
INSERT INTO cards VALUES (1, 'alice', '4111111111111111'), (2, 'bob', '5500005555555559');
SELECT owner FROM cards WHERE number = '4111111111111111';
UPDATE cards SET owner = 'carol' WHERE id IN (1, 2);
SELECT missing_column FROM cards;
SELECT 1; SELECT 2 AS two;
PREPARE byid(int) AS SELECT owner FROM cards WHERE id = $1;
EXECUTE byid(2);
DELETE FROM cards;
BEGIN;
SELECT 1/0;
ROLLBACK;
";
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", "psql_test")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cg.enter(&mut cmd);
    // A login uid of its own (the audit id that `sudo` keeps): its events carry what the
    // kernel read at connect, not what /proc says after psql is gone.
    // SAFETY: between fork and exec only a write to the child's own /proc file.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let _ = std::fs::write("/proc/self/loginuid", "54321");
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let psql_pid = child.id();
    child.wait().unwrap();
    daemon.wait_sessions_ended(&cg.name);
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    assert_no_duplicates(&events);

    let got: Vec<(String, Option<u64>, String, String)> =
        statements(&events, &cg.name, "psql_test")
            .iter()
            .map(|e| {
                (
                    str_of(e, "command").to_string(),
                    e["rows"].as_u64(),
                    str_of(e, "error_code").to_string(),
                    str_of(e, "tx_status").to_string(),
                )
            })
            .collect();
    let want: Vec<(String, Option<u64>, String, String)> = [
        ("CREATE TABLE", None, "", "idle"),
        ("INSERT", Some(2), "", "idle"),
        ("SELECT", Some(1), "", "idle"),
        ("UPDATE", Some(2), "", "idle"),
        ("SELECT", None, "42703", "idle"),
        ("SELECT", Some(1), "", "idle"),
        ("SELECT", Some(1), "", "idle"),
        ("PREPARE", None, "", "idle"),
        ("EXECUTE", Some(1), "", "idle"),
        ("DELETE", Some(2), "", "idle"),
        ("BEGIN", None, "", "in_transaction"),
        ("SELECT", None, "22012", "failed"),
        ("ROLLBACK", None, "", "idle"),
    ]
    .iter()
    .map(|(c, r, e, t)| (c.to_string(), *r, e.to_string(), t.to_string()))
    .collect();
    assert_eq!(got, want);

    let all = statements(&events, &cg.name, "psql_test");
    for e in &all {
        assert_eq!(e["pid"].as_u64(), Some(psql_pid as u64));
        assert_eq!(str_of(e, "comm"), "psql");
        assert!(str_of(e, "exe").ends_with("psql"), "{e}");
        assert_eq!(
            e["labels"]["process.loginuid"].as_str(),
            Some("54321"),
            "{e}"
        );
        assert!(e["labels"]["process.sessionid"].as_str().is_some(), "{e}");
        assert!(
            !e["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "process_gone"),
            "{e}"
        );
        assert!(e["server_pid"].as_u64().unwrap() > 0, "backend joined: {e}");
        assert_eq!(e["server_port"].as_u64(), Some(pg.port as u64));
        assert_eq!(str_of(e, "client_addr"), "127.0.0.1");
    }
    assert_eq!(
        str_of(all[2], "statement"),
        "SELECT owner FROM cards WHERE number = $1"
    );
    assert_eq!(
        str_of(all[4], "error_message"),
        "column \"missing_column\" does not exist"
    );
    // Literals never reach the log.
    let raw = auditor_tests::raw_log(&daemon.log_dir());
    assert!(!raw.is_empty());
    for secret in ["4111111111111111", "5500005555555559", "alice", "carol"] {
        assert!(
            !auditor_tests::contains_bytes(&raw, secret),
            "{secret} leaked into the log"
        );
    }
    // One session, started and ended, from the client's cgroup.
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| str_of(e, "cgroup_path") == cg.name)
        .map(|e| str_of(e, "kind"))
        .collect();
    assert_eq!(kinds.len(), 15, "{kinds:?}");
    assert_eq!(kinds.first(), Some(&"session_start"));
    assert_eq!(kinds.last(), Some(&"session_end"));
    // The chain verifies.
    let out = check(
        Command::new(auditor_tests::auditor_bin())
            .args(["verify", "--state-dir"])
            .arg(&daemon.state),
    )
    .unwrap();
    assert!(out.starts_with("intact:"), "{out}");
}

#[test]
fn tail_shows_each_statement_within_a_second() {
    if !can_run("tail_shows_each_statement_within_a_second") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("interactive").unwrap();
    let mut tail = Command::new(auditor_tests::auditor_bin())
        .args(["tail", "-n", "0", "--state-dir"])
        .arg(&daemon.state)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            let _ = tx.send((Instant::now(), line));
        }
    });

    // An interactive session: psql reads statements one at a time from a pipe.
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", "interactive")
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    cg.enter(&mut cmd);
    let mut psql = cmd.spawn().unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    for i in 0..5 {
        let marker = format!("marker_{i}");
        writeln!(stdin, "SELECT 1 AS {marker};").unwrap();
        stdin.flush().unwrap();
        let sent = Instant::now();
        let deadline = sent + Duration::from_secs(5);
        let shown = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((at, line)) if line.contains(&marker) => break Some((at, line)),
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let (at, line) = shown.unwrap_or_else(|| panic!("{marker} never shown by tail"));
        assert!(
            at.duration_since(sent) < Duration::from_secs(1),
            "{marker} shown after {:?}",
            at.duration_since(sent)
        );
        assert!(line.contains(&format!("psql[{}]", psql.id())), "{line}");
        assert!(line.contains(&cg.name), "{line}");
    }
    drop(stdin);
    psql.wait().unwrap();
    let _ = tail.kill();
    let _ = tail.wait();
}

#[test]
fn connection_older_than_the_daemon_is_picked_up_mid_stream() {
    if !can_run("connection_older_than_the_daemon_is_picked_up_mid_stream") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let cg = Cgroup::new("early").unwrap();
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", "early_bird")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    cg.enter(&mut cmd);
    let mut psql = cmd.spawn().unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    let mut stdout = BufReader::new(psql.stdout.take().unwrap());
    // Prepared before the daemon exists: its text cannot be known, its executions are.
    writeln!(
        stdin,
        "PREPARE early(int) AS SELECT $1 + 1;\nSELECT 'before' AS w;"
    )
    .unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    while !line.contains("before") {
        line.clear();
        stdout.read_line(&mut line).unwrap();
    }

    let mut daemon = Daemon::start(pg.port, "").unwrap();
    writeln!(stdin, "SELECT 'after' AS w;\nEXECUTE early(41);").unwrap();
    stdin.flush().unwrap();
    drop(stdin);
    psql.wait().unwrap();
    daemon.wait_sessions_ended(&cg.name);
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "cgroup_path") == cg.name)
        .collect();
    let stmts: Vec<&&Value> = mine
        .iter()
        .filter(|e| str_of(e, "kind") == "statement")
        .collect();
    assert_eq!(stmts.len(), 2, "{mine:#?}");
    assert_eq!(str_of(stmts[0], "statement"), "SELECT $1 AS w");
    assert_eq!(str_of(stmts[1], "command"), "EXECUTE");
    assert_eq!(stmts[1]["rows"].as_u64(), Some(1));
    assert!(stmts[0]["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "mid_stream"));
    assert_eq!(str_of(mine[0], "kind"), "session_start");
    assert_eq!(str_of(mine.last().unwrap(), "kind"), "session_end");
    assert_eq!(str_of(stmts[0], "comm"), "psql");
    // Its startup went by before the daemon: user and database come from the backend's
    // process title, and every event says so.
    for e in &mine {
        assert_eq!(str_of(e, "db_user"), "postgres", "{e}");
        assert_eq!(str_of(e, "database"), "postgres", "{e}");
        assert!(
            e["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "meta_from_process_title"),
            "{e}"
        );
    }
}

#[test]
fn passwords_and_sasl_never_reach_the_log() {
    if !can_run("passwords_and_sasl_never_reach_the_log") {
        return;
    }
    let pg = Postgres::start(&["password_encryption = 'scram-sha-256'"]).unwrap();
    // Over TCP, clients now authenticate with SCRAM; the unix socket stays trusted for setup.
    let hba = pg.dir.path().join("data/pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    let secret = "Sup3r-Secret-Passw0rd";
    // Set the password and switch TCP to SCRAM over the (unaudited) unix socket.
    check(
        Command::new("psql")
            .args(["-X", "-q", "-h"])
            .arg(pg.dir.path())
            .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"])
            .args(["-c", &format!("ALTER ROLE postgres PASSWORD '{secret}'")])
            .args(["-c", "SELECT pg_reload_conf()"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("scram").unwrap();
    // Setting the password over an audited connection: the literal must be redacted.
    let mut set = pg.psql();
    set.env("PGPASSWORD", secret)
        .env("PGAPPNAME", "scram_admin")
        .args(["-c", &format!("ALTER ROLE postgres PASSWORD '{secret}'")]);
    cg.enter(&mut set);
    check(&mut set).unwrap();
    let mut cmd = pg.psql();
    cmd.env("PGPASSWORD", secret)
        .env("PGAPPNAME", "scram_client")
        .args(["-c", "SELECT 'authenticated' AS ok"]);
    cg.enter(&mut cmd);
    let out = check(&mut cmd).unwrap();
    assert!(out.contains("authenticated"), "{out}");
    let mut wrong = pg.psql();
    wrong
        .env("PGPASSWORD", "wrong-password-123")
        .env("PGAPPNAME", "scram_wrong")
        .args(["-c", "SELECT 1"]);
    cg.enter(&mut wrong);
    assert!(!wrong.output().unwrap().status.success());
    daemon.wait_sessions_ended(&cg.name);
    daemon.stop().unwrap();

    let raw = auditor_tests::raw_log(&daemon.log_dir());
    assert!(!raw.is_empty());
    for needle in [secret, "wrong-password-123", "SCRAM-SHA-256", "c=biws"] {
        assert!(
            !auditor_tests::contains_bytes(&raw, needle),
            "{needle:?} reached the log"
        );
    }
    let events = daemon.events().unwrap();
    let admin = statements(&events, &cg.name, "scram_admin");
    assert_eq!(admin.len(), 1);
    assert_eq!(str_of(admin[0], "command"), "ALTER ROLE");
    let ok = statements(&events, &cg.name, "scram_client");
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0]["rows"].as_u64(), Some(1));
    // The refused login is on record: a session that ended with SQLSTATE 28P01.
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "application_name") == "scram_wrong")
        .filter(|e| str_of(e, "kind") == "session_end")
        .collect();
    assert_eq!(refused.len(), 1, "{events:#?}");
    assert_eq!(str_of(refused[0], "error_code"), "28P01");
}

#[test]
fn unix_socket_clients_recorded_exactly_and_their_sessions_end() {
    if !can_run("unix_socket_clients_recorded_exactly_and_their_sessions_end") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    check(pg.pgbench().args(["-i", "-q", "-s", "1"]).arg("postgres")).unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("unixclients").unwrap();

    // pgbench through <dir>/.s.PGSQL.<port>, the way local clients reach Postgres by default.
    for mode in ["simple", "prepared"] {
        let app = format!("unix_pgbench_{mode}");
        run_pgbench(pg.pgbench_unix(), &cg, mode, &app, 2, 1000);
    }
    // Many short connections in a row: socket addresses are reused, and no session may
    // absorb the next one's statements.
    for i in 0..40 {
        let mut cmd = pg.psql_unix();
        cmd.env("PGAPPNAME", "unix_short")
            .args(["-c", &format!("SELECT {i} AS n")]);
        cg.enter(&mut cmd);
        check(&mut cmd).unwrap();
    }
    // A client killed while idle: the backend reads the end of the stream and the
    // session ends (there is no close tracepoint for Unix-domain sockets).
    let mut cmd = pg.psql_unix();
    cmd.env("PGAPPNAME", "unix_killed")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    cg.enter(&mut cmd);
    let mut psql = cmd.spawn().unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    let mut stdout = BufReader::new(psql.stdout.take().unwrap());
    writeln!(stdin, "SELECT 'alive' AS w;").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    while !line.contains("alive") {
        line.clear();
        stdout.read_line(&mut line).unwrap();
    }
    let killed_pid = psql.id();
    psql.kill().unwrap();
    psql.wait().unwrap();
    let events = daemon
        .wait_for(Duration::from_secs(10), |evs| {
            evs.iter().any(|e| {
                str_of(e, "kind") == "session_end" && str_of(e, "application_name") == "unix_killed"
            })
        })
        .unwrap();
    let output = daemon.stop().unwrap();
    // (The last stats are written at shutdown.) 2 x 3 pgbench connections, 40 short
    // ones, the killed one.
    let stats = daemon.stats().unwrap();
    assert!(
        stats["tracker"]["unix_sessions"].as_u64().unwrap_or(0) >= 47,
        "{stats}"
    );
    let after_stop = daemon.events().unwrap();
    assert_no_duplicates(&after_stop);
    assert!(
        after_stop.iter().all(|e| str_of(e, "kind") != "gap"),
        "gaps recorded: {output:?}"
    );

    for mode in ["simple", "prepared"] {
        let app = format!("unix_pgbench_{mode}");
        let recorded = statements(&after_stop, &cg.name, &app);
        let executed = pg.logged_statements(&app).unwrap();
        assert!(executed >= 14_000, "{app}: server logged {executed}");
        assert_eq!(recorded.len(), executed, "{app}: recorded vs executed");
        for e in &recorded {
            assert_eq!(str_of(e, "comm"), "pgbench", "{e}");
            assert_eq!(str_of(e, "client_addr"), "unix", "{e}");
            assert_eq!(str_of(e, "server_addr"), "unix", "{e}");
            assert_eq!(e["server_port"].as_u64(), Some(pg.port as u64), "{e}");
            assert!(e["server_pid"].as_u64().unwrap_or(0) > 0, "{e}");
        }
        let sessions: HashSet<&str> = recorded.iter().map(|e| str_of(e, "session_id")).collect();
        assert_eq!(
            sessions.len(),
            3,
            "{app}: two clients and pgbench's main connection"
        );
    }

    let short: Vec<&Value> = after_stop
        .iter()
        .filter(|e| str_of(e, "application_name") == "unix_short")
        .collect();
    let mut by_session: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for e in &short {
        by_session
            .entry(str_of(e, "session_id"))
            .or_default()
            .push(str_of(e, "kind"));
    }
    assert_eq!(
        by_session.len(),
        40,
        "one session per connection: {by_session:?}"
    );
    for kinds in by_session.values() {
        assert_eq!(
            kinds,
            &["session_start", "statement", "session_end"],
            "{by_session:?}"
        );
    }
    let short_pids: HashSet<u64> = short.iter().filter_map(|e| e["pid"].as_u64()).collect();
    assert_eq!(short_pids.len(), 40, "each session names its own psql");

    let (killed, kinds) = of_app(&events, "unix_killed");
    assert_eq!(
        kinds,
        ["session_start", "statement", "session_end"],
        "{killed:#?}"
    );
    for e in &killed {
        assert_eq!(e["pid"].as_u64(), Some(killed_pid as u64));
        assert_eq!(str_of(e, "cgroup_path"), cg.name);
    }
}

#[test]
fn twin_loopback_connections_in_two_network_namespaces_stay_apart() {
    if !can_run("twin_loopback_connections_in_two_network_namespaces_stay_apart") {
        return;
    }
    // Two pods on one node, each with its own Postgres on 127.0.0.1:<port> and a client
    // that got the same ephemeral port: the very same addresses and ports twice, told
    // apart only by their network namespaces.
    let port = free_port();
    // The clients' one source port, bound in each namespace. Not from the ephemeral range
    // (32768-60999, where free_port and every connect's own port come from): there it can
    // be the server's port, or one a readiness check's connection in the namespace still
    // holds in TIME_WAIT (bind: "Address already in use", seen once in CI).
    let source_port = 20000 + (std::process::id() % 10000) as u16;
    let (ns_a, ns_b) = (Netns::new("a").unwrap(), Netns::new("b").unwrap());
    let _pg_a = Postgres::start_in_netns(&ns_a, port).unwrap();
    let _pg_b = Postgres::start_in_netns(&ns_b, port).unwrap();
    let mut daemon = Daemon::start(port, "").unwrap();
    let cg_a = Cgroup::new("twin_a").unwrap();
    let cg_b = Cgroup::new("twin_b").unwrap();
    const QUERIES: usize = 25;
    let mut clients = Vec::new();
    for (ns, cg, tag) in [(&ns_a, &cg_a, "a"), (&ns_b, &cg_b, "b")] {
        let mut cmd = pg_tls_helper_in(ns);
        cmd.args(["client", "--bio", "none", "--port", &port.to_string()])
            .args(["--source-port", &source_port.to_string()])
            .args(["--app", &format!("twin_{tag}"), "--pause", "0.04"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for i in 0..QUERIES {
            cmd.args(["--query", &format!("SELECT '{tag}' AS side, {i} AS n")]);
        }
        cg.enter(&mut cmd);
        clients.push(cmd.spawn().unwrap());
    }
    let pids: Vec<u64> = clients.iter().map(|c| c.id() as u64).collect();
    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("done"),
            "client: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    daemon
        .wait_for(Duration::from_secs(10), |evs| {
            evs.iter()
                .filter(|e| str_of(e, "kind") == "session_end")
                .count()
                >= 2
        })
        .unwrap();
    let events = daemon.stop_without_gaps();
    for (tag, cg, pid) in [("a", &cg_a, pids[0]), ("b", &cg_b, pids[1])] {
        let app = format!("twin_{tag}");
        let (mine, kinds) = of_app(&events, &app);
        let mut want = vec!["session_start"];
        want.extend(std::iter::repeat_n("statement", QUERIES));
        want.push("session_end");
        assert_eq!(kinds, want, "{app}: {mine:#?}");
        let sessions: HashSet<&str> = mine.iter().map(|e| str_of(e, "session_id")).collect();
        assert_eq!(sessions.len(), 1, "{app}");
        for e in &mine {
            assert_eq!(e["pid"].as_u64(), Some(pid), "{app}: {e}");
            assert_eq!(str_of(e, "cgroup_path"), cg.name, "{e}");
            assert_eq!(e["client_port"].as_u64(), Some(source_port as u64), "{e}");
            assert_eq!(e["server_port"].as_u64(), Some(port as u64), "{e}");
            assert!(
                e["flags"].as_array().is_none_or(|f| f.is_empty()),
                "{app}: {e}"
            );
        }
    }
    let other: Vec<&Value> = events
        .iter()
        .filter(|e| !str_of(e, "application_name").starts_with("twin_"))
        .collect();
    assert!(other.is_empty(), "events of no client: {other:#?}");
}

#[test]
fn without_bpf_loop_exact_and_oversized_calls_recorded_as_gaps() {
    if !can_run("without_bpf_loop_exact_and_oversized_calls_recorded_as_gaps") {
        return;
    }
    // The programs built for kernels before 5.17 (no bpf_loop), forced on this one.
    let pg = Postgres::start(&[]).unwrap();
    check(pg.pgbench().args(["-i", "-q", "-s", "1"]).arg("postgres")).unwrap();
    let mut daemon = Daemon::start_with_env(pg.port, "", &[("AUDITOR_NO_BPF_LOOP", "1")]).unwrap();
    let cg = Cgroup::new("compat").unwrap();
    for mode in ["simple", "prepared"] {
        run_pgbench(pg.pgbench(), &cg, mode, &format!("compat_{mode}"), 2, 500);
    }
    // One blocking send of a 1 MiB query: more than these programs copy per call (128
    // KiB). What is lost must show as a gap, counted.
    let mut cmd = pg_tls_helper();
    cmd.args(["client", "--bio", "none", "--port", &pg.port.to_string()])
        .args(["--app", "compat_big", "--big", "1048576"])
        .args(["--query", "SELECT 'compatmarker'"]);
    cg.enter(&mut cmd);
    let out = check(&mut cmd).unwrap();
    assert!(out.contains("done"), "{out}");
    daemon.stop().unwrap();
    let stats = daemon.stats().unwrap();
    let events = daemon.events().unwrap();
    assert_no_duplicates(&events);
    for mode in ["simple", "prepared"] {
        let app = format!("compat_{mode}");
        let recorded = statements(&events, &cg.name, &app);
        let executed = pg.logged_statements(&app).unwrap();
        assert!(executed >= 3500, "{app}: server logged {executed}");
        assert_eq!(recorded.len(), executed, "{app}: recorded vs executed");
    }
    let gaps: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "gap" && str_of(e, "application_name") == "compat_big")
        .collect();
    assert!(
        !gaps.is_empty(),
        "no gap recorded for calls over 128 KiB: {:?}",
        events
            .iter()
            .filter(|e| str_of(e, "kind") == "gap")
            .collect::<Vec<_>>()
    );
    assert!(
        stats["kernel"]["truncated_calls"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert!(
        events
            .iter()
            .all(|e| !e.to_string().contains("compatmarker")),
        "a literal reached the log"
    );

    // The same call with bpf_loop (2 MiB per call): copied whole, the statement recorded.
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let mut cmd = pg_tls_helper();
    cmd.args(["client", "--bio", "none", "--port", &pg.port.to_string()])
        .args(["--app", "looped_big", "--big", "1048576"]);
    cg.enter(&mut cmd);
    check(&mut cmd).unwrap();
    let events = daemon.stop_without_gaps();
    let (mine, kinds) = of_app(&events, "looped_big");
    assert_eq!(
        kinds,
        ["session_start", "statement", "session_end"],
        "{mine:#?}"
    );
    assert_eq!(str_of(mine[1], "statement"), "SELECT length($1)");
}

/// Both ends of a loopback connection are watched; once the session is settled the daemon
/// mutes the end it does not decode, and the kernel stops copying it, even for a socket
/// the programs had already looked up and found unmuted (its earlier calls: startup,
/// authentication, the first statements). A mute that did not take would copy the 4 MB
/// result twice: the second copy arrives and is counted as duplicate bytes.
#[test]
fn the_redundant_end_of_a_loopback_connection_stops_being_copied() {
    if !can_run("the_redundant_end_of_a_loopback_connection_stops_being_copied") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("mute").unwrap();
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", "mute_check").args([
        "-c",
        "SELECT 1",
        "-c",
        "SELECT pg_sleep(1)",
        "-c",
        "SELECT count(*) FROM (SELECT repeat('x', 1000000) FROM generate_series(1, 4)) big",
        "-c",
        "SELECT length(string_agg(repeat('y', 1000000), '')) FROM generate_series(1, 4)",
        "-c",
        "SELECT repeat('z', 1000000) FROM generate_series(1, 4)",
    ]);
    cg.enter(&mut cmd);
    cmd.stdout(Stdio::null());
    check(&mut cmd).unwrap();
    daemon.wait_sessions_ended(&cg.name);
    // stats.json is written each second: wait for one written after the session ended.
    let stats = daemon.wait_for_stats(Duration::from_secs(10), |s| {
        s["active_sessions"].as_u64() == Some(0)
            && s["kernel"]["bytes"].as_u64().unwrap_or(0) >= 4_000_000
    });
    let events = daemon.stop_without_gaps();
    let recorded = statements(&events, &cg.name, "mute_check");
    assert_eq!(recorded.len(), 5, "{recorded:#?}");
    let copied = stats["kernel"]["bytes"].as_u64().unwrap();
    let duplicate = stats["tracker"]["duplicate_bytes"].as_u64().unwrap();
    // The result rows came over the decoded end: 4 MB at least.
    assert!(copied >= 4_000_000, "{stats}");
    // The other end's copies stopped before the result: what it sent before it was muted
    // (startup, the first statements) is a few KB.
    assert!(duplicate < 100_000, "duplicate bytes {duplicate}: {stats}");
}
