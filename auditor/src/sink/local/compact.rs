//! Events written against their session's context: what a session's events share (its
//! process, cgroup, workload, labels, endpoints, database user...) is written once per
//! segment, and each event holds only the fields that differ from it. Statement shapes
//! (text, command, tables, fingerprint) that repeat are interned per segment the same way:
//! written once, as a context of their own, and referred to by id.
//!
//! A context frame's payload: `id u32 | field count u16 | fields` (the event's fields in
//! the spool's record layout: the first event of the session in this segment; for a
//! shape, an event holding only the shape's fields; the count's top bit is set: event ids
//! and keyed hashes are compact, see `Field::put_as`). A record frame's payload: `6 |
//! context id u32 (0: none) | shape id u32 (0: none) | field count u16 | same
//! [⌈count/8⌉] | the fields whose bit in `same` is clear`. A field whose bit is set is the
//! shape's when it is one of the shape's fields and the record names a shape, else the
//! context's. A shape holds the statement's analysis (text, command, tables, fingerprint)
//! and what the statements of one text mostly share besides, which a session's context
//! (its first event: a session start) does not: the event's kind, protocol, prepared
//! statement's name and transaction status (each compared as any field: one that differs
//! is written in the record). Records of the earlier layouts still read: `5` (ids and
//! keyed hashes as text, as in frames without the count's top bit), `4` (a shape holds
//! only the analysis) and `3` (no shape id). Contexts and shapes are numbered per
//! segment (one sequence), so a segment reads on its own.

use std::{collections::HashMap, sync::OnceLock};

use ahash::{AHashMap, AHashSet};

use crate::{
    audit::{
        event::{AuditEvent, EventKind, EventRef, FIELDS},
        schema::{Field, RecordError, RecordReader},
    },
    sink::record,
    text::Text,
};

/// First byte of a record written against a context and, maybe, a shape.
pub const VERSION: u8 = 6;
/// The layout before compact ids: the same, event ids and keyed hashes as text.
pub(crate) const VERSION_TEXT_IDS: u8 = 5;
/// The layout whose shapes hold only the statement's analysis ([`ANALYSIS_FIELDS`]).
pub(crate) const VERSION_ANALYSIS_SHAPES: u8 = 4;
/// The layout before shapes: `3 | context id | field count | same | fields`.
pub(crate) const VERSION_CONTEXT_ONLY: u8 = 3;

/// Whether a payload's first byte is that of a record written against a context (any
/// layout this version reads).
pub const fn is_compact(first: Option<&u8>) -> bool {
    matches!(
        first,
        Some(&(VERSION | VERSION_TEXT_IDS | VERSION_ANALYSIS_SHAPES | VERSION_CONTEXT_ONLY))
    )
}

/// Whether the fields of a record of `version` hold event ids and keyed hashes compact
/// (see [`crate::audit::schema::Field::put_as`]).
pub(crate) fn compact_ids(version: u8) -> bool {
    version == VERSION
}

/// The top bit of a frame's field count: its fields hold event ids and keyed hashes
/// compact (set by this version; frames of the layouts before hold their text).
pub(crate) const FRAME_COMPACT_IDS: u16 = 0x8000;

/// A frame's field count as this version writes it.
pub(crate) fn frame_field_count() -> [u8; 2] {
    (FIELDS.len() as u16 | FRAME_COMPACT_IDS).to_le_bytes()
}

/// Reads a frame's field count: how many fields, and whether they hold compact ids.
pub(crate) fn read_frame_field_count(
    r: &mut RecordReader<'_>,
) -> Result<(usize, bool), RecordError> {
    let raw = r.u16()?;
    Ok((
        usize::from(raw & !FRAME_COMPACT_IDS),
        raw & FRAME_COMPACT_IDS != 0,
    ))
}
// The `same` bitmap is built on the stack: 256 fields at most.
const _: () = assert!(FIELDS.len() <= 256);
const SAME_MAX: usize = 32;

/// Sessions whose context is kept for new events at most; past it, all are forgotten (a
/// session's next event writes its context again).
const MAX_CONTEXTS: usize = 65_536;
/// Shapes kept at most (past it, all are forgotten and written again when they recur),
/// texts seen once remembered at most (by hash), and the longest text interned: a shape
/// is written at a text's second sighting, so texts that never repeat (raw statements
/// with their literals) cost a hash each, not a frame.
const MAX_SHAPES: usize = 4096;
const MAX_SEEN: usize = 16_384;
const MAX_SHAPE_TEXT: usize = 2048;

