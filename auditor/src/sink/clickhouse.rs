//! Audit events into ClickHouse, with nothing lost.
//!
//! Every event is first appended to an on-disk spool (checksummed segments, see
//! `spool.rs`) by the `ch-spool` thread; the `ch-send` thread reads the spool in order and
//! inserts through the `clickhouse` crate's `Inserter` (HTTP, RowBinary, row/byte/period
//! limits), moving the spool's cursor only after ClickHouse acknowledged an insert. So
//! events survive ClickHouse being slow or down, and the daemon restarting; an insert
//! whose outcome is unknown (a timeout) is sent again, and the table, a ReplacingMergeTree
//! keyed on the event id, plus views reading it with FINAL, keep such an event once.
//!
//! Schema creation and upgrades are migrations recorded in `schema_migrations`; column
//! types follow the server version (DateTime64, LowCardinality, Map and TTL where the
//! server has them; Debian's 18.16 gets DateTime plus microseconds and label arrays).

use std::{
    io::Write as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use clickhouse::{Client, Row};
use serde::Serialize;
use tokio::sync::Notify;

use crate::{
    config::{ClickHouseConfig, WhenSpoolFull},
    event::AuditEvent,
    sink::{
        record::{self, EventRef},
        spool::{Position, Spool, SpoolError},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("clickhouse: {0}")]
    Client(#[from] clickhouse::error::Error),
    #[error("clickhouse: {0}")]
    Config(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// What the server supports, from its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub major: u32,
    pub minor: u32,
    /// DateTime64(6) (20.1+).
    pub datetime64: bool,
    /// LowCardinality(String) without settings (19.9+).
    pub low_cardinality: bool,
    /// Map(String, String) without settings (21.8+).
    pub map: bool,
    /// Table TTL (19.6+).
    pub ttl: bool,
    /// bloom_filter skip indexes without settings (20.1+).
    pub skip_indexes: bool,
}

impl Features {
    pub fn of_version(version: &str) -> Features {
        let mut it = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let major = it.next().unwrap_or(0);
        let minor = it.next().unwrap_or(0);
        let at_least = |a: u32, b: u32| (major, minor) >= (a, b);
        Features {
            major,
            minor,
            datetime64: at_least(20, 1),
            low_cardinality: at_least(19, 9),
            map: at_least(21, 8),
            ttl: at_least(19, 6),
            skip_indexes: at_least(20, 1),
        }
    }
}

/// One migration: a version number, a name, and its statements for this server.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: Vec<String>,
}

/// Every migration, in order, as SQL for a server with `f`.
pub fn migrations(db: &str, f: Features, retention_days: u32) -> Vec<Migration> {
    let lc = |t: &str| {
        if f.low_cardinality {
            format!("LowCardinality({t})")
        } else {
            t.to_string()
        }
    };
    let ts = if f.datetime64 {
        "ts DateTime64(6, 'UTC')".to_string()
    } else {
        "ts DateTime('UTC'),\n    ts_us UInt32".to_string()
    };
    let labels = if f.map {
        "labels Map(String, String)".to_string()
    } else {
        "label_keys Array(String),\n    label_values Array(String)".to_string()
    };
    let ttl = if f.ttl && retention_days > 0 {
        format!("\nTTL toDateTime(ts) + INTERVAL {retention_days} DAY")
    } else {
        String::new()
    };
    let indexes = if f.skip_indexes {
        ",\n    INDEX session_idx session_id TYPE bloom_filter GRANULARITY 4,\n    \
         INDEX fingerprint_idx fingerprint TYPE bloom_filter GRANULARITY 4,\n    \
         INDEX user_idx db_user TYPE set(1000) GRANULARITY 4"
            .to_string()
    } else {
        String::new()
    };
    let events = format!(
        "CREATE TABLE IF NOT EXISTS {db}.events (
    event_id String,
    kind {kind},
    {ts},
    duration_us UInt64,
    host {host},
    session_id String,
    seq UInt64,
    statement String,
    command {command},
    tables Array(String),
    fingerprint String,
    protocol {protocol},
    params Array(String),
    rows Nullable(UInt64),
    error_code {error_code},
    error_message String,
    db_user {db_user},
    database {database},
    application_name String,
    client_addr String,
    client_port UInt16,
    server_addr String,
    server_port UInt16,
    tls UInt8,
    pid UInt32,
    comm {comm},
    exe String,
    uid UInt32,
    cgroup_id UInt64,
    cgroup_path String,
    container_id String,
    pod_uid String,
    pod_name String,
    namespace {namespace},
    systemd_unit String,
    workload String,
    {labels},
    capture {capture},
    flags Array(String),
    server_pid UInt32,
    prepared_name String,
    gap_bytes UInt64,
    tx_status String{indexes}
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(ts)
ORDER BY (workload, db_user, ts, event_id){ttl}",
        kind = lc("String"),
        host = lc("String"),
        command = lc("String"),
        protocol = lc("String"),
        error_code = lc("String"),
        db_user = lc("String"),
        database = lc("String"),
        comm = lc("String"),
        namespace = lc("String"),
        capture = lc("String"),
    );
    // Views read the table with FINAL: an event sent twice (a retried insert) shows once.
    let views = vec![
        format!("DROP TABLE IF EXISTS {db}.sessions"),
        format!(
            "CREATE VIEW {db}.sessions AS SELECT session_id, min(ts) AS started, max(ts) AS last_seen, \
             any(host) AS host, any(db_user) AS db_user, any(database) AS database, \
             any(application_name) AS application_name, any(workload) AS workload, \
             any(pid) AS pid, any(comm) AS comm, any(cgroup_path) AS cgroup_path, \
             any(client_addr) AS client_addr, any(server_addr) AS server_addr, any(server_port) AS server_port, \
             max(tls) AS tls, countIf(kind = 'statement') AS statements, \
             countIf(kind = 'statement' AND error_code != '') AS errors, \
             countIf(kind = 'gap') AS gaps, countIf(kind = 'session_end') AS ended \
             FROM {db}.events FINAL GROUP BY session_id"
        ),
        format!("DROP TABLE IF EXISTS {db}.statements"),
        format!(
            "CREATE VIEW {db}.statements AS SELECT * FROM {db}.events FINAL WHERE kind = 'statement'"
        ),
        format!("DROP TABLE IF EXISTS {db}.errors"),
        format!(
            "CREATE VIEW {db}.errors AS SELECT * FROM {db}.events FINAL \
             WHERE kind = 'statement' AND error_code != ''"
        ),
        format!("DROP TABLE IF EXISTS {db}.ddl"),
        format!(
            "CREATE VIEW {db}.ddl AS SELECT * FROM {db}.events FINAL WHERE kind = 'statement' \
             AND (startsWith(command, 'CREATE') OR startsWith(command, 'ALTER') \
             OR startsWith(command, 'DROP') OR command IN ('TRUNCATE', 'GRANT', 'REVOKE', 'COMMENT'))"
        ),
        format!("DROP TABLE IF EXISTS {db}.top_fingerprints"),
        format!(
            "CREATE VIEW {db}.top_fingerprints AS SELECT fingerprint, any(statement) AS example, \
             count() AS executions, countIf(error_code != '') AS errors, \
             sum(duration_us) AS total_us, uniqExact(workload) AS workloads \
             FROM {db}.events FINAL WHERE kind = 'statement' GROUP BY fingerprint"
        ),
    ];
    vec![
        Migration {
            version: 1,
            name: "events table",
            statements: vec![events],
        },
        Migration {
            version: 2,
            name: "views: sessions, statements, errors, ddl, top_fingerprints",
            statements: views,
        },
    ]
}

/// A row for servers with DateTime64, LowCardinality and Map.
#[derive(Row, Serialize)]
struct ModernRow<'a> {
    event_id: &'a str,
    kind: &'a str,
    ts: i64,
    duration_us: u64,
    host: &'a str,
    session_id: &'a str,
    seq: u64,
    statement: &'a str,
    command: &'a str,
    tables: &'a [&'a str],
    fingerprint: &'a str,
    protocol: &'a str,
    params: &'a [&'a str],
    rows: Option<u64>,
    error_code: &'a str,
    error_message: &'a str,
    db_user: &'a str,
    database: &'a str,
    application_name: &'a str,
    client_addr: &'a str,
    client_port: u16,
    server_addr: &'a str,
    server_port: u16,
    tls: u8,
    pid: u32,
    comm: &'a str,
    exe: &'a str,
    uid: u32,
    cgroup_id: u64,
    cgroup_path: &'a str,
    container_id: &'a str,
    pod_uid: &'a str,
    pod_name: &'a str,
    namespace: &'a str,
    systemd_unit: &'a str,
    workload: &'a str,
    labels: &'a [(&'a str, &'a str)],
    capture: &'a str,
    flags: &'a [&'a str],
    server_pid: u32,
    prepared_name: &'a str,
    gap_bytes: u64,
    tx_status: &'a str,
}

