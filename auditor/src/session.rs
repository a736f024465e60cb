//! One Postgres session: messages from both directions in, audit events out.
//!
//! Requests are queued as the client sends them and matched to responses in order, which
//! is how the server answers (pipelining included). Named prepared statements and portals
//! live as long as the session, so an Execute of a statement prepared long before still
//! carries its SQL text. Pure: no I/O, time comes in with each message.

use std::{collections::VecDeque, sync::Arc};

use ahash::AHashMap as HashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    capture::stream,
    event::{AuditEvent, EventKind, Text},
    pg::{
        backend::{self, rows_of_tag, BackendMessage, ErrorFields},
        frontend::{self, FrontendMessage, Target},
        wire::{I16s, Values},
        Direction, Token, Tokenizer, TokenizerLimits,
    },
    sql::{split_statements, Analysis, Analyzer},
};

/// How statements and parameters are recorded.
#[derive(Clone)]
pub struct RecordingPolicy {
    /// Record statement text as sent (literals included) instead of normalised.
    pub raw_statements: bool,
    /// Record parameter values as sent instead of keyed hashes.
    pub raw_params: bool,
    /// HMAC-SHA256 keyed with the installation's parameter key, cloned per value (the key
    /// schedule is done once): equal values hash equal within one installation.
    param_mac: Hmac<Sha256>,
}

impl RecordingPolicy {
    pub fn new(raw_statements: bool, raw_params: bool, param_key: &[u8]) -> Self {
        RecordingPolicy {
            raw_statements,
            raw_params,
            param_mac: <Hmac<Sha256> as Mac>::new_from_slice(param_key)
                .expect("HMAC takes any key length"),
        }
    }
}

impl Default for RecordingPolicy {
    fn default() -> Self {
        RecordingPolicy::new(false, false, b"auditor-default-key")
    }
}

/// Counters a session adds to.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionCounters {
    pub parse_errors: u64,
    pub unmatched_responses: u64,
    /// Protocol messages framed, both directions.
    pub messages: u64,
}

#[derive(Clone)]
struct Prepared {
    /// The statement's name, shared by the events of its executions.
    name: Text,
    sql: String,
    analysis: Arc<Analysis>,
}

#[derive(Clone)]
struct Portal {
    statement_name: Text,
    /// None when the statement was prepared before capture started.
    prepared: Option<Arc<Prepared>>,
    params: Arc<[String]>,
    /// Rows from earlier Executes that stopped at their row limit.
    rows_so_far: u64,
    started_ns: Option<i128>,
}

struct SimpleStatement {
    sql: String,
    analysis: Arc<Analysis>,
}

enum Pending {
    Simple {
        statements: VecDeque<SimpleStatement>,
        whole: String,
        started_ns: i128,
        rows: u64,
    },
    /// A Parse the server has not answered yet, and the statement it replaced under the
    /// same name: if the Parse fails (or is skipped after an earlier error), the server
    /// still has the old one.
    Parse {
        prepared: Arc<Prepared>,
        replaced: Option<Arc<Prepared>>,
    },
    /// A Bind not answered yet, with its portal's name.
    Bind {
        portal: String,
    },
    Execute {
        portal_name: String,
        portal: Portal,
        started_ns: i128,
        rows: u64,
    },
    Sync,
    FunctionCall {
        oid: u32,
        started_ns: i128,
    },
}

/// Connection facts that events carry (set by the tracker).
#[derive(Debug, Clone, Default)]
pub struct SessionMeta {
    pub db_user: Text,
    pub database: Text,
    pub application_name: Text,
    pub tls: bool,
}

pub struct Session {
    pub meta: SessionMeta,
    tokenizers: [Tokenizer; 2],
    /// After a gap, the direction waits for a syscall boundary that looks like a message.
    resyncing: [bool; 2],
    /// Responses are ignored until a request seen after a gap (mid-stream pick-up too).
    responses_unreliable: bool,
    prepared: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    pending: VecDeque<Pending>,
    startup_seen: bool,
    /// The client sent Terminate: nothing more can follow on this connection.
    pub terminated: bool,
    startup_done_flag: bool,
    started_emitted: bool,
    cancel_request: bool,
    policy: RecordingPolicy,
    pub counters: SessionCounters,
    /// Flags for the next statement event (gap_before, mid_stream).
    next_flags: Vec<String>,
    mid_stream: bool,
    pub startup_error: Option<ErrorFields>,
    /// An SSLRequest or GSSENCRequest is waiting for its one-byte answer.
    negotiating: bool,
    /// The server accepted encryption: the rest comes as plaintext from a TLS hook, or not
    /// at all.
    awaiting_plaintext: bool,
    /// The encryption is GSSAPI (no hooks exist for it).
    gss: bool,
    /// Declared unreadable: no end of the connection delivers plaintext.
    unreadable: bool,
    limits: TokenizerLimits,
}

