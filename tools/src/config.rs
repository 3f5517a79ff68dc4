//! The TOML configuration: embedded defaults (`config/default.toml`) < `--config FILE` <
//! `MDBUS_*` environment < flags. Parsed once at start-up into typed values; errors name the
//! file and key.

use std::path::Path;

use anyhow::{bail, Context, Result};
use mdbus_bus::StreamSettings;
use serde::Deserialize;

/// The embedded defaults, also shipped as `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub bus: BusSection,
    #[serde(default)]
    pub broker: BrokerSection,
    #[serde(default)]
    pub wal: WalSection,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub batch: BatchSection,
}

/// Durable K-lines: the broker's delayed snapshot stream, the batch writer's database, the
/// broker's restart from it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSection {
    /// The broker publishes the snapshot stream and restarts from the database.
    pub enabled: bool,
    /// `sqlite:PATH` or `postgres://…`; empty: `sqlite:<data dir>/<bus>/klines.db`.
    pub db: String,
    pub snapshot_interval_ms: u64,
    pub ack_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub max_pending_closed: usize,
    /// The broker waits this long for the database at start-up before giving up.
    pub restore_timeout_s: f64,
}

impl Default for BatchSection {
    fn default() -> Self {
        BatchSection {
            enabled: false,
            db: String::new(),
            snapshot_interval_ms: 100,
            ack_timeout_ms: 2000,
            write_timeout_ms: 30000,
            max_pending_closed: 500_000,
            restore_timeout_s: 30.0,
        }
    }
}

impl BatchSection {
    /// The database of `bus`.
    pub fn db_for(&self, bus: &str) -> Result<mdbus_store::DbUrl> {
        let s = if self.db.is_empty() {
            format!("sqlite:{}", data_dir(bus).join("klines.db").display())
        } else {
            self.db.clone()
        };
        s.parse::<mdbus_store::DbUrl>().map_err(|e| anyhow::anyhow!("batch.db = {s:?}: {e}"))
    }
}

/// Prometheus endpoints: the addresses `mdbus demo` gives its processes and `mdbus stats` reads.
/// (A process started on its own serves metrics only with `--metrics ADDR`.)
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub broker: String,
    pub gateway: String,
    pub mock_exchange: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            broker: "127.0.0.1:9740".into(),
            gateway: "127.0.0.1:9741".into(),
            mock_exchange: "127.0.0.1:9742".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    pub listen: String,
    /// Empty: no token (allowed only on a loopback address).
    pub token: String,
    pub queue: usize,
    pub slow_client: String,
    pub max_connections: usize,
    pub max_streams: usize,
    pub max_message_bytes: usize,
    pub max_msg_rate: f64,
    pub abuse_after: u32,
    pub ping_interval_s: f64,
    pub pong_timeout_s: f64,
    pub threads: usize,
    pub core: Option<usize>,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listen: "127.0.0.1:9443".into(),
            token: String::new(),
            queue: 4096,
            slow_client: "conflate".into(),
            max_connections: 4096,
            max_streams: 1024,
            max_message_bytes: 65536,
            max_msg_rate: 5.0,
            abuse_after: 10,
            ping_interval_s: 20.0,
            pong_timeout_s: 60.0,
            threads: 1,
            core: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WalSection {
    pub enabled: bool,
    /// Empty: `<data dir>/<bus>/wal/realtime`, data dir = `MDBUS_DATA_DIR` or
    /// `~/.local/share/mdbus`.
    pub dir: String,
    pub durability: String,
    pub segment_bytes: u64,
    pub retention_bytes: u64,
}

