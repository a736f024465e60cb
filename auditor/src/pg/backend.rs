//! Messages from the server.

use nom::number::complete::{be_i16, be_u32, be_u8};

use super::{cstr, ProtocolError};

/// A column of a RowDescription: the table OID and column number feed masking later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    pub table_oid: u32,
    pub column: i16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// AuthenticationOk (0) and the requests for credentials; SASL payloads are not kept.
    Authentication(u32),
    BackendKeyData {
        pid: u32,
    },
    ParameterStatus {
        name: String,
        value: String,
    },
    /// b'I' idle, b'T' in a transaction, b'E' in a failed transaction
    ReadyForQuery(u8),
    RowDescription(Vec<FieldDescription>),
    /// Only counted: the framer never buffers its body.
    DataRow,
    CommandComplete(String),
    EmptyQueryResponse,
    ErrorResponse(ErrorFields),
    NoticeResponse(ErrorFields),
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    ParameterDescription,
    PortalSuspended,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    CopyData,
    CopyDone,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NotificationResponse,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

fn error_fields(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut fields = ErrorFields::default();
    let mut input = body;
    loop {
        let (r, field) =
            be_u8::<_, nom::error::Error<&[u8]>>(input).map_err(|_| ProtocolError::Malformed {
                tag: 'E',
                what: "unterminated field list",
            })?;
        if field == 0 {
            return Ok(fields);
        }
        let (r, value) = cstr(r).map_err(|_| ProtocolError::Malformed {
            tag: 'E',
            what: "unterminated field",
        })?;
        match field {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        input = r;
    }
}

fn row_description(body: &[u8]) -> nom::IResult<&[u8], Vec<FieldDescription>> {
    let (mut r, n) = be_i16(body)?;
    let mut fields = Vec::with_capacity(n.clamp(0, 1664) as usize);
    for _ in 0..n.max(0) {
        let (r2, name) = cstr(r)?;
        let (r2, table_oid) = be_u32(r2)?;
        let (r2, column) = be_i16(r2)?;
        // type oid (4), type size (2), type modifier (4), format (2)
        let (r2, _) = nom::bytes::complete::take(12usize)(r2)?;
        fields.push(FieldDescription {
            name,
            table_oid,
            column,
        });
        r = r2;
    }
    Ok((r, fields))
}

/// Decodes a typed server message.
pub fn decode(tag: u8, body: &[u8]) -> Result<BackendMessage, ProtocolError> {
    let bad = |what| ProtocolError::Malformed {
        tag: tag as char,
        what,
    };
    let u32_at0 = || -> Result<u32, ProtocolError> {
        body.get(0..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| bad("too short"))
    };
    Ok(match tag {
        b'R' => BackendMessage::Authentication(u32_at0()?),
        b'K' => BackendMessage::BackendKeyData { pid: u32_at0()? },
        b'S' => {
            let (r, name) = cstr(body).map_err(|_| bad("unterminated name"))?;
            let (_, value) = cstr(r).map_err(|_| bad("unterminated value"))?;
            BackendMessage::ParameterStatus { name, value }
        }
        b'Z' => BackendMessage::ReadyForQuery(*body.first().ok_or_else(|| bad("empty"))?),
        b'T' => BackendMessage::RowDescription(
            row_description(body)
                .map_err(|_| bad("truncated field list"))?
                .1,
        ),
        b'D' => BackendMessage::DataRow,
        b'C' => BackendMessage::CommandComplete(cstr(body).map_err(|_| bad("unterminated tag"))?.1),
        b'I' => BackendMessage::EmptyQueryResponse,
        b'E' => BackendMessage::ErrorResponse(error_fields(body)?),
        b'N' => BackendMessage::NoticeResponse(error_fields(body)?),
        b'1' => BackendMessage::ParseComplete,
        b'2' => BackendMessage::BindComplete,
        b'3' => BackendMessage::CloseComplete,
        b'n' => BackendMessage::NoData,
        b't' => BackendMessage::ParameterDescription,
        b's' => BackendMessage::PortalSuspended,
        b'G' => BackendMessage::CopyInResponse,
        b'H' => BackendMessage::CopyOutResponse,
        b'W' => BackendMessage::CopyBothResponse,
        b'd' => BackendMessage::CopyData,
        b'c' => BackendMessage::CopyDone,
        b'V' => BackendMessage::FunctionCallResponse,
        b'v' => BackendMessage::NegotiateProtocolVersion,
        b'A' => BackendMessage::NotificationResponse,
        other => return Err(ProtocolError::UnknownTag(other)),
    })
}

/// Rows affected or returned, from a CommandComplete tag ("INSERT 0 5", "SELECT 3",
/// "UPDATE 2", "COPY 10"); None for tags without a count ("BEGIN", "CREATE TABLE").
pub fn rows_of_tag(tag: &str) -> Option<u64> {
    let mut words = tag.split_ascii_whitespace();
    let first = words.next()?;
    let counted = matches!(
        first,
        "INSERT" | "SELECT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE"
    );
    if !counted {
        return None;
    }
    tag.rsplit(' ').next()?.parse().ok()
}

/// The command of a CommandComplete tag without its counts ("INSERT 0 5" -> "INSERT").
pub fn command_of_tag(tag: &str) -> String {
    tag.split_ascii_whitespace()
        .take_while(|w| !w.bytes().all(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(rows_of_tag("INSERT 0 5"), Some(5));
        assert_eq!(rows_of_tag("SELECT 3"), Some(3));
        assert_eq!(rows_of_tag("CREATE TABLE"), None);
        assert_eq!(command_of_tag("INSERT 0 5"), "INSERT");
        assert_eq!(command_of_tag("CREATE TABLE"), "CREATE TABLE");
    }

    #[test]
    fn error_response() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0\0";
        let BackendMessage::ErrorResponse(e) = decode(b'E', body).unwrap() else {
            panic!()
        };
        assert_eq!(e.code, "42P01");
        assert_eq!(e.severity, "ERROR");
        assert!(decode(b'E', b"SERROR").is_err());
    }
}
