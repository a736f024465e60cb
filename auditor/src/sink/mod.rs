//! Where audit events go. Each sink implements [`Sink`] with its configuration beside it;
//! the daemon builds the configured ones ([`build`]) and runs them on one thread
//! ([`SinkThread`]), which hands every batch to every sink, in order.
//!
//! The local sealed log is the embedded default; ClickHouse (through an on-disk
//! spool) can run beside it.

pub mod clickhouse;
pub mod local;
pub mod record;
pub mod spool;

use std::{
    collections::BTreeMap,
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{audit::event::AuditEvent, config::Config};

pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// A batch of events, shared by the sinks (none copies it).
pub type Batch = Arc<Vec<AuditEvent>>;

/// What a sink reports for `auditor stats` (and, later, health checks and metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Health {
    /// Delivering: false while its destination fails (events then wait, or are counted).
    pub healthy: bool,
    /// Events it took.
    pub events: u64,
    /// Events it could not store, or failed deliveries.
    pub errors: u64,
    /// The sink's own counters.
    pub detail: serde_json::Value,
}

/// A destination of audit events.
pub trait Sink: Send {
    /// Its name in logs and stats ("local_log", "clickhouse").
    fn name(&self) -> &'static str;
    /// Takes a batch, in order. An error is logged and counted by the caller; the sink
    /// keeps taking later batches.
    fn send(&mut self, batch: &Batch) -> Result<(), SinkError>;
    /// Makes what it took visible to readers (called when no batch is waiting).
    fn flush(&mut self) -> Result<(), SinkError>;
    /// Called about once a second, with or without events (time-driven work: the local
    /// log seals a block per epoch).
    fn tick(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    fn health(&self) -> Health;
    /// Flushes and stops; `grace` bounds the wait for a remote destination (what it does
    /// not take in that time stays queued on disk for the next start).
    /// Returns its health at the end.
    fn finish(self: Box<Self>, grace: Duration) -> Result<Health, SinkError>;
}

/// The sinks the configuration asks for, in delivery order (the local log first).
pub fn build(cfg: &Config) -> Result<Vec<Box<dyn Sink>>, SinkError> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    // With both, the local log's head goes to ClickHouse with its inserts.
    let head = (cfg.local_log.enabled && cfg.clickhouse.enabled).then(local::SharedHead::default);
    if cfg.local_log.enabled {
        sinks.push(Box::new(local::LocalLogSink::open(
            &cfg.log_dir(),
            &local::key_path(&cfg.state_dir),
            &cfg.local_log,
            &cfg.host_name(),
            head.clone(),
        )?));
    }
    if cfg.clickhouse.enabled {
        sinks.push(Box::new(clickhouse::ClickHouseSink::start(
            &cfg.clickhouse,
            &cfg.spool_dir(),
            head.map(|head| clickhouse::Anchor {
                head,
                host: cfg.host_name(),
            }),
        )?));
    }
    Ok(sinks)
}

/// What the sink thread did, when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct SinkReport {
    /// Events handed to the sinks.
    pub events: u64,
    /// Failed sends, flushes and finishes, over all sinks.
    pub errors: u64,
}

/// Each sink's latest health, by name.
pub type HealthBoard = Arc<Mutex<BTreeMap<&'static str, Health>>>;

/// The thread that feeds the sinks.
pub struct SinkThread {
    handle: std::thread::JoinHandle<SinkReport>,
    /// Batches delivered, sent back to the thread that made them (at most a few, and
    /// none grown past RECYCLE_CAPACITY): it drops their events and fills them again.
    /// Dropped here, the events' shared text would have its reference counts decremented
    /// on this thread while the other increments them for new events: each count's cache
    /// line would move between the two cores for every event.
    pub recycled: mpsc::Receiver<Vec<AuditEvent>>,
    pub health: HealthBoard,
    pub events: Arc<std::sync::atomic::AtomicU64>,
    /// Events every sink has written out (a killed daemon loses none of these).
    pub flushed: Arc<std::sync::atomic::AtomicU64>,
}

