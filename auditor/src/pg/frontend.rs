//! Messages from the client: decoded as views borrowing the message body, encoded back
//! byte for byte.

use super::{
    wire::{I16s, MessageWriter, Oids, Reader, Secret, Values},
    ProtocolError, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE,
};

/// What a Describe or Close names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn decode(r: &mut Reader<'_>) -> Result<Self, ProtocolError> {
        match r.u8("missing kind")? {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            _ => Err(r.malformed("kind is neither 'S' nor 'P'")),
        }
    }
    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    /// StartupMessage (untyped). `params` in the order sent.
    Startup {
        protocol: u32,
        params: Vec<(&'a [u8], &'a [u8])>,
    },
    SslRequest,
    GssEncRequest,
    /// CancelRequest (untyped, on a connection of its own). The key is 4 bytes in protocol
    /// 3.0 and up to 256 in 3.2.
    CancelRequest {
        pid: u32,
        key: Secret<'a>,
    },
    Query {
        sql: &'a [u8],
    },
    Parse {
        name: &'a [u8],
        sql: &'a [u8],
        param_types: Oids<'a>,
    },
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
        param_formats: I16s<'a>,
        params: Values<'a>,
        result_formats: I16s<'a>,
    },
    Describe {
        target: Target,
        name: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
        max_rows: i32,
    },
    Close {
        target: Target,
        name: &'a [u8],
    },
    Sync,
    Flush,
    CopyData {
        data: &'a [u8],
    },
    CopyDone,
    CopyFail {
        message: &'a [u8],
    },
    FunctionCall {
        oid: u32,
        arg_formats: I16s<'a>,
        args: Values<'a>,
        result_format: i16,
    },
    Terminate,
    /// PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse (all 'p'; which
    /// one depends on the server's request): a secret, never decoded further.
    AuthResponse(Secret<'a>),
}

/// Decodes an untyped startup-phase packet (the body after its length).
pub fn decode_startup(body: &[u8]) -> Result<FrontendMessage<'_>, ProtocolError> {
    let mut r = Reader::new(b'0', body);
    let code = r.u32("startup packet too short")?;
    let m = match code {
        SSL_REQUEST_CODE => FrontendMessage::SslRequest,
        GSSENC_REQUEST_CODE => FrontendMessage::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            let pid = r.u32("missing process id")?;
            let key = r.rest();
            if key.is_empty() || key.len() > 256 {
                return Err(r.malformed("cancel key of 1 to 256 bytes expected"));
            }
            FrontendMessage::CancelRequest {
                pid,
                key: Secret(key),
            }
        }
        protocol if protocol >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let key = r.cstr("unterminated key")?;
                if key.is_empty() {
                    break;
                }
                params.push((key, r.cstr("unterminated value")?));
            }
            FrontendMessage::Startup { protocol, params }
        }
        _ => return Err(r.malformed("unknown protocol version")),
    };
    r.finish()?;
    Ok(m)
}

/// Decodes a typed client message.
pub fn decode(tag: u8, body: &[u8]) -> Result<FrontendMessage<'_>, ProtocolError> {
    let mut r = Reader::new(tag, body);
    let m = match tag {
        b'Q' => FrontendMessage::Query {
            sql: r.cstr("unterminated query")?,
        },
        b'P' => FrontendMessage::Parse {
            name: r.cstr("unterminated statement name")?,
            sql: r.cstr("unterminated query")?,
            param_types: r.counted_oids("truncated parameter types")?,
        },
        b'B' => FrontendMessage::Bind {
            portal: r.cstr("unterminated portal name")?,
            statement: r.cstr("unterminated statement name")?,
            param_formats: r.counted_i16s("truncated parameter formats")?,
            params: r.counted_values("truncated parameter values")?,
            result_formats: r.counted_i16s("truncated result formats")?,
        },
        b'D' => FrontendMessage::Describe {
            target: Target::decode(&mut r)?,
            name: r.cstr("unterminated name")?,
        },
        b'C' => FrontendMessage::Close {
            target: Target::decode(&mut r)?,
            name: r.cstr("unterminated name")?,
        },
        b'E' => FrontendMessage::Execute {
            portal: r.cstr("unterminated portal name")?,
            max_rows: r.i32("missing row limit")?,
        },
        b'S' => FrontendMessage::Sync,
        b'H' => FrontendMessage::Flush,
        b'd' => FrontendMessage::CopyData { data: r.rest() },
        b'c' => FrontendMessage::CopyDone,
        b'f' => FrontendMessage::CopyFail {
            message: r.cstr("unterminated message")?,
        },
        b'F' => FrontendMessage::FunctionCall {
            oid: r.u32("missing function oid")?,
            arg_formats: r.counted_i16s("truncated argument formats")?,
            args: r.counted_values("truncated arguments")?,
            result_format: r.i16("missing result format")?,
        },
        b'X' => FrontendMessage::Terminate,
        b'p' => FrontendMessage::AuthResponse(Secret(r.rest())),
        other => return Err(ProtocolError::UnknownTag(other)),
    };
    r.finish()?;
    Ok(m)
}

