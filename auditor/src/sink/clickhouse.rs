//! Audit events into ClickHouse, with nothing lost.
//!
//! Every event is first appended to an on-disk spool (checksummed segments, see
//! `spool.rs`, of records written against their session's context, see `framed.rs`) by the
//! `ch-spool` thread; the `ch-send` thread reads the spool in order, copies each record and
//! its frames' fields into a RowBinary row (no decoding of an event to serialize it again)
//! and inserts the rows over HTTP (one INSERT ended at row, byte or period limits),
//! moving the spool's cursor only after ClickHouse acknowledged an insert. So events
//! survive ClickHouse being slow or down, and the daemon restarting; an insert whose
//! outcome is unknown (a timeout) is sent again, and the table, a ReplacingMergeTree keyed
//! on the event id, plus views reading it with FINAL, keep such an event once.
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

use clickhouse::{insert_formatted::InsertFormatted, Client, Row};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tokio::sync::Notify;

use crate::{
    audit::{
        event::{AuditEvent, EventKind, Flag, Flags, Timestamp, FIELDS},
        schema::{column_names, compat_column_names, split_count, ColumnStyle, FieldSpec},
    },
    sink::{
        framed::{self, Framer, Frames},
        local::compact::ContextTable,
        record,
        spool::{Position, Records, Spool, SpoolError},
        Batch, Handover, Health, Sink, SinkError,
    },
};

/// What to do when the ClickHouse spool reaches its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenSpoolFull {
    /// Stop taking events until ClickHouse catches up: capture waits, the kernel ring
    /// buffer fills, and what it cannot hold is recorded as gaps.
    Block,
    /// Drop new events and record how many in a `gap` event once there is room again.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// Send events to ClickHouse. Default: false.
    pub enabled: bool,
    /// HTTP interface of the server. Default: http://127.0.0.1:8123.
    pub url: String,
    /// Database (created if missing). Default: auditor.
    pub database: String,
    /// Default: default.
    pub user: String,
    /// The password itself (prefer password_file or password_env).
    pub password: Option<String>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// Days of events kept (a TTL, where the server supports it); 0 keeps them forever.
    pub retention_days: u32,
    /// An insert is sent after this many rows, bytes or milliseconds, whichever first.
    pub batch_rows: u64,
    pub batch_bytes: u64,
    pub batch_period_ms: u64,
    /// Events not yet in ClickHouse wait in `state_dir/spool`, up to this many bytes.
    pub spool_max_bytes: u64,
    /// block (default) or drop, when the spool is full.
    pub when_spool_full: WhenSpoolFull,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            enabled: false,
            url: "http://127.0.0.1:8123".into(),
            database: "auditor".into(),
            user: "default".into(),
            password: None,
            password_file: None,
            password_env: None,
            retention_days: 0,
            batch_rows: 100_000,
            batch_bytes: 64 << 20,
            batch_period_ms: 1000,
            spool_max_bytes: 4 << 30,
            when_spool_full: WhenSpoolFull::Block,
        }
    }
}

impl ClickHouseConfig {
    /// The password from wherever it is configured (empty if nowhere).
    pub fn resolve_password(&self) -> Result<String, String> {
        if let Some(p) = &self.password_file {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("password_file {}: {e}", p.display()))?;
            return Ok(text.lines().next().unwrap_or("").to_string());
        }
        if let Some(var) = &self.password_env {
            return std::env::var(var).map_err(|_| format!("password_env: ${var} is not set"));
        }
        Ok(self.password.clone().unwrap_or_default())
    }

    /// Checks the values (when enabled); Err names the field and the problem.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled {
            return Ok(());
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err((
                "url",
                format!("{} must start with http:// or https://", self.url),
            ));
        }
        if self.database.is_empty()
            || !self
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err((
                "database",
                format!("{:?} must be letters, digits and _", self.database),
            ));
        }
        let set = [
            self.password.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ];
        if set.iter().filter(|&&b| b).count() > 1 {
            return Err((
                "password",
                "give one of password, password_file, password_env".into(),
            ));
        }
        if self.batch_rows == 0 || self.batch_bytes == 0 || self.batch_period_ms == 0 {
            return Err((
                "batch_*",
                "batch_rows, batch_bytes and batch_period_ms must be positive".into(),
            ));
        }
        if self.spool_max_bytes < (16 << 20) {
            return Err(("spool_max_bytes", "must be at least 16 MiB".into()));
        }
        Ok(())
    }
}

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
    pub name: String,
    /// Columns added to the events table first, each unless it is there already (a
    /// migration cut short before it was recorded runs again; servers before 19.x have
    /// no `ADD COLUMN IF NOT EXISTS`): (name, definition).
    pub add_columns: Vec<(&'static str, String)>,
    pub statements: Vec<String>,
}

impl Features {
    /// How this server stores events.
    pub fn style(self) -> ColumnStyle {
        ColumnStyle {
            compat: !(self.datetime64 && self.map),
            low_cardinality: self.low_cardinality,
        }
    }
}

/// The events table's column definitions for a server of `style`, from the event's
/// declaration.
fn column_definitions(
    fields: &[FieldSpec],
    style: ColumnStyle,
    which: impl Fn(&FieldSpec) -> bool,
) -> Vec<String> {
    fields
        .iter()
        .filter(|f| which(f))
        .flat_map(|f| (f.columns)(f.name, f.low_cardinality, style))
        .collect()
}

/// The views, recreated whenever columns are added (`SELECT *` views fix their columns
/// when created).
fn views(db: &str) -> Vec<String> {
    // Views read the table with FINAL: an event sent twice (a retried insert) shows once.
    vec![
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
    ]
}

/// The schema version of the views (migration 2).
const VIEWS_VERSION: u32 = 2;

