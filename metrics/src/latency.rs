//! Latency recording with hdrhistogram: per thread, no lock and no allocation per value.
//!
//! Each recording thread owns a fixed-range histogram (1 µs … 60 s, 2 significant digits) per
//! [`Latency`]; at most every 250 ms (judged from the `now_ns` the caller already has) it adds it
//! to the shared one under a short lock and resets it. A scrape reads the shared histogram: the
//! quantiles cover the last one to two minutes (two windows of 60 s), count and sum the whole run.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

/// Largest value kept (µs); larger ones count as this.
const MAX_US: u64 = 60_000_000;
const SIGFIG: u8 = 2;
const FLUSH_NS: i64 = 250_000_000;
const WINDOW_NS: i64 = 60_000_000_000;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn new_hist() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_US, SIGFIG).ok()
}

struct Local {
    hist: Histogram<u64>,
    sum: u64,
    last_flush_ns: i64,
}

thread_local! {
    /// This thread's histograms, indexed by `Latency::id`.
    static LOCAL: RefCell<Vec<Option<Local>>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug)]
struct Shared {
    /// The current and the previous window: quantiles come from both.
    cur: Histogram<u64>,
    prev: Histogram<u64>,
    cur_start_ns: i64,
    count: u64,
    sum: u64,
}

impl Shared {
    /// Starts a new window when the current one is 60 s old; after two idle windows nothing old
    /// is kept.
    fn rotate(&mut self, now_ns: i64) {
        if self.cur_start_ns == 0 {
            self.cur_start_ns = now_ns;
        } else if now_ns - self.cur_start_ns >= 2 * WINDOW_NS {
            self.cur.reset();
            self.prev.reset();
            self.cur_start_ns = now_ns;
        } else if now_ns - self.cur_start_ns >= WINDOW_NS {
            std::mem::swap(&mut self.cur, &mut self.prev);
            self.cur.reset();
            self.cur_start_ns = now_ns;
        }
    }
}

/// A latency distribution in microseconds (exported as a Prometheus summary).
#[derive(Debug)]
pub struct Latency {
    id: usize,
    name: &'static str,
    help: &'static str,
    shared: Mutex<Option<Shared>>,
}

