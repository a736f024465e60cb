//! Connections to sessions: reassembles each direction's byte stream by offset, detects
//! gaps, joins the two ends of a connection seen on this host into one session, and turns
//! what sessions produce into complete audit events.
//!
//! A connection end is one kernel socket (sock address + first-seen time). When client and
//! server both run here, the kernel reports two ends with mirrored 4-tuples: the first end
//! seen decodes the protocol (the primary) and the other only adds its process identity,
//! so every statement is recorded once, with both identities.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

/// Statement names remembered per older backend (a pool's connection prepares a few dozen).
const MAX_BACKEND_STATEMENTS: usize = 1024;

use ahash::AHashMap as HashMap;
use auditor_common::{
    lost_bit, RecordHeader, Tuple, AF_UNIX, DIR_TO_CLIENT, RECORD_CLOSE, RECORD_DATA,
    RECORD_LOST_BEFORE, RECORD_OPEN, RECORD_SAME_IDENTITY, RECORD_SERVER_TEXT, ROLE_CLIENT,
    ROLE_SERVER, SEEN_IO, SERVER_NAME_BYTES, STREAM_PROXY, STREAM_RAW, STREAM_TLS,
};

use crate::{
    audit::event::{
        event_id_at, new_event_id, AuditEvent, EventKind, Flag, ProcessIdentity, Timestamp,
    },
    audit::recorder::{apply_text, render, Draft, RecordingPolicy},
    capture::session::Session,
    pg::{
        Direction, TokenizerLimits, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0,
        SSL_REQUEST_CODE,
    },
    policy::{self, Applied, Defaults, PolicySet, Subject},
    sql::Analyzer,
    text::Text,
    workload::{Workload, WorkloadResolver},
};

/// The tracker's [`EventContext`], built in place (so that a session borrowed from
/// `self.sessions` and the context's fields can be borrowed together).
macro_rules! event_context {
    ($t:expr) => {
        EventContext {
            workloads: &$t.workloads,
            host: &$t.cfg.host,
            wall_offset: $t.wall_offset_ns,
            policies: &$t.policies,
            policy_generation: $t.policy_generation,
            recording: &$t.cfg.policy,
            pod_wait: $t.cfg.pod_wait,
            may_defer: !$t.flushing,
        }
    };
}

/// `complete_drafts` for session `s` of `conn` with the tracker's own parts (a macro, as
/// `event_context!`: `s` is borrowed from the tracker's sessions, beside which a method
/// could not borrow the tracker).
macro_rules! complete_drafts {
    ($t:expr, $s:expr, $conn:expr, $drafts:expr, $out:expr) => {
        complete_drafts(
            $s,
            $conn,
            &$t.backend_statements,
            &mut $t.analyzer,
            $t.cfg.policy.raw_statements,
            event_context!($t),
            &mut $t.counters,
            $drafts,
            $out,
        )
    };
}

/// Decodes `payload` in session `s` of `conn`, completes the events it made, and ends the
/// session if that was a Unix-domain client's Terminate.
macro_rules! push_and_complete {
    ($t:expr, $s:expr, $conn:expr, $direction:expr, $payload:expr, $call_start:expr, $ts_ns:expr, $out:expr) => {{
        let mut drafts = std::mem::take(&mut $t.drafts);
        $s.session.push(
            $direction,
            $payload,
            $call_start,
            $ts_ns as i128,
            &mut $t.analyzer,
            &mut drafts,
        );
        let terminated = $s.unix && $s.session.terminated();
        complete_drafts!($t, $s, $conn, &mut drafts, $out);
        $t.drafts = drafts;
        if terminated {
            $t.close_session($conn, $ts_ns, $out);
        }
    }};
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndKey {
    pub sock: u64,
    pub start_ns: u64,
}

/// A connection named by its client and server endpoints (the same from both ends), and
/// for a loopback connection its network namespace (see `Tuple::netns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    pub client_addr: [u8; 16],
    pub client_port: u16,
    pub server_addr: [u8; 16],
    pub server_port: u16,
    pub netns: u32,
}

/// Three words, where the derived hash writes each field (and each address's length) in
/// turn: the key is looked up several times per record.
impl std::hash::Hash for ConnKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u128(u128::from_ne_bytes(self.client_addr));
        h.write_u128(u128::from_ne_bytes(self.server_addr));
        h.write_u64(
            u64::from(self.client_port)
                | u64::from(self.server_port) << 16
                | u64::from(self.netns) << 32,
        );
    }
}

impl ConnKey {
    fn of(tuple: &Tuple, role: u8) -> Self {
        if role == ROLE_CLIENT {
            ConnKey {
                client_addr: tuple.local_addr,
                client_port: tuple.local_port,
                server_addr: tuple.remote_addr,
                server_port: tuple.remote_port,
                netns: tuple.netns,
            }
        } else {
            ConnKey {
                client_addr: tuple.remote_addr,
                client_port: tuple.remote_port,
                server_addr: tuple.local_addr,
                server_port: tuple.local_port,
                netns: tuple.netns,
            }
        }
    }
}

/// How events show an endpoint address: the IP address, or `unix` for a Unix-domain
/// socket (whose port is that of its socket file, `.s.PGSQL.<port>`).
fn endpoint_string(family: u16, a: &[u8; 16]) -> Text {
    if family == AF_UNIX {
        Text::Static("unix")
    } else {
        Text::lasting(&addr_string(a))
    }
}

pub fn addr_string(a: &[u8; 16]) -> String {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4).to_string(),
        None => IpAddr::V6(v6).to_string(),
    }
}

struct End {
    conn: ConnKey,
    /// The kernel was asked to stop copying this end's payload.
    muted: bool,
    /// Next expected offset per stream (STREAM_RAW, STREAM_TLS) and direction.
    expected: [[u64; 2]; 2],
    identity: Option<ProcessIdentity>,
    /// Ciphertext came from this end after the server accepted TLS: the TLS library of
    /// its process is not hooked (a stack without hooks, or hooked too late).
    ciphertext_seen: bool,
    /// The session ended at the other end's close (kernel ns): what this end still sends
    /// belongs to that ended session and is ignored until its own close.
    retired_ns: Option<u64>,
}

/// How long a TLS session may show only ciphertext, from every end, before it is recorded
/// as unreadable (plaintext from a hook that attached late still gets decoded after).
pub const TLS_UNREADABLE_AFTER_NS: u64 = 1_000_000_000;

/// How long statements answered may wait for their ReadyForQuery (and the transaction
/// status it reports) before they are recorded without it.
const HOLD_FOR_READY_NS: i128 = 1_000_000_000;

struct SessionEntry {
    /// Its session id: a UUID held in place (every event copies it; a shared text would
    /// cost an atomic count there and another when the event is dropped).
    id: crate::audit::event::EventId,
    seq: u64,
    /// Kernel time of the last record for this connection, from either end.
    last_ns: u64,
    session: Session,
    /// The end whose bytes are decoded, and from which of its streams.
    primary: EndKey,
    stream: u8,
    /// Since when (kernel ns) every end of the connection has shown only ciphertext.
    ciphertext_only_since: Option<u64>,
    client: Option<ProcessIdentity>,
    server: Option<ProcessIdentity>,
    /// Rendered once per session: events carry them by the hundred thousand.
    client_addr: Text,
    server_addr: Text,
    /// The workload of the identity events carry, and whose (pid, cgroup) it was made for.
    workload: Workload,
    workload_of: (u32, u64),
    /// The end seen for each role (ROLE_CLIENT, ROLE_SERVER). Another end in a role that
    /// already has one means the connection these ends belonged to is gone.
    role_ends: [Option<EndKey>; 2],
    /// A Unix-domain connection: it has no close tracepoint, so it ends at the client's
    /// Terminate, at either end's end of stream, or when its processes are gone.
    unix: bool,
    /// The daemon's own diagnostics about this connection (`AUDITOR_LOG=auditor=debug`).
    span: tracing::Span,
    /// For a session older than the daemon: whether the backend's process title was read
    /// for its database user and database, and whether it told them.
    title_tried: bool,
    meta_from_title: bool,
    /// What the policies make of the session, and for which (policy set generation,
    /// workload, database user) it was resolved.
    applied: Option<Arc<Applied>>,
    applied_for: (u64, (u32, u64), Text),
    /// Drafts held while the workload is pending (its pod not known yet), and since when.
    deferred: Vec<Draft>,
    pending_since: Option<std::time::Instant>,
    /// Relayed by the daemon's inline proxy (records it made, `capture = proxy`).
    proxied: bool,
    /// Ends of approval requests whose statements have not been recorded yet (proxied
    /// sessions), matched to them by binding, oldest first.
    notes: Vec<crate::approvals::Note>,
    /// The request the statements of the simple query now being recorded ran under (its
    /// query string, shared by their outcomes).
    multi_note: Option<(Arc<str>, crate::approvals::Note)>,
}

/// Approval ends kept per session at most, waiting for their statements.
const MAX_NOTES: usize = 64;

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrackerCounters {
    pub records: u64,
    pub bytes: u64,
    /// Identities read from /proc: a record without its process's facts (see
    /// RECORD_SAME_IDENTITY) for an end the daemon held none for.
    pub identities_from_proc: u64,
    pub sessions_started: u64,
    pub sessions_ended: u64,
    pub statements: u64,
    pub gaps: u64,
    pub gap_bytes: u64,
    pub parse_errors: u64,
    pub unmatched_responses: u64,
    pub duplicate_bytes: u64,
    /// Sessions over Unix-domain sockets.
    pub unix_sessions: u64,
    /// Plaintext bytes taken at TLS libraries, and sessions decoded from them.
    pub tls_bytes: u64,
    pub tls_sessions: u64,
    /// TLS sessions no end of which delivered plaintext.
    pub tls_unreadable_sessions: u64,
    /// TLS sessions whose plaintext began after the conversation had (a hook attached
    /// late): decoded from the next message boundary, flagged `mid_stream`.
    pub tls_late_sessions: u64,
    /// Ciphertext bytes received (from processes whose TLS library is not hooked).
    pub ciphertext_bytes: u64,
    /// Statement texts read from backends older than the daemon (uprobe on
    /// PortalDefineQuery), and those that told a session something new.
    pub server_texts: u64,
    pub server_texts_learnt: u64,
    pub server_texts_unmatched: u64,
    /// Statements policies in dry-run or enforce mode decided on (would_block, ...).
    pub decisions: u64,
    /// Sessions whose events waited for their pod to be known, and those whose pod never
    /// was (recorded `pod_unknown`).
    pub pod_waits: u64,
    pub pod_unknown: u64,
}

pub struct TrackerConfig {
    pub host: Text,
    pub policy: RecordingPolicy,
    pub limits: TokenizerLimits,
    /// How long a session's events wait for its workload's labels (a pod not yet seen).
    pub pod_wait: std::time::Duration,
}

pub struct Tracker {
    cfg: TrackerConfig,
    ends: HashMap<EndKey, End>,
    /// Boxed: a session is some 2 KB, and a table of them would hold that per free slot.
    sessions: HashMap<ConnKey, Box<SessionEntry>>,
    analyzer: Analyzer,
    /// Named statements older backends reported binding (see `on_server_text`): pid ->
    /// name -> text. An execution recorded before its session learnt the text (the
    /// report came before the session was seen) takes it from here.
    backend_statements: HashMap<u32, HashMap<String, Arc<str>>>,
    workloads: WorkloadResolver,
    /// Wall clock minus monotonic clock, to turn kernel timestamps into UTC.
    wall_offset_ns: i128,
    pub counters: TrackerCounters,
    drafts: Vec<Draft>,
    /// Sockets whose payload is no longer needed, for the capture layer to mute.
    to_mute: Vec<EndKey>,
    /// The policies in force, and a number that changes with each new set.
    policies: Arc<PolicySet>,
    policy_generation: u64,
    /// Shutting down: nothing waits any more.
    flushing: bool,
    /// Ended sessions whose events wait for their pod.
    ended_waiting: Vec<(ConnKey, Box<SessionEntry>)>,
    /// The kernel time this daemon took over a capture the daemon before left running:
    /// connection ends first seen before it were followed by that daemon, and their
    /// stream offsets do not start at 0 here.
    takeover_ns: Option<u64>,
    /// The sessions that daemon followed (its checkpoint), by end, until each end shows up.
    carried: HashMap<EndKey, Arc<crate::continuity::CarriedSession>>,
    /// The checkpoint was written at a clean stop: sessions continue exactly (ids, seq,
    /// stream offsets).
    carried_exact: bool,
}

