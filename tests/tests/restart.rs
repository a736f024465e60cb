//! Daemon restarts during load: pgbench (prepared mode, 4 clients) runs 16 s against a real
//! Postgres 15 while the daemon is stopped (SIGINT) or killed (SIGKILL) 5 s in and started
//! again 3 s later with the same state directory. The next daemon records the window no
//! daemon covered as one `gap` event flagged `capture_interrupted`; every statement the
//! server logged outside that window is in the trail exactly once (compared by count on
//! each side of the window, away from its edges by a margin for the two clocks).

use std::{
    collections::BTreeMap,
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

fn restart_during_pgbench(kill: bool) {
    let pg = Postgres::start(&["log_line_prefix = '%m|%a|%p|'", "log_timezone = 'UTC'"]).unwrap();
    let mut init = pg.pgbench();
    init.args(["-i", "-s", "1", "postgres"]);
    auditor_tests::check(&mut init).unwrap();
    let state = tempfile::Builder::new()
        .prefix("auditor-restart-")
        .tempdir()
        .unwrap();
    let mut first = Daemon::start_in(state.path(), pg.port, "").unwrap();
    let ready_us = Timestamp::now().unix_micros();
    let mut load = pg.pgbench();
    // Long enough for a stop (about 4 s: detaching the hooks is slow), 3 s down, and a
    // start (about 4 s until the capture is attached, more on a loaded machine) to leave
    // seconds of load after the restart.
    load.args([
        "-n", "-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", "22",
    ])
    .arg("postgres")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let load = load.spawn().unwrap();
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let stopping_us = Timestamp::now().unix_micros();
    if kill {
        first.kill().unwrap();
    } else {
        first.stop().unwrap();
    }
    let stopped_us = Timestamp::now().unix_micros();
    std::thread::sleep(Duration::from_secs(3));
    let restarting_us = Timestamp::now().unix_micros();
    let mut second = Daemon::start_in(state.path(), pg.port, "").unwrap();
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
    // Wait until the trail has caught up with the server before stopping.
    second.stop().unwrap();
    println!("second daemon: {}", second.stats().unwrap()["tracker"]);
    let events = read_events(&state.path().join("log")).unwrap();
    assert_no_duplicates(&events);

    let interrupted: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "gap")
        .filter(|e| {
            e["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "capture_interrupted"))
        })
        .collect();
    assert_eq!(
        interrupted.len(),
        1,
        "one capture_interrupted gap: {interrupted:#?}"
    );
    let gap = interrupted[0];
    let from = event_time_us(gap);
    let to = from + gap["duration_us"].as_i64().unwrap();
    let expect = if kill {
        "killed or crashed"
    } else {
        ") stopped;"
    };
    assert!(str_of(gap, "statement").contains(expect), "{gap:#?}");
    // It begins at most 2 s before the first daemon was told to stop (what it had not yet
    // written out), at the latest when it was gone, and ends after the second was started.
    let window_s = (to - from) as f64 / 1e6;
    println!(
        "window from {:.2} s before the stop (which took {:.2} s) to {:.2} s after the \
         restart began",
        (stopping_us - from) as f64 / 1e6,
        (stopped_us - stopping_us) as f64 / 1e6,
        (to - restarting_us) as f64 / 1e6
    );
    assert!(
        from <= stopped_us && stopping_us - from < 2_000_000,
        "window begins {} ms before the stop: {gap:#?}",
        (stopping_us - from) / 1000
    );
    assert!(
        to >= restarting_us,
        "window ends before the restart: {gap:#?}"
    );

    // Every other gap (bytes lost in a session) would be an error here.
    let other_gaps: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "gap" && !std::ptr::eq(*e, gap))
        .collect();
    assert!(other_gaps.is_empty(), "{other_gaps:#?}");

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
    for e in &events {
        if str_of(e, "kind") == "statement" && str_of(e, "comm") == "pgbench" {
            let pid = e["server_pid"].as_u64().unwrap();
            recorded.entry(pid).or_default().push(event_time_us(e));
            // After the restart, statements prepared before it get their text from the
            // backends (flag text_from_server).
            if str_of(e, "statement").is_empty() {
                without_text += 1;
                if without_text < 3 {
                    println!("without text: {e}");
                }
            }
        }
    }
    assert_eq!(
        without_text,
        0,
        "statements recorded without their text (of {})",
        events.len()
    );
    let (mut total_logged, mut total_recorded, mut in_window) = (0, 0, 0);
    let (mut total_before, mut total_after) = (0, 0);
    for (pid, times) in &logged {
        let mine = recorded.get(pid).map(Vec::as_slice).unwrap_or_default();
        assert!(
            mine.len() <= times.len(),
            "backend {pid}: more recorded than logged"
        );
        // What is missing must fit in the window: no more than the statements logged in it.
        let missing = times.len() - mine.len();
        let logged_in_window = times
            .iter()
            .filter(|&&t| t >= from - SKEW_US && t <= to + SKEW_US)
            .count();
        assert!(
            missing <= logged_in_window,
            "backend {pid}: {missing} statements missing, {logged_in_window} logged in the window"
        );
        total_before += mine.iter().filter(|&&t| t < from).count();
        total_after += mine.iter().filter(|&&t| t > to).count();
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
        "logged {total_logged} statements, recorded {total_recorded} ({total_before} before \
         the window, {total_after} after), {in_window} in the window of {window_s:.2} s"
    );
    assert!(
        total_before > 10_000 && total_after > 10_000,
        "too little load"
    );
}

#[test]
fn daemon_killed_during_load_records_the_window_it_missed() {
    if !can_run("daemon_killed_during_load_records_the_window_it_missed") {
        return;
    }
    restart_during_pgbench(true);
}

#[test]
fn daemon_stopped_during_load_records_the_window_it_missed() {
    if !can_run("daemon_stopped_during_load_records_the_window_it_missed") {
        return;
    }
    restart_during_pgbench(false);
}
