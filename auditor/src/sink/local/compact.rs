//! Events written against their session's context: what a session's events share (its
//! process, cgroup, workload, labels, endpoints, database user...) is written once per
//! segment, and each event holds only the fields that differ from it.
//!
//! A context frame's payload: `id u32 | field count u16 | fields` (the event's fields in
//! the spool's record layout: the first event of the session in this segment). A record
//! frame's payload: `3 | context id u32 (0: none) | field count u16 | same [⌈count/8⌉] |
//! the fields whose bit in `same` is clear`. A field whose bit is set is the context's.
//! Contexts are numbered per segment, so a segment reads on its own.

use std::collections::HashMap;

use ahash::AHashMap;

use crate::{
    audit::{
        event::{AuditEvent, EventKind, EventRef, FIELDS},
        schema::{RecordError, RecordReader},
    },
    sink::record,
};

/// First byte of a record written against a context.
pub const VERSION: u8 = 3;
// The `same` bitmap is built on the stack: 256 fields at most.
const _: () = assert!(FIELDS.len() <= 256);

/// Sessions whose context is kept for new events at most; past it, all are forgotten (a
/// session's next event writes its context again).
const MAX_CONTEXTS: usize = 65_536;

struct Context {
    id: u32,
    /// The event its frame was encoded from: later events are compared with it field by
    /// field.
    event: AuditEvent,
}

/// The writer's contexts of the current segment.
#[derive(Default)]
pub struct Contexts {
    /// By session id (ids the daemon makes: a fast hash is safe).
    by_session: AHashMap<Box<str>, Context>,
    next_id: u32,
}

impl Contexts {
    /// A new segment: no context is known in it.
    pub fn clear(&mut self) {
        self.by_session.clear();
        self.next_id = 0;
    }

    /// Encodes `ev` into `out`; when its session has no context in this segment yet, the
    /// context's payload goes to `context` first (returns true: write that frame first).
    pub fn encode(&mut self, ev: &AuditEvent, context: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
        let same_len = FIELDS.len().div_ceil(8);
        out.push(VERSION);
        if ev.session_id.is_empty() {
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
            out.resize(out.len() + same_len, 0);
            ev.put_fields(out);
            return false;
        }
        let mut wrote = false;
        if !self.by_session.contains_key(&*ev.session_id) {
            if self.by_session.len() >= MAX_CONTEXTS {
                self.by_session.clear();
            }
            self.next_id += 1;
            let c = Context {
                id: self.next_id,
                event: ev.clone(),
            };
            context.extend_from_slice(&c.id.to_le_bytes());
            context.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
            ev.put_fields(context);
            self.by_session
                .insert(ev.session_id.to_string().into_boxed_str(), c);
            wrote = true;
        }
        let c = &self.by_session[&*ev.session_id];
        out.extend_from_slice(&c.id.to_le_bytes());
        out.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
        let same_at = out.len();
        out.resize(same_at + same_len, 0);
        let mut same = [0u8; 32];
        ev.put_fields_diff(&c.event, out, &mut same[..same_len]);
        out[same_at..same_at + same_len].copy_from_slice(&same[..same_len]);
        if ev.kind == EventKind::SessionEnd {
            // Nothing of this session follows (a later event would write it again).
            self.by_session.remove(&*ev.session_id);
        }
        wrote
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
        let fields = usize::from(r.u16()?);
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

    /// Reads a record frame's payload (this layout, or the spool's).
    pub fn event(&self, payload: &[u8]) -> Result<AuditEvent, RecordError> {
        if payload.first() != Some(&VERSION) {
            return record::decode(payload)?.to_event();
        }
        let mut r = RecordReader::new(&payload[1..]);
        let id = r.u32()?;
        let fields = usize::from(r.u16()?);
        if fields > FIELDS.len() {
            return Err(RecordError::UnknownVersion(VERSION));
        }
        let same = r.bytes(fields.div_ceil(8))?;
        let mut ev = EventRef::get_fields_except(&mut r, fields, same)?.to_event_except(same)?;
        if !r.is_empty() {
            return Err(RecordError::Trailing(r.remaining()));
        }
        if id != 0 {
            let ctx = self.by_id.get(&id).ok_or(RecordError::NoContext(id))?;
            ev.take_same(ctx, same);
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let second = AuditEvent {
            seq: 1,
            kind: EventKind::Statement,
            statement: "SELECT $1".into(),
            ..first.clone()
        };
        let mut w = Contexts::default();
        let (mut ctx, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
        assert!(w.encode(&first, &mut ctx, &mut a));
        let mut none = Vec::new();
        assert!(!w.encode(&second, &mut none, &mut b));
        assert!(none.is_empty());
        let mut full = Vec::new();
        record::encode(&second, &mut full);
        assert!(b.len() * 3 < full.len(), "{} vs {}", b.len(), full.len());
        let mut t = ContextTable::default();
        t.add(&ctx).unwrap();
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
            ..second.clone()
        };
        let mut f = Vec::new();
        assert!(!w.encode(&fresh, &mut none, &mut f));
        assert_eq!(f.len(), b.len());
        assert_eq!(t.event(&f).unwrap(), fresh);
        let moved = AuditEvent {
            cgroup_path: "/system.slice/other.service".into(),
            ..second.clone()
        };
        let mut m = Vec::new();
        assert!(!w.encode(&moved, &mut none, &mut m));
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
        let mut c = Vec::new();
        assert!(!w.encode(&lone, &mut none, &mut c));
        assert_eq!(t.event(&c).unwrap(), lone);
        // The session's end forgets its context: a later event writes it again.
        let end = AuditEvent {
            seq: 2,
            kind: EventKind::SessionEnd,
            ..first.clone()
        };
        let mut d = Vec::new();
        assert!(!w.encode(&end, &mut none, &mut d));
        assert!(w.encode(&second, &mut none, &mut Vec::new()));
    }
}
