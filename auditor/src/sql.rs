//! What a statement is, without what it carries: normalised text (literals become $n),
//! command, tables and fingerprint, from pg_query (the real Postgres parser).
//!
//! Redaction never fails open: text that pg_query cannot parse (a syntax error, a statement
//! cut short) goes through `redact_literals`, a lexer that replaces every literal it sees.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::text::{List, Text};

use ahash::AHashMap as HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub normalized: Text,
    pub command: Text,
    pub tables: List<String>,
    pub fingerprint: Text,
    /// pg_query could not parse the text (it was redacted by the fallback lexer).
    pub unparsed: bool,
    /// What the statement does, read from its parse tree when a policy first asks (most
    /// sessions are judged by no rule). Shared by every text of the same shape: literals
    /// do not change it.
    pub facts: std::sync::OnceLock<Option<crate::policy::Facts>>,
}

impl Analysis {
    /// The statement's facts (`sql` is its text: this analysis's or one of its shape's);
    /// None when it does not parse.
    pub fn facts(&self, sql: &str) -> Option<&crate::policy::Facts> {
        if self.unparsed {
            return None;
        }
        self.facts
            .get_or_init(|| crate::policy::Facts::of(sql))
            .as_ref()
    }
}

/// Caches analyses: by exact text (prepared statements, repeated queries) and, for data
/// statements written with literals, by shape (the same statement with other values), so
/// that a stream of `SELECT ... WHERE id = 42`, `... = 43` is parsed once, not per query.
pub struct Analyzer {
    /// By exact text; the key is shared with the statements of that text
    /// ([`Analyzer::analyze_text`]).
    cache: HashMap<Arc<str>, Arc<Analysis>>,
    shapes: HashMap<String, Arc<Analysis>>,
    capacity: usize,
    /// The last statement's shape: the buffer the next one is written into.
    shape: String,
}

impl Default for Analyzer {
    fn default() -> Self {
        Analyzer::new(8192)
    }
}

/// Statements whose literals are all constants of the parse tree, so that pg_query's
/// normalised text, command, tables and fingerprint do not depend on their values. (Not
/// so for utility statements: `COPY t FROM 'file'` keeps its file name, for one.)
fn shape_cacheable(sql: &str) -> bool {
    let word = first_word(sql);
    ["SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
}

impl Analyzer {
    pub fn new(capacity: usize) -> Self {
        Analyzer {
            cache: HashMap::default(),
            shapes: HashMap::default(),
            capacity,
            shape: String::new(),
        }
    }

    pub fn analyze(&mut self, sql: &str) -> Arc<Analysis> {
        self.analyze_text(sql).1
    }

    /// The analysis of `sql` and its text shared: a text seen before (a statement
    /// prepared again and again, a repeated query) is not copied once more.
    pub fn analyze_text(&mut self, sql: &str) -> (Arc<str>, Arc<Analysis>) {
        self.analyze_with(sql, || sql.into())
    }

    /// The analysis of a text the caller already shares.
    pub fn analyze_shared(&mut self, sql: &Arc<str>) -> Arc<Analysis> {
        self.analyze_with(sql, || sql.clone()).1
    }

    /// `shared`: the text to keep (as the exact-text cache's key) and return.
    fn analyze_with(
        &mut self,
        sql: &str,
        shared: impl FnOnce() -> Arc<str>,
    ) -> (Arc<str>, Arc<Analysis>) {
        if let Some((text, a)) = self.cache.get_key_value(sql) {
            return (text.clone(), a.clone());
        }
        let text = shared();
        let a = self.analyze_new(&text);
        (text, a)
    }

    fn analyze_new(&mut self, sql: &Arc<str>) -> Arc<Analysis> {
        // The shape is written into the analyzer's buffer and copied only when it is kept.
        let mut shape = std::mem::take(&mut self.shape);
        let shaped =
            shape_cacheable(sql) && !sql.contains('\u{1}') && shape_into(sql, &mut shape) > 0;
        let a = match shaped.then(|| self.shapes.get(shape.as_str())).flatten() {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(analyze_uncached(sql));
                // Simple and bounded: start over rather than track recency.
                if shaped && !a.unparsed {
                    // Only what pg_query parsed: the fallback lexer's text is not pg_query's.
                    if self.shapes.len() >= self.capacity {
                        self.shapes.clear();
                    }
                    self.shapes.insert(shape.clone(), a.clone());
                } else {
                    if self.cache.len() >= self.capacity {
                        self.cache.clear();
                    }
                    self.cache.insert(sql.clone(), a.clone());
                }
                a
            }
        };
        // A huge statement's shape does not keep its memory.
        if shape.capacity() <= SHAPE_BUFFER_MAX {
            self.shape = shape;
        }
        a
    }
}

