//! `auditor verify`: the chain of the old files, then every segment's blocks, their seals
//! (with the verification key), the log's end against its head, and, when asked, against
//! the heads ClickHouse received.

use std::path::{Path, PathBuf};

use super::{
    legacy,
    seal::VerificationKey,
    segment::{self, Frame, Header, Reason, Seal, DIGEST_LEN},
    segment_files, Head, LocalLogError,
};
use crate::audit::event::Timestamp;

#[derive(Debug, Default, Clone)]
pub struct VerifyOptions {
    /// Check every seal with this key.
    pub key: Option<VerificationKey>,
    /// The daemon that writes the log is running now (then its log must reach the current
    /// epoch: a missing end is a truncation, not a crash).
    pub writer_running: bool,
    /// Now, Unix µs.
    pub now_us: i64,
    /// Heads a copy elsewhere received (ClickHouse's `log_heads`), by block: the log must
    /// hold each of these blocks, with this hash.
    pub anchors: Option<Vec<Anchor>>,
}

/// A head the log had when it was sent elsewhere.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub block: u64,
    pub records: u64,
    pub hash: [u8; 32],
    pub ts_us: i64,
}

/// How the log ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// No block at all.
    Empty,
    /// The last block is a clean stop.
    Stopped { ts_us: i64 },
    /// The last block is not a stop: a daemon is writing, or the last one did not stop
    /// cleanly.
    Open { ts_us: i64 },
}

#[derive(Debug, Clone)]
pub struct Report {
    /// Lines and files of the old format.
    pub legacy: (u64, usize),
    pub segments: usize,
    pub blocks: u64,
    /// Records: events, and the session contexts events of the segments refer to.
    pub records: u64,
    /// Events (old lines included).
    pub events: u64,
    /// Blocks whose seal the key checked.
    pub sealed: u64,
    /// The time span of the blocks the key checked.
    pub sealed_span: Option<(i64, i64)>,
    pub ending: Ending,
    /// Things that are not tampering but that a reader of the trail must know (a crash
    /// left records unsealed, the daemon was not running for a while, seals not checked).
    pub notes: Vec<String>,
    pub head: Option<Head>,
    /// Anchors checked, and the latest of them.
    pub anchored: Option<(usize, Option<Anchor>)>,
}

#[derive(Debug, Clone)]
pub enum Verdict {
    Intact(Report),
    Broken {
        path: PathBuf,
        /// The number of the event to blame in the whole log (1-based; a line of the old
        /// format), where one is.
        event: Option<u64>,
        what: String,
    },
}

struct Chain {
    prev: [u8; 32],
    next_block: u64,
    records: u64,
    /// Events through the last block (what messages number).
    events: u64,
    last_epoch: Option<u64>,
    last: Option<(Reason, i64, u64)>,
    /// A block sealed with the key was seen: every later one must be.
    sealing_began: bool,
}

