//! Approvals: statements the proxy holds inside their live connection until a person
//! decides.
//!
//! A statement that a `require_approval` rule of an `enforce` policy matches is not
//! forwarded: the proxy keeps the client's connection open and waiting (a NOTICE tells a
//! person at a prompt where the statement waits), opens a [`Request`] here, and forwards
//! the held message unchanged once it is approved, or answers it with an error (SQLSTATE
//! 42501) when it is denied, when its rule's timeout passes, or when the client cancels.
//! What is approved is the exact message held: the SQL and, in the extended protocol, the
//! bind values (the request shows a hash over both, [`binding`]).
//!
//! The [`Hub`] keeps the pending requests of this daemon's proxy; approvers reach it
//! through a Unix socket ([`control`]) whose peer credentials name them, with
//! `auditor approvals` ([`cli`]). Decided requests are appended to a history file in the
//! state directory. Every step is also an audit event (`approval_requested`,
//! `approval_granted`, `approval_denied`, `approval_expired`, `approval_withdrawn`),
//! written by the tracker from the proxy's records of the session, with the session's
//! identity; the statement's own event carries the request's id (`approval_id`).

pub mod cli;
pub mod control;
pub mod store;
pub mod webhook;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Decided requests kept in memory for `auditor approvals list --all`.
const RECENT: usize = 500;
/// Pending requests at most (a client that floods held statements is refused more).
pub const MAX_PENDING: usize = 10_000;

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved,
    Denied,
    /// No decision within the rule's timeout.
    Expired,
    /// The client went away (or the daemon stopped) before a decision.
    Withdrawn,
    /// The client cancelled its statement (a driver's timeout, Ctrl-C in psql).
    Canceled,
    /// Let through by a grant, without a request (statement events only).
    Granted,
}

impl State {
    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "approved" => State::Approved,
            "denied" => State::Denied,
            "expired" => State::Expired,
            "withdrawn" => State::Withdrawn,
            "canceled" => State::Canceled,
            "granted" => State::Granted,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Withdrawn => "withdrawn",
            State::Canceled => "canceled",
            State::Granted => "granted",
        }
    }
}

/// Who sent a held statement: the session and the process on its client end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub db_user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    pub server: String,
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub uid: u32,
    /// The name of `uid` on this host, when it has one.
    pub user: Option<String>,
    /// The audit login uid of the process (who logged in, through sudo and su).
    pub loginuid: Option<u32>,
    /// `pod:<namespace>/<name>`, `container:<id>`, `unit:<unit>`, ...
    pub workload: String,
    pub container_id: String,
    pub labels: BTreeMap<String, String>,
}

impl Requester {
    /// The process runs in a container: its uid is no person's on this host.
    fn in_container(&self) -> bool {
        !self.container_id.is_empty() || self.workload.starts_with("pod:")
    }

    /// One line: `psql (pid 4242, uid 1000 alice) as app_rw on shop`.
    pub fn summary(&self) -> String {
        let user = match &self.user {
            Some(u) => format!("uid {} {u}", self.uid),
            None => format!("uid {}", self.uid),
        };
        let mut s = format!("{} (pid {}, {user})", self.comm, self.pid);
        if !self.workload.is_empty() && !self.workload.starts_with("process:") {
            s.push_str(&format!(" in {}", self.workload));
        }
        s.push_str(&format!(" as {} on {}", self.db_user, self.database));
        s
    }
}

/// A held statement and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Short random id (hex); a unique prefix of it names it too.
    pub id: String,
    pub state: State,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub expires_at: String,
    pub timeout_s: u64,
    pub policy: String,
    pub rule: String,
    /// Who may decide (the rule's `approvers`; empty: anyone who reaches the socket).
    pub approvers: Vec<String>,
    /// The statement as the trail records it: literals replaced by `$n` unless the
    /// session's policy records raw text.
    pub statement: String,
    /// Its bind values: raw when the session's policy records raw parameters, else only
    /// how many there are.
    pub params: Vec<String>,
    /// SHA-256 over the exact text and bind values held ([`binding`]): what an approval
    /// lets through, and nothing else.
    pub binding: String,
    pub requester: Requester,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// The approver's reason, or why the request ended without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A decision as the held connection receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Approved { by: String },
    Denied { by: String, reason: Option<String> },
}

/// The identity of whoever asks the hub something: a local user, from the socket's peer
/// credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approver {
    pub uid: u32,
    pub name: String,
    /// The audit login uid of the calling process and its user's name (who logged in
    /// before `sudo`), when set.
    pub loginuid: Option<u32>,
    pub login_name: Option<String>,
    /// The groups of `name` (and of `login_name`).
    pub groups: Vec<String>,
    /// Signed in to the web console through OpenID Connect: then `name` is their
    /// username claim, `groups` their groups claim, and `uid` no user of this host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcIdentity>,
}

/// Who the identity provider says a console user is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcIdentity {
    pub issuer: String,
    pub subject: String,
    /// Their login name on the hosts (`console.oidc.local_user_claim`), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_user: Option<String>,
}

