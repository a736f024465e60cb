//! PostgreSQL v3 wire protocol: framing and message decoding for both directions.
//!
//! No I/O here: the capture pipeline and the inline proxy both feed bytes in and get
//! messages out. Every length prefix is checked before anything is buffered, and bodies that
//! are only counted (DataRow, CopyData) or larger than the configured limit are skipped as
//! they stream past instead of being buffered.

pub mod backend;
pub mod framer;
pub mod frontend;

pub use backend::BackendMessage;
pub use framer::{Frame, Framer, FramerLimits};
pub use frontend::FrontendMessage;

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

/// Protocol version 3.0 in a StartupMessage.
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

/// Reads a NUL-terminated string; invalid UTF-8 is replaced, never trusted.
pub(crate) fn cstr(input: &[u8]) -> nom::IResult<&[u8], String> {
    let (rest, bytes) = nom::bytes::complete::take_until(&b"\0"[..])(input)?;
    let (rest, _) = nom::bytes::complete::tag(&b"\0"[..])(rest)?;
    Ok((rest, String::from_utf8_lossy(bytes).into_owned()))
}
