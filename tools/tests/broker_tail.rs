//! End to end: `mdbus broker` and `mdbus tail` as separate processes over real shared memory.
//!
//! The K-line oracle here is written from the Binance rules and the `--record` CSV alone (chrono
//! for the calendar, its own decimal handling); it shares no code with the aggregator.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::oracle::*;
use common::*;
use serde_json::Value;

#[test]
fn closed_klines_of_every_interval_equal_an_oracle_from_the_recorded_trades() {
    // The default: no worker threads, the ingest thread aggregates.
    oracle_run(0, "40");
}

#[test]
fn three_partitioned_workers_give_the_same_klines_as_the_oracle() {
    oracle_run(3, "40");
}

/// On the event clock the speed of a replay changes nothing: as fast as possible, the same seed
/// gives the same trades and so (checked against the same oracle) the same K-lines.
#[test]
fn replaying_as_fast_as_possible_gives_the_same_klines() {
    oracle_run(2, "0");
}

fn oracle_run(workers: usize, speed: &str) {
    let workers_s = workers.to_string();
    let bus = unique_bus("oracle");
    let dir = TempDir::new("oracle");
    let rec = dir.0.join("rec");
    let rec_s = rec.to_str().unwrap();
    // Deep reader queues: the test demands zero loss from a debug-build tail on a busy machine.
    let conf = dir.0.join("deep.toml");
    std::fs::write(&conf, "[bus]\nsubscriber_buffer = 2048\nmax_subscribers = 2\n").unwrap();
    let conf_s = conf.to_str().unwrap();
    // Simulated time across 2021-03-01T00:00Z: a Monday, a month start and a 3d boundary, so every
    // interval from 1s to 1M closes. 40x real time, event clock.
    let broker = Proc::spawn(
        "broker",
        &[
            "broker",
            "--config",
            conf_s,
            "--bus",
            &bus,
            "--source",
            "synthetic",
            "--seed",
            "42",
            "--symbols",
            "3",
            "--rate",
            "30",
            "--start",
            "2021-02-28T23:58:30Z",
            "--speed",
            speed,
            "--max-trades",
            "6000",
            "--record",
            rec_s,
            "--wait-subscribers",
            "1",
            "--workers",
            &workers_s,
        ],
    );
    let mut tail = Proc::spawn(
        "tail",
        &["tail", "--config", conf_s, "--bus", &bus, "--kind", "trade,kline,heartbeat", "--timeout", "120"],
    );
    let rx = tail.lines();

    // Read until the feed has ended and three heartbeats have followed the last data frame.
    let mut last_data = 0u64;
    let mut ended_heartbeats = 0;
    let lines = collect_until(&rx, Duration::from_secs(90), |v| {
        let seq = v["seq"].as_u64().unwrap();
        match v["kind"].as_str().unwrap() {
            "heartbeat" => {
                assert!(seq <= last_data || last_data == 0, "heartbeat seq {seq} ahead of data {last_data}");
                if v["feed"] == "ended" && seq == last_data {
                    ended_heartbeats += 1;
                }
            }
            _ => {
                assert_eq!(ended_heartbeats, 0, "data after the feed ended");
                last_data = seq;
            }
        }
        ended_heartbeats >= 3
    });
    let (broker_ok, broker_err) = broker.stop(Duration::from_secs(10));
    assert!(broker_ok, "broker failed: {broker_err}");
    let (tail_ok, tail_err) = tail.stop(Duration::from_secs(10));
    assert!(tail_ok, "tail failed: {tail_err}");
    assert!(tail_err.contains("gaps 0 (missing 0), duplicates 0, reordered 0, decode errors 0"), "{tail_err}");

    // Sequence numbers: every data frame from 1, +1 each, no gap, no repeat.
    let data: Vec<&Value> = lines.iter().filter(|v| v["kind"] != "heartbeat").collect();
    for (n, v) in data.iter().enumerate() {
        assert_eq!(v["seq"].as_u64().unwrap(), n as u64 + 1, "seq out of line at {v}");
    }
    assert!(lines.iter().filter(|v| v["kind"] == "heartbeat" && v["feed"] == "ended").count() >= 3);

    // Trades: every recorded trade appears once, field for field.
    let trades = read_dataset(&rec);
    assert_eq!(trades.len(), 3);
    assert_eq!(trades.values().map(Vec::len).sum::<usize>(), 6000);
    let tail_trades: Vec<&&Value> = data.iter().filter(|v| v["kind"] == "trade").collect();
    assert_eq!(tail_trades.len(), 6000);
    let mut pos: HashMap<&str, usize> = HashMap::new();
    for v in &tail_trades {
        let s = v["s"].as_str().unwrap();
        let i = pos.entry(s).or_default();
        let t = &trades[s][*i];
        *i += 1;
        assert_eq!(v["t"].as_i64().unwrap(), t.id);
        assert_eq!(v["p"].as_str().unwrap(), render_e8(t.price));
        assert_eq!(v["q"].as_str().unwrap(), render_e8(t.qty));
        assert_eq!(v["T"].as_i64().unwrap(), t.time_ms);
        assert_eq!(v["m"].as_bool().unwrap(), t.buyer_maker);
    }

    // Closed K-lines: each equals the oracle; none is missing; none is repeated.
    let (checked, intervals_closed) = check_klines(data.iter().copied(), &trades);
    assert_eq!(intervals_closed.len(), 16, "only {intervals_closed:?} closed");
    assert!(checked > 500, "only {checked} closed K-lines");
    // The 1M K-line of February 2021 closed with T = 2021-02-28T23:59:59.999Z.
    assert!(data.iter().any(|v| v["k"]["i"] == "1M" && v["k"]["x"] == true && v["k"]["T"] == 1_614_556_799_999i64));
    assert!(leftover_shm(&bus).is_empty(), "shared memory left: {:?}", leftover_shm(&bus));
    forget_bus(&bus);
}

