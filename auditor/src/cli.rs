//! The read-side commands: tail, sessions, show, stats, verify.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    audit::event::{AuditEvent, EventKind, Flags},
    daemon::Stats,
    sink::local,
};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] crate::sink::local::LocalLogError),
    #[error("no events under {0}: is `auditor run` running with this state directory?")]
    NoLog(PathBuf),
    #[error("no session {0} in the log (see `auditor sessions`)")]
    NoSession(String),
    #[error("no stats at {0}: the daemon has not run with this state directory")]
    NoStats(PathBuf),
    #[error("ClickHouse: {0}")]
    ClickHouse(String),
    #[error("the log is not intact: {path}: {what}")]
    Broken { path: PathBuf, what: String },
}

/// Every event in the log, oldest first (both formats). Records that cannot be read are
/// counted in the result (`auditor verify` says where).
pub fn read_events(dir: &Path, f: impl FnMut(AuditEvent)) -> Result<local::ReadEnd, CliError> {
    if local::log_files(dir)?.is_empty() {
        return Err(CliError::NoLog(dir.to_path_buf()));
    }
    Ok(local::read(dir, f)?)
}

/// An event as one line of JSON: the event contract's fields, as `auditor export` writes.
pub fn json_line(ev: &AuditEvent) -> Vec<u8> {
    let mut line = Vec::with_capacity(1024);
    ev.write_json_fields(&mut line);
    line.extend_from_slice(b"}\n");
    line
}

fn short_ts(ts: &str) -> &str {
    // 2026-11-22T06:01:02.123456Z -> 06:01:02.123456
    ts.get(11..26).unwrap_or(ts)
}

/// One readable line per event.
pub fn format_event(ev: &AuditEvent) -> String {
    let who = format!(
        "{}[{}]{}",
        ev.comm,
        ev.pid,
        if ev.cgroup_path.is_empty() || &*ev.cgroup_path == "/" {
            String::new()
        } else {
            format!(" {}", ev.cgroup_path)
        }
    );
    let db = format!("{}@{}", ev.db_user, ev.database);
    let flags = if ev.flags.is_empty() {
        String::new()
    } else {
        format!(" [{}]", ev.flags.names().collect::<Vec<_>>().join(","))
    };
    let ts = ev.ts.to_string();
    match ev.kind {
        EventKind::Statement => {
            let outcome = if !ev.error_code.is_empty() {
                format!("ERROR {} {}", ev.error_code, ev.error_message)
            } else {
                match ev.rows {
                    Some(r) => format!("{r} rows"),
                    None => "ok".into(),
                }
            };
            format!(
                "{} {:<13} {} {} {} {:.3}ms {} | {}{}",
                short_ts(&ts),
                ev.kind.as_str(),
                who,
                db,
                if ev.command.is_empty() {
                    "?"
                } else {
                    &ev.command
                },
                ev.duration_us as f64 / 1000.0,
                outcome,
                ev.statement,
                flags
            )
        }
        EventKind::PolicyError => format!(
            "{} {:<13} {}",
            short_ts(&ts),
            ev.kind.as_str(),
            ev.error_message
        ),
        EventKind::ApprovalRequested
        | EventKind::ApprovalGranted
        | EventKind::ApprovalDenied
        | EventKind::ApprovalExpired
        | EventKind::ApprovalWithdrawn
        | EventKind::GrantCreated
        | EventKind::GrantRevoked
        | EventKind::GrantExpired => {
            let by = if ev.approver.is_empty() {
                String::new()
            } else {
                format!(" by {}", ev.approver)
            };
            let why = if ev.error_message.is_empty() {
                String::new()
            } else {
                format!(": {}", ev.error_message)
            };
            format!(
                "{} {:<18} {} {} request {} ({}){by}{why} | {}",
                short_ts(&ts),
                ev.kind.as_str(),
                who,
                db,
                ev.approval_id,
                ev.decision_rule,
                ev.statement
            )
        }
        EventKind::Gap => format!(
            "{} {:<13} {} {} {}{}",
            short_ts(&ts),
            ev.kind.as_str(),
            who,
            db,
            ev.statement,
            flags
        ),
        EventKind::SessionStart | EventKind::SessionEnd => format!(
            "{} {:<13} {} {} app={} {}:{} -> {}:{}{}{}{}",
            short_ts(&ts),
            ev.kind.as_str(),
            who,
            db,
            ev.application_name,
            ev.client_addr,
            ev.client_port,
            ev.server_addr,
            ev.server_port,
            if ev.tls { " tls" } else { "" },
            if ev.error_code.is_empty() {
                String::new()
            } else {
                format!(" ERROR {} {}", ev.error_code, ev.error_message)
            },
            flags
        ),
    }
}

