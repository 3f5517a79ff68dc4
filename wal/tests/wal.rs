//! The log on real files: round trips, seeking, recovery at every byte, corruption reports,
//! retention, following a log being written.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use mdbus_wal::{check, Durability, RetentionPolicy, Wal, WalOptions, WalReadError, WalReader};

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("mdbus-wal-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn payload(seq: u64) -> Vec<u8> {
    // Sizes vary (1..=300 bytes), content depends on the seq.
    (0..(seq * 37 % 300 + 1)).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)).collect()
}

fn opts(segment_bytes: u64) -> WalOptions {
    WalOptions { stream_id: 1, segment_bytes, durability: Durability::None }
}

fn write(dir: &Path, seqs: std::ops::RangeInclusive<u64>, segment_bytes: u64) {
    let (mut w, _) = Wal::open(dir, opts(segment_bytes)).unwrap();
    for s in seqs {
        w.append(s, &payload(s)).unwrap();
        if s % 10 == 0 {
            w.commit().unwrap();
        }
    }
    w.commit().unwrap();
}

fn read_all(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut r = WalReader::open(dir).unwrap();
    let mut v = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        v.push((rec.seq, rec.payload.to_vec()));
    }
    v
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_round_trip_across_segments_and_appending_resumes_after_reopen() {
    let d = Dir::new("rt");
    write(&d.0, 1..=3000, 64 * 1024);
    assert!(segments(&d.0).len() > 5, "rolled by size");
    let (w, report) = Wal::open(&d.0, opts(64 * 1024)).unwrap();
    assert_eq!(report.last_seq, Some(3000));
    assert_eq!(report.truncated, None);
    assert_eq!(w.next_seq(), Some(3001));
    drop(w);
    write(&d.0, 3001..=3100, 64 * 1024);
    let all = read_all(&d.0);
    assert_eq!(all.len(), 3100);
    for (i, (s, p)) in all.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1);
        assert_eq!(*p, payload(*s));
    }
    let (records, problems) = check(&d.0).unwrap();
    assert_eq!((records, problems.len()), (3100, 0));
}

#[test]
fn out_of_sequence_appends_are_refused() {
    let d = Dir::new("oos");
    let (mut w, _) = Wal::open(&d.0, opts(1 << 20)).unwrap();
    w.append(1, b"a").unwrap();
    assert!(w.append(3, b"c").is_err());
    assert!(w.append(1, b"a").is_err());
    w.append(2, b"b").unwrap();
}

#[test]
fn a_log_may_start_at_any_seq() {
    let d = Dir::new("start");
    write(&d.0, 500..=520, 1 << 20);
    let mut r = WalReader::open(&d.0).unwrap();
    assert_eq!(r.first_seq(), Some(500));
    assert!(matches!(r.seek(10), Err(WalReadError::TooOld { requested: 10, oldest: 500 })));
    r.seek(510).unwrap();
    assert_eq!(r.next_record().unwrap().unwrap().seq, 510);
    let (_, report) = Wal::open(&d.0, opts(1 << 20)).unwrap();
    assert_eq!(report.last_seq, Some(520));
}

#[test]
fn seeking_uses_the_index_instead_of_scanning_the_log() {
    let d = Dir::new("seek");
    write(&d.0, 1..=20_000, 256 * 1024);
    for target in [1u64, 2, 255, 256, 257, 9_999, 13_337, 19_999, 20_000] {
        let mut r = WalReader::open(&d.0).unwrap();
        r.seek(target).unwrap();
        let rec = r.next_record().unwrap().unwrap();
        assert_eq!(rec.seq, target);
        assert_eq!(rec.payload, &payload(target)[..]);
        assert!(r.records_skipped < 256, "seek to {target} scanned {} records", r.records_skipped);
    }
}

