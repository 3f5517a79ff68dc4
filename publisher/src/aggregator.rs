//! The K-line aggregator: a pure state machine from trades and clock ticks to K-lines.
//!
//! Upstream: trades (already normalised to [`Trade`]), clock ticks and feed-state changes, all
//! passed in as arguments — the aggregator has no clock, no I/O, and no allocation per trade.
//! Downstream: closed K-lines go to a callback the moment they close (in order, never conflated);
//! changed open K-lines are remembered in a preallocated dirty table and drained by
//! [`Aggregator::drain_updates`] (one update per K-line however many trades touched it); the
//! optional snapshot side ([`Aggregator::take_snapshot`] / [`Aggregator::commit_snapshot`], double
//! buffered) keeps a second dirty table and the closed K-lines for the delayed (database) path.
//!
//! **One rollover authority**: [`Aggregator::roll_to`] is the only code that closes a K-line.
//! A trade first rolls its symbol to the trade's time; a clock tick rolls every symbol whose feed is
//! live to `now - grace`. Each symbol has a monotonic watermark: time never goes back.
//! Rolling closes each open K-line whose bucket ended and opens Binance's empty K-line for the
//! next bucket (`o=h=l=c=` previous close, `f=L=-1`). Work per roll is bounded: after a quiet gap
//! longer than `max_empty_run` buckets, only the last `max_empty_run` empty K-lines are made and
//! the first of them carries `KLINE_FLAG_EMPTY_SKIPPED`.
//!
//! **A dead feed is not a quiet market**: while a symbol's feed is down the clock rolls nothing;
//! when it comes back (without a backfill) the next roll closes the pre-outage K-line with
//! `KLINE_FLAG_FEED_GAP` and jumps straight to the current bucket (also flagged), fabricating no
//! empty K-lines for the outage.
//!
//! **Late trades** (older than the symbol's newest open K-line): [`LatePolicy::Drop`] counts and
//! drops them; [`LatePolicy::Amend`] folds them into the open K-lines of the intervals where they
//! still fit and re-closes the most recently closed K-line of the others with `revision + 1` and
//! `KLINE_FLAG_AMENDED`; anything older still is dropped and counted.
//!
//! **Dynamic symbols**: tables are sized for a capacity; adding a symbol within it allocates
//! nothing. Growing is done by [`Aggregator::adopt`]ing storage allocated elsewhere (the control
//! thread), so the aggregating thread never allocates.

use mdbus_schema::body::{KLINE_FLAG_AMENDED, KLINE_FLAG_EMPTY_SKIPPED, KLINE_FLAG_FEED_GAP};
use mdbus_schema::{Interval, Kline, Symbol, Trade};

/// What the aggregator needs to know about a symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolSpec {
    pub symbol: Symbol,
    pub price_scale: u8,
    pub qty_scale: u8,
}

/// What to do with a trade older than the symbol's open K-lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatePolicy {
    /// Drop it and count it.
    #[default]
    Drop,
    /// Fold it in where it still fits; re-close the last closed K-line with a revision marker.
    Amend,
}

/// Settings of the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregatorConfig {
    /// A K-line closes on the clock when the clock passes its end plus this many ms.
    pub close_grace_ms: i64,
    pub late_policy: LatePolicy,
    /// At most this many empty K-lines per interval per roll (bounded work after a quiet gap).
    pub max_empty_run: u32,
    /// Keep the snapshot dirty table (the delayed/database path).
    pub snapshots: bool,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig { close_grace_ms: 200, late_policy: LatePolicy::Drop, max_empty_run: 1000, snapshots: false }
    }
}

/// The result of feeding one trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TradeOutcome {
    Accepted,
    /// Older than the open K-lines and dropped (policy `drop`, or too old to amend).
    Late,
    /// Older than the open K-lines of some intervals: folded in or amended (policy `amend`).
    Amended,
    /// `symbol_id` is not an active symbol: dropped and counted.
    UnknownSymbol,
}

/// Counters, read by whoever owns the aggregator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregatorStats {
    pub trades: u64,
    pub late_trades: u64,
    pub amended_klines: u64,
    pub unknown_symbol_trades: u64,
    pub closed: u64,
    pub empty_opened: u64,
    /// Empty K-lines not made because a quiet gap exceeded `max_empty_run`.
    pub empty_skipped: u64,
    /// K-lines closed with `KLINE_FLAG_FEED_GAP`.
    pub feed_gaps: u64,
    /// Under the amend policy: (trade, interval) pairs where a late trade was older than both the
    /// open and the last closed K-line, so that interval does not include it.
    pub late_interval_drops: u64,
}

const N: usize = Interval::COUNT;
/// Dirty-table slots per symbol: one per interval plus [`ALL`] ("every interval changed").
const STRIDE: usize = N + 1;
const ALL: usize = N;

#[derive(Debug, Clone)]
struct SymbolState {
    spec: SymbolSpec,
    active: bool,
    feed_live: bool,
    /// The feed came back without a backfill: the next roll jumps over the outage.
    resume_gap: bool,
    /// Time this symbol has been rolled to (ms); never decreases.
    watermark_ms: i64,
    /// Earliest end (`close_time + 1`) of its open K-lines: a trade before it needs no roll.
    roll_due_ms: i64,
    /// `open[0]`: the open 1s K-line, the only one a trade touches. `open[i ≥ 1]`: the *partial*
    /// K-line of interval `i` — the closed 1s K-lines of its bucket folded together (and late
    /// trades amended in); its live state is `partial ⊕ open[0]` ([`Aggregator::open_kline`]).
    /// Every bucket boundary is a whole second, so a 1s bucket always lies inside one bucket of
    /// every interval. `None` until the symbol's first trade.
    open: [Option<Kline>; N],
    /// The last closed K-line per interval (for amending).
    last_closed: [Option<Kline>; N],
}

/// A dirty table: one bit per slot plus the list of set slots, sized up front.
#[derive(Debug, Clone, Default)]
struct DirtyTable {
    bits: Vec<u64>,
    list: Vec<u32>,
}

impl DirtyTable {
    fn with_slots(slots: usize) -> DirtyTable {
        DirtyTable { bits: vec![0; slots.div_ceil(64)], list: Vec::with_capacity(slots) }
    }
    /// Marks `slot`; never allocates while `slot` is within the table's capacity.
    fn mark(&mut self, slot: usize) {
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if let Some(w) = self.bits.get_mut(word) {
            if *w & bit == 0 {
                *w |= bit;
                self.list.push(slot as u32);
            }
        }
    }
    fn is_set(&self, slot: usize) -> bool {
        self.bits.get(slot / 64).is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }
    /// Calls `f(symbol, interval)` once per marked K-line: an `ALL` mark stands for the symbol's
    /// 16 intervals, and an interval mark of such a symbol is not repeated.
    fn visit(&self, mut f: impl FnMut(usize, usize)) {
        for &e in &self.list {
            let e = e as usize;
            if e % STRIDE == ALL {
                for i in 0..N {
                    f(e / STRIDE, i);
                }
            }
        }
        for &e in &self.list {
            let e = e as usize;
            if e % STRIDE != ALL && !self.is_set(e - e % STRIDE + ALL) {
                f(e / STRIDE, e % STRIDE);
            }
        }
    }
    fn clear(&mut self) {
        for &s in &self.list {
            let s = s as usize;
            self.bits[s / 64] &= !(1u64 << (s % 64));
        }
        self.list.clear();
    }
    /// Moves everything into a table with room for `slots` (keeps the marks).
    /// Copies `old`'s marks into this (bigger) table. Never allocates: capacity is sized for every slot.
    fn copy_from(&mut self, old: &DirtyTable) {
        self.bits[..old.bits.len()].copy_from_slice(&old.bits);
        self.list.extend_from_slice(&old.list);
    }
    /// Moves everything into `fresh` and returns the old table, to be freed off the hot path.
    fn grow_into(&mut self, fresh: DirtyTable) -> DirtyTable {
        let old = std::mem::replace(self, fresh);
        self.copy_from(&old);
        old
    }
}

