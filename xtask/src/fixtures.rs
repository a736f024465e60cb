//! `cargo xtask fixtures`: records Postgres protocol transcripts from a real Postgres 15.
//!
//! A recording proxy sits between real clients (psql, pgbench) and a throwaway server and
//! writes each connection as JSON Lines: {"d":"c"|"s","hex":"…"} per read, in the order the
//! proxy saw them (a request is written before it is forwarded, so responses come after).
//! Authentication is `trust`: no password ever enters a fixture.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use auditor_tests::Postgres;

type Transcript = Arc<Mutex<Vec<(char, Vec<u8>)>>>;

fn pump(mut from: TcpStream, mut to: TcpStream, dir: char, log: Transcript) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        log.lock().expect("lock").push((dir, buf[..n].to_vec()));
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Accepts connections, forwarding to `upstream`; returns the transcripts when told to stop.
fn proxy(listener: TcpListener, upstream: u16, sessions: Arc<Mutex<Vec<Transcript>>>) {
    for client in listener.incoming() {
        let Ok(client) = client else { break };
        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
            break;
        };
        let log: Transcript = Arc::new(Mutex::new(Vec::new()));
        sessions.lock().expect("lock").push(log.clone());
        let (c2, s2) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let l2 = log.clone();
        std::thread::spawn(move || pump(client, server, 'c', log));
        std::thread::spawn(move || pump(s2, c2, 's', l2));
    }
}

fn scenario(
    name: &str,
    out: &Path,
    proxy_port: u16,
    upstream: u16,
    run: impl FnOnce(u16) -> Result<()>,
) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", proxy_port))?;
    let sessions: Arc<Mutex<Vec<Transcript>>> = Arc::default();
    let s2 = sessions.clone();
    std::thread::spawn(move || proxy(listener, upstream, s2));
    run(proxy_port)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    for (i, t) in sessions.lock().expect("lock").iter().enumerate() {
        let path = out.join(format!("{name}-{i}.jsonl"));
        let mut text = String::new();
        for (d, bytes) in t.lock().expect("lock").iter() {
            text.push_str(&format!("{{\"d\":\"{d}\",\"hex\":\"{}\"}}\n", hex(bytes)));
        }
        std::fs::write(&path, text)?;
        eprintln!("fixtures: wrote {}", path.display());
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn psql(port: u16, sql: &str) -> Result<()> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-c", sql, "postgres"])
        .env("PGSSLMODE", "disable")
        .output()
        .context("psql")?;
    let _ = out; // errors are part of some scenarios
    Ok(())
}

fn pgbench(port: u16, mode: &str) -> Result<()> {
    crate::run(
        Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-n", "-M", mode, "-c", "1", "-t", "3", "postgres"])
            .env("PGSSLMODE", "disable"),
    )
}

pub fn record(out: &Path) -> Result<()> {
    crate::setup::setup(crate::setup::Purpose::Test)?;
    std::fs::create_dir_all(out)?;
    let pg = Postgres::start(&[])?;
    crate::run(pg.pgbench().args(["-i", "-q", "-s", "1", "postgres"]))?;
    let upstream = pg.port;
    let port = || auditor_tests::free_port();
    scenario("psql-simple", out, port(), upstream, |p| {
        psql(
            p,
            "CREATE TABLE t (id int PRIMARY KEY, v text); \
             INSERT INTO t VALUES (1, 'one'), (2, 'two'); \
             SELECT * FROM t WHERE id = 2; UPDATE t SET v = 'x'; SELECT nope FROM t;",
        )?;
        psql(p, "SELECT 1; SELECT 2")
    })?;
    scenario("psql-copy", out, port(), upstream, |p| {
        psql(
            p,
            "COPY (SELECT g, 'row ' || g FROM generate_series(1, 5000) g) TO STDOUT",
        )
    })?;
    scenario("pgbench-extended", out, port(), upstream, |p| {
        pgbench(p, "extended")
    })?;
    scenario("pgbench-prepared", out, port(), upstream, |p| {
        pgbench(p, "prepared")
    })?;
    Ok(())
}
