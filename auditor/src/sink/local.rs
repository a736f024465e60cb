//! The embedded default sink: append-only JSON Lines under the state directory, hash-chained
//! and rotated by size.
//!
//! Each line is a JSON object whose `prev_hash` is the previous line's `hash`, and whose
//! `hash` is the SHA-256 of the line's own bytes up to (not including) `,"hash":"…"}`. The
//! chain runs across files: events-000002.jsonl starts where events-000001.jsonl ended.
//! Changing, removing or reordering any line breaks the chain at that line.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    audit::{event::AuditEvent, schema::json_str},
    sink::{Batch, Health, Sink, SinkError},
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalLogConfig {
    /// Write the hash-chained JSON Lines log under `state_dir/log`. Default: true.
    pub enabled: bool,
    /// Start a new file past this size. Default: 100 MiB.
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
    #[error("{path} line {line}: {what}")]
    Corrupt {
        path: PathBuf,
        line: u64,
        what: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalLogError + '_ {
    move |source| LocalLogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;

/// The log files in `dir`, oldest first.
pub fn log_files(dir: &Path) -> Result<Vec<PathBuf>, LocalLogError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("events-") && n.ends_with(".jsonl"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(dir)(e)),
    };
    files.sort();
    Ok(files)
}

fn file_name(index: u64) -> String {
    format!("events-{index:06}.jsonl")
}

fn index_of(path: &Path) -> u64 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("events-"))
        .and_then(|n| n.strip_suffix(".jsonl"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Splits a line into (the hashed part, the recorded hash).
fn split_line(line: &str) -> Option<(&str, &str)> {
    if line.len() < HASH_SUFFIX_LEN || !line.ends_with("\"}") {
        return None;
    }
    let cut = line.len() - HASH_SUFFIX_LEN;
    let (body, suffix) = line.split_at(cut);
    let hash = suffix.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    (hash.len() == 64).then_some((body, hash))
}

fn hash_of(body: &str) -> String {
    let mut h = Sha256::new();
    h.update(body.as_bytes());
    h.update(b"}");
    hex::encode(h.finalize())
}

/// The last hash of the chain in `dir` (GENESIS for an empty log) and the last file index.
fn chain_head(dir: &Path) -> Result<(String, u64, u64), LocalLogError> {
    let files = log_files(dir)?;
    let Some(last) = files.last() else {
        return Ok((GENESIS.to_string(), 1, 0));
    };
    let f = File::open(last).map_err(io_err(last))?;
    let mut head = None;
    let mut size = 0u64;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io_err(last))?;
        size += line.len() as u64 + 1;
        match split_line(&line) {
            Some((_, hash)) => head = Some(hash.to_string()),
            None => {
                return Err(LocalLogError::Corrupt {
                    path: last.clone(),
                    line: i as u64 + 1,
                    what: "not a hash-chained event line (run `auditor verify`)".into(),
                })
            }
        }
    }
    match head {
        Some(h) => Ok((h, index_of(last), size)),
        // An empty last file: continue from the one before.
        None => {
            if files.len() >= 2 {
                let (h, _, _) = chain_head_of(&files[files.len() - 2])?;
                Ok((h, index_of(last), 0))
            } else {
                Ok((GENESIS.to_string(), index_of(last), 0))
            }
        }
    }
}

fn chain_head_of(path: &Path) -> Result<(String, u64, u64), LocalLogError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut head = GENESIS.to_string();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io_err(path))?;
        if let Some((_, h)) = split_line(&line) {
            head = h.to_string();
        }
    }
    Ok((head, index_of(path), 0))
}

pub struct LocalLog {
    dir: PathBuf,
    rotate_bytes: u64,
    index: u64,
    size: u64,
    prev_hash: String,
    out: BufWriter<File>,
    line: Vec<u8>,
}

impl LocalLog {
    /// Opens the log in `dir`, continuing the existing chain.
    pub fn open(dir: &Path, rotate_bytes: u64) -> Result<Self, LocalLogError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (prev_hash, index, size) = chain_head(dir)?;
        let path = dir.join(file_name(index));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(LocalLog {
            dir: dir.to_path_buf(),
            rotate_bytes: rotate_bytes.max(4096),
            index,
            size,
            prev_hash,
            out: BufWriter::with_capacity(256 * 1024, file),
            line: Vec::with_capacity(4096),
        })
    }

    pub fn current_path(&self) -> PathBuf {
        self.dir.join(file_name(self.index))
    }

    /// Appends one event: its fields, then the chain's `prev_hash` and `hash`.
    pub fn append(&mut self, ev: &AuditEvent) -> Result<(), LocalLogError> {
        // The line up to its hash, the hash of that, then the hash itself.
        self.line.clear();
        ev.write_json_fields(&mut self.line);
        self.line.extend_from_slice(b",\"prev_hash\":");
        json_str(&mut self.line, &self.prev_hash);
        let mut h = Sha256::new();
        h.update(&self.line);
        h.update(b"}");
        let mut hex = [0u8; 64];
        hex::encode_to_slice(h.finalize(), &mut hex).expect("64 hex digits");
        self.line.extend_from_slice(b",\"hash\":\"");
        self.line.extend_from_slice(&hex);
        self.line.extend_from_slice(b"\"}\n");
        if self.size > 0 && self.size + self.line.len() as u64 > self.rotate_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.out.write_all(&self.line) {
            return Err(io_err(&self.current_path())(e));
        }
        self.size += self.line.len() as u64;
        let hash = std::str::from_utf8(&hex).expect("hex is ASCII");
        self.prev_hash.clear();
        self.prev_hash.push_str(hash);
        Ok(())
    }

    /// Makes everything appended so far visible to readers (`auditor tail`).
    pub fn flush(&mut self) -> Result<(), LocalLogError> {
        let path = self.current_path();
        self.out.flush().map_err(io_err(&path))
    }

    /// Flushes and fsyncs (shutdown, rotation).
    pub fn sync(&mut self) -> Result<(), LocalLogError> {
        self.flush()?;
        let path = self.current_path();
        self.out.get_ref().sync_data().map_err(io_err(&path))
    }

    fn rotate(&mut self) -> Result<(), LocalLogError> {
        self.sync()?;
        self.index += 1;
        let path = self.current_path();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.out = BufWriter::with_capacity(256 * 1024, file);
        self.size = 0;
        Ok(())
    }
}

