//! `mdbus broker`: ingest, aggregate, publish.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use mdbus_publisher::aggregator::LatePolicy;
use mdbus_publisher::broker::{
    self, BrokerConfig, BrokerControl, ClockMode, RestoreFrom, RestoreState, SymbolsSource, WalSettings,
};
use mdbus_publisher::ingress::{Ingress, IngressPolicy};
use mdbus_publisher::snapshot::SnapshotSettings;
use mdbus_publisher::source::SourceConfig;
use mdbus_publisher::synthetic::{symbol_names, SyntheticConfig};
use mdbus_store::{DbUrl, Store};
use mdbus_wal::{Durability, RetentionPolicy, WalOptions};

use mdbus_exchange::client::{LiveConfig, TradeStream};

use crate::config::Config;
use crate::Cli;

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Trade source: `synthetic` (the deterministic generator), `csv:PATH` (Binance dataset
    /// files), `ws:URL` (a Binance-compatible exchange, e.g. `mdbus mock-exchange`) or `binance`.
    #[arg(long, env = "MDBUS_SOURCE")]
    pub source: Option<String>,
    /// `ws:` source: the REST base URL for backfill [default: the WebSocket URL's host over http].
    #[arg(long, value_name = "URL")]
    pub rest: Option<String>,
    /// Live sources: `aggTrade` or `trade` streams.
    #[arg(long)]
    pub trade_stream: Option<String>,
    /// Live sources: seconds without any message before a connection is declared dead.
    #[arg(long)]
    pub dead_after: Option<f64>,
    /// Live sources: trades queued between the connections and the ingest thread.
    #[arg(long)]
    pub ingress_queue: Option<usize>,
    /// Live sources: `block`, `drop_newest` or `drop_oldest` when that queue is full.
    #[arg(long)]
    pub ingress_policy: Option<String>,
    /// Seed of the synthetic feed: same seed, same trades.
    #[arg(long, env = "MDBUS_SEED")]
    pub seed: Option<u64>,
    /// Symbols: a count (`3`: BTCUSDT, ETHUSDT, BNBUSDT) or a list (`BTCUSDT,ETHUSDT`).
    #[arg(long, env = "MDBUS_SYMBOLS")]
    pub symbols: Option<String>,
    /// Average trades per second over all symbols (bursts go 8x higher, quiet periods 20x lower).
    #[arg(long, env = "MDBUS_RATE")]
    pub rate: Option<f64>,
    /// Simulated start time (RFC 3339, e.g. 2024-02-29T23:00:00Z): event times start here and the
    /// clock defaults to `event`.
    #[arg(long)]
    pub start: Option<String>,
    /// Whose clock closes K-lines: `wall` (live) or `event` (the data's own time).
    #[arg(long, env = "MDBUS_CLOCK")]
    pub clock: Option<String>,
    /// Event-clock speed (x real time); 0 = as fast as possible.
    #[arg(long)]
    pub speed: Option<f64>,
    /// Stop the feed after this many trades (the broker keeps heartbeating, feed = ended).
    #[arg(long)]
    pub max_trades: Option<u64>,
    /// Synthetic feed at a constant average rate (no bursts or quiet periods), for benchmarks.
    #[arg(long)]
    pub steady: bool,
    /// Write every ingested trade to DIR/<SYMBOL>-trades.csv (Binance dataset format).
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Send only heartbeats until this many subscribers are connected.
    #[arg(long, default_value_t = 0)]
    pub wait_subscribers: usize,
    /// Pin the ingest/publish thread to this core.
    #[arg(long, env = "MDBUS_CORE")]
    pub core: Option<usize>,
    /// Aggregation worker threads (symbols are partitioned across them); 0: aggregate on the
    /// ingest/publish thread.
    #[arg(long, env = "MDBUS_WORKERS")]
    pub workers: Option<usize>,
    /// Cores for the workers, comma-separated (worker i on the i-th, cycling).
    #[arg(long, env = "MDBUS_CORES", value_delimiter = ',')]
    pub cores: Option<Vec<usize>>,
    /// Heartbeat after this many ms of silence (1..=100).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Grace after a K-line's end before the clock closes it, ms.
    #[arg(long)]
    pub close_grace_ms: Option<i64>,
    /// Trades older than the open K-line: `drop` (counted) or `amend` (re-close with a revision).
    #[arg(long)]
    pub late_policy: Option<String>,
    /// Write-ahead log folder (default: <data dir>/<bus>/wal/realtime).
    #[arg(long, env = "MDBUS_WAL", value_name = "DIR")]
    pub wal: Option<PathBuf>,
    /// WAL durability: none | interval:<ms> | every-batch.
    #[arg(long)]
    pub durability: Option<String>,
    /// Do not keep a write-ahead log (sequence numbers restart at 1 on every start).
    #[arg(long)]
    pub no_wal: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9740; port 0: any free).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Durable K-lines [config: batch.enabled]: publish the delayed snapshot stream for
    /// `mdbus batch` and restart from its database.
    #[arg(long)]
    pub snapshots: bool,
    /// The batch writer's database, read at start-up to continue K-lines (implies --snapshots)
    /// [config: batch.db].
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// Milliseconds between snapshots [config: batch.snapshot_interval_ms].
    #[arg(long)]
    pub snapshot_interval_ms: Option<u64>,
}