impl Approver {
    /// The peer of a control connection.
    pub fn of_peer(uid: u32, gid: u32, pid: Option<u32>) -> Approver {
        let name = crate::workload::process::user_name(uid).unwrap_or_else(|| uid.to_string());
        let loginuid = pid.and_then(crate::workload::process::loginuid_of);
        let login_name = loginuid
            .map(|l| crate::workload::process::user_name(l).unwrap_or_else(|| l.to_string()));
        let mut groups = groups_of(&name, gid);
        if let (Some(l), Some(ln)) = (loginuid, &login_name) {
            if l != uid {
                let lgid = primary_gid(ln).unwrap_or(gid);
                for g in groups_of(ln, lgid) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
        Approver {
            uid,
            name,
            loginuid,
            login_name,
            groups,
            oidc: None,
        }
    }

    /// A person signed in to the web console.
    pub fn of_oidc(name: String, groups: Vec<String>, id: OidcIdentity) -> Approver {
        Approver {
            uid: u32::MAX,
            name,
            loginuid: None,
            login_name: None,
            groups,
            oidc: Some(id),
        }
    }

    /// As decisions name it: `alice`, or `alice (as root)` through sudo.
    pub fn display(&self) -> String {
        if self.oidc.is_some() {
            return format!("oidc:{}", self.name);
        }
        match (&self.login_name, self.loginuid) {
            (Some(l), Some(luid)) if luid != self.uid => format!("{l} (as {})", self.name),
            _ => self.name.clone(),
        }
    }

    /// Whether a rule's `approvers` list lets this person decide.
    pub fn may_approve(&self, approvers: &[String]) -> bool {
        if approvers.is_empty() {
            return true;
        }
        if self.oidc.is_some() {
            // Console users are named by the identity provider, in a namespace of their
            // own: a local user `alice` is not the provider's `alice`.
            return approvers.iter().any(|a| {
                if let Some(g) = a.strip_prefix("oidc-group:") {
                    self.groups.iter().any(|x| x == g)
                } else if let Some(n) = a.strip_prefix("oidc:") {
                    n == self.name
                } else {
                    false
                }
            });
        }
        approvers.iter().any(|a| match a.strip_prefix("group:") {
            Some(g) => self.groups.iter().any(|x| x == g),
            None => *a == self.name || self.login_name.as_deref() == Some(a.as_str()),
        })
    }

    /// Whether this person sent the statement: the same login (through sudo too), or the
    /// same local user for a process outside containers.
    pub fn is_requester(&self, r: &Requester) -> bool {
        if let Some(id) = &self.oidc {
            // Their login on the hosts, when the provider says which it is.
            let Some(local) = &id.local_user else {
                return false;
            };
            let login = r.loginuid.and_then(crate::workload::process::user_name);
            return login.as_deref() == Some(local.as_str())
                || (!r.in_container() && r.user.as_deref() == Some(local.as_str()));
        }
        let mine: Vec<u32> = std::iter::once(self.uid).chain(self.loginuid).collect();
        let mut theirs: Vec<u32> = r.loginuid.into_iter().collect();
        if !r.in_container() {
            theirs.push(r.uid);
        }
        mine.iter().any(|m| theirs.contains(m))
    }
}

/// The SHA-256 (hex) an approval binds: the statement's exact text and, for the extended
/// protocol, its Bind's parameter format codes and values as sent. A simple query of one
/// statement binds that statement (as split from the query string); of several, the whole
/// string.
pub fn binding(sql: &str, params: Option<(&[u8], &[u8])>) -> String {
    let mut h = Sha256::new();
    h.update(b"auditor-approval-v1\0");
    h.update(sql.as_bytes());
    h.update([0]);
    if let Some((formats, values)) = params {
        h.update((formats.len() as u64).to_le_bytes());
        h.update(formats);
        h.update((values.len() as u64).to_le_bytes());
        h.update(values);
    }
    hex::encode(h.finalize())
}

/// The text a simple query's binding covers (see [`binding`]).
pub fn query_binding_text(whole: &str) -> std::borrow::Cow<'_, str> {
    let parts = crate::sql::split_statements(whole);
    if parts.len() == 1 {
        std::borrow::Cow::Owned(parts.into_iter().next().unwrap_or_default())
    } else {
        std::borrow::Cow::Borrowed(whole)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecideError {
    #[error("no pending request {0} (see `auditor approvals list --all`)")]
    NotFound(String),
    #[error("{0} names more than one request: {1}; give more of the id")]
    Ambiguous(String, String),
    #[error("request {id} is {state} already{by}")]
    Decided {
        id: String,
        state: &'static str,
        by: String,
    },
    #[error("{who} may not decide request {id}: rule {rule} names its approvers ({list})")]
    NotAnApprover {
        who: String,
        id: String,
        rule: String,
        list: String,
    },
    #[error("{who} sent the statement of request {id} (requested by {requester}): a requester never approves their own request")]
    OwnRequest {
        who: String,
        id: String,
        requester: String,
    },
    #[error("request {0}: the client went away before the decision (withdrawn)")]
    Gone(String),
    #[error("too many statements wait for approval ({MAX_PENDING})")]
    Full,
    #[error("{0}")]
    Grant(String),
    /// The shared store cannot be reached: nothing is decided (fail closed).
    #[error("{0}; nothing was decided")]
    Store(String),
}

impl DecideError {
    /// The request is no longer pending: how it ended, and by whom.
    pub fn decided(r: &Request) -> DecideError {
        DecideError::Decided {
            id: r.id.clone(),
            state: r.state.as_str(),
            by: r
                .decided_by
                .as_ref()
                .map(|b| format!(" (by {b})"))
                .unwrap_or_default(),
        }
    }
}

impl Request {
    /// Whether `approver` may decide it: among its rule's approvers, and not its sender.
    pub fn check_decider(&self, approver: &Approver) -> Result<(), DecideError> {
        if !approver.may_approve(&self.approvers) {
            return Err(DecideError::NotAnApprover {
                who: approver.display(),
                id: self.id.clone(),
                rule: format!("{}/{}", self.policy, self.rule),
                list: self.approvers.join(", "),
            });
        }
        if approver.is_requester(&self.requester) {
            return Err(DecideError::OwnRequest {
                who: approver.display(),
                id: self.id.clone(),
                requester: self.requester.summary(),
            });
        }
        Ok(())
    }

    /// A grant of its rule to its workload and database user (approve-and-grant).
    fn grant_spec(&self, seconds: u64, reason: Option<String>) -> GrantSpec {
        GrantSpec {
            rule: format!("{}/{}", self.policy, self.rule),
            subject: [
                ("workload".to_string(), self.requester.workload.clone()),
                ("db.user".to_string(), self.requester.db_user.clone()),
            ]
            .into_iter()
            .collect(),
            tables: Vec::new(),
            seconds,
            reason,
        }
    }
}

struct Entry {
    request: Request,
    tx: Option<tokio::sync::oneshot::Sender<Verdict>>,
}

/// A time-boxed window in which statements one approval rule holds pass without a request,
/// for the sessions its subject selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// `g` and hex; a unique prefix names it too.
    pub id: String,
    pub state: GrantState,
    pub policy: String,
    pub rule: String,
    /// Whose sessions: every key must match (workload labels, `workload`, `db.user`,
    /// `db.name`).
    pub subject: BTreeMap<String, String>,
    /// Only statements on these tables (`schema.table`, `*` wildcards; empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    pub created_at: String,
    pub expires_at: String,
    /// Unix seconds of `expires_at`.
    pub expires_unix: i64,
    pub granted_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
    /// Statements it let through (on this node).
    #[serde(default)]
    pub uses: u64,
    /// The node that made it (with a shared store, every node applies it; only this one
    /// records its expiry).
    #[serde(default)]
    pub host: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    Active,
    Revoked,
    Expired,
}

impl GrantState {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Active => "active",
            GrantState::Revoked => "revoked",
            GrantState::Expired => "expired",
        }
    }
}

