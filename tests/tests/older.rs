//! Sessions older than the daemon: a client (raw protocol, psycopg 3, pgjdbc) connects and
//! prepares named statements, then the daemon starts, then the client executes each of
//! them 50 times. Every execution is
//! recorded once, with the statement's text (read from the backend, which names it as it
//! binds: flag `text_from_server`), and the database user and database (from the backend's
//! process title).

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use auditor_tests::{
    can_run, check, python3,
    raw::{bind, connect, execute, msg, parse, read_until_ready},
    str_of, workspace_root, Daemon, Postgres,
};
use serde_json::Value;

const STATEMENTS: [(&str, &str); 3] = [
    ("s1", "SELECT $1::int + 1 AS n"),
    ("s2", "SELECT count(*) FROM pg_class WHERE relname <> $1"),
    ("S_1", "SELECT upper($1::text) AS u"),
];

/// A raw-protocol session through `port` that has prepared STATEMENTS.
fn prepared_raw_session(port: u16, app: &str) -> TcpStream {
    let mut s = connect(port, app);
    let mut prepare = Vec::new();
    for (name, sql) in STATEMENTS {
        prepare.extend(parse(name, sql, &[]));
    }
    prepare.extend(msg(b'S', &[]));
    s.write_all(&prepare).unwrap();
    read_until_ready(&mut s, 1);
    s
}

/// Executes each of STATEMENTS `times` times (Bind, Execute, Sync), then ends the session.
fn execute_raw(mut s: TcpStream, times: usize) {
    for _ in 0..times {
        for (name, _) in STATEMENTS {
            let mut m = bind("", name, Some((0, b"7")));
            m.extend(execute("", 0));
            m.extend(msg(b'S', &[]));
            s.write_all(&m).unwrap();
            read_until_ready(&mut s, 1);
        }
    }
    s.write_all(&msg(b'X', &[])).unwrap();
}

#[test]
fn statements_prepared_before_the_daemon_are_recorded_with_their_text() {
    if !can_run("statements_prepared_before_the_daemon_are_recorded_with_their_text") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let s = prepared_raw_session(pg.port, "early_raw");
    let backend: u64 = check(pg.psql().args([
        "-At",
        "-c",
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'early_raw'",
    ]))
    .unwrap()
    .trim()
    .parse()
    .unwrap();

    let mut daemon = Daemon::start(pg.port, "").unwrap();
    execute_raw(s, 50);
    let stmts = statements_of_backend(&daemon, backend);
    daemon.stop().unwrap();
    let stats = daemon.stats().unwrap();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let exe = exe.to_string_lossy();
    assert_eq!(stmts.len(), 150, "{stmts:#?}");
    for (i, e) in stmts.iter().enumerate() {
        let (name, _) = STATEMENTS[i % 3];
        let flags = flags_of(e);
        assert!(flags.contains(&"text_from_server"), "{e:#}");
        assert!(!flags.contains(&"prepared_before_capture"), "{e:#}");
        assert_eq!(str_of(e, "prepared_name"), name, "{e:#}");
        assert_eq!(str_of(e, "command"), "SELECT", "{e:#}");
        assert_eq!(str_of(e, "db_user"), "postgres", "{e:#}");
        assert_eq!(str_of(e, "database"), "postgres", "{e:#}");
        assert_eq!(e["rows"].as_u64(), Some(1), "{e:#}");
        // A connection older than the daemon has no open record: its first record is
        // data, and the process it names is checked against the time the kernel saw it
        // (this test process, which started long before).
        assert_eq!(
            e["pid"].as_u64(),
            Some(u64::from(std::process::id())),
            "{e:#}"
        );
        assert_eq!(str_of(e, "exe"), exe, "{e:#}");
        assert!(!flags.contains(&"process_gone"), "{e:#}");
    }
    // The texts, normalised (literals redacted) like any other statement's.
    assert_eq!(str_of(&stmts[0], "statement"), "SELECT $1::int + $2 AS n");
    assert!(str_of(&stmts[1], "statement").contains("pg_class"));
    assert_eq!(stmts[1]["tables"], serde_json::json!(["pg_class"]));
    assert!(str_of(&stmts[2], "statement").starts_with("SELECT upper($1"));
    assert_eq!(
        stats["tracker"]["server_texts_learnt"].as_u64(),
        Some(3),
        "{stats:#}"
    );
}

/// The statements of `backend` in the trail, once 150 are there (or 20 s passed).
fn statements_of_backend(daemon: &Daemon, backend: u64) -> Vec<Value> {
    let mine = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| str_of(e, "kind") == "statement")
            .filter(|e| e["server_pid"].as_u64() == Some(backend))
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while mine(&daemon.events().unwrap()).len() < 150 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    mine(&daemon.events().unwrap())
}