/// Truncating or corrupting the newest segment anywhere inside its last record: reopening keeps
/// exactly the whole records before it, never panics, and appending continues at the right seq.
#[test]
fn recovery_cuts_a_torn_or_corrupt_tail_at_every_byte_of_the_last_record() {
    let src = Dir::new("src");
    write(&src.0, 1..=40, 1 << 20);
    let seg = segments(&src.0).pop().unwrap();
    let full = std::fs::read(&seg).unwrap();
    // Where the last record starts: the file as it was after 39 records.
    let before = Dir::new("before");
    write(&before.0, 1..=39, 1 << 20);
    let last_start = std::fs::metadata(segments(&before.0).pop().unwrap()).unwrap().len() as usize;
    assert!(last_start < full.len());
    for cut in last_start..full.len() {
        for mode in ["truncate", "flip"] {
            if mode == "flip" && cut == full.len() {
                continue;
            }
            let d = Dir::new("cut");
            std::fs::create_dir_all(&d.0).unwrap();
            let bytes = match mode {
                "truncate" => full[..cut].to_vec(),
                _ => {
                    let mut b = full.clone();
                    b[cut] ^= 0x5a;
                    b
                }
            };
            let name = seg.file_name().unwrap();
            std::fs::write(d.0.join(name), &bytes).unwrap();
            let (mut w, report) = Wal::open(&d.0, opts(1 << 20)).unwrap();
            if mode == "truncate" && cut == last_start {
                // Cut exactly between records: a shorter, valid log.
                assert_eq!((report.last_seq, report.truncated), (Some(39), None));
                continue;
            }
            // A flip in the padding after the payload changes nothing that is checked.
            let padding_flip = mode == "flip" && report.truncated.is_none();
            if padding_flip {
                assert_eq!(report.last_seq, Some(40));
                continue;
            }
            assert_eq!(report.last_seq, Some(39), "{mode} at {cut}");
            let t = report.truncated.clone().unwrap_or_else(|| panic!("{mode} at {cut}: not reported"));
            assert_eq!(t.offset as usize, last_start, "{mode} at {cut}");
            assert_eq!(std::fs::metadata(d.0.join(name)).unwrap().len() as usize, last_start);
            w.append(40, b"again").unwrap();
            w.commit().unwrap();
            drop(w);
            let all = read_all(&d.0);
            assert_eq!(all.len(), 40);
            assert_eq!(all[39], (40, b"again".to_vec()));
        }
    }
}

