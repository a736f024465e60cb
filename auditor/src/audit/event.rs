//! The audit event: its kinds, flags, time stamp and fields, declared once (the layouts
//! follow from the declaration, see `schema.rs`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use super::schema::Labels;
use super::schema::{
    audit_event, json_str, json_strs, put_str, put_strs, split_columns, ColumnStyle, Field,
    RecordError, RecordReader,
};
use crate::text::Text;

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EventKind {
    /// A connection's startup: who connected, as which database user.
    SessionStart,
    /// A statement (or function call) and its outcome.
    #[default]
    Statement,
    /// The connection's end.
    SessionEnd,
    /// Bytes that were not captured: statements may be missing here.
    Gap,
    /// A policy reload was refused (the previous set stays in force): what was wrong.
    PolicyError,
    /// The proxy held a statement for approval (`approval_id` names the request).
    ApprovalRequested,
    /// An approver let the held statement run (`approver`).
    ApprovalGranted,
    /// An approver refused it (`approver`; the reason in `error_message`).
    ApprovalDenied,
    /// No decision within the rule's timeout: refused.
    ApprovalExpired,
    /// The client went away, cancelled, or the daemon stopped before a decision.
    ApprovalWithdrawn,
    /// An approver opened a time-boxed grant (`approval_id` is the grant's id).
    GrantCreated,
    /// A grant was ended before its time (`approver`).
    GrantRevoked,
    /// A grant's time ran out.
    GrantExpired,
}

impl EventKind {
    pub const ALL: [EventKind; 13] = [
        EventKind::SessionStart,
        EventKind::Statement,
        EventKind::SessionEnd,
        EventKind::Gap,
        EventKind::PolicyError,
        EventKind::ApprovalRequested,
        EventKind::ApprovalGranted,
        EventKind::ApprovalDenied,
        EventKind::ApprovalExpired,
        EventKind::ApprovalWithdrawn,
        EventKind::GrantCreated,
        EventKind::GrantRevoked,
        EventKind::GrantExpired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionStart => "session_start",
            EventKind::Statement => "statement",
            EventKind::SessionEnd => "session_end",
            EventKind::Gap => "gap",
            EventKind::PolicyError => "policy_error",
            EventKind::ApprovalRequested => "approval_requested",
            EventKind::ApprovalGranted => "approval_granted",
            EventKind::ApprovalDenied => "approval_denied",
            EventKind::ApprovalExpired => "approval_expired",
            EventKind::ApprovalWithdrawn => "approval_withdrawn",
            EventKind::GrantCreated => "grant_created",
            EventKind::GrantRevoked => "grant_revoked",
            EventKind::GrantExpired => "grant_expired",
        }
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        EventKind::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown event kind {name:?}")))
    }
}

impl Field for EventKind {
    // A record keeps the name: one written by a newer version reaches ClickHouse as it is.
    type Ref<'a> = &'a str;
    fn json(&self, out: &mut Vec<u8>) {
        json_str(out, self.as_str());
    }
    fn put(&self, out: &mut Vec<u8>) {
        put_str(out, self.as_str());
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<&'a str, RecordError> {
        r.str()
    }
    fn own(r: &&str) -> Result<Self, RecordError> {
        EventKind::from_name(r).ok_or_else(|| RecordError::Unknown {
            what: "event kind",
            name: r.to_string(),
        })
    }
    fn ch_columns(name: &'static str, lc: bool, style: ColumnStyle) -> Vec<String> {
        String::ch_columns(name, lc, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        r.copy_str(out)
    }
}

macro_rules! flags {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal, )*) => {
        /// Something an event's reader must know about how it was captured.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Flag {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Flag {
            pub const ALL: &[Flag] = &[$(Flag::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( Flag::$variant => $name, )*
                }
            }

            pub fn from_name(name: &str) -> Option<Flag> {
                match name {
                    $( $name => Some(Flag::$variant), )*
                    _ => None,
                }
            }
        }
    };
}

flags! {
    /// The session was joined after it began (it is older than the daemon, or the
    /// stream was resynchronised after a gap): its startup was not seen.
    MidStream = "mid_stream",
    /// Only the beginning of the statement's message was read (it exceeded
    /// `capture.max_message_bytes`, or bytes of it were lost): the text is that beginning,
    /// parameters may be unknown; `message_bytes` is its real size.
    Truncated = "truncated",
    /// Bytes of this session were lost before this event (see the gap event).
    GapBefore = "gap_before",
    /// TLS the daemon could not read (no hooked library): statements are not recorded.
    TlsUnreadable = "tls_unreadable",
    /// GSSAPI encryption, which the daemon cannot read: statements are not recorded.
    GssencUnreadable = "gssenc_unreadable",
    /// A gap in what the server sent.
    ToClient = "to_client",
    /// A gap in what the client sent.
    ToServer = "to_server",
    /// The SQL did not parse: text, tables and command are as far as they could be read.
    Unparsed = "unparsed",
    /// The statement's request was lost in a gap: the server's answer shows that it ran
    /// and how it ended (command, rows, error); its text is unknown.
    RequestLost = "request_lost",
    /// The statement was prepared before capture began: its text is unknown.
    PreparedBeforeCapture = "prepared_before_capture",
    /// The statement was prepared before capture began; its text was read from the
    /// backend process (a Postgres server on this host) when it was bound.
    TextFromServer = "text_from_server",
    /// A multi-statement query whose parts could not be matched to its results.
    SplitMismatch = "split_mismatch",
    /// Refused before it ran (at Parse or Bind): never executed.
    FailedBeforeExecute = "failed_before_execute",
    /// A portal stopped at its row limit (Execute with max_rows).
    PortalSuspended = "portal_suspended",
    /// The server never answered (the connection ended first).
    NoResponse = "no_response",
    /// The session is older than the daemon: its database user and database were read
    /// from its backend's process title.
    MetaFromProcessTitle = "meta_from_process_title",
    /// A CancelRequest connection.
    CancelRequest = "cancel_request",
    /// The connection's close was not seen (it was found gone later).
    CloseNotSeen = "close_not_seen",
    /// Events were dropped because the ClickHouse spool was full.
    ClickhouseSpoolFull = "clickhouse_spool_full",
    /// No daemon captured during this gap's window (`ts` for `duration_us`): the one
    /// before was stopped, killed or crashed; statements run then may be missing.
    CaptureInterrupted = "capture_interrupted",
    /// The process runs in a Kubernetes pod the API server's watch did not show within
    /// `kubernetes.pod_wait_ms`: pod name, namespace and labels are missing.
    PodUnknown = "pod_unknown",
    /// The session's policy enforces, but the session did not go through the proxy (it was
    /// open before its workload became enforced, or enforcement is off): its statements
    /// ran unjudged, and its decisions are what enforcement would have done.
    NotEnforced = "not_enforced",
    /// The local log was found shorter than its head when the daemon started: records
    /// were removed from its end while no daemon ran (`statement` says how many).
    LogTruncated = "log_truncated",
    /// Bytes the server sent were lost (see the gap event before it) while the statement
    /// waited for its answer: whether and how it ran is unknown.
    ResponseLost = "response_lost",
    /// The session's process had exited when the daemon read its /proc entry (or its pid
    /// was another process's by then, which started later): `exe` is empty (pid, name,
    /// uid, cgroup, login uid and session are what the kernel saw).
    ProcessGone = "process_gone",
    /// Events were dropped because writing them to the ClickHouse spool failed (the
    /// daemon's log says why: a full disk, an I/O error): they are in the local log only.
    ClickhouseSpoolWriteFailed = "clickhouse_spool_write_failed",
}

