//! End to end: `mdbus broker` fed by `mdbus mock-exchange` (a Binance-compatible exchange with
//! faults) or by Binance dataset files; every closed K-line checked against an independent oracle
//! computed from the dataset.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::oracle::*;
use common::*;
use serde_json::Value;

const SYMBOLS: &str = "BTCUSDT,ETHUSDT,BNBUSDT";

/// A dataset: 3 symbols, `n` trades across 2021-03-01T00:00Z (so every interval closes),
/// recorded by a synthetic broker in Binance's trades CSV format (µs times).
fn dataset(dir: &Path, n: usize) -> PathBuf {
    let rec = dir.join("data");
    let bus = unique_bus("exgen");
    let p = Proc::spawn(
        "dataset broker",
        &[
            "broker",
            "--bus",
            &bus,
            "--source",
            "synthetic",
            "--seed",
            "7",
            "--symbols",
            "3",
            "--rate",
            "30",
            "--start",
            "2021-02-28T23:58:30Z",
            "--speed",
            "0",
            "--max-trades",
            &n.to_string(),
            "--record",
            rec.to_str().unwrap(),
            "--no-wal",
        ],
    );
    let start = Instant::now();
    loop {
        let lines: usize = std::fs::read_dir(&rec)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().lines().count())
                    .sum()
            })
            .unwrap_or(0);
        if lines >= n {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "dataset not written: {lines} lines");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, err) = p.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    forget_bus(&bus);
    rec
}

/// Reads a tail until `want` trades have arrived.
fn collect_trades(rx: &std::sync::mpsc::Receiver<String>, want: usize, limit: Duration) -> Vec<Value> {
    let mut n = 0;
    collect_until(rx, limit, |v| {
        if v["kind"] == "trade" {
            n += 1;
        }
        n >= want
    })
}

fn deep_config(dir: &Path) -> String {
    let conf = dir.join("deep.toml");
    std::fs::write(&conf, "[bus]\nsubscriber_buffer = 2048\nmax_subscribers = 4\n").unwrap();
    conf.to_str().unwrap().to_owned()
}

fn start_mock(args: &[&str]) -> (Proc, u16) {
    let mut all = vec!["mock-exchange", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Proc::spawn_listening("mock-exchange", &all)
}

/// `mdbus broker` on the mock exchange at `port` (WAL off; it waits for one subscriber).
fn live_broker(conf: &str, bus: &str, port: u16, extra: &[&str]) -> Proc {
    let source = format!("ws:ws://127.0.0.1:{port}");
    let mut args =
        vec!["broker", "--config", conf, "--bus", bus, "--source", &source, "--symbols", SYMBOLS, "--no-wal"];
    args.extend_from_slice(&["--wait-subscribers", "1"]);
    args.extend_from_slice(extra);
    Proc::spawn("broker", &args)
}

/// The JSON line the broker prints at exit for a live source.
fn exchange_report(broker: Proc) -> Value {
    let mut broker = broker;
    let rx = broker.lines();
    let (ok, err) = broker.stop(Duration::from_secs(15));
    assert!(ok, "broker: {err}");
    let line = rx.try_iter().find(|l| l.contains("\"exchange\"")).unwrap_or_else(|| panic!("no report: {err}"));
    serde_json::from_str(&line).unwrap()
}

#[test]
fn klines_from_a_faulty_exchange_equal_the_oracle() {
    let dir = TempDir::new("exfault");
    let n = 6000;
    let data = dataset(&dir.0, n);
    let trades = read_dataset(&data);
    let conf = deep_config(&dir.0);
    // Replayed at 20x (about 10 s): a connection that lives 1 s stalls for 0.6 s (the broker
    // declares it dead after 0.4 s without a message), every connection is dropped abruptly every
    // 2.7 s from here, and the stream carries garbage, duplicates and reordered messages.
    let (mock, port) = start_mock(&[
        "--source",
        &format!("csv:{}", data.display()),
        "--speed",
        "20",
        "--wait-for-client",
        "--stall-every",
        "1",
        "--stall-for",
        "0.6",
        "--garbage-every",
        "97",
        "--duplicate-every",
        "53",
        "--reorder-every",
        "71",
        "--ping-interval",
        "0.1",
    ]);
    let bus = unique_bus("exfault");
    let mut tail = Proc::spawn("tail", &["tail", "--config", &conf, "--bus", &bus, "--kind", "trade,kline"]);
    let rx = tail.lines();
    let broker = live_broker(&conf, &bus, port, &["--clock", "event", "--dead-after", "0.4"]);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dropper = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2700));
                let _ = http_get(port, "/mock/drop", &[]);
            }
        })
    };
    let lines = collect_trades(&rx, n, Duration::from_secs(120));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    dropper.join().unwrap();
    let (_, mock_stats) = http_get(port, "/mock/stats", &[]);
    let mock_stats: Value = serde_json::from_str(&mock_stats).unwrap();
    assert!(mock_stats["dropped"].as_u64().unwrap() >= 2, "{mock_stats}");
    assert!(mock_stats["stalls"].as_u64().unwrap() >= 1, "{mock_stats}");
    let report = exchange_report(broker);
    let (ok, err) = tail.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    assert!(err.contains("gaps 0 (missing 0)"), "the bus itself lost nothing: {err}");
    let _ = mock.stop(Duration::from_secs(10));

    // Every trade once, in order per symbol, field for field.
    let mut pos: HashMap<&str, usize> = HashMap::new();
    for v in lines.iter().filter(|v| v["kind"] == "trade") {
        let s = v["s"].as_str().unwrap();
        let i = pos.entry(s).or_default();
        let t = &trades[s][*i];
        *i += 1;
        assert_eq!((v["t"].as_i64().unwrap(), v["T"].as_i64().unwrap()), (t.id, t.time_ms), "{v}");
        assert_eq!(v["p"].as_str().unwrap(), render_e8(t.price));
        assert_eq!(v["q"].as_str().unwrap(), render_e8(t.qty));
    }
    let (checked, _) = check_klines(&lines, &trades);
    assert!(checked > 500, "only {checked} closed K-lines");
    // The faults happened and were handled.
    let ex = &report["exchange"];
    for (k, min) in [("reconnects", 3), ("backfilled", 1), ("malformed", 10), ("duplicates", 10), ("gaps", 1)] {
        assert!(ex[k].as_u64().unwrap() >= min, "{k}: {report}");
    }
    assert_eq!(ex["trades"], n, "{report}");
    assert_eq!(report["ingress"]["dropped_total"], 0);
    forget_bus(&bus);
}

