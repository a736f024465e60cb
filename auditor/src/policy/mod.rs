//! Policies: YAML files in a directory, each selecting sessions by label and saying what
//! is recorded of them and which rules judge their statements.
//!
//! How several matching policies combine (also what `auditor policy explain` shows):
//!
//! 1. The policies whose selectors match a session are ordered most specific first (more
//!    requirements), then by `priority` (higher first), then by name.
//! 2. `mode` and each `record` switch come from the first policy in that order that sets
//!    them; unset everywhere, the mode is `audit` and recording follows the daemon's
//!    `record` configuration. The session's events name the first policy.
//! 3. Every matching policy in `dry-run` or `enforce` mode judges each statement by its
//!    own rules; the strictest outcome wins (block, then hold for approval, then mask),
//!    an enforce-mode policy's before a dry-run one's, and on a tie the earlier policy and
//!    rule. Policies in `audit` mode judge nothing.

pub mod cli;
pub mod explain;
pub mod facts;
pub mod lineage;
pub mod live;
pub mod load;
pub mod model;

use std::{borrow::Cow, collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc};

pub use facts::Facts;
pub use load::{load_dir, load_str, LintError, LintReport};
pub use model::{Mode, Operator, Policy};

use crate::text::Text;

/// A policy as loaded: where it came from and a hash of its text.
#[derive(Debug)]
pub struct LoadedPolicy {
    pub policy: Policy,
    pub file: PathBuf,
    /// Line of the policy's document in its file (1-based).
    pub line: usize,
    /// First 12 hex digits of SHA-256 over the policy as written (its YAML document).
    pub hash: String,
}

/// Every policy of a directory, as one version.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<Arc<LoadedPolicy>>,
    /// Hash over every policy's hash: changes with any policy.
    pub version: String,
}

/// What selectors see of a session: the workload's labels and the connection's.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub db_user: &'a str,
    pub database: &'a str,
    pub application_name: &'a str,
    pub client_addr: Option<IpAddr>,
    pub server_addr: Option<IpAddr>,
    pub server_port: u16,
}

/// Selector keys the connection supplies (the workload's labels supply the rest).
pub const CONNECTION_KEYS: [&str; 6] = [
    "db.user",
    "db.name",
    "db.application_name",
    "client.addr",
    "server.addr",
    "server.port",
];

impl<'a> Subject<'a> {
    /// The value of a selector key; None when the session has no such label.
    pub fn value(&self, key: &str) -> Option<Cow<'a, str>> {
        let nonempty = |s: &'a str| (!s.is_empty()).then_some(Cow::Borrowed(s));
        match key {
            "db.user" => nonempty(self.db_user),
            "db.name" => nonempty(self.database),
            "db.application_name" => nonempty(self.application_name),
            "client.addr" => self.client_addr.map(|a| Cow::Owned(a.to_string())),
            "server.addr" => self.server_addr.map(|a| Cow::Owned(a.to_string())),
            "server.port" => {
                (self.server_port != 0).then(|| Cow::Owned(self.server_port.to_string()))
            }
            _ => self.labels.get(key).map(|v| Cow::Borrowed(v.as_str())),
        }
    }

    fn addr(&self, key: &str) -> Option<IpAddr> {
        match key {
            "client.addr" => self.client_addr,
            "server.addr" => self.server_addr,
            _ => None,
        }
    }
}

