//! The ingress queue: from the exchange connections (network threads) to the broker's ingest
//! thread, bounded, with an explicit overload policy and counters.
//!
//! - `block` (default): a full queue makes the network thread wait. Nothing is lost; the pressure
//!   travels back to the exchange's TCP connection (and, if it lasts, the exchange drops the
//!   connection, which the source then recovers from with a backfill).
//! - `drop_newest`: a trade arriving at a full queue is dropped and counted.
//! - `drop_oldest`: the oldest queued trade is dropped and counted, the new one queued.
//!
//! Feed-state events (a symbol's feed down / up) are never dropped and never wait: they may go
//! past the capacity by at most one per symbol and connection change.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use mdbus_schema::Trade;

/// What a full ingress queue does with the next trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IngressPolicy {
    #[default]
    Block,
    DropNewest,
    DropOldest,
}

impl std::str::FromStr for IngressPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "block" => Ok(IngressPolicy::Block),
            "drop_newest" => Ok(IngressPolicy::DropNewest),
            "drop_oldest" => Ok(IngressPolicy::DropOldest),
            other => Err(format!("unknown ingress policy {other:?} (expected block, drop_newest or drop_oldest)")),
        }
    }
}

impl IngressPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            IngressPolicy::Block => "block",
            IngressPolicy::DropNewest => "drop_newest",
            IngressPolicy::DropOldest => "drop_oldest",
        }
    }
}

/// One item from a live source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LiveEvent {
    Trade(Trade),
    /// The symbol's feed is down (its connection dropped): no empty K-lines until it is back.
    Down(u32),
    /// The symbol's feed is back; `backfilled`: the trades missed meanwhile were recovered.
    Up {
        symbol: u32,
        backfilled: bool,
    },
    /// The source counted a reconnect (for the broker's counters).
    Reconnected,
}

/// Counters of the ingress queue.
#[derive(Debug, Default)]
pub struct IngressStats {
    pub pushed: AtomicU64,
    pub dropped_total: AtomicU64,
    /// Times a producer found the queue full (whatever the policy then did).
    pub backpressure_events: AtomicU64,
    pub high_water: AtomicU64,
    pub reconnects: AtomicU64,
}

/// The bounded multi-producer, single-consumer ingress queue.
#[derive(Debug)]
pub struct Ingress {
    q: Mutex<VecDeque<LiveEvent>>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
    policy: IngressPolicy,
    /// Set when the consumer is gone: producers stop waiting.
    closed: std::sync::atomic::AtomicBool,
    pub stats: IngressStats,
}

