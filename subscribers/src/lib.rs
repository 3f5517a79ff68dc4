//! The client library: read a stream of the bus from a co-located process, zero-copy.
//!
//! Upstream: a stream in shared memory (`mdbus-bus`), written by the broker. Downstream: the
//! application's callback, which receives each frame as a [`FrameRef`] borrowing the
//! shared-memory sample — nothing is copied or deserialized; `frame.kline()` validates the rkyv
//! archive in place.
//!
//! ```no_run
//! use mdbus_subscribers::{Reader, ReaderOptions, WaitMode};
//! let mut reader = Reader::open("default", "realtime", ReaderOptions::default().symbol("BTCUSDT")?)?;
//! loop {
//!     reader.next_batch(WaitMode::Block(std::time::Duration::from_millis(100)), |frame| {
//!         if let Ok(k) = frame.kline() { println!("close {}", k.close.to_native()); }
//!     })?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The reader follows the stream's sequence numbers ([`SeqTracker`]): gaps (iceoryx2 drops the
//! oldest sample of a full queue silently), duplicates and reordering are counted, a heartbeat
//! whose seq is ahead reveals a lost tail, and heartbeats drive [`Health`].
#![forbid(unsafe_code)]

pub mod health;
pub mod reader;
pub mod seq;

pub use health::{Health, Liveness};
pub use reader::{Filter, Reader, ReaderOpenError, ReaderOptions, ReaderStats, WaitMode};
pub use seq::{SeqEvent, SeqTracker};

pub use mdbus_schema::{FrameKind, FrameRef, Interval, Symbol};
