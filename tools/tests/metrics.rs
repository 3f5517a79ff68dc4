//! Observability during a demo run: every process's `/metrics` carries the named metrics and they
//! move; a killed subscriber leaves the subscriber count; an injected exchange drop raises the
//! reconnect counter; the latency summaries are plausible; `mdbus stats` shows the bus; logs are
//! JSON lines on request.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

/// The samples of one scrape, keyed `name` or `name{k=v,…}`.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let (status, body) = http_get(port, "/metrics", &[]);
    assert_eq!(status, 200, "{addr}: {body}");
    let mut out = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (key, value) = line.rsplit_once(' ').unwrap();
        let key = key.replace('"', "");
        out.insert(key, value.parse::<f64>().unwrap_or_else(|e| panic!("{line}: {e}")));
    }
    out
}

fn get(m: &HashMap<String, f64>, k: &str) -> f64 {
    *m.get(k).unwrap_or_else(|| panic!("{k} missing from {:?}", m.keys().collect::<Vec<_>>()))
}

/// Polls `addr` until `ok` holds for metric `k` (30 s at most); returns its value.
fn wait_for(addr: &str, k: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let v = get(&scrape(addr), k);
        if ok(v) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {k} stayed at {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value after `label` on the demo's lines, up to the next space.
fn after<'a>(lines: &'a [String], label: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.split_once(label).map(|(_, r)| r.split_whitespace().next().unwrap()))
        .unwrap_or_else(|| panic!("{label} not in {lines:?}"))
}

fn check_summary(m: &HashMap<String, f64>, name: &str) {
    let count = get(m, &format!("{name}_count"));
    let p50 = get(m, &format!("{name}{{quantile=0.5}}"));
    let p99 = get(m, &format!("{name}{{quantile=0.99}}"));
    let p999 = get(m, &format!("{name}{{quantile=0.999}}"));
    assert!(count > 0.0, "{name}: no values");
    assert!(p50 > 0.0 && p99 >= p50 && p999 >= p99, "{name}: p50 {p50} p99 {p99} p999 {p999}");
    assert!(p99 < 10_000_000.0, "{name}: p99 {p99} µs is not a plausible latency on loopback");
}