/// An end's next expected stream offset is not known yet (an end the daemon before
/// followed): its first record sets it.
const OFFSET_UNKNOWN: u64 = u64::MAX;

/// A ring-buffer record: header plus payload.
pub struct Record<'a> {
    pub header: RecordHeader,
    pub data: &'a [u8],
}

impl<'a> Record<'a> {
    /// Reads a record; None if it is shorter than it claims (never trusted blindly).
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        let hlen = std::mem::size_of::<RecordHeader>();
        if bytes.len() < hlen {
            return None;
        }
        // SAFETY: RecordHeader is repr(C), plain integers, and the length was checked.
        let header: RecordHeader =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const RecordHeader) };
        let data = if header.kind == RECORD_DATA || header.kind == RECORD_SERVER_TEXT {
            bytes.get(hlen..hlen + header.len as usize)?
        } else {
            &[]
        };
        Some(Record { header, data })
    }
}

fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Wall clock minus CLOCK_MONOTONIC (what bpf_ktime_get_ns reads), in ns.
pub fn wall_offset_ns() -> i128 {
    let mono = monotonic_ns() as i128;
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    wall - mono
}

/// CLOCK_MONOTONIC now, in ns (the clock of kernel timestamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether a first client payload starts a connection (startup-phase packet).
fn looks_like_startup(data: &[u8]) -> bool {
    if data.len() < 8 {
        return false;
    }
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let code = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
    (8..=10_000).contains(&len)
        && (code == PROTOCOL_3_0
            || code >> 16 == 3
            || code == SSL_REQUEST_CODE
            || code == GSSENC_REQUEST_CODE
            || code == CANCEL_REQUEST_CODE)
}

