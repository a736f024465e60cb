//! One proxied connection as a state machine, without I/O: client bytes and server bytes
//! in, bytes for each side out. Built on the shared codec (`pg::Tokenizer`, the message
//! decoders) and conversation model (prepared statements and portals with their SQL, the
//! protocol phase), like the capture path; the driver (`proxy::conn`) moves the bytes.
//!
//! What it forwards it forwards unchanged. What a rule of an `enforce` policy refuses
//! never reaches the server: in its place the server gets a harmless request that fails
//! (a Bind of a statement that does not exist, or a query casting a marker to an
//! integer), so that the server itself enters the state an error leaves (a transaction
//! block becomes failed, so the client's COMMIT ends in ROLLBACK; the rest of an
//! extended-protocol batch is skipped until Sync, and exactly one ReadyForQuery answers
//! each Sync). The server's error for that request, recognised by a per-connection marker,
//! is replaced by the proxy's own (SQLSTATE 42501, naming the policy and rule). Matching
//! Postgres, messages after a refused extended-protocol message are dropped until Sync.

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use crate::{
    conversation::{Conversation, Phase, PreparedStatement},
    pg::{
        backend::{self, encode_error},
        frontend::{self, FrontendMessage},
        BufferBudget, Direction, Token, Tokenizer, TokenizerLimits,
    },
    policy::{Applied, Decision, Facts, Mode, Statement},
    sql::{split_statements, Analyzer},
};

/// What resolves a session's policies once its startup packet names user and database.
pub type Resolver = Box<dyn FnMut(&crate::conversation::SessionMeta) -> Arc<Applied> + Send>;

/// The SQLSTATE of a refused statement: insufficient_privilege.
pub const BLOCKED_SQLSTATE: &str = "42501";

/// A statement the proxy refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub decision: Decision,
    pub sql: String,
    /// The error's message, when it is not a rule's refusal (a held statement denied,
    /// timed out or cancelled).
    pub headline: Option<String>,
    /// The error's SQLSTATE (42501 but for a cancelled hold's 57014).
    pub sqlstate: &'static str,
}

impl Refusal {
    /// A rule's refusal (SQLSTATE 42501, naming the policy and rule).
    pub fn blocked(decision: Decision, sql: String) -> Refusal {
        Refusal {
            decision,
            sql,
            headline: None,
            sqlstate: BLOCKED_SQLSTATE,
        }
    }
}

/// A statement held for a person's approval, as the driver asks for it.
#[derive(Debug, Clone)]
pub struct HoldAsk {
    pub decision: Decision,
    /// The statement's text as held (a simple query's whole string).
    pub sql: String,
    /// The Bind's parameters as sent (extended protocol); None for a simple query.
    pub params: Option<Vec<HeldParam>>,
    /// What an approval binds ([`crate::approvals::binding`]).
    pub binding: String,
    /// The relations it touches (`schema.name`, or `name` unqualified): what a grant's
    /// tables are checked against.
    pub tables: Vec<String>,
}

/// A bind value of a held statement.
#[derive(Debug, Clone)]
pub struct HeldParam {
    pub value: Option<Vec<u8>>,
    pub binary: bool,
    /// Its type (declared in the Parse or resolved by the server; 0: unknown).
    pub type_oid: u32,
}

impl HeldParam {
    /// As an approver reads it: text as sent, binary integers in decimal, other binary
    /// values as `\x` hex.
    pub fn display(&self) -> String {
        let Some(v) = &self.value else {
            return "NULL".to_string();
        };
        if !self.binary {
            return String::from_utf8_lossy(v).into_owned();
        }
        match (self.type_oid, v.len()) {
            (21, 2) => i16::from_be_bytes([v[0], v[1]]).to_string(),
            (23, 4) => i32::from_be_bytes([v[0], v[1], v[2], v[3]]).to_string(),
            (20, 8) => i64::from_be_bytes(v[..8].try_into().expect("8 bytes")).to_string(),
            _ => format!("\\x{}", hex::encode(v)),
        }
    }
}

/// How a hold ends.
#[derive(Debug, Clone)]
pub enum HoldEnd {
    /// The held message goes to the server unchanged.
    Approved,
    /// The client gets this error in its place (the session goes on).
    Refused {
        sqlstate: &'static str,
        message: String,
        detail: Option<String>,
    },
}

/// The held message and the decision that holds it.
struct Held {
    tag: u8,
    body: Vec<u8>,
    decision: Decision,
    sql: String,
}

/// Where a connection stands, seen from the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the session's policies are known: the startup phase.
    Starting,
    /// Judging every statement (an `enforce` policy applies).
    Enforcing,
    /// Only relaying (no enforce policy applies to this session).
    Relaying,
    /// The connection is to be closed (after what is queued for the client).
    Closed,
}

/// What becomes of a client message whose body streams (larger than the proxy buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streaming {
    Forward,
    Drop,
}

pub struct Relay {
    client: Tokenizer,
    server: Tokenizer,
    conv: Conversation,
    analyzer: Analyzer,
    resolver: Resolver,
    applied: Option<Arc<Applied>>,
    state: State,
    /// Marker of this connection's substitute requests.
    nonce: String,
    /// Substitutes sent whose error has not come back yet: sequence -> refusal.
    substitutes: HashMap<u64, Refusal>,
    next_substitute: u64,
    /// Per request cycle sent (a Sync, a Query, a FunctionCall: each answered by one
    /// ReadyForQuery), the substitute sequence number at its end: substitutes before it are
    /// answered or skipped once its ReadyForQuery arrives.
    cycles: std::collections::VecDeque<u64>,
    /// After a refused extended-protocol message: client messages are dropped until Sync.
    discarding: bool,
    client_streaming: Streaming,
    /// Verdicts on prepared statements (held by the Arc, so the key is not reused).
    verdicts: HashMap<usize, (Arc<PreparedStatement>, Option<Decision>)>,
    /// Bytes for the server and for the client, taken by the driver.
    pub to_server: Vec<u8>,
    pub to_client: Vec<u8>,
    /// Statements refused since the driver last took them.
    pub refused: Vec<Refusal>,
    /// Why the connection must close, once `to_client` is written.
    pub close: Option<String>,
    /// The client's TLS is terminated by the proxy: channel binding is removed from the
    /// server's SASL offer (see `tls`).
    pub strip_channel_binding: bool,
    /// A session no enforce policy applies to: only relayed once its start-up is over
    /// (the start-up is read, to adjust the SASL offer).
    relay_when_ready: bool,
    startup_over: bool,
    /// The proxy's own login to the server (a policy holds the credential).
    login: Option<super::login::Login>,
    /// Where a credential's password comes from (its file; replaceable for tests).
    pub password_of: PasswordSource,
    /// Masking in this session (an enforce policy with column mask rules).
    masking: Option<Box<Masking>>,
    /// Client bytes held until the proxy may judge them: sent before the session was
    /// ready, or while the proxy reads the catalog.
    held: Vec<u8>,
    /// The key of masking's keyed hash (per installation).
    pub mask_key: Arc<[u8]>,
    /// Values masked since the driver last took the count.
    pub masked_values: u64,
    /// What was masked in each result that ended since the driver last took `to_client`:
    /// (the offset in `to_client` of the message that ended it, a `MaskTally` as JSON).
    /// The driver records each just before that message, so the tracker gives it to the
    /// statement the message completes.
    pub mask_tallies: Vec<(usize, Vec<u8>)>,
    /// The Query now judged may be a COPY the proxy rewrites (it came alone, with nothing
    /// in flight), and the COPY judged so.
    copy_query_ok: bool,
    copy_pending: Option<super::copy::CopyOut>,
    /// The client's encoding may hide ASCII bytes inside characters (COPY text cannot be
    /// split by bytes then).
    encoding_embeds_ascii: bool,
    /// Messages the server's tokenizer streams from its next bytes on (it is taken out of
    /// the relay while a read is handled).
    server_streamed_next: Option<&'static [u8]>,
    /// A statement now held for approval (the driver asks the hub, then calls
    /// [`Relay::end_hold`]); the client's later bytes wait in `held`.
    holding: Option<Held>,
    /// A hold begun since the driver last looked: what to ask.
    pub hold_asked: Option<HoldAsk>,
    /// Notices for the client waiting for the server's stream to reach a message
    /// boundary.
    notices: Vec<u8>,
    /// Keepalive queries sent while holding whose answers are not in yet.
    keepalives: u32,
    limits: TokenizerLimits,
    budget: BufferBudget,
    /// A digest of the session's cancel key (BackendKeyData): a CancelRequest with it on
    /// another connection cancels this session's held statement.
    pub cancel_key: Option<[u8; 32]>,
    /// On a CancelRequest connection: the digest of the key it presents.
    pub cancel_of: Option<[u8; 32]>,
}

