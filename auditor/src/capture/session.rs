//! One captured Postgres session: the capture path's driver of the conversation model.
//!
//! Bytes of both directions in (as the kernel handed them over), audit drafts out. What
//! is particular to watching from the side lives here and not in the conversation: lost
//! bytes and picking the stream up again at a message boundary, joining a connection in
//! the middle, TLS whose plaintext comes from library hooks (or never), messages too large
//! to read, and the flags that say so on the events.

use crate::{
    audit::event::{EventKind, Flag, Flags},
    audit::recorder::{kind_event, Draft, Recorder, RecordingPolicy},
    capture::stream,
    conversation::{Conversation, Outcome, Phase, SessionMeta},
    pg::{
        backend::{self, ErrorFields},
        frontend,
        tokenizer::Skip,
        Direction, Token, Tokenizer, TokenizerLimits,
    },
    proxy::MaskTally,
    sql::Analyzer,
    text::Text,
};

/// Counters a session adds to.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionCounters {
    pub parse_errors: u64,
    pub unmatched_responses: u64,
    /// Protocol messages framed, both directions.
    pub messages: u64,
}

/// How much of a message read in parts is kept to record it: its beginning (the SQL text
/// of a Query or Parse, the names in a Bind, the fields of an error).
pub const PARTIAL_PREFIX: usize = 64 << 10;

/// A message read in parts (larger than `max_message_bytes`, or with bytes of it lost):
/// its beginning, and whether all of it went by.
struct Partial {
    tag: u8,
    body_len: u32,
    prefix: Vec<u8>,
    /// Bytes of it that were not captured.
    lost: u64,
}

impl Partial {
    fn new(tag: u8, body_len: u32) -> Self {
        Partial {
            tag,
            body_len,
            prefix: Vec::new(),
            lost: 0,
        }
    }

    fn take(&mut self, data: &[u8]) {
        let room = PARTIAL_PREFIX.saturating_sub(self.prefix.len());
        self.prefix.extend_from_slice(&data[..room.min(data.len())]);
    }

    /// The whole body is in `prefix`.
    fn complete(&self) -> bool {
        self.lost == 0 && self.prefix.len() == self.body_len as usize
    }
}

pub struct Session {
    conversation: Conversation,
    /// Per direction, a message being read in parts (not DataRow or CopyData, which are
    /// only counted).
    partial: [Option<Partial>; 2],
    recorder: Recorder,
    tokenizers: [Tokenizer; 2],
    /// After a gap, the direction waits for a syscall boundary that looks like a message.
    resyncing: [bool; 2],
    parse_errors: u64,
    messages: u64,
    /// Flags for the next statement event (gap_before, mid_stream).
    next_flags: Flags,
    mid_stream: bool,
    /// Declared unreadable: no end of the connection delivers plaintext.
    unreadable: bool,
    started_emitted: bool,
    limits: TokenizerLimits,
    outcomes: Vec<Outcome>,
    /// Statements answered whose ReadyForQuery has not come yet: their events wait for
    /// the transaction status it reports (`tx_status`), in order. Anything else this
    /// session records lets them go first, without it (see [`Session::release_held`]).
    held: Vec<Draft>,
    /// When the first of `held` was held (kernel ns).
    held_since: Option<i128>,
    /// ReadyForQuery messages seen when `held` was last released.
    readies: u64,
    /// What the proxy masked in the result now ending (proxied sessions): given to the
    /// next statement recorded, the one the result belongs to.
    masked: Option<MaskTally>,
    /// The pushing direction's tokenizer turns opaque once its push is over (the server
    /// agreed to encrypt).
    opaque_after_push: bool,
}

/// Statements that wait for their ReadyForQuery, at most: a client that pipelines more
/// without a Sync has the first of them recorded without their transaction status.
const MAX_HELD: usize = 64;

impl Session {
    pub fn new(policy: RecordingPolicy, limits: TokenizerLimits, mid_stream: bool) -> Self {
        Session {
            conversation: if mid_stream {
                Conversation::joined_mid_stream()
            } else {
                Conversation::new()
            },
            recorder: Recorder::new(policy),
            partial: [None, None],
            tokenizers: Self::tokenizers(limits, mid_stream),
            // Joining mid-stream: wait for a syscall boundary that looks like a message.
            resyncing: [mid_stream, mid_stream],
            parse_errors: 0,
            messages: 0,
            next_flags: if mid_stream {
                Flag::MidStream.into()
            } else {
                Flags::empty()
            },
            mid_stream,
            unreadable: false,
            started_emitted: false,
            limits,
            outcomes: Vec::new(),
            held: Vec::new(),
            held_since: None,
            readies: 0,
            masked: None,
            opaque_after_push: false,
        }
    }

    fn tokenizers(limits: TokenizerLimits, typed: bool) -> [Tokenizer; 2] {
        [
            stream::tokenizer(Direction::ToServer, limits, typed),
            stream::tokenizer(Direction::ToClient, limits, typed),
        ]
    }

    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    pub fn meta(&self) -> &SessionMeta {
        &self.conversation.meta
    }

    /// Database user and database learnt elsewhere (a session older than the daemon):
    /// kept unless the startup packet named them.
    pub fn recover_meta(&mut self, db_user: crate::text::Text, database: crate::text::Text) {
        if !self.conversation.startup_seen() {
            self.conversation.meta.db_user = db_user;
            self.conversation.meta.database = database;
        }
    }

    pub fn startup_error(&self) -> Option<&ErrorFields> {
        self.conversation.startup_error.as_ref()
    }

    pub fn counters(&self) -> SessionCounters {
        SessionCounters {
            parse_errors: self.parse_errors,
            unmatched_responses: self.conversation.counters.unmatched_responses,
            messages: self.messages,
        }
    }

    /// See [`Conversation::carry_in`].
    pub fn carry_in(
        &mut self,
        meta: crate::conversation::SessionMeta,
        statements: &[(String, String)],
        analyzer: &mut Analyzer,
    ) {
        self.conversation.carry_in(meta, statements, analyzer);
    }

    /// See [`Conversation::learn_prepared`].
    pub fn learn_prepared(&mut self, name: &str, sql: &str, analyzer: &mut Analyzer) -> bool {
        self.conversation.learn_prepared(name, sql, analyzer)
    }