/// A driver's client (`psycopg_early.py`, `PgjdbcEarly.java`) prepares three statements,
/// the daemon starts, the client runs each 50 times: all 150 recorded with their text.
fn driver_prepared_before_the_daemon(mut client: Command, app: &str, names: &str, pg: &Postgres) {
    let mut client = client
        .args([&pg.port.to_string(), app])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "prepared", "{app}: {line}");
    let backend: u64 = check(pg.psql().args([
        "-At",
        "-c",
        &format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'"),
    ]))
    .unwrap()
    .trim()
    .parse()
    .unwrap();

    let mut daemon = Daemon::start(pg.port, "").unwrap();
    writeln!(client.stdin.take().unwrap(), "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done", "{app}: {line}");
    assert!(client.wait().unwrap().success());
    let stmts = statements_of_backend(&daemon, backend);
    daemon.stop().unwrap();
    assert_eq!(stmts.len(), 150, "{stmts:#?}");
    let texts = [
        "SELECT $1::int + $2 AS n",
        "SELECT count(*) FROM pg_class WHERE relname <> $1",
        "SELECT upper($1::text) AS u",
    ];
    for (i, e) in stmts.iter().enumerate() {
        assert_eq!(str_of(e, "statement"), texts[i % 3], "{e:#}");
        assert!(str_of(e, "prepared_name").starts_with(names), "{e:#}");
        assert!(
            e["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "text_from_server"),
            "{e:#}"
        );
        assert_eq!(str_of(e, "db_user"), "postgres", "{e:#}");
        assert_eq!(str_of(e, "database"), "postgres", "{e:#}");
    }
}

#[test]
fn psycopg_statements_prepared_before_the_daemon_are_recorded_with_their_text() {
    if !can_run("psycopg_statements_prepared_before_the_daemon_are_recorded_with_their_text") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let mut client = Command::new(python3());
    client.arg(workspace_root().join("tests/helpers/drivers/psycopg_early.py"));
    driver_prepared_before_the_daemon(client, "early_psycopg", "_pg3_", &pg);
}

#[test]
fn pgjdbc_statements_prepared_before_the_daemon_are_recorded_with_their_text() {
    if !can_run("pgjdbc_statements_prepared_before_the_daemon_are_recorded_with_their_text") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let classes = workspace_root().join("target/test-deps/jdbc-early");
    std::fs::create_dir_all(&classes).unwrap();
    let jar = "/usr/share/java/postgresql.jar";
    let status = Command::new("javac")
        .args(["-cp", jar, "-d"])
        .arg(&classes)
        .arg(workspace_root().join("tests/helpers/drivers/PgjdbcEarly.java"))
        .status()
        .expect("javac (cargo xtask setup --tests installs default-jdk-headless)");
    assert!(status.success(), "javac failed");
    let mut client = Command::new("java");
    client
        .arg("-cp")
        .arg(format!("{jar}:{}", classes.display()))
        .arg("PgjdbcEarly");
    driver_prepared_before_the_daemon(client, "early_jdbc", "S_", &pg);
}

/// A TCP relay in this process to Postgres on `port`, for one connection: to the daemon
/// watching the relay's port, the server end of the connection is not a Postgres backend
/// (as for a server on another host). Returns the relay's port.
fn relay_to(port: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut server = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut client2, mut server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut client, &mut server2));
        let _ = std::io::copy(&mut server, &mut client2);
    });
    relay_port
}

#[test]
fn a_server_not_on_this_host_leaves_the_text_unknown_and_says_so() {
    if !can_run("a_server_not_on_this_host_leaves_the_text_unknown_and_says_so") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let relay = relay_to(pg.port);
    let s = prepared_raw_session(relay, "early_remote");
    // The daemon watches the relay's port only: the backend behind it is not this
    // connection's server end.
    let mut daemon = Daemon::start(relay, "").unwrap();
    execute_raw(s, 10);
    let mine = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| str_of(e, "kind") == "statement" && e["server_port"] == relay)
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while mine(&daemon.events().unwrap()).len() < 30 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.stop().unwrap();
    let stmts = mine(&daemon.events().unwrap());
    assert_eq!(stmts.len(), 30, "{stmts:#?}");
    for e in &stmts {
        let flags = flags_of(e);
        assert!(flags.contains(&"prepared_before_capture"), "{e:#}");
        assert!(!flags.contains(&"text_from_server"), "{e:#}");
        assert!(!flags.contains(&"meta_from_process_title"), "{e:#}");
        assert_eq!(str_of(e, "statement"), "", "{e:#}");
        assert_eq!(str_of(e, "db_user"), "", "not guessed: {e:#}");
        assert_eq!(e["rows"].as_u64(), Some(1), "{e:#}");
    }
}

fn flags_of(e: &Value) -> Vec<&str> {
    e["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect()
}
