//! The crash matrix of the delayed-batch path, on real processes: a broker replaying a Binance
//! dataset in event time (so every run covers the same K-lines), `mdbus batch` writing to SQLite
//! or a real PostgreSQL server, and faults injected mid-stream. At the end the database must
//! equal the oracle: every closed K-line of every interval, recomputed independently from the
//! broker's `--record` CSV of the same run, present once with the same values, none missing.
//! The recording itself must hold every trade of the dataset exactly once (nothing lost or
//! ingested twice across a broker restart).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::oracle::{check_klines, read_csv, read_dataset, render_e8, CsvTrade, INTERVALS};
use common::{data_root, unique_bus, Proc, TempDir, EXE};
use mdbus_schema::{Fixed, Interval, Kline};
use mdbus_store::{DbUrl, Store};
use serde_json::{json, Value};

/// 2024-02-29T23:56:00Z: ten minutes of trading cross midnight, the month's end and the leap day,
/// so K-lines of 1s up to 1M close.
const START_MS: i64 = 1_709_250_960_000;
const SYMBOLS: [&str; 3] = ["BTCUSDT", "ETHUSDT", "SOLUSDT"];

/// Writes a dataset of `n` trades per symbol over ten minutes (ids, prices and times rising
/// irregularly; some seconds without trades, so empty K-lines occur).
fn write_dataset(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (s, sym) in SYMBOLS.iter().enumerate() {
        let mut out = String::new();
        let mut price: i64 = [6_123_456, 345_678, 12_345][s]; // cents
        let mut t = START_MS + s as i64 * 7;
        let span = 600_000 / n as i64;
        for i in 0..n {
            t += 1 + (next() % (2 * span as u64)) as i64;
            if next() % 50 == 0 {
                t += 2_500; // a quiet gap: empty 1s K-lines
            }
            price = (price + (next() % 21) as i64 - 10).max(1);
            let qty = 1 + (next() % 5000) as i64; // thousandths
            let quote = i128::from(price) * i128::from(qty); // 1e-5
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},True",
                1000 + i,
                Fixed { mantissa: i128::from(price), scale: 2 },
                Fixed { mantissa: i128::from(qty), scale: 3 },
                Fixed { mantissa: quote, scale: 5 },
                t,
                if next() % 2 == 0 { "True" } else { "False" },
            );
        }
        std::fs::write(dir.join(format!("{sym}-trades.csv")), out).unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One run: a dataset, a database, a bus.
struct Run {
    dir: TempDir,
    bus: String,
    db: String,
    metrics: u16,
    speed: String,
    /// Extra config for both processes.
    config: Option<String>,
}

impl Run {
    fn new(tag: &str, db: Option<String>, trades_per_symbol: usize, speed: f64) -> Run {
        let dir = TempDir::new(tag);
        write_dataset(&dir.0.join("data"), trades_per_symbol);
        let db = db.unwrap_or_else(|| format!("sqlite:{}", dir.0.join("klines.db").display()));
        Run { bus: unique_bus(tag), dir, db, metrics: free_port(), speed: speed.to_string(), config: None }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.0.join(p)
    }

