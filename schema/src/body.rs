//! Frame bodies: the rkyv-archived `Trade`, `Kline` and `Heartbeat`.
//!
//! Every body is fixed-size (no strings, no vectors: the symbol is inline), so its archived size is
//! a constant and readers access it in place, zero-copy, after validation. Prices are `i64`
//! mantissas at the symbol's `price_scale`, quantities `i64` at `qty_scale`; volumes are `i128`
//! (quote volumes at `price_scale + qty_scale`) so sums never overflow.
//! Upstream: the aggregator and the feeds build these; downstream: `frame` encodes them.

use crate::decimal::Fixed;
use crate::interval::Interval;
use crate::symbol::Symbol;

/// One exchange trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Trade {
    pub symbol: Symbol,
    /// Dense index of the symbol in the broker (stable for the life of a broker).
    pub symbol_id: u32,
    pub price_scale: u8,
    pub qty_scale: u8,
    /// Binance `m`: the buyer was the maker (the trade was a sell aggressor).
    pub is_buyer_maker: bool,
    /// Binance `t`: the exchange's trade id, increasing per symbol.
    pub trade_id: i64,
    pub price: i64,
    pub qty: i64,
    /// Binance `T`, in microseconds since the epoch (exchange clock).
    pub time_us: i64,
}

impl Trade {
    pub fn price_fixed(&self) -> Fixed {
        Fixed::new(i128::from(self.price), self.price_scale)
    }
    pub fn qty_fixed(&self) -> Fixed {
        Fixed::new(i128::from(self.qty), self.qty_scale)
    }
    /// `price × qty`, exact, at scale `price_scale + qty_scale`.
    pub fn quote_qty(&self) -> Fixed {
        Fixed::new(i128::from(self.price) * i128::from(self.qty), self.price_scale + self.qty_scale)
    }
    pub fn time_ms(&self) -> i64 {
        self.time_us.div_euclid(1000)
    }
}

/// K-line flag: this closed K-line replaces an earlier close (a late trade amended it).
pub const KLINE_FLAG_AMENDED: u8 = 1;
/// K-line flag: the feed was down during part of this interval (data may be incomplete).
pub const KLINE_FLAG_FEED_GAP: u8 = 2;
/// K-line flag: a quiet gap longer than the broker's `max_empty_run` preceded this K-line; the
/// empty K-lines between the previous close and this one were not published (each would have had
/// `o=h=l=c=` the previous close, no volume).
pub const KLINE_FLAG_EMPTY_SKIPPED: u8 = 4;

/// One K-line with every Binance field (`t T s i f L o c h l v n x q V Q`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Kline {
    /// `s`
    pub symbol: Symbol,
    pub symbol_id: u32,
    /// `i`, as [`Interval`]'s wire value.
    pub interval: u8,
    pub price_scale: u8,
    pub qty_scale: u8,
    /// `x`
    pub closed: bool,
    /// `KLINE_FLAG_*` bits.
    pub flags: u8,
    /// 0 for the first close; +1 for each amended re-close.
    pub revision: u16,
    /// `t`, ms.
    pub open_time: i64,
    /// `T`, ms: next open − 1.
    pub close_time: i64,
    /// `f`; −1 for an empty K-line.
    pub first_trade_id: i64,
    /// `L`; −1 for an empty K-line.
    pub last_trade_id: i64,
    /// `n`
    pub trade_count: u64,
    /// `o`, `h`, `l`, `c` at `price_scale`.
    pub open: i64,
    pub high: i64,
    pub low: i64,
    pub close: i64,
    /// `v` at `qty_scale`.
    pub volume: i128,
    /// `q` at `price_scale + qty_scale`.
    pub quote_volume: i128,
    /// `V` at `qty_scale`.
    pub taker_buy_volume: i128,
    /// `Q` at `price_scale + qty_scale`.
    pub taker_buy_quote_volume: i128,
}

