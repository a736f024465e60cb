//! The protocol codec writes what a real client accepts: a tiny forwarding loop between
//! psql and a real Postgres 15 decodes and re-encodes every message with the codec,
//! rewrites DataRows (values of other lengths), and answers one query itself with an
//! ErrorResponse and a ReadyForQuery it built. psql must show the rewritten rows, the
//! error, and go on with the next statement on the same connection.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
};

use auditor::pg::{
    self,
    backend::{encode_data_row, encode_error, encode_ready_for_query},
    BackendMessage, Direction, FrontendMessage, Token, Tokenizer, TokenizerLimits,
};
use auditor_tests::{can_run, Postgres};

const BLOCK_MARKER: &[u8] = b"blocked_by_the_forwarder";

#[derive(Default)]
struct Counters {
    rewritten_rows: AtomicUsize,
    answered_here: AtomicUsize,
    messages: AtomicUsize,
}

/// Reads `from`, tokenizes, and hands each token to `on_token`, which writes what goes on.
fn pump(
    mut from: TcpStream,
    mut tokenizer: Tokenizer,
    mut on_token: impl FnMut(&mut Tokenizer, Token<'_>),
) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut tokens = Vec::new();
        tokenizer
            .push(&buf[..n], &mut |t| tokens.push(t))
            .expect("Postgres and psql speak the protocol");
        for t in tokens {
            on_token(&mut tokenizer, t);
        }
    }
}

/// Serves one client connection: forwards to `upstream_port`, through the codec.
fn forward_one(listener: TcpListener, upstream_port: u16, counters: Arc<Counters>) {
    let (client, _) = listener.accept().unwrap();
    let server = TcpStream::connect(("127.0.0.1", upstream_port)).unwrap();
    let to_client = Arc::new(Mutex::new(client.try_clone().unwrap()));
    let mut to_server = server.try_clone().unwrap();
    // The server's last transaction status, for answers given in its place.
    let status = Arc::new(AtomicU8::new(b'I'));
    // An SSLRequest from the client makes the server's next byte a one-byte answer.
    let (reply_tx, reply_rx) = std::sync::mpsc::channel::<()>();

    let c = counters.clone();
    let replies = to_client.clone();
    let st = status.clone();
    let upstream = thread::spawn(move || {
        let limits = TokenizerLimits::default();
        pump(
            client,
            Tokenizer::new(Direction::ToServer, limits),
            |tok, t| {
                c.messages.fetch_add(1, Ordering::Relaxed);
                let mut out = Vec::new();
                match t {
                    Token::Startup { body, .. } => {
                        let m = pg::frontend::decode_startup(&body).unwrap();
                        if matches!(
                            m,
                            FrontendMessage::SslRequest | FrontendMessage::GssEncRequest
                        ) {
                            reply_tx.send(()).unwrap();
                            // If refused, a startup packet comes next: tokenizers start in the
                            // typed phase after a packet, so say so (refusal is all we get here).
                            tok.expect_startup();
                        }
                        m.encode(&mut out);
                    }
                    Token::Message { tag, body, .. } => {
                        let m = pg::decode(Direction::ToServer, tag, &body).unwrap();
                        if let pg::Message::Frontend(FrontendMessage::Query { sql }) = &m {
                            if sql.windows(BLOCK_MARKER.len()).any(|w| w == BLOCK_MARKER) {
                                // Answered here; the server never sees it.
                                c.answered_here.fetch_add(1, Ordering::Relaxed);
                                let mut answer = Vec::new();
                                encode_error(
                                    &mut answer,
                                    false,
                                    "ERROR",
                                    "42501",
                                    "stopped by the test forwarder",
                                    &[(b'D', "the codec built this ErrorResponse")],
                                );
                                let s = match st.load(Ordering::Relaxed) {
                                    b'I' => b'I',
                                    _ => b'E',
                                };
                                encode_ready_for_query(&mut answer, s);
                                replies.lock().unwrap().write_all(&answer).unwrap();
                                return;
                            }
                        }
                        m.encode(&mut out);
                    }
                    other => panic!("unexpected client token {other:?}"),
                }
                to_server.write_all(&out).unwrap();
            },
        );
    });

    let c = counters;
    let mut tokenizer = Tokenizer::new(Direction::ToClient, TokenizerLimits::default());
    if reply_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .is_ok()
    {
        tokenizer.expect_encryption_reply();
    }
    pump(server, tokenizer, |_, t| {
        c.messages.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        match t {
            Token::EncryptionReply { reply, .. } => {
                assert_eq!(reply, b'N', "this server has no TLS");
                out.push(reply);
            }
            Token::Message { tag, body, .. } => match pg::backend::decode(tag, &body).unwrap() {
                BackendMessage::DataRow(values) => {
                    let rewritten: Vec<Option<&[u8]>> = values
                        .iter()
                        .map(|v| match v {
                            Some(b"secret-value") => Some(&b"****"[..]),
                            Some(b"short") => Some(&b"a value much longer than before"[..]),
                            other => other,
                        })
                        .collect();
                    if rewritten.iter().copied().ne(values.iter()) {
                        c.rewritten_rows.fetch_add(1, Ordering::Relaxed);
                    }
                    encode_data_row(&mut out, rewritten.into_iter());
                }
                m => {
                    if let BackendMessage::ReadyForQuery { status: s } = m {
                        status.store(s, Ordering::Relaxed);
                    }
                    m.encode(&mut out);
                }
            },
            other => panic!("unexpected server token {other:?}"),
        }
        to_client.lock().unwrap().write_all(&out).unwrap();
    });
    upstream.join().unwrap();
}

#[test]
fn psql_accepts_built_errors_and_rewritten_rows() {
    if !can_run("psql_accepts_built_errors_and_rewritten_rows") {
        return;
    }
    let pg = Postgres::start(&["log_statement = 'all'"]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let pg_port = pg.port;
    let forwarder = thread::spawn(move || forward_one(listener, pg_port, c));

    let script = "SELECT 'secret-value' AS a, 'short' AS b, 42 AS c, NULL AS d;\n\
                  SELECT 'blocked_by_the_forwarder';\n\
                  SELECT 'still connected', g FROM generate_series(1, 3) g;\n";
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-v", "ON_ERROR_STOP=0", "postgres"])
        // sslmode=prefer: psql asks for TLS first and this server says 'N'.
        .env("PGSSLMODE", "prefer")
        .env("PGGSSENCMODE", "disable")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    forwarder.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("psql stdout:\n{stdout}psql stderr:\n{stderr}");
    assert!(out.status.success(), "psql failed: {stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec![
            "****|a value much longer than before|42|",
            "still connected|1",
            "still connected|2",
            "still connected|3",
        ]
    );
    assert!(
        stderr.contains("ERROR:  stopped by the test forwarder")
            && stderr.contains("DETAIL:  the codec built this ErrorResponse"),
        "{stderr}"
    );
    assert_eq!(counters.rewritten_rows.load(Ordering::Relaxed), 1);
    assert_eq!(counters.answered_here.load(Ordering::Relaxed), 1);
    // The server never saw the statement answered in its place.
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(log.contains("still connected"));
    assert!(!log.contains("blocked_by_the_forwarder"), "{log}");
}
