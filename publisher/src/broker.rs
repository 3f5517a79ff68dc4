//! The broker's publish loop: source → aggregator → frames → the real-time stream.
//!
//! Upstream: the synthetic feed (more sources come with the connectivity work). Downstream: the
//! `realtime` stream in shared memory (trades, K-line updates and closes, heartbeats) and the
//! optional `--record` CSV files.
//!
//! One thread does it all, optionally pinned. Each round it ingests every trade that is due
//! (bounded per round), lets the clock close K-lines, drains the conflated K-line updates, and
//! sends what it has: a quiet round sends one small sample, a busy one fills samples up to
//! `max_sample_bytes` (natural batching). Trades and closes are never conflated; updates of the
//! same open K-line within one round are. Every data frame gets the stream's next sequence
//! number; when nothing was sent for `heartbeat_ms`, a heartbeat carrying the last seq goes out.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics::BrokerMetrics;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mdbus_bus::{BusError, BusNode, StreamPublisher, StreamSettings};
use mdbus_schema::frame::header;
use mdbus_schema::frame::Body;
use mdbus_schema::service::REALTIME_STREAM_ID;
use mdbus_schema::{FeedState, FrameKind, FrameRef, FrameWriter, Heartbeat, Interval, Kline, Seq, Symbol, Trade};

use crate::aggregator::{AggregatorConfig, AggregatorStats, LatePolicy, SymbolSpec};
use crate::engine::{Engine, EngineConfig, EngineStartError, WorkerInput, WorkerOutput};
use crate::record::{RecordWriteError, Recorder};
use crate::snapshot::{SnapshotSettings, SnapshotSink, SnapshotStart, SnapshotStartError};
use crate::source::{Feed, Item, SourceConfig, SourceError};
use crate::synthetic::SyntheticFeed;
use crate::walthread::{WalSink, WalThreadStartError};
use mdbus_wal::{RetentionPolicy, Wal, WalOptions, WalReader};

/// Whose clock closes K-lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockMode {
    /// The host's wall clock (live sources). Trades are paced to it.
    Wall,
    /// The data's own event time (replays, simulated time): a K-line closes when the event time
    /// of later data passes its end plus the grace, whatever the replay speed.
    Event,
}

/// Everything the broker needs, validated.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub bus: String,
    pub stream: StreamSettings,
    pub source: SourceConfig,
    pub clock: ClockMode,
    /// Event-clock replay speed (× real time); 0 = as fast as possible.
    pub speed: f64,
    pub heartbeat_ms: u64,
    pub tick_ms: u64,
    pub close_grace_ms: i64,
    pub late_policy: LatePolicy,
    pub max_empty_run: u32,
    pub record: Option<PathBuf>,
    /// Send only heartbeats until this many subscribers are connected.
    pub wait_subscribers: usize,
    /// Core of the ingest/publish thread.
    pub core: Option<usize>,
    /// Aggregation workers (symbols are partitioned across them); 0: inline, on the
    /// ingest/publish thread.
    pub workers: usize,
    /// Cores for the workers (worker i on `worker_cores[i % len]`); empty: unpinned.
    pub worker_cores: Vec<usize>,
    /// The write-ahead log of the real-time stream (`None`: no log).
    pub wal: Option<WalSettings>,
    /// The delayed snapshot stream for durable consumers (`None`: not published).
    pub snapshots: Option<SnapshotSettings>,
    /// Start from durable state (a restart with a database): see [`RestoreFrom`].
    pub restore: Option<RestoreFrom>,
}

/// What a restarted broker rebuilds its K-lines from: the last committed snapshot (read from the
/// database by the caller) plus the WAL after the seq it covers.
#[derive(Debug, Clone, Default)]
pub struct RestoreState {
    /// The last committed snapshot: its id and the real-time seq it covers (`None`: nothing was
    /// ever committed; the whole WAL is replayed).
    pub committed: Option<(u64, Seq)>,
    /// The open K-lines stored with it (any `symbol_id`; matched by symbol name).
    pub open: Vec<Kline>,
}

/// A restarted broker's [`RestoreState`], read on a thread of its own ([`RestoreFrom::reading`])
/// while the broker sets itself up — the feed, the engine, the log, the bus — so a database read
/// overlaps the start-up instead of preceding it; [`RestoreFrom::wait`] takes it once.
#[derive(Clone)]
pub struct RestoreFrom(Arc<std::sync::Mutex<Option<std::thread::JoinHandle<RestoreResult>>>>);

