//! The trail across daemon runs: what a daemon that stops, is killed or crashes leaves
//! uncovered is recorded by the next one as a `gap` event flagged `capture_interrupted`,
//! never left silent.
//!
//! While it runs, the daemon keeps `trail.watermark` in its state directory: a time before
//! which everything it read is in events every sink has written out (the start of the
//! oldest statement still waiting for its answer, else the time of the check), updated
//! every second once the sinks have flushed the events handed to them before it. A killed
//! daemon loses at most what came after its last watermark; the next start records that
//! window, from the watermark to the moment its own capture was attached.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::audit::event::{AuditEvent, EventKind, Flag, Timestamp};

const FILE: &str = "trail.watermark";

/// What `trail.watermark` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Watermark {
    /// The daemon that wrote it.
    pub pid: u32,
    /// Everything before this time is in the trail (RFC 3339).
    pub complete_until: String,
    /// The daemon stopped cleanly (everything it read was recorded).
    #[serde(default)]
    pub stopped: bool,
}

impl Watermark {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// The previous run's watermark, if it left one that reads.
    pub fn read(state_dir: &Path) -> Option<Watermark> {
        read_json(&Self::path(state_dir))
    }

    /// Writes it (the last one, of a daemon that stops: replaced, its data written back
    /// before the name points at it).
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        write_json(&Self::path(state_dir), self)
    }

    /// Writes it while the daemon runs (every second): written over in place (see
    /// [`crate::fsutil::rewrite_private`]; after a crash of the host an older watermark
    /// makes the next run's gap start earlier, never later).
    pub fn write_running(&self, state_dir: &Path) -> std::io::Result<()> {
        crate::fsutil::rewrite_private(
            &Self::path(state_dir),
            &serde_json::to_vec(self).unwrap_or_default(),
        )
    }
}

/// A state file in JSON, if it is there and reads.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Written whole or not at all (a temporary file renamed over the old one), readable by
/// root only.
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    crate::fsutil::write_private(path, &serde_json::to_vec(value).unwrap_or_default())
}

/// The window the previous run left uncovered, as a `gap` event flagged
/// `capture_interrupted`: from its watermark to `capture_since` (when this daemon's capture
/// was attached). `previous_pid`/`previous_update` come from its stats.json when it left no
/// watermark (a daemon from before watermarks): the window then starts at its last update.
pub fn interrupted_event(
    previous: Option<&Watermark>,
    previous_stats: Option<(u32, &str)>,
    capture_since: Timestamp,
    host: &str,
) -> Option<AuditEvent> {
    let (pid, from, how) = match (previous, previous_stats) {
        (Some(w), _) => (
            w.pid,
            Timestamp::parse(&w.complete_until)?,
            if w.stopped {
                "stopped"
            } else {
                "ended without stopping (killed or crashed)"
            },
        ),
        (None, Some((pid, updated))) => (
            pid,
            Timestamp::parse(updated)?,
            "ended; it left no watermark, so the window starts at its last stats update",
        ),
        (None, None) => return None,
    };
    let from = from.min(capture_since);
    let to = capture_since;
    Some(gap_event(
        from,
        to,
        format!(
            "(capture was interrupted from {from} to {to}: the daemon before this one (pid \
             {pid}) {how}; statements run in between may be missing)"
        ),
        host,
    ))
}

const CHECKPOINT_FILE: &str = "sessions.checkpoint";

/// The sessions a daemon follows, as the next daemon needs them to continue where it
/// stopped (`sessions.checkpoint` in the state directory): written each second while
/// they change, and at a clean stop last of all (`stopped`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// The daemon that wrote it.
    pub pid: u32,
    /// Written at a clean stop, after every event was made: the sessions continue with
    /// the same session ids, from the next seq, at the stream offsets below.
    pub stopped: bool,
    pub sessions: Vec<CarriedSession>,
}