/// A set of flags; written as their names, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u32);

const _: () = assert!(Flag::ALL.len() <= 32);

impl Flags {
    pub const fn empty() -> Flags {
        Flags(0)
    }

    pub fn of(flags: &[Flag]) -> Flags {
        let mut f = Flags::empty();
        for &x in flags {
            f.insert(x);
        }
        f
    }

    pub fn insert(&mut self, f: Flag) {
        self.0 |= 1 << f as u8;
    }

    pub fn remove(&mut self, f: Flag) {
        self.0 &= !(1 << f as u8);
    }

    pub fn contains(self, f: Flag) -> bool {
        self.0 & (1 << f as u8) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn iter(self) -> impl Iterator<Item = Flag> {
        Flag::ALL.iter().copied().filter(move |f| self.contains(*f))
    }

    pub fn names(self) -> impl Iterator<Item = &'static str> {
        self.iter().map(Flag::as_str)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, other: Flags) {
        self.0 |= other.0;
    }
}

impl From<Flag> for Flags {
    fn from(f: Flag) -> Flags {
        Flags::of(&[f])
    }
}

impl PartialEq<[&str]> for Flags {
    fn eq(&self, other: &[&str]) -> bool {
        self.names().eq(other.iter().copied())
    }
}

impl<const N: usize> PartialEq<[&str; N]> for Flags {
    fn eq(&self, other: &[&str; N]) -> bool {
        self.names().eq(other.iter().copied())
    }
}

impl Serialize for Flags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> Deserialize<'de> for Flags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = <Vec<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        let mut flags = Flags::empty();
        for n in names {
            let f = Flag::from_name(&n)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown flag {n:?}")))?;
            flags.insert(f);
        }
        Ok(flags)
    }
}

impl Field for Flags {
    // A record keeps the names: those of a newer version reach ClickHouse as they are.
    type Ref<'a> = Vec<&'a str>;
    fn json(&self, out: &mut Vec<u8>) {
        json_strs(out, self.names());
    }
    fn put(&self, out: &mut Vec<u8>) {
        put_strs(out, self.len(), self.names());
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<Vec<&'a str>, RecordError> {
        r.strs()
    }
    fn own(r: &Vec<&str>) -> Result<Self, RecordError> {
        let mut flags = Flags::empty();
        for n in r {
            flags.insert(Flag::from_name(n).ok_or_else(|| RecordError::Unknown {
                what: "flag",
                name: n.to_string(),
            })?);
        }
        Ok(flags)
    }
    fn ch_columns(name: &'static str, _: bool, style: ColumnStyle) -> Vec<String> {
        <crate::text::List<String>>::ch_columns(name, false, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        r.copy_strs(out)
    }
}

/// A point in time: microseconds since the Unix epoch, UTC. Written as RFC 3339 with
/// microseconds (`2023-11-14T22:13:20.123456Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn from_unix_ns(ns: i128) -> Timestamp {
        match i64::try_from(ns) {
            // Every time until 2262: 64-bit division (128-bit is a call).
            Ok(ns) => Timestamp(ns.div_euclid(1000)),
            Err(_) => Timestamp(
                ns.div_euclid(1000)
                    .clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            ),
        }
    }

    pub fn now() -> Timestamp {
        Timestamp::from_unix_ns(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0),
        )
    }

    pub fn unix_micros(self) -> i64 {
        self.0
    }

    /// RFC 3339 text, UTC, microseconds; years outside 0000-9999 read as the epoch.
    pub fn text(self) -> [u8; 27] {
        ts_text(self.0)
    }

    /// Parses RFC 3339 (the daemon's own form fast, any other through the `time` crate).
    pub fn parse(s: &str) -> Option<Timestamp> {
        fast_ts_micros(s.as_bytes()).map(Timestamp).or_else(|| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| Timestamp((t.unix_timestamp_nanos() / 1000) as i64))
        })
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.text()).unwrap_or("?"))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.text()).unwrap_or_default())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
    }
}

