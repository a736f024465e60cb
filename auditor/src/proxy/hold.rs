//! A statement held for approval, from the connection's side: the request opened with the
//! hub, the client told where its statement waits, the decision (or the rule's timeout,
//! or the client's going away) carried back into the relay, and each step noted in the
//! session's records for the trail.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    conn::Conn,
    relay::{HoldEnd, BLOCKED_SQLSTATE},
    Shared,
};
use crate::{
    approvals::{Hub, Note, Request, Requester, State, Verdict},
    audit::event::ProcessIdentity,
};

/// How often a held session's server gets an empty query (see [`super::relay::Relay::keepalive`]).
pub(super) const KEEPALIVE: Duration = Duration::from_secs(1);
/// Client bytes buffered behind a held statement before the proxy stops reading.
pub(super) const MAX_HELD_BYTES: usize = 1 << 20;

/// Who is on the client end of a proxied connection.
pub(super) struct Origin {
    pub identity: ProcessIdentity,
    pub labels: Arc<BTreeMap<String, String>>,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// A request the connection waits on.
pub(super) struct ActiveHold {
    pub rx: tokio::sync::oneshot::Receiver<Verdict>,
    /// Woken by a CancelRequest with the session's key.
    pub cancel: Arc<tokio::sync::Notify>,
    cancel_key: Option<[u8; 32]>,
    shared: Arc<Shared>,
    pub deadline: tokio::time::Instant,
    timeout: Duration,
    note: Note,
    hub: Arc<Hub>,
    conn: Arc<Mutex<Conn>>,
    done: bool,
}

fn text_of(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) && s >= 3600 {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) && s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Opens the request for the hold the relay began (if it began one): the client gets a
/// NOTICE naming it, the trail a note. A statement an active grant covers passes at once
/// (recorded with the grant); a request that cannot be opened is refused at once. Either
/// way what the client sent after it is read, and may begin the next hold.
pub(super) fn open(
    c: &mut Conn,
    conn: &Arc<Mutex<Conn>>,
    shared: &Arc<Shared>,
    origin: &Origin,
) -> Option<ActiveHold> {
    while c.relay.hold_asked.is_some() {
        if let Some(h) = open_one(c, conn, shared, origin) {
            return Some(h);
        }
    }
    None
}

fn open_one(
    c: &mut Conn,
    conn: &Arc<Mutex<Conn>>,
    shared: &Arc<Shared>,
    origin: &Origin,
) -> Option<ActiveHold> {
    let ask = c.relay.hold_asked.take()?;
    let d = &ask.decision;
    let applied = c.relay.applied().cloned();
    let rule = applied
        .as_ref()
        .and_then(|a| a.approval_rule(&d.policy, &d.rule))
        .cloned();
    let (timeout, approvers) = match &rule {
        Some(r) => (r.timeout, r.approvers.clone()),
        None => (Duration::from_secs(300), Vec::new()),
    };
    let raw_statements = applied.as_ref().is_some_and(|a| a.raw_statements);
    let raw_params = applied.as_ref().is_some_and(|a| a.raw_params);
    let statement = if raw_statements {
        ask.sql.clone()
    } else {
        crate::sql::redact_literals(&ask.sql)
    };
    let params = ask
        .params
        .as_ref()
        .map(|ps| {
            ps.iter()
                .map(|p| match (&p.value, raw_params) {
                    (None, _) => "NULL".to_string(),
                    (Some(_), true) => p.display(),
                    (Some(v), false) => format!("(redacted, {} bytes)", v.len()),
                })
                .collect()
        })
        .unwrap_or_default();
    let meta = c.relay.meta();
    let id = &origin.identity;
    let requester = Requester {
        db_user: meta.db_user.to_string(),
        database: meta.database.to_string(),
        application_name: meta.application_name.to_string(),
        client_addr: origin.client.to_string(),
        server: origin.server.to_string(),
        pid: id.pid,
        comm: id.comm.to_string(),
        exe: id.exe.to_string(),
        uid: id.uid,
        user: crate::workload::process::user_name(id.uid),
        loginuid: id.loginuid,
        workload: crate::workload::workload_name(id).to_string(),
        container_id: if id.container_id.is_empty() {
            id.pod_uid.to_string()
        } else {
            id.container_id.to_string()
        },
        labels: (*origin.labels).clone(),
    };
    if let Some(g) = shared
        .approvals
        .grant_for(&d.policy, &d.rule, &requester, &ask.tables)
    {
        // Inside a grant's window: no request, the statement goes on, recorded with it.
        c.recorder.note(&Note {
            request: g.id.clone(),
            state: State::Granted,
            policy: d.policy.clone(),
            rule: d.rule.clone(),
            binding: ask.binding.clone(),
            sql: String::new(),
            by: Some(g.granted_by.clone()),
            reason: None,
        });
        tracing::debug!(grant = %g.id, pid = origin.identity.pid, "proxy: statement passed under a grant");
        c.relay.end_hold(HoldEnd::Approved);
        return None;
    }
    let request = Request {
        id: String::new(),
        state: State::Pending,
        created_at: String::new(),
        expires_at: String::new(),
        timeout_s: 0,
        policy: d.policy.clone(),
        rule: d.rule.clone(),
        approvers,
        statement,
        params,
        binding: ask.binding.clone(),
        requester,
        host: shared.host.clone(),
        decided_by: None,
        decided_at: None,
        reason: None,
    };
    let opened = shared.approvals.open(request, timeout);
    let (request, rx) = match opened {
        Ok(x) => x,
        Err(e) => {
            c.relay.end_hold(HoldEnd::Refused {
                sqlstate: BLOCKED_SQLSTATE,
                message: format!(
                    "statement not approved: {e} (policy \"{}\" rule \"{}\")",
                    d.policy, d.rule
                ),
                detail: None,
            });
            return None;
        }
    };
    let note = Note {
        request: request.id.clone(),
        state: State::Pending,
        policy: d.policy.clone(),
        rule: d.rule.clone(),
        binding: ask.binding.clone(),
        sql: ask.sql.clone(),
        by: None,
        reason: None,
    };
    c.recorder.note(&note);
    c.relay.notice(
        &format!(
            "auditor: this statement waits for approval (request {}, policy \"{}\" rule \"{}\")",
            request.id, d.policy, d.rule
        ),
        Some(&format!(
            "It runs once an approver allows it; without a decision within {} it is refused.",
            text_of(timeout)
        )),
        Some(&format!(
            "An approver runs: auditor approvals approve {}",
            request.id
        )),
    );
    tracing::info!(
        request = %request.id,
        pid = origin.identity.pid,
        rule = %format!("{}/{}", d.policy, d.rule),
        "proxy: statement held for approval"
    );
    let cancel = Arc::new(tokio::sync::Notify::new());
    let cancel_key = c.relay.cancel_key;
    if let (Some(k), Ok(mut m)) = (cancel_key, shared.cancels.lock()) {
        m.insert(k, cancel.clone());
    }
    Some(ActiveHold {
        rx,
        cancel,
        cancel_key,
        shared: shared.clone(),
        deadline: tokio::time::Instant::now() + timeout,
        timeout,
        note: Note {
            sql: String::new(),
            ..note
        },
        hub: shared.approvals.clone(),
        conn: conn.clone(),
        done: false,
    })
}

impl ActiveHold {
    fn named(&self) -> String {
        format!(
            "request {}, policy \"{}\" rule \"{}\"",
            self.note.request, self.note.policy, self.note.rule
        )
    }