/// What can be read of a client message of which only the first bytes of the body are
/// known (the rest was too large to keep, or lost): the SQL text of a Query or Parse as
/// far as it goes, the portal and statement names of a Bind (its parameters are lost),
/// the function of a FunctionCall. None for other messages, or when not even the names
/// are complete.
pub fn decode_partial(tag: u8, prefix: &[u8]) -> Option<FrontendMessage<'_>> {
    fn text(b: &[u8]) -> &[u8] {
        b.iter().position(|&c| c == 0).map_or(b, |end| &b[..end])
    }
    let mut r = Reader::new(tag, prefix);
    Some(match tag {
        b'Q' => FrontendMessage::Query { sql: text(prefix) },
        b'P' => {
            let name = r.cstr("").ok()?;
            FrontendMessage::Parse {
                name,
                sql: text(r.rest()),
                param_types: Oids::default(),
            }
        }
        b'B' => FrontendMessage::Bind {
            portal: r.cstr("").ok()?,
            statement: r.cstr("").ok()?,
            param_formats: I16s::default(),
            params: Values::default(),
            result_formats: I16s::default(),
        },
        b'F' => FrontendMessage::FunctionCall {
            oid: r.u32("").ok()?,
            arg_formats: I16s::default(),
            args: Values::default(),
            result_format: 0,
        },
        _ => return None,
    })
}

