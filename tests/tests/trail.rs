//! The local log as evidence, end to end: a real daemon seals what it records with a
//! forward-secure key; `auditor verify --key` checks it; a modified record and a cut-off
//! tail are named; the next daemon records the cut in the trail; the files are private.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use auditor::sink::local::segment::{self, Frame};
use auditor_tests::{auditor_bin, can_run, check, str_of, Cgroup, Daemon, Postgres};

fn auditor(args: &[&str], state: &Path) -> Output {
    Command::new(auditor_bin())
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn segments(state: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(state.join("log"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "alog"))
        .collect();
    files.sort();
    files
}

/// (start, end) byte offsets of each frame of a segment, with whether it is a seal.
fn frames(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let mut at = segment::HEADER_LEN;
    while let Some((f, next)) = segment::next_frame(buf, at) {
        out.push((at, next, matches!(f, Frame::Seal(_))));
        at = next;
    }
    out
}

fn copy_state(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    std::fs::create_dir(to.path().join("log")).unwrap();
    for f in std::fs::read_dir(from.join("log")).unwrap().flatten() {
        std::fs::copy(f.path(), to.path().join("log").join(f.file_name())).unwrap();
    }
    to
}

#[test]
fn a_sealed_log_verifies_and_names_what_was_changed_or_cut_off() {
    if !can_run("a_sealed_log_verifies_and_names_what_was_changed_or_cut_off") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let state = tempfile::Builder::new()
        .prefix("auditor-trail-")
        .tempdir()
        .unwrap();
    let made = auditor(&["log", "setup-keys", "--interval", "10s"], state.path());
    assert!(made.status.success(), "{}", text(&made));
    let vk = String::from_utf8(made.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    assert!(vk.starts_with("avk1-"), "{vk}");
    assert!(text(&made).contains("OFF this host"), "{}", text(&made));
    let again = auditor(&["log", "setup-keys"], state.path());
    assert!(
        !again.status.success(),
        "a second key must not replace the first"
    );
    let key0 = hex::decode(vk.split('-').nth(1).unwrap()).unwrap();

    let mut daemon = Daemon::start_in(state.path(), pg.port, "").unwrap();
    let cg = Cgroup::new("trail").unwrap();
    for i in 0..5 {
        let mut psql = pg.psql();
        psql.env("PGAPPNAME", "trail")
            .args(["-c", &format!("SELECT {i} AS marker_{i}")]);
        cg.enter(&mut psql);
        check(&mut psql).unwrap();
    }
    daemon.wait_sessions_ended(&cg.name);
    // An epoch passes while the daemon runs: its key moves on and the first one is gone.
    std::thread::sleep(Duration::from_secs(12));
    let key_file = std::fs::read(state.path().join("seal.key")).unwrap();
    assert!(
        !key_file.windows(32).any(|w| w == key0.as_slice()),
        "the key of epoch 0 is still on the host"
    );
    daemon.stop().unwrap();

    // Private: nobody but the daemon's user reads the trail.
    for dir in [state.path().to_path_buf(), state.path().join("log")] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
    }
    for f in std::fs::read_dir(state.path().join("log"))
        .unwrap()
        .flatten()
    {
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.path().display());
    }
    for f in ["seal.key", "stats.json"] {
        let mode = std::fs::metadata(state.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    // Intact, sealed, checked with the key, ended by a clean stop.
    let ok = auditor(&["verify", "--key", &vk], state.path());
    let said = text(&ok);
    assert!(ok.status.success(), "{said}");
    assert!(said.starts_with("intact:"), "{said}");
    assert!(
        said.contains("blocks checked with the verification key"),
        "{said}"
    );
    assert!(said.contains("ends: with a clean stop"), "{said}");
    // The statements, as JSON Lines.
    let events = daemon.events().unwrap();
    let ours: Vec<_> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "statement" && str_of(e, "application_name") == "trail")
        .collect();
    assert_eq!(ours.len(), 5);
    assert!(events.iter().all(|e| e.get("prev_hash").is_none()));

    // A record changed, on a copy: verify names it.
    let copy = copy_state(state.path());
    let seg = segments(copy.path())[0].clone();
    let mut buf = std::fs::read(&seg).unwrap();
    let at = buf
        .windows(b"marker_2".len())
        .position(|w| w == b"marker_2")
        .expect("the statement's text is in the log");
    buf[at + 7] = b'7';
    std::fs::write(&seg, &buf).unwrap();
    let bad = auditor(&["verify"], copy.path());
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        text(&bad).contains("modified: its content does not match"),
        "{}",
        text(&bad)
    );

    // The tail cut off: the last block with records and the stop removed.
    let last = segments(state.path()).pop().unwrap();
    let buf = std::fs::read(&last).unwrap();
    let seals: Vec<usize> = frames(&buf)
        .into_iter()
        .filter(|f| f.2)
        .map(|f| f.1)
        .collect();
    assert!(seals.len() >= 3, "start, records, stop: {seals:?}");
    std::fs::write(&last, &buf[..seals[seals.len() - 3]]).unwrap();
    let cut = auditor(&["verify", "--key", &vk], state.path());
    assert_eq!(cut.status.code(), Some(1), "{}", text(&cut));
    assert!(text(&cut).contains("truncated"), "{}", text(&cut));

    // The next daemon records the cut in the trail; the log verifies again from there.
    let mut next = Daemon::start_in(state.path(), pg.port, "").unwrap();
    next.stop().unwrap();
    let events = next.events().unwrap();
    let noted: Vec<_> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "gap")
        .filter(|e| {
            e["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "log_truncated"))
        })
        .collect();
    assert_eq!(noted.len(), 1, "{noted:?}");
    assert!(
        str_of(noted[0], "statement").contains("were removed"),
        "{}",
        noted[0]
    );
    let ok = auditor(&["verify", "--key", &vk], state.path());
    assert!(ok.status.success(), "{}", text(&ok));
}
