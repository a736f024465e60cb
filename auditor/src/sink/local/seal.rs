//! Forward-secure sealing of the local log (as journald's Forward Secure Sealing does).
//!
//! Time is cut into epochs of a fixed length from a start time. The sealing key of epoch
//! e+1 is SHA-256 of a label and the key of epoch e; when an epoch begins, the daemon
//! overwrites the key file in place with the next key, so the keys of past epochs are no
//! longer on the host. Each block of the log is sealed with an HMAC under its epoch's key.
//! Someone who takes the host (root included) holds only the current key: they cannot
//! forge or change a seal of an earlier epoch, and so cannot alter, remove or truncate
//! what was sealed before they came without `auditor verify --key` seeing it.
//!
//! The verification key is the key of epoch 0 with the start and the epoch length. It is
//! printed once, by `auditor log setup-keys`, to be kept off the host; from it every
//! epoch's key follows.

use std::{
    fmt,
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    str::FromStr,
};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

const FILE_MAGIC: &[u8; 8] = b"AUDSEAL1";
/// magic, id, start, interval, (reserved), epoch, key, check.
const FILE_LEN: usize = 8 + 8 + 8 + 8 + 8 + 8 + 32 + 8;
const EVOLVE: &[u8] = b"auditor seal evolve v1";
const SEAL: &[u8] = b"auditor seal v1";
/// The text form of a verification key starts with this.
const VK_PREFIX: &str = "avk1";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a sealing key file (or a damaged one)")]
    Corrupt(PathBuf),
    #[error("{0} exists: the log is sealed with it already (remove it first to start over, which ends verification of what it sealed)")]
    Exists(PathBuf),
    #[error("not a verification key: {0}")]
    BadVerificationKey(String),
    #[error("the epoch length must be between 10 s and 1 day")]
    BadInterval,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn evolve(key: &mut [u8; 32]) {
    let mut h = Sha256::new();
    h.update(EVOLVE);
    h.update(&key[..]);
    let next: [u8; 32] = h.finalize().into();
    key.zeroize();
    *key = next;
}