/// A row for older servers (Debian's 18.16): DateTime plus microseconds, label arrays.
#[derive(Row, Serialize)]
struct CompatRow<'a> {
    event_id: &'a str,
    kind: &'a str,
    ts: u32,
    ts_us: u32,
    duration_us: u64,
    host: &'a str,
    session_id: &'a str,
    seq: u64,
    statement: &'a str,
    command: &'a str,
    tables: &'a [&'a str],
    fingerprint: &'a str,
    protocol: &'a str,
    params: &'a [&'a str],
    rows: Option<u64>,
    error_code: &'a str,
    error_message: &'a str,
    db_user: &'a str,
    database: &'a str,
    application_name: &'a str,
    client_addr: &'a str,
    client_port: u16,
    server_addr: &'a str,
    server_port: u16,
    tls: u8,
    pid: u32,
    comm: &'a str,
    exe: &'a str,
    uid: u32,
    cgroup_id: u64,
    cgroup_path: &'a str,
    container_id: &'a str,
    pod_uid: &'a str,
    pod_name: &'a str,
    namespace: &'a str,
    systemd_unit: &'a str,
    workload: &'a str,
    label_keys: &'a [&'a str],
    label_values: &'a [&'a str],
    capture: &'a str,
    flags: &'a [&'a str],
    server_pid: u32,
    prepared_name: &'a str,
    gap_bytes: u64,
    tx_status: &'a str,
}

