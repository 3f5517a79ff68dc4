//! `mdbus bench wal`: appending under each durability policy against a raw sequential write of the
//! same bytes with the same sync points (measured in the same run), replay read throughput, and
//! seek latency to a random seq.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mdbus_schema::frame::header;
use mdbus_schema::{FrameKind, FrameRef, FrameWriter, Interval, Kline, Symbol};
use mdbus_wal::{Durability, Wal, WalOptions, WalReader};

use crate::{BenchOptions, BenchRunError, Row};

/// Frames per commit: one 16 KiB sample of K-line frames, as the broker commits per sample.
const BATCH: usize = 73;

fn frames(n: u64) -> Vec<Vec<u8>> {
    // Invariant: a literal valid symbol.
    let sym = Symbol::new("BTCUSDT").unwrap_or_else(|_| unreachable!());
    let mut w = FrameWriter::with_capacity(512);
    (1..=n)
        .map(|seq| {
            w.clear();
            let mut k = Kline::empty(Interval::M1, 1_700_000_000_000, sym, 0, 2, 5, 8_723_201 + seq as i64 % 97);
            k.trade_count = seq;
            let _ = w.push_kline(header(FrameKind::Kline, 1, seq), &k);
            w.as_bytes().to_vec()
        })
        .collect()
}

fn err(what: &str) -> impl Fn(std::io::Error) -> BenchRunError + '_ {
    move |e| BenchRunError::Peer { what: what.into(), detail: e.to_string() }
}

fn row(name: &str, kind: &str, n: u64, elapsed: Duration, bytes: u64) -> Row {
    Row::rate(name, kind, n, elapsed, bytes)
}

/// Writes `batch` to `f` `batches` times, syncing as `durability` says (after a batch, as the log
/// commits): the plain sequential write a log is measured against. Returns how long it took.
pub(crate) fn raw_write(
    f: &mut File,
    batch: &[u8],
    batches: usize,
    durability: Durability,
) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut last_sync = Instant::now();
    for _ in 0..batches {
        f.write_all(batch)?;
        let sync = match durability {
            Durability::None => false,
            Durability::EveryBatch => true,
            Durability::Interval(d) => last_sync.elapsed() >= d,
        };
        if sync {
            f.sync_data()?;
            last_sync = Instant::now();
        }
    }
    Ok(start.elapsed())
}

/// Runs the WAL scenario in `tmp` (removed afterwards).
pub fn run(o: &BenchOptions, tmp: &Path) -> Result<Vec<Row>, BenchRunError> {
    let n: u64 = o.count.unwrap_or(if o.quick { 200_000 } else { 2_000_000 });
    let data = frames(n);
    let record_bytes: u64 = data.iter().map(|f| 16 + f.len() as u64).sum();
    let mut rows = Vec::new();
    for (name, durability) in [
        ("none", Durability::None),
        ("interval:10", Durability::Interval(Duration::from_millis(10))),
        ("every-batch", Durability::EveryBatch),
    ] {
        // The baseline: the same bytes, the same batches, the same syncs, one plain file.
        let raw_path = tmp.join(format!("raw-{name}"));
        let mut f = File::create(&raw_path).map_err(err("raw write"))?;
        let batch_bytes: Vec<u8> = data[..BATCH.min(data.len())]
            .iter()
            .flat_map(|fr| {
                let mut r = vec![0u8; 16];
                r.extend_from_slice(fr);
                r
            })
            .collect();
        let took =
            raw_write(&mut f, &batch_bytes, (n as usize).div_ceil(BATCH), durability).map_err(err("raw write"))?;
        let raw = row(&format!("raw sequential write, sync {name} (baseline)"), "raw", n, took, record_bytes);
        drop(f);
        let _ = std::fs::remove_file(&raw_path);

        let dir = tmp.join(format!("wal-{name}"));
        let (mut wal, _) = Wal::open(&dir, WalOptions { stream_id: 1, segment_bytes: 64 << 20, durability })
            .map_err(|e| BenchRunError::Peer { what: "wal".into(), detail: e.to_string() })?;
        let start = Instant::now();
        for (i, fr) in data.iter().enumerate() {
            wal.append(i as u64 + 1, fr)
                .map_err(|e| BenchRunError::Peer { what: "wal".into(), detail: e.to_string() })?;
            if (i + 1) % BATCH == 0 {
                wal.commit().map_err(|e| BenchRunError::Peer { what: "wal".into(), detail: e.to_string() })?;
            }
        }
        wal.commit().map_err(|e| BenchRunError::Peer { what: "wal".into(), detail: e.to_string() })?;
        let mut w = row(&format!("wal append, durability {name}"), "wal", n, start.elapsed(), record_bytes);
        w.ratio_vs_baseline = w.per_second / raw.per_second.max(1.0);
        drop(wal);
        rows.push(raw);
        rows.push(w);
        if name != "none" {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    // Replay and seek on the `none` log.
    let dir = tmp.join("wal-none");
    let read_err =
        |e: mdbus_wal::WalReadError| BenchRunError::Peer { what: "wal replay".into(), detail: e.to_string() };
    let mut reader = WalReader::open(&dir).map_err(read_err)?;
    let start = Instant::now();
    let mut count = 0u64;
    while let Some(rec) = reader.next_record().map_err(read_err)? {
        count += 1;
        std::hint::black_box(rec.payload.len());
    }
    rows.push(row("wal replay (records, CRC checked)", "wal", count, start.elapsed(), record_bytes));
    let mut reader = WalReader::open(&dir).map_err(read_err)?;
    let start = Instant::now();
    let mut count = 0u64;
    while let Some(rec) = reader.next_record().map_err(read_err)? {
        // Payloads come aligned from the reader's buffer: validated in place.
        if FrameRef::parse(rec.payload).and_then(|f| f.kline().map(|k| k.close.to_native())).is_ok() {
            count += 1;
        }
    }
    rows.push(row("wal replay + frame validation", "wal", count, start.elapsed(), record_bytes));
    // Seek latency: random seqs (xorshift, fixed seed), a fresh seek each time.
    // Invariant: valid constant bounds.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| unreachable!());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let seeks = if o.quick { 2_000 } else { 20_000 };
    for _ in 0..seeks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let seq = x % n + 1;
        let t = Instant::now();
        reader.seek(seq).map_err(read_err)?;
        let rec = reader.next_record().map_err(read_err)?;
        let _ = hist.record(t.elapsed().as_nanos().max(1) as u64);
        if rec.map(|r| r.seq) != Some(seq) {
            return Err(BenchRunError::Peer {
                what: "wal seek".into(),
                detail: format!("seek to {seq} landed elsewhere"),
            });
        }
    }
    let mut r =
        row("wal seek to a random seq + read it", "wal", seeks, Duration::from_nanos(hist.mean() as u64 * seeks), 0);
    r.p50_ns = hist.value_at_quantile(0.5);
    r.p99_ns = hist.value_at_quantile(0.99);
    r.p999_ns = hist.value_at_quantile(0.999);
    r.max_ns = hist.max();
    rows.push(r);
    Ok(rows)
}
