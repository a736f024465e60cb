//! `auditor approvals`: the client side of the control socket.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    time::Duration,
};

use super::{
    control::{Call, Reply},
    Request, State,
};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("the daemon is not running here: no control socket at {0} (start it with `auditor run`, or give --socket / --config)")]
    NotRunning(String),
    #[error("the daemon at {0} is not running any more (a stale socket); start it again")]
    Stale(String),
    #[error("permission denied on {0}: approvers need read and write access to it (root, or the group set as approvals.socket_group)")]
    Denied(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon's answer does not read: {0}")]
    Answer(String),
    #[error("{0}")]
    Refused(String),
}

/// One call to the daemon.
pub fn call(socket: &Path, c: &Call) -> Result<Reply, CliError> {
    let shown = socket.display().to_string();
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => CliError::NotRunning(shown),
                std::io::ErrorKind::ConnectionRefused => CliError::Stale(shown),
                std::io::ErrorKind::PermissionDenied => CliError::Denied(shown),
                _ => CliError::Io {
                    path: shown,
                    source: e,
                },
            })
        }
    };
    let io = |source| CliError::Io {
        path: socket.display().to_string(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(c).map_err(|e| CliError::Answer(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| CliError::Answer(format!("{e}: {answer:?}")))
}

/// A call whose refusal is an error.
pub fn call_ok(socket: &Path, c: &Call) -> Result<Reply, CliError> {
    let r = call(socket, c)?;
    if r.ok {
        Ok(r)
    } else {
        Err(CliError::Refused(
            r.error.unwrap_or_else(|| "refused".to_string()),
        ))
    }
}

/// How long ago (or how far ahead) an RFC 3339 time is, as `2m`, `1h5m`.
fn relative(ts: &str) -> String {
    let Ok(t) = chrono_like_parse(ts) else {
        return ts.to_string();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let d = (t - now).unsigned_abs();
    let text = if d < 60 {
        format!("{d}s")
    } else if d < 3600 {
        format!("{}m{:02}s", d / 60, d % 60)
    } else {
        format!("{}h{:02}m", d / 3600, d / 60 % 60)
    };
    if t >= now {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Unix seconds of the daemon's `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn chrono_like_parse(ts: &str) -> Result<i64, ()> {
    let us = crate::audit::event::parse_ts_micros(ts).ok_or(())?;
    Ok(us.div_euclid(1_000_000))
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// The table of `auditor approvals list`.
pub fn render_list(requests: &[Request]) -> String {
    if requests.is_empty() {
        return "no statement waits for approval\n".to_string();
    }
    let mut out = format!(
        "{:<10}  {:<9}  {:<12}  {:<24}  {:<28}  {}\n",
        "ID", "STATE", "TIMES OUT", "RULE", "FROM", "STATEMENT"
    );
    for r in requests {
        let when = if r.state == State::Pending {
            relative(&r.expires_at)
        } else {
            r.decided_at.as_deref().map(relative).unwrap_or_default()
        };
        let from = format!(
            "{} pid {} as {}",
            r.requester.comm, r.requester.pid, r.requester.db_user
        );
        out.push_str(&format!(
            "{:<10}  {:<9}  {:<12}  {:<24}  {:<28}  {}\n",
            r.id,
            r.state.as_str(),
            when,
            one_line(&format!("{}/{}", r.policy, r.rule), 24),
            one_line(&from, 28),
            one_line(&r.statement, 80),
        ));
    }
    out
}

/// The table of `auditor approvals grants`.
pub fn render_grants(grants: &[super::Grant]) -> String {
    if grants.is_empty() {
        return "no grant in force\n".to_string();
    }
    let mut out = format!(
        "{:<11}  {:<8}  {:<12}  {:<24}  {:>5}  {}\n",
        "ID", "STATE", "ENDS", "RULE", "USES", "FOR"
    );
    for g in grants {
        let mut subject = g.subject_text();
        if !g.tables.is_empty() {
            subject.push_str(&format!(" on {}", g.tables.join(", ")));
        }
        out.push_str(&format!(
            "{:<11}  {:<8}  {:<12}  {:<24}  {:>5}  {}\n",
            g.id,
            g.state.as_str(),
            relative(&g.expires_at),
            one_line(&format!("{}/{}", g.policy, g.rule), 24),
            g.uses,
            one_line(&subject, 80),
        ));
    }
    out
}

/// `auditor approvals show`.
pub fn render_request(r: &Request) -> String {
    let q = &r.requester;
    let mut out = String::new();
    let mut line = |k: &str, v: &str| {
        if !v.is_empty() {
            out.push_str(&format!("{k:<14} {v}\n"));
        }
    };
    line("request", &r.id);
    line("state", r.state.as_str());
    line("rule", &format!("{}/{}", r.policy, r.rule));
    line(
        "approvers",
        &if r.approvers.is_empty() {
            "anyone with access to the control socket".to_string()
        } else {
            r.approvers.join(", ")
        },
    );
    line(
        "requested",
        &format!("{} ({})", r.created_at, relative(&r.created_at)),
    );
    if r.state == State::Pending {
        line(
            "times out",
            &format!("{} ({})", r.expires_at, relative(&r.expires_at)),
        );
    }
    line("statement", &r.statement);
    for (i, p) in r.params.iter().enumerate() {
        line(&format!("  ${}", i + 1), p);
    }
    line("binding", &format!("sha256:{}", r.binding));
    line("host", &r.host);
    line("process", &format!("{} (pid {}) {}", q.comm, q.pid, q.exe));
    line(
        "user",
        &match (&q.user, q.loginuid) {
            (Some(u), Some(l)) if l != q.uid => format!("uid {} {u}, login uid {l}", q.uid),
            (Some(u), _) => format!("uid {} {u}", q.uid),
            (None, _) => format!("uid {}", q.uid),
        },
    );
    line("workload", &q.workload);
    let labels: Vec<String> = q
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("process."))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    line("labels", &labels.join(", "));
    line("db user", &q.db_user);
    line("database", &q.database);
    line("application", &q.application_name);
    line("client", &q.client_addr);
    line("server", &q.server);
    if let Some(by) = &r.decided_by {
        line("decided by", by);
    }
    if let Some(at) = &r.decided_at {
        line("decided", at);
    }
    if let Some(why) = &r.reason {
        line("reason", why);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_show_on_one_line() {
        assert_eq!(one_line("DROP\n  TABLE\tt", 80), "DROP TABLE t");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }

    #[test]
    fn a_missing_daemon_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let e = call(&dir.path().join("nope.sock"), &Call::Whoami).unwrap_err();
        assert!(matches!(e, CliError::NotRunning(_)), "{e}");
        assert!(e.to_string().contains("not running"));
    }
}