/// The cores a `/proc/.../status` allows (`Cpus_allowed_list: 0-1,4`).
fn allowed_cores(status: &str) -> Vec<usize> {
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim();
    let mut cores = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cores.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap());
    }
    cores
}

/// Name and allowed cores of every thread of process `pid`.
fn threads_of(pid: u32) -> Vec<(u32, String, Vec<usize>)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            let tid = t.file_name()?.to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.join("comm")).ok()?.trim().to_owned();
            Some((tid, comm, allowed_cores(&std::fs::read_to_string(t.join("status")).ok()?)))
        })
        .collect()
}

#[test]
fn a_pinned_broker_leaves_its_log_threads_free_to_run_on_other_cores() {
    let mine = allowed_cores(&std::fs::read_to_string("/proc/self/status").unwrap());
    if mine.len() < 2 {
        eprintln!("skipped: this machine lets the test use one core");
        return;
    }
    let core = mine[0];
    let bus = unique_bus("pin");
    let dir = TempDir::new("pin");
    let wal = dir.0.join("wal");
    let core_s = core.to_string();
    let broker = Proc::spawn(
        "broker",
        &["broker", "--bus", &bus, "--wal", wal.to_str().unwrap(), "--rate", "1000", "--core", &core_s],
    );
    let pid = broker.child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let threads = loop {
        let threads = threads_of(pid);
        let main_pinned = threads.iter().any(|(tid, _, cores)| *tid == pid && *cores == [core]);
        let log_threads = threads.iter().filter(|(_, name, _)| name.starts_with("mdbus-wal")).count();
        if main_pinned && log_threads == 2 {
            break threads;
        }
        assert!(Instant::now() < deadline, "the broker never pinned itself and started its log: {threads:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for (_, name, cores) in threads.iter().filter(|(_, name, _)| name.starts_with("mdbus-wal")) {
        assert_eq!(*cores, mine, "{name} must not inherit the ingest thread's core {core}");
    }
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    forget_bus(&bus);
}

/// CPU time (ns) the threads of process `pid` have run so far (`/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_blocking_tail_sleeps_while_the_market_is_quiet_and_still_prints_every_trade() {
    let bus = unique_bus("idle");
    let broker =
        Proc::spawn("broker", &["broker", "--bus", &bus, "--no-wal", "--symbols", "1", "--rate", "4", "--steady"]);
    // `tail` blocks on the stream's wake-up event by default (`--spin` busy-polls).
    let mut tail = Proc::spawn("tail", &["tail", "--bus", &bus, "--kind", "trade"]);
    let rx = tail.lines();
    // The first trade: the tail is subscribed and has been woken at least once.
    collect_until(&rx, Duration::from_secs(60), |_| true);
    let pid = tail.child.id();
    let (cpu_before, start) = (cpu_ns(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, wall) = (cpu_ns(pid) - cpu_before, start.elapsed());
    let trades: Vec<String> = rx.try_iter().collect();
    assert!(
        trades.len() >= 4,
        "the tail must go on printing trades (4/s) while it sleeps between them; got {} in {wall:?}",
        trades.len()
    );
    assert!(
        u128::from(cpu) * 20 < wall.as_nanos(),
        "a blocking reader on a quiet stream used {:.1} ms of CPU in {wall:?} (at most 5 % allowed)",
        cpu as f64 / 1e6
    );
    let (ok, err) = tail.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    let (ok, err) = broker.stop(Duration::from_secs(10));
    assert!(ok, "{err}");
    forget_bus(&bus);
}
