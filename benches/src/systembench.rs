//! Whole-broker scenarios, each against a baseline measured in the same run:
//!
//! - `broker`: trades/s from the synthetic feed through aggregation (all 16 intervals), publish
//!   and the WAL (`interval:10` durability), first data frame → "feed ended" heartbeat as a reader
//!   sees them; baselines: the aggregation alone on one thread in this process, and the same
//!   broker without a WAL.
//! - `memory`: the broker's resident memory once 10 000 symbols × 16 intervals are live, against
//!   the same broker with 10 symbols.
//! - `recovery`: `kill -9` of a broker whose WAL holds 1 GiB, then a new broker on the same log:
//!   process start → first new data frame at a reader; baseline: the same start on an empty log.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mdbus_publisher::aggregator::{Aggregator, AggregatorConfig};
use mdbus_publisher::synthetic::{symbol_names, SyntheticConfig, SyntheticFeed};
use mdbus_schema::{FeedState, FrameKind};
use mdbus_subscribers::{Reader, ReaderOptions, WaitMode};

use crate::{BenchOptions, BenchRunError, Row};

pub(crate) fn err(what: &str, e: impl ToString) -> BenchRunError {
    BenchRunError::Peer { what: what.into(), detail: e.to_string() }
}

const START: &str = "2021-03-01T00:00:00Z";
const START_US: i64 = 1_614_556_800_000_000;

pub(crate) fn spawn_broker(o: &BenchOptions, bus: &str, args: &[&str], tmp: &Path) -> Result<Child, BenchRunError> {
    let mut cmd = Command::new(&o.exe);
    cmd.args(["broker", "--bus", bus, "--wait-subscribers", "1"]);
    if o.pin {
        // The ingest/publish thread, which aggregates too (the default, 0 workers); the broker's
        // other threads (the log's) and the reader are left to the scheduler.
        cmd.args(["--core", "0"]);
    }
    cmd.args(args)
        .env("MDBUS_DATA_DIR", tmp)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.spawn().map_err(|source| BenchRunError::Spawn { what: "broker".into(), source })
}

pub(crate) fn stop(child: &mut Child, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
    let _ = child.wait();
}

/// What a reader saw of a broker run to the end of its feed.
struct Run {
    /// First data frame → the heartbeat saying the feed ended.
    elapsed: Duration,
    trades: u64,
    klines: u64,
    /// `at_end`'s result, taken while the broker still runs.
    at_end: u64,
}

/// Runs a broker with `args` until its feed ends; `at_end(pid)` is called before it is stopped.
fn run_to_end(
    o: &BenchOptions,
    tag: &str,
    args: &[&str],
    tmp: &Path,
    at_end: impl FnOnce(u32) -> u64,
) -> Result<Run, BenchRunError> {
    let bus = format!("benchsys{}{tag}", std::process::id());
    let mut reader =
        Reader::open(&bus, "realtime", ReaderOptions::default().node_name("bench")).map_err(|e| err("reader", e))?;
    let mut child = spawn_broker(o, &bus, args, tmp)?;
    let mut first: Option<Instant> = None;
    let (mut trades, mut klines) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(600);
    let result = loop {
        if Instant::now() > deadline {
            break Err(err(tag, "the feed did not end within 600 s"));
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(err(tag, format!("the broker exited: {status}")));
        }
        // The reader drains what is queued, then sleeps 0.5 ms: a reader that spins or is woken
        // for every sample would take its CPU from the broker on two cores. The stream queues 256
        // samples (~7 ms at 3 M trades/s), far more than a nap; whatever the reader still misses
        // (lagging a faster stream) shows in `lost`.
        match reader.next_batch(WaitMode::Poll, |f| {
            match f.kind() {
                FrameKind::Trade => trades += 1,
                FrameKind::Kline => klines += 1,
                _ => return,
            }
            if first.is_none() {
                first = Some(Instant::now());
            }
        }) {
            Ok(0) => std::thread::sleep(Duration::from_micros(500)),
            Ok(_) => {}
            Err(e) => break Err(err("reader", e)),
        }
        if first.is_some() && reader.feed_state() == FeedState::Ended {
            let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
            break Ok(Run { elapsed, trades, klines, at_end: at_end(child.id()) });
        }
    };
    stop(&mut child, rustix::process::Signal::TERM);
    result
}