#[test]
fn every_process_serves_metrics_that_move_during_a_demo_run() {
    let bus = unique_bus("metrics");
    let dir = TempDir::new("metrics");
    let conf = demo_config(&dir);
    let mut demo = Proc::spawn(
        "demo",
        &[
            "demo",
            "--bus",
            &bus,
            "--config",
            &conf,
            "--gateway-listen",
            "127.0.0.1:0",
            "--rate",
            "500",
            "--log-format",
            "json",
        ],
    );
    // The children log JSON too: the demo passes the flag on.
    let rx = demo.lines();
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.starts_with("seq ")) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => lines.push(l),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the demo printed {lines:?}"),
            Err(e) => panic!("{e}: {lines:?}"),
        }
    }
    let broker = after(&lines, "metrics     http://").trim_end_matches("/metrics").to_owned();
    let gw_metrics = after(&lines, "(broker)  http://").trim_end_matches("/metrics").to_owned();
    let mx_metrics = after(&lines, "(gateway)  http://").trim_end_matches("/metrics").to_owned();
    let gateway_ws = after(&lines, "gateway     ws://").to_owned();
    let exchange = after(&lines, "exchange    ws://").to_owned();

    // The seed's names, present and moving.
    let b1 = scrape(&broker);
    for k in [
        "market_published_total",
        "market_dropped_total",
        "market_ingress_len",
        "market_subscriber_count",
        "broker_reconnect_total",
        "market_last_seq{stream=realtime}",
        "wal_records_total",
        "wal_fsync_total",
    ] {
        get(&b1, k);
    }
    let published = get(&b1, "market_published_total");
    wait_for(&broker, "market_published_total", "frames are published", |v| v > published);
    wait_for(&broker, "wal_records_total", "the WAL is written", |v| v > 0.0);
    let trades = get(&scrape(&mx_metrics), "mock_trades_total");
    wait_for(&mx_metrics, "mock_trades_total", "the exchange trades", |v| v > trades);

    // A subscriber comes, is killed, and leaves the count.
    let base = wait_for(&broker, "market_subscriber_count", "the demo and the gateway read", |v| v >= 2.0);
    let mut tail = Proc::spawn("tail", &["tail", "--bus", &bus, "--kind", "trade"]);
    let tail_rx = tail.lines();
    tail_rx.recv_timeout(Duration::from_secs(30)).expect("the tail reads");
    wait_for(&broker, "market_subscriber_count", "a new subscriber counts", |v| v == base + 1.0);
    tail.signal(rustix::process::Signal::KILL);
    let _ = tail.wait(Duration::from_secs(10));
    wait_for(&broker, "market_subscriber_count", "a killed subscriber leaves the count", |v| v == base);

    // An injected exchange drop: the broker reconnects and counts it.
    let reconnects = get(&scrape(&broker), "broker_reconnect_total");
    let ex_port: u16 = exchange.rsplit(':').next().unwrap().parse().unwrap();
    let (status, body) = http_get(ex_port, "/mock/drop", &[]);
    assert_eq!(status, 200, "{body}");
    wait_for(&broker, "broker_reconnect_total", "a dropped connection is counted", |v| v > reconnects);
    wait_for(&mx_metrics, "mock_dropped_total", "the exchange counts its drop", |v| v >= 1.0);

    // A WebSocket client: connections and messages out move, end to end latency is measured.
    let (mut ws, _) = tungstenite::connect(format!("ws://{gateway_ws}/ws/btcusdt@trade")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let mut got = 0;
    while got < 20 {
        if let Message::Text(_) = ws.read().unwrap() {
            got += 1;
        }
    }
    // Counted once the batch is flushed, which can be just after the client has read it.
    wait_for(&gw_metrics, "gateway_messages_out_total", "messages out are counted", |v| v >= 20.0);
    let g = scrape(&gw_metrics);
    assert!(get(&g, "gateway_connections") >= 1.0);
    wait_for(&gw_metrics, "market_publisher_health", "healthy again after the reconnect", |v| v == 1.0);
    assert_eq!(get(&g, "market_seq_gaps_total"), 0.0);
    // Summaries are handed over at most every 250 ms per thread: wait for their first values.
    let e2e = wait_for(&gw_metrics, "e2e_latency_us_count", "e2e values arrive", |v| v > 0.0);
    assert!(e2e > 0.0);
    wait_for(&broker, "ingest_latency_us_count", "ingest values arrive", |v| v > 0.0);
    let g = scrape(&gw_metrics);
    check_summary(&g, "fanout_latency_us");
    check_summary(&g, "e2e_latency_us");
    check_summary(&scrape(&broker), "ingest_latency_us");
    drop(ws);

    // Every metric the example dashboard plots is one the processes serve.
    let served: std::collections::HashSet<String> = [&broker, &gw_metrics, &mx_metrics]
        .iter()
        .flat_map(|a| scrape(a).into_keys())
        .map(|k| k.split('{').next().unwrap().to_owned())
        .collect();
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/grafana/mdbus-dashboard.json"))
            .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let prefixes = ["market_", "broker_", "gateway_", "wal_", "exchange_", "mock_", "ingest_", "fanout_", "e2e_"];
    let mut plotted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if prefixes.iter().any(|p| word.starts_with(p)) {
                    plotted += 1;
                    assert!(served.contains(word), "the dashboard plots {word}, which no process serves");
                }
            }
        }
    }
    assert!(plotted > 20, "{plotted}");

    // The terminal view, once.
    let out = std::process::Command::new(EXE)
        .args(["stats", "--once", "--interval", "0.5", &broker, &gw_metrics, &mx_metrics])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    for row in ["broker ", "gateway ", "mock-exchange "] {
        assert!(table.lines().any(|l| l.starts_with(row)), "{row}: {table}");
    }
    assert!(table.contains("healthy") && table.contains("frames"), "{table}");

    demo.signal(rustix::process::Signal::INT);
    let (ok, err) = demo.wait(Duration::from_secs(20));
    assert!(ok, "{err}");
    // JSON logs, one event per state change, from the children.
    let events: Vec<serde_json::Value> = err.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!events.is_empty(), "{err}");
    let said = |m: &str| events.iter().any(|e| e["fields"]["message"].as_str().is_some_and(|s| s.contains(m)));
    assert!(said("metrics listening"), "{err}");
    assert!(said("publisher health changed"), "{err}");
    assert!(said("exchange connection lost") && said("exchange reconnected"), "{err}");
    forget_bus(&bus);
}
