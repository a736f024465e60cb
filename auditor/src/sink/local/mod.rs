//! The embedded default sink: an append-only log of sealed binary segments under
//! `state_dir/log` (format: `segment.rs`, docs/local-log.md).
//!
//! Events are written as compact records (the spool's record layout, no JSON); records are
//! grouped in blocks, and each block is sealed: its hash covers its records' digests and
//! the previous block's hash, and, once `auditor log setup-keys` has made a key, an HMAC
//! under a forward-secure key (`seal.rs`) vouches for it. A block is sealed whenever the
//! sink flushes (every batch: at most about a second after its events were handed on), at
//! 1 MiB, at every epoch of the key even with no records (so a stretch with no seal means
//! no daemon ran), and when the daemon starts and stops. The last block is named in
//! `log/HEAD`, so a log cut short is seen by `auditor verify` and by the next daemon.
//! A crash loses nothing written, but leaves the records after the last seal unsealed;
//! `auditor verify` says so.
//!
//! JSON is rendered only where a person or a tool asks: `auditor tail`, `show`,
//! `sessions`, `export`. Logs of the first format (hash-chained JSON Lines, `legacy.rs`)
//! are still read and verified; the first segment continues their chain.

pub mod compact;
pub mod legacy;
pub mod seal;
pub mod segment;

use std::{
    fs::File,
    io::{BufReader, Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::{
    seal::{SealError, SealingKey},
    segment::{Header, Reason, Seal},
};
use crate::{
    audit::event::{AuditEvent, EventKind, Flag, Timestamp},
    sink::{framed, spool::Records, Batch, Handover, Health, Sink, SinkError},
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalLogConfig {
    /// Write the sealed log under `state_dir/log`. Default: true.
    pub enabled: bool,
    /// Start a new segment file past this size. Default: 100 MiB.
    pub rotate_bytes: u64,
}

impl Default for LocalLogConfig {
    fn default() -> Self {
        LocalLogConfig {
            enabled: true,
            rotate_bytes: 100 << 20,
        }
    }
}

impl LocalLogConfig {
    /// Checks the values; Err names the field and the problem.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.rotate_bytes < 4096 {
            return Err(("rotate_bytes", "must be at least 4096".into()));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalLogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error(transparent)]
    Seal(#[from] SealError),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalLogError + '_ {
    move |source| LocalLogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The sealing key's file: beside the log, not in it.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("seal.key")
}

const SEGMENT_EXT: &str = ".alog";
const HEAD_FILE: &str = "HEAD";
const HEAD_MAGIC: &[u8; 8] = b"AUDHEAD1";
/// magic, segment, block, records, ts, hash, check.
const HEAD_LEN: usize = 8 + 8 + 8 + 8 + 8 + 32 + 8;
/// A block is sealed at this size even before the sink flushes.
const BLOCK_BYTES: usize = 1 << 20;
/// Without a key, a block is still sealed this often when nothing happens.
const HEARTBEAT_US: i64 = 60_000_000;

/// `events-NNNNNN<ext>` files in `dir`, oldest first.
pub(crate) fn files_ending(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, LocalLogError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("events-") && n.ends_with(ext))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(dir)(e)),
    };
    files.sort();
    Ok(files)
}

/// The segment files in `dir`, oldest first.
pub fn segment_files(dir: &Path) -> Result<Vec<PathBuf>, LocalLogError> {
    files_ending(dir, SEGMENT_EXT)
}

/// Every file of the log, both formats, in reading order (the old files first).
pub fn log_files(dir: &Path) -> Result<Vec<PathBuf>, LocalLogError> {
    let mut files = legacy::log_files(dir)?;
    files.extend(segment_files(dir)?);
    Ok(files)
}

