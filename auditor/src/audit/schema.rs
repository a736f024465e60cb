//! How an audit event's fields are written: one declaration of the fields (the
//! `audit_event!` invocation in `event.rs`) and, per field type, its three layouts:
//!
//! - JSON, byte for byte as serde_json writes it (the local log, `auditor tail --json`),
//!   without serde's per-field dispatch: this runs for every event;
//! - the spool record (ClickHouse's on-disk queue), little endian by field order: strings
//!   as a u32 length and UTF-8, integers fixed width, lists as a u32 count and their items,
//!   read back without copying ([`Field::Ref`] borrows the record), but for event ids and
//!   keyed hashes, written as their bytes ([`Field::put_as`]) and made text again;
//! - ClickHouse: the column's type for the server at hand and its RowBinary value, copied
//!   from the spool record's bytes (the sender never decodes an event to encode it again).
//!
//! A new field is one line in the declaration: the struct, the JSON writer, the spool
//! record, the ClickHouse row, its column and the migration adding it all follow.

use std::collections::BTreeMap;

use crate::text::{List, Text};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record ends inside a field")]
    Truncated,
    #[error("a string field is not UTF-8")]
    NotUtf8,
    #[error("unknown record layout {0}")]
    UnknownVersion(u8),
    #[error("unknown value tag {0}")]
    UnknownTag(u8),
    #[error("{0} bytes after the last field")]
    Trailing(usize),
    #[error("not an audit event in JSON: {0}")]
    Json(String),
    #[error("{what} {name:?} is not known to this version")]
    Unknown { what: &'static str, name: String },
    #[error("refers to session context {0}, which its segment does not hold before it")]
    NoContext(u32),
}

/// How the ClickHouse server at hand stores events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnStyle {
    /// Servers without DateTime64 or Map (before 21.8): DateTime plus microseconds, and
    /// labels as two arrays.
    pub compat: bool,
    /// LowCardinality(String) for the fields declared `lc`.
    pub low_cardinality: bool,
}

/// One declared field, for the ClickHouse schema.
#[derive(Clone, Copy)]
pub struct FieldSpec {
    pub name: &'static str,
    /// Stored as LowCardinality where the server has it (few distinct values).
    pub low_cardinality: bool,
    /// The schema version that added the field (1: the first table).
    pub since: u32,
    /// Its column definitions (`name Type`), for a server of this style.
    pub columns: fn(&'static str, bool, ColumnStyle) -> Vec<String>,
    /// The two columns it is stored in on a compat server, if not one of its own name.
    pub compat_split: Option<[&'static str; 2]>,
}

impl FieldSpec {
    pub const fn new<T: Field>(name: &'static str) -> FieldSpec {
        FieldSpec {
            name,
            low_cardinality: false,
            since: 1,
            columns: T::ch_columns,
            compat_split: T::COMPAT_SPLIT,
        }
    }

    pub const fn lc(mut self) -> Self {
        self.low_cardinality = true;
        self
    }

    pub const fn since(mut self, version: u32) -> Self {
        self.since = version;
        self
    }
}

/// The ClickHouse column names of every field in order, with split fields expanded
/// (`M` = fields + split fields).
pub const fn compat_column_names<const M: usize>(fields: &[FieldSpec]) -> [&'static str; M] {
    let mut out = [""; M];
    let (mut i, mut j) = (0, 0);
    while i < fields.len() {
        match fields[i].compat_split {
            Some([a, b]) => {
                out[j] = a;
                out[j + 1] = b;
                j += 2;
            }
            None => {
                out[j] = fields[i].name;
                j += 1;
            }
        }
        i += 1;
    }
    assert!(j == M, "column count");
    out
}

pub const fn column_names<const N: usize>(fields: &[FieldSpec]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = fields[i].name;
        i += 1;
    }
    out
}

pub const fn split_count(fields: &[FieldSpec]) -> usize {
    let (mut i, mut n) = (0, 0);
    while i < fields.len() {
        if fields[i].compat_split.is_some() {
            n += 1;
        }
        i += 1;
    }
    n
}

/// Reads a spool record field by field.
pub struct RecordReader<'a> {
    pub(crate) buf: &'a [u8],
    /// Event ids and keyed hashes in their compact form (see [`Field::put_as`]): what
    /// this version writes. Records and frames of earlier layouts hold them as text.
    pub(crate) compact_ids: bool,
}