/// Every migration, in order, as SQL for a server with `f`: the table as the fields of
/// version 1 declare it, the views, then for each later version that added fields, their
/// columns and the views again.
pub fn migrations(db: &str, f: Features, retention_days: u32) -> Vec<Migration> {
    let mut all = migrations_of(FIELDS, db, f, retention_days);
    all.push(Migration {
        version: LOG_HEADS_VERSION,
        name: "log_heads table".into(),
        add_columns: Vec::new(),
        statements: vec![log_heads_table(db)],
    });
    all
}

fn migrations_of(
    fields: &[FieldSpec],
    db: &str,
    f: Features,
    retention_days: u32,
) -> Vec<Migration> {
    let style = f.style();
    let ttl = if f.ttl && retention_days > 0 {
        format!("\nTTL toDateTime(ts) + INTERVAL {retention_days} DAY")
    } else {
        String::new()
    };
    let mut columns = column_definitions(fields, style, |f| f.since <= 1);
    if f.skip_indexes {
        columns.extend([
            "INDEX session_idx session_id TYPE bloom_filter GRANULARITY 4".to_string(),
            "INDEX fingerprint_idx fingerprint TYPE bloom_filter GRANULARITY 4".to_string(),
            "INDEX user_idx db_user TYPE set(1000) GRANULARITY 4".to_string(),
        ]);
    }
    let events = format!(
        "CREATE TABLE IF NOT EXISTS {db}.events (\n    {}\n)\n\
         ENGINE = ReplacingMergeTree\n\
         PARTITION BY toYYYYMMDD(ts)\n\
         ORDER BY (workload, db_user, ts, event_id){ttl}",
        columns.join(",\n    ")
    );
    let mut all = vec![
        Migration {
            version: 1,
            name: "events table".into(),
            add_columns: Vec::new(),
            statements: vec![events],
        },
        Migration {
            version: VIEWS_VERSION,
            name: "views: sessions, statements, errors, ddl, top_fingerprints".into(),
            add_columns: Vec::new(),
            statements: views(db),
        },
    ];
    let mut later: Vec<u32> = fields
        .iter()
        .map(|f| f.since)
        .filter(|&v| v > VIEWS_VERSION)
        .collect();
    later.sort_unstable();
    later.dedup();
    for version in later {
        let added: Vec<&FieldSpec> = fields.iter().filter(|f| f.since == version).collect();
        // Each added column by name (a split field's columns by their own names).
        let add_columns = added
            .iter()
            .flat_map(|f| {
                (f.columns)(f.name, f.low_cardinality, style)
                    .into_iter()
                    .map(move |def| {
                        let first = def.split_whitespace().next().unwrap_or_default();
                        let name = match f.compat_split {
                            Some([a, _]) if a == first => a,
                            Some([_, b]) if b == first => b,
                            _ => f.name,
                        };
                        (name, def)
                    })
            })
            .collect();
        all.push(Migration {
            version,
            name: format!(
                "columns {}",
                added.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
            ),
            add_columns,
            statements: views(db),
        });
    }
    all
}

const MODERN_COLUMNS: [&str; FIELDS.len()] = column_names(FIELDS);
/// Older servers (Debian's 18.16): DateTime plus microseconds, label arrays.
const COMPAT_COLUMNS: [&str; FIELDS.len() + split_count(FIELDS)] = compat_column_names(FIELDS);

/// The INSERTs into the events table: RowBinary rows copied from the spool's records (an
/// event is never decoded to be serialized again), one INSERT open at a time, ended once
/// it holds `batch_rows` rows or `batch_bytes` bytes, or has been open `batch_period_ms`.
struct RowInsert {
    client: Client,
    /// `INSERT INTO events (columns) FORMAT RowBinary`, for the server's layout.
    sql: String,
    compat: bool,
    insert: Option<InsertFormatted>,
    /// Rows and bytes in the open INSERT, and when it must end.
    rows: u64,
    bytes: u64,
    ends_at: Instant,
    max_rows: u64,
    max_bytes: u64,
    period: Duration,
    /// Rows copied since the last `send`: handed to the connection as they are (a chunk
    /// of the request's body), not copied again.
    rows_buf: Vec<u8>,
    /// A record of the JSON layout re-encoded (see `record::to_row`).
    scratch: Vec<u8>,
}