impl Default for WalSection {
    fn default() -> Self {
        WalSection {
            enabled: true,
            dir: String::new(),
            durability: "interval:10".into(),
            segment_bytes: 64 * 1024 * 1024,
            retention_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Where a bus keeps its files: `MDBUS_DATA_DIR`, else `~/.local/share/mdbus`, else the temp dir.
pub fn data_dir(bus: &str) -> std::path::PathBuf {
    let base = std::env::var_os("MDBUS_DATA_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(|h| std::path::PathBuf::from(h).join(".local/share/mdbus"))
            .unwrap_or_else(|| std::env::temp_dir().join("mdbus"))
    });
    base.join(bus)
}

impl WalSection {
    /// The log directory of `stream` on `bus`.
    pub fn dir_for(&self, bus: &str, stream: &str) -> std::path::PathBuf {
        if self.dir.is_empty() {
            data_dir(bus).join("wal").join(stream)
        } else {
            std::path::PathBuf::from(&self.dir)
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BusSection {
    pub max_sample_bytes: usize,
    pub subscriber_buffer: usize,
    pub max_subscribers: usize,
}

impl Default for BusSection {
    fn default() -> Self {
        let s = StreamSettings::default();
        BusSection {
            max_sample_bytes: s.max_sample_bytes,
            subscriber_buffer: s.subscriber_buffer,
            max_subscribers: s.max_subscribers,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    pub source: String,
    pub clock: String,
    pub seed: u64,
    pub symbols: Vec<String>,
    pub rate: f64,
    pub speed: f64,
    pub heartbeat_ms: u64,
    pub tick_ms: u64,
    pub close_grace_ms: i64,
    pub late_policy: String,
    pub max_empty_run: u32,
    pub core: Option<usize>,
    pub workers: usize,
    pub cores: Vec<usize>,
    pub ingress_queue: usize,
    pub ingress_policy: String,
    pub trade_stream: String,
    pub dead_after_s: f64,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            source: "synthetic".into(),
            clock: "wall".into(),
            seed: 1,
            symbols: ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"].map(String::from).to_vec(),
            rate: 200.0,
            speed: 0.0,
            heartbeat_ms: 50,
            tick_ms: 10,
            close_grace_ms: 200,
            late_policy: "drop".into(),
            max_empty_run: 1000,
            core: None,
            workers: 0,
            cores: Vec::new(),
            ingress_queue: 65536,
            ingress_policy: "block".into(),
            trade_stream: "aggTrade".into(),
            dead_after_s: 30.0,
        }
    }
}

impl Config {
    /// The embedded defaults overlaid with `file` if given.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let mut base: toml::Table = toml::from_str(DEFAULT_TOML).context("parsing the embedded default config")?;
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
            let over: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
            merge(&mut base, over);
        }
        let name = file.map_or_else(|| "embedded defaults".to_owned(), |p| p.display().to_string());
        let cfg: Config = toml::Value::Table(base).try_into().with_context(|| format!("invalid config in {name}"))?;
        cfg.validate().with_context(|| format!("invalid config in {name}"))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.bus.max_sample_bytes < 1024 {
            bail!("bus.max_sample_bytes = {} is below 1024", self.bus.max_sample_bytes);
        }
        if self.bus.subscriber_buffer == 0 || self.bus.max_subscribers == 0 {
            bail!("bus.subscriber_buffer and bus.max_subscribers must be at least 1");
        }
        if self.broker.heartbeat_ms == 0 || self.broker.heartbeat_ms > 100 {
            bail!("broker.heartbeat_ms = {} must be within 1..=100", self.broker.heartbeat_ms);
        }
        if !matches!(self.broker.clock.as_str(), "wall" | "event") {
            bail!("broker.clock = {:?}: expected \"wall\" or \"event\"", self.broker.clock);
        }
        let src = self.broker.source.as_str();
        if !(src == "synthetic" || src == "binance" || src.starts_with("csv:") || src.starts_with("ws:")) {
            bail!("broker.source = {src:?}: expected synthetic, binance, csv:PATH or ws:URL");
        }
        if let Err(e) = self.broker.ingress_policy.parse::<mdbus_publisher::ingress::IngressPolicy>() {
            bail!("broker.ingress_policy: {e}");
        }
        if self.broker.ingress_queue == 0 {
            bail!("broker.ingress_queue must be at least 1");
        }
        if !(self.broker.rate > 0.0 && self.broker.rate.is_finite()) {
            bail!("broker.rate = {} must be a positive number", self.broker.rate);
        }
        if !(self.broker.speed >= 0.0 && self.broker.speed.is_finite()) {
            bail!("broker.speed = {} must be 0 or positive", self.broker.speed);
        }
        // A set, not a pairwise scan: 10 000 symbols took 300 ms of every start that way.
        let mut seen = std::collections::HashSet::with_capacity(self.broker.symbols.len());
        for x in &self.broker.symbols {
            if !seen.insert(x.to_ascii_uppercase()) {
                bail!("broker.symbols: {x} is listed twice");
            }
        }
        if self.broker.symbols.is_empty() {
            bail!("broker.symbols must name at least one symbol");
        }
        if !matches!(self.broker.late_policy.as_str(), "drop" | "amend") {
            bail!("broker.late_policy = {:?}: expected \"drop\" or \"amend\"", self.broker.late_policy);
        }
        if let Err(e) = self.wal.durability.parse::<mdbus_wal::Durability>() {
            bail!("wal.durability: {e}");
        }
        if self.batch.snapshot_interval_ms == 0 || self.batch.ack_timeout_ms == 0 {
            bail!("batch.snapshot_interval_ms and batch.ack_timeout_ms must be positive");
        }
        if !self.batch.db.is_empty() {
            if let Err(e) = self.batch.db.parse::<mdbus_store::DbUrl>() {
                bail!("batch.db = {:?}: {e}", self.batch.db);
            }
        }
        if self.wal.segment_bytes < 4096 {
            bail!("wal.segment_bytes = {} is below 4096", self.wal.segment_bytes);
        }
        if self.broker.workers > 256 {
            bail!("broker.workers = {} must be within 0..=256", self.broker.workers);
        }
        if self.broker.max_empty_run == 0 {
            bail!("broker.max_empty_run must be at least 1");
        }
        let g = &self.gateway;
        if let Err(e) = g.listen.parse::<std::net::SocketAddr>() {
            bail!("gateway.listen = {:?}: {e} (expected IP:PORT)", g.listen);
        }
        if let Err(e) = g.slow_client.parse::<mdbus_gateway::SlowPolicy>() {
            bail!("gateway.slow_client: {e}");
        }
        if g.queue == 0 || g.max_connections == 0 || g.max_streams == 0 || g.threads == 0 {
            bail!("gateway.queue, max_connections, max_streams and threads must be at least 1");
        }
        if g.max_message_bytes < 1024 {
            bail!("gateway.max_message_bytes = {} is below 1024", g.max_message_bytes);
        }
        if !(g.max_msg_rate > 0.0 && g.max_msg_rate.is_finite()) {
            bail!("gateway.max_msg_rate = {} must be a positive number", g.max_msg_rate);
        }
        if !(g.ping_interval_s > 0.0 && g.pong_timeout_s > 0.0) {
            bail!("gateway.ping_interval_s and pong_timeout_s must be positive");
        }
        if self.broker.close_grace_ms < 0 {
            bail!("broker.close_grace_ms = {} must not be negative", self.broker.close_grace_ms);
        }
        Ok(())
    }

    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            max_sample_bytes: self.bus.max_sample_bytes,
            subscriber_buffer: self.bus.subscriber_buffer,
            max_subscribers: self.bus.max_subscribers,
            ..StreamSettings::default()
        }
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_match_the_code_defaults() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.bus, BusSection::default());
        assert_eq!(c.broker, BrokerSection::default());
        assert_eq!(c.wal, WalSection::default());
        assert_eq!(c.batch, BatchSection::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = std::env::temp_dir().join(format!("mdbus-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "[broker]\nheartbeet_ms = 5\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("heartbeet_ms"), "{e}");
        std::fs::write(&p, "[broker]\nheartbeat_ms = 500\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("broker.heartbeat_ms = 500"), "{e}");
        std::fs::write(&p, "[broker]\nsymbols = [\"BTCUSDT\", \"ETHUSDT\", \"btcusdt\"]\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("btcusdt is listed twice"), "{e}");
        std::fs::write(&p, "[bus]\nsubscriber_buffer = 64\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.bus.subscriber_buffer, 64);
        assert_eq!(c.bus.max_sample_bytes, 16384, "other keys keep their defaults");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