/// Whether bytes start with a TLS record header (content type 20..=23, version 3.x).
fn looks_like_tls_record(data: &[u8]) -> bool {
    data.len() >= 5 && (20..=23).contains(&data[0]) && data[1] == 3 && data[2] <= 4
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Self {
        Tracker {
            cfg,
            ends: HashMap::default(),
            sessions: HashMap::default(),
            analyzer: Analyzer::default(),
            backend_statements: HashMap::default(),
            workloads: WorkloadResolver::default(),
            wall_offset_ns: wall_offset_ns(),
            counters: TrackerCounters::default(),
            drafts: Vec::new(),
            to_mute: Vec::new(),
            policies: Arc::new(PolicySet::default()),
            policy_generation: 1,
            flushing: false,
            ended_waiting: Vec::new(),
            takeover_ns: None,
            carried: HashMap::default(),
            carried_exact: false,
        }
    }

    /// This daemon took over the capture the daemon before left running, at kernel time
    /// `takeover_ns`, and continues the sessions of its checkpoint (if it left one).
    pub fn carry_in(
        &mut self,
        takeover_ns: u64,
        checkpoint: Option<crate::continuity::Checkpoint>,
    ) {
        self.takeover_ns = Some(takeover_ns);
        let Some(cp) = checkpoint else { return };
        self.carried_exact = cp.stopped;
        for s in cp.sessions {
            let s = Arc::new(s);
            for &(sock, start_ns) in &s.ends {
                self.carried.insert(EndKey { sock, start_ns }, s.clone());
            }
        }
    }

    /// What the next daemon needs to continue the sessions followed now (see
    /// [`crate::continuity::Checkpoint`]); `stopped`: at a clean stop, after every event
    /// was made.
    pub fn checkpoint(&self, stopped: bool) -> crate::continuity::Checkpoint {
        let raw = self.cfg.policy.raw_statements;
        let sessions = self
            .sessions
            .values()
            .filter(|s| !s.proxied && !s.session.is_unreadable())
            .map(|s| {
                let ends: Vec<EndKey> = s.role_ends.iter().flatten().copied().collect();
                let meta = s.session.meta();
                crate::continuity::CarriedSession {
                    ends: ends.iter().map(|k| (k.sock, k.start_ns)).collect(),
                    session_id: s.id.to_string(),
                    seq: s.seq,
                    db_user: meta.db_user.to_string(),
                    database: meta.database.to_string(),
                    application_name: meta.application_name.to_string(),
                    tls: meta.tls,
                    backend_pid: meta.backend_pid,
                    statements: s
                        .session
                        .conversation()
                        .named_statements()
                        .filter(|p| p.cut.is_none())
                        .map(|p| {
                            let text = if raw {
                                p.sql.to_string()
                            } else {
                                p.analysis.normalized.to_string()
                            };
                            (p.name.to_string(), text)
                        })
                        .collect(),
                    offsets: if stopped {
                        ends.iter()
                            .map(|k| {
                                self.ends
                                    .get(k)
                                    .map_or([[OFFSET_UNKNOWN; 2]; 2], |e| e.expected)
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    client: s.client.as_ref().map(carried_process),
                    server: s.server.as_ref().map(carried_process),
                }
            })
            .collect();
        crate::continuity::Checkpoint {
            pid: std::process::id(),
            stopped,
            sessions,
        }
    }

    /// A number that changes when what a checkpoint holds (but the seq) changes.
    pub fn checkpoint_version(&self) -> u64 {
        self.sessions
            .values()
            .fold(self.sessions.len() as u64, |v, s| {
                let meta = s.session.meta();
                v.wrapping_mul(31)
                    .wrapping_add(s.session.conversation().prepared_version())
                    .wrapping_add(u64::from(meta.backend_pid))
                    .wrapping_add(meta.db_user.len() as u64)
                    .wrapping_add(s.role_ends.iter().flatten().count() as u64)
            })
    }

    /// Puts a new policy set in force: each session takes it at its next event.
    pub fn set_policies(&mut self, set: Arc<PolicySet>) {
        self.policies = set;
        self.policy_generation += 1;
    }

    /// Adds a source of workload labels (Kubernetes pods, systemd unit labels, host).
    pub fn add_label_source(&mut self, source: Box<dyn crate::workload::LabelSource>) {
        self.workloads.add_source(source);
    }

    /// Sockets to mute since the last call: the second end of local connections, once it
    /// has shown its process (the backend, after the postmaster's fork).
    pub fn drain_mutes(&mut self) -> std::vec::Drain<'_, EndKey> {
        self.to_mute.drain(..)
    }

    /// Remembers the Postgres backends running as capture begins (their sessions are
    /// older than the daemon); returns the client backends among them.
    pub fn remember_backends(&mut self) -> Vec<u32> {
        self.workloads.remember_backends()
    }

    /// The workload of a process identity (for the redirect: a cgroup's, without a
    /// process).
    pub fn workload_of(&self, id: &ProcessIdentity) -> Workload {
        self.workloads.workload(id)
    }

    pub fn active_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Handles one ring-buffer record; complete events go to `out`.
    pub fn handle(&mut self, rec: &Record<'_>, out: &mut Vec<Box<AuditEvent>>) {
        self.counters.records += 1;
        let h = &rec.header;
        let key = EndKey {
            sock: h.sock,
            start_ns: h.conn_start_ns,
        };
        match h.kind {
            RECORD_OPEN => {
                self.end_for(key, h, None, out);
            }
            RECORD_DATA => self.on_data(key, h, rec.data, out),
            RECORD_CLOSE => self.on_close(key, h, out),
            RECORD_SERVER_TEXT => self.on_server_text(h, rec.data),
            crate::proxy::RECORD_NOTE if h.stream == STREAM_PROXY => {
                self.on_note(key, h, rec.data, out)
            }
            crate::proxy::RECORD_MASKED if h.stream == STREAM_PROXY => {
                self.on_masked(key, rec.data)
            }
            _ => {}
        }
    }

    /// The proxy held a statement of a session, or the hold ended: an `approval_*` event
    /// in the session's order, and (for an end) what its statement's event will carry.
    fn on_note(
        &mut self,
        key: EndKey,
        h: &RecordHeader,
        data: &[u8],
        out: &mut Vec<Box<AuditEvent>>,
    ) {
        let Ok(note) = serde_json::from_slice::<crate::approvals::Note>(data) else {
            tracing::warn!("a proxy note does not read: dropped");
            return;
        };
        let Some(conn) = self.ends.get(&key).map(|e| e.conn) else {
            return;
        };
        use crate::approvals::State;
        if note.state == State::Granted {
            // A statement a grant let through: no event of its own; its statement's event
            // names the grant.
            if let Some(s) = self.sessions.get_mut(&conn) {
                if s.notes.len() >= MAX_NOTES {
                    s.notes.remove(0);
                }
                s.notes.push(note);
            }
            return;
        }
        let kind = match note.state {
            State::Pending => EventKind::ApprovalRequested,
            State::Approved => EventKind::ApprovalGranted,
            State::Denied => EventKind::ApprovalDenied,
            State::Expired => EventKind::ApprovalExpired,
            State::Withdrawn | State::Canceled => EventKind::ApprovalWithdrawn,
            State::Granted => unreachable!("handled above"),
        };
        let mut ev = AuditEvent::of_kind(kind);
        ev.approval_id = note.request.clone().into();
        ev.decision_rule = format!("{}/{}", note.policy, note.rule).into();
        if let Some(by) = &note.by {
            ev.approver = by.clone().into();
        }
        if let Some(why) = &note.reason {
            ev.error_message = why.clone();
        }
        let mut draft = Draft::new(h.ts_ns as i128, ev);
        if !note.sql.is_empty() {
            let sql: Arc<str> = note.sql.as_str().into();
            let analysis = self.analyzer.analyze(&sql);
            apply_text(
                &mut draft.event,
                &sql,
                &analysis,
                self.cfg.policy.raw_statements,
            );
            draft.source.sql = Some(sql);
            draft.source.analysis = Some(analysis);
        }
        draft.source.note = Some(Box::new(crate::approvals::Note {
            sql: String::new(),
            ..note
        }));
        // After the statements answered before it (still waiting for their ReadyForQuery).
        let mut drafts = Vec::new();
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.session.release_held(&mut drafts);
        }
        drafts.push(draft);
        self.finish_drafts(conn, &mut drafts, out);
    }

    /// What the proxy masked in a result of a session, just before the message that ends
    /// it: kept for that statement's event (a portal fetched in pieces, or a result a
    /// notice interrupted, adds up).
    fn on_masked(&mut self, key: EndKey, data: &[u8]) {
        let Ok(tally) = serde_json::from_slice::<crate::proxy::MaskTally>(data) else {
            tracing::warn!("a proxy mask tally does not read: dropped");
            return;
        };
        let Some(s) = self
            .ends
            .get(&key)
            .map(|e| e.conn)
            .and_then(|conn| self.sessions.get_mut(&conn))
        else {
            return;
        };
        s.session.add_mask_tally(tally);
    }

    /// A backend older than the daemon bound a named prepared statement: its text goes to
    /// the session that backend serves (see capture's `hook_backend`).
    fn on_server_text(&mut self, h: &RecordHeader, data: &[u8]) {
        self.counters.server_texts += 1;
        let pid = (h.pid_tgid >> 32) as u32;
        let name_len = (h.aux[0] as usize).min(SERVER_NAME_BYTES);
        let (Some(name), Some(text)) = (
            data.get(..name_len),
            data.get(SERVER_NAME_BYTES..SERVER_NAME_BYTES + h.call_len as usize),
        ) else {
            return;
        };
        let (name, text) = (String::from_utf8_lossy(name), String::from_utf8_lossy(text));
        let known = self.backend_statements.entry(pid).or_default();
        if known.len() < MAX_BACKEND_STATEMENTS && !known.contains_key(name.as_ref()) {
            known.insert(name.to_string(), text.as_ref().into());
        }
        let mut served = false;
        for s in self.sessions.values_mut() {
            if s.server.as_ref().is_some_and(|i| i.pid == pid) {
                served = true;
                if s.session.learn_prepared(&name, &text, &mut self.analyzer) {
                    self.counters.server_texts_learnt += 1;
                }
            }
        }
        if !served {
            self.counters.server_texts_unmatched += 1;
        }
    }

    fn identity_of(&mut self, h: &RecordHeader) -> ProcessIdentity {
        let pid = (h.pid_tgid >> 32) as u32;
        // When the kernel saw the process: a later holder of its pid started after it.
        let seen_ns = (h.ts_ns != 0).then_some(h.ts_ns);
        if h.kind == RECORD_DATA && h.flags & RECORD_SAME_IDENTITY != 0 {
            // The kernel sent this socket's identity before, to an end this daemon no
            // longer keeps (let go of while idle) or never got (a record dropped).
            self.counters.identities_from_proc += 1;
            return self.workloads.process_by_pid(pid, seen_ns);
        }
        self.workloads.process(
            pid,
            &comm_str(&h.comm),
            h.uid_gid as u32,
            h.cgroup_id,
            crate::workload::process::TaskFacts {
                audit: h.audit_ids(),
                start_ns: h.process_start_ns(),
                seen_ns,
            },
        )
    }

    /// Finds or creates the end and its session; returns whether this end is the primary.
    fn end_for(
        &mut self,
        key: EndKey,
        h: &RecordHeader,
        first_data: Option<&[u8]>,
        out: &mut Vec<Box<AuditEvent>>,
    ) -> bool {
        if let Some(end) = self.ends.get(&key) {
            let conn = end.conn;
            return self.sessions.get(&conn).is_some_and(|s| s.primary == key);
        }
        let conn = ConnKey::of(&h.tuple, h.role);
        let identity = self.identity_of(h);
        let role = (h.role == ROLE_SERVER) as usize;
        let replaced = self
            .sessions
            .get(&conn)
            .is_some_and(|s| s.role_ends[role].is_some_and(|k| k != key));
        if replaced {
            // The same endpoints with a new socket in a role already taken: the earlier
            // connection ended without a close record (socket addresses are reused).
            if let Some(old) = self.sessions.remove(&conn) {
                self.ends.retain(|_, e| e.conn != conn);
                self.end_session(conn, old, h.ts_ns as i128, true, out);
            }
        }
        // An end the daemon before followed (this daemon took its capture over): its
        // stream offsets go on from where they were, known exactly after a clean stop.
        let carried = self.carried.remove(&key);
        let expected = match self.takeover_ns {
            Some(t) if key.start_ns < t => carried
                .as_ref()
                .filter(|_| self.carried_exact)
                .and_then(|c| {
                    let i = c.ends.iter().position(|e| *e == (key.sock, key.start_ns))?;
                    c.offsets.get(i).copied()
                })
                .unwrap_or([[OFFSET_UNKNOWN; 2]; 2]),
            _ => [[0, 0], [0, 0]],
        };
        self.ends.insert(
            key,
            End {
                conn,
                muted: false,
                expected,
                identity: Some(identity.clone()),
                ciphertext_seen: false,
                retired_ns: None,
            },
        );
        let primary_alive = self
            .sessions
            .get(&conn)
            .is_some_and(|s| self.ends.contains_key(&s.primary) && s.primary != key);
        if primary_alive {
            let s = self.sessions.get_mut(&conn).expect("checked");
            s.role_ends[role] = Some(key);
            if h.role == ROLE_CLIENT {
                s.client = Some(identity);
            } else {
                s.server = Some(identity);
            }
            return false;
        }
        // A session whose primary is gone without a close record is replaced.
        let starts_clean = h.direction != DIR_TO_CLIENT
            && h.offset == 0
            && first_data.is_some_and(looks_like_startup);
        let tls = h.stream == STREAM_TLS;
        let proxied = h.stream == STREAM_PROXY;
        // Plaintext offsets count from the first library call the kernel side saw.
        // (A connection the daemon before saw opened has offsets past 0 here.)
        let mid_stream = first_data.is_some()
            && !starts_clean
            && (tls || h.seen == SEEN_IO || h.offset != 0 || carried.is_some());
        let mut session = Session::new(self.cfg.policy.clone(), self.cfg.limits, mid_stream);
        if tls {
            session.begin_plaintext();
            self.counters.tls_sessions += 1;
        } else if mid_stream && first_data.is_some_and(looks_like_tls_record) {
            session.assume_tls();
        }
        let id = new_event_id();
        let client_addr = endpoint_string(h.tuple.family, &conn.client_addr);
        let server_addr = endpoint_string(h.tuple.family, &conn.server_addr);
        let span = tracing::debug_span!(
            "session",
            id = %id,
            client = %format_args!("{client_addr}:{}", conn.client_port),
            server = %format_args!("{server_addr}:{}", conn.server_port),
        );
        tracing::debug!(parent: &span, mid_stream, tls, pid = identity.pid, comm = %identity.comm, "connection seen");
        let mut entry = Box::new(SessionEntry {
            id,
            seq: 0,
            last_ns: h.ts_ns,
            session,
            primary: key,
            // The proxy's records are plaintext, decoded as the raw stream is.
            stream: if proxied { STREAM_RAW } else { h.stream },
            ciphertext_only_since: None,
            client: None,
            server: None,
            client_addr,
            server_addr,
            workload: Workload::default(),
            workload_of: (0, 0),
            role_ends: [None, None],
            unix: h.tuple.family == AF_UNIX,
            span,
            title_tried: false,
            meta_from_title: false,
            applied: None,
            applied_for: (0, (0, 0), Text::default()),
            deferred: Vec::new(),
            pending_since: None,
            proxied,
            notes: Vec::new(),
            multi_note: None,
        });
        if let Some(c) = &carried {
            // The session the daemon before followed: its facts and named statements, and
            // after a clean stop its id and seq (no second session_start).
            let meta = crate::conversation::SessionMeta {
                db_user: c.db_user.as_str().into(),
                database: c.database.as_str().into(),
                application_name: c.application_name.as_str().into(),
                tls: c.tls,
                backend_pid: c.backend_pid,
            };
            entry
                .session
                .carry_in(meta, &c.statements, &mut self.analyzer);
            entry.title_tried = true;
            // The end not seen here (muted by the daemon before) keeps its process.
            let process = |p: &crate::continuity::CarriedProcess, w: &mut WorkloadResolver| {
                w.process(p.pid, &p.comm, p.uid, p.cgroup_id, Default::default())
            };
            if entry.client.is_none() {
                entry.client = c.client.as_ref().map(|p| process(p, &mut self.workloads));
            }
            if entry.server.is_none() {
                entry.server = c.server.as_ref().map(|p| process(p, &mut self.workloads));
            }
            if self.carried_exact {
                entry.id = c.session_id.as_str().into();
                entry.seq = c.seq;
            }
            tracing::debug!(parent: &entry.span, carried = %c.session_id, exact = self.carried_exact, "continues a session of the daemon before");
        }
        if entry.unix {
            self.counters.unix_sessions += 1;
        }
        entry.role_ends[role] = Some(key);
        if h.role == ROLE_CLIENT {
            entry.client = Some(identity);
        } else {
            entry.server = Some(identity);
        }
        if let Some(old) = self.sessions.insert(conn, entry) {
            self.end_session(conn, old, h.ts_ns as i128, true, out);
        }
        true
    }

    /// Stops the kernel copying an end's payload (it is not needed).
    fn mute(&mut self, key: EndKey) {
        if let Some(end) = self.ends.get_mut(&key) {
            if !end.muted {
                end.muted = true;
                self.to_mute.push(key);
            }
        }
    }

    /// Decides what a record is for: decoding (true), or only its end's identity.
    fn route(&mut self, key: EndKey, h: &RecordHeader, primary: bool, data: &[u8]) -> bool {
        let len = data.len();
        let Some(conn) = self.ends.get(&key).map(|e| e.conn) else {
            return false;
        };
        let Some(s) = self.sessions.get_mut(&conn) else {
            return false;
        };
        if h.stream == STREAM_TLS {
            self.counters.tls_bytes += len as u64;
            if primary && s.stream == STREAM_TLS {
                return true;
            }
            if s.session.awaiting_plaintext() {
                // The first plaintext of a TLS session: this end decodes from now on, and
                // the other ends are no longer needed.
                s.primary = key;
                s.stream = STREAM_TLS;
                s.ciphertext_only_since = None;
                let clean_start = h.direction != DIR_TO_CLIENT
                    && h.offset == 0
                    && h.chunk_index == 0
                    && looks_like_startup(data);
                if clean_start {
                    s.session.begin_plaintext();
                } else {
                    // The hook came late: the conversation had already begun.
                    s.session.begin_plaintext_late();
                    self.counters.tls_late_sessions += 1;
                }
                self.counters.tls_sessions += 1;
                let others: Vec<EndKey> = self
                    .ends
                    .iter()
                    .filter(|(k, e)| e.conn == conn && **k != key && e.retired_ns.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                for k in others {
                    self.mute(k);
                }
                return true;
            }
            // The other end's plaintext of a session decoded already.
            self.counters.duplicate_bytes += len as u64;
            self.mute(key);
            return false;
        }
        if s.session.awaiting_plaintext() {
            // Ciphertext: this end's process has no hooked TLS library.
            self.counters.ciphertext_bytes += len as u64;
            if let Some(e) = self.ends.get_mut(&key) {
                e.ciphertext_seen = true;
            }
            if s.ciphertext_only_since.is_none()
                && self
                    .ends
                    .values()
                    .filter(|e| e.conn == conn && e.retired_ns.is_none())
                    .all(|e| e.ciphertext_seen)
            {
                s.ciphertext_only_since = Some(h.ts_ns);
            }
            return false;
        }
        if primary && s.stream == STREAM_RAW {
            return true;
        }
        if !primary && s.session.settled() {
            // The other end decodes; this end has shown its process: stop copying it.
            self.counters.duplicate_bytes += len as u64;
            self.mute(key);
        }
        false
    }

    /// The common case of a data record, in one lookup of its end and one of its session:
    /// the primary end of a settled plaintext session, its bytes following on from the last
    /// ones, the same process as before. Anything else (a new end or process, TLS, a gap,
    /// an overlap, lost calls, another end) is left to the general path: returns false
    /// having changed nothing.
    fn on_settled_data(
        &mut self,
        key: EndKey,
        h: &RecordHeader,
        data: &[u8],
        out: &mut Vec<Box<AuditEvent>>,
    ) -> bool {
        if h.stream != STREAM_RAW
            || data.is_empty()
            || (h.flags & RECORD_LOST_BEFORE != 0 && h.chunk_index == 0)
        {
            return false;
        }
        let Some(end) = self.ends.get_mut(&key) else {
            return false;
        };
        let dir = (h.direction & 1) as usize;
        let pid = (h.pid_tgid >> 32) as u32;
        if end.retired_ns.is_some()
            || end.expected[0][dir] != h.offset
            || end.identity.as_ref().is_none_or(|i| i.pid != pid)
        {
            return false;
        }
        let conn = end.conn;
        let Some(s) = self.sessions.get_mut(&conn) else {
            return false;
        };
        if s.primary != key || s.stream != STREAM_RAW || s.session.awaiting_plaintext() {
            return false;
        }
        end.expected[0][dir] = h.offset + data.len() as u64;
        s.last_ns = s.last_ns.max(h.ts_ns);
        let direction = if dir == 0 {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        push_and_complete!(
            self,
            s,
            conn,
            direction,
            data,
            h.chunk_index == 0,
            h.ts_ns,
            out
        );
        true
    }

    fn on_data(
        &mut self,
        key: EndKey,
        h: &RecordHeader,
        data: &[u8],
        out: &mut Vec<Box<AuditEvent>>,
    ) {
        self.counters.bytes += data.len() as u64;
        if self.on_settled_data(key, h, data, out) {
            return;
        }
        let primary = self.end_for(key, h, Some(data), out);
        let Some(end) = self.ends.get_mut(&key) else {
            return;
        };
        if end.retired_ns.is_some() {
            self.counters.duplicate_bytes += data.len() as u64;
            return;
        }
        let conn = end.conn;
        let stream = (h.stream & 1) as usize;
        let dir_idx = (h.direction & 1) as usize;
        let mut expected = end.expected[stream][dir_idx];
        if expected == OFFSET_UNKNOWN {
            expected = h.offset;
        }
        let chunk_end = h.offset + data.len() as u64;
        end.expected[stream][dir_idx] = expected.max(chunk_end);
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.last_ns = s.last_ns.max(h.ts_ns);
        }
        let pid = (h.pid_tgid >> 32) as u32;
        if end.identity.as_ref().is_none_or(|i| i.pid != pid) {
            // A new process on this end (the forked backend, an fd handed over).
            let id = self.identity_of(h);
            if let Some(e) = self.ends.get_mut(&key) {
                e.identity = Some(id.clone());
            }
            if let Some(s) = self.sessions.get_mut(&conn) {
                if h.role == ROLE_CLIENT {
                    s.client = Some(id);
                } else {
                    s.server = Some(id);
                }
            }
        }
        if !self.route(key, h, primary, data) {
            return;
        }
        let direction = if dir_idx == 0 {
            Direction::ToServer
        } else {
            Direction::ToClient
        };
        let ts = h.ts_ns as i128;
        let mut payload = data;
        let mut call_start = h.chunk_index == 0;
        if h.offset > expected {
            let missing = h.offset - expected;
            self.emit_gap(conn, direction, missing, ts, out);
            if let Some(s) = self.sessions.get_mut(&conn) {
                let mut drafts = std::mem::take(&mut self.drafts);
                s.session
                    .gap(direction, missing, ts, &mut self.analyzer, &mut drafts);
                self.finish_drafts(conn, &mut drafts, out);
                self.drafts = drafts;
            }
        } else if h.flags & RECORD_LOST_BEFORE != 0 && call_start {
            // Calls went by uncopied (the kernel's table of calls in flight was full):
            // bytes were lost, the stream's offsets could not say how many.
            self.emit_gap(conn, direction, 0, ts, out);
            if let Some(s) = self.sessions.get_mut(&conn) {
                let mut drafts = std::mem::take(&mut self.drafts);
                s.session.lost_unknown(direction, ts, &mut drafts);
                self.finish_drafts(conn, &mut drafts, out);
                self.drafts = drafts;
            }
        }
        if h.offset < expected {
            // Overlap with bytes already delivered: keep only what is new.
            let skip = (expected - h.offset).min(data.len() as u64) as usize;
            payload = &data[skip..];
            call_start = false;
        }
        if payload.is_empty() {
            return;
        }
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        // (The session's span is not entered: decoding logs nothing, and entering and
        // leaving a span costs the subscriber's bookkeeping twice per record.)
        push_and_complete!(self, s, conn, direction, payload, call_start, h.ts_ns, out);
    }

    /// Records TLS sessions that showed only ciphertext, from every end, for longer than
    /// TLS_UNREADABLE_AFTER_NS as unreadable (with their identity and endpoints).
    pub fn tick(&mut self, now_ns: u64, out: &mut Vec<Box<AuditEvent>>) {
        let due: Vec<ConnKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                !s.session.is_unreadable()
                    && s.ciphertext_only_since
                        .is_some_and(|t| now_ns.saturating_sub(t) >= TLS_UNREADABLE_AFTER_NS)
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in due {
            let Some(s) = self.sessions.get_mut(&conn) else {
                continue;
            };
            let mut drafts = Vec::new();
            s.session.mark_unreadable(now_ns as i128, &mut drafts);
            self.counters.tls_unreadable_sessions += 1;
            self.finish_drafts(conn, &mut drafts, out);
        }
        // Statements whose ReadyForQuery is long in coming (a client that sent no Sync)
        // are recorded without their transaction status rather than wait for it.
        let held: Vec<ConnKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.session
                    .held_since()
                    .is_some_and(|t| now_ns as i128 - t >= HOLD_FOR_READY_NS)
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in held {
            let mut drafts = Vec::new();
            if let Some(s) = self.sessions.get_mut(&conn) {
                s.session.release_held(&mut drafts);
            }
            self.finish_drafts(conn, &mut drafts, out);
        }
        self.retry_waiting(out);
    }

    fn emit_gap(
        &mut self,
        conn: ConnKey,
        direction: Direction,
        missing: u64,
        ts: i128,
        out: &mut Vec<Box<AuditEvent>>,
    ) {
        self.counters.gaps += 1;
        self.counters.gap_bytes += missing;
        if let Some(s) = self.sessions.get(&conn) {
            tracing::debug!(parent: &s.span, bytes = missing, ?direction, "bytes lost: gap recorded");
        }
        let from = match direction {
            Direction::ToServer => "from the client",
            Direction::ToClient => "from the server",
        };
        let mut ev = AuditEvent {
            kind: EventKind::Gap,
            gap_bytes: missing,
            statement: if missing == 0 {
                format!(
                    "(bytes {from} were not captured, how many is unknown: the kernel's \
                     table of calls in flight was full)"
                )
            } else {
                format!("({missing} bytes {from} were not captured)")
            }
            .into(),
            ..AuditEvent::default()
        };
        ev.flags.insert(match direction {
            Direction::ToServer => Flag::ToServer,
            Direction::ToClient => Flag::ToClient,
        });
        // Statements answered before the gap come before it (their ReadyForQuery may
        // have been in what was lost: they go without their transaction status).
        let mut drafts = Vec::new();
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.session.release_held(&mut drafts);
        }
        drafts.push(Draft::new(ts, ev));
        self.finish_drafts(conn, &mut drafts, out);
    }

    fn on_close(&mut self, key: EndKey, h: &RecordHeader, out: &mut Vec<Box<AuditEvent>>) {
        let Some(end) = self.ends.remove(&key) else {
            return;
        };
        if end.retired_ns.is_some() {
            // Its session is over; another connection may have the same endpoints by now
            // (Unix socket addresses are reused at once) and is not this end's to end.
            return;
        }
        let conn = end.conn;
        let is_primary = self.sessions.get(&conn).is_some_and(|s| s.primary == key);
        // Either end's close ends a Unix-domain connection (the kernel reports it at that
        // end's end of stream, or when its socket's address comes back for a new one).
        let unix = self.sessions.get(&conn).is_some_and(|s| s.unix);
        if !is_primary && !unix {
            return;
        }
        let ts = h.ts_ns as i128;
        if !is_primary {
            self.close_session(conn, h.ts_ns, out);
            return;
        }
        // The close record carries the kernel's byte totals: anything short of them is lost.
        let stream = self
            .sessions
            .get(&conn)
            .map(|s| s.stream)
            .unwrap_or(STREAM_RAW);
        let (totals, expected) = if stream == STREAM_TLS {
            (h.aux, end.expected[1])
        } else {
            ([h.offset, h.call_len], end.expected[0])
        };
        let awaiting = self
            .sessions
            .get(&conn)
            .is_some_and(|s| s.session.awaiting_plaintext());
        for (i, total) in totals.iter().enumerate() {
            // (Ciphertext nobody could read is not a gap in the conversation.)
            if *total > expected[i] && !awaiting {
                let dir = if i == 0 {
                    Direction::ToServer
                } else {
                    Direction::ToClient
                };
                self.emit_gap(conn, dir, total - expected[i], ts, out);
            } else if h.flags & lost_bit(stream, i as u8) != 0 {
                // Calls the kernel could not follow, after the last record of this
                // stream (see RECORD_LOST_BEFORE): how many bytes is unknown.
                let dir = if i == 0 {
                    Direction::ToServer
                } else {
                    Direction::ToClient
                };
                self.emit_gap(conn, dir, 0, ts, out);
            }
        }
        self.close_session(conn, h.ts_ns, out);
    }

    /// Ends the session of a connection that closed; its other ends may still send (their
    /// close, a last read): kept, retired, until their own close record or the sweep.
    fn close_session(&mut self, conn: ConnKey, ts_ns: u64, out: &mut Vec<Box<AuditEvent>>) {
        let Some(s) = self.sessions.remove(&conn) else {
            return;
        };
        self.end_session(conn, s, ts_ns as i128, false, out);
        for e in self.ends.values_mut() {
            if e.conn == conn && e.retired_ns.is_none() {
                e.retired_ns = Some(ts_ns);
            }
        }
    }

    /// Fills in what a session draft lacks: ids, order, time, endpoints, identity.
    fn finish_drafts(
        &mut self,
        conn: ConnKey,
        drafts: &mut Vec<Draft>,
        out: &mut Vec<Box<AuditEvent>>,
    ) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            drafts.clear();
            return;
        };
        complete_drafts!(self, s, conn, drafts, out);
    }

    /// Records the end of a session: in-flight requests flushed as `no_response`, then
    /// `session_end` with a startup failure if there was one. `close_not_seen`: the
    /// connection's close record was lost (or its 4-tuple came back for a new connection).
    fn end_session(
        &mut self,
        conn: ConnKey,
        mut s: Box<SessionEntry>,
        ts: i128,
        close_not_seen: bool,
        out: &mut Vec<Box<AuditEvent>>,
    ) {
        let mut drafts = std::mem::take(&mut self.drafts);
        if s.session.awaiting_plaintext() && !s.session.is_unreadable() {
            // Ended before any plaintext: never silent.
            s.session.mark_unreadable(ts, &mut drafts);
            self.counters.tls_unreadable_sessions += 1;
        }
        s.session.abandon(ts, &mut drafts);
        let mut ev = AuditEvent {
            kind: EventKind::SessionEnd,
            ..AuditEvent::default()
        };
        if let Some(e) = s.session.startup_error() {
            ev.error_code = e.code.clone();
            ev.error_message = e.message.clone();
        }
        if s.session.is_cancel_request() {
            ev.flags.insert(Flag::CancelRequest);
        }
        if close_not_seen {
            ev.flags.insert(Flag::CloseNotSeen);
        }
        drafts.push(Draft::new(ts, ev));
        finish(
            &mut s,
            conn,
            event_context!(self),
            &mut self.counters,
            &mut drafts,
            out,
        );
        self.drafts = drafts;
        self.counters.sessions_ended += 1;
        let waiting = !s.deferred.is_empty();
        tracing::debug!(
            parent: &s.span,
            events = s.seq,
            close_not_seen,
            parse_errors = s.session.counters().parse_errors,
            "session ended"
        );
        self.counters.parse_errors += s.session.counters().parse_errors;
        self.counters.unmatched_responses += s.session.counters().unmatched_responses;
        if waiting {
            // Its events wait for its pod (see `tick`).
            self.ended_waiting.push((conn, s));
        }
    }

    /// Sessions whose events wait for their pod: recorded once it is known, or when the
    /// wait is over (at once when shutting down).
    fn retry_waiting(&mut self, out: &mut Vec<Box<AuditEvent>>) {
        let waiting: Vec<ConnKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.deferred.is_empty())
            .map(|(c, _)| *c)
            .collect();
        for conn in waiting {
            self.finish_drafts(conn, &mut Vec::new(), out);
        }
        let mut ended = std::mem::take(&mut self.ended_waiting);
        for (conn, s) in ended.iter_mut() {
            finish(
                s,
                *conn,
                event_context!(self),
                &mut self.counters,
                &mut Vec::new(),
                out,
            );
        }
        ended.retain(|(_, s)| !s.deferred.is_empty());
        self.ended_waiting = ended;
    }

    /// Retires sessions idle for longer than `idle_ns` whose connection no longer exists
    /// (their close record was lost, e.g. with the ring buffer full). A connection is
    /// alive while any process on one of its ends still has its 4-tuple in
    /// /proc/PID/net/tcp{,6}, which shows that process's own network namespace.
    pub fn sweep(&mut self, now_ns: u64, idle_ns: u64, out: &mut Vec<Box<AuditEvent>>) {
        self.backend_statements
            .retain(|pid, _| std::path::Path::new(&format!("/proc/{pid}")).exists());
        // Retired ends whose close record never came.
        self.ends.retain(|_, e| {
            e.retired_ns
                .is_none_or(|t| now_ns.saturating_sub(t) <= idle_ns)
        });
        let idle: Vec<ConnKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| now_ns.saturating_sub(s.last_ns) > idle_ns)
            .map(|(c, _)| *c)
            .collect();
        for conn in idle {
            let pids: Vec<u32> = self
                .ends
                .values()
                .filter(|e| e.conn == conn && e.retired_ns.is_none())
                .filter_map(|e| e.identity.as_ref().map(|i| i.pid))
                .collect();
            let unix = self.sessions.get(&conn).is_some_and(|s| s.unix);
            if unix {
                // Both ends are on this host: alive while every process seen on it is.
                if !pids.is_empty() && pids.iter().all(|&pid| process_alive(pid)) {
                    continue;
                }
            } else if pids.iter().any(|&pid| tcp_tuple_alive(pid, &conn)) {
                continue;
            }
            if let Some(s) = self.sessions.remove(&conn) {
                self.ends.retain(|_, e| e.conn != conn);
                self.end_session(conn, s, now_ns as i128, true, out);
            }
        }
    }

    /// Ends every session (daemon shutdown): pending requests are flushed as events.
    /// The time (wall clock, ns) before which everything read has become events: the start
    /// of the oldest statement still waiting for its answer, else now. Were the daemon to
    /// die now, nothing before it would be missing from the events already handed on.
    pub fn complete_until_ns(&self, now_wall_ns: i128) -> i128 {
        self.sessions
            .values()
            .chain(self.ended_waiting.iter().map(|(_, s)| s))
            .filter_map(|s| {
                // Statements waiting for an answer, and events waiting for their pod.
                let held = s.deferred.iter().map(|d| d.ts_ns).min();
                match (s.session.oldest_pending_ns(), held) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
            .map_or(now_wall_ns, |t| (t + self.wall_offset_ns).min(now_wall_ns))
    }

    pub fn shutdown(&mut self, out: &mut Vec<Box<AuditEvent>>) {
        self.flushing = true;
        self.retry_waiting(out);
        let conns: Vec<ConnKey> = self.sessions.keys().copied().collect();
        let now = -self.wall_offset_ns
            + std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0);
        for conn in conns {
            let Some(s) = self.sessions.get_mut(&conn) else {
                continue;
            };
            let mut drafts = Vec::new();
            s.session.abandon(now, &mut drafts);
            self.finish_drafts(conn, &mut drafts, out);
        }
    }
}

