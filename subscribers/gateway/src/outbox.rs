//! One client's bounded outbound queue, between the shared-memory reader (which never waits) and
//! the client's socket task (which may wait on a slow socket as long as it likes).
//!
//! Policy when a client falls behind (`capacity` messages queued):
//! - [`SlowPolicy::Conflate`] (default): a K-line *update* replaces the queued, unsent update of the
//!   same K-line (the client gets the latest state sooner); closed K-lines and trades are never
//!   dropped. Past `capacity + slack` (updates of K-lines with no queued update, then closes and
//!   trades), the client is disconnected: nothing is ever dropped silently.
//! - [`SlowPolicy::Disconnect`]: the client is disconnected at `capacity`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::DataKey;

/// What to do with a client that does not keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowPolicy {
    #[default]
    Conflate,
    Disconnect,
}

impl std::str::FromStr for SlowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "conflate" => Ok(SlowPolicy::Conflate),
            "disconnect" => Ok(SlowPolicy::Disconnect),
            other => Err(format!("unknown slow-client policy {other:?} (expected conflate or disconnect)")),
        }
    }
}

/// One queued message.
#[derive(Debug, Clone)]
pub struct Entry {
    pub msg: Utf8Bytes,
    /// Bus seq of the frame (0 for replies and health events).
    pub seq: u64,
    /// The frame's exchange event time (ns; 0 for replies and health events).
    pub ts_event_ns: i64,
    /// Superseded by a newer update of the same K-line queued after it: not sent.
    pub dead: bool,
    /// The stream, and whether this is an open K-line's update (set by [`Outbox::push`]).
    key: Option<(DataKey, bool)>,
}

impl Entry {
    pub fn new(msg: Utf8Bytes, seq: u64) -> Entry {
        Entry { msg, seq, ts_event_ns: 0, dead: false, key: None }
    }

    pub fn event_time(self, ts_event_ns: i64) -> Entry {
        Entry { ts_event_ns, ..self }
    }
}

/// What became of a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; `first`: the queue was empty, so the socket task needs a [`Outbox::wake`] (the
    /// caller wakes it once it has pushed everything it has, so that one write carries them all).
    Queued { first: bool },
    /// Replaced an older queued update of the same K-line.
    Conflated,
    /// The client was disconnected for falling behind (this push made it so).
    Disconnected,
    /// The client was already closed; nothing queued.
    Closed,
}

#[derive(Debug, Default)]
struct Inner {
    q: VecDeque<Entry>,
    /// Entries taken by the socket task so far: absolute index = `taken + position`.
    taken: u64,
    /// Absolute index of the newest queued K-line update per stream.
    pending: HashMap<DataKey, u64>,
    /// Entries marked dead (superseded) still in `q`.
    dead: usize,
    closed: Option<&'static str>,
    /// While set (WAL catch-up), the socket task does not take live entries.
    held: bool,
}

/// Counters of one client.
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub queued: AtomicU64,
    pub conflated: AtomicU64,
    pub high_water: AtomicU64,
}

/// A client's outbound queue.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Data is there (or the outbox closed): wakes the socket task.
    ready: Notify,
    /// The outbox closed: interrupts a socket task stuck writing to a slow client.
    gone: Notify,
    capacity: usize,
    slack: usize,
    policy: SlowPolicy,
    pub stats: OutboxStats,
}

