//! The read-side commands: tail, sessions, show, stats, verify.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    audit::event::{AuditEvent, EventKind, Flags},
    daemon::Stats,
    sink::local::{log_files, verify, Verdict},
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
    #[error("the log chain is broken at {path} line {line}: {what}")]
    Broken {
        path: PathBuf,
        line: u64,
        what: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every event in the log, oldest first, with its line. Lines that do not parse are
/// skipped and counted.
pub fn read_events(dir: &Path, mut f: impl FnMut(AuditEvent, &str)) -> Result<u64, CliError> {
    let files = log_files(dir)?;
    if files.is_empty() {
        return Err(CliError::NoLog(dir.to_path_buf()));
    }
    let mut bad = 0;
    for path in files {
        let file = File::open(&path).map_err(io(&path))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(io(&path))?;
            match serde_json::from_str::<AuditEvent>(&line) {
                Ok(ev) => f(ev, &line),
                Err(_) => bad += 1,
            }
        }
    }
    Ok(bad)
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

/// An event as read (`--json` prints its line as logged, chain fields included).
fn print_event(
    out: &mut impl Write,
    ev: &AuditEvent,
    line: &str,
    json: bool,
) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", line.trim_end())
    } else {
        writeln!(out, "{}", format_event(ev))
    }
}

/// Prints the last `last` events, then follows new ones (until interrupted) if `follow`.
pub fn tail(dir: &Path, last: usize, json: bool, follow: bool) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Wait for the daemon to create the log.
    let mut files = log_files(dir)?;
    while files.is_empty() {
        if !follow {
            return Err(CliError::NoLog(dir.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(200));
        files = log_files(dir)?;
    }
    // The last `last` events across files.
    let mut ring = std::collections::VecDeque::with_capacity(last + 1);
    if last > 0 {
        read_events(dir, |ev, line| {
            ring.push_back((ev, line.to_string()));
            if ring.len() > last {
                ring.pop_front();
            }
        })?;
    }
    for (ev, line) in &ring {
        let _ = print_event(&mut out, ev, line, json);
    }
    let _ = out.flush();
    if !follow {
        return Ok(());
    }
    let mut path = log_files(dir)?.last().cloned().expect("non-empty");
    let mut file = File::open(&path).map_err(io(&path))?;
    file.seek(SeekFrom::End(0)).map_err(io(&path))?;
    let mut reader = BufReader::new(file);
    let mut partial = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).map_err(io(&path))?;
        if n == 0 {
            // At the end: a newer file means the log rotated.
            let newest = log_files(dir)?.last().cloned();
            if let Some(newest) = newest.filter(|p| *p != path) {
                path = newest;
                reader = BufReader::new(File::open(&path).map_err(io(&path))?);
                partial.clear();
                continue;
            }
            let _ = out.flush();
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        partial.push_str(&line);
        if !partial.ends_with('\n') {
            continue; // the writer is mid-line
        }
        if let Ok(ev) = serde_json::from_str::<AuditEvent>(partial.trim_end()) {
            if print_event(&mut out, &ev, &partial, json).is_err() {
                return Ok(()); // stdout closed (piped into head)
            }
        }
        partial.clear();
    }
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
    read_events(dir, |ev, _| {
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
    read_events(dir, |ev, line| {
        if &*ev.session_id == session || (session.len() >= 8 && ev.session_id.starts_with(session))
        {
            found += 1;
            let _ = print_event(&mut out, &ev, line, json);
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
    println!("connection table   {} full", s.kernel.conn_table_full);
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
    }
    Ok(())
}

pub fn verify_log(dir: &Path) -> Result<(), CliError> {
    match verify(dir)? {
        Verdict::Intact { lines, files } => {
            println!(
                "intact: {lines} events in {files} files under {}",
                dir.display()
            );
            Ok(())
        }
        Verdict::Broken { path, line, what } => Err(CliError::Broken { path, line, what }),
    }
}