/// What every event of this host shares.
struct EventContext<'t> {
    workloads: &'t WorkloadResolver,
    host: &'t Text,
    /// Wall clock minus monotonic clock.
    wall_offset: i128,
    policies: &'t PolicySet,
    policy_generation: u64,
    /// The daemon's recording defaults (how drafts are rendered).
    recording: &'t RecordingPolicy,
    pod_wait: std::time::Duration,
    /// Whether drafts may wait for a pending workload (not when the session ends).
    may_defer: bool,
}

/// Completes a session's drafts into events (`finish`), first giving executions of
/// statements prepared before capture the text their backend reported, if it did.
#[allow(clippy::too_many_arguments)]
fn complete_drafts(
    s: &mut SessionEntry,
    conn: ConnKey,
    backend_statements: &HashMap<u32, HashMap<String, Arc<str>>>,
    analyzer: &mut Analyzer,
    raw_statements: bool,
    ctx: EventContext<'_>,
    counters: &mut TrackerCounters,
    drafts: &mut Vec<Draft>,
    out: &mut Vec<Box<AuditEvent>>,
) {
    if drafts.is_empty() && s.deferred.is_empty() {
        return;
    }
    // Executions of statements prepared before capture whose backend already named their
    // text (before this session was seen, or before it learnt the name).
    let known = match &s.server {
        Some(i) if !backend_statements.is_empty() => backend_statements.get(&i.pid),
        _ => None,
    };
    if let Some(known) = known {
        for d in drafts.iter_mut() {
            let ev = &mut d.event;
            if !ev.flags.contains(Flag::PreparedBeforeCapture) {
                continue;
            }
            let Some(sql) = known.get(&*ev.prepared_name) else {
                continue;
            };
            s.session.learn_prepared(&ev.prepared_name, sql, analyzer);
            let analysis = analyzer.analyze(sql);
            apply_text(ev, sql, &analysis, raw_statements);
            ev.flags.remove(Flag::PreparedBeforeCapture);
            ev.flags.insert(Flag::TextFromServer);
            d.source.sql = Some(sql.clone());
            d.source.analysis = Some(analysis);
        }
    }
    finish(s, conn, ctx, counters, drafts, out);
}

