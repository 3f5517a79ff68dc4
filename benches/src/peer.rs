//! The two processes of a benchmark: a publisher and a subscriber, over one transport.
//!
//! Upstream: the orchestrator ([`crate::run_scenario`]) starts each as `mdbus bench-peer`.
//! Downstream: the subscriber prints one JSON [`PeerReport`] line on stdout.
//!
//! Transports, all carrying the same payload size (one K-line frame, 224 bytes):
//! - `mdbus`: the real path — `FrameWriter` + `StreamPublisher` on one side, the client library's
//!   `Reader` (seq tracking, filtering, validated zero-copy `kline()` access) on the other.
//! - `iox2`: raw iceoryx2 `[u8]` samples, one per message, no framing or validation (baseline).
//! - `uds`: a Unix-domain stream socket, one `write`/`read_exact` per message (baseline).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iceoryx2::prelude::*;
use mdbus_bus::{BusNode, StreamSettings};
use mdbus_schema::frame::{encoded_frame_len, header};
use mdbus_schema::{FeedState, FrameKind, FrameWriter, Heartbeat, Interval, Kline, Symbol};
use mdbus_subscribers::{Reader, ReaderOptions, WaitMode};
use serde::{Deserialize, Serialize};

/// Which transport a peer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Mdbus,
    Iox2,
    /// Raw iceoryx2 with samples as big as mdbus's batches (no framing, no validation).
    Iox2Batch,
    Uds,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mdbus => "mdbus",
            Transport::Iox2 => "iox2",
            Transport::Iox2Batch => "iox2batch",
            Transport::Uds => "uds",
        }
    }
    pub fn parse(s: &str) -> Option<Transport> {
        Some(match s {
            "mdbus" => Transport::Mdbus,
            "iox2" => Transport::Iox2,
            "iox2batch" => Transport::Iox2Batch,
            "uds" => Transport::Uds,
            _ => return None,
        })
    }
}

/// What a peer measures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    /// One message at a time at `rate` msg/s; `warmup` messages are not recorded.
    Latency { rate: f64, warmup: u64 },
    /// As fast as possible, lossless; every seq checked.
    Throughput,
}

/// Everything a peer process needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerSpec {
    pub transport: Transport,
    pub mode: Mode,
    pub count: u64,
    pub bus: String,
    pub socket: PathBuf,
    pub core: Option<usize>,
    /// mdbus: the publisher starts once this many subscribers are connected (fanout).
    #[serde(default = "one")]
    pub subscribers: usize,
    /// mdbus subscriber: sleep on the stream's wake-up event when idle instead of spinning.
    #[serde(default)]
    pub block: bool,
    /// mdbus, throughput mode: the broker's own stream settings (safe overflow: the publisher
    /// never waits; a subscriber that falls behind loses the oldest samples and counts them).
    #[serde(default)]
    pub lossy: bool,
    /// Publisher: once its first message reaches every subscriber, wait for a `go` line on stdin
    /// before sending data. The orchestrator sends it when every subscriber has said `connected`
    /// (it has received that first message). iceoryx2 drops a sample, silently and even on a
    /// lossless stream, when a subscriber's queue is full before the subscriber has opened its
    /// side of the connection (its first `receive`); without this wait, a subscriber slow to be
    /// scheduled lost the start of the stream.
    #[serde(default)]
    pub handshake: bool,
}

fn one() -> usize {
    1
}

/// What the subscriber measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerReport {
    pub received: u64,
    /// Messages received after the warm-up: the ones `elapsed_s` times (throughput mode leaves
    /// the first tenth out; latency mode times them all).
    #[serde(default)]
    pub measured: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub elapsed_s: f64,
    /// Latency mode: publish → receive of every message. Throughput mode (mdbus): the lag of
    /// each sample, publish → its first frame read.
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: f64,
    /// The whole latency histogram, hdrhistogram V2 format, hex: rounds are merged exactly.
    pub hist_hex: String,
}

impl PeerReport {
    /// Adds another round's counts and time (rounds of one transport are merged this way; the
    /// latency histogram is merged by the caller).
    pub fn add_round(&mut self, r: &PeerReport) {
        self.received += r.received;
        self.measured += r.measured;
        self.lost += r.lost;
        self.out_of_order += r.out_of_order;
        self.elapsed_s += r.elapsed_s;
    }
}

/// The size of one message on every transport: one encoded K-line frame.
pub fn payload_len() -> usize {
    encoded_frame_len(FrameKind::Kline)
}