/// The digest a cancel key is known by (never the key itself).
pub fn cancel_digest(pid: u32, key: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(pid.to_be_bytes());
    h.update(key);
    h.finalize().into()
}

/// A session's masking: its rules, what the catalog said, the current result's masks.
struct Masking {
    rules: Vec<super::mask::Rule>,
    masker: super::mask::Masker,
    plan: Option<super::mask::Plan>,
    /// Why the catalog could not be read (no plan: statements are refused).
    failed: Option<String>,
    /// A rule the proxy cannot apply (a pattern that does not compile): every statement
    /// is refused.
    broken: Option<String>,
    /// The proxy's catalog query is in flight.
    building: Option<super::mask::PlanBuilder>,
    /// Read the catalog again at the next quiet moment (DDL seen, or the plan is old).
    stale: bool,
    read_at: Option<std::time::Instant>,
    /// The masks of the result now arriving (None inside: nothing to mask), computed at
    /// its first row.
    current: Option<Option<Arc<[Option<super::mask::ColumnMask>]>>>,
    /// Per column of that result: its label when masked (`schema.table.column`), and the
    /// values masked so far.
    labels: Vec<Option<Arc<str>>>,
    counts: Vec<u64>,
    /// A `COPY … TO STDOUT` being described or rewritten.
    copy: Option<CopyStage>,
}

/// Where a masked `COPY … TO STDOUT` is.
enum CopyStage {
    /// The proxy's Parse/Describe/Sync of the COPY's query is in flight; the client's
    /// Query (`query`, framed) waits for its columns.
    Describing {
        copy: super::copy::CopyOut,
        query: Vec<u8>,
        columns: Option<Vec<crate::conversation::Column>>,
    },
    /// The COPY runs: its CopyData are rewritten.
    Rewriting(super::copy::CopyRewriter),
}

impl Masking {
    fn describing_copy(&self) -> bool {
        matches!(self.copy, Some(CopyStage::Describing { .. }))
    }

    /// What was masked in the result (or COPY) now ending, as the tracker reads it: the
    /// columns with values masked (a column whose values were all NULL, or in which the
    /// detectors found nothing, is not named).
    fn tally(&self) -> Option<Vec<u8>> {
        let (columns, values): (Vec<String>, Vec<u64>) = self
            .labels
            .iter()
            .zip(&self.counts)
            .filter_map(|(l, n)| Some((l.as_ref()?.to_string(), *n)))
            .filter(|(_, n)| *n > 0)
            .unzip();
        if columns.is_empty() {
            return None;
        }
        serde_json::to_vec(&super::MaskTally { columns, values }).ok()
    }
}

/// How long a session's reading of the catalog is trusted (relations made by other
/// sessions since are of unknown source until it is read again).
const CATALOG_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a credential's password.
pub type PasswordSource = Arc<
    dyn Fn(&crate::policy::model::Credential) -> Result<zeroize::Zeroizing<String>, String>
        + Send
        + Sync,
>;