impl model::Requirement {
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        let value = s.value(&self.key);
        let listed = || -> bool {
            let Some(v) = &value else { return false };
            if model::ADDRESS_KEYS.contains(&self.key.as_str()) {
                s.addr(&self.key)
                    .is_some_and(|ip| self.nets.iter().any(|n| n.contains(ip)))
            } else {
                self.values.iter().any(|x| x == v)
            }
        };
        match self.operator {
            Operator::In => listed(),
            // As in Kubernetes: a session without the label is not in the set.
            Operator::NotIn => !listed(),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl model::Selector {
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| s.value(k).is_some_and(|x| x == v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(s))
    }
}

/// What the policies make of one session: resolved once per session (again when the set
/// is reloaded or the session's workload changes).
#[derive(Debug, Clone)]
pub struct Applied {
    /// The matching policies, in the order they combine.
    pub policies: Vec<Arc<LoadedPolicy>>,
    pub mode: Mode,
    pub raw_statements: bool,
    pub raw_params: bool,
    /// The first matching policy's name (empty when none matched).
    pub name: Text,
    /// Hash over the matching policies' hashes.
    pub version: Text,
    /// Whether any matching policy judges statements (dry-run or enforce, with rules).
    pub judges: bool,
    /// The login the proxy makes for the session (the first matching policy's that has
    /// one), with that policy's name; only when the session is enforced.
    pub credential: Option<(Text, model::Credential)>,
}

/// The daemon's recording defaults, for sessions no policy says anything about.
#[derive(Debug, Clone, Copy, Default)]
pub struct Defaults {
    pub raw_statements: bool,
    pub raw_params: bool,
}

/// The order matching policies combine in: most specific selector first, then priority,
/// then name.
fn combine_order(a: &Arc<LoadedPolicy>, b: &Arc<LoadedPolicy>) -> std::cmp::Ordering {
    b.policy
        .selector
        .specificity()
        .cmp(&a.policy.selector.specificity())
        .then(b.policy.priority.cmp(&a.policy.priority))
        .then(a.policy.name.cmp(&b.policy.name))
}

impl PolicySet {
    pub fn new(mut policies: Vec<Arc<LoadedPolicy>>) -> PolicySet {
        policies.sort_by(|a, b| a.policy.name.cmp(&b.policy.name));
        let version = short_hash(policies.iter().map(|p| p.hash.as_str()));
        PolicySet { policies, version }
    }

    /// Whether a workload with these labels may be under an `enforce` policy, judged
    /// before any of its connections exists: keys that only a connection or a process
    /// supplies (`db.*`, `client.addr`, `server.*`, `process.*`) are unknown, and a
    /// requirement on an unknown key may hold. True if some value of the unknown keys makes
    /// the combined mode `enforce`: its connections then go to the proxy, which resolves
    /// the policies exactly once the session is known (and only relays, recording, those
    /// that turn out not to be enforced).
    pub fn may_enforce(&self, labels: &BTreeMap<String, String>) -> bool {
        let unknown = |k: &str| CONNECTION_KEYS.contains(&k) || k.starts_with("process.");
        let subject = Subject {
            labels,
            db_user: "",
            database: "",
            application_name: "",
            client_addr: None,
            server_addr: None,
            server_port: 0,
        };
        let mut ordered: Vec<&Arc<LoadedPolicy>> = self.policies.iter().collect();
        ordered.sort_by(|a, b| combine_order(a, b));
        for p in ordered {
            let Some(mode) = p.policy.mode else { continue };
            let sel = &p.policy.selector;
            let mut certain = true;
            let mut possible = true;
            for (k, v) in &sel.match_labels {
                if unknown(k) {
                    certain = false;
                } else if subject.value(k).is_none_or(|x| x != v.as_str()) {
                    possible = false;
                }
            }
            for r in &sel.match_expressions {
                if unknown(&r.key) {
                    certain = false;
                } else if !r.matches(&subject) {
                    possible = false;
                }
            }
            if !possible {
                continue;
            }
            if mode == Mode::Enforce {
                return true;
            }
            if certain {
                // The first policy that surely matches and sets a mode decides it.
                return false;
            }
        }
        false
    }

    /// The Kubernetes Secrets (namespace, name) that credentials name.
    pub fn secrets(&self) -> std::collections::BTreeSet<(String, String)> {
        self.policies
            .iter()
            .filter_map(|p| p.policy.credential.as_ref()?.secret.as_ref())
            .map(|r| (r.namespace.clone(), r.name.clone()))
            .collect()
    }

