//! Throughput of the userspace pipeline on protocol streams recorded from a real Postgres
//! 15 (tests/fixtures): the decoder and session machine (framing, message decoding,
//! request/response matching, SQL normalisation), and the local log sink.
//!
//! The steady state: an established session answering one more transaction, again and
//! again, as the daemon's decoding thread spends most of its time (the replays from the
//! startup packet on include what happens once per session).
//!
//! `cargo xtask bench` runs these and turns the times into messages/s, MB/s, events/s and
//! ns per statement in docs/benchmarks.md, using the per-iteration sizes (and allocations
//! per statement, counted here) this program writes to target/criterion/pipeline-sizes.json.

use std::{collections::BTreeMap, hint::black_box, path::PathBuf};

use auditor::{
    audit::event::{event_id_at, new_event_id, AuditEvent, EventKind, Timestamp},
    audit::recorder::RecordingPolicy,
    capture::session::Session,
    pg::{Direction, TokenizerLimits},
    sink::{local::SealedLog, Sink},
    sql::Analyzer,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "../tests/support/fixture_io.rs"]
mod fixture_io;

#[path = "../tests/support/counting.rs"]
mod counting;

/// One protocol message: tag, length, body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// An established session and the chunks of the transaction it answers in a loop.
struct Steady {
    session: Session,
    analyzer: Analyzer,
    /// Each turn's chunks; turn `i` replays `turns[i % turns.len()]`.
    turns: Vec<Vec<(Direction, Vec<u8>)>>,
    statements_per_turn: u64,
    out: Vec<auditor::audit::recorder::Draft>,
    /// Events of the turn, their drafts' sources dropped as the tracker drops them.
    events: Vec<Box<auditor::audit::event::AuditEvent>>,
    ts: i128,
    turn: usize,
}

impl Steady {
    /// The session of `setup` (replayed once), then `turns`.
    fn new(setup: &[(Direction, Vec<u8>)], turns: Vec<Vec<(Direction, Vec<u8>)>>) -> Self {
        let mut s = Steady {
            session: Session::new(
                RecordingPolicy::default(),
                TokenizerLimits::default(),
                false,
            ),
            analyzer: Analyzer::default(),
            turns,
            statements_per_turn: 0,
            out: Vec::new(),
            events: Vec::new(),
            ts: 0,
            turn: 0,
        };
        for (dir, bytes) in setup {
            s.ts += 1000;
            s.session
                .push(*dir, bytes, true, s.ts, &mut s.analyzer, &mut s.out);
        }
        s.out.clear();
        s.turn();
        s.statements_per_turn = s.events.len() as u64;
        assert!(s.statements_per_turn > 0, "a turn records statements");
        s.events.clear();
        s
    }

    /// One transaction, pushed a chunk at a time; after each chunk, the events it ended
    /// are taken from their drafts (the tracker's part: the rest of a draft is dropped).
    fn turn(&mut self) {
        let chunks = &self.turns[self.turn % self.turns.len()];
        self.turn += 1;
        for (dir, bytes) in chunks {
            self.ts += 1000;
            self.session.push(
                *dir,
                bytes,
                true,
                self.ts,
                &mut self.analyzer,
                &mut self.out,
            );
            self.events.extend(self.out.drain(..).map(|d| d.event));
        }
    }

    /// The turn's events dropped, their boxes kept, as when the sink thread hands a batch
    /// back to the decoding thread.
    fn recycle(&mut self) {
        self.events
            .drain(..)
            .for_each(auditor::audit::recorder::recycle);
    }

    /// Allocations per statement, once warm.
    fn allocations_per_statement(&mut self) -> f64 {
        const TURNS: u64 = 2000;
        for _ in 0..TURNS {
            self.turn();
            self.recycle();
        }
        let allocations = counting::counted(|| {
            for _ in 0..TURNS {
                self.turn();
                self.recycle();
            }
        });
        allocations as f64 / (TURNS * self.statements_per_turn) as f64
    }
}

/// The last transaction of a pgbench transcript (its last `chunks` chunks before
/// Terminate), after the rest as the setup.
fn pgbench_steady(name: &str, chunks: usize) -> Steady {
    let mut all = fixture_io::load(name);
    all.pop(); // Terminate
    let turn = all.split_off(all.len() - chunks);
    Steady::new(&all, vec![turn])
}

