//! [`Reader`]: one subscription to one stream, with filtering, seq tracking and liveness.
//!
//! Upstream: `mdbus-bus` samples. Downstream: the application's callback, per frame, zero-copy.
//! Frames that fail to decode are counted and logged (first few in full, then sampled) and the
//! rest of their sample is skipped; nothing panics on bad bytes.

use std::time::{Duration, Instant};

use mdbus_bus::{BusError, BusNode, StreamSettings, StreamSubscriber};
use mdbus_schema::{FeedState, FrameIter, FrameKind, FrameRef, Interval, Symbol, SymbolError};
use mdbus_wal::WalReader;

use crate::health::{Health, Liveness};
use crate::seq::{SeqEvent, SeqStats, SeqTracker};

/// Which frames reach the callback. Heartbeats always feed seq tracking and liveness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    symbols: Vec<Symbol>,
    /// Bit i set: interval with wire value i passes. 0 = all.
    intervals: u16,
    /// Bit k set: FrameKind k passes. 0 = all data kinds (no heartbeats).
    kinds: u8,
}

impl Filter {
    fn passes(&self, f: &FrameRef<'_>) -> bool {
        let kind = f.kind();
        if self.kinds == 0 {
            if !kind.is_data() {
                return false;
            }
        } else if self.kinds & (1 << kind as u8) == 0 {
            return false;
        }
        if !self.symbols.is_empty() {
            if let Some(raw) = f.peek_symbol() {
                if !self.symbols.iter().any(|s| s.as_bytes()[..] == *raw) {
                    return false;
                }
            }
        }
        if self.intervals != 0 {
            if let Some(i) = f.peek_interval() {
                if i >= 16 || self.intervals & (1 << i) == 0 {
                    return false;
                }
            }
        }
        true
    }
}

/// How to open a [`Reader`].
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    pub filter: Filter,
    /// Samples queued for this reader before the oldest is lost.
    pub buffer: usize,
    pub settings: StreamSettings,
    /// iceoryx2 node name (shows in `iox2 node list`).
    pub node_name: String,
    /// The stream's write-ahead log: gaps (and a start from an older seq) are filled from it.
    pub wal: Option<std::path::PathBuf>,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        let settings = StreamSettings::default();
        ReaderOptions {
            filter: Filter::default(),
            buffer: settings.subscriber_buffer,
            settings,
            node_name: "reader".into(),
            wal: None,
        }
    }
}

impl ReaderOptions {
    /// Only frames of this symbol (may be called several times).
    pub fn symbol(mut self, name: &str) -> Result<Self, SymbolError> {
        self.filter.symbols.push(Symbol::new(name)?);
        Ok(self)
    }
    /// Only K-lines of this interval (may be called several times).
    pub fn interval(mut self, i: Interval) -> Self {
        self.filter.intervals |= 1 << (i as u8);
        self
    }
    /// Only frames of this kind (may be called several times); heartbeats are delivered only if
    /// asked for.
    pub fn kind(mut self, k: FrameKind) -> Self {
        self.filter.kinds |= 1 << (k as u8);
        self
    }
    pub fn buffer(mut self, samples: usize) -> Self {
        self.buffer = samples;
        self
    }
    pub fn settings(mut self, s: StreamSettings) -> Self {
        self.settings = s;
        self.buffer = self.buffer.min(s.subscriber_buffer);
        self
    }
    /// Fill gaps from this write-ahead log folder (the broker's `--wal`), and allow
    /// [`Reader::start_at`] an older seq.
    pub fn wal(mut self, dir: &std::path::Path) -> Self {
        self.wal = Some(dir.to_owned());
        self
    }
    pub fn node_name(mut self, name: &str) -> Self {
        self.node_name = name.to_owned();
        self
    }
}

/// How [`Reader::next_batch`] waits for data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Take what is there, never wait.
    Poll,
    /// Busy-poll up to this long: lowest latency, burns a core.
    Spin(Duration),
    /// Spin briefly, then sleep on the stream's wake-up event up to this long: no CPU when idle.
    Block(Duration),
}

/// Counters of a [`Reader`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    pub samples: u64,
    /// Frames decoded (all kinds, before filtering).
    pub frames: u64,
    /// Frames handed to the callback.
    pub delivered: u64,
    pub heartbeats: u64,
    /// Samples whose bytes failed to decode (their remaining frames are skipped).
    pub decode_errors: u64,
    pub seq: SeqStats,
    pub publisher_restarts: u64,
    /// Frames read from the write-ahead log (a resume or a gap filled).
    pub replayed: u64,
}

