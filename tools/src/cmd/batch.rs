//! `mdbus batch`: the delayed-batch writer.
//!
//! Upstream: the broker's `snapshot` stream (`Begin`, K-line frames, `End`, heartbeats).
//! Downstream: the database (one transaction per snapshot, upserts on symbol + interval + open
//! time, so a duplicate is harmless) and the `acks` stream back to the broker, which commits the
//! snapshot only then.
//!
//! A snapshot seen incompletely (a gap in the stream's seq: the stream drops the oldest sample
//! when this process falls behind) is not written and not acked; the broker re-sends its rows
//! merged into a later snapshot. Each complete snapshot replaces the one waiting to be written
//! (it contains all of its rows). While the database is unavailable the writer keeps the latest
//! snapshot (bounded: one), retries with exponential backoff, and acks nothing; the broker keeps
//! the uncommitted state and the WAL keeps the frames.
//!
//! Prints `batch writer ready` on stdout once subscribed.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use backon::BackoffBuilder;
use clap::Args;
use mdbus_bus::{BusNode, StreamSettings};
use mdbus_schema::frame::{header, Body};
use mdbus_schema::service::ACKS_STREAM_ID;
use mdbus_schema::{FrameIter, FrameKind, FrameRef, FrameWriter, Kline, Seq, SnapshotMark, SnapshotPhase};
use mdbus_store::{DbUrl, Store};

use crate::config::Config;
use crate::Cli;

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// `sqlite:PATH` or `postgres://user@host:port/db` [config: batch.db; default
    /// sqlite:<data dir>/<bus>/klines.db].
    #[arg(long, env = "MDBUS_DB", value_name = "URL")]
    pub db: Option<String>,
    /// The broker's write-ahead log, for closed K-lines a snapshot leaves to it (default: the
    /// config's wal.dir for the bus).
    #[arg(long, value_name = "DIR")]
    pub wal: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// Live counters of the writer.
#[derive(Debug, Default)]
struct Stats {
    snapshots_received: AtomicU64,
    snapshots_written: AtomicU64,
    rows_written: AtomicU64,
    acks: AtomicU64,
    incomplete: AtomicU64,
    superseded: AtomicU64,
    db_errors: AtomicU64,
    db_up: AtomicU64,
    pending_rows: AtomicU64,
    last_snapshot_id: AtomicU64,
    committed_seq: AtomicU64,
    wal_rows: AtomicU64,
    bad_frames: AtomicU64,
}

impl Stats {
    fn families(&self, f: &mut mdbus_metrics::Families, write_latency: &mdbus_metrics::Latency) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        f.counter("batch_snapshots_received_total", "complete snapshots received", g(&self.snapshots_received))
            .counter("batch_snapshots_written_total", "snapshots written to the database", g(&self.snapshots_written))
            .counter("batch_rows_written_total", "K-line rows upserted", g(&self.rows_written))
            .counter("batch_acks_total", "acks sent to the broker", g(&self.acks))
            .counter(
                "batch_incomplete_snapshots_total",
                "snapshots dropped for a gap in the stream (re-sent by the broker)",
                g(&self.incomplete),
            )
            .counter(
                "batch_superseded_snapshots_total",
                "snapshots replaced by a newer one before they could be written",
                g(&self.superseded),
            )
            .counter("batch_db_errors_total", "failed database writes or connects", g(&self.db_errors))
            .gauge("batch_db_up", "1 when the last database operation succeeded", g(&self.db_up) as f64)
            .gauge("batch_pending_rows", "rows of the snapshot waiting to be written", g(&self.pending_rows) as f64)
            .gauge("batch_last_snapshot_id", "id of the last snapshot written", g(&self.last_snapshot_id) as f64)
            .gauge("batch_committed_seq", "real-time seq the database covers", g(&self.committed_seq) as f64)
            .counter("batch_wal_rows_total", "closed K-lines read from the WAL", g(&self.wal_rows))
            .counter("batch_bad_frames_total", "undecodable frames on the snapshot stream", g(&self.bad_frames))
            .latency(write_latency);
    }
}

/// A snapshot being received or waiting to be written.
#[derive(Debug)]
struct Snapshot {
    mark: SnapshotMark,
    rows: Vec<Kline>,
}