fn key_id(key0: &[u8; 32]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(b"auditor seal id v1");
    h.update(key0);
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// The seal of a block hash in an epoch under that epoch's key.
fn mac(key: &[u8; 32], epoch: u64, hash: &[u8; 32]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(SEAL);
    m.update(&epoch.to_le_bytes());
    m.update(hash);
    m.finalize().into_bytes().into()
}

/// The key the daemon seals with: the current epoch's, kept in a file of its own.
pub struct SealingKey {
    path: PathBuf,
    file: File,
    id: [u8; 8],
    start_us: i64,
    interval_us: i64,
    epoch: u64,
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealingKey")
            .field("path", &self.path)
            .field("id", &hex::encode(self.id))
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    /// Makes a new key file at `path` (which must not exist) with epochs of `interval_s`
    /// seconds from now, and returns the verification key (never written to the host).
    pub fn setup(path: &Path, interval_s: u64) -> Result<VerificationKey, SealError> {
        let now = crate::audit::event::Timestamp::now().unix_micros();
        Self::setup_from(path, interval_s, now)
    }

    /// As [`SealingKey::setup`], with epochs counted from `start_us`.
    pub(crate) fn setup_from(
        path: &Path,
        interval_s: u64,
        start_us: i64,
    ) -> Result<VerificationKey, SealError> {
        if !(10..=86_400).contains(&interval_s) {
            return Err(SealError::BadInterval);
        }
        if path.exists() {
            return Err(SealError::Exists(path.to_path_buf()));
        }
        if let Some(parent) = path.parent() {
            crate::fsutil::private_dir(parent).map_err(io(parent))?;
        }
        let mut key0 = Zeroizing::new([0u8; 32]);
        rand::Rng::fill(&mut rand::thread_rng(), &mut key0[..]);
        let interval_us = interval_s as i64 * 1_000_000;
        let file = crate::fsutil::private_options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let mut k = SealingKey {
            path: path.to_path_buf(),
            file,
            id: key_id(&key0),
            start_us,
            interval_us,
            epoch: 0,
            key: key0.clone(),
        };
        k.store()?;
        Ok(VerificationKey {
            key0,
            start_us,
            interval_us,
        })
    }

    /// The key file at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<SealingKey>, SealError> {
        let mut file = match crate::fsutil::private_options()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(path)(e)),
        };
        crate::fsutil::make_private(path).map_err(io(path))?;
        let mut buf = Zeroizing::new([0u8; FILE_LEN]);
        file.read_exact(&mut buf[..])
            .map_err(|_| SealError::Corrupt(path.to_path_buf()))?;
        if &buf[..8] != FILE_MAGIC || check(&buf[..FILE_LEN - 8]) != buf[FILE_LEN - 8..] {
            return Err(SealError::Corrupt(path.to_path_buf()));
        }
        let u = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&buf[48..80]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[8..16]);
        let interval_us = u(24) as i64;
        if interval_us <= 0 {
            return Err(SealError::Corrupt(path.to_path_buf()));
        }
        Ok(Some(SealingKey {
            path: path.to_path_buf(),
            file,
            id,
            start_us: u(16) as i64,
            interval_us,
            epoch: u(40),
            key,
        }))
    }

    /// Overwrites the file in place (the same blocks, so the old key is not left behind in
    /// a freed one) and waits for the disk.
    fn store(&mut self) -> Result<(), SealError> {
        let mut buf = Zeroizing::new([0u8; FILE_LEN]);
        buf[..8].copy_from_slice(FILE_MAGIC);
        buf[8..16].copy_from_slice(&self.id);
        buf[16..24].copy_from_slice(&self.start_us.to_le_bytes());
        buf[24..32].copy_from_slice(&self.interval_us.to_le_bytes());
        buf[32..40].copy_from_slice(&0u64.to_le_bytes());
        buf[40..48].copy_from_slice(&self.epoch.to_le_bytes());
        buf[48..80].copy_from_slice(&self.key[..]);
        let c = check(&buf[..FILE_LEN - 8]);
        buf[FILE_LEN - 8..].copy_from_slice(&c);
        let path = self.path.clone();
        self.file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        self.file.write_all(&buf[..]).map_err(io(&path))?;
        self.file.sync_data().map_err(io(&path))
    }

    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// Its epochs.
    pub fn epochs(&self) -> Epochs {
        Epochs {
            start_us: self.start_us,
            interval_us: self.interval_us,
        }
    }

    /// The epoch of the key held now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Moves the key on to `epoch` (never back: a clock that went back seals with the key
    /// held) and erases the keys passed; returns the epoch of the key held.
    pub fn advance_to(&mut self, epoch: u64) -> Result<u64, SealError> {
        if epoch <= self.epoch {
            return Ok(self.epoch);
        }
        while self.epoch < epoch {
            evolve(&mut self.key);
            self.epoch += 1;
        }
        self.store()?;
        Ok(self.epoch)
    }

    /// The seal of `hash` under the key held (epoch [`SealingKey::epoch`]).
    pub fn seal(&self, hash: &[u8; 32]) -> [u8; 32] {
        mac(&self.key, self.epoch, hash)
    }
}

/// Epochs of a fixed length from a start (Unix µs).
#[derive(Debug, Clone, Copy)]
pub struct Epochs {
    start_us: i64,
    interval_us: i64,
}

impl Epochs {
    /// The epoch a time falls in (0 before the start).
    pub fn epoch_at(&self, ts_us: i64) -> u64 {
        if ts_us <= self.start_us {
            0
        } else {
            ((ts_us - self.start_us) / self.interval_us) as u64
        }
    }

    /// When `epoch` begins.
    pub fn epoch_start(&self, epoch: u64) -> i64 {
        self.start_us + epoch as i64 * self.interval_us
    }

    pub fn interval_us(&self) -> i64 {
        self.interval_us
    }
}

fn check(bytes: &[u8]) -> [u8; 8] {
    let d = Sha256::digest(bytes);
    d[..8].try_into().expect("8 bytes")
}

