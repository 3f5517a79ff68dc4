//! `mdbus demo`: the main job on embedded defaults, no network.
//!
//! Starts `mdbus mock-exchange` (synthetic trades, Binance protocol), `mdbus batch` (the
//! delayed-batch writer on SQLite, `batch.db`), `mdbus broker` connected to the exchange as a live
//! source with durable K-lines (snapshots acked by the writer; a restart continues from the
//! database), and `mdbus gateway` (WebSocket, Binance protocol, `/api/v3/klines` from the
//! database) as child processes on bus `demo`, prints the endpoints and a ready-to-paste client command,
//! subscribes to the real-time stream and prints a one-line summary per second: frames/s, last
//! seq, gaps, publisher health and the live 1m K-line of the first symbol. Ctrl-C (or SIGTERM)
//! stops the children, waits for them, and checks that the bus left no shared memory behind.

use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use mdbus_schema::{Fixed, FrameKind, Interval};
use mdbus_subscribers::{Reader, ReaderOptions, WaitMode};

use crate::config::Config;
use crate::Cli;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Symbols for the synthetic feed (count or list).
    #[arg(long, default_value = "5")]
    pub symbols: String,
    /// Average trades per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// The gateway's address (port 0: any free port) [default: gateway.listen; a free port if
    /// that one is taken].
    #[arg(long, value_name = "ADDR")]
    pub gateway_listen: Option<std::net::SocketAddr>,
}

/// `wanted` if it can be listened on now (port 0: the free port found), else a free loopback
/// port: where a child serves its metrics, known before it starts so that it can be printed.
fn free_or(wanted: &str) -> String {
    std::net::TcpListener::bind(wanted)
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .and_then(|l| l.local_addr())
        .map_or_else(|_| "127.0.0.1:0".to_owned(), |a| a.to_string())
}

/// The children log as the demo does (`--log-format json` reaches them all).
fn log_args(cli: &Cli) -> Vec<String> {
    match cli.log_format {
        crate::LogFormat::Json => vec!["--log-format".into(), "json".into()],
        crate::LogFormat::Text => Vec::new(),
    }
}

/// Where each child serves its metrics.
#[derive(Debug, Clone)]
struct MetricsAddrs {
    broker: String,
    gateway: String,
    exchange: String,
}