impl Field for Timestamp {
    type Ref<'a> = Timestamp;
    const COMPAT_SPLIT: Option<[&'static str; 2]> = Some(["ts", "ts_us"]);
    fn json(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        out.extend_from_slice(&self.text());
        out.push(b'"');
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_le_bytes());
    }
    fn get<'a>(r: &mut RecordReader<'a>) -> Result<Timestamp, RecordError> {
        Ok(Timestamp(r.u64()? as i64))
    }
    fn own(r: &Timestamp) -> Result<Self, RecordError> {
        Ok(*r)
    }
    fn ch_columns(name: &'static str, _: bool, style: ColumnStyle) -> Vec<String> {
        split_columns::<Self>(
            name,
            "DateTime64(6, 'UTC')",
            ["DateTime('UTC')", "UInt32"],
            style,
        )
    }
    fn ch_copy(
        r: &mut RecordReader<'_>,
        compat: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let micros = r.u64()? as i64;
        if Self::COMPAT_SPLIT.is_some() && compat {
            // DateTime (seconds, UInt32) and the microseconds (UInt32).
            out.extend_from_slice(&(micros.div_euclid(1_000_000) as u32).to_le_bytes());
            out.extend_from_slice(&(micros.rem_euclid(1_000_000) as u32).to_le_bytes());
        } else {
            // DateTime64(6): microseconds, Int64.
            out.extend_from_slice(&micros.to_le_bytes());
        }
        Ok(())
    }
}

/// Where a process sits: the local end of the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub comm: Text,
    pub exe: Text,
    pub uid: u32,
    pub cgroup_id: u64,
    pub cgroup_path: Text,
    pub container_id: Text,
    pub pod_uid: Text,
    pub pod_name: Text,
    pub namespace: Text,
    pub systemd_unit: Text,
    /// The audit login uid and session of the process (`/proc/PID/loginuid`,
    /// `sessionid`): who logged in, even after `sudo -u postgres psql`. None when unset.
    pub loginuid: Option<u32>,
    pub sessionid: Option<u32>,
    /// The process had ended when the daemon looked it up in /proc (or its pid was taken
    /// by a later process, whose start time is not the one the kernel gave): its
    /// executable is unknown (pid, name, uid, cgroup, login uid and session are the
    /// kernel's).
    #[serde(default)]
    pub gone: bool,
}

audit_event! {
    /// Unique and sortable by creation time (a UUIDv7).
    event_id: EventId,
    kind: EventKind [lc],
    /// Start time, RFC 3339 with microseconds, UTC.
    ts: Timestamp,
    /// From the request to the end of its response (statements).
    duration_us: u64,
    host: Text [lc],
    /// Stable for the connection's life.
    session_id: EventId,
    /// Order of the event within its session, from 1.
    seq: u64,
    /// SQL text, literals replaced by $n unless the policy records raw text.
    statement: Text,
    /// SELECT, INSERT, CREATE TABLE, ...
    command: Text [lc],
    /// Relations the statement touches.
    tables: crate::text::List<String>,
    /// Query fingerprint (pg_query).
    fingerprint: Text,
    /// "simple", "extended" or "function_call"; empty for session and gap events.
    protocol: Text [lc],
    /// Bind parameters: keyed hashes ("hmac:…") unless the policy records raw values.
    params: Params,
    /// Rows returned or affected.
    rows: Option<u64>,
    /// SQLSTATE, empty on success.
    error_code: String [lc],
    error_message: String,
    db_user: Text [lc],
    database: Text [lc],
    application_name: Text,
    client_addr: Text,
    client_port: u16,
    server_addr: Text,
    server_port: u16,
    /// Whether the connection is encrypted.
    tls: bool,
    /// The local process on the client end (or the backend when the client is remote).
    pid: u32,
    comm: Text [lc],
    exe: Text,
    uid: u32,
    /// Its cgroup v2 id and path.
    cgroup_id: u64,
    cgroup_path: Text,
    container_id: Text,
    pod_uid: Text,
    pod_name: Text,
    namespace: Text [lc],
    systemd_unit: Text,
    /// The workload, most specific first: `pod:<namespace>/<name>`, `container:<id>`,
    /// `unit:<unit>`, `cgroup:<path>` or `process:<comm>`.
    workload: Text,
    /// Workload labels policies select on.
    labels: Labels,
    /// "ebpf", "ebpf_tls" or "proxy".
    capture: Text [lc],
    flags: Flags,
    /// The backend serving the session, when it runs on this host.
    server_pid: u32,
    /// Name of the prepared statement executed, if any.
    prepared_name: Text,
    /// Bytes missing, for gap events.
    gap_bytes: u64,
    /// For statements, the transaction status the server reported when it was next ready
    /// for a query (the ReadyForQuery ending the statement's Sync or simple Query):
    /// `idle`, `in_transaction` or `failed`. Empty when none came: the connection ended
    /// first, bytes were lost, or the client sent no Sync within a second (or pipelined
    /// more than 64 statements ahead of it).
    tx_status: Text,
    /// For a statement flagged `truncated`: the size in bytes of the client message
    /// (Query, Parse or Bind) of which only the beginning was read.
    message_bytes: u64 [since = 3],
    /// The policy that applied to the session: the first of those whose selectors matched
    /// (see `auditor policy explain`); empty when none did.
    policy: Text [lc, since = 4],
    /// Hash over the texts of the policies that matched: changes when any of them does.
    policy_version: Text [lc, since = 4],
    /// What the rules made of the statement: `would_block`, `would_hold` or `would_mask`
    /// (a dry run, or passive capture of an enforced workload); empty when it passed.
    decision: Text [lc, since = 4],
    /// The rule behind the decision: `policy/rule`.
    decision_rule: Text [lc, since = 4],
    /// For a mask decision: the columns it masks (`table.column` as the rules name them; in
    /// a proxied session that returned rows, the result's masked columns as the proxy
    /// resolved them, `schema.table.column`).
    masked_columns: crate::text::List<String> [since = 4],
    /// The approval request a held statement waited on (its statement event and the
    /// request's `approval_*` events share it).
    approval_id: Text [since = 5],
    /// Who decided the request.
    approver: Text [lc, since = 5],
    /// How many values of each of `masked_columns` (same order) the proxy masked in the
    /// statement's results; empty when it masked nothing (no rows, or not proxied).
    masked_values: crate::text::List<u64> [since = 6],
}