pub fn run(cli: &Cli, a: &BatchArgs) -> Result<ExitCode> {
    let bus = cli.bus();
    mdbus_schema::service::validate_bus_name(&bus).map_err(anyhow::Error::msg)?;
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(db) = &a.db {
        cfg.batch.db = db.clone();
    }
    cfg.validate()?;
    let url = cfg.batch.db_for(&bus)?;
    let wal_dir = a.wal.clone().unwrap_or_else(|| cfg.wal.dir_for(&bus, "realtime"));
    let stop = crate::signals::stop_flag()?;
    let stats = Arc::new(Stats::default());
    let write_latency =
        mdbus_metrics::Latency::new("batch_write_latency_us", "one snapshot's database transaction, microseconds");
    {
        let (s, l) = (Arc::clone(&stats), Arc::clone(&write_latency));
        if let Some(e) = crate::serve_metrics(a.metrics.as_deref(), &stop, move |f| s.families(f, &l)) {
            return Err(e.into());
        }
    }
    // Test hook: die (as `kill -9` would) right after the N-th database commit, before its ack.
    let crash_after: Option<u64> = std::env::var("MDBUS_BATCH_CRASH_AFTER_COMMIT").ok().and_then(|v| v.parse().ok());

    let node = BusNode::open(&bus, "batch")?;
    let settings = StreamSettings::snapshot();
    let sub = node.subscriber("snapshot", settings, settings.subscriber_buffer)?;
    let acks = node.publisher("acks", StreamSettings::acks())?;
    let mut marks = Marks { publisher: acks, writer: FrameWriter::with_capacity(1024), seq: 0 };
    // Whatever the broker has not had acked is re-sent to us now.
    let hello = SnapshotMark {
        snapshot_id: 0,
        covered_seq: 0,
        publisher_id: 0,
        rows: 0,
        wal_from_seq: 0,
        phase: SnapshotPhase::Hello as u8,
    };
    marks.send(&hello)?;
    tracing::info!(db = %url, bus = %bus, "batch writer subscribed to the snapshot stream");
    println!("batch writer ready");

    let mut store: Option<Store> = None;
    let mut receiving: Option<Snapshot> = None;
    let mut pending: Option<Snapshot> = None;
    let mut expected_seq: Option<Seq> = None;
    let new_backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    let mut retry_at = Instant::now();
    let mut outage_since: Option<Instant> = None;

    // Samples read since the last progress mark.
    let mut unreported = 0u32;
    let mut last_frame: Option<(Seq, u64)> = None;
    while !stop.load(Ordering::Relaxed) {
        while let Some(sample) = sub.receive()? {
            unreported += 1;
            if let Some(Ok(f)) = FrameIter::new(sample.payload()).last() {
                last_frame = Some((f.seq(), receiving.as_ref().map_or(0, |r| r.mark.publisher_id)));
            }
            for frame in FrameIter::new(sample.payload()) {
                let Ok(frame) = frame else {
                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    receiving = None;
                    break;
                };
                if let Some(received) = take_frame(&frame, &mut receiving, &mut pending, &mut expected_seq, &stats) {
                    // The broker waits for the ack longer now: the write may take a while.
                    marks.send(&SnapshotMark { phase: SnapshotPhase::Received as u8, ..received })?;
                }
            }
        }
        // Flow control: the broker sends at most half our queue ahead of these marks.
        if unreported >= 16 || (unreported > 0 && !sub.has_samples()) {
            if let Some((seq, publisher_id)) = last_frame.filter(|&(_, p)| p != 0) {
                let progress = SnapshotMark {
                    snapshot_id: 0,
                    covered_seq: seq,
                    publisher_id,
                    rows: 0,
                    wal_from_seq: 0,
                    phase: SnapshotPhase::Progress as u8,
                };
                marks.send(&progress)?;
            }
            unreported = 0;
        }
        stats.pending_rows.store(pending.as_ref().map_or(0, |p| p.rows.len() as u64), Ordering::Relaxed);

        if pending.is_some() && Instant::now() >= retry_at {
            let Some(snap) = pending.as_mut() else { continue };
            match write(&url, &mut store, &bus, snap, &wal_dir, &stats, &write_latency) {
                Ok(()) => {
                    if outage_since.take().is_some() {
                        tracing::info!(db = %url, "database available again");
                    }
                    backoff = new_backoff();
                    let written = stats.snapshots_written.load(Ordering::Relaxed);
                    if crash_after.is_some_and(|n| written >= n) {
                        tracing::warn!("MDBUS_BATCH_CRASH_AFTER_COMMIT: dying between the commit and the ack");
                        std::process::abort();
                    }
                    marks.send(&SnapshotMark { phase: SnapshotPhase::Ack as u8, ..snap.mark })?;
                    stats.acks.fetch_add(1, Ordering::Relaxed);
                    pending = None;
                }
                Err(e) => {
                    stats.db_errors.fetch_add(1, Ordering::Relaxed);
                    stats.db_up.store(0, Ordering::Relaxed);
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    retry_at = Instant::now() + delay;
                    if e.is_unavailable() {
                        // Reconnect on the next try.
                        store = None;
                    }
                    if outage_since.is_none() {
                        outage_since = Some(Instant::now());
                        tracing::warn!(db = %url, error = %e, "database write failed; keeping the snapshot, not acking, retrying with backoff");
                    } else {
                        tracing::debug!(db = %url, error = %e, retry_ms = delay.as_millis() as u64, "database still failing");
                    }
                }
            }
            continue;
        }
        let wait = if pending.is_some() {
            retry_at.saturating_duration_since(Instant::now()).min(Duration::from_millis(50))
        } else {
            Duration::from_millis(50)
        };
        sub.wait(wait.max(Duration::from_millis(1)))?;
    }
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({ "batch": {
            "snapshots_written": g(&stats.snapshots_written), "rows_written": g(&stats.rows_written),
            "acks": g(&stats.acks), "incomplete": g(&stats.incomplete), "db_errors": g(&stats.db_errors),
            "pending_rows": pending.as_ref().map_or(0, |p| p.rows.len()),
        }})
    );
    Ok(ExitCode::SUCCESS)
}

