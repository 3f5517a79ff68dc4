//! Rows per second through `Store::write_snapshot`: N new K-lines in snapshots of B rows, then the
//! same rows again as updates (open → closed), then one `open_klines` and one `klines` query.
//!
//! ```sh
//! cargo run --release -p mdbus-store --example write_rate -- sqlite 100000 10000
//! cargo run --release -p mdbus-store --example write_rate -- postgres 100000 10000   # a throwaway server
//! cargo run --release -p mdbus-store --example write_rate -- postgres://u@host/db 100000 10000
//! ```

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use mdbus_schema::{Interval, Kline, Symbol};
use mdbus_store::testing::scratch_db;
use mdbus_store::Store;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args.get(1).map_or("sqlite", String::as_str);
    let n: usize = args.get(2).map_or(100_000, |s| s.parse().unwrap());
    let batch: usize = args.get(3).map_or(10_000, |s| s.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("mdbus-write-rate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (url, server) = scratch_db(target, &dir).unwrap();
    let mut store = Store::open(&url).unwrap();
    let symbols: Vec<Symbol> = (0..100).map(|i| Symbol::new(&format!("SYM{i:04}USDT")).unwrap()).collect();
    let mut rows: Vec<Kline> = (0..n)
        .map(|i| {
            let interval = Interval::ALL[i % 16];
            let sym = symbols[(i / 16) % symbols.len()];
            let open_time = 1_700_000_000_000 + (i / 1600) as i64 * 1000;
            let mut k = Kline::empty(interval, open_time, sym, 0, 2, 8, 8_723_201 + i as i64);
            k.trade_count = 17;
            k.volume = 123_456_789 * i as i128;
            k.quote_volume = k.volume * 8_723_201;
            k
        })
        .collect();
    let before = store.count().unwrap();
    let mut seq = 0;
    let mut run = |store: &mut Store, rows: &[Kline], what: &str| {
        let t = Instant::now();
        for chunk in rows.chunks(batch) {
            seq += 1;
            store.write_snapshot("bench", seq, seq, chunk).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{url} {what}: {} rows in {s:.2} s = {:.0} rows/s (snapshots of {batch})",
            rows.len(),
            rows.len() as f64 / s
        );
    };
    run(&mut store, &rows, "insert");
    for k in &mut rows {
        k.closed = true;
        k.close += 1;
    }
    run(&mut store, &rows, "update");
    assert_eq!(store.count().unwrap(), before + n as u64);
    let t = Instant::now();
    let open = store.open_klines().unwrap().len();
    println!("open_klines: {open} rows in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    let got = store.klines(symbols[0].as_str(), Interval::S1, None, None, 1000).unwrap().len();
    println!("klines(limit 1000): {got} rows in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    drop(store);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