impl<'a> RecordReader<'a> {
    /// A reader of what this version writes.
    pub fn new(buf: &'a [u8]) -> Self {
        RecordReader {
            buf,
            compact_ids: true,
        }
    }

    /// A reader of a record or frame whose ids are compact (this version's) or text (the
    /// layouts before).
    pub fn with_ids(buf: &'a [u8], compact_ids: bool) -> Self {
        RecordReader { buf, compact_ids }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        self.take(n)
    }

    pub fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, RecordError> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, RecordError> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, RecordError> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn str(&mut self) -> Result<&'a str, RecordError> {
        std::str::from_utf8(self.str_bytes()?).map_err(|_| RecordError::NotUtf8)
    }

    /// A string's bytes, as they are.
    pub(crate) fn str_bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A count, checked against what is left (each item takes at least `min_item` bytes),
    /// so a corrupt count cannot ask for a huge allocation.
    pub fn count(&mut self, min_item: usize) -> Result<usize, RecordError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(RecordError::Truncated);
        }
        Ok(n)
    }

    pub fn strs(&mut self) -> Result<Vec<&'a str>, RecordError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.str()).collect()
    }

    /// A string copied into a RowBinary row (a String: its length as a varint, its bytes).
    /// Not checked to be UTF-8 again: the daemon wrote it from text, the spool's checksum
    /// vouches for the bytes since, and a ClickHouse String holds any bytes.
    pub fn copy_str(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let s = self.str_bytes()?;
        put_varint(out, s.len() as u64);
        out.extend_from_slice(s);
        Ok(())
    }

    /// A list of strings copied into a RowBinary row (an Array(String)).
    pub fn copy_strs(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let n = self.count(4)?;
        put_varint(out, n as u64);
        for _ in 0..n {
            self.copy_str(out)?;
        }
        Ok(())
    }
}

/// Appends `n` as ClickHouse's variable-length unsigned integer (LEB128), which prefixes
/// RowBinary strings and arrays.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_strs<'s>(out: &mut Vec<u8>, n: usize, items: impl Iterator<Item = &'s str>) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for s in items {
        put_str(out, s);
    }
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it (so a line reads the same
/// whichever wrote it).
pub(crate) fn json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let b = s.as_bytes();
    // Most values need no escaping: one pass without branches to find out.
    let plain = b
        .iter()
        .fold(true, |ok, &c| ok & (c >= 0x20 && c != b'"' && c != b'\\'));
    if plain {
        out.extend_from_slice(b);
    } else {
        let mut start = 0;
        for (i, &c) in b.iter().enumerate() {
            let esc: &[u8] = match c {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f => &[],
                _ => continue,
            };
            out.extend_from_slice(&b[start..i]);
            if esc.is_empty() {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 0xf) as usize]);
            } else {
                out.extend_from_slice(esc);
            }
            start = i + 1;
        }
        out.extend_from_slice(&b[start..]);
    }
    out.push(b'"');
}

pub(crate) fn json_strs<'s>(out: &mut Vec<u8>, items: impl Iterator<Item = &'s str>) {
    out.push(b'[');
    for (i, s) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, s);
    }
    out.push(b']');
}