impl RowInsert {
    fn new(client: &Client, cfg: &ClickHouseConfig, f: Features) -> Self {
        let compat = f.style().compat;
        let columns: &[&str] = if compat {
            &COMPAT_COLUMNS
        } else {
            &MODERN_COLUMNS
        };
        let columns: Vec<String> = columns.iter().map(|c| format!("`{c}`")).collect();
        RowInsert {
            client: client.clone(),
            sql: format!(
                "INSERT INTO events ({}) FORMAT RowBinary",
                columns.join(",")
            ),
            compat,
            insert: None,
            rows: 0,
            bytes: 0,
            ends_at: Instant::now(),
            max_rows: cfg.batch_rows,
            max_bytes: cfg.batch_bytes,
            period: Duration::from_millis(cfg.batch_period_ms),
            rows_buf: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Copies the rows of `records` (reading the frames among them into `frames`); each
    /// record that is not an event this version can read (or refers to a frame that was
    /// not read) is skipped, nothing of it copied. Returns the rows copied and the records
    /// skipped.
    fn push(&mut self, records: &Records, frames: &mut Frames) -> (u64, u64) {
        // A row takes about its record's size (a framed record's, several times that).
        let size: usize = records.iter().map(<[u8]>::len).sum();
        self.rows_buf.reserve(size * 4);
        let (mut rows, mut skipped) = (0, 0);
        for (segment, rec) in records.iter_with_segments() {
            let framed = framed::is_frame(rec) || framed::is_framed_record(rec);
            if framed && frames.segment() != Some(segment) {
                frames.start(segment);
            }
            let copied = if framed::is_frame(rec) {
                match frames.add(rec, self.compat) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                }
            } else if framed {
                frames.to_row(rec, self.compat, &mut self.rows_buf)
            } else {
                record::to_row(rec, &mut self.scratch, self.compat, &mut self.rows_buf)
            };
            match copied {
                Ok(()) => rows += 1,
                Err(_) => skipped += 1,
            }
        }
        self.rows += rows;
        (rows, skipped)
    }

    /// Sends the rows copied since the last call on the open INSERT (opening one).
    async fn send(&mut self) -> Result<(), clickhouse::error::Error> {
        if self.rows_buf.is_empty() {
            return Ok(());
        }
        let insert = match &mut self.insert {
            Some(insert) => insert,
            None => {
                self.ends_at = Instant::now() + self.period;
                self.insert
                    .insert(self.client.insert_formatted_with(self.sql.clone()))
            }
        };
        self.bytes += self.rows_buf.len() as u64;
        insert
            .send(bytes::Bytes::from(std::mem::take(&mut self.rows_buf)))
            .await
    }

    /// Ends the open INSERT if it reached a limit (`force`: in any case): the server has
    /// then acknowledged every row sent. Ok(true) when no row waits unacknowledged.
    async fn commit(&mut self, force: bool) -> Result<bool, clickhouse::error::Error> {
        self.send().await?;
        let due = self.rows >= self.max_rows
            || self.bytes >= self.max_bytes
            || Instant::now() >= self.ends_at;
        if let Some(insert) = self.insert.take_if(|_| force || due) {
            insert.end().await?;
            self.rows = 0;
            self.bytes = 0;
        }
        Ok(self.insert.is_none())
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
        for (name, definition) in &m.add_columns {
            let present: u64 = client
                .query(
                    "SELECT count() FROM system.columns \
                     WHERE database = ? AND table = 'events' AND name = ?",
                )
                .bind(database)
                .bind(*name)
                .fetch_one()
                .await?;
            if present == 0 {
                client
                    .query(&format!(
                        "ALTER TABLE {database}.events ADD COLUMN {definition}"
                    ))
                    .execute()
                    .await?;
            }
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

/// The local log's head, sent to ClickHouse after each acknowledged insert (table
/// `log_heads`), where a root user on the host cannot rewrite it.
pub struct Anchor {
    pub head: crate::sink::local::SharedHead,
    pub host: String,
}

/// The version of the migration that creates `log_heads` (tables other than `events` take
/// versions from 1001, so that the events table's column migrations keep theirs).
const LOG_HEADS_VERSION: u32 = 1001;

fn log_heads_table(db: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.log_heads (\n    host String,\n    ts_us Int64,\n    \
         segment UInt64,\n    block UInt64,\n    records UInt64,\n    hash String\n)\n\
         ENGINE = ReplacingMergeTree\nORDER BY (host, block)"
    )
}

/// The local log heads ClickHouse received from `host`, by block.
#[derive(Debug, Clone, Row, Deserialize)]
pub struct LogHeadRow {
    pub ts_us: i64,
    pub segment: u64,
    pub block: u64,
    pub records: u64,
    pub hash: String,
}

pub async fn log_heads(
    client: &Client,
    db: &str,
    host: &str,
) -> Result<Vec<LogHeadRow>, ClickHouseError> {
    Ok(client
        .query(&format!(
            "SELECT ts_us, segment, block, records, hash FROM {db}.log_heads \
             WHERE host = ? ORDER BY block"
        ))
        .bind(host)
        .fetch_all()
        .await?)
}

/// Handle to the running sink: send batches, then `finish`.
pub struct ClickHouseSink {
    tx: Option<mpsc::SyncSender<Encoded>>,
    /// Buffers of batches the spool thread wrote, back for the next batch.
    recycled: mpsc::Receiver<Records>,
    spooler: Option<std::thread::JoinHandle<()>>,
    sender: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
    pub shared: Arc<Shared>,
    /// The spool records' encoder (on the sink thread).
    framer: Framer,
    /// Set by the spool thread when a batch did not reach the spool: the batches after it
    /// refer to frames that are not there, so the encoder starts over.
    start_over: Arc<AtomicBool>,
}

impl ClickHouseSink {
    /// Opens the spool and starts the two threads. ClickHouse need not be up.
    pub fn start(
        cfg: &ClickHouseConfig,
        spool_dir: &std::path::Path,
        anchor: Option<Anchor>,
    ) -> Result<Self, ClickHouseError> {
        let client = client(cfg)?;
        let spool = Arc::new(Mutex::new(Spool::open(spool_dir, 64 << 20)?));
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        // The spool thread wakes the sender when it appended events (a permit is kept if
        // the sender is busy, so no wake-up is lost).
        let wake = Arc::new(Notify::new());
        let (tx, rx) = mpsc::sync_channel::<Encoded>(256);
        let (back, recycled) = mpsc::sync_channel::<Records>(4);
        let start_over = Arc::new(AtomicBool::new(false));

        let spooler = {
            let spool = spool.clone();
            let shared = shared.clone();
            let wake = wake.clone();
            let max = cfg.spool_max_bytes;
            let policy = cfg.when_spool_full;
            let start_over = start_over.clone();
            std::thread::Builder::new()
                .name("ch-spool".into())
                .spawn(move || spool_loop(rx, back, spool, shared, wake, max, policy, start_over))
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
                    rt.block_on(send_loop(cfg, client, spool, shared, wake, stop, anchor));
                })
                .expect("spawning ch-send")
        };
        Ok(ClickHouseSink {
            tx: Some(tx),
            recycled,
            spooler: Some(spooler),
            sender: Some(sender),
            stop,
            wake,
            shared,
            framer: Framer::default(),
            start_over,
        })
    }

    /// Spools what is queued, gives ClickHouse `grace` to take what is spooled, and stops.
    /// What is not delivered stays in the spool for the next start.
    fn stop(&mut self, grace: Duration) {
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

impl Sink for ClickHouseSink {
    fn name(&self) -> &'static str {
        "clickhouse"
    }

    /// Encodes the batch's spool records and queues them for the spool thread (waits when
    /// it is behind). The batch itself is not kept: it goes back to the capture's thread
    /// to be filled again, as without ClickHouse (no event is allocated anew for it).
    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.send_with(batch, &mut Handover::default())
    }

    /// Asks for the batch's records: the local log, when on, encodes them as it writes
    /// its own (a new spool segment, when one is due, begins with this batch: the records
    /// must then refer to no frame before it).
    fn want_records(&mut self, handover: &mut Handover) {
        if self.tx.is_none() {
            return;
        }
        if self.start_over.swap(false, Ordering::AcqRel) {
            self.framer.start_over();
        }
        handover.want(
            self.recycled.try_recv().unwrap_or_default(),
            self.framer.due(),
        );
    }

    /// Queues the batch's records, as a sink before this one encoded them or, when none
    /// did, encoded here.
    fn send_with(&mut self, batch: &Batch, handover: &mut Handover) -> Result<(), SinkError> {
        let Some(tx) = &self.tx else {
            return Err("stopped".into());
        };
        let encoded = match handover.take() {
            Some((records, fresh)) => {
                self.framer.took(&records, fresh);
                Encoded::handed(batch, records, fresh)
            }
            None => {
                if self.start_over.swap(false, Ordering::AcqRel) {
                    self.framer.start_over();
                }
                let buffer = handover
                    .unfilled()
                    .unwrap_or_else(|| self.recycled.try_recv().unwrap_or_default());
                Encoded::of(batch, buffer, &mut self.framer)
            }
        };
        tx.send(encoded)
            .map_err(|_| "the spool thread has stopped".into())
    }

    /// The spool thread writes each batch through; nothing waits here.
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn health(&self) -> Health {
        let c = self.shared.counters();
        Health {
            healthy: c.connected,
            events: c.spooled + c.dropped_spool_full,
            errors: c.insert_errors + c.dropped_spool_full + c.rejected + c.corrupt_spool_records,
            detail: serde_json::to_value(c).unwrap_or_default(),
        }
    }

    fn finish(mut self: Box<Self>, grace: Duration) -> Result<Health, SinkError> {
        self.stop(grace);
        Ok(self.health())
    }
}

impl Drop for ClickHouseSink {
    fn drop(&mut self) {
        // Never leaves its threads running (a daemon that fails after starting the sink).
        if self.spooler.is_some() || self.sender.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}

/// The largest batch buffer kept for reuse.
const RECYCLE_BYTES: usize = 4 << 20;

/// One batch's spool records (see `framed.rs`), encoded by the sink thread.
struct Encoded {
    records: Records,
    /// Events in the batch (`records` holds frames too).
    events: u64,
    /// The batch begins a new spool segment (its encoder started over).
    new_segment: bool,
    /// The time of the batch's first event.
    first_ts: Option<Timestamp>,
}

impl Encoded {
    /// The records of `batch`, in `records` (buffers to reuse).
    fn of(batch: &[Box<AuditEvent>], mut records: Records, framer: &mut Framer) -> Self {
        records.clear();
        let new_segment = framer.encode(batch, &mut records);
        Encoded {
            records,
            events: batch.len() as u64,
            new_segment,
            first_ts: batch.first().map(|e| e.ts),
        }
    }

