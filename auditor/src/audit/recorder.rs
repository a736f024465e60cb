//! Audit events from conversation outcomes: what is recorded of a statement (normalised or
//! raw text, parameters as keyed hashes or raw), its result, and the flags that say what
//! is missing. Pure: identity, ids and times are added by the driver.

use std::sync::Arc;

use crate::{
    audit::event::{AuditEvent, EventKind, Flag, Flags, Params},
    audit::keyed::KeyedHash,
    conversation::{
        BoundParams, FunctionResult, Outcome, Protocol, StatementOutcome, StatementResult,
        StatementText,
    },
    pg::backend::command_of_tag,
    sql::{redact_literals, Analysis},
    text::Text,
};

/// How statements and parameters are recorded.
#[derive(Clone)]
pub struct RecordingPolicy {
    /// Record statement text as sent (literals included) instead of normalised.
    pub raw_statements: bool,
    /// Record parameter values as sent instead of keyed hashes.
    pub raw_params: bool,
    /// HMAC-SHA256 keyed with the installation's parameter key: equal values hash equal
    /// within one installation.
    param_mac: KeyedHash,
}

impl RecordingPolicy {
    pub fn new(raw_statements: bool, raw_params: bool, param_key: &[u8]) -> Self {
        RecordingPolicy {
            raw_statements,
            raw_params,
            param_mac: KeyedHash::new(param_key),
        }
    }
}

impl Default for RecordingPolicy {
    fn default() -> Self {
        RecordingPolicy::new(false, false, b"auditor-default-key")
    }
}

/// An event and the time it is about (the driver turns it into a timestamp).
#[derive(Debug)]
pub struct Draft {
    pub ts_ns: i128,
    /// Boxed: a draft moves several times on its way (held for its ReadyForQuery, put
    /// in order, finished) and the event is about 1 KB; the box moves as a pointer.
    pub event: Box<AuditEvent>,
    /// What a statement's event was made from: the event holds it as the recorder's
    /// policy renders it; a session's policy may render it otherwise ([`render`]) and
    /// judge it.
    pub source: Source,
}

impl Draft {
    pub fn new(ts_ns: i128, event: AuditEvent) -> Draft {
        Draft {
            ts_ns,
            event: boxed(event),
            source: Source::default(),
        }
    }
}

/// Boxes of events this thread made, kept for its next drafts when the sink thread sends
/// their batch back ([`recycle`]): every statement would otherwise allocate and free an
/// event's worth of memory (about 1 KB, freed a batch at a time, past the allocator's fast
/// paths). At most this many are kept (about 1.6 MB: a burst's batch of a few thousand
/// events).
const SPARE_BOXES: usize = 2048;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Box<std::mem::MaybeUninit<AuditEvent>>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// One of this thread's spare boxes, if it has any.
fn spare_box() -> Option<Box<std::mem::MaybeUninit<AuditEvent>>> {
    SPARE
        .try_with(|s| {
            let mut s = s.try_borrow_mut().ok()?;
            let b = s.pop();
            // The next one is written at the next event: its lines, which the sink
            // thread read last, are taken for writing now (see `cache`).
            if let Some(next) = s.last() {
                crate::cache::prefetch_bytes(
                    next.as_ptr().cast(),
                    std::mem::size_of::<AuditEvent>(),
                    true,
                );
            }
            b
        })
        .ok()
        .flatten()
}

/// `ev` in a box, one of this thread's spare ones if it has any.
pub fn boxed(ev: AuditEvent) -> Box<AuditEvent> {
    match spare_box() {
        Some(b) => Box::write(b, ev),
        None => Box::new(ev),
    }
}

/// An empty event of `kind` in a box, written where it lies (an event built first and
/// then boxed is copied: about 800 bytes per statement).
fn boxed_of_kind(kind: EventKind) -> Box<AuditEvent> {
    // The box first, then the event made into it (one path: the compiler writes the
    // event where it goes).
    let mut b = spare_box().unwrap_or_else(Box::new_uninit);
    b.write(AuditEvent::of_kind(kind));
    // SAFETY: written just above.
    unsafe { b.assume_init() }
}

/// Drops the event in `b`, the box kept as a spare of this thread.
pub fn recycle(b: Box<AuditEvent>) {
    let raw = Box::into_raw(b);
    // SAFETY: `raw` came from a Box of an initialized event, dropped once here; the
    // allocation is then owned again as a box of uninitialized memory of the same layout.
    let spare = unsafe {
        std::ptr::drop_in_place(raw);
        Box::from_raw(raw.cast::<std::mem::MaybeUninit<AuditEvent>>())
    };
    keep_spare(spare);
}

