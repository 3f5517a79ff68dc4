//! `gateway`: WebSocket clients on loopback against `mdbus gateway`, fed by a synthetic broker.
//!
//! Three processes: the broker (synthetic feed, WAL off), the gateway, and this one, which runs
//! the clients on one tokio thread. Each client asks for four streams spread over 100 symbols
//! (`@trade`, `@kline_1s`, `@kline_1m`, `@kline_1h`) with `timeUnit=MICROSECOND`, so the
//! latency publish → client receive is `receive time − E` (µs; both on the host's clock).
//!
//! - **Sustained throughput**: the broker's rate goes up a ladder; a step counts as sustained when
//!   every client stays connected, the gateway conflated nothing, the clients received at least
//!   95 % of what the gateway queued for them in the window, and p99 stayed under 1 s.
//! - **Latency at half that load**: p50/p99/p99.9 at half the best sustained broker rate.
//! - **A stuck client**: 100 clients at a fixed rate, alone (the baseline) and beside one client
//!   that asks for 1020 streams and never reads; the ratio is their p99 with it over their p99
//!   without (alternating rounds, merged).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

fn start_gateway(exe: &Path, bus: &str, data: &Path, threads: usize) -> Result<(Child2, u16), BenchRunError> {
    let mut cmd = Command::new(exe);
    cmd.args(["gateway", "--bus", bus, "--listen", "127.0.0.1:0", "--max-connections", "5000"])
        .args(["--threads", &threads.to_string()])
        .env("MDBUS_DATA_DIR", data)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
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
fn event_time(text: &[u8]) -> Option<i64> {
    let at = text.windows(4).position(|w| w == b"\"E\":")? + 4;
    let mut v: i64 = 0;
    let mut any = false;
    for &c in &text[at..] {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
        any = true;
    }
    any.then_some(v)
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

/// Opens a WebSocket the way a load generator does: the upgrade request by hand, the `101`
/// checked. Returns the stream and any frame bytes that came with the response.
async fn open_ws(port: u16, path: &str) -> std::io::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: bWRidXMtYmVuY2gtY2xpZW50\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed during the handshake"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                return Err(std::io::Error::other(String::from_utf8_lossy(&buf[..end]).into_owned()));
            }
            return Ok((s, buf.split_off(end + 4)));
        }
    }
}

/// A lean client: reads server frames (unmasked) straight from the socket into one reused
/// buffer, no allocation or UTF-8 check per message, so that the measurement is the gateway's
/// work rather than the client library's (the clients share the machine with the gateway).
async fn client(port: u16, path: String, shared: Arc<Shared>) {
    let Ok((mut s, mut buf)) = open_ws(port, &path).await else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    buf.reserve(64 * 1024);
    let mut start = 0;
    'read: loop {
        // Parse every whole frame in buf[start..].
        loop {
            let have = &buf[start..];
            if have.len() < 2 {
                break;
            }
            let opcode = have[0] & 0x0f;
            let (len, hdr) = match have[1] & 0x7f {
                126 if have.len() >= 4 => (usize::from(u16::from_be_bytes([have[2], have[3]])), 4),
                127 if have.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&have[2..10]);
                    (usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX), 10)
                }
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if have.len() < hdr + len {
                break;
            }
            match opcode {
                1 => {
                    shared.received.fetch_add(1, Ordering::Relaxed);
                    if shared.recording.load(Ordering::Relaxed) {
                        if let Some(e) = event_time(&have[hdr..hdr + len]) {
                            let lat = (now_us() - e).max(1) as u64;
                            if let Ok(mut h) = shared.hist.lock() {
                                let _ = h.record(lat.min(60_000_000));
                            }
                        }
                    }
                }
                8 => break 'read,
                _ => {}
            }
            start += hdr + len;
        }
        if start > 0 {
            buf.drain(..start);
            start = 0;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        // Into the spare capacity: nothing zeroed per read.
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    shared.connected.fetch_sub(1, Ordering::Relaxed);
}