impl AuditEvent {
    pub fn apply_identity(&mut self, id: &ProcessIdentity) {
        self.pid = id.pid;
        self.comm = id.comm.clone();
        self.exe = id.exe.clone();
        self.uid = id.uid;
        self.cgroup_id = id.cgroup_id;
        self.cgroup_path = id.cgroup_path.clone();
        self.container_id = id.container_id.clone();
        self.pod_uid = id.pod_uid.clone();
        self.pod_name = id.pod_name.clone();
        self.namespace = id.namespace.clone();
        self.systemd_unit = id.systemd_unit.clone();
    }
}

/// A UUIDv7: unique and sortable by creation time. The 74 bits after the millisecond
/// timestamp come from a userspace CSPRNG (one OS read per thread, not one per event).
pub fn new_event_id() -> EventId {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    event_id_at_millis(millis)
}

/// A UUIDv7 whose timestamp is the event's own time (Unix nanoseconds; the daemon has it
/// already, where reading the clock again would cost a call per event).
pub fn event_id_at(unix_ns: i128) -> EventId {
    event_id_at_millis((unix_ns.max(0) / 1_000_000) as u64)
}

fn event_id_at_millis(millis: u64) -> EventId {
    use rand::RngCore;
    let mut random = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut random);
    let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    EventId::of_uuid(*uuid.as_bytes())
}

/// An event's id, as text. The daemon's own (UUIDs) are held inline, so making one
/// allocates nothing, and a record holds their 16 bytes, not the text; any other (from a
/// record of another source, or a test) is kept as it came.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct EventId(IdRepr);

/// One representation per text (a UUID's text in its canonical form, lowercase and
/// hyphenated: `Uuid`; any other: `Other`), so the derived equality is the text's. The
/// text alone, not its bytes too: an event is copied between threads a cache line at a
/// time, and the bytes are read back from the text only where a record is written.
#[derive(Clone, PartialEq, Eq, Hash)]
enum IdRepr {
    Uuid([u8; EventId::UUID_TEXT]),
    Other(Box<str>),
}

impl Default for IdRepr {
    fn default() -> Self {
        IdRepr::Other(Box::from(""))
    }
}

/// A compact event id's first byte: its 16 bytes follow, or its text.
const ID_UUID: u8 = 0;
const ID_TEXT: u8 = 1;

/// Where each byte's two hex digits are in a UUID's hyphenated text.
const UUID_DIGITS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// The value of each lowercase hex digit; any other byte has the top bit set.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl EventId {
    const UUID_TEXT: usize = uuid::fmt::Hyphenated::LENGTH;

    fn of_uuid(bytes: [u8; 16]) -> EventId {
        let mut text = [0u8; EventId::UUID_TEXT];
        uuid::Uuid::from_bytes(bytes)
            .hyphenated()
            .encode_lower(&mut text);
        EventId(IdRepr::Uuid(text))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // SAFETY: a UUID's ASCII (`of_uuid`), never changed: always UTF-8. (Not
            // checked again: the sink compares and copies every event's id.)
            IdRepr::Uuid(text) => unsafe { std::str::from_utf8_unchecked(text) },
            IdRepr::Other(s) => s,
        }
    }

    /// The UUID's bytes, when the id is a UUID's canonical text.
    fn uuid_bytes(&self) -> Option<[u8; 16]> {
        match &self.0 {
            IdRepr::Uuid(text) => {
                let mut b = [0u8; 16];
                for (b, &at) in b.iter_mut().zip(&UUID_DIGITS) {
                    *b = (HEX_VALUE[usize::from(text[at])] << 4)
                        | HEX_VALUE[usize::from(text[at + 1])];
                }
                Some(b)
            }
            IdRepr::Other(_) => None,
        }
    }
}

impl From<&str> for EventId {
    fn from(s: &str) -> Self {
        if s.len() == EventId::UUID_TEXT {
            if let Ok(u) = uuid::Uuid::try_parse(s) {
                let id = EventId::of_uuid(*u.as_bytes());
                // Only the canonical text: another spelling of the same UUID (upper case)
                // is another id, kept as it came.
                if id.as_str() == s {
                    return id;
                }
            }
        }
        EventId(IdRepr::Other(Box::from(s)))
    }
}

impl From<String> for EventId {
    fn from(s: String) -> Self {
        EventId::from(s.as_str())
    }
}

impl std::ops::Deref for EventId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for EventId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for EventId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(EventId::from(s.as_ref()))
    }
}

