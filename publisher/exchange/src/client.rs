//! The live source: combined-stream WebSocket connections to a Binance-compatible exchange,
//! pushing trades into the broker's [`Ingress`] queue.
//!
//! Lifecycle per connection (symbols spread over connections, at most 1024 streams each):
//! connect → read; pings are answered by the WebSocket layer; no message (data or ping) within
//! `dead_after`, a close, an error or a `serverShutdown` event ends the connection. Its symbols
//! are then reported down (the engine fabricates no empty K-lines for them), and the connection is
//! retried with exponential backoff and jitter (at once after `serverShutdown` or a rotation
//! before the exchange's 24 h cut). After a reconnect every symbol is backfilled over REST from
//! its last trade id (`/api/v3/aggTrades?fromId=`), deduplicated, and fed in order before any live
//! trade; then it is reported up. Ids are consecutive per symbol, so a gap inside a connection (a
//! lost or reordered message) is backfilled the same way, and a duplicate is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mdbus_publisher::ingress::{Ingress, LiveEvent};
use mdbus_publisher::source::EXTERNAL_SCALE;
use mdbus_schema::{Symbol, Trade};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::wire::{self, Message, RestTrade, WireTrade};

/// Which trade stream to subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TradeStream {
    /// `<symbol>@aggTrade`, backfilled from `/api/v3/aggTrades`.
    #[default]
    AggTrade,
    /// `<symbol>@trade`, backfilled from `/api/v3/historicalTrades`.
    Trade,
}

impl TradeStream {
    fn suffix(self) -> &'static str {
        match self {
            TradeStream::AggTrade => "aggTrade",
            TradeStream::Trade => "trade",
        }
    }
    fn rest_path(self) -> &'static str {
        match self {
            TradeStream::AggTrade => "/api/v3/aggTrades",
            TradeStream::Trade => "/api/v3/historicalTrades",
        }
    }
}

impl std::str::FromStr for TradeStream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "aggTrade" => Ok(TradeStream::AggTrade),
            "trade" => Ok(TradeStream::Trade),
            other => Err(format!("unknown trade stream {other:?} (expected aggTrade or trade)")),
        }
    }
}

/// Settings of the live source.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Base WebSocket URL (`ws://host:port`); connections go to `<base>/stream?streams=…`.
    pub ws_url: String,
    /// Base REST URL (`http://host:port`) for backfill.
    pub rest_url: String,
    /// Symbol `i` has id `i`.
    pub symbols: Vec<String>,
    pub stream: TradeStream,
    /// Streams per connection (Binance: at most 1024).
    pub per_connection: usize,
    /// No message (data or ping) for this long: the connection is dead.
    pub dead_after: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Reconnect before the exchange's 24 h cut.
    pub rotate_after: Duration,
    /// Pause between opening connections (Binance limits connection attempts).
    pub connect_spacing: Duration,
}

impl LiveConfig {
    pub fn new(ws_url: &str, rest_url: &str, symbols: Vec<String>) -> LiveConfig {
        LiveConfig {
            ws_url: ws_url.trim_end_matches('/').to_owned(),
            rest_url: rest_url.trim_end_matches('/').to_owned(),
            symbols,
            stream: TradeStream::AggTrade,
            per_connection: 1024,
            dead_after: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            rotate_after: Duration::from_secs(23 * 3600),
            connect_spacing: Duration::from_millis(250),
        }
    }
}

/// Counters of the live source.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub trades: AtomicU64,
    pub malformed: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub backfilled: AtomicU64,
    pub backfill_failures: AtomicU64,
    /// Sum and last of the outages (disconnect → data flowing again), ms.
    pub outage_ms_total: AtomicU64,
    pub last_outage_ms: AtomicU64,
}

impl LiveStats {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "connects": g(&self.connects), "reconnects": g(&self.reconnects),
            "connect_failures": g(&self.connect_failures), "trades": g(&self.trades),
            "malformed": g(&self.malformed), "duplicates": g(&self.duplicates), "gaps": g(&self.gaps),
            "backfilled": g(&self.backfilled), "backfill_failures": g(&self.backfill_failures),
            "outage_ms_total": g(&self.outage_ms_total), "last_outage_ms": g(&self.last_outage_ms),
        })
    }
}