    /// When the oldest statement still waiting for its answer began (kernel ns).
    pub fn oldest_pending_ns(&self) -> Option<i128> {
        let held = self.held.iter().map(|d| d.ts_ns).min();
        match (self.conversation.oldest_pending_ns(), held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The client sent Terminate: nothing more can follow on this connection.
    pub fn terminated(&self) -> bool {
        self.conversation.phase() == Phase::Terminated
    }

    /// Whether the bytes still to come are ones this session can decode, so the other end
    /// of a local connection is no longer needed: the startup packet went by in the clear
    /// (or the session was joined mid-stream), and no encryption is being set up.
    pub fn settled(&self) -> bool {
        matches!(
            self.conversation.phase(),
            Phase::Authenticating | Phase::Ready | Phase::Terminated
        )
    }

    /// The server accepted TLS (or the stream was joined mid-stream and is TLS records):
    /// what follows on the socket is ciphertext.
    pub fn awaiting_plaintext(&self) -> bool {
        matches!(self.conversation.phase(), Phase::Encrypted { .. })
    }

    pub fn is_unreadable(&self) -> bool {
        self.unreadable
    }

    /// A connection joined mid-stream whose bytes are TLS records.
    pub fn assume_tls(&mut self) {
        self.conversation.assume_tls();
        self.tokenizers[0].make_opaque();
        self.tokenizers[1].make_opaque();
    }

    /// Plaintext from a TLS hook starts here: the conversation resumes as if it had never
    /// been encrypted (a startup packet first, unless the session was joined mid-stream
    /// and never saw one).
    pub fn begin_plaintext(&mut self) {
        let typed = self.mid_stream && !self.conversation.startup_seen();
        if typed {
            // Stay where a mid-stream conversation is: matching from the next request.
            self.conversation.begin_plaintext(false);
        } else {
            self.conversation.begin_plaintext(true);
        }
        self.tokenizers = Self::tokenizers(self.limits, typed);
    }

    /// Plaintext from a TLS hook that was attached late (the process was already talking):
    /// decoding resumes at the first message boundary, as for a connection joined
    /// mid-stream.
    pub fn begin_plaintext_late(&mut self) {
        self.conversation.begin_plaintext(false);
        self.mid_stream = true;
        self.tokenizers = Self::tokenizers(self.limits, true);
        self.resyncing = [true, true];
        self.next_flags.insert(Flag::MidStream);
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
        self.conversation.phase() == Phase::CancelRequest
    }

    /// `bytes` of `direction` were lost here. Inside a message whose header went by, the
    /// framing survives: the message is recorded from what came of it (flagged
    /// `truncated`) and decoding goes on at the next message. Otherwise decoding resumes
    /// at the next plausible boundary, and requests in flight are lost.
    pub fn gap(
        &mut self,
        direction: Direction,
        bytes: u64,
        ts: i128,
        analyzer: &mut Analyzer,
        out: &mut Vec<Draft>,
    ) {
        let d = direction.index();
        self.next_flags.insert(Flag::GapBefore);
        if self.resyncing[d] {
            self.resync(direction, ts);
            return self.drain_outcomes(ts, out);
        }
        let (converted, ended, framing) = match self.tokenizers[d].skip(bytes) {
            Skip::Inside {
                converted,
                ends_message,
            } => (converted, ends_message, true),
            Skip::PastMessage { converted } => (converted, true, false),
            Skip::FramingLost => (None, false, false),
        };
        if let Some(c) = converted {
            if is_counted_only(direction, c.tag) {
                let header = Token::Header {
                    tag: c.tag,
                    body_len: c.body_len,
                    span: c.span,
                };
                self.on_token(direction, header, ts, analyzer, out);
            } else {
                let mut p = Partial::new(c.tag, c.body_len);
                p.take(&c.body);
                self.partial[d] = Some(p);
            }
        }
        if let Some(p) = &mut self.partial[d] {
            p.lost += bytes;
        }
        if ended {
            // The message is over: recorded from what came of it.
            self.finish_partial(direction, ts, analyzer);
            self.drain_outcomes(ts, out);
        }
        if !framing {
            self.resync(direction, ts);
            self.drain_outcomes(ts, out);
        }
    }

    /// Bytes of `direction` were lost, how many is unknown: what was being read is cut
    /// short, and decoding resumes at the next plausible boundary.
    pub fn lost_unknown(&mut self, direction: Direction, ts: i128, out: &mut Vec<Draft>) {
        self.resync(direction, ts);
        self.drain_outcomes(ts, out);
    }

    /// Decoding resumes at the next plausible boundary of `direction`.
    fn resync(&mut self, direction: Direction, ts: i128) {
        let d = direction.index();
        self.resyncing[d] = true;
        self.tokenizers[d].resync_typed();
        self.next_flags.insert(Flag::GapBefore);
        self.partial[d] = None;
        match direction {
            // Responses to requests we never saw would be matched to the wrong ones.
            Direction::ToServer => self.conversation.requests_lost(),
            // Answers may have been lost: those in flight end here, unknown.
            Direction::ToClient => self.conversation.answers_lost(ts, &mut self.outcomes),
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
        // Each token is handled as the tokenizer gives it out (handed over in place: a
        // token copied into a queue first was read back with wide loads over the narrow
        // stores that built it, a store-forwarding stall per message). The tokenizer is
        // out of the session meanwhile; what the tokens ask of it is done once it is back.
        // Rows and COPY data are only counted: runs of them travel as counts before the
        // token that follows them (a result of thousands of rows is a few counts here).
        let mut tokenizer = std::mem::replace(
            &mut self.tokenizers[d],
            Tokenizer::new(direction, self.limits),
        );
        let mut counted = Counted::default();
        // Bodies streamed past are only counted (rows, COPY data); the parts of other
        // messages read in parts are kept.
        let mut keep_chunks = self.partial[d].is_some();
        let result = tokenizer.push(data, &mut |t| match t {
            Token::Chunk { .. } if !keep_chunks => {}
            Token::Message { tag, .. } if is_counted_only(direction, tag) => counted.add(tag),
            Token::Header { tag, .. } if is_counted_only(direction, tag) => {
                keep_chunks = false;
                counted.add(tag)
            }
            t => {
                if matches!(t, Token::Header { .. }) {
                    keep_chunks = true;
                }
                if counted.any() {
                    self.on_counted(std::mem::take(&mut counted));
                }
                match t {
                    Token::Message { tag, body, .. } => {
                        self.on_message(direction, tag, &body, ts_ns, analyzer, out)
                    }
                    t => self.on_token(direction, t, ts_ns, analyzer, out),
                }
            }
        });
        if std::mem::take(&mut self.opaque_after_push) {
            tokenizer.make_opaque();
        }
        self.tokenizers[d] = tokenizer;
        self.on_counted(counted);
        if result.is_err() {
            self.parse_errors += 1;
            // Try again at a later boundary rather than going silent for good.
            self.resync(direction, ts_ns);
            self.drain_outcomes(ts_ns, out);
        }
    }

    /// Messages only counted: rows go to the statement they belong to.
    fn on_counted(&mut self, c: Counted) {
        self.messages += c.rows + c.other;
        if c.rows > 0 {
            self.conversation.on_data_rows(c.rows);
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
        let token = match token {
            Token::Message { tag, body, .. } => {
                return self.on_message(direction, tag, &body, ts, analyzer, out)
            }
            t => t,
        };
        self.messages += 1;
        match (direction, token) {
            (Direction::ToServer, Token::Startup { body, .. }) => {
                match frontend::decode_startup(&body) {
                    Ok(m) => self.conversation.on_startup(&m, ts, &mut self.outcomes),
                    Err(_) => self.parse_errors += 1,
                }
                if matches!(
                    self.conversation.phase(),
                    Phase::NegotiatingEncryption { .. }
                ) {
                    self.tokenizers[Direction::ToClient.index()].expect_encryption_reply();
                }
            }
            (Direction::ToClient, Token::EncryptionReply { reply, .. }) => {
                self.conversation.on_encryption_reply(reply);
                if self.awaiting_plaintext() {
                    // This direction's tokenizer is out while its tokens are handled
                    // (`push`): it turns opaque once back.
                    self.tokenizers[Direction::ToServer.index()].make_opaque();
                    self.opaque_after_push = true;
                } else {
                    // Refused: the client continues in plaintext with a startup packet.
                    self.tokenizers[Direction::ToServer.index()].expect_startup();
                }
            }
            (Direction::ToServer, Token::Header { tag, body_len, .. })
                if !is_counted_only(direction, tag) =>
            {
                // A request too large to buffer: its beginning is kept to record it.
                self.partial[0] = Some(Partial::new(tag, body_len));
                if body_len == 0 {
                    self.finish_partial(direction, ts, analyzer);
                }
            }
            (Direction::ToClient, Token::Header { tag, body_len, .. })
                if !is_counted_only(direction, tag) =>
            {
                self.partial[1] = Some(Partial::new(tag, body_len));
                if body_len == 0 {
                    self.finish_partial(direction, ts, analyzer);
                }
            }
            (_, Token::Chunk { data, last }) => {
                if let Some(p) = &mut self.partial[direction.index()] {
                    p.take(data);
                    if last {
                        self.finish_partial(direction, ts, analyzer);
                    }
                }
            }
            _ => {}
        }
        self.drain_outcomes(ts, out);
    }

    /// A whole typed message: the most frequent token, its tag and body handed on as they
    /// are (a `Token` moved whole is read back with wide loads over the narrow stores
    /// that built it: a store-forwarding stall per message).
    fn on_message(
        &mut self,
        direction: Direction,
        tag: u8,
        body: &[u8],
        ts: i128,
        analyzer: &mut Analyzer,
        out: &mut Vec<Draft>,
    ) {
        self.messages += 1;
        match direction {
            Direction::ToServer => match frontend::decode(tag, body) {
                Ok(m) => self
                    .conversation
                    .on_frontend(m, ts, analyzer, &mut self.outcomes),
                Err(_) => self.parse_errors += 1,
            },
            Direction::ToClient => match backend::decode(tag, body) {
                Ok(m) => self.conversation.on_backend(&m, ts, &mut self.outcomes),
                Err(_) => self.parse_errors += 1,
            },
        }
        self.drain_outcomes(ts, out);
    }

    #[inline]
    fn drain_outcomes(&mut self, ts: i128, out: &mut Vec<Draft>) {
        // Most messages end nothing (a row, a header): no work for them.
        if !self.outcomes.is_empty() {
            self.record_outcomes(ts, out);
        }
        if self.conversation.readies().0 != self.readies {
            self.on_ready(out);
        }
    }

    #[inline(never)]
    fn record_outcomes(&mut self, ts: i128, out: &mut Vec<Draft>) {
        let mut outcomes = std::mem::take(&mut self.outcomes);
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::SessionStarted { ts_ns } => self.emit_start(ts_ns, out),
                other => {
                    let Some(mut draft) = self.recorder.record(other, &mut self.next_flags) else {
                        continue;
                    };
                    if let Some(t) = self.masked.take() {
                        draft.event.masked_columns = t.columns.into();
                        draft.event.masked_values = t.values.into();
                        draft.event.decision = Text::Static("masked");
                    }
                    // No ReadyForQuery is to come for a statement whose answer will not:
                    // it goes now, after those waiting.
                    let unanswered = draft.event.flags.contains(Flag::ResponseLost)
                        || draft.event.flags.contains(Flag::NoResponse);
                    if unanswered || self.held.len() >= MAX_HELD {
                        self.release_held(out);
                    }
                    if unanswered {
                        out.push(draft);
                        continue;
                    }
                    if self.held.is_empty() {
                        self.held_since = Some(ts);
                    }
                    self.held.push(draft);
                }
            }
        }
        self.outcomes = outcomes;
    }

    /// The server is ready for a query: the statements answered before it are over, in
    /// the transaction status it reports.
    #[inline(never)]
    fn on_ready(&mut self, out: &mut Vec<Draft>) {
        let (readies, status) = self.conversation.readies();
        self.readies = readies;
        let status = Text::Static(tx_status_name(status));
        for d in &mut self.held {
            d.event.tx_status = status.clone();
        }
        self.release_held(out);
    }

    /// Statements still waiting for their ReadyForQuery go on without their transaction
    /// status: what is recorded next (a gap, a session's end, an approval) comes after
    /// them, or they waited long enough (see [`Session::held_since`]).
    pub fn release_held(&mut self, out: &mut Vec<Draft>) {
        out.append(&mut self.held);
        self.held_since = None;
    }

    /// What the proxy masked in a result, just before the message that ends it: kept for
    /// that statement's event (a portal fetched in pieces, or a result a notice
    /// interrupted, adds up).
    pub fn add_mask_tally(&mut self, tally: MaskTally) {
        let kept = self.masked.get_or_insert_with(|| MaskTally {
            columns: Vec::new(),
            values: Vec::new(),
        });
        for (column, n) in tally.columns.into_iter().zip(tally.values) {
            match kept.columns.iter().position(|c| *c == column) {
                Some(i) => kept.values[i] += n,
                None => {
                    kept.columns.push(column);
                    kept.values.push(n);
                }
            }
        }
    }

    /// Since when (kernel ns) statements wait for their ReadyForQuery, if any do.
    pub fn held_since(&self) -> Option<i128> {
        self.held_since
    }

    fn emit_start(&mut self, ts: i128, out: &mut Vec<Draft>) {
        if self.started_emitted {
            return;
        }
        self.release_held(out);
        self.started_emitted = true;
        let mut ev = kind_event(EventKind::SessionStart);
        if self.unreadable {
            let gss = matches!(self.conversation.phase(), Phase::Encrypted { gss: true });
            ev.flags.insert(if gss {
                Flag::GssencUnreadable
            } else {
                Flag::TlsUnreadable
            });
        }
        if self.mid_stream {
            ev.flags.insert(Flag::MidStream);
        }
        out.push(Draft::new(ts, ev));
    }

    /// Makes sure a session_start precedes anything else (mid-stream sessions have none).
    pub fn ensure_started(&mut self, ts: i128, out: &mut Vec<Draft>) {
        self.emit_start(ts, out);
    }

    /// A message read in parts has ended: what its beginning says goes to the conversation
    /// (a request's statement is recorded with the flag `truncated` when its text or
    /// parameters are incomplete).
    fn finish_partial(&mut self, direction: Direction, ts: i128, analyzer: &mut Analyzer) {
        let Some(p) = self.partial[direction.index()].take() else {
            return;
        };
        match direction {
            Direction::ToServer if p.complete() => match frontend::decode(p.tag, &p.prefix) {
                Ok(m) => self
                    .conversation
                    .on_frontend(m, ts, analyzer, &mut self.outcomes),
                Err(_) => self.parse_errors += 1,
            },
            Direction::ToServer => match frontend::decode_partial(p.tag, &p.prefix) {
                Some(m) => self.conversation.on_frontend_partial(
                    m,
                    p.body_len,
                    ts,
                    analyzer,
                    &mut self.outcomes,
                ),
                None => {
                    // Not even its names: responses can no longer be matched to requests.
                    self.parse_errors += 1;
                    self.conversation.requests_lost();
                }
            },
            Direction::ToClient if p.complete() => match backend::decode(p.tag, &p.prefix) {
                Ok(m) => self.conversation.on_backend(&m, ts, &mut self.outcomes),
                Err(_) => self.parse_errors += 1,
            },
            Direction::ToClient => match backend::decode_partial(p.tag, &p.prefix) {
                Some(m) => self.conversation.on_backend(&m, ts, &mut self.outcomes),
                // A huge RowDescription or notification, cut: nothing the trail needs.
                None => self.parse_errors += 1,
            },
        }
    }

    /// Requests that never got an answer, and portals left suspended (the connection
    /// ended first).
    pub fn abandon(&mut self, ts: i128, out: &mut Vec<Draft>) {
        self.release_held(out);
        self.conversation.abandon(ts, &mut self.outcomes);
        self.drain_outcomes(ts, out);
        self.release_held(out);
    }
}

/// `tx_status` for a ReadyForQuery's status byte.
fn tx_status_name(status: u8) -> &'static str {
    match status {
        b'I' => "idle",
        b'T' => "in_transaction",
        b'E' => "failed",
        _ => "",
    }
}

/// Messages whose bodies the capture only counts: DataRow, and CopyData either way.
fn is_counted_only(direction: Direction, tag: u8) -> bool {
    tag == b'd' || (direction == Direction::ToClient && tag == b'D')
}

/// A run of messages that are only counted ([`is_counted_only`]).
#[derive(Default)]
struct Counted {
    /// DataRows (from the server).
    rows: u64,
    /// CopyData, either way.
    other: u64,
}

impl Counted {
    #[inline]
    fn any(&self) -> bool {
        self.rows + self.other > 0
    }

