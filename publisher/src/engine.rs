//! The partitioned K-line engine: N aggregation workers, each a thread (optionally pinned) that
//! owns the [`Aggregator`] of its symbols, fed and drained through bounded lock-free SPSC queues;
//! or, with 0 workers (the broker's default), the same per-input code (`Lane`) run inline on the
//! ingest thread, each output handed to the sink at once. Aggregating a trade into all 16
//! intervals costs ~30 ns, less than the two queue hops of a worker; workers pay off only when one
//! thread cannot keep up with the aggregation.
//!
//! Upstream: the broker's ingest thread, through [`Engine::send`] — trades, clock ticks, feed
//! state and symbol changes travel down the same queue per worker, so a tick is never overtaken
//! by an earlier trade (one rollover authority per symbol, in order).
//! Downstream: [`Engine::drain`] hands the ingest/publish thread every trade (passed through, so
//! it keeps its place before or after the closes it caused), every closed K-line and the
//! conflated K-line updates, worker by worker in order.
//!
//! Updates of open K-lines are conflated per round: a worker emits each changed K-line once when
//! the ingest thread ends its round ([`Engine::wait_idle`] sends [`WorkerInput::FlushUpdates`]),
//! and at the latest every [`MAX_UNFLUSHED`] inputs. A quiet market has rounds of one trade, so
//! an update leaves at once; under load a round holds thousands of trades and each K-line they
//! touched is sent once for all of them. Trades and closes are never held back.
//!
//! Symbol `g` (the broker's dense id) lives on worker `g % N` at local index `g / N`. Workers
//! never allocate: their tables are sized up front, and when a worker's table is full the ingest
//! thread allocates bigger storage and sends it down the queue ([`WorkerInput::Adopt`]); the worker
//! moves its state in and sends the old storage back to be dropped on the ingest side.
//! An idle worker spins briefly, then parks; the producer unparks it only when it is parked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use mdbus_schema::{Kline, Trade};
use rtrb::{Consumer, Producer, RingBuffer};

use crate::aggregator::{Aggregator, AggregatorConfig, AggregatorStats, AggregatorStorage, SymbolSpec};

/// A message to a worker.
#[derive(Debug)]
pub enum WorkerInput {
    Trade {
        trade: Trade,
        recv_ns: i64,
    },
    /// The source's clock (ms): close what ended before `now - grace`; `sent_ns` is when the
    /// tick was sent (the `ts_recv` of the K-lines it closes).
    Tick {
        ms: i64,
        sent_ns: i64,
    },
    /// Feed state of one symbol (global id) or, with `None`, of all.
    FeedDown(Option<u32>),
    FeedUp {
        symbol: Option<u32>,
        backfilled: bool,
    },
    /// A new symbol with the next global id `g` (ids arrive in order).
    AddSymbol {
        g: u32,
        spec: SymbolSpec,
    },
    RemoveSymbol(u32),
    /// Bigger tables, allocated off the hot path.
    Adopt(Box<AggregatorStorage>),
    /// While true, open-K-line updates are only marked, not emitted (a replay: each changed
    /// K-line is emitted once when it turns false, instead of once per batch).
    HoldUpdates(bool),
    /// A restart: the symbol's open K-lines (per interval, as published) from the last durable
    /// snapshot.
    Restore {
        g: u32,
        views: Box<[Option<Kline>; mdbus_schema::Interval::COUNT]>,
    },
    /// The end of a round: emit every open K-line changed since the last flush (unless held).
    FlushUpdates,
}

/// A worker emits its changed K-lines at least once per this many inputs, flushed or not.
pub const MAX_UNFLUSHED: u32 = 4096;

/// What a worker produced, in order.
#[derive(Debug)]
pub enum WorkerOutput {
    Trade {
        trade: Trade,
        recv_ns: i64,
    },
    /// A closed (or amended) K-line; `ts_event_ns` is what caused it (trade or tick time).
    Closed {
        kline: Kline,
        ts_event_ns: i64,
        recv_ns: i64,
    },
    /// The current state of an open K-line that changed (conflated per batch).
    Update {
        kline: Kline,
        ts_event_ns: i64,
        recv_ns: i64,
    },
    /// The tables replaced by an `Adopt`, to be dropped by the receiver.
    Retired(Box<AggregatorStorage>),
}

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Worker threads; 0: aggregate inline on the calling (ingest/publish) thread.
    pub workers: usize,
    /// Core per worker (`cores[i % len]`); empty: unpinned.
    pub cores: Vec<usize>,
    pub queue_capacity: usize,
    pub aggregator: AggregatorConfig,
}