/// What a scrape sees.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySnapshot {
    /// Values recorded since start.
    pub count: u64,
    /// Their sum (µs).
    pub sum: u64,
    /// Quantiles over the last one to two minutes (µs): 0.5, 0.95, 0.99, 0.999.
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn new(name: &'static str, help: &'static str) -> Arc<Latency> {
        let shared = match (new_hist(), new_hist()) {
            (Some(cur), Some(prev)) => Some(Shared { cur, prev, cur_start_ns: 0, count: 0, sum: 0 }),
            _ => None,
        };
        Arc::new(Latency { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), name, help, shared: Mutex::new(shared) })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn help(&self) -> &'static str {
        self.help
    }

    /// Records one value (µs). `now_ns` is the caller's clock reading (any monotone-enough
    /// nanosecond clock); it decides when this thread's values are handed over.
    pub fn record(&self, value_us: u64, now_ns: i64) {
        let _ = LOCAL.try_with(|slots| {
            let mut slots = slots.borrow_mut();
            if slots.len() <= self.id {
                // Once per thread and recorder (warm-up), never per value.
                slots.resize_with(self.id + 1, || None);
            }
            let slot = &mut slots[self.id];
            if slot.is_none() {
                *slot = new_hist().map(|hist| Local { hist, sum: 0, last_flush_ns: now_ns });
            }
            let Some(local) = slot.as_mut() else { return };
            local.hist.saturating_record(value_us.clamp(1, MAX_US));
            local.sum = local.sum.saturating_add(value_us);
            self.hand_over_if_due(local, now_ns);
        });
    }

    /// Due (250 ms since the last), or the clock stepped back: hand over.
    fn hand_over_if_due(&self, local: &mut Local, now_ns: i64) {
        if now_ns - local.last_flush_ns >= FLUSH_NS || now_ns < local.last_flush_ns {
            local.last_flush_ns = now_ns;
            self.hand_over(local, now_ns);
        }
    }

    /// Hands this thread's values over if the last hand-over is 250 ms old: for idle paths
    /// (heartbeats, timers), so that the last values before a quiet spell reach the scrape.
    pub fn flush_if_due(&self, now_ns: i64) {
        self.with_local(|local| self.hand_over_if_due(local, now_ns));
    }

    /// Hands this thread's values over now (a thread that stops recording calls it last).
    pub fn flush(&self, now_ns: i64) {
        self.with_local(|local| self.hand_over(local, now_ns));
    }

    /// Runs `f` on this thread's histogram for this recorder, if it has one.
    fn with_local(&self, f: impl FnOnce(&mut Local)) {
        let _ = LOCAL.try_with(|slots| {
            if let Some(Some(local)) = slots.borrow_mut().get_mut(self.id) {
                f(local);
            }
        });
    }

    fn hand_over(&self, local: &mut Local, now_ns: i64) {
        if local.hist.is_empty() {
            return;
        }
        if let Ok(mut guard) = self.shared.lock() {
            if let Some(s) = guard.as_mut() {
                s.rotate(now_ns);
                // Same bounds on both sides: adding never resizes (no allocation).
                let _ = s.cur.add(&local.hist);
                s.count += local.hist.len();
                s.sum = s.sum.saturating_add(local.sum);
            }
        }
        local.hist.reset();
        local.sum = 0;
    }

    /// The distribution now (quantiles over the last one to two minutes of wall time).
    pub fn snapshot(&self) -> LatencySnapshot {
        let now_ns =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
        self.snapshot_at(now_ns)
    }

    /// The distribution as of `now_ns` on the recording threads' clock.
    pub fn snapshot_at(&self, now_ns: i64) -> LatencySnapshot {
        // Copy under the lock, compute after it: recording threads never wait on the quantiles.
        let (mut h, prev, count, sum) = {
            let Ok(mut guard) = self.shared.lock() else { return LatencySnapshot::default() };
            let Some(s) = guard.as_mut() else { return LatencySnapshot::default() };
            s.rotate(now_ns);
            (s.cur.clone(), s.prev.clone(), s.count, s.sum)
        };
        let _ = h.add(&prev);
        if h.is_empty() {
            return LatencySnapshot { count, sum, ..LatencySnapshot::default() };
        }
        LatencySnapshot {
            count,
            sum,
            p50: h.value_at_quantile(0.5),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn values_from_several_threads_reach_the_snapshot_in_order_of_quantiles() {
        let l = Latency::new("t_latency_us", "test");
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let l = &l;
                s.spawn(move || {
                    for i in 1..=1000u64 {
                        l.record(i * (t + 1), i as i64 * 1_000_000);
                    }
                    l.flush(2_000_000_000);
                });
            }
        });
        let s = l.snapshot_at(2_000_000_000);
        assert_eq!(s.count, 3000);
        assert_eq!(s.sum, (1..=1000u64).sum::<u64>() * 6);
        assert!(s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.max, "{s:?}");
        // The median of 1..1000, 2..2000 and 3..3000 together is about 818.
        assert!((790..=850).contains(&s.p50), "{s:?}");
        assert!(s.max >= 2900, "{s:?}");
    }

    #[test]
    fn quantiles_forget_values_older_than_two_windows_but_count_and_sum_keep_them() {
        let l = Latency::new("t3_latency_us", "test");
        let t0 = 1_000_000_000_000;
        l.record(200, t0);
        l.flush(t0);
        assert_eq!(l.snapshot_at(t0).p99, 200);
        assert_eq!(l.snapshot_at(t0 + WINDOW_NS).p99, 200, "the previous window still counts");
        let later = l.snapshot_at(t0 + 3 * WINDOW_NS);
        assert_eq!((later.p99, later.count, later.sum), (0, 1, 200));
        l.record(7, t0 - 1);
        assert_eq!(l.snapshot_at(t0 + 3 * WINDOW_NS).count, 2, "a clock that steps back hands over at once");
    }

    #[test]
    fn values_wait_on_their_thread_until_a_quarter_second_has_passed() {
        let l = Latency::new("t2_latency_us", "test");
        l.record(5, 1);
        l.record(5, 2);
        assert_eq!(l.snapshot_at(2).count, 0);
        l.record(5, 1 + FLUSH_NS);
        assert_eq!(l.snapshot_at(1 + FLUSH_NS).count, 3);
        assert_eq!(l.snapshot_at(1 + FLUSH_NS).p99, 5);
    }
}
