//! Aggregator throughput: trades/s on one core through all 16 intervals for 1 000 symbols, with
//! and without the snapshot path, and frame encode/decode costs.
//!
//! `cargo bench -p mdbus-benches --bench aggregator`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mdbus_publisher::aggregator::{Aggregator, AggregatorConfig};
use mdbus_publisher::synthetic::{symbol_names, SyntheticConfig, SyntheticFeed};
use mdbus_schema::frame::header;
use mdbus_schema::{FrameIter, FrameKind, FrameWriter, Kline, Trade};

fn feed_of(symbols: usize) -> SyntheticFeed {
    let cfg = SyntheticConfig {
        seed: 11,
        symbols: symbol_names(symbols),
        rate: 50_000.0,
        start_us: 1_700_000_000_000_000,
        max_trades: None,
        steady: false,
    };
    SyntheticFeed::new(&cfg).expect("valid symbols")
}

fn feed() -> SyntheticFeed {
    feed_of(1000)
}

/// Feeds `iters` fresh trades (generated outside the timed region) and returns the time taken.
/// A clock tick every 256 trades; K-line updates drained every `drain_every` trades (0: never —
/// aggregation alone); with `snapshots`, a snapshot taken and committed every 100 000 trades (100 ms at 1 M trades/s).
fn run(
    agg: &mut Aggregator,
    feed: &mut SyntheticFeed,
    buf: &mut Vec<Trade>,
    iters: u64,
    snapshots: bool,
    drain_every: usize,
) -> Duration {
    buf.clear();
    buf.extend((0..iters).map(|_| feed.next_trade().expect("endless feed")));
    let mut sink = 0i64;
    let start = Instant::now();
    for (i, t) in buf.iter().enumerate() {
        let mut emit = |k: &Kline| sink = sink.wrapping_add(k.close);
        agg.on_trade(t, &mut emit);
        if i.is_multiple_of(256) {
            agg.on_clock(t.time_ms(), &mut emit);
        }
        if drain_every > 0 && i.is_multiple_of(drain_every) {
            agg.drain_updates(&mut emit);
        }
        if snapshots && i.is_multiple_of(100_000) {
            let id = agg.take_snapshot().map(|s| s.id).unwrap_or(0);
            agg.commit_snapshot(id);
        }
    }
    let d = start.elapsed();
    std::hint::black_box(sink);
    d
}

fn aggregation(c: &mut Criterion) {
    let mut g = c.benchmark_group("aggregator_1000_symbols_16_intervals");
    g.throughput(Throughput::Elements(1));
    for (name, snapshots, drain) in [
        ("aggregation_alone", false, 0),
        ("aggregation_with_snapshots", true, 0),
        ("with_all_16_updates_drained_every_256_trades", false, 256),
    ] {
        let mut f = feed();
        let mut agg = Aggregator::new(&f.specs(), AggregatorConfig { snapshots, ..AggregatorConfig::default() });
        let mut buf = Vec::new();
        g.bench_function(name, |b| b.iter_custom(|iters| run(&mut agg, &mut f, &mut buf, iters, snapshots, drain)));
    }
    g.finish();
    // The same with 10 symbols: the state fits in L1/L2, so this is the compute cost alone.
    let mut g = c.benchmark_group("aggregator_10_symbols_16_intervals");
    g.throughput(Throughput::Elements(1));
    let mut f = feed_of(10);
    let mut agg = Aggregator::new(&f.specs(), AggregatorConfig::default());
    let mut buf = Vec::new();
    g.bench_function("aggregation_alone", |b| b.iter_custom(|iters| run(&mut agg, &mut f, &mut buf, iters, false, 0)));
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut f = feed();
    let t = f.next_trade().expect("endless feed");
    let k = Kline::open_with(mdbus_schema::Interval::M1, 0, &t);
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(1));
    let mut w = FrameWriter::with_capacity(1 << 16);
    g.bench_function("encode_kline", |b| {
        b.iter(|| {
            if w.len() > 60_000 {
                w.clear();
            }
            w.push_kline(header(FrameKind::Kline, 1, 1), std::hint::black_box(&k)).expect("encodes")
        })
    });
    w.clear();
    for _ in 0..64 {
        let _ = w.push_kline(header(FrameKind::Kline, 1, 1), &k);
    }
    g.throughput(Throughput::Elements(64));
    g.bench_function("decode_and_validate_64_klines", |b| {
        b.iter(|| {
            let mut n = 0i64;
            for fr in FrameIter::new(w.as_bytes()) {
                n += fr.expect("valid").kline().expect("valid").close.to_native();
            }
            n
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = aggregation, frames
}
criterion_main!(benches);
