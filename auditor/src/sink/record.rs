//! The ClickHouse spool's record: one audit event in a compact binary layout, read back
//! without copying (every string of an [`EventRef`] borrows the spool's buffer).
//!
//! JSON would do, but the spool sits on the path of every event twice (written by the
//! spool thread, read by the sender): parsing and escaping JSON there cost more CPU than
//! ClickHouse spends storing the row. This layout is written by field order, little
//! endian: strings as a u32 length and UTF-8 bytes, integers fixed width, lists as a u32
//! count and their items. The first byte is the layout version; a record that starts with
//! `{` is the JSON of earlier versions and is still read (a spool survives upgrades).

use std::collections::BTreeMap;

use crate::event::AuditEvent;

/// First byte of every record in this layout.
pub const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record ends inside a field")]
    Truncated,
    #[error("a string field is not UTF-8")]
    NotUtf8,
    #[error("unknown record layout {0}")]
    UnknownVersion(u8),
    #[error("{0} bytes after the last field")]
    Trailing(usize),
    #[error("not an audit event in JSON: {0}")]
    Json(String),
}

/// An audit event read from a spool record; strings borrow the record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventRef<'a> {
    pub event_id: &'a str,
    pub kind: &'a str,
    /// Unix microseconds.
    pub ts_us: i64,
    pub duration_us: u64,
    pub host: &'a str,
    pub session_id: &'a str,
    pub seq: u64,
    pub statement: &'a str,
    pub command: &'a str,
    pub tables: Vec<&'a str>,
    pub fingerprint: &'a str,
    pub protocol: &'a str,
    pub params: Vec<&'a str>,
    pub rows: Option<u64>,
    pub error_code: &'a str,
    pub error_message: &'a str,
    pub db_user: &'a str,
    pub database: &'a str,
    pub application_name: &'a str,
    pub client_addr: &'a str,
    pub client_port: u16,
    pub server_addr: &'a str,
    pub server_port: u16,
    pub tls: bool,
    pub pid: u32,
    pub comm: &'a str,
    pub exe: &'a str,
    pub uid: u32,
    pub cgroup_id: u64,
    pub cgroup_path: &'a str,
    pub container_id: &'a str,
    pub pod_uid: &'a str,
    pub pod_name: &'a str,
    pub namespace: &'a str,
    pub systemd_unit: &'a str,
    pub workload: &'a str,
    pub labels: Vec<(&'a str, &'a str)>,
    pub capture: &'a str,
    pub flags: Vec<&'a str>,
    pub server_pid: u32,
    pub prepared_name: &'a str,
    pub gap_bytes: u64,
    pub tx_status: &'a str,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_strs<'s>(out: &mut Vec<u8>, n: usize, items: impl Iterator<Item = &'s str>) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for s in items {
        put_str(out, s);
    }
}