    #[inline]
    fn add(&mut self, tag: u8) {
        if tag == b'D' {
            self.rows += 1
        } else {
            self.other += 1
        }
    }
}

#[cfg(test)]
mod tests {
    //! Session behaviour on byte streams (no kernel records): what the conversation and
    //! the recorder make of what both ends sent.
    use super::*;
    use crate::{audit::event::AuditEvent, pg::tokenizer::frame as msg};

    struct Fed {
        session: Session,
        analyzer: Analyzer,
        ts: i128,
    }

    fn feed(c: &mut Fed, direction: Direction, bytes: &[u8]) -> Vec<AuditEvent> {
        let mut drafts = Vec::new();
        c.ts += 1_000;
        c.session
            .push(direction, bytes, true, c.ts, &mut c.analyzer, &mut drafts);
        drafts.into_iter().map(|d| *d.event).collect()
    }

    fn startup() -> Vec<u8> {
        let body = b"\0\x03\0\0user\0alice\0database\0shop\0\0";
        let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    fn error(code: &str, message: &str) -> Vec<u8> {
        let body = format!("SERROR\0C{code}\0M{message}\0\0");
        msg(b'E', body.as_bytes())
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind_execute_sync(name: &str) -> Vec<u8> {
        let mut m = msg(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
        m.extend(msg(b'E', b"\0\0\0\0\0"));
        m.extend(msg(b'S', b""));
        m
    }

    /// The connection ends: what the session records then.
    fn end(c: &mut Fed) -> Vec<AuditEvent> {
        let mut drafts = Vec::new();
        c.session.abandon(c.ts + 1, &mut drafts);
        drafts.into_iter().map(|d| *d.event).collect()
    }

    /// A session past its startup and authentication.
    fn logged_in_client() -> (Fed, Vec<AuditEvent>) {
        let mut c = Fed {
            session: Session::new(
                RecordingPolicy::default(),
                TokenizerLimits::default(),
                false,
            ),
            analyzer: Analyzer::default(),
            ts: 0,
        };
        let mut out = feed(&mut c, Direction::ToServer, &startup());
        let mut ok = msg(b'R', &0u32.to_be_bytes());
        ok.extend(msg(b'Z', b"I"));
        out.extend(feed(&mut c, Direction::ToClient, &ok));
        (c, out)
    }

    #[test]
    fn a_statement_prepared_before_capture_gets_the_text_the_server_names() {
        let mut c = Fed {
            session: Session::new(RecordingPolicy::default(), TokenizerLimits::default(), true),
            analyzer: Analyzer::default(),
            ts: 0,
        };
        let done = |tag: &[u8]| {
            let mut r = msg(b'2', b"");
            r.extend(msg(b'D', b"\0\0"));
            r.extend(msg(b'C', tag));
            r.extend(msg(b'Z', b"I"));
            r
        };
        let mut out = Vec::new();
        // S1 bound and executed; the backend names its text before it answers.
        out.extend(feed(&mut c, Direction::ToServer, &bind_execute_sync("S1")));
        assert!(c
            .session
            .learn_prepared("S1", "SELECT 42 AS n", &mut c.analyzer));
        out.extend(feed(&mut c, Direction::ToClient, &done(b"SELECT 1\0")));
        // Later executions find it; another name stays unknown; news only once.
        out.extend(feed(&mut c, Direction::ToServer, &bind_execute_sync("S1")));
        out.extend(feed(&mut c, Direction::ToClient, &done(b"SELECT 1\0")));
        assert!(!c
            .session
            .learn_prepared("S1", "SELECT 42 AS n", &mut c.analyzer));
        out.extend(feed(&mut c, Direction::ToServer, &bind_execute_sync("S2")));
        out.extend(feed(&mut c, Direction::ToClient, &done(b"SELECT 1\0")));
        let stmts: Vec<&AuditEvent> = out
            .iter()
            .filter(|e| e.kind == EventKind::Statement)
            .collect();
        assert_eq!(stmts.len(), 3, "{stmts:#?}");
        for e in &stmts[..2] {
            assert_eq!(&*e.statement, "SELECT $1 AS n");
            assert!(e.flags.contains(Flag::TextFromServer), "{e:?}");
            assert!(!e.flags.contains(Flag::PreparedBeforeCapture), "{e:?}");
        }
        assert!(stmts[2].flags.contains(Flag::PreparedBeforeCapture));
        assert_eq!(&*stmts[2].statement, "");
    }

    #[test]
    fn failed_parse_keeps_its_text_and_the_name_keeps_the_old_statement() {
        let (mut c, mut out) = logged_in_client();
        let ready = msg(b'Z', b"I");
        // S1 prepared (as asyncpg and pgjdbc do: Parse, Describe, Sync).
        let mut m = parse("S1", "SELECT 1");
        m.extend(msg(b'S', b""));
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let mut r = msg(b'1', b"");
        r.extend(ready.clone());
        out.extend(feed(&mut c, Direction::ToClient, &r));
        // The same name again: refused; the server keeps the first S1.
        let mut m = parse("S1", "SELECT * FROM payroll");
        m.extend(msg(b'S', b""));
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let mut r = error("42P05", "prepared statement \"S1\" already exists");
        r.extend(ready.clone());
        out.extend(feed(&mut c, Direction::ToClient, &r));
        // S1 executed: it is the first text.
        out.extend(feed(&mut c, Direction::ToServer, &bind_execute_sync("S1")));
        let mut r = msg(b'2', b"");
        r.extend(msg(b'C', b"SELECT 1\0"));
        r.extend(ready.clone());
        out.extend(feed(&mut c, Direction::ToClient, &r));
        // Parse, Bind, Execute, Sync in one batch; the Parse fails, the rest is skipped.
        let mut m = parse("", "SELECT * FROM missing");
        m.extend(bind_execute_sync(""));
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let mut r = error("42P01", "relation \"missing\" does not exist");
        r.extend(ready.clone());
        out.extend(feed(&mut c, Direction::ToClient, &r));

        let st: Vec<&AuditEvent> = out
            .iter()
            .filter(|e| e.kind == EventKind::Statement)
            .collect();
        assert_eq!(st.len(), 3, "{out:#?}");
        assert_eq!(&*st[0].statement, "SELECT * FROM payroll");
        assert_eq!(&*st[0].error_code, "42P05");
        assert_eq!(st[0].flags, ["failed_before_execute"]);
        assert_eq!(
            &*st[1].statement, "SELECT $1",
            "the server's S1, not the refused one"
        );
        assert!(
            st[1].error_code.is_empty() && st[1].flags.is_empty(),
            "{:#?}",
            st[1]
        );
        assert_eq!(&*st[2].statement, "SELECT * FROM missing");
        assert_eq!(&*st[2].error_code, "42P01");
        assert_eq!(st[2].flags, ["failed_before_execute"]);
    }

    fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
        let mut body = format!("{portal}\0").into_bytes();
        body.extend_from_slice(&max_rows.to_be_bytes());
        msg(b'E', &body)
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        msg(
            b'B',
            format!("{portal}\0{statement}\0\0\0\0\0\0\0").as_bytes(),
        )
    }

    #[test]
    fn portal_stopped_at_its_row_limit_is_recorded_once() {
        let (mut c, mut out) = logged_in_client();
        let row = msg(b'D', b"\0\x01\0\0\0\x011");
        let sync = msg(b'S', b"");
        // asyncpg's fetchval: one row asked for, never resumed; Sync ends the transaction.
        let mut m = parse("", "SELECT name FROM t WHERE id = $1");
        m.extend(bind("", ""));
        m.extend(execute("", 1));
        m.extend(sync.clone());
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let fetchval_at = c.ts;
        let (parsed, bound, suspended) = (msg(b'1', b""), msg(b'2', b""), msg(b's', b""));
        let idle = msg(b'Z', b"I");
        let r = [&parsed, &bound, &row, &suspended, &idle].map(|m| &m[..]);
        out.extend(feed(&mut c, Direction::ToClient, &r.concat()));
        let fetchval_ended = c.ts;
        // In a transaction: a cursor-like portal fetched 1 row at a time, then to the end.
        out.extend(feed(&mut c, Direction::ToServer, &msg(b'Q', b"BEGIN\0")));
        let mut r = msg(b'C', b"BEGIN\0");
        r.extend(msg(b'Z', b"T"));
        out.extend(feed(&mut c, Direction::ToClient, &r));
        let mut m = parse("big", "SELECT * FROM generate_series(1, 3)");
        m.extend(bind("cur", "big"));
        m.extend(execute("cur", 1));
        m.extend(sync.clone());
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let cursor_at = c.ts;
        let in_tx = msg(b'Z', b"T");
        let r = [&parsed, &bound, &row, &suspended, &in_tx].map(|m| &m[..]);
        out.extend(feed(&mut c, Direction::ToClient, &r.concat()));
        let mut m = execute("cur", 0);
        m.extend(sync.clone());
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let mut r = row.clone();
        r.extend(row.clone());
        r.extend(msg(b'C', b"SELECT 2\0"));
        r.extend(msg(b'Z', b"T"));
        out.extend(feed(&mut c, Direction::ToClient, &r));
        let cursor_done = c.ts;
        // A second cursor left suspended, then closed.
        let mut m = bind("cur2", "big");
        m.extend(execute("cur2", 1));
        m.extend(sync.clone());
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let second_at = c.ts;
        let r = [&bound, &row, &suspended, &in_tx].map(|m| &m[..]);
        out.extend(feed(&mut c, Direction::ToClient, &r.concat()));
        let mut m = msg(b'C', b"Pcur2\0");
        m.extend(sync.clone());
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let closed_at = c.ts;
        out.extend(feed(&mut c, Direction::ToServer, &msg(b'Q', b"COMMIT\0")));
        let mut r = msg(b'3', b"");
        r.extend(msg(b'Z', b"T"));
        r.extend(msg(b'C', b"COMMIT\0"));
        r.extend(msg(b'Z', b"I"));
        out.extend(feed(&mut c, Direction::ToClient, &r));

        let st: Vec<&AuditEvent> = out
            .iter()
            .filter(|e| e.kind == EventKind::Statement)
            .collect();
        let summary: Vec<(&str, Option<u64>, Vec<&str>)> = st
            .iter()
            .map(|e| (&*e.statement, e.rows, e.flags.names().collect()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "SELECT name FROM t WHERE id = $1",
                    Some(1),
                    vec!["portal_suspended"]
                ),
                ("BEGIN", None, vec![]),
                ("SELECT * FROM generate_series($1, $2)", Some(3), vec![]),
                (
                    "SELECT * FROM generate_series($1, $2)",
                    Some(1),
                    vec!["portal_suspended"]
                ),
                ("COMMIT", None, vec![]),
            ],
            "{out:#?}"
        );
        // An execution begins at its first Execute, resumed or not, and the resumed
        // cursor ends at the completion of its last.
        let duration = |e: &AuditEvent| i128::from(e.duration_us) * 1000;
        assert_eq!(
            [duration(st[0]), duration(st[2]), duration(st[3])],
            [
                fetchval_ended - fetchval_at,
                cursor_done - cursor_at,
                closed_at - second_at
            ]
        );
    }

    pub(super) fn complete(tag: &str, ready: &[u8]) -> Vec<u8> {
        let mut r = msg(b'C', format!("{tag}\0").as_bytes());
        r.extend(msg(b'Z', ready));
        r
    }

    fn tx_of(events: &[AuditEvent]) -> Vec<(&str, &str)> {
        events
            .iter()
            .filter(|e| e.kind == EventKind::Statement)
            .map(|e| (&*e.command, &*e.tx_status))
            .collect()
    }

    #[test]
    fn a_statement_takes_the_transaction_status_of_the_ready_for_query_after_it() {
        let (mut c, _) = logged_in_client();
        let mut out = Vec::new();
        for (sql, tag, ready) in [
            ("BEGIN", "BEGIN", b"T"),
            ("UPDATE t SET a = 1", "UPDATE 3", b"T"),
            ("COMMIT", "COMMIT", b"I"),
        ] {
            out.extend(feed(
                &mut c,
                Direction::ToServer,
                &msg(b'Q', format!("{sql}\0").as_bytes()),
            ));
            // The command's completion alone: its event waits for the ReadyForQuery.
            let done = complete(tag, ready);
            let split = done.len() - 6;
            assert!(feed(&mut c, Direction::ToClient, &done[..split]).is_empty());
            out.extend(feed(&mut c, Direction::ToClient, &done[split..]));
        }
        // An error inside a transaction: the transaction is failed after it.
        out.extend(feed(&mut c, Direction::ToServer, &msg(b'Q', b"BEGIN\0")));
        out.extend(feed(&mut c, Direction::ToClient, &complete("BEGIN", b"T")));
        out.extend(feed(
            &mut c,
            Direction::ToServer,
            &msg(b'Q', b"SELECT 1/0\0"),
        ));
        let mut failed = error("22012", "division by zero");
        failed.extend(msg(b'Z', b"E"));
        out.extend(feed(&mut c, Direction::ToClient, &failed));
        assert_eq!(
            tx_of(&out),
            [
                ("BEGIN", "in_transaction"),
                ("UPDATE", "in_transaction"),
                ("COMMIT", "idle"),
                ("BEGIN", "in_transaction"),
                ("SELECT", "failed"),
            ]
        );
    }

    #[test]
    fn pipelined_syncs_each_give_their_own_statements_a_status() {
        let (mut c, _) = logged_in_client();
        // Two statements in one transaction block of the extended protocol, then a
        // third after the COMMIT, each behind its own Sync, all in one write.
        let mut w = parse("", "BEGIN");
        w.extend(bind_execute_sync(""));
        w.extend(parse("", "INSERT INTO t VALUES (1)"));
        w.extend(bind_execute_sync(""));
        w.extend(parse("", "COMMIT"));
        w.extend(bind_execute_sync(""));
        assert!(feed(&mut c, Direction::ToServer, &w).is_empty());
        let answer = |tag: &str, ready: &[u8]| {
            let mut r = msg(b'1', b"");
            r.extend(msg(b'2', b""));
            r.extend(complete(tag, ready));
            r
        };
        let mut r = answer("BEGIN", b"T");
        r.extend(answer("INSERT 0 1", b"T"));
        r.extend(answer("COMMIT", b"I"));
        let out = feed(&mut c, Direction::ToClient, &r);
        assert_eq!(
            tx_of(&out),
            [
                ("BEGIN", "in_transaction"),
                ("INSERT", "in_transaction"),
                ("COMMIT", "idle"),
            ]
        );
    }

    #[test]
    fn statements_whose_ready_for_query_never_comes_are_recorded_without_a_status() {
        let (mut c, _) = logged_in_client();
        // Execute and Flush, no Sync: answered, but the server is not ready for a query.
        let mut w = parse("", "SELECT 1");
        w.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        w.extend(msg(b'E', b"\0\0\0\0\0"));
        w.extend(msg(b'H', b""));
        assert!(feed(&mut c, Direction::ToServer, &w).is_empty());
        let mut r = msg(b'1', b"");
        r.extend(msg(b'2', b""));
        r.extend(msg(b'C', b"SELECT 1\0"));
        assert!(feed(&mut c, Direction::ToClient, &r).is_empty());
        assert!(c.session.held_since().is_some());
        // Held, it still counts as not yet recorded (the daemon's watermark stays before it).
        assert!(c.session.oldest_pending_ns().is_some());
        let mut out = Vec::new();
        c.session.release_held(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].event.command, "SELECT");
        assert_eq!(&*out[0].event.tx_status, "");
        assert!(c.session.held_since().is_none());
        // The connection ends after another answered statement: recorded, once.
        w = bind_execute_sync("");
        feed(&mut c, Direction::ToServer, &w);
        r = msg(b'2', b"");
        r.extend(msg(b'C', b"SELECT 1\0"));
        assert!(feed(&mut c, Direction::ToClient, &r).is_empty());
        let ended = end(&mut c);
        assert_eq!(ended.len(), 1, "{ended:#?}");
        assert_eq!(&*ended[0].tx_status, "");
        assert!(!ended[0].flags.contains(Flag::NoResponse));
    }