/// `SELECT abalance FROM pgbench_accounts WHERE aid = N;` in the simple protocol, N one of
/// 1,000 values, after psql's startup.
fn simple_select_steady() -> Steady {
    let setup = fixture_io::load("psql-simple-0");
    let mut row_description = 1u16.to_be_bytes().to_vec();
    row_description.extend_from_slice(b"abalance\0");
    row_description.extend_from_slice(&[
        0, 0, 0x40, 0x06, 0, 3, 0, 0, 0, 0x17, 0, 4, 0xff, 0xff, 0xff, 0xff, 0, 0,
    ]);
    let mut response = message(b'T', &row_description);
    response.extend(message(b'D', &[0, 1, 0, 0, 0, 4, b'2', b'9', b'7', b'0']));
    response.extend(message(b'C', b"SELECT 1\0"));
    response.extend(message(b'Z', b"I"));
    let turns = (0..1000u64)
        .map(|i| {
            let sql = format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};\0",
                1 + i * 7919 % 100_000
            );
            vec![
                (Direction::ToServer, message(b'Q', sql.as_bytes())),
                (Direction::ToClient, response.clone()),
            ]
        })
        .collect();
    Steady::new(&setup[..2], turns)
}

/// Replays a transcript through a new session; returns (messages, events).
fn replay(
    chunks: &[(Direction, Vec<u8>)],
    analyzer: &mut Analyzer,
    out: &mut Vec<auditor::audit::recorder::Draft>,
) -> (u64, u64) {
    let mut session = Session::new(
        RecordingPolicy::default(),
        TokenizerLimits::default(),
        false,
    );
    out.clear();
    for (i, (dir, bytes)) in chunks.iter().enumerate() {
        session.push(*dir, bytes, true, i as i128, analyzer, out);
    }
    (session.counters().messages, out.len() as u64)
}

fn sizes_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/criterion/pipeline-sizes.json")
}