    fn record(&mut self, c: &mut Conn, state: State, by: Option<String>, reason: Option<String>) {
        self.done = true;
        self.unregister();
        let note = Note {
            state,
            by,
            reason,
            ..self.note.clone()
        };
        c.recorder.note(&note);
    }

    /// The hub's decision: the relay forwards the statement or refuses it.
    pub fn decided(&mut self, c: &mut Conn, verdict: Option<Verdict>) {
        match verdict {
            Some(Verdict::Approved { by }) => {
                self.record(c, State::Approved, Some(by.clone()), None);
                c.relay.notice(
                    &format!("auditor: approved by {by} ({})", self.named()),
                    None,
                    None,
                );
                c.relay.end_hold(HoldEnd::Approved);
            }
            Some(Verdict::Denied { by, reason }) => {
                self.record(c, State::Denied, Some(by.clone()), reason.clone());
                c.relay.end_hold(HoldEnd::Refused {
                    sqlstate: BLOCKED_SQLSTATE,
                    message: format!("statement denied by {by} ({})", self.named()),
                    detail: reason,
                });
            }
            None => {
                // The hub dropped the request (it cannot decide any more): refused.
                self.hub.end(
                    &self.note.request,
                    State::Withdrawn,
                    "the approvals hub ended",
                );
                self.record(
                    c,
                    State::Withdrawn,
                    None,
                    Some("the approvals hub ended".into()),
                );
                c.relay.end_hold(HoldEnd::Refused {
                    sqlstate: BLOCKED_SQLSTATE,
                    message: format!(
                        "statement not approved: the approvals hub ended ({})",
                        self.named()
                    ),
                    detail: None,
                });
            }
        }
    }

