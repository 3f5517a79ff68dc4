//! The delayed-batch path, each part against a baseline measured in the same run:
//!
//! - snapshot writes: snapshots of `symbols × 16` K-line rows (the first inserts them, the next
//!   ones update every row, as a busy market does) written with [`Store::write_snapshot`] to
//!   SQLite and to a local PostgreSQL server (started from its binaries in a scratch folder;
//!   skipped with a note where there are none). Per-snapshot transaction time (p50/p99) and
//!   rows/s; baseline: the same rows as CSV text appended to a file with one fsync per snapshot.
//! - restart: a broker with `symbols` symbols and durable K-lines (the batch writer on SQLite) is
//!   `kill -9`ed, then started again: process start → first new trade frame at a reader, with the
//!   open K-lines read from the database and the WAL after the committed snapshot replayed;
//!   baseline: the same broker started fresh (no database, empty log).

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mdbus_schema::{Fixed, FrameKind, Interval, Kline, Symbol};
use mdbus_store::{DbUrl, Store};
use mdbus_subscribers::{Reader, ReaderOptions, WaitMode};

use crate::systembench::{err, spawn_broker, stop};
use crate::{BenchOptions, BenchRunError, Row};

const T0: i64 = 1_709_251_200_000;

fn rows_for(symbols: usize, round: u64) -> Vec<Kline> {
    let mut rows = Vec::with_capacity(symbols * Interval::COUNT);
    for s in 0..symbols {
        let name = format!("S{s:06}USDT");
        let Ok(sym) = Symbol::new(&name) else { continue };
        for iv in Interval::ALL {
            let mut k = Kline::empty(iv, iv.open_time(T0), sym, s as u32, 8, 8, 6_123_456_000_000);
            k.trade_count = round + 1;
            k.first_trade_id = 1;
            k.last_trade_id = round as i64 + 1;
            k.close += round as i64;
            k.high = k.close + 100;
            k.volume = i128::from(round + 1) * 1_234_567;
            k.quote_volume = k.volume * 61_234_560_000_000;
            rows.push(k);
        }
    }
    rows
}

/// p50 and p99 of `v` (sorted in place).
fn pct(v: &mut [Duration]) -> (u64, u64, u64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_nanos() as u64;
    (at(0.5), at(0.99), at(1.0))
}

fn write_row(name: &str, kind: &str, rows: u64, times: &mut [Duration]) -> Row {
    let total: Duration = times.iter().sum();
    let mut r = Row::rate(name, kind, rows, total, 0);
    let (p50, p99, max) = pct(times);
    (r.p50_ns, r.p99_ns, r.p999_ns, r.max_ns) = (p50, p99, p99, max);
    r
}

