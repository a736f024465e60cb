//! `COPY … TO STDOUT` in a session that masks: the proxy learns the COPY's columns by
//! describing the query whose rows it writes (`SELECT cols FROM table`, or the COPY's own
//! query), masks them as it masks a result's, and rewrites the CopyData stream row by
//! row in the text, CSV and binary formats. What it cannot rewrite safely (an `ENCODING`
//! option, an unknown option) is refused, never passed through.

use std::sync::Arc;

use pg_query::NodeEnum;

use super::mask::{ColumnMask, Masker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Csv,
    Binary,
}

/// A single `COPY … TO STDOUT` as the proxy rewrites it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    /// The query whose result columns are the COPY's columns, to describe.
    pub query: String,
    pub format: Format,
    pub delimiter: u8,
    /// How NULL is written (text and CSV).
    pub null: Vec<u8>,
    pub quote: u8,
    pub escape: u8,
    /// The first line names the columns (text and CSV): passed through.
    pub header: bool,
}

/// An identifier, double-quoted (always: the name is already as the parser resolved it).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn string_of(n: &pg_query::protobuf::Node) -> Option<&str> {
    match n.node.as_ref()? {
        NodeEnum::String(s) => Some(&s.sval),
        _ => None,
    }
}

/// A boolean option's value as Postgres reads it (`defGetBoolean`): absent is true.
fn bool_of(arg: Option<&pg_query::protobuf::Node>) -> Result<bool, String> {
    let Some(n) = arg.and_then(|a| a.node.as_ref()) else {
        return Ok(true);
    };
    match n {
        NodeEnum::Boolean(b) => Ok(b.boolval),
        NodeEnum::Integer(i) if i.ival == 0 || i.ival == 1 => Ok(i.ival == 1),
        NodeEnum::String(s) => match s.sval.to_ascii_lowercase().as_str() {
            "true" | "on" | "1" => Ok(true),
            "false" | "off" | "0" => Ok(false),
            other => Err(format!("a boolean option of {other:?}")),
        },
        _ => Err("an option value the proxy does not read".into()),
    }
}

fn one_byte(what: &str, arg: Option<&pg_query::protobuf::Node>) -> Result<u8, String> {
    let s = arg.and_then(string_of).unwrap_or_default();
    match s.as_bytes() {
        [b] if b.is_ascii() => Ok(*b),
        _ => Err(format!("a {what} that is not one ASCII character")),
    }
}

