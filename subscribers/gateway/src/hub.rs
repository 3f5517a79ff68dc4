//! The hub: the one thread that reads the bus over shared memory and fans each frame out to the
//! outboxes of the clients subscribed to its stream.
//!
//! It owns the subscription table (clients change it through [`Command`]s, applied between
//! batches), renders each frame at most once per message shape, and never waits on a socket:
//! an outbox push is a short uncontended lock and, at most, one wake-up.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mdbus_metrics::{Families, Latency};
use mdbus_schema::json::TimeUnit;
use mdbus_schema::{FeedState, FrameKind, FrameRef, Symbol};
use mdbus_subscribers::{Health, Reader, WaitMode};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::encode::{frame_key, FrameMessages, Shape};
use crate::outbox::{Entry, Outbox, Pushed};
use crate::protocol::{DataKey, StreamName, Topic, HEALTH_STREAM};

/// A connected client as the hub sees it.
#[derive(Debug)]
pub struct Client {
    pub id: u64,
    /// Events wrapped as `{"stream":…,"data":…}` (changes with `SET_PROPERTY`).
    pub combined: AtomicBool,
    pub unit: TimeUnit,
    pub outbox: Outbox,
    /// Live frames below this seq are not for this client (a resume from the log covers them).
    pub min_seq: AtomicU64,
}

impl Client {
    pub fn shape(&self) -> Shape {
        Shape { combined: self.combined.load(Ordering::Relaxed), unit: self.unit }
    }
}

/// Subscription changes, from the clients' tasks to the hub.
#[derive(Debug)]
pub enum Command {
    Subscribe {
        client: Arc<Client>,
        streams: Vec<StreamName>,
    },
    Unsubscribe {
        client_id: u64,
        streams: Vec<StreamName>,
    },
    /// Subscribe and resume at `from_seq`: the hub replies with the last seq it dispatched before
    /// the client joined (`None`: none yet), which the client's log catch-up must reach.
    Join {
        client: Arc<Client>,
        streams: Vec<StreamName>,
        from_seq: u64,
        reply: oneshot::Sender<Option<u64>>,
    },
    /// The client is gone.
    Remove {
        client_id: u64,
        streams: Vec<StreamName>,
    },
}

/// Counters of the gateway, shared by the hub, the server and the client tasks.
#[derive(Debug)]
pub struct GatewayStats {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub frames_in: AtomicU64,
    pub decode_errors: AtomicU64,
    pub messages_queued: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub conflated: AtomicU64,
    pub disconnected_slow: AtomicU64,
    pub disconnected_abuse: AtomicU64,
    pub disconnected_pong_timeout: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub rate_limited: AtomicU64,
    pub resumes: AtomicU64,
    pub resumed_frames: AtomicU64,
    pub rest_requests: AtomicU64,
    /// The hub's reader: sequence checks and silence (stored once per batch).
    pub seq_gaps: AtomicU64,
    pub seq_missing: AtomicU64,
    pub seq_duplicates: AtomicU64,
    pub seq_reordered: AtomicU64,
    pub publisher_restarts: AtomicU64,
    pub heartbeats_missed: AtomicU64,
    /// Publish → read by the hub (µs), one value per frame.
    pub fanout_latency: Arc<Latency>,
    /// Exchange event → written to a client's socket (µs), one value per message sent.
    pub e2e_latency: Arc<Latency>,
}