pub fn parse_symbols(s: &str) -> Result<Vec<String>> {
    if let Ok(n) = s.parse::<usize>() {
        if n == 0 {
            bail!("--symbols 0: need at least one symbol");
        }
        return Ok(symbol_names(n));
    }
    let list: Vec<String> = s.split(',').map(|x| x.trim().to_uppercase()).filter(|x| !x.is_empty()).collect();
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    for x in &list {
        if !seen.insert(x.as_str()) {
            bail!("--symbols: {x} is listed twice");
        }
    }
    if list.is_empty() {
        bail!("--symbols {s:?}: expected a count or a comma-separated list");
    }
    Ok(list)
}

/// Merges file/env/flags into the broker's typed config, and for a live source the settings of
/// its exchange connections (started by [`run`]).
/// The database a broker with durable K-lines restarts from, and how long it waits for it.
pub type RestoreDb = Option<(DbUrl, f64)>;

pub fn broker_config(cli: &Cli, a: &BrokerArgs) -> Result<(BrokerConfig, Option<LiveConfig>, RestoreDb)> {
    // Before anything touches the disk: the bus name becomes part of paths.
    mdbus_schema::service::validate_bus_name(&cli.bus()).map_err(anyhow::Error::msg)?;
    let mut cfg = Config::load(cli.config.as_deref())?;
    let b = &mut cfg.broker;
    if let Some(v) = &a.source {
        b.source = v.clone();
    }
    if let Some(v) = a.ingress_queue {
        b.ingress_queue = v;
    }
    if let Some(v) = &a.ingress_policy {
        b.ingress_policy = v.clone();
    }
    if let Some(v) = &a.trade_stream {
        b.trade_stream = v.clone();
    }
    if let Some(v) = a.dead_after {
        b.dead_after_s = v;
    }
    // Recorded data closes K-lines on its own clock unless told otherwise.
    if b.source.starts_with("csv:") && a.clock.is_none() && a.start.is_none() {
        b.clock = "event".into();
    }
    if let Some(v) = a.seed {
        b.seed = v;
    }
    if let Some(v) = a.rate {
        b.rate = v;
    }
    if let Some(v) = a.speed {
        b.speed = v;
    }
    if let Some(v) = a.heartbeat_ms {
        b.heartbeat_ms = v;
    }
    if let Some(v) = a.close_grace_ms {
        b.close_grace_ms = v;
    }
    if let Some(v) = &a.late_policy {
        b.late_policy = v.clone();
    }
    if let Some(d) = &a.durability {
        cfg.wal.durability = d.clone();
    }
    if let Some(d) = &a.wal {
        cfg.wal.dir = d.display().to_string();
    }
    if a.no_wal {
        cfg.wal.enabled = false;
    }
    let b = &mut cfg.broker;
    if a.core.is_some() {
        b.core = a.core;
    }
    if let Some(w) = a.workers {
        b.workers = w;
    }
    if let Some(c) = &a.cores {
        b.cores = c.clone();
    }
    if let Some(s) = &a.symbols {
        b.symbols = parse_symbols(s)?;
    }
    let start_us = match &a.start {
        Some(s) => {
            let t =
                chrono::DateTime::parse_from_rfc3339(s).with_context(|| format!("--start {s:?}: expected RFC 3339"))?;
            if a.clock.is_none() {
                b.clock = "event".into();
            }
            t.timestamp_micros()
        }
        None => broker::now_ns() / 1000,
    };
    if let Some(v) = &a.clock {
        b.clock = v.clone();
    }
    if a.snapshots {
        cfg.batch.enabled = true;
    }
    if let Some(db) = &a.db {
        cfg.batch.enabled = true;
        cfg.batch.db = db.clone();
    }
    if let Some(v) = a.snapshot_interval_ms {
        cfg.batch.snapshot_interval_ms = v;
    }
    cfg.validate()?;
    let b = &cfg.broker;
    let source = if let Some(path) = b.source.strip_prefix("csv:") {
        SourceConfig::Csv(PathBuf::from(path))
    } else if b.source == "synthetic" {
        SourceConfig::Synthetic(SyntheticConfig {
            seed: b.seed,
            symbols: b.symbols.clone(),
            rate: b.rate,
            start_us,
            max_trades: a.max_trades,
            steady: a.steady,
        })
    } else {
        // Live: the connections are started by `run`, feeding this queue.
        let policy: IngressPolicy = b.ingress_policy.parse().map_err(anyhow::Error::msg)?;
        SourceConfig::Live { ingress: Arc::new(Ingress::new(b.ingress_queue, policy)), symbols: b.symbols.clone() }
    };
    let live = match &source {
        SourceConfig::Live { symbols, .. } => Some(live_config(&cfg, a, symbols.clone())?),
        _ => None,
    };
    let config = BrokerConfig {
        bus: cli.bus(),
        stream: cfg.stream_settings(),
        source,
        clock: if b.clock == "event" { ClockMode::Event } else { ClockMode::Wall },
        speed: b.speed,
        heartbeat_ms: b.heartbeat_ms,
        tick_ms: b.tick_ms,
        close_grace_ms: b.close_grace_ms,
        late_policy: if b.late_policy == "amend" { LatePolicy::Amend } else { LatePolicy::Drop },
        max_empty_run: b.max_empty_run,
        record: a.record.clone(),
        wait_subscribers: a.wait_subscribers,
        core: b.core,
        workers: b.workers,
        worker_cores: b.cores.clone(),
        wal: cfg.wal.enabled.then(|| WalSettings {
            dir: cfg.wal.dir_for(&cli.bus(), "realtime"),
            options: WalOptions {
                stream_id: mdbus_schema::service::REALTIME_STREAM_ID,
                segment_bytes: cfg.wal.segment_bytes,
                // Invariant: validated above.
                durability: cfg.wal.durability.parse().unwrap_or(Durability::EveryBatch),
            },
            retention: RetentionPolicy { max_bytes: Some(cfg.wal.retention_bytes), max_age: None },
        }),
        snapshots: cfg.batch.enabled.then(|| SnapshotSettings {
            interval: Duration::from_millis(cfg.batch.snapshot_interval_ms),
            ack_timeout: Duration::from_millis(cfg.batch.ack_timeout_ms),
            write_timeout: Duration::from_millis(cfg.batch.write_timeout_ms),
            wal_gate: cfg.wal.enabled,
            max_pending_closed: cfg.batch.max_pending_closed,
            ..SnapshotSettings::default()
        }),
        restore: None,
    };
    let db = if cfg.batch.enabled { Some(cfg.batch.db_for(&cli.bus())?) } else { None };
    Ok((config, live, db.map(|d| (d, cfg.batch.restore_timeout_s))))
}