fn finish(
    s: &mut SessionEntry,
    conn: ConnKey,
    ctx: EventContext<'_>,
    counters: &mut TrackerCounters,
    drafts: &mut Vec<Draft>,
    out: &mut Vec<Box<AuditEvent>>,
) {
    let EventContext {
        workloads,
        host,
        wall_offset,
        policies,
        policy_generation,
        recording,
        pod_wait,
        may_defer,
    } = ctx;
    if !s.deferred.is_empty() {
        let held = std::mem::take(&mut s.deferred);
        drafts.splice(0..0, held);
    }
    if drafts.is_empty() {
        return;
    }
    // The workload first: a process in a pod the watch has not shown yet waits for it
    // (bounded), rather than be recorded without its labels or with another pod's.
    let mut pod_unknown = false;
    if let Some(id) = s.client.as_ref().or(s.server.as_ref()) {
        if s.workload_of != (id.pid, id.cgroup_id) || s.workload.pending {
            s.workload = workloads.workload(id);
            s.workload_of = (id.pid, id.cgroup_id);
        }
        if s.workload.pending {
            let since = *s.pending_since.get_or_insert_with(|| {
                counters.pod_waits += 1;
                std::time::Instant::now()
            });
            if may_defer && since.elapsed() < pod_wait {
                s.deferred.append(drafts);
                return;
            }
            if s.pending_since.take().is_some() {
                counters.pod_unknown += 1;
                tracing::warn!(parent: &s.span, pod_uid = %id.pod_uid,
                    "the pod of this session is not known to the API server watch: recorded without its metadata");
            }
            pod_unknown = true;
        } else {
            s.pending_since = None;
        }
    }
    // Statements of a session joined mid-stream still get a session_start first.
    if !drafts
        .iter()
        .any(|d| d.event.kind == EventKind::SessionStart)
        && s.seq == 0
    {
        let mut pre = Vec::new();
        s.session.ensure_started(drafts[0].ts_ns, &mut pre);
        for d in pre.into_iter().rev() {
            drafts.insert(0, d);
        }
    }
    recover_meta(s, conn, workloads);
    // Completed where they are and moved once (an event is about 1 KB).
    for d in drafts.iter_mut() {
        let Draft {
            ts_ns,
            event: ev,
            source,
        } = d;
        let ts_ns = *ts_ns;
        if s.meta_from_title {
            ev.flags.insert(Flag::MetaFromProcessTitle);
        }
        ev.event_id = event_id_at(ts_ns + wall_offset);
        ev.ts = Timestamp::from_unix_ns(ts_ns + wall_offset);
        ev.host = host.clone();
        ev.session_id = s.id.clone();
        s.seq += 1;
        ev.seq = s.seq;
        ev.db_user = s.session.meta().db_user.clone();
        ev.database = s.session.meta().database.clone();
        ev.application_name = s.session.meta().application_name.clone();
        ev.tls = s.session.meta().tls;
        ev.client_addr = s.client_addr.clone();
        ev.client_port = conn.client_port;
        ev.server_addr = s.server_addr.clone();
        ev.server_port = conn.server_port;
        ev.capture = Text::Static(if s.proxied {
            "proxy"
        } else if s.stream == STREAM_TLS {
            "ebpf_tls"
        } else {
            "ebpf"
        });
        // The local process on the client end, or the backend when the client is remote.
        let who = s.client.as_ref().or(s.server.as_ref());
        if who.is_some() {
            ev.apply_identity(&s.workload.process);
            ev.workload = s.workload.name.clone();
            ev.labels = s.workload.labels.clone();
            if pod_unknown {
                ev.flags.insert(Flag::PodUnknown);
            }
            if s.workload.process.gone {
                ev.flags.insert(Flag::ProcessGone);
            }
        }
        if let Some(n) = &source.note {
            if n.state != crate::approvals::State::Pending {
                if s.notes.len() >= MAX_NOTES {
                    s.notes.remove(0);
                }
                s.notes.push((**n).clone());
            }
        }
        // The server end's process, or (when only the client end is seen, as through the
        // proxy) the backend that BackendKeyData named.
        ev.server_pid = s
            .server
            .as_ref()
            .map(|i| i.pid)
            .unwrap_or(s.session.meta().backend_pid);
        apply_policy(
            s,
            ev,
            source,
            policies,
            policy_generation,
            recording,
            counters,
        );
        match ev.kind {
            EventKind::Statement => counters.statements += 1,
            EventKind::SessionStart => counters.sessions_started += 1,
            _ => {}
        }
    }
    out.extend(drafts.drain(..).map(|d| d.event));
}

/// The session's policies (resolved again when the set, the workload or the database
/// user changed) on an event: their name, how the statement is recorded, and what their
/// rules decide.
fn apply_policy(
    s: &mut SessionEntry,
    ev: &mut AuditEvent,
    source: &crate::audit::recorder::Source,
    policies: &PolicySet,
    generation: u64,
    recording: &RecordingPolicy,
    counters: &mut TrackerCounters,
) {
    // Compared in place: the key is taken (and its user's text shared) only on a change.
    let current = s.applied_for.0 == generation
        && s.applied_for.1 == s.workload_of
        && crate::audit::schema::same_str(&s.applied_for.2, &ev.db_user);
    if s.applied.is_none() || !current {
        let empty = std::collections::BTreeMap::new();
        let subject = Subject {
            labels: if s.workload_of == (0, 0) {
                &empty
            } else {
                &s.workload.labels
            },
            db_user: &ev.db_user,
            database: &ev.database,
            application_name: &ev.application_name,
            client_addr: s.client_addr.parse().ok(),
            server_addr: s.server_addr.parse().ok(),
            server_port: ev.server_port,
        };
        let applied = policies.resolve(
            &subject,
            Defaults {
                raw_statements: recording.raw_statements,
                raw_params: recording.raw_params,
            },
        );
        tracing::debug!(parent: &s.span, policy = %applied.name, version = %applied.version,
            mode = applied.mode.as_str(), "policies resolved");
        s.applied = Some(Arc::new(applied));
        s.applied_for = (generation, s.workload_of, ev.db_user.clone());
    }
    // Lent for the judgement (a clone would be a shared count touched per event).
    let Some(applied) = s.applied.take() else {
        return;
    };
    judge_event(s, ev, source, &applied, recording, counters);
    s.applied = Some(applied);
}

