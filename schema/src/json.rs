//! JSON lines for frames: the contract of `mdbus tail` and `mdbus replay` (see MISSION.md).
//!
//! Every line has `"seq"` and `"kind"`. A K-line line carries Binance's kline object under `"k"`
//! (`t T s i f L o c h l v n x q V Q B`, decimals as strings); a trade line carries Binance's
//! trade fields `s t p q T m`; `"E"` is the broker's publish time in ms. Written by hand into a
//! reused `String` (no allocation per line once warm); symbols are validated `A-Z0-9`, so no
//! escaping is ever needed.

use std::fmt::Write as _;

use crate::body::{
    ArchivedHeartbeat, ArchivedKline, ArchivedTrade, FeedState, KLINE_FLAG_EMPTY_SKIPPED, KLINE_FLAG_FEED_GAP,
};
use crate::decimal::Fixed;
use crate::frame::{FrameDecodeError, FrameKind, FrameRef};
use crate::interval::Interval;
use crate::symbol::Symbol;

fn push_decimal(out: &mut String, mantissa: i128, scale: u8) {
    out.push('"');
    Fixed::new(mantissa, scale).write_binance(out);
    out.push('"');
}

fn symbol_str(raw: &crate::symbol::ArchivedSymbol) -> Symbol {
    // Validated by FrameRef::{trade,kline} before we get here; an invalid one renders as "?".
    raw.to_symbol().unwrap_or_else(|_| Symbol::new("INVALID").unwrap_or_else(|_| unreachable!()))
}

/// The unit of the times in an event: Binance's default milliseconds, or microseconds (its
/// `timeUnit=MICROSECOND` connection option).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TimeUnit {
    #[default]
    Millisecond,
    Microsecond,
}

impl TimeUnit {
    /// A start-of-interval time (ms) in this unit.
    pub fn from_ms(self, ms: i64) -> i64 {
        match self {
            TimeUnit::Millisecond => ms,
            TimeUnit::Microsecond => ms.saturating_mul(1000),
        }
    }
    /// An end-of-interval time (ms, inclusive: next open − 1 ms) in this unit: next open − 1 unit.
    pub fn end_from_ms(self, ms: i64) -> i64 {
        match self {
            TimeUnit::Millisecond => ms,
            TimeUnit::Microsecond => ms.saturating_mul(1000).saturating_add(999),
        }
    }
    /// A time in µs, in this unit (ms round down).
    pub fn from_us(self, us: i64) -> i64 {
        match self {
            TimeUnit::Millisecond => us.div_euclid(1000),
            TimeUnit::Microsecond => us,
        }
    }
    /// A time in ns, in this unit (rounded down).
    pub fn from_ns(self, ns: i64) -> i64 {
        match self {
            TimeUnit::Millisecond => ns.div_euclid(1_000_000),
            TimeUnit::Microsecond => ns.div_euclid(1000),
        }
    }
}

/// Writes Binance's kline object (`{"t":…,"B":"0"}`) for an archived K-line.
pub fn write_kline_object(out: &mut String, k: &ArchivedKline) {
    write_kline_object_in(out, k, TimeUnit::Millisecond);
}

/// [`write_kline_object`] with times in `unit`.
pub fn write_kline_object_in(out: &mut String, k: &ArchivedKline, unit: TimeUnit) {
    let ps = k.price_scale;
    let qs = k.qty_scale;
    let interval = Interval::from_u8(k.interval).map_or("?", Interval::as_str);
    let sym = symbol_str(&k.symbol);
    let _ = write!(
        out,
        "{{\"t\":{},\"T\":{},\"s\":\"{}\",\"i\":\"{}\",\"f\":{},\"L\":{},\"o\":",
        unit.from_ms(k.open_time.to_native()),
        unit.end_from_ms(k.close_time.to_native()),
        sym.as_str(),
        interval,
        k.first_trade_id.to_native(),
        k.last_trade_id.to_native(),
    );
    push_decimal(out, i128::from(k.open.to_native()), ps);
    out.push_str(",\"c\":");
    push_decimal(out, i128::from(k.close.to_native()), ps);
    out.push_str(",\"h\":");
    push_decimal(out, i128::from(k.high.to_native()), ps);
    out.push_str(",\"l\":");
    push_decimal(out, i128::from(k.low.to_native()), ps);
    out.push_str(",\"v\":");
    push_decimal(out, k.volume.to_native(), qs);
    let _ = write!(out, ",\"n\":{},\"x\":{},\"q\":", k.trade_count.to_native(), k.closed);
    push_decimal(out, k.quote_volume.to_native(), ps + qs);
    out.push_str(",\"V\":");
    push_decimal(out, k.taker_buy_volume.to_native(), qs);
    out.push_str(",\"Q\":");
    push_decimal(out, k.taker_buy_quote_volume.to_native(), ps + qs);
    out.push_str(",\"B\":\"0\"}");
}

/// Writes Binance's trade fields (`"s":…,"t":…,"p":…,"q":…,"T":…,"m":…`) without braces.
pub fn write_trade_fields(out: &mut String, t: &ArchivedTrade) {
    write_trade_fields_in(out, t, TimeUnit::Millisecond);
}