/// Verifies the log in `dir`.
pub fn verify(dir: &Path, opts: &VerifyOptions) -> Result<Verdict, LocalLogError> {
    let (lines, files, head) = match legacy::verify(dir)? {
        legacy::Chain::Intact { lines, files, head } => (lines, files, head),
        legacy::Chain::Broken { path, line, what } => {
            return Ok(Verdict::Broken {
                path,
                event: Some(line),
                what: format!("line {line}: {what}"),
            })
        }
    };
    let mut report = Report {
        legacy: (lines, files),
        segments: 0,
        blocks: 0,
        records: lines,
        events: lines,
        sealed: 0,
        sealed_span: None,
        ending: Ending::Empty,
        notes: Vec::new(),
        head: None,
        anchored: None,
    };
    let anchors = opts.anchors.clone().unwrap_or_default();
    let mut next_anchor = 0usize;
    let mut chain = Chain {
        prev: head,
        next_block: 0,
        records: lines,
        events: lines,
        last_epoch: None,
        last: None,
        sealing_began: false,
    };
    let mut verifier = opts.key.as_ref().map(|k| k.verifier());
    let segments = segment_files(dir)?;
    let mut unsealed_blocks = 0u64;
    // Events in the segments (records also counts the session contexts they refer to).
    let mut events = 0u64;
    let mut first_sealed: Option<(i64, u64)> = None;
    for (i, path) in segments.iter().enumerate() {
        let buf = std::fs::read(path).map_err(super::io_err(path))?;
        let broken = |event: Option<u64>, what: String| {
            Ok(Verdict::Broken {
                path: path.clone(),
                event,
                what,
            })
        };
        let Some(header) = Header::decode(&buf) else {
            if buf.len() < segment::HEADER_LEN && i + 1 == segments.len() {
                report.notes.push(format!(
                    "{}: created but not written (the daemon stopped at once)",
                    path.display()
                ));
                continue;
            }
            return broken(
                None,
                "not a segment of the local log (its header is damaged)".into(),
            );
        };
        if header.segment != super::index_of(path) {
            return broken(
                None,
                format!(
                    "its header names segment {}: the file was renamed or replaced",
                    header.segment
                ),
            );
        }
        if header.prev_hash != chain.prev
            || header.first_block != chain.next_block
            || header.records_before != chain.records
        {
            return broken(
                None,
                format!(
                    "does not continue the log before it (it starts at block {} after record {}, \
                     the log before ends at block {} after record {}): a segment or blocks were \
                     removed, replaced or reordered",
                    header.first_block, header.records_before, chain.next_block, chain.records
                ),
            );
        }
        report.segments += 1;
        // Records of the open block: (offset, digest, whether it is an event).
        let mut block: Vec<(usize, [u8; DIGEST_LEN], bool)> = Vec::new();
        let mut at = segment::HEADER_LEN;
        while let Some((frame, next)) = segment::next_frame(&buf, at) {
            match frame {
                Frame::Record(p) => block.push((at, segment::digest(p), true)),
                Frame::Context(p) => block.push((at, segment::digest(p), false)),
                Frame::Bad { kind, len } => {
                    return broken(
                        None,
                        format!("at byte {at}: not a frame of the log (kind {kind}, length {len})"),
                    )
                }
                Frame::Seal(p) => {
                    let Some(s) = Seal::decode(p) else {
                        return broken(None, format!("at byte {at}: a damaged seal"));
                    };
                    if let Err((record, what)) =
                        check_block(&s, &block, &chain, opts, verifier.as_mut())
                    {
                        return broken(record, what);
                    }
                    while let Some(a) = anchors.get(next_anchor).filter(|a| a.block <= s.block) {
                        if a.block == s.block && (a.hash != s.hash || a.records != s.records) {
                            return broken(
                                Some(chain.events + 1),
                                format!(
                                    "block {} is not the block ClickHouse received at {} (hash \
                                     or record count differ): the log was rewritten since",
                                    s.block,
                                    Timestamp(a.ts_us)
                                ),
                            );
                        }
                        next_anchor += 1;
                    }
                    if s.is_sealed() {
                        chain.sealing_began = true;
                        first_sealed.get_or_insert((s.ts_us, s.block));
                        if opts.key.is_some() {
                            report.sealed += 1;
                            let span = report.sealed_span.get_or_insert((s.ts_us, s.ts_us));
                            span.1 = s.ts_us;
                        }
                    } else {
                        unsealed_blocks += 1;
                    }
                    if let (Some((last_reason, last_ts, last_epoch)), Some(_)) =
                        (chain.last, opts.key.as_ref())
                    {
                        if s.epoch > last_epoch + 1 && last_reason != Reason::Stop && s.is_sealed()
                        {
                            report.notes.push(format!(
                                "no seal from {} to {} and no clean stop before: no daemon ran \
                                 then (killed or crashed)",
                                Timestamp(last_ts),
                                Timestamp(s.ts_us)
                            ));
                        }
                    }
                    chain.prev = s.hash;
                    chain.next_block += 1;
                    chain.records = s.records;
                    let n = block.iter().filter(|b| b.2).count() as u64;
                    chain.events += n;
                    events += n;
                    chain.last_epoch = Some(s.epoch);
                    chain.last = Some((
                        Reason::from_u8(s.reason).unwrap_or(Reason::Flush),
                        s.ts_us,
                        s.epoch,
                    ));
                    report.blocks += 1;
                    block.clear();
                }
            }
            at = next;
        }
        if !block.is_empty() {
            report.notes.push(format!(
                "{}: {} records after its last seal were never sealed (from event {}): the daemon \
                 did not finish writing that block (a crash), or they were appended since; \
                 they are read but no seal vouches for them",
                path.display(),
                block.len(),
                chain.events + 1,
            ));
        }
        if at < buf.len() {
            report.notes.push(format!(
                "{}: ends inside a frame ({} bytes after byte {at}): a write cut short",
                path.display(),
                buf.len() - at
            ));
        }
    }
    if let Some(a) = anchors.get(next_anchor) {
        return Ok(Verdict::Broken {
            path: segments
                .last()
                .cloned()
                .unwrap_or_else(|| dir.to_path_buf()),
            event: Some(chain.events + 1),
            what: format!(
                "truncated: ClickHouse received block {} (through record {}) at {}, but the log \
                 ends at block {} (record {}): what followed was removed",
                a.block,
                a.records,
                Timestamp(a.ts_us),
                chain.next_block.saturating_sub(1),
                chain.records
            ),
        });
    }
    if opts.anchors.is_some() {
        report.anchored = Some((anchors.len(), anchors.last().cloned()));
    }
    report.records = chain.records;
    report.events = lines + events;
    report.ending = match chain.last {
        None => Ending::Empty,
        Some((Reason::Stop, ts, _)) => Ending::Stopped { ts_us: ts },
        Some((_, ts, _)) => Ending::Open { ts_us: ts },
    };
    if opts.key.is_none() && chain.sealing_began {
        report
            .notes
            .push("the seals were not checked: give the verification key (--key)".into());
    } else if let (Some(k), Some((first, _))) = (opts.key.as_ref(), first_sealed) {
        let epochs = k.epochs().epoch_at(first);
        if epochs > 1 {
            report.notes.push(format!(
                "the first seal is from {} ({epochs} epochs after the key was made at {}): \
                 nothing was sealed before it, or what was sealed was removed and the rest \
                 sealed again since",
                Timestamp(first),
                Timestamp(k.epochs().epoch_start(0))
            ));
        }
    }
    if opts.key.is_some() && unsealed_blocks > 0 {
        report.notes.push(format!(
            "{unsealed_blocks} blocks before `auditor log setup-keys` have no seal: their hashes \
             chain, but a root user could have rewritten them consistently"
        ));
    }
    // The end: the head names the last block sealed.
    let last_path = segments
        .last()
        .cloned()
        .unwrap_or_else(|| dir.to_path_buf());
    match Head::read(dir) {
        Ok(Some(h)) => {
            if h.records > chain.records || h.block >= chain.next_block {
                return Ok(Verdict::Broken {
                    path: last_path,
                    event: Some(chain.events + 1),
                    what: format!(
                        "truncated: the log ends at record {} (block {}), but its head names \
                         record {} (block {}, sealed {}): the last {} records were removed",
                        chain.records,
                        chain.next_block.saturating_sub(1),
                        h.records,
                        h.block,
                        Timestamp(h.ts_us),
                        h.records - chain.records.min(h.records)
                    ),
                });
            }
            if h.block + 1 == chain.next_block && h.hash != chain.prev {
                return Ok(Verdict::Broken {
                    path: last_path,
                    event: None,
                    what: format!(
                        "the last block ({}) is not the one the head names: it was replaced",
                        h.block
                    ),
                });
            }
            if h.block + 1 < chain.next_block {
                report.notes.push(format!(
                    "the head names block {} but the log goes on to block {}: blocks were \
                     appended after the last head was written",
                    h.block,
                    chain.next_block - 1
                ));
            }
            report.head = Some(h);
        }
        Ok(None) if report.blocks > 0 => {
            return Ok(Verdict::Broken {
                path: dir.join(super::HEAD_FILE),
                event: None,
                what: "the head of the log is missing: its end cannot be checked (removed?)".into(),
            })
        }
        Ok(None) => {}
        Err(e) => {
            return Ok(Verdict::Broken {
                path: dir.join(super::HEAD_FILE),
                event: None,
                what: e.to_string(),
            })
        }
    }
    // With the key, a running writer's log reaches the current epoch.
    if let (Some(k), Some((reason, ts, epoch))) = (opts.key.as_ref(), chain.last) {
        let now_epoch = k.epochs().epoch_at(opts.now_us);
        if opts.writer_running && reason != Reason::Stop && epoch + 1 < now_epoch {
            return Ok(Verdict::Broken {
                path: last_path,
                event: Some(chain.events + 1),
                what: format!(
                    "truncated: the daemon writing this log is running, but its last seal is \
                     from {} (epoch {epoch}, now {now_epoch}): what it sealed since was removed",
                    Timestamp(ts)
                ),
            });
        }
    }
    Ok(Verdict::Intact(report))
}