    #[test]
    fn function_calls_are_recorded_once_answered_or_not() {
        // FunctionCall: oid 764 (lo_open), no format codes, no arguments, text result.
        let call = msg(
            b'F',
            &[&764u32.to_be_bytes()[..], &[0, 0, 0, 0, 0, 0]].concat(),
        );
        let returned = msg(b'V', &[&4i32.to_be_bytes()[..], b"1234"].concat());
        let calls = |events: &[AuditEvent]| -> Vec<(String, Vec<&'static str>, String)> {
            events
                .iter()
                .filter(|e| e.kind == EventKind::Statement)
                .map(|e| {
                    (
                        e.command.to_string(),
                        e.flags.names().collect(),
                        e.tx_status.to_string(),
                    )
                })
                .collect()
        };
        let fc = |flags: Vec<&'static str>, tx: &str| {
            ("FUNCTION CALL".to_string(), flags, tx.to_string())
        };
        // Answered, then its ReadyForQuery, then the end: once.
        let (mut c, _) = logged_in_client();
        let mut out = feed(&mut c, Direction::ToServer, &call);
        out.extend(feed(&mut c, Direction::ToClient, &returned));
        out.extend(feed(&mut c, Direction::ToClient, &msg(b'Z', b"I")));
        out.extend(end(&mut c));
        assert_eq!(calls(&out), [fc(vec![], "idle")]);
        // Answered, the connection gone before its ReadyForQuery: once, as answered.
        let (mut c, _) = logged_in_client();
        let mut out = feed(&mut c, Direction::ToServer, &call);
        out.extend(feed(&mut c, Direction::ToClient, &returned));
        out.extend(end(&mut c));
        assert_eq!(calls(&out), [fc(vec![], "")]);
        // Never answered: recorded at the end, and says so.
        let (mut c, _) = logged_in_client();
        let mut out = feed(&mut c, Direction::ToServer, &call);
        out.extend(end(&mut c));
        assert_eq!(calls(&out), [fc(vec!["no_response"], "")]);
        // Failed: its error, once.
        let (mut c, _) = logged_in_client();
        let mut out = feed(&mut c, Direction::ToServer, &call);
        let mut failed = error("42883", "function does not exist");
        failed.extend(msg(b'Z', b"I"));
        out.extend(feed(&mut c, Direction::ToClient, &failed));
        out.extend(end(&mut c));
        assert_eq!(calls(&out), [fc(vec![], "idle")]);
        assert_eq!(out.iter().filter(|e| e.error_code == "42883").count(), 1);
    }

