//! The delayed snapshot stream: K-lines for durable consumers (the batch writer), committed only
//! when acked.
//!
//! Upstream: the publish thread hands every K-line frame it publishes (updates and closes) to
//! [`SnapshotSink`] over an SPSC queue, and after each round the real-time seq that all of them
//! cover. Downstream: the `snapshot` stream (`Begin`, K-line frames, `End`) and, back from durable
//! consumers, the `acks` stream.
//!
//! The [`Snapshotter`] (seed 000's fix for the "lost window") keeps the latest state of every open
//! K-line changed since the last committed snapshot and every K-line closed since then. Every
//! `interval` it freezes them into a snapshot and publishes it; the snapshot is forgotten only when
//! a consumer acks its id. No ack within `ack_timeout`: the frozen rows are merged into the next
//! snapshot, so nothing is lost while a consumer is down. A snapshot is frozen only at a round
//! boundary of the publish thread, so it reflects every real-time frame up to its `covered_seq`
//! and none after: a restarted broker rebuilds its state from the last committed snapshot plus
//! the WAL after `covered_seq`, which the WAL keeps (the committed seq is its retention floor).
//!
//! Memory is bounded: open K-lines are one slot per symbol and interval; closed K-lines waiting
//! for an ack are capped at `max_pending_closed`. Past the cap the snapshot says from which
//! real-time seq the consumer must read closed K-lines from the WAL instead (`wal_from_seq`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mdbus_bus::{BusError, BusNode, StreamPublisher, StreamSettings};
use mdbus_schema::frame::header;
use mdbus_schema::service::SNAPSHOT_STREAM_ID;
use mdbus_schema::{FeedState, FrameIter, FrameKind, FrameWriter, Heartbeat, Interval, Kline, Seq};
use mdbus_schema::{SnapshotMark, SnapshotPhase};
use rtrb::{Consumer, Producer, RingBuffer};

use crate::metrics::BrokerMetrics;

const N: usize = Interval::COUNT;

/// How the broker runs its snapshot stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotSettings {
    /// How often a snapshot is frozen and published.
    pub interval: Duration,
    /// No ack (nor word that it arrived) for this long: the next snapshot re-sends the rows
    /// (merged).
    pub ack_timeout: Duration,
    /// A consumer said it received the snapshot whole: wait this long for its ack (the write may
    /// take seconds; the database may be down) before re-sending.
    pub write_timeout: Duration,
    /// Closed K-lines kept in memory while waiting for acks; past it, consumers read them from
    /// the WAL.
    pub max_pending_closed: usize,
    /// Heartbeat period of the snapshot stream when idle.
    pub heartbeat: Duration,
    /// A snapshot is frozen only once the WAL has logged every frame it covers (a restart
    /// replays the log after a snapshot: it must hold all that came after). Off without a WAL.
    pub wal_gate: bool,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            interval: Duration::from_millis(100),
            ack_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(30),
            max_pending_closed: 500_000,
            heartbeat: Duration::from_millis(100),
            wal_gate: true,
        }
    }
}

/// A small set of slot indices: a bit per slot plus the list of set ones.
#[derive(Debug, Default)]
struct SlotSet {
    bits: Vec<u64>,
    list: Vec<u32>,
}

impl SlotSet {
    fn insert(&mut self, slot: usize) {
        let (w, b) = (slot / 64, 1u64 << (slot % 64));
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & b == 0 {
            self.bits[w] |= b;
            self.list.push(slot as u32);
        }
    }
    fn clear(&mut self) {
        for &s in &self.list {
            self.bits[s as usize / 64] = 0;
        }
        self.list.clear();
    }
    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// A frozen snapshot, as published.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotView<'a> {
    pub id: u64,
    pub covered_seq: Seq,
    /// Non-zero: closed K-lines from this real-time seq on are in the WAL, not in `closed`.
    pub wal_from_seq: Seq,
    pub closed: &'a [Kline],
    pub open: &'a [Kline],
}

/// The double-buffered snapshot state (see the module docs). Pure: no clock, no I/O.
#[derive(Debug)]
pub struct Snapshotter {
    /// Latest state per (symbol id, interval) of open K-lines seen.
    open: Vec<Option<Kline>>,
    dirty: SlotSet,
    closed: Vec<Kline>,
    frozen: Option<(u64, Seq)>,
    frozen_slots: SlotSet,
    frozen_closed: Vec<Kline>,
    frozen_open: Vec<Kline>,
    /// Real-time seq of the first closed K-line not kept (0: none dropped).
    overflow_from: Seq,
    max_closed: usize,
    /// Closed K-lines were dropped while a snapshot was frozen (they are after its covered seq).
    dropped_after_freeze: bool,
    next_id: u64,
    covered_seq: Seq,
    dropped: u64,
}

