//! Statements larger than one copy: a client writes 5 MB and 50 MB statements (simple and
//! extended protocol) and a Bind with a 10 MB parameter, each in one write call, to a real
//! Postgres 15. Every one is recorded exactly once with its outcome; one whose bytes were
//! not all captured (beyond the per-call copy, or beyond `max_message_bytes`) carries the
//! text that came, `truncated` and its real size, and never takes the next statement with
//! it.

use std::io::Write;

use auditor_tests::{
    can_run,
    raw::{bind, connect, execute, msg, parse, read_until_ready},
    statements_of, str_of, Cgroup, Daemon, Postgres,
};
use serde_json::Value;

const MB: usize = 1 << 20;

/// `SELECT length('xxx…') AS n` of about `size` bytes.
fn big_select(size: usize) -> String {
    let mut sql = String::with_capacity(size + 32);
    sql.push_str("SELECT length('");
    sql.extend(std::iter::repeat_n('x', size));
    sql.push_str("') AS n");
    sql
}

fn extended(sql: &str, param: Option<&[u8]>) -> Vec<u8> {
    let mut out = parse("", sql, &[]);
    out.extend(bind("", "", param.map(|p| (0, p))));
    out.extend(execute("", 0));
    out.extend(msg(b'S', &[]));
    out
}

/// Each request in one write call, then its answer.
fn client(port: u16) {
    let mut s = connect(port, "large");
    let requests: Vec<Vec<u8>> = vec![
        msg(b'Q', format!("{}\0", big_select(5 * MB)).as_bytes()),
        msg(b'Q', format!("{}\0", big_select(50 * MB)).as_bytes()),
        extended(&big_select(5 * MB), None),
        extended(&big_select(50 * MB), None),
        extended("SELECT length($1) AS n", Some(&vec![b'v'; 10 * MB])),
        msg(b'Q', b"SELECT 'after' AS n\0"),
    ];
    for r in requests {
        s.write_all(&r).unwrap();
        let tags = read_until_ready(&mut s, 1);
        assert!(!tags.contains(&b'E'), "the server refused a request");
    }
    s.write_all(&msg(b'X', &[])).unwrap();
}

fn flags(e: &Value) -> Vec<&str> {
    e["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect()
}

#[test]
fn statements_larger_than_one_copy_are_recorded_once_with_their_outcome() {
    if !can_run("statements_larger_than_one_copy_are_recorded_once_with_their_outcome") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let mut daemon = Daemon::start(pg.port, "").unwrap();
    let cg = Cgroup::new("large").unwrap();
    cg.run_test_client(
        "large_client_process",
        &[("LARGE_CLIENT_PORT", pg.port.to_string())],
    );
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    let st = statements_of(&events, &cg.name);
    let summary: Vec<String> = st
        .iter()
        .map(|e| {
            let text = str_of(e, "statement");
            format!(
                "{} {:?} {} {:?}",
                &text[..text.len().min(40)],
                e["rows"],
                str_of(e, "error_code"),
                flags(e)
            )
        })
        .collect();
    eprintln!("recorded: {summary:#?}");
    assert_eq!(st.len(), 6, "{summary:#?}");
    for e in &st {
        assert_eq!(e["rows"].as_u64(), Some(1), "{summary:#?}");
        assert_eq!(str_of(e, "error_code"), "", "{summary:#?}");
        // Literals stay redacted, however the text was cut.
        assert!(!str_of(e, "statement").contains("xxxx"), "{summary:#?}");
        let f = flags(e);
        let size = e["message_bytes"].as_u64().unwrap();
        assert_eq!(f.contains(&"truncated"), size > 0, "{summary:#?}");
        // Bytes lost inside a message leave it truncated, never whole.
        if f.contains(&"gap_before") {
            assert!(f.contains(&"truncated"), "{summary:#?}");
        }
    }
    let protocols: Vec<&str> = st.iter().map(|e| str_of(e, "protocol")).collect();
    assert_eq!(
        protocols,
        ["simple", "simple", "extended", "extended", "extended", "simple"]
    );
    // 5 MB fits one copy (an eighth of the 64 MiB ring) and max_message_bytes: whole.
    for e in [st[0], st[2]] {
        assert_eq!(
            str_of(e, "statement"),
            "SELECT length($1) AS n",
            "{summary:#?}"
        );
        assert!(flags(e).is_empty(), "{summary:#?}");
    }
    // 50 MB exceeds both: its beginning, flagged, with the message's real size.
    let query_body = (big_select(50 * MB).len() + 1) as u64;
    assert_eq!(st[1]["message_bytes"].as_u64(), Some(query_body));
    let parse_body = query_body + 1 + 2; // the unnamed statement's name, no types
    assert_eq!(st[3]["message_bytes"].as_u64(), Some(parse_body));
    for e in [st[1], st[3]] {
        assert!(flags(e).contains(&"truncated"), "{summary:#?}");
        assert!(
            str_of(e, "statement").starts_with("SELECT length("),
            "{summary:#?}"
        );
    }
    // The 10 MB parameter: whole when captured whole, else the statement with unknown
    // parameters.
    let bind5 = st[4];
    assert_eq!(str_of(bind5, "statement"), "SELECT length($1) AS n");
    let params = bind5["params"].as_array().unwrap();
    if flags(bind5).contains(&"truncated") {
        assert!(params.is_empty(), "{summary:#?}");
        assert_eq!(
            bind5["message_bytes"].as_u64(),
            Some((2 + 2 + 2 + 2 + 4 + 10 * MB + 2) as u64)
        );
    } else {
        assert_eq!(params.len(), 1, "{summary:#?}");
    }
    // The statement after them all is whole.
    assert_eq!(str_of(st[5], "statement"), "SELECT $1 AS n");
    assert!(flags(st[5]).is_empty(), "{summary:#?}");
}

/// Not a test on its own: the client process of the test above.
#[test]
#[ignore]
fn large_client_process() {
    let port: u16 = std::env::var("LARGE_CLIENT_PORT").unwrap().parse().unwrap();
    client(port);
}