/// An event the session produced; the tracker adds identity, ids and endpoints.
#[derive(Debug)]
pub struct Draft {
    pub ts_ns: i128,
    pub event: AuditEvent,
}

fn kind_event(kind: EventKind) -> AuditEvent {
    AuditEvent {
        kind: Text::Static(kind.as_str()),
        ..AuditEvent::default()
    }
}

impl Session {
    pub fn new(policy: RecordingPolicy, limits: TokenizerLimits, mid_stream: bool) -> Self {
        Session {
            meta: SessionMeta::default(),
            tokenizers: Self::tokenizers(limits, mid_stream),
            // Joining mid-stream: wait for a syscall boundary that looks like a message.
            resyncing: [mid_stream, mid_stream],
            responses_unreliable: mid_stream,
            prepared: HashMap::default(),
            portals: HashMap::default(),
            pending: VecDeque::new(),
            startup_seen: false,
            terminated: false,
            startup_done_flag: false,
            started_emitted: false,
            cancel_request: false,
            policy,
            counters: SessionCounters::default(),
            next_flags: if mid_stream {
                vec!["mid_stream".into()]
            } else {
                Vec::new()
            },
            mid_stream,
            startup_error: None,
            negotiating: false,
            awaiting_plaintext: false,
            gss: false,
            unreadable: false,
            limits,
        }
    }

    /// Whether the bytes still to come are ones this session can decode, so the other end
    /// of a local connection is no longer needed: the startup packet went by in the clear
    /// (or the session was joined mid-stream), and no encryption is being set up.
    pub fn settled(&self) -> bool {
        (self.startup_seen || self.mid_stream) && !self.negotiating && !self.awaiting_plaintext
    }

    /// The server accepted TLS (or the stream was joined mid-stream and is TLS records):
    /// what follows on the socket is ciphertext.
    pub fn awaiting_plaintext(&self) -> bool {
        self.awaiting_plaintext
    }

    pub fn is_unreadable(&self) -> bool {
        self.unreadable
    }

    /// A connection joined mid-stream whose bytes are TLS records.
    pub fn assume_tls(&mut self) {
        self.meta.tls = true;
        self.awaiting_plaintext = true;
        self.tokenizers[0].make_opaque();
        self.tokenizers[1].make_opaque();
    }

    fn tokenizers(limits: TokenizerLimits, typed: bool) -> [Tokenizer; 2] {
        [
            stream::tokenizer(Direction::ToServer, limits, typed),
            stream::tokenizer(Direction::ToClient, limits, typed),
        ]
    }

    /// Plaintext from a TLS hook starts here: the conversation resumes as if it had never
    /// been encrypted (a startup packet first, unless the session was joined mid-stream).
    pub fn begin_plaintext(&mut self) {
        self.meta.tls = true;
        self.awaiting_plaintext = false;
        // After the handshake the client sends a startup packet again, unless the session
        // was joined mid-stream.
        let typed = self.mid_stream && !self.startup_seen;
        self.tokenizers = Self::tokenizers(self.limits, typed);
    }

    /// Plaintext from a TLS hook that was attached late (the process was already talking):
    /// decoding resumes at the first message boundary, as for a connection joined
    /// mid-stream.
    pub fn begin_plaintext_late(&mut self) {
        self.meta.tls = true;
        self.awaiting_plaintext = false;
        self.mid_stream = true;
        self.tokenizers = Self::tokenizers(self.limits, true);
        self.resyncing = [true, true];
        self.responses_unreliable = true;
        if !self.next_flags.iter().any(|f| f == "mid_stream") {
            self.next_flags.push("mid_stream".into());
        }
    }

    /// No end of the connection delivers plaintext: record the session as unreadable
    /// (its identity and endpoints still are), once.
    pub fn mark_unreadable(&mut self, ts: i128, out: &mut Vec<Draft>) {
        if self.unreadable {
            return;
        }
        self.unreadable = true;
        self.emit_start(ts, out);
    }

    pub fn is_mid_stream(&self) -> bool {
        self.mid_stream
    }

    pub fn is_cancel_request(&self) -> bool {
        self.cancel_request
    }