impl Snapshotter {
    /// Ids continue from `next_id`; `covered_seq` is what the state already reflects.
    pub fn new(next_id: u64, covered_seq: Seq, max_closed: usize) -> Snapshotter {
        Snapshotter {
            open: Vec::new(),
            dirty: SlotSet::default(),
            closed: Vec::new(),
            frozen: None,
            frozen_slots: SlotSet::default(),
            frozen_closed: Vec::new(),
            frozen_open: Vec::new(),
            overflow_from: 0,
            dropped_after_freeze: false,
            max_closed: max_closed.max(1),
            next_id: next_id.max(1),
            covered_seq,
            dropped: 0,
        }
    }

    fn slot(k: &Kline) -> Option<usize> {
        let i = k.interval()?.index();
        Some(k.symbol_id as usize * N + i)
    }

    /// A K-line frame the broker published (real-time seq `seq`).
    pub fn on_kline(&mut self, k: &Kline, seq: Seq) {
        let Some(slot) = Self::slot(k) else { return };
        if slot >= self.open.len() {
            self.open.resize((slot + 1).next_power_of_two().max(N * 64), None);
        }
        if k.closed {
            if self.open[slot].is_some_and(|o| o.open_time <= k.open_time) {
                self.open[slot] = None;
            }
            if self.closed.len() + self.frozen_closed.len() >= self.max_closed {
                if self.overflow_from == 0 {
                    tracing::warn!(
                        seq,
                        kept = self.max_closed,
                        "snapshot backlog full: durable consumers will read further closed K-lines from the WAL"
                    );
                    self.overflow_from = seq.max(1);
                }
                self.drop_closed();
            } else if self.overflow_from == 0 {
                self.closed.push(*k);
            } else {
                // Past the bound once, the WAL has them all from `overflow_from` on.
                self.drop_closed();
            }
        } else {
            if self.open[slot].is_some_and(|o| o.open_time > k.open_time) {
                return;
            }
            self.open[slot] = Some(*k);
            self.dirty.insert(slot);
        }
    }

    fn drop_closed(&mut self) {
        self.dropped += 1;
        self.dropped_after_freeze |= self.frozen.is_some();
    }

    /// Everything handed in so far reflects the real-time stream up to `seq`.
    pub fn covered(&mut self, seq: Seq) {
        self.covered_seq = self.covered_seq.max(seq);
    }

    pub fn covered_seq(&self) -> Seq {
        self.covered_seq
    }

    /// Whether a snapshot would carry anything (new changes, or an unacked one to re-send).
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.closed.is_empty() || self.overflow_from != 0
    }

    /// The snapshot waiting for its ack, if any: (id, covered seq).
    pub fn pending(&self) -> Option<(u64, Seq)> {
        self.frozen
    }

    /// Rows not yet acked.
    pub fn pending_rows(&self) -> usize {
        self.closed.len() + self.frozen_closed.len() + self.dirty.list.len().max(self.frozen_slots.list.len())
    }

    /// Closed K-lines not kept because of the bound (read from the WAL instead).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Freezes everything changed since the last commit (an unacked snapshot is merged in).
    pub fn take(&mut self) -> SnapshotView<'_> {
        for &s in &self.dirty.list {
            self.frozen_slots.insert(s as usize);
        }
        self.dirty.clear();
        self.frozen_closed.append(&mut self.closed);
        self.frozen_open.clear();
        for &s in &self.frozen_slots.list {
            if let Some(k) = self.open.get(s as usize).copied().flatten() {
                self.frozen_open.push(k);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.frozen = Some((id, self.covered_seq));
        SnapshotView {
            id,
            covered_seq: self.covered_seq,
            wal_from_seq: self.overflow_from,
            closed: &self.frozen_closed,
            open: &self.frozen_open,
        }
    }

    /// The frozen snapshot's rows (closed, then open), as [`take`](Self::take) returned them.
    pub fn frozen_rows(&self) -> (&[Kline], &[Kline]) {
        (&self.frozen_closed, &self.frozen_open)
    }

    /// A consumer made snapshot `id` durable. Returns the seq it covers if `id` was the pending
    /// snapshot (a stale or unknown id commits nothing).
    pub fn commit(&mut self, id: u64) -> Option<Seq> {
        let (pending, covered) = self.frozen?;
        if pending != id {
            return None;
        }
        self.frozen = None;
        self.frozen_slots.clear();
        self.frozen_closed.clear();
        self.frozen_open.clear();
        // Closed K-lines from the WAL were part of it: the bound starts over. (Any dropped after
        // the freeze are past `covered` and still in the WAL: keep reading them from there.)
        if self.overflow_from != 0 && self.overflow_from <= covered {
            self.overflow_from = if self.dropped_after_freeze { covered + 1 } else { 0 };
        }
        self.dropped_after_freeze = false;
        Some(covered)
    }
}