/// Opening a reader failed.
#[derive(Debug, thiserror::Error)]
pub enum ReaderOpenError {
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A subscription to one stream. `!Send`: create it on the thread that reads.
#[derive(Debug)]
pub struct Reader {
    _node: BusNode,
    sub: StreamSubscriber,
    filter: Filter,
    tracker: SeqTracker,
    liveness: Liveness,
    stats: ReaderStats,
    spin_budget: Duration,
    wal_dir: Option<std::path::PathBuf>,
    wal: Option<WalReader>,
    /// Replay the log up to its end before the next live frame.
    catch_up: bool,
    /// After a fill gave up waiting for the log, later fills do not wait until this time (a log
    /// that is not being written must not stall the live stream at every gap).
    wal_stale_until: Option<Instant>,
}

/// How long a gap fill waits for the log to catch up with the live stream.
const WAL_WAIT: Duration = Duration::from_secs(2);

const LOG_FIRST: u64 = 10;
/// Samples handed out per `next_batch` call at most.
const MAX_SAMPLES_PER_BATCH: usize = 64;

fn sampled(n: u64) -> bool {
    n <= LOG_FIRST || n.is_power_of_two()
}

impl Reader {
    /// Subscribes to `stream` on `bus`. The stream need not exist yet: the reader creates the
    /// service and receives from the broker as soon as it starts.
    pub fn open(bus: &str, stream: &str, options: ReaderOptions) -> Result<Reader, ReaderOpenError> {
        let node = BusNode::open(bus, &options.node_name)?;
        let sub = node.subscriber(stream, options.settings, options.buffer)?;
        Ok(Reader {
            _node: node,
            sub,
            filter: options.filter,
            tracker: SeqTracker::new(),
            liveness: Liveness::default(),
            stats: ReaderStats::default(),
            spin_budget: Duration::from_micros(50),
            wal_dir: options.wal,
            wal: None,
            catch_up: false,
            wal_stale_until: None,
        })
    }

    /// The name of the iceoryx2 service read.
    pub fn service(&self) -> &str {
        self.sub.service()
    }

    /// Starts seq tracking at `seq` (the next frame expected).
    pub fn expect_seq(&mut self, seq: u64) {
        self.tracker.expect(seq);
    }

    /// Resumes at `seq`: frames from `seq` come from the write-ahead log (set with
    /// [`ReaderOptions::wal`]) until the log has caught up with the live stream, then live — each
    /// exactly once, in order (the live frames already seen in the log are dropped as duplicates).
    pub fn start_at(&mut self, seq: u64) {
        self.tracker.expect(seq);
        self.catch_up = true;
    }

