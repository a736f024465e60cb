//! Telling policy authors what their policies do: which policies match a session and why,
//! where each setting comes from, and the verdict on a statement with the rule behind it.
//! Shared by `auditor policy test` and `auditor policy explain`.

use std::fmt::Write as _;

use super::{
    model::{Operator, Requirement},
    Applied, Decision, Defaults, Facts, PolicySet, Statement, Subject,
};

fn requirement_text(r: &Requirement) -> String {
    match r.operator {
        Operator::In | Operator::NotIn => {
            format!(
                "{} {} ({})",
                r.key,
                r.operator.as_str(),
                r.values.join(", ")
            )
        }
        Operator::Exists | Operator::DoesNotExist => format!("{} {}", r.key, r.operator.as_str()),
    }
}

/// Why a selector matched: each requirement with the value the session has.
fn why(p: &super::LoadedPolicy, s: &Subject<'_>) -> String {
    let sel = &p.policy.selector;
    if sel.specificity() == 0 {
        return "empty selector (every session)".into();
    }
    let have = |k: &str| {
        s.value(k)
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| "unset".into())
    };
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.extend(
        sel.match_expressions
            .iter()
            .map(|r| format!("{} [has {}]", requirement_text(r), have(&r.key))),
    );
    parts.join("; ")
}

/// The matching policies and the settings they give a session.
pub fn session_report(set: &PolicySet, s: &Subject<'_>, defaults: Defaults) -> (Applied, String) {
    let applied = set.resolve(s, defaults);
    let mut out = String::new();
    if applied.policies.is_empty() {
        let _ = writeln!(
            out,
            "No policy matches: audit mode, recording as the daemon's `record` configuration says."
        );
    } else {
        let _ = writeln!(out, "Matching policies, in the order they combine:");
        for (i, p) in applied.policies.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {}. {}  ({}:{}, version {}; {} requirement(s), priority {}, mode {})\n     matched by: {}",
                i + 1,
                p.policy.name,
                p.file.display(),
                p.line,
                p.hash,
                p.policy.selector.specificity(),
                p.policy.priority,
                p.policy.mode.map(|m| m.as_str()).unwrap_or("unset"),
                why(p, s),
            );
        }
    }
    let from = |f: &dyn Fn(&super::Policy) -> bool| {
        applied
            .policies
            .iter()
            .find(|p| f(&p.policy))
            .map(|p| format!("from {}", p.policy.name))
            .unwrap_or_else(|| "default".into())
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(
        out,
        "Session: mode {} ({}); raw statements: {} ({}); raw parameters: {} ({})",
        applied.mode.as_str(),
        from(&|p| p.mode.is_some()),
        yes(applied.raw_statements),
        from(&|p| p
            .record
            .as_ref()
            .is_some_and(|r| r.raw_statements.is_some())),
        yes(applied.raw_params),
        from(&|p| p.record.as_ref().is_some_and(|r| r.raw_params.is_some())),
    );
    if !applied.policies.is_empty() {
        let _ = writeln!(
            out,
            "Events carry: policy={} policy_version={}",
            applied.name, applied.version
        );
    }
    (applied, out)
}

/// The verdict on `sql`, as a line.
pub fn decision_line(decision: Option<&Decision>) -> String {
    match decision {
        None => "decision: allow (no rule applies)".into(),
        Some(d) => {
            let mut line = format!(
                "decision: {} by rule {}/{} ({})",
                match d.action {
                    super::Action::Block => "block",
                    super::Action::Hold => "hold for approval",
                    super::Action::Mask => "mask",
                },
                d.policy,
                d.rule,
                if d.enforce {
                    "enforce: the proxy acts on it; passive capture records it as would_*"
                } else {
                    "dry-run: recorded as would_*, not acted on"
                }
            );
            if !d.columns.is_empty() {
                let _ = write!(line, "; columns {}", d.columns.join(", "));
            }
            if let Some(m) = &d.message {
                let _ = write!(line, "; message: {m}");
            }
            line
        }
    }
}

/// Judges a query string as the capture would: each statement on its own, `multi` when
/// there are several.
pub fn judge_text(applied: &Applied, sql: &str) -> Vec<(String, Option<Decision>)> {
    let statements = crate::sql::split_statements(sql);
    let multi = statements.len() > 1;
    statements
        .into_iter()
        .map(|one| {
            let facts = Facts::of(&one);
            let d = applied.judge(&Statement {
                sql: &one,
                facts: facts.as_ref(),
                multi,
            });
            (one, d)
        })
        .collect()
}
