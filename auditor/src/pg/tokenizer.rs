//! Cuts one direction of a connection into messages, without interpreting them.
//!
//! Each message comes out with its byte span in the stream, either whole
//! ([`Token::Message`], borrowed from the pushed bytes when it arrived in one push) or,
//! when its consumer does not want it buffered or it is larger than the limits allow, as a
//! [`Token::Header`] followed by its body in [`Token::Chunk`]s as the bytes arrive: the
//! capture path only counts those, the proxy forwards them. Length prefixes are checked
//! before a byte is buffered, and reassembly draws on a per-message limit and a budget
//! shared by every connection, so no peer can make the daemon reserve gigabytes.

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use super::{Direction, ProtocolError};

/// Protocol messages may be up to 1 GiB (Postgres's own MaxAllocSize).
pub const MAX_MESSAGE_LEN: u32 = 0x4000_0000;
/// Startup-phase packets are small (Postgres rejects any over 10000 bytes).
pub const MAX_STARTUP_LEN: u32 = 10_000;

#[derive(Clone, Copy, Debug)]
pub struct TokenizerLimits {
    /// Largest message body buffered whole; larger ones stream through as chunks.
    pub max_buffered: u32,
}

impl Default for TokenizerLimits {
    fn default() -> Self {
        TokenizerLimits {
            max_buffered: 16 << 20,
        }
    }
}

/// Bytes all tokenizers together may hold for messages split across pushes. A message
/// that does not fit streams through instead of being buffered (and its consumer says
/// what that means: the capture records it truncated).
#[derive(Clone, Debug)]
pub struct BufferBudget {
    free: Arc<AtomicUsize>,
}

