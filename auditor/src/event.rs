//! The audit event: one JSON object per line in the local log, one row in ClickHouse.
//! The field names are a contract (see DESIGN.md): extend, never rename.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionStart,
    Statement,
    SessionEnd,
    Gap,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionStart => "session_start",
            EventKind::Statement => "statement",
            EventKind::SessionEnd => "session_end",
            EventKind::Gap => "gap",
        }
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
}

/// Text of an event. Constants (kinds, protocols, capture names, the empty string) are
/// static and cost nothing to copy; text shared by many events (identity, session,
/// statement) is reference-counted, not copied, on the path of every event.
#[derive(Clone)]
pub enum Text {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Shared(s) => s,
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Text::Static("")
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        if s.is_empty() {
            Text::default()
        } else {
            Text::Shared(Arc::from(s))
        }
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        if s.is_empty() {
            Text::default()
        } else {
            Text::Shared(Arc::from(s))
        }
    }
}

impl From<std::borrow::Cow<'_, str>> for Text {
    fn from(s: std::borrow::Cow<'_, str>) -> Self {
        Text::from(s.as_ref())
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Text::from)
    }
}

/// Workload labels, shared by the events of a session.
pub type Labels = Arc<std::collections::BTreeMap<String, String>>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub event_id: String,
    pub kind: Text,
    /// Start time, RFC 3339 with microseconds, UTC.
    pub ts: String,
    pub duration_us: u64,
    pub host: Text,
    pub session_id: Text,
    pub seq: u64,
    pub statement: Text,
    pub command: Text,
    pub tables: Arc<[String]>,
    pub fingerprint: Text,
    /// "simple", "extended" or "function_call"; empty for session and gap events.
    pub protocol: Text,
    /// Bind parameters: keyed hashes ("hmac:…") unless the policy records raw values.
    pub params: Arc<[String]>,
    pub rows: Option<u64>,
    pub error_code: String,
    pub error_message: String,
    pub db_user: Text,
    pub database: Text,
    pub application_name: Text,
    pub client_addr: Text,
    pub client_port: u16,
    pub server_addr: Text,
    pub server_port: u16,
    pub tls: bool,
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
    pub labels: Labels,
    pub capture: Text,
    pub flags: Vec<String>,
    /// The backend serving the session, when it runs on this host (extension).
    pub server_pid: u32,
    /// Name of the prepared statement executed, if any (extension).
    pub prepared_name: Text,
    /// Bytes missing, for gap events (extension).
    pub gap_bytes: u64,
    /// The SQLSTATE class or transaction status at the end of the statement (extension).
    pub tx_status: String,
    pub prev_hash: String,
    pub hash: String,
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

/// Appends `s` as a JSON string, escaped as serde_json escapes it (so a line reads the same
/// whichever wrote it).
fn json_str(out: &mut Vec<u8>, s: &str) {
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

fn json_strs<'s>(out: &mut Vec<u8>, items: impl Iterator<Item = &'s str>) {
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

impl AuditEvent {
    /// Appends the event as one JSON object, fields in declaration order, up to and without
    /// the closing `,"hash":"…"}` (the local log hashes this prefix, then appends the hash).
    /// Byte for byte what serde_json writes for the same fields, only without per-field
    /// dispatch: this runs for every event.
    pub fn write_json_prefix(&self, out: &mut Vec<u8>) {
        macro_rules! s {
            ($key:literal, $v:expr) => {
                out.extend_from_slice(concat!(",\"", $key, "\":").as_bytes());
                json_str(out, $v);
            };
        }
        macro_rules! n {
            ($key:literal, $v:expr) => {
                out.extend_from_slice(concat!(",\"", $key, "\":").as_bytes());
                json_num(out, $v);
            };
        }
        out.extend_from_slice(b"{\"event_id\":");
        json_str(out, &self.event_id);
        s!("kind", &self.kind);
        s!("ts", &self.ts);
        n!("duration_us", self.duration_us);
        s!("host", &self.host);
        s!("session_id", &self.session_id);
        n!("seq", self.seq);
        s!("statement", &self.statement);
        s!("command", &self.command);
        out.extend_from_slice(b",\"tables\":");
        json_strs(out, self.tables.iter().map(|t| t.as_str()));
        s!("fingerprint", &self.fingerprint);
        s!("protocol", &self.protocol);
        out.extend_from_slice(b",\"params\":");
        json_strs(out, self.params.iter().map(|t| t.as_str()));
        match self.rows {
            Some(r) => {
                n!("rows", r);
            }
            None => out.extend_from_slice(b",\"rows\":null"),
        }
        s!("error_code", &self.error_code);
        s!("error_message", &self.error_message);
        s!("db_user", &self.db_user);
        s!("database", &self.database);
        s!("application_name", &self.application_name);
        s!("client_addr", &self.client_addr);
        n!("client_port", self.client_port);
        s!("server_addr", &self.server_addr);
        n!("server_port", self.server_port);
        out.extend_from_slice(if self.tls {
            b",\"tls\":true"
        } else {
            b",\"tls\":false"
        });
        n!("pid", self.pid);
        s!("comm", &self.comm);
        s!("exe", &self.exe);
        n!("uid", self.uid);
        n!("cgroup_id", self.cgroup_id);
        s!("cgroup_path", &self.cgroup_path);
        s!("container_id", &self.container_id);
        s!("pod_uid", &self.pod_uid);
        s!("pod_name", &self.pod_name);
        s!("namespace", &self.namespace);
        s!("systemd_unit", &self.systemd_unit);
        out.extend_from_slice(b",\"labels\":{");
        for (i, (k, v)) in self.labels.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, k);
            out.push(b':');
            json_str(out, v);
        }
        out.push(b'}');
        s!("capture", &self.capture);
        out.extend_from_slice(b",\"flags\":");
        json_strs(out, self.flags.iter().map(|t| t.as_str()));
        n!("server_pid", self.server_pid);
        s!("prepared_name", &self.prepared_name);
        n!("gap_bytes", self.gap_bytes);
        s!("tx_status", &self.tx_status);
        s!("prev_hash", &self.prev_hash);
    }
}

