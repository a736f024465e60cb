//! Where audit events go. Each sink implements [`Sink`] with its configuration beside it;
//! the daemon builds the configured ones ([`build`]) and runs them on one thread
//! ([`SinkThread`]), which hands every batch to every sink, in order.
//!
//! The local sealed log is the embedded default; ClickHouse (through an on-disk
//! spool) can run beside it.

pub mod clickhouse;
pub mod framed;
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
pub type Batch = Arc<Vec<Box<AuditEvent>>>;

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

/// A batch's spool records (`framed.rs`: frames, then the records written against them),
/// encoded once for the sinks that store records: a sink that wants them asks before the
/// batch is sent ([`Sink::want_records`]), the first sink that encodes the batch anyway
/// (the local log, whose segments hold the same payloads) fills them, and the sink that
/// asked takes them ([`Sink::send_with`]) instead of encoding every event a second time.
#[derive(Default)]
pub struct Handover(Handed);

/// Where a batch's records are: not asked for, asked for (a buffer to fill, and whether
/// they must begin afresh: every frame they refer to among them), or filled.
#[derive(Default)]
enum Handed {
    #[default]
    NotAsked,
    Wanted(spool::Records, bool),
    Filled(spool::Records, bool),
}

impl Handover {
    /// Asks for the batch's records, in `buffer` (cleared here); `fresh`: they must refer
    /// to no frame of an earlier batch.
    pub fn want(&mut self, mut buffer: spool::Records, fresh: bool) {
        buffer.clear();
        self.0 = Handed::Wanted(buffer, fresh);
    }

    /// The buffer to fill, and whether the records must begin afresh, if a sink asked and
    /// none filled it yet. Whoever fills it calls [`Handover::filled`] after.
    pub fn to_fill(&mut self) -> Option<(&mut spool::Records, bool)> {
        match &mut self.0 {
            Handed::Wanted(records, fresh) => Some((records, *fresh)),
            _ => None,
        }
    }

    /// The buffer holds the batch's records.
    pub fn filled(&mut self) {
        if let Handed::Wanted(records, fresh) = std::mem::take(&mut self.0) {
            self.0 = Handed::Filled(records, fresh);
        }
    }

    /// The buffer asked for, if no sink filled it (to encode the batch in).
    pub fn unfilled(&mut self) -> Option<spool::Records> {
        match std::mem::take(&mut self.0) {
            Handed::Wanted(records, _) => Some(records),
            other => {
                self.0 = other;
                None
            }
        }
    }

    /// The batch's records, if a sink filled them, and whether they begin afresh.
    pub fn take(&mut self) -> Option<(spool::Records, bool)> {
        match std::mem::take(&mut self.0) {
            Handed::Filled(records, fresh) => Some((records, fresh)),
            other => {
                self.0 = other;
                None
            }
        }
    }
}

/// A destination of audit events.
pub trait Sink: Send {
    /// Its name in logs and stats ("local_log", "clickhouse").
    fn name(&self) -> &'static str;
    /// Takes a batch, in order. An error is logged and counted by the caller; the sink
    /// keeps taking later batches.
    fn send(&mut self, batch: &Batch) -> Result<(), SinkError>;
    /// Asks, before a batch is sent to any sink, for its spool records
    /// ([`Handover::want`]) when the sink stores them.
    fn want_records(&mut self, _handover: &mut Handover) {}
    /// As `send`, filling or taking the batch's records in `handover` (see [`Handover`]).
    fn send_with(&mut self, batch: &Batch, _handover: &mut Handover) -> Result<(), SinkError> {
        self.send(batch)
    }
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
    pub health: HealthBoard,
    pub events: Arc<std::sync::atomic::AtomicU64>,
    /// Events every sink has written out (a killed daemon loses none of these).
    pub flushed: Arc<std::sync::atomic::AtomicU64>,
}

/// How long the thread waits for a batch before it refreshes the sinks' health.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Delivered batches waiting to be reused, at most.
const RECYCLE_QUEUE: usize = 2;

