//! Messages from the server: decoded as views borrowing the message body, encoded back
//! byte for byte, and built from parts where the proxy answers in the server's place.

use super::{
    wire::{I16s, MessageWriter, Oids, Reader, Secret, Values},
    ProtocolError,
};

/// The columns of a RowDescription, checked at decode, read through [`Fields::iter`].
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Fields<'a> {
    count: u16,
    raw: &'a [u8],
}

/// One result column: its table OID and column number tie it to a table column (0 for an
/// expression); its type and format say how its values are encoded. `N` is how the name is
/// held: borrowed from the message ([`FieldDescription`]) or owned (the conversation's
/// `Column`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<N> {
    pub name: N,
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// A column as a RowDescription carries it, its name borrowed.
pub type FieldDescription<'a> = Field<&'a [u8]>;

const FIELD_FIXED: usize = 18;

impl<'a> Fields<'a> {
    pub fn len(&self) -> usize {
        self.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = FieldDescription<'a>> + 'a {
        let mut rest = self.raw;
        std::iter::from_fn(move || {
            let nul = rest.iter().position(|&b| b == 0)?;
            let name = &rest[..nul];
            let f = rest.get(nul + 1..nul + 1 + FIELD_FIXED)?;
            rest = &rest[nul + 1 + FIELD_FIXED..];
            Some(Field {
                name,
                table_oid: u32::from_be_bytes([f[0], f[1], f[2], f[3]]),
                column: i16::from_be_bytes([f[4], f[5]]),
                type_oid: u32::from_be_bytes([f[6], f[7], f[8], f[9]]),
                type_size: i16::from_be_bytes([f[10], f[11]]),
                type_modifier: i32::from_be_bytes([f[12], f[13], f[14], f[15]]),
                format: i16::from_be_bytes([f[16], f[17]]),
            })
        })
    }
}

impl std::fmt::Debug for Fields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The fields of an ErrorResponse or NoticeResponse: (code, value) pairs in the order sent.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct NoticeFields<'a> {
    /// The pairs, without the final NUL.
    raw: &'a [u8],
}

impl<'a> NoticeFields<'a> {
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let mut rest = self.raw;
        std::iter::from_fn(move || {
            let (&code, tail) = rest.split_first()?;
            let nul = tail.iter().position(|&b| b == 0)?;
            rest = &tail[nul + 1..];
            Some((code, &tail[..nul]))
        })
    }
    /// The first field with this code ('S' severity, 'V' non-localized severity, 'C'
    /// SQLSTATE, 'M' message, 'D' detail, ...).
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }
    /// What the audit keeps of an error: severity, SQLSTATE, message.
    pub fn summary(&self) -> ErrorFields {
        let text = |c| {
            self.get(c)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let severity = match self.get(b'V') {
            Some(_) => text(b'V'),
            None => text(b'S'),
        };
        ErrorFields {
            severity,
            code: text(b'C'),
            message: text(b'M'),
        }
    }
}

/// What can be read of a server message of which only the first bytes of the body are
/// known: the complete fields of an ErrorResponse or NoticeResponse (severity and SQLSTATE
/// come first). None for other messages.
pub fn decode_partial(tag: u8, prefix: &[u8]) -> Option<BackendMessage<'_>> {
    let fields = NoticeFields { raw: prefix };
    match tag {
        b'E' => Some(BackendMessage::ErrorResponse(fields)),
        b'N' => Some(BackendMessage::NoticeResponse(fields)),
        _ => None,
    }
}

impl std::fmt::Debug for NoticeFields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(c, v)| (c as char, String::from_utf8_lossy(v).into_owned())),
            )
            .finish()
    }
}