/// A UUIDv7: unique and sortable by creation time. The 74 bits after the millisecond
/// timestamp come from a userspace CSPRNG (one OS read per thread, not one per event).
pub fn new_event_id() -> String {
    use rand::RngCore;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut random = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut random);
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    // One exact allocation (Display grows a String several times).
    String::from(&*id.hyphenated().encode_lower(&mut text))
}

/// RFC 3339 with microseconds, UTC (`2023-11-14T22:13:20.123456Z`). Years outside
/// 0000-9999 are clamped to the epoch, as before.
pub fn format_ts(unix_ns: i128) -> String {
    let us = unix_ns.div_euclid(1000);
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
    let year = yoe + era * 400 + i128::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return format_ts(0);
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
    String::from_utf8_lossy(&b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_json_is_serde_json_byte_for_byte() {
        let mut ev = AuditEvent {
            event_id: "e1".into(),
            kind: "statement".into(),
            ts: "2023-11-14T22:13:20.123456Z".into(),
            duration_us: u64::MAX,
            statement: "SELECT \"q\", '\\', $1 -- \u{1}\u{1f}\u{7f}\t\r\n\u{8}\u{c} ü 日本 😀"
                .into(),
            tables: vec!["a".into(), "b\"c".into()].into(),
            params: Arc::from([]),
            rows: None,
            tls: true,
            labels: [
                ("app".to_string(), "pay\nments".to_string()),
                ("k\"".to_string(), String::new()),
            ]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into(),
            flags: vec!["mid_stream".into()],
            prev_hash: "00ff".into(),
            hash: String::new(),
            ..AuditEvent::default()
        };
        for rows in [None, Some(0), Some(12345)] {
            ev.rows = rows;
            ev.tls = !ev.tls;
            let serde = serde_json::to_string(&ev).unwrap();
            let mut mine = Vec::new();
            ev.write_json_prefix(&mut mine);
            mine.extend_from_slice(b",\"hash\":\"\"}");
            assert_eq!(String::from_utf8(mine).unwrap(), serde);
        }
    }

    #[test]
    fn timestamps_match_the_time_crate() {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let mut ns: i128 = -86_400_000_000_000 * 365 * 3;
        while ns < 4_102_444_800_000_000_000 {
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap();
            assert_eq!(format_ts(ns), t.format(&fmt).unwrap(), "{ns}");
            ns += 7_777_777_777_777_777 / 13; // about 6.9 days and odd microseconds
        }
        assert_eq!(
            format_ts(951_868_799_999_999_000),
            "2000-02-29T23:59:59.999999Z"
        );
        assert_eq!(format_ts(-1_000), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn timestamp_format() {
        assert_eq!(
            format_ts(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
    }
}