/// Preallocated tables for a number of symbols: made off the hot path, handed to
/// [`Aggregator::adopt`].
#[derive(Debug)]
pub struct AggregatorStorage {
    capacity: usize,
    symbols: Vec<SymbolState>,
    updates: DirtyTable,
    snapshot: Option<SnapshotTables>,
}

impl AggregatorStorage {
    /// Tables for up to `capacity` symbols (with the snapshot tables if `snapshots`).
    pub fn new(capacity: usize, snapshots: bool) -> AggregatorStorage {
        let slots = capacity * STRIDE;
        AggregatorStorage {
            capacity,
            symbols: Vec::with_capacity(capacity),
            updates: DirtyTable::with_slots(slots),
            snapshot: snapshots.then(|| SnapshotTables::with_slots(slots)),
        }
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// The K-line state of every symbol, for all 16 intervals.
#[derive(Debug)]
pub struct Aggregator {
    config: AggregatorConfig,
    capacity: usize,
    symbols: Vec<SymbolState>,
    updates: DirtyTable,
    snapshot: Option<SnapshotTables>,
    /// No open K-line ends before this (ms): clock ticks below it are O(1).
    next_deadline_ms: i64,
    stats: AggregatorStats,
}

/// Adding a symbol failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("symbol table full ({capacity} symbols): adopt bigger storage first")]
pub struct SymbolTableFullError {
    pub capacity: usize,
}

impl Aggregator {
    /// An aggregator for `specs` (ids 0..n in order), with room for twice as many.
    pub fn new(specs: &[SymbolSpec], config: AggregatorConfig) -> Aggregator {
        let mut a =
            Aggregator::with_storage(AggregatorStorage::new((specs.len() * 2).max(16), config.snapshots), config);
        for s in specs {
            // Invariant: capacity is at least specs.len().
            let _ = a.add_symbol(*s);
        }
        a
    }

    /// An empty aggregator using preallocated `storage`.
    pub fn with_storage(storage: AggregatorStorage, config: AggregatorConfig) -> Aggregator {
        Aggregator {
            config,
            capacity: storage.capacity,
            symbols: storage.symbols,
            updates: storage.updates,
            snapshot: storage.snapshot,
            next_deadline_ms: i64::MAX,
            stats: AggregatorStats::default(),
        }
    }

    /// Moves all state into bigger `fresh` storage (no allocation here) and returns the old
    /// storage, to be dropped off the hot path. `fresh` must be at least as big.
    pub fn adopt(&mut self, mut fresh: AggregatorStorage) -> AggregatorStorage {
        debug_assert!(fresh.capacity >= self.capacity);
        fresh.symbols.append(&mut self.symbols);
        let old_symbols = std::mem::replace(&mut self.symbols, fresh.symbols);
        let old_updates = self.updates.grow_into(fresh.updates);
        let old_snapshot = match (&mut self.snapshot, fresh.snapshot) {
            (Some(mine), Some(f)) => Some(mine.grow_into(f)),
            (None, f) => {
                self.snapshot = f;
                None
            }
            (Some(_), None) => None,
        };
        let old_capacity = std::mem::replace(&mut self.capacity, fresh.capacity);
        AggregatorStorage { capacity: old_capacity, symbols: old_symbols, updates: old_updates, snapshot: old_snapshot }
    }

    /// Adds a symbol and returns its id. Never allocates; fails when the capacity is used up.
    pub fn add_symbol(&mut self, spec: SymbolSpec) -> Result<u32, SymbolTableFullError> {
        if self.symbols.len() >= self.capacity {
            return Err(SymbolTableFullError { capacity: self.capacity });
        }
        let id = self.symbols.len() as u32;
        self.symbols.push(SymbolState {
            spec,
            active: true,
            feed_live: true,
            resume_gap: false,
            watermark_ms: i64::MIN,
            roll_due_ms: i64::MAX,
            open: [None; N],
            last_closed: [None; N],
        });
        Ok(id)
    }

    /// Restores a symbol's open K-lines from a durable snapshot (a broker restart): `views[i]` is
    /// the open K-line of interval `i` as published (the coarser ones include the open 1s
    /// K-line). The coarser partials are recovered exactly: counts and volumes by subtracting the
    /// 1s K-line; open/close by trade id; high/low need no subtraction, since every later merge
    /// takes a max/min that the whole already bounds. The last closed K-lines are not restored:
    /// under [`LatePolicy::Amend`] a late trade for a K-line closed before the restart is
    /// dropped and counted. Returns false for an unknown symbol.
    pub fn restore_symbol(&mut self, symbol_id: u32, views: &[Option<Kline>; N]) -> bool {
        let Some(st) = self.symbols.get_mut(symbol_id as usize).filter(|s| s.active) else { return false };
        let Some(finest) = views.iter().flatten().next().copied() else { return true };
        let latest = views.iter().flatten().map(|k| k.open_time).max().unwrap_or(finest.open_time);
        // No open 1s K-line stored: an empty one in the newest bucket, from the finest close.
        let s1 = views[0].unwrap_or_else(|| {
            let t = Interval::S1.open_time(latest);
            Kline::empty(
                Interval::S1,
                t,
                finest.symbol,
                finest.symbol_id,
                finest.price_scale,
                finest.qty_scale,
                finest.close,
            )
        });
        let mut due = i64::MAX;
        for (i, v) in views.iter().enumerate() {
            let k = if i == 0 {
                Some(s1)
            } else {
                v.map(|v| {
                    let inside = s1.open_time >= v.open_time && s1.close_time <= v.close_time;
                    if inside && s1.trade_count > 0 && v.trade_count >= s1.trade_count {
                        unmerge(v, &s1)
                    } else {
                        v
                    }
                })
            };
            if let Some(mut k) = k {
                k.closed = false;
                due = due.min(k.close_time + 1);
                st.open[i] = Some(k);
            }
        }
        st.watermark_ms = st.watermark_ms.max(latest);
        st.roll_due_ms = due;
        st.last_closed = [None; N];
        self.next_deadline_ms = self.next_deadline_ms.min(due);
        true
    }

    /// Stops aggregating a symbol: its open K-lines are discarded, its trades dropped as unknown.
    pub fn remove_symbol(&mut self, symbol_id: u32) -> bool {
        match self.symbols.get_mut(symbol_id as usize) {
            Some(s) if s.active => {
                s.active = false;
                s.open = [None; N];
                s.last_closed = [None; N];
                true
            }
            _ => false,
        }
    }

    pub fn symbol_count(&self) -> usize {
        self.symbols.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn spec(&self, symbol_id: u32) -> Option<&SymbolSpec> {
        self.symbols.get(symbol_id as usize).filter(|s| s.active).map(|s| &s.spec)
    }

    pub fn stats(&self) -> AggregatorStats {
        self.stats
    }

    pub fn config(&self) -> &AggregatorConfig {
        &self.config
    }

    /// The currently open K-line of a symbol and interval.
    pub fn open_kline(&self, symbol_id: u32, interval: Interval) -> Option<Kline> {
        view(&self.symbols, symbol_id as usize, interval.index())
    }

    /// The symbol's feed is down: the clock closes none of its K-lines until [`feed_up`].
    ///
    /// [`feed_up`]: Aggregator::feed_up
    pub fn feed_down(&mut self, symbol_id: u32) {
        if let Some(s) = self.symbols.get_mut(symbol_id as usize) {
            s.feed_live = false;
        }
    }

    /// The symbol's feed is back. Without `backfilled` (the missed trades were not recovered), the
    /// next roll marks the outage instead of fabricating empty K-lines for it.
    pub fn feed_up(&mut self, symbol_id: u32, backfilled: bool) {
        if let Some(s) = self.symbols.get_mut(symbol_id as usize) {
            if !s.feed_live && !backfilled {
                s.resume_gap = true;
            }
            s.feed_live = true;
            self.next_deadline_ms = i64::MIN;
        }
    }

    /// [`feed_down`](Aggregator::feed_down) / [`feed_up`](Aggregator::feed_up) for every symbol.
    pub fn set_feed_live(&mut self, live: bool) {
        for id in 0..self.symbols.len() as u32 {
            if live {
                self.feed_up(id, false);
            } else {
                self.feed_down(id);
            }
        }
    }

    fn mark(&mut self, slot: usize) {
        self.updates.mark(slot);
        if let Some(s) = &mut self.snapshot {
            s.dirty.mark(slot);
        }
    }

    fn emit_close(&mut self, k: &Kline, on_close: &mut impl FnMut(&Kline)) {
        on_close(k);
        self.stats.closed += 1;
        if let Some(s) = &mut self.snapshot {
            // Closed K-lines are kept whole (never conflated); the list keeps its capacity, so it
            // grows only past its high-water mark.
            s.closed.push(*k);
        }
    }

    /// The rollover authority: closes every open K-line of `symbol_id` whose bucket ends at or
    /// before `to_ms` (`close_time < to_ms`) and opens the K-line of the bucket containing
    /// `to_ms`, with bounded empty K-lines in between (see the module docs). Returns the earliest
    /// end among the K-lines left open.
    pub fn roll_to(&mut self, symbol_id: u32, to_ms: i64, on_close: &mut impl FnMut(&Kline)) -> i64 {
        let mut earliest = i64::MAX;
        let Some(state) = self.symbols.get(symbol_id as usize) else { return earliest };
        if !state.active {
            return earliest;
        }
        let to_ms = to_ms.max(state.watermark_ms);
        let gap = state.resume_gap;
        let max_run = i64::from(self.config.max_empty_run);
        let base = symbol_id as usize * STRIDE;
        for i in 0..N {
            // Look before copying: most slots have nothing to roll.
            let Some(k) = self.symbols[symbol_id as usize].open[i].as_ref() else { continue };
            if k.close_time >= to_ms {
                earliest = earliest.min(k.close_time + 1);
                if gap {
                    // Still open across the outage: its data has a hole too.
                    if let Some(k) = self.symbols[symbol_id as usize].open[i].as_mut() {
                        k.flags |= KLINE_FLAG_FEED_GAP;
                    }
                }
                continue;
            }
            let mut k = *k;
            let iv = Interval::ALL[i];
            k.closed = true;
            if gap {
                k.flags |= KLINE_FLAG_FEED_GAP;
                self.stats.feed_gaps += 1;
            }
            self.emit_close(&k, on_close);
            if i == 0 {
                // The 1s bucket is final: fold it into every coarser partial (they come later in
                // this loop, so a coarser K-line closing now includes it).
                for p in self.symbols[symbol_id as usize].open[1..].iter_mut().flatten() {
                    p.merge(&k);
                }
            }
            let prev_close = k.close;
            let mut last = k;
            let target = iv.open_time(to_ms);
            let mut next = iv.next_open(k.open_time);
            let mut flags = 0;
            if gap {
                // Nothing is known of the outage: jump over it, flag the partial bucket.
                next = target;
                flags = KLINE_FLAG_FEED_GAP;
            } else {
                // Empty buckets that ended before `to_ms`, at most `max_run` of them.
                let skip = match iv.fixed_len_ms() {
                    Some(len) => ((target - next) / len - max_run).max(0),
                    None => {
                        let mut n = 0;
                        let mut t = next;
                        while t < target {
                            n += 1;
                            t = iv.next_open(t);
                        }
                        (n - max_run).max(0)
                    }
                };
                if skip > 0 {
                    match iv.fixed_len_ms() {
                        Some(len) => next += skip * len,
                        None => {
                            for _ in 0..skip {
                                next = iv.next_open(next);
                            }
                        }
                    }
                    flags = KLINE_FLAG_EMPTY_SKIPPED;
                    self.stats.empty_skipped += skip as u64;
                }
                while next < target {
                    let mut e = Kline::empty(iv, next, k.symbol, k.symbol_id, k.price_scale, k.qty_scale, prev_close);
                    e.closed = true;
                    e.flags = flags;
                    flags = 0;
                    self.stats.empty_opened += 1;
                    self.emit_close(&e, on_close);
                    // The most recent close is what a late trade may still amend.
                    last = e;
                    next = iv.next_open(next);
                }
            }
            let mut fresh = Kline::empty(iv, next, k.symbol, k.symbol_id, k.price_scale, k.qty_scale, prev_close);
            fresh.flags = flags;
            self.stats.empty_opened += 1;
            earliest = earliest.min(fresh.close_time + 1);
            let st = &mut self.symbols[symbol_id as usize];
            st.last_closed[i] = Some(last);
            st.open[i] = Some(fresh);
            self.mark(base + i);
        }
        let st = &mut self.symbols[symbol_id as usize];
        st.watermark_ms = to_ms;
        st.resume_gap = false;
        st.roll_due_ms = earliest;
        earliest
    }

    /// Folds one trade in (its `symbol_id` is the table index). Closed K-lines of this symbol are
    /// passed to `on_close` first.
    pub fn on_trade(&mut self, t: &Trade, on_close: &mut impl FnMut(&Kline)) -> TradeOutcome {
        self.on_trade_at(t.symbol_id, t, on_close)
    }

    /// Folds one trade in at table index `id` (a partitioned worker's local index; the K-lines keep
    /// the trade's own `symbol_id`).
    pub fn on_trade_at(&mut self, id: u32, t: &Trade, on_close: &mut impl FnMut(&Kline)) -> TradeOutcome {
        match self.symbols.get(id as usize) {
            Some(s) if s.active => {}
            _ => {
                self.stats.unknown_symbol_trades += 1;
                return TradeOutcome::UnknownSymbol;
            }
        }
        let ts = t.time_ms();
        let base = id as usize * STRIDE;
        // Late: older than the newest open K-line (the 1s one opens last).
        let newest_open = self.symbols[id as usize].open[Interval::S1.index()].map(|k| k.open_time);
        if newest_open.is_some_and(|o| ts < o) {
            return self.on_late_trade(id, t, on_close);
        }
        let st = &self.symbols[id as usize];
        if ts >= st.roll_due_ms || st.resume_gap {
            let earliest = self.roll_to(id, ts, on_close);
            self.next_deadline_ms = self.next_deadline_ms.min(earliest);
        }
        let st = &mut self.symbols[id as usize];
        match &mut st.open[0] {
            // The hot path: one K-line touched, one mark.
            Some(k) => k.add(t),
            None => {
                // First trade: the 1s K-line opens with it, every coarser interval with an empty
                // partial of its bucket.
                for (i, slot) in st.open.iter_mut().enumerate() {
                    let iv = Interval::ALL[i];
                    let k = if i == 0 {
                        Kline::open_with(iv, iv.open_time(ts), t)
                    } else {
                        Kline::empty(iv, iv.open_time(ts), t.symbol, t.symbol_id, t.price_scale, t.qty_scale, t.price)
                    };
                    *slot = Some(k);
                }
                let end = Interval::S1.next_open(Interval::S1.open_time(ts));
                st.roll_due_ms = end;
                st.watermark_ms = st.watermark_ms.max(ts);
                self.next_deadline_ms = self.next_deadline_ms.min(end);
            }
        }
        self.mark(base + ALL);
        self.stats.trades += 1;
        TradeOutcome::Accepted
    }

    fn on_late_trade(&mut self, id: u32, t: &Trade, on_close: &mut impl FnMut(&Kline)) -> TradeOutcome {
        if self.config.late_policy == LatePolicy::Drop {
            self.stats.late_trades += 1;
            return TradeOutcome::Late;
        }
        let id = id as usize;
        let ts = t.time_ms();
        let base = id * STRIDE;
        let mut used = false;
        for i in 0..N {
            let st = &mut self.symbols[id];
            // Coarser partials take the trade directly when it is inside their open bucket.
            if let Some(k) = st.open[i].as_mut().filter(|k| i > 0 && ts >= k.open_time) {
                k.add(t);
                used = true;
                self.mark(base + i);
            } else if let Some(c) = st.last_closed[i].as_mut().filter(|c| ts >= c.open_time && ts <= c.close_time) {
                c.add(t);
                c.revision = c.revision.saturating_add(1);
                c.flags |= KLINE_FLAG_AMENDED;
                let amended = *c;
                self.stats.amended_klines += 1;
                self.emit_close(&amended, on_close);
                used = true;
            } else {
                self.stats.late_interval_drops += 1;
            }
        }
        if used {
            self.stats.trades += 1;
            TradeOutcome::Amended
        } else {
            self.stats.late_trades += 1;
            TradeOutcome::Late
        }
    }

    /// The clock: closes every K-line whose end plus the grace is at or before `now_ms`, for
    /// every symbol whose feed is live. O(1) until the earliest open K-line is due.
    pub fn on_clock(&mut self, now_ms: i64, on_close: &mut impl FnMut(&Kline)) {
        let to = now_ms - self.config.close_grace_ms;
        if to < self.next_deadline_ms {
            return;
        }
        let mut earliest = i64::MAX;
        for id in 0..self.symbols.len() as u32 {
            let s = &self.symbols[id as usize];
            if !s.feed_live || !s.active {
                // Its K-lines stay open until `feed_up`, which forces the next tick to rescan.
                continue;
            }
            earliest = earliest.min(self.roll_to(id, to, on_close));
        }
        self.next_deadline_ms = earliest;
    }

    /// Calls `f` once for every open K-line changed since the last drain, then clears the table.
    pub fn drain_updates(&mut self, f: &mut impl FnMut(&Kline)) {
        let symbols = &self.symbols;
        self.updates.visit(|sym, i| {
            if let Some(k) = view(symbols, sym, i) {
                f(&k);
            }
        });
        self.updates.clear();
    }

    /// Number of slots waiting in the update dirty table.
    pub fn pending_updates(&self) -> usize {
        self.updates.list.len()
    }

    /// Freezes a snapshot of everything that changed since the last committed one (see
    /// [`Snapshot`]). `None` if snapshots are not enabled.
    pub fn take_snapshot(&mut self) -> Option<Snapshot<'_>> {
        let snap = self.snapshot.as_mut()?;
        let symbols = &self.symbols;
        Some(snap.take(|sym, i| view(symbols, sym, i)))
    }

    /// The consumer made snapshot `id` durable: forget it. A stale id (one merged into a newer
    /// snapshot) is ignored and returns false.
    pub fn commit_snapshot(&mut self, id: u64) -> bool {
        self.snapshot.as_mut().is_some_and(|s| s.commit(id))
    }
}

/// The snapshot side: a second dirty table plus the closed K-lines, double-buffered.
#[derive(Debug)]
struct SnapshotTables {
    dirty: DirtyTable,
    closed: Vec<Kline>,
    frozen_id: Option<u64>,
    frozen_slots: DirtyTable,
    frozen_closed: Vec<Kline>,
    frozen_open: Vec<Kline>,
    next_id: u64,
}

impl SnapshotTables {
    fn with_slots(slots: usize) -> SnapshotTables {
        SnapshotTables {
            dirty: DirtyTable::with_slots(slots),
            closed: Vec::with_capacity(slots),
            frozen_id: None,
            frozen_slots: DirtyTable::with_slots(slots),
            frozen_closed: Vec::with_capacity(slots),
            frozen_open: Vec::with_capacity(slots),
            next_id: 1,
        }
    }

    /// Moves everything into `fresh` and returns the old tables, allocations included, to be
    /// freed off the hot path (nothing is allocated or freed here).
    fn grow_into(&mut self, fresh: SnapshotTables) -> SnapshotTables {
        let old = std::mem::replace(self, fresh);
        self.dirty.copy_from(&old.dirty);
        self.frozen_slots.copy_from(&old.frozen_slots);
        self.closed.extend_from_slice(&old.closed);
        self.frozen_closed.extend_from_slice(&old.frozen_closed);
        self.frozen_open.extend_from_slice(&old.frozen_open);
        self.frozen_id = old.frozen_id;
        self.next_id = old.next_id;
        old
    }

    fn take(&mut self, current: impl Fn(usize, usize) -> Option<Kline>) -> Snapshot<'_> {
        // An uncommitted frozen snapshot is merged into this one, so nothing is lost.
        for &slot in &self.dirty.list {
            self.frozen_slots.mark(slot as usize);
        }
        self.dirty.clear();
        self.frozen_closed.extend_from_slice(&self.closed);
        self.closed.clear();
        self.frozen_open.clear();
        let open = &mut self.frozen_open;
        self.frozen_slots.visit(|sym, i| {
            if let Some(k) = current(sym, i) {
                open.push(k);
            }
        });
        let id = self.next_id;
        self.next_id += 1;
        self.frozen_id = Some(id);
        Snapshot { id, closed: &self.frozen_closed, open: &self.frozen_open }
    }

    fn commit(&mut self, id: u64) -> bool {
        if self.frozen_id != Some(id) {
            return false;
        }
        self.frozen_id = None;
        self.frozen_slots.clear();
        self.frozen_closed.clear();
        self.frozen_open.clear();
        true
    }
}

/// The partial of a coarser K-line: `whole` without the open 1s K-line `s1` folded into it.
fn unmerge(whole: Kline, s1: &Kline) -> Kline {
    let mut p = whole;
    p.trade_count -= s1.trade_count;
    p.volume -= s1.volume;
    p.quote_volume -= s1.quote_volume;
    p.taker_buy_volume -= s1.taker_buy_volume;
    p.taker_buy_quote_volume -= s1.taker_buy_quote_volume;
    if p.trade_count == 0 {
        // Nothing before this second: an empty partial (the 1s K-line's values win any merge).
        p.first_trade_id = -1;
        p.last_trade_id = -1;
        p.open = s1.open;
        p.high = s1.open;
        p.low = s1.open;
        p.close = s1.open;
    }
    // Otherwise `whole`'s open, first id, high and low stand; its close and last id are the 1s
    // K-line's, which a merge (last id >=) replaces with the 1s K-line's latest.
    p
}

/// The live state of a symbol's K-line of interval index `i`: the 1s K-line itself, or a coarser
/// partial with the open 1s K-line folded in.
fn view(symbols: &[SymbolState], sym: usize, i: usize) -> Option<Kline> {
    let st = symbols.get(sym)?;
    let mut k = st.open[i]?;
    if i > 0 {
        if let Some(s1) = &st.open[0] {
            k.merge(s1);
        }
    }
    Some(k)
}

/// A frozen snapshot: every K-line closed since the last committed snapshot, and the current
/// state of every open K-line changed since then (conflated: one per K-line).
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    pub id: u64,
    pub closed: &'a [Kline],
    pub open: &'a [Kline],
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const T0: i64 = 1_709_251_140_000; // 2024-02-29T23:59:00Z
    const DAY: i64 = 86_400_000;

