//! Reading the local log's events, both formats, oldest first; following it as it grows.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use super::{compact::ContextTable, io_err, legacy, segment, segment_files, LocalLogError};
use crate::audit::event::AuditEvent;

/// Where reading stopped: the newest segment and the offset after its last whole frame
/// (a [`Follower`] goes on from there).
#[derive(Debug, Clone, Default)]
pub struct ReadEnd {
    pub path: Option<PathBuf>,
    pub offset: u64,
    /// Records or lines that could not be read as events (damaged, or written by a newer
    /// version); `auditor verify` says where.
    pub bad: u64,
    pub events: u64,
}

/// Calls `f` with every event in the log in `dir`, oldest first.
pub fn read(dir: &Path, mut f: impl FnMut(AuditEvent)) -> Result<ReadEnd, LocalLogError> {
    let mut end = ReadEnd {
        bad: legacy::read(dir, |ev| {
            f(ev);
        })?,
        ..ReadEnd::default()
    };
    let mut buf = Vec::new();
    let mut contexts = ContextTable::default();
    for path in segment_files(dir)? {
        buf.clear();
        contexts.clear();
        File::open(&path)
            .and_then(|mut file| file.read_to_end(&mut buf))
            .map_err(io_err(&path))?;
        let offset = frames(&buf, segment::HEADER_LEN, &mut contexts, &mut end, &mut f);
        end.path = Some(path);
        end.offset = offset as u64;
    }
    Ok(end)
}

/// Decodes the record frames of `buf` from `at`; returns the offset after the last whole
/// frame.
fn frames(
    buf: &[u8],
    mut at: usize,
    contexts: &mut ContextTable,
    end: &mut ReadEnd,
    f: &mut impl FnMut(AuditEvent),
) -> usize {
    if buf.len() < segment::HEADER_LEN || &buf[..8] != segment::MAGIC {
        end.bad += 1;
        return buf.len();
    }
    while let Some((frame, next)) = segment::next_frame(buf, at) {
        match frame {
            segment::Frame::Record(p) => match contexts.event(p) {
                Ok(ev) => {
                    end.events += 1;
                    f(ev)
                }
                Err(_) => end.bad += 1,
            },
            segment::Frame::Context(p) => {
                if contexts.add(p).is_err() {
                    end.bad += 1;
                }
            }
            segment::Frame::Seal(_) => {}
            segment::Frame::Bad { .. } => {
                end.bad += 1;
                return buf.len();
            }
        }
        at = next;
    }
    at
}

/// Follows the log as the daemon writes it (`auditor tail -f`), across new segments.
pub struct Follower {
    dir: PathBuf,
    path: Option<PathBuf>,
    offset: u64,
    buf: Vec<u8>,
    contexts: ContextTable,
}

impl Follower {
    /// Goes on from where [`read`] stopped.
    pub fn new(dir: &Path, from: &ReadEnd) -> Follower {
        let mut f = Follower {
            dir: dir.to_path_buf(),
            path: from.path.clone(),
            offset: from.offset,
            buf: Vec::new(),
            contexts: ContextTable::default(),
        };
        // The contexts of what was read already, which later records refer to.
        if let Some(path) = &f.path {
            if let Ok(buf) = std::fs::read(path) {
                let upto = (f.offset as usize).min(buf.len());
                let mut end = ReadEnd::default();
                frames(
                    &buf[..upto],
                    segment::HEADER_LEN,
                    &mut f.contexts,
                    &mut end,
                    &mut |_| {},
                );
            }
        }
        f
    }

    /// Calls `f` with the events written since the last call.
    pub fn poll(&mut self, f: &mut impl FnMut(AuditEvent)) -> Result<(), LocalLogError> {
        let files = segment_files(&self.dir)?;
        loop {
            let Some(path) = self.path.clone() else {
                // No segment yet: start at the first one there is.
                match files.first() {
                    Some(p) => {
                        self.path = Some(p.clone());
                        self.offset = segment::HEADER_LEN as u64;
                        self.contexts.clear();
                        continue;
                    }
                    None => return Ok(()),
                }
            };
            self.read_new(&path, f)?;
            // A newer segment: this one is done (a writer never returns to it).
            match files.iter().find(|p| **p > path) {
                Some(next) => {
                    self.path = Some(next.clone());
                    self.offset = segment::HEADER_LEN as u64;
                    self.contexts.clear();
                }
                None => return Ok(()),
            }
        }
    }

    fn read_new(
        &mut self,
        path: &Path,
        f: &mut impl FnMut(AuditEvent),
    ) -> Result<(), LocalLogError> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(path)(e)),
        };
        // Read from the start of the header, so the frame walk can check it.
        self.buf.clear();
        let mut header = [0u8; segment::HEADER_LEN];
        if file.read_exact(&mut header).is_err() {
            return Ok(()); // just created
        }
        self.buf.extend_from_slice(&header);
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut self.buf))
            .map_err(io_err(path))?;
        let mut end = ReadEnd::default();
        // The buffer is the header, then the file from `offset`.
        let done = frames(
            &self.buf,
            segment::HEADER_LEN,
            &mut self.contexts,
            &mut end,
            f,
        );
        self.offset += (done - segment::HEADER_LEN) as u64;
        Ok(())
    }
}