/// One session, as the next daemon continues it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CarriedSession {
    /// Its ends, (socket address, first-seen kernel ns) as the shared capture names them.
    pub ends: Vec<(u64, u64)>,
    pub session_id: String,
    /// The last seq recorded.
    pub seq: u64,
    pub db_user: String,
    pub database: String,
    pub application_name: String,
    pub tls: bool,
    pub backend_pid: u32,
    /// Named prepared statements: (name, text). The text is as the trail records it
    /// (literals replaced unless `record.raw_statements`).
    pub statements: Vec<(String, String)>,
    /// Per end (as `ends`), the next stream offset expected per stream (plain, TLS) and
    /// direction (to server, to client); set at a clean stop only.
    #[serde(default)]
    pub offsets: Vec<[[u64; 2]; 2]>,
    /// The processes at the client and the server end, where known: of a local
    /// connection, the kernel copies only one end (the other is muted), also while no
    /// daemon runs, so the next daemon learns the other one from here.
    #[serde(default)]
    pub client: Option<CarriedProcess>,
    #[serde(default)]
    pub server: Option<CarriedProcess>,
}

/// A process at one end of a carried session, as the kernel reported it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CarriedProcess {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
}

impl Checkpoint {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(CHECKPOINT_FILE)
    }

    /// Takes the previous run's checkpoint (the file is removed: a checkpoint is used
    /// once, so a later run never continues from an older one), if it left one that reads.
    /// Exact (`stopped`) only if the watermark says the same daemon stopped cleanly.
    pub fn take(state_dir: &Path, watermark: Option<&Watermark>) -> Option<Checkpoint> {
        let path = Self::path(state_dir);
        let cp: Option<Checkpoint> = read_json(&path);
        let _ = std::fs::remove_file(&path);
        let mut cp = cp?;
        let pid = cp.pid;
        cp.stopped &= watermark.is_some_and(|w| w.stopped && w.pid == pid);
        Some(cp)
    }

    /// It holds statement texts: readable by root only.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        write_json(&Self::path(state_dir), self)
    }
}

/// A `gap` event flagged `capture_interrupted` covering `from`..`to`.
fn gap_event(from: Timestamp, to: Timestamp, text: String, host: &str) -> AuditEvent {
    let mut ev = AuditEvent::of_kind(EventKind::Gap);
    ev.event_id = crate::audit::event::new_event_id();
    ev.ts = from;
    ev.duration_us = (to.unix_micros() - from.unix_micros()).max(0) as u64;
    ev.host = host.into();
    ev.flags.insert(Flag::CaptureInterrupted);
    ev.statement = text.into();
    ev
}

/// What a daemon that took over the capture the previous one left running (see
/// `capture::handover`) records of the time between them. The capture went on, so what
/// ran meanwhile is in the ring; missing can only be:
/// - what a daemon killed or crashed had read from the ring and not yet written out:
///   from its watermark to the first record still in the ring ([`Takeover::gap_until`]);
/// - the time after the capture's lease ran out (`capture.keep_while_stopped_s`) until
///   this daemon took over (`lease_ended`, now).
///
/// A daemon that stopped cleanly wrote out everything it read: nothing is missing.
#[derive(Debug, Default)]
pub struct Takeover {
    /// A killed daemon's window, open until the first record is drained: (from, pid).
    pending: Option<(Timestamp, u32)>,
}

impl Takeover {
    /// `lease_ended`: when the capture left running went quiet, if it did before
    /// `capture_since` (this daemon's takeover). Returns the events to record now.
    /// `dropped`: records the ring could not take since the daemon before last counted
    /// (the kernel's counters are shared with it).
    pub fn begin(
        previous: Option<&Watermark>,
        previous_stats: Option<(u32, &str)>,
        lease_ended: Option<Timestamp>,
        dropped: u64,
        capture_since: Timestamp,
        host: &str,
    ) -> (Takeover, Vec<AuditEvent>) {
        let mut now = Vec::new();
        if dropped > 0 {
            let from = previous
                .and_then(|w| Timestamp::parse(&w.complete_until))
                .map_or(capture_since, |t| t.min(capture_since));
            now.push(gap_event(
                from,
                capture_since,
                format!(
                    "(capture was incomplete from {from} to {capture_since}: the ring buffer \
                     filled while no daemon drained it and {dropped} records were dropped; \
                     statements run in between may be missing. A larger \
                     capture.ring_buffer_bytes holds a longer stop)"
                ),
                host,
            ));
        }
        if let Some(quiet) = lease_ended.filter(|t| *t < capture_since) {
            now.push(gap_event(
                quiet,
                capture_since,
                format!(
                    "(capture was interrupted from {quiet} to {capture_since}: the capture the \
                     daemon before this one left running went quiet when its lease \
                     (capture.keep_while_stopped_s) ran out, before a daemon took it over; \
                     statements run in between may be missing)"
                ),
                host,
            ));
        }
        let pending = match (previous, previous_stats) {
            (Some(w), _) if w.stopped => None,
            (Some(w), _) => Timestamp::parse(&w.complete_until).map(|t| (t, w.pid)),
            (None, Some((pid, updated))) => Timestamp::parse(updated).map(|t| (t, pid)),
            (None, None) => None,
        };
        (Takeover { pending }, now)
    }