impl Grant {
    /// `workload=pod:agents/bot, db.user=app` (what the grant's subject says).
    pub fn subject_text(&self) -> String {
        self.subject
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn covers(&self, policy: &str, rule: &str, r: &Requester, tables: &[String], now: i64) -> bool {
        self.state == GrantState::Active
            && now < self.expires_unix
            && self.policy == policy
            && self.rule == rule
            && self.subject.iter().all(|(k, v)| {
                let have = match k.as_str() {
                    "workload" => Some(r.workload.as_str()),
                    "db.user" => Some(r.db_user.as_str()),
                    "db.name" => Some(r.database.as_str()),
                    _ => r.labels.get(k).map(String::as_str),
                };
                have == Some(v.as_str())
            })
            && (self.tables.is_empty()
                || (!tables.is_empty()
                    && tables.iter().all(|t| {
                        self.tables.iter().any(|g| {
                            crate::policy::model::glob(g, t)
                                || crate::policy::model::glob(g, &format!("public.{t}"))
                        })
                    })))
    }
}

/// What an approver asks for when granting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSpec {
    /// `policy/rule`.
    pub rule: String,
    pub subject: BTreeMap<String, String>,
    #[serde(default)]
    pub tables: Vec<String>,
    pub seconds: u64,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Longest grant.
pub const MAX_GRANT: Duration = Duration::from_secs(24 * 3600);

#[derive(Default)]
struct Inner {
    pending: HashMap<String, Entry>,
    recent: VecDeque<Request>,
    grants: Vec<Grant>,
    /// Approval rules in force: `policy/rule` -> approvers (what grants are checked
    /// against).
    rules: HashMap<String, Vec<String>>,
}

/// This daemon's approval requests.
pub struct Hub {
    inner: Mutex<Inner>,
    /// Decided requests, one JSON object per line (None: not kept).
    history: Option<PathBuf>,
    /// Grants, active and recent (rewritten whole at each change; None: not kept).
    grants_file: Option<PathBuf>,
    /// `grant_*` events for the trail, taken by the daemon's main loop.
    events: Mutex<Vec<crate::audit::event::AuditEvent>>,
    /// Bumped at every change (for a watcher that shows requests live).
    pub changed: tokio::sync::watch::Sender<u64>,
    /// The shared store, when requests are decided across nodes (`approvals.store`), and
    /// this node's name in it.
    store: Option<(Arc<store::Store>, String)>,
    /// The store's view (every node's requests), refreshed by [`sync`].
    shared_view: Mutex<Vec<Request>>,
    /// Why the store cannot be reached, while it cannot.
    store_down: Mutex<Option<String>>,
    /// Where new requests are announced.
    webhook: Option<Arc<webhook::Webhook>>,
}

impl Hub {
    /// A hub appending decided requests to `history` (the last of them are read back).
    pub fn new(history: Option<PathBuf>) -> Hub {
        let mut inner = Inner::default();
        if let Some(p) = &history {
            inner.recent = read_history(p, RECENT);
        }
        Hub {
            inner: Mutex::new(inner),
            history,
            grants_file: None,
            events: Mutex::new(Vec::new()),
            changed: tokio::sync::watch::channel(0).0,
            store: None,
            shared_view: Mutex::new(Vec::new()),
            store_down: Mutex::new(None),
            webhook: None,
        }
    }

    /// Announces each new request to `webhook`.
    pub fn with_webhook(mut self, webhook: webhook::Webhook) -> Hub {
        self.webhook = Some(Arc::new(webhook));
        self
    }

    pub fn webhook(&self) -> Option<&Arc<webhook::Webhook>> {
        self.webhook.as_ref()
    }

    /// Requests are kept in the shared store too, and decided there (see [`store`]).
    pub fn with_store(mut self, store: Arc<store::Store>, node: String) -> Hub {
        self.store = Some((store, node));
        self
    }

    pub fn store(&self) -> Option<&Arc<store::Store>> {
        self.store.as_ref().map(|(s, _)| s)
    }

