//! Frames → Binance event JSON, rendered once per frame and shared by every client that wants it.
//!
//! A kline event is `{"e":"kline","E":…,"s":…,"k":{…}}` and a trade event
//! `{"e":"trade","E":…,"s":…,"t":…,"p":…,"q":…,"T":…,"m":…,"M":true}`, field for field as Binance
//! sends them; `E` is the broker's publish time. Beyond Binance, every message carries the bus
//! `"seq"`: inside the event on raw connections, beside `stream`/`data` on combined ones. K-line
//! markers (`rev`, `feed_gap`, `skipped_empty`) are extra keys of the event, present only when set.

use std::fmt::Write as _;

use mdbus_schema::json::{write_kline_markers, write_kline_object_in, write_trade_fields_in, TimeUnit};
use mdbus_schema::{FrameDecodeError, FrameKind, FrameRef};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::{DataKey, Topic};

/// The stream of a trade or K-line frame (from the body's symbol and interval, unvalidated
/// beyond that). `None` for heartbeats and undecodable frames.
pub fn frame_key(frame: &FrameRef<'_>) -> Option<DataKey> {
    let raw = frame.peek_symbol()?;
    let raw = <&[u8; mdbus_schema::symbol::SYMBOL_MAX_LEN]>::try_from(raw).ok()?;
    let symbol = mdbus_schema::Symbol::from_wire(raw).ok()?;
    match frame.kind() {
        FrameKind::Trade => Some(DataKey { symbol, topic: Topic::Trade }),
        FrameKind::Kline => {
            let iv = frame.peek_interval().and_then(mdbus_schema::Interval::from_u8)?;
            Some(DataKey { symbol, topic: Topic::Kline(iv) })
        }
        FrameKind::Heartbeat | FrameKind::Snapshot => None,
    }
}

/// One of the four shapes a message can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub combined: bool,
    pub unit: TimeUnit,
}

impl Shape {
    fn index(self) -> usize {
        usize::from(self.combined) * 2 + usize::from(self.unit == TimeUnit::Microsecond)
    }
}

/// Writes the event object of a trade or K-line frame without its closing brace (so that `seq`
/// can follow). Heartbeats have no event.
pub fn write_event_open(out: &mut String, frame: &FrameRef<'_>, unit: TimeUnit) -> Result<(), FrameDecodeError> {
    let e = unit.from_ns(frame.header.ts_publish_ns);
    match frame.kind() {
        FrameKind::Kline => {
            let k = frame.kline()?;
            let sym = k
                .symbol
                .to_symbol()
                .map_err(|_| FrameDecodeError::InvalidField { seq: frame.seq(), field: "symbol" })?;
            let _ = write!(out, "{{\"e\":\"kline\",\"E\":{e},\"s\":\"{}\",\"k\":", sym.as_str());
            write_kline_object_in(out, k, unit);
            write_kline_markers(out, k, true);
        }
        FrameKind::Trade => {
            let t = frame.trade()?;
            let _ = write!(out, "{{\"e\":\"trade\",\"E\":{e},");
            write_trade_fields_in(out, t, unit);
            out.push_str(",\"M\":true");
        }
        found @ (FrameKind::Heartbeat | FrameKind::Snapshot) => {
            return Err(FrameDecodeError::WrongKind { seq: frame.seq(), expected: FrameKind::Kline, found })
        }
    }
    Ok(())
}

/// Renders one frame's messages lazily, at most once per [`Shape`].
#[derive(Debug, Default)]
pub struct FrameMessages {
    cache: [Option<Utf8Bytes>; 4],
    scratch: String,
    stream: String,
    failed: bool,
}

impl FrameMessages {
    /// Forgets the previous frame.
    pub fn reset(&mut self) {
        self.cache = Default::default();
        self.failed = false;
        self.stream.clear();
    }

    /// The message for `frame` (of stream `key`) in `shape`; `None` if the frame does not decode
    /// (counted by the caller).
    pub fn get(&mut self, frame: &FrameRef<'_>, key: &DataKey, shape: Shape) -> Option<Utf8Bytes> {
        if self.failed {
            return None;
        }
        let i = shape.index();
        if let Some(m) = &self.cache[i] {
            return Some(m.clone());
        }
        self.scratch.clear();
        if write_event_open(&mut self.scratch, frame, shape.unit).is_err() {
            self.failed = true;
            return None;
        }
        let mut out = String::with_capacity(self.scratch.len() + 64);
        if shape.combined {
            if self.stream.is_empty() {
                let _ = write!(self.stream, "{key}");
            }
            let _ =
                write!(out, "{{\"stream\":\"{}\",\"data\":{}}},\"seq\":{}}}", self.stream, self.scratch, frame.seq());
        } else {
            let _ = write!(out, "{},\"seq\":{}}}", self.scratch, frame.seq());
        }
        let m = Utf8Bytes::from(out);
        self.cache[i] = Some(m.clone());
        Some(m)
    }
}

/// One message for `frame` in `shape`, not cached (WAL catch-up renders per client).
pub fn render(frame: &FrameRef<'_>, key: &DataKey, shape: Shape) -> Option<Utf8Bytes> {
    FrameMessages::default().get(frame, key, shape)
}
