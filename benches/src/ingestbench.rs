//! `mdbus bench ingest`: what it costs to take trades in from outside.
//!
//! - **JSON parse cost** of one exchange message (`aggTrade`, combined-stream form) with our
//!   borrowed, typed parser, against `serde_json::Value` (the generic parse most clients do) on
//!   the same messages in the same run.
//! - **Dataset parse rate**: Binance trades CSV files through `CsvFeed` (trades/s), against
//!   reading the same files line by line without parsing.
//! - **Ingest → published frames**: `mdbus broker --source csv:DIR --speed 0` from the first data
//!   frame to the heartbeat saying the feed ended (each trade publishes the trade and its 16
//!   K-line updates), against the synthetic source with the same trade count in the same run.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mdbus_exchange::wire;
use mdbus_publisher::csvfeed::CsvFeed;
use mdbus_publisher::record::Recorder;
use mdbus_publisher::synthetic::{symbol_names, SyntheticConfig, SyntheticFeed};
use mdbus_schema::{FeedState, Fixed, FrameKind};
use mdbus_subscribers::{Reader, ReaderOptions, WaitMode};

use crate::{BenchOptions, BenchRunError, Row};

fn err(what: &str, e: impl ToString) -> BenchRunError {
    BenchRunError::Peer { what: what.into(), detail: e.to_string() }
}

fn row(name: &str, kind: &str, n: u64, elapsed: Duration) -> Row {
    // The cost of one item, ns, in p50_ns (the table shows it).
    Row { p50_ns: (elapsed.as_secs_f64() * 1e9 / n.max(1) as f64) as u64, ..Row::rate(name, kind, n, elapsed, 0) }
}

const START_US: i64 = 1_614_556_800_000_000; // 2021-03-01T00:00:00Z

fn synthetic(n: u64) -> SyntheticConfig {
    SyntheticConfig {
        seed: 11,
        symbols: symbol_names(10),
        rate: 1000.0,
        start_us: START_US,
        max_trades: Some(n),
        steady: true,
    }
}

/// The dataset: `n` synthetic trades over 10 symbols as Binance trades CSV files.
fn write_dataset(dir: &Path, n: u64) -> Result<(), BenchRunError> {
    let mut feed = SyntheticFeed::new(&synthetic(n)).map_err(|e| err("dataset", e))?;
    let mut rec = Recorder::new(dir).map_err(|e| err("dataset", e))?;
    while let Some(t) = feed.next_trade() {
        rec.write(&t).map_err(|e| err("dataset", e))?;
    }
    rec.flush().map_err(|e| err("dataset", e))
}

fn messages(n: u64) -> Result<Vec<String>, BenchRunError> {
    let mut feed = SyntheticFeed::new(&synthetic(n)).map_err(|e| err("messages", e))?;
    let mut out = Vec::with_capacity(n as usize);
    while let Some(t) = feed.next_trade() {
        let mut p = String::new();
        Fixed::new(i128::from(t.price), t.price_scale).write_binance(&mut p);
        let mut q = String::new();
        Fixed::new(i128::from(t.qty), t.qty_scale).write_binance(&mut q);
        let s = t.symbol.as_str();
        out.push(format!(
            "{{\"stream\":\"{}@aggTrade\",\"data\":{{\"e\":\"aggTrade\",\"E\":{},\"s\":\"{s}\",\"a\":{},\"p\":\"{p}\",\"q\":\"{q}\",\"f\":{},\"l\":{},\"T\":{},\"m\":{},\"M\":true}}}}",
            s.to_ascii_lowercase(),
            t.time_us / 1000,
            t.trade_id,
            t.trade_id,
            t.trade_id,
            t.time_us / 1000,
            t.is_buyer_maker
        ));
    }
    Ok(out)
}

