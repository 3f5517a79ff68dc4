//! `gateway`: WebSocket clients on loopback against `mdbus gateway`, fed by a synthetic broker.
//!
//! Three processes: the broker (synthetic feed, WAL off), the gateway, and this one, which runs
//! the clients on one tokio thread. Each client asks for four streams spread over 100 symbols
//! (`@trade`, `@kline_1s`, `@kline_1m`, `@kline_1h`) with `timeUnit=MICROSECOND`, so the
//! latency publish → client receive is `receive time − E` (µs; both on the host's clock).
//!
//! - **Sustained throughput**: the broker's rate goes up a ladder; a step counts as sustained when
//!   every client stays connected, the gateway conflated nothing, and the clients received at
//!   least 95 % of what the gateway queued for them in the window.
//! - **Latency at half that load**: p50/p99/p99.9 at half the best sustained broker rate.
//! - **A stuck client**: 100 clients at a fixed rate, alone (the baseline) and beside one client
//!   that never reads; the ratio is their p99 with it over their p99 without.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio_tungstenite::tungstenite::Message;

use crate::{BenchOptions, BenchRunError, Row};

const SYMBOLS: usize = 100;
const TOPICS: [&str; 4] = ["trade", "kline_1s", "kline_1m", "kline_1h"];

fn err(what: &str, detail: impl ToString) -> BenchRunError {
    BenchRunError::Peer { what: what.into(), detail: detail.to_string() }
}

struct Child2(Child);
impl Drop for Child2 {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_broker(exe: &Path, bus: &str, data: &Path, rate: f64) -> Result<Child2, BenchRunError> {
    let child = Command::new(exe)
        .args(["broker", "--bus", bus, "--source", "synthetic", "--no-wal", "--steady"])
        .args(["--symbols", &SYMBOLS.to_string(), "--rate", &rate.to_string()])
        .env("MDBUS_DATA_DIR", data)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| BenchRunError::Spawn { what: "broker".into(), source })?;
    Ok(Child2(child))
}

fn start_gateway(exe: &Path, bus: &str, data: &Path, core: Option<usize>) -> Result<(Child2, u16), BenchRunError> {
    let mut cmd = Command::new(exe);
    cmd.args(["gateway", "--bus", bus, "--listen", "127.0.0.1:0", "--max-connections", "5000"])
        .env("MDBUS_DATA_DIR", data)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(c) = core {
        cmd.args(["--core", &c.to_string()]);
    }
    let mut child = cmd.spawn().map_err(|source| BenchRunError::Spawn { what: "gateway".into(), source })?;
    let out = child.stdout.take().ok_or_else(|| err("gateway", "no stdout"))?;
    let mut lines = BufReader::new(out).lines();
    let child = Child2(child);
    let first = match lines.next() {
        Some(Ok(l)) => l,
        other => return Err(err("gateway", format!("did not start: {other:?}"))),
    };
    let port = first
        .split("ws://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| err("gateway", format!("no port in {first:?}")))?;
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Ok((child, port))
}

/// The gateway's counters (`/health`).
fn gateway_stats(port: u16) -> Result<serde_json::Value, BenchRunError> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| err("gateway /health", e))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| err("gateway /health", e))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| err("gateway /health", e))?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| err("gateway /health", e))?;
    Ok(v["stats"].clone())
}

