//! One WebSocket client: its requests, its subscriptions, its outbox drained onto the socket,
//! pings, limits, and the write-ahead-log catch-up of a `fromSeq` resume.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use mdbus_metrics::Latency;
use mdbus_schema::json::TimeUnit;
use mdbus_schema::FrameRef;
use mdbus_wal::WalReader;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::encode::{frame_key, render, Shape};
use crate::hub::{Client, Command};
use crate::outbox::{Entry, Outbox};
use crate::protocol::{code, parse_request, result_reply, DataKey, ErrorReply, Method, RequestId, StreamName};
use crate::Ctx;

pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// What the client asked for in its URL.
#[derive(Debug, Clone)]
pub struct ConnRequest {
    pub streams: Vec<StreamName>,
    pub combined: bool,
    pub unit: TimeUnit,
    pub from_seq: Option<u64>,
    pub peer: std::net::SocketAddr,
}

/// Messages per second allowed in, with a burst of the same size.
#[derive(Debug)]
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
    violations: u32,
}

impl RateLimit {
    fn new(rate: f64) -> RateLimit {
        RateLimit { rate, tokens: rate.max(1.0), last: Instant::now(), violations: 0 }
    }
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.violations = 0;
            true
        } else {
            self.violations += 1;
            false
        }
    }
}

enum Flow {
    Continue,
    Close(CloseCode, String),
    /// The client sent a close frame: answer it, then end.
    ClientClosed,
    Gone,
}

