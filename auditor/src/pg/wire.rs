//! The protocol's primitive fields: a strict reader over a message body and the writer
//! that frames messages. Strict means a body decodes only if every byte is accounted for,
//! which is what makes `encode(decode(x)) == x` hold for every message that decodes.

use super::ProtocolError;

/// Reads fields front to back from one message body; every read names what it expected,
/// so a malformed message says where it broke.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    tag: u8,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(tag: u8, buf: &'a [u8]) -> Self {
        Reader { buf, tag }
    }

    pub(crate) fn malformed(&self, what: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            tag: self.tag as char,
            what,
        }
    }

    pub(crate) fn bytes(
        &mut self,
        n: usize,
        what: &'static str,
    ) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, ProtocolError> {
        Ok(self.u16(what)? as i16)
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, ProtocolError> {
        Ok(self.u32(what)? as i32)
    }

    /// A NUL-terminated string, without its NUL. Bytes, not `str`: clients send whatever
    /// their client_encoding is, and forwarding must not change a byte of it.
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let Some(nul) = self.buf.iter().position(|&b| b == 0) else {
            return Err(self.malformed(what));
        };
        let s = &self.buf[..nul];
        self.buf = &self.buf[nul + 1..];
        Ok(s)
    }

    /// A run of `count` fixed-width items (`width` bytes each), kept as bytes.
    pub(crate) fn array(
        &mut self,
        count: usize,
        width: usize,
        what: &'static str,
    ) -> Result<&'a [u8], ProtocolError> {
        self.bytes(count * width, what)
    }

    /// `count` values, each an Int32 length (-1: NULL) and that many bytes: checked, kept
    /// as one slice (values are read again through [`Values`]).
    pub(crate) fn values(
        &mut self,
        count: usize,
        what: &'static str,
    ) -> Result<&'a [u8], ProtocolError> {
        let start = self.buf;
        let mut used = 0usize;
        for _ in 0..count {
            let len = self.i32(what)?;
            used += 4;
            if len >= 0 {
                self.bytes(len as usize, what)?;
                used += len as usize;
            } else if len != -1 {
                return Err(self.malformed(what));
            }
        }
        Ok(&start[..used])
    }

    /// An Int16 count, then that many Int16 format codes.
    pub(crate) fn counted_i16s(&mut self, what: &'static str) -> Result<I16s<'a>, ProtocolError> {
        let n = self.u16(what)? as usize;
        Ok(I16s(self.array(n, 2, what)?))
    }

    /// An Int16 count, then that many UInt32 OIDs.
    pub(crate) fn counted_oids(&mut self, what: &'static str) -> Result<Oids<'a>, ProtocolError> {
        let n = self.u16(what)? as usize;
        Ok(Oids(self.array(n, 4, what)?))
    }

    /// An Int16 count, then that many length-prefixed values.
    pub(crate) fn counted_values(
        &mut self,
        what: &'static str,
    ) -> Result<Values<'a>, ProtocolError> {
        let count = self.u16(what)?;
        Ok(Values {
            count,
            raw: self.values(count as usize, what)?,
        })
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// The body must be used up: trailing bytes make the message malformed (Postgres
    /// itself refuses them: "invalid message format").
    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after the last field"))
        }
    }
}

/// Big-endian Int16 items (format codes), as they are on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct I16s<'a>(pub(crate) &'a [u8]);

impl<'a> I16s<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 2
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn get(&self, i: usize) -> Option<i16> {
        self.0
            .get(2 * i..2 * i + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    pub fn iter(&self) -> impl Iterator<Item = i16> + 'a {
        self.0
            .chunks_exact(2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    /// The format of item `i` under the protocol's rule: no codes = all text, one code =
    /// for every item, else one per item.
    pub fn format_of(&self, i: usize) -> i16 {
        match self.len() {
            0 => 0,
            1 => self.get(0).unwrap_or(0),
            _ => self.get(i).unwrap_or(0),
        }
    }
}

impl std::fmt::Debug for I16s<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Big-endian UInt32 items (type OIDs), as they are on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Oids<'a>(pub(crate) &'a [u8]);

impl<'a> Oids<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.0
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl std::fmt::Debug for Oids<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Length-prefixed values (Bind parameters, DataRow columns, FunctionCall arguments),
/// checked when the message was decoded. `None` is SQL NULL.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Values<'a> {
    pub(crate) count: u16,
    pub(crate) raw: &'a [u8],
}

impl<'a> Values<'a> {
    pub fn len(&self) -> usize {
        self.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn iter(&self) -> ValuesIter<'a> {
        ValuesIter { rest: self.raw }
    }
    /// The wire bytes of all values (without the count).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
}

/// Values are data (masked columns, secrets in parameters): their Debug shows lengths only.
impl std::fmt::Debug for Values<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|v| match v {
                None => "NULL".to_string(),
                Some(b) => format!("<{} bytes>", b.len()),
            }))
            .finish()
    }
}

pub struct ValuesIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for ValuesIter<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        let head = self.rest.get(..4)?;
        let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if len < 0 {
            self.rest = &self.rest[4..];
            return Some(None);
        }
        // Checked at decode; a Values built by hand that lies ends the iteration.
        let value = self.rest.get(4..4 + len as usize)?;
        self.rest = &self.rest[4 + len as usize..];
        Some(Some(value))
    }
}

/// Bytes that must never be shown: passwords, SASL messages, cancel keys. Debug prints the
/// length only, so no log line can carry them by accident.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Secret<'a>(pub &'a [u8]);

impl std::fmt::Debug for Secret<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret, {} bytes>", self.0.len())
    }
}

/// Writes one typed message: the tag, a length patched in at the end, the fields.
pub struct MessageWriter<'o> {
    out: &'o mut Vec<u8>,
    start: usize,
}

impl<'o> MessageWriter<'o> {
    /// A typed message (`tag` then length) or, with `tag` None, an untyped startup packet.
    pub fn begin(out: &'o mut Vec<u8>, tag: Option<u8>) -> Self {
        if let Some(tag) = tag {
            out.push(tag);
        }
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        MessageWriter { out, start }
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.out.extend_from_slice(v);
        self
    }
    pub fn cstr(&mut self, v: &[u8]) -> &mut Self {
        self.out.extend_from_slice(v);
        self.out.push(0);
        self
    }
    /// One length-prefixed value (None: NULL).
    pub fn value(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.i32(-1),
            Some(b) => self.i32(b.len() as i32).bytes(b),
        }
    }
    /// Patches the length in. Lengths beyond Int32 cannot be framed: the protocol's own
    /// limit (1 GiB) is far below, and callers build messages from bounded parts.
    pub fn finish(self) {
        let len = (self.out.len() - self.start) as u32;
        self.out[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }
}