/// The largest shape buffer an [`Analyzer`] keeps for the next statement.
const SHAPE_BUFFER_MAX: usize = 16 << 10;

/// Whether `sql` can hold more than one statement: a `;` followed by anything but
/// whitespace. Most query strings are one statement and skip the splitter's full parse.
fn maybe_several(sql: &str) -> bool {
    match sql.find(';') {
        None => false,
        Some(i) => !sql[i + 1..]
            .trim_start_matches([';', ' ', '\t', '\n', '\r'])
            .is_empty(),
    }
}

/// A simple-protocol query string split as [`split_statements`] does, shared: the whole
/// string and its statements. Most strings hold one statement: the whole is then that
/// statement's text (without its terminating semicolons and spaces), one allocation for
/// both, and the list holds it in place.
pub fn split_query(text: &str) -> (Arc<str>, SmallVec<[Arc<str>; 1]>) {
    if !maybe_several(text) {
        let one: Arc<str> = the_one(text).into();
        return (one.clone(), smallvec::smallvec![one]);
    }
    let parts = split_statements(text).into_iter().map(Arc::from).collect();
    (text.into(), parts)
}

/// A string of one statement as the splitter returns it: without the terminating
/// semicolons.
fn the_one(sql: &str) -> &str {
    sql.trim()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace())
}

/// Splits a simple-protocol query string into its statements (for one event each).
pub fn split_statements(sql: &str) -> Vec<String> {
    if !maybe_several(sql) {
        return vec![the_one(sql).to_string()];
    }
    match pg_query::split_with_parser(sql) {
        Ok(parts) => {
            let v: Vec<String> = parts
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if v.is_empty() {
                vec![sql.trim().to_string()]
            } else {
                v
            }
        }
        Err(_) => match pg_query::split_with_scanner(sql) {
            Ok(parts) => parts
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            Err(_) => vec![sql.trim().to_string()],
        },
    }
}

fn analyze_uncached(sql: &str) -> Analysis {
    let parsed = pg_query::parse(sql, 0);
    let normalized = match (&parsed, pg_query::normalize(sql)) {
        (Ok(_), Ok(n)) => Some(n),
        _ => None,
    };
    match (parsed, normalized) {
        (Ok(result), Some(normalized)) => {
            let mut tables: Vec<String> = result.tables();
            tables.sort();
            tables.dedup();
            let command = result
                .statement_types()
                .first()
                .map(|t| command_of_node(t))
                .unwrap_or_default();
            let fingerprint = pg_query::fingerprint(sql, 0, 0)
                .map(|f| f.hex)
                .unwrap_or_default();
            Analysis {
                normalized: Text::lasting_shape(&normalized),
                command: Text::lasting_shape(&command),
                tables: List::lasting(tables),
                fingerprint: Text::lasting_shape(&fingerprint),
                unparsed: false,
                facts: Default::default(),
            }
        }
        _ => Analysis {
            normalized: Text::lasting_shape(&redact_literals(sql)),
            command: Text::lasting_shape(&first_keyword(sql)),
            tables: List::default(),
            fingerprint: Text::default(),
            unparsed: true,
            facts: Default::default(),
        },
    }
}

