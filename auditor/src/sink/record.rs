//! The ClickHouse spool's record: one audit event in a compact binary layout, read back
//! without copying (the strings of an [`EventRef`] borrow the spool's buffer; its event id
//! and parameters are made again from their bytes).
//!
//! JSON would do, but the spool sits on the path of every event twice (written by the
//! spool thread, read by the sender): parsing and escaping JSON there cost more CPU than
//! ClickHouse spends storing the row. The fields and their layout come from the event's
//! declaration (`audit/schema.rs`): a version byte, the number of fields, then the fields in
//! declaration order (event ids and keyed hashes compact: see `Field::put_as`). A record
//! with fewer fields (an earlier version) reads the missing ones as their defaults; layout
//! 2 (ids and hashes as text), layout 1 (no field count) and the JSON of earlier versions
//! are still read, so a spool survives upgrades.

use crate::{
    audit::{
        event::{AuditEvent, EventRef, ProcessIdentity, FIELDS},
        schema::RecordReader,
    },
    workload::workload_name,
};

pub use crate::audit::schema::RecordError;

/// First byte of every record in this layout. The first bytes of records written against
/// frames (`local/compact.rs`: 3 to 6) are in the same place of a log or spool, so no
/// layout of either takes a number of the other.
pub const VERSION: u8 = 7;
/// This layout before compact ids: event ids and keyed hashes as text.
const VERSION_TEXT_IDS: u8 = 2;
const _: () = assert!(
    !crate::sink::local::compact::is_compact(Some(&VERSION))
        && !crate::sink::local::compact::is_compact(Some(&VERSION_TEXT_IDS))
);
/// Fields of layout 1, which had no field count.
const V1_FIELDS: usize = 43;

/// Appends the record of `ev` to `out`.
pub fn encode(ev: &AuditEvent, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
    ev.put_fields(out);
}

/// The reader of a record in this layout (or layout 1), past its header, and the number
/// of fields it holds.
fn fields_of(rec: &[u8]) -> Result<(RecordReader<'_>, usize), RecordError> {
    let mut r = RecordReader::new(rec);
    let version = r.u8()?;
    let fields = match version {
        1 => V1_FIELDS,
        VERSION | VERSION_TEXT_IDS => usize::from(r.u16()?),
        v => return Err(RecordError::UnknownVersion(v)),
    };
    r.compact_ids = version == VERSION;
    if fields > FIELDS.len() {
        // Written by a newer version: its extra fields cannot be read (or dropped).
        return Err(RecordError::UnknownVersion(VERSION));
    }
    Ok((r, fields))
}

/// Reads a record in this layout (or layout 1).
pub fn decode(rec: &[u8]) -> Result<EventRef<'_>, RecordError> {
    let (mut r, fields) = fields_of(rec)?;
    let ev = EventRef::get_fields(&mut r, fields)?;
    if !r.is_empty() {
        return Err(RecordError::Trailing(r.remaining()));
    }
    Ok(ev)
}

/// Appends the ClickHouse RowBinary row of a record (this layout, layout 1, or the JSON of
/// earlier versions, re-encoded into `scratch` first) to `out`: the columns of a server
/// of style `compat`, copied from the record's bytes. On an error `out` is as it was.
pub fn to_row(
    rec: &[u8],
    scratch: &mut Vec<u8>,
    compat: bool,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let rec = if rec.first() == Some(&b'{') {
        json_to_record(rec, scratch)?;
        scratch.as_slice()
    } else {
        rec
    };
    let start = out.len();
    let copied = fields_of(rec).and_then(|(mut r, fields)| {
        AuditEvent::record_to_row(&mut r, fields, compat, out)?;
        if !r.is_empty() {
            return Err(RecordError::Trailing(r.remaining()));
        }
        Ok(())
    });
    if copied.is_err() {
        out.truncate(start);
    }
    copied
}

/// Reads a record of this layout or of the JSON layout of earlier versions; a JSON record
/// is re-encoded into `scratch` (which the result then borrows).
pub fn decode_any<'a>(
    rec: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<EventRef<'a>, RecordError> {
    if rec.first() == Some(&b'{') {
        json_to_record(rec, scratch)?;
        return decode(scratch);
    }
    decode(rec)
}