/// Appends the record of `ev` to `out`.
pub fn encode(ev: &AuditEvent, out: &mut Vec<u8>) {
    out.push(VERSION);
    put_str(out, &ev.event_id);
    put_str(out, &ev.kind);
    out.extend_from_slice(&ts_micros(&ev.ts).to_le_bytes());
    out.extend_from_slice(&ev.duration_us.to_le_bytes());
    put_str(out, &ev.host);
    put_str(out, &ev.session_id);
    out.extend_from_slice(&ev.seq.to_le_bytes());
    put_str(out, &ev.statement);
    put_str(out, &ev.command);
    put_strs(out, ev.tables.len(), ev.tables.iter().map(String::as_str));
    put_str(out, &ev.fingerprint);
    put_str(out, &ev.protocol);
    put_strs(out, ev.params.len(), ev.params.iter().map(String::as_str));
    match ev.rows {
        Some(r) => {
            out.push(1);
            out.extend_from_slice(&r.to_le_bytes());
        }
        None => out.push(0),
    }
    put_str(out, &ev.error_code);
    put_str(out, &ev.error_message);
    put_str(out, &ev.db_user);
    put_str(out, &ev.database);
    put_str(out, &ev.application_name);
    put_str(out, &ev.client_addr);
    out.extend_from_slice(&ev.client_port.to_le_bytes());
    put_str(out, &ev.server_addr);
    out.extend_from_slice(&ev.server_port.to_le_bytes());
    out.push(ev.tls as u8);
    out.extend_from_slice(&ev.pid.to_le_bytes());
    put_str(out, &ev.comm);
    put_str(out, &ev.exe);
    out.extend_from_slice(&ev.uid.to_le_bytes());
    out.extend_from_slice(&ev.cgroup_id.to_le_bytes());
    put_str(out, &ev.cgroup_path);
    put_str(out, &ev.container_id);
    put_str(out, &ev.pod_uid);
    put_str(out, &ev.pod_name);
    put_str(out, &ev.namespace);
    put_str(out, &ev.systemd_unit);
    put_workload(out, ev);
    out.extend_from_slice(&(ev.labels.len() as u32).to_le_bytes());
    for (k, v) in ev.labels.iter() {
        put_str(out, k);
        put_str(out, v);
    }
    put_str(out, &ev.capture);
    put_strs(out, ev.flags.len(), ev.flags.iter().map(String::as_str));
    out.extend_from_slice(&ev.server_pid.to_le_bytes());
    put_str(out, &ev.prepared_name);
    out.extend_from_slice(&ev.gap_bytes.to_le_bytes());
    put_str(out, &ev.tx_status);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        self.array().map(u64::from_le_bytes)
    }

    fn str(&mut self) -> Result<&'a str, RecordError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| RecordError::NotUtf8)
    }

    /// A count, checked against what is left (each item takes at least `min_item` bytes),
    /// so a corrupt count cannot ask for a huge allocation.
    fn count(&mut self, min_item: usize) -> Result<usize, RecordError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(RecordError::Truncated);
        }
        Ok(n)
    }

    fn strs(&mut self) -> Result<Vec<&'a str>, RecordError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.str()).collect()
    }
}

/// Reads a record in this layout.
pub fn decode(rec: &[u8]) -> Result<EventRef<'_>, RecordError> {
    let mut r = Reader { buf: rec };
    match r.u8()? {
        VERSION => {}
        v => return Err(RecordError::UnknownVersion(v)),
    }
    let ev = EventRef {
        event_id: r.str()?,
        kind: r.str()?,
        ts_us: r.u64()? as i64,
        duration_us: r.u64()?,
        host: r.str()?,
        session_id: r.str()?,
        seq: r.u64()?,
        statement: r.str()?,
        command: r.str()?,
        tables: r.strs()?,
        fingerprint: r.str()?,
        protocol: r.str()?,
        params: r.strs()?,
        rows: match r.u8()? {
            0 => None,
            _ => Some(r.u64()?),
        },
        error_code: r.str()?,
        error_message: r.str()?,
        db_user: r.str()?,
        database: r.str()?,
        application_name: r.str()?,
        client_addr: r.str()?,
        client_port: r.u16()?,
        server_addr: r.str()?,
        server_port: r.u16()?,
        tls: r.u8()? != 0,
        pid: r.u32()?,
        comm: r.str()?,
        exe: r.str()?,
        uid: r.u32()?,
        cgroup_id: r.u64()?,
        cgroup_path: r.str()?,
        container_id: r.str()?,
        pod_uid: r.str()?,
        pod_name: r.str()?,
        namespace: r.str()?,
        systemd_unit: r.str()?,
        workload: r.str()?,
        labels: {
            let n = r.count(8)?;
            (0..n)
                .map(|_| Ok((r.str()?, r.str()?)))
                .collect::<Result<_, RecordError>>()?
        },
        capture: r.str()?,
        flags: r.strs()?,
        server_pid: r.u32()?,
        prepared_name: r.str()?,
        gap_bytes: r.u64()?,
        tx_status: r.str()?,
    };
    if !r.buf.is_empty() {
        return Err(RecordError::Trailing(r.buf.len()));
    }
    Ok(ev)
}

/// Reads a record of this layout or of the JSON layout of earlier versions; a JSON record
/// is re-encoded into `scratch` (which the result then borrows).
pub fn decode_any<'a>(
    rec: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<EventRef<'a>, RecordError> {
    if rec.first() == Some(&b'{') {
        let ev: AuditEvent =
            serde_json::from_slice(rec).map_err(|e| RecordError::Json(e.to_string()))?;
        scratch.clear();
        encode(&ev, scratch);
        return decode(scratch);
    }
    decode(rec)
}