/// An error as the audit records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// The three CopyIn/CopyOut/CopyBoth responses share a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyResponse<'a> {
    /// 0 text, 1 binary (overall).
    pub format: u8,
    pub column_formats: I16s<'a>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    /// AuthenticationOk (code 0) and every request for credentials (3 cleartext, 5 MD5
    /// with its salt, 10 SASL with its mechanisms, 11/12 SASL continue/final, ...). The
    /// data after the code is part of an authentication exchange: kept as a secret.
    Authentication {
        code: u32,
        data: Secret<'a>,
    },
    /// The cancel key: 4 bytes in protocol 3.0, up to 256 in 3.2.
    BackendKeyData {
        pid: u32,
        key: Secret<'a>,
    },
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    /// b'I' idle, b'T' in a transaction block, b'E' in a failed one.
    ReadyForQuery {
        status: u8,
    },
    RowDescription(Fields<'a>),
    DataRow(Values<'a>),
    CommandComplete {
        tag: &'a [u8],
    },
    EmptyQueryResponse,
    ErrorResponse(NoticeFields<'a>),
    NoticeResponse(NoticeFields<'a>),
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    ParameterDescription(Oids<'a>),
    PortalSuspended,
    CopyInResponse(CopyResponse<'a>),
    CopyOutResponse(CopyResponse<'a>),
    CopyBothResponse(CopyResponse<'a>),
    CopyData {
        data: &'a [u8],
    },
    CopyDone,
    FunctionCallResponse {
        value: Option<&'a [u8]>,
    },
    NegotiateProtocolVersion {
        newest_minor: u32,
        unrecognized: Vec<&'a [u8]>,
    },
    NotificationResponse {
        pid: u32,
        channel: &'a [u8],
        payload: &'a [u8],
    },
}

fn copy_response<'a>(r: &mut Reader<'a>) -> Result<CopyResponse<'a>, ProtocolError> {
    Ok(CopyResponse {
        format: r.u8("missing format")?,
        column_formats: r.counted_i16s("truncated column formats")?,
    })
}

fn notice_fields<'a>(r: &mut Reader<'a>) -> Result<NoticeFields<'a>, ProtocolError> {
    let body = r.rest();
    let mut at = 0;
    loop {
        match body.get(at) {
            None => return Err(r.malformed("unterminated field list")),
            Some(0) => {
                if at + 1 != body.len() {
                    return Err(r.malformed("trailing bytes after the field list"));
                }
                return Ok(NoticeFields { raw: &body[..at] });
            }
            Some(_) => {
                let Some(nul) = body[at + 1..].iter().position(|&b| b == 0) else {
                    return Err(r.malformed("unterminated field"));
                };
                at += 1 + nul + 1;
            }
        }
    }
}

/// Decodes a typed server message.
pub fn decode(tag: u8, body: &[u8]) -> Result<BackendMessage<'_>, ProtocolError> {
    let mut r = Reader::new(tag, body);
    let m = match tag {
        b'R' => BackendMessage::Authentication {
            code: r.u32("missing authentication code")?,
            data: Secret(r.rest()),
        },
        b'K' => {
            let pid = r.u32("missing process id")?;
            let key = r.rest();
            if key.is_empty() || key.len() > 256 {
                return Err(r.malformed("cancel key of 1 to 256 bytes expected"));
            }
            BackendMessage::BackendKeyData {
                pid,
                key: Secret(key),
            }
        }
        b'S' => BackendMessage::ParameterStatus {
            name: r.cstr("unterminated name")?,
            value: r.cstr("unterminated value")?,
        },
        b'Z' => BackendMessage::ReadyForQuery {
            status: r.u8("missing transaction status")?,
        },
        b'T' => {
            let count = r.u16("missing field count")?;
            let start = r.rest();
            let mut fr = Reader::new(tag, start);
            for _ in 0..count {
                fr.cstr("unterminated column name")?;
                fr.bytes(FIELD_FIXED, "truncated field description")?;
            }
            fr.finish()?;
            BackendMessage::RowDescription(Fields { count, raw: start })
        }
        b'D' => BackendMessage::DataRow(r.counted_values("truncated column value")?),
        b'C' => BackendMessage::CommandComplete {
            tag: r.cstr("unterminated command tag")?,
        },
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::ErrorResponse(notice_fields(&mut r)?),
        b'N' => BackendMessage::NoticeResponse(notice_fields(&mut r)?),
        b'1' => BackendMessage::ParseComplete,
        b'2' => BackendMessage::BindComplete,
        b'3' => BackendMessage::CloseComplete,
        b'n' => BackendMessage::NoData,
        b't' => BackendMessage::ParameterDescription(r.counted_oids("truncated type oids")?),
        b's' => BackendMessage::PortalSuspended,
        b'G' => BackendMessage::CopyInResponse(copy_response(&mut r)?),
        b'H' => BackendMessage::CopyOutResponse(copy_response(&mut r)?),
        b'W' => BackendMessage::CopyBothResponse(copy_response(&mut r)?),
        b'd' => BackendMessage::CopyData { data: r.rest() },
        b'c' => BackendMessage::CopyDone,
        b'V' => {
            let len = r.i32("missing result length")?;
            let value = match len {
                -1 => None,
                n if n >= 0 => Some(r.bytes(n as usize, "truncated result")?),
                _ => return Err(r.malformed("negative result length")),
            };
            BackendMessage::FunctionCallResponse { value }
        }
        b'v' => {
            let newest_minor = r.u32("missing minor version")?;
            let n = r.u32("missing option count")?;
            // Each option takes at least its NUL: a count beyond the body is a lie.
            if n as usize > body.len() {
                return Err(r.malformed("option count beyond the message"));
            }
            let mut unrecognized = Vec::with_capacity(n as usize);
            for _ in 0..n {
                unrecognized.push(r.cstr("unterminated option name")?);
            }
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        b'A' => BackendMessage::NotificationResponse {
            pid: r.u32("missing process id")?,
            channel: r.cstr("unterminated channel")?,
            payload: r.cstr("unterminated payload")?,
        },
        other => return Err(ProtocolError::UnknownTag(other)),
    };
    r.finish()?;
    Ok(m)
}

impl BackendMessage<'_> {
    pub fn tag(&self) -> u8 {
        use BackendMessage::*;
        match self {
            Authentication { .. } => b'R',
            BackendKeyData { .. } => b'K',
            ParameterStatus { .. } => b'S',
            ReadyForQuery { .. } => b'Z',
            RowDescription(_) => b'T',
            DataRow(_) => b'D',
            CommandComplete { .. } => b'C',
            EmptyQueryResponse => b'I',
            ErrorResponse(_) => b'E',
            NoticeResponse(_) => b'N',
            ParseComplete => b'1',
            BindComplete => b'2',
            CloseComplete => b'3',
            NoData => b'n',
            ParameterDescription(_) => b't',
            PortalSuspended => b's',
            CopyInResponse(_) => b'G',
            CopyOutResponse(_) => b'H',
            CopyBothResponse(_) => b'W',
            CopyData { .. } => b'd',
            CopyDone => b'c',
            FunctionCallResponse { .. } => b'V',
            NegotiateProtocolVersion { .. } => b'v',
            NotificationResponse { .. } => b'A',
        }
    }

    /// Appends the message, framed (tag and length), to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use BackendMessage::*;
        let mut w = MessageWriter::begin(out, Some(self.tag()));
        match self {
            Authentication { code, data } => {
                w.u32(*code).bytes(data.0);
            }
            BackendKeyData { pid, key } => {
                w.u32(*pid).bytes(key.0);
            }
            ParameterStatus { name, value } => {
                w.cstr(name).cstr(value);
            }
            ReadyForQuery { status } => {
                w.u8(*status);
            }
            RowDescription(fields) => {
                w.u16(fields.count).bytes(fields.raw);
            }
            DataRow(values) => {
                w.u16(values.count).bytes(values.raw);
            }
            CommandComplete { tag } => {
                w.cstr(tag);
            }
            ErrorResponse(fields) | NoticeResponse(fields) => {
                w.bytes(fields.raw).u8(0);
            }
            EmptyQueryResponse | ParseComplete | BindComplete | CloseComplete | NoData
            | PortalSuspended | CopyDone => {}
            ParameterDescription(oids) => {
                w.u16(oids.len() as u16).bytes(oids.0);
            }
            CopyInResponse(c) | CopyOutResponse(c) | CopyBothResponse(c) => {
                w.u8(c.format)
                    .u16(c.column_formats.len() as u16)
                    .bytes(c.column_formats.0);
            }
            CopyData { data } => {
                w.bytes(data);
            }
            FunctionCallResponse { value } => {
                w.value(*value);
            }
            NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            } => {
                w.u32(*newest_minor).u32(unrecognized.len() as u32);
                for o in unrecognized {
                    w.cstr(o);
                }
            }
            NotificationResponse {
                pid,
                channel,
                payload,
            } => {
                w.u32(*pid).cstr(channel).cstr(payload);
            }
        }
        w.finish();
    }
}