macro_rules! row_of {
    ($ty:ident, $ev:expr, { $($extra:tt)* }) => {
        $ty {
            event_id: $ev.event_id,
            kind: $ev.kind,
            duration_us: $ev.duration_us,
            host: $ev.host,
            session_id: $ev.session_id,
            seq: $ev.seq,
            statement: $ev.statement,
            command: $ev.command,
            tables: &$ev.tables,
            fingerprint: $ev.fingerprint,
            protocol: $ev.protocol,
            params: &$ev.params,
            rows: $ev.rows,
            error_code: $ev.error_code,
            error_message: $ev.error_message,
            db_user: $ev.db_user,
            database: $ev.database,
            application_name: $ev.application_name,
            client_addr: $ev.client_addr,
            client_port: $ev.client_port,
            server_addr: $ev.server_addr,
            server_port: $ev.server_port,
            tls: $ev.tls as u8,
            pid: $ev.pid,
            comm: $ev.comm,
            exe: $ev.exe,
            uid: $ev.uid,
            cgroup_id: $ev.cgroup_id,
            cgroup_path: $ev.cgroup_path,
            container_id: $ev.container_id,
            pod_uid: $ev.pod_uid,
            pod_name: $ev.pod_name,
            namespace: $ev.namespace,
            systemd_unit: $ev.systemd_unit,
            workload: $ev.workload,
            capture: $ev.capture,
            flags: &$ev.flags,
            server_pid: $ev.server_pid,
            prepared_name: $ev.prepared_name,
            gap_bytes: $ev.gap_bytes,
            tx_status: $ev.tx_status,
            $($extra)*
        }
    };
}

