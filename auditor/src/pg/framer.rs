//! Cuts one direction of a connection into messages.

use std::borrow::Cow;

use super::{Direction, ProtocolError};

#[derive(Clone, Copy, Debug)]
pub struct FramerLimits {
    /// Largest message body buffered for decoding; larger ones are skipped and reported.
    pub max_buffered: u32,
}

impl Default for FramerLimits {
    fn default() -> Self {
        FramerLimits {
            max_buffered: 16 << 20,
        }
    }
}

/// Protocol messages may be up to 1 GiB (Postgres's own MaxAllocSize).
const MAX_MESSAGE_LEN: u32 = 0x4000_0000;
/// Startup-phase packets are small (Postgres rejects any over 10000 bytes).
const MAX_STARTUP_LEN: u32 = 10_000;

/// One unit out of the framer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An untyped startup-phase packet (StartupMessage, SSLRequest, GSSENCRequest,
    /// CancelRequest): its body after the length.
    Startup(Vec<u8>),
    /// The one-byte answer to an SSLRequest or GSSENCRequest ('S', 'G' or 'N').
    EncryptionReply(u8),
    /// A typed message, with its body: borrowed from the pushed bytes when the whole
    /// message was in one push (the common case), else reassembled.
    Message { tag: u8, body: Cow<'a, [u8]> },
    /// A typed message whose body was not buffered (only counted, or over the limit).
    Skipped { tag: u8, len: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for an untyped startup packet (client side, before the StartupMessage).
    Startup,
    /// Waiting for the single byte answering an encryption request (server side).
    EncryptionReply,
    Typed,
    /// Skipping the rest of a body.
    Skipping {
        remaining: u32,
    },
    /// Past the point where bytes can be understood (after TLS starts, or a framing error).
    Opaque,
}

pub struct Framer {
    direction: Direction,
    limits: FramerLimits,
    mode: Mode,
    buf: Vec<u8>,
}

/// Tags whose bodies are never needed: counting them is enough.
fn counted_only(direction: Direction, tag: u8) -> bool {
    match direction {
        Direction::ToClient => tag == b'D' || tag == b'd',
        Direction::ToServer => tag == b'd',
    }
}

impl Framer {
    pub fn new(direction: Direction, limits: FramerLimits) -> Self {
        let mode = match direction {
            Direction::ToServer => Mode::Startup,
            Direction::ToClient => Mode::Typed,
        };
        Framer {
            direction,
            limits,
            mode,
            buf: Vec::new(),
        }
    }

    /// A framer joining a stream already in the typed phase (mid-stream pick-up).
    pub fn typed(direction: Direction, limits: FramerLimits) -> Self {
        let mut f = Framer::new(direction, limits);
        f.mode = Mode::Typed;
        f
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
        self.buf = Vec::new();
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
        self.buf.is_empty() && !matches!(self.mode, Mode::Skipping { .. })
    }

    /// Forgets any partial message and resumes typed framing at the next byte (after a gap,
    /// once the caller has found a plausible message boundary).
    pub fn resync_typed(&mut self) {
        self.buf.clear();
        self.mode = Mode::Typed;
    }

    /// Feeds bytes; frames come out through `out`. On a framing error the framer turns
    /// opaque and the error is returned: the caller records it and may resync later.
    pub fn push<'a>(
        &mut self,
        mut data: &'a [u8],
        out: &mut impl FnMut(Frame<'a>),
    ) -> Result<(), ProtocolError> {
        while !data.is_empty() {
            match self.mode {
                Mode::Opaque => return Ok(()),
                Mode::Skipping { remaining } => {
                    let n = remaining.min(data.len() as u32);
                    data = &data[n as usize..];
                    self.mode = if n == remaining {
                        Mode::Typed
                    } else {
                        Mode::Skipping {
                            remaining: remaining - n,
                        }
                    };
                }
                Mode::EncryptionReply => {
                    out(Frame::EncryptionReply(data[0]));
                    data = &data[1..];
                    self.mode = Mode::Typed;
                }
                Mode::Startup => {
                    let need = 4usize.saturating_sub(self.buf.len());
                    if need > 0 {
                        let n = need.min(data.len());
                        self.buf.extend_from_slice(&data[..n]);
                        data = &data[n..];
                        if self.buf.len() < 4 {
                            return Ok(());
                        }
                    }
                    let len =
                        u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                    if !(8..=MAX_STARTUP_LEN).contains(&len) {
                        self.make_opaque();
                        return Err(ProtocolError::BadLength {
                            tag: '0',
                            len,
                            min: 8,
                            max: MAX_STARTUP_LEN,
                        });
                    }
                    let want = len as usize - self.buf.len();
                    let n = want.min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() == len as usize {
                        let body = self.buf[4..].to_vec();
                        self.buf.clear();
                        // Until the session says otherwise, the next packet is typed.
                        self.mode = Mode::Typed;
                        out(Frame::Startup(body));
                    }
                }
                Mode::Typed if self.buf.is_empty() && data.len() >= 5 => {
                    // Fast path: the header is in this push; the body too, usually.
                    let tag = data[0];
                    let Some(body_len) = self.header(tag, &data[1..5], out)? else {
                        data = &data[5..];
                        continue;
                    };
                    let end = 5 + body_len as usize;
                    if data.len() >= end {
                        out(Frame::Message {
                            tag,
                            body: Cow::Borrowed(&data[5..end]),
                        });
                        data = &data[end..];
                    } else {
                        self.buf.extend_from_slice(data);
                        data = &[];
                    }
                }
                Mode::Typed => {
                    if self.buf.len() < 5 {
                        let n = (5 - self.buf.len()).min(data.len());
                        self.buf.extend_from_slice(&data[..n]);
                        data = &data[n..];
                        if self.buf.len() < 5 {
                            return Ok(());
                        }
                    }
                    let tag = self.buf[0];
                    let len_bytes = [self.buf[1], self.buf[2], self.buf[3], self.buf[4]];
                    let Some(body_len) = self.header(tag, &len_bytes, out)? else {
                        self.buf.clear();
                        continue;
                    };
                    let want = 5 + body_len as usize - self.buf.len();
                    let n = want.min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() == 5 + body_len as usize {
                        let body = self.buf[5..].to_vec();
                        self.buf.clear();
                        out(Frame::Message {
                            tag,
                            body: Cow::Owned(body),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks a typed message's length (`len_bytes`, big-endian, counting itself). Returns
    /// the body length of a message to buffer, or None for one that is only counted (or
    /// over the limit): reported as skipped, its body passed over.
    fn header<'a>(
        &mut self,
        tag: u8,
        len_bytes: &[u8],
        out: &mut impl FnMut(Frame<'a>),
    ) -> Result<Option<u32>, ProtocolError> {
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
        let body_len = len - 4;
        if counted_only(self.direction, tag) || body_len > self.limits.max_buffered {
            out(Frame::Skipped { tag, len: body_len });
            if body_len > 0 {
                self.mode = Mode::Skipping {
                    remaining: body_len,
                };
            }
            return Ok(None);
        }
        Ok(Some(body_len))
    }
}

/// Whether `data` plausibly starts with a run of typed messages of `direction` that ends
/// exactly at its end or inside a message: used to find a message boundary after a gap.
pub fn plausible_boundary(direction: Direction, data: &[u8]) -> bool {
    let valid_tag = |t: u8| match direction {
        Direction::ToServer => b"QPBDECSHFdcfpX".contains(&t),
        Direction::ToClient => b"RKSZTDCIEN123ntsAcdGHWVv".contains(&t),
    };
    let mut at = 0usize;
    let mut seen = 0;
    while at + 5 <= data.len() {
        let tag = data[at];
        let len = u32::from_be_bytes([data[at + 1], data[at + 2], data[at + 3], data[at + 4]]);
        if !valid_tag(tag) || !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return false;
        }
        seen += 1;
        at += 1 + len as usize;
    }
    seen > 0 && (at >= data.len() || data.len() - at < 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames<'a>(f: &mut Framer, data: &'a [u8]) -> Vec<Frame<'a>> {
        let mut v = Vec::new();
        f.push(data, &mut |fr| v.push(fr)).unwrap();
        v
    }

    #[test]
    fn startup_then_typed() {
        let mut f = Framer::new(Direction::ToServer, FramerLimits::default());
        let mut data = vec![0, 0, 0, 8, 0, 3, 0, 0];
        data.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        let out = frames(&mut f, &data);
        assert_eq!(out[0], Frame::Startup(vec![0, 3, 0, 0]));
        assert_eq!(
            out[1],
            Frame::Message {
                tag: b'Q',
                body: Cow::Borrowed(&b"SELECT 1\0"[..])
            }
        );
    }

    #[test]
    fn huge_length_is_an_error_not_an_allocation() {
        let mut f = Framer::typed(Direction::ToServer, FramerLimits::default());
        let err = f
            .push(b"Q\x7f\xff\xff\xff", &mut |_| panic!("no frame"))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength { .. }));
        assert!(f.is_opaque());
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn data_rows_are_skipped_not_buffered() {
        let mut f = Framer::typed(Direction::ToClient, FramerLimits::default());
        let mut v = Vec::new();
        f.push(b"D\0\x10\0\0", &mut |fr| v.push(fr)).unwrap();
        assert_eq!(
            v,
            vec![Frame::Skipped {
                tag: b'D',
                len: 0x0010_0000 - 4
            }]
        );
        assert_eq!(f.buffered(), 0);
        // The body streams past without being held.
        f.push(&vec![0u8; 0x000f_fffc], &mut |_| panic!()).unwrap();
        assert!(f.at_boundary());
    }

    #[test]
    fn over_limit_messages_are_skipped() {
        let limits = FramerLimits { max_buffered: 4 };
        let mut f = Framer::typed(Direction::ToServer, limits);
        let out = frames(&mut f, b"Q\0\0\0\x0dSELECT 1\0S\0\0\0\x04");
        assert_eq!(out[0], Frame::Skipped { tag: b'Q', len: 9 });
        assert_eq!(
            out[1],
            Frame::Message {
                tag: b'S',
                body: Cow::Borrowed(&[][..])
            }
        );
    }

    #[test]
    fn split_anywhere_gives_the_same_frames() {
        // Messages borrowed whole from one push, or reassembled from pieces: the same.
        let mut stream = Vec::new();
        stream.extend_from_slice(b"P\0\0\0\x11\0SELECT $1\0\0\0");
        stream.extend_from_slice(b"B\0\0\0\x0c\0\0\0\0\0\0\0\0");
        stream.extend_from_slice(b"d\0\0\0\x07abc");
        stream.extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0");
        stream.extend_from_slice(b"S\0\0\0\x04");
        let whole = {
            let mut f = Framer::typed(Direction::ToServer, FramerLimits::default());
            frames(&mut f, &stream)
        };
        assert_eq!(whole.len(), 5);
        assert!(whole.iter().all(|fr| matches!(
            fr,
            Frame::Message {
                body: Cow::Borrowed(_),
                ..
            } | Frame::Skipped { .. }
        )));
        for cut in 1..stream.len() {
            let mut f = Framer::typed(Direction::ToServer, FramerLimits::default());
            let mut got = frames(&mut f, &stream[..cut]);
            got.extend(frames(&mut f, &stream[cut..]));
            assert_eq!(got, whole, "cut at {cut}");
            assert!(f.at_boundary());
        }
        let mut f = Framer::typed(Direction::ToServer, FramerLimits::default());
        let mut got = Vec::new();
        for b in stream.chunks(1) {
            got.extend(frames(&mut f, b));
        }
        assert_eq!(got, whole, "byte by byte");
    }

    #[test]
    fn boundary_detection() {
        assert!(plausible_boundary(
            Direction::ToServer,
            b"Q\0\0\0\x0dSELECT 1\0"
        ));
        assert!(plausible_boundary(Direction::ToServer, b"Q\0\0\0\x0dSELE"));
        assert!(!plausible_boundary(Direction::ToServer, b"ELECT 1\0"));
        assert!(!plausible_boundary(Direction::ToServer, b""));
    }
}
