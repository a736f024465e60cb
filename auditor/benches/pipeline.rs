//! Throughput of the userspace pipeline on protocol streams recorded from a real Postgres
//! 15 (tests/fixtures): the decoder and session machine (framing, message decoding,
//! request/response matching, SQL normalisation), and the local log sink.
//!
//! `cargo xtask bench` runs these and turns the times into messages/s, MB/s and events/s
//! in docs/benchmarks.md, using the per-iteration sizes this program writes to
//! target/criterion/pipeline-sizes.json.

use std::{collections::BTreeMap, hint::black_box, path::PathBuf};

use auditor::{
    audit::event::{new_event_id, AuditEvent},
    audit::recorder::RecordingPolicy,
    capture::session::Session,
    pg::{Direction, TokenizerLimits},
    sink::{local::SealedLog, Sink},
    sql::Analyzer,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "../tests/support/fixture_io.rs"]
mod fixture_io;

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

    // The local log: serialise, hash-chain and write events like the daemon's sink thread.
    let chunks = fixture_io::load("pgbench-prepared-1");
    let mut analyzer = Analyzer::default();
    let mut drafts = Vec::new();
    replay(&chunks, &mut analyzer, &mut drafts);
    let template: Vec<AuditEvent> = drafts
        .iter()
        .map(|d| {
            let mut ev = (*d.event).clone();
            ev.event_id = new_event_id();
            ev.session_id = new_event_id().as_str().into();
            ev.host = "bench-host".into();
            ev.comm = "pgbench".into();
            ev.exe = "/usr/lib/postgresql/15/bin/pgbench".into();
            ev.cgroup_path = "/system.slice/bench.service".into();
            ev.db_user = "postgres".into();
            ev.database = "postgres".into();
            ev
        })
        .collect();
    const BATCH: usize = 1000;
    let batch: Vec<AuditEvent> = template.iter().cycle().take(BATCH).cloned().collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SealedLog::open(
        &dir.path().join("log"),
        &dir.path().join("seal.key"),
        1 << 30,
    )
    .expect("local log");
    sizes.insert(
        "sink/local-log".into(),
        serde_json::json!({"events": BATCH}),
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
        let events: Vec<AuditEvent> = template.iter().cycle().take(PER_ITER).cloned().collect();
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