/// Starts `mdbus gateway` on `listen`; returns it and the address it serves once it is ready.
fn spawn_gateway(cli: &Cli, listen: &str, metrics: &str, db: &str) -> Result<(Child, String)> {
    let mut args = vec!["gateway".to_string(), "--bus".into(), cli.bus(), "--listen".into(), listen.into()];
    args.extend(["--db".into(), db.into()]);
    args.extend(["--metrics".into(), metrics.into()]);
    args.extend(log_args(cli));
    if let Some(c) = &cli.config {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    spawn_service(&args, "gateway", listen)
}

/// Starts `mdbus mock-exchange` (synthetic trades) on a free port.
fn spawn_exchange(cli: &Cli, a: &DemoArgs, metrics: &str) -> Result<(Child, String)> {
    let rate = a.rate.to_string();
    let mut args: Vec<String> =
        ["mock-exchange", "--listen", "127.0.0.1:0", "--symbols", &a.symbols, "--rate", &rate, "--metrics", metrics]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(log_args(cli));
    spawn_service(&args, "mock exchange", "127.0.0.1:0")
}

/// Starts `mdbus <args>` in its own process group; returns it and the first line it prints (its
/// readiness), or stops it and fails after 20 s without one. Its stdout is drained afterwards so
/// that it never blocks on a full pipe.
fn spawn_ready(args: &[String], name: &str) -> Result<(Child, Option<String>)> {
    let exe = std::env::current_exe().context("locating the mdbus executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().with_context(|| format!("starting the {name} process"))?;
    let out = child.stdout.take().with_context(|| format!("{name} stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(out).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    let line = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Some(Ok(line))) => Some(line),
        _ => {
            stop_child(&mut child, name);
            None
        }
    };
    Ok((child, line))
}

/// Starts `mdbus <args>`; returns it and the `ws://` address it prints once ready.
fn spawn_service(args: &[String], name: &str, listen: &str) -> Result<(Child, String)> {
    let (mut child, line) = spawn_ready(args, name)?;
    let Some(line) = line else { anyhow::bail!("the {name} did not start on {listen} (see its error above)") };
    match line.split("ws://").nth(1).and_then(|r| r.split_whitespace().next()) {
        Some(addr) => Ok((child, addr.to_owned())),
        None => {
            stop_child(&mut child, name);
            anyhow::bail!("the {name} printed {line:?} instead of its address")
        }
    }
}

/// Starts `mdbus batch` on `db`; returns once it is subscribed.
fn spawn_batch(cli: &Cli, db: &str, metrics: &str) -> Result<Child> {
    let mut args: Vec<String> =
        ["batch", "--bus", &cli.bus(), "--db", db, "--metrics", metrics].iter().map(|s| s.to_string()).collect();
    args.extend(log_args(cli));
    if let Some(c) = &cli.config {
        args.extend(["--config".into(), c.display().to_string()]);
    }
    match spawn_ready(&args, "batch writer")? {
        (child, Some(line)) if line == "batch writer ready" => Ok(child),
        (mut child, _) => {
            stop_child(&mut child, "batch writer");
            anyhow::bail!("the batch writer did not start on {db} (see its error above)")
        }
    }
}

fn spawn_broker(cli: &Cli, a: &DemoArgs, exchange: &str, metrics: &str, db: &str) -> Result<Child> {
    let bus = cli.bus();
    let exe = std::env::current_exe().context("locating the mdbus executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("broker").arg("--bus").arg(&bus).arg("--source").arg(format!("ws:ws://{exchange}"));
    cmd.arg("--symbols").arg(&a.symbols).arg("--metrics").arg(metrics).arg("--db").arg(db);
    cmd.args(log_args(cli));
    if let Some(c) = &cli.config {
        cmd.arg("--config").arg(c);
    }
    cmd.stdin(Stdio::null());
    // Its own process group: a terminal's Ctrl-C reaches only the demo, which then stops the
    // broker with one SIGTERM (a second signal would make it exit without cleaning up).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn().context("starting the broker process")
}

fn stop_child(child: &mut Child, name: &str) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(status)) = child.try_wait() {
            println!("demo: {name} (pid {}) stopped: {status}", child.id());
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("demo: {name} did not stop within 5 s; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Shared-memory files of `bus` still present, ignoring iceoryx2's persistent node counter
/// (`*.global_mgmt`, a few bytes per bus name, reused by the next start).
pub fn leftover_shm(bus: &str) -> Vec<String> {
    let prefix = mdbus_bus::file_prefix(bus);
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix) && !n.ends_with(".global_mgmt"))
                .collect()
        })
        .unwrap_or_default()
}

pub fn run(cli: &Cli, a: &DemoArgs) -> Result<ExitCode> {
    let bus = cli.bus();
    let cfg = Config::load(cli.config.as_deref())?;
    let stop = crate::signals::stop_flag()?;
    let m = MetricsAddrs {
        broker: free_or(&cfg.metrics.broker),
        gateway: free_or(&cfg.metrics.gateway),
        exchange: free_or(&cfg.metrics.mock_exchange),
    };
    let batch_metrics = free_or("127.0.0.1:0");
    // (`Store::open` creates a SQLite file's folder.)
    let db = cfg.batch.db_for(&bus)?.to_string();
    let (mut exchange, exchange_addr) = spawn_exchange(cli, a, &m.exchange)?;
    let mut batch = match spawn_batch(cli, &db, &batch_metrics) {
        Ok(b) => b,
        Err(e) => {
            stop_child(&mut exchange, "mock exchange");
            return Err(e);
        }
    };
    let mut broker = match spawn_broker(cli, a, &exchange_addr, &m.broker, &db) {
        Ok(b) => b,
        Err(e) => {
            stop_child(&mut batch, "batch writer");
            stop_child(&mut exchange, "mock exchange");
            return Err(e);
        }
    };
    let gateway = match a.gateway_listen {
        Some(l) => spawn_gateway(cli, &l.to_string(), &m.gateway, &db),
        None => spawn_gateway(cli, &cfg.gateway.listen, &m.gateway, &db).or_else(|e| {
            eprintln!("demo: {e:#}; using a free port instead");
            spawn_gateway(cli, "127.0.0.1:0", &m.gateway, &db)
        }),
    };
    let (mut gateway, ws_addr) = match gateway {
        Ok(g) => g,
        Err(e) => {
            stop_child(&mut broker, "broker");
            stop_child(&mut batch, "batch writer");
            stop_child(&mut exchange, "mock exchange");
            return Err(e);
        }
    };
    let service = mdbus_schema::service::stream_service(&bus, "realtime");
    println!("mdbus demo on bus {:?}", bus);
    println!(
        "  exchange    ws://{exchange_addr}  pid {}  (mdbus mock-exchange: {} symbols, ~{} trades/s, Binance protocol)",
        exchange.id(),
        a.symbols,
        a.rate
    );
    println!("  broker      pid {}  live source ws://{exchange_addr}: reconnects, backfill, aggregation", broker.id());
    println!("  stream      {service}  (trades, K-line updates and closes for 16 intervals, heartbeats)");
    println!(
        "  batch       pid {}  K-line snapshots every {} ms -> {db}, acked to the broker (a restart continues from it)",
        batch.id(),
        cfg.batch.snapshot_interval_ms
    );
    // The path of this very binary, so the hint works before `mdbus` is on the PATH.
    let exe = std::env::current_exe().map_or_else(|_| "mdbus".to_owned(), |p| p.display().to_string());
    println!(
        "  gateway     ws://{ws_addr}  pid {}  (Binance market streams: /ws/<stream>, /stream?streams=a/b)",
        gateway.id()
    );
    println!("  look at it  {exe} tail --bus {bus} --symbol BTCUSDT --interval 1m");
    println!("              {exe} tail --bus {bus} --kind trade --count 10");
    println!("  websocket   python3 -m websockets 'ws://{ws_addr}/stream?streams=btcusdt@kline_1m/btcusdt@trade'");
    println!("              (pip install websockets; any Binance client pointed at ws://{ws_addr} works too)");
    println!("  rest        curl -s http://{ws_addr}/api/v3/exchangeInfo");
    println!("  history     curl -s 'http://{ws_addr}/api/v3/klines?symbol=BTCUSDT&interval=1m&limit=5'  (from {db})");
    println!(
        "  metrics     http://{}/metrics (broker)  http://{}/metrics (gateway)  http://{}/metrics (exchange)",
        m.broker, m.gateway, m.exchange
    );
    println!("              http://{batch_metrics}/metrics (batch writer)");
    println!("  stats       {exe} stats {} {} {}", m.broker, m.gateway, m.exchange);
    println!("  stop        Ctrl-C");

    let result = summarize(cli, &cfg, a, &stop);
    stop_child(&mut gateway, "gateway");
    stop_child(&mut broker, "broker");
    stop_child(&mut batch, "batch writer");
    stop_child(&mut exchange, "mock exchange");
    // Give iceoryx2 a moment to observe the dead ports, then check for leftovers.
    let leftovers = leftover_shm(&bus);
    if leftovers.is_empty() {
        println!("demo: stopped cleanly; no shared memory left for bus {:?}", bus);
    } else {
        eprintln!("demo: shared memory left behind: {}", leftovers.join(", "));
    }
    result?;
    Ok(if leftovers.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn summarize(cli: &Cli, cfg: &Config, a: &DemoArgs, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
    let bus = cli.bus();
    let opts = ReaderOptions::default().settings(cfg.stream_settings()).node_name("demo");
    let mut reader = Reader::open(&bus, "realtime", opts).context("subscribing to the demo stream")?;
    let end = a.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let mut tick = Instant::now();
    let mut frames_at_tick = 0u64;
    let mut last_seq = 0u64;
    let mut last_1m = String::from("-");
    let mut closes = 0u64;
    while !stop.load(Ordering::Relaxed) && end.is_none_or(|e| Instant::now() < e) {
        reader.next_batch(WaitMode::Block(Duration::from_millis(100)), |f| {
            last_seq = f.seq();
            if f.kind() != FrameKind::Kline {
                return;
            }
            if let Ok(k) = f.kline() {
                if k.closed {
                    closes += 1;
                }
                if k.interval == Interval::M1 as u8 && k.symbol_id.to_native() == 0 {
                    let c = Fixed::new(i128::from(k.close.to_native()), k.price_scale);
                    last_1m = format!(
                        "{} 1m close {} n={}",
                        k.symbol.to_symbol().map(|s| s.to_string()).unwrap_or_default(),
                        c,
                        k.trade_count.to_native()
                    );
                }
            }
        })?;
        if tick.elapsed() >= Duration::from_secs(1) {
            let s = reader.stats();
            let rate = (s.frames - frames_at_tick) as f64 / tick.elapsed().as_secs_f64();
            println!(
                "seq {last_seq:>9}  {rate:>9.0} frames/s  closed K-lines {closes:>7}  gaps {}  health {:<8}  {last_1m}",
                s.seq.gaps,
                reader.health().as_str()
            );
            frames_at_tick = s.frames;
            tick = Instant::now();
        }
    }
    Ok(())
}
