//! `mdbus gateway`: the bus's real-time stream to remote clients over WebSocket, speaking
//! Binance's market-stream protocol so that existing Binance clients work unchanged.
//!
//! Upstream: one shared-memory [`Reader`](mdbus_subscribers::Reader) on the real-time stream, in
//! the [`hub`] thread. Downstream: one tokio task per client ([`session`]), fed through a bounded
//! per-client [`outbox`]. The hub never waits on a socket; a slow client is conflated or
//! disconnected by its own outbox, never slowing the others.
//!
//! Beyond Binance: every message carries the bus `seq`; `fromSeq=N` resumes from the write-ahead
//! log and joins live with no gap and no duplicate; `mdbus@health` streams publisher health.
//! With a K-line database (`db`), REST `GET /api/v3/klines` serves history from it ([`klines`]).

pub mod encode;
pub mod hub;
pub mod klines;
pub mod outbox;
pub mod protocol;
mod rest;
mod server;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use mdbus_bus::StreamSettings;
use mdbus_store::DbUrl;
use mdbus_subscribers::{Reader, ReaderOptions};

pub use hub::{GatewayStats, HubOptions, HubState};
pub use outbox::SlowPolicy;

/// Wall-clock time, ns since the epoch (the broker stamps frames with the same clock).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Everything the gateway is configured with.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub bus: String,
    pub stream: String,
    pub settings: StreamSettings,
    /// The stream's write-ahead log (for `fromSeq` and for filling the gateway's own gaps).
    pub wal_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// Required from clients (bearer header or `?token=`) when set; a non-loopback listen
    /// address requires one.
    pub token: Option<String>,
    /// Messages queued per client before the slow-client policy applies.
    pub queue: usize,
    pub slow_policy: SlowPolicy,
    pub max_connections: usize,
    pub max_streams: usize,
    pub max_message_bytes: usize,
    /// Incoming messages per second per connection (Binance: 5).
    pub max_msg_rate: f64,
    /// Consecutive messages over the rate before the connection is closed.
    pub abuse_after: u32,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// tokio worker threads.
    pub threads: usize,
    pub hub: HubOptions,
    /// The K-line database `GET /api/v3/klines` reads (`None`: the endpoint answers 503).
    pub db: Option<DbUrl>,
}

impl GatewayConfig {
    pub fn new(bus: &str, listen: SocketAddr) -> GatewayConfig {
        GatewayConfig {
            bus: bus.to_owned(),
            stream: "realtime".into(),
            settings: StreamSettings::default(),
            wal_dir: None,
            listen,
            token: None,
            queue: 4096,
            slow_policy: SlowPolicy::Conflate,
            max_connections: 4096,
            max_streams: 1024,
            max_message_bytes: 64 * 1024,
            max_msg_rate: 5.0,
            abuse_after: 10,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            threads: 1,
            hub: HubOptions::default(),
            db: None,
        }
    }
}

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("refusing to listen on {0} (not loopback) without an auth token: set --token or MDBUS_GATEWAY_TOKEN")]
    NoToken(SocketAddr),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("subscribing to the bus: {0}")]
    Bus(String),
    #[error("starting the gateway: {0}")]
    Start(#[from] std::io::Error),
}

/// Shared by the server, the sessions and (through commands) the hub.
#[derive(Debug)]
pub struct Ctx {
    pub cfg: GatewayConfig,
    pub state: Arc<HubState>,
    hub: Mutex<mpsc::Sender<hub::Command>>,
    /// Concurrent `fromSeq` log replays.
    catch_ups: tokio::sync::Semaphore,
    /// Behind `GET /api/v3/klines`.
    klines_db: Option<Arc<klines::KlinesDb>>,
}

impl Ctx {
    fn send(&self, cmd: hub::Command) {
        if let Ok(tx) = self.hub.lock() {
            let _ = tx.send(cmd);
        }
    }
}

/// Runs the gateway until `stop` is set. `ready` is called with the bound address and the live
/// state (counters, health) once clients can connect. Returns the final counters.
pub fn run(
    cfg: GatewayConfig,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(SocketAddr, &Arc<HubState>),
) -> Result<Arc<HubState>, GatewayError> {
    if !cfg.listen.ip().is_loopback() && cfg.token.is_none() {
        return Err(GatewayError::NoToken(cfg.listen));
    }
    let state = Arc::new(HubState::default());
    let (tx, rx) = mpsc::channel();
    let hub_stop = Arc::new(AtomicBool::new(false));
    // The reader lives on the hub thread (shared-memory ports are not Send): open it there and
    // report the outcome.
    let (opened_tx, opened_rx) = mpsc::channel::<Result<(), String>>();
    let hub_thread = {
        let (state, hub_stop, cfg) = (Arc::clone(&state), Arc::clone(&hub_stop), cfg.clone());
        std::thread::Builder::new().name("gateway-hub".into()).spawn(move || {
            let mut opts = ReaderOptions::default().settings(cfg.settings).node_name("gateway");
            if let Some(dir) = &cfg.wal_dir {
                opts = opts.wal(dir);
            }
            match Reader::open(&cfg.bus, &cfg.stream, opts) {
                Ok(reader) => {
                    let _ = opened_tx.send(Ok(()));
                    hub::run(reader, rx, state, cfg.hub.clone(), hub_stop);
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e.to_string()));
                }
            }
        })?
    };
    let opened = opened_rx.recv().unwrap_or_else(|_| Err("the hub thread ended".into()));
    if let Err(e) = opened {
        let _ = hub_thread.join();
        return Err(GatewayError::Bus(e));
    }

    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        state: Arc::clone(&state),
        hub: Mutex::new(tx),
        catch_ups: tokio::sync::Semaphore::new(4),
        klines_db: cfg.db.clone().map(|url| Arc::new(klines::KlinesDb::new(url))),
    });
    let rt = if cfg.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.threads).enable_all().build()?
    };
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| GatewayError::Listen { addr: cfg.listen, source })?;
        let addr = listener.local_addr()?;
        ready(addr, &state);
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(server::serve(listener, Arc::clone(&ctx), shutdown_rx));
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = shutdown_tx.send(true);
        let _ = server.await;
        // Let sessions send their close frames.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while state.stats.connections_open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<_, GatewayError>(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    hub_stop.store(true, Ordering::Relaxed);
    let _ = hub_thread.join();
    served.map(|()| state)
}