    /// Bytes were lost in `direction`: decoding resumes at the next plausible boundary.
    pub fn gap(&mut self, direction: Direction) {
        self.resyncing[direction.index()] = true;
        self.tokenizers[direction.index()].resync_typed();
        if !self.next_flags.iter().any(|f| f == "gap_before") {
            self.next_flags.push("gap_before".into());
        }
        if direction == Direction::ToServer {
            // Responses to requests we never saw would be matched to the wrong ones.
            self.responses_unreliable = true;
        }
    }

    /// Feeds bytes of one direction. `call_start` is true when `data` begins a syscall's
    /// payload (the only places a lost stream may resume at a message boundary).
    pub fn push(
        &mut self,
        direction: Direction,
        data: &[u8],
        call_start: bool,
        ts_ns: i128,
        analyzer: &mut Analyzer,
        out: &mut Vec<Draft>,
    ) {
        let d = direction.index();
        if self.resyncing[d] {
            if !(call_start && stream::plausible_boundary(direction, data)) {
                return;
            }
            self.resyncing[d] = false;
            self.tokenizers[d].resync_typed();
        }
        // Tokens borrow `data`; a push rarely holds more than a few messages.
        let mut tokens: smallvec::SmallVec<[Token; 8]> = smallvec::SmallVec::new();
        let result = self.tokenizers[d].push(data, &mut |t| {
            // Bodies streamed past are only counted (rows, COPY data).
            if !matches!(t, Token::Chunk { .. }) {
                tokens.push(t)
            }
        });
        for token in tokens {
            self.on_token(direction, token, ts_ns, analyzer, out);
        }
        if result.is_err() {
            self.counters.parse_errors += 1;
            // Try again at a later boundary rather than going silent for good.
            self.gap(direction);
        }
    }

    fn on_token(
        &mut self,
        direction: Direction,
        token: Token,
        ts: i128,
        analyzer: &mut Analyzer,
        out: &mut Vec<Draft>,
    ) {
        self.counters.messages += 1;
        match (direction, token) {
            (Direction::ToServer, Token::Startup { body, .. }) => {
                match frontend::decode_startup(&body) {
                    Ok(FrontendMessage::Startup { params, .. }) => {
                        self.startup_seen = true;
                        for (k, v) in params {
                            let v = String::from_utf8_lossy(v);
                            match k {
                                b"user" => self.meta.db_user = v.as_ref().into(),
                                b"database" => self.meta.database = v.as_ref().into(),
                                b"application_name" => {
                                    self.meta.application_name = v.as_ref().into()
                                }
                                _ => {}
                            }
                        }
                        if self.meta.database.is_empty() {
                            self.meta.database = self.meta.db_user.clone();
                        }
                        self.emit_start(ts, out);
                    }
                    Ok(FrontendMessage::SslRequest) | Ok(FrontendMessage::GssEncRequest) => {
                        self.negotiating = true;
                        self.tokenizers[Direction::ToClient.index()].expect_encryption_reply();
                    }
                    Ok(FrontendMessage::CancelRequest { .. }) => {
                        self.cancel_request = true;
                    }
                    Ok(_) => {}
                    Err(_) => self.counters.parse_errors += 1,
                }
            }
            (Direction::ToClient, Token::EncryptionReply { reply: b, .. }) => {
                self.negotiating = false;
                if b == b'S' || b == b'G' {
                    self.meta.tls = b == b'S';
                    self.gss = b == b'G';
                    self.awaiting_plaintext = true;
                    self.tokenizers[0].make_opaque();
                    self.tokenizers[1].make_opaque();
                } else {
                    // Refused: the client continues in plaintext with a startup packet.
                    self.tokenizers[Direction::ToServer.index()].expect_startup();
                }
            }
            (Direction::ToServer, Token::Message { tag, body, .. }) => {
                match frontend::decode(tag, &body) {
                    Ok(m) => self.on_frontend(m, ts, analyzer, out),
                    Err(_) => self.counters.parse_errors += 1,
                }
            }
            (Direction::ToServer, Token::Header { tag, body_len, .. }) if tag != b'd' => {
                // A request too large to buffer: record that it happened.
                self.on_oversized_request(tag, body_len, ts, out);
            }
            (Direction::ToClient, Token::Message { tag, body, .. }) => {
                match backend::decode(tag, &body) {
                    Ok(m) => self.on_backend(m, ts, out),
                    Err(_) => self.counters.parse_errors += 1,
                }
            }
            (Direction::ToClient, Token::Header { tag: b'D', .. }) => {
                self.on_backend(BackendMessage::DataRow(Values::default()), ts, out);
            }
            _ => {}
        }
    }

