//! `mdbus mock-exchange`: a local Binance-compatible exchange with fault injection (see
//! `mdbus_exchange::mock`). Prints `mock exchange listening on ws://ADDR` once ready and its
//! counters as one JSON line when stopped.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use mdbus_exchange::mock::{self, Faults, MockConfig, MockSource};
use mdbus_publisher::synthetic::SyntheticConfig;

use crate::Cli;

#[derive(Debug, Args)]
pub struct MockExchangeArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9742; port 0: any free).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Address to serve WebSocket and REST on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// `synthetic` (live trades on the wall clock) or `csv:PATH` (Binance dataset files).
    #[arg(long, default_value = "synthetic")]
    pub source: String,
    /// Synthetic: symbols (a count or a list).
    #[arg(long, default_value = "5")]
    pub symbols: String,
    /// Synthetic: average trades per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Synthetic: seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Dataset replay speed (x real time); 0 = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Drop every connection after this many seconds (abruptly, no close frame).
    #[arg(long)]
    pub drop_every: Option<f64>,
    /// Stall every connection (send nothing, keep the socket) every this many seconds...
    #[arg(long)]
    pub stall_every: Option<f64>,
    /// ...for this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub stall_for: f64,
    /// Send a malformed message before every Nth message.
    #[arg(long)]
    pub garbage_every: Option<u64>,
    /// Send every Nth message twice.
    #[arg(long)]
    pub duplicate_every: Option<u64>,
    /// Swap every Nth message with the next one.
    #[arg(long)]
    pub reorder_every: Option<u64>,
    /// Send `serverShutdown` and close every connection after this many seconds.
    #[arg(long)]
    pub shutdown_every: Option<f64>,
    /// Seconds between pings.
    #[arg(long, default_value_t = 20.0)]
    pub ping_interval: f64,
    /// Start sending trades when the first client connects.
    #[arg(long)]
    pub wait_for_client: bool,
}

fn secs(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0) {
        bail!("--{name} {v}: expected a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn run(_cli: &Cli, a: &MockExchangeArgs) -> Result<ExitCode> {
    let source = if let Some(p) = a.source.strip_prefix("csv:") {
        MockSource::Csv(p.into())
    } else if a.source == "synthetic" {
        MockSource::Synthetic(SyntheticConfig {
            seed: a.seed,
            symbols: crate::cmd::broker::parse_symbols(&a.symbols)?,
            rate: a.rate,
            start_us: 0,
            max_trades: None,
            steady: false,
        })
    } else {
        bail!("--source {:?}: expected synthetic or csv:PATH", a.source);
    };
    let opt = |name: &str, v: Option<f64>| v.map(|v| secs(name, v)).transpose();
    let faults = Faults {
        drop_every: opt("drop-every", a.drop_every)?,
        stall_every: opt("stall-every", a.stall_every)?,
        stall_for: secs("stall-for", a.stall_for)?,
        garbage_every: a.garbage_every,
        duplicate_every: a.duplicate_every,
        reorder_every: a.reorder_every,
        shutdown_every: opt("shutdown-every", a.shutdown_every)?,
    };
    if !(a.speed.is_finite() && a.speed >= 0.0) {
        bail!("--speed {}: expected 0 or a positive number", a.speed);
    }
    let cfg = MockConfig {
        listen: a.listen,
        source,
        speed: a.speed,
        faults,
        ping_interval: secs("ping-interval", a.ping_interval)?,
        history: 2_000_000,
        wait_for_client: a.wait_for_client,
    };
    let stop = crate::signals::stop_flag()?;
    let mut metrics_err = None;
    let stats = mock::run(cfg, Arc::clone(&stop), |addr, stats| {
        let stats = Arc::clone(stats);
        metrics_err = crate::serve_metrics(a.metrics.as_deref(), &stop, move |f| stats.families(f));
        if metrics_err.is_some() {
            return;
        }
        println!("mock exchange listening on ws://{addr} (REST on http://{addr})");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    if let Some(e) = metrics_err {
        return Err(e.into());
    }
    println!("{}", serde_json::json!({ "mock_exchange": stats.to_json() }));
    Ok(ExitCode::SUCCESS)
}
