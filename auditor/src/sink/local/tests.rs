use super::*;
use crate::sink::record;
use segment::Frame;

fn ev(n: u64) -> AuditEvent {
    AuditEvent {
        seq: n,
        session_id: "s1".into(),
        kind: EventKind::Statement,
        statement: format!("SELECT {n}").into(),
        ..AuditEvent::default()
    }
}

fn opts() -> VerifyOptions {
    VerifyOptions {
        now_us: Timestamp::now().unix_micros(),
        ..VerifyOptions::default()
    }
}

fn write(dir: &Path, key: &Path, range: std::ops::Range<u64>, per_block: u64, rotate: u64) {
    let (mut log, _) = SealedLog::open(dir, key, rotate).unwrap();
    for i in range {
        log.append(&ev(i)).unwrap();
        if (i + 1) % per_block == 0 {
            log.flush().unwrap();
        }
    }
    log.stop().unwrap();
}

fn seqs(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    read(dir, |e| out.push(e.seq)).unwrap();
    out
}

fn broken(v: Verdict) -> (Option<u64>, String) {
    match v {
        Verdict::Broken { event, what, .. } => (event, what),
        Verdict::Intact(r) => panic!("intact: {r:?}"),
    }
}

fn intact(v: Verdict) -> Report {
    match v {
        Verdict::Intact(r) => r,
        Verdict::Broken { path, what, .. } => panic!("broken at {}: {what}", path.display()),
    }
}

#[test]
fn events_read_back_in_order_across_runs_and_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    write(&dir, &key, 0..500, 7, 4096);
    write(&dir, &key, 500..600, 3, 4096);
    assert!(segment_files(&dir).unwrap().len() > 3, "rotated");
    assert_eq!(seqs(&dir), (0..600).collect::<Vec<_>>());
    let r = intact(verify(&dir, &opts()).unwrap());
    assert_eq!(r.events, 600);
    assert!(matches!(r.ending, Ending::Stopped { .. }));
    // Private: the directory 0700, every file 0600.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.path().display());
    }
    // Every event as it went in, field for field.
    let mut back = Vec::new();
    read(&dir, |e| back.push(e)).unwrap();
    assert_eq!(back[7], ev(7));
}

#[test]
fn an_old_log_is_read_and_its_chain_continued() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    let old: Vec<_> = (0..20).map(ev).collect();
    legacy::write_for_test(&dir, &old, 8);
    write(&dir, &key, 20..30, 4, 1 << 20);
    assert_eq!(seqs(&dir), (0..30).collect::<Vec<_>>());
    let r = intact(verify(&dir, &opts()).unwrap());
    assert_eq!((r.legacy, r.events), ((20, 3), 30));
    // The first segment continues the old chain: an old line changed breaks it there...
    let first_old = legacy::log_files(&dir).unwrap()[0].clone();
    let text = std::fs::read_to_string(&first_old).unwrap();
    std::fs::write(&first_old, text.replacen("SELECT 3", "SELECT 8", 1)).unwrap();
    assert_eq!(broken(verify(&dir, &opts()).unwrap()).0, Some(4));
    // ...and the old files removed, the segment no longer follows anything.
    for f in legacy::log_files(&dir).unwrap() {
        std::fs::remove_file(f).unwrap();
    }
    let (_, what) = broken(verify(&dir, &opts()).unwrap());
    assert!(what.contains("does not continue"), "{what}");
}

/// Rewrites the first segment's bytes with `f` (frames as (offset, bytes)).
fn tamper(dir: &Path, f: impl FnOnce(&mut Vec<u8>, &[(usize, usize)])) {
    let path = segment_files(dir).unwrap()[0].clone();
    let mut buf = std::fs::read(&path).unwrap();
    let mut records = Vec::new();
    let mut at = segment::HEADER_LEN;
    while let Some((frame, next)) = segment::next_frame(&buf, at) {
        if matches!(frame, Frame::Record(_)) {
            records.push((at, next));
        }
        at = next;
    }
    f(&mut buf, &records);
    std::fs::write(&path, buf).unwrap();
}

