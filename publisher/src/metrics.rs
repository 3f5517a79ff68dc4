//! The broker's counters: written by the publish thread (once per sample, not per frame), the WAL
//! thread (once per commit) and the ingest loop (one latency value per trade, into a thread-local
//! histogram); read by the metrics endpoint's thread when a scrape arrives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use mdbus_metrics::{Families, Latency};

/// The WAL thread's counters.
#[derive(Debug, Default)]
pub struct WalCounters {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub commits: AtomicU64,
    pub syncs: AtomicU64,
    pub segments_removed: AtomicU64,
    /// The last seq written to the log (to the OS; fsynced per the durability setting).
    pub logged_seq: AtomicU64,
}

/// The snapshot thread's counters (the delayed stream to durable consumers).
#[derive(Debug, Default)]
pub struct SnapshotCounters {
    /// Snapshots published (a re-send merged into a new snapshot counts again).
    pub published: AtomicU64,
    /// K-line rows published in snapshots.
    pub rows: AtomicU64,
    /// Acks received (any id).
    pub acks: AtomicU64,
    /// Snapshots committed (acked while current).
    pub commits: AtomicU64,
    /// Snapshots re-sent because no ack came in time.
    pub resends: AtomicU64,
    /// Rows waiting for an ack (frozen + changed since): what a durable consumer still lacks.
    pub pending_rows: AtomicU64,
    /// Real-time seq covered by the last committed snapshot: the WAL keeps everything after it.
    pub committed_seq: AtomicU64,
    pub last_committed_id: AtomicU64,
    /// Times the publish thread waited for room in the queue to the snapshot thread.
    pub queue_waits: AtomicU64,
    /// The restart: open K-lines restored from the database, trades replayed from the WAL, and
    /// how long it took (µs) before publishing resumed.
    pub restored_open_klines: AtomicU64,
    pub restored_trades: AtomicU64,
    pub restore_us: AtomicU64,
}

/// Live counters of a running broker.
#[derive(Debug)]
pub struct BrokerMetrics {
    /// Data frames published (trades, K-line updates and closes).
    pub published: CachePadded<AtomicU64>,
    pub samples: AtomicU64,
    pub bytes: AtomicU64,
    pub heartbeats: AtomicU64,
    pub trades: CachePadded<AtomicU64>,
    pub last_seq: AtomicU64,
    /// Subscribers the last sample reached.
    pub subscribers: AtomicU64,
    pub reconnects: AtomicU64,
    /// The feed state last announced (`FeedState` as a number).
    pub feed_state: AtomicU64,
    /// Symbols whose live feed is down now.
    pub symbols_down: AtomicU64,
    /// Written by the WAL thread: a cache line of their own.
    pub wal: CachePadded<WalCounters>,
    /// Written by the snapshot thread.
    pub snapshots: CachePadded<SnapshotCounters>,
    /// Exchange event → ingest (µs), one value per trade.
    pub ingest_latency: Arc<Latency>,
    /// Time of one WAL commit that synced data to disk (µs).
    pub wal_fsync_latency: Arc<Latency>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        BrokerMetrics {
            published: CachePadded::new(AtomicU64::new(0)),
            samples: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            trades: CachePadded::new(AtomicU64::new(0)),
            last_seq: AtomicU64::new(0),
            subscribers: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            feed_state: AtomicU64::new(0),
            symbols_down: AtomicU64::new(0),
            wal: CachePadded::new(WalCounters::default()),
            snapshots: CachePadded::new(SnapshotCounters::default()),
            ingest_latency: Latency::new(
                "ingest_latency_us",
                "exchange event time to ingest by the broker, microseconds",
            ),
            wal_fsync_latency: Latency::new(
                "wal_fsync_latency_us",
                "WAL commits that synced data to disk, microseconds",
            ),
        }
    }
}

impl BrokerMetrics {
    /// Adds the broker's families to a scrape.
    pub fn families(&self, f: &mut Families) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        f.counter("market_published_total", "data frames published on the real-time stream", g(&self.published))
            .counter(
                "market_samples_total",
                "shared-memory samples sent (frames are batched per sample)",
                g(&self.samples),
            )
            .counter("market_published_bytes_total", "bytes of frames published", g(&self.bytes))
            .counter("market_heartbeats_total", "heartbeats published", g(&self.heartbeats))
            .counter("market_trades_total", "trades ingested", g(&self.trades))
            .gauge_with(
                "market_last_seq",
                "last sequence number published, per stream",
                &[("stream", "realtime")],
                g(&self.last_seq) as f64,
            )
            .gauge("market_subscriber_count", "subscribers the last sample reached", g(&self.subscribers) as f64)
            .gauge(
                "broker_feed_state",
                "feed state announced in heartbeats: 0 unknown, 1 live, 2 down, 3 ended, 4 stopped",
                g(&self.feed_state) as f64,
            )
            .gauge("broker_symbols_down", "symbols whose live feed is down now", g(&self.symbols_down) as f64)
            .counter("wal_records_total", "frames appended to the WAL", g(&self.wal.records))
            .counter("wal_bytes_total", "frame bytes appended to the WAL", g(&self.wal.bytes))
            .counter("wal_commits_total", "WAL group commits (one per sample)", g(&self.wal.commits))
            .counter("wal_fsync_total", "WAL data syncs to disk", g(&self.wal.syncs))
            .counter("wal_segments_removed_total", "WAL segments removed by retention", g(&self.wal.segments_removed))
            .counter("snapshot_published_total", "delayed snapshots published", g(&self.snapshots.published))
            .counter("snapshot_rows_total", "K-line rows published in snapshots", g(&self.snapshots.rows))
            .counter("snapshot_acks_total", "acks received from durable consumers", g(&self.snapshots.acks))
            .counter("snapshot_commits_total", "snapshots committed on ack", g(&self.snapshots.commits))
            .counter(
                "snapshot_resends_total",
                "snapshots re-sent (merged into a new one) because no ack came in time",
                g(&self.snapshots.resends),
            )
            .gauge(
                "snapshot_pending_rows",
                "K-line rows not yet acked by a durable consumer",
                g(&self.snapshots.pending_rows) as f64,
            )
            .gauge(
                "snapshot_committed_seq",
                "real-time seq covered by the last committed snapshot",
                g(&self.snapshots.committed_seq) as f64,
            )
            .gauge(
                "snapshot_last_committed_id",
                "id of the last committed snapshot",
                g(&self.snapshots.last_committed_id) as f64,
            )
            .gauge(
                "broker_restored_open_klines",
                "open K-lines restored from the database at start-up",
                g(&self.snapshots.restored_open_klines) as f64,
            )
            .gauge(
                "broker_restored_trades",
                "trades replayed from the WAL at start-up",
                g(&self.snapshots.restored_trades) as f64,
            )
            .gauge(
                "broker_restore_seconds",
                "time to rebuild state at start-up",
                g(&self.snapshots.restore_us) as f64 / 1e6,
            )
            .counter(
                "snapshot_queue_waits_total",
                "times the publish thread waited for the snapshot thread",
                g(&self.snapshots.queue_waits),
            )
            .latency(&self.ingest_latency)
            .latency(&self.wal_fsync_latency);
    }
}