impl BufferBudget {
    pub fn new(bytes: usize) -> Self {
        BufferBudget {
            free: Arc::new(AtomicUsize::new(bytes)),
        }
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    fn reserve(&self, n: usize) -> bool {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(n)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.free.fetch_add(n, Ordering::AcqRel);
    }
}

/// Where a message lies in its direction's byte stream: [start, end), header included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Token<'a> {
    /// An untyped startup-phase packet (StartupMessage, SSLRequest, GSSENCRequest,
    /// CancelRequest): its body after the length.
    Startup { body: Cow<'a, [u8]>, span: Span },
    /// The one byte answering an SSLRequest or GSSENCRequest ('S', 'G' or 'N').
    EncryptionReply { reply: u8, span: Span },
    /// A typed message, whole.
    Message {
        tag: u8,
        body: Cow<'a, [u8]>,
        span: Span,
    },
    /// A typed message whose body follows in chunks (not buffered); `span` is the whole
    /// message's.
    Header { tag: u8, body_len: u32, span: Span },
    /// Part of the body announced by the last Header; `last` on the final part. A body of
    /// length 0 has no chunks.
    Chunk { data: &'a [u8], last: bool },
}

/// The frame of a typed message: tag, length, body. (Tests and builders.)
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What became of bytes lost from the stream ([`Tokenizer::skip`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// They lay inside the message being read: framing survives, and the next message
    /// starts where this one's length says.
    Inside {
        /// The message was being buffered whole; it goes on as a streamed one: its header
        /// and the body that had come (no token of it was given out yet).
        converted: Option<Converted>,
        /// The lost bytes ran to the message's end: no more chunks of it follow.
        ends_message: bool,
    },
    /// They ran past the end of the message being read (its header had come): the
    /// message ended in the loss (`converted` as above; None if it was streaming), and
    /// where the next one begins is unknown (the caller resynchronises).
    PastMessage { converted: Option<Converted> },
    /// They began at a message boundary (or inside a header): where the next message
    /// begins is unknown (the caller resynchronises).
    FramingLost,
}

/// A message that was being buffered when bytes of it were lost.
#[derive(Debug, PartialEq, Eq)]
pub struct Converted {
    pub tag: u8,
    pub body_len: u32,
    pub span: Span,
    /// The part of the body that arrived before the loss.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for an untyped startup packet (client side, before the StartupMessage).
    Startup,
    /// Waiting for the single byte answering an encryption request (server side).
    EncryptionReply,
    Typed,
    /// The rest of a streamed body.
    Streaming {
        remaining: u32,
    },
    /// Past the point where bytes can be understood (after TLS starts, or a framing error).
    Opaque,
}

pub struct Tokenizer {
    direction: Direction,
    limits: TokenizerLimits,
    /// Tags whose bodies the consumer never wants whole (the capture only counts rows).
    streamed: &'static [u8],
    budget: Option<BufferBudget>,
    mode: Mode,
    /// A message split across pushes: its header and as much body as has come.
    buf: Vec<u8>,
    /// What `buf`'s message holds of the budget.
    reserved: usize,
    /// Stream offset where `buf` begins (of the next byte pushed when `buf` is empty).
    offset: u64,
}

impl Drop for Tokenizer {
    fn drop(&mut self) {
        self.release();
    }
}

impl Tokenizer {
    /// A tokenizer at the start of a connection: the client side begins with an untyped
    /// startup packet.
    pub fn new(direction: Direction, limits: TokenizerLimits) -> Self {
        let mode = match direction {
            Direction::ToServer => Mode::Startup,
            Direction::ToClient => Mode::Typed,
        };
        Tokenizer {
            direction,
            limits,
            streamed: &[],
            budget: None,
            mode,
            buf: Vec::new(),
            reserved: 0,
            offset: 0,
        }
    }

    /// A tokenizer joining a stream already in the typed phase (mid-stream pick-up).
    pub fn typed(direction: Direction, limits: TokenizerLimits) -> Self {
        let mut t = Tokenizer::new(direction, limits);
        t.mode = Mode::Typed;
        t
    }

    /// Bodies of these tags always stream as chunks, whatever their size.
    pub fn with_streamed(mut self, tags: &'static [u8]) -> Self {
        self.streamed = tags;
        self
    }

    /// Changes the tags whose bodies stream (from the next message header on).
    pub fn set_streamed(&mut self, tags: &'static [u8]) {
        self.streamed = tags;
    }

    /// Reassembly draws on this shared budget.
    pub fn with_budget(mut self, budget: BufferBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Counts stream offsets from `offset`: a tokenizer taking over a stream at a message
    /// boundary another one reached.
    pub fn starting_at(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Stream offset of the next byte to be pushed (bytes pushed so far, those held for a
    /// split message included).
    pub fn offset(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    /// The next client packet is untyped again (after an SSL/GSS request was refused).
    pub fn expect_startup(&mut self) {
        self.mode = Mode::Startup;
    }

    /// The next server byte answers an encryption request.
    pub fn expect_encryption_reply(&mut self) {
        self.mode = Mode::EncryptionReply;
    }

    /// Stop decoding: the rest of the stream is encrypted or unknowable.
    pub fn make_opaque(&mut self) {
        self.mode = Mode::Opaque;
        self.clear_buf();
    }

    pub fn is_opaque(&self) -> bool {
        self.mode == Mode::Opaque
    }

    /// Bytes held waiting for the rest of a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True when no partial message is pending: the next byte starts a message.
    pub fn at_boundary(&self) -> bool {
        self.buf.is_empty() && !matches!(self.mode, Mode::Streaming { .. })
    }

    /// Forgets any partial message and resumes typed framing at the next byte (after a
    /// gap, once the caller has found a message boundary). Offsets go on counting the
    /// bytes pushed.
    pub fn resync_typed(&mut self) {
        self.clear_buf();
        self.mode = Mode::Typed;
    }

    /// `n` bytes of the stream at this point were not captured. See [`Skip`].
    pub fn skip(&mut self, n: u64) -> Skip {
        match self.mode {
            Mode::Streaming { remaining } if n > u64::from(remaining) => {
                self.lose(n);
                Skip::PastMessage { converted: None }
            }
            Mode::Streaming { remaining } => {
                self.offset += n;
                let left = remaining - n as u32;
                self.mode = if left == 0 {
                    Mode::Typed
                } else {
                    Mode::Streaming { remaining: left }
                };
                Skip::Inside {
                    converted: None,
                    ends_message: left == 0,
                }
            }
            Mode::Typed if self.buf.len() >= 5 => {
                let tag = self.buf[0];
                let body_len =
                    u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) - 4;
                let total = 5 + u64::from(body_len);
                let have = self.buf.len() as u64;
                let span = Span {
                    start: self.offset,
                    end: self.offset + total,
                };
                let body = self.buf[5..].to_vec();
                let converted = Converted {
                    tag,
                    body_len,
                    span,
                    body,
                };
                if have + n > total {
                    self.lose(n);
                    return Skip::PastMessage {
                        converted: Some(converted),
                    };
                }
                self.offset += have + n;
                self.buf = Vec::new();
                self.release();
                let left = (total - have - n) as u32;
                self.mode = if left == 0 {
                    Mode::Typed
                } else {
                    Mode::Streaming { remaining: left }
                };
                Skip::Inside {
                    converted: Some(converted),
                    ends_message: left == 0,
                }
            }
            _ => {
                self.lose(n);
                Skip::FramingLost
            }
        }
    }

    /// Gives up the message being read and `n` lost bytes after what was pushed.
    fn lose(&mut self, n: u64) {
        self.clear_buf();
        self.offset += n;
        if matches!(self.mode, Mode::Streaming { .. }) {
            self.mode = Mode::Typed;
        }
    }

    fn clear_buf(&mut self) {
        // Held bytes given up are still bytes of the stream.
        self.offset += self.buf.len() as u64;
        self.buf = Vec::new();
        self.release();
    }

    fn release(&mut self) {
        if self.reserved > 0 {
            if let Some(b) = &self.budget {
                b.release(self.reserved);
            }
            self.reserved = 0;
        }
    }

    /// Feeds bytes; tokens come out through `out`. On a framing error (a length outside
    /// the protocol's bounds) the tokenizer turns opaque and the error is returned: the
    /// caller records it and may resync later.
    pub fn push<'a>(
        &mut self,
        mut data: &'a [u8],
        out: &mut impl FnMut(Token<'a>),
    ) -> Result<(), ProtocolError> {
        while !data.is_empty() {
            match self.mode {
                Mode::Opaque => {
                    self.offset += data.len() as u64;
                    return Ok(());
                }
                Mode::Streaming { remaining } => {
                    let n = remaining.min(data.len() as u32);
                    let last = n == remaining;
                    out(Token::Chunk {
                        data: &data[..n as usize],
                        last,
                    });
                    data = &data[n as usize..];
                    self.offset += n as u64;
                    self.mode = if last {
                        Mode::Typed
                    } else {
                        Mode::Streaming {
                            remaining: remaining - n,
                        }
                    };
                }
                Mode::EncryptionReply => {
                    out(Token::EncryptionReply {
                        reply: data[0],
                        span: Span {
                            start: self.offset,
                            end: self.offset + 1,
                        },
                    });
                    data = &data[1..];
                    self.offset += 1;
                    self.mode = Mode::Typed;
                }
                Mode::Startup if self.buf.is_empty() && data.len() >= 4 => {
                    let len = self.startup_len(&data[..4])?;
                    if data.len() >= len {
                        let span = self.advance(len);
                        self.mode = Mode::Typed;
                        out(Token::Startup {
                            body: Cow::Borrowed(&data[4..len]),
                            span,
                        });
                        data = &data[len..];
                    } else {
                        // At most 10000 bytes: no budget needed.
                        self.buf.extend_from_slice(data);
                        data = &[];
                    }
                }
                Mode::Startup => {
                    let n = (4usize.saturating_sub(self.buf.len())).min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() < 4 {
                        continue;
                    }
                    let len_bytes = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
                    let len = self.startup_len(&len_bytes)?;
                    let n = (len - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() == len {
                        let span = self.advance(len);
                        let body = self.buf[4..].to_vec();
                        self.buf.clear();
                        self.mode = Mode::Typed;
                        out(Token::Startup {
                            body: Cow::Owned(body),
                            span,
                        });
                    }
                }
                Mode::Typed if self.buf.is_empty() && data.len() >= 5 => {
                    // Fast path: the header is in this push; the body too, usually.
                    let tag = data[0];
                    let body_len = self.typed_len(tag, &data[1..5])?;
                    let end = 5 + body_len as usize;
                    if self.wants_whole(tag, body_len) && data.len() >= end {
                        let span = self.advance(end);
                        out(Token::Message {
                            tag,
                            body: Cow::Borrowed(&data[5..end]),
                            span,
                        });
                        data = &data[end..];
                    } else if self.wants_whole(tag, body_len) && self.reserve(end) {
                        self.buf.extend_from_slice(data);
                        data = &[];
                    } else {
                        self.stream(tag, body_len, out);
                        data = &data[5..];
                    }
                }
                Mode::Typed => {
                    if self.buf.len() < 5 {
                        let n = (5 - self.buf.len()).min(data.len());
                        self.buf.extend_from_slice(&data[..n]);
                        data = &data[n..];
                        if self.buf.len() < 5 {
                            continue;
                        }
                        let tag = self.buf[0];
                        let len_bytes = [self.buf[1], self.buf[2], self.buf[3], self.buf[4]];
                        let body_len = self.typed_len(tag, &len_bytes)?;
                        if !(self.wants_whole(tag, body_len) && self.reserve(5 + body_len as usize))
                        {
                            self.buf.clear();
                            self.stream(tag, body_len, out);
                            continue;
                        }
                    }
                    let tag = self.buf[0];
                    let total = 5 + u32::from_be_bytes([
                        self.buf[1],
                        self.buf[2],
                        self.buf[3],
                        self.buf[4],
                    ]) as usize
                        - 4;
                    let n = (total - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() == total {
                        let span = self.advance(total);
                        let body = self.buf[5..].to_vec();
                        self.buf.clear();
                        self.release();
                        out(Token::Message {
                            tag,
                            body: Cow::Owned(body),
                            span,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The span of the next `len` bytes of the stream, which a token now accounts for.
    fn advance(&mut self, len: usize) -> Span {
        // Bytes already buffered were not counted yet: the span starts where they began.
        let start = self.offset;
        self.offset += len as u64;
        Span {
            start,
            end: self.offset,
        }
    }

    fn startup_len(&mut self, len_bytes: &[u8]) -> Result<usize, ProtocolError> {
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            self.make_opaque();
            return Err(ProtocolError::BadLength {
                tag: '0',
                len,
                min: 8,
                max: MAX_STARTUP_LEN,
            });
        }
        Ok(len as usize)
    }

    /// Checks a typed message's length (big-endian, counting itself); returns the body's.
    fn typed_len(&mut self, tag: u8, len_bytes: &[u8]) -> Result<u32, ProtocolError> {
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            self.make_opaque();
            return Err(ProtocolError::BadLength {
                tag: tag as char,
                len,
                min: 4,
                max: MAX_MESSAGE_LEN,
            });
        }
        Ok(len - 4)
    }

    fn wants_whole(&self, tag: u8, body_len: u32) -> bool {
        body_len <= self.limits.max_buffered && !self.streamed.contains(&tag)
    }

    /// Holds `n` bytes of the shared budget for a message split across pushes.
    fn reserve(&mut self, n: usize) -> bool {
        match &self.budget {
            None => true,
            Some(b) if b.reserve(n) => {
                self.reserved = n;
                true
            }
            Some(_) => false,
        }
    }

    /// Announces a message whose body streams through.
    fn stream<'a>(&mut self, tag: u8, body_len: u32, out: &mut impl FnMut(Token<'a>)) {
        let start = self.offset;
        self.offset += 5;
        out(Token::Header {
            tag,
            body_len,
            span: Span {
                start,
                end: start + 5 + body_len as u64,
            },
        });
        if body_len > 0 {
            self.mode = Mode::Streaming {
                remaining: body_len,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens<'a>(t: &mut Tokenizer, data: &'a [u8]) -> Vec<Token<'a>> {
        let mut v = Vec::new();
        t.push(data, &mut |tok| v.push(tok)).unwrap();
        v
    }

    /// The bytes a consumer forwards: each whole message re-framed, each streamed one as
    /// its header and chunks.
    fn forward(tok: &Token<'_>, out: &mut Vec<u8>) {
        match tok {
            Token::Startup { body, .. } => {
                out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                out.extend_from_slice(body);
            }
            Token::EncryptionReply { reply, .. } => out.push(*reply),
            Token::Message { tag, body, .. } => out.extend_from_slice(&frame(*tag, body)),
            Token::Header { tag, body_len, .. } => {
                out.push(*tag);
                out.extend_from_slice(&(body_len + 4).to_be_bytes());
            }
            Token::Chunk { data, .. } => out.extend_from_slice(data),
        }
    }

    #[test]
    fn startup_then_typed_with_spans() {
        let mut t = Tokenizer::new(Direction::ToServer, TokenizerLimits::default());
        let mut data = vec![0, 0, 0, 8, 0, 3, 0, 0];
        data.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        let out = tokens(&mut t, &data);
        assert_eq!(
            out[0],
            Token::Startup {
                body: Cow::Borrowed(&[0, 3, 0, 0][..]),
                span: Span { start: 0, end: 8 }
            }
        );
        assert_eq!(
            out[1],
            Token::Message {
                tag: b'Q',
                body: Cow::Borrowed(&b"SELECT 1\0"[..]),
                span: Span { start: 8, end: 22 }
            }
        );
        assert_eq!(t.offset(), 22);
    }

    #[test]
    fn huge_length_is_an_error_not_an_allocation() {
        let mut t = Tokenizer::typed(Direction::ToServer, TokenizerLimits::default());
        let err = t
            .push(b"Q\x7f\xff\xff\xff", &mut |_| panic!("no token"))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength { .. }));
        assert!(t.is_opaque());
        assert_eq!(t.buffered(), 0);
        let mut t = Tokenizer::typed(Direction::ToServer, TokenizerLimits::default());
        assert!(t.push(b"Q\0\0\0\x03", &mut |_| panic!()).is_err());
    }

    #[test]
    fn streamed_tags_come_as_header_and_chunks() {
        let mut t =
            Tokenizer::typed(Direction::ToClient, TokenizerLimits::default()).with_streamed(b"D");
        let mut v = Vec::new();
        t.push(b"D\0\x10\0\0", &mut |tok| v.push(tok)).unwrap();
        assert_eq!(
            v,
            vec![Token::Header {
                tag: b'D',
                body_len: 0x0010_0000 - 4,
                span: Span {
                    start: 0,
                    end: 0x0010_0001
                }
            }]
        );
        assert_eq!(t.buffered(), 0);
        // The body streams past without being held.
        let body = vec![0u8; 0x000f_fffc];
        let mut chunks = 0;
        let mut seen = 0;
        for piece in body.chunks(100_000) {
            t.push(piece, &mut |tok| {
                let Token::Chunk { data, last } = tok else {
                    panic!()
                };
                seen += data.len();
                chunks += 1;
                assert_eq!(last, seen == body.len());
            })
            .unwrap();
            assert_eq!(t.buffered(), 0);
        }
        assert_eq!(seen, body.len());
        assert!(t.at_boundary());
    }

    #[test]
    fn over_limit_messages_stream() {
        let mut t = Tokenizer::typed(Direction::ToServer, TokenizerLimits { max_buffered: 4 });
        let out = tokens(&mut t, b"Q\0\0\0\x0dSELECT 1\0S\0\0\0\x04");
        assert_eq!(
            out,
            vec![
                Token::Header {
                    tag: b'Q',
                    body_len: 9,
                    span: Span { start: 0, end: 14 }
                },
                Token::Chunk {
                    data: b"SELECT 1\0",
                    last: true
                },
                Token::Message {
                    tag: b'S',
                    body: Cow::Borrowed(&[][..]),
                    span: Span { start: 14, end: 19 }
                }
            ]
        );
    }

    #[test]
    fn the_shared_budget_bounds_reassembly() {
        let budget = BufferBudget::new(20);
        let mut a = Tokenizer::typed(Direction::ToServer, TokenizerLimits::default())
            .with_budget(budget.clone());
        let mut b = Tokenizer::typed(Direction::ToServer, TokenizerLimits::default())
            .with_budget(budget.clone());
        let msg = frame(b'Q', b"SELECT 1234567\0"); // 20 bytes
                                                    // `a` holds a split message: the whole budget.
        assert!(tokens(&mut a, &msg[..7]).is_empty());
        assert_eq!(budget.available(), 0);
        // `b`'s split message does not fit: it streams instead of being buffered.
        let got = tokens(&mut b, &msg[..7]);
        assert!(matches!(got[0], Token::Header { tag: b'Q', .. }));
        assert_eq!(b.buffered(), 0);
        // A message whole in one push needs no budget.
        let rest_and_whole = [&msg[7..], &msg[..]].concat();
        let got = tokens(&mut b, &rest_and_whole);
        assert!(matches!(got.last(), Some(Token::Message { .. })));
        // `a` completes and gives the budget back; dropping a half-message does too.
        let got = tokens(&mut a, &msg[7..]);
        assert!(matches!(got[0], Token::Message { .. }));
        assert_eq!(budget.available(), 20);
        tokens(&mut a, &msg[..10]);
        assert_eq!(budget.available(), 0);
        drop(a);
        assert_eq!(budget.available(), 20);
    }

    #[test]
    fn split_anywhere_gives_the_same_tokens_and_forwards_byte_for_byte() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"P\0\0\0\x11\0SELECT $1\0\0\0");
        stream.extend_from_slice(b"B\0\0\0\x0c\0\0\0\0\0\0\0\0");
        stream.extend_from_slice(b"d\0\0\0\x07abc");
        stream.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0");
        stream.extend_from_slice(b"S\0\0\0\x04");
        let new = || {
            Tokenizer::typed(Direction::ToServer, TokenizerLimits::default()).with_streamed(b"d")
        };
        let whole = tokens(&mut new(), &stream);
        assert_eq!(whole.len(), 6);
        let mut fwd = Vec::new();
        whole.iter().for_each(|t| forward(t, &mut fwd));
        assert_eq!(fwd, stream);
        let normal = |v: Vec<Token<'_>>| -> Vec<(u8, Vec<u8>)> {
            // Chunks may come in other cuts: compare messages with their bodies joined.
            let mut msgs: Vec<(u8, Vec<u8>)> = Vec::new();
            for t in v {
                match t {
                    Token::Message { tag, body, .. } => msgs.push((tag, body.into_owned())),
                    Token::Header { tag, .. } => msgs.push((tag, Vec::new())),
                    Token::Chunk { data, .. } => msgs.last_mut().unwrap().1.extend(data),
                    _ => unreachable!(),
                }
            }
            msgs
        };
        let expected = normal(tokens(&mut new(), &stream));
        for cut in 1..stream.len() {
            let mut t = new();
            let mut got = tokens(&mut t, &stream[..cut]);
            got.extend(tokens(&mut t, &stream[cut..]));
            let mut fwd = Vec::new();
            got.iter().for_each(|t| forward(t, &mut fwd));
            assert_eq!(fwd, stream, "cut at {cut}");
            assert_eq!(normal(got), expected, "cut at {cut}");
            assert!(t.at_boundary());
            assert_eq!(t.offset(), stream.len() as u64);
        }
        let mut t = new();
        let mut got = Vec::new();
        for b in stream.chunks(1) {
            got.extend(tokens(&mut t, b));
        }
        assert_eq!(normal(got), expected, "byte by byte");
    }

    #[test]
    fn bytes_lost_inside_a_message_keep_the_framing() {
        let limits = TokenizerLimits { max_buffered: 1000 };
        let q = frame(b'Q', &[b'x'; 500]);
        let next = frame(b'S', b"");
        // Lost inside a buffered message: it turns into a streamed one.
        let mut t = Tokenizer::typed(Direction::ToServer, limits);
        assert!(tokens(&mut t, &q[..100]).is_empty());
        match t.skip(300) {
            Skip::Inside {
                converted: Some(c),
                ends_message: false,
            } => {
                assert_eq!((c.tag, c.body_len, c.body.len()), (b'Q', 500, 95));
                assert_eq!(c.span, Span { start: 0, end: 505 });
            }
            other => panic!("{other:?}"),
        }
        let mut rest = q[400..].to_vec();
        rest.extend_from_slice(&next);
        let out = tokens(&mut t, &rest);
        assert_eq!(
            out[0],
            Token::Chunk {
                data: &q[400..],
                last: true
            }
        );
        assert!(matches!(
            out[1],
            Token::Message {
                tag: b'S',
                span: Span {
                    start: 505,
                    end: 510
                },
                ..
            }
        ));
        // Lost up to the message's very end.
        let mut t = Tokenizer::typed(Direction::ToServer, limits);
        tokens(&mut t, &q[..100]);
        assert!(matches!(
            t.skip(405),
            Skip::Inside {
                ends_message: true,
                ..
            }
        ));
        assert!(matches!(
            tokens(&mut t, &next)[0],
            Token::Message { tag: b'S', .. }
        ));
        // Lost inside a streamed body.
        let big = frame(b'Q', &[b'y'; 5000]);
        let mut t = Tokenizer::typed(Direction::ToServer, limits);
        assert!(matches!(
            tokens(&mut t, &big[..1000])[0],
            Token::Header { body_len: 5000, .. }
        ));
        assert_eq!(
            t.skip(3000),
            Skip::Inside {
                converted: None,
                ends_message: false
            }
        );
        let out = tokens(&mut t, &big[4000..]);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Token::Chunk { last: true, .. }));
        assert_eq!(t.offset(), big.len() as u64);
    }

    #[test]
    fn bytes_lost_across_a_boundary_lose_the_framing() {
        let limits = TokenizerLimits { max_buffered: 1000 };
        let q = frame(b'Q', &[b'x'; 500]);
        // At a boundary.
        let mut t = Tokenizer::typed(Direction::ToServer, limits);
        tokens(&mut t, &q);
        assert_eq!(t.skip(10), Skip::FramingLost);
        assert_eq!(t.offset(), q.len() as u64 + 10);
        // Past the message's end: it ends in the loss.
        let mut t = Tokenizer::typed(Direction::ToServer, limits);
        tokens(&mut t, &q[..100]);
        match t.skip(406) {
            Skip::PastMessage { converted: Some(c) } => {
                assert_eq!((c.tag, c.body.len()), (b'Q', 95))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.offset(), q.len() as u64 + 1);
        let big = frame(b'Q', &[b'y'; 5000]);
        let mut t = Tokenizer::typed(Direction::ToServer, limits);
        tokens(&mut t, &big[..1000]);
        assert_eq!(t.skip(4006), Skip::PastMessage { converted: None });
        assert_eq!(t.offset(), big.len() as u64 + 1);
        // Inside a header.
        let mut t = Tokenizer::typed(Direction::ToServer, limits);
        tokens(&mut t, &q[..3]);
        assert_eq!(t.skip(10), Skip::FramingLost);
        assert_eq!(t.offset(), 13);
    }
}