/// Writes an ErrorResponse (or, with `notice`, a NoticeResponse) from its parts: severity
/// (both the localized 'S' and the fixed 'V' field, as servers since 9.6 send), SQLSTATE,
/// message, and optional (code, value) fields such as 'D' detail or 'H' hint.
pub fn encode_error(
    out: &mut Vec<u8>,
    notice: bool,
    severity: &str,
    sqlstate: &str,
    message: &str,
    extra: &[(u8, &str)],
) {
    let mut w = MessageWriter::begin(out, Some(if notice { b'N' } else { b'E' }));
    w.u8(b'S').cstr(severity.as_bytes());
    w.u8(b'V').cstr(severity.as_bytes());
    w.u8(b'C').cstr(sqlstate.as_bytes());
    w.u8(b'M').cstr(message.as_bytes());
    for (code, value) in extra {
        w.u8(*code).cstr(value.as_bytes());
    }
    w.u8(0);
    w.finish();
}

/// Writes a ReadyForQuery with this transaction status (b'I', b'T' or b'E').
pub fn encode_ready_for_query(out: &mut Vec<u8>, status: u8) {
    BackendMessage::ReadyForQuery { status }.encode(out);
}

/// Writes a DataRow of these values (None: NULL): what a rewriter produces after changing
/// some of them, lengths recomputed.
pub fn encode_data_row<'v>(
    out: &mut Vec<u8>,
    values: impl ExactSizeIterator<Item = Option<&'v [u8]>>,
) {
    let mut w = MessageWriter::begin(out, Some(b'D'));
    w.u16(values.len() as u16);
    for v in values {
        w.value(v);
    }
    w.finish();
}

