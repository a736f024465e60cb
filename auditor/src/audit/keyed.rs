//! HMAC-SHA256 for the short values of the hot path (a statement's parameters, a masked
//! column's values): the key's two blocks are compressed once, when the key is set, so a
//! value of up to 55 bytes costs two SHA-256 compressions and nothing else (no hasher
//! state cloned, no buffering). The result is HMAC-SHA256 as RFC 2104 defines it (tested
//! against the `hmac` crate).

use crate::audit::schema::same_bytes;
use sha2::{
    compress256,
    digest::generic_array::{typenum::U64, GenericArray},
    Digest, Sha256,
};

const BLOCK: usize = 64;

/// SHA-256's initial state.
const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// HMAC-SHA256 under one key, its inner and outer key blocks already compressed.
#[derive(Clone)]
pub struct KeyedHash {
    inner: [u32; 8],
    outer: [u32; 8],
    /// Which key this is, for [`KeyedHash::short_hex`]'s memo: each key made gets its own
    /// (a clone is the same key).
    id: u64,
}

impl std::fmt::Debug for KeyedHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Its state is key material.
        f.write_str("KeyedHash(..)")
    }
}

fn compress(state: &mut [u32; 8], block: &[u8]) {
    let block: &GenericArray<u8, U64> = GenericArray::from_slice(block);
    compress256(state, std::slice::from_ref(block));
}

