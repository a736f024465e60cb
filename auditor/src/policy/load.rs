//! Reading a policies directory: every `*.yaml`/`*.yml` file (several policies in one file
//! are separate YAML documents), with errors and warnings that name file, line and column.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use super::{model::Policy, short_hash, LoadedPolicy, PolicySet, CONNECTION_KEYS};

/// A problem in a policy file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for LintError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// What reading a directory found.
#[derive(Debug, Default)]
pub struct LintReport {
    pub errors: Vec<LintError>,
    /// Not fatal: a selector on a label no source ever sets, and the like.
    pub warnings: Vec<LintError>,
    pub files: usize,
}

/// Label keys the workload sources set (see `workload`), and prefixes of families of keys.
pub const KNOWN_LABELS: [&str; 16] = [
    "process.comm",
    "process.exe",
    "process.uid",
    "process.user",
    "process.loginuid",
    "process.login_user",
    "process.sessionid",
    "cgroup.path",
    "systemd.unit",
    "systemd.slice",
    "container.id",
    "k8s.pod.uid",
    "k8s.pod.name",
    "k8s.namespace",
    "k8s.serviceaccount",
    "k8s.node",
];
/// `k8s.pod/<label>`: the pod's labels; `systemd.label/<key>`: a unit's
/// `X-Auditor-Labels=`; `host.label/<key>`: the config's `host_labels`.
pub const LABEL_PREFIXES: [&str; 3] = ["k8s.pod/", "systemd.label/", "host.label/"];