/// The local log as a [`Sink`].
pub struct LocalLogSink {
    log: LocalLog,
    events: u64,
    errors: u64,
    /// The last write or flush failed.
    failing: bool,
}

impl LocalLogSink {
    pub fn open(dir: &Path, cfg: &LocalLogConfig) -> Result<Self, LocalLogError> {
        Ok(LocalLogSink {
            log: LocalLog::open(dir, cfg.rotate_bytes)?,
            events: 0,
            errors: 0,
            failing: false,
        })
    }
}

impl Sink for LocalLogSink {
    fn name(&self) -> &'static str {
        "local_log"
    }

    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let mut first = None;
        for ev in batch.iter() {
            match self.log.append(ev) {
                Ok(()) => self.events += 1,
                Err(e) => {
                    self.errors += 1;
                    first.get_or_insert(e);
                }
            }
        }
        self.failing = first.is_some();
        match first {
            None => Ok(()),
            Some(e) => Err(e.into()),
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let r = self.log.flush();
        self.failing = r.is_err();
        r.map_err(|e| {
            self.errors += 1;
            e.into()
        })
    }

    fn health(&self) -> Health {
        Health {
            healthy: !self.failing,
            events: self.events,
            errors: self.errors,
            detail: serde_json::json!({ "file": self.log.current_path() }),
        }
    }

    fn finish(mut self: Box<Self>, _grace: std::time::Duration) -> Result<Health, SinkError> {
        self.log.sync()?;
        Ok(self.health())
    }
}

/// Result of verifying the chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        lines: u64,
        files: usize,
    },
    Broken {
        path: PathBuf,
        line: u64,
        what: String,
    },
}

/// Walks every file in order and reports the first line that was modified, removed or
/// reordered (or the first that is not an event line at all).
pub fn verify(dir: &Path) -> Result<Verdict, LocalLogError> {
    let files = log_files(dir)?;
    let mut prev = GENESIS.to_string();
    let mut total = 0u64;
    for path in &files {
        let f = File::open(path).map_err(io_err(path))?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let lineno = i as u64 + 1;
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    return Ok(Verdict::Broken {
                        path: path.clone(),
                        line: lineno,
                        what: format!("unreadable: {e}"),
                    })
                }
            };
            let broken = |what: String| Verdict::Broken {
                path: path.clone(),
                line: lineno,
                what,
            };
            let Some((body, hash)) = split_line(&line) else {
                return Ok(broken("not a hash-chained event line".into()));
            };
            if hash_of(body) != hash {
                return Ok(broken(
                    "modified: its content does not match its hash".into(),
                ));
            }
            let recorded_prev = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| {
                    v.get("prev_hash")
                        .and_then(|p| p.as_str())
                        .map(String::from)
                });
            match recorded_prev {
                Some(p) if p == prev => {}
                Some(_) => {
                    return Ok(broken(
                        "chain broken: a line before it was removed, or lines were reordered"
                            .into(),
                    ))
                }
                None => return Ok(broken("no prev_hash field".into())),
            }
            prev = hash.to_string();
            total += 1;
        }
    }
    Ok(Verdict::Intact {
        lines: total,
        files: files.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u64) -> AuditEvent {
        AuditEvent {
            seq: n,
            statement: format!("SELECT {n}").into(),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn chain_survives_rotation_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LocalLog::open(dir.path(), 4096).unwrap();
            for i in 0..50 {
                log.append(&ev(i)).unwrap();
            }
            log.sync().unwrap();
        }
        {
            let mut log = LocalLog::open(dir.path(), 4096).unwrap();
            for i in 50..60 {
                log.append(&ev(i)).unwrap();
            }
            log.sync().unwrap();
        }
        assert!(log_files(dir.path()).unwrap().len() > 1);
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Verdict::Intact { lines: 60, .. }
        ));
    }

    #[test]
    fn detects_modified_removed_and_reordered_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LocalLog::open(dir.path(), 1 << 30).unwrap();
        for i in 0..5 {
            log.append(&ev(i)).unwrap();
        }
        log.sync().unwrap();
        let path = log_files(dir.path()).unwrap()[0].clone();
        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        let modified = original.replacen("SELECT 2", "SELECT 9", 1);
        std::fs::write(&path, modified).unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Verdict::Broken { line: 3, .. }
        ));

        let removed = [lines[0], lines[1], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, removed).unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Verdict::Broken { line: 3, .. }
        ));

        let reordered = [lines[0], lines[2], lines[1], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, reordered).unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Verdict::Broken { line: 2, .. }
        ));
    }
}