/// Events queued for the sinks, at most, in bytes (about: see [`queued_size`]). Beyond it
/// the daemon waits for the sinks, and the kernel ring holds what is captured meanwhile
/// (what it cannot hold is counted and recorded as a gap): a stalled disk or a run of huge
/// statements does not grow the daemon's memory without bound.
pub const MAX_QUEUED_BYTES: u64 = 64 << 20;

/// What an event holds, about, in bytes: the event and its statement, parameters and
/// error message (text shared with other events is counted in each: an upper bound).
pub fn queued_size(ev: &AuditEvent) -> u64 {
    (std::mem::size_of::<AuditEvent>()
        + ev.statement.as_str().len()
        + ev.params.encoded_len()
        + ev.error_message.len()) as u64
}

/// Bytes handed to the sink thread and not delivered yet, shared by both ends.
#[derive(Default)]
struct Queued {
    bytes: Mutex<u64>,
    drained: std::sync::Condvar,
    /// The sink thread has ended: nobody will drain the queue.
    closed: std::sync::atomic::AtomicBool,
}

impl Queued {
    fn add(&self, n: i128) {
        let mut b = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        *b = (i128::from(*b) + n).max(0) as u64;
        if n < 0 {
            self.drained.notify_all();
        }
    }
}

/// Marks the queue closed when the sink thread ends (by returning or panicking), so that
/// a sender waiting for room stops waiting.
struct CloseOnDrop(Arc<Queued>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        *self.0.bytes.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        self.0.drained.notify_all();
    }
}

/// The daemon's end of the sink thread's queue, bounded in batches and in bytes
/// ([`MAX_QUEUED_BYTES`]).
pub struct SinkSender {
    tx: mpsc::SyncSender<(Vec<Box<AuditEvent>>, u64)>,
    /// Batches delivered, sent back to the thread that made them (at most a few): it
    /// drops their events, keeps their boxes, and fills them again.
    /// Dropped by the sink thread, the events' shared text would have its reference
    /// counts decremented there while this thread increments them for new events: each
    /// count's cache line would move between the two cores for every event.
    recycled: mpsc::Receiver<Vec<Box<AuditEvent>>>,
    queued: Arc<Queued>,
    max_bytes: u64,
    waits: u64,
}

impl SinkSender {
    /// Hands `batch` on, first waiting while more than the byte bound is queued (a batch
    /// alone larger than the bound goes when the queue is empty). Gives the batch back
    /// when the sink thread has ended.
    pub fn send(&mut self, batch: Vec<Box<AuditEvent>>) -> Result<(), Vec<Box<AuditEvent>>> {
        self.send_waiting(batch, || {})
    }

    /// As `send`, calling `waiting` at least every 100 ms while it waits (the daemon
    /// keeps its capture's lease: a capture whose lease runs out goes quiet).
    pub fn send_waiting(
        &mut self,
        batch: Vec<Box<AuditEvent>>,
        mut waiting: impl FnMut(),
    ) -> Result<(), Vec<Box<AuditEvent>>> {
        let size: u64 = batch.iter().map(|ev| queued_size(ev)).sum();
        {
            let mut queued = self.queued.bytes.lock().unwrap_or_else(|e| e.into_inner());
            let mut waited = false;
            while *queued > 0
                && queued.saturating_add(size) > self.max_bytes
                && !self.queued.closed.load(std::sync::atomic::Ordering::SeqCst)
            {
                waited = true;
                queued = self
                    .queued
                    .drained
                    .wait_timeout(queued, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                drop(queued);
                waiting();
                queued = self.queued.bytes.lock().unwrap_or_else(|e| e.into_inner());
            }
            self.waits += u64::from(waited);
            if self.queued.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(batch);
            }
            *queued += size;
        }
        // The queue's bound in batches (small batches, of a quiet time): the same wait.
        let mut item = (batch, size);
        let mut full_since: Option<std::time::Instant> = None;
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return Ok(()),
                Err(mpsc::TrySendError::Full(back)) => {
                    item = back;
                    let since = *full_since.get_or_insert_with(|| {
                        self.waits += 1;
                        std::time::Instant::now()
                    });
                    std::thread::sleep(Duration::from_millis(5));
                    if since.elapsed() >= Duration::from_millis(100) {
                        waiting();
                        full_since = Some(std::time::Instant::now());
                    }
                }
                Err(mpsc::TrySendError::Disconnected(back)) => {
                    self.queued.add(-i128::from(size));
                    return Err(back.0);
                }
            }
        }
    }

    /// A delivered batch to fill again, if one came back.
    pub fn reuse(&self) -> Option<Vec<Box<AuditEvent>>> {
        self.recycled.try_recv().ok()
    }

    /// Bytes queued for the sinks now (about).
    pub fn queued_bytes(&self) -> u64 {
        *self.queued.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many times a batch waited for the sinks to catch up.
    pub fn waits(&self) -> u64 {
        self.waits
    }
}

