//! The binary segment format of the local log (docs/local-log.md).
//!
//! A segment file starts with a header, then holds frames: `kind (1) | length (u32 LE) |
//! payload`. A record frame's payload is one event in the spool's record layout
//! (`sink::record`); a seal frame ends a block, the records since the previous seal:
//!
//! ```text
//! block u64 | records u64 (all, through this block) | count u32 | reason u8 | epoch u64 |
//! ts_us i64 | key_id [8] | hash [32] | seal [32] | digests [16 × count]
//! ```
//!
//! `digests` holds the first 16 bytes of each record's SHA-256, in order; `hash` is the
//! SHA-256 of a label, the previous block's hash, the fields before `hash` and the digests;
//! `seal` is the HMAC of `hash` under the epoch's forward-secure key (zeros when the log is
//! not sealed, `key_id` then zeros too). So a block's hash covers its records and every
//! block before it, and verification names the first record that was changed, removed or
//! moved (its digest is not where the seal says).

use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"AUDITLG1";
/// magic, segment, first block, records before, previous hash.
pub const HEADER_LEN: usize = 8 + 8 + 8 + 8 + 32;
pub const FRAME_HEADER: usize = 5;
pub const KIND_RECORD: u8 = 1;
pub const KIND_SEAL: u8 = 2;
/// A session's context (`compact.rs`), which later records of the segment refer to.
pub const KIND_CONTEXT: u8 = 3;
/// The fixed part of a seal's payload.
pub const SEAL_FIXED: usize = 8 + 8 + 4 + 1 + 8 + 8 + 8 + 32 + 32;
pub const DIGEST_LEN: usize = 16;
/// A frame longer than this is not one the daemon writes (records are bounded by the
/// event's bounded fields; a seal by the block bound).
pub const MAX_FRAME: usize = 64 << 20;
const BLOCK_LABEL: &[u8] = b"auditor log block v1";

/// Why a block was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// Records were flushed (the sink's cadence) or the block reached its size bound.
    Flush = 0,
    /// An epoch passed without records: proof the daemon was running.
    Heartbeat = 1,
    /// A daemon opened the log.
    Start = 2,
    /// A daemon stopped cleanly; nothing follows until the next start.
    Stop = 3,
}

impl Reason {
    pub fn from_u8(b: u8) -> Option<Reason> {
        Some(match b {
            0 => Reason::Flush,
            1 => Reason::Heartbeat,
            2 => Reason::Start,
            3 => Reason::Stop,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Flush => "flush",
            Reason::Heartbeat => "heartbeat",
            Reason::Start => "start",
            Reason::Stop => "stop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub segment: u64,
    pub first_block: u64,
    pub records_before: u64,
    pub prev_hash: [u8; 32],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.segment.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_block.to_le_bytes());
        b[24..32].copy_from_slice(&self.records_before.to_le_bytes());
        b[32..64].copy_from_slice(&self.prev_hash);
        b
    }

    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            return None;
        }
        Some(Header {
            segment: u64_at(b, 8),
            first_block: u64_at(b, 16),
            records_before: u64_at(b, 24),
            prev_hash: b[32..64].try_into().expect("32 bytes"),
        })
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A block's seal, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub block: u64,
    pub records: u64,
    pub count: u32,
    pub reason: u8,
    pub epoch: u64,
    pub ts_us: i64,
    pub key_id: [u8; 8],
    pub hash: [u8; 32],
    pub seal: [u8; 32],
    pub digests: Vec<u8>,
}

