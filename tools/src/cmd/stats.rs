//! `mdbus stats`: a live table of the bus read from the processes' `/metrics` endpoints — per
//! process its rate, last seq, subscribers or connections, lag behind the broker, drops,
//! reconnects, publisher health and latency percentiles. Refreshes in place on a terminal;
//! `--once` prints one table (rates over one interval) and exits.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use mdbus_metrics::Sample;

use crate::config::Config;
use crate::Cli;

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Metrics endpoints (host:port) [default: the metrics section of the config: broker,
    /// gateway, mock exchange].
    #[arg(value_name = "ADDR")]
    pub endpoints: Vec<String>,
    /// Seconds between refreshes (rates are over this interval).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Print one table and exit.
    #[arg(long)]
    pub once: bool,
}

/// One scrape of one endpoint, by sample name (+ labels).
struct Scrape {
    at: Instant,
    values: HashMap<String, f64>,
}

impl Scrape {
    fn new(samples: Vec<Sample>) -> Scrape {
        let values = samples
            .into_iter()
            .map(|s| {
                let key = if s.labels.is_empty() {
                    s.name
                } else {
                    let l: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{}{{{}}}", s.name, l.join(","))
                };
                (key, s.value)
            })
            .collect();
        Scrape { at: Instant::now(), values }
    }

    fn get(&self, k: &str) -> Option<f64> {
        self.values.get(k).copied()
    }

    fn kind(&self) -> &'static str {
        if self.values.contains_key("market_trades_total") {
            "broker"
        } else if self.values.contains_key("gateway_connections") {
            "gateway"
        } else if self.values.contains_key("mock_trades_total") {
            "mock-exchange"
        } else {
            "?"
        }
    }

    /// Per second between `prev` and this scrape.
    fn rate(&self, prev: Option<&Scrape>, k: &str) -> Option<f64> {
        let p = prev?;
        let dt = self.at.duration_since(p.at).as_secs_f64();
        let d = self.get(k)? - p.get(k)?;
        (dt > 0.0).then(|| d.max(0.0) / dt)
    }
}

fn n(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.0}"))
}

fn quantiles(s: &Scrape, name: &str) -> Option<String> {
    let p50 = s.get(&format!("{name}{{quantile=0.5}}"))?;
    let p99 = s.get(&format!("{name}{{quantile=0.99}}"))?;
    (s.get(&format!("{name}_count"))? > 0.0).then(|| format!("{p50:.0}/{p99:.0}"))
}

const HEALTH: [&str; 4] = ["unknown", "healthy", "degraded", "failed"];
const FEED: [&str; 5] = ["unknown", "live", "down", "ended", "stopped"];

fn name_of(table: &[&str], v: Option<f64>) -> String {
    v.and_then(|x| table.get(x as usize)).map_or_else(|| "-".into(), |s| (*s).to_owned())
}