/// The statement as a COPY the proxy can rewrite: None when it is not one `COPY … TO
/// STDOUT` (another statement, several, a file, a program); Err when it is one but its
/// options cannot be rewritten.
pub fn copy_out(sql: &str) -> Result<Option<CopyOut>, String> {
    let Ok(parsed) = pg_query::parse(sql, 0) else {
        return Ok(None);
    };
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return Ok(None);
    };
    let Some(NodeEnum::CopyStmt(c)) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
        return Ok(None);
    };
    if c.is_from || c.is_program || !c.filename.is_empty() {
        return Ok(None);
    }
    let query = match (&c.query, &c.relation) {
        (Some(q), _) => q
            .node
            .as_ref()
            .ok_or("an empty query")?
            .deparse(Default::default())
            .map_err(|e| format!("its query does not deparse: {e}"))?,
        (None, Some(r)) => {
            let mut cols = Vec::new();
            for a in &c.attlist {
                cols.push(quote_ident(
                    string_of(a).ok_or("a column list it cannot read")?,
                ));
            }
            let cols = if cols.is_empty() {
                "*".to_string()
            } else {
                cols.join(", ")
            };
            let rel = if r.schemaname.is_empty() {
                quote_ident(&r.relname)
            } else {
                format!("{}.{}", quote_ident(&r.schemaname), quote_ident(&r.relname))
            };
            // ONLY: COPY writes the table's own rows (the columns are the same).
            format!("SELECT {cols} FROM ONLY {rel}")
        }
        (None, None) => return Ok(None),
    };
    let mut format = Format::Text;
    let mut delimiter = None;
    let mut null = None;
    let mut quote = None;
    let mut escape = None;
    let mut header = false;
    for o in &c.options {
        let Some(NodeEnum::DefElem(d)) = o.node.as_ref() else {
            return Err("an option it cannot read".into());
        };
        let arg = d.arg.as_deref();
        match d.defname.as_str() {
            "format" => {
                format = match arg.and_then(string_of).map(str::to_ascii_lowercase).as_deref() {
                    Some("text") => Format::Text,
                    Some("csv") => Format::Csv,
                    Some("binary") => Format::Binary,
                    other => return Err(format!("the format {other:?}")),
                }
            }
            "delimiter" => delimiter = Some(one_byte("delimiter", arg)?),
            "null" => {
                null = Some(
                    arg.and_then(string_of)
                        .ok_or("a NULL option it cannot read")?
                        .as_bytes()
                        .to_vec(),
                )
            }
            "quote" => quote = Some(one_byte("quote", arg)?),
            "escape" => escape = Some(one_byte("escape", arg)?),
            "header" => header = bool_of(arg)?,
            // Which values are quoted does not change how a row reads.
            "force_quote" => {}
            other => {
                return Err(format!(
                    "the {} option (the proxy rewrites COPY only in the session's own encoding, with FORMAT, DELIMITER, NULL, HEADER, QUOTE, ESCAPE, FORCE_QUOTE)",
                    other.to_ascii_uppercase()
                ))
            }
        }
    }
    let csv = format == Format::Csv;
    let delimiter = delimiter.unwrap_or(if csv { b',' } else { b'\t' });
    let quote = quote.unwrap_or(b'"');
    if delimiter == b'\n' || delimiter == b'\r' || (!csv && delimiter == b'\\') {
        return Err("a delimiter Postgres itself refuses".into());
    }
    if csv && (delimiter == quote) {
        return Err("a delimiter that is also the quote".into());
    }
    Ok(Some(CopyOut {
        query,
        format,
        delimiter,
        null: null.unwrap_or_else(|| if csv { Vec::new() } else { b"\\N".to_vec() }),
        quote,
        escape: escape.unwrap_or(quote),
        header,
    }))
}

/// Client encodings in which a multi-byte character may contain an ASCII byte (a
/// backslash, a delimiter): COPY text cannot be split by bytes there.
pub fn encoding_embeds_ascii(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        n.as_str(),
        "SJIS"
            | "SHIFTJIS"
            | "SHIFTJIS2004"
            | "BIG5"
            | "GBK"
            | "UHC"
            | "GB18030"
            | "WIN932"
            | "WIN936"
            | "WIN949"
            | "WIN950"
            | "MSKANJI"
            | "CP932"
            | "CP936"
            | "CP949"
            | "CP950"
    )
}

/// Rewrites a COPY's CopyData stream: complete rows are rewritten (masked columns
/// replaced, the others byte for byte), a row cut across messages waits for the rest.
pub struct CopyRewriter {
    copy: CopyOut,
    masks: Arc<[Option<ColumnMask>]>,
    /// The beginning of a row not complete yet.
    partial: Vec<u8>,
    header_left: bool,
    /// Binary: the file header is still to come; the trailer was seen.
    binary_header_left: bool,
    ended: bool,
    /// A row larger than this is refused (the proxy's message bound).
    max_row: usize,
    scratch: Vec<u8>,
    /// A row's field spans (start, end, quoted), kept from row to row.
    fields: Vec<(usize, usize, bool)>,
}

impl CopyRewriter {
    pub fn new(copy: CopyOut, masks: Arc<[Option<ColumnMask>]>, max_row: usize) -> CopyRewriter {
        CopyRewriter {
            header_left: copy.header && copy.format != Format::Binary,
            binary_header_left: copy.format == Format::Binary,
            copy,
            masks,
            partial: Vec::new(),
            ended: false,
            max_row,
            scratch: Vec::new(),
            fields: Vec::new(),
        }
    }