#[test]
fn a_modified_removed_or_reordered_record_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    write(&dir, &key, 0..10, 5, 1 << 20);
    let pristine = std::fs::read(&segment_files(&dir).unwrap()[0]).unwrap();
    let restore = || std::fs::write(&segment_files(&dir).unwrap()[0], &pristine).unwrap();

    // Record 3 ("SELECT 2") changed, same length.
    tamper(&dir, |buf, recs| {
        let (a, b) = recs[2];
        let pos = buf[a..b].windows(8).position(|w| w == b"SELECT 2").unwrap();
        buf[a + pos + 7] = b'9';
    });
    let (record, what) = broken(verify(&dir, &opts()).unwrap());
    assert_eq!(record, Some(3), "{what}");
    assert!(what.contains("modified"), "{what}");
    restore();

    // Record 7 removed.
    tamper(&dir, |buf, recs| {
        let (a, b) = recs[6];
        buf.drain(a..b);
    });
    let (record, what) = broken(verify(&dir, &opts()).unwrap());
    assert_eq!(record, Some(7), "{what}");
    assert!(what.contains("removed"), "{what}");
    restore();

    // Records 2 and 3 swapped.
    tamper(&dir, |buf, recs| {
        let (a, m) = recs[1];
        let (_, b) = recs[2];
        let (one, two) = (buf[a..m].to_vec(), buf[m..b].to_vec());
        buf.splice(a..b, two.into_iter().chain(one));
    });
    let (record, what) = broken(verify(&dir, &opts()).unwrap());
    assert_eq!(record, Some(2), "{what}");
    assert!(
        what.contains("moved") || what.contains("reordered"),
        "{what}"
    );
    restore();
    intact(verify(&dir, &opts()).unwrap());
}

#[test]
fn a_truncated_tail_is_seen_by_verify_and_by_the_next_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    write(&dir, &key, 0..10, 5, 1 << 20);
    // Cut the last blocks (records 6-10 and the stop) off the file: whole frames, so the
    // rest of the log is a consistent chain on its own.
    let path = segment_files(&dir).unwrap()[0].clone();
    let buf = std::fs::read(&path).unwrap();
    let mut at = segment::HEADER_LEN;
    let mut seals = Vec::new();
    while let Some((frame, next)) = segment::next_frame(&buf, at) {
        if matches!(frame, Frame::Seal(_)) {
            seals.push(next);
        }
        at = next;
    }
    // Seals: start, records 1-5, records 6-10, stop. Keep through the second.
    std::fs::write(&path, &buf[..seals[1]]).unwrap();
    let (record, what) = broken(verify(&dir, &opts()).unwrap());
    assert_eq!(record, Some(6), "{what}");
    assert!(
        what.contains("truncated") && what.contains("5 records"),
        "{what}"
    );
    // The next daemon records it in the trail, then its own head moves on.
    let (log, report) = SealedLog::open(&dir, &key, 1 << 20).unwrap();
    assert!(report.truncated.is_some());
    drop(log);
    std::fs::remove_file(dir.join(HEAD_FILE)).unwrap();
    let (_, what) = broken(verify(&dir, &opts()).unwrap());
    assert!(what.contains("head of the log is missing"), "{what}");
}

#[test]
fn the_sink_records_a_truncation_found_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    write(&dir, &key, 0..4, 2, 1 << 20);
    write(&dir, &key, 4..8, 2, 1 << 20);
    // The whole second run's segment removed.
    std::fs::remove_file(segment_files(&dir).unwrap().pop().unwrap()).unwrap();
    let cfg = LocalLogConfig::default();
    let sink = LocalLogSink::open(&dir, &key, &cfg, "h1", None).unwrap();
    Box::new(sink).finish(std::time::Duration::ZERO).unwrap();
    let mut gaps = Vec::new();
    read(&dir, |e| {
        if e.flags.contains(Flag::LogTruncated) {
            gaps.push(e.statement.to_string())
        }
    })
    .unwrap();
    assert_eq!(gaps.len(), 1);
    // Four events and their session's context.
    assert!(gaps[0].contains("5 records were removed"), "{}", gaps[0]);
    intact(verify(&dir, &opts()).unwrap());
}

