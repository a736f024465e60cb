//! Daemon restarts during load: pgbench (prepared mode, 4 clients) runs 22 s against a real
//! Postgres 15 while the daemon is stopped (SIGINT) or killed (SIGKILL) 5 s in and started
//! again 3 s later with the same state directory.
//!
//! The capture outlives the daemon (`capture.keep_while_stopped_s`): its programs keep
//! capturing into the pinned ring while no daemon runs, and the next daemon takes them
//! over and drains what they caught. So every statement the server logged is in the trail
//! exactly once, with its text, database user and process, including those run while no
//! daemon ran:
//! - after a clean stop, all of them, with no gap, in the same sessions (same session id,
//!   seq going on, no second session_start);
//! - after a kill, all but what the killed daemon had read and not yet written out: one
//!   `gap` flagged `capture_interrupted` covers that (from its last watermark to the first
//!   record left in the ring, about when it died), and per backend no more statements are
//!   missing than the server logged inside it.
//!
//! With `keep_while_stopped_s: 0` the capture ends with the daemon, and the next records
//! the whole window as a gap (the third test).

use std::{
    collections::{BTreeMap, HashMap},
    process::Stdio,
    time::{Duration, Instant},
};

use auditor::audit::event::Timestamp;
use auditor_tests::{assert_no_duplicates, can_run, read_events, str_of, Daemon, Postgres};
use serde_json::Value;

/// Microseconds since the epoch of the server log's `%m` time ("2026-12-01 15:04:05.123 UTC").
fn log_time_us(line: &str) -> Option<i64> {
    let t = line.get(..23)?;
    let rfc3339 = format!("{}T{}Z", t.get(..10)?, t.get(11..)?);
    Some(Timestamp::parse(&rfc3339)?.unix_micros())
}