    /// Whether any policy enforces at all.
    pub fn any_enforce(&self) -> bool {
        self.policies
            .iter()
            .any(|p| p.policy.mode == Some(Mode::Enforce))
    }

    /// The matching policies, in the order they combine.
    pub fn matching(&self, s: &Subject<'_>) -> Vec<Arc<LoadedPolicy>> {
        let mut m: Vec<Arc<LoadedPolicy>> = self
            .policies
            .iter()
            .filter(|p| p.policy.selector.matches(s))
            .cloned()
            .collect();
        m.sort_by(combine_order);
        m
    }

    pub fn resolve(&self, s: &Subject<'_>, defaults: Defaults) -> Applied {
        let policies = self.matching(s);
        let first =
            |f: &dyn Fn(&Policy) -> Option<bool>| policies.iter().find_map(|p| f(&p.policy));
        let mode = policies
            .iter()
            .find_map(|p| p.policy.mode)
            .unwrap_or(Mode::Audit);
        let raw_statements = first(&|p| p.record.as_ref().and_then(|r| r.raw_statements))
            .unwrap_or(defaults.raw_statements);
        let raw_params =
            first(&|p| p.record.as_ref().and_then(|r| r.raw_params)).unwrap_or(defaults.raw_params);
        let judges = policies
            .iter()
            .any(|p| p.policy.mode.is_some_and(|m| m != Mode::Audit) && p.policy.has_rules());
        let credential = if mode == Mode::Enforce {
            policies.iter().find_map(|p| {
                p.policy
                    .credential
                    .clone()
                    .map(|c| (Text::from(p.policy.name.as_str()), c))
            })
        } else {
            None
        };
        Applied {
            name: policies
                .first()
                .map(|p| Text::lasting(&p.policy.name))
                .unwrap_or_default(),
            version: if policies.is_empty() {
                Text::default()
            } else {
                Text::lasting(&short_hash(policies.iter().map(|p| p.hash.as_str())))
            },
            policies,
            mode,
            raw_statements,
            raw_params,
            judges,
            credential,
        }
    }
}

/// The JSON Schema of a policy file (committed as policies/schema.json).
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(Policy);
    serde_json::to_string_pretty(&schema).expect("a schema serialises")
}

pub(crate) fn short_hash<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..6])
}

/// What a rule does to a statement, strictest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Mask,
    Hold,
    Block,
}

impl Action {
    /// The decision's name in an event where nothing was enforced.
    pub fn would(self) -> &'static str {
        match self {
            Action::Mask => "would_mask",
            Action::Hold => "would_hold",
            Action::Block => "would_block",
        }
    }
}

/// The verdict on a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// From an enforce-mode policy.
    pub enforce: bool,
    pub policy: String,
    pub rule: String,
    /// For masks: the columns (`table.column`) the statement would have masked.
    pub columns: Vec<String>,
    /// For blocks: what the client is told.
    pub message: Option<String>,
}

/// The name of the verdict on statements the parser cannot read.
pub const UNPARSABLE_RULE: &str = "unparsable";
/// The name of the verdict on function calls by the FunctionCall message.
pub const FUNCTION_CALL_RULE: &str = "opaque";

/// A statement as rules see it.
pub struct Statement<'a> {
    /// The text as sent.
    pub sql: &'a str,
    /// None: the parser could not read it.
    pub facts: Option<&'a Facts>,
    /// Part of a query string holding several statements.
    pub multi: bool,
}