/// The command for a parse-tree node name ("SelectStmt" -> "SELECT").
pub(crate) fn command_of_node(node: &str) -> String {
    let known = match node {
        "SelectStmt" => "SELECT",
        "InsertStmt" => "INSERT",
        "UpdateStmt" => "UPDATE",
        "DeleteStmt" => "DELETE",
        "MergeStmt" => "MERGE",
        "CopyStmt" => "COPY",
        "CreateStmt" => "CREATE TABLE",
        "CreateTableAsStmt" => "CREATE TABLE AS",
        "AlterTableStmt" => "ALTER TABLE",
        "DropStmt" => "DROP",
        "TruncateStmt" => "TRUNCATE",
        "IndexStmt" => "CREATE INDEX",
        "ViewStmt" => "CREATE VIEW",
        "CreateSchemaStmt" => "CREATE SCHEMA",
        "CreateRoleStmt" => "CREATE ROLE",
        "AlterRoleStmt" => "ALTER ROLE",
        "GrantStmt" => "GRANT",
        "GrantRoleStmt" => "GRANT ROLE",
        "TransactionStmt" => "TRANSACTION",
        "VariableSetStmt" => "SET",
        "VariableShowStmt" => "SHOW",
        "ExplainStmt" => "EXPLAIN",
        "VacuumStmt" => "VACUUM",
        "DoStmt" => "DO",
        "CallStmt" => "CALL",
        "PrepareStmt" => "PREPARE",
        "ExecuteStmt" => "EXECUTE",
        "DeallocateStmt" => "DEALLOCATE",
        "CreateFunctionStmt" => "CREATE FUNCTION",
        "CreateExtensionStmt" => "CREATE EXTENSION",
        "DeclareCursorStmt" => "DECLARE CURSOR",
        "FetchStmt" => "FETCH",
        "ClosePortalStmt" => "CLOSE CURSOR",
        "LockStmt" => "LOCK",
        "ListenStmt" => "LISTEN",
        "NotifyStmt" => "NOTIFY",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_string();
    }
    // "CreateSeqStmt" -> "CREATE SEQ": readable enough for the rest.
    let base = node.strip_suffix("Stmt").unwrap_or(node);
    let mut out = String::new();
    for (i, ch) in base.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

fn first_word(sql: &str) -> &str {
    sql.trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
}

fn first_keyword(sql: &str) -> String {
    first_word(sql).to_ascii_uppercase()
}

/// Replaces string, numeric, bit-string and dollar-quoted literals with $n; keeps
/// identifiers, keywords, operators and existing $n parameters. Tolerates text that ends
/// in the middle of anything (an unterminated literal is replaced whole).
pub fn redact_literals(sql: &str) -> String {
    scan_literals(sql, false).0
}

/// Writes into `out` (emptied first) the text with every literal replaced by a \x01 byte
/// and everything else (comments included) kept; returns the number of literals: texts
/// with equal shapes differ only in literal values.
fn shape_into(sql: &str, out: &mut String) -> u32 {
    out.clear();
    scan_literals_into(sql, true, out)
}

/// Copies `sql` with each literal replaced (by `\u{1}` for a shape, `$n` otherwise);
/// comments kept in a shape, dropped otherwise.
fn scan_literals(sql: &str, shape: bool) -> (String, u32) {
    let mut out = String::with_capacity(sql.len());
    let n = scan_literals_into(sql, shape, &mut out);
    (out, n)
}

/// As [`scan_literals`], appending to `out`. What is kept is copied in runs, not a
/// character at a time: this runs on every simple query's text.
fn scan_literals_into(sql: &str, shape: bool, out: &mut String) -> u32 {
    let b = sql.as_bytes();
    out.reserve(sql.len());
    let mut n = 0u32;
    let mut i = 0usize;
    // Bytes before `copied` are in `out` (or were left out on purpose).
    let mut copied = 0usize;
    // Replaces sql[from..to] in the output by a placeholder (or nothing).
    let mut replace =
        |out: &mut String, copied: &mut usize, from: usize, to: usize, literal: bool| {
            out.push_str(&sql[*copied..from]);
            if literal {
                n += 1;
                if shape {
                    out.push('\u{1}');
                } else {
                    out.push('$');
                    out.push_str(itoa::Buffer::new().format(n));
                }
            }
            *copied = to;
        };
    while i < b.len() {
        // Only ASCII bytes start a token the scanner looks at: the others (letters,
        // spaces, operators, every byte of a multi-byte character) are kept as they are.
        while i < b.len() && !STARTS_TOKEN[usize::from(b[i])] {
            i += 1;
        }
        let Some(&c) = b.get(i) else {
            break;
        };
        // Comments
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            let start = i;
            i = memchr_newline(b, i);
            if !shape {
                replace(out, &mut copied, start, i, false);
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let start = i;
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(b.len());
            if !shape {
                replace(out, &mut copied, start, i, false);
            }
            continue;
        }
        // Quoted identifier: kept.
        if c == b'"' {
            i += 1;
            while i < b.len() {
                if b[i] == b'"' {
                    if b.get(i + 1) == Some(&b'"') {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            continue;
        }
        // String literals, with optional E/B/X/N/U& prefixes: the prefix is the letters
        // just before the quote, unless a token before took them (a number's `1e`) or
        // (E, B, X, N) they end a word.
        if c == b'\'' {
            let (start, escapes) = if i >= 1
                && matches!(
                    b[i - 1],
                    b'E' | b'e' | b'B' | b'b' | b'X' | b'x' | b'N' | b'n'
                )
                && i > copied
                && (i == 1 || !is_ident(b[i - 2]))
            {
                (i - 1, matches!(b[i - 1], b'E' | b'e'))
            } else if i >= 2
                && b[i - 1] == b'&'
                && matches!(b[i - 2], b'U' | b'u')
                && i - 2 >= copied
            {
                (i - 2, false)
            } else {
                (i, false)
            };
            i += 1;
            while i < b.len() {
                if escapes && b[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            i = i.min(b.len());
            // An escape can end inside a character (E'\é...' cut short): the rest of
            // it is the literal's.
            while !sql.is_char_boundary(i) {
                i += 1;
            }
            replace(out, &mut copied, start, i, true);
            continue;
        }
        // Dollar quoting: $tag$ ... $tag$ (a $n parameter is kept)
        if c == b'$' {
            let mut j = i + 1;
            while j < b.len() && is_ident(b[j]) && !b[j].is_ascii_digit() {
                j += 1;
            }
            if j < b.len() && b[j] == b'$' {
                let start = i;
                let tag = &sql[i..=j];
                let body_start = j + 1;
                i = sql[body_start..]
                    .find(tag)
                    .map(|p| body_start + p + tag.len())
                    .unwrap_or(b.len());
                replace(out, &mut copied, start, i, true);
                continue;
            }
            // $n parameter: kept.
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            continue;
        }
        // Numbers not part of an identifier
        if (c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric()
                    || b[i] == b'.'
                    || b[i] == b'_'
                    || ((b[i] == b'+' || b[i] == b'-') && matches!(b[i - 1], b'e' | b'E')))
            {
                i += 1;
            }
            replace(out, &mut copied, start, i, true);
            continue;
        }
        // A byte that starts no token here (a digit within a word, a lone `-`).
        i += 1;
    }
    out.push_str(&sql[copied..]);
    n
}

/// The bytes that may start a token [`scan_literals`] replaces or skips whole: comments,
/// quotes, dollar signs, numbers.
const STARTS_TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = true;
        c += 1;
    }
    t[b'-' as usize] = true;
    t[b'/' as usize] = true;
    t[b'"' as usize] = true;
    t[b'\'' as usize] = true;
    t[b'$' as usize] = true;
    t[b'.' as usize] = true;
    t
};

/// The index of the first newline at or after `from`, or the end.
fn memchr_newline(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| from + p)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf8_len(first: u8) -> usize {
        match first {
            0xf0..=0xff => 4,
            0xe0..=0xef => 3,
            0xc0..=0xdf => 2,
            _ => 1,
        }
    }

    /// The scanner as it was (a character at a time), to check the one that copies runs.
    fn scan_literals_reference(sql: &str, shape: bool) -> (String, u32) {
        let b = sql.as_bytes();
        let mut out = String::with_capacity(sql.len());
        let mut n = 0u32;
        let mut i = 0usize;
        let mut placeholder = |out: &mut String| {
            n += 1;
            if shape {
                out.push('\u{1}');
            } else {
                out.push('$');
                out.push_str(&n.to_string());
            }
        };
        while i < b.len() {
            let c = b[i];
            // Comments
            if c == b'-' && b.get(i + 1) == Some(&b'-') {
                let start = i;
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                if shape {
                    out.push_str(&sql[start..i]);
                }
                continue;
            }
            if c == b'/' && b.get(i + 1) == Some(&b'*') {
                let start = i;
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(b.len());
                if shape {
                    out.push_str(sql.get(start..i).unwrap_or(""));
                }
                continue;
            }
            // Quoted identifier
            if c == b'"' {
                let start = i;
                i += 1;
                while i < b.len() {
                    if b[i] == b'"' {
                        if b.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
                out.push_str(&sql[start..i]);
                continue;
            }
            // String literals, with optional E/B/X/N/U& prefixes
            let prefix_len = if (c == b'E'
                || c == b'e'
                || c == b'B'
                || c == b'b'
                || c == b'X'
                || c == b'x'
                || c == b'N'
                || c == b'n')
                && b.get(i + 1) == Some(&b'\'')
                && (i == 0 || !is_ident(b[i - 1]))
            {
                1
            } else if (c == b'U' || c == b'u')
                && b.get(i + 1) == Some(&b'&')
                && b.get(i + 2) == Some(&b'\'')
            {
                2
            } else {
                0
            };
            if c == b'\'' || prefix_len > 0 {
                let escapes = c == b'E' || c == b'e';
                i += prefix_len + 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
                i = i.min(b.len());
                placeholder(&mut out);
                continue;
            }
            // Dollar quoting: $tag$ ... $tag$ (a $n parameter is kept)
            if c == b'$' {
                let mut j = i + 1;
                while j < b.len() && is_ident(b[j]) && !b[j].is_ascii_digit() {
                    j += 1;
                }
                if j < b.len() && b[j] == b'$' {
                    let tag = &sql[i..=j];
                    let body_start = j + 1;
                    let end = sql[body_start..]
                        .find(tag)
                        .map(|p| body_start + p + tag.len())
                        .unwrap_or(b.len());
                    i = end;
                    placeholder(&mut out);
                    continue;
                }
                // $n parameter
                out.push('$');
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    out.push(b[i] as char);
                    i += 1;
                }
                continue;
            }
            // Numbers not part of an identifier
            if (c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())))
                && (i == 0 || !is_ident(b[i - 1]))
            {
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'.'
                        || b[i] == b'_'
                        || ((b[i] == b'+' || b[i] == b'-') && matches!(b[i - 1], b'e' | b'E')))
                {
                    i += 1;
                }
                placeholder(&mut out);
                continue;
            }
            // Anything else, copied whole (multi-byte UTF-8 stays intact)
            let len = utf8_len(c);
            let end = (i + len).min(b.len());
            out.push_str(sql.get(i..end).unwrap_or(""));
            i = end;
        }
        (out, n)
    }

    /// Texts made of the pieces the scanner tells apart (quotes of every kind, comments,
    /// dollar tags, numbers, parameters, multi-byte characters, cut-off ends): redacted
    /// and shaped as the character-at-a-time scanner did.
    #[test]
    fn scanning_in_runs_is_scanning_a_character_at_a_time() {
        use rand::{Rng, SeedableRng};
        let pieces = [
            "SELECT ",
            "a",
            " = ",
            "42",
            "1.5e-3",
            ".5",
            "x1",
            "_9",
            "'it''s'",
            "'open",
            "E'a\\'b'",
            "e'\\",
            "E'\\é'",
            "B'101'",
            "X'ff'",
            "N'n'",
            "U&'d'",
            "u&'",
            "$1",
            "$12",
            "$$body$$",
            "$t$x$t$",
            "$t$open",
            "$",
            "-- c\n",
            "--",
            "/* c */",
            "/*",
            "\"q\"\"i\"",
            "\"open",
            "é",
            "日本",
            "🙂",
            ";",
            " ",
            "\n",
            "-",
            "/",
            "*",
            "e",
            "u",
            "'",
            "\"",
            "\\",
            "0",
            "U",
            "E",
            "n",
            "&",
            "1e",
            "1u",
            "1E+",
            "x",
            "é'",
            "_",
            "$a",
            "9",
            "é1",
            "u&",
            "E'\\",
            "-1",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..100_000 {
            let n = rng.gen_range(0..12);
            let sql: String = (0..n)
                .map(|_| pieces[rng.gen_range(0..pieces.len())])
                .collect();
            for shape in [false, true] {
                assert_eq!(
                    scan_literals(&sql, shape),
                    scan_literals_reference(&sql, shape),
                    "{sql:?}, shape {shape}"
                );
            }
        }
    }

    #[test]
    fn pg_query_normalizes() {
        let mut a = Analyzer::default();
        let r = a.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 42");
        assert_eq!(
            &*r.normalized,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        );
        assert_eq!(&*r.command, "SELECT");
        assert_eq!(&r.tables[..], ["pgbench_accounts".to_string()]);
        assert!(!r.fingerprint.is_empty());
        assert!(!r.unparsed);
    }

    #[test]
    fn same_statement_other_literals_is_parsed_once_and_right() {
        let mut a = Analyzer::default();
        let first = a.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 42 AND n = 'x'");
        let second = a.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 7 AND n = 'yy'");
        assert!(Arc::ptr_eq(&first, &second), "served from the shape cache");
        assert_eq!(
            &*second.normalized,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1 AND n = $2"
        );
        assert_eq!(
            a.cache.len(),
            0,
            "literal-bearing texts do not fill the exact cache"
        );
        // What pg_query would say of each, uncached, is what the cache says.
        for sql in [
            "select * from t where a = -1 /* c1 */",
            "select * from t where a = -2 /* c2 */",
            "select * from t where a = - 3 -- it's",
            "INSERT INTO t VALUES (1, 'a', E'\\n', $$d$$, B'101', 1.5e3)",
            "insert into t values (22, 'bb', E'\\t', $$ee$$, B'1', 2.5e-3)",
            "WITH x AS (SELECT 1) SELECT * FROM x LIMIT 5",
            "with x as (select 2) select * from x limit 10",
            "UPDATE t SET a = 'p' WHERE b IN (1, 2, 3)",
            "update t set a = 'q' where b in (4, 5)",
        ] {
            let cached = a.analyze(sql);
            let fresh = analyze_uncached(sql);
            assert_eq!(*cached, fresh, "{sql}");
        }
        // Utility statements are cached by exact text only.
        let c1 = a.analyze("COPY t FROM '/tmp/a.csv'");
        let c2 = a.analyze("COPY t FROM '/tmp/b.csv'");
        assert!(!Arc::ptr_eq(&c1, &c2));
        assert_eq!(*c2, analyze_uncached("COPY t FROM '/tmp/b.csv'"));
    }

    #[test]
    fn unparsable_text_is_still_redacted() {
        let mut a = Analyzer::default();
        let r = a.analyze("SELEC password FROM users WHERE secret = 'hunter2' AND n = 7");
        assert!(r.unparsed);
        assert!(!r.normalized.contains("hunter2"));
        assert!(!r.normalized.contains('7'));
    }

    #[test]
    fn lexer_redaction() {
        assert_eq!(
            redact_literals(
                "select 'a''b', E'x\\'y', $$p$$, $t$q$t$, 1.5e-3, x1 from \"t'\" where c = $1"
            ),
            "select $1, $2, $3, $4, $5, x1 from \"t'\" where c = $1"
        );
        // Cut in the middle of a literal: nothing of it survives.
        assert_eq!(
            redact_literals("insert into t values ('secr"),
            "insert into t values ($1"
        );
    }

    #[test]
    fn single_statements_skip_the_splitter() {
        assert!(!maybe_several("SELECT 1"));
        assert!(!maybe_several("SELECT 1;  \n"));
        assert!(maybe_several("SELECT 1; SELECT 2"));
        // A ';' inside a literal is left to the real splitter.
        assert!(maybe_several("SELECT ';x'"));
        assert_eq!(split_statements("SELECT ';x'"), vec!["SELECT ';x'"]);
        assert_eq!(split_statements("SELECT 1; "), vec!["SELECT 1"]);
        assert_eq!(
            split_statements("SELECT 1; SELECT 2;"),
            vec!["SELECT 1", "SELECT 2"]
        );
    }

    #[test]
    fn splits_multi_statement_strings() {
        assert_eq!(
            split_statements("BEGIN; SELECT 1; END;"),
            vec!["BEGIN", "SELECT 1", "END"]
        );
    }
}