impl SinkThread {
    /// Starts the thread; batches go in through the returned sender (bounded by `queue`
    /// batches and by `max_bytes`: when the sinks fall behind, the sender waits).
    /// Dropping the sender stops the thread once every batch is delivered; `grace` is
    /// then given to each sink's `finish`.
    pub fn spawn(
        mut sinks: Vec<Box<dyn Sink>>,
        queue: usize,
        max_bytes: u64,
        grace: Duration,
    ) -> (SinkSender, SinkThread) {
        use std::sync::atomic::Ordering;
        let (tx, rx) = mpsc::sync_channel::<(Vec<Box<AuditEvent>>, u64)>(queue);
        let (back, recycled) = mpsc::sync_channel::<Vec<Box<AuditEvent>>>(RECYCLE_QUEUE);
        let queued = Arc::new(Queued::default());
        let sender = SinkSender {
            tx,
            recycled,
            queued: queued.clone(),
            max_bytes,
            waits: 0,
        };
        let health: HealthBoard = Arc::default();
        let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flushed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (board, counter, flushed_counter) = (health.clone(), events.clone(), flushed.clone());
        let handle = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                let _close = CloseOnDrop(queued.clone());
                let mut report = SinkReport::default();
                let publish = |sinks: &[Box<dyn Sink>]| {
                    if let Ok(mut b) = board.lock() {
                        for s in sinks {
                            b.insert(s.name(), s.health());
                        }
                    }
                };
                let deliver = |sinks: &mut [Box<dyn Sink>],
                               (batch, size): (Vec<Box<AuditEvent>>, u64),
                               report: &mut SinkReport| {
                    let n = batch.len() as u64;
                    let batch = Arc::new(batch);
                    let mut handover = Handover::default();
                    for s in sinks.iter_mut() {
                        s.want_records(&mut handover);
                    }
                    for s in sinks.iter_mut() {
                        if let Err(e) = s.send_with(&batch, &mut handover) {
                            report.errors += 1;
                            tracing::error!("{}: {e}", s.name());
                        }
                    }
                    report.events += n;
                    counter.store(report.events, Ordering::Relaxed);
                    queued.add(-i128::from(size));
                    // Back to its maker unless a sink kept it (or the queue is full).
                    // Its events are dropped there too, their boxes kept (a large batch's
                    // list is dropped there, not its boxes).
                    if let Ok(used) = Arc::try_unwrap(batch) {
                        let _ = back.try_send(used);
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
            sender,
            SinkThread {
                handle,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::EventKind;

    /// A sink that takes a batch only when the test lets it (one `()` per batch), and
    /// panics on a batch whose first statement is "panic".
    struct Gate {
        open: mpsc::Receiver<()>,
        took: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Sink for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }
        fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
            if batch
                .first()
                .is_some_and(|e| e.statement.as_str() == "panic")
            {
                panic!("the sink failed");
            }
            self.open.recv()?;
            self.took
                .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
        fn health(&self) -> Health {
            Health::default()
        }
        fn finish(self: Box<Self>, _: Duration) -> Result<Health, SinkError> {
            Ok(Health::default())
        }
    }

    /// A gate sink, the sender that opens it once per batch, and the events it took.
    fn gate() -> (mpsc::Sender<()>, Gate, Arc<std::sync::atomic::AtomicU64>) {
        let (open, rx) = mpsc::channel();
        let took = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sink = Gate {
            open: rx,
            took: took.clone(),
        };
        (open, sink, took)
    }

    fn batch(n: usize, statement: &'static str) -> Vec<Box<AuditEvent>> {
        (0..n)
            .map(|_| {
                let mut ev = AuditEvent::of_kind(EventKind::Statement);
                ev.statement = crate::text::Text::Static(statement);
                Box::new(ev)
            })
            .collect()
    }

    /// Sends `events` from another thread, which must still be waiting `ms` later; its
    /// sender and how often it was called while waiting, when it is done.
    fn send_waiting(
        mut tx: SinkSender,
        events: Vec<Box<AuditEvent>>,
        ms: u64,
    ) -> std::thread::JoinHandle<(SinkSender, u32)> {
        let sent = std::thread::spawn(move || {
            let mut calls = 0;
            tx.send_waiting(events, || calls += 1).unwrap();
            (tx, calls)
        });
        std::thread::sleep(Duration::from_millis(ms));
        assert!(!sent.is_finished(), "the batch waited for room");
        sent
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let (open, sink, took) = gate();
        let one = queued_size(&batch(1, "select 1")[0]);
        // Room for 10 events; a batch of 8 is larger than what is left after one of 8.
        let (mut tx, thread) =
            SinkThread::spawn(vec![Box::new(sink)], 1024, 10 * one, Duration::ZERO);
        tx.send(batch(8, "select 1")).unwrap();
        assert_eq!(tx.queued_bytes(), 8 * one);
        let sent = send_waiting(tx, batch(8, "select 1"), 300);
        open.send(()).unwrap();
        let (mut tx, calls) = sent.join().unwrap();
        assert_eq!(tx.waits(), 1);
        assert!(calls >= 1, "called while it waited");
        open.send(()).unwrap();
        // A batch larger than the bound goes alone once the queue is empty.
        while tx.queued_bytes() > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        tx.send(batch(20, "select 1")).unwrap();
        open.send(()).unwrap();
        drop(tx);
        assert_eq!(thread.join().events, 36);
        assert_eq!(took.load(std::sync::atomic::Ordering::SeqCst), 36);
    }

    #[test]
    fn the_queue_is_bounded_in_batches_too() {
        let (open, sink, _) = gate();
        // One batch in the sink, one queued: the third waits.
        let (mut tx, thread) =
            SinkThread::spawn(vec![Box::new(sink)], 1, MAX_QUEUED_BYTES, Duration::ZERO);
        tx.send(batch(1, "select 1")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        tx.send(batch(1, "select 1")).unwrap();
        let sent = send_waiting(tx, batch(1, "select 1"), 350);
        for _ in 0..3 {
            open.send(()).unwrap();
        }
        let (tx, calls) = sent.join().unwrap();
        assert!(tx.waits() >= 1);
        assert!(calls >= 1, "called while it waited");
        drop(tx);
        assert_eq!(thread.join().events, 3);
    }

    #[test]
    fn a_sender_waiting_for_room_stops_when_the_sink_thread_ends() {
        let (_open, sink, _) = gate();
        let one = queued_size(&batch(1, "panic")[0]);
        let (mut tx, thread) =
            SinkThread::spawn(vec![Box::new(sink)], 1024, 10 * one, Duration::ZERO);
        tx.send(batch(8, "panic")).unwrap();
        // The thread died on the first batch: the second does not wait for ever, and
        // comes back.
        let back = tx.send(batch(8, "select 1"));
        assert_eq!(back.map_err(|b| b.len()), Err(8));
        drop(thread);
    }
}
