//! `mdbus`: one binary, one subcommand per process of the bus.
//!
//! Upstream: the command line, `MDBUS_*` environment, TOML config. Downstream: the broker
//! (`mdbus-publisher`), the client library (`mdbus-subscribers`) and the benchmarks.

#![forbid(unsafe_code)]

mod cmd;
mod config;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// A shared-memory, zero-copy market-data bus: trades and K-lines from a broker to co-located
/// readers over iceoryx2.
#[derive(Debug, Parser)]
#[command(name = "mdbus", version, about, propagate_version = true)]
pub struct Cli {
    /// TOML config file (defaults are embedded; see config/default.toml).
    #[arg(long, global = true, env = "MDBUS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Bus name: the namespace of this bus's shared-memory services [default: "default"; for
    /// `demo`: "demo"].
    #[arg(long, global = true, env = "MDBUS_BUS", value_name = "NAME")]
    pub bus: Option<String>,
    /// Log format on stderr (filter with RUST_LOG, default info).
    #[arg(long, global = true, env = "MDBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The bus this process works on.
    pub fn bus(&self) -> String {
        match (&self.bus, &self.command) {
            (Some(b), _) => b.clone(),
            (None, Command::Demo(_)) => "demo".into(),
            (None, _) => "default".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job on embedded defaults: a broker on the synthetic feed plus a live summary.
    Demo(cmd::demo::DemoArgs),
    /// Ingest trades, aggregate K-lines, publish them on the bus.
    Broker(Box<cmd::broker::BrokerArgs>),
    /// Serve the bus to WebSocket clients, speaking Binance's market-stream protocol.
    Gateway(cmd::gateway::GatewayArgs),
    /// Write the broker's delayed snapshots of K-lines to SQLite or PostgreSQL, acking each commit.
    Batch(cmd::batch::BatchArgs),
    /// A local Binance-compatible exchange (synthetic or dataset trades) with fault injection.
    MockExchange(cmd::mock_exchange::MockExchangeArgs),
    /// Print frames of a stream as JSON lines.
    Tail(cmd::tail::TailArgs),
    /// Print frames from the write-ahead log (`--from-seq N`, `--to-seq M`, `--follow`).
    Replay(cmd::replay::ReplayArgs),
    /// A live table of the bus from the processes' metrics endpoints.
    Stats(cmd::stats::StatsArgs),
    /// Measure the bus against raw iceoryx2 and a Unix socket in the same run.
    Bench(cmd::bench::BenchArgs),
    /// Render BENCHMARKS.md from runs of `mdbus bench all --json` (see scripts/benchmarks.sh).
    BenchReport(cmd::bench::ReportArgs),
    /// Benchmark helper process (started by `mdbus bench`).
    #[command(hide = true)]
    BenchPeer(cmd::bench::PeerArgs),
}

/// Serves `/metrics` on `addr` (if given) from `fill`. On failure sets `stop` — the caller then
/// stops before announcing its address: a process asked for metrics does not run without them —
/// and returns the error.
pub fn serve_metrics(
    addr: Option<&str>,
    stop: &std::sync::atomic::AtomicBool,
    fill: impl Fn(&mut mdbus_metrics::Families) + Send + Sync + 'static,
) -> Option<mdbus_metrics::MetricsServerError> {
    let addr = addr?;
    let served = mdbus_metrics::serve(addr, move || {
        let mut f = mdbus_metrics::Families::new();
        fill(&mut f);
        f
    });
    match served {
        Ok(_) => None,
        Err(e) => {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            Some(e)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match &cli.command {
        Command::Demo(a) => cmd::demo::run(&cli, a),
        Command::Broker(a) => cmd::broker::run(&cli, a),
        Command::Gateway(a) => cmd::gateway::run(&cli, a),
        Command::Batch(a) => cmd::batch::run(&cli, a),
        Command::MockExchange(a) => cmd::mock_exchange::run(&cli, a),
        Command::Tail(a) => cmd::tail::run(&cli, a),
        Command::Replay(a) => cmd::replay::run(&cli, a),
        Command::Stats(a) => cmd::stats::run(&cli, a),
        Command::Bench(a) => cmd::bench::run(&cli, a),
        Command::BenchPeer(a) => cmd::bench::peer(&cli, a),
        Command::BenchReport(a) => cmd::bench::report(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mdbus: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