/// What a root user who holds the key file now can do: rewrite a block and everything
/// after it, recompute every hash and the head, and seal with the key they hold.
/// `same_epochs`: keep each block's epoch and time (a past block claims to be from then);
/// else re-seal everything as of the current epoch.
fn forge_with_current_key(dir: &Path, key: &Path, same_epochs: bool) {
    let path = segment_files(dir).unwrap()[0].clone();
    let buf = std::fs::read(&path).unwrap();
    let header = Header::decode(&buf).unwrap();
    let sk = SealingKey::load(key).unwrap().unwrap();
    let mut out = buf[..segment::HEADER_LEN].to_vec();
    let mut prev = header.prev_hash;
    let mut digests = Vec::new();
    let mut at = segment::HEADER_LEN;
    let mut last = None;
    let mut contexts = compact::ContextTable::default();
    while let Some((frame, next)) = segment::next_frame(&buf, at) {
        match frame {
            Frame::Context(p) => {
                contexts.add(p).unwrap();
                digests.extend_from_slice(&segment::digest(p));
                segment::write_frame(&mut out, segment::KIND_CONTEXT, p);
            }
            Frame::Record(p) => {
                let mut ev = contexts.event(p).unwrap();
                let mut rec = p.to_vec();
                if ev.seq == 2 {
                    ev.statement = "SELECT 'innocent'".into();
                    rec.clear();
                    record::encode(&ev, &mut rec);
                }
                digests.extend_from_slice(&segment::digest(&rec));
                segment::write_record_frame(&mut out, &rec);
            }
            Frame::Seal(p) => {
                let mut s = Seal::decode(p).unwrap();
                s.digests = std::mem::take(&mut digests);
                if !same_epochs {
                    s.epoch = sk.epoch();
                    s.ts_us = sk.epochs().epoch_start(sk.epoch());
                }
                s.hash = s.compute_hash(&prev);
                s.seal = sk.seal(&s.hash);
                prev = s.hash;
                s.write_frame(&mut out);
                last = Some(s);
            }
            Frame::Bad { .. } => panic!(),
        }
        at = next;
    }
    std::fs::write(&path, out).unwrap();
    let s = last.unwrap();
    let head = Head {
        segment: header.segment,
        block: s.block,
        records: s.records,
        ts_us: s.ts_us,
        hash: s.hash,
    };
    std::fs::write(dir.join(HEAD_FILE), head.encode()).unwrap();
}

#[test]
fn sealed_blocks_cannot_be_rewritten_with_a_later_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    // Epochs of 60 s that began 10 minutes ago: the log is written in epoch 10.
    let start = Timestamp::now().unix_micros() - 600_000_000;
    let vk = SealingKey::setup_from(&key, 60, start).unwrap();
    write(&dir, &key, 0..6, 3, 1 << 20);
    let with_key = VerifyOptions {
        key: Some(vk.clone()),
        ..opts()
    };
    let r = intact(verify(&dir, &with_key).unwrap());
    assert_eq!(r.sealed, r.blocks);
    assert!(r.sealed >= 4, "{r:?}");
    assert!(
        r.notes.len() == 1 && r.notes[0].contains("10 epochs after"),
        "{:?}",
        r.notes
    );
    // Without the key the chain still verifies, and says the seals were not checked.
    let r = intact(verify(&dir, &opts()).unwrap());
    assert!(r.notes.iter().any(|n| n.contains("--key")), "{:?}", r.notes);

    // The host is taken in a later epoch: the key on disk has moved on.
    let mut sk = SealingKey::load(&key).unwrap().unwrap();
    sk.advance_to(sk.epoch() + 1).unwrap();
    drop(sk);
    let pristine = std::fs::read(&segment_files(&dir).unwrap()[0]).unwrap();
    forge_with_current_key(&dir, &key, true);
    // Consistent on its own: the chain and the head agree...
    intact(verify(&dir, &opts()).unwrap());
    // ...but not with the key kept off the host: the blocks claim epoch 10, whose key is
    // gone from the host.
    let (record, what) = broken(verify(&dir, &with_key).unwrap());
    assert_eq!(record, Some(1), "{what}");
    assert!(what.contains("seal does not verify"), "{what}");
    // Sealed again as of the current epoch, the seals hold, but the verdict says the log
    // was sealed only from now, long after the key was made.
    std::fs::write(&segment_files(&dir).unwrap()[0], &pristine).unwrap();
    forge_with_current_key(&dir, &key, false);
    let r = intact(verify(&dir, &with_key).unwrap());
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("11 epochs after the key was made")),
        "{:?}",
        r.notes
    );
    // A different key family is named as such.
    let other = SealingKey::setup(&tmp.path().join("other.key"), 60).unwrap();
    let (_, what) = broken(
        verify(
            &dir,
            &VerifyOptions {
                key: Some(other),
                ..opts()
            },
        )
        .unwrap(),
    );
    assert!(what.contains("another key"), "{what}");
}