    fn sym(i: u32) -> Symbol {
        Symbol::new(["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"][i as usize % 5]).unwrap()
    }

    fn spec(i: u32) -> SymbolSpec {
        SymbolSpec { symbol: sym(i), price_scale: 2, qty_scale: 3 }
    }

    fn cfg(grace: i64) -> AggregatorConfig {
        AggregatorConfig { close_grace_ms: grace, max_empty_run: u32::MAX, ..AggregatorConfig::default() }
    }

    fn trade_of(s: u32, id: i64, ms: i64, price: i64, qty: i64, buyer_maker: bool) -> Trade {
        Trade {
            symbol: sym(s),
            symbol_id: s,
            price_scale: 2,
            qty_scale: 3,
            is_buyer_maker: buyer_maker,
            trade_id: id,
            price,
            qty,
            time_us: ms * 1000,
        }
    }

    fn trade(id: i64, ms: i64, price: i64, qty: i64, buyer_maker: bool) -> Trade {
        trade_of(0, id, ms, price, qty, buyer_maker)
    }

    /// Naive oracle: the K-line of `iv` opening at `open` for one symbol's trades, by grouping.
    fn oracle_kline(trades: &[Trade], s: u32, iv: Interval, open: i64) -> Kline {
        let end = iv.next_open(open);
        let inside: Vec<&Trade> = trades.iter().filter(|t| t.time_ms() >= open && t.time_ms() < end).collect();
        let prev = trades.iter().rfind(|t| t.time_ms() < open).map_or(0, |t| t.price);
        let mut k = Kline::empty(iv, open, sym(s), s, 2, 3, prev);
        if let (Some(first), Some(last)) = (inside.first(), inside.last()) {
            k.open = first.price;
            k.close = last.price;
            k.high = inside.iter().map(|t| t.price).max().unwrap();
            k.low = inside.iter().map(|t| t.price).min().unwrap();
            k.first_trade_id = first.trade_id;
            k.last_trade_id = last.trade_id;
            k.trade_count = inside.len() as u64;
            k.volume = inside.iter().map(|t| i128::from(t.qty)).sum();
            k.quote_volume = inside.iter().map(|t| i128::from(t.qty) * i128::from(t.price)).sum();
            let buys = || inside.iter().filter(|t| !t.is_buyer_maker);
            k.taker_buy_volume = buys().map(|t| i128::from(t.qty)).sum();
            k.taker_buy_quote_volume = buys().map(|t| i128::from(t.qty) * i128::from(t.price)).sum();
        }
        k
    }