    #[test]
    fn a_pipeline_longer_than_held_lets_its_first_statements_go() {
        let (mut c, _) = logged_in_client();
        let n = MAX_HELD + 3;
        let mut w = Vec::new();
        let mut r = Vec::new();
        for _ in 0..n {
            w.extend(parse("", "SELECT 1"));
            w.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
            w.extend(msg(b'E', b"\0\0\0\0\0"));
            r.extend(msg(b'1', b""));
            r.extend(msg(b'2', b""));
            r.extend(msg(b'C', b"SELECT 1\0"));
        }
        w.extend(msg(b'S', b""));
        r.extend(msg(b'Z', b"I"));
        feed(&mut c, Direction::ToServer, &w);
        let out = feed(&mut c, Direction::ToClient, &r);
        let tx = tx_of(&out);
        assert_eq!(tx.len(), n);
        assert!(tx[..MAX_HELD].iter().all(|(_, s)| s.is_empty()), "{tx:?}");
        assert!(tx[MAX_HELD..].iter().all(|(_, s)| *s == "idle"), "{tx:?}");
    }
}

#[cfg(test)]
mod partial_tests {
    //! Statements larger than what is kept, and bytes lost inside a message: recorded once,
    //! with the text that came, flagged, matched to their responses.
    use super::*;
    use crate::{
        audit::event::AuditEvent,
        pg::{tokenizer::frame as msg, wire::MessageWriter},
    };