/// What the session's policies (`applied`) make of an event.
fn judge_event(
    s: &mut SessionEntry,
    ev: &mut AuditEvent,
    source: &crate::audit::recorder::Source,
    applied: &crate::policy::Applied,
    recording: &RecordingPolicy,
    counters: &mut TrackerCounters,
) {
    ev.policy = applied.name.clone();
    ev.policy_version = applied.version.clone();
    let requested = ev.kind == EventKind::ApprovalRequested;
    if ev.kind != EventKind::Statement && !requested {
        return;
    }
    if applied.raw_statements != recording.raw_statements
        || applied.raw_params != recording.raw_params
    {
        render(
            ev,
            source,
            recording,
            applied.raw_statements,
            applied.raw_params,
        );
    }
    if requested {
        return;
    }
    if s.proxied && (!s.notes.is_empty() || s.multi_note.is_some()) {
        if let Some(n) = approval_of(s, source) {
            // Held for approval: how the hold ended, and by whom.
            counters.decisions += 1;
            ev.decision = Text::Static(n.state.as_str());
            ev.decision_rule = format!("{}/{}", n.policy, n.rule).into();
            ev.approval_id = n.request.into();
            if let Some(by) = n.by {
                ev.approver = by.into();
            }
            return;
        }
    }
    if s.proxied && ev.error_code.as_str() == crate::proxy::relay::BLOCKED_SQLSTATE {
        if let Some((policy, rule)) = crate::proxy::relay::parse_refusal(&ev.error_message) {
            // The proxy refused it: its decision, as it told the client. A simple query
            // of several statements is refused whole: the event shows the whole string.
            counters.decisions += 1;
            ev.decision = Text::Static("blocked");
            ev.decision_rule = format!("{policy}/{rule}").into();
            if let Some(whole) = &source.whole {
                let whole_source = crate::audit::recorder::Source {
                    analysis: Some(crate::sql::Analyzer::new(1).analyze(whole)),
                    sql: Some(whole.clone()),
                    ..Default::default()
                };
                render(
                    ev,
                    &whole_source,
                    recording,
                    applied.raw_statements,
                    applied.raw_params,
                );
            }
            return;
        }
    }
    if !s.proxied && applied.mode == policy::Mode::Enforce {
        ev.flags.insert(Flag::NotEnforced);
    }
    if !applied.judges {
        return;
    }
    let call_facts;
    let (sql, facts): (&str, Option<&policy::Facts>) = if source.function_call {
        call_facts = policy::Facts::function_call();
        (&ev.statement, Some(&call_facts))
    } else {
        match (&source.sql, &source.analysis) {
            (Some(sql), Some(a)) => (sql, a.facts(sql)),
            // Its text was not captured: nothing to judge.
            _ => return,
        }
    };
    let decision = applied.judge(&policy::Statement {
        sql,
        facts,
        multi: source.multi,
    });
    if let Some(d) = decision {
        counters.decisions += 1;
        // The proxy enforces what an enforce policy decides in the sessions it relays:
        // it masks (what it cannot mask, and holds, it refuses: the refusal's error
        // above names the rule then).
        ev.decision = Text::Static(match (s.proxied && d.enforce, d.action) {
            (true, policy::Action::Mask) => "masked",
            // A held statement's event names how its hold ended (above, from the proxy's
            // notes); without one, only that it was held.
            (true, policy::Action::Hold) => "held",
            (true, _) => "blocked",
            (false, a) => a.would(),
        });
        ev.decision_rule = format!("{}/{}", d.policy, d.rule).into();
        // The proxy's own count names the columns it masked; else the rule's columns.
        if !d.columns.is_empty() && ev.masked_values.is_empty() {
            ev.masked_columns = d.columns.into();
        }
    }
}

/// The end of the approval request a statement ran (or was refused) under: the oldest
/// whose binding is the statement's; the statements after the first of a simple query
/// share its request.
fn approval_of(
    s: &mut SessionEntry,
    source: &crate::audit::recorder::Source,
) -> Option<crate::approvals::Note> {
    if let (Some(w), Some((held, note))) = (&source.whole, &s.multi_note) {
        if Arc::ptr_eq(w, held) {
            return Some(note.clone());
        }
    }
    s.multi_note = None;
    let binding = match (&source.whole, &source.sql, &source.params) {
        (Some(whole), _, _) => crate::approvals::binding(whole, None),
        (None, Some(sql), Some(p)) => {
            crate::approvals::binding(sql, Some((p.formats().0, p.values().raw())))
        }
        (None, Some(sql), None) => crate::approvals::binding(sql, None),
        (None, None, _) => return None,
    };
    let i = s.notes.iter().position(|n| n.binding == binding)?;
    let note = s.notes.remove(i);
    if let Some(w) = &source.whole {
        s.multi_note = Some((w.clone(), note.clone()));
    }
    Some(note)
}

/// A session older than the daemon never showed its startup packet: when its server end
/// is a backend on this host, its process title names the database user and database
/// (once per session; the events say where they came from).
fn recover_meta(s: &mut SessionEntry, conn: ConnKey, workloads: &WorkloadResolver) {
    if s.title_tried || s.session.conversation().startup_seen() {
        return;
    }
    let Some(server) = &s.server else {
        return;
    };
    s.title_tried = true;
    let port = (!s.unix).then_some(conn.client_port);
    let Some(title) = workloads.backend_title(server.pid) else {
        return;
    };
    tracing::debug!(parent: &s.span, pid = server.pid, %title, "backend's process title");
    if let Some((user, db)) = crate::workload::process::parse_backend_title(&title, port) {
        s.session.recover_meta(user.into(), db.into());
        s.meta_from_title = true;
    }
}

fn carried_process(p: &ProcessIdentity) -> crate::continuity::CarriedProcess {
    crate::continuity::CarriedProcess {
        pid: p.pid,
        comm: p.comm.to_string(),
        uid: p.uid,
        cgroup_id: p.cgroup_id,
    }
}