struct Shared {
    stop: AtomicBool,
    parked: CachePadded<AtomicBool>,
    /// Inputs fully processed (outputs pushed), for [`Engine::wait_idle`].
    processed: CachePadded<AtomicU64>,
    stats: std::sync::Mutex<AggregatorStats>,
}

struct WorkerHandle {
    input: Producer<WorkerInput>,
    output: Consumer<WorkerOutput>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pushed: u64,
    table: Table,
}

/// Local symbols on a partition and its table capacity (grown from the ingest thread).
struct Table {
    symbols: usize,
    capacity: usize,
}

/// Inline aggregation: the one partition, run on the caller's thread.
struct InlineLane {
    lane: Lane,
    table: Table,
}

/// The running workers, or the inline partition.
pub struct Engine {
    workers: Vec<WorkerHandle>,
    inline: Option<Box<InlineLane>>,
    snapshots: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("workers", &self.workers.len()).finish_non_exhaustive()
    }
}

/// Starting the engine failed.
#[derive(Debug, thiserror::Error)]
#[error("starting aggregation worker {worker}: {source}")]
pub struct EngineStartError {
    pub worker: usize,
    #[source]
    pub source: std::io::Error,
}

fn pin(core: usize, worker: usize) {
    if crate::affinity::pin_current_thread(core) {
        tracing::info!(worker, core, "aggregation worker pinned");
    } else {
        tracing::warn!(worker, core, "cannot pin aggregation worker to this core; running unpinned");
    }
}

