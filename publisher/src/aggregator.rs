//! The K-line aggregator: a pure state machine from trades and clock ticks to K-lines.
//!
//! Upstream: trades (already normalised to [`Trade`]) and the source's clock, both passed in as
//! arguments — the aggregator has no clock, no I/O and no allocation after construction.
//! Downstream: closed K-lines go to a callback at the moment they close (in order, never
//! conflated); changed open K-lines are remembered in a preallocated dirty table and drained by
//! [`Aggregator::drain_updates`] (one update per K-line however many trades touched it).
//!
//! One rollover authority: [`Aggregator::roll_to`] is the only code that closes a K-line. A trade
//! first rolls its symbol to the trade's time, a clock tick rolls every symbol to `now - grace`.
//! Rolling closes each open K-line whose bucket ended and opens Binance's empty K-line for the
//! next bucket (`o=h=l=c=` previous close, `f=L=-1`), so a quiet market still produces K-lines.
//! While the feed is down, clock ticks roll nothing: silence from a dead feed is not a quiet
//! market. A trade older than the symbol's newest open K-line is late: dropped and counted.

use mdbus_schema::{Interval, Kline, Symbol, Trade};

/// What the aggregator needs to know about a symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolSpec {
    pub symbol: Symbol,
    pub price_scale: u8,
    pub qty_scale: u8,
}

/// Settings of the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregatorConfig {
    /// A K-line closes on the clock when the clock passes its end plus this many ms.
    pub close_grace_ms: i64,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig { close_grace_ms: 200 }
    }
}

/// The result of feeding one trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TradeOutcome {
    Accepted,
    /// Older than the symbol's open K-lines: dropped (counted in [`AggregatorStats::late_trades`]).
    Late,
    /// `symbol_id` is not a known symbol: dropped and counted.
    UnknownSymbol,
}

/// Counters, read by whoever owns the aggregator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregatorStats {
    pub trades: u64,
    pub late_trades: u64,
    pub unknown_symbol_trades: u64,
    pub closed: u64,
    pub empty_opened: u64,
}

const N: usize = Interval::COUNT;

#[derive(Debug, Clone)]
struct SymbolState {
    spec: SymbolSpec,
    /// The open K-line per interval; `None` until the symbol's first trade.
    open: [Option<Kline>; N],
}

/// The K-line state of every symbol, for all 16 intervals.
#[derive(Debug, Clone)]
pub struct Aggregator {
    config: AggregatorConfig,
    symbols: Vec<SymbolState>,
    /// Dirty table: one bit per (symbol, interval) slot plus the list of set slots, both sized
    /// for every slot up front so marking never allocates.
    dirty_bits: Vec<u64>,
    dirty_list: Vec<u32>,
    /// No open K-line ends before this (ms): clock ticks below it are O(1).
    next_deadline_ms: i64,
    feed_live: bool,
    stats: AggregatorStats,
}

impl Aggregator {
    pub fn new(specs: &[SymbolSpec], config: AggregatorConfig) -> Aggregator {
        let mut a = Aggregator {
            config,
            symbols: Vec::new(),
            dirty_bits: Vec::new(),
            dirty_list: Vec::new(),
            next_deadline_ms: i64::MAX,
            feed_live: true,
            stats: AggregatorStats::default(),
        };
        for s in specs {
            a.add_symbol(*s);
        }
        a
    }

    /// Adds a symbol and returns its id. Grows the tables: call off the hot path.
    pub fn add_symbol(&mut self, spec: SymbolSpec) -> u32 {
        let id = self.symbols.len() as u32;
        self.symbols.push(SymbolState { spec, open: [None; N] });
        let slots = self.symbols.len() * N;
        self.dirty_bits.resize(slots.div_ceil(64), 0);
        self.dirty_list.reserve(slots.saturating_sub(self.dirty_list.capacity()));
        id
    }

    pub fn symbol_count(&self) -> usize {
        self.symbols.len()
    }

    pub fn spec(&self, symbol_id: u32) -> Option<&SymbolSpec> {
        self.symbols.get(symbol_id as usize).map(|s| &s.spec)
    }

    pub fn stats(&self) -> AggregatorStats {
        self.stats
    }

    /// The currently open K-line of a symbol and interval.
    pub fn open_kline(&self, symbol_id: u32, interval: Interval) -> Option<&Kline> {
        self.symbols.get(symbol_id as usize)?.open[interval.index()].as_ref()
    }

