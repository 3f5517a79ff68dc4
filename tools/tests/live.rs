//! End to end on the wall clock: heartbeats when the feed pauses, liveness when the publisher
//! dies, tail's options and errors, and the demo's clean shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn heartbeats_keep_coming_while_the_feed_is_paused() {
    let bus = unique_bus("pause");
    // Tail first: it creates the stream and waits for a broker.
    let mut tail = Proc::spawn("tail", &["tail", "--bus", &bus, "--kind", "trade,kline,heartbeat", "--timeout", "60"]);
    let rx = tail.lines();
    std::thread::sleep(Duration::from_millis(200));
    let broker = Proc::spawn(
        "broker",
        &[
            "broker",
            "--bus",
            &bus,
            "--symbols",
            "BTCUSDT,ETHUSDT",
            "--rate",
            "2000",
            "--max-trades",
            "300",
            "--heartbeat-ms",
            "20",
            "--wait-subscribers",
            "1",
        ],
    );
    // After the last trade the feed is paused for good; only heartbeats may follow, each with
    // the last data seq.
    let mut last_data = 0;
    let mut after_pause = 0;
    let lines = collect_until(&rx, Duration::from_secs(45), |v| {
        let seq = v["seq"].as_u64().unwrap();
        if v["kind"] == "heartbeat" {
            if v["feed"] == "ended" {
                assert_eq!(seq, last_data, "heartbeat must carry the last data seq");
                after_pause += 1;
            }
        } else {
            assert_eq!(after_pause, 0, "data after the pause: {v}");
            last_data = seq;
        }
        after_pause >= 10
    });
    let data: Vec<&Value> = lines.iter().filter(|v| v["kind"] != "heartbeat").collect();
    assert!(data.len() > 300, "trades and their K-lines: {}", data.len());
    for (n, v) in data.iter().enumerate() {
        assert_eq!(v["seq"].as_u64().unwrap(), n as u64 + 1, "gap or repeat at {v}");
    }
    assert_eq!(data.iter().filter(|v| v["kind"] == "trade").count(), 300);
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    let (ok, err) = tail.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    assert!(err.contains("gaps 0"), "{err}");
    assert!(leftover_shm(&bus).is_empty(), "{:?}", leftover_shm(&bus));
    forget_bus(&bus);
}

#[test]
fn a_killed_publisher_is_reported_failed() {
    let bus = unique_bus("kill");
    let broker = Proc::spawn("broker", &["broker", "--bus", &bus, "--rate", "500", "--wait-subscribers", "1"]);
    let mut tail = Proc::spawn("tail", &["tail", "--bus", &bus, "--timeout", "4"]);
    let rx = tail.lines();
    let _ = collect_until(&rx, Duration::from_secs(30), |_| true);
    broker.signal(rustix::process::Signal::KILL);
    drop(broker);
    let (ok, err) = tail.wait(Duration::from_secs(30));
    assert!(ok, "{err}");
    assert!(err.contains("health failed"), "tail should see the publisher as failed: {err}");
    forget_bus(&bus);
}

#[test]
fn tail_filters_by_symbol_and_interval_and_stops_at_count() {
    let bus = unique_bus("filter");
    let broker = Proc::spawn(
        "broker",
        &["broker", "--bus", &bus, "--symbols", "4", "--rate", "1000", "--wait-subscribers", "1"],
    );
    let mut tail = Proc::spawn(
        "tail",
        &["tail", "--bus", &bus, "--symbol", "ethusdt", "--interval", "1m,1s", "--count", "50", "--timeout", "30"],
    );
    let rx = tail.lines();
    let (ok, err) = tail.wait(Duration::from_secs(40));
    assert!(ok, "{err}");
    let lines: Vec<Value> = rx.try_iter().map(|l| serde_json::from_str(&l).unwrap()).collect();
    assert_eq!(lines.len(), 50);
    for v in &lines {
        assert_eq!(v["kind"], "kline", "{v}");
        assert_eq!(v["s"], "ETHUSDT", "{v}");
        let i = v["k"]["i"].as_str().unwrap();
        assert!(i == "1m" || i == "1s", "{v}");
    }
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    forget_bus(&bus);
}