/// Inserts into one server, with the row layout its version calls for.
enum RowInserter {
    Modern(clickhouse::inserter::Inserter<ModernRow<'static>>),
    Compat(clickhouse::inserter::Inserter<CompatRow<'static>>),
}

impl RowInserter {
    async fn write(&mut self, ev: &EventRef<'_>) -> Result<(), clickhouse::error::Error> {
        let micros = ev.ts_us;
        match self {
            RowInserter::Modern(i) => {
                let row = row_of!(ModernRow, ev, {
                    ts: micros,
                    labels: &ev.labels,
                });
                i.write(&row).await
            }
            RowInserter::Compat(i) => {
                let keys: Vec<&str> = ev.labels.iter().map(|(k, _)| *k).collect();
                let values: Vec<&str> = ev.labels.iter().map(|(_, v)| *v).collect();
                let row = row_of!(CompatRow, ev, {
                    ts: micros.div_euclid(1_000_000) as u32,
                    ts_us: micros.rem_euclid(1_000_000) as u32,
                    label_keys: &keys,
                    label_values: &values,
                });
                i.write(&row).await
            }
        }
    }

    /// Ends an insert if a limit is reached; Some(rows) when one was sent.
    async fn commit(&mut self) -> Result<u64, clickhouse::error::Error> {
        let q = match self {
            RowInserter::Modern(i) => i.commit().await?,
            RowInserter::Compat(i) => i.commit().await?,
        };
        Ok(q.rows)
    }

    async fn force_commit(&mut self) -> Result<u64, clickhouse::error::Error> {
        let q = match self {
            RowInserter::Modern(i) => i.force_commit().await?,
            RowInserter::Compat(i) => i.force_commit().await?,
        };
        Ok(q.rows)
    }

    fn pending_rows(&self) -> u64 {
        match self {
            RowInserter::Modern(i) => i.pending().rows,
            RowInserter::Compat(i) => i.pending().rows,
        }
    }
}

/// Counters `auditor stats` shows for the sink.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ClickHouseCounters {
    pub spooled: u64,
    pub inserted: u64,
    pub insert_errors: u64,
    pub dropped_spool_full: u64,
    /// Events the server refused repeatedly, kept in spool/rejected/.
    pub rejected: u64,
    pub spool_bytes: u64,
    pub corrupt_spool_records: u64,
    pub connected: bool,
}

/// Shared between the sink threads and the daemon's stats.
#[derive(Default)]
pub struct Shared {
    spooled: AtomicU64,
    inserted: AtomicU64,
    insert_errors: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    spool_bytes: AtomicU64,
    corrupt: AtomicU64,
    connected: AtomicU64,
}

impl Shared {
    pub fn counters(&self) -> ClickHouseCounters {
        ClickHouseCounters {
            spooled: self.spooled.load(Ordering::Relaxed),
            inserted: self.inserted.load(Ordering::Relaxed),
            insert_errors: self.insert_errors.load(Ordering::Relaxed),
            dropped_spool_full: self.dropped.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            spool_bytes: self.spool_bytes.load(Ordering::Relaxed),
            corrupt_spool_records: self.corrupt.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed) != 0,
        }
    }
}

pub fn client(cfg: &ClickHouseConfig) -> Result<Client, ClickHouseError> {
    let password = cfg.resolve_password().map_err(ClickHouseError::Config)?;
    let mut c = Client::default()
        .with_url(&cfg.url)
        .with_user(&cfg.user)
        .with_database(&cfg.database)
        .with_validation(false)
        .with_compression(clickhouse::Compression::None);
    if !password.is_empty() {
        c = c.with_password(password);
    }
    Ok(c)
}

/// Creates the database and applies the migrations not yet recorded. Returns the server's
/// features.
pub async fn migrate(
    client: &Client,
    database: &str,
    retention_days: u32,
) -> Result<Features, ClickHouseError> {
    // The database may not exist yet: these two run in `default`.
    let bootstrap = client.clone().with_database("default");
    let version: String = bootstrap.query("SELECT version()").fetch_one().await?;
    let f = Features::of_version(&version);
    bootstrap
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await?;
    client
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS {database}.schema_migrations \
             (version UInt32, name String, applied_at DateTime) \
             ENGINE = MergeTree ORDER BY version"
        ))
        .execute()
        .await?;
    let applied: Vec<u32> = client
        .query(&format!(
            "SELECT version FROM {database}.schema_migrations ORDER BY version"
        ))
        .fetch_all()
        .await?;
    for m in migrations(database, f, retention_days) {
        if applied.contains(&m.version) {
            continue;
        }
        for sql in &m.statements {
            client.query(sql).execute().await?;
        }
        client
            .query(&format!(
                "INSERT INTO {database}.schema_migrations (version, name, applied_at) \
                 VALUES (?, ?, now())"
            ))
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await?;
    }
    Ok(f)
}

/// Handle to the running sink: send batches, then `finish`.
pub struct ClickHouseSink {
    tx: Option<mpsc::SyncSender<Vec<AuditEvent>>>,
    spooler: Option<std::thread::JoinHandle<()>>,
    sender: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
    pub shared: Arc<Shared>,
}

