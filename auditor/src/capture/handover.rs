//! The capture that outlives the daemon: its links and the maps successive daemons share
//! are pinned on bpffs, so the programs keep capturing into the ring buffer while no daemon
//! runs (a restart, an upgrade, a DaemonSet rollout, a crash) and the next daemon drains
//! what they caught and continues the sessions where they were.
//!
//! Layout, under `capture.pin_dir` (default /sys/fs/bpf/auditor/capture):
//!
//! ```text
//! <id>/maps/EVENTS, CONNS, PENDING, ...   shared by the generations of one capture
//! <id>/g<generation>/<program>            the links of one daemon's programs
//! ```
//!
//! `<id>` names the state directory and the eBPF object (its bytes and the ring's size):
//! only a daemon of the same trail whose programs share the maps' layout takes a capture
//! over; any other starts its own (and the record of the window no daemon covered says so).
//!
//! A starting daemon loads its programs with the shared maps, attaches them beside the
//! ones running, and takes over with one write to `HANDOVER` (the generation on duty):
//! from then on the old programs do nothing, and the calls they began are completed by
//! the new ones (they share `PENDING`). Then the old generation's links are removed.

use std::path::{Path, PathBuf};

use auditor_common::Handover;
use aya::{
    maps::{Array, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use sha2::{Digest, Sha256};

/// The maps the generations of one capture share: the ring and everything that follows a
/// connection or a call across the moment of a takeover. (MUTED is not shared: the next
/// daemon sees both ends of every connection again and mutes what it does not need;
/// KNOWN_FILES is not: it looks at the files mapped since it started.)
pub const SHARED_MAPS: &[&str] = &[
    "EVENTS",
    "CONNS",
    "PENDING",
    "CONNECTING",
    "TLS_CALLS",
    "TLS_IN_FLIGHT",
    "SSL_SOCKS",
    "COUNTERS",
    "HANDOVER",
    "TAKEN",
];

/// The lease is at least this long whatever the setting: the daemon renews it each second.
const MIN_LEASE_NS: u64 = 10_000_000_000;

/// CLOCK_MONOTONIC, the programs' `bpf_ktime_get_ns`.
pub fn kernel_now_ns() -> u64 {
    crate::tracker::monotonic_ns()
}

/// Where one capture is pinned, and how long it goes on without a daemon.
#[derive(Debug, Clone)]
pub struct Pins {
    pub dir: PathBuf,
    pub generation: u64,
    /// What the capture found when this daemon started.
    pub previous: Option<Handover>,
    pub keep_ns: u64,
}

/// The id of the capture of state directory `state_dir` with the eBPF object `object`, a
/// ring of `ring_bytes` and `chunks_per_call` chunks per call, its read/write family taken at the exits alone (`exit_only` 1)
/// or noted at the entries.
pub fn capture_id(
    state_dir: &Path,
    object: &[u8],
    ring_bytes: u32,
    chunks_per_call: u32,
    exit_only: u8,
) -> String {
    let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let mut h = Sha256::new();
    h.update(state.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(object);
    h.update(ring_bytes.to_le_bytes());
    h.update(chunks_per_call.to_le_bytes());
    if exit_only != 0 {
        h.update(b"exit-only");
    }
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the pinned HANDOVER map of the capture in `dir`, if it has one.
fn open_handover(dir: &Path) -> Option<Array<MapData, Handover>> {
    let data = MapData::from_pin(dir.join("maps").join("HANDOVER")).ok()?;
    Array::try_from(Map::from_map_data(data).ok()?).ok()
}

/// What the capture pinned in `dir` last said: the generation on duty and its lease.
pub fn read_handover(dir: &Path) -> Option<Handover> {
    open_handover(dir)?.get(&0, 0).ok()
}

/// Prepares the pins of the capture `id` under `base`: the directory made (bpffs mounted if
/// needed), captures of other state directories or builds whose lease ran out removed,
/// and the generation this daemon's programs get.
pub fn prepare(base: &Path, id: &str, keep_s: u32) -> Result<Pins, String> {
    crate::proxy::redirect::ensure_bpffs(base)?;
    std::fs::create_dir_all(base).map_err(|e| format!("{}: {e}", base.display()))?;
    let now = kernel_now_ns();
    for entry in std::fs::read_dir(base).map_err(|e| format!("{}: {e}", base.display()))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if name.to_str() == Some(id) || !entry.path().is_dir() {
            continue;
        }
        // Another trail's capture, or this trail's from another build: removed once it is
        // quiet (its lease ran out); one still within its lease waits for its own daemon,
        // and one without maps yet is another daemon starting.
        match read_handover(&entry.path()) {
            Some(h) if h.lease_until_ns > now => {}
            None => {}
            Some(_) => {
                if let Err(e) = remove_capture(&entry.path()) {
                    tracing::warn!(
                        "removing the expired capture {}: {e}",
                        entry.path().display()
                    );
                }
            }
        }
    }
    let dir = base.join(id);
    std::fs::create_dir_all(dir.join("maps")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let previous = read_handover(&dir);
    let generation = previous.map_or(0, |h| h.generation) + 1;
    Ok(Pins {
        dir,
        generation,
        previous: previous.filter(|h| h.generation > 0),
        keep_ns: u64::from(keep_s) * 1_000_000_000,
    })
}

impl Pins {
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    fn generation_dir(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("g{generation}"))
    }

    /// Pins one of this generation's links as `name`.
    pub fn pin_link(&self, link: FdLink, name: &str) -> Result<PinnedLink, String> {
        let dir = self.generation_dir(self.generation);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(name);
        if path.exists() {
            // Left by a daemon of this generation that failed before it took over.
            drop_pinned_link(&path);
        }
        link.pin(&path)
            .map_err(|e| format!("pinning {}: {e}", path.display()))
    }

    /// The value this generation writes to HANDOVER at kernel time `now`: on duty, the
    /// lease from now.
    pub fn handover_at(&self, now: u64) -> Handover {
        Handover {
            generation: self.generation,
            lease_until_ns: now.saturating_add(self.keep_ns.max(MIN_LEASE_NS)),
            handing_over: 0,
        }
    }

    /// Removes the links of every generation before this one (they are off duty).
    pub fn remove_older_generations(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(g) = name.to_str().and_then(|n| n.strip_prefix('g')) else {
                continue;
            };
            if g.parse::<u64>().is_ok_and(|g| g != self.generation) {
                remove_links(&entry.path());
            }
        }
    }
}

fn drop_pinned_link(path: &Path) {
    match PinnedLink::from_pin(path) {
        // Unpinned and dropped: the link goes, and its program detaches.
        Ok(link) => drop(link.unpin()),
        Err(_) => drop(std::fs::remove_file(path)),
    }
}

fn remove_links(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            drop_pinned_link(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes the capture pinned in `dir` (links first, so nothing writes to the maps).
pub fn remove_capture(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name() != "maps" && entry.path().is_dir() {
            remove_links(&entry.path());
        }
    }
    let maps = dir.join("maps");
    if let Ok(entries) = std::fs::read_dir(&maps) {
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path())?;
        }
    }
    let _ = std::fs::remove_dir(&maps);
    std::fs::remove_dir(dir)
}

/// Removes every capture under `base` (`auditor detach`). Returns the directories removed.
pub fn detach_all(base: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        if entry.path().is_dir() {
            remove_capture(&entry.path())?;
            removed.push(entry.path());
        }
    }
    let _ = std::fs::remove_dir(base);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_names_the_trail_and_the_build() {
        let a = capture_id(Path::new("/var/lib/auditor"), b"object", 1 << 26, 512, 0);
        assert_eq!(a.len(), 16);
        assert_eq!(
            a,
            capture_id(Path::new("/var/lib/auditor"), b"object", 1 << 26, 512, 0)
        );
        assert_ne!(
            a,
            capture_id(Path::new("/var/lib/other"), b"object", 1 << 26, 512, 0)
        );
        assert_ne!(
            a,
            capture_id(Path::new("/var/lib/auditor"), b"object2", 1 << 26, 512, 0)
        );
        assert_ne!(
            a,
            capture_id(Path::new("/var/lib/auditor"), b"object", 1 << 25, 512, 0)
        );
        assert_ne!(
            a,
            capture_id(Path::new("/var/lib/auditor"), b"object", 1 << 26, 512, 1)
        );
        assert_ne!(
            a,
            capture_id(Path::new("/var/lib/auditor"), b"object", 1 << 26, 256, 0)
        );
    }
}