    /// The records of `batch`, encoded by another sink (`fresh`: they begin a new segment).
    fn handed(batch: &[Box<AuditEvent>], records: Records, fresh: bool) -> Self {
        Encoded {
            records,
            events: batch.len() as u64,
            new_segment: fresh,
            first_ts: batch.first().map(|e| e.ts),
        }
    }

    /// Sends the buffers back to the sink thread for its next batch, unless a huge event
    /// made them large (not kept for every batch after).
    fn recycle(self, back: &mpsc::SyncSender<Records>) {
        if self.records.capacity() <= RECYCLE_BYTES {
            let _ = back.try_send(self.records);
        }
    }
}

/// Why events did not reach the ClickHouse spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    /// The spool was at `max_spool_bytes` (`when_spool_full: drop`).
    Full,
    /// Writing the spool failed (the error is in the daemon's log).
    WriteFailed,
}

/// Events dropped since the last gap event that said so, by reason.
#[derive(Debug)]
struct Unreported {
    full: u64,
    write_failed: u64,
    /// The reason of the last drop: the batches dropped while awaiting the encoder's
    /// start count under it.
    last: DropReason,
    /// After a batch that did not reach the spool, the batches encoded after it refer to
    /// its frames: they are dropped too (and counted) until the encoder has started over.
    awaiting_start: bool,
}

impl Default for Unreported {
    fn default() -> Self {
        Unreported {
            full: 0,
            write_failed: 0,
            last: DropReason::Full,
            awaiting_start: false,
        }
    }
}

impl Unreported {
    /// `events` dropped, for `why` (None: the reason of the drop before).
    fn add(&mut self, why: Option<DropReason>, events: u64) {
        self.last = why.unwrap_or(self.last);
        self.awaiting_start = true;
        match self.last {
            DropReason::Full => self.full += events,
            DropReason::WriteFailed => self.write_failed += events,
        }
    }

    /// A gap event said how many.
    fn reported(&mut self) {
        self.full = 0;
        self.write_failed = 0;
    }

    fn any(&self) -> bool {
        self.full + self.write_failed > 0
    }

    /// The gap event's statement: how many, and why.
    fn statement(&self) -> String {
        match (self.full, self.write_failed) {
            (n, 0) => format!("({n} events were dropped: the ClickHouse spool was full)"),
            (0, n) => format!(
                "({n} events were dropped: writing the ClickHouse spool failed, see the daemon's log)"
            ),
            (f, w) => format!(
                "({} events were dropped: {f} when the ClickHouse spool was full, {w} when writing it failed, see the daemon's log)",
                f + w
            ),
        }
    }