fn index_of(path: &Path) -> u64 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("events-"))
        .and_then(|n| n.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn segment_name(index: u64) -> String {
    format!("events-{index:06}{SEGMENT_EXT}")
}

/// The head as the writer last sealed it, shared with the ClickHouse sink, which sends it
/// with its inserts: a copy of the log's end the host cannot rewrite
/// (`auditor verify --against-clickhouse`).
pub type SharedHead = std::sync::Arc<std::sync::Mutex<Option<Head>>>;

/// Where the log ended when it was last sealed (`log/HEAD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub segment: u64,
    pub block: u64,
    pub records: u64,
    pub ts_us: i64,
    pub hash: [u8; 32],
}

impl Head {
    fn encode(&self) -> [u8; HEAD_LEN] {
        let mut b = [0u8; HEAD_LEN];
        b[..8].copy_from_slice(HEAD_MAGIC);
        b[8..16].copy_from_slice(&self.segment.to_le_bytes());
        b[16..24].copy_from_slice(&self.block.to_le_bytes());
        b[24..32].copy_from_slice(&self.records.to_le_bytes());
        b[32..40].copy_from_slice(&self.ts_us.to_le_bytes());
        b[40..72].copy_from_slice(&self.hash);
        let c = Sha256::digest(&b[..72]);
        b[72..80].copy_from_slice(&c[..8]);
        b
    }

    fn decode(b: &[u8]) -> Option<Head> {
        if b.len() < HEAD_LEN || &b[..8] != HEAD_MAGIC || Sha256::digest(&b[..72])[..8] != b[72..80]
        {
            return None;
        }
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Some(Head {
            segment: u(8),
            block: u(16),
            records: u(24),
            ts_us: u(32) as i64,
            hash: b[40..72].try_into().expect("32 bytes"),
        })
    }

    /// The head of the log in `dir`: None if there is none; Err if it is damaged.
    pub fn read(dir: &Path) -> Result<Option<Head>, LocalLogError> {
        let path = dir.join(HEAD_FILE);
        match std::fs::read(&path) {
            Ok(b) => Head::decode(&b).map(Some).ok_or(LocalLogError::Corrupt {
                path,
                what: "not a head of the local log (damaged or overwritten)".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// Where the chain stood at the end of the files, as a new writer continues it.
#[derive(Debug, Clone, Default)]
struct Tail {
    /// The last segment's index (or the last old file's).
    index: u64,
    prev: [u8; 32],
    next_block: u64,
    records: u64,
    /// Records after the last seal (a crash), and bytes of a frame cut short.
    unsealed: u64,
    torn: u64,
}

/// Reads the end of the chain: the last seal of the newest segment with a header (or the
/// old files' last line).
fn find_tail(dir: &Path) -> Result<Tail, LocalLogError> {
    let segments = segment_files(dir)?;
    for path in segments.iter().rev() {
        let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err(path))?);
        let mut hb = [0u8; segment::HEADER_LEN];
        if r.read_exact(&mut hb).is_err() {
            continue; // created, never written: the one before holds the end
        }
        let Some(h) = Header::decode(&hb) else {
            return Err(LocalLogError::Corrupt {
                path: path.clone(),
                what: "not a segment of the local log (run `auditor verify`)".into(),
            });
        };
        let mut tail = Tail {
            index: h.segment.max(index_of(path)),
            prev: h.prev_hash,
            next_block: h.first_block,
            records: h.records_before,
            ..Tail::default()
        };
        let mut fh = [0u8; segment::FRAME_HEADER];
        let mut payload = Vec::new();
        loop {
            match r.read_exact(&mut fh) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io_err(path)(e)),
            }
            let len = u32::from_le_bytes(fh[1..5].try_into().expect("4 bytes")) as usize;
            if !matches!(
                fh[0],
                segment::KIND_RECORD | segment::KIND_SEAL | segment::KIND_CONTEXT
            ) || len > segment::MAX_FRAME
            {
                tail.torn += 1;
                break;
            }
            payload.resize(len, 0);
            if r.read_exact(&mut payload).is_err() {
                tail.torn += 1;
                break;
            }
            if fh[0] != segment::KIND_SEAL {
                tail.unsealed += 1;
            } else if let Some(s) = Seal::decode(&payload) {
                tail.prev = s.hash;
                tail.next_block = s.block + 1;
                tail.records = s.records;
                tail.unsealed = 0;
            }
        }
        return Ok(tail);
    }
    // No segment yet: continue the old format's chain, if there is one.
    let old = legacy::log_files(dir)?;
    let Some(last) = old.last() else {
        return Ok(Tail::default());
    };
    let mut tail = Tail {
        index: index_of(last),
        ..Tail::default()
    };
    for path in &old {
        let text = std::fs::read(path).map_err(io_err(path))?;
        tail.records += text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
        if let Some(line) = text.split(|b| *b == b'\n').rfind(|l| !l.is_empty()) {
            let hash = line
                .strip_suffix(b"\"}")
                .and_then(|l| l.get(l.len().saturating_sub(64)..))
                .and_then(|h| hex::decode(h).ok());
            if let Some(h) = hash.filter(|h| h.len() == 32) {
                tail.prev.copy_from_slice(&h);
            }
        }
    }
    Ok(tail)
}

/// What opening the log found of the previous writer's end.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// Records after the last seal of the previous run (it did not stop cleanly).
    pub unsealed: u64,
    /// The log ends before its head: records removed while no daemon ran.
    pub truncated: Option<String>,
}

