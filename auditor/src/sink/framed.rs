//! The ClickHouse spool's compact layout: events written against their session's context
//! and their statement's shape, as the local log writes them (`local/compact.rs`), so a
//! statement's spool record holds what differs from its session (about 130 bytes for a
//! pgbench statement, against 700 for the whole event), and the rows sent to ClickHouse
//! are copied from the record and its frames' bytes as they are.
//!
//! Payloads in a segment: a frame `0xC0 | id u32 | field count u16 | fields` (a session's
//! context or a statement shape, numbered in one sequence; the count's top bit set when
//! its fields hold compact ids), a record `6 | context id u32 | shape id u32 | field count
//! u16 | same | fields` (`compact.rs`; the layouts `5`, `4` and `3` of earlier versions
//! still read), and whole records of
//! `record.rs` (the spool's own gap events; spools written by earlier versions).
//!
//! With the local log on, the records are those the log encodes for its own segments,
//! handed on ([`crate::sink::Handover`]): each event is encoded once. The [`Framer`]
//! encodes them only when no log does.
//!
//! A segment reads on its own: the encoder starts over, and the spool a new segment, at a
//! size bound and whenever a batch did not reach the spool (dropped when it was full, or a
//! write failed), so every frame a record refers to is earlier in the record's segment.
//! A reader that begins in the middle of a segment (after a restart) reads the segment's
//! frames before that point first ([`crate::sink::spool::Spool::frames_before`]).

use ahash::AHashMap;

use crate::{
    audit::{
        event::{AuditEvent, FIELDS},
        schema::{RecordError, RecordReader},
    },
    sink::{
        local::compact::{self, Contexts},
        spool::Records,
    },
};

/// First byte of a frame (a context or a shape).
pub const FRAME: u8 = 0xC0;

/// The encoder starts over (and the spool a new segment) after this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Whether a payload is a frame.
pub fn is_frame(payload: &[u8]) -> bool {
    payload.first() == Some(&FRAME)
}

/// Whether a payload is a record written against frames.
pub fn is_framed_record(payload: &[u8]) -> bool {
    compact::is_compact(payload.first())
}

/// Appends to `records` what [`Contexts::encode`] wrote for one event: the frames it
/// wrote before the record (`before`), then the record. Returns the bytes this adds to a
/// spool segment (each payload with its length and checksum).
pub fn push_encoded(
    records: &mut Records,
    before: compact::Before,
    context: &[u8],
    shape: &[u8],
    record: &[u8],
) -> u64 {
    let mut bytes = 0;
    for (wrote, payload) in [(before.context, context), (before.shape, shape)] {
        if wrote {
            records.push_with(|out| {
                out.push(FRAME);
                out.extend_from_slice(payload);
            });
            bytes += 9 + payload.len() as u64;
        }
    }
    records.push_with(|out| out.extend_from_slice(record));
    bytes + 8 + record.len() as u64
}

/// The ClickHouse sink's spool segments, and its own encoder of spool records for when no
/// sink before it encoded them (with the local log on, the log's encoding is handed on:
/// [`crate::sink::Handover`]).
#[derive(Default)]
pub struct Framer {
    contexts: Contexts,
    /// Bytes spooled since the segment began.
    since_start: u64,
    /// False until the first batch, and after [`Framer::start_over`].
    started: bool,
    /// A batch encoded elsewhere was taken since `contexts` last started over: the frames
    /// they know may not be in the segment.
    handed: bool,
    context: Vec<u8>,
    shape: Vec<u8>,
    record: Vec<u8>,
}

impl Framer {
    /// The next batch starts a new segment, written as if no frame were known.
    pub fn start_over(&mut self) {
        self.started = false;
    }

    /// Whether the next batch must begin a new spool segment (records that refer to no
    /// frame before the batch).
    pub fn due(&self) -> bool {
        !self.started || self.since_start >= SEGMENT_BYTES
    }

