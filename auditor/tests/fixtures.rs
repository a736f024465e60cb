//! The protocol decoder and session state machine on byte streams recorded from a real
//! Postgres 15 (`cargo xtask fixtures` records new ones).

use auditor::{
    audit::recorder::{Draft, RecordingPolicy},
    capture::session::Session,
    pg::{self, frontend, Direction, FrontendMessage, Token, Tokenizer, TokenizerLimits},
    sql::Analyzer,
};

#[path = "support/fixture_io.rs"]
mod fixture_io;
use fixture_io::load;

/// What a test compares: everything but ids and times.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Seen {
    kind: String,
    statement: String,
    command: String,
    rows: Option<u64>,
    error_code: String,
    protocol: String,
    params: Vec<String>,
    prepared_name: String,
    flags: Vec<String>,
}

fn seen(drafts: &[Draft]) -> Vec<Seen> {
    drafts
        .iter()
        .map(|d| Seen {
            kind: d.event.kind.to_string(),
            statement: d.event.statement.to_string(),
            command: d.event.command.to_string(),
            rows: d.event.rows,
            error_code: d.event.error_code.to_string(),
            protocol: d.event.protocol.to_string(),
            params: d.event.params.to_vec(),
            prepared_name: d.event.prepared_name.to_string(),
            flags: d.event.flags.names().map(String::from).collect(),
        })
        .collect()
}

/// Feeds the transcript, optionally cutting the whole stream into pieces at `cuts` (byte
/// positions over the concatenated transcript).
fn run(chunks: &[(Direction, Vec<u8>)], cuts: &[usize]) -> (Vec<Seen>, Session) {
    let mut session = Session::new(
        RecordingPolicy::default(),
        TokenizerLimits::default(),
        false,
    );
    let mut analyzer = Analyzer::default();
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut cut_iter = cuts.iter().peekable();
    for (i, (dir, bytes)) in chunks.iter().enumerate() {
        let mut start = 0usize;
        while let Some(&&c) = cut_iter.peek() {
            if c <= pos + start || c >= pos + bytes.len() {
                if c < pos + bytes.len() {
                    cut_iter.next();
                    continue;
                }
                break;
            }
            let at = c - pos;
            session.push(
                *dir,
                &bytes[start..at],
                start == 0,
                i as i128,
                &mut analyzer,
                &mut out,
            );
            start = at;
            cut_iter.next();
        }
        session.push(
            *dir,
            &bytes[start..],
            start == 0,
            i as i128,
            &mut analyzer,
            &mut out,
        );
        pos += bytes.len();
    }
    (seen(&out), session)
}

fn statements(s: &[Seen]) -> Vec<&Seen> {
    s.iter().filter(|e| &*e.kind == "statement").collect()
}

#[test]
fn psql_multi_statement_query() {
    let (events, session) = run(&load("psql-simple-0"), &[]);
    assert_eq!(&*session.meta().db_user, "postgres");
    assert_eq!(&*session.meta().application_name, "psql");
    assert_eq!(&*events[0].kind, "session_start");
    let got: Vec<(&str, Option<u64>, &str)> = statements(&events)
        .iter()
        .map(|e| (e.command.as_ref(), e.rows, e.error_code.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("CREATE TABLE", None, ""),
            ("INSERT", Some(2), ""),
            ("SELECT", Some(1), ""),
            ("UPDATE", Some(2), ""),
            ("SELECT", None, "42703"),
        ]
    );
    let st = statements(&events);
    assert_eq!(&*st[1].statement, "INSERT INTO t VALUES ($1, $2), ($3, $4)");
    assert_eq!(&*st[2].statement, "SELECT * FROM t WHERE id = $1");
    assert!(st.iter().all(|e| &*e.protocol == "simple"));
}

#[test]
fn psql_two_selects_in_one_query() {
    let (events, _) = run(&load("psql-simple-1"), &[]);
    let st = statements(&events);
    assert_eq!(st.len(), 2);
    assert_eq!(&*st[0].statement, "SELECT $1");
    assert_eq!(st[1].rows, Some(1));
}