impl Ingress {
    pub fn new(capacity: usize, policy: IngressPolicy) -> Ingress {
        let capacity = capacity.max(1);
        Ingress {
            q: Mutex::new(VecDeque::with_capacity(capacity)),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            policy,
            closed: std::sync::atomic::AtomicBool::new(false),
            stats: IngressStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<LiveEvent>> {
        // Plain pushes and pops cannot leave the queue inconsistent: a poisoned lock is usable.
        self.q.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn policy(&self) -> IngressPolicy {
        self.policy
    }

    /// Queued items now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len / capacity`.
    pub fn fill_ratio(&self) -> f64 {
        self.len() as f64 / self.capacity as f64
    }

    /// Queues an item per the policy. Returns false if a trade was dropped (this one or the
    /// oldest).
    pub fn push(&self, e: LiveEvent) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let mut q = self.lock();
        let mut kept = true;
        if q.len() >= self.capacity && matches!(e, LiveEvent::Trade(_)) {
            self.stats.backpressure_events.fetch_add(1, Ordering::Relaxed);
            match self.policy {
                IngressPolicy::DropNewest => {
                    self.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                IngressPolicy::DropOldest => {
                    if let Some(i) = q.iter().position(|x| matches!(x, LiveEvent::Trade(_))) {
                        q.remove(i);
                        self.stats.dropped_total.fetch_add(1, Ordering::Relaxed);
                        kept = false;
                    }
                }
                IngressPolicy::Block => {
                    while q.len() >= self.capacity {
                        if self.closed.load(Ordering::Relaxed) {
                            return false;
                        }
                        q = self
                            .not_full
                            .wait_timeout(q, Duration::from_millis(100))
                            .map(|(q, _)| q)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                }
            }
        }
        if matches!(e, LiveEvent::Reconnected) {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(e);
        self.stats.pushed.fetch_add(1, Ordering::Relaxed);
        self.stats.high_water.fetch_max(q.len() as u64, Ordering::Relaxed);
        drop(q);
        self.not_empty.notify_one();
        kept
    }

    /// The consumer is gone: waiting producers return, later pushes are refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.not_full.notify_all();
    }

    /// The next item, if any.
    pub fn pop(&self) -> Option<LiveEvent> {
        let mut q = self.lock();
        let e = q.pop_front();
        let was_full = q.len() + 1 >= self.capacity;
        drop(q);
        if e.is_some() && was_full {
            self.not_full.notify_all();
        }
        e
    }

    /// Event time of the next queued trade (µs), if the head is a trade.
    pub fn peek_time_us(&self) -> Option<i64> {
        match self.lock().front() {
            Some(LiveEvent::Trade(t)) => Some(t.time_us),
            Some(_) => Some(i64::MIN),
            None => None,
        }
    }

    /// Waits up to `timeout` for an item; true if one is queued.
    pub fn wait(&self, timeout: Duration) -> bool {
        let q = self.lock();
        if !q.is_empty() {
            return true;
        }
        let (q, _) = self.not_empty.wait_timeout(q, timeout).unwrap_or_else(|e| e.into_inner());
        !q.is_empty()
    }
}

impl Ingress {
    /// Adds the queue's families to a scrape (`market_dropped_total`, `market_ingress_len`, …).
    pub fn families(&self, f: &mut mdbus_metrics::Families) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let st = &self.stats;
        f.counter("market_dropped_total", "trades dropped by the ingress overload policy", g(&st.dropped_total))
            .gauge("market_ingress_len", "items in the ingress queue now", self.len() as f64)
            .gauge("market_ingress_capacity", "capacity of the ingress queue", self.capacity() as f64)
            .gauge("market_ingress_fill_ratio", "ingress queue length / capacity", self.fill_ratio())
            .counter("market_ingress_pushed_total", "items pushed into the ingress queue", g(&st.pushed))
            .counter(
                "market_backpressure_events_total",
                "times a connection found the ingress queue full",
                g(&st.backpressure_events),
            )
            .gauge("market_ingress_high_water", "most items ever queued", g(&st.high_water) as f64);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use mdbus_schema::Symbol;

    use super::*;

    fn trade(id: i64) -> LiveEvent {
        LiveEvent::Trade(Trade {
            symbol: Symbol::new("BTCUSDT").unwrap(),
            symbol_id: 0,
            price_scale: 8,
            qty_scale: 8,
            is_buyer_maker: false,
            trade_id: id,
            price: 1,
            qty: 1,
            time_us: id,
        })
    }

    fn ids(q: &Ingress) -> Vec<i64> {
        std::iter::from_fn(|| q.pop())
            .filter_map(|e| match e {
                LiveEvent::Trade(t) => Some(t.trade_id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn drop_newest_keeps_the_first_and_counts_the_rest() {
        let q = Ingress::new(3, IngressPolicy::DropNewest);
        let kept: Vec<bool> = (1..=5).map(|i| q.push(trade(i))).collect();
        assert_eq!(kept, [true, true, true, false, false]);
        assert_eq!(q.stats.dropped_total.load(Ordering::Relaxed), 2);
        assert_eq!(q.stats.backpressure_events.load(Ordering::Relaxed), 2);
        assert_eq!(ids(&q), [1, 2, 3]);
    }

    #[test]
    fn drop_oldest_keeps_the_latest_and_counts_the_rest() {
        let q = Ingress::new(3, IngressPolicy::DropOldest);
        for i in 1..=5 {
            q.push(trade(i));
        }
        assert_eq!(q.stats.dropped_total.load(Ordering::Relaxed), 2);
        assert_eq!(ids(&q), [3, 4, 5]);
    }

    #[test]
    fn feed_events_are_never_dropped() {
        let q = Ingress::new(1, IngressPolicy::DropNewest);
        q.push(trade(1));
        q.push(LiveEvent::Down(0));
        q.push(LiveEvent::Up { symbol: 0, backfilled: true });
        assert_eq!(q.len(), 3);
        assert_eq!(q.stats.dropped_total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn block_loses_nothing_and_waits_for_room() {
        let q = Arc::new(Ingress::new(2, IngressPolicy::Block));
        let p = Arc::clone(&q);
        let producer = std::thread::spawn(move || {
            for i in 1..=1000 {
                p.push(trade(i));
            }
        });
        let mut got = Vec::new();
        while got.len() < 1000 {
            if q.wait(Duration::from_millis(100)) {
                if let Some(LiveEvent::Trade(t)) = q.pop() {
                    got.push(t.trade_id);
                }
            }
        }
        producer.join().unwrap();
        assert_eq!(got, (1..=1000).collect::<Vec<_>>());
        assert_eq!(q.stats.dropped_total.load(Ordering::Relaxed), 0);
        assert!(q.stats.backpressure_events.load(Ordering::Relaxed) > 0);
        assert!(q.stats.high_water.load(Ordering::Relaxed) <= 2);
    }
}