type RestoreResult = Result<RestoreState, String>;

impl std::fmt::Debug for RestoreFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RestoreFrom")
    }
}

impl RestoreFrom {
    /// Starts `read` on a thread now; the broker waits for it only where it needs the state.
    pub fn reading(read: impl FnOnce() -> RestoreResult + Send + 'static) -> std::io::Result<RestoreFrom> {
        let handle = std::thread::Builder::new().name("restore-read".into()).spawn(read)?;
        Ok(RestoreFrom(Arc::new(std::sync::Mutex::new(Some(handle)))))
    }

    /// The state: waits for a read still under way. A read that failed (or was already taken) is
    /// an error: the broker must not start as if nothing had been stored.
    pub fn wait(&self) -> Result<RestoreState, BrokerRunError> {
        let handle = self.0.lock().map_err(|_| BrokerRunError::Restore("restart state lock poisoned".into()))?.take();
        let handle = handle.ok_or_else(|| BrokerRunError::Restore("restart state already taken".into()))?;
        handle
            .join()
            .map_err(|_| BrokerRunError::Restore("the thread reading the restart state panicked".into()))?
            .map_err(BrokerRunError::Restore)
    }
}

/// What a restore did (logged; returned for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreReport {
    pub open_klines: usize,
    pub unknown_symbols: usize,
    pub trades_replayed: u64,
    pub from_seq: Seq,
    pub to_seq: Seq,
    pub elapsed: Duration,
}

/// Samples the publish thread may hand the WAL thread ahead of the log: enough to ride out an
/// fsync of `interval` durability at full rate (256 × 16 KiB = 4 MiB) instead of waiting for it.
const WAL_BUFFERS: usize = 256;

/// Where and how the broker logs every published frame.
#[derive(Debug, Clone)]
pub struct WalSettings {
    pub dir: PathBuf,
    pub options: WalOptions,
    pub retention: RetentionPolicy,
}

