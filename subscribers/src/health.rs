//! Publisher liveness as one subscriber sees it: Healthy / Degraded / Failed.
//!
//! Upstream: the arrival time of every frame and the `interval_ms` / feed state of heartbeats.
//! Downstream: [`Liveness::health`], polled by the application (and, later, metrics).
//! Silence longer than 3 heartbeat intervals is Degraded, longer than 10 is Failed. A live
//! publisher whose feed is down is Degraded: silence then is not a quiet market.

use std::time::{Duration, Instant};

use mdbus_schema::FeedState;

/// The publisher's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Nothing received yet.
    Unknown,
    Healthy,
    Degraded,
    Failed,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Failed => "failed",
        }
    }
}

/// Tracks the last sign of life of a publisher.
#[derive(Debug, Clone)]
pub struct Liveness {
    last_seen: Option<Instant>,
    interval: Duration,
    feed: FeedState,
    publisher_id: Option<u64>,
    restarts: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            last_seen: None,
            interval: Duration::from_millis(100),
            feed: FeedState::Unknown,
            publisher_id: None,
            restarts: 0,
        }
    }
}

impl Liveness {
    /// Any frame is a sign of life.
    pub fn on_frame(&mut self, now: Instant) {
        self.last_seen = Some(now);
    }

    /// A heartbeat also tells the promised interval, the feed state and the publisher's identity.
    /// Returns true when the publisher id changed (the broker restarted).
    pub fn on_heartbeat(&mut self, now: Instant, publisher_id: u64, interval_ms: u32, feed: FeedState) -> bool {
        self.last_seen = Some(now);
        self.interval = Duration::from_millis(u64::from(interval_ms.max(1)));
        self.feed = feed;
        let restarted = self.publisher_id.is_some_and(|p| p != publisher_id);
        if restarted {
            self.restarts += 1;
        }
        self.publisher_id = Some(publisher_id);
        restarted
    }

    pub fn health(&self, now: Instant) -> Health {
        let Some(seen) = self.last_seen else {
            return Health::Unknown;
        };
        let silent = now.saturating_duration_since(seen);
        if silent > self.interval * 10 {
            Health::Failed
        } else if silent > self.interval * 3 || self.feed == FeedState::Down {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    /// Heartbeat intervals of silence now (0 while frames arrive on time).
    pub fn heartbeats_missed(&self, now: Instant) -> u64 {
        let Some(seen) = self.last_seen else { return 0 };
        let silent = now.saturating_duration_since(seen);
        (silent.as_nanos() / self.interval.as_nanos().max(1)) as u64
    }

    pub fn feed_state(&self) -> FeedState {
        self.feed
    }
    pub fn publisher_id(&self) -> Option<u64> {
        self.publisher_id
    }
    pub fn restarts(&self) -> u64 {
        self.restarts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_degrades_then_fails_with_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        assert_eq!(l.health(t0), Health::Unknown);
        l.on_heartbeat(t0, 1, 50, FeedState::Live);
        assert_eq!(l.health(t0 + Duration::from_millis(100)), Health::Healthy);
        assert_eq!(l.health(t0 + Duration::from_millis(200)), Health::Degraded);
        assert_eq!(l.health(t0 + Duration::from_millis(600)), Health::Failed);
        l.on_frame(t0 + Duration::from_millis(600));
        assert_eq!(l.health(t0 + Duration::from_millis(600)), Health::Healthy);
    }

    #[test]
    fn a_down_feed_is_degraded_and_a_new_publisher_id_is_a_restart() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        assert!(!l.on_heartbeat(t0, 1, 50, FeedState::Down));
        assert_eq!(l.health(t0), Health::Degraded);
        assert!(l.on_heartbeat(t0, 2, 50, FeedState::Live));
        assert_eq!(l.restarts(), 1);
        assert_eq!(l.health(t0), Health::Healthy);
    }
}