#[test]
fn tail_without_a_publisher_times_out_with_an_error_and_bad_flags_are_named() {
    let bus = unique_bus("nopub");
    let out = Command::new(EXE)
        .env("MDBUS_DATA_DIR", data_root())
        .args(["tail", "--bus", &bus, "--count", "1", "--timeout", "0.3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out with 0 of 1 frames"));
    assert!(leftover_shm(&bus).is_empty(), "{:?}", leftover_shm(&bus));
    forget_bus(&bus);

    for (args, needle) in [
        (vec!["tail", "--interval", "2m"], "unknown interval \"2m\""),
        (vec!["tail", "--symbol", "BTC-USDT"], "--symbol \"BTC-USDT\""),
        (vec!["tail", "--stream", "nope"], "unknown stream"),
        (vec!["broker", "--bus", "bad/name"], "bus name"),
        (vec!["broker", "--clock", "moon"], "broker.clock"),
        (vec!["broker", "--start", "yesterday"], "--start \"yesterday\""),
        (vec!["broker", "--config", "/nonexistent.toml"], "/nonexistent.toml"),
    ] {
        let out = Command::new(EXE).env("MDBUS_DATA_DIR", data_root()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn demo_shows_data_and_stops_cleanly() {
    let bus = unique_bus("demo");
    let dir = TempDir::new("demo");
    let conf = demo_config(&dir);
    let out = Command::new(EXE)
        .env("MDBUS_DATA_DIR", data_root())
        .args(["demo", "--bus", &bus, "--config", &conf, "--duration", "3", "--gateway-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("mdbus tail --bus {bus}")), "{stdout}");
    assert!(stdout.contains("gateway     ws://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("python3 -m websockets 'ws://127.0.0.1:"), "a client command to paste: {stdout}");
    assert!(stdout.contains("demo: gateway (pid"), "the gateway is stopped too: {stdout}");
    let summaries: Vec<&str> = stdout.lines().filter(|l| l.starts_with("seq ")).collect();
    assert!(!summaries.is_empty(), "{stdout}");
    assert!(summaries.iter().any(|l| l.contains("BTCUSDT 1m close")), "{stdout}");
    assert!(stdout.contains("stopped cleanly"), "{stdout}");
    assert!(leftover_shm(&bus).is_empty(), "{:?}", leftover_shm(&bus));
    forget_bus(&bus);
}

#[test]
fn demo_stops_every_process_and_its_shared_memory_on_ctrl_c() {
    let bus = unique_bus("demoint");
    let dir = TempDir::new("demoint");
    let conf = demo_config(&dir);
    let mut demo = Proc::spawn("demo", &["demo", "--bus", &bus, "--config", &conf, "--gateway-listen", "127.0.0.1:0"]);
    let rx = demo.lines();
    // Wait until it shows data, then interrupt it as a terminal would.
    let start = std::time::Instant::now();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("demo printed nothing");
        if line.starts_with("seq ") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30));
    }
    demo.signal(rustix::process::Signal::INT);
    let (ok, err) = demo.wait(Duration::from_secs(20));
    // Every line up to the end of its output (the reader thread may still be behind the exit).
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        rest.push(line);
    }
    assert!(ok, "{err}\n{rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped cleanly")), "{rest:?}");
    assert!(leftover_shm(&bus).is_empty(), "{:?}", leftover_shm(&bus));
    forget_bus(&bus);
}

#[test]
fn symbols_are_added_and_removed_on_sighup_without_a_restart() {
    let bus = unique_bus("reload");
    let dir = TempDir::new("reload");
    let conf = dir.0.join("broker.toml");
    let conf_s = conf.to_str().unwrap();
    std::fs::write(&conf, "[broker]\nsymbols = [\"BTCUSDT\", \"ETHUSDT\"]\nrate = 2000.0\n").unwrap();
    let broker = Proc::spawn(
        "broker",
        &["broker", "--config", conf_s, "--bus", &bus, "--wait-subscribers", "1", "--workers", "2"],
    );
    let mut tail =
        Proc::spawn("tail", &["tail", "--config", conf_s, "--bus", &bus, "--kind", "trade", "--timeout", "60"]);
    let rx = tail.lines();
    let mut n = 0;
    let before = collect_until(&rx, Duration::from_secs(30), |_| {
        n += 1;
        n >= 200
    });
    assert!(before.iter().all(|v| v["s"] == "BTCUSDT" || v["s"] == "ETHUSDT"));
    assert!(before.iter().any(|v| v["s"] == "ETHUSDT"));

    std::fs::write(&conf, "[broker]\nsymbols = [\"BTCUSDT\", \"SOLUSDT\"]\nrate = 2000.0\n").unwrap();
    broker.signal(rustix::process::Signal::HUP);
    let mut sol = 0;
    let after = collect_until(&rx, Duration::from_secs(30), |v| {
        if v["s"] == "SOLUSDT" {
            sol += 1;
        }
        sol >= 200
    });
    let first_sol = after.iter().position(|v| v["s"] == "SOLUSDT").unwrap();
    assert!(after[first_sol..].iter().all(|v| v["s"] != "ETHUSDT"), "ETHUSDT traded after its removal");
    assert!(after[first_sol..].iter().any(|v| v["s"] == "BTCUSDT"), "BTCUSDT kept trading");
    let seqs: Vec<u64> = before.iter().chain(&after).map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one publisher, increasing seqs");
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    assert!(err.contains("symbol added") && err.contains("symbol removed"), "{err}");
    let (ok, err) = tail.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    assert!(err.contains("gaps 0") && err.contains("publisher restarts 0"), "{err}");
    forget_bus(&bus);
}
