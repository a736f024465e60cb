//! The policy set in force in the daemon: loaded at start (a broken set refuses the
//! start), reloaded when a file of the directory changes (inotify: an edit, a new file, a
//! Kubernetes ConfigMap's symlink swap) and on SIGHUP. A broken reload never replaces a
//! good set: the previous one stays, and the error is logged, counted and recorded as a
//! `policy_error` event.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{load_dir, LintError, PolicySet};
use crate::audit::event::{AuditEvent, EventKind};

/// Set by SIGHUP.
pub static RELOAD: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policies in {dir} do not load; fix them or point `policies_dir` elsewhere:\n  {}", list(.errors))]
    Invalid {
        dir: PathBuf,
        errors: Vec<LintError>,
    },
}

fn list(errors: &[LintError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n  ")
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PolicyCounters {
    pub policies: u64,
    pub reloads: u64,
    pub reload_errors: u64,
}

/// Changes a directory watch reports quiet for this long before a reload (an editor's
/// save, a ConfigMap update: several events).
const SETTLE: Duration = Duration::from_millis(200);

pub struct LivePolicies {
    dir: PathBuf,
    /// Whether the directory exists (the default one may not: then no policy applies,
    /// until it is created and SIGHUP is sent).
    present: bool,
    pub set: Arc<PolicySet>,
    watch: Option<OwnedFd>,
    changed_at: Option<Instant>,
    pub counters: PolicyCounters,
}

impl LivePolicies {
    /// Loads the directory. `required`: the configuration named it, so it must exist.
    pub fn start(dir: &Path, required: bool) -> Result<LivePolicies, PolicyError> {
        let present = dir.is_dir();
        let set = if present || required {
            let (set, report) = load_dir(dir);
            if !report.errors.is_empty() {
                return Err(PolicyError::Invalid {
                    dir: dir.to_path_buf(),
                    errors: report.errors,
                });
            }
            for w in &report.warnings {
                tracing::warn!("policy: {w}");
            }
            set
        } else {
            PolicySet::default()
        };
        let watch = if present { watch(dir) } else { None };
        if present && watch.is_none() {
            tracing::warn!(
                "cannot watch {} for changes: policies reload on SIGHUP only",
                dir.display()
            );
        }
        let live = LivePolicies {
            dir: dir.to_path_buf(),
            present,
            counters: PolicyCounters {
                policies: set.policies.len() as u64,
                ..PolicyCounters::default()
            },
            set: Arc::new(set),
            watch,
            changed_at: None,
        };
        live.log_loaded("loaded");
        Ok(live)
    }

    fn log_loaded(&self, what: &str) {
        if !self.present && self.set.policies.is_empty() {
            tracing::info!(
                "no policies directory {}: every session is audited as `record` says",
                self.dir.display()
            );
            return;
        }
        tracing::info!(
            "policies {what} from {}: {} (version {})",
            self.dir.display(),
            if self.set.policies.is_empty() {
                "none".to_string()
            } else {
                self.set
                    .policies
                    .iter()
                    .map(|p| {
                        format!(
                            "{} [{}]",
                            p.policy.name,
                            p.policy.mode.map(|m| m.as_str()).unwrap_or("mode unset")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            self.set.version
        );
        for p in &self.set.policies {
            if p.policy.mode == Some(super::Mode::Enforce) {
                tracing::warn!(
                    "policy {}: enforce mode needs the inline proxy, which is not running: \
                     its decisions are recorded as would_* and not acted on",
                    p.policy.name
                );
            }
        }
    }

    /// Reloads if the directory changed (and settled) or SIGHUP came. Returns the new set
    /// when it replaced the old one; pushes a `policy_error` event when it could not.
    pub fn poll(&mut self, out: &mut Vec<Box<AuditEvent>>) -> Option<Arc<PolicySet>> {
        if let Some(fd) = &self.watch {
            if drain(fd) {
                self.changed_at = Some(Instant::now());
            }
        }
        let settled = self.changed_at.is_some_and(|t| t.elapsed() >= SETTLE);
        let hup = RELOAD.swap(false, Ordering::SeqCst);
        if !settled && !hup {
            return None;
        }
        self.changed_at = None;
        if !self.present {
            self.present = self.dir.is_dir();
            if self.present {
                self.watch = watch(&self.dir);
            }
        }
        let (set, report) = load_dir(&self.dir);
        if !report.errors.is_empty() {
            self.counters.reload_errors += 1;
            let text = list(&report.errors);
            tracing::error!(
                "policies in {} do not load; the previous set (version {}) stays in force:\n  {text}",
                self.dir.display(),
                self.set.version
            );
            let mut ev = AuditEvent::of_kind(EventKind::PolicyError);
            ev.error_message = text.clone();
            ev.statement = format!("policy reload refused: {text}").into();
            ev.policy_version = self.set.version.clone().into();
            out.push(Box::new(ev));
            return None;
        }
        for w in &report.warnings {
            tracing::warn!("policy: {w}");
        }
        if set.version == self.set.version && set.policies.len() == self.set.policies.len() {
            return None; // touched, not changed
        }
        self.counters.reloads += 1;
        self.counters.policies = set.policies.len() as u64;
        self.set = Arc::new(set);
        self.log_loaded("reloaded");
        Some(self.set.clone())
    }
}

/// An inotify watch on the directory (non-blocking), for writes, creations, moves and
/// deletions of its entries.
fn watch(dir: &Path) -> Option<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: plain syscalls; the descriptor is owned by the OwnedFd from here on.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        if libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) < 0 {
            return None;
        }
        Some(fd)
    }
}

/// Reads every pending inotify event; whether there was any.
fn drain(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 4096];
    let mut any = false;
    loop {
        // SAFETY: reads into a buffer we own, of its size.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return any;
        }
        any = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_keeps_the_good_set_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "name: first\n").unwrap();
        let mut live = LivePolicies::start(dir.path(), true).unwrap();
        assert_eq!(live.set.policies[0].policy.name, "first");
        let mut out = Vec::new();
        assert!(live.poll(&mut out).is_none());

        std::fs::write(&file, "name: second\n").unwrap();
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        assert!(live.poll(&mut out).is_none(), "a change settles first");
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        let set = live.poll(&mut out).expect("reloaded");
        assert_eq!(set.policies[0].policy.name, "second");
        let good = set.version.clone();

        std::fs::write(&file, "name: third\nmode: sometimes\n").unwrap();
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        live.poll(&mut out);
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        assert!(live.poll(&mut out).is_none());
        assert_eq!(live.set.version, good, "the good set stays");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, EventKind::PolicyError);
        assert!(
            out[0].error_message.contains("a.yaml:2:7"),
            "{}",
            out[0].error_message
        );
        assert_eq!(live.counters.reload_errors, 1);

        // SIGHUP reloads at once.
        std::fs::write(&file, "name: fourth\n").unwrap();
        RELOAD.store(true, Ordering::SeqCst);
        let set = live.poll(&mut out).expect("reloaded on SIGHUP");
        assert_eq!(set.policies[0].policy.name, "fourth");
    }

    #[test]
    fn a_broken_set_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "name: x\nselecter: {}\n").unwrap();
        let err = LivePolicies::start(dir.path(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("a.yaml:2:1: unknown field `selecter`"),
            "{err}"
        );
        let missing = dir.path().join("nope");
        assert!(LivePolicies::start(&missing, true).is_err());
        let live = LivePolicies::start(&missing, false).unwrap();
        assert!(live.set.policies.is_empty());
    }
}