impl Field for EventId {
    /// Owned: a compact id's text is made as it is read (36 bytes, held inline).
    type Ref<'a> = EventId;
    #[inline]
    fn same(&self, other: &Self) -> bool {
        self == other
    }
    fn json(&self, out: &mut Vec<u8>) {
        json_str(out, self.as_str());
    }
    fn put(&self, out: &mut Vec<u8>) {
        self.put_as(out, true)
    }
    /// Compact: a UUID's 16 bytes after `0`, any other id's text after `1`.
    #[inline]
    fn put_as(&self, out: &mut Vec<u8>, compact_ids: bool) {
        match (compact_ids, self.uuid_bytes()) {
            (false, _) => put_str(out, self.as_str()),
            (true, Some(b)) => {
                out.push(ID_UUID);
                out.extend_from_slice(&b);
            }
            (true, None) => {
                out.push(ID_TEXT);
                put_str(out, self.as_str());
            }
        }
    }
    fn get(r: &mut RecordReader<'_>) -> Result<EventId, RecordError> {
        if !r.compact_ids {
            return Ok(EventId::from(r.str()?));
        }
        match r.u8()? {
            ID_UUID => {
                let b: [u8; 16] = r.bytes(16)?.try_into().expect("16 bytes");
                Ok(EventId::of_uuid(b))
            }
            ID_TEXT => Ok(EventId::from(r.str()?)),
            t => Err(RecordError::UnknownTag(t)),
        }
    }
    fn own(r: &EventId) -> Result<Self, RecordError> {
        Ok(r.clone())
    }
    fn ch_columns(name: &'static str, lc: bool, style: ColumnStyle) -> Vec<String> {
        <String as Field>::ch_columns(name, lc, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if !r.compact_ids {
            return r.copy_str(out);
        }
        match r.u8()? {
            ID_UUID => {
                let b: [u8; 16] = r.bytes(16)?.try_into().expect("16 bytes");
                let id = EventId::of_uuid(b);
                super::schema::put_varint(out, id.len() as u64);
                out.extend_from_slice(id.as_bytes());
                Ok(())
            }
            ID_TEXT => r.copy_str(out),
            t => Err(RecordError::UnknownTag(t)),
        }
    }
}

/// A statement's bind parameters as recorded (raw values, or keyed hashes), in one run of
/// bytes: `count u32 | end u32 × count | texts`, value i's text ending at `end[i]`
/// (little-endian, from the start of the texts). Equal lists are equal bytes. A short list
/// (a few keyed hashes: most statements) is held in place, a longer one in one shared
/// allocation.
#[derive(Clone, Default)]
pub struct Params(ParamBytes);

/// Bytes a list held in place may take: three keyed hashes (4 + 3 × 4 + 3 × 21 = 79).
const PARAMS_INLINE: usize = 86;

#[derive(Clone, Default)]
enum ParamBytes {
    #[default]
    Empty,
    Inline {
        len: u8,
        bytes: [u8; PARAMS_INLINE],
    },
    Shared(Arc<[u8]>),
}

impl Params {
    /// The list's bytes (its encoding), None for no list.
    fn bytes(&self) -> Option<&[u8]> {
        match &self.0 {
            ParamBytes::Empty => None,
            ParamBytes::Inline { len, bytes } => Some(&bytes[..usize::from(*len)]),
            ParamBytes::Shared(b) => Some(b),
        }
    }

    /// The bytes the list takes (its encoding: a count, offsets and the texts).
    pub fn encoded_len(&self) -> usize {
        self.bytes().map_or(0, |b| b.len())
    }

    /// The list of `items`, in order.
    pub fn collect<S: AsRef<str>>(items: impl ExactSizeIterator<Item = S>) -> Params {
        Params::of_len(items.len(), items)
    }