    struct Fed {
        session: Session,
        analyzer: Analyzer,
        ts: i128,
        out: Vec<AuditEvent>,
    }

    impl Fed {
        fn new(max_buffered: u32) -> Self {
            let mut c = Fed {
                session: Session::new(
                    RecordingPolicy::default(),
                    TokenizerLimits { max_buffered },
                    false,
                ),
                analyzer: Analyzer::default(),
                ts: 0,
                out: Vec::new(),
            };
            let body = b"\0\x03\0\0user\0alice\0database\0shop\0\0";
            let mut startup = (body.len() as u32 + 4).to_be_bytes().to_vec();
            startup.extend_from_slice(body);
            c.push(Direction::ToServer, &startup);
            let mut ok = msg(b'R', &0u32.to_be_bytes());
            ok.extend(msg(b'Z', b"I"));
            c.push(Direction::ToClient, &ok);
            c
        }

        fn push(&mut self, direction: Direction, bytes: &[u8]) {
            let mut drafts = Vec::new();
            self.ts += 1_000;
            self.session.push(
                direction,
                bytes,
                true,
                self.ts,
                &mut self.analyzer,
                &mut drafts,
            );
            self.out.extend(drafts.into_iter().map(|d| *d.event));
        }

        fn lose(&mut self, direction: Direction, bytes: u64) {
            let mut drafts = Vec::new();
            self.session
                .gap(direction, bytes, self.ts, &mut self.analyzer, &mut drafts);
            self.out.extend(drafts.into_iter().map(|d| *d.event));
        }

        fn statements(&self) -> Vec<&AuditEvent> {
            self.out
                .iter()
                .filter(|e| e.kind == EventKind::Statement)
                .collect()
        }
    }

