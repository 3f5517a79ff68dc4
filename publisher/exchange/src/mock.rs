//! `mdbus mock-exchange`: a local Binance-compatible exchange for tests and demos.
//!
//! Trades come from the synthetic generator (live, on the wall clock) or from Binance dataset
//! files (at `--speed`, on their own clock). It serves the market-stream protocol
//! (`/stream?streams=<s>@aggTrade/<s>@trade…`, `/ws/<streams>`, `SUBSCRIBE`, pings,
//! `timeUnit=MICROSECOND`) and the REST calls a client makes (`/api/v3/aggTrades`,
//! `/api/v3/historicalTrades` with `fromId`, `/api/v3/exchangeInfo`, `/ping`, `/time`), and keeps
//! every trade it sent so that backfills can be answered.
//!
//! Fault injection: drop each connection every N seconds (`drop_every`), stall (stop sending,
//! keep the socket) for `stall_for` every `stall_every`, send garbage / duplicate / reorder every
//! Nth message, announce `serverShutdown` and close every N seconds; and on command over HTTP:
//! `/mock/drop` drops every connection now, `/mock/outage?secs=N` also refuses connections for N
//! seconds, `/mock/stats` shows the counters.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mdbus_publisher::csvfeed::CsvFeed;
use mdbus_publisher::synthetic::{SyntheticConfig, SyntheticFeed};
use mdbus_schema::{Fixed, Trade};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Where the mock's trades come from.
#[derive(Debug, Clone)]
pub enum MockSource {
    Synthetic(SyntheticConfig),
    Csv(std::path::PathBuf),
}

/// Faults to inject (all off by default).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub drop_every: Option<Duration>,
    pub stall_every: Option<Duration>,
    pub stall_for: Duration,
    pub garbage_every: Option<u64>,
    pub duplicate_every: Option<u64>,
    pub reorder_every: Option<u64>,
    pub shutdown_every: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub listen: SocketAddr,
    pub source: MockSource,
    /// Dataset replay speed (× real time); 0 = as fast as possible.
    pub speed: f64,
    pub faults: Faults,
    pub ping_interval: Duration,
    /// Trades kept per symbol for backfill.
    pub history: usize,
    /// Start the replay when the first client connects (tests: nothing is sent before anyone
    /// listens).
    pub wait_for_client: bool,
}

/// Counters of the mock exchange.
#[derive(Debug, Default)]
pub struct MockStats {
    pub trades: AtomicU64,
    pub connections: AtomicU64,
    pub messages: AtomicU64,
    pub dropped: AtomicU64,
    pub stalls: AtomicU64,
    pub garbage: AtomicU64,
    pub duplicates: AtomicU64,
    pub reorders: AtomicU64,
    pub shutdowns: AtomicU64,
    pub lagged: AtomicU64,
    pub rest_requests: AtomicU64,
    /// 1 once a dataset source is exhausted.
    pub source_done: AtomicU64,
}

impl MockStats {
    /// Adds the mock exchange's families to a scrape.
    pub fn families(&self, f: &mut mdbus_metrics::Families) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        f.counter("mock_trades_total", "trades generated or read", g(&self.trades))
            .counter("mock_connections_total", "WebSocket connections accepted", g(&self.connections))
            .counter("mock_messages_total", "WebSocket messages sent", g(&self.messages))
            .counter("mock_dropped_total", "connections dropped on purpose (fault injection)", g(&self.dropped))
            .counter("mock_stalls_total", "stalls injected", g(&self.stalls))
            .counter("mock_garbage_total", "malformed messages injected", g(&self.garbage))
            .counter("mock_duplicates_total", "duplicate messages injected", g(&self.duplicates))
            .counter("mock_reorders_total", "reordered message pairs injected", g(&self.reorders))
            .counter("mock_shutdowns_total", "serverShutdown events sent", g(&self.shutdowns))
            .counter("mock_lagged_total", "trades a slow connection missed", g(&self.lagged))
            .counter("mock_rest_requests_total", "REST requests served", g(&self.rest_requests))
            .gauge("mock_source_done", "1 once a dataset source is exhausted", g(&self.source_done) as f64);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "trades": g(&self.trades), "connections": g(&self.connections), "messages": g(&self.messages),
            "dropped": g(&self.dropped), "stalls": g(&self.stalls), "garbage": g(&self.garbage),
            "duplicates": g(&self.duplicates), "reorders": g(&self.reorders), "shutdowns": g(&self.shutdowns),
            "lagged": g(&self.lagged), "rest_requests": g(&self.rest_requests), "source_done": g(&self.source_done) == 1,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error("mock exchange source: {0}")]
    Source(String),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A trade as the exchange keeps it.