    /// Why the shared store cannot be reached now (None: reachable, or none configured).
    pub fn store_down(&self) -> Option<String> {
        self.store_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_store_down(&self, why: Option<String>) {
        let mut d = self.store_down.lock().unwrap_or_else(|e| e.into_inner());
        match (&*d, &why) {
            (None, Some(w)) => tracing::error!(
                "approvals: {w}: held statements cannot be decided until it is back (they are refused at their timeout)"
            ),
            (Some(_), None) => tracing::info!("approvals: the store answers again"),
            _ => {}
        }
        *d = why;
    }

    /// A decision, in the shared store when there is one (from any node), else here.
    pub async fn decide_any(
        &self,
        prefix: &str,
        approver: &Approver,
        approve: bool,
        reason: Option<String>,
    ) -> Result<Request, DecideError> {
        match self.store() {
            Some(s) => s.decide(prefix, approver, approve, reason).await,
            None => self.decide(prefix, approver, approve, reason),
        }
    }

    /// Approves a request and grants its workload the rule (see [`Hub::grant_request`]):
    /// with a shared store, the approval is made there and the grant on this node.
    pub async fn grant_request_any(
        &self,
        prefix: &str,
        by: &Approver,
        seconds: u64,
        reason: Option<String>,
    ) -> Result<(Request, Grant), DecideError> {
        let Some(s) = self.store() else {
            return self.grant_request(prefix, by, seconds, reason);
        };
        let r = s.find(prefix).await?;
        if r.state != State::Pending {
            return Err(DecideError::decided(&r));
        }
        r.check_decider(by)?;
        let g = self
            .grant_any(r.grant_spec(seconds, reason.clone()), by)
            .await?;
        let done = s
            .decide(
                &r.id,
                by,
                true,
                Some(reason.unwrap_or_else(|| format!("grant {}", g.id))),
            )
            .await?;
        Ok((done, g))
    }

    fn node(&self) -> &str {
        self.store.as_ref().map(|(_, n)| n.as_str()).unwrap_or("")
    }

    /// A grant, shared through the store when there is one (every node applies it within
    /// a poll). A grant the store cannot record is withdrawn at once (revoked, saying so).
    pub async fn grant_any(&self, spec: GrantSpec, by: &Approver) -> Result<Grant, DecideError> {
        let g = self.grant(spec, by)?;
        let Some(s) = self.store() else {
            return Ok(g);
        };
        if let Err(e) = s.insert_grant(self.node(), &g).await {
            self.end_grant(
                &g.id,
                GrantState::Revoked,
                None,
                Some(&format!("{e}: not shared")),
            );
            return Err(DecideError::Store(e.to_string()));
        }
        Ok(g)
    }

    /// Ends a grant before its time, on every node when there is a store.
    pub async fn revoke_any(&self, prefix: &str, by: &Approver) -> Result<Grant, DecideError> {
        let Some(s) = self.store() else {
            return self.revoke(prefix, by);
        };
        // The permission check and the local end first (the grant is known here: every
        // active grant is synced); then the store, so that the other nodes follow.
        let g = self.revoke(prefix, by)?;
        s.revoke_grant(&g.id, &by.display())
            .await
            .map_err(|e| DecideError::Store(format!("{e} (revoked on this node only)")))?;
        Ok(g)
    }

    /// Ends grant `id` here without the revoke's checks (the store's word, or a grant it
    /// could not record). An event only with `why`.
    fn end_grant(&self, id: &str, state: GrantState, by: Option<&str>, why: Option<&str>) {
        let mut inner = self.lock();
        let Some(g) = inner
            .grants
            .iter_mut()
            .find(|g| g.id == id && g.state == GrantState::Active)
        else {
            return;
        };
        g.state = state;
        g.revoked_by = by.map(str::to_string);
        let g = g.clone();
        self.save_grants(&inner);
        drop(inner);
        if why.is_some() {
            self.grant_event(crate::audit::event::EventKind::GrantRevoked, &g, by, why);
        }
        self.bump();
    }

    /// The store's grants: those of other nodes applied here, those revoked elsewhere
    /// ended here (their events are the revoking node's).
    fn merge_grants(&self, from_store: Vec<Grant>) {
        let mut changed = false;
        {
            let mut inner = self.lock();
            for sg in from_store {
                match inner.grants.iter_mut().find(|g| g.id == sg.id) {
                    Some(g) if g.state == GrantState::Active && sg.state != GrantState::Active => {
                        g.state = sg.state;
                        g.revoked_by = sg.revoked_by.clone();
                        changed = true;
                    }
                    Some(_) => {}
                    None if sg.state == GrantState::Active => {
                        inner.grants.push(Grant { uses: 0, ..sg });
                        changed = true;
                    }
                    None => {}
                }
            }
            if changed {
                self.save_grants(&inner);
            }
        }
        if changed {
            self.bump();
        }
    }

    /// The held connection takes a decision made in the store. False when it is gone.
    fn deliver(&self, id: &str, verdict: Verdict) -> bool {
        let mut inner = self.lock();
        let Some(mut entry) = inner.pending.remove(id) else {
            return false;
        };
        let (state, by, reason) = match &verdict {
            Verdict::Approved { by } => (State::Approved, by.clone(), None),
            Verdict::Denied { by, reason } => (State::Denied, by.clone(), reason.clone()),
        };
        let delivered = entry.tx.take().is_some_and(|tx| tx.send(verdict).is_ok());
        let r = &mut entry.request;
        r.decided_at = Some(crate::audit::event::format_ts(now_ns()));
        if delivered {
            r.state = state;
            r.decided_by = Some(by);
            r.reason = reason;
        } else {
            r.state = State::Withdrawn;
            r.reason = Some("the client went away before the decision".into());
        }
        self.finish(&mut inner, entry.request);
        drop(inner);
        self.bump();
        delivered
    }

    /// Keeps grants in `path` (those in it are read back: a restart keeps them).
    pub fn with_grants(mut self, path: PathBuf) -> Hub {
        if let Ok(text) = std::fs::read_to_string(&path) {
            match serde_json::from_str::<Vec<Grant>>(&text) {
                Ok(g) => self.lock().grants = g,
                Err(e) => tracing::warn!(
                    "approvals: {} does not read ({e}); no grant is in force",
                    path.display()
                ),
            }
        }
        self.grants_file = Some(path);
        self
    }

    /// The approval rules of the policies in force (what grants may name, and who may
    /// grant them).
    pub fn set_rules(&self, set: &crate::policy::PolicySet) {
        let mut rules = HashMap::new();
        for p in &set.policies {
            if p.policy.mode != Some(crate::policy::Mode::Enforce) {
                continue;
            }
            for r in &p.policy.require_approval {
                rules.insert(format!("{}/{}", p.policy.name, r.name), r.approvers.clone());
            }
        }
        self.lock().rules = rules;
    }

    /// The `grant_*` events made since the last call.
    pub fn take_events(&self) -> Vec<crate::audit::event::AuditEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn grant_event(
        &self,
        kind: crate::audit::event::EventKind,
        g: &Grant,
        by: Option<&str>,
        why: Option<&str>,
    ) {
        let mut ev = crate::audit::event::AuditEvent::of_kind(kind);
        ev.approval_id = g.id.clone().into();
        ev.decision_rule = format!("{}/{}", g.policy, g.rule).into();
        if let Some(by) = by {
            ev.approver = by.to_string().into();
        }
        ev.statement = format!(
            "grant {} of {}/{} to {}{} until {}",
            g.id,
            g.policy,
            g.rule,
            g.subject_text(),
            if g.tables.is_empty() {
                String::new()
            } else {
                format!(" on {}", g.tables.join(", "))
            },
            g.expires_at
        )
        .into();
        if let Some(w) = why {
            ev.error_message = w.to_string();
        }
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ev);
    }

    fn save_grants(&self, inner: &Inner) {
        let Some(p) = &self.grants_file else {
            return;
        };
        let res = serde_json::to_vec_pretty(&inner.grants)
            .map_err(std::io::Error::other)
            .and_then(|text| crate::fsutil::write_private(p, &text));
        if let Err(e) = res {
            tracing::warn!("approvals: cannot write {}: {e}", p.display());
        }
    }