impl ClickHouseSink {
    /// Opens the spool and starts the two threads. ClickHouse need not be up.
    pub fn start(
        cfg: &ClickHouseConfig,
        spool_dir: &std::path::Path,
    ) -> Result<Self, ClickHouseError> {
        let client = client(cfg)?;
        let spool = Arc::new(Mutex::new(Spool::open(spool_dir, 64 << 20)?));
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        // The spool thread wakes the sender when it appended events (a permit is kept if
        // the sender is busy, so no wake-up is lost).
        let wake = Arc::new(Notify::new());
        let (tx, rx) = mpsc::sync_channel::<Vec<AuditEvent>>(256);

        let spooler = {
            let spool = spool.clone();
            let shared = shared.clone();
            let wake = wake.clone();
            let max = cfg.spool_max_bytes;
            let policy = cfg.when_spool_full;
            std::thread::Builder::new()
                .name("ch-spool".into())
                .spawn(move || spool_loop(rx, spool, shared, wake, max, policy))
                .expect("spawning ch-spool")
        };
        let sender = {
            let cfg = cfg.clone();
            let shared = shared.clone();
            let stop = stop.clone();
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("ch-send".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!("clickhouse: no runtime: {e}");
                            return;
                        }
                    };
                    rt.block_on(send_loop(cfg, client, spool, shared, wake, stop));
                })
                .expect("spawning ch-send")
        };
        Ok(ClickHouseSink {
            tx: Some(tx),
            spooler: Some(spooler),
            sender: Some(sender),
            stop,
            wake,
            shared,
        })
    }

    /// Queues events (blocks when the spool thread is behind).
    pub fn send(&self, batch: Vec<AuditEvent>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(batch);
        }
    }

    /// Spools what is queued, gives ClickHouse `grace` to take what is spooled, and stops.
    /// What is not delivered stays in the spool for the next start.
    pub fn finish(mut self, grace: Duration) {
        drop(self.tx.take());
        if let Some(h) = self.spooler.take() {
            let _ = h.join();
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.shared.spool_bytes.load(Ordering::Relaxed) > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
    }
}