impl model::When {
    /// Whether the statement is one this condition is about.
    pub fn matches(&self, st: &Statement<'_>) -> bool {
        if let Some(p) = &self.pattern {
            if !p.regex.is_match(st.sql) {
                return false;
            }
        }
        let needs_tree = !self.commands.is_empty()
            || !self.tables.is_empty()
            || !self.functions.is_empty()
            || self.ddl
            || self.without_where
            || self.copy_program
            || self.opaque;
        if self.multi_statement && !(st.multi || st.facts.is_some_and(|f| f.statements > 1)) {
            return false;
        }
        if !needs_tree {
            return true;
        }
        let Some(f) = st.facts else {
            return false; // judged by on_unparsable
        };
        (self.commands.is_empty()
            || self
                .commands
                .iter()
                .any(|c| f.commands.iter().any(|x| x.eq_ignore_ascii_case(c.trim()))))
            && (self.tables.is_empty()
                || self
                    .tables
                    .iter()
                    .any(|p| f.tables.iter().any(|t| p.matches(&t.schema, &t.name))))
            && (self.functions.is_empty()
                || self
                    .functions
                    .iter()
                    .any(|p| f.functions.iter().any(|t| p.matches(&t.schema, &t.name))))
            && (!self.ddl || f.ddl)
            && (!self.without_where || f.without_where)
            && (!self.copy_program || f.copy_program)
            && (!self.opaque || f.opaque)
    }
}

impl model::MaskRule {
    /// The masked columns a statement reads, as far as its parse tree shows: a column of a
    /// masked table named (qualified or not) or taken by `*`. The proxy masks what is
    /// returned; this is what a dry run can tell without the rows.
    pub fn columns_read(&self, f: &Facts) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.columns {
            let Some(table) = f
                .tables
                .iter()
                .find(|t| c.table.matches(&t.schema, &t.name))
            else {
                continue;
            };
            let read = f.columns.iter().any(|u| match &u.column {
                None => true,
                Some(col) => col == &c.column,
            });
            let column = format!("{}.{}", table.name, c.column);
            if read && !out.contains(&column) {
                out.push(column);
            }
        }
        out
    }
}

impl Applied {
    /// The approval rule a hold decision names.
    pub fn approval_rule(&self, policy: &str, rule: &str) -> Option<&model::ApprovalRule> {
        self.policies
            .iter()
            .filter(|p| p.policy.name == policy)
            .flat_map(|p| p.policy.require_approval.iter())
            .find(|r| r.name == rule)
    }

    /// The verdict of the matching policies' rules on a statement; None when it passes.
    pub fn judge(&self, st: &Statement<'_>) -> Option<Decision> {
        if !self.judges {
            return None;
        }
        let mut best: Option<Decision> = None;
        let mut offer = |d: Decision| {
            let better = match &best {
                None => true,
                Some(b) => (d.enforce, d.action) > (b.enforce, b.action),
            };
            if better {
                best = Some(d);
            }
        };
        for p in &self.policies {
            let policy = &p.policy;
            let Some(mode @ (Mode::DryRun | Mode::Enforce)) = policy.mode else {
                continue;
            };
            if !policy.has_rules() {
                continue;
            }
            let enforce = mode == Mode::Enforce;
            let decision = |action, rule: &str| Decision {
                action,
                enforce,
                policy: policy.name.clone(),
                rule: rule.to_string(),
                columns: Vec::new(),
                message: None,
            };
            if st.facts.is_none() && policy.on_unparsable != Some(model::Unparsable::Allow) {
                offer(Decision {
                    message: Some("the statement cannot be parsed, so it cannot be judged".into()),
                    ..decision(Action::Block, UNPARSABLE_RULE)
                });
                continue;
            }
            for r in &policy.block {
                if r.when.matches(st) {
                    offer(Decision {
                        message: r.message.clone(),
                        ..decision(Action::Block, &r.name)
                    });
                }
            }
            for r in &policy.require_approval {
                if r.when.matches(st) {
                    offer(decision(Action::Hold, &r.name));
                }
            }
            if let Some(f) = st.facts {
                for r in &policy.mask {
                    let columns = r.columns_read(f);
                    if !columns.is_empty() {
                        offer(Decision {
                            columns,
                            ..decision(Action::Mask, &r.name)
                        });
                    }
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests;