    fn unregister(&self) {
        if let (Some(k), Ok(mut m)) = (self.cancel_key, self.shared.cancels.lock()) {
            if m.get(&k).is_some_and(|n| Arc::ptr_eq(n, &self.cancel)) {
                m.remove(&k);
            }
        }
    }

    /// The client cancelled (a CancelRequest with its key): the request is withdrawn and
    /// the client gets Postgres's own cancellation error. False when a decision came first.
    pub fn canceled(&mut self, c: &mut Conn) -> bool {
        let why = "the client cancelled the statement";
        if self
            .hub
            .end(&self.note.request, State::Canceled, why)
            .is_none()
        {
            return false;
        }
        self.record(c, State::Canceled, None, Some(why.to_string()));
        c.relay.end_hold(HoldEnd::Refused {
            sqlstate: "57014",
            message: "canceling statement due to user request".to_string(),
            detail: Some(format!(
                "auditor: the statement waited for approval and was withdrawn ({})",
                self.named()
            )),
        });
        true
    }

    /// The rule's timeout passed. False when a decision came first (it is in `rx`).
    pub fn expire(&mut self, c: &mut Conn) -> bool {
        let mut why = format!("no decision within {}", text_of(self.timeout));
        if let Some(down) = self.hub.store_down() {
            // Fail closed, and say why nobody could decide.
            why.push_str(&format!("; {down}"));
        }
        if self
            .hub
            .end(&self.note.request, State::Expired, &why)
            .is_none()
        {
            return false;
        }
        self.record(c, State::Expired, None, Some(why.clone()));
        c.relay.end_hold(HoldEnd::Refused {
            sqlstate: BLOCKED_SQLSTATE,
            message: format!("statement not approved: {why} ({})", self.named()),
            detail: None,
        });
        true
    }

    /// The session ends with the statement held (the daemon stops): withdrawn, and the
    /// client told.
    pub fn abandon(&mut self, c: &mut Conn, why: &str) {
        self.unregister();
        if self
            .hub
            .end(&self.note.request, State::Withdrawn, why)
            .is_some()
        {
            self.record(c, State::Withdrawn, None, Some(why.to_string()));
        }
        self.done = true;
        c.relay.abandon_hold(&format!(
            "auditor proxy: {why}; the statement held for approval was not run ({})",
            self.named()
        ));
    }
}

impl Drop for ActiveHold {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.unregister();
        // The connection ended while its statement waited: the request is withdrawn.
        let why = "the client went away before the decision";
        if self
            .hub
            .end(&self.note.request, State::Withdrawn, why)
            .is_some()
        {
            if let Ok(mut c) = self.conn.lock() {
                let note = Note {
                    state: State::Withdrawn,
                    reason: Some(why.to_string()),
                    ..self.note.clone()
                };
                c.recorder.note(&note);
            }
        }
    }
}
