//! HMAC-SHA256 for the short values of the hot path (a statement's parameters, a masked
//! column's values): the key's two blocks are compressed once, when the key is set, so a
//! value of up to 55 bytes costs two SHA-256 compressions and nothing else (no hasher
//! state cloned, no buffering). The result is HMAC-SHA256 as RFC 2104 defines it (tested
//! against the `hmac` crate).

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
        KeyedHash {
            inner: keyed(0x36),
            outer: keyed(0x5c),
        }
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

    #[test]
    fn debug_shows_no_key_material() {
        assert_eq!(format!("{:?}", KeyedHash::new(b"k")), "KeyedHash(..)");
    }
}