impl Default for GatewayStats {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        GatewayStats {
            connections_open: z(),
            connections_total: z(),
            connections_refused: z(),
            frames_in: z(),
            decode_errors: z(),
            messages_queued: z(),
            messages_out: z(),
            bytes_out: z(),
            conflated: z(),
            disconnected_slow: z(),
            disconnected_abuse: z(),
            disconnected_pong_timeout: z(),
            requests: z(),
            request_errors: z(),
            rate_limited: z(),
            resumes: z(),
            resumed_frames: z(),
            rest_requests: z(),
            seq_gaps: z(),
            seq_missing: z(),
            seq_duplicates: z(),
            seq_reordered: z(),
            publisher_restarts: z(),
            heartbeats_missed: z(),
            fanout_latency: Latency::new("fanout_latency_us", "broker publish to read by the gateway, microseconds"),
            e2e_latency: Latency::new(
                "e2e_latency_us",
                "exchange event time to written to a WebSocket client, microseconds",
            ),
        }
    }
}

impl GatewayStats {
    /// The counters as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "connections_open": g(&self.connections_open),
            "connections_total": g(&self.connections_total),
            "connections_refused": g(&self.connections_refused),
            "frames_in": g(&self.frames_in),
            "decode_errors": g(&self.decode_errors),
            "messages_queued": g(&self.messages_queued),
            "messages_out": g(&self.messages_out),
            "bytes_out": g(&self.bytes_out),
            "conflated": g(&self.conflated),
            "disconnected_slow": g(&self.disconnected_slow),
            "disconnected_abuse": g(&self.disconnected_abuse),
            "disconnected_pong_timeout": g(&self.disconnected_pong_timeout),
            "requests": g(&self.requests),
            "request_errors": g(&self.request_errors),
            "rate_limited": g(&self.rate_limited),
            "resumes": g(&self.resumes),
            "resumed_frames": g(&self.resumed_frames),
            "rest_requests": g(&self.rest_requests),
        })
    }
}

fn health_code(h: Health) -> u8 {
    match h {
        Health::Unknown => 0,
        Health::Healthy => 1,
        Health::Degraded => 2,
        Health::Failed => 3,
    }
}

fn health_from_code(c: u8) -> Health {
    match c {
        1 => Health::Healthy,
        2 => Health::Degraded,
        3 => Health::Failed,
        _ => Health::Unknown,
    }
}

/// What the hub knows, for the REST endpoints and the health stream.
#[derive(Debug, Default)]
pub struct HubState {
    pub symbols: Mutex<BTreeSet<Symbol>>,
    health: AtomicU8,
    feed: AtomicU8,
    /// Last seq seen on the bus + 1 (0: none yet).
    next_seq: AtomicU64,
    pub stats: GatewayStats,
}

