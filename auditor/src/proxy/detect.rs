//! Value detectors: sensitive values recognised by what they are (an e-mail address, a
//! payment card number that passes the Luhn check, an IBAN with valid check digits, a US
//! social security number, a phone number, a policy's own regular expressions), found
//! inside any text, so that the proxy masks them wherever they appear in a result.

use regex::bytes::Regex;

use crate::policy::model::{Detector, MaskFunction};

/// What one of a rule's detectors or patterns looks for.
#[derive(Debug)]
enum Kind {
    Email,
    Card,
    UsSsn,
    Iban,
    Phone,
    Pattern,
}

/// The detectors of one mask rule, and how what they find is masked.
#[derive(Debug)]
pub struct Scanner {
    pub how: MaskFunction,
    pub rule: std::sync::Arc<str>,
    finders: Vec<(Kind, Regex)>,
}

impl PartialEq for Scanner {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

/// The most a policy's pattern may compile to (a pathological one is refused at load).
pub const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A policy's own pattern, compiled as the proxy runs it.
pub fn compile_pattern(p: &str) -> Result<Regex, String> {
    regex::bytes::RegexBuilder::new(p)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

fn builtin(kind: &Kind) -> Regex {
    let re = match kind {
        Kind::Email => r"(?i-u)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}",
        Kind::Card => r"(?-u)\b\d(?:[ -]?\d){12,18}\b",
        Kind::UsSsn => r"(?-u)\b\d{3}-\d{2}-\d{4}\b",
        Kind::Iban => r"(?-u)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
        Kind::Phone => {
            r"(?-u)(?:\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,6}|(?:\(\d{3}\)|\b\d{3})[ .-]\d{3}[ .-]\d{4}\b)"
        }
        Kind::Pattern => unreachable!("patterns are the policy's"),
    };
    Regex::new(re).expect("the built-in detectors compile")
}

fn digits(b: &[u8]) -> Vec<u8> {
    b.iter()
        .filter(|c| c.is_ascii_digit())
        .map(|c| c - b'0')
        .collect()
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn iban_valid(b: &[u8]) -> bool {
    let s: Vec<u8> = b.iter().filter(|c| **c != b' ').copied().collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem: u32 = 0;
    for &c in tail.iter().chain(head) {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn ssn_valid(b: &[u8]) -> bool {
    let d = digits(b);
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    area != 0 && area != 666 && area < 900 && (d[3], d[4]) != (0, 0) && d[5..] != [0, 0, 0, 0]
}

impl Scanner {
    /// The scanner of a rule's detectors and patterns; None when it has neither.
    pub fn new(
        rule: &str,
        detectors: &[Detector],
        patterns: &[String],
        how: MaskFunction,
    ) -> Result<Option<Scanner>, String> {
        let mut finders = Vec::new();
        for d in detectors {
            let kind = match d {
                Detector::Email => Kind::Email,
                Detector::CardNumber => Kind::Card,
                Detector::UsSsn => Kind::UsSsn,
                Detector::Iban => Kind::Iban,
                Detector::Phone => Kind::Phone,
            };
            let re = builtin(&kind);
            finders.push((kind, re));
        }
        for p in patterns {
            finders.push((Kind::Pattern, compile_pattern(p)?));
        }
        Ok((!finders.is_empty()).then(|| Scanner {
            how,
            rule: rule.into(),
            finders,
        }))
    }

    /// [`Scanner::new`], compiled once per distinct rule and shared by the sessions it
    /// applies to (a session starts in microseconds; compiling takes longer).
    pub fn shared(
        rule: &str,
        detectors: &[Detector],
        patterns: &[String],
        how: MaskFunction,
    ) -> Result<Option<std::sync::Arc<Scanner>>, String> {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex, OnceLock};
        static COMPILED: OnceLock<Mutex<HashMap<String, Arc<Scanner>>>> = OnceLock::new();
        let key = format!("{rule}\0{detectors:?}\0{patterns:?}\0{how:?}");
        let cache = COMPILED.get_or_init(Default::default);
        if let Some(s) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(Some(s));
        }
        let Some(s) = Scanner::new(rule, detectors, patterns, how)?.map(Arc::new) else {
            return Ok(None);
        };
        if let Ok(mut c) = cache.lock() {
            // Rules come from policies: a handful. Bounded all the same.
            if c.len() >= 256 {
                c.clear();
            }
            c.insert(key, s.clone());
        }
        Ok(Some(s))
    }

    /// The spans of `text` that are values this scanner finds (checked: a card number's
    /// Luhn digit, an IBAN's check digits), in order and not overlapping.
    pub fn find(&self, text: &[u8], spans: &mut Vec<(usize, usize)>) {
        for (kind, re) in &self.finders {
            for m in re.find_iter(text) {
                let b = m.as_bytes();
                let ok = match kind {
                    Kind::Card => {
                        let d = digits(b);
                        (13..=19).contains(&d.len()) && luhn(&d)
                    }
                    Kind::Iban => iban_valid(b),
                    Kind::UsSsn => ssn_valid(b),
                    Kind::Phone => b[0] != b'+' || (8..=15).contains(&digits(b).len()),
                    Kind::Email | Kind::Pattern => !b.is_empty(),
                };
                if ok {
                    spans.push((m.start(), m.end()));
                }
            }
        }
    }
}

/// Spans found by several scanners, sorted and merged where they overlap; each keeps the
/// scanner (by index) of the first span of its group.
pub fn merge(spans: &mut Vec<(usize, usize, usize)>) {
    spans.sort_unstable_by_key(|s| (s.0, std::cmp::Reverse(s.1)));
    let mut out: Vec<(usize, usize, usize)> = Vec::with_capacity(spans.len());
    for s in spans.drain(..) {
        match out.last_mut() {
            Some(last) if s.0 < last.1 => last.1 = last.1.max(s.1),
            _ => out.push(s),
        }
    }
    *spans = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(detectors: &[Detector], patterns: &[&str], text: &str) -> Vec<String> {
        let s = Scanner::new(
            "r",
            detectors,
            &patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            MaskFunction::Redact,
        )
        .unwrap()
        .unwrap();
        let mut spans = Vec::new();
        s.find(text.as_bytes(), &mut spans);
        spans.sort();
        spans
            .into_iter()
            .map(|(a, b)| text[a..b].to_string())
            .collect()
    }

    #[test]
    fn each_detector_finds_its_values_and_not_lookalikes() {
        assert_eq!(
            found(
                &[Detector::Email],
                &[],
                "write to Ann.Lee+x@mail.example.org, or not@home"
            ),
            ["Ann.Lee+x@mail.example.org"]
        );
        assert_eq!(
            found(
                &[Detector::CardNumber],
                &[],
                "paid with 4111 1111 1111 1111 (not 4111 1111 1111 1112), order 1234567890123"
            ),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(&[Detector::CardNumber], &[], "5500-0000-0000-0004"),
            ["5500-0000-0000-0004"]
        );
        assert_eq!(
            found(&[Detector::Iban], &[], "to GB82 WEST 1234 5698 7654 32 not GB83 WEST 1234 5698 7654 32; DE89370400440532013000"),
            ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000"]
        );
        assert_eq!(
            found(
                &[Detector::UsSsn],
                &[],
                "ssn 123-45-6789, not 000-12-3456 or 666-12-3456 or 2024-01-01"
            ),
            ["123-45-6789"]
        );
        assert_eq!(
            found(
                &[Detector::Phone],
                &[],
                "call +1-555-123-4567 or (555) 123-4567, not 2024-01-01 or +1 2"
            ),
            ["+1-555-123-4567", "(555) 123-4567"]
        );
        assert_eq!(
            found(&[], &["ACCT-[0-9]{6}"], "account ACCT-123456 and ACCT-12"),
            ["ACCT-123456"]
        );
    }

    #[test]
    fn overlapping_spans_merge() {
        let mut s = vec![(5, 10, 0), (0, 3, 1), (7, 12, 1), (2, 4, 0), (20, 21, 0)];
        merge(&mut s);
        assert_eq!(s, vec![(0, 4, 1), (5, 12, 0), (20, 21, 0)]);
    }

    #[test]
    fn a_pattern_that_does_not_compile_is_an_error() {
        assert!(Scanner::new("r", &[], &["(".into()], MaskFunction::Redact).is_err());
        assert!(Scanner::new("r", &[], &[], MaskFunction::Redact)
            .unwrap()
            .is_none());
    }
}