impl Kline {
    /// A K-line opened by its first trade.
    pub fn open_with(interval: Interval, open_time: i64, t: &Trade) -> Kline {
        let mut k = Kline::empty(interval, open_time, t.symbol, t.symbol_id, t.price_scale, t.qty_scale, t.price);
        k.add(t);
        k
    }

    /// Binance's empty K-line: `o = h = l = c = previous close`, no volume, `f = L = -1`.
    pub fn empty(
        interval: Interval,
        open_time: i64,
        symbol: Symbol,
        symbol_id: u32,
        price_scale: u8,
        qty_scale: u8,
        prev_close: i64,
    ) -> Kline {
        Kline {
            symbol,
            symbol_id,
            interval: interval as u8,
            price_scale,
            qty_scale,
            closed: false,
            flags: 0,
            revision: 0,
            open_time,
            close_time: interval.close_time(open_time),
            first_trade_id: -1,
            last_trade_id: -1,
            trade_count: 0,
            open: prev_close,
            high: prev_close,
            low: prev_close,
            close: prev_close,
            volume: 0,
            quote_volume: 0,
            taker_buy_volume: 0,
            taker_buy_quote_volume: 0,
        }
    }

    /// Folds one trade of this bucket into the K-line. Trade ids order the trades (Binance ids
    /// grow with time), so a late trade can become the open but never displaces a later close.
    pub fn add(&mut self, t: &Trade) {
        if self.trade_count == 0 {
            self.open = t.price;
            self.high = t.price;
            self.low = t.price;
            self.close = t.price;
            self.first_trade_id = t.trade_id;
            self.last_trade_id = t.trade_id;
        } else {
            self.high = self.high.max(t.price);
            self.low = self.low.min(t.price);
            if t.trade_id < self.first_trade_id {
                self.open = t.price;
                self.first_trade_id = t.trade_id;
            }
            if t.trade_id >= self.last_trade_id {
                self.close = t.price;
                self.last_trade_id = t.trade_id;
            }
        }
        self.trade_count += 1;
        let qty = i128::from(t.qty);
        let quote = i128::from(t.price) * qty;
        self.volume += qty;
        self.quote_volume += quote;
        if !t.is_buyer_maker {
            // The taker was the buyer.
            self.taker_buy_volume += qty;
            self.taker_buy_quote_volume += quote;
        }
    }

    /// Folds `o` — a K-line of a bucket inside this one (a closed 1s K-line into its minute, say)
    /// — into this one. Trade ids decide open and close, as in [`add`](Self::add); an empty `o`
    /// changes nothing.
    pub fn merge(&mut self, o: &Kline) {
        // A feed outage inside the part is an outage inside the whole.
        self.flags |= o.flags & KLINE_FLAG_FEED_GAP;
        if o.trade_count == 0 {
            return;
        }
        if self.trade_count == 0 {
            self.open = o.open;
            self.high = o.high;
            self.low = o.low;
            self.close = o.close;
            self.first_trade_id = o.first_trade_id;
            self.last_trade_id = o.last_trade_id;
        } else {
            self.high = self.high.max(o.high);
            self.low = self.low.min(o.low);
            if o.first_trade_id < self.first_trade_id {
                self.open = o.open;
                self.first_trade_id = o.first_trade_id;
            }
            if o.last_trade_id >= self.last_trade_id {
                self.close = o.close;
                self.last_trade_id = o.last_trade_id;
            }
        }
        self.trade_count += o.trade_count;
        self.volume += o.volume;
        self.quote_volume += o.quote_volume;
        self.taker_buy_volume += o.taker_buy_volume;
        self.taker_buy_quote_volume += o.taker_buy_quote_volume;
    }

    pub fn interval(&self) -> Option<Interval> {
        Interval::from_u8(self.interval)
    }
}