/// Connects and never reads.
async fn stuck_client(port: u16, path: String) {
    if let Ok((s, _)) = open_ws(port, &path).await {
        std::future::pending::<()>().await;
        drop(s);
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

fn merge(acc: &mut Option<Window>, w: Window) {
    match acc {
        None => *acc = Some(w),
        Some(a) => {
            a.received += w.received;
            a.queued += w.queued;
            a.conflated += w.conflated;
            a.disconnected += w.disconnected;
            a.secs += w.secs;
            let _ = a.hist.add(&w.hist);
        }
    }
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
        rss_bytes: 0,
        note: String::new(),
    }
}

/// Connects `clients` clients (client i asks for `client_path(i)`); fails unless all connect.
async fn connect_all(
    port: u16,
    clients: usize,
    symbols: &[String],
) -> Result<(Arc<Shared>, Vec<tokio::task::JoinHandle<()>>), BenchRunError> {
    let shared = Shared::new()?;
    let tasks: Vec<_> =
        (0..clients).map(|i| tokio::spawn(client(port, client_path(i, symbols), Arc::clone(&shared)))).collect();
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
    Ok((shared, tasks))
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
    let (_gateway, port) = start_gateway(&o.exe, bus, data, o.gateway_threads)?;
    let (warm, secs) = if o.quick { (1.0, 2.0) } else { (2.0, 5.0) };
    let ladder: &[f64] = if o.quick {
        &[1_000.0, 8_000.0]
    } else {
        &[500.0, 1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0, 32_000.0, 64_000.0]
    };
    let mut rows = Vec::new();

    rt.block_on(async {
        let (shared, tasks) = connect_all(port, clients, &symbols).await?;

        // Sustained throughput: up the ladder until a step is not sustained.
        let mut best: Option<(f64, Window)> = None;
        for &rate in ladder {
            let broker = start_broker(&o.exe, bus, data, rate)?;
            let w = window(&shared, port, warm, secs).await?;
            drop(broker);
            let ok = shared.connected.load(Ordering::Relaxed) == clients as u64
                && w.conflated == 0
                && w.disconnected == 0
                && w.received as f64 >= 0.95 * w.queued as f64
                && w.hist.value_at_quantile(0.99) < 1_000_000;
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

        // Latency at half that load, with fresh clients (the last step may have pushed some past
        // their queue after its window).
        for t in tasks {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (shared, tasks) = connect_all(port, clients, &symbols).await?;
        let broker = start_broker(&o.exe, bus, data, best_rate / 2.0)?;
        let w = window(&shared, port, warm, secs).await?;
        if shared.connected.load(Ordering::Relaxed) != clients as u64 {
            return Err(err("gateway", "clients were disconnected at half load"));
        }
        rows.push(window_row(format!("{clients} clients, half load ({:.0} trades/s): latency", best_rate / 2.0), &w));
        drop(broker);
        for t in tasks {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;

        // A stuck client beside 100 others.
        let rate = 2_000.0;
        let (few, tasks) = connect_all(port, 100, &symbols).await?;
        let broker = start_broker(&o.exe, bus, data, rate)?;
        // The stuck client asks for 1020 streams (60 symbols × trade and 16 intervals): its socket
        // buffers fill within a second, then its outbox conflates and, in the end, drops it.
        let mut stuck_streams: Vec<String> = Vec::new();
        for s in symbols.iter().take(60) {
            let s = s.to_ascii_lowercase();
            stuck_streams.push(format!("{s}@trade"));
            for i in ["1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"]
            {
                stuck_streams.push(format!("{s}@kline_{i}"));
            }
        }
        let stuck_path = format!("/ws/{}", stuck_streams.join("/"));
        // Rounds alternate alone / beside, so that a noisy moment hurts both alike.
        let rounds = if o.quick { 1 } else { 3 };
        let mut alone: Option<Window> = None;
        let mut beside: Option<Window> = None;
        for _ in 0..rounds {
            let w = window(&few, port, warm, secs).await?;
            merge(&mut alone, w);
            let stuck = tokio::spawn(stuck_client(port, stuck_path.clone()));
            let w = window(&few, port, warm, secs).await?;
            merge(&mut beside, w);
            stuck.abort();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(broker);
        for t in tasks {
            t.abort();
        }
        let (Some(alone), Some(beside)) = (alone, beside) else { return Err(err("gateway", "no rounds")) };
        let mut a = window_row(format!("100 clients, {rate:.0} trades/s (baseline)"), &alone);
        let mut b = window_row("100 clients + 1 that never reads (1020 streams)".to_string(), &beside);
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
        assert_eq!(super::event_time(br#"{"e":"trade","E":1795244808668123,"s":"X"}"#), Some(1_795_244_808_668_123));
        assert_eq!(super::event_time(br#"{"result":null}"#), None);
    }
}