/// Failure of a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("bus: {0}")]
    Bus(#[from] mdbus_bus::BusError),
    #[error("iceoryx2: {0}")]
    Iox2(String),
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

/// The broker's clock (ns since the epoch), as the frame header carries it.
fn now_ns() -> u64 {
    mdbus_publisher::broker::now_ns() as u64
}

fn pin(core: Option<usize>) {
    if let Some(c) = core {
        mdbus_publisher::affinity::pin_current_thread(c);
    }
}

/// The K-line every message carries, as an open K-line in the broker's table looks. Each message
/// then updates it as a trade would ([`next_update`]): building the value is not bus work.
fn sample_kline(sym: Symbol) -> Kline {
    Kline::empty(Interval::M1, 1_700_000_000_000, sym, 0, 2, 5, 8_723_201)
}

fn next_update(k: &mut Kline, i: u64) {
    k.trade_count = i;
    k.close = 8_723_201 + i as i64 % 100;
    k.high = k.high.max(k.close);
    k.volume += 1;
}

/// The settings of the benchmark's own streams: lossless in throughput mode.
pub fn bench_settings(mode: Mode) -> StreamSettings {
    StreamSettings { lossless: matches!(mode, Mode::Throughput), ..StreamSettings::default() }
}

/// The mdbus stream of `spec`: [`bench_settings`], or the default (lossy) settings with `lossy`.
fn mdbus_settings(spec: &PeerSpec) -> StreamSettings {
    if spec.lossy {
        StreamSettings::default()
    } else {
        bench_settings(spec.mode)
    }
}

const BENCH_STREAM: &str = "bench";
const END: u64 = u64::MAX;

/// Paces sends at `rate`/s by spinning (sleeping would add its own jitter).
struct Pacer {
    start: Instant,
    period_ns: f64,
    n: u64,
}
impl Pacer {
    fn new(mode: Mode) -> Pacer {
        let period_ns = match mode {
            Mode::Latency { rate, .. } => 1e9 / rate.max(1.0),
            Mode::Throughput => 0.0,
        };
        Pacer { start: Instant::now(), period_ns, n: 0 }
    }
    fn wait(&mut self) {
        if self.period_ns > 0.0 {
            let due = Duration::from_nanos((self.n as f64 * self.period_ns) as u64);
            // Sleep through most of a long gap (leaving a core to the OS), spin the rest.
            let left = due.saturating_sub(self.start.elapsed());
            if left > Duration::from_micros(300) {
                std::thread::sleep(left - Duration::from_micros(200));
            }
            while self.start.elapsed() < due {
                std::hint::spin_loop();
            }
        }
        self.n += 1;
    }
}

struct Recorder {
    hist: Histogram<u64>,
    /// Latency mode: messages (by seq) left out of the histogram.
    warmup: u64,
    /// Throughput mode: messages received before the clock starts (a tenth of the count), and
    /// where it started.
    warm: u64,
    at_first: u64,
    received: u64,
    next: u64,
    lost: u64,
    out_of_order: u64,
    first: Option<Instant>,
    last: Instant,
}

impl Recorder {
    fn new(mode: Mode, count: u64) -> Recorder {
        let (warmup, warm) = match mode {
            Mode::Latency { warmup, .. } => (warmup, 0),
            Mode::Throughput => (0, count / 10),
        };
        Recorder {
            // Invariant: valid constant bounds (1 ns .. 60 s, 3 significant digits).
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| unreachable!()),
            warmup,
            warm,
            at_first: 0,
            received: 0,
            next: 0,
            lost: 0,
            out_of_order: 0,
            first: None,
            last: Instant::now(),
        }
    }
    /// Marks the arrival time of what follows (once per batch, not per frame). With a warm-up
    /// the clock starts in [`on`](Self::on) instead.
    fn stamp(&mut self) {
        let now = Instant::now();
        if self.warm == 0 {
            self.first.get_or_insert(now);
        }
        self.last = now;
    }

    /// Starts the clock now, with `done` messages behind it (the warm-up).
    fn start_clock(&mut self, done: u64) {
        self.first = Some(Instant::now());
        self.at_first = done;
    }

    fn on(&mut self, seq: u64, sent_ns: Option<u64>) {
        if self.warm > 0 && self.received == self.warm && self.first.is_none() {
            self.start_clock(self.received);
        }
        if seq > self.next {
            self.lost += seq - self.next;
        } else if seq < self.next {
            self.out_of_order += 1;
        }
        self.next = seq + 1;
        self.received += 1;
        if let Some(sent) = sent_ns {
            if seq >= self.warmup {
                let _ = self.hist.record(now_ns().saturating_sub(sent).max(1));
            }
        }
    }
    /// Throughput mode: the age of a sample when its first frame is read (publish → read), once
    /// per sample, into the histogram (latency mode records every message in [`on`](Self::on)).
    fn lag(&mut self, sent_ns: u64) {
        if self.received >= self.warm {
            let _ = self.hist.record(now_ns().saturating_sub(sent_ns).max(1));
        }
    }

    fn report(&self) -> PeerReport {
        let h = &self.hist;
        PeerReport {
            received: self.received,
            measured: self.received.saturating_sub(self.at_first),
            lost: self.lost,
            out_of_order: self.out_of_order,
            elapsed_s: self.first.map_or(0.0, |f| self.last.duration_since(f).as_secs_f64()),
            p50_ns: h.value_at_quantile(0.50),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            mean_ns: h.mean(),
            hist_hex: encode_hist(h),
        }
    }
}

fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    if hdrhistogram::serialization::Serializer::serialize(
        &mut hdrhistogram::serialization::V2Serializer::new(),
        h,
        &mut buf,
    )
    .is_err()
    {
        return String::new();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes a histogram written by a peer (`None` if malformed).
pub fn decode_hist(hex: &str) -> Option<Histogram<u64>> {
    let bytes: Option<Vec<u8>> =
        (0..hex.len() / 2).map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect();
    hdrhistogram::serialization::Deserializer::new().deserialize(&mut &bytes?[..]).ok()
}

/// With [`PeerSpec::handshake`], blocks until the orchestrator's `go` line on stdin.
fn await_go(spec: &PeerSpec) -> Result<(), PeerError> {
    if !spec.handshake {
        return Ok(());
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| PeerError::Other(format!("reading stdin: {e}")))?;
    if line.trim() != "go" {
        return Err(PeerError::Other(format!("expected `go` on stdin, got {line:?}")));
    }
    Ok(())
}

/// Runs the publishing side. Waits for the subscriber, sends `count` messages (seq 0..count),
/// then the end marker. Returns its own report: messages sent and the time from the first send
/// to the last.
pub fn run_publisher(spec: &PeerSpec) -> Result<PeerReport, PeerError> {
    let mut sent = Recorder::new(spec.mode, spec.count);
    pin(spec.core);
    let mut pacer = Pacer::new(spec.mode);
    match spec.transport {
        Transport::Mdbus => {
            let settings = mdbus_settings(spec);
            let node = BusNode::open(&spec.bus, "bench-pub")?;
            let publisher = node.publisher(BENCH_STREAM, settings)?;
            let mut w = FrameWriter::with_capacity(settings.max_sample_bytes);
            let mut hb = Heartbeat {
                publisher_id: 1,
                last_seq: 0,
                interval_ms: 100,
                feed_state: FeedState::Live as u8,
                started_at_ns: 0,
            };
            // Heartbeats until the subscriber is connected.
            loop {
                w.clear();
                let _ = w.push_heartbeat(header(FrameKind::Heartbeat, 9, 0), &hb);
                if publisher.send(w.as_bytes())? >= spec.subscribers.max(1) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            await_go(spec)?;
            w.clear();
            let batch = matches!(spec.mode, Mode::Throughput);
            let sym = Symbol::new("BTCUSDT").map_err(|e| PeerError::Other(e.to_string()))?;
            let frame = payload_len();
            let mut k = sample_kline(sym);
            sent.stamp();
            for i in 0..spec.count {
                if i == sent.warm && i > 0 {
                    // The warm-up is over: the publisher's own clock starts.
                    sent.start_clock(i);
                }
                pacer.wait();
                next_update(&mut k, i);
                let h = header(FrameKind::Kline, 9, i + 1);
                w.push_kline(h, &k).map_err(|e| PeerError::Other(e.to_string()))?;
                if !batch || w.len() + frame > settings.max_sample_bytes {
                    // As the broker does: one clock read per sample, just before sending.
                    w.set_publish_time(now_ns() as i64);
                    publisher.send(w.as_bytes())?;
                    w.clear();
                }
            }
            if !w.is_empty() {
                w.set_publish_time(now_ns() as i64);
                publisher.send(w.as_bytes())?;
                w.clear();
            }
            sent.stamp();
            sent.received = spec.count;
            hb.last_seq = spec.count;
            hb.feed_state = FeedState::Ended as u8;
            let _ = w.push_heartbeat(header(FrameKind::Heartbeat, 9, spec.count), &hb);
            publisher.send(w.as_bytes())?;
        }
        Transport::Iox2 | Transport::Iox2Batch => {
            let settings = bench_settings(spec.mode);
            let (_node, service) = raw_service(&spec.bus, settings)?;
            // One message per sample, or as many as fit mdbus's sample size.
            let per_sample = if spec.transport == Transport::Iox2Batch {
                (settings.max_sample_bytes / payload_len()) as u64
            } else {
                1
            };
            let len = payload_len() * per_sample as usize;
            let publisher = service
                .publisher_builder()
                .initial_max_slice_len(len)
                .allocation_strategy(AllocationStrategy::Static)
                .max_loaned_samples(2)
                .backpressure_strategy(if settings.lossless {
                    BackpressureStrategy::RetryUntilDelivered
                } else {
                    BackpressureStrategy::DiscardData
                })
                .create()
                .map_err(|e| PeerError::Iox2(format!("{e:?}")))?;
            let mut buf = vec![0u8; len];
            let mut send = |seq: u64, n: u64| -> Result<usize, PeerError> {
                // First 8 bytes: seq of the first message; then the send time, read once.
                buf[0..8].copy_from_slice(&seq.to_le_bytes());
                buf[8..16].copy_from_slice(&now_ns().to_le_bytes());
                buf[16..24].copy_from_slice(&n.to_le_bytes());
                let s = publisher.loan_slice_uninit(len).map_err(|e| PeerError::Iox2(format!("{e:?}")))?;
                s.write_from_slice(&buf).send().map_err(|e| PeerError::Iox2(format!("{e:?}")))
            };
            while send(END - 1, 0)? == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            await_go(spec)?;
            let mut i = 0;
            while i < spec.count {
                pacer.wait();
                let n = per_sample.min(spec.count - i);
                send(i, n)?;
                i += n;
            }
            send(END, 0)?;
        }
        Transport::Uds => {
            let mut stream = loop {
                match UnixStream::connect(&spec.socket) {
                    Ok(s) => break s,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            await_go(spec)?;
            let mut buf = vec![0u8; payload_len()];
            let err = |source| PeerError::Socket { path: spec.socket.clone(), source };
            for i in 0..spec.count {
                pacer.wait();
                buf[0..8].copy_from_slice(&i.to_le_bytes());
                buf[8..16].copy_from_slice(&now_ns().to_le_bytes());
                stream.write_all(&buf).map_err(err)?;
            }
            stream.shutdown(std::net::Shutdown::Write).map_err(err)?;
        }
    }
    Ok(sent.report())
}

type RawService = iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, [u8], ()>;

/// The baseline's own node and service: plain iceoryx2, with the same sizing as mdbus's streams.
fn raw_service(bus: &str, s: StreamSettings) -> Result<(Node<ipc::Service>, RawService), PeerError> {
    let config = mdbus_bus::iceoryx_config(bus)?;
    let node = NodeBuilder::new()
        .config(&config)
        .signal_handling_mode(SignalHandlingMode::Disabled)
        .create::<ipc::Service>()
        .map_err(|e| PeerError::Iox2(format!("{e:?}")))?;
    let name = ServiceName::new(&format!("mdbus/{bus}/raw-baseline")).map_err(|e| PeerError::Iox2(format!("{e:?}")))?;
    let service = node
        .service_builder(&name)
        .publish_subscribe::<[u8]>()
        .payload_alignment(Alignment::new(16).ok_or_else(|| PeerError::Other("alignment".into()))?)
        .subscriber_max_buffer_size(s.subscriber_buffer)
        .subscriber_max_borrowed_samples(4)
        .history_size(0)
        .max_subscribers(s.max_subscribers)
        .max_publishers(s.max_publishers)
        .max_nodes(s.max_subscribers + s.max_publishers + 4)
        .enable_safe_overflow(!s.lossless)
        .open_or_create()
        .map_err(|e| PeerError::Iox2(format!("{e:?}")))?;
    Ok((node, service))
}

/// Runs the receiving side; calls `say("ready")` once subscribed and `say("connected")` once the
/// publisher's first message has arrived (see [`PeerSpec::handshake`]); returns the report after
/// the end marker.
pub fn run_subscriber(spec: &PeerSpec, mut say: impl FnMut(&str)) -> Result<PeerReport, PeerError> {
    pin(spec.core);
    let mut rec = Recorder::new(spec.mode, spec.count);
    let timed = matches!(spec.mode, Mode::Latency { .. });
    match spec.transport {
        Transport::Mdbus => {
            let settings = mdbus_settings(spec);
            let opts = ReaderOptions::default()
                .settings(settings)
                .node_name("bench-sub")
                .kind(FrameKind::Kline)
                .kind(FrameKind::Heartbeat);
            let mut reader =
                Reader::open(&spec.bus, BENCH_STREAM, opts).map_err(|e| PeerError::Other(e.to_string()))?;
            say("ready");
            let mut done = false;
            let mut bad = 0u64;
            let mut stamped = false;
            let mut connected = false;
            let mut sample_ts = 0i64;
            let wait = if spec.block {
                WaitMode::Block(Duration::from_millis(10))
            } else {
                WaitMode::Spin(Duration::from_millis(10))
            };
            while !done {
                reader.next_batch(wait, |f| match f.kind() {
                    FrameKind::Kline => match f.kline() {
                        Ok(k) => {
                            if !stamped {
                                rec.stamp();
                                stamped = true;
                            }
                            let _ = k.close.to_native();
                            let ts = f.header.ts_publish_ns;
                            if !timed && ts != sample_ts {
                                // The first frame of a sample (each carries its own publish time).
                                sample_ts = ts;
                                rec.lag(ts as u64);
                            }
                            rec.on(f.seq() - 1, timed.then_some(ts as u64));
                        }
                        Err(_) => bad += 1,
                    },
                    _ => match f.heartbeat().map(|h| h.feed_state) {
                        Ok(s) if s == FeedState::Ended as u8 => {
                            // The end marker: the last frame's arrival time.
                            rec.stamp();
                            done = true;
                        }
                        Ok(_) if !connected => {
                            // The publisher's first heartbeat: this side of the connection is open.
                            connected = true;
                            say("connected");
                        }
                        _ => {}
                    },
                })?;
            }
            if bad > 0 {
                return Err(PeerError::Other(format!("{bad} frames failed validation")));
            }
        }
        Transport::Iox2 | Transport::Iox2Batch => {
            let settings = bench_settings(spec.mode);
            let (_node, service) = raw_service(&spec.bus, settings)?;
            let sub = service
                .subscriber_builder()
                .buffer_size(settings.subscriber_buffer)
                .create()
                .map_err(|e| PeerError::Iox2(format!("{e:?}")))?;
            say("ready");
            let mut connected = false;
            loop {
                let Some(s) = sub.receive().map_err(|e| PeerError::Iox2(format!("{e:?}")))? else {
                    std::hint::spin_loop();
                    continue;
                };
                let p = s.payload();
                let mut a = [0u8; 8];
                a.copy_from_slice(&p[0..8]);
                let seq = u64::from_le_bytes(a);
                if seq == END {
                    break;
                }
                if seq == END - 1 {
                    if !connected {
                        connected = true;
                        say("connected");
                    }
                    continue;
                }
                a.copy_from_slice(&p[8..16]);
                let sent = u64::from_le_bytes(a);
                a.copy_from_slice(&p[16..24]);
                rec.stamp();
                // Touch every message of the sample, as a reader would.
                let mut sum = 0u64;
                for m in p.chunks_exact(payload_len()) {
                    sum = sum.wrapping_add(u64::from(m[payload_len() - 1]));
                }
                std::hint::black_box(sum);
                for j in 0..u64::from_le_bytes(a) {
                    rec.on(seq + j, timed.then_some(sent));
                }
            }
        }
        Transport::Uds => {
            let _ = std::fs::remove_file(&spec.socket);
            let err = |source| PeerError::Socket { path: spec.socket.clone(), source };
            let listener = UnixListener::bind(&spec.socket).map_err(err)?;
            say("ready");
            let (mut stream, _) = listener.accept().map_err(err)?;
            say("connected");
            let mut buf = vec![0u8; payload_len()];
            let mut a = [0u8; 8];
            loop {
                match stream.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(err(e)),
                }
                a.copy_from_slice(&buf[0..8]);
                let seq = u64::from_le_bytes(a);
                a.copy_from_slice(&buf[8..16]);
                rec.stamp();
                rec.on(seq, timed.then_some(u64::from_le_bytes(a)));
            }
            let _ = std::fs::remove_file(&spec.socket);
        }
    }
    let mut r = rec.report();
    r.lost += spec.count.saturating_sub(rec.next);
    Ok(r)
}
