//! The write-ahead log end to end: replay by range, resume after a subscriber dies, and a broker
//! killed with SIGKILL that continues its sequence.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Waits until frame `seq` is in the log (as `mdbus replay` sees it).
fn wait_logged(wal: &str, seq: u64, limit: Duration) {
    let start = Instant::now();
    let s = seq.to_string();
    loop {
        let out = Command::new(EXE).args(["replay", "--wal", wal, "--from-seq", &s, "--to-seq", &s]).output().unwrap();
        if out.status.success() {
            return;
        }
        assert!(start.elapsed() < limit, "seq {seq} never logged: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last seq in the log (at or after `from`).
fn last_logged(wal: &str, from: u64) -> u64 {
    let out = Command::new(EXE)
        .args(["replay", "--wal", wal, "--from-seq", &from.to_string(), "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rfind(|l| !l.is_empty()).unwrap();
    serde_json::from_str::<Value>(line).unwrap()["seq"].as_u64().unwrap()
}

fn seqs(lines: &[Value]) -> Vec<u64> {
    lines.iter().filter(|v| v["kind"] != "heartbeat").map(|v| v["seq"].as_u64().unwrap()).collect()
}

#[test]
fn a_restarted_subscriber_resumes_from_the_log_with_every_frame_exactly_once() {
    let bus = unique_bus("resume");
    let dir = TempDir::new("resume");
    let wal = dir.0.join("wal");
    let wal_s = wal.to_str().unwrap();
    let broker = Proc::spawn(
        "broker",
        &["broker", "--bus", &bus, "--wal", wal_s, "--symbols", "5", "--rate", "2000", "--wait-subscribers", "1"],
    );
    // The first subscriber reads a while, then dies without a word.
    let mut first = Proc::spawn("tail", &["tail", "--bus", &bus, "--timeout", "60"]);
    let rx = first.lines();
    let seen = collect_until(&rx, Duration::from_secs(30), |v| v["seq"].as_u64().unwrap() >= 2_000);
    first.signal(rustix::process::Signal::KILL);
    drop(first);
    let last = *seqs(&seen).last().unwrap();
    // The broker goes on: at least 100 000 more frames. Then it is paused, so that the replacement
    // surely catches up with the log before the broker goes on (whatever the machine's speed).
    wait_logged(wal_s, last + 100_000, Duration::from_secs(60));
    broker.signal(rustix::process::Signal::STOP);
    let logged = last_logged(wal_s, last + 100_000);
    // The replacement starts right after the last frame the first one printed, and wants 20 000
    // frames more than the log holds: those can only come live.
    let from = (last + 1).to_string();
    let count = logged - last + 20_000;
    let count_s = count.to_string();
    let mut second = Proc::spawn(
        "tail",
        &["tail", "--bus", &bus, "--from-seq", &from, "--wal", wal_s, "--count", &count_s, "--timeout", "90"],
    );
    let rx = second.lines();
    std::thread::sleep(Duration::from_millis(500));
    broker.signal(rustix::process::Signal::CONT);
    let (ok, err) = second.wait(Duration::from_secs(120));
    assert!(ok, "{err}");
    let got: Vec<u64> =
        rx.try_iter().map(|l| serde_json::from_str::<Value>(&l).unwrap()["seq"].as_u64().unwrap()).collect();
    assert_eq!(got.len() as u64, count);
    for (i, s) in got.iter().enumerate() {
        assert_eq!(*s, last + 1 + i as u64, "frame {i}: a gap or a duplicate");
    }
    // At least the 100 000 missed frames came from the log; then frames came live (the tail kept
    // going after catching up): received = from the log + live duplicates (dropped) + live new.
    let num = |after: &str| -> u64 {
        err.split(after).next().unwrap().rsplit(' ').next().unwrap().trim_end_matches(',').parse().unwrap()
    };
    let (received, replayed, duplicates) = (num(" received"), num(" from the log"), num(", reordered"));
    assert!(replayed >= 100_000, "{err}");
    assert!(received - replayed - duplicates > 0, "nothing came live: {err}");
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    forget_bus(&bus);
}

#[test]
fn replay_prints_exactly_the_requested_range_and_names_the_oldest_seq() {
    let bus = unique_bus("replay");
    let dir = TempDir::new("replay");
    let wal = dir.0.join("wal");
    let wal_s = wal.to_str().unwrap();
    let broker =
        Proc::spawn("broker", &["broker", "--bus", &bus, "--wal", wal_s, "--rate", "2000", "--max-trades", "500"]);
    wait_logged(wal_s, 3_000, Duration::from_secs(60));
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    let out = Command::new(EXE)
        .args(["replay", "--wal", wal_s, "--from-seq", "1000", "--to-seq", "1999", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(seqs(&lines), (1000..=1999).collect::<Vec<u64>>());
    assert!(lines.iter().all(|v| v["kind"] == "trade" || v["kind"] == "kline"));
    let raw = Command::new(EXE)
        .args(["replay", "--wal", wal_s, "--from-seq", "5", "--to-seq", "5", "--format", "raw"])
        .output()
        .unwrap();
    assert!(raw.status.success());
    assert_eq!(raw.stdout.len() % 16, 0);
    assert_eq!(&raw.stdout[..4], b"MDBF");
    for (args, needle) in [
        (vec!["--from-seq", "0"], "oldest available seq is 1"),
        (vec!["--from-seq", "1", "--to-seq", "999999999"], "before --to-seq 999999999"),
    ] {
        let out = Command::new(EXE).args(["replay", "--wal", wal_s]).args(&args).output().unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    let check = Command::new(EXE).args(["replay", "--wal", wal_s, "--check"]).output().unwrap();
    assert!(check.status.success() && String::from_utf8_lossy(&check.stderr).contains(" 0 problems"));
    forget_bus(&bus);
}

#[test]
fn a_broker_killed_with_sigkill_continues_its_sequence_from_the_log() {
    let bus = unique_bus("crash");
    let dir = TempDir::new("crash");
    let wal = dir.0.join("wal");
    let wal_s = wal.to_str().unwrap();
    let args = ["broker", "--bus", &bus, "--wal", wal_s, "--rate", "3000", "--durability", "every-batch"];
    let broker = Proc::spawn("broker", &args);
    wait_logged(wal_s, 5_000, Duration::from_secs(60));
    broker.signal(rustix::process::Signal::KILL);
    drop(broker);
    let broker = Proc::spawn("broker", &args);
    let mut tail =
        Proc::spawn("tail", &["tail", "--bus", &bus, "--kind", "trade,kline", "--count", "1", "--timeout", "30"]);
    let rx = tail.lines();
    let first = collect_until(&rx, Duration::from_secs(30), |_| true);
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    let _ = tail.wait(Duration::from_secs(10));
    // The log is whole and contiguous across the crash: 1 ..= last, no gap, no repeat.
    let check = Command::new(EXE).args(["replay", "--wal", wal_s, "--check"]).output().unwrap();
    let report = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{report}");
    let records: u64 = report.split(" valid records").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    let out =
        Command::new(EXE).args(["replay", "--wal", wal_s, "--from-seq", "1", "--format", "json"]).output().unwrap();
    let all: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(all.len() as u64, records);
    assert!(all.iter().enumerate().all(|(i, s)| *s == i as u64 + 1), "seqs not contiguous across the crash");
    // The restarted broker's first frame a new reader saw continues that sequence.
    assert!(first[0]["seq"].as_u64().unwrap() > 5_000);
    forget_bus(&bus);
}

#[test]
fn replay_follow_prints_frames_as_the_broker_logs_them() {
    let bus = unique_bus("follow");
    let dir = TempDir::new("follow");
    let wal = dir.0.join("wal");
    let wal_s = wal.to_str().unwrap();
    let broker = Proc::spawn("broker", &["broker", "--bus", &bus, "--wal", wal_s, "--rate", "1000"]);
    wait_logged(wal_s, 10, Duration::from_secs(60));
    // Started while the broker runs: everything from 1, then new frames as they are logged.
    let mut follow = Proc::spawn("replay", &["replay", "--wal", wal_s, "--from-seq", "1", "--follow"]);
    let rx = follow.lines();
    let mut next = 1;
    let lines = collect_until(&rx, Duration::from_secs(60), |v| {
        assert_eq!(v["seq"].as_u64().unwrap(), next, "replay --follow skipped or repeated a frame");
        next += 1;
        next > 20_000
    });
    assert_eq!(lines.len(), 20_000);
    let (ok, err) = follow.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    forget_bus(&bus);
}