/// A statement's analysis: what identifies a shape (its text) and what must match for a
/// statement to use it (else the shape is replaced).
const ANALYSIS_FIELDS: [&str; 4] = ["statement", "command", "tables", "fingerprint"];
/// What a shape holds besides, from the statement that interned it: most statements of
/// one text share them, and a session's context (its start) holds none of them. A
/// statement that differs writes its own.
const SHARED_FIELDS: [&str; 4] = ["kind", "protocol", "prepared_name", "tx_status"];

/// Bit i set for each field i a shape holds in records of layout `version` (none before
/// shapes).
pub(crate) fn shape_mask(version: u8) -> &'static [u8; SAME_MAX] {
    fn mask_of(names: &[&str]) -> [u8; SAME_MAX] {
        let mut m = [0u8; SAME_MAX];
        for name in names {
            let i = FIELDS
                .iter()
                .position(|f| f.name == *name)
                .expect("a shape field is an event field");
            m[i / 8] |= 1 << (i % 8);
        }
        m
    }
    static ANALYSIS: OnceLock<[u8; SAME_MAX]> = OnceLock::new();
    static ALL: OnceLock<[u8; SAME_MAX]> = OnceLock::new();
    static NONE: [u8; SAME_MAX] = [0; SAME_MAX];
    match version {
        VERSION | VERSION_TEXT_IDS => ALL.get_or_init(|| {
            let both: Vec<&str> = ANALYSIS_FIELDS
                .iter()
                .chain(&SHARED_FIELDS)
                .copied()
                .collect();
            mask_of(&both)
        }),
        VERSION_ANALYSIS_SHAPES => ANALYSIS.get_or_init(|| mask_of(&ANALYSIS_FIELDS)),
        _ => &NONE,
    }
}

struct Context {
    id: u32,
    /// The event its frame was encoded from: later events are compared with it field by
    /// field.
    event: AuditEvent,
}

/// What [`Contexts::encode`] wrote before the record: the frames to write first, in this
/// order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Before {
    pub context: bool,
    pub shape: bool,
}

/// The writer's contexts and shapes: those whose frames the segments being written hold.
///
/// Ids go on across [`Contexts::forget`]: one encoding can feed two files that start new
/// segments at different times (the local log and the ClickHouse spool, `sink/mod.rs`),
/// and a frame written again after a forget never takes an id that the same segment
/// already gave to another. (Readers take a segment's frames in order, a later frame of an
/// id replacing an earlier one, so even the wrap of the id after 2^32 frames, which
/// forgets everything first, never makes a record refer to the wrong frame.)
#[derive(Default)]
pub struct Contexts {
    /// By session id (ids the daemon makes: a fast hash is safe). Contexts and shapes are
    /// boxed: an event is about 1 KB, which a table would otherwise hold per free slot.
    by_session: AHashMap<Box<str>, Box<Context>>,
    shapes: Shapes,
    /// The last id given (0: none yet).
    next_id: u32,
}

/// The statement shapes of the current segment.
#[derive(Default)]
struct Shapes {
    /// By statement text, the shape's place in `slots` (its other fields are compared on
    /// use).
    by_text: AHashMap<Text, usize>,
    slots: Vec<Box<Context>>,
    /// Hashes of texts seen once in this segment.
    seen: AHashSet<u64>,
    hasher: ahash::RandomState,
}

impl Contexts {
    /// No context or shape is known any more (a new segment begins, in one of the files
    /// this encoding feeds): each is written again, under a new id, when next used.
    pub fn forget(&mut self) {
        self.by_session.clear();
        self.shapes.clear();
    }

