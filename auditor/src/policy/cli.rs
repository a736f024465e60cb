//! `auditor policy lint | test | explain`.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::Context;

use super::{
    explain::{decision_line, judge_text, session_report},
    load_dir, Defaults, PolicySet, Subject,
};
use crate::config::Config;

/// Prints every error and warning; true when there is no error.
pub fn lint(dir: &Path) -> bool {
    let (set, report) = load_dir(dir);
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for e in &report.errors {
        println!("error: {e}");
    }
    if report.errors.is_empty() {
        println!(
            "{}: {} file(s), {} polic{} ({}), version {}; {} warning(s)",
            dir.display(),
            report.files,
            set.policies.len(),
            if set.policies.len() == 1 { "y" } else { "ies" },
            set.policies
                .iter()
                .map(|p| p.policy.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            set.version,
            report.warnings.len()
        );
        true
    } else {
        println!("{}: {} error(s)", dir.display(), report.errors.len());
        false
    }
}

/// A session described on the command line.
pub struct TestSession {
    pub labels: BTreeMap<String, String>,
    pub db_user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: Option<IpAddr>,
    pub server_addr: Option<IpAddr>,
    pub server_port: u16,
}

fn load_checked(dir: &Path) -> anyhow::Result<PolicySet> {
    let (set, report) = load_dir(dir);
    if !report.errors.is_empty() {
        let list: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
        anyhow::bail!(
            "the policies do not load (the daemon would refuse them):\n  {}",
            list.join("\n  ")
        );
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    Ok(set)
}

fn defaults(cfg: &Config) -> Defaults {
    Defaults {
        raw_statements: cfg.record.raw_statements,
        raw_params: cfg.record.raw_params,
    }
}

pub fn test(dir: &Path, cfg: &Config, s: &TestSession, sql: Option<&str>) -> anyhow::Result<()> {
    let set = load_checked(dir)?;
    let mut labels = s.labels.clone();
    for (k, v) in &cfg.host_labels {
        labels.entry(format!("host.label/{k}")).or_insert(v.clone());
    }
    let subject = Subject {
        labels: &labels,
        db_user: &s.db_user,
        database: &s.database,
        application_name: &s.application_name,
        client_addr: s.client_addr,
        server_addr: s.server_addr,
        server_port: s.server_port,
    };
    let (applied, report) = session_report(&set, &subject, defaults(cfg));
    print!("{report}");
    if let Some(sql) = sql {
        for (one, d) in judge_text(&applied, sql) {
            println!("Statement: {one}");
            if !applied.judges {
                println!("  decision: allow (no matching policy judges statements: audit mode, or no rules)");
            } else {
                println!("  {}", decision_line(d.as_ref()));
            }
        }
    }
    Ok(())
}

pub fn explain(log: &Path, session: &str, dir: &Path, cfg: &Config) -> anyhow::Result<()> {
    if session.len() < 8 {
        anyhow::bail!("give at least 8 characters of the session id");
    }
    let mut events = Vec::new();
    crate::cli::read_events(log, |ev| {
        if ev.session_id.starts_with(session) {
            events.push(ev);
        }
    })?;
    let Some(first) = events.first() else {
        anyhow::bail!("no session {session} in the log (see `auditor sessions`)");
    };
    println!(
        "Session {}: {} as {} on {} from {} ({} events)",
        first.session_id,
        first.workload,
        first.db_user,
        first.database,
        first.client_addr,
        events.len()
    );
    // The policies recorded on its events, in order, with where each began.
    let mut recorded: Vec<(String, String, u64, u64)> = Vec::new();
    for ev in &events {
        match recorded.last_mut() {
            Some((name, version, _, n))
                if **name == *ev.policy && **version == *ev.policy_version =>
            {
                *n += 1
            }
            _ => recorded.push((
                ev.policy.to_string(),
                ev.policy_version.to_string(),
                ev.seq,
                1,
            )),
        }
    }
    println!("Recorded on its events:");
    for (name, version, seq, n) in &recorded {
        if name.is_empty() {
            println!("  from seq {seq}: no policy ({n} events)");
        } else {
            println!("  from seq {seq}: policy {name} version {version} ({n} events)");
        }
    }
    let mut decisions: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ev in &events {
        if !ev.decision.is_empty() {
            *decisions
                .entry((ev.decision.to_string(), ev.decision_rule.to_string()))
                .or_default() += 1;
        }
    }
    if !decisions.is_empty() {
        println!("Decisions recorded:");
        for ((d, rule), n) in &decisions {
            println!("  {d} by {rule}: {n} statement(s)");
        }
    }
    let set = load_checked(dir).with_context(|| format!("policies in {}", dir.display()))?;
    let labels: BTreeMap<String, String> = (*first.labels).clone();
    let subject = Subject {
        labels: &labels,
        db_user: &first.db_user,
        database: &first.database,
        application_name: &first.application_name,
        client_addr: first.client_addr.parse().ok(),
        server_addr: first.server_addr.parse().ok(),
        server_port: first.server_port,
    };
    println!(
        "Labels: {}",
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("With the policies in {} now:", dir.display());
    let (applied, report) = session_report(&set, &subject, defaults(cfg));
    for line in report.lines() {
        println!("  {line}");
    }
    if let Some((name, version, _, _)) = recorded.last() {
        if *name != *applied.name || *version != *applied.version {
            println!("  (differs from what its last events recorded: the policies changed since)");
        }
    }
    Ok(())
}