/// One item for the snapshot thread.
#[derive(Debug)]
enum Item {
    Kline(Kline, Seq),
    Covered(Seq),
}

/// Where the snapshot state starts (after a restart: the database's last committed snapshot).
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotStart {
    pub next_id: u64,
    pub covered_seq: Seq,
}

/// The publish thread's end of the snapshot thread.
pub struct SnapshotSink {
    queue: Producer<Item>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), BusError>>>,
    metrics: Arc<BrokerMetrics>,
    last_marked: Seq,
    unmarked: bool,
}

impl std::fmt::Debug for SnapshotSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSink").finish_non_exhaustive()
    }
}

/// The snapshot thread with its streams open, waiting for its start.
pub struct SnapshotSinkOpening {
    // Declared first, so dropped first: the thread stops waiting before the sink joins it.
    start_tx: std::sync::mpsc::Sender<SnapshotStart>,
    sink: SnapshotSink,
}

impl SnapshotSinkOpening {
    /// Where the snapshot state starts (after a restart: the database's last committed snapshot).
    pub fn begin(self, start: SnapshotStart) -> SnapshotSink {
        let SnapshotSinkOpening { start_tx, mut sink } = self;
        sink.metrics.snapshots.committed_seq.store(start.covered_seq, Ordering::Relaxed);
        sink.last_marked = start.covered_seq;
        // A thread that already stopped shows as a finished thread at the first push.
        let _ = start_tx.send(start);
        sink
    }
}

impl std::fmt::Debug for SnapshotSinkOpening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSinkOpening").finish_non_exhaustive()
    }
}

/// Starting the snapshot thread failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotStartError {
    #[error("starting the snapshot thread: {0}")]
    Spawn(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("the snapshot thread stopped before it was ready")]
    Died,
}

impl SnapshotSink {
    /// Opens the snapshot and acks streams of `bus` on a new thread, which then waits for
    /// [`SnapshotSinkOpening::begin`] to say where the state starts (a restart knows that only
    /// once the database has been read: the streams open meanwhile).
    pub fn open(
        bus: &str,
        settings: SnapshotSettings,
        publisher_id: u64,
        metrics: Arc<BrokerMetrics>,
    ) -> Result<SnapshotSinkOpening, SnapshotStartError> {
        let (queue, rx) = RingBuffer::<Item>::new(1 << 16);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), BusError>>();
        let (start_tx, start_rx) = std::sync::mpsc::channel::<SnapshotStart>();
        let (st, m, bus) = (Arc::clone(&stop), Arc::clone(&metrics), bus.to_string());
        let thread = std::thread::Builder::new().name("mdbus-snapshot".into()).spawn(move || {
            let streams = match Streams::open(&bus) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            // The opening dropped without a start: nothing to do.
            let Ok(start) = start_rx.recv() else { return Ok(()) };
            let snap = Snapshotter::new(start.next_id, start.covered_seq, settings.max_pending_closed);
            run(streams, snap, rx, &st, settings, publisher_id, &m)
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(SnapshotStartError::Died),
        }
        let sink = SnapshotSink { queue, stop, thread: Some(thread), metrics, last_marked: 0, unmarked: false };
        Ok(SnapshotSinkOpening { start_tx, sink })
    }

    fn push(&mut self, mut item: Item) {
        loop {
            match self.queue.push(item) {
                Ok(()) => return,
                Err(rtrb::PushError::Full(back)) => {
                    item = back;
                    if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                        return;
                    }
                    self.metrics.snapshots.queue_waits.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                }
            }
        }
    }

    /// A K-line frame published with real-time seq `seq`.
    pub fn kline(&mut self, k: &Kline, seq: Seq) {
        self.unmarked = true;
        self.push(Item::Kline(*k, seq));
    }

    /// Every K-line frame handed in reflects the real-time stream up to `seq` (called at round
    /// boundaries, when the workers are idle).
    pub fn covered(&mut self, seq: Seq) {
        if seq != self.last_marked || self.unmarked {
            self.last_marked = seq;
            self.unmarked = false;
            self.push(Item::Covered(seq));
        }
    }

    /// Whether the thread has stopped (an error of its streams).
    pub fn failed(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread (what is not acked stays in the database's next run via the WAL).
    pub fn stop(mut self) -> Result<(), BusError> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Ok(()),
        }
    }
}