/// Why the broker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BrokerRunError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Record(#[from] RecordWriteError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Engine(#[from] EngineStartError),
    #[error(transparent)]
    WalOpen(#[from] mdbus_wal::WalOpenError),
    #[error(transparent)]
    WalThread(#[from] WalThreadStartError),
    #[error(transparent)]
    WalAppend(#[from] mdbus_wal::WalAppendError),
    #[error(transparent)]
    WalSink(#[from] crate::walthread::WalSinkError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotStartError),
    #[error("restoring the state: {0}")]
    Restore(String),
    #[error("frame encoding failed at seq {0}")]
    Encode(Seq),
}

/// What a finished run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerReport {
    pub trades: u64,
    pub frames: u64,
    pub samples: u64,
    pub heartbeats: u64,
    pub bytes: u64,
    pub last_seq: Seq,
    pub max_subscribers_seen: usize,
    pub aggregator: AggregatorStats,
    /// Reconnects a live source reported.
    pub reconnects: u64,
    pub restore: Option<RestoreReport>,
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Frames accumulated for the next sample, with the stream's sequence numbers.
struct Batcher {
    publisher: StreamPublisher,
    writer: FrameWriter,
    max: usize,
    next_seq: Seq,
    ts_event_ns: i64,
    ts_recv_ns: i64,
    last_send: Instant,
    report: BrokerReport,
    /// First error met while taking worker outputs (reported after the drain).
    error: Option<BrokerRunError>,
    flush_after_trade: bool,
    /// Every sent sample also goes to the WAL thread.
    wal: Option<WalSink>,
    /// Every K-line frame also goes to the snapshot thread.
    snap: Option<SnapshotSink>,
    /// Rebuilding state from the WAL: outputs go to the snapshot thread only, not published.
    replaying: bool,
    replay_seq: Seq,
    metrics: Arc<BrokerMetrics>,
}

impl Batcher {
    /// Turns one worker output into frames.
    fn take(&mut self, o: WorkerOutput) {
        if self.error.is_some() {
            return;
        }
        if self.replaying {
            // Already published (and logged) before the restart: only the durable side needs them.
            if let (WorkerOutput::Closed { kline, .. } | WorkerOutput::Update { kline, .. }, Some(s)) =
                (&o, self.snap.as_mut())
            {
                s.kline(kline, self.replay_seq);
            }
            return;
        }
        let r = match o {
            WorkerOutput::Trade { trade, recv_ns } => {
                self.ts_event_ns = trade.time_us.saturating_mul(1000);
                self.ts_recv_ns = recv_ns;
                self.trade(&trade).and_then(|()| if self.flush_after_trade { self.flush() } else { Ok(()) })
            }
            WorkerOutput::Closed { kline, ts_event_ns, recv_ns }
            | WorkerOutput::Update { kline, ts_event_ns, recv_ns } => {
                self.ts_event_ns = ts_event_ns;
                self.ts_recv_ns = recv_ns;
                self.kline(&kline)
            }
            // Old tables of a worker that grew: dropped here, off its hot path.
            WorkerOutput::Retired(storage) => {
                drop(storage);
                Ok(())
            }
        };
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    fn room_for(&mut self, kind: FrameKind) -> Result<(), BrokerRunError> {
        if self.writer.len() + mdbus_schema::frame::encoded_frame_len(kind) > self.max {
            self.flush()?;
        }
        Ok(())
    }

    fn data_header(&mut self, kind: FrameKind) -> mdbus_schema::FrameHeader {
        let seq = self.next_seq;
        self.next_seq += 1;
        mdbus_schema::FrameHeader {
            ts_event_ns: self.ts_event_ns,
            ts_recv_ns: self.ts_recv_ns,
            // Stamped for the whole sample in `send`.
            ts_publish_ns: 0,
            ..header(kind, REALTIME_STREAM_ID, seq)
        }
    }

    fn trade(&mut self, t: &Trade) -> Result<(), BrokerRunError> {
        self.room_for(FrameKind::Trade)?;
        let h = self.data_header(FrameKind::Trade);
        self.writer.push_trade(h, t).map_err(|_| BrokerRunError::Encode(h.seq))?;
        Ok(())
    }

    fn kline(&mut self, k: &Kline) -> Result<(), BrokerRunError> {
        self.room_for(FrameKind::Kline)?;
        let h = self.data_header(FrameKind::Kline);
        self.writer.push_kline(h, k).map_err(|_| BrokerRunError::Encode(h.seq))?;
        if let Some(s) = self.snap.as_mut() {
            s.kline(k, h.seq);
        }
        Ok(())
    }

    fn heartbeat(&mut self, hb: &Heartbeat) -> Result<usize, BrokerRunError> {
        self.flush()?;
        let h = mdbus_schema::FrameHeader {
            ts_publish_ns: now_ns(),
            ..header(FrameKind::Heartbeat, REALTIME_STREAM_ID, self.next_seq - 1)
        };
        self.writer.push_heartbeat(h, hb).map_err(|_| BrokerRunError::Encode(h.seq))?;
        self.report.heartbeats += 1;
        self.metrics.heartbeats.store(self.report.heartbeats, Ordering::Relaxed);
        self.send()
    }

    fn flush(&mut self) -> Result<(), BrokerRunError> {
        if !self.writer.is_empty() {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<usize, BrokerRunError> {
        self.writer.set_publish_time(now_ns());
        let reached = self.publisher.send(self.writer.as_bytes())?;
        self.report.samples += 1;
        self.report.frames += self.writer.frames() as u64;
        self.report.bytes += self.writer.len() as u64;
        if let Some(w) = self.wal.as_mut() {
            // The writer's buffer goes to the log as it is; the writer goes on with an empty one.
            w.submit(&mut self.writer)?;
        }
        self.report.max_subscribers_seen = self.report.max_subscribers_seen.max(reached);
        // Once per sample, plain stores from this thread only: the scrape thread reads them.
        let m = &*self.metrics;
        m.published.store(self.report.frames - self.report.heartbeats, Ordering::Relaxed);
        m.samples.store(self.report.samples, Ordering::Relaxed);
        m.bytes.store(self.report.bytes, Ordering::Relaxed);
        m.last_seq.store(self.next_seq - 1, Ordering::Relaxed);
        m.subscribers.store(reached as u64, Ordering::Relaxed);
        self.writer.clear();
        self.last_send = Instant::now();
        Ok(reached)
    }
}

fn pin(core: Option<usize>) {
    let Some(core) = core else { return };
    if crate::affinity::pin_current_thread(core) {
        tracing::info!(core, "broker thread pinned");
    } else {
        tracing::warn!(core, "cannot pin the broker thread to this core; running unpinned");
    }
}

/// Control of a running broker from other threads (signal handlers).
#[derive(Debug, Default, Clone)]
pub struct BrokerControl {
    /// Stop cleanly (SIGINT / SIGTERM).
    pub stop: Arc<AtomicBool>,
    /// Re-read the symbol list (SIGHUP) through the `symbols_source` given to [`run`].
    pub reload: Arc<AtomicBool>,
    /// Counters for the metrics endpoint.
    pub metrics: Arc<BrokerMetrics>,
}

/// Where a reload gets the new symbol list from (the config file, re-read).
pub type SymbolsSource = Box<dyn Fn() -> Result<Vec<String>, String> + Send>;

/// Runs the broker until `control.stop` is set. The feed ending does not stop it: it keeps
/// heartbeating with `feed = ended` so readers can tell the end of data from a dead publisher.
pub fn run(
    config: &BrokerConfig,
    control: &BrokerControl,
    symbols_source: Option<&SymbolsSource>,
) -> Result<BrokerReport, BrokerRunError> {
    let stop = &*control.stop;
    let mut feed = Feed::open(&config.source)?;
    let specs = feed.specs();
    let engine_config = EngineConfig {
        workers: config.workers,
        cores: config.worker_cores.clone(),
        queue_capacity: 8192,
        aggregator: AggregatorConfig {
            close_grace_ms: config.close_grace_ms,
            late_policy: config.late_policy,
            max_empty_run: config.max_empty_run,
            snapshots: false,
        },
    };
    if config.workers == 0 && !config.worker_cores.is_empty() {
        tracing::warn!(cores = ?config.worker_cores, "worker cores ignored: with 0 workers the ingest/publish thread aggregates");
    }
    let mut engine = Engine::start(&engine_config, &specs)?;
    // A restart continues its recording (cut back to what the log has, completed from it).
    let (mut recorder, mut record_last) = match (&config.record, &config.restore) {
        (Some(dir), Some(_)) => {
            let (r, last) = Recorder::resume(dir)?;
            (Some(r), last)
        }
        (Some(dir), None) => (Some(Recorder::new(dir)?), HashMap::new()),
        _ => (None, HashMap::new()),
    };

    // The log decides where the sequence continues: last logged seq + 1 (after recovery of a torn
    // tail), or 1 for a new log.
    let mut next_seq = 1;
    let wal = match &config.wal {
        Some(w) => {
            let (wal, report) = Wal::open(&w.dir, w.options)?;
            if let Some(t) = &report.truncated {
                tracing::warn!(file = %t.path.display(), offset = t.offset, reason = t.reason, "wal tail truncated on recovery");
            }
            next_seq = report.last_seq.map_or(1, |s| s + 1);
            tracing::info!(dir = %w.dir.display(), segments = report.segments, next_seq, "wal open");
            let acked_floor = config.snapshots.is_some();
            let m = Arc::clone(&control.metrics);
            Some(WalSink::start(wal, WAL_BUFFERS, config.stream.max_sample_bytes, w.retention, acked_floor, m)?)
        }
        None => None,
    };
    let node = BusNode::open(&config.bus, "broker")?;
    let publisher = node.publisher("realtime", config.stream)?;
    tracing::info!(
        service = publisher.service(),
        symbols = specs.len(),
        workers = engine.workers(),
        "broker publishing"
    );
    let publisher_id = rand::random::<u64>();
    let snap = match &config.snapshots {
        Some(s) => Some(SnapshotSink::open(&config.bus, *s, publisher_id, Arc::clone(&control.metrics))?),
        None => None,
    };
    // Only now that every helper thread exists (the feed's, the workers', the log's, the snapshot
    // writer's): a thread pinned first would hand its one-core mask to them, and they would share
    // the ingest core while the others idle. Unpinned, the log's threads may also take the ingest
    // core's time while this thread waits for a free log buffer.
    pin(config.core);
    // Everything above runs while a database read started by the caller goes on; from here on
    // the broker needs what it read.
    let restore_state = config.restore.as_ref().map(RestoreFrom::wait).transpose()?;
    let snap = snap.map(|s| {
        let committed = restore_state.as_ref().and_then(|r| r.committed);
        s.begin(SnapshotStart {
            next_id: committed.map_or(1, |(id, _)| id + 1),
            covered_seq: committed.map_or(0, |(_, seq)| seq),
        })
    });
    let max = publisher.max_sample_bytes();
    let mut out = Batcher {
        publisher,
        writer: FrameWriter::with_capacity(max),
        max,
        next_seq,
        ts_event_ns: 0,
        ts_recv_ns: 0,
        last_send: Instant::now(),
        report: BrokerReport::default(),
        error: None,
        flush_after_trade: false,
        wal,
        snap,
        replaying: false,
        replay_seq: 0,
        metrics: Arc::clone(&control.metrics),
    };
    // Trades at or before these ids (per symbol) are already in the state: a resumed source skips them.
    let mut resume = vec![(i64::MIN, None); specs.len()];
    if let Some(r) = &restore_state {
        let mut rec = recorder.as_mut().map(|r| (r, &mut record_last));
        let report = restore(config, r, &specs, &mut engine, &mut out, &mut resume, &mut rec)?;
        out.report.restore = Some(report);
    }
    if config.restore.is_some() {
        let skipped = feed.resume_after(&resume);
        if skipped > 0 {
            tracing::info!(skipped, "source resumed after the trades already aggregated");
        }
    }
    let mut skipped_resumed = 0u64;
    let restored = config.restore.is_some();
    let metrics = &*control.metrics;
    // Exchange event → ingest means something only when event times are (shifted to) wall time.
    let ingest_latency = feed.is_live() || matches!(config.clock, ClockMode::Wall);
    let started_at_ns = now_ns();
    let hb_every = Duration::from_millis(config.heartbeat_ms.max(1));
    let mut hb = Heartbeat {
        publisher_id,
        // After a restart the log's last seq: readers resume from there, not from 1.
        last_seq: out.next_seq - 1,
        interval_ms: config.heartbeat_ms as u32,
        feed_state: FeedState::Unknown as u8,
        started_at_ns,
    };

    // First frame of every incarnation: a heartbeat with the new publisher id, so readers that
    // knew an earlier broker reset their sequence tracking before any new data arrives.
    out.heartbeat(&hb)?;
    // Hold the feed until enough readers are connected (tests, benchmarks).
    while config.wait_subscribers > 0 && !stop.load(Ordering::Relaxed) {
        if out.heartbeat(&hb)? >= config.wait_subscribers {
            break;
        }
        std::thread::sleep(hb_every.min(Duration::from_millis(20)));
    }

    let wall_start = Instant::now();
    let event_start_us = feed.peek_time_us();
    // Synthetic or recorded data replayed live starts "now" on the wall clock; a live source's
    // trades already carry the exchange's clock.
    let wall_offset_us = match config.clock {
        ClockMode::Wall if !feed.is_live() && event_start_us < i64::MAX - 1 => now_ns() / 1000 - event_start_us,
        _ => 0,
    };
    let mut feed_state = FeedState::Live;
    // Symbols whose live feed is down: when all are, heartbeats say the feed is down.
    let mut down = vec![false; specs.len()];
    let mut down_count = 0usize;
    let mut feed_ended_told = false;
    let mut event_clock_ms = i64::MIN;
    let mut last_tick_ms = i64::MIN;
    let tick = Duration::from_millis(config.tick_ms.max(1));
    let mut last_hb = Instant::now();
    const MAX_TRADES_PER_ROUND: usize = 4096;
    // Receive time is read for the 1st, 9th, 17th, … trade of a round.
    const RECV_CLOCK_EVERY: usize = 8;

    while !stop.load(Ordering::Relaxed) {
        if control.reload.swap(false, Ordering::Relaxed) {
            match (symbols_source, feed.synthetic_mut()) {
                (Some(source), Some(f)) => reload_symbols(source, f, &mut engine, &mut out),
                _ => tracing::warn!("reload: this source's symbols cannot change while running"),
            }
        }
        let round_start_ns = now_ns();
        // How far in event time the feed may advance this round.
        let horizon_us = match config.clock {
            ClockMode::Wall => round_start_ns / 1000 - wall_offset_us,
            ClockMode::Event if config.speed > 0.0 => {
                event_start_us + (wall_start.elapsed().as_secs_f64() * 1e6 * config.speed) as i64
            }
            ClockMode::Event => i64::MAX,
        };
        let mut n = 0;
        let mut recv_ns = 0;
        while n < MAX_TRADES_PER_ROUND && feed_state == FeedState::Live && feed.peek_time_us() <= horizon_us {
            let mut t = match feed.next() {
                Some(Item::Trade(t)) => {
                    // Only a restored broker has trades to skip.
                    if restored && resume.get(t.symbol_id as usize).is_some_and(|&(last, _)| t.trade_id <= last) {
                        // Already aggregated before the restart (a resumed replay or live source).
                        skipped_resumed += 1;
                        if skipped_resumed == 1 {
                            tracing::info!(symbol = %t.symbol, id = t.trade_id, "skipping trades already aggregated before the restart");
                        }
                        continue;
                    }
                    t
                }
                Some(Item::Down(g)) => {
                    if let Some(d) = down.get_mut(g as usize) {
                        down_count += usize::from(!*d);
                        *d = true;
                    }
                    engine.send(engine.worker_of(g), WorkerInput::FeedDown(Some(g)), &mut |o| out.take(o));
                    continue;
                }
                Some(Item::Up { symbol, backfilled }) => {
                    if let Some(d) = down.get_mut(symbol as usize) {
                        down_count -= usize::from(*d);
                        *d = false;
                    }
                    let input = WorkerInput::FeedUp { symbol: Some(symbol), backfilled };
                    engine.send(engine.worker_of(symbol), input, &mut |o| out.take(o));
                    continue;
                }
                Some(Item::Reconnected) => {
                    out.report.reconnects += 1;
                    metrics.reconnects.store(out.report.reconnects, Ordering::Relaxed);
                    continue;
                }
                None if feed.is_live() => break,
                None => {
                    feed_state = FeedState::Ended;
                    tracing::info!(trades = feed.produced(), "feed ended");
                    break;
                }
            };
            t.time_us += wall_offset_us;
            n += 1;
            if let Some(r) = recorder.as_mut() {
                r.write(&t)?;
            }
            // One clock read per few trades: back to back in a round they arrive well under a µs
            // apart, and the read is a tenth of this thread's time at full load.
            if n % RECV_CLOCK_EVERY == 1 {
                recv_ns = now_ns();
            }
            if ingest_latency {
                metrics.ingest_latency.record((recv_ns / 1000 - t.time_us).max(0) as u64, recv_ns);
            }
            engine.trade(t, recv_ns, &mut |o| out.take(o));
            out.report.trades += 1;
            event_clock_ms = event_clock_ms.max(t.time_ms());
        }
        // Idle (a lone trade): its frames go out as soon as the worker has made them, the trade
        // with any closes it caused first, its K-line updates in the next sample.
        out.flush_after_trade = n == 1 && feed.peek_time_us() > horizon_us;
        if feed_state == FeedState::Live && feed.peek_time_us() == i64::MAX {
            feed_state = FeedState::Ended;
        }
        if feed_state == FeedState::Ended && !feed_ended_told {
            // An ended feed is not a quiet market: the clock must not fabricate empty K-lines.
            engine.broadcast(|| WorkerInput::FeedDown(None), &mut |o| out.take(o));
            feed_ended_told = true;
            if let Some(r) = recorder.as_mut() {
                // The recording is complete now, not at the next heartbeat.
                r.flush()?;
            }
            tracing::info!(trades = out.report.trades, "feed ended: heartbeating until stopped");
        }

        // The clock, through the same queues as the trades: closes K-lines nobody traded into.
        let clock_ms = match config.clock {
            ClockMode::Wall => now_ns() / 1_000_000,
            ClockMode::Event => event_clock_ms,
        };
        if clock_ms > last_tick_ms {
            last_tick_ms = clock_ms;
            let sent_ns = now_ns();
            engine.broadcast(|| WorkerInput::Tick { ms: clock_ms, sent_ns }, &mut |o| out.take(o));
        }
        engine.wait_idle(&mut |o| out.take(o));
        out.flush_after_trade = false;
        // A round boundary: every K-line handed to the snapshot thread reflects exactly the frames
        // published so far.
        let covered = out.next_seq - 1;
        if let Some(s) = out.snap.as_mut() {
            s.covered(covered);
        }
        metrics.trades.store(out.report.trades, Ordering::Relaxed);
        if let Some(e) = out.error.take() {
            return Err(e);
        }
        out.flush()?;

        // Heartbeat when silent; also once a second when busy, so readers always learn the feed
        // state and the publisher's identity.
        if out.last_send.elapsed() >= hb_every || last_hb.elapsed() >= Duration::from_secs(1) {
            last_hb = Instant::now();
            hb.last_seq = out.next_seq - 1;
            let shown = if feed_state == FeedState::Live && down_count > 0 && down_count == down.len() {
                FeedState::Down
            } else {
                feed_state
            };
            hb.feed_state = shown as u8;
            metrics.feed_state.store(u64::from(hb.feed_state), Ordering::Relaxed);
            metrics.symbols_down.store(down_count as u64, Ordering::Relaxed);
            metrics.ingest_latency.flush_if_due(now_ns());
            out.heartbeat(&hb)?;
            if let Some(r) = recorder.as_mut() {
                r.flush()?;
            }
        }

        if n == 0 {
            // Idle: sleep until the next trade is due, the next tick or the next heartbeat.
            let until_trade = match (feed_state, config.clock) {
                _ if feed.is_live() => tick,
                (FeedState::Live, ClockMode::Wall) => {
                    Duration::from_micros((feed.peek_time_us() + wall_offset_us - now_ns() / 1000).max(0) as u64)
                }
                (FeedState::Live, ClockMode::Event) if config.speed > 0.0 => Duration::from_micros(
                    ((feed.peek_time_us() - horizon_us) as f64 / config.speed).clamp(0.0, 1e9) as u64,
                ),
                _ => tick,
            };
            let until_hb = hb_every.saturating_sub(out.last_send.elapsed());
            feed.idle(until_trade.min(tick).min(until_hb).max(Duration::from_micros(50)));
        }
    }

    // Clean stop: the workers' last outputs, a last heartbeat so readers see the final seq.
    let aggregator = engine.stop(&mut |o| out.take(o));
    if let Some(e) = out.error.take() {
        return Err(e);
    }
    out.flush()?;
    hb.last_seq = out.next_seq - 1;
    hb.feed_state = FeedState::Stopped as u8;
    metrics.feed_state.store(u64::from(hb.feed_state), Ordering::Relaxed);
    metrics.ingest_latency.flush(now_ns());
    out.heartbeat(&hb)?;
    if let Some(r) = recorder.as_mut() {
        r.flush()?;
    }
    if let Some(w) = out.wal.take() {
        let n = w.stop()?;
        tracing::info!(records = n, "wal closed");
    }
    if let Some(s) = out.snap.take() {
        s.stop()?;
    }
    let mut report = out.report;
    report.last_seq = out.next_seq - 1;
    report.aggregator = aggregator;
    Ok(report)
}

/// Rebuilds the K-line state after a restart: the open K-lines of the last committed snapshot go to
/// the workers, then every trade the WAL logged after the seq that snapshot covers is aggregated
/// again (nothing is published: those frames went out before the restart; the snapshot thread
/// gets the K-lines, so durable consumers receive what they had not acked). With a recording,
/// trades the log has but the recording lost are appended to it, and trades it has but the log
/// lost (they will be ingested again) are cut from it.
#[allow(clippy::too_many_arguments)]
fn restore(
    config: &BrokerConfig,
    r: &RestoreState,
    specs: &[SymbolSpec],
    engine: &mut Engine,
    out: &mut Batcher,
    resume: &mut [(i64, Option<i64>)],
    recording: &mut Option<(&mut Recorder, &mut HashMap<String, i64>)>,
) -> Result<RestoreReport, BrokerRunError> {
    let t0 = Instant::now();
    let by_name: HashMap<Symbol, u32> = specs.iter().enumerate().map(|(g, s)| (s.symbol, g as u32)).collect();
    let mut report = RestoreReport::default();
    let mut views: BTreeMap<u32, [Option<Kline>; Interval::COUNT]> = BTreeMap::new();
    for k in &r.open {
        let (Some(&g), Some(iv)) = (by_name.get(&k.symbol), k.interval()) else {
            report.unknown_symbols += 1;
            continue;
        };
        let spec = &specs[g as usize];
        if (spec.price_scale, spec.qty_scale) != (k.price_scale, k.qty_scale) {
            tracing::warn!(symbol = %k.symbol, "stored K-line has other scales than the source's; not restored");
            report.unknown_symbols += 1;
            continue;
        }
        let k = Kline { symbol_id: g, ..*k };
        views.entry(g).or_insert([None; Interval::COUNT])[iv.index()] = Some(k);
        let e = &mut resume[g as usize];
        if k.last_trade_id > e.0 {
            *e = (k.last_trade_id, Some(k.close));
        }
        report.open_klines += 1;
    }
    for (g, v) in views {
        engine.send(engine.worker_of(g), WorkerInput::Restore { g, views: Box::new(v) }, &mut |o| out.take(o));
    }
    engine.wait_idle(&mut |o| out.take(o));
    let restored_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut replay_ms = 0.0;
    let covered = r.committed.map_or(0, |(_, seq)| seq);
    report.from_seq = covered + 1;
    report.to_seq = covered;
    let bad = |e: &dyn std::fmt::Display| BrokerRunError::Restore(e.to_string());
    match &config.wal {
        Some(w) => {
            let mut reader = WalReader::open(&w.dir).map_err(|e| bad(&e))?;
            if let Some(first) = reader.first_seq() {
                if first > covered + 1 {
                    tracing::error!(
                        first,
                        covered,
                        "the WAL starts after the committed snapshot: trades in between are lost"
                    );
                }
                // A recording is completed from the whole retained log; the state only from `covered`.
                let start = if recording.is_some() { first.min(covered + 1) } else { covered + 1 };
                reader.seek(start).map_err(|e| bad(&e))?;
                out.replaying = true;
                // Each K-line changed by the replay goes to the snapshot thread once, at the end.
                engine.broadcast(|| WorkerInput::HoldUpdates(true), &mut |o| out.take(o));
                while let Some(rec) = reader.next_record().map_err(|e| bad(&e))? {
                    let seq = rec.seq;
                    let Ok(frame) = FrameRef::parse(rec.payload) else { continue };
                    if frame.kind() != FrameKind::Trade {
                        continue;
                    }
                    let Ok(Body::Trade(mut t)) = frame.to_owned_body() else { continue };
                    let Some(&g) = by_name.get(&t.symbol) else { continue };
                    t.symbol_id = g;
                    if let Some((rec, last)) = recording.as_mut() {
                        let l = last.entry(t.symbol.as_str().to_string()).or_insert(i64::MIN);
                        if t.trade_id > *l {
                            rec.write(&t)?;
                            *l = t.trade_id;
                        }
                    }
                    if seq <= covered {
                        continue;
                    }
                    out.replay_seq = seq;
                    engine.trade(t, now_ns(), &mut |o| out.take(o));
                    let e = &mut resume[g as usize];
                    if t.trade_id > e.0 {
                        *e = (t.trade_id, Some(t.price));
                    }
                    report.trades_replayed += 1;
                    report.to_seq = seq;
                }
                replay_ms = t0.elapsed().as_secs_f64() * 1e3 - restored_ms;
                engine.broadcast(|| WorkerInput::HoldUpdates(false), &mut |o| out.take(o));
                engine.wait_idle(&mut |o| out.take(o));
                out.replaying = false;
            }
        }
        None => tracing::warn!("no WAL: only the open K-lines of the last committed snapshot are restored"),
    }
    if let Some((rec, last)) = recording.as_mut() {
        for (g, spec) in specs.iter().enumerate() {
            if last.get(spec.symbol.as_str()).is_some_and(|&l| l > resume[g].0) {
                rec.truncate_after(&spec.symbol, resume[g].0)?;
            }
        }
        rec.flush()?;
    }
    let covered_now = out.next_seq - 1;
    if let Some(s) = out.snap.as_mut() {
        s.covered(covered_now);
    }
    report.elapsed = t0.elapsed();
    let m = &out.metrics.snapshots;
    m.restored_open_klines.store(report.open_klines as u64, Ordering::Relaxed);
    m.restored_trades.store(report.trades_replayed, Ordering::Relaxed);
    m.restore_us.store(report.elapsed.as_micros() as u64, Ordering::Relaxed);
    tracing::info!(
        open_klines = report.open_klines,
        unknown = report.unknown_symbols,
        trades_replayed = report.trades_replayed,
        from_seq = report.from_seq,
        to_seq = report.to_seq,
        ms = report.elapsed.as_secs_f64() * 1e3,
        restore_ms = restored_ms,
        replay_ms,
        "state restored from the last committed snapshot and the WAL"
    );
    Ok(report)
}

/// SIGHUP: applies a new symbol list. New symbols get the next ids and start trading; symbols no
/// longer listed stop (their open K-lines are discarded).
fn reload_symbols(source: &SymbolsSource, feed: &mut SyntheticFeed, engine: &mut Engine, out: &mut Batcher) {
    let wanted = match source() {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; symbols unchanged");
            return;
        }
    };
    for (id, name) in feed.active_symbols() {
        if !wanted.iter().any(|w| w.eq_ignore_ascii_case(&name)) {
            feed.remove_symbol(id);
            engine.send(engine.worker_of(id), WorkerInput::RemoveSymbol(id), &mut |o| out.take(o));
            tracing::info!(symbol = %name, id, "symbol removed");
        }
    }
    for name in &wanted {
        if feed.active_symbols().iter().any(|(_, n)| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        match feed.add_symbol(name) {
            Ok((id, spec)) => {
                engine.add_symbol(id, spec, &mut |o| out.take(o));
                tracing::info!(symbol = %name, id, "symbol added");
            }
            Err(e) => tracing::error!(error = %e, "symbol not added"),
        }
    }
}