    /// Tells the aggregator whether the source is connected. While it is not, the clock closes
    /// nothing and no empty K-line is made.
    pub fn set_feed_live(&mut self, live: bool) {
        self.feed_live = live;
    }

    fn mark_dirty(&mut self, symbol_id: u32, interval: usize) {
        let slot = symbol_id as usize * N + interval;
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if self.dirty_bits[word] & bit == 0 {
            self.dirty_bits[word] |= bit;
            // Capacity was reserved for every slot: this push never allocates.
            self.dirty_list.push(slot as u32);
        }
    }

    /// The rollover authority: closes every open K-line of `symbol_id` whose bucket ends at or
    /// before `to_ms` (its `close_time < to_ms`), opening the empty K-line of the next bucket each
    /// time. Returns the earliest end of the K-lines left open.
    pub fn roll_to(&mut self, symbol_id: u32, to_ms: i64, on_close: &mut impl FnMut(&Kline)) -> i64 {
        let mut earliest = i64::MAX;
        let Some(state) = self.symbols.get_mut(symbol_id as usize) else {
            return earliest;
        };
        let mut touched = 0u32;
        for (i, slot) in state.open.iter_mut().enumerate() {
            let Some(k) = slot else { continue };
            let iv = Interval::ALL[i];
            while k.close_time < to_ms {
                k.closed = true;
                on_close(k);
                self.stats.closed += 1;
                let next = iv.next_open(k.open_time);
                *k = Kline::empty(iv, next, k.symbol, k.symbol_id, k.price_scale, k.qty_scale, k.close);
                self.stats.empty_opened += 1;
                touched |= 1 << i;
            }
            earliest = earliest.min(k.close_time + 1);
        }
        for i in 0..N {
            if touched & (1 << i) != 0 {
                self.mark_dirty(symbol_id, i);
            }
        }
        earliest
    }

    /// Folds one trade in. Closed K-lines (of this symbol) are passed to `on_close` first.
    pub fn on_trade(&mut self, t: &Trade, on_close: &mut impl FnMut(&Kline)) -> TradeOutcome {
        let id = t.symbol_id;
        let Some(state) = self.symbols.get(id as usize) else {
            self.stats.unknown_symbol_trades += 1;
            return TradeOutcome::UnknownSymbol;
        };
        let ts = t.time_ms();
        // Late: older than the newest open K-line (the 1s one opens last).
        if let Some(k) = &state.open[Interval::S1.index()] {
            if ts < k.open_time {
                self.stats.late_trades += 1;
                return TradeOutcome::Late;
            }
        }
        let earliest = self.roll_to(id, ts, on_close);
        self.next_deadline_ms = self.next_deadline_ms.min(earliest);
        let state = &mut self.symbols[id as usize];
        for (i, slot) in state.open.iter_mut().enumerate() {
            match slot {
                Some(k) => k.add(t),
                None => {
                    let iv = Interval::ALL[i];
                    let k = Kline::open_with(iv, iv.open_time(ts), t);
                    self.next_deadline_ms = self.next_deadline_ms.min(k.close_time + 1);
                    *slot = Some(k);
                }
            }
        }
        for i in 0..N {
            self.mark_dirty(id, i);
        }
        self.stats.trades += 1;
        TradeOutcome::Accepted
    }

    /// The clock: closes every K-line whose end plus the grace is at or before `now_ms`.
    /// O(1) until the earliest open K-line is due. Does nothing while the feed is down.
    pub fn on_clock(&mut self, now_ms: i64, on_close: &mut impl FnMut(&Kline)) {
        if !self.feed_live {
            return;
        }
        let to = now_ms - self.config.close_grace_ms;
        if to < self.next_deadline_ms {
            return;
        }
        let mut earliest = i64::MAX;
        for id in 0..self.symbols.len() as u32 {
            earliest = earliest.min(self.roll_to(id, to, on_close));
        }
        self.next_deadline_ms = earliest;
    }

    /// Calls `f` once for every open K-line changed since the last drain, then clears the table.
    pub fn drain_updates(&mut self, f: &mut impl FnMut(&Kline)) {
        for &slot in &self.dirty_list {
            let slot = slot as usize;
            self.dirty_bits[slot / 64] &= !(1u64 << (slot % 64));
            if let Some(k) = &self.symbols[slot / N].open[slot % N] {
                f(k);
            }
        }
        self.dirty_list.clear();
    }