/// Runs a broker on `source` and times first data frame → "feed ended" heartbeat.
fn broker_run(o: &BenchOptions, source_args: &[&str], tmp: &Path, tag: &str) -> Result<Duration, BenchRunError> {
    let bus = format!("benching{}{tag}", std::process::id());
    let mut reader = Reader::open(&bus, "realtime", ReaderOptions::default().kind(FrameKind::Trade).node_name("bench"))
        .map_err(|e| err("ingest reader", e))?;
    let mut cmd = Command::new(&o.exe);
    cmd.args(["broker", "--bus", &bus, "--no-wal", "--wait-subscribers", "1"])
        .args(source_args)
        .env("MDBUS_DATA_DIR", tmp)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|source| BenchRunError::Spawn { what: "broker".into(), source })?;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let result = loop {
        if Instant::now() > deadline {
            break Err(err("ingest", "the feed did not end within 300 s"));
        }
        if let Err(e) = reader.next_batch(WaitMode::Spin(Duration::from_millis(50)), |_| {
            if first.is_none() {
                first = Some(Instant::now());
            }
        }) {
            break Err(err("ingest reader", e));
        }
        if first.is_some() && reader.feed_state() == FeedState::Ended {
            break Ok(first.map_or(Duration::ZERO, |f| f.elapsed()));
        }
    };
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = child.wait();
    result
}

pub fn run(o: &BenchOptions, tmp: &Path) -> Result<Vec<Row>, BenchRunError> {
    let n: u64 = o.count.unwrap_or(if o.quick { 200_000 } else { 1_000_000 });
    let mut rows = Vec::new();

    // JSON parse cost per message.
    let msgs = messages(n)?;
    let t0 = Instant::now();
    let mut generic = 0usize;
    for m in &msgs {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(m) {
            generic += usize::from(v.get("data").is_some());
        }
    }
    let base = t0.elapsed();
    let t0 = Instant::now();
    let mut ours = 0usize;
    for m in &msgs {
        ours += usize::from(matches!(wire::parse(m), Ok(wire::Message::Trade(_))));
    }
    let parsed = t0.elapsed();
    if ours != msgs.len() || generic != msgs.len() {
        return Err(err("parse", format!("parsed {ours} / {generic} of {}", msgs.len())));
    }
    let mut b = row("JSON parse: serde_json::Value (baseline)", "parse", n, base);
    let mut r = row("JSON parse: aggTrade, typed and borrowed", "parse", n, parsed);
    b.ratio_vs_baseline = 1.0;
    r.ratio_vs_baseline = r.per_second / b.per_second.max(1e-9);
    rows.push(b);
    rows.push(r);

    // Dataset files.
    let dir = tmp.join("dataset");
    write_dataset(&dir, n)?;
    let t0 = Instant::now();
    let mut lines = 0u64;
    for e in std::fs::read_dir(&dir).map_err(|e| err("dataset", e))? {
        let p = e.map_err(|e| err("dataset", e))?.path();
        let f = std::fs::File::open(&p).map_err(|e| err("dataset", e))?;
        lines += std::io::BufReader::with_capacity(256 * 1024, f).lines().count() as u64;
    }
    let raw = t0.elapsed();
    let t0 = Instant::now();
    let mut feed = CsvFeed::open(&dir).map_err(|e| err("csv", e))?;
    let mut got = 0u64;
    while feed.next_trade().is_some() {
        got += 1;
    }
    let csv = t0.elapsed();
    if got != n || lines != n {
        return Err(err("csv", format!("read {got} trades, {lines} lines, of {n}")));
    }
    let b = row("dataset: read lines, no parsing (baseline)", "csv", n, raw);
    let mut r = row("dataset: CsvFeed, parsed and merged in time order", "csv", n, csv);
    r.ratio_vs_baseline = r.per_second / b.per_second.max(1e-9);
    rows.push(b);
    rows.push(r);

    // End to end through the broker.
    let source = format!("csv:{}", dir.display());
    let synth = broker_run(
        o,
        &[
            "--source",
            "synthetic",
            "--symbols",
            "10",
            "--seed",
            "11",
            "--rate",
            "1000",
            "--steady",
            "--start",
            "2021-03-01T00:00:00Z",
            "--speed",
            "0",
            "--max-trades",
            &n.to_string(),
        ],
        tmp,
        "s",
    )?;
    let from_csv = broker_run(o, &["--source", &source, "--speed", "0"], tmp, "c")?;
    let b = row("broker, synthetic source → published (baseline)", "broker", n, synth);
    let mut r = row("broker, csv:DIR source → published", "broker", n, from_csv);
    r.ratio_vs_baseline = r.per_second / b.per_second.max(1e-9);
    rows.push(b);
    rows.push(r);
    Ok(rows)
}
