//! The WAL writer thread: every published sample's data frames go to the write-ahead log, off the
//! publish thread.
//!
//! Upstream: the publish thread hands over each sent sample through [`WalSink::submit`]: its
//! frame writer's buffer itself, swapped for an empty one from a fixed pool (no copy), passed over
//! an SPSC queue (empty buffers come back on a second one, so nothing is allocated once warm).
//! When every buffer is in flight the publish thread waits: the log never drops a frame.
//! Downstream: `mdbus_wal::Wal` — one record per data frame (heartbeats carry no seq of their own
//! and are not logged), one group commit per run of waiting samples, then retention.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mdbus_schema::frame::FrameBuffer;
use mdbus_schema::{FrameIter, FrameKind, FrameWriter};
use mdbus_wal::{RetentionPolicy, Wal, WalAppendError};
use rtrb::{Consumer, Producer, RingBuffer};

use crate::metrics::BrokerMetrics;

/// The publish thread's end of the WAL thread.
pub struct WalSink {
    full: Producer<FrameBuffer>,
    empty: Consumer<FrameBuffer>,
    stop: Arc<AtomicBool>,
    /// Set by the WAL thread just before it parks on an empty queue: the publish thread then
    /// unparks it after its next hand-over (an idle broker's log thread costs no CPU).
    parked: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, WalSinkError>>>,
}

impl std::fmt::Debug for WalSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalSink").finish_non_exhaustive()
    }
}

/// The WAL thread stopped with an error (or panicked): the broker must stop, not hang.
#[derive(Debug, thiserror::Error)]
pub enum WalSinkError {
    #[error("wal writer failed: {0}")]
    Append(#[from] WalAppendError),
    #[error("wal writer thread panicked")]
    Panicked,
    #[error("wal writer: undecodable frame in a published sample ({0})")]
    Frame(mdbus_schema::FrameDecodeError),
}

/// At most this many samples per commit (a commit also hands their buffers back). At full load
/// that is a few ms of samples, written in writes of up to the log's 1 MiB buffer: per byte,
/// the kernel's buffered write and the syncs cost less in large writes than in 64 KiB ones.
const COMMIT_EVERY: usize = 128;
/// Finding the queue empty within this long of its last commit, the thread naps for [`GATHER`]
/// instead of parking: under load samples arrive every few tens of µs.
const BUSY_FOR: Duration = Duration::from_millis(2);
const GATHER: Duration = Duration::from_micros(200);

/// Starting the WAL thread failed.
#[derive(Debug, thiserror::Error)]
#[error("starting the wal thread: {0}")]
pub struct WalThreadStartError(#[from] std::io::Error);

impl WalSink {
    /// Moves `wal` to a new thread with a pool of `buffers` buffers of `buffer_bytes` each.
    pub fn start(
        mut wal: Wal,
        buffers: usize,
        buffer_bytes: usize,
        retention: RetentionPolicy,
        acked_floor: bool,
        metrics: Arc<BrokerMetrics>,
    ) -> Result<WalSink, WalThreadStartError> {
        let (full, mut from_publisher) = RingBuffer::<FrameBuffer>::new(buffers);
        let (mut to_publisher, empty) = RingBuffer::<FrameBuffer>::new(buffers);
        for _ in 0..buffers {
            // Invariant: the queue has room for exactly `buffers` entries.
            let _ = to_publisher.push(FrameBuffer::with_capacity(buffer_bytes));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let parked = Arc::new(AtomicBool::new(false));
        let pk = Arc::clone(&parked);
        let thread = std::thread::Builder::new().name("mdbus-wal".into()).spawn(move || {
            let mut appended = 0u64;
            let mut last_retention = Instant::now();
            // Buffers appended since the last commit: every sample waiting is appended, then one
            // commit (one write and at most one sync) covers them all.
            let mut done: Vec<FrameBuffer> = Vec::with_capacity(buffers);
            let mut last_work = Instant::now();
            let mut seen_syncs = 0u64;
            loop {
                let mut last_seq = None;
                while let Ok(buf) = from_publisher.pop() {
                    let (mut records, mut bytes) = (0u64, 0u64);
                    for frame in FrameIter::new(&buf) {
                        let frame = frame.map_err(WalSinkError::Frame)?;
                        if frame.kind() != FrameKind::Heartbeat {
                            wal.append(frame.seq(), frame.raw())?;
                            last_seq = Some(frame.seq());
                            records += 1;
                            bytes += frame.raw().len() as u64;
                        }
                    }
                    appended += records;
                    metrics.wal.records.fetch_add(records, Ordering::Relaxed);
                    metrics.wal.bytes.fetch_add(bytes, Ordering::Relaxed);
                    done.push(buf);
                    if done.len() >= COMMIT_EVERY {
                        break;
                    }
                }
                if !done.is_empty() {
                    last_work = Instant::now();
                    wal.commit()?;
                    // Syncs finish in the background (or inline): record each one seen finished.
                    if wal.syncs() != seen_syncs {
                        seen_syncs = wal.syncs();
                        let now = crate::broker::now_ns();
                        metrics.wal_fsync_latency.record(wal.last_sync_micros(), now);
                    }
                    let c = &metrics.wal;
                    c.syncs.store(wal.syncs(), Ordering::Relaxed);
                    c.commits.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = last_seq {
                        // Written to the OS: survives the process (fsync by the durability).
                        c.logged_seq.store(s, Ordering::Release);
                    }
                    for mut buf in done.drain(..) {
                        buf.clear();
                        let _ = to_publisher.push(buf);
                    }
                } else if st.load(Ordering::Acquire) {
                    wal.commit()?;
                    metrics.wal.syncs.store(wal.syncs(), Ordering::Relaxed);
                    metrics.wal_fsync_latency.flush(crate::broker::now_ns());
                    return Ok(appended);
                } else if last_work.elapsed() < BUSY_FOR {
                    // Busy: let samples gather so one commit covers several (a wake-up per sample
                    // would cost the publish thread a syscall and us a write each).
                    std::thread::sleep(GATHER);
                } else {
                    // Idle: park until the publish thread hands over a sample (or stops us). The
                    // fence pairs with the one in `submit`: either we see its sample here or it
                    // sees `parked` and unparks us. The timeout only paces retention.
                    pk.store(true, Ordering::SeqCst);
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if from_publisher.is_empty() && !st.load(Ordering::SeqCst) {
                        std::thread::park_timeout(Duration::from_secs(1));
                    }
                    pk.store(false, Ordering::SeqCst);
                }
                if last_retention.elapsed() > Duration::from_secs(10) {
                    last_retention = Instant::now();
                    // With durable consumers (the batch writer), nothing after the last committed
                    // snapshot is removed: a restart rebuilds from that snapshot plus the log.
                    let floor = acked_floor.then(|| metrics.snapshots.committed_seq.load(Ordering::Relaxed));
                    if let Ok(gone) = wal.retain(&retention, floor) {
                        metrics.wal.segments_removed.fetch_add(gone.len() as u64, Ordering::Relaxed);
                        for p in gone {
                            tracing::info!(file = %p.display(), "wal segment removed by retention");
                        }
                    }
                }
            }
        })?;
        Ok(WalSink { full, empty, stop, parked, thread: Some(thread) })
    }

    /// Hands a sent sample, the frames in `writer`, to the WAL thread: the writer's buffer goes
    /// and it is left empty with one from the pool. Waits for a free buffer if all are in flight.
    /// Fails if the WAL thread has stopped (its error is returned).
    pub fn submit(&mut self, writer: &mut FrameWriter) -> Result<(), WalSinkError> {
        let spare = loop {
            match self.empty.pop() {
                Ok(b) => break b,
                Err(_) => {
                    if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                        return Err(self.join().err().unwrap_or(WalSinkError::Panicked));
                    }
                    std::thread::yield_now();
                }
            }
        };
        let buf = writer.swap_buffer(spare);
        // Invariant: buffers circulate, so the full queue always has room for one we popped.
        let _ = self.full.push(buf);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.wake();
        }
        Ok(())
    }

    fn wake(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    fn join(&mut self) -> Result<u64, WalSinkError> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(WalSinkError::Panicked),
            None => Ok(0),
        }
    }