/// Re-encodes a record of the JSON layout of earlier versions into `out` (this layout).
fn json_to_record(rec: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
    let mut ev: AuditEvent =
        serde_json::from_slice(rec).map_err(|e| RecordError::Json(e.to_string()))?;
    if ev.workload.is_empty() {
        // Those versions derived it when the row was sent.
        ev.workload = workload_name(&ProcessIdentity {
            comm: ev.comm.clone(),
            cgroup_path: ev.cgroup_path.clone(),
            container_id: ev.container_id.clone(),
            pod_uid: ev.pod_uid.clone(),
            pod_name: ev.pod_name.clone(),
            namespace: ev.namespace.clone(),
            systemd_unit: ev.systemd_unit.clone(),
            ..ProcessIdentity::default()
        });
    }
    out.clear();
    encode(&ev, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{EventKind, Flag, Timestamp};

    fn sample() -> AuditEvent {
        AuditEvent {
            event_id: "01a20304-de26-7265-b42c-353bcf4fdf7c".into(),
            kind: EventKind::Statement,
            ts: Timestamp::parse("2026-11-22T11:29:40.381256Z").unwrap(),
            duration_us: 60,
            host: "vm".into(),
            session_id: "s1".into(),
            seq: 11,
            statement: "SELECT abalance FROM pgbench_accounts WHERE aid = $1 -- \"ü\"\n".into(),
            command: "SELECT".into(),
            tables: vec!["pgbench_accounts".into()].into(),
            fingerprint: "348bee4e67e86ca6".into(),
            protocol: "extended".into(),
            params: ["hmac:1b9891be7a5a66b4", "hmac:00"].into(),
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
            workload: "pod:prod/payments-1".into(),
            labels: std::collections::BTreeMap::from([("app".to_string(), "payments".to_string())])
                .into(),
            capture: "ebpf".into(),
            flags: Flag::MidStream.into(),
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
        assert_eq!(r.ts.unix_micros(), 1_795_346_980_381_256);
        assert_eq!(r.flags, ["mid_stream"]);
        assert_eq!(r.to_event().unwrap(), ev);
    }

    /// A record of layout 1, as the first version wrote it: no field count, and none of
    /// the fields added since (message_bytes, the policy fields, the approval fields).
    fn v1_record(ev: &AuditEvent) -> Vec<u8> {
        use crate::audit::schema::Field;
        let mut tail = Vec::new();
        ev.message_bytes.put(&mut tail);
        ev.policy.put(&mut tail);
        ev.policy_version.put(&mut tail);
        ev.decision.put(&mut tail);
        ev.decision_rule.put(&mut tail);
        ev.masked_columns.put(&mut tail);
        ev.approval_id.put(&mut tail);
        ev.approver.put(&mut tail);
        ev.masked_values.put(&mut tail);
        let mut buf = vec![1, 0, 0];
        ev.put_fields_as(&mut buf, false);
        buf.drain(1..3);
        buf[0] = 1;
        buf.truncate(buf.len() - tail.len());
        buf
    }

    #[test]
    fn records_of_earlier_layouts_are_read() {
        let ev = sample();
        let r = decode(&v1_record(&ev)).unwrap().to_event().unwrap();
        assert_eq!(r, ev);
        // A record with fewer fields than this version declares: the rest default.
        let mut short = vec![VERSION_TEXT_IDS];
        short.extend_from_slice(&2u16.to_le_bytes());
        crate::audit::schema::put_str(&mut short, "id-1");
        crate::audit::schema::put_str(&mut short, "gap");
        let r = decode(&short).unwrap();
        assert_eq!((r.event_id.as_str(), r.kind, r.seq), ("id-1", "gap", 0));
        // More fields than this version knows: refused, not misread.
        let mut long = vec![VERSION];
        long.extend_from_slice(&(FIELDS.len() as u16 + 1).to_le_bytes());
        assert!(decode(&long).is_err());
    }

    #[test]
    fn json_of_earlier_versions_is_read() {
        let ev = sample();
        // Those versions wrote the chain fields and no workload.
        let mut v = serde_json::to_value(&ev).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("workload");
        o.insert("prev_hash".into(), "00".into());
        o.insert("hash".into(), "11".into());
        let json = serde_json::to_vec(&v).unwrap();
        let mut scratch = Vec::new();
        let r = decode_any(&json, &mut scratch).unwrap();
        assert_eq!(r.to_event().unwrap(), ev);
    }

    #[test]
    fn unknown_names_from_a_newer_version_reach_clickhouse_untouched() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        // Rewrite the kind to a name this version does not know ("statement" -> "statemenX").
        let at = buf.windows(9).position(|w| w == b"statement").unwrap();
        buf[at + 8] = b'X';
        let r = decode(&buf).unwrap();
        assert_eq!(r.kind, "statemenX");
        assert!(matches!(r.to_event(), Err(RecordError::Unknown { .. })));
        assert_eq!(
            column(&row_of(&buf, true), "kind"),
            &Value::Str("statemenX".into())
        );
    }

    /// A value of a RowBinary row, read back by the column's type.
    #[derive(Debug, PartialEq)]
    enum Value {
        Str(String),
        Num(i128),
        Null,
        List(Vec<Value>),
        Pairs(Vec<(Value, Value)>),
    }

    /// Reads one RowBinary row by the table's column definitions (`name Type`, as the
    /// migrations create them), as ClickHouse would: every byte must belong to a column.
    fn read_row(row: &[u8], columns: &[String]) -> Vec<(String, Value)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let (mut n, mut shift) = (0u64, 0);
            loop {
                let byte = b[0];
                *b = &b[1..];
                n |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    return n;
                }
                shift += 7;
            }
        }
        fn fixed(b: &mut &[u8], n: usize, signed: bool) -> Value {
            let mut word = [0u8; 16];
            word[..n].copy_from_slice(&b[..n]);
            if signed && b[n - 1] & 0x80 != 0 {
                word[n..].fill(0xff);
            }
            *b = &b[n..];
            Value::Num(i128::from_le_bytes(word))
        }
        fn value(b: &mut &[u8], ty: &str) -> Value {
            if let Some(inner) = ty.strip_prefix("LowCardinality(") {
                return value(b, &inner[..inner.len() - 1]);
            }
            if let Some(inner) = ty.strip_prefix("Nullable(") {
                let null = b[0];
                *b = &b[1..];
                return match null {
                    1 => Value::Null,
                    0 => value(b, &inner[..inner.len() - 1]),
                    x => panic!("null flag {x}"),
                };
            }
            if let Some(inner) = ty.strip_prefix("Array(") {
                let n = varint(b);
                return Value::List(
                    (0..n)
                        .map(|_| value(b, &inner[..inner.len() - 1]))
                        .collect(),
                );
            }
            if ty == "Map(String, String)" {
                let n = varint(b);
                return Value::Pairs(
                    (0..n)
                        .map(|_| (value(b, "String"), value(b, "String")))
                        .collect(),
                );
            }
            match ty {
                "String" => {
                    let n = varint(b) as usize;
                    let s = std::str::from_utf8(&b[..n]).unwrap().to_string();
                    *b = &b[n..];
                    Value::Str(s)
                }
                "UInt8" => fixed(b, 1, false),
                "UInt16" => fixed(b, 2, false),
                "UInt32" | "DateTime('UTC')" => fixed(b, 4, false),
                "UInt64" => fixed(b, 8, false),
                "DateTime64(6, 'UTC')" => fixed(b, 8, true),
                t => panic!("a column type the test does not know: {t}"),
            }
        }
        let mut b = row;
        let values = columns
            .iter()
            .map(|c| {
                let (name, ty) = c.split_once(' ').unwrap();
                (name.to_string(), value(&mut b, ty))
            })
            .collect();
        assert!(b.is_empty(), "{} bytes after the last column", b.len());
        values
    }

    fn style(compat: bool) -> crate::audit::schema::ColumnStyle {
        crate::audit::schema::ColumnStyle {
            compat,
            low_cardinality: !compat,
        }
    }

    fn columns(compat: bool) -> Vec<String> {
        FIELDS
            .iter()
            .flat_map(|f| (f.columns)(f.name, f.low_cardinality, style(compat)))
            .collect()
    }

    fn row_of(rec: &[u8], compat: bool) -> Vec<(String, Value)> {
        let mut out = b"rows before".to_vec();
        to_row(rec, &mut Vec::new(), compat, &mut out).unwrap();
        assert_eq!(&out[..11], b"rows before");
        read_row(&out[11..], &columns(compat))
    }

    fn column<'r>(row: &'r [(String, Value)], name: &str) -> &'r Value {
        &row.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn strs(items: &[&str]) -> Value {
        Value::List(items.iter().map(|s| Value::Str(s.to_string())).collect())
    }

    #[test]
    fn a_record_is_copied_into_the_row_the_table_reads() {
        let mut ev = sample();
        ev.labels = std::collections::BTreeMap::from(
            [("app", "payments"), ("tier", "ü")].map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .into();
        ev.masked_values = vec![3, 1 << 40].into();
        ev.message_bytes = 300;
        ev.error_message = "x".repeat(200);
        let mut rec = Vec::new();
        encode(&ev, &mut rec);
        for compat in [true, false] {
            let row = row_of(&rec, compat);
            let text = |v: &str| Value::Str(v.to_string());
            assert_eq!(column(&row, "event_id"), &text(ev.event_id.as_str()));
            assert_eq!(column(&row, "kind"), &text("statement"));
            assert_eq!(column(&row, "statement"), &text(&ev.statement));
            // A length of 200 takes two bytes of varint.
            assert_eq!(column(&row, "error_message"), &text(&ev.error_message));
            assert_eq!(column(&row, "tables"), &strs(&["pgbench_accounts"]));
            assert_eq!(
                column(&row, "params"),
                &strs(&["hmac:1b9891be7a5a66b4", "hmac:00"])
            );
            assert_eq!(column(&row, "flags"), &strs(&["mid_stream"]));
            assert_eq!(column(&row, "rows"), &Value::Num(1));
            assert_eq!(column(&row, "tls"), &Value::Num(1));
            assert_eq!(column(&row, "client_port"), &Value::Num(44056));
            assert_eq!(column(&row, "pid"), &Value::Num(13653));
            assert_eq!(column(&row, "message_bytes"), &Value::Num(300));
            assert_eq!(
                column(&row, "masked_values"),
                &Value::List(vec![Value::Num(3), Value::Num(1 << 40)])
            );
            let micros = 1_795_346_980_381_256i128;
            if compat {
                assert_eq!(column(&row, "ts"), &Value::Num(micros / 1_000_000));
                assert_eq!(column(&row, "ts_us"), &Value::Num(micros % 1_000_000));
                assert_eq!(column(&row, "label_keys"), &strs(&["app", "tier"]));
                assert_eq!(column(&row, "label_values"), &strs(&["payments", "ü"]));
            } else {
                assert_eq!(column(&row, "ts"), &Value::Num(micros));
                assert_eq!(
                    column(&row, "labels"),
                    &Value::Pairs(vec![
                        (text("app"), text("payments")),
                        (text("tier"), text("ü"))
                    ])
                );
            }
        }
        // No rows: NULL; a time before the epoch.
        ev.rows = None;
        ev.ts = Timestamp(-1);
        rec.clear();
        encode(&ev, &mut rec);
        let row = row_of(&rec, true);
        assert_eq!(column(&row, "rows"), &Value::Null);
        assert_eq!(column(&row, "ts"), &Value::Num(u32::MAX as i128));
        assert_eq!(column(&row, "ts_us"), &Value::Num(999_999));
        assert_eq!(column(&row_of(&rec, false), "ts"), &Value::Num(-1));
    }

    #[test]
    fn records_of_earlier_layouts_become_rows_with_defaults() {
        let ev = sample();
        let mut json = serde_json::to_value(&ev).unwrap();
        json.as_object_mut().unwrap().remove("workload");
        let json = serde_json::to_vec(&json).unwrap();
        let mut current = Vec::new();
        encode(&ev, &mut current);
        for compat in [true, false] {
            // Layout 1 lacks the fields added since, all at their defaults in `sample`.
            assert_eq!(row_of(&v1_record(&ev), compat), row_of(&current, compat));
            assert_eq!(row_of(&json, compat), row_of(&current, compat));
        }
    }

    #[test]
    fn every_truncation_and_bad_bytes_are_errors_not_panics() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        let mut scratch = Vec::new();
        let mut row = b"rows before".to_vec();
        for n in 0..buf.len() {
            assert!(decode(&buf[..n]).is_err(), "prefix of {n} bytes");
            // Nothing of a record that fails is left in the rows.
            assert!(to_row(&buf[..n], &mut scratch, n % 2 == 0, &mut row).is_err());
            assert_eq!(row, b"rows before");
        }
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(RecordError::Trailing(1)));
        let mut v = buf.clone();
        v[0] = 9;
        assert_eq!(decode(&v), Err(RecordError::UnknownVersion(9)));
        // A huge list count is refused before anything is allocated.
        let mut huge = vec![VERSION];
        huge.extend_from_slice(&(FIELDS.len() as u16).to_le_bytes());
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
            let _ = to_row(&b, &mut scratch, i % 2 == 0, &mut row);
        }
    }
}