    fn flags(&self) -> Flags {
        let mut flags = Flags::empty();
        if self.full > 0 {
            flags.insert(Flag::ClickhouseSpoolFull);
        }
        if self.write_failed > 0 {
            flags.insert(Flag::ClickhouseSpoolWriteFailed);
        }
        flags
    }
}

#[allow(clippy::too_many_arguments)]
fn spool_loop(
    rx: mpsc::Receiver<Encoded>,
    back: mpsc::SyncSender<Records>,
    spool: Arc<Mutex<Spool>>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    max_bytes: u64,
    policy: WhenSpoolFull,
    start_over: Arc<AtomicBool>,
) {
    let mut unreported = Unreported::default();
    let mut buf = Vec::with_capacity(4096);
    // Counts `events` that did not reach the spool, and asks the encoder to start over
    // (each drop asks again: a batch that started over may be dropped too).
    let dropped = |events: u64, why: Option<DropReason>, unreported: &mut Unreported| {
        unreported.add(why, events);
        shared.dropped.fetch_add(events, Ordering::Relaxed);
        start_over.store(true, Ordering::Release);
    };
    while let Ok(batch) = rx.recv() {
        if batch.records.is_empty() && !batch.new_segment {
            batch.recycle(&back);
            continue;
        }
        if unreported.awaiting_start && !batch.new_segment {
            dropped(batch.events, None, &mut unreported);
            batch.recycle(&back);
            continue;
        }
        // Room for this batch? The spool's size is asked once per batch (a directory
        // listing and a stat per segment), under the lock the batch is then appended in:
        // the sender cannot commit in between, so the size after it is exact.
        let (mut s, mut pending) = loop {
            let Ok(s) = spool.lock() else { return };
            let pending = s.pending_bytes();
            shared.spool_bytes.store(pending, Ordering::Relaxed);
            if pending < max_bytes || policy == WhenSpoolFull::Drop {
                break (s, pending);
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(100));
        };
        if pending >= max_bytes {
            drop(s);
            dropped(batch.events, Some(DropReason::Full), &mut unreported);
            batch.recycle(&back);
            continue;
        }
        if batch.new_segment {
            if let Err(e) = s.start_segment() {
                tracing::error!("clickhouse spool: {e}");
                drop(s);
                dropped(batch.events, Some(DropReason::WriteFailed), &mut unreported);
                batch.recycle(&back);
                continue;
            }
            unreported.awaiting_start = false;
        }
        if unreported.any() {
            let gap = AuditEvent {
                event_id: crate::audit::event::new_event_id(),
                kind: EventKind::Gap,
                ts: batch.first_ts.unwrap_or_else(Timestamp::now),
                statement: unreported.statement().into(),
                flags: unreported.flags(),
                ..AuditEvent::default()
            };
            buf.clear();
            record::encode(&gap, &mut buf);
            if s.append_here(&buf).is_ok() {
                unreported.reported();
                pending += 8 + buf.len() as u64;
            }
        }
        let mut appended = 0u64;
        let mut failed = false;
        for rec in batch.records.iter() {
            if let Err(e) = s.append_here(rec) {
                tracing::error!("clickhouse spool: {e}");
                failed = true;
                break;
            }
            // A record's length and checksum, then the record.
            pending += 8 + rec.len() as u64;
            if !framed::is_frame(rec) {
                appended += 1;
            }
        }
        shared.spooled.fetch_add(appended, Ordering::Relaxed);
        if let Err(e) = s.flush() {
            tracing::error!("clickhouse spool: {e}");
        }
        shared.spool_bytes.store(pending, Ordering::Relaxed);
        drop(s);
        wake.notify_one();
        if failed {
            // What was not written is counted as dropped (a gap says how many).
            dropped(
                batch.events - appended,
                Some(DropReason::WriteFailed),
                &mut unreported,
            );
        }
        batch.recycle(&back);
    }
    if let Ok(mut s) = spool.lock() {
        let _ = s.sync();
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
    anchor: Option<Anchor>,
) {
    let mut anchored: Option<u64> = None;
    // The frames of the segment being read (kept across reconnections: a segment's frames
    // are read once, in order).
    let mut frames = Frames::default();
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
        let mut inserter = RowInsert::new(&client, &cfg, features);
        if frames.compat().is_some_and(|c| c != inserter.compat) {
            // Frames are kept rendered for the server's column style; another server's
            // reads them again (from the start of the segment being read).
            frames = Frames::default();
        }
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
            // Read from the middle of a segment whose frames were not read (after a
            // restart, or again after a failed insert from an earlier segment): its frames
            // before that point first.
            let first_segment = records.iter_with_segments().next().map(|(seg, _)| seg);
            if first_segment == Some(written.segment)
                && written.offset > 0
                && frames.segment() != Some(written.segment)
            {
                let spool = spool.clone();
                let before =
                    blocking(move || spool.lock().ok().map(|mut s| s.frames_before(written)))
                        .await
                        .flatten();
                frames.start(written.segment);
                match before {
                    Some(Ok(before)) => {
                        for f in before.iter() {
                            // A frame that does not read: the records referring to it are
                            // skipped and counted below.
                            let _ = frames.add(f, inserter.compat);
                        }
                    }
                    Some(Err(e)) => tracing::error!("clickhouse spool: {e}"),
                    None => return,
                }
            }
            // A record that does not decode passed its checksum but is not an event this
            // version can read: counted and skipped (never a crash).
            let (rows, skipped) = inserter.push(&records, &mut frames);
            shared.corrupt.fetch_add(skipped, Ordering::Relaxed);
            written_rows += rows;
            written = next;
            // An insert ends at a limit or at its period (`batch_period_ms`), not each
            // time the spool is drained: ClickHouse takes about one insert (one part)
            // per period, not one per hand-over from the capture (every 20 ms under
            // load), and this loop one HTTP request. A stop sends what is held.
            match inserter.commit(records.is_empty() && stopped()).await {
                Ok(true) if written != acked => {
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
                    if let Some(a) = &anchor {
                        send_head(&client, &cfg.database, a, &mut anchored).await;
                    }
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
                Err(e) => {
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
            }
            if records.is_empty() {
                if stopped() {
                    break 'connect;
                }
                // New events, a stop, or the end of the open INSERT's period.
                let _ = tokio::time::timeout(Duration::from_millis(100), wake.notified()).await;
            }
        }
    }
    shared.connected.store(0, Ordering::Relaxed);
}

/// Sends the local log's head if it moved since the last one sent. A failure is only
/// logged: the next acknowledged insert sends the head of then.
async fn send_head(client: &Client, db: &str, a: &Anchor, anchored: &mut Option<u64>) {
    let Some(h) = a.head.lock().ok().and_then(|h| h.clone()) else {
        return;
    };
    if *anchored == Some(h.block) {
        return;
    }
    let sent = client
        .query(&format!(
            "INSERT INTO {db}.log_heads (host, ts_us, segment, block, records, hash) \
             VALUES (?, ?, ?, ?, ?, ?)"
        ))
        .bind(&a.host)
        .bind(h.ts_us)
        .bind(h.segment)
        .bind(h.block)
        .bind(h.records)
        .bind(hex::encode(h.hash))
        .execute()
        .await;
    match sent {
        Ok(()) => *anchored = Some(h.block),
        Err(e) => tracing::warn!("clickhouse: the local log's head was not sent: {e}"),
    }
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
    // Records written against frames are read with the frames of their segment.
    let mut table = ContextTable::default();
    let mut segment = from.segment;
    if from.offset > 0 {
        if let Ok(before) = s.frames_before(from) {
            for f in before.iter() {
                let _ = table.add(&f[1..]);
            }
        }
    }
    let mut events = 0u64;
    for (seg, r) in records.iter_with_segments() {
        if seg != segment {
            table.clear();
            segment = seg;
        }
        if framed::is_frame(r) {
            let _ = table.add(&r[1..]);
            continue;
        }
        events += 1;
        let decoded = if framed::is_framed_record(r) {
            table.event(r)
        } else {
            record::decode_any(r, &mut scratch).and_then(|ev| ev.to_event())
        };
        match decoded {
            Ok(ev) => {
                let _ = serde_json::to_writer(&mut text, &ev);
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
                "clickhouse refused {events} events {MAX_REFUSALS} times; set aside in {}",
                path.display()
            );
            shared.rejected.fetch_add(events, Ordering::Relaxed);
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

    /// The sequence numbers and texts of the events among `records` (its frames read into
    /// `table` as they come).
    fn seqs_of(table: &mut ContextTable, records: &Records) -> Vec<(u64, String)> {
        records
            .iter()
            .filter_map(|r| {
                if framed::is_frame(r) {
                    table.add(&r[1..]).unwrap();
                    return None;
                }
                let ev = table.event(r).unwrap();
                Some((ev.seq, ev.statement.as_str().to_string()))
            })
            .collect()
    }

    #[test]
    fn a_batch_encoded_for_the_spool_reads_back_event_by_event() {
        let batch: Vec<Box<AuditEvent>> = ["SELECT 1", "", "UPDATE t SET a = $1"]
            .iter()
            .enumerate()
            .map(|(i, sql)| {
                Box::new(AuditEvent {
                    seq: i as u64 + 1,
                    statement: (*sql).into(),
                    ..AuditEvent::of_kind(EventKind::Statement)
                })
            })
            .collect();
        // A reused buffer's old records do not leak into the batch.
        let mut stale = Records::default();
        stale.push_with(|out| out.extend_from_slice(b"stale bytes"));
        let enc = Encoded::of(&batch, stale, &mut Framer::default());
        assert!(enc.new_segment);
        assert_eq!(enc.events, 3);
        let back = seqs_of(&mut ContextTable::default(), &enc.records);
        assert_eq!(
            back,
            [
                (1, "SELECT 1".to_string()),
                (2, String::new()),
                (3, "UPDATE t SET a = $1".to_string())
            ]
        );
    }

    /// Events of `sessions` sessions, `per` each after its start, interleaved: statements
    /// whose texts repeat (shapes) and differ (records of their own), with parameters.
    fn sessions(first: u64, sessions: u64, per: u64) -> Vec<Box<AuditEvent>> {
        let mut out = Vec::new();
        for i in 0..per + 1 {
            for s in 0..sessions {
                let session = first + s;
                let mut ev = if i == 0 {
                    AuditEvent::of_kind(EventKind::SessionStart)
                } else {
                    AuditEvent {
                        statement: match i % 3 {
                            0 => "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
                            1 => format!("SELECT {i} FROM t{session}").into(),
                            _ => "UPDATE pgbench_branches SET bbalance = bbalance + $1".into(),
                        },
                        params: [format!("hmac:{:016x}", session * 1000 + i)].into(),
                        ..AuditEvent::of_kind(EventKind::Statement)
                    }
                };
                ev.event_id = crate::audit::event::new_event_id();
                ev.session_id = format!("host:{session}").into();
                ev.pid = 1000 + session as u32;
                ev.db_user = format!("user{session}").into();
                ev.seq = i;
                out.push(Box::new(ev));
            }
        }
        out
    }

    /// A local log writing new files past 4 KiB, and a ClickHouse sink whose server is
    /// not there (every record stays in its spool), in `dir`.
    fn log_and_spool(dir: &std::path::Path) -> (crate::sink::local::LocalLogSink, ClickHouseSink) {
        use crate::sink::local::{LocalLogConfig, LocalLogSink};
        let log_cfg = LocalLogConfig {
            enabled: true,
            rotate_bytes: 4096,
        };
        let log = LocalLogSink::open(&dir.join("log"), &dir.join("seal.key"), &log_cfg, "h", None)
            .unwrap();
        let cfg = ClickHouseConfig {
            enabled: true,
            // Nothing listens (loopback).
            url: "http://127.0.0.1:9".into(),
            ..Default::default()
        };
        (
            log,
            ClickHouseSink::start(&cfg, &dir.join("spool"), None).unwrap(),
        )
    }

    /// Sends `batch` to the log then the spool as the sink thread does (the spool asks
    /// for the records, the log fills them); the log's result.
    fn send_both(
        log: &mut crate::sink::local::LocalLogSink,
        ch: &mut ClickHouseSink,
        batch: &Batch,
    ) -> Result<(), SinkError> {
        let mut handover = Handover::default();
        ch.want_records(&mut handover);
        let logged = log.send_with(batch, &mut handover);
        assert!(handover.to_fill().is_none(), "the log filled them");
        ch.send_with(batch, &mut handover).unwrap();
        // As the sink thread does after each batch: the log seals a block.
        logged.and_then(|()| log.flush())
    }

    /// The events in the spool at `dir`, each segment's records read with its frames only.
    fn spooled(dir: &std::path::Path) -> Vec<AuditEvent> {
        let mut spool = Spool::open(dir, 64 << 20).unwrap();
        let (records, _) = spool.read_from(spool.cursor(), 100_000, u64::MAX).unwrap();
        let mut table = ContextTable::default();
        let mut segment = None;
        let mut events = Vec::new();
        for (seg, r) in records.iter_with_segments() {
            if segment != Some(seg) {
                table.clear();
                segment = Some(seg);
            }
            if framed::is_frame(r) {
                table.add(&r[1..]).unwrap();
            } else {
                events.push(table.event(r).unwrap());
            }
        }
        events
    }

    fn assert_events(got: &[AuditEvent], want: &[&AuditEvent]) {
        assert_eq!(got.len(), want.len());
        for (got, want) in got.iter().zip(want) {
            assert_eq!(got, *want);
        }
    }

    /// With the local log on, the spool takes the records the log encoded (no second
    /// encoding), and they read back as the events, each spool segment on its own: also
    /// when the log knew the sessions before the ClickHouse sink's first batch (its first
    /// spool segment must not refer to frames the log wrote earlier), and when the log
    /// starts new files in the middle of batches.
    #[test]
    fn the_spool_takes_the_local_logs_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut ch) = log_and_spool(dir.path());
        // Before the spool's first batch: the log alone knows these sessions' contexts
        // and shapes.
        let before: Batch = Arc::new(sessions(1, 3, 4));
        log.send(&before).unwrap();
        let batches: Vec<Batch> = vec![
            Arc::new(sessions(1, 3, 5)),
            Arc::new(sessions(2, 4, 60)),
            Arc::new(sessions(10, 2, 3)),
        ];
        for batch in &batches {
            send_both(&mut log, &mut ch, batch).unwrap();
        }
        let ch: Box<dyn Sink> = Box::new(ch);
        ch.finish(Duration::ZERO).unwrap();
        Box::new(log).finish(Duration::ZERO).unwrap();

        let sent: Vec<&AuditEvent> = batches
            .iter()
            .flat_map(|b| b.iter().map(|e| &**e))
            .collect();
        assert_events(&spooled(&dir.path().join("spool")), &sent);
        let log_dir = dir.path().join("log");
        let mut logged = Vec::new();
        crate::sink::local::read(&log_dir, |ev| logged.push(ev)).unwrap();
        let all: Vec<&AuditEvent> = before.iter().map(|e| &**e).chain(sent).collect();
        assert_events(&logged, &all);
        let files = crate::sink::local::segment_files(&log_dir).unwrap().len();
        assert!(
            files > 3,
            "the log started new files in the middle of batches: {files}"
        );
    }

    /// A log that cannot write (its directory gone: no new file can be made) costs the
    /// spool nothing: it still gets every event, encoded by the failing log.
    #[test]
    fn the_spool_keeps_what_the_local_log_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut ch) = log_and_spool(dir.path());
        let first: Batch = Arc::new(sessions(1, 2, 3));
        send_both(&mut log, &mut ch, &first).unwrap();
        std::fs::remove_dir_all(dir.path().join("log")).unwrap();
        let batches: Vec<Batch> = vec![Arc::new(sessions(1, 3, 60)), Arc::new(sessions(5, 1, 2))];
        for batch in &batches {
            assert!(
                send_both(&mut log, &mut ch, batch).is_err(),
                "the log fails"
            );
        }
        let ch: Box<dyn Sink> = Box::new(ch);
        ch.finish(Duration::ZERO).unwrap();
        let sent: Vec<&AuditEvent> = std::iter::once(&first)
            .chain(&batches)
            .flat_map(|b| b.iter().map(|e| &**e))
            .collect();
        assert_events(&spooled(&dir.path().join("spool")), &sent);
    }

