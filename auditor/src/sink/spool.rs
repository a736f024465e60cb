//! An on-disk queue of records: append-only segment files of checksummed records, read in
//! order from a persisted cursor, deleted once delivered.
//!
//! Record: `len: u32 LE | crc32: u32 LE | len bytes`. A record whose checksum does not
//! match, or that is cut short (a crash while writing), is never delivered: the reader
//! skips the rest of that segment and counts the bytes as lost. Writers always start a new
//! segment when the spool is opened, so a torn tail is never appended to.
//!
//! The cursor (`cursor`: segment number and offset of the first undelivered record) is
//! replaced atomically (write + rename) after each delivery; after a crash, records
//! between the last cursor and what was really delivered are delivered again, which the
//! receiver must tolerate (ClickHouse: event ids and a deduplicating table).

use std::{
    fs::File,
    io::{BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Records larger than this are refused (and a length field above it is corruption).
pub const MAX_RECORD: u32 = 256 << 20;

/// Position of a record: segment number and byte offset within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SpoolCounters {
    /// Records written, and read back for delivery.
    pub appended: u64,
    pub read: u64,
    /// Bytes skipped because a record was corrupt or cut short, and how many times.
    pub corrupt_bytes: u64,
    pub corruptions: u64,
}

pub struct Spool {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Option<(u64, BufWriter<File>, u64)>,
    cursor: Position,
    pub counters: SpoolCounters,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A record's length and checksum, then the record.
fn write_record(w: &mut BufWriter<File>, payload: &[u8]) -> std::io::Result<()> {
    let crc = crc32fast::hash(payload);
    w.write_all(&(payload.len() as u32).to_le_bytes())?;
    w.write_all(&crc.to_le_bytes())?;
    w.write_all(payload)
}

fn segment_name(n: u64) -> String {
    format!("{n:010}.seg")
}

impl Spool {
    /// Opens (or creates) the spool in `dir`; new records go to a new segment.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, SpoolError> {
        crate::fsutil::private_dir(dir).map_err(io_err(dir))?;
        for f in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            crate::fsutil::make_private(&f.path()).map_err(io_err(&f.path()))?;
        }
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(4096),
            writer: None,
            cursor: Position::default(),
            counters: SpoolCounters::default(),
        };
        spool.cursor = spool.read_cursor();
        // The cursor may point before the first segment left (all delivered and deleted).
        if let Some(first) = spool.segments()?.first() {
            if spool.cursor.segment < *first {
                spool.cursor = Position {
                    segment: *first,
                    offset: 0,
                };
            }
        }
        Ok(spool)
    }

    fn cursor_path(&self) -> PathBuf {
        self.dir.join("cursor")
    }

    fn read_cursor(&self) -> Position {
        let Ok(text) = std::fs::read_to_string(self.cursor_path()) else {
            return Position::default();
        };
        let mut it = text.split_whitespace().map(|w| w.parse::<u64>());
        match (it.next(), it.next()) {
            (Some(Ok(segment)), Some(Ok(offset))) => Position { segment, offset },
            _ => Position::default(),
        }
    }

    /// Segment numbers present, ascending.
    pub fn segments(&self) -> Result<Vec<u64>, SpoolError> {
        let mut out: Vec<u64> = std::fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".seg")?
                    .parse::<u64>()
                    .ok()
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Bytes on disk not yet delivered (approximately: whole segments after the cursor's).
    pub fn pending_bytes(&self) -> u64 {
        let Ok(segments) = self.segments() else {
            return 0;
        };
        segments
            .iter()
            .filter(|&&s| s >= self.cursor.segment)
            .map(|&s| {
                let len = std::fs::metadata(self.dir.join(segment_name(s)))
                    .map(|m| m.len())
                    .unwrap_or(0);
                if s == self.cursor.segment {
                    len.saturating_sub(self.cursor.offset)
                } else {
                    len
                }
            })
            .sum()
    }

    /// Appends one record (buffered; `flush` makes it durable against a daemon crash).
    pub fn append(&mut self, payload: &[u8]) -> Result<(), SpoolError> {
        assert!(
            payload.len() as u64 <= MAX_RECORD as u64,
            "spool record too large"
        );
        let need_new = match &self.writer {
            None => true,
            Some((_, _, written)) => *written >= self.segment_bytes,
        };
        if need_new {
            self.rotate()?;
        }
        let (n, w, written) = self.writer.as_mut().expect("writer");
        // (The segment's path is made for an error only: not on the path of every record.)
        write_record(w, payload).map_err(|e| io_err(&self.dir.join(segment_name(*n)))(e))?;
        *written += 8 + payload.len() as u64;
        self.counters.appended += 1;
        Ok(())
    }

    /// Appends one record to the segment being written (starting one if there is none):
    /// for writers that begin segments themselves ([`Spool::start_segment`]), whose
    /// records refer to earlier ones of their segment.
    pub fn append_here(&mut self, payload: &[u8]) -> Result<(), SpoolError> {
        if self.writer.is_none() {
            self.rotate()?;
        }
        let (n, w, written) = self.writer.as_mut().expect("writer");
        write_record(w, payload).map_err(|e| io_err(&self.dir.join(segment_name(*n)))(e))?;
        *written += 8 + payload.len() as u64;
        self.counters.appended += 1;
        Ok(())
    }

    /// Ends the segment being written (flushed and synced) and begins a new one.
    pub fn start_segment(&mut self) -> Result<(), SpoolError> {
        self.rotate()
    }

    /// The frames (records whose first byte is `framed::FRAME`) of `pos`'s segment before
    /// `pos`: what a reader beginning there needs for the records that follow. The spool's
    /// counters are not moved; a corrupt record ends the reading (the records after it
    /// were never delivered from this segment either).
    pub fn frames_before(&mut self, pos: Position) -> Result<Records, SpoolError> {
        self.flush()?;
        let mut out = Records::default();
        let path = self.dir.join(segment_name(pos.segment));
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
        let mut offset = 0u64;
        let mut payload = Vec::new();
        while offset + 8 <= pos.offset {
            let mut head = [0u8; 8];
            reader.read_exact(&mut head).map_err(io_err(&path))?;
            let rlen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
            if rlen > MAX_RECORD || offset + 8 + rlen as u64 > pos.offset {
                break;
            }
            payload.resize(rlen as usize, 0);
            reader.read_exact(&mut payload).map_err(io_err(&path))?;
            if crc32fast::hash(&payload) != crc {
                break;
            }
            if crate::sink::framed::is_frame(&payload) {
                out.push_with(|o| o.extend_from_slice(&payload));
            }
            offset += 8 + rlen as u64;
        }
        Ok(out)
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        if let Some((n, mut w, _)) = self.writer.take() {
            let path = self.dir.join(segment_name(n));
            w.flush().map_err(io_err(&path))?;
            w.get_ref().sync_data().map_err(io_err(&path))?;
        }
        // Always past the cursor's segment: that one may have been delivered and deleted,
        // and a new file under its number would be read from the old offset.
        let next = self
            .segments()?
            .last()
            .map(|l| l + 1)
            .unwrap_or(1)
            .max(self.cursor.segment + 1);
        let path = self.dir.join(segment_name(next));
        let f = crate::fsutil::private_options()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.writer = Some((next, BufWriter::with_capacity(1 << 20, f), 0));
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if let Some((n, w, _)) = self.writer.as_mut() {
            w.flush()
                .map_err(|e| io_err(&self.dir.join(segment_name(*n)))(e))?;
        }
        Ok(())
    }

    /// Flushes and syncs the open segment (shutdown).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.flush()?;
        if let Some((n, w, _)) = self.writer.as_mut() {
            let path = self.dir.join(segment_name(*n));
            w.get_ref().sync_data().map_err(io_err(&path))?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cursor(&self) -> Position {
        self.cursor
    }

    /// Reads up to `max_records` / `max_bytes` records from `from` (flushing the writer
    /// first). Returns them and the position after the last one. Corrupt or cut-short
    /// records end their segment's reading (counted); the segment being written stops at
    /// its current end.
    pub fn read_from(
        &mut self,
        from: Position,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<(Records, Position), SpoolError> {
        self.flush()?;
        let mut out = Records::default();
        let mut pos = from;
        let mut bytes = 0u64;
        let segments = self.segments()?;
        let writing = self.writer.as_ref().map(|(n, _, _)| *n);
        let first = pos.segment;
        for seg in segments.into_iter().filter(|&s| s >= first) {
            if seg > pos.segment {
                pos = Position {
                    segment: seg,
                    offset: 0,
                };
            }
            let path = self.dir.join(segment_name(seg));
            let mut f = File::open(&path).map_err(io_err(&path))?;
            let len = f.metadata().map_err(io_err(&path))?.len();
            f.seek(SeekFrom::Start(pos.offset)).map_err(io_err(&path))?;
            let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
            while pos.offset < len {
                if out.len() >= max_records || bytes >= max_bytes {
                    return Ok((out, pos));
                }
                let mut head = [0u8; 8];
                let remaining = len - pos.offset;
                let torn = |s: &mut Self, pos: &mut Position| {
                    // Cut short: the rest of this segment is lost, unless it is still
                    // being written (then it is simply not there yet).
                    s.counters.corruptions += 1;
                    s.counters.corrupt_bytes += remaining;
                    pos.offset = len;
                };
                if remaining < 8 {
                    if Some(seg) == writing {
                        return Ok((out, pos));
                    }
                    torn(self, &mut pos);
                    break;
                }
                reader.read_exact(&mut head).map_err(io_err(&path))?;
                let rlen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
                if rlen > MAX_RECORD || 8 + rlen as u64 > remaining {
                    if Some(seg) == writing && rlen <= MAX_RECORD {
                        return Ok((out, pos));
                    }
                    torn(self, &mut pos);
                    break;
                }
                let at = out.data.len();
                out.data.resize(at + rlen as usize, 0);
                reader
                    .read_exact(&mut out.data[at..])
                    .map_err(io_err(&path))?;
                if crc32fast::hash(&out.data[at..]) != crc {
                    out.data.truncate(at);
                    torn(self, &mut pos);
                    break;
                }
                pos.offset += 8 + rlen as u64;
                bytes += rlen as u64;
                self.counters.read += 1;
                if out.segments.last().map(|&(_, s)| s) != Some(seg) {
                    out.segments.push((out.ends.len(), seg));
                }
                out.ends.push(out.data.len());
            }
        }
        Ok((out, pos))
    }

    /// Records everything before `pos` as delivered: the cursor moves and fully delivered
    /// segments (not the one being written) are deleted.
    pub fn commit(&mut self, pos: Position) -> Result<(), SpoolError> {
        let path = self.cursor_path();
        crate::fsutil::write_private(
            &path,
            format!("{} {}\n", pos.segment, pos.offset).as_bytes(),
        )
        .map_err(io_err(&path))?;
        self.cursor = pos;
        let writing = self.writer.as_ref().map(|(n, _, _)| *n);
        for seg in self.segments()? {
            let done = seg < pos.segment
                || (seg == pos.segment && Some(seg) != writing && {
                    let p = self.dir.join(segment_name(seg));
                    std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) <= pos.offset
                });
            if done && Some(seg) != writing {
                let p = self.dir.join(segment_name(seg));
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        Ok(())
    }
}

/// Records one after the other in one buffer (not one allocation each): those read from
/// the spool, and a batch's on their way to it.
#[derive(Debug, Default)]
pub struct Records {
    data: Vec<u8>,
    /// Where each record ends in `data`.
    ends: Vec<usize>,
    /// Records read from the spool: the index of the first record read from each segment,
    /// and the segment.
    segments: Vec<(usize, u64)>,
}

impl Records {
    /// Appends one record, which `write` puts at the end of the buffer.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.data);
        self.ends.push(self.data.len());
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
        self.segments.clear();
    }

    /// The records with the spool segment each was read from (0 for records not read
    /// from the spool).
    pub fn iter_with_segments(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut marks = self.segments.iter().copied().peekable();
        let mut segment = 0;
        self.iter().enumerate().map(move |(i, r)| {
            while let Some(&(at, s)) = marks.peek() {
                if at > i {
                    break;
                }
                segment = s;
                marks.next();
            }
            (segment, r)
        })
    }

    /// Bytes the buffer holds room for.
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.data[start..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &mut Spool) -> Vec<Vec<u8>> {
        let (recs, _) = s.read_from(s.cursor(), usize::MAX, u64::MAX).unwrap();
        owned(&recs)
    }

    fn owned(recs: &Records) -> Vec<Vec<u8>> {
        recs.iter().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 4096).unwrap();
        for i in 0..1000u32 {
            s.append(format!("record {i}").as_bytes()).unwrap();
        }
        let (recs, pos) = s.read_from(s.cursor(), 600, u64::MAX).unwrap();
        let recs = owned(&recs);
        assert_eq!(recs.len(), 600);
        assert_eq!(recs[0], b"record 0");
        s.commit(pos).unwrap();
        s.sync().unwrap();
        drop(s);
        // After a restart: the rest, in order, then new records.
        let mut s = Spool::open(dir.path(), 4096).unwrap();
        s.append(b"after restart").unwrap();
        let recs = all(&mut s);
        assert_eq!(recs.len(), 401);
        assert_eq!(recs[0], b"record 600");
        assert_eq!(recs[399], b"record 999");
        assert_eq!(recs[400], b"after restart");
        let (_, end) = s.read_from(s.cursor(), usize::MAX, u64::MAX).unwrap();
        s.commit(end).unwrap();
        assert!(all(&mut s).is_empty());
        // Delivered segments are gone, only the one being written is left.
        assert_eq!(s.segments().unwrap().len(), 1);
        assert_eq!(s.pending_bytes(), 0);
    }

    #[test]
    fn new_records_after_everything_was_delivered_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..100u32 {
            s.append(format!("old {i}").as_bytes()).unwrap();
        }
        s.sync().unwrap();
        drop(s);
        // A restart: nothing appended yet, everything delivered (the segment is deleted).
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let (recs, end) = s.read_from(s.cursor(), usize::MAX, u64::MAX).unwrap();
        assert_eq!(recs.len(), 100);
        s.commit(end).unwrap();
        assert!(s.segments().unwrap().is_empty());
        for i in 0..3u32 {
            s.append(format!("new {i}").as_bytes()).unwrap();
        }
        let text: Vec<String> = all(&mut s)
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        assert_eq!(text, ["new 0", "new 1", "new 2"]);
        assert_eq!(s.counters.corruptions, 0);
    }

    #[test]
    fn corrupted_and_truncated_segments_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10u32 {
            s.append(format!("first {i}").as_bytes()).unwrap();
        }
        s.sync().unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..10u32 {
            s.append(format!("second {i}").as_bytes()).unwrap();
        }
        s.sync().unwrap();
        drop(s);
        let segs: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "seg"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(segs.len(), 2);
        // Flip a byte in the 4th record of the first segment; cut the second short.
        let mut bytes = std::fs::read(&segs[0]).unwrap();
        let rec = 8 + "first 0".len();
        bytes[3 * rec + 9] ^= 0xff;
        std::fs::write(&segs[0], &bytes).unwrap();
        let len = std::fs::metadata(&segs[1]).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segs[1])
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        // A huge length prefix at the end of a third segment.
        std::fs::write(
            dir.path().join(segment_name(3)),
            [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0],
        )
        .unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let recs = all(&mut s);
        let text: Vec<String> = recs
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "first 0", "first 1", "first 2", "second 0", "second 1", "second 2", "second 3",
                "second 4", "second 5", "second 6", "second 7", "second 8"
            ]
        );
        assert_eq!(s.counters.corruptions, 3);
        assert!(s.counters.corrupt_bytes > 0);
    }

    #[test]
    fn garbage_cursor_starts_from_the_beginning() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cursor"), "not a cursor").unwrap();
        let mut s = Spool::open(dir.path(), 4096).unwrap();
        s.append(b"x").unwrap();
        assert_eq!(all(&mut s), vec![b"x".to_vec()]);
    }
}