    #[test]
    fn kline_closes_on_a_later_trade_and_the_gap_gets_binance_empty_klines() {
        let trades =
            [trade(1, T0 + 100, 100, 5, false), trade(2, T0 + 900, 120, 1, true), trade(3, T0 + 3_500, 90, 2, false)];
        let mut a = Aggregator::new(&[spec(0)], AggregatorConfig::default());
        let mut closed = Vec::new();
        for t in &trades {
            a.on_trade(t, &mut |k| closed.push(*k));
        }
        let s1: Vec<_> = closed.iter().filter(|k| k.interval == Interval::S1 as u8).collect();
        assert_eq!(s1.len(), 3, "the trade's second and two empty seconds");
        assert_eq!((s1[0].open, s1[0].high, s1[0].low, s1[0].close), (100, 120, 100, 120));
        assert_eq!((s1[0].first_trade_id, s1[0].last_trade_id, s1[0].trade_count), (1, 2, 2));
        assert_eq!(s1[0].taker_buy_volume, 5);
        assert_eq!(s1[0].quote_volume, 100 * 5 + 120);
        for e in &s1[1..] {
            assert_eq!((e.open, e.high, e.low, e.close), (120, 120, 120, 120));
            assert_eq!((e.first_trade_id, e.last_trade_id, e.trade_count, e.volume), (-1, -1, 0, 0));
            assert!(e.closed);
        }
        assert_eq!((s1[2].open_time, s1[2].close_time), (T0 + 2_000, T0 + 2_999));
        assert!(closed.iter().all(|k| k.interval == Interval::S1 as u8));
        assert_eq!(a.open_kline(0, Interval::M1).unwrap().trade_count, 3);
    }