    /// `SELECT 'xxx…' AS big` of `n` bytes (NUL included).
    fn big_query(n: usize) -> Vec<u8> {
        let head = b"SELECT '";
        let tail = b"' AS big\0";
        let mut sql = head.to_vec();
        sql.resize(n - tail.len(), b'x');
        sql.extend_from_slice(tail);
        msg(b'Q', &sql)
    }

    fn one_row_response() -> Vec<u8> {
        let mut r = msg(
            b'T',
            b"\0\x01big\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0",
        );
        r.extend(msg(b'D', b"\0\x01\0\0\0\x01x"));
        r.extend(msg(b'C', b"SELECT 1\0"));
        r.extend(msg(b'Z', b"I"));
        r
    }

    #[test]
    fn a_query_larger_than_kept_is_recorded_with_its_beginning() {
        let mut c = Fed::new(1 << 20);
        let q = big_query(3 << 20);
        // In pieces, as a socket delivers it.
        for part in q.chunks(200_000) {
            c.push(Direction::ToServer, part);
        }
        c.push(Direction::ToClient, &one_row_response());
        let st = c.statements();
        assert_eq!(st.len(), 1, "{:#?}", c.out);
        // The text is cut inside the literal: it does not parse.
        assert_eq!(st[0].flags, ["truncated", "unparsed"]);
        assert_eq!(st[0].message_bytes, 3 << 20);
        assert_eq!(st[0].rows, Some(1));
        assert_eq!(&*st[0].command, "SELECT");
        // The literal, cut, is still redacted.
        assert!(
            st[0].statement.starts_with("SELECT $1"),
            "{}",
            st[0].statement
        );
        assert!(!st[0].statement.contains("xxx"));
        assert!(c.out.iter().all(|e| e.kind != EventKind::Gap));
    }

    #[test]
    fn bytes_lost_inside_a_query_keep_the_framing() {
        // 1 MiB captured of a 5 MiB write, buffered whole until the loss.
        let mut c = Fed::new(16 << 20);
        let q = big_query(5 << 20);
        c.push(Direction::ToServer, &q[..1 << 20]);
        c.lose(Direction::ToServer, (q.len() - (1 << 20)) as u64);
        c.push(Direction::ToClient, &one_row_response());
        // And the session goes on: the next query is recorded normally.
        c.push(Direction::ToServer, &msg(b'Q', b"SELECT 2\0"));
        c.push(Direction::ToClient, &one_row_response());
        let st = c.statements();
        assert_eq!(st.len(), 2, "{:#?}", c.out);
        assert_eq!(st[0].flags, ["truncated", "gap_before", "unparsed"]);
        assert_eq!(st[0].message_bytes, 5 << 20);
        assert_eq!(st[0].rows, Some(1));
        assert!(st[1].flags.is_empty(), "{:?}", st[1].flags);
        assert_eq!(&*st[1].statement, "SELECT $1");
    }

    #[test]
    fn a_hole_in_the_middle_of_a_streamed_query() {
        let mut c = Fed::new(1 << 20);
        let q = big_query(50 << 20);
        c.push(Direction::ToServer, &q[..2 << 20]);
        c.lose(Direction::ToServer, 40 << 20);
        c.push(Direction::ToServer, &q[(42 << 20)..]);
        c.push(Direction::ToClient, &one_row_response());
        let st = c.statements();
        assert_eq!(st.len(), 1, "{:#?}", c.out);
        assert_eq!(st[0].flags, ["truncated", "gap_before", "unparsed"]);
        assert_eq!(st[0].message_bytes, 50 << 20);
    }

    #[test]
    fn a_bind_whose_parameters_were_lost_still_runs_its_statement() {
        let mut c = Fed::new(16 << 20);
        c.push(
            Direction::ToServer,
            &msg(b'P', b"s1\0INSERT INTO docs VALUES ($1)\0\0\0"),
        );
        let mut bind = Vec::new();
        let value = vec![b'v'; 10 << 20];
        let mut w = MessageWriter::begin(&mut bind, Some(b'B'));
        w.cstr(b"")
            .cstr(b"s1")
            .i16(0)
            .i16(1)
            .value(Some(&value))
            .i16(0);
        w.finish();
        let mut tail = msg(b'E', b"\0\0\0\0\0");
        tail.extend(msg(b'S', b""));
        c.push(Direction::ToServer, &bind[..1 << 20]);
        c.lose(Direction::ToServer, (bind.len() - (1 << 20)) as u64);
        c.push(Direction::ToServer, &tail);
        let mut r = msg(b'1', b"");
        r.extend(msg(b'2', b""));
        r.extend(msg(b'C', b"INSERT 0 1\0"));
        r.extend(msg(b'Z', b"I"));
        c.push(Direction::ToClient, &r);
        let st = c.statements();
        assert_eq!(st.len(), 1, "{:#?}", c.out);
        assert_eq!(&*st[0].statement, "INSERT INTO docs VALUES ($1)");
        assert_eq!(st[0].flags, ["truncated", "gap_before"]);
        assert_eq!(st[0].message_bytes, bind.len() as u64 - 5);
        assert!(st[0].params.is_empty());
        assert_eq!(st[0].rows, Some(1));
    }

    #[test]
    fn a_hole_at_a_message_boundary_resynchronises() {
        let mut c = Fed::new(16 << 20);
        c.push(Direction::ToServer, &msg(b'Q', b"SELECT 1\0"));
        c.push(Direction::ToClient, &one_row_response());
        // The next message's header is lost: nothing can be framed until a boundary.
        c.lose(Direction::ToServer, 100);
        c.push(Direction::ToServer, &msg(b'Q', b"SELECT 3\0"));
        c.push(Direction::ToClient, &one_row_response());
        let st = c.statements();
        assert_eq!(st.len(), 2, "{:#?}", c.out);
        assert!(st[1].flags.contains(Flag::GapBefore));
        assert!(!st[1].flags.contains(Flag::Truncated));
    }

    #[test]
    fn an_error_response_cut_short_still_fails_its_statement() {
        let mut c = Fed::new(1024);
        c.push(Direction::ToServer, &msg(b'Q', b"SELECT boom\0"));
        let mut body = b"SERROR\0VERROR\0C42703\0Mcolumn \"boom\" does not exist\0D".to_vec();
        body.resize(body.len() + 4096, b'd');
        body.extend_from_slice(b"\0\0");
        let e = msg(b'E', &body);
        c.push(Direction::ToClient, &e[..2000]);
        c.lose(Direction::ToClient, (e.len() - 2000) as u64);
        c.push(Direction::ToClient, &msg(b'Z', b"I"));
        let st = c.statements();
        assert_eq!(st.len(), 1, "{:#?}", c.out);
        assert_eq!(st[0].error_code, "42703");
    }