impl Engine {
    /// Starts `config.workers` workers for `specs` (global ids 0..n in order), or with 0 workers
    /// an engine that aggregates inline, on the thread that feeds it: no hand-off between threads
    /// (the cheapest where cores are few), outputs handed to the sink as they are made.
    pub fn start(config: &EngineConfig, specs: &[SymbolSpec]) -> Result<Engine, EngineStartError> {
        let n = config.workers.max(1);
        let partition = |w: usize| {
            let mine: Vec<SymbolSpec> = specs.iter().enumerate().filter(|(g, _)| g % n == w).map(|(_, s)| *s).collect();
            let capacity = (mine.len() * 2).max(64);
            let mut agg = Aggregator::with_storage(
                AggregatorStorage::new(capacity, config.aggregator.snapshots),
                config.aggregator,
            );
            for s in &mine {
                // Invariant: capacity >= 2 × mine.len().
                let _ = agg.add_symbol(*s);
            }
            (Table { symbols: mine.len(), capacity }, agg)
        };
        if config.workers == 0 {
            let (table, agg) = partition(0);
            let lane = InlineLane { lane: Lane::new(0, 1, agg), table };
            return Ok(Engine {
                workers: Vec::new(),
                inline: Some(Box::new(lane)),
                snapshots: config.aggregator.snapshots,
            });
        }
        // Built as we go: if a spawn fails, dropping `engine` stops the workers already started.
        let mut engine =
            Engine { workers: Vec::with_capacity(n), inline: None, snapshots: config.aggregator.snapshots };
        for w in 0..n {
            let (table, agg) = partition(w);
            let (input, worker_in) = RingBuffer::new(config.queue_capacity.max(16));
            let (worker_out, output) = RingBuffer::new(config.queue_capacity.max(16) * 4);
            let shared = Arc::new(Shared {
                stop: AtomicBool::new(false),
                parked: CachePadded::new(AtomicBool::new(false)),
                processed: CachePadded::new(AtomicU64::new(0)),
                stats: std::sync::Mutex::new(AggregatorStats::default()),
            });
            let core = (!config.cores.is_empty()).then(|| config.cores[w % config.cores.len()]);
            let sh = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("mdbus-agg-{w}"))
                .spawn(move || {
                    if let Some(c) = core {
                        pin(c, w);
                    }
                    run_worker(Lane::new(w as u32, n as u32, agg), worker_in, worker_out, &sh);
                })
                .map_err(|source| EngineStartError { worker: w, source })?;
            engine.workers.push(WorkerHandle { input, output, shared, thread: Some(thread), pushed: 0, table });
        }
        Ok(engine)
    }

    /// Worker threads (0: inline).
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Partitions: the workers, or the one inline.
    fn lanes(&self) -> usize {
        self.workers.len().max(1)
    }

    /// Worker of global symbol `g` (0 inline).
    pub fn worker_of(&self, g: u32) -> usize {
        g as usize % self.lanes()
    }

    /// Sends `msg` to worker `w`. When its queue is full, hands waiting outputs to `sink` until
    /// there is room (so a full output queue can never deadlock the pair). Inline, `msg` is
    /// processed now and its outputs go to `sink` before this returns.
    pub fn send(&mut self, w: usize, mut msg: WorkerInput, sink: &mut impl FnMut(WorkerOutput)) {
        if let Some(inline) = self.inline.as_mut() {
            inline.lane.handle(msg, sink);
            return;
        }
        loop {
            let h = &mut self.workers[w];
            match h.input.push(msg) {
                Ok(()) => {
                    h.pushed += 1;
                    // Pairs with the worker's fence between "parked = true" and its last look at
                    // the queue: one of the two sides always sees the other (no lost wake-up).
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if h.shared.parked.load(Ordering::SeqCst) {
                        if let Some(t) = &h.thread {
                            t.thread().unpark();
                        }
                    }
                    return;
                }
                Err(rtrb::PushError::Full(back)) => {
                    msg = back;
                    if let Some(t) = &h.thread {
                        t.thread().unpark();
                    }
                    if self.drain(sink) == 0 {
                        std::thread::yield_now();
                    }
                }
            }
        }
    }

    /// Sends `msg` to every worker (ticks, feed state).
    pub fn broadcast(&mut self, msg: impl Fn() -> WorkerInput, sink: &mut impl FnMut(WorkerOutput)) {
        for w in 0..self.lanes() {
            self.send(w, msg(), sink);
        }
    }

    /// Routes a trade to its symbol's worker.
    pub fn trade(&mut self, trade: Trade, recv_ns: i64, sink: &mut impl FnMut(WorkerOutput)) {
        let w = self.worker_of(trade.symbol_id);
        self.send(w, WorkerInput::Trade { trade, recv_ns }, sink);
    }

    /// Adds a symbol with global id `g` (ids must be added in order, 0, 1, 2, …). Grows the
    /// worker's tables first if needed, allocating here, off the worker's hot path.
    pub fn add_symbol(&mut self, g: u32, spec: SymbolSpec, sink: &mut impl FnMut(WorkerOutput)) {
        let w = self.worker_of(g);
        let t = match self.inline.as_deref_mut() {
            Some(i) => &mut i.table,
            None => &mut self.workers[w].table,
        };
        t.symbols += 1;
        if t.symbols > t.capacity {
            t.capacity *= 2;
            let storage = Box::new(AggregatorStorage::new(t.capacity, self.snapshots));
            self.send(w, WorkerInput::Adopt(storage), sink);
        }
        self.send(w, WorkerInput::AddSymbol { g, spec }, sink);
    }

    /// Hands every output waiting in the workers' queues to `sink`, worker by worker. Returns how
    /// many there were.
    pub fn drain(&mut self, sink: &mut impl FnMut(WorkerOutput)) -> usize {
        let mut n = 0;
        for h in &mut self.workers {
            while let Ok(out) = h.output.pop() {
                n += 1;
                sink(out);
            }
        }
        n
    }

    /// Ends a round: has every worker emit its changed K-lines, then waits until every worker has
    /// processed everything sent to it, draining outputs meanwhile.
    pub fn wait_idle(&mut self, sink: &mut impl FnMut(WorkerOutput)) {
        self.broadcast(|| WorkerInput::FlushUpdates, sink);
        let start = Instant::now();
        loop {
            self.drain(sink);
            let busy = self.workers.iter().any(|h| h.shared.processed.load(Ordering::Acquire) < h.pushed);
            if !busy {
                // Everything processed; its outputs were pushed before `processed` moved.
                self.drain(sink);
                return;
            }
            if start.elapsed() > Duration::from_micros(50) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Sum of the workers' aggregator counters (refreshed by each worker after every batch).
    pub fn stats(&self) -> AggregatorStats {
        if let Some(i) = self.inline.as_deref() {
            return i.lane.agg.stats();
        }
        let mut t = AggregatorStats::default();
        for h in &self.workers {
            let s = h.shared.stats.lock().map(|g| *g).unwrap_or_default();
            t.trades += s.trades;
            t.late_trades += s.late_trades;
            t.amended_klines += s.amended_klines;
            t.unknown_symbol_trades += s.unknown_symbol_trades;
            t.closed += s.closed;
            t.empty_opened += s.empty_opened;
            t.empty_skipped += s.empty_skipped;
            t.feed_gaps += s.feed_gaps;
            t.late_interval_drops += s.late_interval_drops;
        }
        t
    }

    /// Stops and joins the workers (after draining their outputs into `sink`); returns their
    /// final counters.
    pub fn stop(mut self, sink: &mut impl FnMut(WorkerOutput)) -> AggregatorStats {
        self.wait_idle(sink);
        for h in &mut self.workers {
            h.shared.stop.store(true, Ordering::SeqCst);
            if let Some(t) = h.thread.take() {
                t.thread().unpark();
                let _ = t.join();
            }
        }
        self.drain(sink);
        self.stats()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for h in &mut self.workers {
            h.shared.stop.store(true, Ordering::SeqCst);
            if let Some(t) = h.thread.take() {
                t.thread().unpark();
                let _ = t.join();
            }
        }
    }
}

/// Pushes `out`, waiting (never dropping) while the consumer catches up.
fn push_out(q: &mut Producer<WorkerOutput>, mut out: WorkerOutput, shared: &Shared) {
    loop {
        match q.push(out) {
            Ok(()) => return,
            Err(rtrb::PushError::Full(back)) => {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                out = back;
                std::thread::yield_now();
            }
        }
    }
}

/// One partition's aggregation: what a worker thread (or, inline, the ingest thread) does with
/// each input, emitting its outputs in order.
struct Lane {
    w: u32,
    n: u32,
    agg: Aggregator,
    /// Time of what is being processed, stamped on the K-lines it produces.
    ts_event_ns: i64,
    recv_ns: i64,
    hold: bool,
    /// Inputs since the changed K-lines were last emitted.
    unflushed: u32,
}

impl Lane {
    fn new(w: u32, n: u32, agg: Aggregator) -> Lane {
        Lane { w, n, agg, ts_event_ns: 0, recv_ns: 0, hold: false, unflushed: 0 }
    }

    fn handle(&mut self, msg: WorkerInput, out: &mut impl FnMut(WorkerOutput)) {
        let (w, n) = (self.w, self.n);
        let local = |g: u32| g / n;
        let mut flush = false;
        match msg {
            WorkerInput::Trade { trade, recv_ns } => {
                self.ts_event_ns = trade.time_us.saturating_mul(1000);
                self.recv_ns = recv_ns;
                let (ts_event_ns, recv_ns) = (self.ts_event_ns, self.recv_ns);
                self.agg.on_trade_at(local(trade.symbol_id), &trade, &mut |k| {
                    out(WorkerOutput::Closed { kline: *k, ts_event_ns, recv_ns })
                });
                out(WorkerOutput::Trade { trade, recv_ns });
            }
            WorkerInput::Tick { ms, sent_ns } => {
                self.ts_event_ns = ms.saturating_mul(1_000_000);
                self.recv_ns = sent_ns;
                let (ts_event_ns, recv_ns) = (self.ts_event_ns, self.recv_ns);
                self.agg.on_clock(ms, &mut |k| out(WorkerOutput::Closed { kline: *k, ts_event_ns, recv_ns }));
            }
            WorkerInput::FeedDown(None) => self.agg.set_feed_live(false),
            WorkerInput::FeedDown(Some(g)) => self.agg.feed_down(local(g)),
            WorkerInput::FeedUp { symbol: None, backfilled } => {
                for id in 0..self.agg.symbol_count() as u32 {
                    self.agg.feed_up(id, backfilled);
                }
            }
            WorkerInput::FeedUp { symbol: Some(g), backfilled } => self.agg.feed_up(local(g), backfilled),
            WorkerInput::AddSymbol { g, spec } => match self.agg.add_symbol(spec) {
                Ok(id) if id == local(g) => {}
                Ok(id) => tracing::error!(worker = w, symbol = %spec.symbol, g, id, "symbol ids out of step"),
                Err(e) => tracing::error!(worker = w, symbol = %spec.symbol, error = %e, "symbol not added"),
            },
            WorkerInput::RemoveSymbol(g) => {
                self.agg.remove_symbol(local(g));
            }
            WorkerInput::HoldUpdates(h) => {
                self.hold = h;
                flush = !h;
            }
            WorkerInput::FlushUpdates => flush = true,
            WorkerInput::Restore { g, views } => {
                if !self.agg.restore_symbol(local(g), &views) {
                    tracing::warn!(worker = w, g, "restore for an unknown symbol ignored");
                }
            }
            WorkerInput::Adopt(mut storage) => {
                // Swap through the same box: no allocation or free on this thread (an empty
                // storage allocates nothing).
                let fresh = std::mem::replace(&mut *storage, AggregatorStorage::new(0, false));
                *storage = self.agg.adopt(fresh);
                out(WorkerOutput::Retired(storage));
            }
        }
        self.unflushed += 1;
        if !self.hold && (flush || self.unflushed >= MAX_UNFLUSHED) {
            let (ts_event_ns, recv_ns) = (self.ts_event_ns, self.recv_ns);
            self.agg.drain_updates(&mut |k| out(WorkerOutput::Update { kline: *k, ts_event_ns, recv_ns }));
            self.unflushed = 0;
        }
    }
}

fn run_worker(mut lane: Lane, mut input: Consumer<WorkerInput>, mut output: Producer<WorkerOutput>, shared: &Shared) {
    let mut processed: u64 = 0;
    let mut idle_since: Option<Instant> = None;
    loop {
        let mut batch = 0u32;
        while let Ok(msg) = input.pop() {
            batch += 1;
            lane.handle(msg, &mut |o| push_out(&mut output, o, shared));
            processed += 1;
            // Progress at the end of a batch (or every 256 inputs under load).
            if input.is_empty() || batch.is_multiple_of(256) {
                // Counters first (never waiting for the lock), then the progress mark.
                if let Ok(mut s) = shared.stats.try_lock() {
                    *s = lane.agg.stats();
                }
                shared.processed.store(processed, Ordering::Release);
            }
        }
        if batch > 0 {
            idle_since = None;
            continue;
        }
        if shared.stop.load(Ordering::SeqCst) {
            // Final counters, waiting for the lock this once.
            if let Ok(mut s) = shared.stats.lock() {
                *s = lane.agg.stats();
            }
            return;
        }
        // Idle: spin ~50 µs, then park until unparked (input and `stop` both unpark; the timeout
        // is only a safety net, so an idle worker wakes rarely).
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_micros(50) {
            std::hint::spin_loop();
            continue;
        }
        shared.parked.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if input.is_empty() && !shared.stop.load(Ordering::SeqCst) {
            std::thread::park_timeout(Duration::from_millis(100));
        }
        shared.parked.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{symbol_names, SyntheticConfig, SyntheticFeed};

    #[test]
    fn workers_give_the_same_klines_as_one_aggregator_and_grow_while_running() {
        // Two worker threads, then inline (0 workers): both must equal one plain aggregator.
        same_klines_as_one_aggregator(2);
        same_klines_as_one_aggregator(0);
    }

    fn same_klines_as_one_aggregator(workers: usize) {
        let n = 140;
        let cfg = SyntheticConfig {
            seed: 9,
            symbols: symbol_names(n),
            rate: 500.0,
            start_us: 1_709_251_140_000_000,
            max_trades: Some(60_000),
            steady: false,
        };
        let mut feed = SyntheticFeed::new(&cfg).unwrap();
        let specs = feed.specs();
        let agg_cfg = AggregatorConfig { close_grace_ms: 100, ..AggregatorConfig::default() };
        let mut reference = Aggregator::new(&specs, agg_cfg);
        // Workers starting with one symbol: adding the other 139 outgrows each one's initial
        // table (64), so each adopts bigger storage while running (inline: the one partition).
        let config = EngineConfig { workers, cores: vec![], queue_capacity: 64, aggregator: agg_cfg };
        let mut engine = Engine::start(&config, &specs[..1]).unwrap();
        let mut got: Vec<Kline> = Vec::new();
        let mut trades_out = 0;
        let mut retired = 0;
        let mut sink = |o: WorkerOutput| match o {
            WorkerOutput::Closed { kline, .. } => got.push(kline),
            WorkerOutput::Trade { .. } => trades_out += 1,
            WorkerOutput::Update { .. } => {}
            WorkerOutput::Retired(_) => retired += 1,
        };
        for (g, spec) in specs.iter().enumerate().skip(1) {
            engine.add_symbol(g as u32, *spec, &mut sink);
        }
        let mut want: Vec<Kline> = Vec::new();
        let mut i = 0u64;
        while let Some(t) = feed.next_trade() {
            reference.on_trade(&t, &mut |k| want.push(*k));
            engine.trade(t, 0, &mut sink);
            i += 1;
            if i.is_multiple_of(100) {
                reference.on_clock(t.time_ms(), &mut |k| want.push(*k));
                let ms = t.time_ms();
                engine.broadcast(|| WorkerInput::Tick { ms, sent_ns: 0 }, &mut sink);
            }
        }
        let stats = engine.stop(&mut sink);
        assert_eq!(trades_out, 60_000);
        // Two workers of 70 symbols each grow once (64 → 128); inline, the one table of 140
        // grows twice (64 → 128 → 256).
        assert_eq!(retired, if workers == 0 { 2 } else { workers }, "tables grown while running");
        assert_eq!(stats.trades, 60_000);
        let key = |k: &Kline| (k.symbol_id, k.interval, k.open_time);
        got.sort_by_key(key);
        want.sort_by_key(key);
        assert!(want.len() > 10_000);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the closed K-lines of {workers} workers differ from one aggregator's");
    }

    #[test]
    fn open_kline_updates_leave_once_per_round_and_trades_at_once() {
        updates_once_per_round(1);
        updates_once_per_round(0);
    }

    fn updates_once_per_round(workers: usize) {
        let cfg = SyntheticConfig {
            seed: 3,
            symbols: symbol_names(2),
            rate: 1000.0,
            start_us: 1_709_251_140_000_000,
            max_trades: None,
            steady: true,
        };
        let mut feed = SyntheticFeed::new(&cfg).unwrap();
        let specs = feed.specs();
        let config = EngineConfig { workers, cores: vec![], queue_capacity: 8192, aggregator: Default::default() };
        let mut engine = Engine::start(&config, &specs).unwrap();
        let out = std::cell::RefCell::new(Vec::new());
        let mut sink = |o: WorkerOutput| out.borrow_mut().push(o);
        let updates = |out: &std::cell::RefCell<Vec<WorkerOutput>>| -> Vec<Kline> {
            let v = out.borrow();
            v.iter()
                .filter_map(|o| if let WorkerOutput::Update { kline, .. } = o { Some(*kline) } else { None })
                .collect()
        };
        let trades = |out: &std::cell::RefCell<Vec<WorkerOutput>>| {
            out.borrow().iter().filter(|o| matches!(o, WorkerOutput::Trade { .. })).count()
        };
        // One round of 1 000 trades over two symbols: every trade comes through, and each open
        // K-line they changed leaves once, at the end of the round, with the round's last state.
        let mut last = [None; 2];
        for _ in 0..1_000 {
            let t = feed.next_trade().unwrap();
            last[t.symbol_id as usize] = Some(t.trade_id);
            engine.trade(t, 0, &mut sink);
        }
        engine.wait_idle(&mut sink);
        assert_eq!(trades(&out), 1_000);
        let u = updates(&out);
        assert_eq!(u.len(), 2 * mdbus_schema::Interval::COUNT, "one update per symbol and interval");
        for k in &u {
            assert_eq!(Some(k.last_trade_id), last[k.symbol_id as usize], "the newest state");
        }
        // A round of one trade: its updates leave at the end of that round, not later.
        out.borrow_mut().clear();
        let t = feed.next_trade().unwrap();
        engine.trade(t, 0, &mut sink);
        engine.wait_idle(&mut sink);
        let u = updates(&out);
        assert_eq!(u.len(), mdbus_schema::Interval::COUNT);
        assert!(u.iter().all(|k| k.last_trade_id == t.trade_id));
        // Past MAX_UNFLUSHED inputs without a round's end, updates leave anyway.
        out.borrow_mut().clear();
        for _ in 0..MAX_UNFLUSHED + 10 {
            engine.trade(feed.next_trade().unwrap(), 0, &mut sink);
        }
        let start = Instant::now();
        while updates(&out).is_empty() && start.elapsed() < Duration::from_secs(10) {
            engine.drain(&mut sink);
        }
        assert!(!updates(&out).is_empty(), "a long round still emits its updates");
        engine.stop(&mut sink);
    }
}