#[test]
fn copy_out_counts_rows_without_buffering_them() {
    let (events, _) = run(&load("psql-copy-0"), &[]);
    let st = statements(&events);
    assert_eq!(st.len(), 1);
    assert_eq!(&*st[0].command, "COPY");
    assert_eq!(st[0].rows, Some(5000));
}

#[test]
fn pgbench_extended_binds_parameters_as_keyed_hashes() {
    let (events, _) = run(&load("pgbench-extended-1"), &[]);
    let st = statements(&events);
    assert_eq!(st.len(), 21, "3 transactions of 7 statements");
    let update = st.iter().find(|e| &*e.command == "UPDATE").unwrap();
    assert_eq!(&*update.protocol, "extended");
    assert_eq!(update.rows, Some(1));
    assert_eq!(
        update.statement,
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;"
    );
    assert_eq!(update.params.len(), 2);
    assert!(update
        .params
        .iter()
        .all(|p| p.starts_with("hmac:") && p.len() == 21));
    assert_eq!(&*st[0].command, "BEGIN");
    assert_eq!(&*st[6].command, "COMMIT");
}

#[test]
fn pgbench_prepared_executes_named_statements() {
    let (events, _) = run(&load("pgbench-prepared-1"), &[]);
    let st = statements(&events);
    assert_eq!(st.len(), 21);
    assert!(
        st.iter().all(|e| e.prepared_name.starts_with('P')),
        "{st:?}"
    );
    assert!(st
        .iter()
        .all(|e| !e.flags.contains(&"prepared_before_capture".into())));
    // Executions after the first transaction reuse the statements prepared in the first.
    assert_eq!(st[7].statement, st[0].statement);
}

#[test]
fn raw_params_when_the_policy_says_so() {
    let chunks = load("pgbench-extended-1");
    let policy = RecordingPolicy::new(false, true, b"test-key");
    let mut session = Session::new(policy, TokenizerLimits::default(), false);
    let mut analyzer = Analyzer::default();
    let mut out = Vec::new();
    for (i, (dir, b)) in chunks.iter().enumerate() {
        session.push(*dir, b, true, i as i128, &mut analyzer, &mut out);
    }
    let update = out.iter().find(|d| &*d.event.command == "UPDATE").unwrap();
    assert!(
        update.event.params.iter().all(|p| p.parse::<i64>().is_ok()),
        "{:?}",
        update.event.params
    );
}

/// Cutting the stream anywhere gives the same events: framing never depends on where reads
/// happened to end.
#[test]
fn same_events_at_every_byte_boundary() {
    for name in [
        "psql-simple-0",
        "psql-simple-1",
        "pgbench-extended-0",
        "pgbench-extended-1",
        "pgbench-prepared-0",
        "pgbench-prepared-1",
    ] {
        let chunks = load(name);
        let total: usize = chunks.iter().map(|(_, b)| b.len()).sum();
        let (whole, _) = run(&chunks, &[]);
        assert!(!whole.is_empty());
        for cut in 1..total {
            let (split, _) = run(&chunks, &[cut]);
            assert_eq!(split, whole, "{name}: cut at byte {cut}");
        }
    }
}

/// One byte at a time, and the large COPY transcript at a stride of cuts.
#[test]
fn same_events_byte_by_byte() {
    for name in ["psql-copy-0", "pgbench-prepared-1", "psql-simple-0"] {
        let chunks = load(name);
        let total: usize = chunks.iter().map(|(_, b)| b.len()).sum();
        let (whole, _) = run(&chunks, &[]);
        let every: Vec<usize> = (1..total).collect();
        let (split, _) = run(&chunks, &every);
        assert_eq!(split, whole, "{name}: byte by byte");
    }
}