/// Rows affected or returned, from a CommandComplete tag ("INSERT 0 5", "SELECT 3",
/// "UPDATE 2", "COPY 10"); None for tags without a count ("BEGIN", "CREATE TABLE").
pub fn rows_of_tag(tag: &str) -> Option<u64> {
    // Bytes, not iterators of words: a tag ends every statement.
    let b = tag.as_bytes();
    let start = b.iter().position(|c| !c.is_ascii_whitespace())?;
    let end = b[start..]
        .iter()
        .position(|c| c.is_ascii_whitespace())
        .map_or(b.len(), |e| start + e);
    let counted = matches!(
        &b[start..end],
        b"INSERT" | b"SELECT" | b"UPDATE" | b"DELETE" | b"MERGE" | b"COPY" | b"FETCH" | b"MOVE"
    );
    if !counted {
        return None;
    }
    let last = b.iter().rposition(|&c| c == b' ').map_or(0, |i| i + 1);
    tag[last..].parse().ok()
}

/// The command of a CommandComplete tag without its counts ("INSERT 0 5" -> "INSERT").
/// Borrowed from the tag when its words are single-spaced from its start (as servers send
/// them), else the words joined by single spaces.
pub fn command_of_tag(tag: &str) -> std::borrow::Cow<'_, str> {
    let words = || {
        tag.split_ascii_whitespace()
            .take_while(|w| !w.bytes().all(|b| b.is_ascii_digit()))
    };
    // Where the words end, if each begins one byte after the one before (the first at 0).
    let mut end = Some(0);
    for w in words() {
        let at = w.as_ptr() as usize - tag.as_ptr() as usize;
        end = end
            .filter(|&e| at == if e == 0 { 0 } else { e + 1 })
            .map(|_| at + w.len());
    }
    match end {
        Some(e) => std::borrow::Cow::Borrowed(&tag[..e]),
        None => std::borrow::Cow::Owned(words().collect::<Vec<_>>().join(" ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::tokenizer::frame;

    fn round_trip(tag: u8, body: &[u8]) -> BackendMessage<'_> {
        let m = decode(tag, body).unwrap_or_else(|e| panic!("{}: {e}", tag as char));
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(out, frame(tag, body), "{m:?}");
        m
    }

    #[test]
    fn tags() {
        assert_eq!(rows_of_tag("INSERT 0 5"), Some(5));
        assert_eq!(rows_of_tag("SELECT 3"), Some(3));
        assert_eq!(rows_of_tag("CREATE TABLE"), None);
        assert_eq!(rows_of_tag("  UPDATE\t7"), None);
        assert_eq!(rows_of_tag("  UPDATE 7"), Some(7));
        assert_eq!(rows_of_tag("SELECT 3 "), None);
        assert_eq!(rows_of_tag("SELECT"), None);
        assert_eq!(rows_of_tag("SELECTED 3"), None);
        assert_eq!(rows_of_tag(""), None);
        assert_eq!(rows_of_tag("COPY 18446744073709551615"), Some(u64::MAX));
        assert_eq!(rows_of_tag("MERGE x"), None);
        assert_eq!(command_of_tag("INSERT 0 5"), "INSERT");
        assert_eq!(command_of_tag("CREATE TABLE"), "CREATE TABLE");
        assert_eq!(command_of_tag("SELECT 1"), "SELECT");
        assert_eq!(command_of_tag("  CREATE   TABLE "), "CREATE TABLE");
        assert_eq!(command_of_tag("1 2"), "");
        assert_eq!(command_of_tag(""), "");
    }

    #[test]
    fn error_response() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0\0";
        let BackendMessage::ErrorResponse(e) = round_trip(b'E', body) else {
            panic!()
        };
        let e = e.summary();
        assert_eq!(e.code, "42P01");
        assert_eq!(e.severity, "ERROR");
        assert!(decode(b'E', b"SERROR").is_err());
        assert!(decode(b'E', b"SERROR\0\0x").is_err());
    }

    #[test]
    fn row_description_keeps_what_masking_needs() {
        let mut body = vec![0, 2];
        body.extend_from_slice(b"email\0");
        body.extend_from_slice(&16384u32.to_be_bytes());
        body.extend_from_slice(&3i16.to_be_bytes());
        body.extend_from_slice(&25u32.to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(b"n\0");
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(&20u32.to_be_bytes());
        body.extend_from_slice(&8i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        let BackendMessage::RowDescription(fields) = round_trip(b'T', &body) else {
            panic!()
        };
        let f: Vec<_> = fields.iter().collect();
        assert_eq!(f.len(), 2);
        assert_eq!(
            (f[0].name, f[0].table_oid, f[0].column),
            (&b"email"[..], 16384, 3)
        );
        assert_eq!((f[1].type_oid, f[1].type_size, f[1].format), (20, 8, 1));
        assert!(decode(b'T', &body[..body.len() - 1]).is_err());
    }

    #[test]
    fn every_message_round_trips() {
        let cases: &[(u8, &[u8])] = &[
            (b'R', b"\0\0\0\0"),
            (b'R', b"\0\0\0\x05salt"),
            (b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            (b'K', b"\0\0\x30\x39\x01\x02\x03\x04"),
            (b'K', &[0, 0, 0, 1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]),
            (b'S', b"client_encoding\0UTF8\0"),
            (b'Z', b"I"),
            (b'T', b"\0\0"),
            (b'D', b"\0\x03\0\0\0\x01a\xff\xff\xff\xff\0\0\0\0"),
            (b'C', b"SELECT 1\0"),
            (b'I', b""),
            (b'N', b"SNOTICE\0VNOTICE\0C00000\0Mhi\0\0"),
            (b'1', b""),
            (b'2', b""),
            (b'3', b""),
            (b'n', b""),
            (b't', b"\0\x02\0\0\0\x17\0\0\0\x19"),
            (b's', b""),
            (b'G', b"\0\0\x02\0\0\0\0"),
            (b'H', b"\x01\0\x01\0\x01"),
            (b'W', b"\0\0\0"),
            (b'd', b"1\t2\n"),
            (b'c', b""),
            (b'V', b"\xff\xff\xff\xff"),
            (b'V', b"\0\0\0\x02ok"),
            (b'v', b"\0\0\0\x01\0\0\0\x01_pq_.x\0"),
            (b'A', b"\0\0\0\x07chan\0payload\0"),
        ];
        for (tag, body) in cases {
            round_trip(*tag, body);
        }
        assert!(decode(b'v', b"\0\0\0\x01\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn built_messages_decode() {
        let mut out = Vec::new();
        encode_error(
            &mut out,
            false,
            "ERROR",
            "42501",
            "blocked",
            &[(b'D', "by rule")],
        );
        encode_ready_for_query(&mut out, b'E');
        encode_data_row(&mut out, [Some(&b"****"[..]), None, Some(b"")].into_iter());
        let mut messages = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = u32::from_be_bytes([out[at + 1], out[at + 2], out[at + 3], out[at + 4]]);
            let end = at + 1 + len as usize;
            messages.push(decode(out[at], &out[at + 5..end]).unwrap());
            at = end;
        }
        assert_eq!(at, out.len());
        let BackendMessage::ErrorResponse(e) = &messages[0] else {
            panic!()
        };
        assert_eq!(e.summary().code, "42501");
        assert_eq!(e.get(b'D'), Some(&b"by rule"[..]));
        assert_eq!(messages[1], BackendMessage::ReadyForQuery { status: b'E' });
        let BackendMessage::DataRow(v) = &messages[2] else {
            panic!()
        };
        assert_eq!(
            v.iter().collect::<Vec<_>>(),
            vec![Some(&b"****"[..]), None, Some(&b""[..])]
        );
    }
}