fn synthetic_args(symbols: usize, rate: f64, trades: u64) -> Vec<String> {
    [
        "--source",
        "synthetic",
        "--symbols",
        &symbols.to_string(),
        "--seed",
        "7",
        "--rate",
        &rate.to_string(),
        "--steady",
        "--start",
        START,
        "--speed",
        "0",
        "--max-trades",
        &trades.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn broker(o: &BenchOptions, tmp: &Path) -> Result<Vec<Row>, BenchRunError> {
    let n: u64 = o.count.unwrap_or(if o.quick { 300_000 } else { 3_000_000 });
    let symbols = 100;
    let rate = 100_000.0;

    // Baseline: the aggregation alone, trades generated beforehand, one thread.
    let cfg = SyntheticConfig {
        seed: 7,
        symbols: symbol_names(symbols),
        rate,
        start_us: START_US,
        max_trades: Some(n),
        steady: true,
    };
    let mut feed = SyntheticFeed::new(&cfg).map_err(|e| err("synthetic", e))?;
    let trades: Vec<_> = std::iter::from_fn(|| feed.next_trade()).collect();
    let mut agg = Aggregator::new(&feed.specs(), AggregatorConfig::default());
    let mut sink = 0u64;
    let t0 = Instant::now();
    // As the broker's worker does at full load: a clock tick and one emission of every changed
    // K-line per round of `MAX_UNFLUSHED` trades.
    let round = mdbus_publisher::engine::MAX_UNFLUSHED as usize;
    for (i, t) in trades.iter().enumerate() {
        let mut emit = |k: &mdbus_schema::Kline| sink = sink.wrapping_add(k.close as u64);
        agg.on_trade(t, &mut emit);
        if (i + 1) % round == 0 {
            agg.on_clock(t.time_ms(), &mut emit);
            agg.drain_updates(&mut emit);
        }
    }
    let alone = t0.elapsed();
    std::hint::black_box(sink);
    let mut rows = vec![Row::rate("aggregation only, one thread, no publish (baseline)", "engine", n, alone, 0)];

    let args = synthetic_args(symbols, rate, n);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let no_wal = {
        let mut a = args.clone();
        a.push("--no-wal");
        run_to_end(o, "nowal", &a, tmp, |_| 0)?
    };
    let wal_dir = tmp.join("wal");
    let wal_dir_s = wal_dir.display().to_string();
    args.extend(["--wal", &wal_dir_s, "--durability", "interval:10"]);
    let with_wal = run_to_end(o, "wal", &args, tmp, |_| 0)?;
    for (name, r) in [("broker end to end, WAL off", &no_wal), ("broker end to end, WAL on (interval:10)", &with_wal)] {
        let mut row = Row::rate(name, "broker", n, r.elapsed, 0);
        row.lost = n.saturating_sub(r.trades);
        row.note = format!(
            "{} of {n} trades seen by a lossy reader, with {:.1} K-line frames per trade",
            r.trades,
            r.klines as f64 / r.trades.max(1) as f64
        );
        rows.push(row);
    }
    // The disk's ceiling for this log: the bytes the broker logged per trade, written plainly in
    // the WAL thread's commit size with the same syncs (every 10 ms).
    let log_bytes: u64 = std::fs::read_dir(&wal_dir)
        .map_err(|e| err("wal dir", e))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let per_trade = log_bytes as f64 / n.max(1) as f64;
    let _ = std::fs::remove_dir_all(&wal_dir);
    let raw_path = tmp.join("raw-log");
    let mut f = std::fs::File::create(&raw_path).map_err(|e| err("raw write", e))?;
    let chunk = vec![0x5au8; 256 << 10];
    let interval = mdbus_wal::Durability::Interval(Duration::from_millis(10));
    let took = crate::walbench::raw_write(&mut f, &chunk, (log_bytes as usize).div_ceil(chunk.len()), interval)
        .map_err(|e| err("raw write", e))?;
    drop(f);
    let _ = std::fs::remove_file(&raw_path);
    let mut ceiling = Row::rate("disk ceiling: same log bytes, plain write (baseline)", "raw", n, took, log_bytes);
    ceiling.note = format!("{per_trade:.0} B of log per trade, written in 256 KiB writes with a sync every 10 ms");
    if let Some(on) = rows.iter_mut().find(|r| r.name.contains("WAL on")) {
        on.note
            .push_str(&format!("; {:.0} % of the disk ceiling", 100.0 * on.per_second / ceiling.per_second.max(1e-9)));
    }
    rows.push(ceiling);

    let base = rows[0].per_second.max(1e-9);
    for r in &mut rows {
        r.ratio_vs_baseline = r.per_second / base;
    }
    Ok(rows)
}

/// VmRSS and VmHWM of `pid`, bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

pub fn memory(o: &BenchOptions, tmp: &Path) -> Result<Vec<Row>, BenchRunError> {
    let big = 10_000usize;
    // Enough trades that every symbol has open K-lines in all 16 intervals.
    let n: u64 = o.count.unwrap_or(if o.quick { 200_000 } else { 1_000_000 });
    let mut rows = Vec::new();
    for (name, symbols) in [("broker, 10 symbols (baseline)", 10usize), ("broker, 10 000 symbols × 16 intervals", big)]
    {
        let args = synthetic_args(symbols, 100_000.0, n);
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        // As the broker runs by default: its write-ahead log on (the log's buffers count too).
        let wal = tmp.join(format!("mem-wal-{symbols}"));
        let wal_s = wal.display().to_string();
        a.extend(["--wal", &wal_s, "--durability", "interval:10"]);
        let mut hwm = 0;
        let r = run_to_end(o, &format!("mem{symbols}"), &a, tmp, |pid| {
            let (now, peak) = rss(pid);
            hwm = peak;
            now
        })?;
        let mut row = Row::rate(name, "broker", symbols as u64, r.elapsed, 0);
        row.per_second = 0.0;
        row.rss_bytes = r.at_end;
        row.note = format!("peak {:.1} MB; {} trades over the symbols", hwm as f64 / 1e6, n);
        rows.push(row);
        let _ = std::fs::remove_dir_all(&wal);
    }
    let base = rows[0].rss_bytes.max(1) as f64;
    for r in &mut rows {
        r.ratio_vs_baseline = r.rss_bytes as f64 / base;
    }
    Ok(rows)
}

fn dir_bytes(dir: &Path) -> (u64, usize) {
    std::fs::read_dir(dir).map_or((0, 0), |d| {
        d.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).fold((0, 0), |(b, n), m| (b + m.len(), n + 1))
    })
}

/// Starts a broker on `wal` and times process start → first data frame at a reader, then stops
/// it with `sig`. Returns the time and the frame's seq.
fn first_frame(
    o: &BenchOptions,
    bus: &str,
    wal: &Path,
    tmp: &Path,
    conf: &Path,
    sig: rustix::process::Signal,
) -> Result<(Duration, u64), BenchRunError> {
    let mut reader = Reader::open(bus, "realtime", ReaderOptions::default().kind(FrameKind::Trade).node_name("bench"))
        .map_err(|e| err("reader", e))?;
    let args = synthetic_args(100, 100_000.0, 1_000_000);
    let wal_s = wal.display().to_string();
    let conf_s = conf.display().to_string();
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--wal", &wal_s, "--durability", "none", "--config", &conf_s]);
    let t0 = Instant::now();
    let mut child = spawn_broker(o, bus, &a, tmp)?;
    let mut seq = None;
    let result = loop {
        if t0.elapsed() > Duration::from_secs(120) {
            break Err(err("recovery", "no frame within 120 s"));
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(err("recovery", format!("the broker exited: {status}")));
        }
        if let Err(e) = reader.next_batch(WaitMode::Spin(Duration::from_millis(10)), |f| {
            if seq.is_none() {
                seq = Some(f.seq());
            }
        }) {
            break Err(err("reader", e));
        }
        if let Some(s) = seq {
            break Ok((t0.elapsed(), s));
        }
    };
    stop(&mut child, sig);
    result
}

pub fn recovery(o: &BenchOptions, tmp: &Path) -> Result<Vec<Row>, BenchRunError> {
    let target: u64 = if o.quick { 64 << 20 } else { 1 << 30 };
    let bus = format!("benchrec{}", std::process::id());
    // Keep the whole log: retention must not trim it below the target.
    let conf = tmp.join("recovery.toml");
    std::fs::write(&conf, "[wal]\nretention_bytes = 17179869184\n").map_err(|e| err("recovery", e))?;
    let conf_s = conf.display().to_string();
    let wal = tmp.join("wal");
    let wal_s = wal.display().to_string();

    // Fill the log, then kill -9 the broker mid-stream: a few MiB past the target, so that the
    // kill does not land in a segment roll (the full segment's fsync stalls the log there, and a
    // kill at that moment would leave a log that ends on a record boundary).
    let args = synthetic_args(100, 1_000_000.0, 1_000_000_000);
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--wal", &wal_s, "--durability", "none", "--config", &conf_s]);
    let reader = Reader::open(&bus, "realtime", ReaderOptions::default().kind(FrameKind::Heartbeat).node_name("bench"))
        .map_err(|e| err("reader", e))?;
    let mut filler = spawn_broker(o, &bus, &a, tmp)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if dir_bytes(&wal).0 >= target + (8 << 20) {
            break;
        }
        if Instant::now() > deadline || matches!(filler.try_wait(), Ok(Some(_))) {
            stop(&mut filler, rustix::process::Signal::KILL);
            return Err(err("recovery", "the log did not reach its size"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(&mut filler, rustix::process::Signal::KILL);
    drop(reader);
    let (bytes, files) = dir_bytes(&wal);
    // What the kill left: the restart must cut a torn tail (the writer's last records half
    // written) before it continues the sequence.
    let (records, problems) = mdbus_wal::check(&wal).map_err(|e| err("recovery: checking the log", e))?;
    let tail = match problems.as_slice() {
        [] => "the kill left whole records only".to_owned(),
        [p] => format!(
            "the kill left an incomplete record ({}) at byte {} of {}",
            p.reason,
            p.offset,
            p.path.file_name().map_or_else(|| p.path.display().to_string(), |n| n.to_string_lossy().into_owned())
        ),
        many => return Err(err("recovery", format!("the killed broker's log is damaged beyond its tail: {many:?}"))),
    };

    let runs = if o.quick { 1 } else { 3 };
    let median = |mut v: Vec<(Duration, u64)>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut fresh = Vec::new();
    let mut restart = Vec::new();
    for i in 0..runs {
        let empty = tmp.join(format!("empty{i}"));
        fresh.push(first_frame(o, &format!("{bus}f{i}"), &empty, tmp, &conf, rustix::process::Signal::TERM)?);
        // Each restart recovers a log whose writer was killed: the restarted broker is killed
        // too, so the next round meets a torn tail again.
        restart.push(first_frame(o, &bus, &wal, tmp, &conf, rustix::process::Signal::KILL)?);
    }
    // Opening a node on the bus removes what the last killed broker left in shared memory.
    drop(Reader::open(&bus, "realtime", ReaderOptions::default().node_name("bench")));
    let (f, _) = median(fresh);
    let (r, seq) = median(restart);
    let mut rows = Vec::new();
    let mut b = Row::rate("broker start on an empty log (baseline)", "broker", 1, f, 0);
    b.p50_ns = f.as_nanos() as u64;
    b.per_second = 0.0;
    rows.push(b);
    let mut x = Row::rate("broker restart after kill -9 on the full log", "broker", 1, r, 0);
    x.p50_ns = r.as_nanos() as u64;
    x.per_second = 0.0;
    x.ratio_vs_baseline = r.as_secs_f64() / f.as_secs_f64().max(1e-9);
    x.note = format!(
        "log {:.0} MiB in {files} files, {records} whole records; {tail}; first new frame seq {seq}",
        bytes as f64 / (1 << 20) as f64
    );
    rows.push(x);
    Ok(rows)
}