impl HubState {
    /// Adds the gateway's families to a scrape.
    pub fn families(&self, f: &mut Families) {
        let st = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let health = self.health();
        f.gauge(
            "market_publisher_health",
            "publisher health seen from heartbeats: 0 unknown, 1 healthy, 2 degraded, 3 failed",
            f64::from(health_code(health)),
        );
        for h in [Health::Unknown, Health::Healthy, Health::Degraded, Health::Failed] {
            f.gauge_with(
                "market_publisher_health_state",
                "1 for the current publisher health",
                &[("state", h.as_str())],
                f64::from(u8::from(h == health)),
            );
        }
        f.gauge(
            "market_feed_state",
            "feed state from heartbeats: 0 unknown, 1 live, 2 down, 3 ended, 4 stopped",
            f64::from(self.feed() as u8),
        )
        .gauge_with(
            "market_last_seq",
            "last sequence number seen, per stream",
            &[("stream", "realtime")],
            self.last_seq().unwrap_or(0) as f64,
        )
        .counter("market_frames_received_total", "frames read from the bus", g(&st.frames_in))
        .counter("market_decode_errors_total", "frames that failed to decode", g(&st.decode_errors))
        .counter("market_seq_gaps_total", "sequence gaps detected", g(&st.seq_gaps))
        .gauge("market_seq_missing", "frames counted missing and not recovered", g(&st.seq_missing) as f64)
        .counter("market_seq_duplicates_total", "duplicate frames detected", g(&st.seq_duplicates))
        .counter("market_seq_reordered_total", "frames that arrived out of order", g(&st.seq_reordered))
        .counter(
            "market_publisher_restarts_total",
            "publisher restarts seen (new publisher id)",
            g(&st.publisher_restarts),
        )
        .gauge(
            "market_heartbeats_missed",
            "heartbeat intervals of publisher silence now",
            g(&st.heartbeats_missed) as f64,
        )
        .gauge("gateway_connections", "WebSocket connections open", g(&st.connections_open) as f64)
        .counter("gateway_connections_total", "WebSocket connections accepted", g(&st.connections_total))
        .counter("gateway_connections_refused_total", "connections refused (limit or auth)", g(&st.connections_refused))
        .counter("gateway_messages_queued_total", "messages queued to clients", g(&st.messages_queued))
        .counter("gateway_messages_out_total", "messages written to clients", g(&st.messages_out))
        .counter("gateway_bytes_out_total", "bytes written to clients", g(&st.bytes_out))
        .counter("gateway_conflated_total", "K-line updates superseded in a slow client's queue", g(&st.conflated))
        .counter_with(
            "gateway_disconnected_total",
            "clients disconnected by the gateway, by reason",
            &[("reason", "slow")],
            g(&st.disconnected_slow),
        )
        .counter_with(
            "gateway_disconnected_total",
            "clients disconnected by the gateway, by reason",
            &[("reason", "abuse")],
            g(&st.disconnected_abuse),
        )
        .counter_with(
            "gateway_disconnected_total",
            "clients disconnected by the gateway, by reason",
            &[("reason", "pong_timeout")],
            g(&st.disconnected_pong_timeout),
        )
        .counter("gateway_requests_total", "client requests", g(&st.requests))
        .counter("gateway_request_errors_total", "client requests answered with an error", g(&st.request_errors))
        .counter("gateway_rate_limited_total", "client messages over the rate limit", g(&st.rate_limited))
        .counter("gateway_resumes_total", "fromSeq resumes", g(&st.resumes))
        .counter("gateway_resumed_frames_total", "frames sent from the log in resumes", g(&st.resumed_frames))
        .counter("gateway_rest_requests_total", "REST requests", g(&st.rest_requests))
        .latency(&st.fanout_latency)
        .latency(&st.e2e_latency);
    }

    pub fn health(&self) -> Health {
        health_from_code(self.health.load(Ordering::Relaxed))
    }
    pub fn feed(&self) -> FeedState {
        FeedState::from_u8(self.feed.load(Ordering::Relaxed)).unwrap_or(FeedState::Unknown)
    }
    pub fn last_seq(&self) -> Option<u64> {
        self.next_seq.load(Ordering::Relaxed).checked_sub(1)
    }

    /// The health event (`{"e":"health",…}`) in `shape`.
    pub fn health_message(&self, shape: Shape) -> Utf8Bytes {
        let e = shape.unit.from_ns(crate::now_ns());
        let last = self.last_seq().map_or("null".to_string(), |s| s.to_string());
        let ev = format!(
            "{{\"e\":\"health\",\"E\":{e},\"status\":\"{}\",\"feed\":\"{}\",\"lastSeq\":{last}}}",
            self.health().as_str(),
            self.feed().as_str()
        );
        if shape.combined {
            Utf8Bytes::from(format!("{{\"stream\":\"{HEALTH_STREAM}\",\"data\":{ev}}}"))
        } else {
            Utf8Bytes::from(ev)
        }
    }
}

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// How long the reader sleeps on the bus's wake-up event before re-checking commands.
    pub wait: Duration,
    /// Health events go out on every change and at least this often.
    pub health_every: Duration,
    /// Pin the hub thread to this core.
    pub core: Option<usize>,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions { wait: Duration::from_millis(5), health_every: Duration::from_secs(1), core: None }
    }
}