fn spool_loop(
    rx: mpsc::Receiver<Vec<AuditEvent>>,
    spool: Arc<Mutex<Spool>>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    max_bytes: u64,
    policy: WhenSpoolFull,
) {
    let mut dropped_unreported = 0u64;
    let mut buf = Vec::with_capacity(4096);
    while let Ok(batch) = rx.recv() {
        // Room for this batch?
        loop {
            let pending = spool.lock().map(|s| s.pending_bytes()).unwrap_or(0);
            shared.spool_bytes.store(pending, Ordering::Relaxed);
            if pending < max_bytes {
                break;
            }
            match policy {
                WhenSpoolFull::Block => std::thread::sleep(Duration::from_millis(100)),
                WhenSpoolFull::Drop => break,
            }
        }
        let full = spool
            .lock()
            .map(|s| s.pending_bytes() >= max_bytes)
            .unwrap_or(true);
        if full && policy == WhenSpoolFull::Drop {
            dropped_unreported += batch.len() as u64;
            shared
                .dropped
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            continue;
        }
        let Ok(mut s) = spool.lock() else { return };
        if dropped_unreported > 0 {
            let gap = AuditEvent {
                event_id: crate::event::new_event_id(),
                kind: "gap".into(),
                ts: batch.first().map(|e| e.ts.clone()).unwrap_or_default(),
                statement: format!(
                    "({dropped_unreported} events were dropped: the ClickHouse spool was full)"
                )
                .into(),
                flags: vec!["clickhouse_spool_full".into()],
                ..AuditEvent::default()
            };
            buf.clear();
            record::encode(&gap, &mut buf);
            if s.append(&buf).is_ok() {
                dropped_unreported = 0;
            }
        }
        for ev in &batch {
            buf.clear();
            record::encode(ev, &mut buf);
            if let Err(e) = s.append(&buf) {
                tracing::error!("clickhouse spool: {e}");
                break;
            }
            shared.spooled.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = s.flush() {
            tracing::error!("clickhouse spool: {e}");
        }
        shared
            .spool_bytes
            .store(s.pending_bytes(), Ordering::Relaxed);
        drop(s);
        wake.notify_one();
    }
    if let Ok(mut s) = spool.lock() {
        let _ = s.sync();
    }
}

fn make_inserter(client: &Client, cfg: &ClickHouseConfig, f: Features) -> RowInserter {
    let table = "events";
    let period = Some(Duration::from_millis(cfg.batch_period_ms));
    if f.datetime64 && f.map {
        RowInserter::Modern(
            client
                .inserter::<ModernRow<'static>>(table)
                .with_max_rows(cfg.batch_rows)
                .with_max_bytes(cfg.batch_bytes)
                .with_period(period),
        )
    } else {
        RowInserter::Compat(
            client
                .inserter::<CompatRow<'static>>(table)
                .with_max_rows(cfg.batch_rows)
                .with_max_bytes(cfg.batch_bytes)
                .with_period(period),
        )
    }
}

/// Attempts at one batch that the server refuses (an error response, not a network
/// failure) before the batch is set aside in `spool/rejected/` (kept, counted, not retried).
const MAX_REFUSALS: u32 = 5;

async fn send_loop(
    cfg: ClickHouseConfig,
    client: Client,
    spool: Arc<Mutex<Spool>>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    stop: Arc<AtomicBool>,
) {
    // Spool reads and commits are file I/O under a lock shared with the spool thread: they
    // run on the blocking pool, never on this runtime's thread (which drives the HTTP
    // connection), and the loop waits for new events on `wake`, not on a std Condvar.
    let stopped = || stop.load(Ordering::Acquire);
    let mut backoff = Duration::from_millis(200);
    let mut failing = false;
    let mut last_error = String::new();
    let mut refusals = 0u32;
    let report = |shared: &Shared,
                  e: &dyn std::fmt::Display,
                  failing: &mut bool,
                  last_error: &mut String| {
        shared.connected.store(0, Ordering::Relaxed);
        let msg = e.to_string();
        if msg != *last_error {
            tracing::warn!(
                "clickhouse: {}; events wait in the spool",
                msg.trim_start_matches("clickhouse: ")
            );
            *last_error = msg;
        }
        *failing = true;
    };
    'connect: while !stopped() || shared.spool_bytes.load(Ordering::Relaxed) > 0 {
        if stopped() && failing {
            break;
        }
        let features = match migrate(&client, &cfg.database, cfg.retention_days).await {
            Ok(f) => f,
            Err(e) => {
                report(&shared, &e, &mut failing, &mut last_error);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut inserter = make_inserter(&client, &cfg, features);
        // Everything before `acked` is in ClickHouse; the inserter holds what follows, up
        // to `written`.
        let mut acked = {
            let spool = spool.clone();
            blocking(move || spool.lock().map(|s| s.cursor()).unwrap_or_default())
                .await
                .unwrap_or_default()
        };
        let mut written: Position = acked;
        let mut written_rows = 0u64;
        let mut scratch = Vec::new();
        loop {
            let read = {
                let (spool, shared, max_bytes) = (spool.clone(), shared.clone(), cfg.batch_bytes);
                let read = blocking(move || {
                    let Ok(mut s) = spool.lock() else {
                        return None;
                    };
                    let before = s.counters.corruptions;
                    let r = s.read_from(written, 10_000, max_bytes);
                    shared
                        .corrupt
                        .fetch_add(s.counters.corruptions - before, Ordering::Relaxed);
                    Some(r)
                })
                .await;
                match read {
                    Some(Some(r)) => r,
                    // The spool's lock was poisoned (its thread panicked) or the blocking
                    // pool is gone: nothing more can be delivered.
                    _ => return,
                }
            };
            let (records, next) = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("clickhouse spool: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut failed = None;
            for rec in &records {
                // A record that does not decode passed its checksum but is not an event
                // this version can read: counted and skipped (never a crash).
                let Ok(ev) = record::decode_any(rec, &mut scratch) else {
                    shared.corrupt.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if let Err(e) = inserter.write(&ev).await {
                    failed = Some(e);
                    break;
                }
                written_rows += 1;
            }
            if failed.is_none() {
                written = next;
                // Nothing more to read: send what is held now rather than at the period.
                let result = if records.is_empty() {
                    inserter.force_commit().await
                } else {
                    inserter.commit().await
                };
                match result {
                    Ok(_) if inserter.pending_rows() == 0 && written != acked => {
                        // Acknowledged: everything written so far is in ClickHouse.
                        acked = written;
                        let (spool, sh) = (spool.clone(), shared.clone());
                        blocking(move || {
                            if let Ok(mut s) = spool.lock() {
                                if let Err(e) = s.commit(acked) {
                                    tracing::error!("clickhouse spool: {e}");
                                }
                                sh.spool_bytes.store(s.pending_bytes(), Ordering::Relaxed);
                            }
                        })
                        .await;
                        shared.inserted.fetch_add(written_rows, Ordering::Relaxed);
                        written_rows = 0;
                        refusals = 0;
                        backoff = Duration::from_millis(200);
                        shared.connected.store(1, Ordering::Relaxed);
                        if failing {
                            tracing::warn!("clickhouse: delivering again");
                            failing = false;
                            last_error.clear();
                        }
                    }
                    Ok(_) => {}
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                // The insert may or may not have landed: it is sent again from `acked`
                // (event ids make a repeat harmless in the views). A batch the server
                // keeps refusing is set aside instead of blocking everything after it.
                shared.insert_errors.fetch_add(1, Ordering::Relaxed);
                if matches!(e, clickhouse::error::Error::BadResponse(_)) {
                    refusals += 1;
                }
                report(&shared, &e, &mut failing, &mut last_error);
                if refusals >= MAX_REFUSALS {
                    refusals = 0;
                    let (spool, cfg, sh) = (spool.clone(), cfg.clone(), shared.clone());
                    blocking(move || set_aside(&spool, acked, &cfg, &sh)).await;
                }
                if stopped() {
                    break 'connect;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue 'connect;
            }
            if records.is_empty() {
                if stopped() {
                    break 'connect;
                }
                // New events, a stop, or the batch period (the inserter's own timer).
                let _ = tokio::time::timeout(Duration::from_millis(100), wake.notified()).await;
            }
        }
    }
    shared.connected.store(0, Ordering::Relaxed);
}

/// Runs blocking work (spool file I/O) on the runtime's blocking pool; None if it could
/// not run to the end (the runtime is shutting down, or the work panicked).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// Moves the batch at `from` out of the way: its records go to `spool/rejected/` as JSON
/// lines (kept for a person to look at, counted), and the cursor moves past them.
fn set_aside(spool: &Arc<Mutex<Spool>>, from: Position, cfg: &ClickHouseConfig, shared: &Shared) {
    let Ok(mut s) = spool.lock() else { return };
    let Ok((records, next)) = s.read_from(from, 10_000, cfg.batch_bytes) else {
        return;
    };
    let dir = s.dir().join("rejected");
    let path = dir.join(format!("{}-{}.jsonl", from.segment, from.offset));
    let mut text = Vec::new();
    let mut scratch = Vec::new();
    for r in &records {
        match record::decode_any(r, &mut scratch) {
            Ok(ev) => {
                let _ = serde_json::to_writer(&mut text, &ev.to_event());
            }
            // Kept as it is, for a person with a hex editor.
            Err(e) => {
                let _ = write!(
                    text,
                    "{{\"undecodable_record\":\"{e}\",\"hex\":\"{}\"}}",
                    hex::encode(r)
                );
            }
        }
        text.push(b'\n');
    }
    let saved = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &text));
    match saved {
        Ok(()) => {
            tracing::warn!(
                "clickhouse refused {} events {MAX_REFUSALS} times; set aside in {}",
                records.len(),
                path.display()
            );
            shared
                .rejected
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            if let Err(e) = s.commit(next) {
                tracing::error!("clickhouse spool: {e}");
            }
        }
        Err(e) => tracing::error!("clickhouse: setting aside {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_by_version() {
        let old = Features::of_version("18.16.1");
        assert!(!old.datetime64 && !old.map && !old.ttl && !old.low_cardinality);
        let new = Features::of_version("24.8.4.13");
        assert!(new.datetime64 && new.map && new.ttl && new.low_cardinality && new.skip_indexes);
        assert_eq!(Features::of_version("garbage").major, 0);
    }

    #[test]
    fn schema_follows_the_server() {
        let old = migrations("auditor", Features::of_version("18.16.1"), 30);
        let sql = &old[0].statements[0];
        assert!(sql.contains("ts DateTime('UTC')") && sql.contains("ts_us UInt32"));
        assert!(sql.contains("label_keys Array(String)"));
        assert!(!sql.contains("LowCardinality") && !sql.contains("TTL"));
        let new = migrations("auditor", Features::of_version("24.3.1"), 30);
        let sql = &new[0].statements[0];
        assert!(sql.contains("DateTime64(6, 'UTC')") && sql.contains("Map(String, String)"));
        assert!(sql.contains("LowCardinality(String)") && sql.contains("INTERVAL 30 DAY"));
        assert!(new.windows(2).all(|w| w[0].version < w[1].version));
    }
}