    /// The killed daemon's window ends where the ring's records begin (`first`, the time
    /// of the first record drained; None: the ring was empty, so `capture_since`).
    pub fn gap_until(
        &mut self,
        first: Option<Timestamp>,
        capture_since: Timestamp,
        host: &str,
    ) -> Option<AuditEvent> {
        let (from, pid) = self.pending.take()?;
        let to = first.unwrap_or(capture_since).max(from);
        Some(gap_event(
            from,
            to,
            format!(
                "(capture was interrupted from {from} to {to}: the daemon before this one (pid \
                 {pid}) ended without stopping (killed or crashed) and what it had read but \
                 not yet written out is lost; statements run in between may be missing. The \
                 capture went on meanwhile: this daemon continues from {to})"
            ),
            host,
        ))
    }
}

/// Keeps the watermark while the daemon runs: each second a candidate (events handed to
/// the sinks so far, complete-until time) is queued; it is written once the sinks have
/// flushed that many events.
#[derive(Debug, Default)]
pub struct WatermarkKeeper {
    candidates: VecDeque<(u64, Timestamp)>,
    written: Option<Timestamp>,
}

impl WatermarkKeeper {
    /// `sent`: events handed to the sinks so far; `complete_until`: the tracker's time
    /// before which everything read is in those events.
    pub fn offer(&mut self, sent: u64, complete_until: Timestamp) {
        // Time goes one way: an older statement still pending keeps it back.
        let last = self.candidates.back().map(|c| c.1).or(self.written);
        let t = last.map_or(complete_until, |l| complete_until.max(l));
        self.candidates.push_back((sent, t));
        // A sink stuck for minutes must not grow this without bound.
        if self.candidates.len() > 2400 {
            self.candidates.pop_front();
        }
    }

    /// The newest candidate the sinks have caught up with (`flushed` events), if it moves
    /// the watermark forward: to be written.
    pub fn ready(&mut self, flushed: u64) -> Option<Timestamp> {
        let mut newest = None;
        while let Some(&(sent, t)) = self.candidates.front() {
            if sent > flushed {
                break;
            }
            newest = Some(t);
            self.candidates.pop_front();
        }
        let t = newest?;
        if self.written.is_some_and(|w| w >= t) {
            return None;
        }
        self.written = Some(t);
        Some(t)
    }