/// What the broker knows about its source, carried in heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FeedState {
    /// Not yet connected.
    Unknown = 0,
    /// Data is flowing (or the market is quiet while connected).
    Live = 1,
    /// The source is disconnected: silence is not a quiet market.
    Down = 2,
    /// A finite source (CSV, `--max-trades`) has ended.
    Ended = 3,
    /// The broker is shutting down (its last heartbeat).
    Stopped = 4,
}

impl FeedState {
    pub fn from_u8(v: u8) -> Option<FeedState> {
        Some(match v {
            0 => FeedState::Unknown,
            1 => FeedState::Live,
            2 => FeedState::Down,
            3 => FeedState::Ended,
            4 => FeedState::Stopped,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            FeedState::Unknown => "unknown",
            FeedState::Live => "live",
            FeedState::Down => "down",
            FeedState::Ended => "ended",
            FeedState::Stopped => "stopped",
        }
    }
}

/// Liveness beacon, sent at least every `interval_ms` while a stream is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Heartbeat {
    /// Random per broker incarnation: a change means the publisher restarted.
    pub publisher_id: u64,
    /// The last data seq published on this stream (0 if none yet).
    pub last_seq: u64,
    /// The promised maximum silence between frames, ms.
    pub interval_ms: u32,
    /// [`FeedState`] as its wire value.
    pub feed_state: u8,
    /// When this broker incarnation started, ns since the epoch.
    pub started_at_ns: i64,
}

/// What a [`SnapshotMark`] marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SnapshotPhase {
    /// On the snapshot stream, before the snapshot's K-line frames.
    Begin = 0,
    /// On the snapshot stream, after the last of them: the snapshot is complete.
    End = 1,
    /// On the acks stream, from a durable consumer: snapshot `snapshot_id` is durable.
    Ack = 2,
    /// On the acks stream: snapshot `snapshot_id` arrived whole and is being written (the broker
    /// then waits longer for its ack before re-sending: a big snapshot may take seconds to write).
    Received = 3,
    /// On the acks stream: a durable consumer (re)started; whatever is not acked is re-sent now.
    Hello = 4,
    /// On the acks stream: the consumer has read the snapshot stream through seq `covered_seq`
    /// (flow control: the broker keeps at most half a consumer's queue in flight).
    Progress = 5,
}

impl SnapshotPhase {
    pub fn from_u8(v: u8) -> Option<SnapshotPhase> {
        Some(match v {
            0 => SnapshotPhase::Begin,
            1 => SnapshotPhase::End,
            2 => SnapshotPhase::Ack,
            3 => SnapshotPhase::Received,
            4 => SnapshotPhase::Hello,
            5 => SnapshotPhase::Progress,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotPhase::Begin => "begin",
            SnapshotPhase::End => "end",
            SnapshotPhase::Ack => "ack",
            SnapshotPhase::Received => "received",
            SnapshotPhase::Hello => "hello",
            SnapshotPhase::Progress => "progress",
        }
    }
}

/// Bounds a delayed snapshot on the snapshot stream, or acks one on the acks stream.
///
/// A snapshot is `Begin`, then `rows` K-line frames (the K-lines closed since the last committed
/// snapshot, then the current state of every open K-line changed since then), then `End`; it
/// reflects every real-time frame up to `covered_seq` and nothing after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct SnapshotMark {
    pub snapshot_id: u64,
    /// The real-time stream's seq the snapshot covers.
    pub covered_seq: u64,
    /// The broker incarnation (as in its heartbeats) that published the snapshot; an ack repeats
    /// it, so a broker never commits on an ack meant for its predecessor.
    pub publisher_id: u64,
    /// K-line frames between `Begin` and `End`.
    pub rows: u32,
    /// Non-zero: the broker's memory bound was reached, and the K-lines closed by real-time frames
    /// `wal_from_seq..=covered_seq` are not all in the snapshot: read them from the WAL.
    pub wal_from_seq: u64,
    /// [`SnapshotPhase`] as its wire value.
    pub phase: u8,
}