fn keep_spare(spare: Box<std::mem::MaybeUninit<AuditEvent>>) {
    let _ = SPARE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < SPARE_BOXES {
                s.push(spare);
            }
        }
    });
}

/// A statement as it was sent: text, its analysis, parameters.
#[derive(Debug, Default)]
pub struct Source {
    pub sql: Option<Arc<str>>,
    pub analysis: Option<Arc<Analysis>>,
    pub params: Option<BoundParams>,
    /// One of several statements of a simple query string.
    pub multi: bool,
    /// A FunctionCall message: what it runs is not SQL.
    pub function_call: bool,
    /// For one of several statements of a simple query: the whole string.
    pub whole: Option<Arc<str>>,
    /// A note of the proxy on a held statement (approval events).
    pub note: Option<Box<crate::approvals::Note>>,
}

/// Renders a statement's text and parameters into its event as a policy says: raw, or
/// normalised text and keyed hashes.
pub fn render(
    ev: &mut AuditEvent,
    source: &Source,
    policy: &RecordingPolicy,
    raw_statements: bool,
    raw_params: bool,
) {
    if let (Some(sql), Some(analysis)) = (&source.sql, &source.analysis) {
        apply_text(ev, sql, analysis, raw_statements);
    }
    if let Some(p) = &source.params {
        ev.params = policy.params_of(p, raw_params);
    }
}

pub fn kind_event(kind: EventKind) -> AuditEvent {
    AuditEvent::of_kind(kind)
}

/// Commands that come from a tag often (transaction control, mostly): no allocation.
const TAG_COMMANDS: &[&str] = &[
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "START TRANSACTION",
    "SAVEPOINT",
    "RELEASE",
    "PREPARE TRANSACTION",
    "COMMIT PREPARED",
    "ROLLBACK PREPARED",
    "SET",
    "RESET",
    "SHOW",
    "DISCARD ALL",
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "COPY",
    "FETCH",
    "MOVE",
];

#[derive(Clone, Default)]
pub struct Recorder {
    pub policy: RecordingPolicy,
}

impl Recorder {
    pub fn new(policy: RecordingPolicy) -> Self {
        Recorder { policy }
    }

    /// The event of an outcome, `flags` (what the driver knows: gap_before, mid_stream)
    /// taken into it. `SessionStarted` is the driver's to record: None.
    pub fn record(&self, outcome: Outcome, flags: &mut Flags) -> Option<Draft> {
        match outcome {
            Outcome::SessionStarted { .. } => None,
            Outcome::Statement(s) => Some(self.statement(s, flags)),
            Outcome::FunctionCall {
                oid,
                result,
                started_ns,
                ended_ns,
            } => {
                let mut ev = kind_event(EventKind::Statement);
                ev.protocol = Text::Static("function_call");
                ev.command = Text::Static("FUNCTION CALL");
                ev.statement = format!("(function call, oid {oid})").into();
                ev.flags |= std::mem::take(flags);
                match result {
                    FunctionResult::Returned => {}
                    FunctionResult::Failed(e) => {
                        ev.error_code = e.code;
                        ev.error_message = e.message;
                    }
                    FunctionResult::Unanswered(StatementResult::ResponseLost) => {
                        ev.flags.insert(Flag::ResponseLost)
                    }
                    FunctionResult::Unanswered(_) => ev.flags.insert(Flag::NoResponse),
                }
                ev.duration_us = duration_us(started_ns, ended_ns);
                let mut d = Draft::new(started_ns, ev);
                d.source.function_call = true;
                Some(d)
            }
        }
    }

