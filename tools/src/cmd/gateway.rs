//! `mdbus gateway`: the Binance-compatible WebSocket gateway (see `mdbus-gateway`).
//!
//! Prints `gateway listening on ws://ADDR` on stdout once clients can connect (tests and the
//! demo read it), serves until SIGINT/SIGTERM, then prints its counters as one JSON line.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use mdbus_gateway::{GatewayConfig, HubOptions, SlowPolicy};
use mdbus_store::DbUrl;

use crate::config::Config;
use crate::Cli;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9741; port 0: any free).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Address for WebSocket and REST clients (port 0: any free port) [config: gateway.listen].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Token clients must present (`Authorization: Bearer …` or `?token=`); required for a
    /// non-loopback --listen.
    #[arg(long, env = "MDBUS_GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A client that falls behind: conflate (latest update per open K-line) or disconnect.
    #[arg(long, value_name = "POLICY")]
    pub slow_client: Option<SlowPolicy>,
    /// Messages queued per client before the slow-client policy applies.
    #[arg(long)]
    pub queue: Option<usize>,
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Streams per connection.
    #[arg(long)]
    pub max_streams: Option<usize>,
    /// Incoming messages per second per connection.
    #[arg(long)]
    pub max_msg_rate: Option<f64>,
    /// Seconds between server pings.
    #[arg(long)]
    pub ping_interval: Option<f64>,
    /// Seconds without a pong before a client is disconnected.
    #[arg(long)]
    pub pong_timeout: Option<f64>,
    /// tokio worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pin the shared-memory reader thread to this core.
    #[arg(long)]
    pub core: Option<usize>,
    /// The real-time stream's write-ahead log, for `fromSeq` resumes [default: the broker's].
    #[arg(long, env = "MDBUS_WAL", value_name = "DIR")]
    pub wal: Option<std::path::PathBuf>,
    /// K-line database for `GET /api/v3/klines`: `sqlite:PATH` or `postgres://USER@HOST:PORT/DB`
    /// [default with batch.enabled: batch.db].
    // Parsed in `config`, not by clap: clap's error would echo the value, password included.
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
}

pub fn config(cli: &Cli, a: &GatewayArgs) -> Result<GatewayConfig> {
    let cfg = Config::load(cli.config.as_deref())?;
    let g = &cfg.gateway;
    let listen = match a.listen {
        Some(l) => l,
        None => g.listen.parse().context("gateway.listen")?,
    };
    let mut c = GatewayConfig::new(&cli.bus(), listen);
    c.settings = cfg.stream_settings();
    c.wal_dir = match &a.wal {
        Some(d) => Some(d.clone()),
        None => cfg.wal.enabled.then(|| cfg.wal.dir_for(&cli.bus(), "realtime")),
    };
    c.token = a.token.clone().or_else(|| Some(g.token.clone())).filter(|t| !t.is_empty());
    c.slow_policy = match a.slow_client {
        Some(p) => p,
        None => g.slow_client.parse().map_err(anyhow::Error::msg)?,
    };
    c.queue = a.queue.unwrap_or(g.queue).max(1);
    c.max_connections = a.max_connections.unwrap_or(g.max_connections);
    c.max_streams = a.max_streams.unwrap_or(g.max_streams);
    c.max_message_bytes = g.max_message_bytes;
    c.max_msg_rate = a.max_msg_rate.unwrap_or(g.max_msg_rate);
    c.abuse_after = g.abuse_after;
    let secs = |name: &str, s: f64| {
        if !(s.is_finite() && s > 0.0) {
            anyhow::bail!("--{name} {s}: expected a positive number of seconds");
        }
        Ok(Duration::from_secs_f64(s.clamp(0.001, 86_400.0)))
    };
    c.ping_interval = secs("ping-interval", a.ping_interval.unwrap_or(g.ping_interval_s))?;
    c.pong_timeout = secs("pong-timeout", a.pong_timeout.unwrap_or(g.pong_timeout_s))?;
    c.threads = a.threads.unwrap_or(g.threads).max(1);
    c.hub = HubOptions { core: a.core.or(g.core), ..HubOptions::default() };
    c.db = a.db.as_deref().map(str::parse::<DbUrl>).transpose().context("--db")?;
    if c.db.is_none() && cfg.batch.enabled {
        // The batch writer's database [config: batch.db].
        c.db = Some(cfg.batch.db_for(&cli.bus())?);
    }
    Ok(c)
}

/// Raises the open-file limit to its hard maximum: each client is a socket.
fn raise_fd_limit(want: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|c| c < lim.maximum.unwrap_or(u64::MAX)) {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: lim.maximum, maximum: lim.maximum });
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < want as u64 + 64 {
        tracing::warn!(open_files = now, max_connections = want, "the open-file limit is below max_connections");
    }
}

pub fn run(cli: &Cli, a: &GatewayArgs) -> Result<ExitCode> {
    let c = config(cli, a)?;
    raise_fd_limit(c.max_connections);
    let stop = crate::signals::stop_flag()?;
    let bus = c.bus.clone();
    let mut metrics_err = None;
    let state = mdbus_gateway::run(c, Arc::clone(&stop), |addr, state| {
        let state = Arc::clone(state);
        metrics_err = crate::serve_metrics(a.metrics.as_deref(), &stop, move |f| state.families(f));
        if metrics_err.is_some() {
            return;
        }
        println!("gateway listening on ws://{addr} (bus {bus}; streams at /ws/<stream>, /stream?streams=a/b)");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    if let Some(e) = metrics_err {
        return Err(e.into());
    }
    println!("{}", serde_json::json!({ "gateway": state.stats.to_json() }));
    Ok(ExitCode::SUCCESS)
}
