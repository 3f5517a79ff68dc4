//! Sequence tracking: gaps, duplicates, reordering and lost tails from the stream's seq numbers.
//!
//! Upstream: the seq of every data frame and the `last_seq` of every heartbeat, in arrival order.
//! Downstream: counters and per-frame verdicts for the reader. Memory is bounded: at most
//! [`MAX_HOLES`] missing ranges are remembered to recognise late (reordered) frames.

use std::collections::VecDeque;

use mdbus_schema::Seq;

/// Missing ranges remembered to tell a reordered frame from a duplicate.
pub const MAX_HOLES: usize = 64;

/// The verdict on one data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// The first frame seen; reading starts at this seq.
    First,
    /// Exactly the next one.
    InOrder,
    /// `missing` frames before this one never arrived (so far).
    Gap { missing: u64 },
    /// Already seen.
    Duplicate,
    /// Arrived after later frames, filling (part of) an earlier gap.
    Reordered,
}

/// Counters of a [`SeqTracker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqStats {
    pub frames: u64,
    pub gaps: u64,
    /// Frames counted missing and not (yet) recovered.
    pub missing: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

/// Follows one stream's sequence numbers.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// The next seq expected; `None` before the first frame.
    next: Option<Seq>,
    /// Missing ranges `[from, to)`, oldest first.
    holes: VecDeque<(Seq, Seq)>,
    stats: SeqStats,
}

impl SeqTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts expecting `seq` next (e.g. after a replay up to `seq - 1`).
    pub fn expect(&mut self, seq: Seq) {
        self.next = Some(seq);
    }

    pub fn next_expected(&self) -> Option<Seq> {
        self.next
    }

    pub fn stats(&self) -> SeqStats {
        self.stats
    }

    fn add_hole(&mut self, from: Seq, to: Seq) {
        if self.holes.len() == MAX_HOLES {
            self.holes.pop_front();
        }
        self.holes.push_back((from, to));
    }

    /// Records a data frame.
    pub fn on_data(&mut self, seq: Seq) -> SeqEvent {
        self.stats.frames += 1;
        let Some(next) = self.next else {
            self.next = Some(seq.saturating_add(1));
            return SeqEvent::First;
        };
        if seq == next {
            self.next = Some(seq.saturating_add(1));
            return SeqEvent::InOrder;
        }
        if seq > next {
            let missing = seq - next;
            self.add_hole(next, seq);
            self.stats.gaps += 1;
            self.stats.missing = self.stats.missing.saturating_add(missing);
            self.next = Some(seq.saturating_add(1));
            return SeqEvent::Gap { missing };
        }
        // Older than expected: a late frame filling a hole, or a duplicate.
        if let Some(i) = self.holes.iter().position(|&(a, b)| a <= seq && seq < b) {
            let (a, b) = self.holes[i];
            match (seq == a, seq.saturating_add(1) == b) {
                (true, true) => {
                    self.holes.remove(i);
                }
                (true, false) => self.holes[i].0 = seq.saturating_add(1),
                (false, true) => self.holes[i].1 = seq,
                (false, false) => {
                    self.holes[i].1 = seq;
                    self.holes.insert(i + 1, (seq.saturating_add(1), b));
                    if self.holes.len() > MAX_HOLES {
                        self.holes.pop_front();
                    }
                }
            }
            self.stats.missing -= 1;
            self.stats.reordered += 1;
            return SeqEvent::Reordered;
        }
        self.stats.duplicates += 1;
        SeqEvent::Duplicate
    }

    /// Records a heartbeat's `last_seq`. Returns the number of frames it reveals as lost (the
    /// tail of the stream that never arrived).
    pub fn on_heartbeat(&mut self, last_seq: Seq) -> u64 {
        match self.next {
            Some(next) if last_seq >= next => {
                let end = last_seq.saturating_add(1);
                let missing = end - next;
                self.add_hole(next, end);
                self.stats.gaps += 1;
                self.stats.missing = self.stats.missing.saturating_add(missing);
                self.next = Some(end);
                missing
            }
            Some(_) => 0,
            None => {
                // Joining a running stream: data starts after the heartbeat's seq.
                self.next = Some(last_seq.saturating_add(1));
                0
            }
        }
    }

    /// Forgets everything (the publisher restarted with a new sequence).
    pub fn reset(&mut self) {
        self.next = None;
        self.holes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_frames_are_in_order() {
        let mut t = SeqTracker::new();
        assert_eq!(t.on_data(5), SeqEvent::First);
        assert_eq!(t.on_data(6), SeqEvent::InOrder);
        assert_eq!(t.stats(), SeqStats { frames: 2, ..SeqStats::default() });
    }

    #[test]
    fn a_gap_is_counted_and_a_late_frame_fills_it() {
        let mut t = SeqTracker::new();
        t.on_data(1);
        assert_eq!(t.on_data(5), SeqEvent::Gap { missing: 3 });
        assert_eq!(t.on_data(3), SeqEvent::Reordered);
        assert_eq!(t.on_data(3), SeqEvent::Duplicate);
        assert_eq!(t.on_data(2), SeqEvent::Reordered);
        assert_eq!(t.on_data(4), SeqEvent::Reordered);
        assert_eq!(t.on_data(4), SeqEvent::Duplicate);
        assert_eq!(t.on_data(5), SeqEvent::Duplicate);
        let s = t.stats();
        assert_eq!((s.gaps, s.missing, s.reordered, s.duplicates), (1, 0, 3, 3));
    }

    #[test]
    fn a_heartbeat_ahead_reveals_a_lost_tail() {
        let mut t = SeqTracker::new();
        assert_eq!(t.on_heartbeat(10), 0, "joining mid-stream is not a loss");
        assert_eq!(t.on_data(11), SeqEvent::InOrder);
        assert_eq!(t.on_heartbeat(11), 0);
        assert_eq!(t.on_heartbeat(14), 3);
        assert_eq!(t.on_data(12), SeqEvent::Reordered);
        assert_eq!(t.stats().missing, 2);
    }

    #[test]
    fn extreme_sequence_numbers_from_a_hostile_peer_do_not_panic() {
        let mut t = SeqTracker::new();
        t.on_data(0);
        assert!(matches!(t.on_data(u64::MAX), SeqEvent::Gap { .. }));
        t.on_data(u64::MAX);
        t.on_heartbeat(u64::MAX);
        t.on_data(u64::MAX - 1);
        let mut t = SeqTracker::new();
        t.on_heartbeat(u64::MAX);
        t.on_data(3);
    }

    #[test]
    fn memory_of_holes_is_bounded() {
        let mut t = SeqTracker::new();
        for i in 0..1_000 {
            t.on_data(i * 2);
        }
        assert_eq!(t.holes.len(), MAX_HOLES);
        assert_eq!(t.stats().missing, 999);
    }
}
