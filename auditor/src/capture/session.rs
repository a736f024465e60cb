//! One captured Postgres session: the capture path's driver of the conversation model.
//!
//! Bytes of both directions in (as the kernel handed them over), audit drafts out. What
//! is particular to watching from the side lives here and not in the conversation: lost
//! bytes and picking the stream up again at a message boundary, joining a connection in
//! the middle, TLS whose plaintext comes from library hooks (or never), messages too large
//! to read, and the flags that say so on the events.

use crate::{
    audit::recorder::{kind_event, Draft, Recorder, RecordingPolicy},
    capture::stream,
    conversation::{Conversation, Outcome, Phase, SessionMeta},
    event::EventKind,
    pg::{
        backend::{self, BackendMessage, ErrorFields},
        frontend,
        wire::Values,
        Direction, Token, Tokenizer, TokenizerLimits,
    },
    sql::Analyzer,
};

/// Counters a session adds to.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionCounters {
    pub parse_errors: u64,
    pub unmatched_responses: u64,
    /// Protocol messages framed, both directions.
    pub messages: u64,
}

pub struct Session {
    conversation: Conversation,
    recorder: Recorder,
    tokenizers: [Tokenizer; 2],
    /// After a gap, the direction waits for a syscall boundary that looks like a message.
    resyncing: [bool; 2],
    parse_errors: u64,
    messages: u64,
    /// Flags for the next statement event (gap_before, mid_stream).
    next_flags: Vec<String>,
    mid_stream: bool,
    /// Declared unreadable: no end of the connection delivers plaintext.
    unreadable: bool,
    started_emitted: bool,
    limits: TokenizerLimits,
    outcomes: Vec<Outcome>,
}

impl Session {
    pub fn new(policy: RecordingPolicy, limits: TokenizerLimits, mid_stream: bool) -> Self {
        Session {
            conversation: if mid_stream {
                Conversation::joined_mid_stream()
            } else {
                Conversation::new()
            },
            recorder: Recorder::new(policy),
            tokenizers: Self::tokenizers(limits, mid_stream),
            // Joining mid-stream: wait for a syscall boundary that looks like a message.
            resyncing: [mid_stream, mid_stream],
            parse_errors: 0,
            messages: 0,
            next_flags: if mid_stream {
                vec!["mid_stream".into()]
            } else {
                Vec::new()
            },
            mid_stream,
            unreadable: false,
            started_emitted: false,
            limits,
            outcomes: Vec::new(),
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
        self.conversation.phase() == Phase::CancelRequest
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
            self.conversation.requests_lost();
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
            self.parse_errors += 1;
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
                    self.tokenizers[0].make_opaque();
                    self.tokenizers[1].make_opaque();
                } else {
                    // Refused: the client continues in plaintext with a startup packet.
                    self.tokenizers[Direction::ToServer.index()].expect_startup();
                }
            }
            (Direction::ToServer, Token::Message { tag, body, .. }) => {
                match frontend::decode(tag, &body) {
                    Ok(m) => self
                        .conversation
                        .on_frontend(m, ts, analyzer, &mut self.outcomes),
                    Err(_) => self.parse_errors += 1,
                }
            }
            (Direction::ToServer, Token::Header { tag, body_len, .. }) if tag != b'd' => {
                // A request too large to buffer: record that it happened.
                self.on_oversized_request(tag, body_len, ts, out);
            }
            (Direction::ToClient, Token::Message { tag, body, .. }) => {
                match backend::decode(tag, &body) {
                    Ok(m) => self.conversation.on_backend(m, ts, &mut self.outcomes),
                    Err(_) => self.parse_errors += 1,
                }
            }
            (Direction::ToClient, Token::Header { tag: b'D', .. }) => {
                // Only counted: the body streams past unread.
                self.conversation.on_backend(
                    BackendMessage::DataRow(Values::default()),
                    ts,
                    &mut self.outcomes,
                );
            }
            _ => {}
        }
        self.drain_outcomes(out);
    }

    fn drain_outcomes(&mut self, out: &mut Vec<Draft>) {
        let mut outcomes = std::mem::take(&mut self.outcomes);
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::SessionStarted { ts_ns } => self.emit_start(ts_ns, out),
                other => out.extend(self.recorder.record(other, &mut self.next_flags)),
            }
        }
        self.outcomes = outcomes;
    }

    fn emit_start(&mut self, ts: i128, out: &mut Vec<Draft>) {
        if self.started_emitted {
            return;
        }
        self.started_emitted = true;
        let mut ev = kind_event(EventKind::SessionStart);
        if self.unreadable {
            let gss = matches!(self.conversation.phase(), Phase::Encrypted { gss: true });
            ev.flags.push(if gss {
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
        self.conversation.requests_lost();
    }

    /// Requests that never got an answer, and portals left suspended (the connection
    /// ended first).
    pub fn abandon(&mut self, ts: i128, out: &mut Vec<Draft>) {
        self.conversation.abandon(ts, &mut self.outcomes);
        self.drain_outcomes(out);
    }
}