struct Session {
    ctx: Arc<Ctx>,
    client: Arc<Client>,
    streams: Vec<StreamName>,
    rate: RateLimit,
    last_pong: Instant,
    /// After a log catch-up: live entries up to this seq were already sent from the log.
    caught_up_to: u64,
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// The connection's slot in `connections_open`, released however the session ends (a panic in
/// a task included).
struct Slot(Arc<Ctx>);
impl Drop for Slot {
    fn drop(&mut self) {
        self.0.state.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes the client's outbox when the session ends, so that the hub drops it even after a
/// panic (the hub removes clients whose outbox is closed).
struct Registered(Arc<Client>);
impl Drop for Registered {
    fn drop(&mut self) {
        self.0.outbox.close("connection ended");
    }
}

/// Serves one upgraded connection until it ends. `slot` was counted in `connections_open` by the
/// caller and is released here.
pub async fn run(mut ws: Ws, ctx: Arc<Ctx>, req: ConnRequest, mut shutdown: watch::Receiver<bool>) {
    let _slot = Slot(Arc::clone(&ctx));
    let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    let client = Arc::new(Client {
        id,
        combined: AtomicBool::new(req.combined),
        unit: req.unit,
        outbox: Outbox::new(ctx.cfg.queue, ctx.cfg.max_streams + 16, ctx.cfg.slow_policy),
        min_seq: AtomicU64::new(0),
    });
    let _registered = Registered(Arc::clone(&client));
    tracing::info!(client = id, peer = %req.peer, streams = req.streams.len(), combined = req.combined, "client connected");
    let mut s = Session {
        ctx: Arc::clone(&ctx),
        client: Arc::clone(&client),
        streams: Vec::new(),
        rate: RateLimit::new(ctx.cfg.max_msg_rate),
        last_pong: Instant::now(),
        caught_up_to: 0,
    };
    for st in &req.streams {
        if !s.streams.contains(st) {
            s.streams.push(*st);
        }
    }
    let end = match req.from_seq {
        Some(from) => match s.resume(&mut ws, from).await {
            Ok(()) => s.serve(&mut ws, &mut shutdown).await,
            Err(flow) => flow,
        },
        None => {
            ctx.send(Command::Subscribe { client: Arc::clone(&client), streams: s.streams.clone() });
            s.serve(&mut ws, &mut shutdown).await
        }
    };
    client.outbox.close("connection ended");
    ctx.send(Command::Remove { client_id: id, streams: std::mem::take(&mut s.streams) });
    match end {
        Flow::Close(code, reason) => {
            tracing::info!(client = id, reason = %reason, "closing client");
            let frame = CloseFrame { code, reason: Utf8Bytes::from(reason) };
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
            drain_until_closed(&mut ws).await;
        }
        // The close reply is queued by the WebSocket layer; closing flushes it.
        Flow::ClientClosed => {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
        Flow::Continue | Flow::Gone => {}
    }
    tracing::info!(
        client = id,
        queued = client.outbox.stats.queued.load(Ordering::Relaxed),
        conflated = client.outbox.stats.conflated.load(Ordering::Relaxed),
        "client disconnected"
    );
}

/// Completes a close we started: reads (and discards) what the client still sends until its close
/// reply or end of stream, for at most 2 s. Dropping a socket with unread input makes the kernel
/// send a reset, which can destroy our close frame (and its reason) before the client reads it.
async fn drain_until_closed(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
}

/// Runs a socket write, unless the outbox closes (the client fell too far behind) or the write
/// cannot finish within `limit` (a client that stopped reading with its window shut): both end
/// the connection, so a stuck socket never holds anything.
async fn guarded<T>(
    outbox: &Outbox,
    stats: &crate::hub::GatewayStats,
    limit: Duration,
    write: impl std::future::Future<Output = Result<T, ()>>,
) -> Result<T, Flow> {
    tokio::select! {
        r = write => r.map_err(|()| Flow::Gone),
        _ = outbox.gone() => Err(Flow::Gone),
        _ = tokio::time::sleep(limit) => {
            stats.disconnected_slow.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("client stuck: a write did not finish in time; disconnecting");
            Err(Flow::Gone)
        }
    }
}

/// Writes a batch and flushes it; then records exchange event → sent for the live entries
/// (`sent`: a buffer kept by the caller, so that nothing is allocated per batch once warm).
async fn write_batch(
    ws: &mut Ws,
    batch: &mut VecDeque<Entry>,
    skip_to: u64,
    sent: &mut Vec<i64>,
    e2e: &Latency,
) -> Result<(u64, u64), ()> {
    let (mut n, mut bytes) = (0u64, 0u64);
    sent.clear();
    for e in batch.drain(..) {
        if e.dead || (e.seq != 0 && e.seq <= skip_to) {
            continue;
        }
        n += 1;
        bytes += e.msg.len() as u64;
        if e.ts_event_ns > 0 {
            sent.push(e.ts_event_ns);
        }
        ws.feed(Message::Text(e.msg)).await.map_err(|_| ())?;
    }
    ws.flush().await.map_err(|_| ())?;
    let now = crate::now_ns();
    for t in sent.drain(..) {
        e2e.record(((now - t) / 1000).max(0) as u64, now);
    }
    Ok((n, bytes))
}

impl Session {
    fn reply(&self, text: String) {
        self.client.outbox.push_control(Utf8Bytes::from(text));
    }

    fn error(&self, e: &ErrorReply) {
        self.ctx.state.stats.request_errors.fetch_add(1, Ordering::Relaxed);
        self.reply(e.to_json());
    }

    /// Joins the live stream at a seq boundary, sends the log from `from` up to it, then lets
    /// the live entries queued meanwhile flow.
    async fn resume(&mut self, ws: &mut Ws, from: u64) -> Result<(), Flow> {
        let stats = &self.ctx.state.stats;
        stats.resumes.fetch_add(1, Ordering::Relaxed);
        self.client.outbox.hold();
        let (tx, rx) = oneshot::channel();
        self.ctx.send(Command::Join {
            client: Arc::clone(&self.client),
            streams: self.streams.clone(),
            from_seq: from,
            reply: tx,
        });
        let position = rx.await.map_err(|_| Flow::Gone)?;
        let Some(dir) = self.ctx.cfg.wal_dir.clone() else {
            self.reply(
                ErrorReply::new(code::INVALID_REQUEST, "fromSeq: this gateway has no write-ahead log", RequestId::Null)
                    .to_json(),
            );
            self.client.min_seq.store(0, Ordering::Relaxed);
            self.client.outbox.release();
            return Ok(());
        };
        let keys: HashSet<DataKey> = self
            .streams
            .iter()
            .filter_map(|s| match s {
                StreamName::Data(k) => Some(*k),
                StreamName::Health => None,
            })
            .collect();
        let needs_log = !keys.is_empty() && position.is_none_or(|p| from <= p);
        if needs_log {
            // A few log replays at a time: each reads the log on its own thread.
            let ctx = Arc::clone(&self.ctx);
            let _permit = ctx.catch_ups.acquire().await.map_err(|_| Flow::Gone)?;
            let (ctx_tx, mut chunks) = mpsc::channel::<Chunk>(4);
            let client = Arc::clone(&self.client);
            let shape = client.shape();
            let spawned = std::thread::Builder::new()
                .name("gateway-resume".into())
                .spawn(move || catch_up(&dir, from, position, &keys, shape, &client, &ctx_tx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a log catch-up");
                return Err(Flow::Close(CloseCode::Error, "resume failed".into()));
            }
            while let Some(chunk) = chunks.recv().await {
                match chunk {
                    Chunk::Entries(mut batch) => {
                        let n = batch.len() as u64;
                        if let Some(last) = batch.back() {
                            self.caught_up_to = self.caught_up_to.max(last.seq);
                        }
                        let limit = self.ctx.cfg.pong_timeout;
                        let (sent, bytes) = guarded(
                            &self.client.outbox,
                            stats,
                            limit,
                            write_batch(ws, &mut batch, 0, &mut Vec::new(), &stats.e2e_latency),
                        )
                        .await?;
                        stats.resumed_frames.fetch_add(n, Ordering::Relaxed);
                        stats.messages_out.fetch_add(sent, Ordering::Relaxed);
                        stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Chunk::Scanned(seq) => self.caught_up_to = self.caught_up_to.max(seq),
                    Chunk::Notice(msg) => {
                        tracing::warn!(client = self.client.id, msg = %msg, "resume");
                        let e = ErrorReply::new(code::INVALID_REQUEST, msg, RequestId::Null);
                        let send = async { ws.send(Message::Text(Utf8Bytes::from(e.to_json()))).await.map_err(|_| ()) };
                        guarded(&self.client.outbox, stats, self.ctx.cfg.pong_timeout, send).await?;
                    }
                }
            }
        }
        self.client.outbox.release();
        Ok(())
    }

    async fn serve(&mut self, ws: &mut Ws, shutdown: &mut watch::Receiver<bool>) -> Flow {
        let ctx = Arc::clone(&self.ctx);
        let stats = &ctx.state.stats;
        let mut batch = VecDeque::new();
        let mut sent = Vec::new();
        let period = self.ctx.cfg.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limit = self.ctx.cfg.pong_timeout;
        loop {
            // Reads first: requests, pongs and client pings are served even while data flows.
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Flow::Close(CloseCode::Away, "server shutting down".into()),
                msg = ws.next() => match msg {
                    None => return Flow::Gone,
                    Some(Err(e)) => {
                        use tokio_tungstenite::tungstenite::Error as E;
                        return match e {
                            E::Capacity(c) => {
                                stats.disconnected_abuse.fetch_add(1, Ordering::Relaxed);
                                Flow::Close(CloseCode::Size, format!("message too big: {c}"))
                            }
                            E::Protocol(p) => Flow::Close(CloseCode::Protocol, format!("protocol error: {p}")),
                            E::Utf8(_) => Flow::Close(CloseCode::Invalid, "invalid UTF-8 in a text message".into()),
                            _ => Flow::Gone,
                        };
                    }
                    Some(Ok(m)) => match self.on_message(m) {
                        Flow::Continue => {}
                        Flow::Close(code, reason) => {
                            // The replies queued before the close (the rate errors) go out first.
                            if self.client.outbox.take(&mut batch).is_ok() && !batch.is_empty() {
                                let skip = self.caught_up_to;
                                let quick = limit.min(Duration::from_secs(1));
                                if let Ok((n, bytes)) = guarded(&self.client.outbox, stats, quick, write_batch(ws, &mut batch, skip, &mut sent, &stats.e2e_latency)).await {
                                    stats.messages_out.fetch_add(n, Ordering::Relaxed);
                                    stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
                                }
                            }
                            return Flow::Close(code, reason);
                        }
                        other => return other,
                    },
                },
                _ = ping.tick() => {
                    stats.e2e_latency.flush_if_due(crate::now_ns());
                    if self.last_pong.elapsed() > self.ctx.cfg.pong_timeout {
                        stats.disconnected_pong_timeout.fetch_add(1, Ordering::Relaxed);
                        return Flow::Close(CloseCode::Policy, "no pong received in time".into());
                    }
                    let ping = async { ws.send(Message::Ping(bytes::Bytes::from_static(b"mdbus"))).await.map_err(|_| ()) };
                    if let Err(f) = guarded(&self.client.outbox, stats, limit, ping).await {
                        return f;
                    }
                }
                _ = self.client.outbox.ready() => {
                    if let Err(reason) = self.client.outbox.take(&mut batch) {
                        return Flow::Close(CloseCode::Policy, reason.into());
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    let skip = self.caught_up_to;
                    match guarded(&self.client.outbox, stats, limit, write_batch(ws, &mut batch, skip, &mut sent, &stats.e2e_latency)).await {
                        Ok((n, bytes)) => {
                            stats.messages_out.fetch_add(n, Ordering::Relaxed);
                            stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
                        }
                        Err(f) => return f,
                    }
                    // Entries queued while writing came with a wake-up: the next turn takes them.
                }
            }
        }
    }

    fn on_message(&mut self, m: Message) -> Flow {
        let stats = &self.ctx.state.stats;
        let text = match m {
            Message::Text(t) => Some(t),
            Message::Binary(_) => None,
            Message::Pong(_) => {
                self.last_pong = Instant::now();
                return Flow::Continue;
            }
            // Pings are answered by the WebSocket layer; a close is answered there too.
            Message::Ping(_) | Message::Frame(_) => return Flow::Continue,
            Message::Close(_) => return Flow::ClientClosed,
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if !self.rate.allow() {
            stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            if self.rate.violations >= self.ctx.cfg.abuse_after {
                stats.disconnected_abuse.fetch_add(1, Ordering::Relaxed);
                return Flow::Close(
                    CloseCode::Policy,
                    format!("too many messages: the limit is {} per second", self.ctx.cfg.max_msg_rate),
                );
            }
            let id = text.as_deref().and_then(|t| parse_request(t).ok()).map(|r| r.id).unwrap_or_default();
            self.error(&ErrorReply::new(
                code::TOO_MANY_REQUESTS,
                format!("Too many requests: the limit is {} messages per second", self.ctx.cfg.max_msg_rate),
                id,
            ));
            return Flow::Continue;
        }
        let Some(text) = text else {
            self.error(&ErrorReply::new(
                code::INVALID_JSON,
                "Invalid JSON: binary messages are not supported",
                RequestId::Null,
            ));
            return Flow::Continue;
        };
        let req = match parse_request(&text) {
            Ok(r) => r,
            Err(e) => {
                self.error(&e);
                return Flow::Continue;
            }
        };
        match req.method {
            Method::Subscribe(list) => {
                let new: Vec<StreamName> = {
                    let mut seen = HashSet::new();
                    list.into_iter().filter(|s| !self.streams.contains(s) && seen.insert(*s)).collect()
                };
                if self.streams.len() + new.len() > self.ctx.cfg.max_streams {
                    self.error(&ErrorReply::new(
                        code::INVALID_REQUEST,
                        format!(
                            "Invalid request: too many streams (at most {} per connection)",
                            self.ctx.cfg.max_streams
                        ),
                        req.id,
                    ));
                    return Flow::Continue;
                }
                self.streams.extend(new.iter().copied());
                self.ctx.send(Command::Subscribe { client: Arc::clone(&self.client), streams: new });
                self.reply(result_reply("null", &req.id));
            }
            Method::Unsubscribe(list) => {
                self.streams.retain(|s| !list.contains(s));
                self.ctx.send(Command::Unsubscribe { client_id: self.client.id, streams: list });
                self.reply(result_reply("null", &req.id));
            }
            Method::ListSubscriptions => {
                let names: Vec<String> = self.streams.iter().map(ToString::to_string).collect();
                let json = serde_json::to_string(&names).unwrap_or_else(|_| "[]".into());
                self.reply(result_reply(&json, &req.id));
            }
            Method::SetProperty(_, v) => {
                self.client.combined.store(v, Ordering::Relaxed);
                self.reply(result_reply("null", &req.id));
            }
            Method::GetProperty(_) => {
                let v = self.client.combined.load(Ordering::Relaxed);
                self.reply(result_reply(if v { "true" } else { "false" }, &req.id));
            }
        }
        Flow::Continue
    }
}

/// What the log catch-up thread hands the client task.
enum Chunk {
    Entries(VecDeque<Entry>),
    /// Every record up to this seq has been read (none of the client's streams among the last).
    Scanned(u64),
    /// Something the client should know (frames no longer retained, a log that lags).
    Notice(String),
}

const CATCH_UP_CHUNK: usize = 512;
const LOG_WAIT: Duration = Duration::from_secs(2);

/// Reads the log from `from` up to `until` (inclusive; `None`: up to the first live entry queued
/// for the client, or the log's end), renders the client's streams, and sends them in chunks.
fn catch_up(
    dir: &Path,
    from: u64,
    until: Option<u64>,
    keys: &HashSet<DataKey>,
    shape: Shape,
    client: &Client,
    tx: &mpsc::Sender<Chunk>,
) {
    let send = |c: Chunk| tx.blocking_send(c).is_ok();
    let mut wal = match WalReader::open(dir) {
        Ok(w) => w,
        Err(e) => {
            send(Chunk::Notice(format!("fromSeq: cannot read the write-ahead log: {e}")));
            return;
        }
    };
    let mut from = from;
    if let Some(f) = wal.first_seq().filter(|&f| f > from) {
        // fromSeq=0 (or 1 on a fresh log) just means "from the beginning".
        if from > 1 {
            send(Chunk::Notice(format!("fromSeq {from}: frames before {f} are no longer retained; resuming at {f}")));
        }
        from = f;
    }
    if let Err(e) = wal.seek(from) {
        send(Chunk::Notice(format!("fromSeq: cannot seek the write-ahead log: {e}")));
        return;
    }
    let mut batch = VecDeque::with_capacity(CATCH_UP_CHUNK);
    let mut last = from.saturating_sub(1);
    let mut waited_since: Option<Instant> = None;
    loop {
        match wal.next_record() {
            Ok(Some(rec)) => {
                waited_since = None;
                if until.is_some_and(|u| rec.seq > u) {
                    break;
                }
                if until.is_none() && client.outbox.first_queued_seq().is_some_and(|s| rec.seq >= s) {
                    break;
                }
                last = rec.seq;
                let Ok(frame) = FrameRef::parse(rec.payload) else { continue };
                let Some(key) = frame_key(&frame) else { continue };
                if !keys.contains(&key) {
                    continue;
                }
                if let Some(msg) = render(&frame, &key, shape) {
                    batch.push_back(Entry::new(msg, rec.seq));
                }
                if batch.len() >= CATCH_UP_CHUNK && !send(Chunk::Entries(std::mem::take(&mut batch))) {
                    return;
                }
            }
            Ok(None) => match until {
                Some(u) if last < u => {
                    // The log lags the live stream a little (frames are published, then logged).
                    let since = *waited_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > LOG_WAIT {
                        send(Chunk::Notice(format!("fromSeq: the write-ahead log ends at {last}, before {u}")));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => break,
            },
            Err(e) => {
                send(Chunk::Notice(format!("fromSeq: reading the write-ahead log failed: {e}")));
                break;
            }
        }
    }
    if !batch.is_empty() && !send(Chunk::Entries(batch)) {
        return;
    }
    send(Chunk::Scanned(until.map_or(last, |u| u.max(last))));
}
