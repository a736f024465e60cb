//! PostgreSQL v3 wire protocol (3.0 and 3.2): a lossless codec for both directions.
//!
//! No I/O here: the capture pipeline and the inline proxy both feed bytes in and get
//! messages out. [`tokenizer`] cuts a byte stream into messages with their spans (whole,
//! or header and body chunks for what is only counted or forwarded); [`frontend`] and
//! [`backend`] decode a message into a view that borrows its body and encode it back byte
//! for byte, or build new ones (errors, rewritten rows). docs/protocol-codec.md says why
//! this is hand-written rather than taken from the `pgwire` crate.

pub mod backend;
pub mod frontend;
pub mod tokenizer;
pub mod wire;

pub use backend::BackendMessage;
pub use frontend::FrontendMessage;
pub use tokenizer::{BufferBudget, Span, Token, Tokenizer, TokenizerLimits};

/// Which way bytes travel on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    ToServer,
    ToClient,
}

impl Direction {
    pub fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// Protocol version 3.0 in a StartupMessage (3.2 is 196_610).
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message '{tag}' declares length {len}, outside {min}..={max}")]
    BadLength {
        tag: char,
        len: u32,
        min: u32,
        max: u32,
    },
    #[error("message '{tag}' is malformed: {what}")]
    Malformed { tag: char, what: &'static str },
    #[error("unknown message tag 0x{0:02x}")]
    UnknownTag(u8),
}

/// A message with its direction: the same tag means different messages each way ('D' is
/// Describe from the client and DataRow from the server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Frontend(FrontendMessage<'a>),
    Backend(BackendMessage<'a>),
}

impl Message<'_> {
    pub fn direction(&self) -> Direction {
        match self {
            Message::Frontend(_) => Direction::ToServer,
            Message::Backend(_) => Direction::ToClient,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Frontend(m) => m.encode(out),
            Message::Backend(m) => m.encode(out),
        }
    }
}

/// Decodes a typed message travelling in `direction`.
pub fn decode(direction: Direction, tag: u8, body: &[u8]) -> Result<Message<'_>, ProtocolError> {
    Ok(match direction {
        Direction::ToServer => Message::Frontend(frontend::decode(tag, body)?),
        Direction::ToClient => Message::Backend(backend::decode(tag, body)?),
    })
}