struct Fanout {
    subs: HashMap<DataKey, Vec<Arc<Client>>>,
    health_subs: Vec<Arc<Client>>,
    msgs: FrameMessages,
    /// Clients whose outbox went from empty to not empty in this batch: woken after it.
    wake: Vec<Arc<Client>>,
    known: std::collections::HashSet<Symbol>,
    state: Arc<HubState>,
    /// The publish time of the sample being read and the clock when its first frame was.
    last_publish_ns: i64,
    read_ns: i64,
}

impl Fanout {
    fn add(&mut self, client: &Arc<Client>, streams: &[StreamName]) {
        for s in streams {
            let list = match s {
                StreamName::Data(k) => self.subs.entry(*k).or_default(),
                StreamName::Health => {
                    client.outbox.push_control(self.state.health_message(client.shape()));
                    &mut self.health_subs
                }
            };
            if !list.iter().any(|c| c.id == client.id) {
                list.push(Arc::clone(client));
            }
        }
    }

    fn remove(&mut self, client_id: u64, streams: &[StreamName]) {
        for s in streams {
            match s {
                StreamName::Data(k) => {
                    if let Some(list) = self.subs.get_mut(k) {
                        list.retain(|c| c.id != client_id);
                        if list.is_empty() {
                            self.subs.remove(k);
                        }
                    }
                }
                StreamName::Health => self.health_subs.retain(|c| c.id != client_id),
            }
        }
    }

    fn dispatch(&mut self, frame: &FrameRef<'_>) {
        let stats = &self.state.stats;
        stats.frames_in.fetch_add(1, Ordering::Relaxed);
        if frame.kind() == FrameKind::Heartbeat {
            return;
        }
        // One clock read per sample: its frames share the publish time.
        if frame.header.ts_publish_ns != self.last_publish_ns {
            self.last_publish_ns = frame.header.ts_publish_ns;
            self.read_ns = crate::now_ns();
        }
        let now = self.read_ns;
        stats.fanout_latency.record(((now - frame.header.ts_publish_ns) / 1000).max(0) as u64, now);
        let Some(key) = frame_key(frame) else {
            stats.decode_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.known.insert(key.symbol) {
            if let Ok(mut s) = self.state.symbols.lock() {
                s.insert(key.symbol);
            }
        }
        let Some(clients) = self.subs.get(&key) else { return };
        let update = matches!(key.topic, Topic::Kline(_)) && frame.kline().is_ok_and(|k| !k.closed);
        self.msgs.reset();
        let seq = frame.seq();
        let mut dead = false;
        for c in clients {
            if seq < c.min_seq.load(Ordering::Relaxed) {
                continue;
            }
            let Some(msg) = self.msgs.get(frame, &key, c.shape()) else {
                stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                break;
            };
            match c.outbox.push(&key, update, Entry::new(msg, seq).event_time(frame.header.ts_event_ns)) {
                Pushed::Queued { first } => {
                    stats.messages_queued.fetch_add(1, Ordering::Relaxed);
                    if first {
                        self.wake.push(Arc::clone(c));
                    }
                }
                Pushed::Conflated => {
                    stats.conflated.fetch_add(1, Ordering::Relaxed);
                }
                Pushed::Disconnected => {
                    stats.disconnected_slow.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client = c.id, "slow client disconnected (queue full)");
                    dead = true;
                }
                Pushed::Closed => dead = true,
            }
        }
        if dead {
            if let Some(list) = self.subs.get_mut(&key) {
                list.retain(|c| !c.outbox.is_closed());
            }
        }
    }

    fn broadcast_health(&mut self) {
        self.health_subs.retain(|c| !c.outbox.is_closed());
        for c in &self.health_subs {
            c.outbox.push_control(self.state.health_message(c.shape()));
        }
    }
}

struct PendingJoin {
    client: Arc<Client>,
    streams: Vec<StreamName>,
    from_seq: u64,
    reply: oneshot::Sender<Option<u64>>,
    since: Instant,
}