pub fn known_key(key: &str) -> bool {
    KNOWN_LABELS.contains(&key)
        || CONNECTION_KEYS.contains(&key)
        || LABEL_PREFIXES
            .iter()
            .any(|p| key.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
}

/// Reads every policy of `dir`. Errors of every file are collected, not just the first.
pub fn load_dir(dir: &Path) -> (PolicySet, LintReport) {
    let mut report = LintReport::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            report.errors.push(LintError {
                file: dir.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read the policies directory: {e}"),
            });
            return (PolicySet::default(), report);
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    let mut policies = Vec::new();
    for file in files {
        report.files += 1;
        match std::fs::read_to_string(&file) {
            Ok(text) => policies.extend(load_str(&file, &text, &mut report)),
            Err(e) => report.errors.push(LintError {
                file: file.clone(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    check_unique(&policies, &mut report);
    (PolicySet::new(policies), report)
}

fn check_unique(policies: &[Arc<LoadedPolicy>], report: &mut LintReport) {
    let mut seen: BTreeMap<&str, &LoadedPolicy> = BTreeMap::new();
    for p in policies {
        if let Some(first) = seen.insert(&p.policy.name, p) {
            report.errors.push(LintError {
                file: p.file.clone(),
                line: p.line,
                column: 1,
                message: format!(
                    "policy name `{}` is already used at {}:{}",
                    p.policy.name,
                    first.file.display(),
                    first.line
                ),
            });
        }
    }
}

/// The policies of one file's text (each YAML document is one policy).
pub fn load_str(file: &Path, text: &str, report: &mut LintReport) -> Vec<Arc<LoadedPolicy>> {
    let mut out = Vec::new();
    let starts = document_starts(text);
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let (start_line, body) = starts.get(i).cloned().unwrap_or((1, text.to_string()));
        match Policy::deserialize(doc) {
            Ok(policy) => {
                let before = report.errors.len();
                check_policy(file, text, start_line, &policy, report);
                if report.errors.len() == before {
                    out.push(Arc::new(LoadedPolicy {
                        hash: short_hash(std::iter::once(body.as_str())),
                        policy,
                        file: file.to_path_buf(),
                        line: locate(text, start_line, "name:", 0).0,
                    }));
                }
            }
            Err(e) => {
                // An empty document (a trailing `---`, a file of comments) is no policy.
                if blank(&body) {
                    continue;
                }
                report.errors.push(yaml_error(file, &e));
                // After a syntax error the rest of the file cannot be trusted.
                if e.location().is_none() || is_syntax(&e) {
                    break;
                }
            }
        }
    }
    out
}

fn is_syntax(e: &serde_norway::Error) -> bool {
    let m = e.to_string();
    m.contains("did not find expected")
        || m.contains("found character")
        || m.contains("mapping values are not allowed")
}

/// The first line and the text of each YAML document (`---` lines separate them; text
/// before the first `---` that holds only comments is no document).
fn document_starts(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1usize, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            docs.push((i + 2, String::new()));
        } else if let Some((_, doc)) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    if docs.len() > 1 && blank(&docs[0].1) {
        docs.remove(0);
    }
    docs
}

fn blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "..."
    })
}

fn yaml_error(file: &Path, e: &serde_norway::Error) -> LintError {
    let mut message = e.to_string();
    // serde_norway appends " at line L column C": the location is given separately.
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    if let Some(hint) = suggestion(&message) {
        message.push_str(&format!(" (did you mean `{hint}`?)"));
    }
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    LintError {
        file: file.to_path_buf(),
        line,
        column,
        message,
    }
}

/// For "unknown field `x`, expected one of `a`, `b`" (and variants): the closest known.
fn suggestion(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
        .or_else(|| {
            let i = message
                .find("unknown field `")
                .or(message.find("unknown variant `"))?;
            let m = &message[i..];
            m.strip_prefix("unknown field `")
                .or_else(|| m.strip_prefix("unknown variant `"))
        })?;
    let (given, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    candidates
        .into_iter()
        .map(|c| (edit_distance(&given.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min()
        .map(|(_, c)| c.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Where `needle` is written for the `nth` time (from 0) in the document starting at
/// `from_line`; the document's start when it is not found.
fn locate(text: &str, from_line: usize, needle: &str, nth: usize) -> (usize, usize) {
    let mut seen = 0;
    for (i, line) in text.lines().enumerate().skip(from_line.saturating_sub(1)) {
        if let Some(col) = line.find(needle) {
            if seen == nth {
                return (i + 1, col + 1);
            }
            seen += 1;
        }
    }
    (from_line, 1)
}

/// Where a selector key is written: `key:` starting a line, `key: KEY`, or `KEY:` in a
/// flow mapping.
fn locate_key(text: &str, from_line: usize, key: &str) -> (usize, usize) {
    for (i, line) in text.lines().enumerate().skip(from_line.saturating_sub(1)) {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with(&format!("{key}:")) {
            return (i + 1, indent + 1);
        }
        for pattern in [
            format!("key: {key}"),
            format!("{{{key}:"),
            format!(" {key}:"),
        ] {
            if let Some(col) = line.find(&pattern) {
                let offset = pattern.find(key).unwrap_or(0);
                return (i + 1, col + offset + 1);
            }
        }
    }
    (from_line, 1)
}

/// What the format cannot say: names unique within a policy, keys that exist.
fn check_policy(file: &Path, text: &str, line: usize, p: &Policy, report: &mut LintReport) {
    let at_nth = |needle: &str, nth: usize, message: String| {
        let (line, column) = locate(text, line, needle, nth);
        LintError {
            file: file.to_path_buf(),
            line,
            column,
            message,
        }
    };
    let at = |needle: &str, message: String| at_nth(needle, 0, message);
    if p.name.trim().is_empty() {
        report
            .errors
            .push(at("name:", "the policy's `name` is empty".into()));
    }
    let mut rules: HashMap<&str, usize> = HashMap::new();
    let names = p
        .block
        .iter()
        .map(|r| &r.name)
        .chain(p.mask.iter().map(|r| &r.name))
        .chain(p.require_approval.iter().map(|r| &r.name));
    for name in names {
        if name.trim().is_empty() {
            report
                .errors
                .push(at("name:", "a rule's `name` is empty".into()));
        } else if let Some(n) = rules.get_mut(name.as_str()).map(|n| {
            *n += 1;
            *n
        }) {
            report.errors.push(at_nth(
                &format!("name: {name}"),
                n - 1,
                format!("rule name `{name}` is used twice in policy `{}`", p.name),
            ));
        } else {
            rules.insert(name, 1);
        }
    }
    if let Some(c) = &p.credential {
        if p.mode != Some(super::model::Mode::Enforce) {
            report.errors.push(at(
                "credential:",
                format!(
                    "policy `{}` holds a credential but is not `mode: enforce`: only the \
                     proxy of enforced workloads logs in with it",
                    p.name
                ),
            ));
        }
        if c.user.trim().is_empty() {
            report
                .errors
                .push(at("credential:", "the credential's `user` is empty".into()));
        }
        match (&c.password_file, &c.secret) {
            (Some(_), Some(_)) | (None, None) => report.errors.push(at(
                "credential:",
                "a credential takes exactly one of `password_file` and `secret`".into(),
            )),
            (Some(f), None) if !f.is_absolute() => report.errors.push(at(
                "password_file:",
                format!(
                    "`password_file` must be an absolute path, not {}",
                    f.display()
                ),
            )),
            (None, Some(s)) if s.namespace.is_empty() || s.name.is_empty() || s.key.is_empty() => {
                report.errors.push(at(
                    "secret:",
                    "a credential's `secret` needs a `namespace`, a `name` and a non-empty `key`"
                        .into(),
                ))
            }
            _ => {}
        }
    }
    for r in &p.mask {
        if r.columns.is_empty() && r.detectors.is_empty() && r.patterns.is_empty() {
            report.errors.push(at(
                &format!("name: {}", r.name),
                format!(
                    "mask rule `{}` names no `columns`, no `detectors` and no `patterns`",
                    r.name
                ),
            ));
        }
        for pattern in &r.patterns {
            if let Err(e) = crate::proxy::detect::compile_pattern(pattern) {
                report.errors.push(at(
                    pattern,
                    format!(
                        "mask rule `{}`: pattern {pattern:?} does not compile: {e}",
                        r.name
                    ),
                ));
            }
        }
        if r.keep.is_some() && r.using != Some(super::model::MaskUsing::Partial) {
            report.errors.push(at(
                &format!("name: {}", r.name),
                format!("mask rule `{}` has `keep` without `using: partial`", r.name),
            ));
        }
    }
    let keys = p
        .selector
        .match_labels
        .keys()
        .chain(p.selector.match_expressions.iter().map(|r| &r.key));
    for key in keys {
        if !known_key(key) {
            let (line, column) = locate_key(text, line, key);
            report.warnings.push(LintError {
                file: file.to_path_buf(),
                line,
                column,
                message: format!(
                    "no source sets label `{key}`: the selector {} (known: {}, {}, and the \
                     families {})",
                    "may never match",
                    CONNECTION_KEYS.join(", "),
                    KNOWN_LABELS.join(", "),
                    LABEL_PREFIXES.map(|p| format!("{p}*")).join(", ")
                ),
            });
        }
    }
}