    fn statement(&self, mut s: StatementOutcome, flags: &mut Flags) -> Draft {
        let mut ev = boxed_of_kind(EventKind::Statement);
        let mut source = Source {
            multi: s.multi,
            whole: s.whole.take(),
            ..Source::default()
        };
        ev.protocol = Text::Static(match s.protocol {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Unknown => "",
        });
        // Taken apart: its text and analysis move to the source rather than be counted
        // again.
        let from_server = matches!(s.text, StatementText::FromServer { .. });
        match std::mem::replace(&mut s.text, StatementText::Lost) {
            StatementText::Lost => ev.flags.insert(Flag::RequestLost),
            StatementText::Known { sql, analysis }
            | StatementText::FromServer { sql, analysis } => {
                if from_server {
                    ev.flags.insert(Flag::TextFromServer);
                }
                apply_text(&mut ev, &sql, &analysis, self.policy.raw_statements);
                source.sql = Some(sql);
                source.analysis = Some(analysis);
            }
            StatementText::PreparedBeforeCapture => {
                // A statement refused before it ran, of which nothing was seen, is not
                // "prepared before capture": nothing says it ever existed.
                let refused_unseen = matches!(
                    s.result,
                    StatementResult::Failed {
                        before_execute: true,
                        ..
                    }
                );
                if !refused_unseen {
                    ev.flags.insert(Flag::PreparedBeforeCapture);
                }
            }
            StatementText::Unsplit { whole } => {
                ev.flags.insert(Flag::SplitMismatch);
                ev.statement = redact_literals(&whole).into();
            }
        }
        ev.flags |= std::mem::take(flags);
        if let Some(size) = s.cut {
            ev.flags.insert(Flag::Truncated);
            ev.message_bytes = u64::from(size);
        }
        if s.protocol == Protocol::Extended {
            ev.prepared_name = s.prepared_name;
            ev.params = match &s.params {
                Some(p) => self.policy.params_of(p, self.policy.raw_params),
                None => Params::default(),
            };
            source.params = s.params.take();
        }
        match s.result {
            StatementResult::Completed { tag, rows } => {
                // The tag names the command only where the text did not (or said no more
                // than TRANSACTION); most statements skip it.
                if ev.command.is_empty() || &*ev.command == "TRANSACTION" {
                    let cmd = command_of_tag(&tag);
                    if !cmd.is_empty() {
                        ev.command = match TAG_COMMANDS.iter().find(|c| **c == cmd) {
                            Some(c) => Text::Static(c),
                            None => Text::from(&*cmd),
                        };
                    }
                }
                ev.rows = rows;
            }
            StatementResult::Failed {
                error,
                before_execute,
            } => {
                ev.error_code = error.code;
                ev.error_message = error.message;
                if before_execute {
                    ev.flags.insert(Flag::FailedBeforeExecute);
                }
            }
            StatementResult::Suspended { rows } => {
                ev.flags.insert(Flag::PortalSuspended);
                ev.rows = Some(rows);
            }
            StatementResult::NoResponse => ev.flags.insert(Flag::NoResponse),
            StatementResult::ResponseLost => ev.flags.insert(Flag::ResponseLost),
        }
        ev.duration_us = duration_us(s.started_ns, s.ended_ns);
        Draft {
            ts_ns: s.started_ns,
            event: ev,
            source,
        }
    }
}

impl RecordingPolicy {
    /// Parameters as recorded: raw (binary ones as `\\x` hex), or keyed hashes.
    pub fn params_of(&self, params: &BoundParams, raw: bool) -> Params {
        let formats = params.formats();
        let values = params.values();
        /// A value's text, on the stack when it is a hash.
        enum One {
            Hash([u8; 21]),
            Owned(String),
            Static(&'static str),
        }
        impl AsRef<str> for One {
            fn as_ref(&self) -> &str {
                match self {
                    // SAFETY: a hash's text is "hmac:" and hex digits (ASCII), written
                    // below and nowhere else: no walk to validate it per parameter.
                    One::Hash(b) => unsafe { std::str::from_utf8_unchecked(b) },
                    One::Owned(s) => s,
                    One::Static(s) => s,
                }
            }
        }
        let one = |i: usize, v: Option<&[u8]>| -> One {
            let Some(v) = v else {
                return One::Static("NULL");
            };
            if raw {
                One::Owned(if formats.format_of(i) == 1 {
                    format!("\\x{}", hex::encode(v))
                } else {
                    String::from_utf8_lossy(v).into_owned()
                })
            } else {
                let mut text = *b"hmac:0000000000000000";
                text[5..].copy_from_slice(&self.param_mac.short_hex(v));
                One::Hash(text)
            }
        };
        Params::of_len(
            values.len(),
            values.iter().enumerate().map(|(i, v)| one(i, v)),
        )
    }
}

/// A statement's text on its event: as it came (`raw`) or normalised, with what its
/// analysis says.
pub fn apply_text(ev: &mut AuditEvent, sql: &Arc<str>, analysis: &Analysis, raw: bool) {
    ev.statement = if raw {
        Text::Shared(sql.clone())
    } else {
        analysis.normalized.clone()
    };
    ev.command = analysis.command.clone();
    ev.tables = analysis.tables.clone();
    ev.fingerprint = analysis.fingerprint.clone();
    if analysis.unparsed {
        ev.flags.insert(Flag::Unparsed);
    }
}

fn duration_us(start: i128, end: i128) -> u64 {
    ((end - start).max(0) / 1000) as u64
}