    fn emit_start(&mut self, ts: i128, out: &mut Vec<Draft>) {
        if self.started_emitted {
            return;
        }
        self.started_emitted = true;
        let mut ev = kind_event(EventKind::SessionStart);
        if self.unreadable {
            ev.flags.push(if self.gss {
                "gssenc_unreadable".into()
            } else {
                "tls_unreadable".into()
            });
        }
        if self.mid_stream {
            ev.flags.push("mid_stream".into());
        }
        out.push(Draft {
            ts_ns: ts,
            event: ev,
        });
    }

    /// Makes sure a session_start precedes anything else (mid-stream sessions have none).
    pub fn ensure_started(&mut self, ts: i128, out: &mut Vec<Draft>) {
        self.emit_start(ts, out);
    }

    fn params_of(&self, values: Values<'_>, formats: I16s<'_>) -> Arc<[String]> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let Some(v) = v else {
                    return "NULL".to_string();
                };
                if self.policy.raw_params {
                    if formats.format_of(i) == 1 {
                        format!("\\x{}", hex::encode(v))
                    } else {
                        String::from_utf8_lossy(v).into_owned()
                    }
                } else {
                    let mut mac = self.policy.param_mac.clone();
                    mac.update(v);
                    let digest = mac.finalize().into_bytes();
                    let mut text = [0u8; 16];
                    hex::encode_to_slice(&digest[..8], &mut text).expect("16 hex digits");
                    let mut out = String::with_capacity(5 + text.len());
                    out.push_str("hmac:");
                    out.push_str(std::str::from_utf8(&text).expect("hex is ASCII"));
                    out
                }
            })
            .collect()
    }

    fn on_frontend(
        &mut self,
        m: FrontendMessage,
        ts: i128,
        analyzer: &mut Analyzer,
        out: &mut Vec<Draft>,
    ) {
        // A request after a gap: from here on responses match requests again. Responses
        // still owed for requests lost in the gap arrive first and are not attributed.
        let is_request = matches!(
            m,
            FrontendMessage::Query { .. }
                | FrontendMessage::Parse { .. }
                | FrontendMessage::Bind { .. }
                | FrontendMessage::Execute { .. }
                | FrontendMessage::Sync
                | FrontendMessage::FunctionCall { .. }
        );
        if is_request && self.responses_unreliable {
            // Clients wait for answers before sending more (or pipeline from here on): the
            // requests lost in the gap are answered by now, so matching starts over.
            self.responses_unreliable = false;
            self.pending.clear();
        }
        match m {
            FrontendMessage::Query { sql } => {
                let sql = String::from_utf8_lossy(sql).into_owned();
                let statements = split_statements(&sql)
                    .into_iter()
                    .map(|s| {
                        let analysis = analyzer.analyze(&s);
                        SimpleStatement { sql: s, analysis }
                    })
                    .collect();
                self.pending.push_back(Pending::Simple {
                    statements,
                    whole: sql,
                    started_ns: ts,
                    rows: 0,
                });
            }
            FrontendMessage::Parse { name, sql, .. } => {
                let statement = String::from_utf8_lossy(name).into_owned();
                let query = String::from_utf8_lossy(sql).into_owned();
                let analysis = analyzer.analyze(&query);
                let name: Text = statement.as_str().into();
                let prepared = Arc::new(Prepared {
                    name,
                    sql: query,
                    analysis,
                });
                let replaced = self.prepared.insert(statement, prepared.clone());
                self.pending
                    .push_back(Pending::Parse { prepared, replaced });
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                ..
            } => {
                let portal = String::from_utf8_lossy(portal).into_owned();
                let statement = String::from_utf8_lossy(statement);
                let prepared = self.prepared.get(statement.as_ref()).cloned();
                let params = self.params_of(params, param_formats);
                let statement_name = match &prepared {
                    Some(p) => p.name.clone(),
                    None => statement.as_ref().into(),
                };
                let replaced = self.portals.insert(
                    portal.clone(),
                    Portal {
                        statement_name,
                        prepared,
                        params,
                        rows_so_far: 0,
                        started_ns: None,
                    },
                );
                if let Some(old) = replaced {
                    // A portal left suspended at its row limit ends here.
                    self.finish_suspended(old, ts, out);
                }
                self.pending.push_back(Pending::Bind { portal });
            }
            FrontendMessage::Execute { portal, .. } => {
                let portal = String::from_utf8_lossy(portal).into_owned();
                let p = match self.portals.get_mut(&portal) {
                    Some(p) => {
                        let taken = p.clone();
                        // A suspended portal resumes in this Execute: it is recorded when
                        // this one ends, not again when the portal goes away.
                        p.started_ns = None;
                        p.rows_so_far = 0;
                        taken
                    }
                    None => Portal {
                        statement_name: Text::default(),
                        prepared: None,
                        params: Arc::from([]),
                        rows_so_far: 0,
                        started_ns: None,
                    },
                };
                let started_ns = p.started_ns.unwrap_or(ts);
                self.pending.push_back(Pending::Execute {
                    portal_name: portal,
                    portal: p,
                    started_ns,
                    rows: 0,
                });
            }
            FrontendMessage::Close { target, name } => {
                let name = String::from_utf8_lossy(name);
                if target == Target::Statement {
                    self.prepared.remove(name.as_ref());
                } else if let Some(old) = self.portals.remove(name.as_ref()) {
                    self.finish_suspended(old, ts, out);
                }
            }
            FrontendMessage::Sync => self.pending.push_back(Pending::Sync),
            FrontendMessage::FunctionCall { oid, .. } => {
                self.pending.push_back(Pending::FunctionCall {
                    oid,
                    started_ns: ts,
                })
            }
            FrontendMessage::Terminate => self.terminated = true,
            // Startup-phase and COPY sub-protocol messages, Describe, Flush: no queue entry.
            _ => {}
        }
    }

    /// Every portal is gone (the transaction or the session ended).
    fn end_portals(&mut self, ts: i128, out: &mut Vec<Draft>) {
        if self.portals.values().all(|p| p.started_ns.is_none()) {
            self.portals.clear(); // (keeps the map's allocation)
            return;
        }
        let suspended: Vec<Portal> = self
            .portals
            .drain()
            .map(|(_, p)| p)
            .filter(|p| p.started_ns.is_some())
            .collect();
        for portal in suspended {
            self.finish_suspended(portal, ts, out);
        }
    }

    /// Records the execution of a portal that stopped at its row limit (PortalSuspended)
    /// and was not run to completion: it ends unresumed when the portal goes away (Close,
    /// a Bind reusing its name, the end of the transaction, the end of the session).
    fn finish_suspended(&mut self, portal: Portal, ts: i128, out: &mut Vec<Draft>) {
        let Some(start) = portal.started_ns else {
            return;
        };
        let prepared = portal.prepared.as_ref();
        let mut ev = self.statement_event(
            prepared.map(|p| p.sql.as_str()),
            prepared.map(|p| p.analysis.as_ref()),
            "extended",
        );
        ev.params = portal.params;
        ev.prepared_name = portal.statement_name;
        ev.flags.push("portal_suspended".into());
        Self::finish(&mut ev, None, 0, 0, None, start, ts);
        ev.rows = Some(portal.rows_so_far);
        out.push(Draft {
            ts_ns: start,
            event: ev,
        });
    }

    fn on_oversized_request(&mut self, tag: u8, len: u32, ts: i128, out: &mut Vec<Draft>) {
        let mut ev = kind_event(EventKind::Gap);
        ev.flags.push("truncated".into());
        ev.statement = format!(
            "(message '{}' of {} bytes exceeds max_message_bytes and was not decoded)",
            tag as char, len
        )
        .into();
        ev.gap_bytes = len as u64;
        out.push(Draft {
            ts_ns: ts,
            event: ev,
        });
        // Its responses can no longer be matched to a request.
        self.responses_unreliable = true;
    }

    fn statement_event(
        &mut self,
        sql: Option<&str>,
        analysis: Option<&Analysis>,
        protocol: &'static str,
    ) -> AuditEvent {
        let mut ev = kind_event(EventKind::Statement);
        ev.protocol = Text::Static(protocol);
        match (sql, analysis) {
            (Some(sql), Some(a)) => {
                ev.statement = if self.policy.raw_statements {
                    sql.into()
                } else {
                    a.normalized.clone()
                };
                ev.command = a.command.clone();
                ev.tables = a.tables.clone();
                ev.fingerprint = a.fingerprint.clone();
                if a.unparsed {
                    ev.flags.push("unparsed".into());
                }
            }
            _ => ev.flags.push("prepared_before_capture".into()),
        }
        ev.flags.append(&mut self.next_flags);
        ev
    }

    /// `data_rows` counts this response's DataRows; `prior_rows` those of earlier
    /// Executes of the same portal (a CommandComplete tag counts only the last one).
    fn finish(
        ev: &mut AuditEvent,
        tag: Option<&str>,
        data_rows: u64,
        prior_rows: u64,
        error: Option<&ErrorFields>,
        start: i128,
        end: i128,
    ) {
        if let Some(tag) = tag {
            let cmd = backend::command_of_tag(tag);
            if !cmd.is_empty() && (ev.command.is_empty() || &*ev.command == "TRANSACTION") {
                ev.command = cmd.into();
            }
            let own = rows_of_tag(tag).or((data_rows > 0).then_some(data_rows));
            ev.rows = own.map(|r| r + prior_rows);
        }
        if let Some(e) = error {
            ev.error_code = e.code.clone();
            ev.error_message = e.message.clone();
        }
        ev.duration_us = ((end - start).max(0) / 1000) as u64;
    }

    fn on_backend(&mut self, m: BackendMessage, ts: i128, out: &mut Vec<Draft>) {
        match &m {
            BackendMessage::ParameterStatus { name, value } => {
                if *name == b"application_name" {
                    self.meta.application_name = String::from_utf8_lossy(value).as_ref().into();
                }
                return;
            }
            BackendMessage::NoticeResponse(_) | BackendMessage::NotificationResponse { .. } => {
                return
            }
            BackendMessage::ErrorResponse(e) if !self.startup_done() => {
                // Authentication or startup failure: no statement to attach it to.
                self.startup_error = Some(e.summary());
                return;
            }
            BackendMessage::ReadyForQuery { .. } if !self.startup_done() => {
                self.startup_done_flag = true;
                return;
            }
            _ => {}
        }
        if self.responses_unreliable {
            self.counters.unmatched_responses += 1;
            return;
        }
        match m {
            BackendMessage::ParseComplete => {
                self.pop_front_matching(|p| matches!(p, Pending::Parse { .. }))
            }
            BackendMessage::BindComplete => {
                self.pop_front_matching(|p| matches!(p, Pending::Bind { .. }))
            }
            BackendMessage::DataRow(_) => match self
                .pending
                .iter_mut()
                .find(|p| matches!(p, Pending::Simple { .. } | Pending::Execute { .. }))
            {
                Some(Pending::Simple { rows, .. }) | Some(Pending::Execute { rows, .. }) => {
                    *rows += 1
                }
                _ => self.counters.unmatched_responses += 1,
            },
            BackendMessage::CommandComplete { tag } => {
                self.complete(Some(&String::from_utf8_lossy(tag)), None, ts, out)
            }
            BackendMessage::EmptyQueryResponse => self.complete(None, None, ts, out),
            BackendMessage::ErrorResponse(e) => self.complete(None, Some(&e.summary()), ts, out),
            BackendMessage::PortalSuspended => {
                // The portal stopped at its row limit. A later Execute of the same portal
                // resumes it: carry the rows and the start time to it (already queued when
                // pipelined); otherwise keep them with the portal until it is resumed or
                // goes away (then the execution is recorded as it stands).
                if let Some(Pending::Execute {
                    portal_name,
                    mut portal,
                    started_ns,
                    rows,
                }) = self.pop_until_execute()
                {
                    let carried = portal.rows_so_far + rows;
                    let mut rebound = false;
                    let mut queued = None;
                    for p in self.pending.iter_mut() {
                        match p {
                            Pending::Bind { portal: n } if *n == portal_name => {
                                rebound = true;
                                break;
                            }
                            Pending::Execute {
                                portal_name: n,
                                portal: q,
                                started_ns: s,
                                ..
                            } if *n == portal_name => {
                                queued = Some((q, s));
                                break;
                            }
                            _ => {}
                        }
                    }
                    portal.rows_so_far = carried;
                    portal.started_ns = Some(started_ns);
                    match queued {
                        Some((next, next_start)) => {
                            next.rows_so_far = carried;
                            *next_start = started_ns;
                        }
                        // A new portal of that name is already bound: this one is over.
                        None if rebound => self.finish_suspended(portal, ts, out),
                        None => {
                            if let Some(old) = self.portals.insert(portal_name, portal) {
                                self.finish_suspended(old, ts, out);
                            }
                        }
                    }
                }
            }
            BackendMessage::FunctionCallResponse { .. } => {
                if let Some(Pending::FunctionCall { oid, started_ns }) = self.pending.front() {
                    let (oid, started_ns) = (*oid, *started_ns);
                    let mut ev = kind_event(EventKind::Statement);
                    ev.protocol = "function_call".into();
                    ev.command = "FUNCTION CALL".into();
                    ev.statement = format!("(function call, oid {oid})").into();
                    ev.flags.append(&mut self.next_flags);
                    Self::finish(&mut ev, None, 0, 0, None, started_ns, ts);
                    out.push(Draft {
                        ts_ns: started_ns,
                        event: ev,
                    });
                }
            }
            BackendMessage::ReadyForQuery { status } => {
                // Ends one Sync, simple Query or FunctionCall, with everything before it.
                while let Some(p) = self.pending.pop_front() {
                    match p {
                        Pending::Sync | Pending::Simple { .. } | Pending::FunctionCall { .. } => {
                            break
                        }
                        _ => {}
                    }
                }
                if status == b'I' {
                    // Transaction over: every portal is gone (prepared statements stay).
                    self.end_portals(ts, out);
                }
            }
            _ => {}
        }
    }

    fn startup_done(&self) -> bool {
        self.startup_done_flag || !self.startup_seen
    }

    fn pop_front_matching(&mut self, is: impl Fn(&Pending) -> bool) {
        if self.pending.front().is_some_and(is) {
            self.pending.pop_front();
        } else {
            self.counters.unmatched_responses += 1;
        }
    }

    /// Pops Parse/Bind entries ahead of the first Execute and returns that Execute.
    fn pop_until_execute(&mut self) -> Option<Pending> {
        while let Some(front) = self.pending.front() {
            match front {
                Pending::Parse { .. } | Pending::Bind { .. } => {
                    self.pending.pop_front();
                }
                Pending::Execute { .. } => return self.pending.pop_front(),
                _ => return None,
            }
        }
        None
    }

    /// CommandComplete, EmptyQueryResponse or ErrorResponse: ends one statement.
    fn complete(
        &mut self,
        tag: Option<&str>,
        error: Option<&ErrorFields>,
        ts: i128,
        out: &mut Vec<Draft>,
    ) {
        let Some(front) = self.pending.front_mut() else {
            self.counters.unmatched_responses += 1;
            return;
        };
        match front {
            Pending::Simple {
                statements,
                whole,
                started_ns,
                rows,
            } => {
                let st = statements.pop_front();
                let data_rows = std::mem::take(rows);
                let start = *started_ns;
                *started_ns = ts;
                if tag.is_none() && error.is_none() {
                    return; // empty query
                }
                let whole = whole.clone();
                if error.is_some() {
                    // The rest of the string is not executed.
                    statements.clear();
                }
                let mut ev = match &st {
                    Some(s) => {
                        let a = s.analysis.clone();
                        self.statement_event(Some(&s.sql), Some(&a), "simple")
                    }
                    None => {
                        let mut ev = self.statement_event(None, None, "simple");
                        ev.flags.retain(|f| f != "prepared_before_capture");
                        ev.flags.push("split_mismatch".into());
                        ev.statement = crate::sql::redact_literals(&whole).into();
                        ev
                    }
                };
                Self::finish(&mut ev, tag, data_rows, 0, error, start, ts);
                out.push(Draft {
                    ts_ns: start,
                    event: ev,
                });
            }
            Pending::Parse { .. } | Pending::Bind { .. } | Pending::Execute { .. } => {
                if let Some(e) = error {
                    self.fail_extended(e, ts, out);
                    return;
                }
                let Some(Pending::Execute {
                    portal,
                    started_ns,
                    rows,
                    ..
                }) = self.pop_until_execute()
                else {
                    self.counters.unmatched_responses += 1;
                    return;
                };
                if tag.is_none() {
                    return; // empty query
                }
                let prepared = portal.prepared.as_ref();
                let mut ev = self.statement_event(
                    prepared.map(|p| p.sql.as_str()),
                    prepared.map(|p| p.analysis.as_ref()),
                    "extended",
                );
                ev.params = portal.params.clone();
                ev.prepared_name = portal.statement_name.clone();
                Self::finish(&mut ev, tag, rows, portal.rows_so_far, None, started_ns, ts);
                out.push(Draft {
                    ts_ns: started_ns,
                    event: ev,
                });
            }
            Pending::Sync | Pending::FunctionCall { .. } => {
                if let (Some(e), Pending::FunctionCall { started_ns, oid }) = (error, &*front) {
                    let mut ev = kind_event(EventKind::Statement);
                    ev.protocol = "function_call".into();
                    ev.command = "FUNCTION CALL".into();
                    ev.statement = format!("(function call, oid {oid})").into();
                    let start = *started_ns;
                    Self::finish(&mut ev, None, 0, 0, Some(e), start, ts);
                    out.push(Draft {
                        ts_ns: start,
                        event: ev,
                    });
                } else {
                    // An error at Sync (a deferred constraint at implicit commit).
                    self.counters.unmatched_responses += 1;
                }
            }
        }
    }

    /// An error in the extended protocol: it belongs to the statement being prepared,
    /// bound or executed; the server skips everything after it until Sync. A statement
    /// that failed while being prepared or bound (never executed) keeps its text and is
    /// flagged `failed_before_execute`; Parses that failed or were skipped did not create
    /// their statements, so the names keep what the server still has.
    fn fail_extended(&mut self, e: &ErrorFields, ts: i128, out: &mut Vec<Draft>) {
        let mut victim: Option<(Portal, i128)> = None;
        let mut failed_parse: Option<Arc<Prepared>> = None;
        let mut undone: Vec<(Arc<Prepared>, Option<Arc<Prepared>>)> = Vec::new();
        let mut before_execute = true;
        let mut first = true;
        while let Some(front) = self.pending.front() {
            if matches!(front, Pending::Sync) {
                break;
            }
            match self.pending.pop_front().expect("front exists") {
                Pending::Parse { prepared, replaced } => {
                    if first {
                        failed_parse = Some(prepared.clone());
                    }
                    undone.push((prepared, replaced));
                }
                Pending::Execute {
                    portal, started_ns, ..
                } => {
                    if first {
                        before_execute = false;
                    }
                    if victim.is_none() {
                        victim = Some((portal, started_ns));
                    }
                }
                _ => {}
            }
            first = false;
        }
        for (prepared, replaced) in undone.into_iter().rev() {
            let name = prepared.name.to_string();
            if !self
                .prepared
                .get(&name)
                .is_some_and(|current| Arc::ptr_eq(current, &prepared))
            {
                continue;
            }
            match replaced {
                // The unnamed statement is dropped before a new one is parsed.
                Some(old) if !name.is_empty() => {
                    self.prepared.insert(name, old);
                }
                _ => {
                    self.prepared.remove(&name);
                }
            }
        }
        let (prepared, params, name, start) = match (failed_parse, victim) {
            (Some(failed), Some((p, start)))
                if p.prepared
                    .as_ref()
                    .is_some_and(|bound| Arc::ptr_eq(bound, &failed)) =>
            {
                (Some(failed), p.params, p.statement_name, start)
            }
            (Some(failed), _) => {
                let name = failed.name.clone();
                (Some(failed), Arc::from([]), name, ts)
            }
            (None, Some((p, start))) => (p.prepared, p.params, p.statement_name, start),
            (None, None) => (None, Arc::from([]), Text::default(), ts),
        };
        let mut ev = self.statement_event(
            prepared.as_ref().map(|p| p.sql.as_str()),
            prepared.as_ref().map(|p| p.analysis.as_ref()),
            "extended",
        );
        if before_execute {
            if prepared.is_none() {
                // Nothing of it was seen (a Bind to a statement prepared before capture).
                ev.flags.retain(|f| f != "prepared_before_capture");
            }
            ev.flags.push("failed_before_execute".into());
        }
        ev.params = params;
        ev.prepared_name = name;
        Self::finish(&mut ev, None, 0, 0, Some(e), start, ts);
        out.push(Draft {
            ts_ns: start,
            event: ev,
        });
    }

    /// Requests that never got an answer, and portals left suspended (the connection
    /// ended first).
    pub fn abandon(&mut self, ts: i128, out: &mut Vec<Draft>) {
        self.end_portals(ts, out);
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Simple {
                    statements,
                    started_ns,
                    ..
                } => {
                    for s in statements {
                        let a = s.analysis.clone();
                        let mut ev = self.statement_event(Some(&s.sql), Some(&a), "simple");
                        ev.flags.push("no_response".into());
                        Self::finish(&mut ev, None, 0, 0, None, started_ns, ts);
                        out.push(Draft {
                            ts_ns: started_ns,
                            event: ev,
                        });
                    }
                }
                Pending::Execute {
                    portal, started_ns, ..
                } => {
                    let prepared = portal.prepared.as_ref();
                    let mut ev = self.statement_event(
                        prepared.map(|p| p.sql.as_str()),
                        prepared.map(|p| p.analysis.as_ref()),
                        "extended",
                    );
                    ev.params = portal.params.clone();
                    ev.prepared_name = portal.statement_name.clone();
                    ev.flags.push("no_response".into());
                    Self::finish(&mut ev, None, 0, 0, None, started_ns, ts);
                    out.push(Draft {
                        ts_ns: started_ns,
                        event: ev,
                    });
                }
                _ => {}
            }
        }
    }
}