impl Outbox {
    /// `capacity`: messages queued before the policy applies; `slack`: how far past it conflation
    /// may go (one entry per subscribed stream suffices).
    pub fn new(capacity: usize, slack: usize, policy: SlowPolicy) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            gone: Notify::new(),
            capacity: capacity.max(1),
            slack,
            policy,
            stats: OutboxStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent (plain pushes and
        // swaps), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `msg` for stream `key`; `update` marks an open K-line's update (conflatable).
    ///
    /// Conflation marks the older update dead and queues the newer one at the tail, so that a
    /// client always sees seqs in increasing order (and can resume from the last one it saw).
    pub fn push(&self, key: &DataKey, update: bool, mut entry: Entry) -> Pushed {
        let mut g = self.lock();
        if g.closed.is_some() {
            return Pushed::Closed;
        }
        entry.key = Some((*key, update));
        let len = g.q.len() - g.dead;
        if len >= self.capacity {
            if update && self.policy == SlowPolicy::Conflate {
                if let Some(&abs) = g.pending.get(key) {
                    if abs >= g.taken {
                        let at = (abs - g.taken) as usize;
                        if let Some(slot) = g.q.get_mut(at) {
                            slot.dead = true;
                            slot.msg = Utf8Bytes::from_static("");
                            g.dead += 1;
                            let abs = g.taken + g.q.len() as u64;
                            g.q.push_back(entry);
                            g.pending.insert(*key, abs);
                            if g.dead > self.capacity {
                                compact(&mut g);
                            }
                            drop(g);
                            self.stats.conflated.fetch_add(1, Ordering::Relaxed);
                            return Pushed::Conflated;
                        }
                    }
                }
            }
            if self.policy == SlowPolicy::Disconnect || len >= self.capacity + self.slack {
                g.closed = Some("slow consumer: too many messages queued");
                drop(g);
                self.ready.notify_one();
                self.gone.notify_one();
                return Pushed::Disconnected;
            }
        }
        if update {
            let abs = g.taken + g.q.len() as u64;
            g.pending.insert(*key, abs);
        } else {
            // A close ends the open K-line: a later update belongs to the next one.
            g.pending.remove(key);
        }
        g.q.push_back(entry);
        let first = len == 0 && !g.held;
        // Half full within one hub batch: wake the socket task now rather than after the batch.
        let now = len + 1 == self.capacity / 2 && !g.held;
        drop(g);
        if now {
            self.ready.notify_one();
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.stats.high_water.fetch_max(len as u64 + 1, Ordering::Relaxed);
        Pushed::Queued { first }
    }

    /// Wakes the socket task to take what is queued.
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Queues a message that is never conflated nor refused for space (replies, health events,
    /// at most a few per request).
    pub fn push_control(&self, msg: Utf8Bytes) {
        let mut g = self.lock();
        if g.closed.is_some() {
            return;
        }
        if g.q.len() - g.dead >= self.capacity + self.slack {
            // Not even replies and health events are taken: the client is stuck.
            g.closed = Some("slow consumer: too many messages queued");
            drop(g);
            self.ready.notify_one();
            self.gone.notify_one();
            return;
        }
        let wake = g.q.is_empty() && !g.held;
        g.q.push_back(Entry::new(msg, 0));
        drop(g);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Moves every queued entry into `into` (which must be empty). Returns the close reason once
    /// the outbox is closed.
    pub fn take(&self, into: &mut VecDeque<Entry>) -> Result<(), &'static str> {
        let mut g = self.lock();
        if let Some(reason) = g.closed {
            return Err(reason);
        }
        if g.held {
            return Ok(());
        }
        std::mem::swap(&mut g.q, into);
        g.taken += into.len() as u64;
        g.dead = 0;
        Ok(())
    }

    /// Waits until there may be something to take.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Holds live entries back (WAL catch-up in progress).
    pub fn hold(&self) {
        self.lock().held = true;
    }

    /// Lets live entries flow again.
    pub fn release(&self) {
        self.lock().held = false;
        self.ready.notify_one();
    }

    /// Closes the outbox: later pushes are refused.
    pub fn close(&self, reason: &'static str) {
        let mut g = self.lock();
        if g.closed.is_none() {
            g.closed = Some(reason);
        }
        drop(g);
        self.ready.notify_one();
        self.gone.notify_one();
    }

    /// Waits until the outbox is closed.
    pub async fn gone(&self) {
        self.gone.notified().await;
    }

    /// The seq of the first queued data entry.
    pub fn first_queued_seq(&self) -> Option<u64> {
        self.lock().q.iter().find(|e| e.seq != 0).map(|e| e.seq)
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    pub fn len(&self) -> usize {
        self.lock().q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops dead entries and re-indexes the queued updates.
fn compact(g: &mut Inner) {
    g.q.retain(|e| !e.dead);
    g.dead = 0;
    g.pending.clear();
    let taken = g.taken;
    let Inner { q, pending, .. } = g;
    for (i, e) in q.iter().enumerate() {
        match e.key {
            Some((k, true)) => {
                pending.insert(k, taken + i as u64);
            }
            Some((k, false)) => {
                pending.remove(&k);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use mdbus_schema::{Interval, Symbol};

    use super::*;
    use crate::protocol::Topic;

    fn key(i: Interval) -> DataKey {
        DataKey { symbol: Symbol::new("BTCUSDT").unwrap(), topic: Topic::Kline(i) }
    }
    fn e(seq: u64) -> Entry {
        Entry::new(Utf8Bytes::from(seq.to_string()), seq)
    }
    /// What the socket task would send.
    fn seqs(o: &Outbox) -> Vec<u64> {
        let mut v = VecDeque::new();
        o.take(&mut v).unwrap();
        v.iter().filter(|e| !e.dead).map(|e| e.seq).collect()
    }

    #[test]
    fn a_client_keeping_up_gets_every_message() {
        let o = Outbox::new(4, 8, SlowPolicy::Conflate);
        for s in 1..=4 {
            assert_eq!(o.push(&key(Interval::M1), true, e(s)), Pushed::Queued { first: s == 1 });
        }
        assert_eq!(seqs(&o), vec![1, 2, 3, 4]);
        assert_eq!(o.push(&key(Interval::M1), true, e(5)), Pushed::Queued { first: true });
        assert_eq!(seqs(&o), vec![5]);
    }

    #[test]
    fn behind_updates_conflate_closes_never_drop() {
        let o = Outbox::new(2, 2, SlowPolicy::Conflate);
        let m1 = key(Interval::M1);
        let m5 = key(Interval::M5);
        o.push(&m1, true, e(1));
        o.push(&m5, true, e(2));
        // Full: the newer update of each K-line supersedes its queued one.
        assert_eq!(o.push(&m1, true, e(3)), Pushed::Conflated);
        assert_eq!(o.push(&m5, true, e(4)), Pushed::Conflated);
        // A close is queued past capacity (slack), and ends m1's open K-line.
        assert_eq!(o.push(&m1, false, e(5)), Pushed::Queued { first: false });
        // m1's next update has nothing to replace: queued in the slack.
        assert_eq!(o.push(&m1, true, e(6)), Pushed::Queued { first: false });
        assert_eq!(o.push(&m1, true, e(7)), Pushed::Conflated);
        // Out of slack: a close cannot be dropped, so the client goes.
        assert_eq!(o.push(&m5, false, e(8)), Pushed::Disconnected);
        assert!(o.is_closed());
        assert_eq!(o.stats.conflated.load(Ordering::Relaxed), 3);
        let mut v = VecDeque::new();
        assert!(o.take(&mut v).is_err());
    }

    #[test]
    fn conflation_keeps_seqs_in_order_and_memory_bounded() {
        let o = Outbox::new(2, 2, SlowPolicy::Conflate);
        let m1 = key(Interval::M1);
        let trades = DataKey { symbol: Symbol::new("BTCUSDT").unwrap(), topic: Topic::Trade };
        o.push(&m1, true, e(1));
        o.push(&trades, false, e(2));
        assert_eq!(o.push(&m1, true, e(3)), Pushed::Conflated);
        // Many more updates: the queue never grows past capacity + dead ≤ 2 × capacity.
        for s in 4..1000 {
            assert_eq!(o.push(&m1, true, e(s)), Pushed::Conflated);
            assert!(o.len() <= 2 + 2 + 2, "{}", o.len());
        }
        assert_eq!(seqs(&o), vec![2, 999], "the trade, then the latest update, in seq order");
    }

    #[test]
    fn conflation_never_touches_taken_entries() {
        let o = Outbox::new(1, 4, SlowPolicy::Conflate);
        let m1 = key(Interval::M1);
        o.push(&m1, true, e(1));
        assert_eq!(seqs(&o), vec![1]);
        o.push(&m1, true, e(2));
        assert_eq!(o.push(&m1, true, e(3)), Pushed::Conflated);
        assert_eq!(seqs(&o), vec![3]);
    }

    #[test]
    fn disconnect_policy_disconnects_at_capacity() {
        let o = Outbox::new(2, 100, SlowPolicy::Disconnect);
        let m1 = key(Interval::M1);
        o.push(&m1, true, e(1));
        o.push(&m1, true, e(2));
        assert_eq!(o.push(&m1, true, e(3)), Pushed::Disconnected);
        assert_eq!(o.push(&m1, true, e(4)), Pushed::Closed);
    }

    #[test]
    fn held_entries_wait_for_release() {
        let o = Outbox::new(8, 0, SlowPolicy::Conflate);
        o.hold();
        o.push(&key(Interval::M1), true, e(1));
        assert_eq!(seqs(&o), Vec::<u64>::new());
        o.release();
        assert_eq!(seqs(&o), vec![1]);
    }
}