/// [`write_trade_fields`] with the trade time in `unit`.
pub fn write_trade_fields_in(out: &mut String, t: &ArchivedTrade, unit: TimeUnit) {
    let sym = symbol_str(&t.symbol);
    let _ = write!(out, "\"s\":\"{}\",\"t\":{},\"p\":", sym.as_str(), t.trade_id.to_native());
    push_decimal(out, i128::from(t.price.to_native()), t.price_scale);
    out.push_str(",\"q\":");
    push_decimal(out, i128::from(t.qty.to_native()), t.qty_scale);
    let _ = write!(out, ",\"T\":{},\"m\":{}", unit.from_us(t.time_us.to_native()), t.is_buyer_maker);
}

fn write_heartbeat_fields(out: &mut String, h: &ArchivedHeartbeat) {
    let feed = FeedState::from_u8(h.feed_state).map_or("unknown", FeedState::as_str);
    let _ = write!(
        out,
        "\"publisher\":\"{:016x}\",\"feed\":\"{}\",\"interval_ms\":{}",
        h.publisher_id.to_native(),
        feed,
        h.interval_ms.to_native()
    );
}

/// Writes our K-line markers, outside Binance's object, only those that are set: a re-close
/// (`"rev":N`), a feed outage (`"feed_gap":true`), skipped empty K-lines (`"skipped_empty":true`).
/// Each is preceded by a comma with `leading`, followed by one otherwise.
pub fn write_kline_markers(out: &mut String, k: &ArchivedKline, leading: bool) {
    let mut field = |f: std::fmt::Arguments<'_>| {
        if leading {
            out.push(',');
        }
        let _ = out.write_fmt(f);
        if !leading {
            out.push(',');
        }
    };
    let rev = k.revision.to_native();
    if rev > 0 {
        field(format_args!("\"rev\":{rev}"));
    }
    if k.flags & KLINE_FLAG_FEED_GAP != 0 {
        field(format_args!("\"feed_gap\":true"));
    }
    if k.flags & KLINE_FLAG_EMPTY_SKIPPED != 0 {
        field(format_args!("\"skipped_empty\":true"));
    }
}

/// Appends one JSON line (without the newline) for `frame` to `out`. On a decode error nothing
/// is appended.
pub fn write_frame_line(out: &mut String, frame: &FrameRef<'_>) -> Result<(), FrameDecodeError> {
    let h = frame.header;
    let e_ms = h.ts_publish_ns.div_euclid(1_000_000);
    let start = out.len();
    let _ = write!(out, "{{\"seq\":{},\"kind\":\"{}\",\"E\":{},", h.seq, h.kind.as_str(), e_ms);
    let res = match h.kind {
        FrameKind::Kline => frame.kline().map(|k| {
            let _ = write!(out, "\"s\":\"{}\",", symbol_str(&k.symbol).as_str());
            write_kline_markers(out, k, false);
            out.push_str("\"k\":");
            write_kline_object(out, k);
        }),
        FrameKind::Trade => frame.trade().map(|t| write_trade_fields(out, t)),
        FrameKind::Heartbeat => frame.heartbeat().map(|hb| write_heartbeat_fields(out, hb)),
        FrameKind::Snapshot => frame.snapshot_mark().map(|m| {
            let phase = crate::body::SnapshotPhase::from_u8(m.phase).map_or("?", |p| p.as_str());
            let _ = write!(
                out,
                "\"phase\":\"{phase}\",\"snapshot_id\":{},\"covered_seq\":{},\"rows\":{},\"wal_from_seq\":{},\"publisher_id\":\"{:016x}\"",
                m.snapshot_id, m.covered_seq, m.rows, m.wal_from_seq, m.publisher_id
            );
        }),
    };
    match res {
        Ok(()) => {
            out.push('}');
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::body::Kline;
    use crate::frame::{header, FrameRef, FrameWriter};
    use crate::Symbol;

    #[test]
    fn markers_appear_only_when_set_with_either_separator() {
        let mut k = Kline::empty(Interval::M1, 1_700_000_000_000, Symbol::new("BTCUSDT").unwrap(), 0, 2, 5, 100);
        let render = |k: &Kline, leading: bool| {
            let mut w = FrameWriter::with_capacity(512);
            w.push_kline(header(FrameKind::Kline, 1, 1), k).unwrap();
            let f = FrameRef::parse(w.as_bytes()).unwrap();
            let mut out = String::new();
            write_kline_markers(&mut out, f.kline().unwrap(), leading);
            out
        };
        assert_eq!(render(&k, true), "");
        k.revision = 2;
        k.flags = KLINE_FLAG_FEED_GAP | KLINE_FLAG_EMPTY_SKIPPED;
        assert_eq!(render(&k, true), r#","rev":2,"feed_gap":true,"skipped_empty":true"#);
        assert_eq!(render(&k, false), r#""rev":2,"feed_gap":true,"skipped_empty":true,"#);
    }
}