fn benches(c: &mut Criterion) {
    let mut sizes: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut group = c.benchmark_group("decode");
    for name in [
        "pgbench-prepared-1",
        "pgbench-extended-1",
        "psql-simple-0",
        "psql-copy-0",
    ] {
        let chunks = fixture_io::load(name);
        let bytes: u64 = chunks.iter().map(|(_, b)| b.len() as u64).sum();
        let mut analyzer = Analyzer::default();
        let mut out = Vec::new();
        let (messages, events) = replay(&chunks, &mut analyzer, &mut out);
        sizes.insert(
            format!("decode/{name}"),
            serde_json::json!({"bytes": bytes, "messages": messages, "events": events}),
        );
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name, |b| {
            b.iter(|| black_box(replay(black_box(&chunks), &mut analyzer, &mut out)))
        });
    }
    group.finish();

    // The steady state: ns and allocations per statement in an established session.
    let mut group = c.benchmark_group("steady");
    for (name, mut steady) in [
        // pgbench's TPC-B-like transaction: 7 statements, 14 chunks.
        (
            "pgbench-prepared-1",
            pgbench_steady("pgbench-prepared-1", 14),
        ),
        (
            "pgbench-extended-1",
            pgbench_steady("pgbench-extended-1", 14),
        ),
        ("simple-select", simple_select_steady()),
    ] {
        let allocations = steady.allocations_per_statement();
        sizes.insert(
            format!("steady/{name}"),
            serde_json::json!({
                "statements": steady.statements_per_turn,
                "allocations_per_statement": allocations,
            }),
        );
        group.throughput(Throughput::Elements(steady.statements_per_turn));
        group.bench_function(name, |b| {
            b.iter(|| {
                steady.turn();
                steady.recycle();
            })
        });
    }
    group.finish();

    // The local log: serialise, hash-chain and write events like the daemon's sink thread.
    let chunks = fixture_io::load("pgbench-prepared-1");
    let mut analyzer = Analyzer::default();
    let mut drafts = Vec::new();
    replay(&chunks, &mut analyzer, &mut drafts);
    // As the daemon hands them over: one pgbench connection's statements (its session's
    // start first), each with its own id, time and place in the session.
    let session = AuditEvent {
        session_id: new_event_id().as_str().into(),
        host: "bench-host".into(),
        comm: "pgbench".into(),
        exe: "/usr/lib/postgresql/15/bin/pgbench".into(),
        cgroup_path: "/system.slice/bench.service".into(),
        db_user: "postgres".into(),
        database: "postgres".into(),
        ..AuditEvent::of_kind(EventKind::SessionStart)
    };
    let statements = |n: usize| -> Vec<AuditEvent> {
        let start = Timestamp::now().unix_micros() as i128 * 1000;
        drafts
            .iter()
            .cycle()
            .take(n)
            .enumerate()
            .map(|(i, d)| {
                let ts = start + 10_000 * i as i128;
                AuditEvent {
                    event_id: event_id_at(ts),
                    ts: Timestamp::from_unix_ns(ts),
                    seq: 1 + i as u64,
                    session_id: session.session_id.clone(),
                    host: session.host.clone(),
                    comm: session.comm.clone(),
                    exe: session.exe.clone(),
                    cgroup_path: session.cgroup_path.clone(),
                    db_user: session.db_user.clone(),
                    database: session.database.clone(),
                    ..(*d.event).clone()
                }
            })
            .collect()
    };
    const BATCH: usize = 1000;
    let batch = statements(BATCH);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SealedLog::open(
        &dir.path().join("log"),
        &dir.path().join("seal.key"),
        1 << 30,
    )
    .expect("local log");
    log.append(&session).expect("append");
    // What one batch adds to the log on disk (records, frames, seals), per event.
    let log_bytes = || -> u64 {
        std::fs::read_dir(dir.path().join("log"))
            .expect("log dir")
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    };
    let at = log_bytes();
    for ev in &batch {
        log.append(ev).expect("append");
    }
    log.flush().expect("flush");
    let per_event = (log_bytes() - at) as f64 / BATCH as f64;
    sizes.insert(
        "sink/local-log".into(),
        serde_json::json!({"events": BATCH, "bytes_per_event": per_event}),
    );
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("local-log", |b| {
        b.iter(|| {
            for ev in &batch {
                log.append(ev).expect("append");
            }
            log.flush().expect("flush");
        })
    });
    group.finish();

    // ClickHouse: events through the spool into a real server, until all are acknowledged
    // (`cargo xtask bench` starts one and sets AUDITOR_BENCH_CLICKHOUSE_URL).
    if let Ok(url) = std::env::var("AUDITOR_BENCH_CLICKHOUSE_URL") {
        const PER_ITER: usize = 50_000;
        let mut events = vec![session.clone()];
        events.extend(statements(PER_ITER - 1));
        let spool_dir = tempfile::tempdir().expect("tempdir");
        let cfg = auditor::config::ClickHouseConfig {
            enabled: true,
            url,
            database: "auditor_bench".into(),
            ..Default::default()
        };
        let mut sink =
            auditor::sink::clickhouse::ClickHouseSink::start(&cfg, spool_dir.path(), None)
                .expect("clickhouse sink");
        sizes.insert(
            "sink/clickhouse".into(),
            serde_json::json!({"events": PER_ITER}),
        );
        let mut group = c.benchmark_group("sink");
        group.throughput(Throughput::Elements(PER_ITER as u64));
        group.sample_size(10);
        group.bench_function("clickhouse", |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let target = sink.shared.counters().inserted + PER_ITER as u64;
                    let start = std::time::Instant::now();
                    for chunk in events.chunks(1000) {
                        let mut batch: Vec<Box<AuditEvent>> =
                            chunk.iter().cloned().map(Box::new).collect();
                        for ev in batch.iter_mut() {
                            ev.event_id = new_event_id();
                        }
                        sink.send(&std::sync::Arc::new(batch)).expect("send");
                    }
                    while sink.shared.counters().inserted < target {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    total += start.elapsed();
                }
                total
            })
        });
        group.finish();
        Box::new(sink)
            .finish(std::time::Duration::from_secs(5))
            .expect("finish");
    }

    if let Some(parent) = sizes_path().parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(
        sizes_path(),
        serde_json::to_vec_pretty(&sizes).expect("json"),
    );
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
