//! Protocol corners no psql or pgbench run exercises, from a minimal client written here,
//! against a real Postgres 15: pipelining across Syncs, binary parameters, a portal fetched
//! in pieces (PortalSuspended), an error in the middle of a pipeline, an empty query.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use auditor_tests::{can_run, str_of, Cgroup, Daemon, Postgres};
use serde_json::Value;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend((types.len() as i16).to_be_bytes());
    for t in types {
        b.extend(t.to_be_bytes());
    }
    msg(b'P', &b)
}

/// Bind with one parameter in the given format (0 text, 1 binary).
fn bind(portal: &str, stmt: &str, param: Option<(i16, &[u8])>) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(cstr(stmt));
    match param {
        Some((format, value)) => {
            b.extend(1i16.to_be_bytes());
            b.extend(format.to_be_bytes());
            b.extend(1i16.to_be_bytes());
            b.extend((value.len() as i32).to_be_bytes());
            b.extend(value);
        }
        None => {
            b.extend(0i16.to_be_bytes());
            b.extend(0i16.to_be_bytes());
        }
    }
    b.extend(0i16.to_be_bytes());
    msg(b'B', &b)
}

fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(max_rows.to_be_bytes());
    msg(b'E', &b)
}

/// Reads messages until `ready` ReadyForQuery messages were seen; returns the tags.
fn read_until_ready(s: &mut TcpStream, ready: usize) -> Vec<u8> {
    let mut tags = Vec::new();
    let mut seen = 0;
    while seen < ready {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).unwrap();
        tags.push(head[0]);
        if head[0] == b'Z' {
            seen += 1;
        }
    }
    tags
}

fn raw_client(port: u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut startup = Vec::new();
    startup.extend(196_608u32.to_be_bytes());
    for (k, v) in [
        ("user", "postgres"),
        ("database", "postgres"),
        ("application_name", "raw_client"),
    ] {
        startup.extend(cstr(k));
        startup.extend(cstr(v));
    }
    startup.push(0);
    let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(startup);
    s.write_all(&packet).unwrap();
    read_until_ready(&mut s, 1);

    // One pipeline, three Syncs, written before reading anything.
    let mut out = Vec::new();
    // 1: a named statement with a binary int4 parameter.
    out.extend(parse("s1", "SELECT $1::int + 1", &[23]));
    out.extend(bind("", "s1", Some((1, &41i32.to_be_bytes()))));
    out.extend(execute("", 0));
    // 2: one portal fetched in two pieces: 3 rows, then the rest (10 in all).
    out.extend(parse("", "SELECT g FROM generate_series(1, 10) g", &[]));
    out.extend(bind("p2", "", None));
    out.extend(execute("p2", 3));
    out.extend(execute("p2", 0));
    out.extend(msg(b'S', &[]));
    // 3: the named statement again, text parameter.
    out.extend(bind("", "s1", Some((0, b"1"))));
    out.extend(execute("", 0));
    out.extend(msg(b'S', &[]));
    // 4: an invalid parameter: the error comes at Bind, the Execute is skipped.
    out.extend(bind("", "s1", Some((0, b"not a number"))));
    out.extend(execute("", 0));
    out.extend(msg(b'S', &[]));
    // 5: after the error, the pipeline goes on.
    out.extend(bind("", "s1", Some((0, b"2"))));
    out.extend(execute("", 0));
    out.extend(msg(b'S', &[]));
    s.write_all(&out).unwrap();
    let tags = read_until_ready(&mut s, 4);
    assert!(tags.contains(&b's'), "the portal was suspended once");
    assert!(tags.contains(&b'E'), "the bad parameter was refused");

    // An empty query executes nothing.
    s.write_all(&msg(b'Q', &cstr(""))).unwrap();
    read_until_ready(&mut s, 1);
    s.write_all(&msg(b'X', &[])).unwrap();
}

#[test]
fn pipelined_binary_suspended_and_failing_extended_protocol() {
    if !can_run("pipelined_binary_suspended_and_failing_extended_protocol") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("raw").unwrap();

    // Run the client in its own process inside the cgroup: this test binary re-executed.
    let me = std::env::current_exe().unwrap();
    let mut cmd = Command::new(me);
    cmd.args([
        "--exact",
        "raw_client_process",
        "--nocapture",
        "--include-ignored",
    ])
    .env("RAW_CLIENT_PORT", pg.port.to_string());
    cg.enter(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stop takes every record the kernel holds: no wait needed before it.
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    let stmts: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "cgroup_path") == cg.name && str_of(e, "kind") == "statement")
        .collect();
    let got: Vec<(&str, Option<u64>, &str, &str)> = stmts
        .iter()
        .map(|e| {
            (
                str_of(e, "statement"),
                e["rows"].as_u64(),
                str_of(e, "error_code"),
                str_of(e, "prepared_name"),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("SELECT $1::int + $2", Some(1), "", "s1"),
            ("SELECT g FROM generate_series($1, $2) g", Some(10), "", ""),
            ("SELECT $1::int + $2", Some(1), "", "s1"),
            ("SELECT $1::int + $2", None, "22P02", "s1"),
            ("SELECT $1::int + $2", Some(1), "", "s1"),
        ]
    );
    // Each execution carries its one parameter, as a keyed hash.
    for e in [stmts[0], stmts[2], stmts[4]] {
        let params = e["params"].as_array().unwrap();
        assert_eq!(params.len(), 1);
        assert!(params[0].as_str().unwrap().starts_with("hmac:"));
    }
}

/// Not a test on its own: the client process of the test above.
#[test]
#[ignore]
fn raw_client_process() {
    let port: u16 = std::env::var("RAW_CLIENT_PORT").unwrap().parse().unwrap();
    raw_client(port);
}