    #[test]
    fn kline_closes_on_clock_when_no_trade_arrives() {
        let mut a = Aggregator::new(&[spec(0)], cfg(250));
        let mut closed = Vec::new();
        a.on_trade(&trade(1, T0 + 10, 100, 1, false), &mut |k| closed.push(*k));
        a.on_clock(T0 + 1_200, &mut |k| closed.push(*k));
        assert!(closed.is_empty(), "within the grace nothing closes");
        a.on_clock(T0 + 1_250, &mut |k| closed.push(*k));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].open_time, T0);
        let next = a.open_kline(0, Interval::S1).unwrap();
        assert_eq!((next.open_time, next.trade_count, next.open, next.first_trade_id), (T0 + 1_000, 0, 100, -1));
        // Month, day and every shorter interval roll over at 2024-03-01T00:00Z (a Friday, not a
        // 3d boundary).
        a.on_clock(T0 + 60_000 + 250, &mut |k| closed.push(*k));
        let intervals: std::collections::BTreeSet<_> = closed.iter().map(|k| k.interval).collect();
        let expected: std::collections::BTreeSet<_> =
            Interval::ALL.iter().filter(|i| !matches!(i, Interval::W1 | Interval::D3)).map(|i| *i as u8).collect();
        assert_eq!(intervals, expected);
    }

    #[test]
    fn a_three_day_quiet_gap_produces_bounded_output_and_flags_the_skip() {
        let mut a = Aggregator::new(&[spec(0)], AggregatorConfig { max_empty_run: 100, ..cfg(0) });
        let mut closed = Vec::new();
        a.on_trade(&trade(1, T0, 100, 1, false), &mut |k| closed.push(*k));
        a.on_trade(&trade(2, T0 + 3 * DAY, 101, 1, false), &mut |k| closed.push(*k));
        // Per interval: the first bucket's close plus at most 100 empties.
        for iv in Interval::ALL {
            let n = closed.iter().filter(|k| k.interval == iv as u8).count();
            assert!(n <= 101, "{iv}: {n} closes");
        }
        assert!(closed.len() < 16 * 101);
        let s1: Vec<_> = closed.iter().filter(|k| k.interval == Interval::S1 as u8).collect();
        assert_eq!(s1.len(), 101);
        assert_eq!(s1[1].flags & KLINE_FLAG_EMPTY_SKIPPED, KLINE_FLAG_EMPTY_SKIPPED, "the first after the skip");
        assert_eq!(s1[2].flags, 0);
        // The empties kept are the most recent ones, contiguous up to the new trade's bucket.
        assert_eq!(s1[100].open_time, T0 + 3 * DAY - 1_000);
        assert_eq!(a.open_kline(0, Interval::S1).unwrap().open_time, T0 + 3 * DAY);
        // 1h: 72 buckets, under the bound: every one of them, none flagged.
        let h1: Vec<_> = closed.iter().filter(|k| k.interval == Interval::H1 as u8).collect();
        assert_eq!(h1.len(), 72);
        assert!(h1.iter().all(|k| k.flags == 0));
        // Skipped: (buckets in the gap − 1 − 100) for each interval with more than 100 of them.
        let skipped: i64 = [3 * 86_400, 3 * 1_440, 3 * 480, 3 * 288, 3 * 96, 3 * 48].iter().map(|n| n - 101).sum();
        assert_eq!(a.stats().empty_skipped, skipped as u64);
    }

    #[test]
    fn a_feed_disconnect_fabricates_no_klines_and_marks_the_gap() {
        let mut a = Aggregator::new(&[spec(0)], cfg(0));
        let mut closed = Vec::new();
        a.on_trade(&trade(1, T0 + 500, 100, 1, false), &mut |k| closed.push(*k));
        a.feed_down(0);
        for s in 1..=600 {
            a.on_clock(T0 + s * 1_000, &mut |k| closed.push(*k));
        }
        assert!(closed.is_empty(), "nothing closes while the feed is down");
        a.feed_up(0, false);
        a.on_clock(T0 + 600_500, &mut |k| closed.push(*k));
        // Each interval whose bucket ended: one close, flagged, and no empties for the outage.
        let s1: Vec<_> = closed.iter().filter(|k| k.interval == Interval::S1 as u8).collect();
        assert_eq!(s1.len(), 1);
        assert_eq!(s1[0].open_time, T0);
        assert_eq!(s1[0].flags & KLINE_FLAG_FEED_GAP, KLINE_FLAG_FEED_GAP);
        let open = a.open_kline(0, Interval::S1).unwrap();
        assert_eq!(open.open_time, T0 + 600_000);
        assert_eq!(open.flags & KLINE_FLAG_FEED_GAP, KLINE_FLAG_FEED_GAP);
        assert!(closed.iter().all(|k| k.flags & KLINE_FLAG_FEED_GAP != 0));
        // After that, the clock behaves normally again: one empty per second, unflagged.
        closed.clear();
        a.on_clock(T0 + 602_000, &mut |k| closed.push(*k));
        let s1: Vec<_> = closed.iter().filter(|k| k.interval == Interval::S1 as u8).collect();
        assert_eq!(s1.len(), 2);
        assert_eq!(s1[1].flags, 0);
        // A backfilled outage is complete data: no new gap marker, every empty second made.
        let gaps = a.stats().feed_gaps;
        a.feed_down(0);
        a.feed_up(0, true);
        closed.clear();
        a.on_clock(T0 + 700_000, &mut |k| closed.push(*k));
        assert_eq!(a.stats().feed_gaps, gaps);
        assert_eq!(closed.iter().filter(|k| k.interval == Interval::S1 as u8).count(), 98);
    }

    #[test]
    fn late_trades_are_dropped_and_counted_under_the_drop_policy() {
        let mut a = Aggregator::new(&[spec(0)], AggregatorConfig::default());
        a.on_trade(&trade(1, T0 + 5_000, 100, 1, false), &mut |_| {});
        assert_eq!(a.on_trade(&trade(2, T0 + 4_999, 100, 1, false), &mut |_| {}), TradeOutcome::Late);
        assert_eq!(a.on_trade(&trade(3, T0 + 5_000, 100, 1, false), &mut |_| {}), TradeOutcome::Accepted);
        let mut unknown = trade(4, T0 + 5_000, 1, 1, false);
        unknown.symbol_id = 9;
        assert_eq!(a.on_trade(&unknown, &mut |_| {}), TradeOutcome::UnknownSymbol);
        let s = a.stats();
        assert_eq!((s.trades, s.late_trades, s.unknown_symbol_trades), (2, 1, 1));
        assert_eq!(a.open_kline(0, Interval::M1).unwrap().trade_count, 2);
    }

    #[test]
    fn late_trades_amend_the_closed_kline_with_a_revision_under_the_amend_policy() {
        let mut a = Aggregator::new(&[spec(0)], AggregatorConfig { late_policy: LatePolicy::Amend, ..cfg(0) });
        let mut closed = Vec::new();
        a.on_trade(&trade(10, T0 + 100, 100, 1, false), &mut |k| closed.push(*k));
        a.on_trade(&trade(12, T0 + 1_100, 110, 1, false), &mut |k| closed.push(*k));
        assert_eq!(closed.len(), 1);
        // Trade 11 happened at T0+900 but arrives after the 1s K-line closed.
        let out = a.on_trade(&trade(11, T0 + 900, 130, 2, true), &mut |k| closed.push(*k));
        assert_eq!(out, TradeOutcome::Amended);
        assert_eq!(closed.len(), 2);
        let amended = closed[1];
        assert_eq!((amended.open_time, amended.revision, amended.trade_count), (T0, 1, 2));
        assert_eq!(amended.flags & KLINE_FLAG_AMENDED, KLINE_FLAG_AMENDED);
        assert_eq!((amended.open, amended.close, amended.high), (100, 130, 130), "id 11 is the bucket's last trade");
        // The 1m K-line, still open, simply gains the trade; its close stays trade 12's price.
        let m1 = a.open_kline(0, Interval::M1).unwrap();
        assert_eq!((m1.trade_count, m1.close, m1.high, m1.last_trade_id), (3, 110, 130, 12));
        // Older than every open and last closed K-line (before this month and week): dropped.
        assert_eq!(a.on_trade(&trade(5, T0 - 40 * DAY, 1, 1, false), &mut |k| closed.push(*k)), TradeOutcome::Late);
        assert_eq!(a.stats().late_trades, 1);
        assert_eq!(a.stats().amended_klines, 1);
    }

    #[test]
    fn a_late_trade_amends_the_most_recent_close_even_when_it_was_an_empty_kline() {
        let mut a = Aggregator::new(&[spec(0)], AggregatorConfig { late_policy: LatePolicy::Amend, ..cfg(0) });
        let mut closed = Vec::new();
        a.on_trade(&trade(1, T0 + 100, 100, 1, false), &mut |k| closed.push(*k));
        // Closes the 1s buckets T0, T0+1s (empty) and T0+2s (empty).
        a.on_trade(&trade(3, T0 + 3_200, 110, 1, false), &mut |k| closed.push(*k));
        assert_eq!(closed.len(), 3);
        // Trade 2 happened at T0+2.5s: it belongs to the last (empty) close.
        assert_eq!(a.on_trade(&trade(2, T0 + 2_500, 90, 4, true), &mut |k| closed.push(*k)), TradeOutcome::Amended);
        let amended = closed.last().unwrap();
        assert_eq!((amended.open_time, amended.revision, amended.trade_count), (T0 + 2_000, 1, 1));
        assert_eq!((amended.open, amended.high, amended.low, amended.close, amended.volume), (90, 90, 90, 90, 4));
        assert_eq!(a.stats().late_interval_drops, 0);
        // 1s volumes (closed + open) add up to the 1m volume.
        let s1: i128 = closed
            .iter()
            .filter(|k| k.interval == 0 && k.revision == 0 && k.open_time != T0 + 2_000)
            .map(|k| k.volume)
            .sum::<i128>()
            + amended.volume
            + a.open_kline(0, Interval::S1).unwrap().volume;
        assert_eq!(s1, a.open_kline(0, Interval::M1).unwrap().volume);
        // A trade older than the last close of 1s (but inside the open minute) is counted as a
        // per-interval drop.
        assert_eq!(a.on_trade(&trade(0, T0 + 50, 95, 1, false), &mut |k| closed.push(*k)), TradeOutcome::Amended);
        assert_eq!(a.stats().late_interval_drops, 1);
    }

    #[test]
    fn coarse_klines_open_across_an_outage_are_flagged_too() {
        let mut a = Aggregator::new(&[spec(0)], cfg(0));
        let mut closed = Vec::new();
        a.on_trade(&trade(1, T0 + 100, 100, 1, false), &mut |k| closed.push(*k));
        a.feed_down(0);
        a.on_clock(T0 + 30_000, &mut |k| closed.push(*k));
        a.feed_up(0, false);
        a.on_clock(T0 + 30_500, &mut |k| closed.push(*k));
        // The week and month K-lines were open across the outage: flagged while open ...
        for iv in [Interval::W1, Interval::Mo1, Interval::D3] {
            assert_ne!(a.open_kline(0, iv).unwrap().flags & KLINE_FLAG_FEED_GAP, 0, "{iv}");
        }
        // ... and when they close.
        a.on_clock(T0 + 40 * DAY, &mut |k| closed.push(*k));
        let w1 = closed.iter().find(|k| k.interval == Interval::W1 as u8 && k.open_time <= T0).unwrap();
        assert_ne!(w1.flags & KLINE_FLAG_FEED_GAP, 0);
    }

    #[test]
    fn symbols_are_added_and_removed_while_trading() {
        let mut a = Aggregator::with_storage(AggregatorStorage::new(2, false), cfg(0));
        assert_eq!(a.add_symbol(spec(0)), Ok(0));
        let mut closed = Vec::new();
        a.on_trade(&trade_of(0, 1, T0, 100, 1, false), &mut |k| closed.push(*k));
        assert_eq!(a.add_symbol(spec(1)), Ok(1));
        a.on_trade(&trade_of(1, 1, T0 + 10, 200, 1, false), &mut |k| closed.push(*k));
        assert_eq!(a.add_symbol(spec(2)), Err(SymbolTableFullError { capacity: 2 }));
        // Growing: storage made elsewhere is adopted, state carries over.
        let old = a.adopt(AggregatorStorage::new(8, false));
        assert_eq!(old.capacity(), 2);
        assert_eq!(a.add_symbol(spec(2)), Ok(2));
        a.on_trade(&trade_of(2, 1, T0 + 20, 300, 1, false), &mut |k| closed.push(*k));
        assert_eq!(a.open_kline(1, Interval::M1).unwrap().trade_count, 1);
        assert!(a.remove_symbol(1));
        assert!(!a.remove_symbol(1));
        assert_eq!(a.on_trade(&trade_of(1, 2, T0 + 30, 200, 1, false), &mut |_| {}), TradeOutcome::UnknownSymbol);
        a.on_trade(&trade_of(0, 2, T0 + 1_500, 101, 1, false), &mut |k| closed.push(*k));
        a.on_clock(T0 + 2_000, &mut |k| closed.push(*k));
        assert!(closed.iter().all(|k| k.symbol_id != 1), "a removed symbol closes nothing");
        assert!(closed.iter().any(|k| k.symbol_id == 2));
    }

    #[test]
    fn a_restored_aggregator_continues_exactly_like_the_one_that_never_stopped() {
        // Trades over ~3 days (every interval boundary but 1w/1M crossed), split at many points.
        let mut rng = 7u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            rng >> 33
        };
        let mut t = T0;
        let trades: Vec<Trade> = (0..3000)
            .map(|i| {
                t += (next() % 90_000) as i64;
                trade_of(0, i + 1, t, 1000 + (next() % 500) as i64, 1 + (next() % 999) as i64, next() % 2 == 0)
            })
            .collect();
        for split in [1usize, 2, 17, 500, 1234, 2999] {
            let mut whole = Aggregator::new(&[spec(0)], cfg(0));
            let mut part = Aggregator::new(&[spec(0)], cfg(0));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for tr in &trades[..split] {
                whole.on_trade(tr, &mut |k| a.push(*k));
                part.on_trade(tr, &mut |_| {});
            }
            let views: [Option<Kline>; N] = std::array::from_fn(|i| part.open_kline(0, Interval::ALL[i]));
            let mut restored = Aggregator::new(&[spec(0)], cfg(0));
            assert!(restored.restore_symbol(0, &views));
            for (iv, v) in Interval::ALL.iter().zip(&views) {
                assert_eq!(restored.open_kline(0, *iv), *v, "split {split}: {iv} restored");
            }
            let mut c = Vec::new();
            for tr in &trades[split..] {
                whole.on_trade(tr, &mut |k| b.push(*k));
                restored.on_trade(tr, &mut |k| c.push(*k));
            }
            assert_eq!(b, c, "split {split}: the same closes after the restart");
            assert!(!a.is_empty() || split < 100);
            for iv in Interval::ALL {
                assert_eq!(whole.open_kline(0, iv), restored.open_kline(0, iv), "split {split}: open {iv}");
            }
        }
    }

    #[test]
    fn an_uncommitted_snapshot_is_merged_into_the_next_so_nothing_is_lost() {
        let mut a = Aggregator::new(&[spec(0), spec(1)], AggregatorConfig { snapshots: true, ..cfg(0) });
        a.on_trade(&trade_of(0, 1, T0 + 100, 100, 1, false), &mut |_| {});
        a.on_trade(&trade_of(0, 2, T0 + 1_100, 101, 1, false), &mut |_| {});
        let (id1, closed1, open1) = {
            let s = a.take_snapshot().unwrap();
            (s.id, s.closed.to_vec(), s.open.to_vec())
        };
        assert_eq!(closed1.len(), 1, "the 1s K-line of T0");
        assert_eq!(open1.len(), 16);
        // The consumer dies: no commit. More trading, then the next snapshot.
        a.on_trade(&trade_of(1, 1, T0 + 1_200, 500, 1, false), &mut |_| {});
        let s2 = a.take_snapshot().unwrap();
        assert!(s2.id > id1);
        assert!(s2.closed.contains(&closed1[0]), "the uncommitted close is still there");
        assert_eq!(s2.open.len(), 32, "both symbols' open K-lines, each once");
        let id2 = s2.id;
        assert!(!a.commit_snapshot(id1), "a stale id commits nothing");
        assert!(a.commit_snapshot(id2));
        a.on_trade(&trade_of(0, 3, T0 + 1_300, 102, 1, false), &mut |_| {});
        let s3 = a.take_snapshot().unwrap();
        assert!(s3.closed.is_empty());
        assert_eq!(s3.open.len(), 16, "only what changed since the commit");
        assert!(s3.open.iter().all(|k| k.symbol_id == 0 && k.last_trade_id == 3));
    }

    #[test]
    fn growing_keeps_an_uncommitted_snapshot() {
        let mut a =
            Aggregator::with_storage(AggregatorStorage::new(1, true), AggregatorConfig { snapshots: true, ..cfg(0) });
        a.add_symbol(spec(0)).unwrap();
        a.on_trade(&trade_of(0, 1, T0 + 100, 100, 1, false), &mut |_| {});
        a.on_trade(&trade_of(0, 2, T0 + 1_100, 101, 1, false), &mut |_| {});
        let id = a.take_snapshot().unwrap().id;
        let old = a.adopt(AggregatorStorage::new(4, true));
        assert_eq!(old.capacity(), 1);
        a.add_symbol(spec(1)).unwrap();
        a.on_trade(&trade_of(1, 1, T0 + 1_200, 500, 1, false), &mut |_| {});
        // Not committed before growing: the next snapshot still has the first one's contents.
        let s = a.take_snapshot().unwrap();
        assert!(s.id > id);
        assert_eq!(s.closed.len(), 1);
        assert_eq!(s.open.len(), 32);
    }

    #[test]
    fn updates_are_conflated_to_one_per_kline_per_drain() {
        let mut a = Aggregator::new(&[spec(0)], AggregatorConfig::default());
        for i in 0..10 {
            a.on_trade(&trade(i, T0 + i, 100 + i, 1, false), &mut |_| {});
        }
        let mut n = 0;
        a.drain_updates(&mut |k| {
            n += 1;
            assert_eq!(k.trade_count, 10);
        });
        assert_eq!(n, 16);
        a.drain_updates(&mut |_| n += 1);
        assert_eq!(n, 16);
    }

    /// A scenario: trades of several symbols in time order, with clock ticks in between.
    #[derive(Debug, Clone)]
    enum Step {
        Trade(Trade),
        Tick(i64),
    }

    fn scenario() -> impl Strategy<Value = (Vec<Step>, i64)> {
        let step = (0i64..4_000, 0u32..3, 1i64..1_000, 1i64..50, any::<bool>(), 0u8..4);
        (proptest::collection::vec(step, 1..150), 0i64..3_000).prop_map(|(raw, grace)| {
            let mut t = T0 - 30_000;
            let mut ids = [0i64; 3];
            let mut steps = Vec::new();
            for (gap, s, price, qty, m, tick) in raw {
                t += gap;
                if tick == 0 {
                    // A tick no later than the next trade's time plus the grace (so it never makes
                    // an upcoming trade late).
                    steps.push(Step::Tick(t + grace));
                }
                ids[s as usize] += 1;
                steps.push(Step::Trade(trade_of(s, ids[s as usize], t, price, qty, m)));
            }
            steps.push(Step::Tick(t + grace + 5_000));
            (steps, grace)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn any_partitioning_chunking_and_tick_interleaving_gives_the_oracles_klines(
            (steps, grace) in scenario(),
            partitions in 1u32..=4,
            drain_every in 1usize..20,
        ) {
            // Symbol g goes to partition g % P at local index g / P, as the broker's workers do.
            let mut parts: Vec<Aggregator> = (0..partitions)
                .map(|p| {
                    let specs: Vec<_> = (0..3).filter(|g| g % partitions == p).map(spec).collect();
                    Aggregator::new(&specs, cfg(grace))
                })
                .collect();
            let mut closed: Vec<Kline> = Vec::new();
            let mut last_update: BTreeMap<(u32, u8), Kline> = BTreeMap::new();
            let mut last_tick = i64::MIN;
            for (n, step) in steps.iter().enumerate() {
                match step {
                    Step::Trade(t) => {
                        let p = (t.symbol_id % partitions) as usize;
                        let out = parts[p].on_trade_at(t.symbol_id / partitions, t, &mut |k| closed.push(*k));
                        prop_assert_eq!(out, TradeOutcome::Accepted);
                    }
                    Step::Tick(at) => {
                        last_tick = last_tick.max(*at);
                        for a in &mut parts {
                            a.on_clock(*at, &mut |k| closed.push(*k));
                        }
                    }
                }
                if n % drain_every == 0 {
                    for a in &mut parts {
                        a.drain_updates(&mut |k| {
                            assert!(!k.closed, "an update is never a close");
                            last_update.insert((k.symbol_id, k.interval), *k);
                        });
                    }
                }
            }
            for a in &mut parts {
                a.drain_updates(&mut |k| { last_update.insert((k.symbol_id, k.interval), *k); });
            }
            let trades: Vec<Trade> = steps.iter().filter_map(|s| match s { Step::Trade(t) => Some(*t), _ => None }).collect();
            for s in 0..3u32 {
                let mine: Vec<Trade> = trades.iter().filter(|t| t.symbol_id == s).copied().collect();
                let Some(first) = mine.first() else { continue };
                let last_ms = mine.last().unwrap().time_ms();
                let to = last_ms.max(last_tick - grace);
                for iv in Interval::ALL {
                    let got: Vec<&Kline> = closed.iter().filter(|k| k.symbol_id == s && k.interval == iv as u8).collect();
                    let mut open = iv.open_time(first.time_ms());
                    let mut i = 0;
                    while iv.next_open(open) <= iv.open_time(to) {
                        let mut want = oracle_kline(&mine, s, iv, open);
                        want.closed = true;
                        prop_assert!(i < got.len(), "{} {} missing close at {}", s, iv, open);
                        prop_assert_eq!(*got[i], want);
                        let k = got[i];
                        prop_assert!(k.low <= k.open.min(k.close) && k.open.max(k.close) <= k.high);
                        i += 1;
                        open = iv.next_open(open);
                    }
                    prop_assert_eq!(i, got.len(), "{} {}: extra closes", s, iv);
                    // The open K-line and its last update both equal the oracle's current bucket.
                    let p = s % partitions;
                    let cur = parts[p as usize].open_kline(s / partitions, iv).unwrap();
                    prop_assert_eq!(cur, oracle_kline(&mine, s, iv, iv.open_time(to)));
                    prop_assert_eq!(last_update.get(&(s, iv as u8)).copied(), Some(cur));
                    // Volumes and counts sum exactly over closed + open.
                    let vol: i128 = got.iter().map(|k| k.volume).sum::<i128>() + cur.volume;
                    let n: u64 = got.iter().map(|k| k.trade_count).sum::<u64>() + cur.trade_count;
                    prop_assert_eq!(vol, mine.iter().map(|t| i128::from(t.qty)).sum::<i128>());
                    prop_assert_eq!(n, mine.len() as u64);
                }
            }
        }
    }
}