#[test]
fn a_long_exchange_outage_recovers_by_itself_and_is_visible() {
    let dir = TempDir::new("exout");
    let conf = deep_config(&dir.0);
    let (mock, port) = start_mock(&["--symbols", "3", "--rate", "100", "--ping-interval", "0.2"]);
    let bus = unique_bus("exout");
    let mut tail = Proc::spawn("tail", &["tail", "--config", &conf, "--bus", &bus, "--kind", "trade,heartbeat"]);
    let rx = tail.lines();
    let broker = live_broker(&conf, &bus, port, &["--dead-after", "1"]);
    // Live first.
    collect_trades(&rx, 20, Duration::from_secs(30));
    // The exchange goes away (compressed: 3 s): connections dropped and refused meanwhile.
    let (st, _) = http_get(port, "/mock/outage?secs=3", &[]);
    assert_eq!(st, 200);
    let outage_start = Instant::now();
    let mut saw_down = false;
    let mut after = 0;
    collect_until(&rx, Duration::from_secs(60), |v| {
        if v["kind"] == "heartbeat" && v["feed"] == "down" {
            saw_down = true;
        }
        if v["kind"] == "trade" && outage_start.elapsed() > Duration::from_secs(3) {
            after += 1;
        }
        after >= 20
    });
    let recovered_in = outage_start.elapsed();
    assert!(saw_down, "heartbeats said the feed was down during the outage");
    assert!(recovered_in < Duration::from_secs(3 + 15), "recovered {recovered_in:?} after the outage began");
    let report = exchange_report(broker);
    let ex = &report["exchange"];
    assert!(ex["reconnects"].as_u64().unwrap() >= 1, "{report}");
    assert!(ex["last_outage_ms"].as_u64().unwrap() >= 2500, "outage duration visible: {report}");
    assert_eq!(ex["backfill_failures"], 0, "{report}");
    let (ok, err) = tail.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    let _ = mock.stop(Duration::from_secs(10));
    forget_bus(&bus);
}

/// The broker on `--source csv:DIR` (as fast as possible): all closed K-lines, read by a tail.
fn csv_run(data: &Path, conf: &str, n: usize) -> (Vec<Value>, String) {
    let bus = unique_bus("excsv");
    let mut tail = Proc::spawn("tail", &["tail", "--config", conf, "--bus", &bus, "--kind", "trade,kline"]);
    let rx = tail.lines();
    let broker = Proc::spawn(
        "broker",
        &[
            "broker",
            "--config",
            conf,
            "--bus",
            &bus,
            "--source",
            &format!("csv:{}", data.display()),
            "--speed",
            "0",
            "--no-wal",
            "--wait-subscribers",
            "1",
        ],
    );
    let lines = collect_trades(&rx, n, Duration::from_secs(90));
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    let _ = tail.stop(Duration::from_secs(10));
    forget_bus(&bus);
    (lines, err)
}