    /// Lets the thread write what it has, commit, and stop. Returns the records appended.
    pub fn stop(mut self) -> Result<u64, WalSinkError> {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        self.join()
    }
}

impl Drop for WalSink {
    fn drop(&mut self) {
        // Dropped on an error path: let the thread finish what it has and exit.
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdbus_schema::{frame::header, FrameWriter, Symbol, Trade};
    use mdbus_wal::{WalOptions, WalReader};

    fn sample(seq: u64) -> FrameWriter {
        let t = Trade {
            symbol: Symbol::new("BTCUSDT").unwrap(),
            symbol_id: 0,
            price_scale: 2,
            qty_scale: 3,
            is_buyer_maker: false,
            trade_id: seq as i64,
            price: 100,
            qty: 1,
            time_us: 1,
        };
        let mut w = FrameWriter::with_capacity(1024);
        w.push_trade(header(FrameKind::Trade, 1, seq), &t).unwrap();
        w
    }

    /// The log thread parks while nothing comes; a sample handed over then must wake it (no lost
    /// wake-up), and so must `stop`. Samples go in one at a time with pauses, so that the thread
    /// is parked for most of the hand-overs.
    #[test]
    fn samples_handed_to_an_idle_log_thread_are_all_logged() {
        let dir = std::env::temp_dir().join(format!("mdbus-walthread-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (wal, _) = Wal::open(&dir, WalOptions::default()).unwrap();
        let metrics = Arc::new(BrokerMetrics::default());
        let mut sink = WalSink::start(wal, 4, 1024, RetentionPolicy::default(), false, Arc::clone(&metrics)).unwrap();
        let start = Instant::now();
        for seq in 1..=20u64 {
            sink.submit(&mut sample(seq)).unwrap();
            // The thread logs it (woken by the hand-over, not by its 1 s safety timeout).
            let t0 = Instant::now();
            while metrics.wal.logged_seq.load(Ordering::Acquire) < seq {
                assert!(t0.elapsed() < Duration::from_secs(30), "sample {seq} never logged");
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(sink.stop().unwrap(), 20);
        // A lost wake-up would leave each sample to the 1 s safety timeout: ~20 s in all. Woken
        // properly the whole loop takes ~50 ms; the bound leaves a wide margin for a slow machine.
        assert!(start.elapsed() < Duration::from_secs(10), "hand-overs did not wake the log thread");
        let mut reader = WalReader::open(&dir).unwrap();
        let mut seqs = Vec::new();
        while let Some(r) = reader.next_record().unwrap() {
            seqs.push(r.seq);
        }
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