impl KeyedHash {
    pub fn new(key: &[u8]) -> KeyedHash {
        // A key longer than a block is hashed first (RFC 2104).
        let mut k = [0u8; BLOCK];
        if key.len() > BLOCK {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let keyed = |pad: u8| {
            let mut state = IV;
            let block: Vec<u8> = k.iter().map(|b| b ^ pad).collect();
            compress(&mut state, &block);
            state
        };
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        KeyedHash {
            inner: keyed(0x36),
            outer: keyed(0x5c),
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The first 8 bytes of HMAC-SHA256(key, value) in hex. Values repeat (an id in
    /// every statement of a request, a tenant in every statement of a session, flags,
    /// limits): this thread keeps the last values of up to [`MEMO_VALUE`] bytes it hashed
    /// and their hex, so a repeated one costs a compare instead of two compressions.
    pub fn short_hex(&self, value: &[u8]) -> [u8; 16] {
        let hex_of = |d: [u8; 32]| {
            let mut text = [0u8; 16];
            hex::encode_to_slice(&d[..8], &mut text).expect("16 hex digits");
            text
        };
        if value.len() > MEMO_VALUE {
            return hex_of(self.digest(value));
        }
        let slot = memo_slot(value);
        // One visit to the thread's memo: a hit returns its hex, a miss hashes and
        // stores (the digest does not touch the memo).
        MEMO.try_with(|m| {
            let mut m = m.borrow_mut();
            let e = &mut m.0[slot];
            if e.key == self.id
                && usize::from(e.len) == value.len()
                && same_bytes(&e.value[..value.len()], value)
            {
                return e.hex;
            }
            let hex = hex_of(self.digest(value));
            e.key = self.id;
            e.len = value.len() as u8;
            e.value[..value.len()].copy_from_slice(value);
            e.hex = hex;
            hex
        })
        .unwrap_or_else(|_| hex_of(self.digest(value)))
    }

    /// HMAC-SHA256(key, value).
    pub fn digest(&self, value: &[u8]) -> [u8; 32] {
        // The inner hash: the key block (done), the value, its padding and bit length.
        let mut state = self.inner;
        let whole = value.len() - value.len() % BLOCK;
        for block in value[..whole].chunks_exact(BLOCK) {
            compress(&mut state, block);
        }
        let rest = &value[whole..];
        let mut tail = [0u8; 2 * BLOCK];
        tail[..rest.len()].copy_from_slice(rest);
        tail[rest.len()] = 0x80;
        let end = if rest.len() < BLOCK - 8 {
            BLOCK
        } else {
            2 * BLOCK
        };
        let bits = ((BLOCK + value.len()) as u64).wrapping_mul(8);
        tail[end - 8..end].copy_from_slice(&bits.to_be_bytes());
        for block in tail[..end].chunks_exact(BLOCK) {
            compress(&mut state, block);
        }
        // The outer hash: the key block (done), the inner digest, its padding.
        let mut block = [0u8; BLOCK];
        for (i, w) in state.iter().enumerate() {
            block[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
        }
        block[32] = 0x80;
        block[BLOCK - 8..].copy_from_slice(&(((BLOCK + 32) * 8) as u64).to_be_bytes());
        let mut state = self.outer;
        compress(&mut state, &block);
        let mut out = [0u8; 32];
        for (i, w) in state.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

/// The longest value [`KeyedHash::short_hex`] remembers: ids, numbers, timestamps,
/// short names and flags; longer values seldom repeat and are hashed each time.
pub const MEMO_VALUE: usize = 40;

/// Slots of the memo (a value has one: the last value hashed there stays).
const MEMO_SLOTS: usize = 256;

#[derive(Clone, Copy)]
struct MemoEntry {
    /// The key's id; 0: empty.
    key: u64,
    len: u8,
    value: [u8; MEMO_VALUE],
    hex: [u8; 16],
}

/// A thread's memo of short values and their hashes. The values are parameters of
/// statements this thread recorded: wiped when the thread ends.
struct Memo(Box<[MemoEntry; MEMO_SLOTS]>);

impl Drop for Memo {
    fn drop(&mut self) {
        for e in self.0.iter_mut() {
            zeroize::Zeroize::zeroize(&mut e.value);
        }
    }
}

thread_local! {
    static MEMO: std::cell::RefCell<Memo> = std::cell::RefCell::new(Memo(Box::new(
        [MemoEntry { key: 0, len: 0, value: [0; MEMO_VALUE], hex: [0; 16] }; MEMO_SLOTS],
    )));
}

/// The memo slot of a value: its bytes mixed (no key: the slot says nothing the value in
/// it does not). Read a word at a time, the last part of one without a copy of variable
/// length (most values are a few digits).
fn memo_slot(value: &[u8]) -> usize {
    let mix = |h: u64, w: u64| {
        let h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ h >> 29
    };
    let mut h: u64 = value.len() as u64;
    let mut words = value.chunks_exact(8);
    for w in &mut words {
        h = mix(h, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let rest = words.remainder();
    let n = rest.len();
    let last = match n {
        0 => return (h >> 32) as usize % MEMO_SLOTS,
        // Two overlapping halves cover every byte of 4 to 7.
        4.. => {
            let lo = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
            let hi = u32::from_le_bytes(rest[n - 4..].try_into().expect("4 bytes"));
            u64::from(lo) | u64::from(hi) << 32
        }
        _ => u64::from(rest[0]) | u64::from(rest[n / 2]) << 8 | u64::from(rest[n - 1]) << 16,
    };
    (mix(h, last) >> 32) as usize % MEMO_SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use rand::{Rng, SeedableRng};

    fn reference(key: &[u8], value: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
        m.update(value);
        m.finalize().into_bytes().into()
    }

    /// Every length around the block and padding boundaries, keys shorter than, as long
    /// as and longer than a block: the same bytes as the `hmac` crate.
    #[test]
    fn equals_hmac_sha256() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for key_len in [0usize, 1, 19, 32, 63, 64, 65, 200] {
            let key: Vec<u8> = (0..key_len).map(|_| rng.gen()).collect();
            let h = KeyedHash::new(&key);
            for len in (0..=300).chain([1000, 4096, 100_000]) {
                let value: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                assert_eq!(
                    h.digest(&value),
                    reference(&key, &value),
                    "key {key_len} bytes, value {len} bytes"
                );
            }
        }
    }

    /// RFC 4231, test case 2.
    #[test]
    fn rfc_4231_case_2() {
        let h = KeyedHash::new(b"Jefe");
        assert_eq!(
            hex::encode(h.digest(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// The memo answers what the hash would, under the key asked for: values of every
    /// length around its bound, repeated, colliding in its slots, under two keys.
    #[test]
    fn short_hex_is_the_digest_under_its_own_key() {
        let a = KeyedHash::new(b"key a");
        let b = KeyedHash::new(b"key b");
        let same_as_a = a.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let values: Vec<Vec<u8>> = (0..3000)
            .map(|i| {
                let len = i % (MEMO_VALUE + 6);
                (0..len).map(|_| rng.gen_range(b'0'..=b'3')).collect()
            })
            .collect();
        for round in 0..3 {
            for v in &values {
                for h in [&a, &b, &same_as_a] {
                    let want = hex::encode(&h.digest(v)[..8]);
                    assert_eq!(
                        std::str::from_utf8(&h.short_hex(v)).unwrap(),
                        want,
                        "round {round}, value {v:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        assert_eq!(format!("{:?}", KeyedHash::new(b"k")), "KeyedHash(..)");
    }
}
