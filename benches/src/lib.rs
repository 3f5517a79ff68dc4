//! Benchmarks of the bus, each with its baselines measured in the same run.
//!
//! Upstream: `mdbus bench` (the CLI) calls [`run_scenario`] with the path of the `mdbus`
//! executable; each measurement starts two processes (`mdbus bench-peer`), pinned to different
//! cores when the machine has two, so the figures are inter-process as a user would see them.
//! Downstream: a [`ScenarioReport`] printed as a table or JSON; figures go to `BENCHMARKS.md`.
//!
//! - `latency`: one-way publish → receive of one K-line frame at a fixed rate, p50/p99/p99.9/max,
//!   for mdbus vs raw iceoryx2 (same payload size) vs a Unix-domain socket.
//! - `gateway`: WebSocket clients against `mdbus gateway` (see [`gatewaybench`]).
//! - `throughput`: K-line frames/s from one publisher to one subscriber under full load, every seq
//!   checked, lossless; mdbus batches frames per sample, raw iceoryx2 sends one per sample.

#![forbid(unsafe_code)]

pub mod batchbench;
pub mod gatewaybench;
pub mod ingestbench;
pub mod peer;
pub mod report;
pub mod systembench;
pub mod walbench;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

pub use peer::{Mode, PeerReport, PeerSpec, Transport};

/// Options shared by the scenarios.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `mdbus` executable (peers are started from it).
    pub exe: PathBuf,
    /// A short run (CI: keeps the harness from rotting; figures are noisier).
    pub quick: bool,
    /// Pin publisher and subscriber to cores 0 and 1 when there are two or more.
    pub pin: bool,
    /// Latency: messages per second.
    pub rate: f64,
    /// Messages per measurement (default depends on scenario and `quick`).
    pub count: Option<u64>,
    /// Gateway: WebSocket clients.
    pub clients: usize,
    /// Gateway: its tokio worker threads.
    pub gateway_threads: usize,
}

/// One measured line of a scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub transport: String,
    pub messages: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub per_second: f64,
    /// Payload bytes per second where that means something (WAL), else 0.
    pub bytes_per_second: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    /// This row's key figure relative to the scenario's first baseline (p99 for latency: lower
    /// is better; rate for throughput: higher is better).
    pub ratio_vs_baseline: f64,
    /// Resident memory (memory scenario), bytes; else 0.
    #[serde(default)]
    pub rss_bytes: u64,
    /// What else the row says (fanout: the slowest subscriber; recovery: the log size).
    #[serde(default)]
    pub note: String,
}

impl Row {
    /// A rate row: `n` items in `elapsed` (and `bytes`), no latency figures.
    pub fn rate(name: &str, kind: &str, n: u64, elapsed: std::time::Duration, bytes: u64) -> Row {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Row {
            name: name.into(),
            transport: kind.into(),
            messages: n,
            lost: 0,
            out_of_order: 0,
            per_second: n as f64 / secs,
            bytes_per_second: bytes as f64 / secs,
            p50_ns: 0,
            p99_ns: 0,
            p999_ns: 0,
            max_ns: 0,
            ratio_vs_baseline: 1.0,
            rss_bytes: 0,
            note: String::new(),
        }
    }
}

/// A scenario's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub payload_bytes: usize,
    pub cores: usize,
    pub pinned: bool,
    pub cpu: String,
    pub rows: Vec<Row>,
}

/// A benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchRunError {
    #[error(
        "unknown scenario {0:?} (known: latency, throughput, fanout, broker, wal, memory, recovery, gateway, ingest, batch)"
    )]
    UnknownScenario(String),
    #[error("starting {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what}: {detail}")]
    Peer { what: String, detail: String },
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn cores() -> usize {
    core_affinity::get_core_ids().map_or(1, |c| c.len())
}