impl Seal {
    /// The block's hash: the previous block's hash, this seal's fields, the digests.
    pub fn compute_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(BLOCK_LABEL);
        h.update(prev);
        h.update(self.block.to_le_bytes());
        h.update(self.records.to_le_bytes());
        h.update(self.count.to_le_bytes());
        h.update([self.reason]);
        h.update(self.epoch.to_le_bytes());
        h.update(self.ts_us.to_le_bytes());
        h.update(self.key_id);
        h.update(&self.digests);
        h.finalize().into()
    }

    pub fn is_sealed(&self) -> bool {
        self.key_id != [0u8; 8]
    }

    /// Appends the seal frame.
    pub fn write_frame(&self, out: &mut Vec<u8>) {
        let len = SEAL_FIXED + self.digests.len();
        out.push(KIND_SEAL);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&self.block.to_le_bytes());
        out.extend_from_slice(&self.records.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.push(self.reason);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.ts_us.to_le_bytes());
        out.extend_from_slice(&self.key_id);
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.seal);
        out.extend_from_slice(&self.digests);
    }

    pub fn decode(p: &[u8]) -> Option<Seal> {
        if p.len() < SEAL_FIXED || !(p.len() - SEAL_FIXED).is_multiple_of(DIGEST_LEN) {
            return None;
        }
        let count = u32::from_le_bytes(p[16..20].try_into().expect("4 bytes"));
        if (p.len() - SEAL_FIXED) / DIGEST_LEN != count as usize {
            return None;
        }
        Some(Seal {
            block: u64_at(p, 0),
            records: u64_at(p, 8),
            count,
            reason: p[20],
            epoch: u64_at(p, 21),
            ts_us: u64_at(p, 29) as i64,
            key_id: p[37..45].try_into().expect("8 bytes"),
            hash: p[45..77].try_into().expect("32 bytes"),
            seal: p[77..109].try_into().expect("32 bytes"),
            digests: p[SEAL_FIXED..].to_vec(),
        })
    }
}

/// The first 16 bytes of a record's SHA-256.
pub fn digest(record: &[u8]) -> [u8; DIGEST_LEN] {
    let d = Sha256::digest(record);
    d[..DIGEST_LEN].try_into().expect("16 bytes")
}

/// Appends a record frame around `payload`.
pub fn write_record_frame(out: &mut Vec<u8>, payload: &[u8]) {
    write_frame(out, KIND_RECORD, payload)
}

/// Appends a frame of `kind` around `payload`.
pub fn write_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// One frame read from a segment.
#[derive(Debug)]
pub enum Frame<'a> {
    Record(&'a [u8]),
    Context(&'a [u8]),
    Seal(&'a [u8]),
    /// A kind this version does not know, or a length past the bound: the file is damaged
    /// here (or written by a newer version); nothing after it can be framed.
    Bad {
        kind: u8,
        len: u64,
    },
}

/// Splits the next frame off `buf[at..]`: `None` when the bytes there do not hold a whole
/// frame (the end of the file, or a frame still being written).
pub fn next_frame(buf: &[u8], at: usize) -> Option<(Frame<'_>, usize)> {
    let rest = buf.get(at..)?;
    if rest.len() < FRAME_HEADER {
        return None;
    }
    let kind = rest[0];
    let len = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
    if !matches!(kind, KIND_RECORD | KIND_SEAL | KIND_CONTEXT) || len > MAX_FRAME {
        return Some((
            Frame::Bad {
                kind,
                len: len as u64,
            },
            buf.len(),
        ));
    }
    let body = rest.get(FRAME_HEADER..FRAME_HEADER + len)?;
    let frame = match kind {
        KIND_RECORD => Frame::Record(body),
        KIND_CONTEXT => Frame::Context(body),
        _ => Frame::Seal(body),
    };
    Some((frame, at + FRAME_HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_seal_round_trip() {
        let h = Header {
            segment: 3,
            first_block: 17,
            records_before: 1234,
            prev_hash: [9; 32],
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        let mut s = Seal {
            block: 5,
            records: 40,
            count: 2,
            reason: Reason::Flush as u8,
            epoch: 7,
            ts_us: 1_700_000_000_000_000,
            key_id: [1; 8],
            hash: [0; 32],
            seal: [2; 32],
            digests: [digest(b"a"), digest(b"b")].concat(),
        };
        s.hash = s.compute_hash(&[3; 32]);
        let mut out = Vec::new();
        write_record_frame(&mut out, b"a");
        s.write_frame(&mut out);
        let (f, at) = next_frame(&out, 0).unwrap();
        assert!(matches!(f, Frame::Record(b"a")));
        let (f, end) = next_frame(&out, at).unwrap();
        let Frame::Seal(p) = f else { panic!() };
        assert_eq!(Seal::decode(p).unwrap(), s);
        assert_eq!(end, out.len());
        assert!(next_frame(&out, end).is_none());
        // A frame cut short is not a frame yet.
        assert!(next_frame(&out[..out.len() - 1], at).is_none());
        assert!(matches!(
            next_frame(&[9, 0, 0, 0, 0], 0),
            Some((Frame::Bad { kind: 9, .. }, _))
        ));
    }
}