/// How long the thread waits for a batch before it refreshes the sinks' health.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Delivered batches waiting to be reused, at most; and the largest reused (in events).
const RECYCLE_QUEUE: usize = 2;
const RECYCLE_CAPACITY: usize = 4096;

impl SinkThread {
    /// Starts the thread; batches go in through the returned sender (bounded: when the
    /// sinks fall behind, the sender waits). Dropping the sender stops the thread once
    /// every batch is delivered; `grace` is then given to each sink's `finish`.
    pub fn spawn(
        mut sinks: Vec<Box<dyn Sink>>,
        queue: usize,
        grace: Duration,
    ) -> (mpsc::SyncSender<Vec<AuditEvent>>, SinkThread) {
        use std::sync::atomic::Ordering;
        let (tx, rx) = mpsc::sync_channel::<Vec<AuditEvent>>(queue);
        let (back, recycled) = mpsc::sync_channel::<Vec<AuditEvent>>(RECYCLE_QUEUE);
        let health: HealthBoard = Arc::default();
        let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flushed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (board, counter, flushed_counter) = (health.clone(), events.clone(), flushed.clone());
        let handle = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                let mut report = SinkReport::default();
                let publish = |sinks: &[Box<dyn Sink>]| {
                    if let Ok(mut b) = board.lock() {
                        for s in sinks {
                            b.insert(s.name(), s.health());
                        }
                    }
                };
                let deliver = |sinks: &mut [Box<dyn Sink>],
                               batch: Vec<AuditEvent>,
                               report: &mut SinkReport| {
                    let n = batch.len() as u64;
                    let batch = Arc::new(batch);
                    for s in sinks.iter_mut() {
                        if let Err(e) = s.send(&batch) {
                            report.errors += 1;
                            tracing::error!("{}: {e}", s.name());
                        }
                    }
                    report.events += n;
                    counter.store(report.events, Ordering::Relaxed);
                    // Back to its maker unless a sink kept it (or the queue is full).
                    if let Ok(used) = Arc::try_unwrap(batch) {
                        if used.capacity() <= RECYCLE_CAPACITY {
                            let _ = back.try_send(used);
                        }
                    }
                };
                publish(&sinks);
                let mut last_tick = std::time::Instant::now();
                loop {
                    match rx.recv_timeout(HEALTH_EVERY) {
                        Ok(batch) => {
                            deliver(&mut sinks, batch, &mut report);
                            // Drain what is queued, then make it visible (`auditor tail`
                            // sees it within a second).
                            while let Ok(more) = rx.try_recv() {
                                deliver(&mut sinks, more, &mut report);
                            }
                            let mut all = true;
                            for s in sinks.iter_mut() {
                                if let Err(e) = s.flush() {
                                    all = false;
                                    report.errors += 1;
                                    tracing::error!("{}: {e}", s.name());
                                }
                            }
                            if all {
                                flushed_counter.store(report.events, Ordering::Relaxed);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    if last_tick.elapsed() >= HEALTH_EVERY {
                        last_tick = std::time::Instant::now();
                        for s in sinks.iter_mut() {
                            if let Err(e) = s.tick() {
                                report.errors += 1;
                                tracing::error!("{}: {e}", s.name());
                            }
                        }
                    }
                    publish(&sinks);
                }
                for s in sinks {
                    let name = s.name();
                    match s.finish(grace) {
                        Ok(h) => {
                            if let Ok(mut b) = board.lock() {
                                b.insert(name, h);
                            }
                        }
                        Err(e) => {
                            report.errors += 1;
                            tracing::error!("{name}: {e}");
                        }
                    }
                }
                report
            })
            .expect("spawning the sink thread");
        (
            tx,
            SinkThread {
                handle,
                recycled,
                health,
                events,
                flushed,
            },
        )
    }

    /// Waits for the thread to deliver everything and finish the sinks.
    pub fn join(self) -> SinkReport {
        self.handle.join().unwrap_or(SinkReport {
            events: 0,
            errors: 1,
        })
    }
}