    /// The spool thread with a full spool (drop mode): a batch that finds no room is
    /// dropped and counted, and the next one that does is preceded by a gap saying how
    /// many; the spool's size it reports is exact.
    #[test]
    fn a_full_spool_drops_batches_and_records_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Mutex::new(Spool::open(dir.path(), 1 << 20).unwrap()));
        let shared = Arc::new(Shared::default());
        // A rendezvous: a send returns once the thread took it.
        let (tx, rx) = mpsc::sync_channel(0);
        let (back, _recycled) = mpsc::sync_channel(4);
        let start_over = Arc::new(AtomicBool::new(false));
        let thread = {
            let (spool, shared, start_over) = (spool.clone(), shared.clone(), start_over.clone());
            std::thread::spawn(move || {
                spool_loop(
                    rx,
                    back,
                    spool,
                    shared,
                    Arc::new(Notify::new()),
                    1000,
                    WhenSpoolFull::Drop,
                    start_over,
                )
            })
        };
        // The sink thread's encoder, starting over when the spool thread says so.
        let framer = std::cell::RefCell::new(Framer::default());
        let batch = |first: u64, n: u64| -> Vec<Box<AuditEvent>> {
            (first..first + n)
                .map(|seq| {
                    Box::new(AuditEvent {
                        seq,
                        statement: "SELECT pad FROM t".repeat(20).into(),
                        ..AuditEvent::of_kind(EventKind::Statement)
                    })
                })
                .collect()
        };
        let sent = |tx: &mpsc::SyncSender<Encoded>, b: Vec<Box<AuditEvent>>| {
            let mut framer = framer.borrow_mut();
            if start_over.swap(false, Ordering::AcqRel) {
                framer.start_over();
            }
            tx.send(Encoded::of(&b, Records::default(), &mut framer))
                .unwrap();
            // An empty one: taken once the thread is done with the batch.
            tx.send(Encoded {
                records: Records::default(),
                events: 0,
                new_segment: false,
                first_ts: None,
            })
            .unwrap();
        };
        // What the spool holds from its cursor on (frames read as they come, from the
        // cursor's segment's start).
        let seqs = |spool: &Arc<Mutex<Spool>>| -> Vec<(u64, String)> {
            let mut s = spool.lock().unwrap();
            let from = s.cursor();
            let mut table = ContextTable::default();
            for f in s.frames_before(from).unwrap().iter() {
                table.add(&f[1..]).unwrap();
            }
            let (records, _) = s.read_from(from, 1000, u64::MAX).unwrap();
            seqs_of(&mut table, &records)
        };
        // The first batch finds an empty spool (and fills it past 1000 bytes).
        sent(&tx, batch(1, 3));
        let full = spool.lock().unwrap().pending_bytes();
        assert!(full >= 1000, "{full}");
        assert_eq!(shared.spool_bytes.load(Ordering::Relaxed), full);
        sent(&tx, batch(4, 2));
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(seqs(&spool).len(), 3);
        // Delivered: room again. The gap comes before the next batch.
        {
            let mut s = spool.lock().unwrap();
            let from = s.cursor();
            let (_, end) = s.read_from(from, 1000, u64::MAX).unwrap();
            s.commit(end).unwrap();
        }
        sent(&tx, batch(6, 1));
        let after = seqs(&spool);
        assert_eq!(after.len(), 2, "{after:?}");
        assert_eq!(
            after[0],
            (
                0,
                "(2 events were dropped: the ClickHouse spool was full)".to_string()
            )
        );
        assert_eq!(after[1].0, 6);
        assert_eq!(
            shared.spool_bytes.load(Ordering::Relaxed),
            spool.lock().unwrap().pending_bytes()
        );
        assert_eq!(shared.spooled.load(Ordering::Relaxed), 4);
        drop(tx);
        thread.join().unwrap();
    }

    #[test]
    fn a_gap_for_dropped_events_says_why() {
        let mut u = Unreported::default();
        assert!(!u.any());
        u.add(Some(DropReason::Full), 2);
        assert_eq!(
            u.statement(),
            "(2 events were dropped: the ClickHouse spool was full)"
        );
        assert!(u.flags() == ["clickhouse_spool_full"][..]);
        let mut w = Unreported::default();
        w.add(Some(DropReason::WriteFailed), 3);
        assert!(w.any());
        assert_eq!(
            w.statement(),
            "(3 events were dropped: writing the ClickHouse spool failed, see the daemon's log)"
        );
        assert!(w.flags() == ["clickhouse_spool_write_failed"][..]);
        u.add(Some(DropReason::WriteFailed), 2);
        // Dropped while awaiting the start: under the reason before.
        u.add(None, 1);
        assert_eq!(
            u.statement(),
            "(5 events were dropped: 2 when the ClickHouse spool was full, 3 when writing it failed, see the daemon's log)"
        );
        assert!(u.flags() == ["clickhouse_spool_full", "clickhouse_spool_write_failed"][..]);
    }

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

    /// The INSERT names its columns: they must be the table's, in the order a row holds
    /// them (the fields' order), for both layouts.
    #[test]
    fn row_columns_are_the_tables() {
        for (version, columns) in [
            ("18.16.1", &COMPAT_COLUMNS[..]),
            ("24.3.1", &MODERN_COLUMNS[..]),
        ] {
            let f = Features::of_version(version);
            let table: Vec<String> = column_definitions(FIELDS, f.style(), |_| true)
                .iter()
                .map(|c| c.split_whitespace().next().unwrap().to_string())
                .collect();
            assert_eq!(table, columns, "{version}");
        }
        assert!(COMPAT_COLUMNS.contains(&"ts_us") && COMPAT_COLUMNS.contains(&"label_values"));
    }

    #[test]
    fn a_field_added_later_gets_its_own_migration() {
        let mut fields = FIELDS.to_vec();
        fields.push(
            FieldSpec::new::<crate::text::Text>("approver")
                .lc()
                .since(40),
        );
        fields.push(FieldSpec::new::<u64>("approval_seq").since(40));
        fields.push(FieldSpec::new::<bool>("masked").since(41));
        let m = migrations_of(&fields, "auditor", Features::of_version("24.3.1"), 0);
        let n = m.len();
        assert_eq!((m[n - 2].version, m[n - 1].version), (40, 41));
        assert!(!m[0].statements[0].contains("approver"));
        assert_eq!(
            m[n - 2].add_columns,
            [
                ("approver", "approver LowCardinality(String)".to_string()),
                ("approval_seq", "approval_seq UInt64".to_string()),
            ]
        );
        // The views are made again, so that `SELECT *` includes the new columns.
        assert!(m[n - 2]
            .statements
            .iter()
            .any(|s| s.starts_with("CREATE VIEW auditor.statements")));
        assert_eq!(m[n - 1].name, "columns masked");
        // Today: the table, the views, message_bytes, the policy columns, the approval
        // columns, then the masked value counts.
        let today = migrations("auditor", Features::of_version("18.16.1"), 0);
        let versions: Vec<u32> = today.iter().map(|m| m.version).collect();
        assert_eq!(versions, [1, 2, 3, 4, 5, 6, LOG_HEADS_VERSION]);
        assert_eq!(
            today[2].add_columns,
            [("message_bytes", "message_bytes UInt64".to_string())]
        );
        let added: Vec<&str> = today[3].add_columns.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            added,
            [
                "policy",
                "policy_version",
                "decision",
                "decision_rule",
                "masked_columns"
            ]
        );
        let added: Vec<&str> = today[4].add_columns.iter().map(|(n, _)| *n).collect();
        assert_eq!(added, ["approval_id", "approver"]);
        assert_eq!(
            today[5].add_columns,
            [("masked_values", "masked_values Array(UInt64)".to_string())]
        );
    }
}