/// Snapshot write rates: the file baseline, SQLite, PostgreSQL.
fn writes(o: &BenchOptions, tmp: &Path) -> Result<Vec<Row>, BenchRunError> {
    let symbols = if o.quick { 1_000 } else { 10_000 };
    let snapshots: u64 = if o.quick { 3 } else { 6 };
    let snaps: Vec<Vec<Kline>> = (0..snapshots).map(|i| rows_for(symbols, i)).collect();
    let per = snaps[0].len() as u64;
    let mut out = Vec::new();

    // Baseline: the rows as text, appended, one fsync per snapshot.
    let path = tmp.join("baseline.csv");
    let mut f = std::fs::File::create(&path).map_err(|e| err("batch", e))?;
    let mut times = Vec::new();
    let mut line = String::new();
    for snap in &snaps {
        let t = Instant::now();
        line.clear();
        for k in snap {
            use std::fmt::Write as _;
            let p = |m: i64| Fixed { mantissa: i128::from(m), scale: k.price_scale };
            let _ = writeln!(
                line,
                "{},{},{},{},{},{},{},{},{},{}",
                k.symbol.as_str(),
                k.interval,
                k.open_time,
                p(k.open),
                p(k.high),
                p(k.low),
                p(k.close),
                Fixed { mantissa: k.volume, scale: k.qty_scale },
                Fixed { mantissa: k.quote_volume, scale: k.price_scale + k.qty_scale },
                k.trade_count
            );
        }
        f.write_all(line.as_bytes()).map_err(|e| err("batch", e))?;
        f.sync_data().map_err(|e| err("batch", e))?;
        times.push(t.elapsed());
    }
    out.push(write_row("file append + fsync, same rows as text (baseline)", "file", per * snapshots, &mut times));

    let store_rows = |name: &str, kind: &str, url: &DbUrl| -> Result<Row, BenchRunError> {
        let mut store = Store::open(url).map_err(|e| err(kind, e))?;
        let mut times = Vec::new();
        for (i, snap) in snaps.iter().enumerate() {
            let t = Instant::now();
            store.write_snapshot("bench", i as u64 + 1, i as u64 + 1, snap).map_err(|e| err(kind, e))?;
            times.push(t.elapsed());
        }
        let mut r = write_row(name, kind, per * snapshots, &mut times);
        r.note =
            format!("{snapshots} snapshots of {per} rows ({symbols} symbols × 16); the first inserts, the rest update");
        Ok(r)
    };
    out.push(store_rows(
        "SQLite upsert, one transaction per snapshot (WAL mode, synchronous=FULL)",
        "sqlite",
        &DbUrl::Sqlite(tmp.join("bench.db")),
    )?);
    match mdbus_store::testing::PgServer::start(&tmp.join("pg")) {
        Ok(pg) => {
            let url: DbUrl = pg.url().parse().map_err(|e| err("postgres", e))?;
            out.push(store_rows(
                "PostgreSQL upsert, one transaction per snapshot (local, fsync on)",
                "postgres",
                &url,
            )?);
            drop(pg);
        }
        Err(e) => {
            let mut r = Row::rate("PostgreSQL upsert (skipped)", "postgres", 0, Duration::from_secs(1), 0);
            r.note = format!("skipped: {e}");
            out.push(r);
        }
    }
    let base = out[0].per_second.max(1e-9);
    for r in &mut out {
        r.ratio_vs_baseline = r.per_second / base;
    }
    Ok(out)
}

fn spawn_batch(o: &BenchOptions, bus: &str, db: &str, tmp: &Path) -> Result<Child, BenchRunError> {
    Command::new(&o.exe)
        .args(["batch", "--bus", bus, "--db", db])
        .env("MDBUS_DATA_DIR", tmp)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| BenchRunError::Spawn { what: "batch writer".into(), source })
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let samples = mdbus_metrics::scrape(&format!("127.0.0.1:{port}"), Duration::from_secs(2)).ok()?;
    samples.into_iter().find(|s| s.name == name).map(|s| s.value)
}

/// Process start → first trade frame at a reader. Leaves the broker running.
fn start_and_time(
    o: &BenchOptions,
    bus: &str,
    args: &[&str],
    tmp: &Path,
) -> Result<(Duration, Child, Reader), BenchRunError> {
    let mut reader = Reader::open(bus, "realtime", ReaderOptions::default().kind(FrameKind::Trade).node_name("bench"))
        .map_err(|e| err("reader", e))?;
    let t0 = Instant::now();
    let mut child = spawn_broker(o, bus, args, tmp)?;
    let mut got = false;
    loop {
        if t0.elapsed() > Duration::from_secs(120) {
            stop(&mut child, rustix::process::Signal::KILL);
            return Err(err("restart", "no trade within 120 s"));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(err("restart", format!("the broker exited: {status}")));
        }
        reader.next_batch(WaitMode::Spin(Duration::from_millis(10)), |_| got = true).map_err(|e| err("reader", e))?;
        if got {
            return Ok((t0.elapsed(), child, reader));
        }
    }
}