    #[test]
    fn requests_lost_in_a_gap_are_recorded_from_their_answers() {
        let mut c = Fed::new(16 << 20);
        // One write: a Parse of 3 MiB, then Bind, Execute, Sync; the capture got 1 MiB of
        // it and the rest is lost (past the Parse's end, so its Execute is unknown).
        let mut w = msg(
            b'P',
            &[b"\0".as_slice(), &big_query(3 << 20)[5..], b"\0\0"].concat(),
        );
        let parse_len = w.len();
        w.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        w.extend(msg(b'E', b"\0\0\0\0\0"));
        w.extend(msg(b'S', b""));
        c.push(Direction::ToServer, &w[..1 << 20]);
        c.lose(Direction::ToServer, (w.len() - (1 << 20)) as u64);
        assert!(w.len() > parse_len);
        let mut r = msg(b'1', b"");
        r.extend(msg(b'2', b""));
        r.extend(msg(b'D', b"\0\x01\0\0\0\x01x"));
        r.extend(msg(b'C', b"SELECT 1\0"));
        r.extend(msg(b'Z', b"I"));
        c.push(Direction::ToClient, &r);
        c.push(Direction::ToServer, &msg(b'Q', b"SELECT 2\0"));
        c.push(Direction::ToClient, &one_row_response());
        let st = c.statements();
        assert_eq!(st.len(), 2, "{:#?}", c.out);
        assert_eq!(st[0].flags, ["gap_before", "request_lost"]);
        assert_eq!((&*st[0].command, st[0].rows), ("SELECT", Some(1)));
        assert_eq!(&*st[0].statement, "");
        assert_eq!(&*st[1].statement, "SELECT $1");
        assert!(st[1].flags.is_empty());
    }

    #[test]
    fn several_whole_requests_lost_are_each_recorded_from_their_answers() {
        let mut c = Fed::new(1 << 20);
        let answer = |tag: &str| super::tests::complete(tag, b"I");
        c.push(Direction::ToServer, &msg(b'Q', b"SELECT 1\0"));
        c.push(Direction::ToClient, &one_row_response());
        // Two whole queries lost, each in a write of its own (the capture missed both).
        let lost = msg(b'Q', b"DELETE FROM a\0").len() + msg(b'Q', b"DROP TABLE a\0").len();
        c.lose(Direction::ToServer, lost as u64);
        c.push(Direction::ToClient, &answer("DELETE 3"));
        c.push(Direction::ToClient, &answer("DROP TABLE"));
        c.push(Direction::ToServer, &msg(b'Q', b"SELECT 2\0"));
        c.push(Direction::ToClient, &one_row_response());
        let st: Vec<(String, String, Option<u64>)> = c
            .statements()
            .iter()
            .map(|e| (e.statement.to_string(), e.command.to_string(), e.rows))
            .collect();
        assert_eq!(
            st,
            [
                ("SELECT $1".to_string(), "SELECT".to_string(), Some(1)),
                (String::new(), "DELETE".to_string(), Some(3)),
                (String::new(), "DROP TABLE".to_string(), None),
                ("SELECT $1".to_string(), "SELECT".to_string(), Some(1)),
            ],
            "{:#?}",
            c.out
        );
    }

    #[test]
    fn answers_to_lost_requests_that_come_after_the_next_request_are_theirs() {
        let mut c = Fed::new(1 << 20);
        let parse = |name: &str, sql: &str| {
            msg(
                b'P',
                &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
            )
        };
        let bind = |stmt: &str| msg(b'B', &[b"\0", stmt.as_bytes(), b"\0\0\0\0\0\0\0"].concat());
        let exec = msg(b'E', b"\0\0\0\0\0");
        let sync = msg(b'S', b"");
        let row = msg(b'D', b"\0\x01\0\0\0\x01x");
        c.push(
            Direction::ToServer,
            &[
                parse("u", "UPDATE t SET x = 1"),
                parse("s", "SELECT x FROM t"),
                sync.clone(),
            ]
            .concat(),
        );
        c.push(
            Direction::ToClient,
            &[msg(b'1', b""), msg(b'1', b""), msg(b'Z', b"I")].concat(),
        );
        // A pipelining client's write that the capture lost ends inside a Sync's group
        // (Bind and Execute of "u"); the next write has that group's Sync, then a group
        // of its own. The server read both before answering (its answers to the lost
        // requests are written after the next request is read).
        let lost = [bind("s"), exec.clone(), bind("u"), exec.clone()].concat();
        c.lose(Direction::ToServer, lost.len() as u64);
        c.push(
            Direction::ToServer,
            &[sync.clone(), bind("s"), exec.clone(), sync.clone()].concat(),
        );
        c.push(
            Direction::ToClient,
            &[
                msg(b'2', b""),
                row.clone(),
                row.clone(),
                row.clone(),
                msg(b'C', b"SELECT 3\0"),
                msg(b'2', b""),
                msg(b'C', b"UPDATE 5\0"),
                msg(b'Z', b"I"),
                msg(b'2', b""),
                row.clone(),
                msg(b'C', b"SELECT 1\0"),
                msg(b'Z', b"I"),
            ]
            .concat(),
        );
        let st: Vec<(String, String, Option<u64>, Vec<&str>)> = c
            .statements()
            .iter()
            .map(|e| {
                (
                    e.statement.to_string(),
                    e.command.to_string(),
                    e.rows,
                    e.flags.names().collect(),
                )
            })
            .collect();
        assert_eq!(
            st,
            [
                (
                    String::new(),
                    "SELECT".to_string(),
                    Some(3),
                    vec!["gap_before", "request_lost"]
                ),
                (
                    String::new(),
                    "UPDATE".to_string(),
                    Some(5),
                    vec!["request_lost"]
                ),
                (
                    "SELECT x FROM t".to_string(),
                    "SELECT".to_string(),
                    Some(1),
                    vec![]
                ),
            ],
            "{:#?}",
            c.out
        );
        // The group after them is matched as usual.
        c.push(Direction::ToServer, &[bind("u"), exec, sync].concat());
        c.push(
            Direction::ToClient,
            &[msg(b'2', b""), msg(b'C', b"UPDATE 2\0"), msg(b'Z', b"I")].concat(),
        );
        let last = c
            .statements()
            .last()
            .map(|e| (e.statement.to_string(), e.rows));
        assert_eq!(last, Some(("UPDATE t SET x = $1".to_string(), Some(2))));
    }

    #[test]
    fn a_whole_answer_lost_does_not_shift_the_statements_after_it() {
        let mut c = Fed::new(1 << 20);
        let answer = |tag: &str| super::tests::complete(tag, b"I");
        // The server's whole answer to the first query is lost (one write, C and Z); the
        // loss shows when the answer to the second comes.
        c.push(Direction::ToServer, &msg(b'Q', b"CREATE TABLE a (x int)\0"));
        c.push(Direction::ToServer, &msg(b'Q', b"DROP TABLE b\0"));
        c.lose(Direction::ToClient, answer("CREATE TABLE").len() as u64);
        c.push(Direction::ToClient, &answer("DROP TABLE"));
        c.push(
            Direction::ToServer,
            &msg(b'Q', b"INSERT INTO a VALUES (1)\0"),
        );
        c.push(Direction::ToClient, &answer("INSERT 0 1"));
        c.push(Direction::ToServer, &msg(b'Q', b"DELETE FROM a\0"));
        c.push(Direction::ToClient, &answer("DELETE 1"));
        let st: Vec<(String, Option<u64>, Vec<&str>)> = c
            .statements()
            .iter()
            .map(|e| (e.statement.to_string(), e.rows, e.flags.names().collect()))
            .collect();
        assert_eq!(
            st,
            [
                // Its answer was lost: how it ended is unknown, and said so.
                (
                    "CREATE TABLE a (x int)".into(),
                    None,
                    vec!["gap_before", "response_lost"]
                ),
                // The first answer after the loss cannot be told apart from a late
                // answer to the statement before: not matched (the next request
                // realigns).
                ("DROP TABLE b".into(), None, vec!["response_lost"]),
                ("INSERT INTO a VALUES ($1)".into(), Some(1), vec![]),
                ("DELETE FROM a".into(), Some(1), vec![]),
            ],
            "{:#?}",
            c.out
        );
    }
}