#[test]
fn a_running_writer_must_reach_the_current_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    let start = Timestamp::now().unix_micros() - 600_000_000;
    let vk = SealingKey::setup_from(&key, 60, start).unwrap();
    let (mut log, _) = SealedLog::open(&dir, &key, 1 << 20).unwrap();
    log.append(&ev(0)).unwrap();
    log.flush().unwrap();
    let o = VerifyOptions {
        key: Some(vk),
        writer_running: true,
        now_us: Timestamp::now().unix_micros(),
        anchors: None,
    };
    intact(verify(&dir, &o).unwrap());
    // Three epochs later with no seal since: what the daemon sealed was cut off.
    let later = VerifyOptions {
        now_us: o.now_us + 180_000_000,
        ..o.clone()
    };
    let (_, what) = broken(verify(&dir, &later).unwrap());
    assert!(what.contains("truncated"), "{what}");
    // Not running: the log may simply have ended (the verdict says how it ends).
    let stopped = VerifyOptions {
        writer_running: false,
        ..later
    };
    let r = intact(verify(&dir, &stopped).unwrap());
    assert!(matches!(r.ending, Ending::Open { .. }));
    drop(log);
}

#[test]
fn a_crash_leaves_unsealed_records_readable_and_noted() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    write(&dir, &key, 0..4, 4, 1 << 20);
    // A block whose seal never made it to disk (a write cut short).
    let path = segment_files(&dir).unwrap()[0].clone();
    let mut buf = std::fs::read(&path).unwrap();
    let mut rec = Vec::new();
    record::encode(&ev(4), &mut rec);
    segment::write_record_frame(&mut buf, &rec);
    buf.extend_from_slice(&[segment::KIND_SEAL, 200, 0]);
    std::fs::write(&path, &buf).unwrap();
    assert_eq!(seqs(&dir), vec![0, 1, 2, 3, 4]);
    let r = intact(verify(&dir, &opts()).unwrap());
    assert!(
        r.notes.iter().any(|n| n.contains("never sealed")),
        "{:?}",
        r.notes
    );
    assert!(
        r.notes.iter().any(|n| n.contains("inside a frame")),
        "{:?}",
        r.notes
    );
    // The next run continues from the last seal, in a new segment.
    let (log, report) = SealedLog::open(&dir, &key, 1 << 20).unwrap();
    assert_eq!(report.unsealed, 1);
    assert!(report.truncated.is_none());
    drop(log);
    intact(verify(&dir, &opts()).unwrap());
}

#[test]
fn a_follower_sees_new_events_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    let (mut log, _) = SealedLog::open(&dir, &key, 4096).unwrap();
    log.append(&ev(0)).unwrap();
    log.flush().unwrap();
    let end = read(&dir, |_| {}).unwrap();
    assert_eq!(end.events, 1);
    let mut f = Follower::new(&dir, &end);
    let mut seen = Vec::new();
    f.poll(&mut |e| seen.push(e.seq)).unwrap();
    assert!(seen.is_empty());
    for i in 1..40 {
        log.append(&ev(i)).unwrap();
        log.flush().unwrap();
        if i % 10 == 0 {
            f.poll(&mut |e| seen.push(e.seq)).unwrap();
        }
    }
    log.stop().unwrap();
    f.poll(&mut |e| seen.push(e.seq)).unwrap();
    assert!(segment_files(&dir).unwrap().len() > 1);
    assert_eq!(seen, (1..40).collect::<Vec<_>>());
}