    /// Appends the spool payloads of `batch` to `records` (frames before the records that
    /// refer to them). True when the batch must begin a new spool segment.
    pub fn encode(&mut self, batch: &[Box<AuditEvent>], records: &mut Records) -> bool {
        let new_segment = self.due() || self.handed;
        if new_segment {
            self.contexts.forget();
            self.since_start = 0;
            self.started = true;
            self.handed = false;
        }
        for ev in crate::cache::prefetched(batch) {
            self.context.clear();
            self.shape.clear();
            self.record.clear();
            let before =
                self.contexts
                    .encode(ev, &mut self.context, &mut self.shape, &mut self.record);
            self.since_start +=
                push_encoded(records, before, &self.context, &self.shape, &self.record);
        }
        new_segment
    }

    /// Counts a batch's records encoded elsewhere, which begin a new segment when `fresh`
    /// (they refer to no frame before them: asked for when [`Framer::due`]).
    pub fn took(&mut self, records: &Records, fresh: bool) {
        if fresh {
            self.since_start = 0;
            self.started = true;
        }
        self.since_start += records.iter().map(|r| 8 + r.len() as u64).sum::<u64>();
        self.handed = true;
    }
}

/// A frame as the reader keeps it: its fields as RowBinary, ready to copy into rows.
struct Frame {
    fields: usize,
    row: Vec<u8>,
    /// Where each field's bytes end in `row`.
    ends: Vec<u32>,
}

impl Frame {
    /// The frame's row, and where field `i` is in it.
    fn field(&self, i: usize) -> Option<(&[u8], usize, usize)> {
        if i >= self.fields {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some((&self.row, start, self.ends[i] as usize))
    }
}

/// The frames of the spool segment being read, rendered for a server of one column style.
#[derive(Default)]
pub struct Frames {
    segment: Option<u64>,
    /// The column style the frames are rendered for (of the last one read).
    compat: Option<bool>,
    by_id: AHashMap<u32, Frame>,
}

impl Frames {
    /// The segment whose frames these are.
    pub fn segment(&self) -> Option<u64> {
        self.segment
    }

    /// The column style the frames read are rendered for.
    pub fn compat(&self) -> Option<bool> {
        self.compat
    }

    /// Forgets every frame: the records that follow are of `segment`.
    pub fn start(&mut self, segment: u64) {
        self.segment = Some(segment);
        self.by_id.clear();
    }

    /// Reads a frame (with its first byte), rendered for a server of style `compat` (the
    /// style its records' rows are then copied in).
    pub fn add(&mut self, payload: &[u8], compat: bool) -> Result<(), RecordError> {
        let body = payload.get(1..).unwrap_or_default();
        let mut r = RecordReader::new(body);
        let id = r.u32()?;
        let (fields, compact) = compact::read_frame_field_count(&mut r)?;
        r.compact_ids = compact;
        if fields > FIELDS.len() {
            return Err(RecordError::UnknownVersion(FRAME));
        }
        let (mut row, mut ends) = (Vec::with_capacity(body.len()), Vec::with_capacity(fields));
        AuditEvent::record_to_row_parts(&mut r, fields, compat, &mut row, &mut ends)?;
        if !r.is_empty() {
            return Err(RecordError::Trailing(r.remaining()));
        }
        self.compat = Some(compat);
        self.by_id.insert(id, Frame { fields, row, ends });
        Ok(())
    }

    /// Appends the ClickHouse row of a record written against frames (see
    /// [`crate::sink::record::to_row`]). A frame it refers to that was not read is an
    /// error, never a guess; on an error `out` is as it was.
    pub fn to_row(&self, rec: &[u8], compat: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let start = out.len();
        let copied = self.copy_row(rec, compat, out);
        if copied.is_err() {
            out.truncate(start);
        }
        copied
    }