/// Checks one block against its seal; Err names the record to blame (if one) and what.
fn check_block(
    s: &Seal,
    block: &[(usize, [u8; DIGEST_LEN], bool)],
    chain: &Chain,
    opts: &VerifyOptions,
    verifier: Option<&mut super::seal::Verifier>,
) -> Result<(), (Option<u64>, String)> {
    let first = chain.events + 1;
    if s.block != chain.next_block {
        return Err((
            Some(first),
            format!(
                "block {} where block {} was due: blocks were removed or reordered",
                s.block, chain.next_block
            ),
        ));
    }
    let listed: Vec<&[u8]> = s.digests.chunks(DIGEST_LEN).collect();
    let found: Vec<&[u8]> = block.iter().map(|(_, d, _)| &d[..]).collect();
    if listed != found {
        let i = listed
            .iter()
            .zip(&found)
            .position(|(l, f)| l != f)
            .unwrap_or(listed.len().min(found.len()));
        // Named by the event it is, or the event its session context comes before.
        let record =
            chain.events + block[..i.min(block.len())].iter().filter(|b| b.2).count() as u64 + 1;
        let name = match block.get(i) {
            Some((_, _, false)) => format!("the session context before event {record}"),
            _ => format!("event {record}"),
        };
        let what = match (found.get(i), listed.get(i)) {
            (_, Some(l)) if found.len() < listed.len() && !found.contains(l) => {
                "removed: the record its block's seal lists here is not there"
            }
            (Some(f), _) if found.len() > listed.len() && !listed.contains(f) => {
                "added: its block's seal does not list it"
            }
            (Some(f), _) if listed.contains(f) => "moved: the records of its block were reordered",
            (Some(_), Some(_)) => "modified: its content does not match the digest its seal lists",
            _ => "its block's records do not match its seal",
        };
        let at = block
            .get(i)
            .map(|(o, _, _)| format!(" (byte {o})"))
            .unwrap_or_default();
        return Err((Some(record), format!("{name}{at}: {what}")));
    }
    if s.records != chain.records + u64::from(s.count) {
        return Err((
            Some(first),
            format!(
                "the seal of block {} counts records wrongly: modified",
                s.block
            ),
        ));
    }
    if s.compute_hash(&chain.prev) != s.hash {
        return Err((
            Some(first),
            format!(
                "block {}'s hash does not follow from the block before it and its records: \
                 the seal was modified or the blocks before it were",
                s.block
            ),
        ));
    }
    if let (Some(k), Some(v)) = (opts.key.as_ref(), verifier) {
        if !s.is_sealed() {
            if chain.sealing_began {
                return Err((
                    Some(first),
                    format!(
                        "block {} has no seal, though blocks before it were sealed: written \
                         without the key, i.e. not by the daemon",
                        s.block
                    ),
                ));
            }
            return Ok(());
        }
        if s.key_id != v.id() {
            return Err((
                Some(first),
                format!("block {} was sealed with another key", s.block),
            ));
        }
        if chain.last_epoch.is_some_and(|e| s.epoch < e) {
            return Err((
                Some(first),
                format!(
                    "block {}'s epoch goes back in time: reordered or forged",
                    s.block
                ),
            ));
        }
        if k.epochs().epoch_at(s.ts_us) != s.epoch {
            return Err((
                Some(first),
                format!(
                    "block {}'s time {} is not in its epoch {}: forged",
                    s.block,
                    Timestamp(s.ts_us),
                    s.epoch
                ),
            ));
        }
        if !v.check(k, s.epoch, &s.hash, &s.seal) {
            return Err((
                Some(first),
                format!(
                    "block {}'s seal does not verify: the block or its seal was forged (sealed \
                     {})",
                    s.block,
                    Timestamp(s.ts_us)
                ),
            ));
        }
    }
    Ok(())
}
