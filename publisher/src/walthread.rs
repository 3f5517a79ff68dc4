//! The WAL writer thread: every published sample's data frames go to the write-ahead log, off the
//! publish thread.
//!
//! Upstream: the publish thread hands over each sent sample through [`WalSink::submit`]: a copy
//! into a buffer from a fixed pool, passed over an SPSC queue (empty buffers come back on a second
//! one, so nothing is allocated once warm). When every buffer is in flight the publish thread
//! waits: the log never drops a frame. Downstream: `mdbus_wal::Wal` — one record per data frame
//! (heartbeats carry no seq of their own and are not logged), one group commit per sample, then
//! retention.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mdbus_schema::{FrameIter, FrameKind};
use mdbus_wal::{RetentionPolicy, Wal, WalAppendError};
use rtrb::{Consumer, Producer, RingBuffer};

use crate::metrics::BrokerMetrics;

/// The publish thread's end of the WAL thread.
pub struct WalSink {
    full: Producer<Vec<u8>>,
    empty: Consumer<Vec<u8>>,
    stop: Arc<AtomicBool>,
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

/// At most this many samples per commit (a commit also hands their buffers back).
const COMMIT_EVERY: usize = 32;

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
        let (full, mut from_publisher) = RingBuffer::<Vec<u8>>::new(buffers);
        let (mut to_publisher, empty) = RingBuffer::<Vec<u8>>::new(buffers);
        for _ in 0..buffers {
            // Invariant: the queue has room for exactly `buffers` entries.
            let _ = to_publisher.push(Vec::with_capacity(buffer_bytes));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("mdbus-wal".into()).spawn(move || {
            let mut appended = 0u64;
            let mut last_retention = Instant::now();
            // Buffers appended since the last commit: every sample waiting is appended, then one
            // commit (one write and at most one sync) covers them all.
            let mut done: Vec<Vec<u8>> = Vec::with_capacity(buffers);
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
                    let syncs = wal.syncs();
                    let t0 = Instant::now();
                    wal.commit()?;
                    if wal.syncs() != syncs {
                        let now = crate::broker::now_ns();
                        metrics.wal_fsync_latency.record(t0.elapsed().as_micros() as u64, now);
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
                } else {
                    std::thread::sleep(Duration::from_micros(200));
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
        Ok(WalSink { full, empty, stop, thread: Some(thread) })
    }

    /// Hands a sent sample to the WAL thread; waits for a free buffer if all are in flight. Fails
    /// if the WAL thread has stopped (its error is returned).
    pub fn submit(&mut self, sample: &[u8]) -> Result<(), WalSinkError> {
        let mut buf = loop {
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
        buf.extend_from_slice(sample);
        // Invariant: buffers circulate, so the full queue always has room for one we popped.
        let _ = self.full.push(buf);
        Ok(())
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
        self.stop.store(true, Ordering::Release);
        self.join()
    }
}

impl Drop for WalSink {
    fn drop(&mut self) {
        // Dropped on an error path: let the thread finish what it has and exit.
        self.stop.store(true, Ordering::Release);
    }
}