    /// Starts a process with stderr to `<name>.log` (appended: a restart keeps the history).
    fn spawn(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path(&format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(EXE);
        cmd.args(["--bus", &self.bus]);
        if let Some(c) = &self.config {
            cmd.args(["--config", c]);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("MDBUS_DATA_DIR", data_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc { child: cmd.spawn().unwrap(), name: name.to_owned() }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    fn broker(&self) -> Proc {
        let data = format!("csv:{}", self.path("data").display());
        let rec = self.path("record").display().to_string();
        let metrics = format!("127.0.0.1:{}", self.metrics);
        self.spawn(
            "broker",
            &[
                "broker",
                "--source",
                &data,
                "--clock",
                "event",
                "--speed",
                &self.speed,
                "--db",
                &self.db,
                "--record",
                &rec,
                "--metrics",
                &metrics,
                "--snapshot-interval-ms",
                "50",
            ],
            &[],
        )
    }

    fn batch(&self, env: &[(&str, &str)]) -> Proc {
        let mut p = self.spawn("batch", &["batch", "--db", &self.db], env);
        let lines = p.lines();
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("batch writer ready");
        assert_eq!(line, "batch writer ready");
        // Keep draining its stdout so that it never blocks on a full pipe.
        std::thread::spawn(move || while lines.recv().is_ok() {});
        p
    }

    /// The broker's metrics by name (first sample of each), or nothing while it is down.
    fn broker_metrics(&self) -> HashMap<String, f64> {
        let addr = format!("127.0.0.1:{}", self.metrics);
        let Ok(samples) = mdbus_metrics::scrape(&addr, Duration::from_secs(2)) else { return HashMap::new() };
        let mut m = HashMap::new();
        for s in samples {
            m.entry(s.name).or_insert(s.value);
        }
        m
    }

    /// Waits until the broker has ingested every trade and the database has committed its last
    /// snapshot (the committed seq is the broker's last seq, nothing pending).
    fn wait_all_committed(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let m = self.broker_metrics();
            let ended = self.log("broker").contains("feed ended");
            let last = m.get("market_last_seq").copied().unwrap_or(-1.0);
            let committed = m.get("snapshot_committed_seq").copied().unwrap_or(-2.0);
            let pending = m.get("snapshot_pending_rows").copied().unwrap_or(-1.0);
            if ended && last == committed && pending == 0.0 {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "not all committed after {limit:?}: ended {ended}, last seq {last}, committed {committed}, pending {pending}\n\
                 broker log:\n{}\nbatch log:\n{}",
                self.log("broker"),
                self.log("batch")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The database equals the oracle computed from the recording; the recording equals the
    /// dataset. Returns the number of closed K-lines checked.
    fn check(&self) -> usize {
        let data = read_dataset(&self.path("data"));
        let rec = read_dataset(&self.path("record"));
        for sym in SYMBOLS {
            let ids = |t: &[CsvTrade]| t.iter().map(|t| t.id).collect::<Vec<_>>();
            let (got, want) = (ids(&rec[sym]), ids(&data[sym]));
            if got != want {
                let missing: Vec<_> = want.iter().filter(|i| !got.contains(i)).collect();
                let mut seen = BTreeSet::new();
                let twice: Vec<_> = got.iter().filter(|i| !seen.insert(**i)).collect();
                panic!(
                    "{sym}: the recording must hold every trade exactly once; missing {missing:?}, twice {twice:?}\n\
                     broker log:\n{}",
                    self.log("broker")
                );
            }
        }
        let url: DbUrl = self.db.parse().unwrap();
        let mut store = Store::open(&url).unwrap();
        let mut lines = Vec::new();
        for sym in SYMBOLS {
            for i in INTERVALS {
                let iv: Interval = i.parse().unwrap();
                let rows = store.klines(sym, iv, Some(0), None, 1000).unwrap();
                assert!(rows.len() < 1000, "more rows than one query returns");
                let mut opens = BTreeSet::new();
                for k in rows {
                    assert!(opens.insert(k.open_time), "{sym} {i} {}: twice", k.open_time);
                    if k.closed {
                        lines.push(json!({ "kind": "kline", "k": kline_json(&k) }));
                    }
                }
            }
        }
        let (checked, intervals) = check_klines(&lines, &rec);
        for i in ["1s", "1m", "5m", "1h", "1d", "1M"] {
            assert!(intervals.contains(i), "no closed {i} K-line checked: {intervals:?}");
        }
        checked
    }
}

/// A stored K-line as Binance's kline object (the oracle's field names and decimal form).
fn kline_json(k: &Kline) -> Value {
    let e8 = |v: i128, scale: u8| {
        // The oracle's 8-decimal form; every value here has at most 8 decimals.
        let f = Fixed { mantissa: v, scale };
        let s = f.to_plain_string();
        render_e8(common::oracle::e8(&s))
    };
    let (ps, qs) = (k.price_scale, k.qty_scale);
    json!({
        "t": k.open_time, "T": k.close_time, "s": k.symbol.as_str(), "i": k.interval().unwrap().to_string(),
        "f": k.first_trade_id, "L": k.last_trade_id, "n": k.trade_count, "x": k.closed, "B": "0",
        "o": e8(k.open.into(), ps), "c": e8(k.close.into(), ps), "h": e8(k.high.into(), ps), "l": e8(k.low.into(), ps),
        "v": e8(k.volume, qs), "q": e8(k.quote_volume, ps + qs),
        "V": e8(k.taker_buy_volume, qs), "Q": e8(k.taker_buy_quote_volume, ps + qs),
    })
}

fn committed_snapshots(run: &Run) -> u64 {
    let url: DbUrl = run.db.parse().unwrap();
    Store::open(&url).ok().and_then(|mut s| s.committed(&run.bus).ok().flatten()).map_or(0, |c| c.snapshot_id)
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn batch_writer_killed_between_commit_and_ack_leaves_harmless_duplicates_and_nothing_missing() {
    let run = Run::new("bkack", None, 1500, 120.0);
    // The first writer dies (abort, like kill -9) right after its 3rd commit, before the ack.
    let first = run.batch(&[("MDBUS_BATCH_CRASH_AFTER_COMMIT", "3")]);
    let broker = run.broker();
    let (ok, _) = first.wait(Duration::from_secs(60));
    assert!(!ok, "the first writer died");
    assert!(run.log("batch").contains("dying between the commit and the ack"));
    assert_eq!(committed_snapshots(&run), 3, "its 3rd snapshot was committed, never acked");
    // The broker never got that ack: it re-sends the rows merged into a later snapshot.
    let second = run.batch(&[]);
    run.wait_all_committed(Duration::from_secs(90));
    let m = run.broker_metrics();
    assert!(m["snapshot_resends_total"] >= 1.0, "the unacked snapshot was re-sent: {m:?}");
    let checked = run.check();
    assert!(checked > 1000, "{checked} K-lines checked");
    drop((broker, second));
}

#[test]
fn batch_writer_killed_mid_stream_and_restarted_catches_up_to_the_oracle() {
    let run = Run::new("bkill", None, 1500, 120.0);
    let first = run.batch(&[]);
    let broker = run.broker();
    wait_until(Duration::from_secs(30), "a few commits", || committed_snapshots(&run) >= 3);
    first.signal(rustix::process::Signal::KILL);
    let _ = first.wait(Duration::from_secs(10));
    // Trading goes on without a writer; the broker keeps the unacked rows.
    std::thread::sleep(Duration::from_millis(800));
    let m = run.broker_metrics();
    assert!(m.get("snapshot_pending_rows").copied().unwrap_or(0.0) > 0.0, "rows wait for an ack: {m:?}");
    let second = run.batch(&[]);
    run.wait_all_committed(Duration::from_secs(90));
    run.check();
    drop((broker, second));
}

#[test]
fn broker_killed_mid_interval_restarts_from_the_database_and_the_wal() {
    let run = Run::new("brkill", None, 1500, 80.0);
    let batch = run.batch(&[]);
    let broker = run.broker();
    wait_until(Duration::from_secs(30), "a few commits", || committed_snapshots(&run) >= 5);
    std::thread::sleep(Duration::from_millis(300));
    broker.signal(rustix::process::Signal::KILL);
    let _ = broker.wait(Duration::from_secs(10));
    let before = committed_snapshots(&run);
    assert!(!run.log("broker").contains("feed ended"), "killed mid-stream");
    let broker = run.broker();
    run.wait_all_committed(Duration::from_secs(90));
    let m = run.broker_metrics();
    assert!(m["broker_restored_open_klines"] >= 16.0, "open K-lines came from the database: {m:?}");
    assert!(m["broker_restored_trades"] >= 1.0, "trades after the committed snapshot came from the WAL: {m:?}");
    let log = run.log("broker");
    assert!(log.contains("restart state read from the database"), "{log}");
    assert!(log.contains("state restored from the last committed snapshot and the WAL"), "{log}");
    assert!(log.contains("source resumed after the trades already aggregated"), "{log}");
    assert!(committed_snapshots(&run) > before);
    run.check();
    drop((broker, batch));
}

#[test]
fn postgres_stopped_mid_stream_then_started_again_loses_nothing() {
    let pg_dir = TempDir::new("pg");
    let mut pg = mdbus_store::testing::PgServer::start(&pg_dir.0.join("pg")).unwrap_or_else(|e| panic!("{e}"));
    let run = Run::new("pgout", Some(pg.url()), 1500, 60.0);
    let batch = run.batch(&[]);
    let broker = run.broker();
    wait_until(Duration::from_secs(30), "a few commits", || committed_snapshots(&run) >= 3);
    pg.stop().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let m = run.broker_metrics();
    assert!(
        m.get("snapshot_pending_rows").copied().unwrap_or(0.0) > 0.0,
        "rows wait while the database is down: {m:?}"
    );
    pg.start_again().unwrap();
    run.wait_all_committed(Duration::from_secs(90));
    let log = run.log("batch");
    assert!(log.contains("database write failed"), "{log}");
    assert!(log.contains("database available again"), "{log}");
    run.check();
    drop((broker, batch));
}

#[test]
fn broker_killed_mid_interval_restarts_from_postgres() {
    let pg_dir = TempDir::new("pg2");
    let pg = mdbus_store::testing::PgServer::start(&pg_dir.0.join("pg")).unwrap_or_else(|e| panic!("{e}"));
    let run = Run::new("pgbrk", Some(pg.url()), 1500, 80.0);
    let batch = run.batch(&[]);
    let broker = run.broker();
    wait_until(Duration::from_secs(30), "a few commits", || committed_snapshots(&run) >= 5);
    broker.signal(rustix::process::Signal::KILL);
    let _ = broker.wait(Duration::from_secs(10));
    let broker = run.broker();
    run.wait_all_committed(Duration::from_secs(90));
    assert!(run.log("broker").contains("state restored from the last committed snapshot and the WAL"));
    assert!(run.broker_metrics()["broker_restored_open_klines"] >= 16.0);
    run.check();
    drop((broker, batch));
    let _ = read_csv; // (the oracle's CSV reader is used through read_dataset)
}

#[test]
fn past_the_memory_bound_closed_klines_reach_the_database_through_the_wal() {
    let mut run = Run::new("bound", None, 1500, 120.0);
    // At most 40 closed K-lines wait in the broker's memory for an ack.
    let cfg = run.path("bound.toml");
    std::fs::write(&cfg, "[batch]\nmax_pending_closed = 40\n").unwrap();
    run.config = Some(cfg.display().to_string());
    let broker = run.broker();
    // No writer for a while: far more than 40 K-lines close.
    std::thread::sleep(Duration::from_millis(1500));
    let m = run.broker_metrics();
    assert!(m["snapshot_pending_rows"] > 0.0, "{m:?}");
    assert!(run.log("broker").contains("snapshot backlog full"), "{}", run.log("broker"));
    let batch = run.batch(&[]);
    run.wait_all_committed(Duration::from_secs(90));
    assert!(run.log("batch").contains("closed K-lines read from the WAL"), "{}", run.log("batch"));
    run.check();
    drop((broker, batch));
}

#[test]
fn a_broker_whose_database_stays_unreachable_exits_with_an_error_instead_of_starting_empty() {
    // The restart state is read on a thread of its own while the broker sets itself up; a read
    // that never succeeds must still stop the broker (an empty start would re-close K-lines the
    // database already holds), with the database named.
    let tmp = TempDir::new("batch-unreachable");
    let bus = unique_bus("bunreach");
    let cfg = tmp.0.join("cfg.toml");
    std::fs::write(&cfg, "[batch]\nrestore_timeout_s = 0.5\n").unwrap();
    let url = format!("postgres://mdbus@127.0.0.1:{}/none", free_port());
    let wal = tmp.0.join("wal");
    let broker = Proc::spawn(
        "broker",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--bus",
            &bus,
            "broker",
            "--source",
            "synthetic",
            "--symbols",
            "3",
            "--db",
            &url,
            "--wal",
            wal.to_str().unwrap(),
        ],
    );
    let (ok, log) = broker.wait(Duration::from_secs(60));
    assert!(!ok, "the broker must fail: {log}");
    assert!(log.contains("database unavailable at start-up; retrying"), "{log}");
    assert!(log.contains("reading the restart state from") && log.contains(&url), "{log}");
    assert!(!log.contains("state restored") && !log.contains("trades="), "it never ran: {log}");
}
