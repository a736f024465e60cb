//! The local log's first format (before the sealed segments): JSON Lines, hash-chained
//! line by line. Still read and verified; never written any more.
//!
//! Each line is a JSON object whose `prev_hash` is the previous line's `hash`, and whose
//! `hash` is the SHA-256 of the line's own bytes up to (not including) `,"hash":"…"}`. The
//! chain runs across files (`events-NNNNNN.jsonl`); the first segment of the new format
//! continues it from the last line's hash.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::LocalLogError;

pub const GENESIS: [u8; 32] = [0u8; 32];
const HASH_SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;

/// The files of this format in `dir`, oldest first.
pub fn log_files(dir: &Path) -> Result<Vec<PathBuf>, LocalLogError> {
    super::files_ending(dir, ".jsonl")
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

/// The chain of the old files, checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Chain {
    /// Every line is where its hash says; `head` is the last line's hash.
    Intact {
        lines: u64,
        files: usize,
        head: [u8; 32],
    },
    Broken {
        path: PathBuf,
        line: u64,
        what: String,
    },
}

/// Walks every old file in order and reports the first line that was modified, removed or
/// reordered (or the first that is not an event line at all).
pub fn verify(dir: &Path) -> Result<Chain, LocalLogError> {
    let files = log_files(dir)?;
    let mut prev = hex::encode(GENESIS);
    let mut total = 0u64;
    for path in &files {
        let f = File::open(path).map_err(super::io_err(path))?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let lineno = i as u64 + 1;
            let broken = |what: String| Chain::Broken {
                path: path.clone(),
                line: lineno,
                what,
            };
            let line = match line {
                Ok(l) => l,
                Err(e) => return Ok(broken(format!("unreadable: {e}"))),
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
    let mut head = GENESIS;
    hex::decode_to_slice(&prev, &mut head).expect("64 hex digits, checked");
    Ok(Chain::Intact {
        lines: total,
        files: files.len(),
        head,
    })
}

/// Every event line of the old files, in order (lines that do not parse are counted).
pub fn read(
    dir: &Path,
    mut f: impl FnMut(crate::audit::event::AuditEvent),
) -> Result<u64, LocalLogError> {
    let mut bad = 0;
    for path in log_files(dir)? {
        let file = File::open(&path).map_err(super::io_err(&path))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(super::io_err(&path))?;
            match serde_json::from_str(&line) {
                Ok(ev) => f(ev),
                Err(_) => bad += 1,
            }
        }
    }
    Ok(bad)
}

/// Writes `events` as a log of this format would have (tests of reading old logs).
#[cfg(test)]
pub fn write_for_test(
    dir: &Path,
    events: &[crate::audit::event::AuditEvent],
    lines_per_file: usize,
) {
    use crate::audit::schema::json_str;
    std::fs::create_dir_all(dir).unwrap();
    let mut prev = hex::encode(GENESIS);
    for (n, chunk) in events.chunks(lines_per_file.max(1)).enumerate() {
        let mut text = Vec::new();
        for ev in chunk {
            let mut line = Vec::new();
            ev.write_json_fields(&mut line);
            line.extend_from_slice(b",\"prev_hash\":");
            json_str(&mut line, &prev);
            let hash = hash_of(std::str::from_utf8(&line).unwrap());
            line.extend_from_slice(format!(",\"hash\":\"{hash}\"}}\n").as_bytes());
            text.extend_from_slice(&line);
            prev = hash;
        }
        std::fs::write(dir.join(format!("events-{:06}.jsonl", n + 1)), text).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::AuditEvent;

    fn ev(n: u64) -> AuditEvent {
        AuditEvent {
            seq: n,
            statement: format!("SELECT {n}").into(),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn old_logs_verify_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<_> = (0..60).map(ev).collect();
        write_for_test(dir.path(), &events, 25);
        assert_eq!(log_files(dir.path()).unwrap().len(), 3);
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Chain::Intact {
                lines: 60,
                files: 3,
                ..
            }
        ));
        let mut seen = 0;
        assert_eq!(read(dir.path(), |_| seen += 1).unwrap(), 0);
        assert_eq!(seen, 60);
    }

    #[test]
    fn detects_modified_removed_and_reordered_lines() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<_> = (0..5).map(ev).collect();
        write_for_test(dir.path(), &events, 100);
        let path = log_files(dir.path()).unwrap()[0].clone();
        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        let modified = original.replacen("SELECT 2", "SELECT 9", 1);
        std::fs::write(&path, modified).unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Chain::Broken { line: 3, .. }
        ));

        let removed = [lines[0], lines[1], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, removed).unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Chain::Broken { line: 3, .. }
        ));

        let reordered = [lines[0], lines[2], lines[1], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, reordered).unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap(),
            Chain::Broken { line: 2, .. }
        ));
    }
}