/// Parses an address of /proc/net/tcp{,6}: hex words in host byte order.
fn proc_net_addr(hex_addr: &str) -> Option<([u8; 16], u16)> {
    let (addr, port) = hex_addr.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let out = match bytes.len() {
        4 => auditor_common::v4_mapped([bytes[0], bytes[1], bytes[2], bytes[3]]),
        16 => bytes.try_into().ok()?,
        _ => return None,
    };
    Some((out, port))
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` still sees a TCP socket with the connection's endpoints (either way round).
fn tcp_tuple_alive(pid: u32, conn: &ConnKey) -> bool {
    const TCP_CLOSE: &str = "07";
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(_), Some(local), Some(remote), Some(state)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            if state == TCP_CLOSE {
                continue;
            }
            let (Some(l), Some(r)) = (proc_net_addr(local), proc_net_addr(remote)) else {
                continue;
            };
            let client = (conn.client_addr, conn.client_port);
            let server = (conn.server_addr, conn.server_port);
            if (l == client && r == server) || (l == server && r == client) {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use auditor_common::{DIR_TO_SERVER, ROLE_SERVER, SEEN_ACCEPT, SEEN_CONNECT};

    fn tracker() -> Tracker {
        Tracker::new(TrackerConfig {
            pod_wait: std::time::Duration::from_secs(5),
            host: "test".into(),
            policy: RecordingPolicy::default(),
            limits: TokenizerLimits::default(),
        })
    }

    /// A connection 127.0.0.1:40000 -> 127.0.0.1:5432 seen from one end.
    struct Wire {
        sock: u64,
        role: u8,
        offsets: [[u64; 2]; 2],
        ts: u64,
        start: u64,
        pid: u32,
        /// Some(peer sock): a Unix-domain connection to port 5432's socket file.
        unix_peer: Option<u64>,
        /// The network namespace the kernel side reports for the loopback connection.
        netns: u32,
        /// Flags of the next data or close record (taken by it).
        flags: u8,
    }

    impl Wire {
        fn new(sock: u64, role: u8) -> Self {
            Wire {
                sock,
                role,
                offsets: [[0; 2]; 2],
                // Now: the process seen (this test's) started before it.
                ts: monotonic_ns(),
                start: 7,
                pid: std::process::id(),
                unix_peer: None,
                netns: 0,
                flags: 0,
            }
        }

        fn unix(sock: u64, peer: u64, role: u8, start: u64, pid: u32, ts: u64) -> Self {
            Wire {
                start,
                pid,
                unix_peer: Some(peer),
                ts,
                ..Wire::new(sock, role)
            }
        }

        fn header(&mut self, kind: u32) -> RecordHeader {
            let lo = auditor_common::v4_mapped([127, 0, 0, 1]);
            let (lp, rp) = if self.role == ROLE_CLIENT {
                (40000, 5432)
            } else {
                (5432, 40000)
            };
            self.ts += 1_000;
            let mut tuple = Tuple {
                local_addr: lo,
                remote_addr: lo,
                local_port: lp,
                remote_port: rp,
                family: 2,
                netns: self.netns,
                ..Tuple::default()
            };
            if let Some(peer) = self.unix_peer {
                tuple = Tuple {
                    family: AF_UNIX,
                    local_port: if self.role == ROLE_CLIENT { 0 } else { 5432 },
                    remote_port: if self.role == ROLE_CLIENT { 5432 } else { 0 },
                    ..Tuple::default()
                };
                tuple.local_addr[..8].copy_from_slice(&self.sock.to_le_bytes());
                tuple.remote_addr[..8].copy_from_slice(&peer.to_le_bytes());
            }
            RecordHeader {
                kind,
                sock: self.sock,
                conn_start_ns: self.start,
                ts_ns: self.ts,
                pid_tgid: (self.pid as u64) << 32,
                role: self.role,
                seen: if self.role == ROLE_CLIENT {
                    SEEN_CONNECT
                } else {
                    SEEN_ACCEPT
                },
                tuple,
                ..RecordHeader::default()
            }
        }

        fn data(
            &mut self,
            t: &mut Tracker,
            stream: u8,
            dir: u8,
            bytes: &[u8],
        ) -> Vec<Box<AuditEvent>> {
            let mut out = Vec::new();
            self.data_into(t, stream, dir, bytes, &mut out);
            out
        }

        /// As `data`, the events appended to `out`.
        fn data_into(
            &mut self,
            t: &mut Tracker,
            stream: u8,
            dir: u8,
            bytes: &[u8],
            out: &mut Vec<Box<AuditEvent>>,
        ) {
            let mut h = self.header(RECORD_DATA);
            h.stream = stream;
            h.direction = dir;
            h.flags = std::mem::take(&mut self.flags);
            h.len = bytes.len() as u32;
            h.offset = self.offsets[stream as usize][dir as usize];
            self.offsets[stream as usize][dir as usize] += bytes.len() as u64;
            t.handle(
                &Record {
                    header: h,
                    data: bytes,
                },
                out,
            );
        }

        fn close(&mut self, t: &mut Tracker) -> Vec<Box<AuditEvent>> {
            let mut h = self.header(RECORD_CLOSE);
            h.offset = self.offsets[0][0];
            h.call_len = self.offsets[0][1];
            h.aux = self.offsets[1];
            h.flags = std::mem::take(&mut self.flags);
            let mut out = Vec::new();
            t.handle(
                &Record {
                    header: h,
                    data: &[],
                },
                &mut out,
            );
            out
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup() -> Vec<u8> {
        let body = b"\0\x03\0\0user\0alice\0database\0shop\0\0";
        let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    /// The startup message and the server's AuthenticationOk and ReadyForQuery, in the
    /// clear.
    fn log_in(t: &mut Tracker, w: &mut Wire) -> Vec<Box<AuditEvent>> {
        let mut out = w.data(t, STREAM_RAW, DIR_TO_SERVER, &startup());
        let mut resp = msg(b'R', &0u32.to_be_bytes());
        resp.extend(msg(b'Z', b"I"));
        out.extend(w.data(t, STREAM_RAW, DIR_TO_CLIENT, &resp));
        out
    }

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    /// SSLRequest and 'S' in the clear, then the handshake's ciphertext from `unhooked`.
    fn negotiate(t: &mut Tracker, primary: &mut Wire, unhooked: &mut [&mut Wire]) {
        primary.data(t, STREAM_RAW, DIR_TO_SERVER, &SSL_REQUEST);
        primary.data(t, STREAM_RAW, DIR_TO_CLIENT, b"S");
        for w in unhooked.iter_mut() {
            w.data(t, STREAM_RAW, DIR_TO_SERVER, b"\x16\x03\x01\x00\x05hello");
        }
    }

    fn converse(t: &mut Tracker, w: &mut Wire) -> Vec<Box<AuditEvent>> {
        let mut out = w.data(t, STREAM_TLS, DIR_TO_SERVER, &startup());
        let mut resp = msg(b'R', &0u32.to_be_bytes());
        resp.extend(msg(b'Z', b"I"));
        out.extend(w.data(t, STREAM_TLS, DIR_TO_CLIENT, &resp));
        out.extend(query(t, w, STREAM_TLS, "select 1"));
        out
    }

    /// A simple query on `stream` (its record takes the Wire's flags) and the server's
    /// CommandComplete and ReadyForQuery.
    fn query(t: &mut Tracker, w: &mut Wire, stream: u8, sql: &str) -> Vec<Box<AuditEvent>> {
        let mut text = sql.as_bytes().to_vec();
        text.push(0);
        let mut out = w.data(t, stream, DIR_TO_SERVER, &msg(b'Q', &text));
        let mut resp = msg(b'C', b"SELECT 1\0");
        resp.extend(msg(b'Z', b"I"));
        out.extend(w.data(t, stream, DIR_TO_CLIENT, &resp));
        out
    }

    #[test]
    fn calls_lost_uncounted_are_a_gap_of_unknown_size() {
        // The kernel could not follow calls (its table of calls in flight was full): the
        // next record says so, its offset follows on from the last one.
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        let mut out = log_in(&mut t, &mut client);
        client.flags = RECORD_LOST_BEFORE;
        out.extend(query(&mut t, &mut client, STREAM_RAW, "select 2"));
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["session_start", "gap", "statement"], "{out:#?}");
        assert_eq!(out[1].gap_bytes, 0);
        assert!(out[1].statement.contains("how many is unknown"), "{out:#?}");
        // What follows the loss is read from the next message boundary on.
        assert!(out[2].flags.contains(Flag::GapBefore), "{out:#?}");
        assert_eq!(t.counters.gaps, 1);
        // Later chunks of the same call, and later calls, are no gap.
        let out = client.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &msg(b'Q', b"select 3\0"));
        assert!(out.iter().all(|e| e.kind != EventKind::Gap), "{out:#?}");
        // Calls lost after the last record: the close record says so.
        client.flags = lost_bit(STREAM_RAW, DIR_TO_CLIENT);
        let out = client.close(&mut t);
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["gap", "statement", "session_end"], "{out:#?}");
        assert_eq!(out[0].gap_bytes, 0);
        assert!(out[0].statement.contains("from the server"), "{out:#?}");
    }

    #[test]
    fn statements_waiting_for_their_ready_for_query_keep_their_place() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        let mut out = log_in(&mut t, &mut client);
        // Answered, its ReadyForQuery not come yet: the event waits for it...
        out.extend(client.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &msg(b'Q', b"BEGIN\0")));
        out.extend(client.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &msg(b'C', b"BEGIN\0")));
        assert!(
            out.iter().all(|e| e.kind != EventKind::Statement),
            "{out:#?}"
        );
        // ...and takes the status it reports.
        out.extend(client.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &msg(b'Z', b"T")));
        let st: Vec<&AuditEvent> = out
            .iter()
            .map(|e| &**e)
            .filter(|e| e.kind == EventKind::Statement)
            .collect();
        assert_eq!(st.len(), 1);
        assert_eq!(&*st[0].tx_status, "in_transaction");
        let mut seq = st[0].seq;
        // Answered, no ReadyForQuery yet: recorded without a status after a second.
        client.data(
            &mut t,
            STREAM_RAW,
            DIR_TO_SERVER,
            &msg(b'Q', b"select a from b\0"),
        );
        let out = client.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &msg(b'C', b"SELECT 0\0"));
        assert!(out.is_empty(), "{out:#?}");
        let mut late = Vec::new();
        t.tick(client.ts + 999_999_999, &mut late);
        assert!(late.is_empty(), "{late:#?}");
        t.tick(client.ts + 1_000_000_000, &mut late);
        assert_eq!(late.len(), 1, "{late:#?}");
        assert_eq!(&*late[0].statement, "select a from b");
        assert_eq!(&*late[0].tx_status, "");
        seq += 1;
        assert_eq!(late[0].seq, seq);
        // Its ReadyForQuery, late: nothing more.
        let out = client.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &msg(b'Z', b"T"));
        assert!(out.is_empty(), "{out:#?}");
        // Answered, then bytes from the client lost: the statement comes before the gap,
        // without a status.
        client.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &msg(b'Q', b"select 1\0"));
        let out = client.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &msg(b'C', b"SELECT 1\0"));
        assert!(out.is_empty(), "{out:#?}");
        client.offsets[STREAM_RAW as usize][DIR_TO_SERVER as usize] += 20;
        let out = client.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &msg(b'Q', b"select 2\0"));
        let kinds: Vec<(&str, &str, u64)> = out
            .iter()
            .map(|e| (e.kind.as_str(), &*e.tx_status, e.seq))
            .collect();
        assert_eq!(
            kinds,
            [("statement", "", seq + 1), ("gap", "", seq + 2)],
            "{out:#?}"
        );
        assert_eq!(out[0].rows, Some(1));
    }

    #[test]
    fn tls_calls_lost_uncounted_are_a_gap_of_unknown_size() {
        // The kernel's table of TLS library calls in flight was full: the plaintext
        // record after the lost call says so.
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        negotiate(&mut t, &mut client, &mut []);
        let mut out = converse(&mut t, &mut client);
        client.flags = RECORD_LOST_BEFORE;
        out.extend(query(&mut t, &mut client, STREAM_TLS, "select 2"));
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["session_start", "statement", "gap", "statement"],
            "{out:#?}"
        );
        assert_eq!(out[2].gap_bytes, 0);
        assert!(out[3].flags.contains(Flag::GapBefore), "{out:#?}");
        // Ciphertext calls lost are no gap in the plaintext (the ciphertext of a TLS
        // connection is not followed); plaintext calls lost after the last record are.
        client.flags = lost_bit(STREAM_RAW, DIR_TO_SERVER) | lost_bit(STREAM_TLS, DIR_TO_CLIENT);
        let out = client.close(&mut t);
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["gap", "session_end"], "{out:#?}");
        assert!(out[0].statement.contains("from the server"), "{out:#?}");
        assert_eq!(t.counters.gaps, 2);
    }

    #[test]
    fn tls_plaintext_from_the_client_end() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        let mut server = Wire::new(2, ROLE_SERVER);
        negotiate(&mut t, &mut client, &mut [&mut server]);
        let mut out = converse(&mut t, &mut client);
        out.extend(client.close(&mut t));
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["session_start", "statement", "session_end"],
            "{out:#?}"
        );
        assert!(out.iter().all(|e| e.tls && &*e.capture == "ebpf_tls"));
        assert!(out[0].flags.is_empty());
        assert_eq!(&*out[1].db_user, "alice");
        assert_eq!(t.counters.gaps, 0);
    }

    #[test]
    fn tls_plaintext_from_the_server_end_takes_over() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        let mut server = Wire::new(2, ROLE_SERVER);
        // The client end is seen first (the primary) but its library is not hooked.
        client.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &SSL_REQUEST);
        server.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &SSL_REQUEST);
        server.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, b"S");
        client.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, b"S");
        client.data(
            &mut t,
            STREAM_RAW,
            DIR_TO_SERVER,
            b"\x16\x03\x01\x00\x05hello",
        );
        // The server end was not muted while the session was undecided.
        assert!(t.drain_mutes().next().is_none());
        let out = converse(&mut t, &mut server);
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["session_start", "statement"], "{out:#?}");
        // The client end is muted now: its ciphertext is not needed.
        let muted: Vec<EndKey> = t.drain_mutes().collect();
        assert_eq!(muted.len(), 1);
        assert_eq!(muted[0].sock, 1);
        let mut out = Vec::new();
        t.tick(u64::MAX, &mut out);
        assert!(out.is_empty(), "not unreadable: {out:#?}");
    }

    #[test]
    fn tls_without_plaintext_is_recorded_unreadable() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        negotiate(&mut t, &mut client, &mut []);
        let mut out = client.data(
            &mut t,
            STREAM_RAW,
            DIR_TO_SERVER,
            b"\x17\x03\x03\x00\x05xxxxx",
        );
        assert!(out.is_empty());
        t.tick(client.ts + TLS_UNREADABLE_AFTER_NS - 1, &mut out);
        assert!(out.is_empty(), "too early: {out:#?}");
        t.tick(client.ts + TLS_UNREADABLE_AFTER_NS, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, EventKind::SessionStart);
        assert!(out[0].tls);
        assert_eq!(out[0].flags, ["tls_unreadable"]);
        assert_eq!(out[0].pid, std::process::id());
        // Once, even at the end.
        let end = client.close(&mut t);
        let kinds: Vec<&str> = end.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["session_end"]);
        assert_eq!(t.counters.gaps, 0, "ciphertext is not a gap");
    }

    #[test]
    fn the_other_end_after_the_close_is_not_a_new_session() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        let mut server = Wire::new(2, ROLE_SERVER);
        negotiate(&mut t, &mut client, &mut [&mut server]);
        client.data(&mut t, STREAM_RAW, DIR_TO_SERVER, b"\x17\x03\x03\x00\x01x");
        let out = client.close(&mut t);
        assert_eq!(out.last().unwrap().kind, EventKind::SessionEnd);
        // The server end still reads the last ciphertext, then closes.
        let mut late = server.data(&mut t, STREAM_RAW, DIR_TO_SERVER, b"\x17\x03\x03\x00\x01x");
        late.extend(server.close(&mut t));
        assert!(late.is_empty(), "{late:#?}");
        assert_eq!(t.active_sessions(), 0);
        assert!(t.ends.is_empty());
    }

    /// One Unix-domain conversation: startup, one query answered, Terminate.
    fn unix_conversation(
        t: &mut Tracker,
        client: &mut Wire,
        server: &mut Wire,
    ) -> Vec<Box<AuditEvent>> {
        let mut out = Vec::new();
        for w in [&mut *client, &mut *server] {
            out.extend(w.data(t, STREAM_RAW, DIR_TO_SERVER, &startup()));
        }
        let ready = msg(b'Z', b"I");
        for w in [&mut *client, &mut *server] {
            out.extend(w.data(t, STREAM_RAW, DIR_TO_CLIENT, &ready));
        }
        let mut q = msg(b'Q', b"SELECT 1\0");
        q.extend(msg(b'X', b""));
        let mut answer = msg(b'C', b"SELECT 1\0");
        answer.extend(msg(b'Z', b"I"));
        out.extend(client.data(t, STREAM_RAW, DIR_TO_SERVER, &q));
        out.extend(client.data(t, STREAM_RAW, DIR_TO_CLIENT, &answer));
        out
    }

    #[test]
    fn unix_socket_addresses_reused_make_a_new_session_with_its_own_client() {
        let mut t = tracker();
        // First connection: client socket 1 (pid 100), server socket 2 (backend 101).
        let mut c1 = Wire::unix(1, 2, ROLE_CLIENT, 10, 100, 1_000);
        let mut s1 = Wire::unix(2, 1, ROLE_SERVER, 11, 101, 1_500);
        let first = unix_conversation(&mut t, &mut c1, &mut s1);
        let kinds: Vec<&str> = first.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["session_start", "statement", "session_end"]);
        assert!(first
            .iter()
            .all(|e| e.pid == 100 && &*e.client_addr == "unix"));
        assert_eq!(first[1].server_port, 5432);
        // The same two socket addresses for the next connection (pid 200, backend 201).
        // The kernel reports the stale server end's close when the new one shows up.
        let mut c2 = Wire::unix(1, 2, ROLE_CLIENT, 20, 200, 100_000);
        let mut s2 = Wire::unix(2, 1, ROLE_SERVER, 21, 201, 100_500);
        let mut second = c2.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &startup());
        second.extend(s1.close(&mut t));
        second.extend(s2.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &startup()));
        let ready = msg(b'Z', b"I");
        second.extend(c2.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &ready));
        let mut q = msg(b'Q', b"SELECT 2\0");
        q.extend(msg(b'X', b""));
        let mut answer = msg(b'C', b"SELECT 1\0");
        answer.extend(msg(b'Z', b"I"));
        second.extend(c2.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &q));
        second.extend(c2.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &answer));
        let kinds: Vec<&str> = second.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["session_start", "statement", "session_end"],
            "{second:#?}"
        );
        assert!(second.iter().all(|e| e.pid == 200), "{second:#?}");
        assert_ne!(first[0].session_id, second[0].session_id);
        assert_eq!(second[2].server_pid, 201);
    }

    #[test]
    fn twin_loopback_connections_in_two_network_namespaces_stay_apart() {
        // Two pods, each with its own Postgres on 127.0.0.1:5432 and a client that got
        // the same ephemeral port: the same addresses and ports, different namespaces.
        let mut t = tracker();
        let wire = |sock, role, pid, netns| Wire {
            pid,
            netns,
            start: sock,
            ..Wire::new(sock, role)
        };
        let mut c1 = wire(1, ROLE_CLIENT, 100, 4026532001);
        let mut s1 = wire(2, ROLE_SERVER, 101, 4026532001);
        let mut c2 = wire(3, ROLE_CLIENT, 200, 4026532002);
        let mut s2 = wire(4, ROLE_SERVER, 201, 4026532002);
        let mut out = Vec::new();
        // Interleaved: both start up, then each runs its statement while the other's
        // server end is busy too.
        for w in [&mut c1, &mut c2, &mut s1, &mut s2] {
            out.extend(w.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &startup()));
        }
        let ready = msg(b'Z', b"I");
        for w in [&mut s2, &mut c1, &mut s1, &mut c2] {
            out.extend(w.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &ready));
        }
        let mut answer = msg(b'C', b"SELECT 1\0");
        answer.extend(msg(b'Z', b"I"));
        for (w, q) in [(&mut c1, b"SELECT 'one'\0"), (&mut c2, b"SELECT 'two'\0")] {
            out.extend(w.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &msg(b'Q', q)));
        }
        for w in [&mut s1, &mut s2] {
            out.extend(w.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &msg(b'Q', b"x\0")));
        }
        for w in [&mut c2, &mut c1] {
            out.extend(w.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &answer));
        }
        for w in [&mut s1, &mut s2] {
            out.extend(w.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &answer));
        }
        for w in [&mut c1, &mut s1, &mut s2, &mut c2] {
            out.extend(w.close(&mut t));
        }
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "session_start").count(),
            2,
            "{out:#?}"
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == "session_end").count(),
            2,
            "{out:#?}"
        );
        let statements: Vec<&AuditEvent> = out
            .iter()
            .map(|e| &**e)
            .filter(|e| e.kind == EventKind::Statement)
            .collect();
        assert_eq!(statements.len(), 2, "{out:#?}");
        for e in &out {
            // (Made-up pids: no such processes, said so.)
            assert_eq!(
                e.flags,
                crate::audit::event::Flags::of(&[Flag::ProcessGone]),
                "{e:#?}"
            );
            let mine = if e.pid == 100 { 101 } else { 201 };
            assert!(e.pid == 100 || e.pid == 200, "{e:#?}");
            if e.kind == EventKind::Statement {
                assert_eq!(e.server_pid, mine, "{e:#?}");
                let want = if e.pid == 100 { "'one'" } else { "'two'" };
                assert!(
                    e.statement.contains(want) || e.statement.contains("$1"),
                    "{e:#?}"
                );
            }
        }
        assert_ne!(statements[0].session_id, statements[1].session_id);
        assert_eq!(t.active_sessions(), 0);
    }

    #[test]
    fn unix_session_ends_at_either_ends_end_of_stream() {
        let mut t = tracker();
        let mut c = Wire::unix(1, 2, ROLE_CLIENT, 10, 100, 1_000);
        let mut s = Wire::unix(2, 1, ROLE_SERVER, 11, 101, 1_500);
        let mut out = c.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &startup());
        out.extend(s.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &startup()));
        out.extend(c.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &msg(b'Q', b"SELECT 1\0")));
        // The client dies; the (muted) backend reads the end of the stream.
        out.extend(s.close(&mut t));
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["session_start", "statement", "session_end"],
            "{out:#?}"
        );
        assert_eq!(t.active_sessions(), 0);
    }

    #[test]
    fn tls_closed_before_any_plaintext_is_unreadable() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        negotiate(&mut t, &mut client, &mut []);
        let out = client.close(&mut t);
        let kinds: Vec<&str> = out.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["session_start", "session_end"]);
        assert_eq!(out[0].flags, ["tls_unreadable"]);
    }

    #[test]
    fn proc_net_addresses() {
        // 127.0.0.1:5432 as x86 /proc/net/tcp prints it.
        let (a, p) = proc_net_addr("0100007F:1538").unwrap();
        assert_eq!(addr_string(&a), "127.0.0.1");
        assert_eq!(p, 5432);
        // ::1 in /proc/net/tcp6.
        let (a, _) = proc_net_addr("00000000000000000000000001000000:1538").unwrap();
        assert_eq!(addr_string(&a), "::1");
        assert!(proc_net_addr("zz:1").is_none());
    }

    #[test]
    fn own_connection_is_alive() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let local = client.local_addr().unwrap();
        let v4 = |a: std::net::SocketAddr| match a.ip() {
            IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
            IpAddr::V6(v) => v.octets(),
        };
        let conn = ConnKey {
            client_addr: v4(local),
            client_port: local.port(),
            server_addr: v4(server),
            server_port: server.port(),
            netns: 0,
        };
        assert!(tcp_tuple_alive(std::process::id(), &conn));
        drop(client);
        drop(listener);
        let gone = ConnKey {
            client_port: 1,
            ..conn
        };
        assert!(!tcp_tuple_alive(std::process::id(), &gone));
    }

    /// A record that leaves its process's facts out (RECORD_SAME_IDENTITY, the kernel side
    /// sent them with an earlier record) for an end this daemon holds no identity for
    /// takes them from /proc; later records of the same process need nothing more.
    #[test]
    fn identity_left_out_is_read_from_proc() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        client.flags = RECORD_SAME_IDENTITY;
        let mut out = log_in(&mut t, &mut client);
        client.flags = RECORD_SAME_IDENTITY;
        out.extend(query(&mut t, &mut client, STREAM_RAW, "select 1"));
        let st = out
            .iter()
            .find(|e| e.kind == EventKind::Statement)
            .expect("the statement");
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        // (The test's headers carry no name: one here came from /proc.)
        assert_eq!(&*st.comm, comm.trim_end());
        assert_eq!(st.pid, std::process::id());
        assert_eq!(st.uid, unsafe { libc::getuid() });
        assert_eq!(t.counters.identities_from_proc, 1);
    }

    /// By hand: the daemon's work per select-only prepared statement (pgbench -M
    /// prepared) from the records of one end to the events, dropped in batches as the sink
    /// thread's recycled batches are. Prints ns per statement; asserts only that each
    /// statement made one event.
    /// `cargo test --release -p auditor --lib hot_path_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn hot_path_cost() {
        let mut t = tracker();
        let mut client = Wire::new(1, ROLE_CLIENT);
        let mut out = log_in(&mut t, &mut client);
        let mut parse = msg(
            b'P',
            b"P0_1\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
        );
        parse.extend(msg(b'S', b""));
        out.extend(client.data(&mut t, STREAM_RAW, DIR_TO_SERVER, &parse));
        let mut resp = msg(b'1', b"");
        resp.extend(msg(b'Z', b"I"));
        out.extend(client.data(&mut t, STREAM_RAW, DIR_TO_CLIENT, &resp));
        let mut field = b"abalance\0".to_vec();
        field.extend(16396u32.to_be_bytes());
        field.extend(3u16.to_be_bytes());
        field.extend(23u32.to_be_bytes());
        field.extend(4u16.to_be_bytes());
        field.extend((-1i32).to_be_bytes());
        field.extend(0u16.to_be_bytes());
        let mut row_desc = 1u16.to_be_bytes().to_vec();
        row_desc.extend(field);
        let mut response = msg(b'2', b"");
        response.extend(msg(b'T', &row_desc));
        response.extend(msg(b'D', b"\0\x01\0\0\0\x010"));
        response.extend(msg(b'C', b"SELECT 1\0"));
        response.extend(msg(b'Z', b"I"));
        let request = |aid: u32| {
            let value = aid.to_string();
            let mut bind = b"\0P0_1\0\0\0\0\x01".to_vec();
            bind.extend((value.len() as u32).to_be_bytes());
            bind.extend(value.as_bytes());
            bind.extend(0u16.to_be_bytes());
            let mut m = msg(b'B', &bind);
            m.extend(msg(b'D', b"P\0"));
            m.extend(msg(b'E', b"\0\0\0\0\0"));
            m.extend(msg(b'S', b""));
            m
        };
        let requests: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| request(i * 7919 % 1_000_000))
            .collect();
        drop(out);
        let mut batch = Vec::with_capacity(4096);
        // (HOT_PATH_STATEMENTS: fewer, under valgrind's instruction count.)
        let n: usize = std::env::var("HOT_PATH_STATEMENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let started = std::time::Instant::now();
        let mut events = 0;
        for i in 0..n {
            let req = &requests[i % requests.len()];
            for (dir, bytes) in [(DIR_TO_SERVER, req.as_slice()), (DIR_TO_CLIENT, &response)] {
                client.data_into(&mut t, STREAM_RAW, dir, bytes, &mut batch);
            }
            if batch.len() >= 512 {
                // As the daemon's thread does with a batch the sink thread sent back.
                events += batch.len();
                batch.drain(..).for_each(crate::audit::recorder::recycle);
            }
        }
        events += batch.len();
        let ns = started.elapsed().as_nanos() as f64 / n as f64;
        println!("hot path: {ns:.0} ns per statement ({events} events)");
        assert_eq!(events, n);
    }
}