/// The writer.
pub struct SealedLog {
    dir: PathBuf,
    rotate_bytes: u64,
    segment: u64,
    file: File,
    size: u64,
    head: File,
    prev: [u8; 32],
    next_block: u64,
    /// Records in sealed blocks.
    records: u64,
    /// Frames of the open block, written when it is sealed.
    pending: Vec<u8>,
    digests: Vec<u8>,
    count: u32,
    key: Option<SealingKey>,
    last_seal_us: i64,
    last_epoch: u64,
    /// The last write failed: the next block starts a new segment after the last good one.
    broken: bool,
    scratch: Vec<u8>,
    context: Vec<u8>,
    /// A statement shape's payload (written before the record that first uses it).
    shape: Vec<u8>,
    contexts: compact::Contexts,
    shared: Option<SharedHead>,
}

impl SealedLog {
    /// Opens the log in `dir`, continuing its chain in a new segment, sealed with the key at
    /// `key_path` if there is one. Seals a start block at once.
    pub fn open(
        dir: &Path,
        key_path: &Path,
        rotate_bytes: u64,
    ) -> Result<(Self, OpenReport), LocalLogError> {
        crate::fsutil::private_dir(dir).map_err(io_err(dir))?;
        for f in log_files(dir)? {
            crate::fsutil::make_private(&f).map_err(io_err(&f))?;
        }
        let tail = find_tail(dir)?;
        let mut report = OpenReport {
            unsealed: tail.unsealed,
            truncated: None,
        };
        match Head::read(dir) {
            Ok(Some(h)) if h.records > tail.records || h.block >= tail.next_block => {
                report.truncated = Some(format!(
                    "the local log ends at record {} (block {}) but its head, written when the \
                     last block was sealed, names record {} (block {}, sealed {}): {} records \
                     were removed while no daemon ran",
                    tail.records,
                    tail.next_block.saturating_sub(1),
                    h.records,
                    h.block,
                    Timestamp(h.ts_us),
                    h.records.saturating_sub(tail.records)
                ));
            }
            Ok(Some(h)) if h.block + 1 == tail.next_block && h.hash != tail.prev => {
                report.truncated = Some(format!(
                    "the last block of the local log (block {}) is not the one its head names: \
                     it was replaced while no daemon ran",
                    h.block
                ));
            }
            Ok(_) => {}
            Err(e) => {
                report.truncated = Some(format!("{e}: the end of the log cannot be checked"));
            }
        }
        let head_path = dir.join(HEAD_FILE);
        let head = crate::fsutil::private_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&head_path)
            .map_err(io_err(&head_path))?;
        let mut key = SealingKey::load(key_path)?;
        let now = Timestamp::now().unix_micros();
        if let Some(k) = key.as_mut() {
            let e = k.epochs().epoch_at(now);
            k.advance_to(e)?;
        }
        let segment = tail.index + 1;
        let (file, size) = create_segment(dir, segment, &tail)?;
        let mut log = SealedLog {
            dir: dir.to_path_buf(),
            rotate_bytes: rotate_bytes.max(4096),
            segment,
            file,
            size,
            head,
            prev: tail.prev,
            next_block: tail.next_block,
            records: tail.records,
            pending: Vec::with_capacity(BLOCK_BYTES + 64 * 1024),
            digests: Vec::new(),
            count: 0,
            key,
            last_seal_us: now,
            last_epoch: 0,
            broken: false,
            scratch: Vec::with_capacity(4096),
            context: Vec::with_capacity(4096),
            shape: Vec::with_capacity(4096),
            contexts: compact::Contexts::default(),
            shared: None,
        };
        log.seal(Reason::Start)?;
        Ok((log, report))
    }

    pub fn current_path(&self) -> PathBuf {
        self.dir.join(segment_name(self.segment))
    }

    /// Publishes each new head to `shared` (from the next seal on).
    pub fn share_head(&mut self, shared: SharedHead) {
        self.shared = Some(shared);
    }

    pub fn is_sealed(&self) -> bool {
        self.key.is_some()
    }

    /// Appends one event to the open block (written when the block is sealed), after its
    /// session's context when the segment does not hold that yet.
    pub fn append(&mut self, ev: &AuditEvent) -> Result<(), LocalLogError> {
        self.append_to(ev, None)
    }

    /// As `append`, also appending the event's payloads to `tee` as the ClickHouse spool
    /// takes them (`framed.rs`; the same frames and record, encoded once), whether or not
    /// the log could take the event: the spool never loses an event to the log's failure.
    pub fn append_to(
        &mut self,
        ev: &AuditEvent,
        tee: Option<&mut Records>,
    ) -> Result<(), LocalLogError> {
        // A new segment begins at a block's edge, before anything is written against the
        // contexts of the one before. After a failure the log writes again only from a new
        // segment, whose contexts start empty: a frame encoded while it failed is written
        // again there.
        let room = if self.broken
            || (self.size > segment::HEADER_LEN as u64
                && self.size + self.pending.len() as u64 >= self.rotate_bytes)
        {
            if self.count > 0 && !self.broken {
                self.seal(Reason::Flush)
            } else {
                Ok(())
            }
            .and_then(|()| self.new_segment())
        } else {
            Ok(())
        };
        self.scratch.clear();
        self.context.clear();
        self.shape.clear();
        let before =
            self.contexts
                .encode(ev, &mut self.context, &mut self.shape, &mut self.scratch);
        if let Some(tee) = tee {
            framed::push_encoded(tee, before, &self.context, &self.shape, &self.scratch);
        }
        room?;
        for (wrote, payload) in [(before.context, &self.context), (before.shape, &self.shape)] {
            if wrote {
                self.digests.extend_from_slice(&segment::digest(payload));
                segment::write_frame(&mut self.pending, segment::KIND_CONTEXT, payload);
                self.count += 1;
            }
        }
        self.digests
            .extend_from_slice(&segment::digest(&self.scratch));
        segment::write_record_frame(&mut self.pending, &self.scratch);
        self.count += 1;
        if self.pending.len() >= BLOCK_BYTES {
            self.seal(Reason::Flush)?;
        }
        Ok(())
    }

    /// Forgets every context and shape (see [`compact::Contexts::forget`]): the events
    /// that follow write their frames again, as the first of a segment do.
    pub fn forget_contexts(&mut self) {
        self.contexts.forget();
    }

    /// Continues the chain in a new segment file; the contexts of the old one are not
    /// referred to from it.
    fn new_segment(&mut self) -> Result<(), LocalLogError> {
        if !self.broken {
            let path = self.current_path();
            self.file.sync_data().map_err(io_err(&path))?;
        }
        let tail = Tail {
            index: self.segment,
            prev: self.prev,
            next_block: self.next_block,
            records: self.records,
            ..Tail::default()
        };
        let (file, size) = create_segment(&self.dir, self.segment + 1, &tail)?;
        self.segment += 1;
        self.file = file;
        self.size = size;
        self.broken = false;
        self.contexts.forget();
        Ok(())
    }

    /// Seals the open block if it holds records.
    pub fn flush(&mut self) -> Result<(), LocalLogError> {
        if self.count > 0 {
            self.seal(Reason::Flush)?;
        }
        Ok(())
    }

    /// Seals an empty block when an epoch (or, unsealed, a minute) passed without one.
    pub fn tick(&mut self) -> Result<(), LocalLogError> {
        let now = Timestamp::now().unix_micros();
        let due = match &self.key {
            Some(k) => k.epochs().epoch_at(now) > self.last_epoch,
            None => now - self.last_seal_us >= HEARTBEAT_US,
        };
        if due {
            let reason = if self.count > 0 {
                Reason::Flush
            } else {
                Reason::Heartbeat
            };
            self.seal(reason)?;
        }
        Ok(())
    }

    /// Seals the last block (with its records) as the clean end of this run, and syncs.
    pub fn stop(&mut self) -> Result<(), LocalLogError> {
        self.seal(Reason::Stop)?;
        let path = self.current_path();
        self.file.sync_data().map_err(io_err(&path))?;
        let head = self.dir.join(HEAD_FILE);
        self.head.sync_data().map_err(io_err(&head))
    }

    fn seal(&mut self, reason: Reason) -> Result<(), LocalLogError> {
        let mut now = Timestamp::now().unix_micros();
        let (epoch, key_id) = match self.key.as_mut() {
            Some(k) => {
                let held = k.advance_to(k.epochs().epoch_at(now))?;
                // A clock that went back: the key never does, so the block's time is
                // the start of the epoch it is sealed in.
                now = now.max(k.epochs().epoch_start(held));
                (held, k.id())
            }
            None => (0, [0u8; 8]),
        };
        let mut s = Seal {
            block: self.next_block,
            records: self.records + u64::from(self.count),
            count: self.count,
            reason: reason as u8,
            epoch,
            ts_us: now,
            key_id,
            hash: [0; 32],
            seal: [0; 32],
            digests: std::mem::take(&mut self.digests),
        };
        s.hash = s.compute_hash(&self.prev);
        if let Some(k) = &self.key {
            s.seal = k.seal(&s.hash);
        }
        s.write_frame(&mut self.pending);
        let result = self.write_block();
        // The block is done either way: its records are written or counted as failed.
        self.digests = std::mem::take(&mut s.digests);
        self.digests.clear();
        self.pending.clear();
        let count = self.count;
        self.count = 0;
        result?;
        self.prev = s.hash;
        self.next_block += 1;
        self.records += u64::from(count);
        self.last_seal_us = now;
        self.last_epoch = epoch;
        let head = Head {
            segment: self.segment,
            block: s.block,
            records: self.records,
            ts_us: now,
            hash: s.hash,
        };
        let path = self.dir.join(HEAD_FILE);
        self.head
            .write_all_at(&head.encode(), 0)
            .map_err(io_err(&path))?;
        if let Some(shared) = &self.shared {
            if let Ok(mut h) = shared.lock() {
                *h = Some(head);
            }
        }
        Ok(())
    }

    /// Writes the open block (records and seal) to the segment; in a new one after a write
    /// failed (only a block without records gets here then: `append` moves on first).
    fn write_block(&mut self) -> Result<(), LocalLogError> {
        if self.broken {
            self.new_segment()?;
        }
        match self.file.write_all(&self.pending) {
            Ok(()) => {
                self.size += self.pending.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(io_err(&self.current_path())(e))
            }
        }
    }
}