/// The live source's connection settings for `broker.source` (`ws:URL` or `binance`).
fn live_config(cfg: &Config, a: &BrokerArgs, symbols: Vec<String>) -> Result<LiveConfig> {
    let b = &cfg.broker;
    let (ws, rest) = if b.source == "binance" {
        ("wss://stream.binance.com:9443".to_string(), "https://api.binance.com".to_string())
    } else {
        let ws = b.source.strip_prefix("ws:").unwrap_or(&b.source).to_string();
        let rest = match &a.rest {
            Some(r) => r.clone(),
            None => ws.replacen("wss://", "https://", 1).replacen("ws://", "http://", 1),
        };
        (ws, rest)
    };
    if !(ws.starts_with("ws://") || ws.starts_with("wss://")) {
        bail!("broker.source = {:?}: expected ws:ws://HOST:PORT or ws:wss://HOST:PORT", b.source);
    }
    let mut c = LiveConfig::new(&ws, &rest, symbols);
    c.stream = b.trade_stream.parse::<TradeStream>().map_err(anyhow::Error::msg)?;
    if !(b.dead_after_s.is_finite() && b.dead_after_s > 0.0) {
        bail!("--dead-after {}: expected a positive number of seconds", b.dead_after_s);
    }
    c.dead_after = Duration::from_secs_f64(b.dead_after_s);
    Ok(c)
}