impl FrontendMessage<'_> {
    /// The message's tag; None for the untyped startup-phase packets.
    pub fn tag(&self) -> Option<u8> {
        use FrontendMessage::*;
        Some(match self {
            Startup { .. } | SslRequest | GssEncRequest | CancelRequest { .. } => return None,
            Query { .. } => b'Q',
            Parse { .. } => b'P',
            Bind { .. } => b'B',
            Describe { .. } => b'D',
            Execute { .. } => b'E',
            Close { .. } => b'C',
            Sync => b'S',
            Flush => b'H',
            CopyData { .. } => b'd',
            CopyDone => b'c',
            CopyFail { .. } => b'f',
            FunctionCall { .. } => b'F',
            Terminate => b'X',
            AuthResponse(_) => b'p',
        })
    }

    /// Appends the message, framed (tag and length), to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use FrontendMessage::*;
        let mut w = MessageWriter::begin(out, self.tag());
        match self {
            Startup { protocol, params } => {
                w.u32(*protocol);
                for (k, v) in params {
                    w.cstr(k).cstr(v);
                }
                w.u8(0);
            }
            SslRequest => {
                w.u32(SSL_REQUEST_CODE);
            }
            GssEncRequest => {
                w.u32(GSSENC_REQUEST_CODE);
            }
            CancelRequest { pid, key } => {
                w.u32(CANCEL_REQUEST_CODE).u32(*pid).bytes(key.0);
            }
            Query { sql } => {
                w.cstr(sql);
            }
            Parse {
                name,
                sql,
                param_types,
            } => {
                w.cstr(name)
                    .cstr(sql)
                    .u16(param_types.len() as u16)
                    .bytes(param_types.0);
            }
            Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                w.cstr(portal)
                    .cstr(statement)
                    .u16(param_formats.len() as u16)
                    .bytes(param_formats.0)
                    .u16(params.count)
                    .bytes(params.raw)
                    .u16(result_formats.len() as u16)
                    .bytes(result_formats.0);
            }
            Describe { target, name } | Close { target, name } => {
                w.u8(target.byte()).cstr(name);
            }
            Execute { portal, max_rows } => {
                w.cstr(portal).i32(*max_rows);
            }
            Sync | Flush | CopyDone | Terminate => {}
            CopyData { data } => {
                w.bytes(data);
            }
            CopyFail { message } => {
                w.cstr(message);
            }
            FunctionCall {
                oid,
                arg_formats,
                args,
                result_format,
            } => {
                w.u32(*oid)
                    .u16(arg_formats.len() as u16)
                    .bytes(arg_formats.0)
                    .u16(args.count)
                    .bytes(args.raw)
                    .i16(*result_format);
            }
            AuthResponse(secret) => {
                w.bytes(secret.0);
            }
        }
        w.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::tokenizer::frame;

    fn round_trip(tag: u8, body: &[u8]) -> FrontendMessage<'_> {
        let m = decode(tag, body).unwrap();
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(out, frame(tag, body), "{m:?}");
        m
    }

    #[test]
    fn bind_with_null_text_binary_and_result_formats() {
        let mut body = b"p1\0s1\0".to_vec();
        body.extend_from_slice(&[0, 2, 0, 0, 0, 1]); // formats: text, binary
        body.extend_from_slice(&[0, 2]); // two params
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]); // NULL
        body.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 42]); // int4 42
        body.extend_from_slice(&[0, 1, 0, 1]); // results: all binary
        let FrontendMessage::Bind {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        } = round_trip(b'B', &body)
        else {
            panic!()
        };
        assert_eq!((portal, statement), (&b"p1"[..], &b"s1"[..]));
        assert_eq!(param_formats.iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(
            params.iter().collect::<Vec<_>>(),
            vec![None, Some(&[0u8, 0, 0, 42][..])]
        );
        assert_eq!(result_formats.format_of(7), 1);
        // Debug never shows a parameter's bytes.
        assert!(!format!("{params:?}").contains("42"));
    }

    #[test]
    fn lying_lengths_and_trailing_bytes_are_errors() {
        let mut body = b"\0\0\0\0\0\x01".to_vec();
        body.extend_from_slice(&[0x7f, 0, 0, 0, 1]);
        assert!(decode(b'B', &body).is_err());
        assert!(decode(b'Q', b"SELECT 1\0x").is_err());
        assert!(decode(b'E', b"\0\0\0\0\0\0").is_err());
        assert!(decode(b'D', b"X\0").is_err());
        assert!(decode(b'B', b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0").is_err());
    }

    #[test]
    fn startup_params_and_cancel_keys() {
        let mut body = vec![0, 3, 0, 0];
        body.extend_from_slice(b"user\0alice\0database\0shop\0\0");
        let m = decode_startup(&body).unwrap();
        assert_eq!(
            m,
            FrontendMessage::Startup {
                protocol: 196_608,
                params: vec![(&b"user"[..], &b"alice"[..]), (b"database", b"shop")],
            }
        );
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(&out[4..], &body[..]);
        // 3.0's four-byte key and 3.2's longer one.
        for key_len in [4usize, 32] {
            let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
            body.extend_from_slice(&1234u32.to_be_bytes());
            body.extend(std::iter::repeat_n(7u8, key_len));
            let m = decode_startup(&body).unwrap();
            let mut out = Vec::new();
            m.encode(&mut out);
            assert_eq!(&out[4..], &body[..]);
            assert!(!format!("{m:?}").contains("7, 7"));
        }
    }

    #[test]
    fn every_typed_message_round_trips() {
        let cases: &[(u8, &[u8])] = &[
            (b'Q', b"select 1\0"),
            (b'P', b"s1\0select $1::int\0\0\x01\0\0\0\x17"),
            (b'D', b"S\0"),
            (b'D', b"Pportal\0"),
            (b'C', b"Sname\0"),
            (b'E', b"\0\0\0\0\x0a"),
            (b'S', b""),
            (b'H', b""),
            (b'd', b"1\t2\n"),
            (b'c', b""),
            (b'f', b"aborted\0"),
            (b'F', b"\0\0\x0b\xa0\0\x01\0\x01\0\x01\0\0\0\x01x\0\x01"),
            (b'X', b""),
            (b'p', b"SCRAM-SHA-256\0\0\0\0\x04abcd"),
            // Not UTF-8 (a LATIN1 client): forwarded as it came.
            (b'Q', b"select '\xe9'\0"),
        ];
        for (tag, body) in cases {
            round_trip(*tag, body);
        }
        assert!(format!("{:?}", decode(b'p', b"hunter2\0").unwrap()).contains("secret"));
    }
}