    /// How far the trail's completeness lags behind `now`: everything before
    /// `now - lag` is in events the sinks have flushed. None before the first watermark.
    pub fn lag(&self, now: Timestamp) -> Option<std::time::Duration> {
        let w = self.written?;
        let micros = (now.unix_micros() - w.unix_micros()).max(0) as u64;
        Some(std::time::Duration::from_micros(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse(s).unwrap()
    }

    #[test]
    fn a_candidate_waits_for_the_sinks_to_flush_its_events() {
        let mut k = WatermarkKeeper::default();
        k.offer(10, ts("2026-01-01T00:00:01Z"));
        k.offer(20, ts("2026-01-01T00:00:02Z"));
        assert_eq!(k.ready(9), None);
        assert_eq!(k.ready(15), Some(ts("2026-01-01T00:00:01Z")));
        assert_eq!(k.ready(15), None);
        // A statement pending since before the last watermark cannot move it back.
        k.offer(30, ts("2026-01-01T00:00:00Z"));
        assert_eq!(k.ready(40), Some(ts("2026-01-01T00:00:02Z")));
        assert_eq!(k.ready(40), None);
    }

    #[test]
    fn the_next_run_records_the_window_as_a_gap() {
        let since = ts("2026-01-01T00:00:09Z");
        let killed = Watermark {
            pid: 7,
            complete_until: "2026-01-01T00:00:05.5Z".into(),
            stopped: false,
        };
        let ev = interrupted_event(Some(&killed), None, since, "h").unwrap();
        assert_eq!(ev.kind, EventKind::Gap);
        assert_eq!(ev.flags, ["capture_interrupted"]);
        assert_eq!(ev.ts, ts("2026-01-01T00:00:05.5Z"));
        assert_eq!(ev.duration_us, 3_500_000);
        assert!(ev.statement.contains("pid 7"), "{}", ev.statement);
        assert!(
            ev.statement.contains("killed or crashed"),
            "{}",
            ev.statement
        );
        let stopped = Watermark {
            stopped: true,
            ..killed
        };
        let ev = interrupted_event(Some(&stopped), None, since, "h").unwrap();
        assert!(ev.statement.contains(") stopped;"), "{}", ev.statement);
        // From a daemon without watermarks: its last stats update.
        let ev = interrupted_event(None, Some((3, "2026-01-01T00:00:04Z")), since, "h").unwrap();
        assert_eq!(ev.duration_us, 5_000_000);
        // A first start: nothing before it.
        assert!(interrupted_event(None, None, since, "h").is_none());
    }

    #[test]
    fn a_takeover_records_only_what_was_lost() {
        let since = ts("2026-01-01T00:00:09Z");
        let killed = Watermark {
            pid: 7,
            complete_until: "2026-01-01T00:00:05.5Z".into(),
            stopped: false,
        };
        // Killed: from its watermark to the first record left in the ring.
        let (mut t, now) = Takeover::begin(Some(&killed), None, None, 0, since, "h");
        assert!(now.is_empty());
        let ev = t
            .gap_until(Some(ts("2026-01-01T00:00:06Z")), since, "h")
            .unwrap();
        assert_eq!(ev.ts, ts("2026-01-01T00:00:05.5Z"));
        assert_eq!(ev.duration_us, 500_000);
        assert!(
            ev.statement.contains("killed or crashed"),
            "{}",
            ev.statement
        );
        assert!(t.gap_until(None, since, "h").is_none(), "once");
        // Stopped cleanly: nothing lost, unless the lease ran out before the takeover.
        let stopped = Watermark {
            stopped: true,
            ..killed.clone()
        };
        let (mut t, now) = Takeover::begin(Some(&stopped), None, None, 0, since, "h");
        assert!(now.is_empty());
        assert!(t.gap_until(None, since, "h").is_none());
        let quiet = ts("2026-01-01T00:00:07Z");
        let (_, now) = Takeover::begin(Some(&stopped), None, Some(quiet), 0, since, "h");
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].ts, quiet);
        assert_eq!(now[0].duration_us, 2_000_000);
        assert!(now[0].statement.contains("lease"), "{}", now[0].statement);
        // Records dropped while no daemon ran: from the watermark, with their count.
        let (_, now) = Takeover::begin(Some(&stopped), None, None, 42, since, "h");
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].ts, ts("2026-01-01T00:00:05.5Z"));
        assert!(
            now[0].statement.contains("42 records were dropped"),
            "{}",
            now[0].statement
        );
        // A killed daemon with an empty ring: up to the takeover.
        let (mut t, _) = Takeover::begin(Some(&killed), None, None, 0, since, "h");
        assert_eq!(
            t.gap_until(None, since, "h").unwrap().duration_us,
            3_500_000
        );
    }

    #[test]
    fn a_checkpoint_is_taken_once_and_exact_only_after_its_own_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint {
            pid: 7,
            stopped: true,
            sessions: vec![CarriedSession::default()],
        };
        let stopped = |pid| Watermark {
            pid,
            complete_until: "2026-01-01T00:00:00Z".into(),
            stopped: true,
        };
        cp.write(dir.path()).unwrap();
        assert_eq!(
            Checkpoint::take(dir.path(), Some(&stopped(7))),
            Some(cp.clone())
        );
        assert_eq!(
            Checkpoint::take(dir.path(), Some(&stopped(7))),
            None,
            "once"
        );
        // Another daemon's watermark (it ran after, and was killed): not exact.
        cp.write(dir.path()).unwrap();
        let taken = Checkpoint::take(dir.path(), Some(&stopped(8))).unwrap();
        assert!(!taken.stopped);
        assert_eq!(taken.sessions.len(), 1);
    }

    #[test]
    fn the_watermark_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Watermark::read(dir.path()), None);
        let w = Watermark {
            pid: 1,
            complete_until: "2026-01-01T00:00:00Z".into(),
            stopped: true,
        };
        w.write(dir.path()).unwrap();
        assert_eq!(Watermark::read(dir.path()), Some(w));
    }
}