    fn copy_row(&self, rec: &[u8], compat: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let mut r = RecordReader::new(rec);
        let version = r.u8()?;
        if !compact::is_compact(Some(&version)) {
            return Err(RecordError::UnknownVersion(version));
        }
        r.compact_ids = compact::compact_ids(version);
        let id = r.u32()?;
        let shape_id = if version == compact::VERSION_CONTEXT_ONLY {
            0
        } else {
            r.u32()?
        };
        let fields = usize::from(r.u16()?);
        if fields > FIELDS.len() {
            return Err(RecordError::UnknownVersion(version));
        }
        let same = r.bytes(fields.div_ceil(8))?;
        let frame = |id: u32| match id {
            0 => Ok(None),
            id => self
                .by_id
                .get(&id)
                .map(Some)
                .ok_or(RecordError::NoContext(id)),
        };
        let (context, shape) = (frame(id)?, frame(shape_id)?);
        let mask = compact::shape_mask(version);
        AuditEvent::diff_record_to_row(
            &mut r,
            fields,
            same,
            |i| {
                let from = match shape {
                    Some(s) if mask[i / 8] & (1 << (i % 8)) != 0 => Some(s),
                    _ => context,
                };
                from.and_then(|f| f.field(i))
            },
            compat,
            out,
        )?;
        if !r.is_empty() {
            return Err(RecordError::Trailing(r.remaining()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        audit::event::{EventKind, Flag, Timestamp},
        sink::record,
        text::Labels,
    };

    /// The id of event `seq` of session `id`: a UUID's text (as the daemon makes them),
    /// but for the second statement's, which is any text (as from another source).
    fn id_of(id: &str, seq: u64) -> crate::audit::event::EventId {
        if seq == 2 {
            return format!("{id}-{seq}").as_str().into();
        }
        let n = id.bytes().fold(seq, |n, b| n * 31 + u64::from(b));
        format!("01a20304-de26-7265-b42c-{:012x}", n & 0xffff_ffff_ffff)
            .as_str()
            .into()
    }

    /// A spool frame as the versions before compact ids wrote it.
    fn frame_of_text_ids(id: u32, ev: &AuditEvent) -> Vec<u8> {
        let mut f = vec![FRAME];
        f.extend(compact::frame_of_text_ids(id, ev));
        f
    }

    fn session(id: &str, n: u64) -> Vec<Box<AuditEvent>> {
        let start = AuditEvent {
            event_id: id_of(id, 0),
            session_id: id.into(),
            kind: EventKind::SessionStart,
            ts: Timestamp::parse("2026-12-06T11:29:40.381256Z").unwrap(),
            host: "vm".into(),
            comm: "pgbench".into(),
            exe: "/usr/lib/postgresql/15/bin/pgbench".into(),
            cgroup_path: "/system.slice/bench.service".into(),
            db_user: "app".into(),
            labels: Labels::from(std::collections::BTreeMap::from([(
                "team".to_string(),
                "core".to_string(),
            )])),
            ..AuditEvent::default()
        };
        let mut out = vec![Box::new(start.clone())];
        for seq in 1..=n {
            out.push(Box::new(AuditEvent {
                event_id: id_of(id, seq),
                kind: EventKind::Statement,
                // Keyed hashes (compact in a record) among other values (their text).
                params: match seq % 3 {
                    0 => ["hmac:1b9891be7a5a66b4", "NULL"].into(),
                    1 => [format!("hmac:{:016x}", seq * 0x9e37_79b9)].into(),
                    _ => ["42", "hmac:1B9891BE7A5A66B4"].into(),
                },
                seq,
                duration_us: seq * 7,
                statement: "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
                command: "SELECT".into(),
                tables: vec!["pgbench_accounts".into()].into(),
                protocol: "extended".into(),
                prepared_name: "P0_1".into(),
                // What the shape holds besides its analysis, and differing from it (the
                // shape is interned at the second statement): written in the record.
                tx_status: if seq == 3 { "in_transaction" } else { "idle" }.into(),
                rows: Some(1),
                flags: if seq == 2 {
                    Flag::Truncated.into()
                } else {
                    Default::default()
                },
                ..start.clone()
            }));
        }
        out
    }

    /// Rows from the framed records (the frames read as the reader meets them) are byte
    /// for byte the rows of the whole records, in both column styles.
    #[test]
    fn rows_of_framed_records_are_the_rows_of_whole_ones() {
        let mut events = session("s1", 3);
        events.extend(session("s2", 2));
        events.push(Box::new(AuditEvent {
            kind: EventKind::Gap,
            statement: "(gap)".into(),
            ..AuditEvent::default()
        }));
        let mut framer = Framer::default();
        let mut records = Records::default();
        assert!(framer.encode(&events, &mut records));
        let framed = records.iter().filter(|r| is_framed_record(r)).count();
        assert_eq!(framed, events.len());
        // Both sessions' contexts, and the shape at its second sighting.
        assert_eq!(records.iter().filter(|r| is_frame(r)).count(), 3);
        for compat in [false, true] {
            let mut frames = Frames::default();
            frames.start(1);
            let mut rows = Vec::new();
            for r in records.iter() {
                if is_frame(r) {
                    frames.add(r, compat).unwrap();
                } else {
                    frames.to_row(r, compat, &mut rows).unwrap();
                }
            }
            let (mut whole, mut scratch, mut expected) = (Vec::new(), Vec::new(), Vec::new());
            for ev in &events {
                whole.clear();
                record::encode(ev, &mut whole);
                record::to_row(&whole, &mut scratch, compat, &mut expected).unwrap();
            }
            assert_eq!(rows, expected, "compat {compat}");
        }
        // The next batch refers to the frames of the first.
        let mut more = Records::default();
        assert!(!framer.encode(&session("s1", 1)[1..], &mut more));
        assert_eq!(more.len(), 1);
        // A record whose frame was not read is an error, and nothing of it is copied.
        let lone = Frames::default();
        let mut rows = b"before".to_vec();
        let record = more.iter().next().unwrap();
        assert!(matches!(
            lone.to_row(record, false, &mut rows),
            Err(RecordError::NoContext(_))
        ));
        assert_eq!(rows, b"before");
        // Starting over writes the frames again.
        framer.start_over();
        let mut again = Records::default();
        assert!(framer.encode(&session("s1", 1)[1..], &mut again));
        assert!(again.iter().any(is_frame));
    }

    /// A spool written before ids were compact (records `5`, frames without the flag:
    /// event ids and keyed hashes as text) gives the rows it gave then, which are the
    /// rows of this version's records: the same columns, byte for byte.
    #[test]
    fn rows_of_records_with_text_ids_are_the_rows_of_compact_ones() {
        let events = session("s1", 6);
        let (start, shape_ev) = (&events[0], &events[1]);
        let mut shape = AuditEvent::default();
        shape.take_same(
            shape_ev,
            &compact::shape_mask(compact::VERSION_TEXT_IDS)[..],
        );
        let mut framer = Framer::default();
        let mut records = Records::default();
        framer.encode(&events, &mut records);
        for compat in [false, true] {
            let mut frames = Frames::default();
            frames.start(1);
            frames.add(&frame_of_text_ids(1, start), compat).unwrap();
            frames.add(&frame_of_text_ids(2, &shape), compat).unwrap();
            let mut old = Vec::new();
            for ev in &events {
                let rec = compact::record_of_layout(
                    compact::VERSION_TEXT_IDS,
                    ev,
                    (1, start),
                    Some((2, &shape)),
                );
                frames.to_row(&rec, compat, &mut old).unwrap();
            }
            let mut now = Vec::new();
            let mut current = Frames::default();
            current.start(1);
            for r in records.iter() {
                if is_frame(r) {
                    current.add(r, compat).unwrap();
                } else {
                    current.to_row(r, compat, &mut now).unwrap();
                }
            }
            assert_eq!(old, now, "compat {compat}");
        }
    }

    /// A spool written by the version before (records `4`, whose shapes hold only the
    /// statement's analysis) still gives the rows of its events: the fields besides are
    /// the context's or the record's, never the shape's. (The context is the session's
    /// first statement, as when a segment begins in the middle of a session: its
    /// protocol, name and status are the records' too, and the shape's are empty.)
    #[test]
    fn rows_of_records_of_the_layout_before_are_the_rows_of_whole_ones() {
        let events = session("s1", 4);
        let start = &events[1];
        // The frames as that version wrote them: the context, a shape of the analysis.
        let analysis = AuditEvent {
            statement: start.statement.clone(),
            command: start.command.clone(),
            tables: start.tables.clone(),
            fingerprint: start.fingerprint.clone(),
            ..AuditEvent::of_kind(EventKind::Statement)
        };
        for compat in [false, true] {
            let mut frames = Frames::default();
            frames.start(1);
            frames.add(&frame_of_text_ids(1, start), compat).unwrap();
            frames
                .add(&frame_of_text_ids(2, &analysis), compat)
                .unwrap();
            let (mut rows, mut expected, mut whole, mut scratch) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ev in &events[2..] {
                let rec = compact::record_of_layout(
                    compact::VERSION_ANALYSIS_SHAPES,
                    ev,
                    (1, start),
                    Some((2, &analysis)),
                );
                frames.to_row(&rec, compat, &mut rows).unwrap();
                whole.clear();
                record::encode(ev, &mut whole);
                record::to_row(&whole, &mut scratch, compat, &mut expected).unwrap();
            }
            assert_eq!(rows, expected, "compat {compat}");
        }
        // A layout this version does not know is an error, not a guess.
        let mut frames = Frames::default();
        frames.add(&frame_of_text_ids(1, start), false).unwrap();
        let mut rec = vec![8];
        rec.extend_from_slice(&[0; 16]);
        assert!(matches!(
            frames.to_row(&rec, false, &mut Vec::new()),
            Err(RecordError::UnknownVersion(8))
        ));
    }

    /// A reader that begins in the middle of a segment (the daemon restarted after part of
    /// it was delivered) reads the segment's frames before that point first, and then
    /// copies the rest exactly; the next segment (the encoder started over) reads on its
    /// own.
    #[test]
    fn a_segment_read_from_its_middle_after_a_restart() {
        use crate::sink::spool::{Position, Spool};
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut framer = Framer::default();
        let batches = [
            session("s1", 4),
            session("s2", 3),
            session("s1", 2)[1..].to_vec(),
        ];
        let mut all = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            if i == 2 {
                framer.start_over();
            }
            let mut records = Records::default();
            if framer.encode(b, &mut records) {
                spool.start_segment().unwrap();
            }
            for r in records.iter() {
                spool.append_here(r).unwrap();
            }
            all.extend(b.iter().cloned());
        }
        spool.sync().unwrap();
        // Delivered: the first session's events (its context and shape frames among them).
        let (first, _) = spool.read_from(spool.cursor(), 5 + 2, u64::MAX).unwrap();
        let mut at = Position::default();
        let mut read = 0;
        for (seg, r) in first.iter_with_segments() {
            at.segment = seg;
            at.offset += 8 + r.len() as u64;
            read += usize::from(!is_frame(r));
        }
        assert_eq!(read, 5);
        spool.commit(at).unwrap();
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let from = spool.cursor();
        assert_eq!(from, at);
        let mut frames = Frames::default();
        frames.start(from.segment);
        for f in spool.frames_before(from).unwrap().iter() {
            frames.add(f, false).unwrap();
        }
        let (rest, _) = spool.read_from(from, usize::MAX, u64::MAX).unwrap();
        let mut rows = Vec::new();
        let mut segments = Vec::new();
        for (seg, r) in rest.iter_with_segments() {
            if frames.segment() != Some(seg) {
                frames.start(seg);
            }
            segments.push(seg);
            if is_frame(r) {
                frames.add(r, false).unwrap();
            } else {
                frames.to_row(r, false, &mut rows).unwrap();
            }
        }
        assert!(segments.first() < segments.last(), "{segments:?}");
        let (mut whole, mut scratch, mut expected) = (Vec::new(), Vec::new(), Vec::new());
        for ev in &all[5..] {
            whole.clear();
            record::encode(ev, &mut whole);
            record::to_row(&whole, &mut scratch, false, &mut expected).unwrap();
        }
        assert_eq!(rows, expected);
        // Without the frames before it, the same reading is an error, not a wrong row.
        let mut bare = Frames::default();
        bare.start(from.segment);
        let mut out = Vec::new();
        let mut failed = 0;
        for r in rest.iter() {
            if is_frame(r) {
                bare.add(r, false).unwrap();
            } else if bare.to_row(r, false, &mut out).is_err() {
                failed += 1;
            }
        }
        // The second session's statements refer to the shape the first one's interned.
        assert_eq!(failed, 3);
    }
}