/// Runs the hub until `stop`. `reader` is the gateway's subscription to the real-time stream.
pub fn run(
    mut reader: Reader,
    commands: mpsc::Receiver<Command>,
    state: Arc<HubState>,
    options: HubOptions,
    stop: Arc<AtomicBool>,
) {
    if let Some(core) = options.core {
        let pinned = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.id == core)
            .is_some_and(core_affinity::set_for_current);
        if !pinned {
            tracing::warn!(core, "cannot pin the gateway hub; running unpinned");
        }
    }
    let mut fan = Fanout {
        subs: HashMap::new(),
        health_subs: Vec::new(),
        msgs: FrameMessages::default(),
        wake: Vec::new(),
        known: Default::default(),
        state: Arc::clone(&state),
        last_publish_ns: 0,
        read_ns: 0,
    };
    let mut joins: Vec<PendingJoin> = Vec::new();
    let mut last_health = (Health::Unknown, FeedState::Unknown);
    let mut last_broadcast = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                Command::Subscribe { client, streams } => fan.add(&client, &streams),
                Command::Unsubscribe { client_id, streams } | Command::Remove { client_id, streams } => {
                    fan.remove(client_id, &streams)
                }
                Command::Join { client, streams, from_seq, reply } => {
                    joins.push(PendingJoin { client, streams, from_seq, reply, since: Instant::now() })
                }
            }
        }
        // A join takes effect at a seq boundary: everything after the last frame dispatched goes
        // to its outbox, the log supplies the rest. Until the hub has seen the stream's position
        // (its first frame or heartbeat) it waits a little, then joins at "the log's end".
        let position = reader.next_seq().and_then(|n| n.checked_sub(1));
        let known = reader.next_seq().is_some();
        let mut i = 0;
        while i < joins.len() {
            if known || joins[i].since.elapsed() > Duration::from_secs(1) {
                let PendingJoin { client, streams, from_seq, reply, .. } = joins.swap_remove(i);
                client.min_seq.store(from_seq.max(position.map_or(0, |p| p + 1)), Ordering::Relaxed);
                fan.add(&client, &streams);
                let _ = reply.send(position);
            } else {
                i += 1;
            }
        }
        let read = reader.next_batch(WaitMode::Block(options.wait), |f| fan.dispatch(f));
        // One wake-up per client per batch: its socket task then writes the batch at once.
        for c in fan.wake.drain(..) {
            c.outbox.wake();
        }
        if let Err(e) = read {
            tracing::error!(error = %e, "reading the bus failed");
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(n) = reader.next_seq() {
            state.next_seq.store(n, Ordering::Relaxed);
        }
        let rs = reader.stats();
        let st = &state.stats;
        // Also when no frame arrived: the hub's latency values reach the scrape.
        st.fanout_latency.flush_if_due(crate::now_ns());
        st.seq_gaps.store(rs.seq.gaps, Ordering::Relaxed);
        st.seq_missing.store(rs.seq.missing, Ordering::Relaxed);
        st.seq_duplicates.store(rs.seq.duplicates, Ordering::Relaxed);
        st.seq_reordered.store(rs.seq.reordered, Ordering::Relaxed);
        st.publisher_restarts.store(rs.publisher_restarts, Ordering::Relaxed);
        st.heartbeats_missed.store(reader.heartbeats_missed(), Ordering::Relaxed);
        let now = (reader.health(), reader.feed_state());
        if now != last_health {
            tracing::info!(health = now.0.as_str(), feed = now.1.as_str(), "publisher health changed");
        }
        state.health.store(health_code(now.0), Ordering::Relaxed);
        state.feed.store(now.1 as u8, Ordering::Relaxed);
        if now != last_health || last_broadcast.elapsed() >= options.health_every {
            last_health = now;
            last_broadcast = Instant::now();
            fan.broadcast_health();
        }
    }
    for j in joins {
        let _ = j.reply.send(None);
    }
}