fn push_frame(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

impl Relay {
    pub fn new(limits: TokenizerLimits, budget: BufferBudget, resolver: Resolver) -> Relay {
        let nonce: u64 = rand::random();
        Relay {
            client: Tokenizer::new(Direction::ToServer, limits)
                .with_streamed(b"d")
                .with_budget(budget.clone()),
            server: Tokenizer::new(Direction::ToClient, limits)
                .with_streamed(b"Dd")
                .with_budget(budget.clone()),
            holding: None,
            hold_asked: None,
            notices: Vec::new(),
            keepalives: 0,
            limits,
            budget,
            cancel_key: None,
            cancel_of: None,
            conv: Conversation::new(),
            analyzer: Analyzer::new(512),
            resolver,
            applied: None,
            state: State::Starting,
            nonce: format!("auditor-blocked-{nonce:016x}"),
            substitutes: HashMap::new(),
            next_substitute: 0,
            cycles: std::collections::VecDeque::new(),
            discarding: false,
            client_streaming: Streaming::Forward,
            verdicts: HashMap::new(),
            to_server: Vec::with_capacity(8192),
            to_client: Vec::with_capacity(8192),
            refused: Vec::new(),
            close: None,
            strip_channel_binding: false,
            relay_when_ready: false,
            startup_over: false,
            login: None,
            masking: None,
            held: Vec::new(),
            mask_key: Arc::from(&b""[..]),
            masked_values: 0,
            mask_tallies: Vec::new(),
            copy_query_ok: false,
            copy_pending: None,
            encoding_embeds_ascii: false,
            server_streamed_next: None,
            password_of: Arc::new(|c| {
                super::login::read_password(c, &crate::workload::kubernetes::SecretStore::default())
            }),
        }
    }

    /// The session's policies, once resolved.
    pub fn applied(&self) -> Option<&Arc<Applied>> {
        self.applied.as_ref()
    }

    /// The session as its startup packet and the server describe it.
    pub fn meta(&self) -> &crate::conversation::SessionMeta {
        &self.conv.meta
    }

    /// Client bytes waiting behind a held statement.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Whether statements are judged (an enforce policy applies).
    pub fn enforcing(&self) -> bool {
        self.state == State::Enforcing && !self.relay_when_ready
    }

    pub fn closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether this connection only carries a CancelRequest.
    pub fn is_cancel(&self) -> bool {
        self.conv.phase() == Phase::CancelRequest
    }

    /// Ends the connection: `to_client` gets a FATAL error first.
    fn fail(&mut self, sqlstate: &str, message: String) {
        if self.state == State::Closed {
            return;
        }
        encode_error(&mut self.to_client, false, "FATAL", sqlstate, &message, &[]);
        self.close = Some(message);
        self.state = State::Closed;
    }

    /// A session no policy enforces is only relayed once its start-up is over, from a
    /// point where neither direction is inside a message.
    fn maybe_relay(&mut self) {
        if self.relay_when_ready
            && self.startup_over
            && self.client.at_boundary()
            && self.server.at_boundary()
        {
            self.relay_when_ready = false;
            self.state = State::Relaying;
        }
    }

    /// Bytes from the client.
    pub fn on_client(&mut self, data: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        self.maybe_relay();
        if self.state == State::Relaying {
            self.to_server.extend_from_slice(data);
            return;
        }
        if self.holding.is_some() {
            // Behind a held statement: nothing goes on until it is decided.
            self.held.extend_from_slice(data);
            return;
        }
        if let Some(m) = &self.masking {
            let quiet = self.cycles.is_empty()
                && self.conv.idle()
                && self.client.at_boundary()
                && self.conv.phase() == Phase::Ready
                && self.conv.transaction_status() != b'E'
                && !self.discarding;
            let old = m.read_at.is_some_and(|t| t.elapsed() > CATALOG_MAX_AGE);
            if m.building.is_none() && (m.stale || old) && quiet && !data.is_empty() {
                self.read_catalog();
            }
            if self
                .masking
                .as_ref()
                .is_some_and(|m| m.building.is_some() || m.describing_copy())
            {
                self.held.extend_from_slice(data);
                return;
            }
        }
        let mut tokenizer = std::mem::replace(
            &mut self.client,
            Tokenizer::new(Direction::ToServer, TokenizerLimits::default()),
        );
        let mut tokens: Vec<Token<'_>> = Vec::new();
        let start = tokenizer.offset();
        let res = tokenizer.push(data, &mut |t| tokens.push(t));
        for t in tokens {
            let end = match &t {
                Token::Message { span, .. } => Some(span.end),
                _ => None,
            };
            self.on_client_token(t, &mut tokenizer);
            if self.state == State::Closed {
                break;
            }
            let describing = self.masking.as_ref().is_some_and(|m| m.describing_copy());
            if let (Some(end), true) = (end, self.holding.is_some() || describing) {
                // Held (or a COPY's columns are asked): what follows the message waits,
                // as bytes, and is read again once it is decided (by a tokenizer at that
                // message's end).
                let from = end.saturating_sub(start) as usize;
                self.held
                    .extend_from_slice(data.get(from..).unwrap_or_default());
                tokenizer = Tokenizer::typed(Direction::ToServer, self.limits)
                    .with_streamed(b"d")
                    .with_budget(self.budget.clone())
                    .starting_at(end);
                self.client = tokenizer;
                return;
            }
        }
        self.client = tokenizer;
        if let Err(e) = res {
            self.fail(
                "08P01",
                format!("auditor proxy: malformed message from the client: {e}"),
            );
        }
    }

    /// Holds a client message for approval: nothing of it or after it goes on until
    /// [`Relay::end_hold`].
    fn begin_hold(
        &mut self,
        tag: u8,
        body: &[u8],
        m: &FrontendMessage<'_>,
        decision: Decision,
        sql: String,
    ) {
        let (binding, params) = match m {
            FrontendMessage::Bind {
                statement,
                param_formats,
                params,
                ..
            } => {
                let types: Vec<u32> = self
                    .conv
                    .statement(&String::from_utf8_lossy(statement))
                    .map(|st| match st.description.get() {
                        Some(d) => d.param_types.to_vec(),
                        None => st.declared_types.to_vec(),
                    })
                    .unwrap_or_default();
                (
                    crate::approvals::binding(&sql, Some((param_formats.0, params.raw()))),
                    Some(
                        params
                            .iter()
                            .enumerate()
                            .map(|(i, v)| HeldParam {
                                value: v.map(<[u8]>::to_vec),
                                binary: param_formats.format_of(i) == 1,
                                type_oid: types.get(i).copied().unwrap_or(0),
                            })
                            .collect(),
                    ),
                )
            }
            _ => (
                crate::approvals::binding(&crate::approvals::query_binding_text(&sql), None),
                None,
            ),
        };
        let tables = self
            .analyzer
            .analyze(&sql)
            .facts(&sql)
            .map(|f| {
                f.tables
                    .iter()
                    .map(|t| {
                        if t.schema.is_empty() {
                            t.name.clone()
                        } else {
                            format!("{}.{}", t.schema, t.name)
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.hold_asked = Some(HoldAsk {
            decision: decision.clone(),
            sql: sql.clone(),
            params,
            binding,
            tables,
        });
        self.holding = Some(Held {
            tag,
            body: body.to_vec(),
            decision,
            sql,
        });
    }

    /// Whether a statement is held for approval.
    pub fn holding(&self) -> bool {
        self.holding.is_some()
    }

    /// A NOTICE for the client (written where the server's stream is between messages).
    pub fn notice(&mut self, message: &str, detail: Option<&str>, hint: Option<&str>) {
        let mut fields: Vec<(u8, &str)> = Vec::new();
        if let Some(d) = detail {
            fields.push((b'D', d));
        }
        if let Some(h) = hint {
            fields.push((b'H', h));
        }
        encode_notice(&mut self.notices, message, &fields);
        if self.server.at_boundary() {
            let n = std::mem::take(&mut self.notices);
            self.to_client.extend_from_slice(&n);
        }
    }

    /// The decision on the held statement: it goes to the server unchanged, or the client
    /// gets an error in its place; then what the client sent after it is read.
    pub fn end_hold(&mut self, end: HoldEnd) {
        let Some(h) = self.holding.take() else {
            return;
        };
        if self.state == State::Closed {
            return;
        }
        match end {
            HoldEnd::Approved => match frontend::decode(h.tag, &h.body) {
                Ok(m) => {
                    let mut ignored = Vec::new();
                    self.conv
                        .on_frontend(m, 0, &mut self.analyzer, &mut ignored);
                    push_frame(&mut self.to_server, h.tag, &h.body);
                    self.cycle_end(h.tag);
                }
                Err(e) => {
                    return self.fail(
                        "08P01",
                        format!("auditor proxy: malformed message from the client: {e}"),
                    )
                }
            },
            HoldEnd::Refused {
                sqlstate,
                message,
                detail,
            } => {
                let mut decision = h.decision;
                decision.message = detail;
                self.substitute(
                    h.tag,
                    Refusal {
                        decision,
                        sql: h.sql,
                        headline: Some(message),
                        sqlstate,
                    },
                );
            }
        }
        let rest = std::mem::take(&mut self.held);
        if !rest.is_empty() {
            self.on_client(&rest);
        }
    }

    /// While a statement is held: an empty query, so that the server's
    /// idle_in_transaction_session_timeout and idle_session_timeout do not end the session
    /// (only when nothing else is in flight; its answer never reaches the client).
    pub fn keepalive(&mut self) {
        let quiet = self.holding.is_some()
            && self.keepalives == 0
            && self.cycles.is_empty()
            && self.conv.idle()
            && self.server.at_boundary()
            && !self.discarding
            && self.conv.phase() == Phase::Ready
            && self.state == State::Enforcing
            && self.masking.as_ref().is_none_or(|m| m.building.is_none());
        if quiet {
            push_frame(&mut self.to_server, b'Q', &[0]);
            self.keepalives += 1;
        }
    }

    /// The session ends while a statement is held (the daemon stops): the client is told
    /// why before the connection closes.
    pub fn abandon_hold(&mut self, message: &str) {
        if self.holding.take().is_some() {
            self.held.clear();
            let n = std::mem::take(&mut self.notices);
            if self.server.at_boundary() {
                self.to_client.extend_from_slice(&n);
            }
            self.fail("57P01", message.to_string());
        }
    }

    fn on_client_token(&mut self, t: Token<'_>, tokenizer: &mut Tokenizer) {
        match t {
            Token::Startup { body, .. } => self.on_startup(&body, tokenizer),
            Token::Message { tag, body, .. } => self.on_client_message(tag, &body),
            Token::Header { tag, body_len, .. } => self.on_client_header(tag, body_len),
            Token::Chunk { data, .. } => {
                if self.client_streaming == Streaming::Forward {
                    self.to_server.extend_from_slice(data);
                }
            }
            Token::EncryptionReply { .. } => {}
        }
    }

    fn on_startup(&mut self, body: &[u8], tokenizer: &mut Tokenizer) {
        let m = match frontend::decode_startup(body) {
            Ok(m) => m,
            Err(e) => {
                return self.fail(
                    "08P01",
                    format!("auditor proxy: malformed startup packet: {e}"),
                )
            }
        };
        let mut ignored = Vec::new();
        match &m {
            FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
                // Encryption the proxy does not offer: the client goes on in plaintext
                // (or gives up, as sslmode=require does) with its next packet.
                self.conv.on_startup(&m, 0, &mut ignored);
                self.conv.on_encryption_reply(b'N');
                self.to_client.push(b'N');
                tokenizer.expect_startup();
            }
            FrontendMessage::CancelRequest { pid, key } => {
                // Passed on to where the client was going: the key is the server's, so
                // it cancels the backend that issued it. (The driver also cancels a
                // statement of that session held for approval.)
                self.cancel_of = Some(cancel_digest(*pid, key.0));
                self.conv.on_startup(&m, 0, &mut ignored);
                self.forward_startup(body);
                self.state = State::Relaying;
            }
            FrontendMessage::Startup { .. } => {
                self.conv.on_startup(&m, 0, &mut ignored);
                let applied = (self.resolver)(&self.conv.meta);
                let enforce = applied.mode == Mode::Enforce;
                let credential = applied.credential.clone();
                self.applied = Some(applied);
                if let Some((policy, c)) = credential {
                    // The proxy logs in with the policy's credential: the server gets its
                    // role, the client never an authentication request.
                    match (self.password_of)(&c) {
                        Ok(password) => {
                            self.login = Some(super::login::Login::new(password));
                            self.forward_startup_as(&m, &c.user);
                        }
                        Err(e) => {
                            return self.fail(
                                "28000",
                                format!("auditor proxy: the credential of policy \"{policy}\" cannot be read: {e}"),
                            )
                        }
                    }
                } else {
                    self.forward_startup(body);
                }
                // Authentication is passed through either way; statements are judged
                // only if a policy enforces (else relayed from the first ReadyForQuery).
                self.state = State::Enforcing;
                self.relay_when_ready = !enforce;
                if enforce {
                    self.start_masking();
                }
            }
            _ => {}
        }
    }

    /// The client's startup packet with its user name replaced by `user` (added if it
    /// named none), encoded by the shared codec.
    fn forward_startup_as(&mut self, m: &FrontendMessage<'_>, user: &str) {
        let FrontendMessage::Startup { protocol, params } = m else {
            return;
        };
        let mut params: Vec<(&[u8], &[u8])> = params
            .iter()
            .filter(|(k, _)| *k != b"user")
            .copied()
            .collect();
        params.insert(0, (b"user", user.as_bytes()));
        FrontendMessage::Startup {
            protocol: *protocol,
            params,
        }
        .encode(&mut self.to_server);
    }

    fn forward_startup(&mut self, body: &[u8]) {
        self.to_server
            .extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        self.to_server.extend_from_slice(body);
    }

    fn on_client_header(&mut self, tag: u8, body_len: u32) {
        let judged = matches!(tag, b'Q' | b'P' | b'B' | b'F');
        if self.discarding && tag != b'S' {
            self.client_streaming = Streaming::Drop;
            return;
        }
        if judged && self.conv.phase() == Phase::Ready && !self.relay_when_ready {
            // Too large to hold and judge: refused (fail closed).
            let refusal = Refusal::blocked(
                Decision {
                    action: crate::policy::Action::Block,
                    enforce: true,
                    policy: self
                        .applied
                        .as_ref()
                        .map(|a| a.name.to_string())
                        .unwrap_or_default(),
                    rule: "too-large-to-judge".into(),
                    columns: Vec::new(),
                    message: Some(format!(
                        "the message ({body_len} bytes) is larger than the proxy judges"
                    )),
                },
                String::new(),
            );
            self.client_streaming = Streaming::Drop;
            self.substitute(tag, refusal);
            return;
        }
        self.client_streaming = Streaming::Forward;
        self.to_server.push(tag);
        self.to_server
            .extend_from_slice(&(body_len + 4).to_be_bytes());
    }

    fn on_client_message(&mut self, tag: u8, body: &[u8]) {
        if self.discarding {
            if tag == b'S' {
                self.discarding = false;
                self.forward_client(tag, body);
                self.cycle_end(tag);
            }
            return;
        }
        if self.conv.phase() == Phase::Authenticating
            && self.state == State::Enforcing
            && !self.relay_when_ready
            && tag != b'p'
        {
            // A request sent before the session is ready (pipelined after the startup
            // packet): held, and judged once it is.
            push_frame(&mut self.held, tag, body);
            return;
        }
        if self.login.is_some() && self.conv.phase() != Phase::Ready {
            // The proxy authenticates this session itself: the client was asked nothing.
            return;
        }
        if self.conv.phase() != Phase::Ready || self.relay_when_ready {
            // Authentication (passed through untouched: the proxy never reads a password),
            // or a session no policy enforces.
            self.forward_client(tag, body);
            return;
        }
        let m = match frontend::decode(tag, body) {
            Ok(m) => m,
            Err(e) => {
                // What the proxy cannot read it cannot judge: the server might read it
                // otherwise.
                return self.fail(
                    "08P01",
                    format!("auditor proxy: malformed message from the client: {e}"),
                );
            }
        };
        let verdict = match &m {
            FrontendMessage::Query { sql } => {
                let sql = String::from_utf8_lossy(sql);
                // A COPY is rewritten only when it comes alone, with nothing in flight
                // (its columns are asked first, in its place).
                self.copy_pending = None;
                self.copy_query_ok = self.masking.as_ref().is_some_and(|m| m.plan.is_some())
                    && self.cycles.is_empty()
                    && self.conv.idle()
                    && !self.discarding;
                let verdict = self.judge_query(&sql).map(|d| (d, sql.into_owned()));
                self.copy_query_ok = false;
                verdict
            }
            FrontendMessage::Parse { sql, .. } => {
                let sql = String::from_utf8_lossy(sql);
                self.judge_text(&sql, false).map(|d| (d, sql.into_owned()))
            }
            FrontendMessage::Bind { statement, .. } => {
                let name = String::from_utf8_lossy(statement);
                match self.conv.statement(&name).cloned() {
                    Some(st) => self.judge_prepared(&st).map(|d| (d, st.sql.to_string())),
                    // Unknown to the server too: it answers with an error.
                    None => None,
                }
            }
            FrontendMessage::FunctionCall { oid, .. } => {
                let facts = Facts::function_call();
                let sql = format!("<function call {oid}>");
                let judged = self
                    .applied
                    .as_ref()
                    .and_then(|a| {
                        a.judge(&Statement {
                            sql: &sql,
                            facts: Some(&facts),
                            multi: false,
                        })
                    })
                    .filter(|d| d.enforce);
                // Its result is no row the proxy can mask: refused where masking applies.
                let masking = self
                    .masking
                    .as_ref()
                    .and_then(|m| m.rules.first())
                    .map(|r| Decision {
                        action: crate::policy::Action::Block,
                        enforce: true,
                        policy: r.policy.to_string(),
                        rule: r.name.to_string(),
                        columns: Vec::new(),
                        message: Some("a function call's result cannot be masked".into()),
                    });
                judged.or(masking).map(|d| (d, sql))
            }
            _ => None,
        };
        match verdict {
            Some((decision, sql)) if decision.action == crate::policy::Action::Hold => {
                if tag == b'P' {
                    // Preparing runs nothing: the hold is at the Bind that would run it
                    // (which carries the values the approval binds).
                    let mut ignored = Vec::new();
                    self.conv
                        .on_frontend(m, 0, &mut self.analyzer, &mut ignored);
                    push_frame(&mut self.to_server, tag, body);
                    return;
                }
                self.begin_hold(tag, body, &m, decision, sql);
            }
            Some((decision, sql)) => self.substitute(tag, Refusal::blocked(decision, sql)),
            None if tag == b'Q' && self.copy_pending.is_some() => {
                if let Some(copy) = self.copy_pending.take() {
                    self.describe_copy(copy, body);
                }
            }
            None => {
                let mut ignored = Vec::new();
                self.conv
                    .on_frontend(m, 0, &mut self.analyzer, &mut ignored);
                push_frame(&mut self.to_server, tag, body);
                self.cycle_end(tag);
            }
        }
    }

    fn cycle_end(&mut self, tag: u8) {
        if matches!(tag, b'S' | b'Q' | b'F') && self.conv.phase() == Phase::Ready {
            self.cycles.push_back(self.next_substitute);
        }
    }

    fn forward_client(&mut self, tag: u8, body: &[u8]) {
        if let Ok(m) = frontend::decode(tag, body) {
            let mut ignored = Vec::new();
            self.conv
                .on_frontend(m, 0, &mut self.analyzer, &mut ignored);
        }
        push_frame(&mut self.to_server, tag, body);
    }

    /// The enforced verdict on one statement text.
    fn judge_text(&mut self, sql: &str, multi: bool) -> Option<Decision> {
        let applied = self.applied.as_ref()?;
        let analysis = self.analyzer.analyze(sql);
        let facts = analysis.facts(sql);
        let d = applied
            .judge(&Statement { sql, facts, multi })
            .filter(|d| d.enforce);
        let Some(m) = self.masking.as_deref_mut() else {
            // No masking here: a mask decision is refused (fail closed).
            return d;
        };
        if d.as_ref()
            .is_some_and(|d| d.action != crate::policy::Action::Mask)
        {
            return d;
        }
        let refuse = |m: &Masking, i: usize, why: String| {
            let r = m.rules.get(i).or(m.rules.first());
            Some(Decision {
                action: crate::policy::Action::Block,
                enforce: true,
                policy: r.map(|r| r.policy.to_string()).unwrap_or_default(),
                rule: r.map(|r| r.name.to_string()).unwrap_or_default(),
                columns: Vec::new(),
                message: Some(why),
            })
        };
        let Some(f) = facts else {
            return d;
        };
        if f.ddl {
            m.stale = true;
        }
        if let Some(why) = m.broken.clone() {
            return refuse(
                m,
                0,
                format!("this session's masking cannot be applied: {why}"),
            );
        }
        match &m.plan {
            None => refuse(
                m,
                0,
                format!(
                    "the proxy could not read the catalog to mask this session's results: {}",
                    m.failed.as_deref().unwrap_or("not read yet")
                ),
            ),
            Some(plan) => {
                // Detectors that look in every column see every COPY's rows too.
                let everywhere = m.rules.iter().any(|r| r.everywhere().is_some());
                if f.copies_data && (everywhere || super::mask::touches(plan, f)) {
                    let copy = super::copy::copy_out(sql);
                    if matches!(copy, Ok(Some(_))) && (multi || !self.copy_query_ok) {
                        return refuse(m, 0, "it is a COPY the proxy would have to rewrite, sent with other statements or requests (send it alone, as a simple query)".into());
                    }
                    match copy {
                        Ok(Some(c)) => {
                            if self.encoding_embeds_ascii {
                                return refuse(m, 0, "it is a COPY the proxy would have to rewrite, in a client encoding whose characters may hold ASCII bytes".into());
                            }
                            // Judged as the query whose rows it writes.
                            let inner = self.analyzer.analyze(&c.query);
                            let Some(g) = inner.facts(&c.query) else {
                                return refuse(m, 0, "its COPY's query cannot be read".into());
                            };
                            if let Some((i, why)) = super::mask::refusal(plan, &m.rules, g) {
                                return refuse(m, i, why);
                            }
                            self.copy_pending = Some(c);
                            return None;
                        }
                        Ok(None) => {}
                        Err(why) => {
                            return refuse(
                                m,
                                0,
                                format!("it is a COPY the proxy cannot rewrite to mask: {why}"),
                            );
                        }
                    }
                }
                match super::mask::refusal(plan, &m.rules, f) {
                    Some((i, why)) => refuse(m, i, why),
                    None => None,
                }
            }
        }
    }

    /// A COPY of masked data: its columns are asked first (Parse, Describe and Sync of
    /// the unnamed statement, which the client's Query would replace anyway); the Query
    /// waits, and what follows it.
    fn describe_copy(&mut self, copy: super::copy::CopyOut, body: &[u8]) {
        let Some(m) = self.masking.as_deref_mut() else {
            return;
        };
        let mut query = Vec::new();
        push_frame(&mut query, b'Q', body);
        let mut parse = vec![0u8];
        parse.extend_from_slice(copy.query.as_bytes());
        parse.push(0);
        parse.extend_from_slice(&0u16.to_be_bytes());
        push_frame(&mut self.to_server, b'P', &parse);
        push_frame(&mut self.to_server, b'D', b"S\0");
        push_frame(&mut self.to_server, b'S', &[]);
        m.copy = Some(CopyStage::Describing {
            copy,
            query,
            columns: None,
        });
    }

    /// The client's COPY enters the conversation: sent to the server (its columns are
    /// known), or not (its query failed as the COPY would have, and that error and the
    /// ReadyForQuery after it answer it).
    fn release_copy_query(&mut self, query: &[u8], send: bool) {
        if let Ok(m) = frontend::decode(b'Q', query.get(5..).unwrap_or_default()) {
            let mut ignored = Vec::new();
            self.conv
                .on_frontend(m, 0, &mut self.analyzer, &mut ignored);
        }
        if send {
            self.to_server.extend_from_slice(query);
        }
        self.cycle_end(b'Q');
    }

    /// A message answering the proxy's description of a COPY's query: consumed (its
    /// error is the COPY's). Returns whether it was.
    fn on_copy_describe_message(&mut self, tag: u8, body: &[u8]) -> bool {
        let Some(m) = self.masking.as_deref_mut() else {
            return false;
        };
        let Some(CopyStage::Describing { columns, .. }) = m.copy.as_mut() else {
            return false;
        };
        match tag {
            b'1' | b't' | b'n' | b'N' => true,
            b'T' => {
                if let Ok(backend::BackendMessage::RowDescription(f)) = backend::decode(tag, body) {
                    *columns = Some(crate::conversation::columns_of(&f).to_vec());
                }
                true
            }
            b'E' => {
                // The COPY's query fails: the COPY would have failed the same way (and
                // left a transaction block failed the same way). The error answers it.
                if let Some(CopyStage::Describing { query, .. }) = m.copy.take() {
                    self.release_copy_query(&query, false);
                }
                false
            }
            b'Z' => {
                self.end_copy_describe();
                true
            }
            // Asynchronous messages belong to the session.
            _ => false,
        }
    }

    /// The COPY's columns are known: masked ones get rewritten, or the COPY goes as it is
    /// (nothing masked), or it is refused (no columns to rewrite).
    fn end_copy_describe(&mut self) {
        let Some(m) = self.masking.as_deref_mut() else {
            return;
        };
        let Some(CopyStage::Describing {
            copy,
            query,
            columns,
        }) = m.copy.take()
        else {
            return;
        };
        let refuse = |m: &Masking, why: &str| {
            let r = m.rules.first();
            Decision {
                action: crate::policy::Action::Block,
                enforce: true,
                policy: r.map(|r| r.policy.to_string()).unwrap_or_default(),
                rule: r.map(|r| r.name.to_string()).unwrap_or_default(),
                columns: Vec::new(),
                message: Some(why.to_string()),
            }
        };
        let sql = String::from_utf8_lossy(
            query
                .get(5..query.len().saturating_sub(1))
                .unwrap_or_default(),
        )
        .into_owned();
        let (Some(plan), Some(mut cols)) = (m.plan.as_ref(), columns) else {
            let d = refuse(m, "its COPY returns no columns the proxy could rewrite");
            self.substitute(b'Q', Refusal::blocked(d, sql));
            return;
        };
        let computed = match self.analyzer.analyze(&copy.query).facts(&copy.query) {
            Some(g) => super::mask::computed_masks(plan, g, cols.len()),
            None => super::mask::Computed::All,
        };
        let binary = copy.format == super::copy::Format::Binary;
        for c in &mut cols {
            c.format = i16::from(binary);
        }
        let Some(masks) = super::mask::result_masks(plan, &m.rules, &cols, &computed) else {
            // Nothing in it is masked: it runs as it is.
            self.release_copy_query(&query, true);
            return;
        };
        m.labels.clear();
        m.labels.extend(
            cols.iter()
                .zip(masks.iter())
                .map(|(c, mask)| mask.as_ref().map(|_| super::mask::label_of(plan, c))),
        );
        m.counts.clear();
        m.counts.resize(m.labels.len(), 0);
        m.copy = Some(CopyStage::Rewriting(super::copy::CopyRewriter::new(
            copy,
            masks,
            self.limits.max_buffered as usize,
        )));
        // Its rows come whole, to be rewritten (from the server's next bytes: its answer
        // to the Query sent now).
        self.server_streamed_next = Some(b"");
        self.release_copy_query(&query, true);
    }

    /// A message of a COPY being rewritten. Returns the body to pass on (None: nothing
    /// to pass on yet, or the connection failed).
    fn on_copy_message<'b>(&mut self, tag: u8, body: Cow<'b, [u8]>) -> Option<Cow<'b, [u8]>> {
        let Some(m) = self.masking.as_deref_mut() else {
            return Some(body);
        };
        let Some(CopyStage::Rewriting(r)) = m.copy.as_mut() else {
            return Some(body);
        };
        match tag {
            b'H' => {
                let binary = r.format() == super::copy::Format::Binary;
                if body.first() != Some(&u8::from(binary)) {
                    self.fail(
                        "08P01",
                        "auditor proxy: the server's COPY is not in the format its statement asked for".into(),
                    );
                    return None;
                }
                Some(body)
            }
            b'd' => {
                let mut out = Vec::with_capacity(body.len() + 64);
                if let Err(e) = r.data(&m.masker, &body, &mut out, &mut m.counts) {
                    self.fail(
                        "08P01",
                        format!(
                            "auditor proxy: a COPY with masked columns cannot be rewritten: {e}"
                        ),
                    );
                    return None;
                }
                if out.is_empty() {
                    return None;
                }
                Some(Cow::Owned(out))
            }
            b'c' | b'E' => {
                if tag == b'c' {
                    if let Err(e) = r.done() {
                        self.fail("08P01", format!("auditor proxy: a COPY with masked columns cannot be rewritten: {e}"));
                        return None;
                    }
                }
                let total: u64 = m.counts.iter().sum();
                self.masked_values += total;
                if let Some(json) = m.tally() {
                    self.mask_tallies.push((self.to_client.len(), json));
                }
                m.copy = None;
                m.labels.clear();
                m.counts.clear();
                self.server_streamed_next = Some(b"d");
                Some(body)
            }
            _ => Some(body),
        }
    }

    /// Masking for this session, if an enforce policy among its own has column rules: the
    /// catalog is read once the session is ready, rows are taken whole to be rewritten.
    fn start_masking(&mut self) {
        let Some(applied) = &self.applied else {
            return;
        };
        let mut rules = Vec::new();
        let mut failed = None;
        for p in applied
            .policies
            .iter()
            .filter(|p| p.policy.mode == Some(Mode::Enforce))
        {
            for r in &p.policy.mask {
                if r.columns.is_empty() && r.detectors.is_empty() && r.patterns.is_empty() {
                    continue;
                }
                match super::mask::Rule::of(&p.policy.name, r) {
                    Ok(rule) => rules.push(rule),
                    // (The linter refuses such a policy; were one loaded, its session
                    // masks nothing it cannot: every statement is refused.)
                    Err(e) => failed = Some(format!("mask rule `{}`: {e}", r.name)),
                }
            }
        }
        if rules.is_empty() && failed.is_none() {
            return;
        }
        self.server.set_streamed(b"d");
        self.masking = Some(Box::new(Masking {
            rules,
            masker: super::mask::Masker::new(&self.mask_key),
            plan: None,
            failed: None,
            broken: failed,
            building: None,
            stale: true,
            read_at: None,
            current: None,
            labels: Vec::new(),
            counts: Vec::new(),
            copy: None,
        }));
    }

    /// Asks the server about the catalog, inside the session, while nothing else is in
    /// flight; the client's bytes wait until the answer is in.
    fn read_catalog(&mut self) {
        let Some(m) = self.masking.as_deref_mut() else {
            return;
        };
        match super::mask::catalog_query(&m.rules) {
            Some(sql) => {
                let mut body = sql.into_bytes();
                body.push(0);
                push_frame(&mut self.to_server, b'Q', &body);
                m.building = Some(super::mask::PlanBuilder::default());
                m.stale = false;
            }
            None => {
                m.failed = Some("a mask rule names a column that cannot be quoted".into());
                m.stale = false;
            }
        }
    }

    /// A message answering the proxy's catalog query: consumed. Returns whether it was.
    fn on_catalog_message(&mut self, tag: u8, body: &[u8]) -> bool {
        let Some(m) = self.masking.as_deref_mut() else {
            return false;
        };
        let Some(b) = m.building.as_mut() else {
            return false;
        };
        match tag {
            b'D' => b.row(body, &m.rules),
            b'E' => {
                let why = backend::decode(tag, body)
                    .ok()
                    .and_then(|msg| match msg {
                        backend::BackendMessage::ErrorResponse(f) => {
                            let e = f.summary();
                            Some(format!("{} {}", e.code, e.message))
                        }
                        _ => None,
                    })
                    .unwrap_or_else(|| "an error".into());
                b.error = Some(why);
            }
            b'Z' => {
                let done = m.building.take().map(super::mask::PlanBuilder::finish);
                match done {
                    Some(Ok(plan)) => {
                        m.plan = Some(plan);
                        m.failed = None;
                        m.read_at = Some(std::time::Instant::now());
                    }
                    Some(Err(e)) => {
                        tracing::warn!("proxy: reading the catalog for masking failed: {e}");
                        if m.plan.is_none() {
                            m.failed = Some(e);
                        }
                        // Tried again at the next quiet moment.
                        m.stale = true;
                    }
                    None => {}
                }
            }
            // Its columns, completion, notices: the client never sees them.
            b'T' | b'C' | b'N' | b'I' => {}
            // Asynchronous messages belong to the session.
            _ => return false,
        }
        true
    }

    /// The masks of the result now arriving, computed at its first row.
    fn current_masks(&mut self) -> Option<Arc<[Option<super::mask::ColumnMask>]>> {
        let m = self.masking.as_deref_mut()?;
        if let Some(c) = &m.current {
            return c.clone();
        }
        let plan = m.plan.as_ref()?;
        let (sql, columns) = self.conv.rows_source().unwrap_or((None, None));
        let n = columns.as_ref().map_or(0, |c| c.len());
        let (touching, computed) = match &sql {
            Some(sql) => {
                let a = self.analyzer.analyze(sql);
                match a.facts(sql) {
                    Some(f) => (
                        super::mask::touches(plan, f),
                        super::mask::computed_masks(plan, f, n),
                    ),
                    None => (true, super::mask::Computed::All),
                }
            }
            None => (true, super::mask::Computed::All),
        };
        m.labels.clear();
        m.counts.clear();
        let masks = match columns {
            Some(cols) => {
                let masks = super::mask::result_masks(plan, &m.rules, &cols, &computed);
                if let Some(masks) = &masks {
                    m.labels.extend(
                        cols.iter()
                            .zip(masks.iter())
                            .map(|(c, mask)| mask.as_ref().map(|_| super::mask::label_of(plan, c))),
                    );
                    m.counts.resize(m.labels.len(), 0);
                }
                masks
            }
            // Rows of a result the proxy has no description of, in a statement that
            // reads masked data (or anywhere detectors look in every column): they
            // cannot be rewritten (the row is refused, below).
            None if touching || m.rules.iter().any(|r| r.everywhere().is_some()) => {
                Some(Arc::from(Vec::new()))
            }
            None => None,
        };
        m.current = Some(masks.clone());
        masks
    }

    /// Whether the request the server answers now may read masked values (None: it does
    /// not), and whether its lineage is unknown.
    fn answering_masked(&mut self) -> Option<bool> {
        let Some(plan) = self.masking.as_ref().and_then(|m| m.plan.as_ref()) else {
            return self.masking.as_ref().map(|_| true);
        };
        match self.conv.current_sql() {
            Some(sql) => {
                let a = self.analyzer.analyze(&sql);
                match a.facts(&sql) {
                    Some(f) => {
                        super::mask::touches(plan, f).then(|| super::mask::masks_computed(plan, f))
                    }
                    None => Some(true),
                }
            }
            None => Some(true),
        }
    }

    /// A simple query: refused whole if any of its statements is, held whole if any is
    /// held and none refused (the strictest verdict of its statements: an approval of one
    /// never lets another that a rule refuses through).
    fn judge_query(&mut self, sql: &str) -> Option<Decision> {
        let parts = split_statements(sql);
        let multi = parts.len() > 1;
        if parts.is_empty() {
            return self.judge_text(sql, false);
        }
        let mut strictest: Option<Decision> = None;
        for p in &parts {
            if let Some(d) = self.judge_text(p, multi) {
                if strictest.as_ref().is_none_or(|s| d.action > s.action) {
                    strictest = Some(d);
                }
            }
        }
        strictest
    }

    fn judge_prepared(&mut self, st: &Arc<PreparedStatement>) -> Option<Decision> {
        let key = Arc::as_ptr(st) as usize;
        if let Some((_, d)) = self.verdicts.get(&key) {
            return d.clone();
        }
        let d = self.judge_text(&st.sql, false);
        if self.verdicts.len() >= 4096 {
            self.verdicts.clear();
        }
        self.verdicts.insert(key, (st.clone(), d.clone()));
        d
    }

    /// Sends the server a request that fails in place of the refused message `tag`.
    fn substitute(&mut self, tag: u8, refusal: Refusal) {
        let seq = self.next_substitute;
        self.next_substitute += 1;
        let marker = format!("{}-{seq}", self.nonce);
        let mut ignored = Vec::new();
        let mut msg = Vec::new();
        if matches!(tag, b'Q' | b'F') {
            // The simple protocol's cycle: an error, then ReadyForQuery.
            let sql = format!("SELECT '{marker}'::pg_catalog.int4");
            let mut body = sql.into_bytes();
            body.push(0);
            push_frame(&mut msg, b'Q', &body);
            if let Ok(m) = frontend::decode(b'Q', &msg[5..]) {
                self.conv
                    .on_frontend(m, 0, &mut self.analyzer, &mut ignored);
            }
        } else {
            // Extended protocol: a Bind of a statement that does not exist fails without
            // touching any statement or portal; the server then skips until Sync.
            let mut body = Vec::new();
            body.push(0); // unnamed portal
            body.extend_from_slice(marker.as_bytes());
            body.push(0);
            body.extend_from_slice(&0u16.to_be_bytes()); // parameter formats
            body.extend_from_slice(&0u16.to_be_bytes()); // parameters
            body.extend_from_slice(&0u16.to_be_bytes()); // result formats
            push_frame(&mut msg, b'B', &body);
            if let Ok(m) = frontend::decode(b'B', &msg[5..]) {
                self.conv
                    .on_frontend(m, 0, &mut self.analyzer, &mut ignored);
            }
            self.discarding = true;
        }
        self.to_server.extend_from_slice(&msg);
        self.substitutes.insert(seq, refusal.clone());
        self.refused.push(refusal);
        if matches!(tag, b'Q' | b'F') {
            self.cycle_end(b'Q');
        }
    }

    /// Bytes from the server.
    pub fn on_server(&mut self, data: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        self.maybe_relay();
        if self.state == State::Relaying {
            self.to_client.extend_from_slice(data);
            return;
        }
        let mut tokenizer = std::mem::replace(
            &mut self.server,
            Tokenizer::new(Direction::ToClient, TokenizerLimits::default()),
        );
        let mut tokens: Vec<Token<'_>> = Vec::new();
        let res = tokenizer.push(data, &mut |t| tokens.push(t));
        for t in tokens {
            self.on_server_token(t);
            if self.state == State::Closed {
                break;
            }
        }
        self.server = tokenizer;
        if let Some(tags) = self.server_streamed_next.take() {
            self.server.set_streamed(tags);
        }
        if let Err(e) = res {
            self.fail(
                "08P01",
                format!("auditor proxy: the server answered out of protocol: {e}"),
            );
        }
        if !self.notices.is_empty() && self.server.at_boundary() {
            let n = std::mem::take(&mut self.notices);
            self.to_client.extend_from_slice(&n);
        }
        // Requests held while the session was not ready, or while the catalog was read.
        let reading = self
            .masking
            .as_ref()
            .is_some_and(|m| m.building.is_some() || m.describing_copy());
        if !self.held.is_empty()
            && self.holding.is_none()
            && !reading
            && self.conv.phase() == Phase::Ready
            && self.state == State::Enforcing
        {
            let held = std::mem::take(&mut self.held);
            self.on_client(&held);
        }
    }

    fn on_server_token(&mut self, t: Token<'_>) {
        match t {
            Token::Message { tag, body, .. } => self.on_server_message(tag, body),
            Token::Header { tag, body_len, .. } => {
                if tag == b'd'
                    && self
                        .masking
                        .as_ref()
                        .is_some_and(|m| matches!(m.copy, Some(CopyStage::Rewriting(_))))
                {
                    return self.fail(
                        "54000",
                        format!("auditor proxy: a COPY row of {body_len} bytes with masked columns is larger than the proxy rewrites (proxy.max_message_bytes)"),
                    );
                }
                if tag == b'D' {
                    if self.masking.is_some() && self.current_masks().is_some() {
                        // Larger than the proxy holds, so it cannot be rewritten: never
                        // forwarded.
                        return self.fail(
                            "54000",
                            format!("auditor proxy: a row of {body_len} bytes with masked columns is larger than the proxy rewrites (proxy.max_message_bytes)"),
                        );
                    }
                    self.conv.on_data_rows(1);
                }
                self.to_client.push(tag);
                self.to_client
                    .extend_from_slice(&(body_len + 4).to_be_bytes());
            }
            Token::Chunk { data, .. } => self.to_client.extend_from_slice(data),
            Token::Startup { .. } | Token::EncryptionReply { .. } => {}
        }
    }

    fn on_server_message(&mut self, tag: u8, body: Cow<'_, [u8]>) {
        // Whether an error or notice is scrubbed depends on the request it answers:
        // decided before the conversation moves past it.
        let mut scrub = None;
        let mut body = body;
        if self.masking.is_some() {
            if self.on_catalog_message(tag, &body) || self.on_copy_describe_message(tag, &body) {
                return;
            }
            body = match self.on_copy_message(tag, body) {
                Some(b) => b,
                None => return,
            };
            if matches!(tag, b'E' | b'N') {
                scrub = self.answering_masked();
            }
            if tag == b'D' {
                if let Some(masks) = self.current_masks() {
                    let res = match self.masking.as_deref_mut() {
                        Some(m) => {
                            m.masker
                                .rewrite_row(&body, &masks, &mut self.to_client, &mut m.counts)
                        }
                        None => Ok(0),
                    };
                    match res {
                        Ok(n) => {
                            self.masked_values += u64::from(n);
                            self.conv.on_data_rows(1);
                        }
                        Err(e) => self.fail(
                            "08P01",
                            format!(
                                "auditor proxy: a row with masked columns cannot be rewritten: {e}"
                            ),
                        ),
                    }
                    return;
                }
            } else if let Some(m) = self.masking.as_deref_mut() {
                // The result ends (or a notice interrupts it): what was masked in it goes
                // on record just before this message.
                if m.current.take().flatten().is_some() {
                    if let Some(json) = m.tally() {
                        self.mask_tallies.push((self.to_client.len(), json));
                    }
                }
            }
        }
        let m = match backend::decode(tag, &body) {
            Ok(m) => m,
            Err(e) => {
                return self.fail(
                    "08P01",
                    format!("auditor proxy: the server answered out of protocol: {e}"),
                )
            }
        };
        if let backend::BackendMessage::ParameterStatus { name, value } = &m {
            if *name == b"client_encoding" {
                self.encoding_embeds_ascii =
                    super::copy::encoding_embeds_ascii(&String::from_utf8_lossy(value));
            }
        }
        if self.keepalives > 0 && matches!(tag, b'I' | b'Z') {
            // The answer to the proxy's keepalive: the client never asked.
            if tag == b'Z' {
                self.keepalives -= 1;
            }
            return;
        }
        let mut replaced = false;
        if let backend::BackendMessage::ErrorResponse(fields) = &m {
            if !self.substitutes.is_empty() {
                if let Some(seq) = fields.get(b'M').and_then(|msg| self.substitute_of(msg)) {
                    if let Some(r) = self.substitutes.remove(&seq) {
                        self.write_refusal(&r);
                        replaced = true;
                    }
                }
            }
        }
        if tag == b'R' {
            if let Some(login) = &mut self.login {
                match login.on_request(&body) {
                    super::login::Answer::Server(msg) => {
                        self.to_server.extend_from_slice(&msg);
                        return;
                    }
                    super::login::Answer::Ok => self.login = None,
                    super::login::Answer::Fail(why) => {
                        let policy = self
                            .applied
                            .as_ref()
                            .and_then(|a| a.credential.as_ref())
                            .map(|(p, _)| p.to_string())
                            .unwrap_or_default();
                        return self.fail(
                            "28000",
                            format!("auditor proxy: logging in with the credential of policy \"{policy}\" failed: {why}"),
                        );
                    }
                }
            }
        }
        let ready = matches!(m, backend::BackendMessage::ReadyForQuery { .. });
        if let backend::BackendMessage::BackendKeyData { pid, key } = &m {
            self.cancel_key = Some(cancel_digest(*pid, key.0));
        }
        let mut ignored = Vec::new();
        self.conv.on_backend(&m, 0, &mut ignored);
        if tag == b'R' && self.strip_channel_binding && body.get(..4) == Some(&[0, 0, 0, 10]) {
            if let Some(list) = super::tls::without_channel_binding(&body[4..]) {
                let mut b = vec![0, 0, 0, 10];
                b.extend_from_slice(&list);
                push_frame(&mut self.to_client, tag, &b);
                return;
            }
        }
        if ready && self.relay_when_ready {
            self.startup_over = true;
        }
        if ready {
            // Every substitute sent before this cycle ended is answered or was skipped (a
            // failed transaction answers 25P02 before reaching it).
            if let Some(end) = self.cycles.pop_front() {
                self.substitutes.retain(|seq, _| *seq >= end);
            }
        }
        if ready {
            let first = self
                .masking
                .as_ref()
                .is_some_and(|m| m.plan.is_none() && m.building.is_none() && m.failed.is_none());
            if first {
                self.read_catalog();
            }
        }
        if replaced {
            return;
        }
        if let Some(unknown) = scrub {
            // Code the proxy cannot follow (a DO block under on_unknown: mask, a trigger)
            // and notices may say anything: their whole message is hidden then.
            let whole = unknown || tag == b'N' || super::mask::raised_by_code(&body);
            let scrubbed = super::mask::scrub_notice(&body, whole);
            push_frame(&mut self.to_client, tag, &scrubbed);
            return;
        }
        if matches!(tag, b'E' | b'N') {
            // Whatever a message echoes, detectors find their values in it too.
            if let Some(m) = self.masking.as_deref() {
                if let Some(found) = super::mask::scan_notice(&m.masker, &m.rules, &body) {
                    push_frame(&mut self.to_client, tag, &found);
                    return;
                }
            }
        }
        push_frame(&mut self.to_client, tag, &body);
    }

    fn substitute_of(&self, msg: &[u8]) -> Option<u64> {
        let text = std::str::from_utf8(msg).ok()?;
        let at = text.find(self.nonce.as_str())? + self.nonce.len();
        let rest = text[at..].strip_prefix('-')?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    }

    fn write_refusal(&mut self, r: &Refusal) {
        let d = &r.decision;
        let message = match &r.headline {
            Some(h) => h.clone(),
            None => refusal_message(&d.policy, &d.rule),
        };
        let mut extra: Vec<(u8, &str)> = Vec::new();
        if let Some(m) = &d.message {
            extra.push((b'D', m.as_str()));
        }
        encode_error(
            &mut self.to_client,
            false,
            "ERROR",
            r.sqlstate,
            &message,
            &extra,
        );
    }
}

/// A NOTICE (SQLSTATE 00000, as `RAISE NOTICE` sends).
fn encode_notice(out: &mut Vec<u8>, message: &str, fields: &[(u8, &str)]) {
    encode_error(out, true, "NOTICE", "00000", message, fields);
}

const REFUSAL_PREFIX: &str = "statement blocked by policy \"";

/// The message of the proxy's refusal (what the client and the trail show).
pub fn refusal_message(policy: &str, rule: &str) -> String {
    format!("{REFUSAL_PREFIX}{policy}\" (rule \"{rule}\")")
}

/// The policy and rule named by a refusal's message, if it is one.
pub fn parse_refusal(message: &str) -> Option<(&str, &str)> {
    let rest = message.strip_prefix(REFUSAL_PREFIX)?;
    let (policy, rest) = rest.split_once("\" (rule \"")?;
    let rule = rest.strip_suffix("\")")?;
    Some((policy, rule))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pg::tokenizer::frame;

    const HOLD: &str = "name: p\nselector: {}\nmode: enforce\nrequire_approval:\n  - name: ddl\n    when: {ddl: true}\n";

    /// A relay under a policy that holds DDL, its session started and ready.
    fn ready_relay() -> Relay {
        ready_relay_with(HOLD)
    }

    fn ready_relay_with(policy: &str) -> Relay {
        let mut report = crate::policy::LintReport::default();
        let set = crate::policy::PolicySet::new(crate::policy::load_str(
            std::path::Path::new("p.yaml"),
            policy,
            &mut report,
        ));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let labels = std::collections::BTreeMap::new();
        let applied = Arc::new(set.resolve(
            &crate::policy::Subject {
                labels: &labels,
                db_user: "u",
                database: "d",
                application_name: "",
                client_addr: None,
                server_addr: None,
                server_port: 5432,
            },
            crate::policy::Defaults::default(),
        ));
        let mut relay = Relay::new(
            TokenizerLimits::default(),
            BufferBudget::new(1 << 20),
            Box::new(move |_| applied.clone()),
        );
        let mut startup = Vec::new();
        FrontendMessage::Startup {
            protocol: 196608,
            params: vec![(b"user", b"u"), (b"database", b"d")],
        }
        .encode(&mut startup);
        relay.on_client(&startup);
        let mut ready = frame(b'R', &[0, 0, 0, 0]);
        ready.extend(frame(b'Z', b"I"));
        relay.on_server(&ready);
        relay.to_server.clear();
        relay.to_client.clear();
        assert!(relay.enforcing());
        relay
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        frame(b'Q', &body)
    }

    #[test]
    fn a_held_statement_and_what_follows_wait_for_the_decision() {
        let mut relay = ready_relay();
        // Pipelined: a query that passes, the held one, another after it (split oddly).
        let mut bytes = query("SELECT 1");
        bytes.extend(query("DROP TABLE t"));
        bytes.extend(query("SELECT 2"));
        let (a, b) = bytes.split_at(bytes.len() - 3);
        relay.on_client(a);
        relay.on_client(b);
        assert_eq!(relay.to_server, query("SELECT 1"));
        let ask = relay.hold_asked.take().expect("held");
        assert_eq!(ask.sql, "DROP TABLE t");
        assert_eq!(ask.decision.rule, "ddl");
        assert_eq!(ask.binding, crate::approvals::binding("DROP TABLE t", None));
        assert!(relay.holding());
        relay.to_server.clear();
        // A notice reaches the client between the server's messages.
        relay.notice("waits", None, Some("approve it"));
        assert_eq!(relay.to_client[0], b'N');
        relay.to_client.clear();
        // The first query's answer goes by meanwhile; the keepalive waits for quiet.
        relay.keepalive();
        assert!(relay.to_server.is_empty());
        let mut answer = frame(b'C', b"SELECT 1\0");
        answer.extend(frame(b'Z', b"I"));
        relay.on_server(&answer);
        assert_eq!(relay.to_client, answer);
        relay.to_client.clear();
        // Now quiet: an empty query, whose answer the client never sees.
        relay.keepalive();
        assert_eq!(relay.to_server, query(""));
        relay.to_server.clear();
        let mut empty = frame(b'I', &[]);
        empty.extend(frame(b'Z', b"I"));
        relay.on_server(&empty);
        assert!(relay.to_client.is_empty());
        // Approved: the held query goes out unchanged, then the one behind it.
        relay.end_hold(HoldEnd::Approved);
        let mut expect = query("DROP TABLE t");
        expect.extend(query("SELECT 2"));
        assert_eq!(relay.to_server, expect);
        assert!(!relay.holding());
    }

    #[test]
    fn a_query_string_is_held_only_if_nothing_in_it_is_refused() {
        // DDL is held; a DELETE without WHERE is refused: the string is refused whole,
        // never held (an approval would have let the DELETE through).
        let policy =
            format!("{HOLD}block:\n  - name: unbounded\n    when: {{without_where: true}}\n");
        let mut relay = ready_relay_with(&policy);
        relay.on_client(&query("DROP TABLE t; DELETE FROM u"));
        assert!(relay.hold_asked.is_none());
        assert!(!relay.holding());
        assert_eq!(relay.refused.len(), 1);
        assert_eq!(relay.refused[0].decision.rule, "unbounded");
        assert!(!String::from_utf8_lossy(&relay.to_server).contains("DROP"));
    }

    #[test]
    fn a_refused_hold_answers_the_client_with_its_error() {
        let mut relay = ready_relay();
        let mut bytes = query("DROP TABLE t");
        bytes.extend(query("SELECT 2"));
        relay.on_client(&bytes);
        assert!(relay.to_server.is_empty());
        relay.hold_asked.take().expect("held");
        relay.end_hold(HoldEnd::Refused {
            sqlstate: BLOCKED_SQLSTATE,
            message: "statement denied by alice (request 1)".into(),
            detail: Some("not now".into()),
        });
        // A substitute that fails in its place, then the next query.
        let sent = String::from_utf8_lossy(&relay.to_server).into_owned();
        assert!(sent.contains("auditor-blocked-"), "{sent}");
        assert!(sent.ends_with("SELECT 2\0"), "{sent}");
        assert!(!sent.contains("DROP"), "{sent}");
        // The server's error for the substitute becomes the denial.
        let marker = sent.split('\'').nth(1).expect("marker").to_string();
        let mut err = Vec::new();
        encode_error(
            &mut err,
            false,
            "ERROR",
            "22P02",
            &format!("invalid input syntax for type integer: \"{marker}\""),
            &[],
        );
        err.extend(frame(b'Z', b"I"));
        relay.on_server(&err);
        let to_client = String::from_utf8_lossy(&relay.to_client).into_owned();
        assert!(
            to_client.contains("statement denied by alice"),
            "{to_client}"
        );
        assert!(to_client.contains("42501"), "{to_client}");
        assert!(to_client.contains("not now"), "{to_client}");
        assert!(!to_client.contains(&marker), "{to_client}");
    }

    #[test]
    fn an_extended_hold_is_at_the_bind_with_its_values() {
        let mut relay = ready_relay();
        let mut parse = b"s1\0ALTER TABLE t ADD c int\0".to_vec();
        parse.extend(0u16.to_be_bytes());
        let mut bind = b"\0s1\0".to_vec();
        bind.extend(0u16.to_be_bytes());
        bind.extend(0u16.to_be_bytes());
        bind.extend(0u16.to_be_bytes());
        let mut bytes = frame(b'P', &parse);
        bytes.extend(frame(b'S', &[]));
        relay.on_client(&bytes);
        // Preparing runs nothing: passed on.
        assert_eq!(relay.to_server, bytes);
        assert!(!relay.holding());
        relay.to_server.clear();
        let mut answer = frame(b'1', &[]);
        answer.extend(frame(b'Z', b"I"));
        relay.on_server(&answer);
        let mut run = frame(b'B', &bind);
        run.extend(frame(b'E', b"\0\0\0\0\0"));
        run.extend(frame(b'S', &[]));
        relay.on_client(&run);
        assert!(relay.to_server.is_empty());
        let ask = relay.hold_asked.take().expect("held at the Bind");
        assert_eq!(ask.sql, "ALTER TABLE t ADD c int");
        assert_eq!(ask.params.as_ref().map(Vec::len), Some(0));
        relay.end_hold(HoldEnd::Approved);
        assert_eq!(relay.to_server, run);
    }

    #[test]
    fn refusal_messages_round_trip() {
        let m = refusal_message("agents", "no-ddl");
        assert_eq!(
            m,
            "statement blocked by policy \"agents\" (rule \"no-ddl\")"
        );
        assert_eq!(parse_refusal(&m), Some(("agents", "no-ddl")));
        assert_eq!(parse_refusal("permission denied for table t"), None);
    }
}