fn create_segment(dir: &Path, index: u64, tail: &Tail) -> Result<(File, u64), LocalLogError> {
    let path = dir.join(segment_name(index));
    let mut file = crate::fsutil::private_options()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let header = Header {
        segment: index,
        first_block: tail.next_block,
        records_before: tail.records,
        prev_hash: tail.prev,
    };
    file.write_all(&header.encode()).map_err(io_err(&path))?;
    Ok((file, segment::HEADER_LEN as u64))
}

/// The local log as a [`Sink`].
pub struct LocalLogSink {
    log: SealedLog,
    events: u64,
    errors: u64,
    /// The last write or flush failed.
    failing: bool,
}

impl LocalLogSink {
    pub fn open(
        dir: &Path,
        key_path: &Path,
        cfg: &LocalLogConfig,
        host: &str,
        shared: Option<SharedHead>,
    ) -> Result<Self, LocalLogError> {
        let (mut log, report) = SealedLog::open(dir, key_path, cfg.rotate_bytes)?;
        if let Some(s) = shared {
            log.share_head(s);
        }
        if report.unsealed > 0 {
            tracing::warn!(
                "local log: {} records after the last seal of the previous run were never \
                 sealed (it did not stop cleanly); they stay readable, `auditor verify` lists them",
                report.unsealed
            );
        }
        if let Some(what) = &report.truncated {
            tracing::error!("local log: {what}");
            // Recorded in the trail too: the head now moves on, so the next verify would
            // not see it otherwise.
            let mut ev = AuditEvent::of_kind(EventKind::Gap);
            ev.event_id = crate::audit::event::new_event_id();
            ev.ts = Timestamp::now();
            ev.host = host.into();
            ev.flags.insert(Flag::LogTruncated);
            ev.statement = format!("({what})").into();
            log.append(&ev)?;
            log.flush()?;
        }
        Ok(LocalLogSink {
            log,
            events: 0,
            errors: 0,
            failing: false,
        })
    }