    /// Number of slots waiting in the dirty table.
    pub fn pending_updates(&self) -> usize {
        self.dirty_list.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const T0: i64 = 1_709_251_140_000; // 2024-02-29T23:59:00Z

    fn spec() -> SymbolSpec {
        SymbolSpec { symbol: Symbol::new("BTCUSDT").unwrap(), price_scale: 2, qty_scale: 3 }
    }

    fn trade(id: i64, ms: i64, price: i64, qty: i64, buyer_maker: bool) -> Trade {
        Trade {
            symbol: spec().symbol,
            symbol_id: 0,
            price_scale: 2,
            qty_scale: 3,
            is_buyer_maker: buyer_maker,
            trade_id: id,
            price,
            qty,
            time_us: ms * 1000,
        }
    }

    fn run(trades: &[Trade], chunks: &[usize], grace: i64) -> (Vec<Kline>, Aggregator) {
        let mut a = Aggregator::new(&[spec()], AggregatorConfig { close_grace_ms: grace });
        let mut closed = Vec::new();
        let mut i = 0;
        let mut c = 0;
        while i < trades.len() {
            let n = chunks.get(c).copied().unwrap_or(1).max(1);
            c += 1;
            for t in &trades[i..(i + n).min(trades.len())] {
                assert_eq!(a.on_trade(t, &mut |k| closed.push(*k)), TradeOutcome::Accepted);
            }
            i = (i + n).min(trades.len());
            let last = trades[i - 1].time_ms();
            a.on_clock(last, &mut |k| closed.push(*k));
            a.drain_updates(&mut |_| {});
        }
        (closed, a)
    }

    /// Naive oracle: every bucket from the first trade's to the one containing `until`, per
    /// interval, computed by grouping (no rolling state machine).
    fn oracle(trades: &[Trade], iv: Interval, until_ms: i64) -> Vec<Kline> {
        let mut groups: BTreeMap<i64, Vec<&Trade>> = BTreeMap::new();
        for t in trades {
            groups.entry(iv.open_time(t.time_ms())).or_default().push(t);
        }
        let mut out = Vec::new();
        let Some((&first, _)) = groups.iter().next() else {
            return out;
        };
        let mut open = first;
        let mut prev_close = 0;
        while open <= until_ms {
            let mut k = Kline::empty(iv, open, spec().symbol, 0, 2, 3, prev_close);
            if let Some(ts) = groups.get(&open) {
                k.open = ts[0].price;
                k.high = ts.iter().map(|t| t.price).max().unwrap();
                k.low = ts.iter().map(|t| t.price).min().unwrap();
                k.close = ts.last().unwrap().price;
                k.first_trade_id = ts[0].trade_id;
                k.last_trade_id = ts.last().unwrap().trade_id;
                k.trade_count = ts.len() as u64;
                k.volume = ts.iter().map(|t| i128::from(t.qty)).sum();
                k.quote_volume = ts.iter().map(|t| i128::from(t.qty) * i128::from(t.price)).sum();
                k.taker_buy_volume = ts.iter().filter(|t| !t.is_buyer_maker).map(|t| i128::from(t.qty)).sum();
                k.taker_buy_quote_volume =
                    ts.iter().filter(|t| !t.is_buyer_maker).map(|t| i128::from(t.qty) * i128::from(t.price)).sum();
            }
            prev_close = k.close;
            out.push(k);
            open = iv.next_open(open);
        }
        out
    }

    #[test]
    fn kline_closes_on_a_later_trade_and_the_gap_gets_binance_empty_klines() {
        let trades =
            [trade(1, T0 + 100, 100, 5, false), trade(2, T0 + 900, 120, 1, true), trade(3, T0 + 3_500, 90, 2, false)];
        let mut a = Aggregator::new(&[spec()], AggregatorConfig::default());
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
        assert_eq!(s1[2].open_time, T0 + 2_000);
        assert_eq!(s1[2].close_time, T0 + 2_999);
        assert!(closed.iter().all(|k| k.interval == Interval::S1 as u8));
        assert_eq!(a.open_kline(0, Interval::M1).unwrap().trade_count, 3);
    }

    #[test]
    fn kline_closes_on_clock_when_no_trade_arrives() {
        let mut a = Aggregator::new(&[spec()], AggregatorConfig { close_grace_ms: 250 });
        let mut closed = Vec::new();
        a.on_trade(&trade(1, T0 + 10, 100, 1, false), &mut |k| closed.push(*k));
        a.on_clock(T0 + 1_200, &mut |k| closed.push(*k));
        assert!(closed.is_empty(), "within the grace nothing closes");
        a.on_clock(T0 + 1_250, &mut |k| closed.push(*k));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].open_time, T0);
        let next = a.open_kline(0, Interval::S1).unwrap();
        assert_eq!((next.open_time, next.trade_count, next.open, next.first_trade_id), (T0 + 1_000, 0, 100, -1));
        // Month, week, day, 3d and every shorter interval roll over at 2024-03-01T00:00Z.
        a.on_clock(T0 + 60_000 + 250, &mut |k| closed.push(*k));
        let intervals: std::collections::BTreeSet<_> = closed.iter().map(|k| k.interval).collect();
        let expected: std::collections::BTreeSet<_> =
            Interval::ALL.iter().filter(|i| !matches!(i, Interval::W1 | Interval::D3)).map(|i| *i as u8).collect();
        assert_eq!(intervals, expected);
    }

    #[test]
    fn clock_closes_nothing_while_the_feed_is_down() {
        let mut a = Aggregator::new(&[spec()], AggregatorConfig { close_grace_ms: 0 });
        let mut closed = 0;
        a.on_trade(&trade(1, T0, 100, 1, false), &mut |_| closed += 1);
        a.set_feed_live(false);
        a.on_clock(T0 + 10_000, &mut |_| closed += 1);
        assert_eq!(closed, 0);
        a.set_feed_live(true);
        a.on_clock(T0 + 10_000, &mut |_| closed += 1);
        assert!(closed > 0);
    }

    #[test]
    fn late_trades_are_dropped_and_counted() {
        let mut a = Aggregator::new(&[spec()], AggregatorConfig::default());
        a.on_trade(&trade(1, T0 + 5_000, 100, 1, false), &mut |_| {});
        assert_eq!(a.on_trade(&trade(2, T0 + 4_999, 100, 1, false), &mut |_| {}), TradeOutcome::Late);
        assert_eq!(a.on_trade(&trade(3, T0 + 5_000, 100, 1, false), &mut |_| {}), TradeOutcome::Accepted);
        let mut unknown = trade(4, T0 + 5_000, 1, 1, false);
        unknown.symbol_id = 9;
        assert_eq!(a.on_trade(&unknown, &mut |_| {}), TradeOutcome::UnknownSymbol);
        let s = a.stats();
        assert_eq!((s.trades, s.late_trades, s.unknown_symbol_trades), (2, 1, 1));
    }

    #[test]
    fn updates_are_conflated_to_one_per_kline_per_drain() {
        let mut a = Aggregator::new(&[spec()], AggregatorConfig::default());
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

    fn trades_strategy() -> impl Strategy<Value = Vec<Trade>> {
        proptest::collection::vec((0i64..5_000, 1i64..1_000, 1i64..50, any::<bool>()), 1..120).prop_map(|steps| {
            let mut t = T0 - 30_000;
            steps
                .into_iter()
                .enumerate()
                .map(|(i, (gap, price, qty, m))| {
                    t += gap;
                    trade(i as i64 + 1, t, price, qty, m)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn any_chunking_of_the_same_trades_gives_the_oracles_klines(
            trades in trades_strategy(),
            chunks in proptest::collection::vec(1usize..20, 0..40),
            grace in 0i64..3_000,
        ) {
            let (closed, a) = run(&trades, &chunks, grace);
            let last = trades.last().unwrap().time_ms();
            for iv in Interval::ALL {
                let expect = oracle(&trades, iv, last);
                let mut got: Vec<Kline> = closed.iter().filter(|k| k.interval == iv as u8).copied().collect();
                for k in &got {
                    prop_assert!(k.low <= k.open.min(k.close) && k.open.max(k.close) <= k.high);
                }
                let mut open = *a.open_kline(0, iv).unwrap();
                open.closed = true;
                got.push(open);
                let mut expect_closed = expect.clone();
                for k in &mut expect_closed { k.closed = true; }
                // Everything up to the last trade's bucket, in order, then nothing else.
                prop_assert_eq!(&got[..expect_closed.len()], &expect_closed[..], "interval {}", iv);
                for extra in &got[expect_closed.len()..] {
                    prop_assert_eq!(extra.trade_count, 0, "only empty K-lines may follow");
                }
                let vol: i128 = got.iter().map(|k| k.volume).sum();
                prop_assert_eq!(vol, trades.iter().map(|t| i128::from(t.qty)).sum::<i128>());
            }
        }
    }
}