#[test]
fn corruption_inside_an_older_segment_is_reported_with_its_offset_never_skipped() {
    let d = Dir::new("mid");
    write(&d.0, 1..=2000, 64 * 1024);
    let segs = segments(&d.0);
    let victim = &segs[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(victim, &bytes).unwrap();
    let (_, problems) = check(&d.0).unwrap();
    assert_eq!(problems.len(), 1);
    assert_eq!(&problems[0].path, victim);
    assert!(problems[0].offset as usize <= at);
    let mut r = WalReader::open(&d.0).unwrap();
    let err = loop {
        match r.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("corruption skipped"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, WalReadError::Corrupt { ref path, offset, .. } if path == victim && offset == problems[0].offset),
        "{err}"
    );
}

#[test]
fn retention_never_deletes_what_a_durable_consumer_has_not_acked() {
    let d = Dir::new("ret");
    write(&d.0, 1..=3000, 32 * 1024);
    let n = segments(&d.0).len();
    assert!(n > 10);
    let (mut w, _) = Wal::open(&d.0, opts(32 * 1024)).unwrap();
    let policy = RetentionPolicy { max_bytes: Some(1), max_age: None };
    // A consumer has acked up to 1000: only segments entirely at or below 1000 may go.
    let deleted = w.retain(&policy, Some(1000)).unwrap();
    let first = WalReader::open(&d.0).unwrap().first_seq().unwrap();
    assert!(first <= 1001, "seq 1001 must still be there, oldest is {first}");
    assert!(first > 1 && !deleted.is_empty());
    // No durable consumer: the size limit applies, the newest segment stays.
    w.retain(&policy, None).unwrap();
    assert_eq!(segments(&d.0).len(), 1);
    let mut r = WalReader::open(&d.0).unwrap();
    assert!(matches!(r.seek(1), Err(WalReadError::TooOld { requested: 1, .. })));
    assert_eq!(r.next_record().unwrap().unwrap().seq, r.first_seq().unwrap());
    // Nothing over the limit by age: nothing more goes.
    let policy = RetentionPolicy { max_bytes: None, max_age: Some(Duration::from_secs(3600)) };
    assert!(w.retain(&policy, None).unwrap().is_empty());
}

#[test]
fn payloads_come_aligned_and_whole_across_read_chunks_of_any_size() {
    // Records of 1 byte to 3 MiB: some cross the reader's chunk boundaries, some are larger than
    // its largest read, so its buffer moves and grows; every payload is whole and aligned.
    let dir = Dir::new("chunks");
    let sizes: Vec<usize> =
        (0..400usize).map(|i| if i % 97 == 5 { (3 << 20) - i } else { i * 131 % 20_000 + 1 }).collect();
    let body = |i: usize| -> Vec<u8> { (0..sizes[i]).map(|j| (i * 7 + j) as u8).collect() };
    let (mut w, _) = Wal::open(&dir.0, opts(64 << 20)).unwrap();
    for i in 0..sizes.len() {
        w.append(i as u64 + 1, &body(i)).unwrap();
    }
    w.commit().unwrap();
    let mut r = WalReader::open(&dir.0).unwrap();
    let mut n = 0;
    while let Some(rec) = r.next_record().unwrap() {
        assert!((rec.payload.as_ptr() as usize).is_multiple_of(mdbus_wal::RECORD_ALIGN), "seq {} unaligned", rec.seq);
        assert!(rec.payload == body(n).as_slice(), "seq {} differs", rec.seq);
        n += 1;
    }
    assert_eq!(n, sizes.len());
    // A seek lands inside the file and reads on from there just as well.
    r.seek(250).unwrap();
    for i in 249..sizes.len() {
        let rec = r.next_record().unwrap().unwrap();
        assert!(
            rec.payload == body(i).as_slice()
                && (rec.payload.as_ptr() as usize).is_multiple_of(mdbus_wal::RECORD_ALIGN)
        );
    }
}

#[test]
fn a_reader_follows_records_as_they_are_committed() {
    let d = Dir::new("follow");
    let (mut w, _) = Wal::open(&d.0, opts(16 * 1024)).unwrap();
    let mut r = WalReader::open(&d.0).unwrap();
    let mut seen = 0u64;
    for batch in 0..20u64 {
        for s in batch * 50 + 1..=batch * 50 + 50 {
            w.append(s, &payload(s)).unwrap();
        }
        w.commit().unwrap();
        while let Some(rec) = r.next_record().unwrap() {
            seen += 1;
            assert_eq!(rec.seq, seen);
        }
        assert_eq!(seen, batch * 50 + 50, "all committed records visible, across segment rolls");
    }
}

#[test]
fn a_seek_past_the_end_returns_that_seq_once_it_is_written() {
    let d = Dir::new("ahead");
    let (mut w, _) = Wal::open(&d.0, opts(1 << 20)).unwrap();
    for s in 1..=10 {
        w.append(s, &payload(s)).unwrap();
    }
    w.commit().unwrap();
    let mut r = WalReader::open(&d.0).unwrap();
    r.seek(15).unwrap();
    assert!(r.next_record().unwrap().is_none());
    for s in 11..=20 {
        w.append(s, &payload(s)).unwrap();
    }
    w.commit().unwrap();
    assert_eq!(r.next_record().unwrap().unwrap().seq, 15, "nothing before the seq sought");
}

#[test]
fn a_damaged_index_is_only_a_cache() {
    let d = Dir::new("badidx");
    write(&d.0, 1..=2_000, 1 << 20);
    let seg = segments(&d.0).pop().unwrap();
    let idx = seg.with_extension("idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    // Shift every offset: increasing, but pointing at the wrong places.
    for e in bytes.chunks_exact_mut(16) {
        let off = u64::from_le_bytes(e[8..16].try_into().unwrap()) + 16;
        e[8..16].copy_from_slice(&off.to_le_bytes());
    }
    std::fs::write(&idx, &bytes).unwrap();
    let mut r = WalReader::open(&d.0).unwrap();
    r.seek(1_777).unwrap();
    assert_eq!(r.next_record().unwrap().unwrap().seq, 1_777);
    std::fs::remove_file(&idx).unwrap();
    let mut r = WalReader::open(&d.0).unwrap();
    r.seek(1_999).unwrap();
    assert_eq!(r.next_record().unwrap().unwrap().seq, 1_999);
}

#[test]
fn durability_policies_parse() {
    assert_eq!("none".parse::<Durability>().unwrap(), Durability::None);
    assert_eq!("every-batch".parse::<Durability>().unwrap(), Durability::EveryBatch);
    assert_eq!("interval:5".parse::<Durability>().unwrap(), Durability::Interval(Duration::from_millis(5)));
    for bad in ["", "interval:", "interval:0", "interval:x", "always"] {
        assert!(bad.parse::<Durability>().is_err(), "{bad}");
    }
}

mod garbage {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Vec<u8> {
        let d = Dir::new("hdr");
        write(&d.0, 1..=1, 1 << 20);
        let bytes = std::fs::read(segments(&d.0).pop().unwrap()).unwrap();
        bytes[..32].to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Any bytes after a valid segment header: checking, reading and recovery never panic, and
        /// after recovery the log reads back cleanly to the last seq recovery reported.
        #[test]
        fn garbage_after_a_valid_header_never_panics_and_recovery_leaves_a_clean_log(
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            valid in 0u64..5,
        ) {
            let d = Dir::new("garbage");
            if valid > 0 {
                write(&d.0, 1..=valid, 1 << 20);
            } else {
                std::fs::create_dir_all(&d.0).unwrap();
                std::fs::write(d.0.join("seg-00000000000000000001.wal"), header()).unwrap();
            }
            let seg = segments(&d.0).pop().unwrap();
            let mut bytes = std::fs::read(&seg).unwrap();
            bytes.extend_from_slice(&tail);
            std::fs::write(&seg, &bytes).unwrap();
            let _ = check(&d.0);
            let mut r = WalReader::open(&d.0).unwrap();
            while let Ok(Some(_)) = r.next_record() {}
            let (w, report) = Wal::open(&d.0, opts(1 << 20)).unwrap();
            drop(w);
            prop_assert!(report.last_seq.unwrap_or(0) >= valid);
            let all = read_all(&d.0);
            prop_assert_eq!(all.last().map(|r| r.0), report.last_seq);
        }
    }
}

/// `interval` syncs run in the background (at most one at a time, started by a commit once the
/// interval has passed), `every-batch` syncs inline at every commit, `none` never; segment rolls
/// go on under background syncs, and everything committed reads back.
#[test]
fn each_durability_policy_syncs_as_it_says() {
    let commits = |durability: Durability, segment_bytes: u64, until: &dyn Fn(&Wal, u64) -> bool| {
        let d = Dir::new("sync");
        let (mut wal, _) = Wal::open(&d.0, WalOptions { stream_id: 1, segment_bytes, durability }).unwrap();
        let (mut seq, mut n) = (1u64, 0u64);
        let start = std::time::Instant::now();
        while !until(&wal, n) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{durability:?}: {} syncs after {n} commits",
                wal.syncs()
            );
            for _ in 0..10 {
                wal.append(seq, &payload(seq)).unwrap();
                seq += 1;
            }
            wal.commit().unwrap();
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        let syncs = wal.syncs();
        drop(wal);
        assert_eq!(read_all(&d.0).len() as u64, seq - 1);
        (syncs, n)
    };
    // Background: syncs keep happening while commits go on, across segment rolls.
    let (syncs, _) = commits(Durability::Interval(Duration::from_millis(1)), 4096, &|w, _| w.syncs() >= 5);
    assert!(syncs >= 5);
    // Inline: one per commit that wrote something.
    let (syncs, n) = commits(Durability::EveryBatch, 1 << 20, &|_, n| n >= 5);
    assert_eq!(syncs, n);
    let (syncs, _) = commits(Durability::None, 1 << 20, &|_, n| n >= 5);
    assert_eq!(syncs, 0);
}