#[test]
fn heads_sent_elsewhere_catch_a_consistent_rewrite_and_a_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    let shared = SharedHead::default();
    let (mut log, _) = SealedLog::open(&dir, &key, 1 << 20).unwrap();
    log.share_head(shared.clone());
    let mut anchors = Vec::new();
    for i in 0..6 {
        log.append(&ev(i)).unwrap();
        log.flush().unwrap();
        let h = shared.lock().unwrap().clone().unwrap();
        anchors.push(Anchor {
            block: h.block,
            records: h.records,
            hash: h.hash,
            ts_us: h.ts_us,
        });
    }
    log.stop().unwrap();
    let with = |a: &[Anchor]| VerifyOptions {
        anchors: Some(a.to_vec()),
        ..opts()
    };
    let r = intact(verify(&dir, &with(&anchors)).unwrap());
    assert_eq!(r.anchored.as_ref().map(|a| a.0), Some(6));
    // Rewritten consistently (no key): the chain and the head agree, the anchors do not.
    let key_less = tmp.path().join("none.key");
    let pristine = std::fs::read(&segment_files(&dir).unwrap()[0]).unwrap();
    SealingKey::setup(&key_less, 60).unwrap();
    forge_with_current_key(&dir, &key_less, true);
    intact(verify(&dir, &opts()).unwrap());
    let (record, what) = broken(verify(&dir, &with(&anchors)).unwrap());
    assert_eq!(record, Some(3), "{what}");
    assert!(
        what.contains("block 3 is not the block ClickHouse received"),
        "{what}"
    );
    // Cut after the fourth record, head rewritten to match: only the anchors see it.
    std::fs::write(&segment_files(&dir).unwrap()[0], &pristine).unwrap();
    let buf = pristine.clone();
    let mut at = segment::HEADER_LEN;
    let mut seals = Vec::new();
    while let Some((frame, next)) = segment::next_frame(&buf, at) {
        if let Frame::Seal(p) = frame {
            seals.push((next, Seal::decode(p).unwrap()));
        }
        at = next;
    }
    let (cut, s) = &seals[4]; // start, then records 1-4
    std::fs::write(&segment_files(&dir).unwrap()[0], &buf[..*cut]).unwrap();
    let head = Head {
        segment: 1,
        block: s.block,
        records: s.records,
        ts_us: s.ts_us,
        hash: s.hash,
    };
    std::fs::write(dir.join(HEAD_FILE), head.encode()).unwrap();
    intact(verify(&dir, &opts()).unwrap());
    let (_, what) = broken(verify(&dir, &with(&anchors)).unwrap());
    assert!(
        what.contains("truncated: ClickHouse received block"),
        "{what}"
    );
}

#[test]
fn damaged_bytes_anywhere_are_reported_never_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, key) = (tmp.path().join("log"), tmp.path().join("seal.key"));
    let vk = SealingKey::setup(&key, 60).unwrap();
    write(&dir, &key, 0..12, 4, 1 << 20);
    let path = segment_files(&dir).unwrap()[0].clone();
    let pristine = std::fs::read(&path).unwrap();
    let keyed = VerifyOptions {
        key: Some(vk),
        ..opts()
    };
    let mut broken_verdicts = 0;
    // Every byte flipped in turn, then cut at every length: verify and read must answer.
    for i in 0..pristine.len() {
        let mut buf = pristine.clone();
        buf[i] ^= 0x5a;
        std::fs::write(&path, &buf).unwrap();
        if matches!(verify(&dir, &keyed).unwrap(), Verdict::Broken { .. }) {
            broken_verdicts += 1;
        }
        read(&dir, |_| {}).unwrap();
    }
    // A flipped byte is always seen (with the key: the seals themselves are checked): in
    // a header, a frame, a record or a seal.
    assert_eq!(broken_verdicts, pristine.len());
    for cut in (0..pristine.len()).step_by(7) {
        std::fs::write(&path, &pristine[..cut]).unwrap();
        let _ = verify(&dir, &opts()).unwrap();
        read(&dir, |_| {}).unwrap();
    }
}