    /// Encodes `ev` into `out`. When its session has no context in this segment yet, the
    /// context's payload goes to `context`; when its statement shape is interned now, the
    /// shape's payload goes to `shape` (write those frames first, context then shape).
    pub fn encode(
        &mut self,
        ev: &AuditEvent,
        context: &mut Vec<u8>,
        shape: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Before {
        let same_len = FIELDS.len().div_ceil(8);
        let mut before = Before::default();
        // An event takes two ids at most (a context and a shape); before the id would wrap,
        // everything is forgotten and ids start again.
        if self.next_id > u32::MAX - 2 {
            self.forget();
            self.next_id = 0;
        }
        out.push(VERSION);
        if ev.session_id.is_empty() {
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
            out.resize(out.len() + same_len, 0);
            ev.put_fields(out);
            return before;
        }
        // One lookup for a session already known (the common case).
        let c: &Context = match self.by_session.get(&*ev.session_id) {
            Some(c) => c,
            None => {
                if self.by_session.len() >= MAX_CONTEXTS {
                    self.by_session.clear();
                }
                self.next_id += 1;
                let c = Box::new(Context {
                    id: self.next_id,
                    event: ev.clone(),
                });
                context.extend_from_slice(&c.id.to_le_bytes());
                context.extend_from_slice(&frame_field_count());
                ev.put_fields(context);
                self.by_session
                    .insert(ev.session_id.to_string().into_boxed_str(), c);
                before.context = true;
                &self.by_session[&*ev.session_id]
            }
        };
        let base = self
            .shapes
            .shape_of(ev, &mut self.next_id, shape, &mut before);
        out.extend_from_slice(&c.id.to_le_bytes());
        out.extend_from_slice(&base.map_or(0, |s| s.id).to_le_bytes());
        out.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
        let same_at = out.len();
        out.resize(same_at + same_len, 0);
        let mut same = [0u8; SAME_MAX];
        let base = base.map(|s| (&s.event, &shape_mask(VERSION)[..]));
        ev.put_fields_diff(&c.event, base, out, &mut same[..same_len]);
        out[same_at..same_at + same_len].copy_from_slice(&same[..same_len]);
        if ev.kind == EventKind::SessionEnd {
            // Nothing of this session follows (a later event would write it again).
            self.by_session.remove(&*ev.session_id);
        }
        before
    }
}

impl Shapes {
    /// `ev`'s interned shape, if any, interning it at its text's second sighting (its
    /// payload then goes to `payload`, with an id from `next_id`).
    fn shape_of(
        &mut self,
        ev: &AuditEvent,
        next_id: &mut u32,
        payload: &mut Vec<u8>,
        before: &mut Before,
    ) -> Option<&Context> {
        let text = &*ev.statement;
        if text.is_empty() || text.len() > MAX_SHAPE_TEXT {
            return None;
        }
        // One lookup for a shape already interned (the common case).
        let found = self.by_text.get(text).copied();
        match found {
            Some(i) => {
                let s = &self.slots[i].event;
                if ev.command.same(&s.command)
                    && ev.tables.same(&s.tables)
                    && ev.fingerprint.same(&s.fingerprint)
                {
                    // (Indexed again: returning `s` would hold `slots` borrowed below.)
                    return Some(&self.slots[i]);
                }
                // The same text with another analysis: the shape is replaced.
            }
            None => {
                let h = self.hasher.hash_one(text.as_bytes());
                if self.seen.len() >= MAX_SEEN {
                    self.seen.clear();
                }
                if self.seen.insert(h) {
                    return None;
                }
                if self.by_text.len() >= MAX_SHAPES {
                    self.by_text.clear();
                    self.slots.clear();
                }
            }
        }
        // The fields the mask names (ANALYSIS_FIELDS and SHARED_FIELDS), nothing else.
        let mut shape = AuditEvent::default();
        shape.take_same(ev, &shape_mask(VERSION)[..]);
        *next_id += 1;
        let id = *next_id;
        payload.extend_from_slice(&id.to_le_bytes());
        payload.extend_from_slice(&frame_field_count());
        shape.put_fields(payload);
        before.shape = true;
        let shape = Box::new(Context { id, event: shape });
        let i = match found {
            Some(i) => {
                self.slots[i] = shape;
                i
            }
            None => {
                self.slots.push(shape);
                self.by_text
                    .insert(ev.statement.clone(), self.slots.len() - 1);
                self.slots.len() - 1
            }
        };
        Some(&self.slots[i])
    }