#[test]
fn dataset_files_in_us_and_in_ms_give_the_same_klines_and_bad_lines_are_reported() {
    let dir = TempDir::new("excsv");
    let n = 3000;
    let us = dataset(&dir.0, n);
    let trades = read_dataset(&us);
    // The same files with millisecond times (Binance spot before 2025), and one corrupt line.
    let ms = dir.0.join("ms");
    std::fs::create_dir_all(&ms).unwrap();
    for entry in std::fs::read_dir(&us).unwrap() {
        let p = entry.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let mut out = String::new();
        for (i, line) in text.lines().enumerate() {
            let mut c: Vec<String> = line.split(',').map(str::to_owned).collect();
            c[4] = (c[4].parse::<i64>().unwrap() / 1000).to_string();
            out.push_str(&c.join(","));
            out.push('\n');
            if i == 10 && p.file_name().unwrap().to_str().unwrap().starts_with("BTCUSDT") {
                out.push_str("999,not-a-price,1.0,1.0,1614556710000,True,True\n");
            }
        }
        std::fs::write(ms.join(p.file_name().unwrap()), out).unwrap();
    }
    let conf = deep_config(&dir.0);
    let (a, _) = csv_run(&us, &conf, n);
    let (b, err) = csv_run(&ms, &conf, n);
    assert!(err.contains("BTCUSDT-trades.csv:12"), "the corrupt line is reported with file and line: {err}");
    let closed = |lines: &[Value]| -> Vec<Value> {
        lines.iter().filter(|v| v["kind"] == "kline" && v["k"]["x"] == true).map(|v| v["k"].clone()).collect()
    };
    let (ka, kb) = (closed(&a), closed(&b));
    assert!(ka.len() > 300, "{}", ka.len());
    assert_eq!(ka, kb, "µs and ms files give the same K-lines");
    check_klines(&a, &trades);
}

#[test]
fn each_ingress_policy_does_what_it_says_under_overload() {
    let dir = TempDir::new("exin");
    let n = 3000;
    let data = dataset(&dir.0, n);
    let conf = deep_config(&dir.0);
    for policy in ["drop_newest", "drop_oldest", "block"] {
        // The whole dataset at once while the broker is not consuming yet (it waits for a
        // subscriber): the 100-trade ingress queue overflows, deterministically.
        let (mock, port) =
            start_mock(&["--source", &format!("csv:{}", data.display()), "--speed", "0", "--wait-for-client"]);
        let bus = unique_bus("exin");
        let broker = live_broker(
            &conf,
            &bus,
            port,
            &["--clock", "event", "--ingress-queue", "100", "--ingress-policy", policy, "--dead-after", "30"],
        );
        let start = Instant::now();
        loop {
            let (_, s) = http_get(port, "/mock/stats", &[]);
            let s: Value = serde_json::from_str(&s).unwrap_or_default();
            if s["messages"].as_u64().unwrap_or(0) >= n as u64 || (policy == "block" && s["connections"] == 1) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "mock did not send: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut tail = Proc::spawn("tail", &["tail", "--config", &conf, "--bus", &bus, "--kind", "trade"]);
        let rx = tail.lines();
        let want = if policy == "block" { n } else { 100 };
        let got = collect_trades(&rx, want, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(300));
        let report = exchange_report(broker);
        let _ = tail.stop(Duration::from_secs(10));
        let _ = mock.stop(Duration::from_secs(10));
        let ing = &report["ingress"];
        let dropped = ing["dropped_total"].as_u64().unwrap();
        let sent = report["exchange"]["trades"].as_u64().unwrap();
        assert_eq!(sent, n as u64, "{report}");
        let ids: Vec<i64> = got.iter().map(|v| v["t"].as_i64().unwrap()).collect();
        match policy {
            "block" => {
                assert_eq!(dropped, 0, "{report}");
                assert!(ing["backpressure_events"].as_u64().unwrap() > 0, "{report}");
                assert_eq!(got.len(), n);
            }
            _ => {
                // Exactly the queue's worth was kept: the first trades or the last ones.
                assert_eq!(dropped, sent - 100, "{report}");
                assert_eq!(ing["backpressure_events"].as_u64().unwrap(), dropped, "{report}");
                let all: Vec<i64> = {
                    let mut v: Vec<(i64, i64)> =
                        read_dataset(&data).values().flat_map(|ts| ts.iter().map(|t| (t.time_ms, t.id))).collect();
                    v.sort_unstable();
                    v.into_iter().map(|(_, id)| id).collect()
                };
                let expect: Vec<i64> =
                    if policy == "drop_newest" { all[..100].to_vec() } else { all[all.len() - 100..].to_vec() };
                let mut a = ids.clone();
                let mut b = expect.clone();
                a.sort_unstable();
                b.sort_unstable();
                assert_eq!(
                    a,
                    b,
                    "{policy}: kept the {} trades",
                    if policy == "drop_newest" { "first" } else { "last" }
                );
            }
        }
        forget_bus(&bus);
    }
}