    /// The list of the first `n` of `items` (empty texts for any it lacks).
    pub fn of_len<S: AsRef<str>>(n: usize, items: impl Iterator<Item = S>) -> Params {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        if n == 0 {
            return Params(ParamBytes::Empty);
        }
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            buf.extend_from_slice(&(n as u32).to_le_bytes());
            buf.resize(4 + 4 * n, 0);
            let texts = 4 + 4 * n;
            let mut written = 0;
            for (i, item) in items.enumerate().take(n) {
                buf.extend_from_slice(item.as_ref().as_bytes());
                let end = (buf.len() - texts) as u32;
                buf[4 + 4 * i..8 + 4 * i].copy_from_slice(&end.to_le_bytes());
                written += 1;
            }
            // An iterator shorter than it said: the missing values are empty.
            let end = (buf.len() - texts) as u32;
            for i in written..n {
                buf[4 + 4 * i..8 + 4 * i].copy_from_slice(&end.to_le_bytes());
            }
            let params = if buf.len() <= PARAMS_INLINE {
                let mut bytes = [0u8; PARAMS_INLINE];
                bytes[..buf.len()].copy_from_slice(buf);
                Params(ParamBytes::Inline {
                    len: buf.len() as u8,
                    bytes,
                })
            } else {
                Params(ParamBytes::Shared(Arc::from(&buf[..])))
            };
            if buf.capacity() > 1 << 16 {
                *buf = Vec::new();
            }
            params
        })
    }

    pub fn len(&self) -> usize {
        match self.bytes() {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            None => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i`'s text.
    pub fn get(&self, i: usize) -> Option<&str> {
        let b = self.bytes()?;
        let n = self.len();
        if i >= n {
            return None;
        }
        let end_at = |j: usize| {
            u32::from_le_bytes(b[4 + 4 * j..8 + 4 * j].try_into().expect("4 bytes")) as usize
        };
        let texts = &b[4 + 4 * n..];
        let start = if i == 0 { 0 } else { end_at(i - 1) };
        // Made from `&str`s cut at their ends: always UTF-8.
        texts
            .get(start..end_at(i))
            .map(|t| std::str::from_utf8(t).unwrap_or_default())
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + Clone + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_string).collect()
    }
}

impl PartialEq for Params {
    fn eq(&self, other: &Params) -> bool {
        match (&self.0, &other.0) {
            (ParamBytes::Shared(a), ParamBytes::Shared(b)) if Arc::ptr_eq(a, b) => true,
            _ => self.bytes() == other.bytes(),
        }
    }
}

impl Eq for Params {}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> From<Vec<S>> for Params {
    fn from(v: Vec<S>) -> Params {
        Params::collect(v.iter())
    }
}

impl<S: AsRef<str>, const N: usize> From<[S; N]> for Params {
    fn from(v: [S; N]) -> Params {
        Params::collect(v.iter())
    }
}

impl Serialize for Params {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = <Vec<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        Ok(Params::collect(v.iter()))
    }
}

/// A keyed hash's text: `hmac:` and 16 lowercase hex digits (see
/// `RecordingPolicy::params_of`).
const HASH_PREFIX: &[u8; 5] = b"hmac:";
const HASH_TEXT: usize = 21;
/// A compact parameter's first byte: a keyed hash's 8 bytes follow, or a value's text.
const PARAM_HASH: u8 = 0;
const PARAM_TEXT: u8 = 1;

/// The 8 bytes of a keyed hash's text, if `text` is one in its canonical form (so that
/// the text made from them again is the same).
fn keyed_hash_bytes(text: &[u8]) -> Option<[u8; 8]> {
    // Every parameter of every statement written comes here: one pass without branches
    // per digit, any byte that is not a lowercase hex digit seen at the end.
    let text: &[u8; HASH_TEXT] = text.try_into().ok()?;
    if &text[..5] != HASH_PREFIX {
        return None;
    }
    let mut b = [0u8; 8];
    let mut bad = 0u8;
    for (i, b) in b.iter_mut().enumerate() {
        let hi = HEX_VALUE[usize::from(text[5 + 2 * i])];
        let lo = HEX_VALUE[usize::from(text[6 + 2 * i])];
        bad |= hi | lo;
        *b = (hi << 4) | (lo & 0x0f);
    }
    (bad & 0x80 == 0).then_some(b)
}

/// A keyed hash's text from its 8 bytes.
fn keyed_hash_text(b: &[u8]) -> [u8; HASH_TEXT] {
    let mut text = *b"hmac:0000000000000000";
    hex::encode_to_slice(b, &mut text[5..]).expect("16 hex digits");
    text
}

impl Field for Params {
    /// Owned: a compact keyed hash's text is made as it is read (held in place for a few
    /// values).
    type Ref<'a> = Params;
    #[inline]
    fn same(&self, other: &Self) -> bool {
        self == other
    }
    fn json(&self, out: &mut Vec<u8>) {
        json_strs(out, self.iter());
    }
    fn put(&self, out: &mut Vec<u8>) {
        self.put_as(out, true)
    }
    /// `count u32`, then each value: compact, a keyed hash's 8 bytes after `0` and any
    /// other value's text after `1`; before, each value's text.
    #[inline]
    fn put_as(&self, out: &mut Vec<u8>, compact_ids: bool) {
        // From the bytes as they are (each value was a whole `&str`: nothing to check
        // again on the path of every event).
        let Some(b) = self.bytes() else {
            return put_strs(out, 0, std::iter::empty());
        };
        let n = self.len();
        let ends = b.get(4..4 + 4 * n).unwrap_or_default();
        let texts = b.get(4 + 4 * n..).unwrap_or_default();
        out.extend_from_slice(&(n as u32).to_le_bytes());
        let mut start = 0usize;
        for end in ends.chunks_exact(4) {
            let end = u32::from_le_bytes([end[0], end[1], end[2], end[3]]) as usize;
            let text = texts.get(start..end).unwrap_or_default();
            start = end;
            if compact_ids {
                if let Some(h) = keyed_hash_bytes(text) {
                    out.push(PARAM_HASH);
                    out.extend_from_slice(&h);
                    continue;
                }
                out.push(PARAM_TEXT);
            }
            out.extend_from_slice(&(text.len() as u32).to_le_bytes());
            out.extend_from_slice(text);
        }
    }
    fn get(r: &mut RecordReader<'_>) -> Result<Params, RecordError> {
        if !r.compact_ids {
            let items = r.strs()?;
            return Ok(Params::collect(items.iter()));
        }
        // Each value takes a tag and at least a length.
        let n = r.count(5)?;
        let mut items: Vec<std::borrow::Cow<'_, str>> = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(match r.u8()? {
                PARAM_HASH => {
                    let text = keyed_hash_text(r.bytes(8)?);
                    // Hex digits and `hmac:`: ASCII.
                    String::from_utf8_lossy(&text).into_owned().into()
                }
                PARAM_TEXT => r.str()?.into(),
                t => return Err(RecordError::UnknownTag(t)),
            });
        }
        Ok(Params::collect(items.iter()))
    }
    fn own(r: &Params) -> Result<Self, RecordError> {
        Ok(r.clone())
    }
    fn ch_columns(name: &'static str, _: bool, style: ColumnStyle) -> Vec<String> {
        <crate::text::List<String>>::ch_columns(name, false, style)
    }
    fn ch_copy(r: &mut RecordReader<'_>, _: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if !r.compact_ids {
            return r.copy_strs(out);
        }
        let n = r.count(5)?;
        super::schema::put_varint(out, n as u64);
        for _ in 0..n {
            match r.u8()? {
                PARAM_HASH => {
                    super::schema::put_varint(out, HASH_TEXT as u64);
                    out.extend_from_slice(&keyed_hash_text(r.bytes(8)?));
                }
                PARAM_TEXT => r.copy_str(out)?,
                t => return Err(RecordError::UnknownTag(t)),
            }
        }
        Ok(())
    }
}

/// RFC 3339 with microseconds, UTC (`2023-11-14T22:13:20.123456Z`). Years outside
/// 0000-9999 are clamped to the epoch.
pub fn format_ts(unix_ns: i128) -> String {
    String::from_utf8_lossy(&Timestamp::from_unix_ns(unix_ns).text()).into_owned()
}

/// In 64-bit arithmetic: it runs for every event written (128-bit division is a call).
fn ts_text(us: i64) -> [u8; 27] {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return ts_text(0);
    }
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, sod / 3600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    put(20, 6, micros);
    b
}

/// Unix microseconds of a time stamp the daemon wrote (`YYYY-MM-DDTHH:MM:SS.ffffffZ`).
pub fn parse_ts_micros(s: &str) -> Option<i64> {
    fast_ts_micros(s.as_bytes())
}

/// Unix microseconds of `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the form the daemon writes.
fn fast_ts_micros(b: &[u8]) -> Option<i64> {
    if b.len() != 27
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[26] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm), proleptic Gregorian.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + us)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event crosses from the decoding thread to the sink thread and back (its box is
    /// reused) a cache line at a time, for every statement: it does not grow unnoticed.
    #[test]
    fn an_event_stays_within_its_cache_lines() {
        let size = std::mem::size_of::<AuditEvent>();
        println!(
            "AuditEvent: {size} bytes, {} cache lines",
            size.div_ceil(64)
        );
        // 1016 bytes (16 lines) while a Text took three words.
        assert!(size <= 13 * 64, "AuditEvent grew to {size} bytes");
    }

    #[test]
    fn hand_written_json_is_serde_json_byte_for_byte() {
        let mut ev = AuditEvent {
            event_id: "e1".into(),
            kind: EventKind::Statement,
            ts: Timestamp::parse("2023-11-14T22:13:20.123456Z").unwrap(),
            duration_us: u64::MAX,
            statement: "SELECT \"q\", '\\', $1 -- \u{1}\u{1f}\u{7f}\t\r\n\u{8}\u{c} ü 日本 😀"
                .into(),
            tables: vec!["a".into(), "b\"c".into()].into(),
            params: Params::default(),
            rows: None,
            tls: true,
            labels: [
                ("app".to_string(), "pay\nments".to_string()),
                ("k\"".to_string(), String::new()),
            ]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into(),
            flags: Flags::of(&[Flag::GapBefore, Flag::MidStream]),
            ..AuditEvent::default()
        };
        for rows in [None, Some(0), Some(12345)] {
            ev.rows = rows;
            ev.tls = !ev.tls;
            let serde = serde_json::to_string(&ev).unwrap();
            let mut mine = Vec::new();
            ev.write_json_fields(&mut mine);
            mine.push(b'}');
            assert_eq!(String::from_utf8(mine).unwrap(), serde);
            // And it reads back.
            assert_eq!(serde_json::from_str::<AuditEvent>(&serde).unwrap(), ev);
        }
    }

    #[test]
    fn event_ids_carry_the_events_time() {
        // 2026-12-04T07:25:34.123Z: the id's first 48 bits are its milliseconds.
        let ns = 1_796_455_534_123_456_789i128;
        let a = event_id_at(ns);
        let b = event_id_at(ns);
        assert_ne!(a, b, "the random bits differ");
        let uuid = uuid::Uuid::parse_str(a.as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos / 1_000_000), (1_796_455_534, 123));
    }

    #[test]
    fn event_ids_are_their_text_however_held() {
        let made = new_event_id();
        assert_eq!(made.len(), 36);
        assert!(uuid::Uuid::parse_str(&made).is_ok_and(|u| u.get_version_num() == 7));
        assert_ne!(made, new_event_id());
        // Any text reads back as it came, inline or not, and equal texts are equal ids.
        let upper = made.to_uppercase();
        let simple = made.replace('-', "");
        for text in [
            made.as_str(),
            "",
            "e1",
            "x".repeat(36).as_str(),
            "x".repeat(37).as_str(),
            "ü".repeat(18).as_str(),
            // Other spellings of a UUID are other ids, kept as they came.
            upper.as_str(),
            simple.as_str(),
            "{01a20304-de26-7265-b42c-353bcf4fdf7}",
        ] {
            let id = EventId::from(text);
            // Held as a UUID (and written as its 16 bytes) only in its canonical text.
            assert_eq!(id.uuid_bytes().is_some(), text == made.as_str(), "{text}");
            let (mut compact, mut old) = (Vec::new(), Vec::new());
            id.put(&mut compact);
            id.put_as(&mut old, false);
            assert_eq!(old.len(), 4 + text.len());
            assert_eq!(
                compact.len(),
                if text == made.as_str() {
                    17
                } else {
                    5 + text.len()
                }
            );
            for (bytes, compact_ids) in [(&compact, true), (&old, false)] {
                let mut r = RecordReader::with_ids(bytes, compact_ids);
                assert_eq!(<EventId as Field>::get(&mut r).unwrap(), id);
                assert!(r.is_empty());
            }
            // ClickHouse's row is the same from either.
            let (mut a, mut b) = (Vec::new(), Vec::new());
            <EventId as Field>::ch_copy(&mut RecordReader::new(&compact), false, &mut a).unwrap();
            <EventId as Field>::ch_copy(&mut RecordReader::with_ids(&old, false), false, &mut b)
                .unwrap();
            assert_eq!(a, b);
            assert_eq!(id, text);
            assert_eq!(id, EventId::from(text.to_string()));
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(json, serde_json::to_string(text).unwrap());
            assert_eq!(serde_json::from_str::<EventId>(&json).unwrap(), id);
            let ev = AuditEvent {
                event_id: id.clone(),
                ..AuditEvent::default()
            };
            let mut rec = Vec::new();
            crate::sink::record::encode(&ev, &mut rec);
            assert_eq!(crate::sink::record::decode(&rec).unwrap().event_id, text);
            assert_eq!(
                crate::sink::record::decode(&rec)
                    .unwrap()
                    .to_event()
                    .unwrap(),
                ev
            );
        }
        assert_eq!(EventId::default(), "");
    }

    #[test]
    fn params_are_a_list_of_texts_in_one_allocation() {
        let lists: [&[&str]; 7] = [
            &[],
            &["hmac:1b9891be7a5a66b4"],
            &["", "NULL", "\\x00ff"],
            &["ü日本😀", "a\"b", "", "x"],
            &["5"; 300],
            // Keyed hashes, and values that only look like one: kept as they came.
            &[
                "hmac:0000000000000000",
                "hmac:1B9891BE7A5A66B4",
                "hmac:1b9891be7a5a66b",
                "hmac:1b9891be7a5a66b4a",
                "hmac:1b9891be7a5a66g4",
                "hmac:1b9891be7a5a66/4",
                "hmac:1b9891be7a5a66:4",
                "hmac:1b9891be7a5a66`4",
                "hmac:ab9891be7a5a66b\u{7f}",
                "HMAC:1b9891be7a5a66b4",
                "hmac:ffffffffffffffff",
            ],
            &["hmac:1b9891be7a5a66b4"; 40],
        ];
        for list in lists {
            let p = Params::from(list.to_vec());
            assert_eq!(p.len(), list.len());
            assert_eq!(p.is_empty(), list.is_empty());
            assert!(p.iter().eq(list.iter().copied()));
            assert_eq!(p.to_vec(), list);
            assert_eq!(p.get(list.len()), None);
            assert_eq!(p, Params::collect(list.iter()));
            // JSON as a list of strings; a record as one too.
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, serde_json::to_string(list).unwrap());
            assert_eq!(serde_json::from_str::<Params>(&json).unwrap(), p);
            let mut out = Vec::new();
            p.json(&mut out);
            assert_eq!(out, json.as_bytes());
            // A record of the layouts before: a list of texts, byte for byte.
            let mut text = Vec::new();
            p.put_as(&mut text, false);
            let mut strs = Vec::new();
            crate::audit::schema::put_strs(&mut strs, list.len(), list.iter().copied());
            assert_eq!(text, strs, "a record's list of texts, byte for byte");
            let back = <Params as Field>::get(&mut RecordReader::with_ids(&text, false)).unwrap();
            assert_eq!(back, p);
            // This version's: each keyed hash in 9 bytes (a tag and 8), any other value
            // a tag and its text; read back as the same texts.
            let mut compact = Vec::new();
            p.put(&mut compact);
            let hashes = list
                .iter()
                .filter(|v| keyed_hash_bytes(v.as_bytes()).is_some())
                .count();
            assert_eq!(
                compact.len(),
                strs.len() + (list.len() - hashes) - 16 * hashes
            );
            let mut r = RecordReader::new(&compact);
            let back = <Params as Field>::get(&mut r).unwrap();
            assert!(r.is_empty());
            assert_eq!(back, p);
            assert_eq!(<Params as Field>::own(&back).unwrap(), p);
            // ClickHouse's row is the same from either.
            let (mut a, mut b) = (Vec::new(), Vec::new());
            <Params as Field>::ch_copy(&mut RecordReader::with_ids(&text, false), false, &mut a)
                .unwrap();
            <Params as Field>::ch_copy(&mut RecordReader::new(&compact), false, &mut b).unwrap();
            assert_eq!(a, b);
        }
        assert_eq!(
            keyed_hash_bytes(b"hmac:1b9891be7a5a66b4"),
            Some([0x1b, 0x98, 0x91, 0xbe, 0x7a, 0x5a, 0x66, 0xb4])
        );
        assert_ne!(Params::from(["a", "b"]), Params::from(["ab"]));
        assert_ne!(Params::from(["a"]), Params::default());
        assert_eq!(Params::from(Vec::<String>::new()), Params::default());
        // An iterator shorter than its count: the values it lacks are empty.
        assert_eq!(Params::of_len(3, ["a"].iter()), Params::from(["a", "", ""]));
        assert_eq!(Params::of_len(1, ["a", "b"].iter()), Params::from(["a"]));
    }

    #[test]
    fn every_flag_and_kind_round_trips_by_name() {
        for &f in Flag::ALL {
            assert_eq!(Flag::from_name(f.as_str()), Some(f));
        }
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.as_str()), Some(k));
        }
        let all = Flags::of(Flag::ALL);
        assert_eq!(all.len(), Flag::ALL.len());
        let json = serde_json::to_string(&all).unwrap();
        assert_eq!(serde_json::from_str::<Flags>(&json).unwrap(), all);
        assert!(serde_json::from_str::<Flags>("[\"no_such_flag\"]").is_err());
        assert!(serde_json::from_str::<EventKind>("\"no_such_kind\"").is_err());
        // Names come out in declaration order, whatever the order of insertion.
        let mut f = Flags::from(Flag::GapBefore);
        f.insert(Flag::MidStream);
        assert_eq!(f, ["mid_stream", "gap_before"]);
    }

    #[test]
    fn timestamps_match_the_time_crate() {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let mut ns: i128 = -86_400_000_000_000 * 365 * 3;
        while ns < 4_102_444_800_000_000_000 {
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap();
            let text = t.format(&fmt).unwrap();
            assert_eq!(format_ts(ns), text, "{ns}");
            assert_eq!(
                Timestamp::parse(&text),
                Some(Timestamp::from_unix_ns(ns)),
                "{text}"
            );
            ns += 7_777_777_777_777_777 / 13; // about 6.9 days and odd microseconds
        }
        assert_eq!(
            format_ts(951_868_799_999_999_000),
            "2000-02-29T23:59:59.999999Z"
        );
        assert_eq!(format_ts(-1_000), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn timestamp_text_and_parsing() {
        assert_eq!(
            format_ts(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
        let p = |s| Timestamp::parse(s).map(Timestamp::unix_micros);
        assert_eq!(p("1970-01-01T00:00:01.000002Z"), Some(1_000_002));
        assert_eq!(p("2000-02-29T23:59:59.999999Z"), Some(951_868_799_999_999));
        assert_eq!(p("1969-12-31T23:59:59.000000Z"), Some(-1_000_000));
        // Other RFC 3339 forms.
        assert_eq!(
            p("2023-11-14T23:13:20.5+01:00"),
            Some(1_700_000_000_500_000)
        );
        assert_eq!(p("nonsense"), None);
        assert_eq!(p("2023-13-14T22:13:20.123456Z"), None);
    }
}