    /// Opens a grant (an approver of its rule, for at most a day).
    pub fn grant(&self, spec: GrantSpec, by: &Approver) -> Result<Grant, DecideError> {
        let mut inner = self.lock();
        let Some(approvers) = inner.rules.get(&spec.rule).cloned() else {
            let mut known: Vec<&String> = inner.rules.keys().collect();
            known.sort();
            return Err(DecideError::Grant(format!(
                "no approval rule {} in an enforce policy in force (rules: {})",
                spec.rule,
                known
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if !by.may_approve(&approvers) {
            return Err(DecideError::Grant(format!(
                "{} may not grant {}: the rule names its approvers ({})",
                by.display(),
                spec.rule,
                approvers.join(", ")
            )));
        }
        if spec.subject.is_empty() {
            return Err(DecideError::Grant(
                "a grant needs a subject: --workload, --label KEY=VALUE or --db-user".into(),
            ));
        }
        let d = Duration::from_secs(spec.seconds);
        if d.is_zero() || d > MAX_GRANT {
            return Err(DecideError::Grant("a grant lasts from 1s to 24h".into()));
        }
        let (policy, rule) = spec.rule.split_once('/').expect("rules are policy/rule");
        let now = now_ns();
        let g = Grant {
            id: loop {
                let id = format!("g{:09x}", rand::random::<u64>() & 0xf_ffff_ffff);
                if !inner.grants.iter().any(|g| g.id == id) {
                    break id;
                }
            },
            state: GrantState::Active,
            policy: policy.to_string(),
            rule: rule.to_string(),
            subject: spec.subject,
            tables: spec.tables,
            created_at: crate::audit::event::format_ts(now),
            expires_at: crate::audit::event::format_ts(now + d.as_nanos() as i128),
            expires_unix: (now / 1_000_000_000) as i64 + d.as_secs() as i64,
            granted_by: by.display(),
            reason: spec.reason,
            revoked_by: None,
            uses: 0,
            host: self.node().to_string(),
        };
        inner.grants.push(g.clone());
        // Keep the last 100 that ended, and every active one.
        let ended = inner
            .grants
            .iter()
            .filter(|g| g.state != GrantState::Active)
            .count();
        if ended > 100 {
            let mut drop = ended - 100;
            inner.grants.retain(|g| {
                if drop > 0 && g.state != GrantState::Active {
                    drop -= 1;
                    return false;
                }
                true
            });
        }
        self.save_grants(&inner);
        drop(inner);
        self.grant_event(
            crate::audit::event::EventKind::GrantCreated,
            &g,
            Some(&g.granted_by),
            g.reason.as_deref(),
        );
        self.bump();
        Ok(g)
    }

    /// Approves a pending request and grants its workload (and database user) the rule
    /// for `seconds`: the statements like it that follow pass.
    pub fn grant_request(
        &self,
        prefix: &str,
        by: &Approver,
        seconds: u64,
        reason: Option<String>,
    ) -> Result<(Request, Grant), DecideError> {
        let r = self.find(prefix)?;
        if r.state != State::Pending {
            return Err(DecideError::decided(&r));
        }
        r.check_decider(by)?;
        let g = self.grant(r.grant_spec(seconds, reason.clone()), by)?;
        let done = self.decide(
            &r.id,
            by,
            true,
            Some(reason.unwrap_or_else(|| format!("grant {}", g.id))),
        )?;
        Ok((done, g))
    }

    /// Ends a grant before its time.
    pub fn revoke(&self, prefix: &str, by: &Approver) -> Result<Grant, DecideError> {
        let mut inner = self.lock();
        let prefix = prefix.trim().to_ascii_lowercase();
        let found: Vec<usize> = inner
            .grants
            .iter()
            .enumerate()
            .filter(|(_, g)| g.id.starts_with(&prefix) && g.state == GrantState::Active)
            .map(|(i, _)| i)
            .collect();
        let i = match found.as_slice() {
            [i] => *i,
            [] => return Err(DecideError::NotFound(format!("{prefix} (no active grant)"))),
            _ => return Err(DecideError::Ambiguous(prefix, "several grants".into())),
        };
        let approvers = inner
            .rules
            .get(&format!(
                "{}/{}",
                inner.grants[i].policy, inner.grants[i].rule
            ))
            .cloned()
            .unwrap_or_default();
        if !by.may_approve(&approvers) {
            return Err(DecideError::Grant(format!(
                "{} may not revoke a grant of {}/{}",
                by.display(),
                inner.grants[i].policy,
                inner.grants[i].rule
            )));
        }
        let g = &mut inner.grants[i];
        g.state = GrantState::Revoked;
        g.revoked_by = Some(by.display());
        let g = g.clone();
        self.save_grants(&inner);
        drop(inner);
        self.grant_event(
            crate::audit::event::EventKind::GrantRevoked,
            &g,
            Some(&by.display()),
            None,
        );
        self.bump();
        Ok(g)
    }

    /// The active grant that lets this statement through, if any (its use counted).
    pub fn grant_for(
        &self,
        policy: &str,
        rule: &str,
        r: &Requester,
        tables: &[String],
    ) -> Option<Grant> {
        let now = now_ns().div_euclid(1_000_000_000) as i64;
        let mut inner = self.lock();
        let g = inner
            .grants
            .iter_mut()
            .find(|g| g.covers(policy, rule, r, tables, now))?;
        g.uses += 1;
        Some(g.clone())
    }

    /// Grants whose time is up become expired (an event each). Called every second or so.
    pub fn sweep(&self) {
        let now = now_ns().div_euclid(1_000_000_000) as i64;
        let mut inner = self.lock();
        let mut ended = Vec::new();
        for g in inner.grants.iter_mut() {
            if g.state == GrantState::Active && now >= g.expires_unix {
                g.state = GrantState::Expired;
                ended.push(g.clone());
            }
        }
        if ended.is_empty() {
            return;
        }
        self.save_grants(&inner);
        drop(inner);
        for g in ended.iter().filter(|g| g.host == self.node()) {
            self.grant_event(
                crate::audit::event::EventKind::GrantExpired,
                g,
                None,
                Some(&format!("{} statements passed under it", g.uses)),
            );
        }
        self.bump();
    }

    /// Grants: the active ones (with `all`, the ended ones kept too).
    pub fn grants(&self, all: bool) -> Vec<Grant> {
        self.lock()
            .grants
            .iter()
            .filter(|g| all || g.state == GrantState::Active)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it leaves plain data: go on with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Opens a request (its `id`, `state` and times are set here). The receiver gets the
    /// decision; expiry, withdrawal and cancellation are the holder's to report
    /// ([`Hub::end`]).
    pub fn open(
        &self,
        mut request: Request,
        timeout: Duration,
    ) -> Result<(Request, tokio::sync::oneshot::Receiver<Verdict>), DecideError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut inner = self.lock();
        if inner.pending.len() >= MAX_PENDING {
            return Err(DecideError::Full);
        }
        let id = loop {
            let id = format!("{:010x}", rand::random::<u64>() & 0xff_ffff_ffff);
            if !inner.pending.contains_key(&id) && !inner.recent.iter().any(|r| r.id == id) {
                break id;
            }
        };
        let now = now_ns();
        request.id = id.clone();
        request.state = State::Pending;
        request.created_at = crate::audit::event::format_ts(now);
        request.expires_at = crate::audit::event::format_ts(now + timeout.as_nanos() as i128);
        request.timeout_s = timeout.as_secs();
        inner.pending.insert(
            id,
            Entry {
                request: request.clone(),
                tx: Some(tx),
            },
        );
        drop(inner);
        self.bump();
        if let (Some((store, node)), Ok(rt)) = (&self.store, tokio::runtime::Handle::try_current())
        {
            let (store, node, r) = (store.clone(), node.clone(), request.clone());
            rt.spawn(async move {
                if let Err(e) = store.insert(&node, &r).await {
                    tracing::error!(
                        request = %r.id,
                        "approvals: {e}: the request cannot be decided (refused at its timeout)"
                    );
                }
            });
        }
        if let (Some(w), Ok(rt)) = (&self.webhook, tokio::runtime::Handle::try_current()) {
            let (w, r) = (w.clone(), request.clone());
            rt.spawn(async move { w.announce(r).await });
        }
        Ok((request, rx))
    }

    /// The one pending request `prefix` names.
    fn resolve(inner: &Inner, prefix: &str) -> Result<String, DecideError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 4 {
            return Err(DecideError::NotFound(format!(
                "{prefix} (give at least 4 characters of the id)"
            )));
        }
        let found: Vec<&String> = inner
            .pending
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                if let Some(r) = inner
                    .recent
                    .iter()
                    .rev()
                    .find(|r| r.id.starts_with(&prefix))
                {
                    return Err(DecideError::decided(r));
                }
                Err(DecideError::NotFound(prefix))
            }
            many => Err(DecideError::Ambiguous(
                prefix,
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    /// An approver's decision on the pending request `prefix` names.
    pub fn decide(
        &self,
        prefix: &str,
        approver: &Approver,
        approve: bool,
        reason: Option<String>,
    ) -> Result<Request, DecideError> {
        let mut inner = self.lock();
        let id = Self::resolve(&inner, prefix)?;
        inner.pending[&id].request.check_decider(approver)?;
        let mut entry = inner.pending.remove(&id).expect("resolved");
        let by = approver.display();
        let verdict = if approve {
            Verdict::Approved { by: by.clone() }
        } else {
            Verdict::Denied {
                by: by.clone(),
                reason: reason.clone(),
            }
        };
        let delivered = entry.tx.take().is_some_and(|tx| tx.send(verdict).is_ok());
        let r = &mut entry.request;
        r.decided_at = Some(crate::audit::event::format_ts(now_ns()));
        if delivered {
            r.state = if approve {
                State::Approved
            } else {
                State::Denied
            };
            r.decided_by = Some(by);
            r.reason = reason;
        } else {
            r.state = State::Withdrawn;
            r.reason = Some("the client went away before the decision".into());
        }
        let done = entry.request.clone();
        self.finish(&mut inner, entry.request);
        drop(inner);
        self.bump();
        if delivered {
            Ok(done)
        } else {
            Err(DecideError::Gone(id))
        }
    }

    /// Ends a pending request without a decision (expired, withdrawn, canceled). None when
    /// it was decided already (the decision is in the holder's receiver).
    pub fn end(&self, id: &str, state: State, reason: &str) -> Option<Request> {
        let mut inner = self.lock();
        let mut entry = inner.pending.remove(id)?;
        entry.request.state = state;
        entry.request.decided_at = Some(crate::audit::event::format_ts(now_ns()));
        entry.request.reason = Some(reason.to_string());
        let done = entry.request.clone();
        self.finish(&mut inner, entry.request);
        drop(inner);
        self.bump();
        if let (Some((store, _)), Ok(rt)) = (&self.store, tokio::runtime::Handle::try_current()) {
            let (store, id, reason) = (store.clone(), id.to_string(), reason.to_string());
            rt.spawn(async move {
                if let Err(e) = store.end(&id, state, &reason).await {
                    tracing::warn!(request = %id, "approvals: {e}: its end ({}) is not recorded there", state.as_str());
                }
            });
        }
        Some(done)
    }

    fn finish(&self, inner: &mut Inner, request: Request) {
        if let Some(p) = &self.history {
            if let Err(e) = append_history(p, &request) {
                tracing::warn!("approvals: cannot append to {}: {e}", p.display());
            }
        }
        inner.recent.push_back(request);
        while inner.recent.len() > RECENT {
            inner.recent.pop_front();
        }
    }

    /// Pending requests, oldest first; with `all`, decided ones before them.
    pub fn list(&self, all: bool) -> Vec<Request> {
        if self.store.is_some() {
            let view = self.shared_view.lock().unwrap_or_else(|e| e.into_inner());
            return view
                .iter()
                .filter(|r| all || r.state == State::Pending)
                .cloned()
                .collect();
        }
        let inner = self.lock();
        let mut out: Vec<Request> = if all {
            inner.recent.iter().cloned().collect()
        } else {
            Vec::new()
        };
        let mut pending: Vec<Request> = inner.pending.values().map(|e| e.request.clone()).collect();
        pending.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out.extend(pending);
        out
    }

    /// The request (pending or recent) a prefix names.
    pub fn find(&self, prefix: &str) -> Result<Request, DecideError> {
        if self.store.is_some() {
            let p = prefix.trim().to_ascii_lowercase();
            let view = self.shared_view.lock().unwrap_or_else(|e| e.into_inner());
            let found: Vec<&Request> = view
                .iter()
                .filter(|r| p.len() >= 4 && r.id.starts_with(&p))
                .collect();
            return match found.as_slice() {
                [one] => Ok((*one).clone()),
                [] => Err(DecideError::NotFound(p)),
                many => Err(DecideError::Ambiguous(
                    p,
                    many.iter()
                        .map(|r| r.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )),
            };
        }
        let inner = self.lock();
        match Self::resolve(&inner, prefix) {
            Ok(id) => Ok(inner.pending[&id].request.clone()),
            Err(DecideError::Decided { id, .. }) => Ok(inner
                .recent
                .iter()
                .rev()
                .find(|r| r.id == id)
                .cloned()
                .expect("found")),
            Err(e) => Err(e),
        }
    }

    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }
}

/// Keeps a hub with a shared store in step with it: decisions made anywhere on this node's
/// requests are delivered to their connections, and the view every list shows (all nodes'
/// requests) is refreshed. Runs until the daemon stops.
pub async fn sync(hub: Arc<Hub>) {
    let Some((store, node)) = hub.store.clone() else {
        return;
    };
    let mut last_ids: Vec<String> = Vec::new();
    loop {
        let step = async {
            for (id, verdict) in store.decisions(&node).await? {
                let delivered = hub.deliver(&id, verdict);
                store.delivered(&id, !delivered).await?;
            }
            hub.merge_grants(store.grants().await?);
            store.list(true).await
        };
        match step.await {
            Ok(view) => {
                hub.set_store_down(None);
                let ids: Vec<String> = view
                    .iter()
                    .map(|r| format!("{}{}", r.id, r.state.as_str()))
                    .collect();
                *hub.shared_view.lock().unwrap_or_else(|e| e.into_inner()) = view;
                if ids != last_ids {
                    last_ids = ids;
                    hub.bump();
                }
            }
            Err(e) => hub.set_store_down(Some(e.to_string())),
        }
        tokio::time::sleep(store::POLL).await;
    }
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn append_history(path: &Path, r: &Request) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&line)
}

/// The last `n` requests of a history file (lines that do not read are skipped).
fn read_history(path: &Path, n: usize) -> VecDeque<Request> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return VecDeque::new();
    };
    let mut out: VecDeque<Request> = VecDeque::new();
    for line in text.lines() {
        if let Ok(r) = serde_json::from_str::<Request>(line) {
            out.push_back(r);
            if out.len() > n {
                out.pop_front();
            }
        }
    }
    out
}

/// The group names of a user (its primary group `gid` included).
fn groups_of(name: &str, gid: u32) -> Vec<String> {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Vec::new();
    };
    let mut n: libc::c_int = 64;
    let mut gids: Vec<libc::gid_t> = vec![0; n as usize];
    // SAFETY: getgrouplist writes at most `n` gids into the buffer and updates `n`; on -1
    // `n` says how many there are, and the call is repeated with room for them.
    unsafe {
        if libc::getgrouplist(cname.as_ptr(), gid, gids.as_mut_ptr(), &mut n) == -1 {
            gids = vec![0; n.max(0) as usize];
            if libc::getgrouplist(cname.as_ptr(), gid, gids.as_mut_ptr(), &mut n) == -1 {
                return Vec::new();
            }
        }
    }
    gids.truncate(n.max(0) as usize);
    gids.into_iter().filter_map(group_name).collect()
}

/// The id of group `name`, if this host has it.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: getgrnam_r writes into `grp` and `buf`, both ours and sized as passed.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(grp.gr_gid)
    }
}

fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16384];
    // SAFETY: getgrgid_r writes into `grp` and `buf`, both ours and sized as passed.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || grp.gr_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(grp.gr_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

fn primary_gid(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, both ours and sized as passed.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(pwd.pw_gid)
    }
}

/// What the proxy tells the tracker about a held statement, in the session's own record
/// stream (so that its events carry the session's identity and come in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub request: String,
    /// `pending` when opened; then how it ended.
    pub state: State,
    pub policy: String,
    pub rule: String,
    pub binding: String,
    /// The statement's text as held (opening note only; rendered by the tracker as the
    /// session's policy records statements).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sql: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requester(uid: u32, loginuid: Option<u32>) -> Requester {
        Requester {
            uid,
            loginuid,
            comm: "psql".into(),
            pid: 42,
            db_user: "app".into(),
            database: "shop".into(),
            ..Requester::default()
        }
    }

    fn approver(uid: u32, name: &str, loginuid: Option<u32>) -> Approver {
        Approver {
            uid,
            name: name.into(),
            loginuid,
            login_name: loginuid.map(|l| format!("user{l}")),
            groups: vec!["dba".into()],
            oidc: None,
        }
    }

    fn request(approvers: &[&str], r: Requester) -> Request {
        Request {
            id: String::new(),
            state: State::Pending,
            created_at: String::new(),
            expires_at: String::new(),
            timeout_s: 0,
            policy: "agents".into(),
            rule: "ddl".into(),
            approvers: approvers.iter().map(|s| s.to_string()).collect(),
            statement: "DROP TABLE t".into(),
            params: Vec::new(),
            binding: binding("DROP TABLE t", None),
            requester: r,
            host: "h".into(),
            decided_by: None,
            decided_at: None,
            reason: None,
        }
    }

    #[test]
    fn an_approval_reaches_the_holder_once() {
        let hub = Hub::new(None);
        let (r, mut rx) = hub
            .open(request(&[], requester(1000, None)), Duration::from_secs(60))
            .unwrap();
        assert_eq!(r.state, State::Pending);
        let done = hub
            .decide(&r.id[..6], &approver(0, "root", None), true, None)
            .unwrap();
        assert_eq!(done.state, State::Approved);
        assert_eq!(
            rx.try_recv().unwrap(),
            Verdict::Approved { by: "root".into() }
        );
        // Decided: a second decision and an expiry find nothing to do.
        let again = hub.decide(&r.id, &approver(0, "root", None), false, None);
        assert!(matches!(
            again,
            Err(DecideError::Decided {
                state: "approved",
                ..
            })
        ));
        assert_eq!(hub.end(&r.id, State::Expired, "timeout"), None);
        assert_eq!(hub.list(false).len(), 0);
        assert_eq!(hub.list(true).len(), 1);
    }

    #[test]
    fn a_requester_never_approves_their_own_request() {
        let hub = Hub::new(None);
        // The same user.
        let (r, _rx) = hub
            .open(request(&[], requester(1000, None)), Duration::from_secs(60))
            .unwrap();
        let e = hub.decide(&r.id, &approver(1000, "alice", None), true, None);
        assert!(matches!(e, Err(DecideError::OwnRequest { .. })), "{e:?}");
        // The same login, through sudo.
        let (r2, _rx2) = hub
            .open(
                request(&[], requester(1000, Some(1000))),
                Duration::from_secs(60),
            )
            .unwrap();
        let e = hub.decide(&r2.id, &approver(0, "root", Some(1000)), true, None);
        assert!(matches!(e, Err(DecideError::OwnRequest { .. })), "{e:?}");
        // Someone else may.
        assert!(hub
            .decide(&r2.id, &approver(0, "root", Some(1001)), true, None)
            .is_ok());
        // A container's uid is nobody's on the host.
        let mut pod = requester(0, None);
        pod.workload = "pod:agents/bot".into();
        let (r3, _rx3) = hub
            .open(request(&[], pod), Duration::from_secs(60))
            .unwrap();
        assert!(hub
            .decide(&r3.id, &approver(0, "root", None), false, None)
            .is_ok());
    }

    #[test]
    fn only_the_rules_approvers_decide() {
        let hub = Hub::new(None);
        let (r, _rx) = hub
            .open(
                request(&["carol", "group:sre"], requester(1000, None)),
                Duration::from_secs(60),
            )
            .unwrap();
        let e = hub.decide(&r.id, &approver(0, "root", None), true, None);
        assert!(matches!(e, Err(DecideError::NotAnApprover { .. })), "{e:?}");
        let mut sre = approver(0, "root", None);
        sre.groups.push("sre".into());
        assert!(hub.decide(&r.id, &sre, true, None).is_ok());
        let (r, _rx) = hub
            .open(
                request(&["carol"], requester(1000, None)),
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(hub
            .decide(&r.id, &approver(1001, "carol", None), true, None)
            .is_ok());
    }

    #[test]
    fn console_users_are_named_by_their_provider_only() {
        let id = |local: Option<&str>| OidcIdentity {
            issuer: "https://login.example.com".into(),
            subject: "s-1".into(),
            local_user: local.map(str::to_string),
        };
        let alice = Approver::of_oidc("alice@example.com".into(), vec!["dba".into()], id(None));
        assert_eq!(alice.display(), "oidc:alice@example.com");
        assert!(alice.may_approve(&["oidc:alice@example.com".into()]));
        assert!(alice.may_approve(&["oidc-group:dba".into()]));
        // A local user or group of the same name is somebody else.
        assert!(!alice.may_approve(&["alice@example.com".into(), "group:dba".into()]));
        assert!(!alice.may_approve(&["oidc:bob@example.com".into(), "oidc-group:sre".into()]));
        // And a local user is not a console user of the same name.
        let local = approver(1000, "alice@example.com", None);
        assert!(!local.may_approve(&["oidc:alice@example.com".into()]));
        // With the provider's login name for the hosts, their own statements are theirs.
        let mut r = requester(1000, None);
        r.user = Some("alice".into());
        assert!(!alice.is_requester(&r));
        let alice = Approver::of_oidc("alice@example.com".into(), vec![], id(Some("alice")));
        assert!(alice.is_requester(&r));
        r.user = Some("bob".into());
        assert!(!alice.is_requester(&r));
    }

    #[test]
    fn a_decision_for_a_client_gone_is_refused() {
        let hub = Hub::new(None);
        let (r, rx) = hub
            .open(request(&[], requester(1000, None)), Duration::from_secs(60))
            .unwrap();
        drop(rx);
        let e = hub.decide(&r.id, &approver(0, "root", None), true, None);
        assert_eq!(e, Err(DecideError::Gone(r.id.clone())));
        assert_eq!(hub.list(true)[0].state, State::Withdrawn);
    }

    #[test]
    fn history_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approvals.jsonl");
        let hub = Hub::new(Some(path.clone()));
        let (r, _rx) = hub
            .open(request(&[], requester(1000, None)), Duration::from_secs(60))
            .unwrap();
        hub.end(&r.id, State::Expired, "no decision within 1m");
        let hub = Hub::new(Some(path));
        let all = hub.list(true);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, State::Expired);
        assert_eq!(hub.find(&r.id).unwrap().id, r.id);
    }

    fn hub_with_rule(approvers: &str) -> Hub {
        let yaml = format!(
            "name: agents\nselector: {{}}\nmode: enforce\nrequire_approval:\n  - name: ddl\n    when: {{ddl: true}}\n    approvers: [{approvers}]\n"
        );
        let mut report = crate::policy::LintReport::default();
        let set = crate::policy::PolicySet::new(crate::policy::load_str(
            std::path::Path::new("a.yaml"),
            &yaml,
            &mut report,
        ));
        let hub = Hub::new(None);
        hub.set_rules(&set);
        hub
    }

    fn spec(subject: &[(&str, &str)], tables: &[&str], seconds: u64) -> GrantSpec {
        GrantSpec {
            rule: "agents/ddl".into(),
            subject: subject
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tables: tables.iter().map(|s| s.to_string()).collect(),
            seconds,
            reason: None,
        }
    }

    #[test]
    fn a_grant_covers_its_subject_rule_and_tables_until_it_ends() {
        let hub = hub_with_rule("root");
        let root = approver(0, "root", None);
        let mut bot = requester(1000, None);
        bot.workload = "pod:agents/bot".into();
        bot.labels.insert("app".into(), "bot".into());
        let g = hub
            .grant(
                spec(&[("app", "bot"), ("db.user", "app")], &["billing.*"], 60),
                &root,
            )
            .unwrap();
        let on = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(hub
            .grant_for("agents", "ddl", &bot, &on(&["billing.invoices"]))
            .is_some());
        // Another table, rule, or subject: not covered.
        assert!(hub
            .grant_for("agents", "ddl", &bot, &on(&["public.users"]))
            .is_none());
        assert!(hub
            .grant_for("agents", "deletes", &bot, &on(&["billing.invoices"]))
            .is_none());
        let mut other = bot.clone();
        other.labels.insert("app".into(), "web".into());
        assert!(hub
            .grant_for("agents", "ddl", &other, &on(&["billing.invoices"]))
            .is_none());
        assert_eq!(hub.grants(false)[0].uses, 1);
        // Only the rule's approvers grant and revoke; a grant needs a subject and a rule
        // in force.
        let alice = approver(1000, "alice", None);
        assert!(hub.revoke(&g.id, &alice).is_err());
        assert!(hub.grant(spec(&[("app", "bot")], &[], 60), &alice).is_err());
        assert!(hub.grant(spec(&[], &[], 60), &root).is_err());
        let mut unknown = spec(&[("app", "bot")], &[], 60);
        unknown.rule = "agents/nope".into();
        assert!(hub.grant(unknown, &root).is_err());
        hub.revoke(&g.id, &root).unwrap();
        assert!(hub
            .grant_for("agents", "ddl", &bot, &on(&["billing.invoices"]))
            .is_none());
        let kinds: Vec<_> = hub.take_events().iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["grant_created", "grant_revoked"]);
        // Expiry.
        hub.grant(spec(&[("app", "bot")], &[], 1), &root).unwrap();
        assert!(hub.grant_for("agents", "ddl", &bot, &[]).is_some());
        std::thread::sleep(Duration::from_millis(1100));
        hub.sweep();
        assert!(hub.grant_for("agents", "ddl", &bot, &[]).is_none());
        let kinds: Vec<_> = hub.take_events().iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["grant_created", "grant_expired"]);
    }

    #[test]
    fn grants_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        let hub = hub_with_rule("root").with_grants(path.clone());
        let root = approver(0, "root", None);
        let g = hub.grant(spec(&[("app", "bot")], &[], 600), &root).unwrap();
        let again = Hub::new(None).with_grants(path);
        assert_eq!(again.grants(false), vec![g]);
    }

    #[test]
    fn bindings_differ_with_text_and_values() {
        let a = binding("DELETE FROM t WHERE id = $1", Some((&[], b"\0\0\0\x011")));
        let b = binding("DELETE FROM t WHERE id = $1", Some((&[], b"\0\0\0\x012")));
        let c = binding("DELETE FROM t WHERE id = $1", None);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(query_binding_text("DROP TABLE t;"), "DROP TABLE t");
        assert_eq!(
            query_binding_text("DROP TABLE a; DROP TABLE b"),
            "DROP TABLE a; DROP TABLE b"
        );
    }
}