    pub fn format(&self) -> Format {
        self.copy.format
    }

    /// One CopyData message's payload: the rewritten payload of the rows it completes is
    /// appended to `out` (possibly nothing); `counts` gets the values masked per column.
    pub fn data(
        &mut self,
        masker: &Masker,
        payload: &[u8],
        out: &mut Vec<u8>,
        counts: &mut [u64],
    ) -> Result<(), String> {
        self.partial.extend_from_slice(payload);
        let mut buf = std::mem::take(&mut self.partial);
        let mut at = 0;
        let res = loop {
            let step = match self.copy.format {
                Format::Binary => self.binary_step(masker, &buf[at..], out, counts),
                Format::Text | Format::Csv => self.line_step(masker, &buf[at..], out, counts),
            };
            match step {
                Ok(Some(used)) => at += used,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        buf.drain(..at);
        if buf.len() > self.max_row {
            return Err(format!(
                "a COPY row of more than {} bytes cannot be rewritten",
                self.max_row
            ));
        }
        self.partial = buf;
        res
    }

    /// CopyDone: nothing may be left half-read.
    pub fn done(&self) -> Result<(), String> {
        if !self.partial.is_empty() {
            return Err("the COPY ended inside a row".into());
        }
        if self.copy.format == Format::Binary && !self.ended {
            return Err("the binary COPY ended without its trailer".into());
        }
        Ok(())
    }

    /// One text or CSV row from the start of `buf`, if complete: rewritten into `out`;
    /// returns the bytes it took.
    fn line_step(
        &mut self,
        masker: &Masker,
        buf: &[u8],
        out: &mut Vec<u8>,
        counts: &mut [u64],
    ) -> Result<Option<usize>, String> {
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        let res = self.line_row(masker, buf, out, counts, &mut fields);
        self.fields = fields;
        res
    }

    fn line_row(
        &mut self,
        masker: &Masker,
        buf: &[u8],
        out: &mut Vec<u8>,
        counts: &mut [u64],
        fields: &mut Vec<(usize, usize, bool)>,
    ) -> Result<Option<usize>, String> {
        let csv = self.copy.format == Format::Csv;
        // The fields' spans (start, end, quoted) up to the row's end, in `fields`.
        let mut start = 0;
        let mut quoted = false;
        let mut in_quotes = false;
        let mut i = 0;
        let end = loop {
            let Some(&b) = buf.get(i) else {
                return Ok(None);
            };
            if csv && in_quotes {
                if b == self.copy.escape
                    && self.copy.escape != self.copy.quote
                    && matches!(buf.get(i + 1), Some(&n) if n == self.copy.quote || n == self.copy.escape)
                {
                    i += 2;
                    continue;
                }
                if b == self.copy.quote {
                    if self.copy.escape == self.copy.quote && buf.get(i + 1) == Some(&b) {
                        i += 2;
                        continue;
                    }
                    if buf.get(i + 1).is_none() {
                        // A doubled quote may be cut across messages.
                        return Ok(None);
                    }
                    in_quotes = false;
                }
                i += 1;
                continue;
            }
            if csv && b == self.copy.quote {
                in_quotes = true;
                quoted = true;
                i += 1;
                continue;
            }
            if !csv && b == b'\\' {
                i += 2;
                continue;
            }
            if b == self.copy.delimiter || b == b'\n' {
                fields.push((start, i, quoted));
                start = i + 1;
                quoted = false;
                if b == b'\n' {
                    break i;
                }
            }
            i += 1;
        };
        let row = &buf[..=end];
        if self.header_left {
            self.header_left = false;
            out.extend_from_slice(row);
            return Ok(Some(end + 1));
        }
        if fields.len() != self.masks.len() {
            return Err(format!(
                "a COPY row of {} columns where {} were described",
                fields.len(),
                self.masks.len()
            ));
        }
        for (k, &(s, e, q)) in fields.iter().enumerate() {
            if k > 0 {
                out.push(self.copy.delimiter);
            }
            let mut raw = &buf[s..e];
            if k + 1 == fields.len() && !csv && raw.last() == Some(&b'\r') {
                // A CR before the newline ends the row in text format as in CSV.
                raw = &raw[..raw.len() - 1];
            }
            let Some(m) = &self.masks[k] else {
                out.extend_from_slice(&buf[s..e]);
                continue;
            };
            if !q && raw == self.copy.null.as_slice() {
                // NULL stays NULL.
                out.extend_from_slice(raw);
                continue;
            }
            let value = if csv {
                csv_value(raw, self.copy.quote, self.copy.escape)
            } else {
                text_value(raw)
            };
            self.scratch.clear();
            let changed = masker.mask_value(
                &ColumnMask {
                    binary: false,
                    ..m.clone()
                },
                &value,
                &mut self.scratch,
            );
            if !changed {
                // A detector found nothing: the field as Postgres wrote it.
                out.extend_from_slice(&buf[s..e]);
                continue;
            }
            if let Some(c) = counts.get_mut(k) {
                *c += 1;
            }
            let len = i32::from_be_bytes(self.scratch[..4].try_into().unwrap_or([255; 4]));
            if len < 0 {
                out.extend_from_slice(&self.copy.null);
                continue;
            }
            let masked = &self.scratch[4..];
            if csv {
                out.push(self.copy.quote);
                for &b in masked {
                    if b == self.copy.quote || b == self.copy.escape {
                        out.push(self.copy.escape);
                    }
                    out.push(b);
                }
                out.push(self.copy.quote);
            } else {
                for &b in masked {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        0x08 => out.extend_from_slice(b"\\b"),
                        0x0b => out.extend_from_slice(b"\\v"),
                        0x0c => out.extend_from_slice(b"\\f"),
                        b if b == self.copy.delimiter => {
                            out.push(b'\\');
                            out.push(b);
                        }
                        b => out.push(b),
                    }
                }
            }
        }
        if !csv
            && buf[..end].last() == Some(&b'\r')
            && self.masks.last().is_some_and(Option::is_some)
        {
            out.push(b'\r');
        }
        out.push(b'\n');
        Ok(Some(end + 1))
    }

    /// The binary header, one tuple, or the trailer from the start of `buf`, if complete.
    fn binary_step(
        &mut self,
        masker: &Masker,
        buf: &[u8],
        out: &mut Vec<u8>,
        counts: &mut [u64],
    ) -> Result<Option<usize>, String> {
        const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
        if buf.is_empty() {
            return Ok(None);
        }
        if self.ended {
            return Err("data after the binary COPY's trailer".into());
        }
        if self.binary_header_left {
            if buf.len() < SIGNATURE.len() + 8 {
                return Ok(None);
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err("a binary COPY without its signature".into());
            }
            let ext = u32::from_be_bytes(buf[15..19].try_into().unwrap_or_default()) as usize;
            let total = 19usize.saturating_add(ext);
            if buf.len() < total {
                return Ok(None);
            }
            out.extend_from_slice(&buf[..total]);
            self.binary_header_left = false;
            return Ok(Some(total));
        }
        if buf.len() < 2 {
            return Ok(None);
        }
        let n = i16::from_be_bytes([buf[0], buf[1]]);
        if n == -1 {
            self.ended = true;
            out.extend_from_slice(&buf[..2]);
            return Ok(Some(2));
        }
        if n < 0 || n as usize != self.masks.len() {
            return Err(format!(
                "a binary COPY tuple of {n} fields where {} were described",
                self.masks.len()
            ));
        }
        // Complete first, then rewritten: nothing is written for half a tuple.
        let mut spans = Vec::with_capacity(n as usize);
        let mut at = 2;
        for _ in 0..n {
            let Some(len) = buf.get(at..at + 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes(len.try_into().unwrap_or_default());
            at += 4;
            if len == -1 {
                spans.push(None);
                continue;
            }
            if len < 0 {
                return Err("a negative field length in a binary COPY".into());
            }
            let len = len as usize;
            if buf.len() < at + len {
                return Ok(None);
            }
            spans.push(Some((at, at + len)));
            at += len;
        }
        out.extend_from_slice(&buf[..2]);
        for (k, span) in spans.into_iter().enumerate() {
            match (span, &self.masks[k]) {
                (None, _) => out.extend_from_slice(&(-1i32).to_be_bytes()),
                (Some((s, e)), None) => out.extend_from_slice(&buf[s - 4..e]),
                (Some((s, e)), Some(m)) => {
                    let changed = masker.mask_value(
                        &ColumnMask {
                            binary: true,
                            ..m.clone()
                        },
                        &buf[s..e],
                        out,
                    );
                    if let (true, Some(c)) = (changed, counts.get_mut(k)) {
                        *c += 1;
                    }
                }
            }
        }
        Ok(Some(at))
    }
}

/// A text-format field's value (its escapes undone).
fn text_value(raw: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 == raw.len() {
            v.push(b);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        i += 2;
        match c {
            b'b' => v.push(0x08),
            b'f' => v.push(0x0c),
            b'n' => v.push(b'\n'),
            b'r' => v.push(b'\r'),
            b't' => v.push(b'\t'),
            b'v' => v.push(0x0b),
            b'0'..=b'7' => {
                let mut n = u32::from(c - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            n = n * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                v.push(n as u8);
            }
            b'x' => {
                let hex = |b: u8| (b as char).to_digit(16);
                match raw.get(i).and_then(|&d| hex(d)) {
                    Some(h) => {
                        let mut n = h;
                        i += 1;
                        if let Some(l) = raw.get(i).and_then(|&d| hex(d)) {
                            n = n * 16 + l;
                            i += 1;
                        }
                        v.push(n as u8);
                    }
                    None => v.push(b'x'),
                }
            }
            other => v.push(other),
        }
    }
    v
}

/// A CSV field's value (its quotes and escapes undone).
fn csv_value(raw: &[u8], quote: u8, escape: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(raw.len());
    let mut in_quotes = false;
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if in_quotes {
            if b == escape && matches!(raw.get(i + 1), Some(&n) if n == quote || n == escape) {
                v.push(raw[i + 1]);
                i += 2;
                continue;
            }
            if b == quote {
                in_quotes = false;
                i += 1;
                continue;
            }
        } else if b == quote {
            in_quotes = true;
            i += 1;
            continue;
        }
        v.push(b);
        i += 1;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::MaskFunction;

    fn redact() -> Option<ColumnMask> {
        Some(ColumnMask::whole(MaskFunction::Redact, 25, false))
    }

    fn rewrite(
        copy: &CopyOut,
        masks: &[Option<ColumnMask>],
        pieces: &[&[u8]],
    ) -> (Vec<u8>, Vec<u64>) {
        let mut r = CopyRewriter::new(copy.clone(), masks.into(), 1 << 20);
        let mut out = Vec::new();
        let mut counts = vec![0; masks.len()];
        for p in pieces {
            r.data(&Masker::new(b"k"), p, &mut out, &mut counts)
                .unwrap();
        }
        r.done().unwrap();
        (out, counts)
    }

    /// The rewrite of `data` whole, and of `data` cut in two at every byte, is `want`.
    fn at_any_cut(copy: &CopyOut, masks: &[Option<ColumnMask>], data: &[u8], want: &[u8]) {
        assert_eq!(rewrite(copy, masks, &[data]).0, want);
        for cut in 1..data.len() {
            let (a, b) = data.split_at(cut);
            assert_eq!(rewrite(copy, masks, &[a, b]).0, want, "cut at {cut}");
        }
    }

    #[test]
    fn statements_become_queries_to_describe() {
        let c = copy_out("COPY customers TO STDOUT").unwrap().unwrap();
        assert_eq!(c.query, "SELECT * FROM ONLY \"customers\"");
        assert_eq!(
            (c.format, c.delimiter, c.null.as_slice()),
            (Format::Text, b'\t', &b"\\N"[..])
        );
        let c = copy_out("copy public.\"Cust\" (id, \"E\") to stdout with (format csv, header)")
            .unwrap()
            .unwrap();
        assert_eq!(
            c.query,
            "SELECT \"id\", \"E\" FROM ONLY \"public\".\"Cust\""
        );
        assert_eq!((c.format, c.delimiter, c.header), (Format::Csv, b',', true));
        let c = copy_out("COPY (SELECT email FROM customers WHERE id > 1) TO STDOUT WITH BINARY")
            .unwrap()
            .unwrap();
        assert_eq!(c.format, Format::Binary);
        assert!(
            c.query.starts_with("SELECT email FROM customers"),
            "{}",
            c.query
        );
        let c = copy_out("COPY t TO STDOUT CSV DELIMITER ';' NULL 'nil' QUOTE '''' ESCAPE '\\'")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.delimiter, c.null.as_slice(), c.quote, c.escape),
            (b';', &b"nil"[..], b'\'', b'\\')
        );
        for not_ours in [
            "COPY t FROM STDIN",
            "COPY t TO '/tmp/x'",
            "COPY t TO PROGRAM 'cat'",
            "SELECT 1",
            "COPY t TO STDOUT; SELECT 1",
        ] {
            assert_eq!(copy_out(not_ours), Ok(None), "{not_ours}");
        }
        assert!(copy_out("COPY t TO STDOUT WITH (ENCODING 'SJIS')").is_err());
        assert!(copy_out("COPY t TO STDOUT WITH (FORMAT csv, DELIMITER '\"')").is_err());
    }

    #[test]
    fn text_rows_are_rewritten_whatever_the_message_cuts() {
        let copy = copy_out("COPY t TO STDOUT").unwrap().unwrap();
        let masks = [None, redact(), None];
        let data = b"1\ta@b.c\tnote\\twith tab\n2\t\\N\tx\n3\tq\\\\\\n\tlast\n";
        let want = b"1\t****\tnote\\twith tab\n2\t\\N\tx\n3\t****\tlast\n".to_vec();
        assert_eq!(rewrite(&copy, &masks, &[data]).1, vec![0, 2, 0]);
        at_any_cut(&copy, &masks, data, &want);
        // A masked value with the delimiter or a backslash is escaped.
        let partial = [
            None,
            Some(ColumnMask::whole(
                MaskFunction::Partial { keep: 4 },
                25,
                false,
            )),
        ];
        let (out, _) = rewrite(&copy, &partial, &[b"1\tsecret\\tab\\\\c\n"]);
        assert_eq!(out, b"1\t*******ab\\\\c\n");
    }

    #[test]
    fn csv_rows_with_quotes_and_newlines() {
        let copy = copy_out("COPY t TO STDOUT WITH (FORMAT csv, HEADER)")
            .unwrap()
            .unwrap();
        let masks = [None, redact()];
        let data = b"id,email\n1,\"a,\"\"b\"\"\nc\"\n2,\n3,\"\"\n";
        let want = b"id,email\n1,\"****\"\n2,\n3,\"****\"\n".to_vec();
        assert_eq!(rewrite(&copy, &masks, &[data]).1, vec![0, 2]);
        at_any_cut(&copy, &masks, data, &want);
        // The masked value is quoted with its quotes escaped.
        let hash = [
            None,
            Some(ColumnMask::whole(MaskFunction::Email, 25, false)),
        ];
        let (out, _) = rewrite(&copy, &hash, &[b"h1,h2\n1,x@y.z\n"]);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("h1,h2\n1,\"") && text.ends_with("@masked.invalid\"\n"),
            "{text}"
        );
    }