/// Hostile bytes never panic and never allocate what a length prefix claims.
#[test]
fn garbage_does_not_panic() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let base = load("pgbench-extended-1");
    for round in 0..300 {
        let mut chunks = base.clone();
        // Flip a few bytes anywhere, including length prefixes.
        for _ in 0..(1 + round % 5) {
            let i = (next() as usize) % chunks.len();
            if chunks[i].1.is_empty() {
                continue;
            }
            let j = (next() as usize) % chunks[i].1.len();
            chunks[i].1[j] = next() as u8;
        }
        let _ = run(&chunks, &[]);
    }
}

const ALL_FIXTURES: [&str; 7] = [
    "psql-simple-0",
    "psql-simple-1",
    "psql-copy-0",
    "pgbench-extended-0",
    "pgbench-extended-1",
    "pgbench-prepared-0",
    "pgbench-prepared-1",
];

/// What the proxy will do with a transcript: cut both directions into messages, decode
/// each whole message and encode it again, forward streamed bodies as they come. The
/// bytes forwarded must be the bytes received, to the byte, whether messages come whole
/// or in chunks.
fn forward_transcript(chunks: &[(Direction, Vec<u8>)], limits: TokenizerLimits) -> [Vec<u8>; 2] {
    let mut tokenizers = [
        Tokenizer::new(Direction::ToServer, limits),
        Tokenizer::new(Direction::ToClient, limits),
    ];
    let mut forwarded = [Vec::new(), Vec::new()];
    let mut decoded = 0usize;
    for (dir, bytes) in chunks {
        let d = dir.index();
        let mut tokens = Vec::new();
        tokenizers[d]
            .push(bytes, &mut |t| tokens.push(t))
            .unwrap_or_else(|e| panic!("{dir:?}: {e}"));
        for t in tokens {
            let out = &mut forwarded[d];
            match t {
                Token::Startup { body, span } => {
                    let m = frontend::decode_startup(&body).unwrap();
                    let before = out.len();
                    m.encode(out);
                    assert_eq!(out.len() - before, (span.end - span.start) as usize);
                    if matches!(
                        m,
                        FrontendMessage::SslRequest | FrontendMessage::GssEncRequest
                    ) {
                        tokenizers[1].expect_encryption_reply();
                    }
                }
                Token::EncryptionReply { reply, .. } => {
                    assert_eq!(reply, b'N', "the fixtures are recorded in plaintext");
                    out.push(reply);
                    tokenizers[0].expect_startup();
                }
                Token::Message { tag, body, span } => {
                    let m = pg::decode(*dir, tag, &body)
                        .unwrap_or_else(|e| panic!("{dir:?} '{}': {e}", tag as char));
                    assert_eq!(m.direction(), *dir);
                    let before = out.len();
                    m.encode(out);
                    assert_eq!(out.len() - before, (span.end - span.start) as usize);
                    decoded += 1;
                }
                Token::Header { tag, body_len, .. } => {
                    out.push(tag);
                    out.extend_from_slice(&(body_len + 4).to_be_bytes());
                }
                Token::Chunk { data, .. } => out.extend_from_slice(data),
            }
        }
    }
    assert!(decoded > 0);
    for t in &tokenizers {
        assert!(t.at_boundary());
    }
    forwarded
}

#[test]
fn transcripts_forward_byte_for_byte_through_the_codec() {
    for name in ALL_FIXTURES {
        let chunks = load(name);
        let mut received = [Vec::new(), Vec::new()];
        for (dir, bytes) in &chunks {
            received[dir.index()].extend_from_slice(bytes);
        }
        // Every message decoded and re-encoded; then everything over 16 bytes streamed.
        for max_buffered in [16 << 20, 16] {
            let forwarded = forward_transcript(&chunks, TokenizerLimits { max_buffered });
            assert_eq!(forwarded[0], received[0], "{name}: client bytes");
            assert_eq!(forwarded[1], received[1], "{name}: server bytes");
        }
    }
}

#[test]
fn every_response_matches_its_request() {
    for name in ALL_FIXTURES {
        let (_, session) = run(&load(name), &[]);
        let counters = session.counters();
        assert_eq!(counters.unmatched_responses, 0, "{name}");
        assert_eq!(counters.parse_errors, 0, "{name}");
    }
}