/// Marks to the broker on the acks stream.
struct Marks {
    publisher: mdbus_bus::StreamPublisher,
    writer: FrameWriter,
    seq: Seq,
}

impl Marks {
    fn send(&mut self, m: &SnapshotMark) -> Result<(), mdbus_bus::BusError> {
        self.seq += 1;
        self.writer.clear();
        // A fixed-size body into an empty buffer: cannot fail.
        let _ = self.writer.push_snapshot_mark(header(FrameKind::Snapshot, ACKS_STREAM_ID, self.seq), m);
        self.publisher.send(self.writer.as_bytes()).map(drop)
    }
}

/// One frame of the snapshot stream into the snapshot being received. Returns the mark of a
/// snapshot that just arrived whole.
fn take_frame(
    frame: &FrameRef<'_>,
    receiving: &mut Option<Snapshot>,
    pending: &mut Option<Snapshot>,
    expected_seq: &mut Option<Seq>,
    stats: &Stats,
) -> Option<SnapshotMark> {
    let seq = frame.seq();
    match frame.kind() {
        FrameKind::Heartbeat => {
            // Repeats the last seq: the next data frame is seq + 1 (a new broker starts again).
            if let Ok(hb) = frame.heartbeat() {
                let same = receiving.as_ref().is_none_or(|r| r.mark.publisher_id == hb.publisher_id.to_native());
                if !same {
                    receiving.take();
                }
            }
            *expected_seq = Some(seq + 1);
            return None;
        }
        FrameKind::Snapshot | FrameKind::Kline => {}
        FrameKind::Trade => return None,
    }
    if expected_seq.is_some_and(|e| e != seq) && receiving.is_some() {
        tracing::warn!(expected = ?expected_seq, got = seq, "gap in the snapshot stream: this snapshot is dropped (the broker re-sends it)");
        stats.incomplete.fetch_add(1, Ordering::Relaxed);
        receiving.take();
    }
    *expected_seq = Some(seq + 1);
    match frame.to_owned_body() {
        Ok(Body::Snapshot(m)) if m.phase == SnapshotPhase::Begin as u8 => {
            if receiving.is_some() {
                stats.incomplete.fetch_add(1, Ordering::Relaxed);
            }
            *receiving = Some(Snapshot { mark: m, rows: Vec::with_capacity(m.rows as usize) });
        }
        Ok(Body::Snapshot(m)) if m.phase == SnapshotPhase::End as u8 => {
            let r = receiving.take()?;
            if r.mark.snapshot_id != m.snapshot_id || r.rows.len() != r.mark.rows as usize {
                stats.incomplete.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let mark = r.mark;
            stats.snapshots_received.fetch_add(1, Ordering::Relaxed);
            // A newer snapshot carries every row of the one waiting (the broker merges what is
            // not acked); after a broker restart it carries what the restart rebuilt.
            if pending.replace(r).is_some() {
                stats.superseded.fetch_add(1, Ordering::Relaxed);
            }
            return Some(mark);
        }
        Ok(Body::Kline(k)) => {
            if let Some(r) = receiving.as_mut() {
                r.rows.push(k);
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "undecodable frame on the snapshot stream");
            stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            receiving.take();
        }
    }
    None
}

/// Writes one snapshot (plus any closed K-lines it leaves to the WAL) in one transaction.
fn write(
    url: &DbUrl,
    store: &mut Option<Store>,
    bus: &str,
    snap: &mut Snapshot,
    wal_dir: &std::path::Path,
    stats: &Stats,
    latency: &mdbus_metrics::Latency,
) -> Result<(), mdbus_store::StoreError> {
    if snap.mark.wal_from_seq != 0 {
        let from = snap.mark.wal_from_seq;
        match closed_from_wal(wal_dir, from, snap.mark.covered_seq) {
            Ok(rows) => {
                stats.wal_rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
                tracing::info!(from, to = snap.mark.covered_seq, rows = rows.len(), "closed K-lines read from the WAL");
                snap.rows.extend(rows);
                snap.mark.wal_from_seq = 0;
            }
            // Without them the snapshot must not be acked: the broker keeps it.
            Err(e) => {
                return Err(mdbus_store::StoreError::Io {
                    url: wal_dir.display().to_string(),
                    context: "reading closed K-lines from the WAL",
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
    }
    if store.is_none() {
        *store = Some(Store::open(url)?);
        stats.db_up.store(1, Ordering::Relaxed);
    }
    let Some(s) = store.as_mut() else { return Ok(()) };
    let t0 = Instant::now();
    s.write_snapshot(bus, snap.mark.snapshot_id, snap.mark.covered_seq, &snap.rows)?;
    latency.record(t0.elapsed().as_micros() as u64, mdbus_publisher::broker::now_ns());
    latency.flush_if_due(mdbus_publisher::broker::now_ns());
    stats.db_up.store(1, Ordering::Relaxed);
    stats.snapshots_written.fetch_add(1, Ordering::Relaxed);
    stats.rows_written.fetch_add(snap.rows.len() as u64, Ordering::Relaxed);
    stats.last_snapshot_id.store(snap.mark.snapshot_id, Ordering::Relaxed);
    stats.committed_seq.fetch_max(snap.mark.covered_seq, Ordering::Relaxed);
    tracing::debug!(
        id = snap.mark.snapshot_id,
        rows = snap.rows.len(),
        covered = snap.mark.covered_seq,
        "snapshot written"
    );
    Ok(())
}

/// Closed K-line frames of the WAL with seq in `from..=to`.
fn closed_from_wal(dir: &std::path::Path, from: Seq, to: Seq) -> Result<Vec<Kline>, mdbus_wal::WalReadError> {
    let mut r = mdbus_wal::WalReader::open(dir)?;
    r.seek(from)?;
    let mut rows = Vec::new();
    while let Some(rec) = r.next_record()? {
        if rec.seq > to {
            break;
        }
        let Ok(f) = FrameRef::parse(rec.payload) else { continue };
        if f.kind() != FrameKind::Kline {
            continue;
        }
        if let Ok(Body::Kline(k)) = f.to_owned_body() {
            if k.closed {
                rows.push(k);
            }
        }
    }
    Ok(rows)
}