fn table(endpoints: &[String], now: &[Option<Scrape>], prev: &[Option<Scrape>], errors: &[String]) -> String {
    let mut out = String::new();
    let broker_seq =
        now.iter().flatten().find(|s| s.kind() == "broker").and_then(|s| s.get("market_last_seq{stream=realtime}"));
    out.push_str(&format!(
        "{:<14} {:<22} {:>10} {:>12} {:>6} {:>8} {:>7} {:>7} {:<9} {}\n",
        "PROCESS", "ENDPOINT", "RATE/s", "LAST SEQ", "SUBS", "LAG", "DROPS", "RECONN", "HEALTH", "LATENCY p50/p99 µs"
    ));
    for (i, ep) in endpoints.iter().enumerate() {
        let Some(s) = &now[i] else {
            out.push_str(&format!("{:<14} {:<22} down: {}\n", "?", ep, errors[i]));
            continue;
        };
        let p = prev[i].as_ref();
        let row = match s.kind() {
            "broker" => {
                let seq = s.get("market_last_seq{stream=realtime}");
                let lat = quantiles(s, "ingest_latency_us").map_or_else(String::new, |q| format!("ingest {q}"));
                [
                    format!("{} frames", n(s.rate(p, "market_published_total"))),
                    n(seq),
                    n(s.get("market_subscriber_count")),
                    "0".into(),
                    n(s.get("market_dropped_total").or(Some(0.0))),
                    n(s.get("broker_reconnect_total")),
                    name_of(&FEED, s.get("broker_feed_state")),
                    lat,
                ]
            }
            "gateway" => {
                let seq = s.get("market_last_seq{stream=realtime}");
                let lag = match (broker_seq, seq) {
                    (Some(b), Some(g)) => Some((b - g).max(0.0)),
                    _ => None,
                };
                let drops = [
                    "gateway_disconnected_total{reason=slow}",
                    "gateway_disconnected_total{reason=abuse}",
                    "gateway_disconnected_total{reason=pong_timeout}",
                ]
                .iter()
                .filter_map(|k| s.get(k))
                .sum::<f64>();
                let mut lat = Vec::new();
                if let Some(q) = quantiles(s, "fanout_latency_us") {
                    lat.push(format!("fanout {q}"));
                }
                if let Some(q) = quantiles(s, "e2e_latency_us") {
                    lat.push(format!("e2e {q}"));
                }
                [
                    format!("{} msgs", n(s.rate(p, "gateway_messages_out_total"))),
                    n(seq),
                    n(s.get("gateway_connections")),
                    n(lag),
                    format!("{drops:.0}"),
                    "-".into(),
                    name_of(&HEALTH, s.get("market_publisher_health")),
                    lat.join(" "),
                ]
            }
            "mock-exchange" => [
                format!("{} trades", n(s.rate(p, "mock_trades_total"))),
                "-".into(),
                "-".into(),
                "-".into(),
                n(s.get("mock_lagged_total")),
                n(s.get("mock_dropped_total")),
                "-".into(),
                String::new(),
            ],
            _ => ["-".into(), "-".into(), "-".into(), "-".into(), "-".into(), "-".into(), "-".into(), String::new()],
        };
        out.push_str(&format!(
            "{:<14} {:<22} {:>10} {:>12} {:>6} {:>8} {:>7} {:>7} {:<9} {}\n",
            s.kind(),
            ep,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7]
        ));
    }
    out
}

pub fn run(cli: &Cli, a: &StatsArgs) -> Result<ExitCode> {
    let endpoints = if a.endpoints.is_empty() {
        let m = Config::load(cli.config.as_deref())?.metrics;
        vec![m.broker, m.gateway, m.mock_exchange]
    } else {
        a.endpoints.clone()
    };
    if !(a.interval.is_finite() && a.interval > 0.0) {
        anyhow::bail!("--interval {}: expected a positive number of seconds", a.interval);
    }
    let every = Duration::from_secs_f64(a.interval);
    let stop = crate::signals::stop_flag()?;
    let tty = std::io::stdout().is_terminal() && !a.once;
    let scrape_all = || -> (Vec<Option<Scrape>>, Vec<String>) {
        let mut errors = Vec::new();
        let scrapes = endpoints
            .iter()
            .map(|ep| match mdbus_metrics::scrape(ep, Duration::from_secs(2)) {
                Ok(s) => {
                    errors.push(String::new());
                    Some(Scrape::new(s))
                }
                Err(e) => {
                    errors.push(e.to_string());
                    None
                }
            })
            .collect();
        (scrapes, errors)
    };
    let (mut prev, _) = scrape_all();
    loop {
        std::thread::sleep(every);
        let (now, errors) = scrape_all();
        let t = table(&endpoints, &now, &prev, &errors);
        let mut out = std::io::stdout().lock();
        if tty {
            // Home and clear: the table refreshes in place.
            let _ = write!(out, "\x1b[H\x1b[2J");
        }
        let _ = writeln!(out, "mdbus stats  every {:.1} s\n{t}", a.interval);
        let _ = out.flush();
        if a.once {
            let up = now.iter().filter(|s| s.is_some()).count();
            return Ok(if up == 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS });
        }
        prev = now;
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}
