//! Messages from the client.

use nom::{
    bytes::complete::take,
    multi::count,
    number::complete::{be_i16, be_i32, be_u32, be_u8},
};

use super::{cstr, ProtocolError, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};

/// A bound parameter value: None is SQL NULL.
pub type ParamValue = Option<Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    Startup {
        protocol: u32,
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    CancelRequest,
    Query(String),
    Parse {
        statement: String,
        query: String,
        param_types: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        param_formats: Vec<i16>,
        params: Vec<ParamValue>,
    },
    /// kind is b'S' (statement) or b'P' (portal)
    Describe {
        kind: u8,
        name: String,
    },
    Execute {
        portal: String,
        max_rows: i32,
    },
    Close {
        kind: u8,
        name: String,
    },
    Sync,
    Flush,
    CopyDone,
    CopyFail,
    FunctionCall {
        oid: u32,
        nargs: usize,
    },
    Terminate,
    /// PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse: the content is a
    /// secret and is never decoded or kept.
    Authentication,
}

type Res<'a, T> = nom::IResult<&'a [u8], T>;

fn malformed(tag: u8, what: &'static str) -> ProtocolError {
    ProtocolError::Malformed {
        tag: tag as char,
        what,
    }
}

/// Decodes an untyped startup-phase packet (the body after its length).
pub fn decode_startup(body: &[u8]) -> Result<FrontendMessage, ProtocolError> {
    let (rest, code) = be_u32::<_, nom::error::Error<&[u8]>>(body)
        .map_err(|_| malformed(b'0', "startup packet too short"))?;
    match code {
        SSL_REQUEST_CODE => Ok(FrontendMessage::SslRequest),
        GSSENC_REQUEST_CODE => Ok(FrontendMessage::GssEncRequest),
        CANCEL_REQUEST_CODE => Ok(FrontendMessage::CancelRequest),
        protocol if protocol >> 16 == 3 => {
            let mut params = Vec::new();
            let mut input = rest;
            loop {
                let (r, key) = cstr(input).map_err(|_| malformed(b'0', "unterminated key"))?;
                if key.is_empty() {
                    break;
                }
                let (r, value) = cstr(r).map_err(|_| malformed(b'0', "unterminated value"))?;
                params.push((key, value));
                input = r;
            }
            Ok(FrontendMessage::Startup { protocol, params })
        }
        _ => Err(malformed(b'0', "unknown protocol version")),
    }
}

fn parse_msg(body: &[u8]) -> Res<'_, (String, String, Vec<u32>)> {
    let (r, statement) = cstr(body)?;
    let (r, query) = cstr(r)?;
    let (r, n) = be_i16(r)?;
    let (r, types) = count(be_u32, n.max(0) as usize)(r)?;
    Ok((r, (statement, query, types)))
}

fn bind_msg(body: &[u8]) -> Res<'_, FrontendMessage> {
    let (r, portal) = cstr(body)?;
    let (r, statement) = cstr(r)?;
    let (r, nfmt) = be_i16(r)?;
    let (r, param_formats) = count(be_i16, nfmt.max(0) as usize)(r)?;
    let (mut r, nparams) = be_i16(r)?;
    let mut params = Vec::with_capacity(nparams.clamp(0, 4096) as usize);
    for _ in 0..nparams.max(0) {
        let (r2, len) = be_i32(r)?;
        if len < 0 {
            params.push(None);
            r = r2;
        } else {
            let (r3, v) = take(len as usize)(r2)?;
            params.push(Some(v.to_vec()));
            r = r3;
        }
    }
    // Result-column format codes follow; they do not matter to the audit.
    Ok((
        r,
        FrontendMessage::Bind {
            portal,
            statement,
            param_formats,
            params,
        },
    ))
}

/// Decodes a typed client message.
pub fn decode(tag: u8, body: &[u8]) -> Result<FrontendMessage, ProtocolError> {
    let bad = |what| malformed(tag, what);
    Ok(match tag {
        b'Q' => FrontendMessage::Query(cstr(body).map_err(|_| bad("unterminated query"))?.1),
        b'P' => {
            let (_, (statement, query, param_types)) =
                parse_msg(body).map_err(|_| bad("truncated Parse"))?;
            FrontendMessage::Parse {
                statement,
                query,
                param_types,
            }
        }
        b'B' => bind_msg(body).map_err(|_| bad("truncated Bind"))?.1,
        b'D' | b'C' => {
            let (r, kind) =
                be_u8::<_, nom::error::Error<&[u8]>>(body).map_err(|_| bad("missing kind"))?;
            if kind != b'S' && kind != b'P' {
                return Err(bad("kind is neither 'S' nor 'P'"));
            }
            let name = cstr(r).map_err(|_| bad("unterminated name"))?.1;
            if tag == b'D' {
                FrontendMessage::Describe { kind, name }
            } else {
                FrontendMessage::Close { kind, name }
            }
        }
        b'E' => {
            let (r, portal) = cstr(body).map_err(|_| bad("unterminated portal"))?;
            let (_, max_rows) =
                be_i32::<_, nom::error::Error<&[u8]>>(r).map_err(|_| bad("missing row limit"))?;
            FrontendMessage::Execute { portal, max_rows }
        }
        b'S' => FrontendMessage::Sync,
        b'H' => FrontendMessage::Flush,
        b'c' => FrontendMessage::CopyDone,
        b'f' => FrontendMessage::CopyFail,
        b'F' => {
            let (r, oid) = be_u32::<_, nom::error::Error<&[u8]>>(body)
                .map_err(|_| bad("missing function oid"))?;
            let (r, nfmt) = be_i16::<_, nom::error::Error<&[u8]>>(r)
                .map_err(|_| bad("missing format count"))?;
            let skip = 2 * nfmt.max(0) as usize;
            let nargs = r
                .get(skip..skip + 2)
                .map(|b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize)
                .unwrap_or(0);
            FrontendMessage::FunctionCall { oid, nargs }
        }
        b'X' => FrontendMessage::Terminate,
        b'p' => FrontendMessage::Authentication,
        other => return Err(ProtocolError::UnknownTag(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_with_null_text_and_binary() {
        let mut body = b"p1\0s1\0".to_vec();
        body.extend_from_slice(&[0, 2, 0, 0, 0, 1]); // formats: text, binary
        body.extend_from_slice(&[0, 2]); // two params
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]); // NULL
        body.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 42]); // int4 42
        body.extend_from_slice(&[0, 0]);
        let m = decode(b'B', &body).unwrap();
        assert_eq!(
            m,
            FrontendMessage::Bind {
                portal: "p1".into(),
                statement: "s1".into(),
                param_formats: vec![0, 1],
                params: vec![None, Some(vec![0, 0, 0, 42])],
            }
        );
    }

    #[test]
    fn bind_with_lying_length_is_an_error() {
        let mut body = b"\0\0\0\0\0\x01".to_vec();
        body.extend_from_slice(&[0x7f, 0, 0, 0, 1]);
        assert!(decode(b'B', &body).is_err());
    }

    #[test]
    fn startup_params() {
        let mut body = vec![0, 3, 0, 0];
        body.extend_from_slice(b"user\0alice\0database\0shop\0\0");
        assert_eq!(
            decode_startup(&body).unwrap(),
            FrontendMessage::Startup {
                protocol: 196_608,
                params: vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "shop".into())
                ],
            }
        );
    }
}