fn stat(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// What the clients measured, shared by their tasks (one thread: the locks are uncontended).
struct Shared {
    received: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    recording: AtomicBool,
    hist: Mutex<Histogram<u64>>,
}

impl Shared {
    fn new() -> Result<Arc<Shared>, BenchRunError> {
        Ok(Arc::new(Shared {
            received: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| err("histogram", e))?),
        }))
    }
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// `"E":<digits>` of an event.
fn event_time(text: &str) -> Option<i64> {
    let at = text.find("\"E\":")? + 4;
    let digits: &str = &text[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn client_path(i: usize, symbols: &[String]) -> String {
    let mut streams = Vec::with_capacity(4);
    for j in 0..4usize {
        // A fixed spread: client i, stream j → symbol and topic from a multiplicative hash.
        let h = (i * 4 + j).wrapping_mul(2_654_435_761) % (SYMBOLS * TOPICS.len());
        let s = symbols[h % SYMBOLS].to_ascii_lowercase();
        streams.push(format!("{s}@{}", TOPICS[h / SYMBOLS]));
    }
    format!("/ws/{}?timeUnit=MICROSECOND", streams.join("/"))
}

async fn client(url: String, shared: Arc<Shared>) {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            shared.received.fetch_add(1, Ordering::Relaxed);
            if shared.recording.load(Ordering::Relaxed) {
                if let Some(e) = event_time(&t) {
                    let lat = (now_us() - e).max(1) as u64;
                    if let Ok(mut h) = shared.hist.lock() {
                        let _ = h.record(lat.min(60_000_000));
                    }
                }
            }
        }
    }
    shared.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Connects and never reads.
async fn stuck_client(url: String) {
    if let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await {
        std::future::pending::<()>().await;
        drop(ws);
    }
}

struct Window {
    received: u64,
    queued: u64,
    conflated: u64,
    disconnected: u64,
    secs: f64,
    hist: Histogram<u64>,
}

/// Measures over `secs` after `warm` seconds.
async fn window(shared: &Shared, port: u16, warm: f64, secs: f64) -> Result<Window, BenchRunError> {
    tokio::time::sleep(Duration::from_secs_f64(warm)).await;
    if let Ok(mut h) = shared.hist.lock() {
        h.reset();
    }
    shared.recording.store(true, Ordering::Relaxed);
    let s0 = gateway_stats(port)?;
    let r0 = shared.received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let r1 = shared.received.load(Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let s1 = gateway_stats(port)?;
    shared.recording.store(false, Ordering::Relaxed);
    let hist = shared.hist.lock().map_err(|e| err("histogram", e))?.clone();
    Ok(Window {
        received: r1 - r0,
        queued: stat(&s1, "messages_queued") - stat(&s0, "messages_queued"),
        conflated: stat(&s1, "conflated") - stat(&s0, "conflated"),
        disconnected: stat(&s1, "disconnected_slow") - stat(&s0, "disconnected_slow"),
        secs: el,
        hist,
    })
}

fn window_row(name: String, w: &Window) -> Row {
    Row {
        name,
        transport: "gateway".into(),
        messages: w.received,
        lost: w.disconnected,
        out_of_order: w.conflated,
        per_second: w.received as f64 / w.secs.max(1e-9),
        bytes_per_second: 0.0,
        p50_ns: w.hist.value_at_quantile(0.50) * 1000,
        p99_ns: w.hist.value_at_quantile(0.99) * 1000,
        p999_ns: w.hist.value_at_quantile(0.999) * 1000,
        max_ns: w.hist.max() * 1000,
        ratio_vs_baseline: 1.0,
    }
}

/// Runs the gateway scenario with `clients` clients.
pub fn run(o: &BenchOptions, clients: usize) -> Result<Vec<Row>, BenchRunError> {
    let bus = format!("benchgw{}", std::process::id());
    let data = std::env::temp_dir().join(format!("mdbus-bench-gw-{}", std::process::id()));
    let r = run_in(o, clients, &bus, &data);
    let _ = std::fs::remove_dir_all(&data);
    r
}

fn run_in(o: &BenchOptions, clients: usize, bus: &str, data: &Path) -> Result<Vec<Row>, BenchRunError> {
    let symbols = mdbus_publisher::synthetic::symbol_names(SYMBOLS);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| err("tokio", e))?;
    let (_gateway, port) = start_gateway(&o.exe, bus, data, None)?;
    let (warm, secs) = if o.quick { (1.0, 2.0) } else { (2.0, 5.0) };
    let ladder: &[f64] = if o.quick { &[2_000.0, 8_000.0] } else { &[2_000.0, 4_000.0, 8_000.0, 16_000.0, 32_000.0] };
    let mut rows = Vec::new();

    rt.block_on(async {
        let shared = Shared::new()?;
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                tokio::spawn(client(format!("ws://127.0.0.1:{port}{}", client_path(i, &symbols)), Arc::clone(&shared)))
            })
            .collect();
        let start = Instant::now();
        while (shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)) < clients as u64 {
            if start.elapsed() > Duration::from_secs(60) {
                return Err(err("gateway clients", "not all connected within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if shared.failed.load(Ordering::Relaxed) > 0 {
            return Err(err("gateway clients", format!("{} failed to connect", shared.failed.load(Ordering::Relaxed))));
        }

        // Sustained throughput: up the ladder until a step is not sustained.
        let mut best: Option<(f64, Window)> = None;
        for &rate in ladder {
            let broker = start_broker(&o.exe, bus, data, rate)?;
            let w = window(&shared, port, warm, secs).await?;
            drop(broker);
            let ok = shared.connected.load(Ordering::Relaxed) == clients as u64
                && w.conflated == 0
                && w.disconnected == 0
                && w.received as f64 >= 0.95 * w.queued as f64;
            let mut r = window_row(format!("{clients} clients, broker {rate:.0} trades/s"), &w);
            r.name.push_str(if ok { " (sustained)" } else { " (not sustained)" });
            rows.push(r);
            if !ok {
                break;
            }
            best = Some((rate, w));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let Some((best_rate, _)) = best else {
            return Err(err("gateway", "not even the first step was sustained"));
        };

        // Latency at half that load.
        let broker = start_broker(&o.exe, bus, data, best_rate / 2.0)?;
        let w = window(&shared, port, warm, secs).await?;
        rows.push(window_row(format!("{clients} clients, half load ({:.0} trades/s): latency", best_rate / 2.0), &w));
        drop(broker);
        for t in tasks {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;

        // A stuck client beside 100 others.
        let rate = 2_000.0;
        let few = Shared::new()?;
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                tokio::spawn(client(format!("ws://127.0.0.1:{port}{}", client_path(i, &symbols)), Arc::clone(&few)))
            })
            .collect();
        while few.connected.load(Ordering::Relaxed) + few.failed.load(Ordering::Relaxed) < 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let broker = start_broker(&o.exe, bus, data, rate)?;
        let alone = window(&few, port, warm, secs).await?;
        let mut stuck_streams: Vec<String> = Vec::new();
        for s in symbols.iter().take(20) {
            for t in TOPICS {
                stuck_streams.push(format!("{}@{t}", s.to_ascii_lowercase()));
            }
        }
        let stuck = tokio::spawn(stuck_client(format!("ws://127.0.0.1:{port}/ws/{}", stuck_streams.join("/"))));
        let beside = window(&few, port, warm, secs).await?;
        drop(broker);
        stuck.abort();
        for t in tasks {
            t.abort();
        }
        let mut a = window_row(format!("100 clients, {rate:.0} trades/s (baseline)"), &alone);
        let mut b = window_row(format!("100 clients + 1 that never reads, {rate:.0} trades/s"), &beside);
        a.ratio_vs_baseline = 1.0;
        b.ratio_vs_baseline = b.p99_ns as f64 / a.p99_ns.max(1) as f64;
        rows.push(a);
        rows.push(b);
        Ok::<_, BenchRunError>(())
    })?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_time_is_read_from_the_message() {
        assert_eq!(super::event_time(r#"{"e":"trade","E":1795244808668123,"s":"X"}"#), Some(1_795_244_808_668_123));
        assert_eq!(super::event_time(r#"{"result":null}"#), None);
    }
}
