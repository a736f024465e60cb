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
    next_flags: Flags,
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
                Flag::MidStream.into()
            } else {
                Flags::empty()
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

    /// Bytes were lost in `direction`: decoding resumes at the next plausible boundary.
    pub fn gap(&mut self, direction: Direction) {
        self.resyncing[direction.index()] = true;
        self.tokenizers[direction.index()].resync_typed();
        self.next_flags.insert(Flag::GapBefore);
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
            ev.flags.insert(if gss {
                Flag::GssencUnreadable
            } else {
                Flag::TlsUnreadable
            });
        }
        if self.mid_stream {
            ev.flags.insert(Flag::MidStream);
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
        ev.flags.insert(Flag::Truncated);
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
        drafts.into_iter().map(|d| d.event).collect()
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
        let (parsed, bound, suspended) = (msg(b'1', b""), msg(b'2', b""), msg(b's', b""));
        let idle = msg(b'Z', b"I");
        let r = [&parsed, &bound, &row, &suspended, &idle].map(|m| &m[..]);
        out.extend(feed(&mut c, Direction::ToClient, &r.concat()));
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
        // A second cursor left suspended, then closed.
        let mut m = bind("cur2", "big");
        m.extend(execute("cur2", 1));
        m.extend(sync.clone());
        out.extend(feed(&mut c, Direction::ToServer, &m));
        let r = [&bound, &row, &suspended, &in_tx].map(|m| &m[..]);
        out.extend(feed(&mut c, Direction::ToClient, &r.concat()));
        let mut m = msg(b'C', b"Pcur2\0");
        m.extend(sync.clone());
        out.extend(feed(&mut c, Direction::ToServer, &m));
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
    }
}