impl LiveStats {
    /// Adds the exchange connections' families to a scrape.
    pub fn families(&self, f: &mut mdbus_metrics::Families) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        f.counter("broker_reconnect_total", "reconnects to the exchange", g(&self.reconnects))
            .counter("exchange_connects_total", "exchange connections established", g(&self.connects))
            .counter("exchange_connect_failures_total", "failed connection attempts", g(&self.connect_failures))
            .counter("exchange_trades_total", "trades received from the exchange", g(&self.trades))
            .counter("exchange_malformed_total", "malformed exchange messages skipped", g(&self.malformed))
            .counter("exchange_duplicates_total", "duplicate trades dropped", g(&self.duplicates))
            .counter("exchange_gaps_total", "trade-id gaps seen after a reconnect", g(&self.gaps))
            .counter("exchange_backfilled_total", "trades recovered over REST", g(&self.backfilled))
            .counter("exchange_backfill_failures_total", "REST backfills that failed", g(&self.backfill_failures))
            .counter("exchange_outage_ms_total", "time without data across outages, ms", g(&self.outage_ms_total))
            .gauge("exchange_last_outage_ms", "length of the last outage, ms", g(&self.last_outage_ms) as f64);
    }
}

/// Starts the connections on their own thread. They run until `stop`.
pub fn start(
    cfg: LiveConfig,
    ingress: Arc<Ingress>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(std::thread::JoinHandle<()>, Arc<LiveStats>)> {
    // TLS (wss://, https://) with ring; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let stats = Arc::new(LiveStats::default());
    let st = Arc::clone(&stats);
    let handle = std::thread::Builder::new().name("exchange".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the exchange connections");
                return;
            }
        };
        rt.block_on(async move {
            let cfg = Arc::new(cfg);
            let per = cfg.per_connection.clamp(1, 1024);
            let ids: Vec<u32> = (0..cfg.symbols.len() as u32).collect();
            let mut tasks = Vec::new();
            for (n, group) in ids.chunks(per).enumerate() {
                if n > 0 {
                    tokio::time::sleep(cfg.connect_spacing).await;
                }
                let conn = Connection::new(n, group.to_vec(), Arc::clone(&cfg), Arc::clone(&ingress), Arc::clone(&st));
                tasks.push(tokio::spawn(conn.run(Arc::clone(&stop))));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    })?;
    Ok((handle, stats))
}

struct Connection {
    n: usize,
    ids: Vec<u32>,
    by_name: HashMap<String, u32>,
    symbols: Vec<Symbol>,
    last: HashMap<u32, i64>,
    cfg: Arc<LiveConfig>,
    ingress: Arc<Ingress>,
    stats: Arc<LiveStats>,
    http: Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Empty<Bytes>>,
}

fn sampled(n: u64) -> bool {
    n <= 5 || n.is_power_of_two()
}

impl Connection {
    fn new(n: usize, ids: Vec<u32>, cfg: Arc<LiveConfig>, ingress: Arc<Ingress>, stats: Arc<LiveStats>) -> Connection {
        let by_name = ids.iter().map(|&i| (cfg.symbols[i as usize].to_ascii_uppercase(), i)).collect();
        let symbols = cfg.symbols.iter().map(|s| Symbol::new(s).unwrap_or_else(|_| unreachable_symbol())).collect();
        // http:// (the mock exchange) or https:// (Binance), webpki roots.
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
        let http = Client::builder(TokioExecutor::new()).build(https);
        Connection { n, ids, by_name, symbols, last: HashMap::new(), cfg, ingress, stats, http }
    }

    fn url(&self) -> String {
        let streams: Vec<String> = self
            .ids
            .iter()
            .map(|&i| format!("{}@{}", self.cfg.symbols[i as usize].to_ascii_lowercase(), self.cfg.stream.suffix()))
            .collect();
        // Microsecond times where the exchange has them (Binance since 2025; ms otherwise).
        format!("{}/stream?streams={}&timeUnit=MICROSECOND", self.cfg.ws_url, streams.join("/"))
    }

    fn push(&mut self, id: u32, w: &WireTrade<'_>) {
        let t = Trade {
            symbol: self.symbols[id as usize],
            symbol_id: id,
            price_scale: EXTERNAL_SCALE,
            qty_scale: EXTERNAL_SCALE,
            is_buyer_maker: w.buyer_maker,
            trade_id: w.id,
            price: w.price,
            qty: w.qty,
            time_us: w.time_us,
        };
        self.last.insert(id, w.id);
        self.stats.trades.fetch_add(1, Ordering::Relaxed);
        self.ingress.push(LiveEvent::Trade(t));
    }

    /// Fetches trades `from..=to` (to the newest with `None`) over REST and pushes those after
    /// the symbol's last id. False if the exchange could not be asked.
    async fn backfill(&mut self, id: u32, from: i64, to: Option<i64>) -> bool {
        let name = self.cfg.symbols[id as usize].to_ascii_uppercase();
        let mut next = from;
        loop {
            let url =
                format!("{}{}?symbol={name}&fromId={next}&limit=1000", self.cfg.rest_url, self.cfg.stream.rest_path());
            let rows = match self.get_rows(&url).await {
                Ok(r) => r,
                Err(e) => {
                    self.stats.backfill_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(conn = self.n, symbol = %name, from = next, error = %e, "backfill failed");
                    return false;
                }
            };
            let full = rows.len() >= 1000;
            for r in &rows {
                if to.is_some_and(|t| r.a > t) {
                    return true;
                }
                if self.last.get(&id).is_some_and(|&l| r.a <= l) {
                    continue;
                }
                match r.to_wire(&name) {
                    Ok(w) => {
                        self.push(id, &w);
                        self.stats.backfilled.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(symbol = %name, error = %e, "bad backfill row skipped");
                    }
                }
                next = r.a + 1;
            }
            if !full || rows.is_empty() {
                return true;
            }
        }
    }

    async fn get_rows(&self, url: &str) -> Result<Vec<RestTrade>, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let mut last_err: String;
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_times(3)
            .with_jitter()
            .build();
        loop {
            let attempt = async {
                let req = hyper::Request::get(uri.clone())
                    .header("X-MBX-TIME-UNIT", "MICROSECOND")
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| e.to_string())?;
                let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                if !status.is_success() {
                    return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])));
                }
                serde_json::from_slice::<Vec<RestTrade>>(&body).map_err(|e| format!("bad JSON: {e}"))
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(rows)) => return Ok(rows),
                Ok(Err(e)) => last_err = e,
                Err(_) => last_err = "timed out".into(),
            }
            match delays.next() {
                Some(d) => tokio::time::sleep(d).await,
                None => return Err(last_err),
            }
        }
    }

    async fn run(mut self, stop: Arc<AtomicBool>) {
        let mut backoff = self.new_backoff();
        let mut first = true;
        let mut down_since: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let url = self.url();
            let connected =
                tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url.as_str())).await;
            let mut ws = match connected {
                Ok(Ok((ws, _))) => ws,
                other => {
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    let d = backoff.next().unwrap_or(self.cfg.backoff_max);
                    tracing::warn!(conn = self.n, error = %why, retry_in_ms = d.as_millis() as u64, "exchange connect failed");
                    sleep_unless(d, &stop).await;
                    continue;
                }
            };
            self.stats.connects.fetch_add(1, Ordering::Relaxed);
            if first {
                tracing::info!(conn = self.n, symbols = self.ids.len(), "exchange connected");
            } else {
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                self.ingress.push(LiveEvent::Reconnected);
                // Everything missed since the last trade, in order, before any live trade.
                for id in self.ids.clone() {
                    let ok = match self.last.get(&id).copied() {
                        Some(l) => self.backfill(id, l + 1, None).await,
                        None => true,
                    };
                    self.ingress.push(LiveEvent::Up { symbol: id, backfilled: ok });
                }
                let outage = down_since.take().map_or(0, |t| t.elapsed().as_millis() as u64);
                self.stats.outage_ms_total.fetch_add(outage, Ordering::Relaxed);
                self.stats.last_outage_ms.store(outage, Ordering::Relaxed);
                tracing::info!(conn = self.n, outage_ms = outage, "exchange reconnected and backfilled");
            }
            first = false;
            let since = Instant::now();
            let mut last_msg = Instant::now();
            let mut got_data = false;
            let reason = loop {
                if stop.load(Ordering::Relaxed) {
                    break "stopping".to_string();
                }
                if since.elapsed() > self.cfg.rotate_after {
                    break "rotating before the 24 h cut".into();
                }
                if last_msg.elapsed() > self.cfg.dead_after {
                    break format!("no data or ping for {:?}", self.cfg.dead_after);
                }
                // Short waits, so that a stop or a dead connection is noticed promptly.
                let slice = self.cfg.dead_after.min(Duration::from_millis(100));
                let msg = match tokio::time::timeout(slice, ws.next()).await {
                    Err(_) => continue,
                    Ok(None) => break "closed by the exchange".into(),
                    Ok(Some(Err(e))) => break format!("connection error: {e}"),
                    Ok(Some(Ok(m))) => {
                        last_msg = Instant::now();
                        m
                    }
                };
                let text = match msg {
                    WsMessage::Text(t) => t,
                    WsMessage::Close(f) => break format!("close frame {f:?}"),
                    _ => continue,
                };
                if !got_data {
                    got_data = true;
                    backoff = self.new_backoff();
                }
                match wire::parse(&text) {
                    Ok(Message::Trade(w)) => {
                        let Some(&id) = self.by_name.get(w.symbol.as_ref()) else { continue };
                        match self.last.get(&id).copied() {
                            Some(l) if w.id <= l => {
                                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Some(l) if w.id > l + 1 => {
                                let n = self.stats.gaps.fetch_add(1, Ordering::Relaxed) + 1;
                                if sampled(n) {
                                    tracing::warn!(conn = self.n, symbol = %w.symbol, missing = w.id - l - 1, "trade id gap; backfilling");
                                }
                                if !self.backfill(id, l + 1, Some(w.id - 1)).await {
                                    // Not recoverable now: mark the hole so the K-line says so.
                                    self.ingress.push(LiveEvent::Down(id));
                                    self.ingress.push(LiveEvent::Up { symbol: id, backfilled: false });
                                }
                            }
                            _ => {}
                        }
                        self.push(id, &w);
                    }
                    Ok(Message::Shutdown) => break "serverShutdown".into(),
                    Ok(Message::Reply | Message::Other) => {}
                    Err(e) => {
                        let n = self.stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                        if sampled(n) {
                            let sample: String = text.chars().take(120).collect();
                            tracing::warn!(conn = self.n, error = %e, sample = %sample, count = n, "malformed exchange message skipped");
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
            if reason == "stopping" {
                break;
            }
            for &id in &self.ids {
                self.ingress.push(LiveEvent::Down(id));
            }
            down_since = Some(Instant::now());
            let at_once = reason == "serverShutdown" || reason.starts_with("rotating");
            let d = if at_once { Duration::ZERO } else { backoff.next().unwrap_or(self.cfg.backoff_max) };
            tracing::warn!(conn = self.n, reason = %reason, retry_in_ms = d.as_millis() as u64, "exchange connection lost");
            sleep_unless(d, &stop).await;
        }
    }

    fn new_backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.cfg.backoff_min)
            .with_max_delay(self.cfg.backoff_max)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// Sleeps `d`, waking early on `stop`.
async fn sleep_unless(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep((end - Instant::now()).min(Duration::from_millis(100))).await;
    }
}

fn unreachable_symbol() -> Symbol {
    // Symbols were validated by the broker's source before the connections start.
    Symbol::new("INVALID").unwrap_or_else(|_| unreachable!())
}
