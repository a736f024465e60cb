//! The control socket: a Unix socket where `auditor approvals` (and, later, the console)
//! asks the daemon about held statements and decides them. One JSON object per line each
//! way; the caller is named by the socket's peer credentials (SO_PEERCRED), never by
//! anything it sends.

use std::{path::Path, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{Approver, Hub, Request};

/// Longest request line read.
const MAX_LINE: usize = 64 * 1024;

/// What a caller asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// Pending requests (with `all`, the recently decided ones too).
    List {
        #[serde(default)]
        all: bool,
    },
    Show {
        id: String,
    },
    Approve {
        id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Deny {
        id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Who the daemon takes the caller for.
    Whoami,
    /// A time-boxed grant of one approval rule to a subject.
    Grant {
        spec: super::GrantSpec,
    },
    /// Approves a pending request and grants its workload the rule for a while.
    GrantRequest {
        id: String,
        seconds: u64,
        #[serde(default)]
        reason: Option<String>,
    },
    Revoke {
        id: String,
    },
    Grants {
        #[serde(default)]
        all: bool,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<Request>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub you: Option<Approver>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<super::Grant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<super::Grant>,
}

impl Reply {
    fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }
}

/// Answers one call of `approver`.
pub async fn answer(hub: &Hub, approver: &Approver, call: Call) -> Reply {
    let ok = |request: Request| Reply {
        ok: true,
        request: Some(request),
        ..Reply::default()
    };
    match call {
        Call::List { .. } | Call::Show { .. } if hub.store_down().is_some() => {
            Reply::error(format!(
                "{}: the requests of other nodes cannot be read",
                hub.store_down().unwrap_or_default()
            ))
        }
        Call::List { all } => Reply {
            ok: true,
            requests: hub.list(all),
            ..Reply::default()
        },
        Call::Show { id } => hub.find(&id).map_or_else(Reply::error, ok),
        Call::Approve { id, reason } => {
            let r = hub.decide_any(&id, approver, true, reason).await;
            if let Ok(r) = &r {
                tracing::info!(request = %r.id, by = %approver.display(), rule = %format!("{}/{}", r.policy, r.rule), "approvals: approved");
            }
            r.map_or_else(Reply::error, ok)
        }
        Call::Deny { id, reason } => {
            let r = hub.decide_any(&id, approver, false, reason).await;
            if let Ok(r) = &r {
                tracing::info!(request = %r.id, by = %approver.display(), rule = %format!("{}/{}", r.policy, r.rule), "approvals: denied");
            }
            r.map_or_else(Reply::error, ok)
        }
        Call::Whoami => Reply {
            ok: true,
            you: Some(approver.clone()),
            ..Reply::default()
        },
        Call::Grant { spec } => match hub.grant_any(spec, approver).await {
            Ok(g) => {
                tracing::info!(grant = %g.id, by = %approver.display(), rule = %format!("{}/{}", g.policy, g.rule), subject = %g.subject_text(), until = %g.expires_at, "approvals: grant");
                Reply {
                    ok: true,
                    grant: Some(g),
                    ..Reply::default()
                }
            }
            Err(e) => Reply::error(e),
        },
        Call::GrantRequest {
            id,
            seconds,
            reason,
        } => match hub.grant_request_any(&id, approver, seconds, reason).await {
            Ok((r, g)) => {
                tracing::info!(request = %r.id, grant = %g.id, by = %approver.display(), "approvals: approved with a grant");
                Reply {
                    ok: true,
                    request: Some(r),
                    grant: Some(g),
                    ..Reply::default()
                }
            }
            Err(e) => Reply::error(e),
        },
        Call::Revoke { id } => match hub.revoke_any(&id, approver).await {
            Ok(g) => {
                tracing::info!(grant = %g.id, by = %approver.display(), "approvals: grant revoked");
                Reply {
                    ok: true,
                    grant: Some(g),
                    ..Reply::default()
                }
            }
            Err(e) => Reply::error(e),
        },
        Call::Grants { all } => Reply {
            ok: true,
            grants: hub.grants(all),
            ..Reply::default()
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another daemon answers on {0}; give each daemon its own approvals.socket")]
    InUse(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("approvals.socket_group: no group named {0:?} on this host")]
    NoGroup(String),
}

/// Binds the socket at `path` (a stale one left by a dead daemon is replaced), readable and
/// writable by root, and by `group` when given.
pub fn bind(
    path: &Path,
    group: Option<&str>,
) -> Result<std::os::unix::net::UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse(path.display().to_string()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let gid = match group {
        Some(g) => Some(super::group_id(g).ok_or_else(|| ControlError::NoGroup(g.to_string()))?),
        None => None,
    };
    // Created with no access for anyone but the owner, then opened to the group.
    // SAFETY: umask only changes this process's file-creation mask, restored below.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    }
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

/// Serves callers until the daemon stops (the task is dropped with its runtime).
pub async fn serve(listener: std::os::unix::net::UnixListener, hub: Arc<Hub>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("approvals: the control socket cannot be served: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(caller(stream, hub.clone()));
            }
            Err(e) => {
                tracing::warn!("approvals: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn caller(stream: tokio::net::UnixStream, hub: Arc<Hub>) {
    let Ok(cred) = stream.peer_cred() else {
        return;
    };
    let approver = Approver::of_peer(
        cred.uid(),
        cred.gid(),
        cred.pid().and_then(|p| u32::try_from(p).ok()),
    );
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(300),
            (&mut lines)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await;
        let n = match read {
            Ok(Ok(n)) => n,
            _ => return,
        };
        if n == 0 {
            return;
        }
        let reply = if line.len() > MAX_LINE {
            Reply::error(format!("a request longer than {MAX_LINE} bytes"))
        } else {
            match serde_json::from_slice::<Call>(&line) {
                Ok(call) => answer(&hub, &approver, call).await,
                Err(e) => Reply::error(format!("not a request this daemon knows: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() || line.len() > MAX_LINE {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_read_as_the_cli_writes_them() {
        let c: Call = serde_json::from_str(r#"{"op":"approve","id":"3f9a"}"#).unwrap();
        assert_eq!(
            c,
            Call::Approve {
                id: "3f9a".into(),
                reason: None
            }
        );
        let c: Call = serde_json::from_str(r#"{"op":"list"}"#).unwrap();
        assert_eq!(c, Call::List { all: false });
        assert!(serde_json::from_str::<Call>(r#"{"op":"drop_table"}"#).is_err());
    }

    #[tokio::test]
    async fn the_socket_names_its_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approvals.sock");
        let listener = bind(&path, None).unwrap();
        // Owner-only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let hub = Arc::new(Hub::new(None));
        tokio::spawn(serve(listener, hub));
        let path2 = path.clone();
        let reply =
            tokio::task::spawn_blocking(move || super::super::cli::call(&path2, &Call::Whoami))
                .await
                .unwrap()
                .unwrap();
        assert!(reply.ok);
        // SAFETY: getuid has no preconditions.
        assert_eq!(reply.you.unwrap().uid, unsafe { libc::getuid() });
        // A second daemon on the same socket is refused.
        assert!(matches!(bind(&path, None), Err(ControlError::InUse(_))));
    }
}
