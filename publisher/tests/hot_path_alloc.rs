//! The per-trade work of the broker, run on one thread: what an aggregation worker does per trade
//! (aggregate, clock, conflated updates, the snapshot path) and what the publish thread does per
//! frame (encode into the batch buffer) allocates nothing once warm and never blocks.
//! (The SPSC queues between them are fixed-size rings; iceoryx2's loan, outside this path, makes
//! one small allocation per sample of its own.)
#![allow(unsafe_code, clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use mdbus_publisher::aggregator::{Aggregator, AggregatorConfig};
use mdbus_publisher::metrics::BrokerMetrics;
use mdbus_publisher::synthetic::{symbol_names, SyntheticConfig, SyntheticFeed};
use mdbus_schema::frame::{encoded_frame_len, header};
use mdbus_schema::Kline;
use mdbus_schema::{FrameKind, FrameWriter};

struct Counting;
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Per thread: tests run in parallel and must not count each other's allocations.
    static MINE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count() {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call unchanged to the system allocator; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by the calling thread so far.
fn allocations() -> u64 {
    MINE.with(|c| c.get())
}

/// Voluntary context switches of the calling thread so far.
fn voluntary_switches() -> u64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).map(|v| v.trim().parse().unwrap()).unwrap()
}

#[test]
fn a_million_trades_through_aggregation_and_the_snapshot_path_allocate_nothing_and_never_block() {
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(allocations() > before, "the counter counts");
    drop(v);

    let cfg = SyntheticConfig {
        seed: 5,
        symbols: symbol_names(1000),
        rate: 20_000.0,
        start_us: 1_700_000_000_000_000,
        max_trades: None,
        steady: false,
    };
    let mut feed = SyntheticFeed::new(&cfg).unwrap();
    let mut agg = Aggregator::new(&feed.specs(), AggregatorConfig { snapshots: true, ..AggregatorConfig::default() });
    let mut sink = 0u64;
    let mut run = |n: u64, agg: &mut Aggregator, sink: &mut u64| {
        for i in 0..n {
            let t = feed.next_trade().unwrap();
            let mut emit = |k: &Kline| *sink = sink.wrapping_add(k.close as u64);
            agg.on_trade(&t, &mut emit);
            if i.is_multiple_of(64) {
                agg.on_clock(t.time_ms(), &mut emit);
                agg.drain_updates(&mut emit);
            }
            if i.is_multiple_of(2_000) {
                // The delayed path: freeze, read, and commit every other snapshot (the others
                // are merged into the next one).
                let id = {
                    let s = agg.take_snapshot().unwrap();
                    *sink = sink.wrapping_add((s.open.len() + s.closed.len()) as u64);
                    s.id
                };
                if i.is_multiple_of(4_000) {
                    assert!(agg.commit_snapshot(id));
                }
            }
        }
    };
    // Warm-up: the closed-K-line lists reach their high-water mark.
    run(200_000, &mut agg, &mut sink);
    // (Reading /proc allocates: outside the counted window.)
    let switches = voluntary_switches();
    let allocs = allocations();
    run(1_000_000, &mut agg, &mut sink);
    let during = allocations() - allocs;
    let switched = voluntary_switches() - switches;
    assert_eq!(during, 0, "{during} allocations on the hot path");
    assert_eq!(switched, 0, "{switched} voluntary context switches on the hot path");
    assert!(agg.stats().closed > 10_000 && sink != 0);
}

#[test]
fn a_million_trades_through_aggregation_and_framing_allocate_nothing() {
    // The counter works: a vec! is seen.
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(allocations() > before);
    drop(v);

    let cfg = SyntheticConfig {
        seed: 3,
        symbols: symbol_names(200),
        rate: 50_000.0,
        start_us: 1_700_000_000_000_000,
        max_trades: None,
        steady: false,
    };
    let mut feed = SyntheticFeed::new(&cfg).unwrap();
    let mut agg = Aggregator::new(&feed.specs(), AggregatorConfig::default());
    let cap = 16 * 1024;
    let mut w = FrameWriter::with_capacity(cap);
    let kline_len = encoded_frame_len(FrameKind::Kline);
    let mut seq = 0u64;
    let mut frames = 0u64;
    // The broker's metrics on this path: an ingest latency per trade (thread-local histogram,
    // handed over every 250 ms of the clock it is given) and counters stored per sample.
    let metrics = BrokerMetrics::default();
    let mut run = |n: u64, w: &mut FrameWriter, agg: &mut Aggregator| {
        for i in 0..n {
            let t = feed.next_trade().unwrap();
            let recv_ns = t.time_us * 1000 + 150_000;
            metrics.ingest_latency.record((recv_ns / 1000 - t.time_us) as u64, recv_ns);
            let mut emit = |k: &mdbus_schema::Kline| {
                if w.len() + kline_len > cap {
                    frames += w.frames() as u64;
                    metrics.published.store(frames, Ordering::Relaxed);
                    metrics.last_seq.store(seq, Ordering::Relaxed);
                    w.clear();
                }
                seq += 1;
                w.push_kline(header(FrameKind::Kline, 1, seq), k).unwrap();
            };
            agg.on_trade(&t, &mut emit);
            if i.is_multiple_of(64) {
                agg.on_clock(t.time_ms(), &mut emit);
                agg.drain_updates(&mut emit);
            }
            if w.len() + kline_len > cap {
                frames += w.frames() as u64;
                w.clear();
            }
            seq += 1;
            w.push_trade(header(FrameKind::Trade, 1, seq), &t).unwrap();
        }
    };
    run(20_000, &mut w, &mut agg);
    let before = allocations();
    run(1_000_000, &mut w, &mut agg);
    let during = allocations() - before;
    assert_eq!(during, 0, "{during} allocations on the hot path");
    assert_eq!(agg.stats().trades, 1_020_000);
    assert!(frames > 1_000_000);
    let l = metrics.ingest_latency.snapshot_at(feed.next_trade().unwrap().time_us * 1000);
    assert!(l.count > 1_000_000 && l.p50 == 150 && l.p99 == 150, "{l:?}");
}