impl Drop for SnapshotSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct Streams {
    publisher: StreamPublisher,
    acks: mdbus_bus::StreamSubscriber,
    // Ports must be dropped before their node.
    _node: BusNode,
}

impl Streams {
    fn open(bus: &str) -> Result<Streams, BusError> {
        let node = BusNode::open(bus, "broker-snapshot")?;
        let publisher = node.publisher("snapshot", StreamSettings::snapshot())?;
        let acks = node.subscriber("acks", StreamSettings::acks(), StreamSettings::acks().subscriber_buffer)?;
        tracing::info!(service = publisher.service(), "snapshot stream publishing");
        Ok(Streams { publisher, acks, _node: node })
    }
}

/// Publishes frames on the snapshot stream, batched into samples.
struct Out<'a> {
    publisher: &'a StreamPublisher,
    writer: FrameWriter,
    next_seq: Seq,
    last_send: Instant,
}

impl Out<'_> {
    fn room(&mut self, kind: FrameKind) -> Result<(), BusError> {
        if self.writer.len() + mdbus_schema::frame::encoded_frame_len(kind) > self.publisher.max_sample_bytes() {
            self.flush()?;
        }
        Ok(())
    }
    fn hdr(&mut self, kind: FrameKind) -> mdbus_schema::FrameHeader {
        let seq = self.next_seq;
        self.next_seq += 1;
        header(kind, SNAPSHOT_STREAM_ID, seq)
    }
    fn mark(&mut self, m: &SnapshotMark) -> Result<(), BusError> {
        self.room(FrameKind::Snapshot)?;
        let h = self.hdr(FrameKind::Snapshot);
        // A fixed-size body into a buffer with room: cannot fail.
        let _ = self.writer.push_snapshot_mark(h, m);
        Ok(())
    }
    /// Returns whether a full sample was sent to make room.
    fn kline(&mut self, k: &Kline) -> Result<bool, BusError> {
        let sent = self.writer.len() + mdbus_schema::frame::encoded_frame_len(FrameKind::Kline)
            > self.publisher.max_sample_bytes();
        self.room(FrameKind::Kline)?;
        let h = self.hdr(FrameKind::Kline);
        let _ = self.writer.push_kline(h, k);
        Ok(sent)
    }
    fn heartbeat(&mut self, hb: &Heartbeat) -> Result<(), BusError> {
        self.flush()?;
        let h = header(FrameKind::Heartbeat, SNAPSHOT_STREAM_ID, self.next_seq - 1);
        let _ = self.writer.push_heartbeat(h, hb);
        self.flush()
    }
    fn flush(&mut self) -> Result<(), BusError> {
        self.flush_reached().map(drop)
    }
    /// Sends what is batched; returns the subscribers it reached.
    fn flush_reached(&mut self) -> Result<usize, BusError> {
        let mut reached = 0;
        if !self.writer.is_empty() {
            self.writer.set_publish_time(crate::broker::now_ns());
            reached = self.publisher.send(self.writer.as_bytes())?;
            self.writer.clear();
            self.last_send = Instant::now();
        }
        Ok(reached)
    }
}

/// A snapshot being published, a window of frames at a time.
#[derive(Debug)]
struct Sending {
    mark: SnapshotMark,
    next: usize,
    /// The consumer reports progress: keep within the window (else send it all at once).
    flow: bool,
    last_progress: Instant,
}

/// Samples sent per loop turn at most, so that the queue from the publish thread is drained
/// often even while a big snapshot goes out.
const SAMPLES_PER_TURN: usize = 16;