    /// Delivers logged frames from the next expected seq up to (not including) `end`, or up to the
    /// log's current end with `None`. Waits up to [`WAL_WAIT`] for a lagging log to reach `end`.
    fn fill(&mut self, end: Option<u64>, f: &mut impl FnMut(&FrameRef<'_>)) -> usize {
        let Some(dir) = self.wal_dir.as_ref() else { return 0 };
        let Some(from) = self.tracker.next_expected() else { return 0 };
        if end.is_some_and(|e| e <= from) {
            return 0;
        }
        if self.wal.is_none() {
            self.wal = WalReader::open(dir).ok();
        }
        let Some(wal) = self.wal.as_mut() else { return 0 };
        if let Err(e) = wal.seek(from) {
            tracing::warn!(service = self.sub.service(), error = %e, from, "cannot fill from the write-ahead log");
            return 0;
        }
        let started = Instant::now();
        let may_wait = self.wal_stale_until.is_none_or(|t| started >= t);
        let mut delivered = 0;
        loop {
            match wal.next_record() {
                Ok(Some(rec)) => {
                    if end.is_some_and(|e| rec.seq >= e) {
                        break;
                    }
                    // The log hands payloads out aligned: validated in place.
                    let Ok(frame) = FrameRef::parse(rec.payload) else {
                        self.stats.decode_errors += 1;
                        tracing::warn!(service = self.sub.service(), seq = rec.seq, "undecodable frame in the log");
                        break;
                    };
                    if self.tracker.on_data(rec.seq) == SeqEvent::Duplicate {
                        continue;
                    }
                    self.stats.replayed += 1;
                    self.stats.frames += 1;
                    if self.filter.passes(&frame) {
                        f(&frame);
                        delivered += 1;
                    }
                }
                Ok(None) => match end {
                    Some(_) if may_wait && started.elapsed() < WAL_WAIT => {
                        std::thread::sleep(Duration::from_micros(500))
                    }
                    Some(e) => {
                        if may_wait {
                            tracing::warn!(
                                service = self.sub.service(),
                                until = e,
                                "the write-ahead log does not reach the live stream; gaps are counted"
                            );
                            self.wal_stale_until = Some(Instant::now() + Duration::from_secs(10));
                        }
                        break;
                    }
                    None => break,
                },
                Err(e) => {
                    tracing::warn!(service = self.sub.service(), error = %e, "write-ahead log read failed");
                    break;
                }
            }
        }
        delivered
    }

    pub fn stats(&self) -> ReaderStats {
        ReaderStats { seq: self.tracker.stats(), publisher_restarts: self.liveness.restarts(), ..self.stats }
    }

    pub fn health(&self) -> Health {
        self.liveness.health(Instant::now())
    }

    pub fn feed_state(&self) -> FeedState {
        self.liveness.feed_state()
    }

    /// Heartbeat intervals the publisher has been silent for (0 while healthy).
    pub fn heartbeats_missed(&self) -> u64 {
        self.liveness.heartbeats_missed(Instant::now())
    }

    /// The next seq this reader expects (`None` before the first frame).
    pub fn next_seq(&self) -> Option<u64> {
        self.tracker.next_expected()
    }

    /// Waits per `mode` for data, then hands every queued frame that passes the filter to `f`,
    /// in order. Returns the number of frames delivered (0 on timeout).
    pub fn next_batch(&mut self, mode: WaitMode, mut f: impl FnMut(&FrameRef<'_>)) -> Result<usize, BusError> {
        let n = self.drain(&mut f)?;
        if n > 0 || mode == WaitMode::Poll {
            return Ok(n);
        }
        let start = Instant::now();
        let (spin, block) = match mode {
            WaitMode::Spin(t) => (t, Duration::ZERO),
            WaitMode::Block(t) => (self.spin_budget.min(t), t.saturating_sub(self.spin_budget)),
            WaitMode::Poll => (Duration::ZERO, Duration::ZERO),
        };
        let mut got = false;
        while start.elapsed() < spin {
            if self.sub.has_samples() {
                got = true;
                break;
            }
            std::hint::spin_loop();
        }
        if !got && !block.is_zero() {
            // Clear stale wake-ups, re-check, then sleep: a sample sent after the check comes
            // with a fresh wake-up, so none is missed.
            self.sub.drain_wakeups();
            if !self.sub.has_samples() {
                self.sub.wait(block)?;
            }
        }
        self.drain(&mut f)
    }

    fn drain(&mut self, f: &mut impl FnMut(&FrameRef<'_>)) -> Result<usize, BusError> {
        let mut delivered = 0;
        if self.catch_up {
            self.catch_up = false;
            delivered += self.fill(None, f);
        }
        // Bounded, so that a caller checking a deadline or a count regains control under load.
        let mut samples = 0;
        while samples < MAX_SAMPLES_PER_BATCH {
            let Some(sample) = self.sub.receive()? else { break };
            samples += 1;
            self.stats.samples += 1;
            let now = Instant::now();
            self.liveness.on_frame(now);
            for frame in FrameIter::new(sample.payload()) {
                let frame = match frame {
                    Ok(fr) => fr,
                    Err(e) => {
                        self.stats.decode_errors += 1;
                        if sampled(self.stats.decode_errors) {
                            tracing::warn!(service = self.sub.service(), error = %e, count = self.stats.decode_errors, "undecodable sample skipped");
                        }
                        break;
                    }
                };
                self.stats.frames += 1;
                if frame.kind() == FrameKind::Heartbeat {
                    self.stats.heartbeats += 1;
                    match frame.heartbeat() {
                        Ok(hb) => {
                            let feed = FeedState::from_u8(hb.feed_state).unwrap_or(FeedState::Unknown);
                            let last = hb.last_seq.to_native();
                            if self.liveness.on_heartbeat(
                                now,
                                hb.publisher_id.to_native(),
                                hb.interval_ms.to_native(),
                                feed,
                            ) {
                                tracing::warn!(service = self.sub.service(), last_seq = last, "publisher restarted");
                                if self.tracker.next_expected().is_some_and(|n| last.saturating_add(1) < n) {
                                    self.tracker.reset();
                                }
                            }
                            if self.tracker.next_expected().is_some_and(|n| last >= n) {
                                // A lost tail: the log may have it.
                                delivered += self.fill(Some(last.saturating_add(1)), f);
                            }
                            let lost = self.tracker.on_heartbeat(last);
                            if lost > 0 && sampled(self.tracker.stats().gaps) {
                                tracing::warn!(
                                    service = self.sub.service(),
                                    lost,
                                    last_seq = last,
                                    "heartbeat reveals lost frames"
                                );
                            }
                        }
                        Err(e) => {
                            self.stats.decode_errors += 1;
                            tracing::warn!(service = self.sub.service(), error = %e, "bad heartbeat");
                            continue;
                        }
                    }
                } else {
                    if self.tracker.next_expected().is_some_and(|n| frame.seq() > n) {
                        // A gap (or a resume): fill it from the log first, in order.
                        delivered += self.fill(Some(frame.seq()), f);
                    }
                    match self.tracker.on_data(frame.seq()) {
                        SeqEvent::Duplicate => continue,
                        SeqEvent::Gap { missing } if sampled(self.tracker.stats().gaps) => {
                            tracing::warn!(
                                service = self.sub.service(),
                                missing,
                                at_seq = frame.seq(),
                                gaps = self.tracker.stats().gaps,
                                "sequence gap"
                            );
                        }
                        _ => {}
                    }
                }
                if self.filter.passes(&frame) {
                    f(&frame);
                    delivered += 1;
                }
            }
        }
        self.stats.delivered += delivered as u64;
        Ok(delivered)
    }
}