    #[test]
    fn binary_tuples_are_rewritten_and_checked() {
        let copy = copy_out("COPY t TO STDOUT (FORMAT binary)")
            .unwrap()
            .unwrap();
        let int = Some(ColumnMask::whole(MaskFunction::Redact, 23, false));
        let masks = [None, redact(), int];
        let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&0u32.to_be_bytes());
        let field = |d: &mut Vec<u8>, v: Option<&[u8]>| match v {
            Some(v) => {
                d.extend_from_slice(&(v.len() as i32).to_be_bytes());
                d.extend_from_slice(v);
            }
            None => d.extend_from_slice(&(-1i32).to_be_bytes()),
        };
        for (id, email) in [(1i32, Some(&b"a@b.c"[..])), (2, None)] {
            data.extend_from_slice(&3i16.to_be_bytes());
            field(&mut data, Some(&id.to_be_bytes()));
            field(&mut data, email);
            field(&mut data, Some(&77i32.to_be_bytes()));
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let (whole, counts) = rewrite(&copy, &masks, &[&data]);
        assert_eq!(counts, vec![0, 1, 2]);
        // The same stream with the masked values: text redacted, an int4 still 4 bytes.
        let mut want = data[..19].to_vec();
        for (id, email) in [(1i32, Some(&b"****"[..])), (2, None)] {
            want.extend_from_slice(&3i16.to_be_bytes());
            field(&mut want, Some(&id.to_be_bytes()));
            field(&mut want, email);
            field(&mut want, Some(&0i32.to_be_bytes()));
        }
        want.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(whole, want);
        at_any_cut(&copy, &masks, &data, &want);
        // Wrong field counts, a missing trailer, bytes after it: errors, never passed on.
        let mut r = CopyRewriter::new(copy.clone(), masks[..2].into(), 1 << 20);
        let mut out = Vec::new();
        assert!(r
            .data(&Masker::new(b"k"), &data, &mut out, &mut [])
            .is_err());
        let mut r = CopyRewriter::new(copy.clone(), masks.as_slice().into(), 1 << 20);
        r.data(
            &Masker::new(b"k"),
            &data[..data.len() - 2],
            &mut Vec::new(),
            &mut [],
        )
        .unwrap();
        assert!(r.done().is_err());
        r.data(
            &Masker::new(b"k"),
            &data[data.len() - 2..],
            &mut Vec::new(),
            &mut [],
        )
        .unwrap();
        assert!(r.done().is_ok());
        assert!(r
            .data(&Masker::new(b"k"), b"\0\x03", &mut Vec::new(), &mut [])
            .is_err());
    }