/// Every 2 s, removes the ports of this bus's dead processes, so that a `kill -9`ed subscriber
/// leaves `market_subscriber_count` (and stops holding samples). Off the publish thread: it reads
/// the bus's node list.
fn spawn_janitor(bus: &str, stop: Arc<std::sync::atomic::AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    let bus = bus.to_owned();
    let spawned = std::thread::Builder::new().name("bus-janitor".into()).spawn(move || {
        let node = match mdbus_bus::BusNode::open(&bus, "broker-janitor") {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "dead-process cleanup not running");
                return;
            }
        };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            node.cleanup_dead_nodes();
            for _ in 0..9 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    spawned.map_err(|e| tracing::warn!(error = %e, "dead-process cleanup not running")).ok()
}

/// The last committed snapshot and the open K-lines stored with it, waiting (with backoff) up to
/// `timeout_s` for the database to answer.
pub fn read_restore_state(url: &DbUrl, bus: &str, timeout_s: f64) -> Result<RestoreState> {
    use backon::BackoffBuilder;
    let t0 = std::time::Instant::now();
    let deadline = t0 + Duration::from_secs_f64(timeout_s.max(0.0));
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .build();
    // The open rows must be those of the commit marker read with them: a writer may still commit
    // the previous broker's last snapshot while this one reads. The marker is read before and
    // after the rows; a commit in between (a new snapshot id) means read again.
    let read = || -> Result<Option<RestoreState>, mdbus_store::StoreError> {
        let mut store = Store::open(url)?;
        let committed = store.committed(bus)?;
        if committed.is_none() {
            return Ok(Some(RestoreState::default()));
        }
        let open = store.open_klines()?;
        if store.committed(bus)? != committed {
            return Ok(None);
        }
        Ok(Some(RestoreState { committed: committed.map(|c| (c.snapshot_id, c.covered_seq)), open }))
    };
    loop {
        match read() {
            Ok(None) => {
                tracing::info!(db = %url, "a snapshot was committed while reading the restart state; reading again")
            }
            Ok(Some(r)) => {
                tracing::info!(db = %url, committed = ?r.committed, open_klines = r.open.len(), ms = t0.elapsed().as_millis() as u64, "restart state read from the database");
                return Ok(r);
            }
            Err(e) if e.is_unavailable() && std::time::Instant::now() < deadline => {
                let d = delays.next().unwrap_or(Duration::from_secs(1));
                tracing::warn!(db = %url, error = %e, retry_ms = d.as_millis() as u64, "database unavailable at start-up; retrying");
                std::thread::sleep(d);
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading the restart state from {url}"))),
        }
    }
}

pub fn run(cli: &Cli, a: &BrokerArgs) -> Result<ExitCode> {
    let (mut config, live_cfg, db) = broker_config(cli, a)?;
    if let Some((url, timeout_s)) = &db {
        // Read on a thread of its own while the broker sets itself up; it waits where it needs it.
        let (url, bus, timeout_s) = (url.clone(), config.bus.clone(), *timeout_s);
        config.restore = Some(
            RestoreFrom::reading(move || read_restore_state(&url, &bus, timeout_s).map_err(|e| format!("{e:#}")))
                .context("starting the restart-state read")?,
        );
    }
    let control = BrokerControl {
        stop: crate::signals::stop_flag()?,
        reload: crate::signals::reload_flag()?,
        metrics: Arc::default(),
    };
    tracing::info!(bus = %config.bus, source = %config.source.describe(), clock = ?config.clock, workers = config.workers, "broker starting");
    let mut live = None;
    if let (SourceConfig::Live { ingress, .. }, Some(lc)) = (&config.source, live_cfg) {
        tracing::info!(ws = %lc.ws_url, rest = %lc.rest_url, policy = ingress.policy().as_str(), queue = ingress.capacity(), "connecting to the exchange");
        live = Some((
            mdbus_exchange::client::start(lc, Arc::clone(ingress), Arc::clone(&control.stop))?,
            Arc::clone(ingress),
        ));
    }
    {
        let m = Arc::clone(&control.metrics);
        let ingress = match &config.source {
            SourceConfig::Live { ingress, .. } => Some(Arc::clone(ingress)),
            _ => None,
        };
        let exchange = live.as_ref().map(|((_, stats), _)| Arc::clone(stats));
        let served = crate::serve_metrics(a.metrics.as_deref(), &control.stop, move |f| {
            m.families(f);
            match &ingress {
                Some(i) => i.families(f),
                // Synthetic and dataset sources have no ingress queue: nothing queued, nothing dropped.
                None => {
                    f.counter("market_dropped_total", "trades dropped by the ingress overload policy", 0).gauge(
                        "market_ingress_len",
                        "items in the ingress queue now",
                        0.0,
                    );
                }
            }
            match &exchange {
                Some(x) => x.families(f),
                None => {
                    let n = m.reconnects.load(std::sync::atomic::Ordering::Relaxed);
                    f.counter("broker_reconnect_total", "reconnects to the exchange", n);
                }
            }
        });
        if let Some(e) = served {
            return Err(e.into());
        }
    }
    let janitor = spawn_janitor(&config.bus, Arc::clone(&control.stop));
    // SIGHUP re-reads the config file's broker.symbols (add / remove symbols while running).
    let file = cli.config.clone();
    let source: SymbolsSource = Box::new(move || match &file {
        Some(path) => Config::load(Some(path)).map(|c| c.broker.symbols).map_err(|e| format!("{e:#}")),
        None => Err("no --config file to reload".into()),
    });
    let result = broker::run(&config, &control, Some(&source));
    control.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Its node is dropped (and its files removed) before the process exits.
    if let Some(j) = janitor {
        let _ = j.join();
    }
    if let Some(((handle, stats), ingress)) = live {
        ingress.close();
        let _ = handle.join();
        let st = &ingress.stats;
        let g = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "{}",
            serde_json::json!({ "exchange": stats.to_json(), "ingress": {
                "policy": ingress.policy().as_str(), "capacity": ingress.capacity(),
                "pushed": g(&st.pushed), "dropped_total": g(&st.dropped_total),
                "backpressure_events": g(&st.backpressure_events), "high_water": g(&st.high_water),
            }})
        );
    }
    let report = result.context("broker stopped")?;
    tracing::info!(
        trades = report.trades,
        frames = report.frames,
        samples = report.samples,
        heartbeats = report.heartbeats,
        last_seq = report.last_seq,
        late_trades = report.aggregator.late_trades,
        klines_closed = report.aggregator.closed,
        "broker stopped"
    );
    Ok(ExitCode::SUCCESS)
}