    fn clear(&mut self) {
        self.by_text.clear();
        self.slots.clear();
        self.seen.clear();
    }
}

/// The reader's contexts of the segment being read.
#[derive(Default)]
pub struct ContextTable {
    by_id: HashMap<u32, AuditEvent>,
}

impl ContextTable {
    pub fn clear(&mut self) {
        self.by_id.clear();
    }

    /// Reads a context frame's payload.
    pub fn add(&mut self, payload: &[u8]) -> Result<(), RecordError> {
        let mut r = RecordReader::new(payload);
        let id = r.u32()?;
        let (fields, compact) = read_frame_field_count(&mut r)?;
        r.compact_ids = compact;
        if fields > FIELDS.len() {
            return Err(RecordError::UnknownVersion(VERSION));
        }
        let ev = EventRef::get_fields(&mut r, fields)?.to_event()?;
        if !r.is_empty() {
            return Err(RecordError::Trailing(r.remaining()));
        }
        self.by_id.insert(id, ev);
        Ok(())
    }

    /// Reads a record frame's payload (this layout, an earlier one, or the spool's).
    pub fn event(&self, payload: &[u8]) -> Result<AuditEvent, RecordError> {
        if !is_compact(payload.first()) {
            return record::decode(payload)?.to_event();
        }
        let version = payload[0];
        let mut r = RecordReader::with_ids(&payload[1..], compact_ids(version));
        let id = r.u32()?;
        let shape_id = if version == VERSION_CONTEXT_ONLY {
            0
        } else {
            r.u32()?
        };
        let fields = usize::from(r.u16()?);
        if fields > FIELDS.len() {
            return Err(RecordError::UnknownVersion(version));
        }
        let same = r.bytes(fields.div_ceil(8))?;
        let mut ev = EventRef::get_fields_except(&mut r, fields, same)?.to_event_except(same)?;
        if !r.is_empty() {
            return Err(RecordError::Trailing(r.remaining()));
        }
        let mut from_ctx = [0u8; SAME_MAX];
        from_ctx[..same.len()].copy_from_slice(same);
        if shape_id != 0 {
            let shape = self
                .by_id
                .get(&shape_id)
                .ok_or(RecordError::NoContext(shape_id))?;
            let mask = shape_mask(version);
            let mut from_shape = [0u8; SAME_MAX];
            for (i, b) in same.iter().enumerate() {
                from_shape[i] = b & mask[i];
                from_ctx[i] = b & !mask[i];
            }
            ev.take_same(shape, &from_shape[..same.len()]);
        }
        if id != 0 {
            let ctx = self.by_id.get(&id).ok_or(RecordError::NoContext(id))?;
            ev.take_same(ctx, &from_ctx[..same.len()]);
        }
        Ok(ev)
    }
}

/// A record of an earlier layout (`3`: no shape; `4`: `shape` holds only the analysis),
/// as the versions before wrote them, for tests that read them.
#[cfg(test)]
pub(crate) fn record_of_layout(
    version: u8,
    ev: &AuditEvent,
    (ctx_id, ctx): (u32, &AuditEvent),
    shape: Option<(u32, &AuditEvent)>,
) -> Vec<u8> {
    let same_len = FIELDS.len().div_ceil(8);
    let mut rec = vec![version];
    rec.extend_from_slice(&ctx_id.to_le_bytes());
    if version != VERSION_CONTEXT_ONLY {
        rec.extend_from_slice(&shape.map_or(0, |(id, _)| id).to_le_bytes());
    }
    rec.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
    let at = rec.len();
    rec.resize(at + same_len, 0);
    let mut same = [0u8; SAME_MAX];
    let base = shape.map(|(_, s)| (s, &shape_mask(version)[..]));
    ev.put_fields_diff_as(
        ctx,
        base,
        &mut rec,
        &mut same[..same_len],
        // As those versions wrote them (not `compact_ids`, which tests check).
        version == VERSION,
    );
    rec[at..at + same_len].copy_from_slice(&same[..same_len]);
    rec
}

/// A context or shape frame's payload as the versions before compact ids wrote it (no
/// flag in the field count, ids and keyed hashes as text), for tests that read them.
#[cfg(test)]
pub(crate) fn frame_of_text_ids(id: u32, ev: &AuditEvent) -> Vec<u8> {
    let mut f = id.to_le_bytes().to_vec();
    f.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
    ev.put_fields_as(&mut f, false);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer's frames for `ev`: (what came before, record), the context and shape
    /// frames added to the reader's table.
    fn enc(w: &mut Contexts, t: &mut ContextTable, ev: &AuditEvent) -> (Before, Vec<u8>) {
        let (mut ctx, mut shape, mut rec) = (Vec::new(), Vec::new(), Vec::new());
        let before = w.encode(ev, &mut ctx, &mut shape, &mut rec);
        assert_eq!(before.context, !ctx.is_empty());
        assert_eq!(before.shape, !shape.is_empty());
        for p in [ctx, shape].iter().filter(|p| !p.is_empty()) {
            t.add(p).unwrap();
        }
        (before, rec)
    }

    const NOTHING: Before = Before {
        context: false,
        shape: false,
    };

    #[test]
    fn a_sessions_events_hold_only_what_differs_from_its_context() {
        let first = AuditEvent {
            session_id: "s1".into(),
            kind: EventKind::SessionStart,
            comm: "psql".into(),
            cgroup_path: "/system.slice/app.service".into(),
            exe: "/usr/bin/psql".into(),
            db_user: "app".into(),
            ..AuditEvent::default()
        };
        // Each statement text once: no shape is interned.
        let stmt = |n: u64| AuditEvent {
            seq: n,
            kind: EventKind::Statement,
            statement: format!("SELECT {n}").into(),
            ..first.clone()
        };
        let second = stmt(1);
        let mut w = Contexts::default();
        let mut t = ContextTable::default();
        let (before, a) = enc(&mut w, &mut t, &first);
        assert!(before.context && !before.shape);
        let (before, b) = enc(&mut w, &mut t, &second);
        assert_eq!(before, NOTHING);
        let mut full = Vec::new();
        record::encode(&second, &mut full);
        assert!(b.len() * 3 < full.len(), "{} vs {}", b.len(), full.len());
        assert_eq!(t.event(&a).unwrap(), first);
        assert_eq!(t.event(&b).unwrap(), second);
        // A record of the spool's layout still reads.
        assert_eq!(t.event(&full).unwrap(), second);
        // Fields equal to the context's but not shared with it (other allocations) are
        // the context's all the same; a changed one is written.
        let fresh = AuditEvent {
            comm: String::from("psql").into(),
            cgroup_path: String::from("/system.slice/app.service").into(),
            exe: String::from("/usr/bin/psql").into(),
            ..stmt(2)
        };
        let (before, f) = enc(&mut w, &mut t, &fresh);
        assert_eq!(before, NOTHING);
        assert_eq!(f.len(), b.len());
        assert_eq!(t.event(&f).unwrap(), fresh);
        let moved = AuditEvent {
            cgroup_path: "/system.slice/other.service".into(),
            ..stmt(3)
        };
        let (_, m) = enc(&mut w, &mut t, &moved);
        assert!(m.len() > b.len());
        assert_eq!(t.event(&m).unwrap(), moved);
        // A context never seen is an error, not a guess.
        assert!(ContextTable::default().event(&b).is_err());
        // No session: every field in the record.
        let lone = AuditEvent {
            kind: EventKind::Gap,
            statement: "(gap)".into(),
            ..AuditEvent::default()
        };
        let (before, c) = enc(&mut w, &mut t, &lone);
        assert_eq!(before, NOTHING);
        assert_eq!(t.event(&c).unwrap(), lone);
        // The session's end forgets its context: a later event writes it again.
        let end = AuditEvent {
            seq: 4,
            kind: EventKind::SessionEnd,
            ..first.clone()
        };
        let (before, _) = enc(&mut w, &mut t, &end);
        assert_eq!(before, NOTHING);
        assert!(enc(&mut w, &mut t, &stmt(5)).0.context);
    }

    /// Ids go on after a forget (one encoding feeds files whose segments begin at other
    /// times: no id means two frames in one segment); before an id would wrap, everything
    /// is forgotten and ids start again at 1.
    #[test]
    fn forgotten_contexts_take_new_ids_and_ids_wrap_forgetting_all() {
        let start = |id: &str| AuditEvent {
            session_id: id.into(),
            kind: EventKind::SessionStart,
            db_user: "app".into(),
            ..AuditEvent::default()
        };
        let stmt = |id: &str, n: u64| AuditEvent {
            seq: n,
            kind: EventKind::Statement,
            statement: format!("SELECT {n}").into(),
            ..start(id)
        };
        let ids = |rec: &[u8]| u32::from_le_bytes(rec[1..5].try_into().unwrap());
        let mut w = Contexts::default();
        let mut t = ContextTable::default();
        let (_, r1) = enc(&mut w, &mut t, &start("s1"));
        assert_eq!(ids(&r1), 1);
        w.forget();
        let (before, r2) = enc(&mut w, &mut t, &stmt("s1", 1));
        assert!(before.context, "written again after a forget");
        assert_eq!(ids(&r2), 2);
        assert_eq!(t.event(&r2).unwrap(), stmt("s1", 1));
        // The last ids before the wrap are given (while an event's two fit); then all is
        // forgotten, and ids start over.
        w.next_id = u32::MAX - 3;
        let (_, r3) = enc(&mut w, &mut t, &start("s2"));
        assert_eq!(ids(&r3), u32::MAX - 2);
        let (_, r4) = enc(&mut w, &mut t, &start("s3"));
        assert_eq!(ids(&r4), u32::MAX - 1);
        let (before, r5) = enc(&mut w, &mut t, &stmt("s2", 2));
        assert!(before.context, "forgotten at the wrap");
        assert_eq!(ids(&r5), 1);
        assert_eq!(t.event(&r5).unwrap(), stmt("s2", 2));
        let (before, r6) = enc(&mut w, &mut t, &stmt("s1", 3));
        assert!(before.context);
        assert_eq!(ids(&r6), 2);
        assert_eq!(t.event(&r6).unwrap(), stmt("s1", 3));
    }

    #[test]
    fn a_statement_shape_seen_twice_is_written_once_and_referred_to() {
        let session = |id: &str| AuditEvent {
            session_id: id.into(),
            kind: EventKind::SessionStart,
            comm: "pgbench".into(),
            ..AuditEvent::default()
        };
        let select = |s: &AuditEvent, seq: u64, fp: &str| AuditEvent {
            seq,
            kind: EventKind::Statement,
            statement: "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
            command: "SELECT".into(),
            tables: vec!["pgbench_accounts".to_string()].into(),
            fingerprint: fp.into(),
            params: vec![format!("hmac:{seq:016x}")].into(),
            rows: Some(1),
            ..s.clone()
        };
        let (s1, s2) = (session("s1"), session("s2"));
        let mut w = Contexts::default();
        let mut t = ContextTable::default();
        enc(&mut w, &mut t, &s1);
        // The first sighting is written whole, the second interns the shape.
        let (before, r1) = enc(&mut w, &mut t, &select(&s1, 1, "fp1"));
        assert_eq!(before, NOTHING);
        let (before, r2) = enc(&mut w, &mut t, &select(&s1, 2, "fp1"));
        assert!(before.shape && !before.context);
        assert!(r2.len() + 60 < r1.len(), "{} vs {}", r2.len(), r1.len());
        // Later ones refer to it, from any session of the segment.
        let (before, r3) = enc(&mut w, &mut t, &select(&s1, 3, "fp1"));
        assert_eq!(before, NOTHING);
        assert_eq!(r3.len(), r2.len());
        enc(&mut w, &mut t, &s2);
        let (before, r4) = enc(&mut w, &mut t, &select(&s2, 1, "fp1"));
        assert_eq!(before, NOTHING);
        for (r, ev) in [
            (&r1, select(&s1, 1, "fp1")),
            (&r2, select(&s1, 2, "fp1")),
            (&r3, select(&s1, 3, "fp1")),
            (&r4, select(&s2, 1, "fp1")),
        ] {
            assert_eq!(t.event(r).unwrap(), ev);
        }
        // The same text with another fingerprint: a new shape, which reads as written.
        let (before, r5) = enc(&mut w, &mut t, &select(&s1, 4, "fp2"));
        assert!(before.shape);
        assert_eq!(t.event(&r5).unwrap(), select(&s1, 4, "fp2"));
        // And the new shape is the one referred to from then on.
        let (_, r6) = enc(&mut w, &mut t, &select(&s1, 5, "fp2"));
        assert_eq!(t.event(&r6).unwrap(), select(&s1, 5, "fp2"));
        // A shape never seen is an error, not a guess.
        let mut only_ctx = ContextTable::default();
        let mut ctx = Vec::new();
        Contexts::default().encode(&s1, &mut ctx, &mut Vec::new(), &mut Vec::new());
        only_ctx.add(&ctx).unwrap();
        assert!(matches!(
            only_ctx.event(&r3),
            Err(RecordError::NoContext(_))
        ));
        // A new segment knows no shape: the first use is written whole again.
        w.forget();
        let mut t = ContextTable::default();
        enc(&mut w, &mut t, &s1);
        let (before, r7) = enc(&mut w, &mut t, &select(&s1, 6, "fp2"));
        assert_eq!(before, NOTHING);
        assert_eq!(r7.len(), r1.len());
    }

    /// What the statements of a text share besides its analysis (kind, protocol,
    /// prepared statement's name, transaction status) is the shape's: not in their
    /// records; a statement that differs in one writes its own, and each reads as it was.
    #[test]
    fn a_shape_holds_what_the_statements_of_its_text_share() {
        let start = AuditEvent {
            session_id: "s1".into(),
            kind: EventKind::SessionStart,
            comm: "pgbench".into(),
            db_user: "app".into(),
            ..AuditEvent::default()
        };
        let select = |seq: u64, tx: &str| AuditEvent {
            seq,
            kind: EventKind::Statement,
            statement: "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
            command: "SELECT".into(),
            tables: vec!["pgbench_accounts".to_string()].into(),
            fingerprint: "fp".into(),
            protocol: "extended".into(),
            prepared_name: "P0_1".into(),
            tx_status: tx.into(),
            params: vec![format!("hmac:{seq:016x}")].into(),
            rows: Some(1),
            ..start.clone()
        };
        let mut w = Contexts::default();
        let mut t = ContextTable::default();
        enc(&mut w, &mut t, &start);
        let (_, first) = enc(&mut w, &mut t, &select(1, "idle"));
        let (before, second) = enc(&mut w, &mut t, &select(2, "idle"));
        assert!(before.shape);
        let (_, third) = enc(&mut w, &mut t, &select(3, "idle"));
        // What the record of layout 4 held besides (its shape held the analysis only):
        // each of the four with its 4-byte length.
        let shared = ["statement", "extended", "P0_1", "idle"]
            .iter()
            .map(|v| 4 + v.len())
            .sum::<usize>();
        let analysis_and_shared = 4
            + "SELECT abalance FROM pgbench_accounts WHERE aid = $1".len()
            + 4
            + "SELECT".len()
            + 4
            + 4
            + "pgbench_accounts".len()
            + 4
            + "fp".len()
            + shared;
        assert_eq!(first.len(), third.len() + analysis_and_shared);
        assert_eq!(second.len(), third.len());
        // Another transaction status: written in the record, the shape kept.
        let (before, other) = enc(&mut w, &mut t, &select(4, "in_transaction"));
        assert_eq!(before, NOTHING);
        assert_eq!(other.len(), third.len() + 4 + "in_transaction".len());
        // Another kind of event of the same text (no prepared name, another protocol).
        let simple = AuditEvent {
            protocol: "simple".into(),
            prepared_name: "".into(),
            ..select(5, "idle")
        };
        let (before, s5) = enc(&mut w, &mut t, &simple);
        assert_eq!(before, NOTHING);
        for (r, ev) in [
            (&first, select(1, "idle")),
            (&second, select(2, "idle")),
            (&third, select(3, "idle")),
            (&other, select(4, "in_transaction")),
            (&s5, simple),
        ] {
            assert_eq!(t.event(r).unwrap(), ev);
        }
    }

    /// Records of layout 4 (shapes holding only the analysis) read: the fields besides
    /// are the context's or the record's, never the shape's. (The context here is a
    /// statement, as when a session's first event in a segment is one: its protocol and
    /// status are the record's too, and the shape's are empty.)
    #[test]
    fn records_of_analysis_only_shapes_still_read() {
        let ctx_ev = AuditEvent {
            session_id: "s1".into(),
            kind: EventKind::Statement,
            seq: 1,
            comm: "psql".into(),
            statement: "BEGIN".into(),
            command: "BEGIN".into(),
            protocol: "extended".into(),
            prepared_name: "P0_1".into(),
            tx_status: "in_transaction".into(),
            ..AuditEvent::default()
        };
        let ev = AuditEvent {
            seq: 2,
            statement: "SELECT 1".into(),
            command: "SELECT".into(),
            ..ctx_ev.clone()
        };
        // The shape frame as that version wrote it (protocol and status empty, kind
        // `statement`), and the record against it.
        let analysis = AuditEvent {
            statement: ev.statement.clone(),
            command: ev.command.clone(),
            ..AuditEvent::of_kind(EventKind::Statement)
        };
        let mut t = ContextTable::default();
        for (id, e) in [(7u32, &ctx_ev), (8, &analysis)] {
            t.add(&frame_of_text_ids(id, e)).unwrap();
        }
        let mut rec = record_of_layout(
            VERSION_ANALYSIS_SHAPES,
            &ev,
            (7, &ctx_ev),
            Some((8, &analysis)),
        );
        assert_eq!(t.event(&rec).unwrap(), ev);
        // An unknown layout is not read as one of these.
        rec[0] = 8;
        assert!(t.event(&rec).is_err());
    }

    /// Records of layout 5 (ids and keyed hashes as text, frames without the flag)
    /// read as they did; this version's record of the same event is the same but for
    /// those fields: 23 bytes fewer for a UUID id (17 for 40), 16 for each keyed hash (9
    /// for 25), one more for any other value (its tag).
    #[test]
    fn records_with_text_ids_still_read_and_compact_ones_are_smaller() {
        let ctx_ev = AuditEvent {
            event_id: "01a20304-de26-7265-b42c-353bcf4fdf7c".into(),
            session_id: "s1".into(),
            kind: EventKind::SessionStart,
            comm: "pgbench".into(),
            ..AuditEvent::default()
        };
        let ev = AuditEvent {
            event_id: "01a20304-de26-7265-b42c-353bcf4fdf7d".into(),
            seq: 1,
            kind: EventKind::Statement,
            statement: "UPDATE t SET a = $1 WHERE b = $2".into(),
            params: ["hmac:1b9891be7a5a66b4", "hmac:00000000000000ff", "NULL"].into(),
            ..ctx_ev.clone()
        };
        let ctx = frame_of_text_ids(7, &ctx_ev);
        let old = record_of_layout(VERSION_TEXT_IDS, &ev, (7, &ctx_ev), None);
        let mut t = ContextTable::default();
        t.add(&ctx).unwrap();
        assert_eq!(t.event(&old).unwrap(), ev);
        // The same with compact ids: this version's frames and record.
        let mut now = ContextTable::default();
        let mut w = Contexts::default();
        enc(&mut w, &mut now, &ctx_ev);
        let (_, rec) = enc(&mut w, &mut now, &ev);
        assert_eq!(now.event(&rec).unwrap(), ev);
        assert_eq!(rec[0], VERSION);
        assert_eq!(old.len() - rec.len(), 23 + 2 * 16 - 1);
        // A record of one layout is not read as the other's.
        let mut swapped = rec.clone();
        swapped[0] = VERSION_TEXT_IDS;
        assert_ne!(t.event(&swapped).ok(), Some(ev.clone()));
    }

    #[test]
    fn records_of_the_layout_before_shapes_still_read() {
        // `3 | context id | field count | same | fields`, as the previous version wrote.
        let ctx_ev = AuditEvent {
            session_id: "s1".into(),
            kind: EventKind::SessionStart,
            comm: "psql".into(),
            ..AuditEvent::default()
        };
        let ev = AuditEvent {
            seq: 1,
            kind: EventKind::Statement,
            statement: "SELECT 1".into(),
            ..ctx_ev.clone()
        };
        let ctx = frame_of_text_ids(7, &ctx_ev);
        let rec = record_of_layout(VERSION_CONTEXT_ONLY, &ev, (7, &ctx_ev), None);
        let mut t = ContextTable::default();
        t.add(&ctx).unwrap();
        assert_eq!(t.event(&rec).unwrap(), ev);
    }
}