fn spawn_peer(exe: &Path, role: &str, spec: &PeerSpec) -> Result<std::process::Child, BenchRunError> {
    let json =
        serde_json::to_string(spec).map_err(|e| BenchRunError::Peer { what: role.into(), detail: e.to_string() })?;
    Command::new(exe)
        .args(["bench-peer", "--role", role, "--spec", &json])
        // The publisher's `go` comes on stdin (`PeerSpec::handshake`).
        .stdin(if role == "pub" { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| BenchRunError::Spawn { what: format!("bench {role} ({})", spec.transport.as_str()), source })
}

/// Runs one publisher and `n` subscribers (pinned to core 1 when pinning; the publisher to core
/// 0) and returns the subscribers' reports and the publisher's own.
fn run_fanout(
    exe: &Path,
    spec: &PeerSpec,
    n: usize,
    pin: bool,
) -> Result<(Vec<PeerReport>, PeerReport), BenchRunError> {
    let what = format!("{} {:?} to {n} subscriber(s)", spec.transport.as_str(), spec.mode);
    let sub_spec = PeerSpec { core: pin.then_some(1), ..spec.clone() };
    let pub_spec = PeerSpec { core: pin.then_some(0), subscribers: n, ..spec.clone() };
    let mut subs: Vec<(std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>)> = Vec::new();
    for _ in 0..n {
        let mut sub = spawn_peer(exe, "sub", &sub_spec)?;
        let out =
            sub.stdout.take().ok_or_else(|| BenchRunError::Peer { what: what.clone(), detail: "no stdout".into() })?;
        let mut lines = BufReader::new(out).lines();
        if !matches!(lines.next(), Some(Ok(ref l)) if l == "ready") {
            let _ = sub.kill();
            for (mut s, _) in subs {
                let _ = s.kill();
            }
            return Err(BenchRunError::Peer { what, detail: "a subscriber did not get ready".into() });
        }
        subs.push((sub, lines));
    }
    let mut publ = spawn_peer(exe, "pub", &pub_spec)?;
    // Data flows once every subscriber has the publisher's first message (so has opened its side
    // of the connection): see `PeerSpec::handshake`.
    let mut failed = None;
    for (i, (_, lines)) in subs.iter_mut().enumerate() {
        let line = lines.next();
        if !matches!(line, Some(Ok(ref l)) if l == "connected") {
            failed = Some(format!("subscriber {i} did not connect: {line:?}"));
            break;
        }
    }
    if failed.is_none() && pub_spec.handshake {
        let go = publ.stdin.take().map(|mut s| s.write_all(b"go\n"));
        if !matches!(go, Some(Ok(()))) {
            failed = Some(format!("cannot start the publisher: {go:?}"));
        }
    }
    if let Some(detail) = failed {
        let _ = publ.kill();
        let _ = publ.wait();
        for (mut s, _) in subs {
            let _ = s.kill();
            let _ = s.wait();
        }
        return Err(BenchRunError::Peer { what, detail });
    }
    let pub_line = publ.stdout.take().and_then(|o| BufReader::new(o).lines().next());
    let pub_status = publ.wait().map_err(|source| BenchRunError::Spawn { what: what.clone(), source })?;
    let pub_report: PeerReport = match pub_line {
        Some(Ok(l)) => serde_json::from_str(&l)
            .map_err(|e| BenchRunError::Peer { what: what.clone(), detail: format!("bad report {l:?}: {e}") })?,
        other => {
            return Err(BenchRunError::Peer { what, detail: format!("no publisher report ({pub_status}): {other:?}") })
        }
    };
    let mut reports = Vec::new();
    for (mut sub, mut lines) in subs {
        let line = lines.next();
        let status = sub.wait().map_err(|source| BenchRunError::Spawn { what: what.clone(), source })?;
        if !status.success() || !pub_status.success() {
            return Err(BenchRunError::Peer { what, detail: format!("publisher {pub_status}, subscriber {status}") });
        }
        let line = match line {
            Some(Ok(l)) => l,
            other => return Err(BenchRunError::Peer { what, detail: format!("no report: {other:?}") }),
        };
        reports.push(
            serde_json::from_str(&line)
                .map_err(|e| BenchRunError::Peer { what: what.clone(), detail: format!("bad report {line:?}: {e}") })?,
        );
    }
    Ok((reports, pub_report))
}

/// Each subscriber's lag (a sample's age when it read it: publish → first frame read) as a note,
/// p50 and p99 as ranges over the subscribers; the row keeps the worst subscriber's p50 and p99.
fn lag_note(reports: &[PeerReport], row: &mut Row) -> String {
    let us = |ns: u64| ns as f64 / 1e3;
    let range = |f: fn(&PeerReport) -> u64| {
        let v: Vec<u64> = reports.iter().map(f).collect();
        (v.iter().copied().min().unwrap_or(0), v.iter().copied().max().unwrap_or(0))
    };
    let ((p50_lo, p50_hi), (p99_lo, p99_hi)) = (range(|r| r.p50_ns), range(|r| r.p99_ns));
    (row.p50_ns, row.p99_ns) = (p50_hi, p99_hi);
    format!(
        "lag per subscriber (publish → read): p50 {:.0}–{:.0} µs, p99 {:.0}–{:.0} µs",
        us(p50_lo),
        us(p50_hi),
        us(p99_lo),
        us(p99_hi)
    )
}

/// Runs one publisher/subscriber pair and returns the subscriber's report.
fn run_pair(exe: &Path, spec: &PeerSpec, pin: bool) -> Result<PeerReport, BenchRunError> {
    let what = format!("{} {:?}", spec.transport.as_str(), spec.mode);
    run_fanout(exe, spec, 1, pin)?.0.pop().ok_or_else(|| BenchRunError::Peer { what, detail: "no report".into() })
}

fn row(name: &str, t: Transport, r: &PeerReport) -> Row {
    Row {
        name: name.into(),
        transport: t.as_str().into(),
        messages: r.received,
        lost: r.lost,
        out_of_order: r.out_of_order,
        per_second: if r.elapsed_s > 0.0 { r.measured as f64 / r.elapsed_s } else { 0.0 },
        bytes_per_second: 0.0,
        p50_ns: r.p50_ns,
        p99_ns: r.p99_ns,
        p999_ns: r.p999_ns,
        max_ns: r.max_ns,
        ratio_vs_baseline: 1.0,
        rss_bytes: 0,
        note: String::new(),
    }
}

/// Runs `scenario` (`latency` or `throughput`).
pub fn run_scenario(scenario: &str, o: &BenchOptions) -> Result<ScenarioReport, BenchRunError> {
    let n = cores();
    let pin = o.pin && n >= 2;
    let bus = format!("bench{}", std::process::id());
    let socket = std::env::temp_dir().join(format!("mdbus-bench-{}.sock", std::process::id()));
    let base = |transport, mode, count| PeerSpec {
        transport,
        mode,
        count,
        bus: bus.clone(),
        socket: socket.clone(),
        core: None,
        subscribers: 1,
        block: false,
        lossy: false,
        handshake: true,
    };
    let mut rows = Vec::new();
    match scenario {
        "latency" => {
            let count = o.count.unwrap_or(if o.quick { 10_000 } else { 40_000 });
            let mode = Mode::Latency { rate: o.rate, warmup: count / 10 };
            let transports = [
                ("raw iceoryx2, same payload (baseline)", Transport::Iox2),
                ("unix socket, blocking read", Transport::Uds),
                ("mdbus frame via client library", Transport::Mdbus),
            ];
            // Several rounds in rotating order, histograms merged, so that a noisy moment hurts
            // every transport alike instead of whichever ran then.
            let rounds = if o.quick { 1 } else { 3 };
            let mut merged: Vec<Option<(hdrhistogram::Histogram<u64>, PeerReport)>> = vec![None, None, None];
            for round in 0..rounds {
                for k in 0..transports.len() {
                    let i = (k + round) % transports.len();
                    let r = run_pair(&o.exe, &base(transports[i].1, mode, count), pin)?;
                    let h = peer::decode_hist(&r.hist_hex).ok_or_else(|| BenchRunError::Peer {
                        what: transports[i].0.into(),
                        detail: "unreadable histogram".into(),
                    })?;
                    match &mut merged[i] {
                        Some((acc, rep)) => {
                            let _ = acc.add(&h);
                            rep.add_round(&r);
                        }
                        slot => *slot = Some((h, r)),
                    }
                }
            }
            for (i, m) in merged.into_iter().enumerate() {
                let Some((h, mut r)) = m else { continue };
                r.p50_ns = h.value_at_quantile(0.50);
                r.p99_ns = h.value_at_quantile(0.99);
                r.p999_ns = h.value_at_quantile(0.999);
                r.max_ns = h.max();
                rows.push(row(transports[i].0, transports[i].1, &r));
            }
            let base_p99 = rows[0].p99_ns.max(1) as f64;
            for r in &mut rows {
                r.ratio_vs_baseline = r.p99_ns as f64 / base_p99;
            }
        }
        "throughput" => {
            let count = o.count.unwrap_or(if o.quick { 1_000_000 } else { 10_000_000 });
            let transports = [
                ("raw iceoryx2, one frame per sample (baseline)", Transport::Iox2, count / 4),
                ("raw iceoryx2, 16 KiB samples, no framing", Transport::Iox2Batch, count),
                ("mdbus, frames batched per sample", Transport::Mdbus, count),
            ];
            // As for latency: the count split over rounds in rotating order, each transport's
            // frames and time summed, so that a slow spell of the VM (they last seconds here)
            // falls on every transport instead of on whichever ran then.
            let rounds = if o.quick { 1 } else { 3 };
            let mut merged: Vec<Option<PeerReport>> = vec![None, None, None];
            for round in 0..rounds {
                for k in 0..transports.len() {
                    let i = (k + round) % transports.len();
                    let (_, t, c) = transports[i];
                    let r = run_pair(&o.exe, &base(t, Mode::Throughput, (c / rounds as u64).max(1)), pin)?;
                    match &mut merged[i] {
                        Some(acc) => acc.add_round(&r),
                        slot => *slot = Some(r),
                    }
                }
            }
            for (i, m) in merged.into_iter().enumerate() {
                let Some(r) = m else { continue };
                let mut rw = row(transports[i].0, transports[i].1, &r);
                rw.p50_ns = 0;
                rw.p99_ns = 0;
                rw.p999_ns = 0;
                rw.max_ns = 0;
                rows.push(rw);
            }
            let base_rate = rows[0].per_second.max(1.0);
            for r in &mut rows {
                r.ratio_vs_baseline = r.per_second / base_rate;
            }
        }
        "fanout" => {
            let count = o.count.unwrap_or(if o.quick { 500_000 } else { 5_000_000 });
            // The broker's own settings first: the publisher never waits for a subscriber, so
            // its rate is what fan-out costs it; each subscriber gets what it can read in time.
            let mut lossy = Vec::new();
            for n in [1usize, 2, 4, 8] {
                let spec = PeerSpec { block: true, lossy: true, ..base(Transport::Mdbus, Mode::Throughput, count) };
                let (reports, publ) = run_fanout(&o.exe, &spec, n, pin)?;
                let received: Vec<u64> = reports.iter().map(|r| r.received).collect();
                let (lo, hi) =
                    (received.iter().copied().min().unwrap_or(0), received.iter().copied().max().unwrap_or(0));
                let mut rw = Row::rate(
                    &format!("publisher, lossy stream, {n} subscriber{}", if n == 1 { " (baseline)" } else { "s" }),
                    "mdbus",
                    publ.measured,
                    std::time::Duration::from_secs_f64(publ.elapsed_s.max(1e-9)),
                    0,
                );
                rw.messages = count;
                rw.lost = received.iter().map(|r| count - r.min(&count)).sum();
                rw.note = format!(
                    "each subscriber read {:.0}–{:.0} % of the frames; the rest were overwritten before it read them (its seq tracking counts them); {}",
                    lo as f64 * 100.0 / count as f64,
                    hi as f64 * 100.0 / count as f64,
                    lag_note(&reports, &mut rw)
                );
                lossy.push(rw);
            }
            let base_rate = lossy[0].per_second.max(1.0);
            for r in &mut lossy {
                r.ratio_vs_baseline = r.per_second / base_rate;
            }
            for n in [1usize, 2, 4, 8] {
                // Subscribers sleep on the stream's wake-up event when idle: N spinning
                // processes on one core would spend its time spinning instead of reading.
                let spec = PeerSpec { block: true, ..base(Transport::Mdbus, Mode::Throughput, count) };
                let (reports, _) = run_fanout(&o.exe, &spec, n, pin)?;
                // Each subscriber's rate over its frames after the warm-up; the row is the slowest's.
                let rate = |r: &PeerReport| r.measured as f64 / r.elapsed_s.max(1e-9);
                let slowest = reports.iter().min_by(|a, b| rate(a).total_cmp(&rate(b)));
                let (slowest_rate, fastest_rate) =
                    (slowest.map_or(0.0, rate), reports.iter().map(rate).fold(0.0, f64::max));
                let (last_done, first_done) = (
                    reports.iter().map(|r| r.elapsed_s).fold(0.0, f64::max),
                    reports.iter().map(|r| r.elapsed_s).fold(f64::INFINITY, f64::min),
                );
                let received: u64 = reports.iter().map(|r| r.received).sum();
                let mut rw = Row::rate(
                    &format!("mdbus, {n} subscriber process{}", if n == 1 { " (baseline)" } else { "es" }),
                    "mdbus",
                    slowest.map_or(0, |r| r.measured),
                    std::time::Duration::from_secs_f64(slowest.map_or(1.0, |r| r.elapsed_s.max(1e-9))),
                    0,
                );
                rw.messages = count;
                rw.lost = reports.iter().map(|r| r.lost).sum();
                rw.out_of_order = reports.iter().map(|r| r.out_of_order).sum();
                rw.name = format!(
                    "lossless stream, {n} subscriber{}: the slowest's rate",
                    if n == 1 { " (baseline)" } else { "s" }
                );
                rw.note = format!(
                    "{received} frames delivered in all; per subscriber {:.2}–{:.2} M frames/s; last one done {:.0} ms after the first; {}",
                    slowest_rate / 1e6,
                    fastest_rate / 1e6,
                    (last_done - first_done) * 1e3,
                    lag_note(&reports, &mut rw)
                );
                rows.push(rw);
            }
            let base_rate = rows[0].per_second.max(1.0);
            for r in &mut rows {
                r.ratio_vs_baseline = r.per_second / base_rate;
            }
            lossy.append(&mut rows);
            rows = lossy;
        }
        "broker" | "memory" | "recovery" => {
            let tmp = std::env::temp_dir().join(format!("mdbus-bench-{scenario}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)
                .map_err(|e| BenchRunError::Peer { what: scenario.into(), detail: e.to_string() })?;
            let r = match scenario {
                "broker" => systembench::broker(o, &tmp),
                "memory" => systembench::memory(o, &tmp),
                _ => systembench::recovery(o, &tmp),
            };
            let _ = std::fs::remove_dir_all(&tmp);
            rows = r?;
        }
        "wal" => {
            let tmp = std::env::temp_dir().join(format!("mdbus-bench-wal-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)
                .map_err(|e| BenchRunError::Peer { what: "wal".into(), detail: e.to_string() })?;
            let r = walbench::run(o, &tmp);
            let _ = std::fs::remove_dir_all(&tmp);
            rows = r?;
        }
        "gateway" => rows = gatewaybench::run(o, o.clients)?,
        "batch" => {
            let tmp = std::env::temp_dir().join(format!("mdbus-bench-batch-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)
                .map_err(|e| BenchRunError::Peer { what: "batch".into(), detail: e.to_string() })?;
            let r = batchbench::run(o, &tmp);
            let _ = std::fs::remove_dir_all(&tmp);
            rows = r?;
        }
        "ingest" => {
            let tmp = std::env::temp_dir().join(format!("mdbus-bench-ingest-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)
                .map_err(|e| BenchRunError::Peer { what: "ingest".into(), detail: e.to_string() })?;
            let r = ingestbench::run(o, &tmp);
            let _ = std::fs::remove_dir_all(&tmp);
            rows = r?;
        }
        other => return Err(BenchRunError::UnknownScenario(other.into())),
    }
    Ok(ScenarioReport {
        scenario: scenario.into(),
        payload_bytes: peer::payload_len(),
        cores: n,
        pinned: pin,
        cpu: cpu_model(),
        rows,
    })
}

/// A readable table of a report.
pub fn render_table(r: &ScenarioReport) -> String {
    let mut s = format!(
        "{} — payload {} B, {} cores ({}), pinned: {}\n",
        r.scenario, r.payload_bytes, r.cores, r.cpu, r.pinned
    );
    if r.scenario == "latency" {
        s.push_str(&format!(
            "{:<40} {:>9} {:>6} {:>9} {:>9} {:>9} {:>10} {:>12}\n",
            "transport", "messages", "lost", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "p99 ratio"
        ));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<40} {:>9} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>10.1} {:>11.2}x\n",
                x.name,
                x.messages,
                x.lost,
                x.p50_ns as f64 / 1e3,
                x.p99_ns as f64 / 1e3,
                x.p999_ns as f64 / 1e3,
                x.max_ns as f64 / 1e3,
                x.ratio_vs_baseline
            ));
        }
    } else if r.scenario == "gateway" {
        s.push_str(&format!(
            "{:<58} {:>10} {:>11} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}\n",
            "case", "messages", "msgs/s", "p50 µs", "p99 µs", "p99.9 µs", "conflated", "dropped", "p99 ratio"
        ));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<58} {:>10} {:>11.0} {:>8.0} {:>8.0} {:>9.0} {:>9} {:>9} {:>8.2}x\n",
                x.name,
                x.messages,
                x.per_second,
                x.p50_ns as f64 / 1e3,
                x.p99_ns as f64 / 1e3,
                x.p999_ns as f64 / 1e3,
                x.out_of_order,
                x.lost,
                x.ratio_vs_baseline
            ));
        }
        s.push_str(
            "(conflated: K-line updates replaced by newer ones for lagging clients; dropped: clients disconnected)\n",
        );
    } else if r.scenario == "fanout" || r.scenario == "broker" {
        let unit = if r.scenario == "broker" { "trades" } else { "frames" };
        s.push_str(&format!(
            "{:<52} {:>10} {:>6} {:>13} {:>8}  {}\n",
            "case", unit, "lost", "per second", "ratio", "notes"
        ));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<52} {:>10} {:>6} {:>13.0} {:>7.2}x  {}\n",
                x.name, x.messages, x.lost, x.per_second, x.ratio_vs_baseline, x.note
            ));
        }
    } else if r.scenario == "memory" {
        s.push_str(&format!("{:<44} {:>8} {:>10} {:>8}  {}\n", "case", "symbols", "RSS MB", "ratio", "notes"));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<44} {:>8} {:>10.1} {:>7.2}x  {}\n",
                x.name,
                x.messages,
                x.rss_bytes as f64 / 1e6,
                x.ratio_vs_baseline,
                x.note
            ));
        }
    } else if r.scenario == "recovery" {
        s.push_str(&format!("{:<48} {:>16} {:>8}  {}\n", "case", "to first frame", "ratio", "notes"));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<48} {:>13.1} ms {:>7.2}x  {}\n",
                x.name,
                x.p50_ns as f64 / 1e6,
                x.ratio_vs_baseline,
                x.note
            ));
        }
    } else if r.scenario == "batch" {
        s.push_str(&format!(
            "{:<75} {:>9} {:>11} {:>9} {:>9} {:>8}\n",
            "case", "rows", "rows/s", "p50 ms", "p99 ms", "ratio"
        ));
        for x in &r.rows {
            if x.per_second > 0.0 {
                s.push_str(&format!(
                    "{:<75} {:>9} {:>11.0} {:>9.1} {:>9.1} {:>7.2}x\n",
                    x.name,
                    x.messages,
                    x.per_second,
                    x.p50_ns as f64 / 1e6,
                    x.p99_ns as f64 / 1e6,
                    x.ratio_vs_baseline
                ));
            } else {
                s.push_str(&format!(
                    "{:<75} {:>9} {:>11} {:>9.1} {:>9} {:>7.2}x\n",
                    x.name,
                    "",
                    "",
                    x.p50_ns as f64 / 1e6,
                    "",
                    x.ratio_vs_baseline
                ));
            }
            if !x.note.is_empty() {
                s.push_str(&format!("    {}\n", x.note));
            }
        }
    } else if r.scenario == "ingest" {
        s.push_str(&format!("{:<52} {:>10} {:>13} {:>10} {:>8}\n", "case", "trades", "per second", "ns each", "ratio"));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<52} {:>10} {:>13.0} {:>10} {:>7.2}x\n",
                x.name, x.messages, x.per_second, x.p50_ns, x.ratio_vs_baseline
            ));
        }
    } else if r.scenario == "wal" {
        s.push_str(&format!(
            "{:<50} {:>10} {:>13} {:>9} {:>9} {:>9} {:>8}\n",
            "case", "frames", "frames/s", "MB/s", "p50 µs", "p99 µs", "ratio"
        ));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<50} {:>10} {:>13.0} {:>9.1} {:>9.2} {:>9.2} {:>7.2}x\n",
                x.name,
                x.messages,
                x.per_second,
                x.bytes_per_second / 1e6,
                x.p50_ns as f64 / 1e3,
                x.p99_ns as f64 / 1e3,
                x.ratio_vs_baseline
            ));
        }
    } else {
        s.push_str(&format!("{:<48} {:>10} {:>6} {:>14} {:>8}\n", "transport", "frames", "lost", "frames/s", "ratio"));
        for x in &r.rows {
            s.push_str(&format!(
                "{:<48} {:>10} {:>6} {:>14.0} {:>7.2}x\n",
                x.name, x.messages, x.lost, x.per_second, x.ratio_vs_baseline
            ));
        }
    }
    s
}