/// `per_symbol` trades per second per symbol; `baseline`: also time a fresh start.
fn restart(o: &BenchOptions, tmp: &Path, per_symbol: usize, baseline: bool) -> Result<Vec<Row>, BenchRunError> {
    let symbols = if o.quick { 1_000 } else { 10_000 };
    let rate = (symbols * per_symbol).to_string();
    let n = symbols.to_string();
    let bus = format!("benchbatch{}r{per_symbol}", std::process::id());
    let tmp = &tmp.join(format!("restart{per_symbol}"));
    std::fs::create_dir_all(tmp).map_err(|e| err("restart", e))?;
    let db = format!("sqlite:{}", tmp.join("klines.db").display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| err("restart", e))?;
    let metrics = format!("127.0.0.1:{port}");
    let common = ["--source", "synthetic", "--symbols", &n, "--rate", &rate, "--steady", "--metrics", &metrics];

    // Baseline: a fresh start, no database.
    let mut fresh = Duration::ZERO;
    if baseline {
        let fresh_bus = format!("{bus}f");
        let (took, mut child, reader) = start_and_time(o, &fresh_bus, &common, &tmp.join("fresh"))?;
        stop(&mut child, rustix::process::Signal::TERM);
        drop(reader);
        fresh = took;
    }

    // Durable: run until every symbol's K-lines are in the database, kill -9, start again.
    let mut batch = spawn_batch(o, &bus, &db, tmp)?;
    let mut durable: Vec<&str> = common.to_vec();
    durable.extend(["--db", &db]);
    let (_, mut child, reader) = start_and_time(o, &bus, &durable, tmp)?;
    let t = Instant::now();
    loop {
        let commits = metric(port, "snapshot_commits_total").unwrap_or(0.0);
        if commits >= 3.0 && t.elapsed() > Duration::from_secs(if o.quick { 2 } else { 5 }) {
            break;
        }
        if t.elapsed() > Duration::from_secs(180) {
            stop(&mut child, rustix::process::Signal::KILL);
            stop(&mut batch, rustix::process::Signal::TERM);
            return Err(err("restart", "snapshots were not committed within 180 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(&mut child, rustix::process::Signal::KILL);
    drop(reader);
    let (took, mut child, reader) = start_and_time(o, &bus, &durable, tmp)?;
    let restored = metric(port, "broker_restored_open_klines").unwrap_or(0.0);
    let replayed = metric(port, "broker_restored_trades").unwrap_or(0.0);
    let restore_s = metric(port, "broker_restore_seconds").unwrap_or(0.0);
    stop(&mut child, rustix::process::Signal::TERM);
    stop(&mut batch, rustix::process::Signal::TERM);
    drop(reader);

    let mut rows = Vec::new();
    if baseline {
        let mut b =
            Row::rate(&format!("broker start, {symbols} symbols, no database (baseline)"), "broker", 1, fresh, 0);
        (b.p50_ns, b.per_second) = (fresh.as_nanos() as u64, 0.0);
        rows.push(b);
    }
    let name = format!(
        "broker restart after kill -9, {symbols} symbols at {} trades/s, from the database + WAL",
        symbols * per_symbol
    );
    let mut x = Row::rate(&name, "broker", 1, took, 0);
    (x.p50_ns, x.per_second) = (took.as_nanos() as u64, 0.0);
    x.note = format!(
        "{restored:.0} open K-lines read from SQLite, {replayed:.0} trades replayed from the WAL; rebuilding took {:.0} ms",
        restore_s * 1e3
    );
    rows.push(x);
    Ok(rows)
}

pub fn run(o: &BenchOptions, tmp: &Path) -> Result<Vec<Row>, BenchRunError> {
    let mut rows = writes(o, tmp)?;
    // One trade per symbol per second, then five.
    rows.extend(restart(o, tmp, 1, true)?);
    rows.extend(restart(o, tmp, 5, false)?);
    let n = rows.len();
    let base = rows[n - 3].p50_ns.max(1) as f64;
    for r in &mut rows[n - 2..] {
        r.ratio_vs_baseline = r.p50_ns as f64 / base;
    }
    Ok(rows)
}