fn event_time_us(ev: &Value) -> i64 {
    Timestamp::parse(str_of(ev, "ts"))
        .expect("event ts")
        .unix_micros()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Restart {
    /// SIGINT, the capture kept for the next daemon.
    Stopped,
    /// SIGKILL, the capture kept.
    Killed,
    /// SIGKILL, `keep_while_stopped_s: 0`: the capture ends with the daemon.
    KilledWithoutHandover,
    /// SIGINT, the capture kept, with a ring too small for the time no daemon runs.
    StoppedRingOverflows,
}

fn restart_during_pgbench(how: Restart) {
    let pg = Postgres::start(&["log_line_prefix = '%m|%a|%p|'", "log_timezone = 'UTC'"]).unwrap();
    let mut init = pg.pgbench();
    init.args(["-i", "-s", "1", "postgres"]);
    auditor_tests::check(&mut init).unwrap();
    let state = tempfile::Builder::new()
        .prefix("auditor-restart-")
        .tempdir()
        .unwrap();
    // A pin directory of this test's own (`auditor detach` at the end removes it all).
    let pins = format!("/sys/fs/bpf/auditor-test-{}", std::process::id());
    let keep = if how == Restart::KilledWithoutHandover {
        0
    } else {
        60
    };
    // The ring holds what is captured while no daemon runs (about 8 s of load here),
    // unless the test wants it to overflow.
    let ring = if how == Restart::StoppedRingOverflows {
        1 << 20
    } else {
        256 << 20
    };
    let config = format!(
        "capture:\n  keep_while_stopped_s: {keep}\n  pin_dir: {pins}/capture\n  \
         ring_buffer_bytes: {ring}\nproxy:\n  pin_dir: {pins}\n"
    );
    let mut first = Daemon::start_in(state.path(), pg.port, &config).unwrap();
    let ready_us = Timestamp::now().unix_micros();
    let mut load = pg.pgbench();
    // Long enough for a stop, 3 s down, and a start (about 4 s until the capture is
    // attached, more on a loaded machine) to leave seconds of load after the restart.
    // At a bounded rate: what runs while no daemon does must fit in the test's ring
    // however fast the machine is (unbounded, a fast one filled 256 MiB in 6 s).
    load.args([
        "-n", "-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", "22", "-R", "8000",
    ])
    .arg("postgres")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let load = load.spawn().unwrap();
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let stopping_us = Timestamp::now().unix_micros();
    let stopped = matches!(how, Restart::Stopped | Restart::StoppedRingOverflows);
    if stopped {
        let said = first.stop().unwrap();
        assert!(
            said.iter().any(|l| l.contains("the capture goes on for")),
            "{said:#?}"
        );
    } else {
        first.kill().unwrap();
    }
    let stopped_us = Timestamp::now().unix_micros();
    std::thread::sleep(Duration::from_secs(3));
    let restarting_us = Timestamp::now().unix_micros();
    let mut second = Daemon::start_in(state.path(), pg.port, &config).unwrap();
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        began.elapsed() > Duration::from_secs(12),
        "pgbench ended early"
    );
    let said = second.stop().unwrap();
    println!("second daemon: {}", second.stats().unwrap()["tracker"]);
    let detach = std::process::Command::new(auditor_tests::auditor_bin())
        .args(["detach", "--config"])
        .arg(state.path().join("config.yaml"))
        .output()
        .unwrap();
    assert!(detach.status.success(), "{detach:?}");
    let detached = String::from_utf8_lossy(&detach.stdout);
    assert_eq!(
        detached.contains("removed"),
        how != Restart::KilledWithoutHandover,
        "auditor detach: {detached}\nthe second daemon said: {said:#?}"
    );
    let events = read_events(&state.path().join("log")).unwrap();
    assert_no_duplicates(&events);
    if how != Restart::KilledWithoutHandover {
        let continued = if stopped {
            "(it stopped cleanly: same session ids, exact stream offsets)"
        } else {
            "(from its last checkpoint)"
        };
        assert!(
            said.iter()
                .any(|l| l.contains("continuing 4 sessions") && l.contains(continued)),
            "{said:#?}"
        );
    }

    let interrupted: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "gap")
        .filter(|e| {
            e["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "capture_interrupted"))
        })
        .collect();
    // The window no daemon covered: none after a clean stop; after a kill, what the
    // killed daemon had not written out (up to about when it died), or, without the
    // handover, everything until the next daemon's capture.
    let window = if how == Restart::Stopped {
        assert!(interrupted.is_empty(), "{interrupted:#?}");
        None
    } else if how == Restart::StoppedRingOverflows {
        // Records dropped while no daemon ran: one gap from the stop to the takeover says
        // how many; the sessions whose bytes they were have their own gaps.
        assert_eq!(interrupted.len(), 1, "{interrupted:#?}");
        let gap = interrupted[0];
        assert!(
            str_of(gap, "statement").contains("records were dropped"),
            "{gap:#?}"
        );
        let from = event_time_us(gap);
        let to = from + gap["duration_us"].as_i64().unwrap();
        assert!(from >= stopping_us && from <= stopped_us, "{gap:#?}");
        assert!(to >= restarting_us, "{gap:#?}");
        let session_gaps = events
            .iter()
            .filter(|e| str_of(e, "kind") == "gap" && !str_of(e, "session_id").is_empty())
            .count();
        println!("{}; {session_gaps} session gaps", str_of(gap, "statement"));
        assert!(session_gaps > 0, "no session recorded its hole");
        Some((from, to))
    } else {
        assert_eq!(
            interrupted.len(),
            1,
            "one capture_interrupted gap: {interrupted:#?}"
        );
        let gap = interrupted[0];
        let from = event_time_us(gap);
        let to = from + gap["duration_us"].as_i64().unwrap();
        assert!(
            str_of(gap, "statement").contains("killed or crashed"),
            "{gap:#?}"
        );
        println!(
            "window from {:.2} s before the kill to {:.2} s after it",
            (stopping_us - from) as f64 / 1e6,
            (to - stopped_us) as f64 / 1e6,
        );
        assert!(
            from <= stopped_us && stopping_us - from < 2_000_000,
            "window begins {} ms before the kill: {gap:#?}",
            (stopping_us - from) / 1000
        );
        if how == Restart::Killed {
            // The capture went on: the window ends about when the daemon died.
            assert!(
                to <= stopped_us + 500_000,
                "window ends {} ms after the kill: {gap:#?}",
                (to - stopped_us) / 1000
            );
        } else {
            assert!(
                to >= restarting_us,
                "window ends before the restart: {gap:#?}"
            );
        }
        Some((from, to))
    };

    // Every other gap (bytes lost in a session) would be an error here, but where the ring
    // overflowed.
    let other_gaps: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "gap" && !interrupted.iter().any(|i| std::ptr::eq(*i, *e)))
        .collect();
    if how != Restart::StoppedRingOverflows {
        assert!(other_gaps.is_empty(), "{other_gaps:#?}");
    }

    // Every statement the server logged (after the first daemon was ready) is in the trail
    // or inside the window: per backend, no more are missing than the server logged inside
    // it (give or take the two clocks), and none is recorded twice.
    const SKEW_US: i64 = 100_000;
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    let mut logged: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    for l in log.lines().filter(|l| l.contains("|pgbench|")) {
        if !(l.contains("LOG:  statement: ") || l.contains("LOG:  execute ")) {
            continue;
        }
        let (Some(t), Some(pid)) = (log_time_us(l), l.split('|').nth(2)) else {
            continue;
        };
        if t >= ready_us {
            logged.entry(pid.parse().unwrap()).or_default().push(t);
        }
    }
    let mut recorded: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    let mut without_text = 0;
    let mut without_user = 0;
    let mut session_starts: HashMap<String, usize> = HashMap::new();
    for e in events.iter().filter(|e| str_of(e, "comm") == "pgbench") {
        match str_of(e, "kind") {
            "session_start" => {
                *session_starts
                    .entry(str_of(e, "session_id").to_string())
                    .or_default() += 1
            }
            "statement" => {}
            _ => continue,
        }
        if str_of(e, "kind") != "statement" {
            continue;
        }
        let pid = e["server_pid"].as_u64().unwrap();
        recorded.entry(pid).or_default().push(event_time_us(e));
        if str_of(e, "statement").is_empty() {
            without_text += 1;
            if without_text < 3 {
                println!("without text: {e}");
            }
        }
        if str_of(e, "db_user") != "postgres" || str_of(e, "database") != "postgres" {
            without_user += 1;
            if without_user < 3 {
                println!("without db user or database: {e}");
            }
        }
    }
    // (Where the ring overflowed, statements may have lost their Bind: no text.)
    if how != Restart::StoppedRingOverflows {
        assert_eq!(without_text, 0, "statements recorded without their text");
    }
    if how != Restart::KilledWithoutHandover {
        assert_eq!(
            without_user, 0,
            "statements recorded without db user/database"
        );
    }
    if stopped {
        // The sessions went on across the restart: one session_start each.
        assert!(
            session_starts.values().all(|n| *n == 1),
            "sessions started again: {session_starts:?}"
        );
    }
    let (mut total_logged, mut total_recorded, mut in_window) = (0, 0, 0);
    let mut while_down = 0;
    for (pid, times) in &logged {
        let mine = recorded.get(pid).map(Vec::as_slice).unwrap_or_default();
        assert!(
            mine.len() <= times.len(),
            "backend {pid}: more recorded than logged"
        );
        let missing = times.len() - mine.len();
        match window {
            None => assert_eq!(missing, 0, "backend {pid}: statements missing"),
            Some((from, to)) => {
                // What is missing must fit in the window: no more than logged in it.
                let logged_in_window = times
                    .iter()
                    .filter(|&&t| t >= from - SKEW_US && t <= to + SKEW_US)
                    .count();
                assert!(
                    missing <= logged_in_window,
                    "backend {pid}: {missing} statements missing, {logged_in_window} logged in the window"
                );
            }
        }
        while_down += mine
            .iter()
            .filter(|&&t| t > stopped_us + 500_000 && t < restarting_us)
            .count();
        total_logged += times.len();
        total_recorded += mine.len();
        in_window += missing;
    }
    for pid in recorded.keys() {
        assert!(
            logged.contains_key(pid),
            "backend {pid}: recorded, never logged"
        );
    }
    println!(
        "logged {total_logged} statements, recorded {total_recorded} ({while_down} while no \
         daemon ran), {in_window} missing"
    );
    assert!(total_recorded > 20_000, "too little load");
    if how == Restart::KilledWithoutHandover {
        assert_eq!(while_down, 0);
    } else if how == Restart::StoppedRingOverflows {
        assert!(in_window > 0, "nothing was lost: the ring did not overflow");
    } else {
        assert!(
            while_down > 1_000,
            "the capture did not go on while no daemon ran"
        );
    }
}

#[test]
fn daemon_killed_during_load_loses_only_what_it_had_not_written_out() {
    if !can_run("daemon_killed_during_load_loses_only_what_it_had_not_written_out") {
        return;
    }
    restart_during_pgbench(Restart::Killed);
}

#[test]
fn daemon_stopped_during_load_loses_nothing() {
    if !can_run("daemon_stopped_during_load_loses_nothing") {
        return;
    }
    restart_during_pgbench(Restart::Stopped);
}

#[test]
fn without_the_handover_a_killed_daemon_leaves_a_recorded_window() {
    if !can_run("without_the_handover_a_killed_daemon_leaves_a_recorded_window") {
        return;
    }
    restart_during_pgbench(Restart::KilledWithoutHandover);
}

#[test]
fn a_ring_that_overflows_while_no_daemon_runs_is_recorded() {
    if !can_run("a_ring_that_overflows_while_no_daemon_runs_is_recorded") {
        return;
    }
    restart_during_pgbench(Restart::StoppedRingOverflows);
}
