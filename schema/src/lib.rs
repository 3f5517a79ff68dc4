//! Wire types of the bus: everything that crosses a process boundary.
//!
//! Upstream: nothing (this crate sits at the bottom; no I/O, no threads, no clock).
//! Downstream: the broker (`mdbus-publisher`) encodes frames with it, every reader
//! (`mdbus-subscribers`, the WAL, the tools) decodes them with it.
//!
//! - [`decimal`]: exact fixed-point prices and quantities, Binance decimal strings.
//! - [`interval`]: the 16 Binance K-line intervals and their bucket arithmetic (UTC calendar).
//! - [`symbol`]: the inline, fixed-size symbol name.
//! - [`body`]: the rkyv-archived bodies `Trade`, `Kline`, `Heartbeat`.
//! - [`frame`]: the fixed frame header, frame encoding and validated decoding.
//! - [`json`]: the JSON-line rendering used by `mdbus tail` / `mdbus replay`.
//! - [`service`]: versioned iceoryx2 service names.
#![forbid(unsafe_code)]

pub mod body;
pub mod decimal;
pub mod frame;
pub mod interval;
pub mod json;
pub mod service;
pub mod symbol;

pub use body::{
    ArchivedHeartbeat, ArchivedKline, ArchivedSnapshotMark, ArchivedTrade, FeedState, Heartbeat, Kline, SnapshotMark,
    SnapshotPhase, Trade,
};
pub use decimal::{DecimalParseError, Fixed};
pub use frame::{
    FrameDecodeError, FrameEncodeError, FrameHeader, FrameIter, FrameKind, FrameRef, FrameWriter, FRAME_ALIGN,
    FRAME_HEADER_LEN, FRAME_MAGIC, SCHEMA_VERSION,
};
pub use interval::{Interval, IntervalParseError};
pub use symbol::{Symbol, SymbolError};

/// A stream sequence number: +1 per data frame, starting at 1, never reused.
pub type Seq = u64;