fn print_event(out: &mut impl Write, ev: &AuditEvent, json: bool) -> std::io::Result<()> {
    if json {
        out.write_all(&json_line(ev))
    } else {
        writeln!(out, "{}", format_event(ev))
    }
}

/// Prints the last `last` events, then follows new ones (until interrupted) if `follow`.
pub fn tail(dir: &Path, last: usize, json: bool, follow: bool) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Wait for the daemon to create the log.
    while local::log_files(dir)?.is_empty() {
        if !follow {
            return Err(CliError::NoLog(dir.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The last `last` events across files.
    let mut ring = std::collections::VecDeque::with_capacity(last + 1);
    let end = local::read(dir, |ev| {
        if last > 0 {
            ring.push_back(ev);
            if ring.len() > last {
                ring.pop_front();
            }
        }
    })?;
    for ev in &ring {
        let _ = print_event(&mut out, ev, json);
    }
    let _ = out.flush();
    if !follow {
        return Ok(());
    }
    let mut follower = local::Follower::new(dir, &end);
    loop {
        let mut closed = false;
        follower.poll(&mut |ev| {
            if !closed && print_event(&mut out, &ev, json).is_err() {
                closed = true; // stdout closed (piped into head)
            }
        })?;
        if closed || out.flush().is_err() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes every event (or one session's) as JSON Lines: the event contract's fields, the
/// same whichever format the log has on disk.
pub fn export(dir: &Path, session: Option<&str>) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let mut closed = false;
    read_events(dir, |ev| {
        if closed {
            return;
        }
        if let Some(s) = session {
            if !(&*ev.session_id == s || (s.len() >= 8 && ev.session_id.starts_with(s))) {
                return;
            }
        }
        closed = out.write_all(&json_line(&ev)).is_err();
    })?;
    let _ = out.flush();
    Ok(())
}

#[derive(Default)]
struct SessionSummary {
    first_ts: String,
    last_ts: String,
    who: String,
    db: String,
    app: String,
    endpoints: String,
    statements: u64,
    errors: u64,
    gaps: u64,
    ended: bool,
    flags: Flags,
}

pub fn sessions(dir: &Path, limit: usize) -> Result<(), CliError> {
    let mut by_id: BTreeMap<String, SessionSummary> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    read_events(dir, |ev| {
        if ev.session_id.is_empty() {
            return; // not a session's (a policy error, a capture interruption)
        }
        let s = by_id.entry(ev.session_id.to_string()).or_insert_with(|| {
            order.push(ev.session_id.to_string());
            SessionSummary {
                first_ts: ev.ts.to_string(),
                ..SessionSummary::default()
            }
        });
        s.last_ts = ev.ts.to_string();
        s.who = format!("{}[{}] {}", ev.comm, ev.pid, ev.cgroup_path);
        s.db = format!("{}@{}", ev.db_user, ev.database);
        s.app = ev.application_name.to_string();
        s.endpoints = format!(
            "{}:{} -> {}:{}",
            ev.client_addr, ev.client_port, ev.server_addr, ev.server_port
        );
        match ev.kind {
            EventKind::Statement => {
                s.statements += 1;
                if !ev.error_code.is_empty() {
                    s.errors += 1;
                }
            }
            EventKind::Gap => s.gaps += 1,
            EventKind::SessionEnd => s.ended = true,
            EventKind::SessionStart => s.flags |= ev.flags,
            EventKind::PolicyError
            | EventKind::ApprovalRequested
            | EventKind::ApprovalGranted
            | EventKind::ApprovalDenied
            | EventKind::ApprovalExpired
            | EventKind::ApprovalWithdrawn
            | EventKind::GrantCreated
            | EventKind::GrantRevoked
            | EventKind::GrantExpired => {}
        }
    })?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let skip = order.len().saturating_sub(limit);
    for id in order.iter().skip(skip) {
        let s = &by_id[id];
        let _ = writeln!(
            out,
            "{id}  {} .. {}  {}  {}  app={}  {}  statements={} errors={} gaps={}{}{}",
            s.first_ts,
            short_ts(&s.last_ts),
            s.who,
            s.db,
            s.app,
            s.endpoints,
            s.statements,
            s.errors,
            s.gaps,
            if s.ended { "" } else { "  (open)" },
            if s.flags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", s.flags.names().collect::<Vec<_>>().join(","))
            }
        );
    }
    Ok(())
}

pub fn show(dir: &Path, session: &str, json: bool) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut found = 0;
    read_events(dir, |ev| {
        if &*ev.session_id == session || (session.len() >= 8 && ev.session_id.starts_with(session))
        {
            found += 1;
            let _ = print_event(&mut out, &ev, json);
        }
    })?;
    if found == 0 {
        return Err(CliError::NoSession(session.to_string()));
    }
    Ok(())
}

pub fn stats(path: &Path, json: bool) -> Result<(), CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CliError::NoStats(path.to_path_buf())
        } else {
            CliError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    if json {
        println!("{}", text.trim());
        return Ok(());
    }
    let s: Stats = serde_json::from_str(&text).map_err(|e| CliError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let alive = Path::new(&format!("/proc/{}", s.pid)).exists();
    println!(
        "daemon pid {} ({}), started {}, updated {}",
        s.pid,
        if alive { "running" } else { "not running" },
        s.started_at,
        s.updated_at
    );
    println!("events written     {}", s.events_written);
    println!("statements         {}", s.tracker.statements);
    println!(
        "sessions           {} started, {} ended, {} open",
        s.tracker.sessions_started, s.tracker.sessions_ended, s.active_sessions
    );
    println!(
        "bytes captured     {} (kernel: {} in {} chunks)",
        s.tracker.bytes, s.kernel.bytes, s.kernel.chunks
    );
    println!(
        "gaps               {} ({} bytes)",
        s.tracker.gaps, s.tracker.gap_bytes
    );
    println!(
        "kernel drops       {} ring buffer full, {} open/close records",
        s.kernel.ringbuf_drops, s.kernel.control_drops
    );
    println!(
        "truncations        {} calls ({} bytes)",
        s.kernel.truncated_calls, s.kernel.truncated_bytes
    );
    println!("read failures      {}", s.kernel.read_failures);
    println!(
        "kernel tables      {} connections, {} calls and {} TLS calls in flight not taken \
         (full; gaps)",
        s.kernel.conn_table_full, s.kernel.pending_full, s.kernel.tls_calls_full
    );
    println!("parse errors       {}", s.tracker.parse_errors);
    println!("unmatched replies  {}", s.tracker.unmatched_responses);
    println!("sink errors        {}", s.sink_errors);
    if let Some(p) = &s.proxy {
        println!(
            "proxy              {} connections ({} now), {} enforced sessions, {} cgroups redirected",
            p.connections, p.active, p.enforced_sessions, p.redirected_cgroups
        );
        println!(
            "enforcement        {} blocked, {} values masked, {} held for approval ({} waiting now)",
            p.blocked, p.masked_values, p.held, p.pending_approvals
        );
        if p.namespaces + p.namespaces_refused > 0 {
            print!("pod namespaces     the proxy listens in {}", p.namespaces);
            if p.namespaces_refused > 0 {
                print!(
                    "; {} where its port is taken (their enforced connections are refused; \
                     tried again every 30 s)",
                    p.namespaces_refused
                );
            }
            println!();
        }
    }
    print!("{}", cpu_lines(&s));
    if !s.bpf_programs.is_empty() {
        // Counted only while kernel.bpf_stats_enabled = 1.
        let mut by_time: Vec<_> = s.bpf_programs.iter().collect();
        by_time.sort_by_key(|(_, r)| std::cmp::Reverse(r.run_time_ns));
        println!("eBPF programs      runs, mean ns per run (while kernel.bpf_stats_enabled = 1)");
        for (name, r) in by_time {
            println!(
                "  {name:<24} {:>12} {:>8.0}",
                r.runs,
                r.run_time_ns as f64 / r.runs.max(1) as f64
            );
        }
    }
    Ok(())
}

/// What observing has cost so far: the daemon's CPU time (all of its work: startup,
/// capture, the sinks, the proxy when it runs) per statement recorded, by thread; and the
/// eBPF programs' run time per statement, while the kernel counts it.
fn cpu_lines(s: &Stats) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let c = &s.cpu;
    if c.process.total() <= 0.0 && c.threads.is_empty() {
        // Stats of a daemon that did not count it.
        return o;
    }
    let per = |secs: f64| {
        if s.tracker.statements == 0 {
            String::new()
        } else {
            format!(
                ", {:.2} µs per statement",
                secs * 1e6 / s.tracker.statements as f64
            )
        }
    };
    let _ = writeln!(
        o,
        "daemon CPU         {:.2} s (user {:.2}, system {:.2}){}",
        c.process.total(),
        c.process.user_s,
        c.process.system_s,
        per(c.process.total())
    );
    let mut threads: Vec<_> = c.threads.iter().filter(|(_, t)| t.total() > 0.0).collect();
    threads.sort_by(|a, b| b.1.total().total_cmp(&a.1.total()));
    for (name, t) in threads {
        let _ = writeln!(o, "  {name:<24} {:>9.2} s{}", t.total(), per(t.total()));
    }
    let bpf_ns: u64 = s.bpf_programs.values().map(|r| r.run_time_ns).sum();
    if bpf_ns > 0 && s.tracker.statements > 0 {
        let _ = writeln!(
            o,
            "eBPF run time      {:.2} s, {:.2} µs per statement (while kernel.bpf_stats_enabled = 1)",
            bpf_ns as f64 / 1e9,
            bpf_ns as f64 / 1e3 / s.tracker.statements as f64
        );
    }
    o
}

/// `auditor verify`: checks the log, prints what it found; Err if it is not intact.
pub fn verify_log(
    state_dir: &Path,
    key: Option<local::seal::VerificationKey>,
    against: Option<&crate::config::Config>,
) -> Result<(), CliError> {
    let dir = state_dir.join("log");
    if local::log_files(&dir)?.is_empty() {
        return Err(CliError::NoLog(dir));
    }
    // Is the daemon that writes this log running? (Then its log must reach now.)
    let writer_running = std::fs::read_to_string(state_dir.join("stats.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Stats>(&t).ok())
        .is_some_and(|s| Path::new(&format!("/proc/{}", s.pid)).exists());
    let anchors = match against {
        Some(cfg) => Some(clickhouse_anchors(cfg)?),
        None => None,
    };
    let opts = local::VerifyOptions {
        key,
        writer_running,
        now_us: crate::audit::event::Timestamp::now().unix_micros(),
        anchors,
    };
    match local::verify(&dir, &opts)? {
        local::Verdict::Intact(r) => {
            print!("{}", render_report(&dir, &r, opts.key.is_some()));
            Ok(())
        }
        local::Verdict::Broken { path, what, .. } => Err(CliError::Broken { path, what }),
    }
}

/// The heads of this host's local log that ClickHouse received.
fn clickhouse_anchors(cfg: &crate::config::Config) -> Result<Vec<local::Anchor>, CliError> {
    use crate::sink::clickhouse;
    let ch = |e: String| {
        CliError::ClickHouse(format!(
            "{} ({}): {e}",
            cfg.clickhouse.url, cfg.clickhouse.database
        ))
    };
    let client = clickhouse::client(&cfg.clickhouse).map_err(|e| ch(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ch(e.to_string()))?;
    let host = cfg.host_name();
    let rows = rt
        .block_on(clickhouse::log_heads(
            &client,
            &cfg.clickhouse.database,
            &host,
        ))
        .map_err(|e| ch(e.to_string()))?;
    if rows.is_empty() {
        return Err(ch(format!(
            "no head of host {host}'s local log was received (is the daemon writing both, \
             with this host name?)"
        )));
    }
    rows.into_iter()
        .map(|r| {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&r.hash, &mut hash)
                .map_err(|_| ch(format!("log_heads: block {} has a damaged hash", r.block)))?;
            Ok(local::Anchor {
                block: r.block,
                records: r.records,
                hash,
                ts_us: r.ts_us,
            })
        })
        .collect()
}

fn render_report(dir: &Path, r: &local::Report, keyed: bool) -> String {
    use crate::audit::event::Timestamp;
    let mut s = format!(
        "intact: {} events under {} ({} records in {} blocks in {} segments",
        r.events,
        dir.display(),
        r.records,
        r.blocks,
        r.segments
    );
    if r.legacy.1 > 0 {
        s.push_str(&format!(
            ", after {} lines in {} files of the old format",
            r.legacy.0, r.legacy.1
        ));
    }
    s.push_str(")\n");
    match (keyed, r.sealed_span) {
        (true, Some((a, b))) => s.push_str(&format!(
            "sealed: {} blocks checked with the verification key, from {} to {}\n",
            r.sealed,
            Timestamp(a),
            Timestamp(b)
        )),
        (true, None) => s.push_str("sealed: no block is sealed (was `auditor log setup-keys` run before the daemon started?)\n"),
        (false, _) => {}
    }
    match r.ending {
        local::Ending::Empty => {}
        local::Ending::Stopped { ts_us } => s.push_str(&format!(
            "ends: with a clean stop at {}\n",
            Timestamp(ts_us)
        )),
        local::Ending::Open { ts_us } => s.push_str(&format!(
            "ends: last sealed at {} (a daemon is writing it, or the last one did not stop cleanly)\n",
            Timestamp(ts_us)
        )),
    }
    if let Some((n, last)) = &r.anchored {
        s.push_str(&format!(
            "clickhouse: the {n} heads it received are in the log{}\n",
            last.as_ref()
                .map(|a| format!(
                    " (the latest: block {} through record {}, sent {})",
                    a.block,
                    a.records,
                    Timestamp(a.ts_us)
                ))
                .unwrap_or_default()
        ));
    }
    for n in &r.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_show_what_observing_costs_per_statement() {
        let mut s = Stats::default();
        assert_eq!(cpu_lines(&s), "", "a daemon that did not count it");
        s.tracker.statements = 1_000_000;
        s.cpu.process = crate::cpu::Seconds {
            user_s: 1.0,
            system_s: 0.25,
        };
        for (name, user_s) in [("main", 0.75), ("sink", 0.5), ("idle", 0.0)] {
            s.cpu.threads.insert(
                name.into(),
                crate::cpu::Seconds {
                    user_s,
                    system_s: 0.0,
                },
            );
        }
        s.bpf_programs.insert(
            "tp_sys_exit_read".into(),
            crate::capture::ProgramRuns {
                runs: 5_000_000,
                run_time_ns: 1_500_000_000,
            },
        );
        let text = cpu_lines(&s);
        assert_eq!(
            text,
            "daemon CPU         1.25 s (user 1.00, system 0.25), 1.25 µs per statement\n\
             \x20 main                          0.75 s, 0.75 µs per statement\n\
             \x20 sink                          0.50 s, 0.50 µs per statement\n\
             eBPF run time      1.50 s, 1.50 µs per statement (while kernel.bpf_stats_enabled = 1)\n"
        );
        s.tracker.statements = 0;
        assert!(cpu_lines(&s).starts_with("daemon CPU         1.25 s (user 1.00, system 0.25)\n"));
    }
}
