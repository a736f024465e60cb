//! The audit event: one JSON object per line in the local log, one row in ClickHouse.
//! The field names are a contract (see DESIGN.md): extend, never rename.

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
    pub comm: String,
    pub exe: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub cgroup_path: String,
    pub container_id: String,
    pub pod_uid: String,
    pub pod_name: String,
    pub namespace: String,
    pub systemd_unit: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub event_id: String,
    pub kind: String,
    /// Start time, RFC 3339 with microseconds, UTC.
    pub ts: String,
    pub duration_us: u64,
    pub host: String,
    pub session_id: String,
    pub seq: u64,
    pub statement: String,
    pub command: String,
    pub tables: Vec<String>,
    pub fingerprint: String,
    /// "simple", "extended" or "function_call"; empty for session and gap events.
    pub protocol: String,
    /// Bind parameters: keyed hashes ("hmac:…") unless the policy records raw values.
    pub params: Vec<String>,
    pub rows: Option<u64>,
    pub error_code: String,
    pub error_message: String,
    pub db_user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    pub client_port: u16,
    pub server_addr: String,
    pub server_port: u16,
    pub tls: bool,
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub cgroup_path: String,
    pub container_id: String,
    pub pod_uid: String,
    pub pod_name: String,
    pub namespace: String,
    pub systemd_unit: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub capture: String,
    pub flags: Vec<String>,
    /// The backend serving the session, when it runs on this host (extension).
    pub server_pid: u32,
    /// Name of the prepared statement executed, if any (extension).
    pub prepared_name: String,
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
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

/// RFC 3339 with microseconds, UTC.
pub fn format_ts(unix_ns: i128) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_format() {
        assert_eq!(
            format_ts(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
    }
}