fn json_num(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A type an audit event field can have, with its layouts.
pub trait Field: Sized + PartialEq {
    /// The field as read from a spool record, borrowing the record.
    type Ref<'a>: std::fmt::Debug + Clone + PartialEq + Default;
    /// Stored in two ClickHouse columns (these) on a compat server.
    const COMPAT_SPLIT: Option<[&'static str; 2]> = None;

    /// Whether two values are the same (so encode alike): on the path of every event
    /// written against its session's context.
    #[inline]
    fn same(&self, other: &Self) -> bool {
        self == other
    }

    /// The value of a new event: the default, made without allocating (on the path of
    /// every event).
    #[inline]
    fn empty() -> Self
    where
        Self: Default,
    {
        Self::default()
    }

    /// Appends the value as serde_json writes it.
    fn json(&self, out: &mut Vec<u8>);
    /// Appends the value to a spool record.
    fn put(&self, out: &mut Vec<u8>);
    /// Appends the value as this version writes it (`compact_ids`) or as the layouts
    /// before did. Only event ids and parameter lists differ: a UUID as its 16 bytes, a
    /// keyed hash as its 8 (each tagged; any other text as text), where those layouts
    /// wrote the text (40 and 25 bytes).
    #[inline]
    fn put_as(&self, out: &mut Vec<u8>, compact_ids: bool) {
        let _ = compact_ids;
        self.put(out)
    }
    /// Reads the value from a spool record.
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<Self::Ref<'a>, RecordError>;
    /// The owned value of what a record holds.
    fn own(r: &Self::Ref<'_>) -> Result<Self, RecordError>;
    /// Column definitions for a field of this type named `name`.
    fn ch_columns(name: &'static str, lc: bool, style: ColumnStyle) -> Vec<String>;
    /// Copies the value from a spool record into a ClickHouse RowBinary row: the value(s)
    /// of its column(s) as `ch_columns` defines them for a server of this style, in order,
    /// straight from the record's bytes.
    fn ch_copy(
        r: &mut RecordReader<'_>,
        compat: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError>;
}

/// The column(s) of a field a compat server stores in two (`T::COMPAT_SPLIT`): those two
/// with `split_types` there, else one named `name` of type `ty`.
pub(crate) fn split_columns<T: Field>(
    name: &str,
    ty: &str,
    split_types: [&str; 2],
    style: ColumnStyle,
) -> Vec<String> {
    match T::COMPAT_SPLIT {
        Some([a, b]) if style.compat => vec![
            format!("{a} {}", split_types[0]),
            format!("{b} {}", split_types[1]),
        ],
        _ => vec![format!("{name} {ty}")],
    }
}

fn one_column(name: &str, ty: &str, lc: bool, style: ColumnStyle) -> Vec<String> {
    if lc && style.low_cardinality {
        vec![format!("{name} LowCardinality({ty})")]
    } else {
        vec![format!("{name} {ty}")]
    }
}

macro_rules! text_field {
    ($t:ty) => {
        impl Field for $t {
            type Ref<'a> = &'a str;
            #[inline]
            fn same(&self, other: &Self) -> bool {
                same_str(self, other)
            }
            fn json(&self, out: &mut Vec<u8>) {
                json_str(out, self);
            }
            fn put(&self, out: &mut Vec<u8>) {
                put_str(out, self);
            }
            fn get<'a>(r: &mut RecordReader<'a>) -> Result<&'a str, RecordError> {
                r.str()
            }
            fn own(r: &&str) -> Result<Self, RecordError> {
                Ok((*r).into())
            }
            fn ch_columns(name: &'static str, lc: bool, style: ColumnStyle) -> Vec<String> {
                one_column(name, "String", lc, style)
            }
            fn ch_copy(
                r: &mut RecordReader<'_>,
                _: bool,
                out: &mut Vec<u8>,
            ) -> Result<(), RecordError> {
                r.copy_str(out)
            }
        }
    };
}

text_field!(String);
text_field!(Text);

macro_rules! int_field {
    ($t:ty, $ch:literal) => {
        impl Field for $t {
            type Ref<'a> = $t;
            fn json(&self, out: &mut Vec<u8>) {
                json_num(out, *self);
            }
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get<'a>(r: &mut RecordReader<'a>) -> Result<$t, RecordError> {
                Ok(<$t>::from_le_bytes(r.array()?))
            }
            fn own(r: &$t) -> Result<Self, RecordError> {
                Ok(*r)
            }
            fn ch_columns(name: &'static str, lc: bool, style: ColumnStyle) -> Vec<String> {
                one_column(name, $ch, lc, style)
            }
            fn ch_copy(
                r: &mut RecordReader<'_>,
                _: bool,
                out: &mut Vec<u8>,
            ) -> Result<(), RecordError> {
                // Little endian in both.
                out.extend_from_slice(r.take(size_of::<$t>())?);
                Ok(())
            }
        }
    };
}

int_field!(u16, "UInt16");
int_field!(u32, "UInt32");
int_field!(u64, "UInt64");

impl Field for bool {
    type Ref<'a> = bool;
    fn json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<bool, RecordError> {
        Ok(r.u8()? != 0)
    }
    fn own(r: &bool) -> Result<Self, RecordError> {
        Ok(*r)
    }
    fn ch_columns(name: &'static str, lc: bool, style: ColumnStyle) -> Vec<String> {
        one_column(name, "UInt8", lc, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        out.push(u8::from(r.u8()? != 0));
        Ok(())
    }
}

impl Field for Option<u64> {
    type Ref<'a> = Option<u64>;
    fn json(&self, out: &mut Vec<u8>) {
        match self {
            Some(n) => json_num(out, *n),
            None => out.extend_from_slice(b"null"),
        }
    }
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Some(n) => {
                out.push(1);
                out.extend_from_slice(&n.to_le_bytes());
            }
            None => out.push(0),
        }
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<Option<u64>, RecordError> {
        Ok(match r.u8()? {
            0 => None,
            _ => Some(r.u64()?),
        })
    }
    fn own(r: &Option<u64>) -> Result<Self, RecordError> {
        Ok(*r)
    }
    fn ch_columns(name: &'static str, lc: bool, style: ColumnStyle) -> Vec<String> {
        one_column(name, "Nullable(UInt64)", lc, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        // Nullable: a byte that is 1 for NULL, then the value if there is one.
        match r.u8()? {
            0 => out.push(1),
            _ => {
                out.push(0);
                out.extend_from_slice(r.take(8)?);
            }
        }
        Ok(())
    }
}

impl Field for List<String> {
    type Ref<'a> = Vec<&'a str>;
    #[inline]
    fn same(&self, other: &Self) -> bool {
        (self.as_ptr() == other.as_ptr() && self.len() == other.len())
            || (self.len() == other.len()
                && self.iter().zip(other.iter()).all(|(a, b)| same_str(a, b)))
    }
    fn json(&self, out: &mut Vec<u8>) {
        json_strs(out, self.iter().map(String::as_str));
    }
    fn put(&self, out: &mut Vec<u8>) {
        put_strs(out, self.len(), self.iter().map(String::as_str));
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<Vec<&'a str>, RecordError> {
        r.strs()
    }
    fn own(r: &Vec<&str>) -> Result<Self, RecordError> {
        Ok(r.iter().map(|s| s.to_string()).collect())
    }
    fn ch_columns(name: &'static str, _: bool, style: ColumnStyle) -> Vec<String> {
        one_column(name, "Array(String)", false, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        r.copy_strs(out)
    }
}

impl Field for List<u64> {
    type Ref<'a> = Vec<u64>;
    fn json(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, n) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_num(out, *n);
        }
        out.push(b']');
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        for n in self.iter() {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<Vec<u64>, RecordError> {
        let n = r.count(8)?;
        (0..n).map(|_| r.u64()).collect()
    }
    fn own(r: &Vec<u64>) -> Result<Self, RecordError> {
        Ok(r.as_slice().into())
    }
    fn ch_columns(name: &'static str, _: bool, style: ColumnStyle) -> Vec<String> {
        one_column(name, "Array(UInt64)", false, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let n = r.count(8)?;
        put_varint(out, n as u64);
        out.extend_from_slice(r.take(8 * n)?);
        Ok(())
    }
}

pub use crate::text::Labels;

impl Field for Labels {
    type Ref<'a> = Vec<(&'a str, &'a str)>;
    const COMPAT_SPLIT: Option<[&'static str; 2]> = Some(["label_keys", "label_values"]);
    fn json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, k);
            out.push(b':');
            json_str(out, v);
        }
        out.push(b'}');
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        for (k, v) in self.iter() {
            put_str(out, k);
            put_str(out, v);
        }
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<Vec<(&'a str, &'a str)>, RecordError> {
        let n = r.count(8)?;
        (0..n).map(|_| Ok((r.str()?, r.str()?))).collect()
    }
    fn own(r: &Vec<(&str, &str)>) -> Result<Self, RecordError> {
        Ok(Labels::from(
            r.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ))
    }
    fn ch_columns(name: &'static str, _: bool, style: ColumnStyle) -> Vec<String> {
        split_columns::<Self>(
            name,
            "Map(String, String)",
            ["Array(String)", "Array(String)"],
            style,
        )
    }
    fn ch_copy(
        r: &mut RecordReader<'_>,
        compat: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let n = r.count(8)?;
        put_varint(out, n as u64);
        if Self::COMPAT_SPLIT.is_some() && compat {
            // Two arrays: the keys, then (the pairs read again) the values.
            let mut values = RecordReader::with_ids(r.buf, r.compact_ids);
            for _ in 0..n {
                r.copy_str(out)?;
                r.str_bytes()?;
            }
            put_varint(out, n as u64);
            for _ in 0..n {
                values.str_bytes()?;
                values.copy_str(out)?;
            }
        } else {
            // A Map: its pairs.
            for _ in 0..n {
                r.copy_str(out)?;
                r.copy_str(out)?;
            }
        }
        Ok(())
    }
}

/// Whether two strings are the same: the same text (shared) or the same bytes. Most
/// fields are a few bytes long (a session id, the longest compared on every event, 36),
/// where a byte loop beats a call to `memcmp`.
#[inline]
pub fn same_str(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

/// Whether two byte strings are the same, without calling `memcmp` for short or empty
/// ones: an empty slice's pointer is dangling, and glibc's AVX-512 `memcmp` loads from
/// it under an all-zero mask, which costs a fault-suppression assist of some hundred
/// cycles (every unnamed portal's name compared, before).
#[inline]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.as_ptr() == b.as_ptr() || a.is_empty() {
        return true;
    }
    if a.len() > 48 {
        return a == b;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Declares the audit event's fields once; see the module's documentation. Each field is
/// `name: Type` with optional attributes in brackets: `lc` (few distinct values:
/// LowCardinality in ClickHouse), `since = N` (added by schema version N; a migration adds
/// its column to existing tables).
macro_rules! audit_event {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty $([ $($attr:tt)* ])? ),* $(,)?) => {
        /// One audit event: one JSON object per line in the local log, one row in
        /// ClickHouse. The field names are a contract (see DESIGN.md): extend, never
        /// rename.
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct AuditEvent {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        /// An audit event read from a spool record; text borrows the record.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct EventRef<'a> {
            $( $(#[doc = $doc])* pub $name: <$ty as $crate::audit::schema::Field>::Ref<'a>, )*
        }

        /// Every field, in order.
        pub const FIELDS: &[$crate::audit::schema::FieldSpec] = &[
            $( $crate::audit::schema::audit_event!(@spec $name, $ty; $($($attr)*)?) ),*
        ];

        impl AuditEvent {
            /// An empty event of `kind`, made in place without allocating.
            #[inline]
            pub fn of_kind(kind: EventKind) -> AuditEvent {
                let mut ev = AuditEvent {
                    $( $name: <$ty as $crate::audit::schema::Field>::empty(), )*
                };
                ev.kind = kind;
                ev
            }

            /// Appends the event's fields as a JSON object without its closing brace
            /// (`{"event_id":…,…,"tx_status":"…"`): the local log adds its chain fields.
            /// Byte for byte what serde_json writes for the same fields.
            pub fn write_json_fields(&self, out: &mut Vec<u8>) {
                let start = out.len();
                $(
                    out.extend_from_slice(concat!(",\"", stringify!($name), "\":").as_bytes());
                    $crate::audit::schema::Field::json(&self.$name, out);
                )*
                out[start] = b'{';
            }

            /// Appends the fields to a spool record.
            pub fn put_fields(&self, out: &mut Vec<u8>) {
                self.put_fields_as(out, true);
            }

            /// Appends the fields as this version writes them (`compact_ids`), or as the
            /// layouts before did (see [`Field::put_as`]).
            pub fn put_fields_as(&self, out: &mut Vec<u8>, compact_ids: bool) {
                $( $crate::audit::schema::Field::put_as(&self.$name, out, compact_ids); )*
            }

            /// Appends only the fields that differ from the context's (`ctx`: the event
            /// its context frame was encoded from), and sets bit i of `same` for each
            /// field i the context holds as is. Fields are compared as values, before any
            /// encoding (equal values encode alike; shared ones compare by pointer first):
            /// most of a session's fields are its context's, and are never encoded.
            ///
            /// With `shape` (an interned statement shape and the bitmap of the fields it
            /// holds), those fields are compared with the shape's instead.
            pub fn put_fields_diff(
                &self,
                ctx: &AuditEvent,
                shape: Option<(&AuditEvent, &[u8])>,
                out: &mut Vec<u8>,
                same: &mut [u8],
            ) {
                self.put_fields_diff_as(ctx, shape, out, same, true)
            }

            /// As [`AuditEvent::put_fields_diff`], the fields as this version writes them
            /// (`compact_ids`) or as the layouts before did.
            #[inline]
            pub fn put_fields_diff_as(
                &self,
                ctx: &AuditEvent,
                shape: Option<(&AuditEvent, &[u8])>,
                out: &mut Vec<u8>,
                same: &mut [u8],
                compact_ids: bool,
            ) {
                let mut i = 0usize;
                $(
                    let base = match shape {
                        Some((s, mask)) if mask[i / 8] & (1 << (i % 8)) != 0 => s,
                        _ => ctx,
                    };
                    if $crate::audit::schema::Field::same(&self.$name, &base.$name) {
                        same[i / 8] |= 1 << (i % 8);
                    } else {
                        $crate::audit::schema::Field::put_as(&self.$name, out, compact_ids);
                    }
                    i += 1;
                )*
                let _ = i;
            }

            /// Takes from `ctx` each field whose bit is set in `same`.
            pub fn take_same(&mut self, ctx: &AuditEvent, same: &[u8]) {
                let mut i = 0usize;
                $(
                    if same.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
                        self.$name = ctx.$name.clone();
                    }
                    i += 1;
                )*
                let _ = i;
            }
        }

        impl<'a> EventRef<'a> {
            /// Reads the fields of a spool record; fields after the first `fields` (a
            /// record of an earlier version) take their defaults.
            pub fn get_fields(
                r: &mut $crate::audit::schema::RecordReader<'a>,
                fields: usize,
            ) -> Result<Self, $crate::audit::schema::RecordError> {
                let mut ev = EventRef::default();
                let mut i = 0usize;
                $(
                    if i < fields {
                        ev.$name = <$ty as $crate::audit::schema::Field>::get(r)?;
                    }
                    i += 1;
                )*
                let _ = i;
                Ok(ev)
            }

            /// As [`EventRef::get_fields`], skipping the fields whose bit is set in
            /// `same` (a record written against a context: they are the context's).
            pub fn get_fields_except(
                r: &mut $crate::audit::schema::RecordReader<'a>,
                fields: usize,
                same: &[u8],
            ) -> Result<Self, $crate::audit::schema::RecordError> {
                let mut ev = EventRef::default();
                let mut i = 0usize;
                $(
                    if i < fields && !same.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
                        ev.$name = <$ty as $crate::audit::schema::Field>::get(r)?;
                    }
                    i += 1;
                )*
                let _ = i;
                Ok(ev)
            }

            /// The owned event, with defaults for the fields whose bit is set in `same`
            /// (not read: a context supplies them).
            pub fn to_event_except(
                &self,
                same: &[u8],
            ) -> Result<AuditEvent, $crate::audit::schema::RecordError> {
                let skip = |i: usize| same.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
                let mut i = 0usize;
                let ev = AuditEvent {
                    $( $name: {
                        i += 1;
                        if skip(i - 1) {
                            Default::default()
                        } else {
                            <$ty as $crate::audit::schema::Field>::own(&self.$name)?
                        }
                    }, )*
                };
                let _ = i;
                Ok(ev)
            }

            /// The owned event.
            pub fn to_event(&self) -> Result<AuditEvent, $crate::audit::schema::RecordError> {
                Ok(AuditEvent {
                    $( $name: <$ty as $crate::audit::schema::Field>::own(&self.$name)?, )*
                })
            }

        }

        impl AuditEvent {
            /// Copies the first `fields` fields of a record into RowBinary (as
            /// [`AuditEvent::record_to_row`]), pushing where each one's bytes end in `out`
            /// to `ends`: the parts a row is assembled from.
            pub fn record_to_row_parts(
                r: &mut $crate::audit::schema::RecordReader<'_>,
                fields: usize,
                compat: bool,
                out: &mut Vec<u8>,
                ends: &mut Vec<u32>,
            ) -> Result<(), $crate::audit::schema::RecordError> {
                use $crate::audit::schema::Field;
                let mut i = 0usize;
                $(
                    if i < fields {
                        <$ty as Field>::ch_copy(r, compat, out)?;
                        ends.push(out.len() as u32);
                    }
                    i += 1;
                )*
                let _ = i;
                Ok(())
            }

            /// As [`AuditEvent::record_to_row`] for a record written against frames
            /// (`same`: bit i set for each field i a frame holds): field i is copied from
            /// `r` when its bit is clear, else it is `base(i)`: the bytes `start..end` of
            /// a frame's row (its fields in RowBinary, one after the other); None: the
            /// frame does not hold it, the default. Fields that follow each other in the
            /// same frame are copied in one piece.
            pub fn diff_record_to_row<'b>(
                r: &mut $crate::audit::schema::RecordReader<'_>,
                fields: usize,
                same: &[u8],
                mut base: impl FnMut(usize) -> Option<(&'b [u8], usize, usize)>,
                compat: bool,
                out: &mut Vec<u8>,
            ) -> Result<(), $crate::audit::schema::RecordError> {
                use $crate::audit::schema::{Field, RecordReader};
                // The frame bytes not copied yet: a row, and a range of it.
                let mut run: Option<(&'b [u8], usize, usize)> = None;
                let flush = |run: &mut Option<(&'b [u8], usize, usize)>, out: &mut Vec<u8>| {
                    if let Some((row, start, end)) = run.take() {
                        out.extend_from_slice(&row[start..end]);
                    }
                };
                let mut i = 0usize;
                $(
                    let from_base = same.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
                    let framed = if i < fields && from_base { base(i) } else { None };
                    match framed {
                        Some((row, start, end)) => match &mut run {
                            Some((r0, _, e0)) if std::ptr::eq(*r0, row) && *e0 == start => {
                                *e0 = end;
                            }
                            _ => {
                                flush(&mut run, out);
                                run = Some((row, start, end));
                            }
                        },
                        None => {
                            flush(&mut run, out);
                            if i < fields && !from_base {
                                <$ty as Field>::ch_copy(r, compat, out)?;
                            } else {
                                let mut default = Vec::new();
                                <$ty as Default>::default().put(&mut default);
                                <$ty as Field>::ch_copy(
                                    &mut RecordReader::new(&default),
                                    compat,
                                    out,
                                )?;
                            }
                        }
                    }
                    i += 1;
                )*
                let _ = i;
                flush(&mut run, out);
                Ok(())
            }

            /// Copies the fields of a spool record into one ClickHouse RowBinary row (the
            /// columns of a server of style `compat`, in order), straight from its bytes;
            /// fields after the first `fields` (a record of an earlier version) take their
            /// defaults.
            pub fn record_to_row(
                r: &mut $crate::audit::schema::RecordReader<'_>,
                fields: usize,
                compat: bool,
                out: &mut Vec<u8>,
            ) -> Result<(), $crate::audit::schema::RecordError> {
                use $crate::audit::schema::{Field, RecordReader};
                let mut i = 0usize;
                $(
                    if i < fields {
                        <$ty as Field>::ch_copy(r, compat, out)?;
                    } else {
                        let mut default = Vec::new();
                        <$ty as Default>::default().put(&mut default);
                        <$ty as Field>::ch_copy(&mut RecordReader::new(&default), compat, out)?;
                    }
                    i += 1;
                )*
                let _ = i;
                Ok(())
            }
        }
    };
    (@spec $name:ident, $ty:ty; ) => {
        $crate::audit::schema::FieldSpec::new::<$ty>(stringify!($name))
    };
    (@spec $name:ident, $ty:ty; lc $(, $($rest:tt)*)?) => {
        $crate::audit::schema::audit_event!(@spec $name, $ty; $($($rest)*)?).lc()
    };
    (@spec $name:ident, $ty:ty; since = $v:literal $(, $($rest:tt)*)?) => {
        $crate::audit::schema::audit_event!(@spec $name, $ty; $($($rest)*)?).since($v)
    };
}

pub(crate) use audit_event;