impl EventRef<'_> {
    /// The owned event (for JSON: records set aside for a person to read).
    pub fn to_event(&self) -> AuditEvent {
        fn owned<C: FromIterator<String>>(v: &[&str]) -> C {
            v.iter().map(|s| s.to_string()).collect()
        }
        AuditEvent {
            event_id: self.event_id.into(),
            kind: self.kind.into(),
            ts: crate::event::format_ts(i128::from(self.ts_us) * 1000),
            duration_us: self.duration_us,
            host: self.host.into(),
            session_id: self.session_id.into(),
            seq: self.seq,
            statement: self.statement.into(),
            command: self.command.into(),
            tables: owned(&self.tables),
            fingerprint: self.fingerprint.into(),
            protocol: self.protocol.into(),
            params: owned(&self.params),
            rows: self.rows,
            error_code: self.error_code.into(),
            error_message: self.error_message.into(),
            db_user: self.db_user.into(),
            database: self.database.into(),
            application_name: self.application_name.into(),
            client_addr: self.client_addr.into(),
            client_port: self.client_port,
            server_addr: self.server_addr.into(),
            server_port: self.server_port,
            tls: self.tls,
            pid: self.pid,
            comm: self.comm.into(),
            exe: self.exe.into(),
            uid: self.uid,
            cgroup_id: self.cgroup_id,
            cgroup_path: self.cgroup_path.into(),
            container_id: self.container_id.into(),
            pod_uid: self.pod_uid.into(),
            pod_name: self.pod_name.into(),
            namespace: self.namespace.into(),
            systemd_unit: self.systemd_unit.into(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
                .into(),
            capture: self.capture.into(),
            flags: owned(&self.flags),
            server_pid: self.server_pid,
            prepared_name: self.prepared_name.into(),
            gap_bytes: self.gap_bytes,
            tx_status: self.tx_status.into(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
}

/// The workload an event belongs to, most specific first: pod, container, systemd unit,
/// cgroup, program; appended as a string field without building it first (this runs for
/// every spooled event).
fn put_workload(out: &mut Vec<u8>, ev: &AuditEvent) {
    let parts: [&str; 3] = if !ev.pod_name.is_empty() {
        ["pod:", &ev.namespace, &ev.pod_name]
    } else if !ev.pod_uid.is_empty() {
        ["pod-uid:", &ev.pod_uid, ""]
    } else if !ev.container_id.is_empty() {
        ["container:", &ev.container_id, ""]
    } else if !ev.systemd_unit.is_empty() {
        ["unit:", &ev.systemd_unit, ""]
    } else if !ev.cgroup_path.is_empty() && &*ev.cgroup_path != "/" {
        ["cgroup:", &ev.cgroup_path, ""]
    } else {
        ["process:", &ev.comm, ""]
    };
    let slash = !parts[2].is_empty();
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + usize::from(slash);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(parts[0].as_bytes());
    out.extend_from_slice(parts[1].as_bytes());
    if slash {
        out.push(b'/');
        out.extend_from_slice(parts[2].as_bytes());
    }
}

/// Unix microseconds of an event's timestamp (RFC 3339, `YYYY-MM-DDTHH:MM:SS.ffffffZ` as
/// the daemon writes it; other RFC 3339 forms through the `time` crate; 0 if unreadable).
pub fn ts_micros(ts: &str) -> i64 {
    fast_ts_micros(ts.as_bytes()).unwrap_or_else(|| {
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
            .unwrap_or(0)
    })
}

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

    fn sample() -> AuditEvent {
        AuditEvent {
            event_id: "01a20304-de26-7265-b42c-353bcf4fdf7c".into(),
            kind: "statement".into(),
            ts: "2026-11-22T11:29:40.381256Z".into(),
            duration_us: 60,
            host: "vm".into(),
            session_id: "s1".into(),
            seq: 11,
            statement: "SELECT abalance FROM pgbench_accounts WHERE aid = $1 -- \"ü\"\n".into(),
            command: "SELECT".into(),
            tables: vec!["pgbench_accounts".into()].into(),
            fingerprint: "348bee4e67e86ca6".into(),
            protocol: "extended".into(),
            params: vec!["hmac:1b9891be7a5a66b4".into(), "hmac:00".into()].into(),
            rows: Some(1),
            db_user: "postgres".into(),
            database: "postgres".into(),
            client_port: 44056,
            server_port: 5432,
            tls: true,
            pid: 13653,
            comm: "pgbench".into(),
            cgroup_id: 7,
            pod_name: "payments-1".into(),
            namespace: "prod".into(),
            labels: std::sync::Arc::new([("app".to_string(), "payments".to_string())].into()),
            capture: "ebpf".into(),
            flags: vec!["mid_stream".into()],
            server_pid: 9,
            gap_bytes: 3,
            ..AuditEvent::default()
        }
    }

    #[test]
    fn round_trip() {
        let ev = sample();
        let mut buf = Vec::new();
        encode(&ev, &mut buf);
        let r = decode(&buf).unwrap();
        assert_eq!(r.workload, "pod:prod/payments-1");
        for (ev, want) in [
            (
                AuditEvent {
                    comm: "psql".into(),
                    ..AuditEvent::default()
                },
                "process:psql",
            ),
            (
                AuditEvent {
                    cgroup_path: "/".into(),
                    comm: "x".into(),
                    ..AuditEvent::default()
                },
                "process:x",
            ),
            (
                AuditEvent {
                    cgroup_path: "/a.slice".into(),
                    ..AuditEvent::default()
                },
                "cgroup:/a.slice",
            ),
            (
                AuditEvent {
                    systemd_unit: "api.service".into(),
                    ..AuditEvent::default()
                },
                "unit:api.service",
            ),
            (
                AuditEvent {
                    container_id: "c0ffee".into(),
                    ..AuditEvent::default()
                },
                "container:c0ffee",
            ),
            (
                AuditEvent {
                    pod_uid: "u-1".into(),
                    ..AuditEvent::default()
                },
                "pod-uid:u-1",
            ),
        ] {
            let mut buf = Vec::new();
            encode(&ev, &mut buf);
            assert_eq!(decode(&buf).unwrap().workload, want);
        }
        assert_eq!(r.ts_us, 1_795_346_980_381_256);
        assert_eq!(r.to_event(), ev);
    }

    #[test]
    fn json_of_earlier_versions_is_read() {
        let ev = sample();
        let json = serde_json::to_vec(&ev).unwrap();
        let mut scratch = Vec::new();
        let r = decode_any(&json, &mut scratch).unwrap();
        assert_eq!(r.to_event(), ev);
    }

    #[test]
    fn every_truncation_and_bad_bytes_are_errors_not_panics() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        for n in 0..buf.len() {
            assert!(decode(&buf[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(RecordError::Trailing(1)));
        let mut v = buf.clone();
        v[0] = 9;
        assert_eq!(decode(&v), Err(RecordError::UnknownVersion(9)));
        // A huge list count is refused before anything is allocated.
        let mut huge = vec![VERSION];
        huge.extend_from_slice(&0u32.to_le_bytes()); // event_id
        huge.extend_from_slice(&0u32.to_le_bytes()); // kind
        huge.extend_from_slice(&[0; 16]); // ts, duration
        huge.extend_from_slice(&0u32.to_le_bytes()); // host
        huge.extend_from_slice(&0u32.to_le_bytes()); // session_id
        huge.extend_from_slice(&[0; 8]); // seq
        huge.extend_from_slice(&0u32.to_le_bytes()); // statement
        huge.extend_from_slice(&0u32.to_le_bytes()); // command
        huge.extend_from_slice(&u32::MAX.to_le_bytes()); // tables
        assert_eq!(decode(&huge), Err(RecordError::Truncated));
        // Flipped bytes anywhere: an error or another event, never a panic.
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0xff;
            let _ = decode(&b);
        }
    }

    #[test]
    fn timestamps_to_micros() {
        assert_eq!(ts_micros("1970-01-01T00:00:01.000002Z"), 1_000_002);
        assert_eq!(
            ts_micros("2023-11-14T22:13:20.123456Z"),
            1_700_000_000_123_456
        );
        assert_eq!(
            ts_micros("2000-02-29T23:59:59.999999Z"),
            951_868_799_999_999
        );
        assert_eq!(ts_micros("1969-12-31T23:59:59.000000Z"), -1_000_000);
        // Other RFC 3339 forms.
        assert_eq!(
            ts_micros("2023-11-14T23:13:20.5+01:00"),
            1_700_000_000_500_000
        );
        assert_eq!(ts_micros("nonsense"), 0);
        assert_eq!(ts_micros("2023-13-14T22:13:20.123456Z"), 0);
    }
}