/// What `auditor verify --key` checks seals with; kept off the host.
#[derive(Clone)]
pub struct VerificationKey {
    key0: Zeroizing<[u8; 32]>,
    start_us: i64,
    interval_us: i64,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerificationKey({})", hex::encode(self.id()))
    }
}

/// `avk1-<key of epoch 0, hex>-<start, Unix µs>-<epoch length, µs>`.
impl fmt::Display for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VK_PREFIX}-{}-{}-{}",
            hex::encode(&self.key0[..]),
            self.start_us,
            self.interval_us
        )
    }
}

impl FromStr for VerificationKey {
    type Err = SealError;

    fn from_str(s: &str) -> Result<Self, SealError> {
        let bad = || {
            SealError::BadVerificationKey("expected avk1-<64 hex digits>-<start>-<length> as `auditor log setup-keys` printed it".into())
        };
        let mut parts = s.trim().split('-');
        if parts.next() != Some(VK_PREFIX) {
            return Err(bad());
        }
        let mut key0 = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(parts.next().ok_or_else(bad)?, &mut key0[..]).map_err(|_| bad())?;
        let start_us: i64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let interval_us: i64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if parts.next().is_some() || interval_us <= 0 {
            return Err(bad());
        }
        Ok(VerificationKey {
            key0,
            start_us,
            interval_us,
        })
    }
}

impl VerificationKey {
    /// The id every seal made with this key family carries.
    pub fn id(&self) -> [u8; 8] {
        key_id(&self.key0)
    }

    /// Its epochs.
    pub fn epochs(&self) -> Epochs {
        Epochs {
            start_us: self.start_us,
            interval_us: self.interval_us,
        }
    }

    /// A verifier: derives epoch keys forward as seals ask for them.
    pub fn verifier(&self) -> Verifier {
        Verifier {
            id: self.id(),
            epoch: 0,
            key: self.key0.clone(),
        }
    }
}

/// Checks seals in order of their epochs (keys are derived forward only, so a log is
/// checked in one pass; an epoch earlier than the last asked for starts again from 0).
pub struct Verifier {
    id: [u8; 8],
    epoch: u64,
    key: Zeroizing<[u8; 32]>,
}

impl Verifier {
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    pub fn check(
        &mut self,
        vk: &VerificationKey,
        epoch: u64,
        hash: &[u8; 32],
        seal: &[u8; 32],
    ) -> bool {
        if epoch < self.epoch {
            *self = vk.verifier();
        }
        while self.epoch < epoch {
            evolve(&mut self.key);
            self.epoch += 1;
        }
        mac(&self.key, epoch, hash) == *seal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_seals_what_its_verification_key_checks_and_forgets_its_past() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seal.key");
        let vk = SealingKey::setup(&path, 60).unwrap();
        assert!(matches!(
            SealingKey::setup(&path, 60),
            Err(SealError::Exists(_))
        ));
        let vk: VerificationKey = vk.to_string().parse().unwrap();
        let mut sk = SealingKey::load(&path).unwrap().unwrap();
        assert_eq!(sk.id(), vk.id());
        let h = [7u8; 32];
        let s0 = sk.seal(&h);
        let epoch0_key = *sk.key;
        sk.advance_to(3).unwrap();
        let s3 = sk.seal(&h);
        let mut v = vk.verifier();
        assert!(v.check(&vk, 0, &h, &s0));
        assert!(v.check(&vk, 3, &h, &s3));
        assert!(!v.check(&vk, 2, &h, &s3), "a seal belongs to its epoch");
        assert!(!v.check(&vk, 3, &[8u8; 32], &s3), "and to its hash");
        // What is on disk now is epoch 3's key; epoch 0's is gone from the file.
        let reloaded = SealingKey::load(&path).unwrap().unwrap();
        assert_eq!(reloaded.epoch(), 3);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(32).any(|w| w == epoch0_key));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&path).unwrap().permissions()
            ) & 0o777,
            0o600
        );
        // Never back.
        let mut sk = reloaded;
        assert_eq!(sk.advance_to(1).unwrap(), 3);
        assert!("avk1-00-1-2".parse::<VerificationKey>().is_err());
        assert!("nonsense".parse::<VerificationKey>().is_err());
    }
}