    #[test]
    fn rows_that_do_not_fit_are_errors() {
        let copy = copy_out("COPY t TO STDOUT").unwrap().unwrap();
        let masks: Arc<[Option<ColumnMask>]> = vec![None, redact()].into();
        let mut r = CopyRewriter::new(copy.clone(), masks.clone(), 16);
        assert!(r
            .data(&Masker::new(b"k"), &[b'a'; 64], &mut Vec::new(), &mut [])
            .is_err());
        let mut r = CopyRewriter::new(copy, masks, 1 << 20);
        assert!(r
            .data(&Masker::new(b"k"), b"1\t2\t3\n", &mut Vec::new(), &mut [])
            .is_err());
        let mut r2 = CopyRewriter::new(
            copy_out("COPY t TO STDOUT").unwrap().unwrap(),
            vec![None, redact()].into(),
            1 << 20,
        );
        r2.data(&Masker::new(b"k"), b"1\tab", &mut Vec::new(), &mut [])
            .unwrap();
        assert!(r2.done().is_err(), "ended inside a row");
    }

    #[test]
    fn encodings_that_embed_ascii() {
        assert!(encoding_embeds_ascii("SJIS"));
        assert!(encoding_embeds_ascii("shift_jis_2004"));
        assert!(encoding_embeds_ascii("GB18030"));
        assert!(!encoding_embeds_ascii("UTF8"));
        assert!(!encoding_embeds_ascii("LATIN1"));
        assert!(!encoding_embeds_ascii("EUC_JP"));
    }
}
