//! A broker's restart read: `Store::open` + `committed` + `open_klines` on a database holding
//! S symbols × 16 intervals of open K-lines (and as many closed ones, which the read must skip).
//! Prints each of R reads (wall time, and this thread's CPU time apart from waiting on a server)
//! and the fastest, then checks the rows read against the rows written.
//!
//! ```sh
//! cargo run --release -p mdbus-store --example read_open -- sqlite 10000 5
//! cargo run --release -p mdbus-store --example read_open -- postgres 10000 5   # a throwaway server
//! cargo run --release -p mdbus-store --example read_open -- postgres://u@host/db 10000 5   # an empty database
//! cargo run --release -p mdbus-store --example read_open -- sqlite 10000 5 /tmp/keep   # kept, filled once
//! ```

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use mdbus_schema::{Interval, Kline, Symbol};
use mdbus_store::testing::scratch_db;
use mdbus_store::Store;

/// Rows per `write_snapshot` while filling the database.
const BATCH: usize = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args.get(1).map_or("sqlite", String::as_str);
    let symbols: usize = args.get(2).map_or(10_000, |s| s.parse().unwrap());
    let reads: usize = args.get(3).map_or(5, |s| s.parse().unwrap());
    // A fourth argument (SQLite): a folder to keep, filled once and read by later runs (profiling).
    let keep = args.get(4).map(std::path::PathBuf::from);
    let dir =
        keep.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("mdbus-read-open-{}", std::process::id())));
    let fill = keep.is_none() || !dir.join("klines.db").exists();
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (url, server) = scratch_db(target, &dir).unwrap();

    // One closed and one open K-line per symbol and interval, prices and volumes of real width.
    let t0 = 1_700_000_000_000_i64;
    let mut rows = Vec::with_capacity(symbols * 16 * 2);
    for s in 0..symbols {
        let sym = Symbol::new(&format!("SYM{s:05}USDT")).unwrap();
        for (i, &interval) in Interval::ALL.iter().enumerate() {
            // The K-line open at t0 and the one closed just before it.
            let open_time = interval.open_time(t0);
            let previous = interval.open_time(open_time - 1);
            for (closed, t) in [(true, previous), (false, open_time)] {
                let n = (s * 16 + i) as i64;
                let mut k = Kline::empty(interval, t, sym, 0, 2, 8, 8_723_201 + n);
                k.closed = closed;
                k.high = k.open + 1234;
                k.low = k.open - 987;
                k.close = k.open + 55;
                k.first_trade_id = 1_000_000_000 + n * 100;
                k.last_trade_id = k.first_trade_id + 99;
                k.trade_count = 100;
                k.volume = 123_456_789 * i128::from(n + 1);
                k.quote_volume = k.volume * 8_723_201;
                k.taker_buy_volume = k.volume / 3;
                k.taker_buy_quote_volume = k.quote_volume / 3;
                rows.push(k);
            }
        }
    }
    let open = rows.iter().filter(|k| !k.closed).count();
    if fill {
        let mut store = Store::open(&url).unwrap();
        let t = Instant::now();
        for (seq, chunk) in rows.chunks(BATCH).enumerate() {
            store.write_snapshot("bench", seq as u64 + 1, seq as u64 + 1, chunk).unwrap();
        }
        println!("{url}: wrote {} rows ({open} open) in {:.2} s", rows.len(), t.elapsed().as_secs_f64());
    }

    let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reads {
        let cpu0 = thread_cpu_ms();
        let t = Instant::now();
        let mut store = Store::open(&url).unwrap();
        let opened = t.elapsed().as_secs_f64() * 1e3;
        let committed = store.committed("bench").unwrap();
        let got = store.open_klines().unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(committed.is_some());
        assert_eq!(got.len(), open);
        let cpu = thread_cpu_ms() - cpu0;
        println!(
            "open+committed+open_klines: {} rows in {ms:.1} ms (open {opened:.1} ms, this thread on CPU {cpu:.1} ms)",
            got.len()
        );
        best = best.min(ms);
        best_cpu = best_cpu.min(cpu);
        drop(store);
    }
    let want: Vec<Kline> = {
        let mut v: Vec<Kline> = rows.iter().filter(|k| !k.closed).copied().collect();
        v.sort_by_key(|k| (k.symbol, k.interval().unwrap().as_str(), k.open_time));
        v
    };
    let got = Store::open(&url).unwrap().open_klines().unwrap();
    assert_eq!(got, want, "open_klines round trip");
    println!("{url}: best of {reads}: {best:.1} ms for {open} open K-lines (this thread on CPU: {best_cpu:.1} ms)");
    drop(server);
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Time this thread has run (Linux; NaN elsewhere): what the read costs the caller, apart from
/// waiting for a server.
fn thread_cpu_ms() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e6)
}