    fn result<T>(&mut self, r: Result<T, LocalLogError>) -> Result<T, SinkError> {
        self.failing = r.is_err();
        r.map_err(|e| {
            self.errors += 1;
            e.into()
        })
    }
}

impl Sink for LocalLogSink {
    fn name(&self) -> &'static str {
        "local_log"
    }

    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.send_with(batch, &mut Handover::default())
    }

    /// Appends the batch, filling `handover`'s records when a later sink asked for them.
    fn send_with(&mut self, batch: &Batch, handover: &mut Handover) -> Result<(), SinkError> {
        let mut tee = handover.to_fill().map(|(records, fresh)| {
            if fresh {
                self.log.forget_contexts();
            }
            records
        });
        let mut first = None;
        for ev in crate::cache::prefetched(batch) {
            match self.log.append_to(ev, tee.as_deref_mut()) {
                Ok(()) => self.events += 1,
                Err(e) => {
                    self.errors += 1;
                    first.get_or_insert(e);
                }
            }
        }
        if tee.is_some() {
            handover.filled();
        }
        self.failing = first.is_some();
        match first {
            None => Ok(()),
            Some(e) => Err(e.into()),
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let r = self.log.flush();
        self.result(r)
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        let r = self.log.tick();
        self.result(r)
    }

    fn health(&self) -> Health {
        Health {
            healthy: !self.failing,
            events: self.events,
            errors: self.errors,
            detail: serde_json::json!({
                "file": self.log.current_path(),
                "sealed": self.log.is_sealed(),
            }),
        }
    }

    fn finish(mut self: Box<Self>, _grace: std::time::Duration) -> Result<Health, SinkError> {
        self.log.stop()?;
        Ok(self.health())
    }
}

mod read;
mod verify;

pub use read::{read, Follower, ReadEnd};
pub use verify::{verify, Anchor, Ending, Report, Verdict, VerifyOptions};

#[cfg(test)]
mod tests;