#[derive(Debug)]
struct Stored {
    symbol_id: u32,
    id: i64,
    price: String,
    qty: String,
    time_us: i64,
    buyer_maker: bool,
}

struct Shared {
    cfg: MockConfig,
    names: Vec<String>,
    history: Vec<RwLock<VecDeque<Arc<Stored>>>>,
    tx: broadcast::Sender<Arc<Stored>>,
    stats: Arc<MockStats>,
    /// Bumped by `/mock/drop` and `/mock/outage`: every connection drops.
    kill: watch::Sender<u64>,
    refuse_until: Mutex<Option<Instant>>,
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

enum Gen {
    Synthetic(SyntheticFeed),
    Csv(CsvFeed),
}

impl Gen {
    fn peek(&self) -> i64 {
        match self {
            Gen::Synthetic(f) => f.peek_time_us(),
            Gen::Csv(f) => f.peek_time_us(),
        }
    }
    fn next(&mut self) -> Option<Trade> {
        match self {
            Gen::Synthetic(f) => f.next_trade(),
            Gen::Csv(f) => f.next_trade(),
        }
    }
}

fn decimal(m: i64, scale: u8) -> String {
    let mut s = String::with_capacity(24);
    Fixed::new(i128::from(m), scale).write_binance(&mut s);
    s
}

/// Produces the trades: paced on the wall clock (synthetic) or at `speed` (dataset).
fn generate(mut g: Gen, sh: Arc<Shared>, stop: Arc<AtomicBool>) {
    while sh.cfg.wait_for_client && sh.stats.connections.load(Ordering::Relaxed) == 0 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall0 = Instant::now();
    let t0 = g.peek();
    while !stop.load(Ordering::Relaxed) {
        let due = g.peek();
        if due == i64::MAX {
            sh.stats.source_done.store(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let wait_us = match &g {
            Gen::Synthetic(_) => due - now_us(),
            Gen::Csv(_) if sh.cfg.speed > 0.0 => {
                ((due - t0) as f64 / sh.cfg.speed) as i64 - wall0.elapsed().as_micros() as i64
            }
            Gen::Csv(_) => 0,
        };
        if wait_us > 0 {
            std::thread::sleep(Duration::from_micros(wait_us.min(50_000) as u64));
            continue;
        }
        let Some(t) = g.next() else { continue };
        let st = Arc::new(Stored {
            symbol_id: t.symbol_id,
            id: t.trade_id,
            price: decimal(t.price, t.price_scale),
            qty: decimal(t.qty, t.qty_scale),
            time_us: t.time_us,
            buyer_maker: t.is_buyer_maker,
        });
        if let Some(h) = sh.history.get(t.symbol_id as usize) {
            if let Ok(mut h) = h.write() {
                if h.len() >= sh.cfg.history {
                    h.pop_front();
                }
                h.push_back(Arc::clone(&st));
            }
        }
        sh.stats.trades.fetch_add(1, Ordering::Relaxed);
        let _ = sh.tx.send(st);
    }
}

/// Runs the mock exchange until `stop`. `ready` gets the bound address.
pub fn run(
    cfg: MockConfig,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(SocketAddr, &Arc<MockStats>),
) -> Result<Arc<MockStats>, MockError> {
    let (generator, names) = match &cfg.source {
        MockSource::Synthetic(s) => {
            let mut s = s.clone();
            s.start_us = now_us();
            let f = SyntheticFeed::new(&s).map_err(|e| MockError::Source(e.to_string()))?;
            let names = f.specs().iter().map(|x| x.symbol.as_str().to_owned()).collect();
            (Gen::Synthetic(f), names)
        }
        MockSource::Csv(p) => {
            let f = CsvFeed::open(p).map_err(|e| MockError::Source(e.to_string()))?;
            let names = f.specs().iter().map(|x| x.symbol.as_str().to_owned()).collect();
            (Gen::Csv(f), names)
        }
    };
    let names: Vec<String> = names;
    let (tx, _) = broadcast::channel(1 << 16);
    let sh = Arc::new(Shared {
        history: names.iter().map(|_| RwLock::new(VecDeque::new())).collect(),
        names,
        tx,
        stats: Arc::new(MockStats::default()),
        kill: watch::channel(0).0,
        refuse_until: Mutex::new(None),
        cfg,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let stats = Arc::clone(&sh.stats);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(sh.cfg.listen)
            .await
            .map_err(|source| MockError::Listen { addr: sh.cfg.listen, source })?;
        ready(listener.local_addr()?, &sh.stats);
        let gen_sh = Arc::clone(&sh);
        let gen_stop = Arc::clone(&stop);
        let gen =
            std::thread::Builder::new().name("mock-gen".into()).spawn(move || generate(generator, gen_sh, gen_stop))?;
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if stop.load(Ordering::Relaxed) { break; }
                    continue;
                }
            };
            let Ok((tcp, _)) = accepted else { continue };
            let _ = tcp.set_nodelay(true);
            let sh = Arc::clone(&sh);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let sh = Arc::clone(&sh);
                    async move { Ok::<_, Infallible>(route(req, sh)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
        let _ = gen.join();
        Ok::<_, MockError>(())
    })?;
    rt.shutdown_timeout(Duration::from_millis(500));
    Ok(stats)
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn route(req: Request<Incoming>, sh: Arc<Shared>) -> Response<Full<Bytes>> {
    let params: Vec<(String, String)> =
        req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
    let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let micros = req
        .headers()
        .get("x-mbx-time-unit")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("MICROSECOND"));
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/api/v3/ping" => json(StatusCode::OK, "{}".into()),
        "/api/v3/time" => json(StatusCode::OK, format!("{{\"serverTime\":{}}}", now_us() / 1000)),
        "/api/v3/exchangeInfo" => {
            let symbols: Vec<serde_json::Value> =
                sh.names.iter().map(|n| serde_json::json!({"symbol": n, "status": "TRADING"})).collect();
            json(StatusCode::OK, serde_json::json!({"timezone": "UTC", "symbols": symbols}).to_string())
        }
        "/api/v3/aggTrades" | "/api/v3/historicalTrades" => {
            sh.stats.rest_requests.fetch_add(1, Ordering::Relaxed);
            rest_trades(&sh, path == "/api/v3/aggTrades", param("symbol"), param("fromId"), param("limit"), micros)
        }
        "/mock/drop" => {
            sh.kill.send_modify(|k| *k += 1);
            json(StatusCode::OK, "{\"dropped\":true}".into())
        }
        "/mock/outage" => {
            let secs: f64 = param("secs").and_then(|s| s.parse().ok()).unwrap_or(30.0);
            if let Ok(mut r) = sh.refuse_until.lock() {
                *r = Some(Instant::now() + Duration::from_secs_f64(secs.clamp(0.0, 3600.0)));
            }
            sh.kill.send_modify(|k| *k += 1);
            json(StatusCode::OK, format!("{{\"outage_s\":{secs}}}"))
        }
        "/mock/stats" => json(StatusCode::OK, sh.stats.to_json().to_string()),
        p if p == "/stream" || p == "/ws" || p.starts_with("/ws/") => upgrade(req, &path, param("streams"), sh),
        _ => json(StatusCode::NOT_FOUND, "{\"code\":-1000,\"msg\":\"not found\"}".into()),
    }
}

fn rest_trades(
    sh: &Shared,
    agg: bool,
    symbol: Option<String>,
    from: Option<String>,
    limit: Option<String>,
    micros: bool,
) -> Response<Full<Bytes>> {
    let Some(sym) = symbol.map(|s| s.to_ascii_uppercase()) else {
        return json(StatusCode::BAD_REQUEST, "{\"code\":-1102,\"msg\":\"symbol is required\"}".into());
    };
    let Some(i) = sh.names.iter().position(|n| *n == sym) else {
        return json(StatusCode::BAD_REQUEST, "{\"code\":-1121,\"msg\":\"Invalid symbol.\"}".into());
    };
    let limit = limit.and_then(|l| l.parse::<usize>().ok()).unwrap_or(500).clamp(1, 1000);
    let Ok(h) = sh.history[i].read() else { return json(StatusCode::INTERNAL_SERVER_ERROR, "{}".into()) };
    let start = match from.and_then(|f| f.parse::<i64>().ok()) {
        Some(f) => h.partition_point(|t| t.id < f),
        None => h.len().saturating_sub(limit),
    };
    let mut out = String::from("[");
    for t in h.iter().skip(start).take(limit) {
        if out.len() > 1 {
            out.push(',');
        }
        let time = if micros { t.time_us } else { t.time_us.div_euclid(1000) };
        if agg {
            out.push_str(&format!(
                "{{\"a\":{},\"p\":\"{}\",\"q\":\"{}\",\"f\":{},\"l\":{},\"T\":{},\"m\":{},\"M\":true}}",
                t.id, t.price, t.qty, t.id, t.id, time, t.buyer_maker
            ));
        } else {
            out.push_str(&format!(
                "{{\"id\":{},\"price\":\"{}\",\"qty\":\"{}\",\"time\":{},\"isBuyerMaker\":{},\"isBestMatch\":true}}",
                t.id, t.price, t.qty, time, t.buyer_maker
            ));
        }
    }
    out.push(']');
    json(StatusCode::OK, out)
}

/// What a connection asked for: symbol id → aggTrade / trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Agg,
    Trade,
}

fn parse_streams(sh: &Shared, list: &str, into: &mut HashMap<u32, Kind>) {
    for s in list.split('/').filter(|s| !s.is_empty()) {
        let Some((sym, kind)) = s.split_once('@') else { continue };
        let kind = match kind {
            "aggTrade" => Kind::Agg,
            "trade" => Kind::Trade,
            _ => continue,
        };
        if let Some(i) = sh.names.iter().position(|n| n.eq_ignore_ascii_case(sym)) {
            into.insert(i as u32, kind);
        }
    }
}

fn upgrade(mut req: Request<Incoming>, path: &str, streams: Option<String>, sh: Arc<Shared>) -> Response<Full<Bytes>> {
    if sh.refuse_until.lock().ok().and_then(|r| *r).is_some_and(|t| Instant::now() < t) {
        return json(StatusCode::SERVICE_UNAVAILABLE, "{\"code\":-1,\"msg\":\"outage\"}".into());
    }
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return json(StatusCode::BAD_REQUEST, "{\"code\":-1,\"msg\":\"expected a WebSocket upgrade\"}".into());
    };
    let mut wanted = HashMap::new();
    if let Some(rest) = path.strip_prefix("/ws/") {
        parse_streams(&sh, rest, &mut wanted);
    }
    if let Some(s) = &streams {
        parse_streams(&sh, s, &mut wanted);
    }
    let combined = path == "/stream";
    let micros =
        req.uri().query().is_some_and(|q| q.contains("timeUnit=MICROSECOND") || q.contains("timeUnit=microsecond"));
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
            sh.stats.connections.fetch_add(1, Ordering::Relaxed);
            serve_ws(ws, wanted, combined, micros, sh).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    r.headers_mut().insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        r.headers_mut().insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

fn render(sh: &Shared, t: &Stored, kind: Kind, combined: bool, micros: bool) -> String {
    let sym = &sh.names[t.symbol_id as usize];
    let time = if micros { t.time_us } else { t.time_us.div_euclid(1000) };
    let e = if micros { now_us() } else { now_us() / 1000 };
    let ev = match kind {
        Kind::Agg => format!(
            "{{\"e\":\"aggTrade\",\"E\":{e},\"s\":\"{sym}\",\"a\":{},\"p\":\"{}\",\"q\":\"{}\",\"f\":{},\"l\":{},\"T\":{time},\"m\":{},\"M\":true}}",
            t.id, t.price, t.qty, t.id, t.id, t.buyer_maker
        ),
        Kind::Trade => format!(
            "{{\"e\":\"trade\",\"E\":{e},\"s\":\"{sym}\",\"t\":{},\"p\":\"{}\",\"q\":\"{}\",\"T\":{time},\"m\":{},\"M\":true}}",
            t.id, t.price, t.qty, t.buyer_maker
        ),
    };
    if combined {
        let name = format!("{}@{}", sym.to_ascii_lowercase(), if kind == Kind::Agg { "aggTrade" } else { "trade" });
        format!("{{\"stream\":\"{name}\",\"data\":{ev}}}")
    } else {
        ev
    }
}

fn every(n: u64, k: Option<u64>) -> bool {
    k.is_some_and(|k| k > 0 && n.is_multiple_of(k))
}

async fn serve_ws(
    mut ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    mut wanted: HashMap<u32, Kind>,
    combined: bool,
    micros: bool,
    sh: Arc<Shared>,
) {
    let f = sh.cfg.faults.clone();
    let stats = Arc::clone(&sh.stats);
    let mut rx = sh.tx.subscribe();
    let mut kill = sh.kill.subscribe();
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let at = |d: Option<Duration>| d.map_or(far, |d| tokio::time::Instant::now() + d);
    let drop_at = at(f.drop_every);
    let mut stall_at = at(f.stall_every);
    let shutdown_at = at(f.shutdown_every);
    let mut ping = tokio::time::interval(sh.cfg.ping_interval);
    ping.tick().await;
    let mut n: u64 = 0;
    let mut held: Option<String> = None;
    loop {
        tokio::select! {
            r = rx.recv() => {
                let t = match r {
                    Ok(t) => t,
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        stats.lagged.fetch_add(k, Ordering::Relaxed);
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(&kind) = wanted.get(&t.symbol_id) else { continue };
                n += 1;
                let msg = render(&sh, &t, kind, combined, micros);
                if every(n, f.garbage_every) {
                    stats.garbage.fetch_add(1, Ordering::Relaxed);
                    if ws.send(Message::Text(Utf8Bytes::from("{\"e\":\"aggTrade\",\"s\":garbage]"))).await.is_err() { return; }
                }
                if every(n, f.reorder_every) && held.is_none() {
                    stats.reorders.fetch_add(1, Ordering::Relaxed);
                    held = Some(msg);
                    continue;
                }
                let dup = every(n, f.duplicate_every);
                if ws.send(Message::Text(Utf8Bytes::from(msg.clone()))).await.is_err() { return; }
                stats.messages.fetch_add(1, Ordering::Relaxed);
                if dup {
                    stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    if ws.send(Message::Text(Utf8Bytes::from(msg))).await.is_err() { return; }
                }
                if let Some(h) = held.take() {
                    if ws.send(Message::Text(Utf8Bytes::from(h))).await.is_err() { return; }
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    // SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS, enough for a client.
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
                    let params: Vec<String> = v.get("params").and_then(|p| p.as_array()).map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default();
                    match v.get("method").and_then(|m| m.as_str()) {
                        Some("SUBSCRIBE") => parse_streams(&sh, &params.join("/"), &mut wanted),
                        Some("UNSUBSCRIBE") => {
                            let mut gone = HashMap::new();
                            parse_streams(&sh, &params.join("/"), &mut gone);
                            wanted.retain(|k, _| !gone.contains_key(k));
                        }
                        _ => {}
                    }
                    let reply = serde_json::json!({"result": null, "id": id}).to_string();
                    if ws.send(Message::Text(Utf8Bytes::from(reply))).await.is_err() { return; }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep_until(drop_at) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                return; // abrupt: no close frame
            }
            _ = kill.changed() => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ = tokio::time::sleep_until(stall_at) => {
                stats.stalls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(f.stall_for).await;
                stall_at = at(f.stall_every);
            }
            _ = tokio::time::sleep_until(shutdown_at) => {
                stats.shutdowns.fetch_add(1, Ordering::Relaxed);
                let msg = format!("{{\"e\":\"serverShutdown\",\"E\":{}}}", now_us() / 1000);
                let _ = ws.send(Message::Text(Utf8Bytes::from(msg))).await;
                let _ = ws.close(None).await;
                return;
            }
            _ = ping.tick() => {
                if ws.send(Message::Ping(Bytes::from_static(b"mock"))).await.is_err() { return; }
            }
        }
    }
}
