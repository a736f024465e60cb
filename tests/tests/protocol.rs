//! Protocol corners no psql or pgbench run exercises, from a minimal client written here,
//! against a real Postgres 15: pipelining across Syncs, binary parameters, a portal fetched
//! in pieces (PortalSuspended), an error in the middle of a pipeline, an empty query.

use std::io::Write;

use auditor_tests::{
    can_run,
    raw::{bind, connect, cstr, execute, msg, parse, read_until_ready},
    statements_of, str_of, Cgroup, Daemon, Postgres,
};

fn raw_client(port: u16) {
    let mut s = connect(port, "raw_client");

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

    cg.run_test_client(
        "raw_client_process",
        &[("RAW_CLIENT_PORT", pg.port.to_string())],
    );
    // Stop takes every record the kernel holds: no wait needed before it.
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    let stmts = statements_of(&events, &cg.name);
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