#[allow(clippy::too_many_lines)]
fn run(
    streams: Streams,
    mut snap: Snapshotter,
    mut rx: Consumer<Item>,
    stop: &AtomicBool,
    settings: SnapshotSettings,
    publisher_id: u64,
    metrics: &BrokerMetrics,
) -> Result<(), BusError> {
    let c = &metrics.snapshots;
    let max = streams.publisher.max_sample_bytes();
    let mut out = Out {
        publisher: &streams.publisher,
        writer: FrameWriter::with_capacity(max),
        next_seq: 1,
        last_send: Instant::now(),
    };
    // Frames in flight before the consumer must report progress: half its queue.
    let per_sample = (max / mdbus_schema::frame::encoded_frame_len(FrameKind::Kline)).max(1) as u64;
    let window = per_sample * (StreamSettings::snapshot().subscriber_buffer as u64 / 2).max(1);
    let hb = Heartbeat {
        publisher_id,
        last_seq: 0,
        interval_ms: settings.heartbeat.as_millis() as u32,
        feed_state: FeedState::Live as u8,
        started_at_ns: crate::broker::now_ns(),
    };
    let mut last_take = Instant::now();
    // When the pending snapshot is re-sent if no ack comes.
    let mut resend_at = Instant::now();
    // Only at a round boundary does the state match a covered seq exactly.
    let mut at_boundary = true;
    let mut sending: Option<Sending> = None;
    // Snapshot-stream seq the consumer has received through.
    let mut progress: Seq = 0;
    loop {
        let due = |snap: &Snapshotter, last_take: Instant, resend_at: Instant| {
            last_take.elapsed() >= settings.interval
                && match snap.pending() {
                    None => snap.has_changes(),
                    Some(_) => Instant::now() >= resend_at,
                }
        };
        // Due at a boundary the WAL has not logged yet: hold here (take nothing more from the
        // queue) until it has; the lag is the WAL thread's, milliseconds.
        let wal_ok = |snap: &Snapshotter| {
            !settings.wal_gate || metrics.wal.logged_seq.load(Ordering::Acquire) >= snap.covered_seq()
        };
        let holding = sending.is_none() && at_boundary && due(&snap, last_take, resend_at) && !wal_ok(&snap);
        let mut popped = 0usize;
        while let Some(item) = if holding { None } else { rx.pop().ok() } {
            popped += 1;
            match item {
                Item::Kline(k, seq) => {
                    at_boundary = false;
                    snap.on_kline(&k, seq);
                }
                Item::Covered(seq) => {
                    at_boundary = true;
                    snap.covered(seq);
                    if due(&snap, last_take, resend_at) {
                        break;
                    }
                }
            }
        }
        // Marks from durable consumers.
        while let Some(sample) = streams.acks.receive()? {
            for frame in FrameIter::new(sample.payload()) {
                let Ok(frame) = frame else { break };
                let Ok(m) = frame.snapshot_mark() else { continue };
                let id = m.snapshot_id.to_native();
                let pending_id = snap.pending().map(|(p, _)| p);
                match SnapshotPhase::from_u8(m.phase) {
                    Some(SnapshotPhase::Hello) => {
                        tracing::info!("a durable consumer started: re-sending what is not acked");
                        resend_at = Instant::now();
                        sending = None;
                        continue;
                    }
                    // Only marks about this broker's snapshots: ids start over from the database's
                    // after a restart, so a late ack for the previous broker's snapshot must not
                    // commit ours.
                    _ if m.publisher_id.to_native() != publisher_id => continue,
                    Some(SnapshotPhase::Progress) => {
                        progress = progress.max(m.covered_seq.to_native());
                        if let Some(s) = sending.as_mut() {
                            s.last_progress = Instant::now();
                        }
                        continue;
                    }
                    Some(SnapshotPhase::Received) if pending_id == Some(id) => {
                        resend_at = Instant::now() + settings.write_timeout;
                        continue;
                    }
                    Some(SnapshotPhase::Ack) => {}
                    _ => continue,
                }
                c.acks.fetch_add(1, Ordering::Relaxed);
                if let Some(covered) = snap.commit(id) {
                    c.commits.fetch_add(1, Ordering::Relaxed);
                    c.committed_seq.fetch_max(covered, Ordering::Relaxed);
                    c.last_committed_id.store(id, Ordering::Relaxed);
                    tracing::debug!(id, covered, "snapshot committed");
                } else {
                    tracing::debug!(id, "stale ack ignored");
                }
            }
        }
        c.pending_rows.store(snap.pending_rows() as u64, Ordering::Relaxed);
        if sending.is_none() && at_boundary && due(&snap, last_take, resend_at) && wal_ok(&snap) {
            if snap.pending().is_some() {
                c.resends.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("no ack in time: re-sending merged into a new snapshot");
            }
            let view = snap.take();
            let rows = view.closed.len() + view.open.len();
            let mark = SnapshotMark {
                snapshot_id: view.id,
                covered_seq: view.covered_seq,
                publisher_id,
                rows: rows as u32,
                wal_from_seq: view.wal_from_seq,
                phase: SnapshotPhase::Begin as u8,
            };
            out.mark(&mark)?;
            let reached = out.flush_reached()?;
            last_take = Instant::now();
            resend_at = last_take + settings.ack_timeout;
            c.published.fetch_add(1, Ordering::Relaxed);
            c.rows.fetch_add(rows as u64, Ordering::Relaxed);
            // Nobody listening: nothing to send (the rows stay until a consumer acks them).
            if reached > 0 {
                sending = Some(Sending { mark, next: 0, flow: true, last_progress: Instant::now() });
            }
        }
        if let Some(s) = sending.as_mut() {
            let (closed, open) = snap.frozen_rows();
            let total = closed.len() + open.len();
            let mut sent_samples = 0;
            while s.next < total && sent_samples < SAMPLES_PER_TURN {
                let in_flight = (out.next_seq - 1).saturating_sub(progress);
                if s.flow && in_flight >= window {
                    break;
                }
                let k = if s.next < closed.len() { &closed[s.next] } else { &open[s.next - closed.len()] };
                if out.kline(k)? {
                    sent_samples += 1;
                }
                s.next += 1;
            }
            if s.next >= total {
                out.mark(&SnapshotMark { phase: SnapshotPhase::End as u8, ..s.mark })?;
                out.flush()?;
                sending = None;
                resend_at = Instant::now() + settings.ack_timeout;
                continue;
            }
            out.flush()?;
            if s.last_progress.elapsed() >= settings.ack_timeout {
                // A consumer that stopped reading: it will get the rows merged into a later
                // snapshot (or asks for them when it starts again).
                tracing::debug!("no progress from the consumer: snapshot abandoned");
                sending = None;
                resend_at = Instant::now();
            } else if sent_samples > 0 {
                continue;
            }
        }
        if out.last_send.elapsed() >= settings.heartbeat {
            out.heartbeat(&Heartbeat { last_seq: out.next_seq - 1, ..hb })?;
        }
        if popped == 0 {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            streams.acks.wait(Duration::from_millis(1))?;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mdbus_schema::Symbol;

    fn k(sym: u32, iv: Interval, open: i64, closed: bool, close: i64) -> Kline {
        let mut k = Kline::empty(iv, open, Symbol::new("BTCUSDT").unwrap(), sym, 2, 3, close);
        k.closed = closed;
        k
    }

    #[test]
    fn unacked_rows_are_merged_into_the_next_snapshot_and_commit_clears_them() {
        let mut s = Snapshotter::new(1, 0, 100);
        s.on_kline(&k(0, Interval::M1, 0, false, 10), 1);
        s.on_kline(&k(0, Interval::M1, 0, false, 11), 2);
        s.covered(2);
        let v = s.take();
        assert_eq!((v.id, v.covered_seq, v.closed.len(), v.open.len()), (1, 2, 0, 1));
        assert_eq!(v.open[0].close, 11, "one row per K-line, the latest");
        // No ack; the K-line closes, the next opens.
        s.on_kline(&k(0, Interval::M1, 0, true, 12), 3);
        s.on_kline(&k(0, Interval::M1, 60_000, false, 12), 4);
        s.covered(4);
        let v = s.take();
        assert_eq!((v.id, v.covered_seq), (2, 4));
        assert_eq!(v.closed.len(), 1);
        assert_eq!(v.open.len(), 1);
        assert_eq!(v.open[0].open_time, 60_000, "the closed K-line's stale open state is gone");
        assert_eq!(s.commit(1), None, "a stale ack commits nothing");
        assert_eq!(s.commit(2), Some(4));
        assert!(!s.has_changes());
        assert_eq!(s.pending_rows(), 0);
    }

    #[test]
    fn past_the_bound_closed_klines_are_left_to_the_wal() {
        let mut s = Snapshotter::new(7, 0, 2);
        for i in 0..5 {
            s.on_kline(&k(0, Interval::S1, i * 1000, true, 1), 10 + i as u64);
        }
        s.covered(20);
        let v = s.take();
        assert_eq!(v.closed.len(), 2);
        assert_eq!(v.wal_from_seq, 12);
        assert_eq!(s.commit(7), Some(20));
        assert_eq!(s.dropped(), 3);
        s.on_kline(&k(0, Interval::S1, 9000, true, 1), 21);
        s.covered(21);
        assert_eq!(s.take().wal_from_seq, 0, "the bound starts over after a commit");
    }
}
