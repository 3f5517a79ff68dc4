//! One `klines` row as text and integers: the exact, backend-neutral form of a [`Kline`].
//!
//! Decimals are written with the digits their scale needs (`Fixed::to_plain_string`) and read back
//! with a parser that takes the full `i128` range (`Fixed::parse` stops one short of `i128::MIN`),
//! so every K-line comes back bit for bit. Reads borrow: a [`StoredRow`] points into the driver's
//! buffers (SQLite's column text, PostgreSQL's binary row) and decodes straight into a [`Kline`],
//! with no allocation per row. Upstream: `write_snapshot`'s rows; downstream: the SQLite and
//! PostgreSQL statements.

use mdbus_schema::decimal::MAX_SCALE;
use mdbus_schema::{Fixed, Interval, Kline, Symbol};

use crate::StoreError;

/// Columns of `klines` in the order every statement uses.
pub(crate) const COLUMNS: [&str; 21] = [
    "symbol",
    "\"interval\"",
    "open_time",
    "close_time",
    "price_scale",
    "qty_scale",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "trade_count",
    "first_trade_id",
    "last_trade_id",
    "closed",
    "revision",
    "flags",
    "updated_at_ms",
];

/// Indexes into [`COLUMNS`] of the decimal columns (NUMERIC in PostgreSQL, TEXT in SQLite).
pub(crate) const DECIMALS: std::ops::Range<usize> = 6..14;

/// A K-line ready to bind: text for the symbol, the interval and the decimals.
#[derive(Debug)]
pub(crate) struct Row {
    pub symbol: Symbol,
    pub interval: &'static str,
    pub open_time: i64,
    pub close_time: i64,
    pub price_scale: i64,
    pub qty_scale: i64,
    /// open, high, low, close, volume, quote_volume, taker_buy_volume, taker_buy_quote_volume.
    pub decimals: [String; 8],
    pub trade_count: i64,
    pub first_trade_id: i64,
    pub last_trade_id: i64,
    pub closed: bool,
    pub revision: i64,
    pub flags: i64,
}

impl Row {
    pub fn from_kline(k: &Kline) -> Result<Row, StoreError> {
        let interval = Interval::from_u8(k.interval)
            .ok_or_else(|| StoreError::InvalidKline(format!("{}: interval wire value {}", k.symbol, k.interval)))?;
        if u16::from(k.price_scale) + u16::from(k.qty_scale) > u16::from(MAX_SCALE) {
            return Err(StoreError::InvalidKline(format!(
                "{} {interval} {}: price_scale {} + qty_scale {} above {MAX_SCALE}",
                k.symbol, k.open_time, k.price_scale, k.qty_scale
            )));
        }
        let trade_count = i64::try_from(k.trade_count).map_err(|_| {
            StoreError::InvalidKline(format!(
                "{} {interval} {}: trade_count {} above i64",
                k.symbol, k.open_time, k.trade_count
            ))
        })?;
        let (ps, qs) = (k.price_scale, k.qty_scale);
        let d = |m: i128, s: u8| Fixed::new(m, s).to_plain_string();
        Ok(Row {
            symbol: k.symbol,
            interval: interval.as_str(),
            open_time: k.open_time,
            close_time: k.close_time,
            price_scale: i64::from(ps),
            qty_scale: i64::from(qs),
            decimals: [
                d(i128::from(k.open), ps),
                d(i128::from(k.high), ps),
                d(i128::from(k.low), ps),
                d(i128::from(k.close), ps),
                d(k.volume, qs),
                d(k.quote_volume, ps + qs),
                d(k.taker_buy_volume, qs),
                d(k.taker_buy_quote_volume, ps + qs),
            ],
            trade_count,
            first_trade_id: k.first_trade_id,
            last_trade_id: k.last_trade_id,
            closed: k.closed,
            revision: i64::from(k.revision),
            flags: i64::from(k.flags),
        })
    }
}

/// A stored decimal as a backend hands it out, borrowed from the row it came in.
pub(crate) trait StoredDecimal: std::fmt::Debug {
    /// The mantissa at `scale`; `None` for anything but a decimal that `scale` digits hold exactly
    /// and whose mantissa fits `i128`.
    fn mantissa(&self, scale: u8) -> Option<i128>;
}

/// Decimal text (SQLite's TEXT columns), as [`parse_decimal`] reads it.
pub(crate) struct DecimalText<'a>(pub &'a [u8]);

impl StoredDecimal for DecimalText<'_> {
    fn mantissa(&self, scale: u8) -> Option<i128> {
        parse_decimal(self.0, scale)
    }
}

impl std::fmt::Debug for DecimalText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.0))
    }
}

/// A row as read back, borrowing the backend's buffers (every backend reads into this; nothing is
/// allocated per row unless it is corrupt).
#[derive(Debug)]
pub(crate) struct StoredRow<'a, D> {
    pub symbol: &'a str,
    pub interval: &'a str,
    pub open_time: i64,
    pub close_time: i64,
    pub price_scale: i64,
    pub qty_scale: i64,
    pub decimals: [D; 8],
    pub trade_count: i64,
    pub first_trade_id: i64,
    pub last_trade_id: i64,
    pub closed: bool,
    pub revision: i64,
    pub flags: i64,
}

impl<D: StoredDecimal> StoredRow<'_, D> {
    /// The K-line, with `symbol_id = 0` (ids are a broker's, not the database's).
    pub fn to_kline(&self) -> Result<Kline, StoreError> {
        let corrupt = |what: String| {
            StoreError::Corrupt(format!("row {} {} {}: {what}", self.symbol, self.interval, self.open_time))
        };
        let symbol = Symbol::new(self.symbol).map_err(|e| corrupt(format!("symbol: {e}")))?;
        let interval: Interval = self.interval.parse().map_err(|e| corrupt(format!("{e}")))?;
        let small = |name: &str, v: i64| u8::try_from(v).map_err(|_| corrupt(format!("{name} {v}")));
        let price_scale = small("price_scale", self.price_scale)?;
        let qty_scale = small("qty_scale", self.qty_scale)?;
        if u16::from(price_scale) + u16::from(qty_scale) > u16::from(MAX_SCALE) {
            return Err(corrupt(format!("scales {price_scale} + {qty_scale}")));
        }
        let dec = |i: usize, scale: u8| {
            self.decimals[i].mantissa(scale).ok_or_else(|| {
                corrupt(format!("{} {:?} at scale {scale}", COLUMNS[DECIMALS.start + i], self.decimals[i]))
            })
        };
        let price = |i: usize| {
            dec(i, price_scale).and_then(|m| {
                i64::try_from(m).map_err(|_| corrupt(format!("{} out of range", COLUMNS[DECIMALS.start + i])))
            })
        };
        Ok(Kline {
            symbol,
            symbol_id: 0,
            interval: interval as u8,
            price_scale,
            qty_scale,
            closed: self.closed,
            flags: small("flags", self.flags)?,
            revision: u16::try_from(self.revision).map_err(|_| corrupt(format!("revision {}", self.revision)))?,
            open_time: self.open_time,
            close_time: self.close_time,
            first_trade_id: self.first_trade_id,
            last_trade_id: self.last_trade_id,
            trade_count: u64::try_from(self.trade_count)
                .map_err(|_| corrupt(format!("trade_count {}", self.trade_count)))?,
            open: price(0)?,
            high: price(1)?,
            low: price(2)?,
            close: price(3)?,
            volume: dec(4, qty_scale)?,
            quote_volume: dec(5, price_scale + qty_scale)?,
            taker_buy_volume: dec(6, qty_scale)?,
            taker_buy_quote_volume: dec(7, price_scale + qty_scale)?,
        })
    }
}

/// The mantissa of decimal text at `scale`: `"-1.50"` at 3 is `-1500`. Digits beyond the scale
/// must be zeros (PostgreSQL may pad); the whole `i128` range, `i128::MIN` included, is accepted.
/// Surrounding whitespace is ignored. Reads the bytes in place (no allocation).
pub(crate) fn parse_decimal(s: &[u8], scale: u8) -> Option<i128> {
    let mut s = s.trim_ascii();
    // Whitespace beyond ASCII (rare enough to take the slow path).
    if s.first().is_some_and(|b| !b.is_ascii()) || s.last().is_some_and(|b| !b.is_ascii()) {
        s = std::str::from_utf8(s).ok()?.trim().as_bytes();
    }
    let (neg, body) = match s.split_first()? {
        (b'-', rest) => (true, rest),
        (b'+', rest) => (false, rest),
        _ => (false, s),
    };
    let (int, frac) = match body.iter().position(|&b| b == b'.') {
        Some(dot) => (&body[..dot], &body[dot + 1..]),
        None => (body, &[][..]),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let scale = usize::from(scale);
    let (kept, beyond) = frac.split_at(frac.len().min(scale));
    if beyond.iter().any(|&b| b != b'0') {
        return None;
    }
    if int.len() + scale <= 19 {
        // The common case: the mantissa has at most 19 digits, so it fits a `u64` as it grows.
        let mut v = 0u64;
        for &b in int.iter().chain(kept) {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                return None;
            }
            v = v * 10 + u64::from(d);
        }
        // Lossless: 10^(scale - kept.len()) is one of POW10's first 20 entries and the product
        // has at most 19 digits.
        let v = i128::from(v) * POW10[scale - kept.len()] as i128;
        return Some(if neg { -v } else { v });
    }
    let mag = push_digits(push_digits(0, int)?, kept)?;
    signed(neg, shift(mag, scale - kept.len())?)
}

/// `10^n` for every `n` a `u128` holds.
pub(crate) const POW10: [u128; 39] = {
    let mut t = [1u128; 39];
    let mut i = 1;
    while i < t.len() {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

/// `mag` followed by the decimal digits `s` (19 at a time in a `u64`); `None` for a byte that
/// is not a digit or a value beyond `u128`.
fn push_digits(mut mag: u128, s: &[u8]) -> Option<u128> {
    for chunk in s.chunks(19) {
        let mut v = 0u64;
        for &b in chunk {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                return None;
            }
            v = v * 10 + u64::from(d);
        }
        mag = mag.checked_mul(POW10[chunk.len()])?.checked_add(u128::from(v))?;
    }
    Some(mag)
}

/// `mag × 10^n`, `None` beyond `u128`.
pub(crate) fn shift(mag: u128, n: usize) -> Option<u128> {
    if mag == 0 {
        return Some(0);
    }
    mag.checked_mul(*POW10.get(n)?)
}

/// The magnitude with its sign, `None` beyond `i128` (whose `MIN` has no positive twin).
pub(crate) fn signed(neg: bool, mag: u128) -> Option<i128> {
    if neg {
        0i128.checked_sub_unsigned(mag)
    } else {
        i128::try_from(mag).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decimal_text_round_trips_the_whole_i128_range() {
        for scale in [0u8, 1, 8, 16, 18] {
            for m in [0i128, 1, -1, 12345, -99, i128::from(i64::MAX), i128::from(i64::MIN), i128::MAX, i128::MIN] {
                let text = Fixed::new(m, scale).to_plain_string();
                assert_eq!(parse_decimal(text.as_bytes(), scale), Some(m), "{text} at {scale}");
            }
        }
    }

    #[test]
    fn decimal_text_accepts_padding_and_refuses_lost_digits() {
        assert_eq!(parse_decimal(b"1.50", 1), Some(15));
        assert_eq!(parse_decimal(b"1.5000", 2), Some(150));
        assert_eq!(parse_decimal(b"-0.01", 2), Some(-1));
        assert_eq!(parse_decimal(b".5", 1), Some(5));
        assert_eq!(parse_decimal(b"7", 3), Some(7000));
        assert_eq!(parse_decimal(b"1.05", 1), None);
        assert_eq!(parse_decimal(b"", 1), None);
        assert_eq!(parse_decimal(b"-", 1), None);
        assert_eq!(parse_decimal(b".", 1), None);
        assert_eq!(parse_decimal(b"NaN", 1), None);
        assert_eq!(parse_decimal(b"1e5", 1), None);
        assert_eq!(parse_decimal(b"170141183460469231731687303715884105728", 0), None);
        assert_eq!(parse_decimal(b"-170141183460469231731687303715884105728", 0), Some(i128::MIN));
        assert_eq!(parse_decimal(b"-17014118346046923173168730371588410572.8", 0), None);
        assert_eq!(parse_decimal(b"-17014118346046923173168730371588410572.8", 1), Some(i128::MIN));
        assert_eq!(parse_decimal(b"+5", 2), Some(500));
        assert_eq!(parse_decimal(b" 1.5\n", 1), Some(15));
        assert_eq!(parse_decimal("\u{a0}1.5\u{3000}".as_bytes(), 1), Some(15));
        assert_eq!(parse_decimal(b"\xff1.5", 1), None);
        assert_eq!(parse_decimal(b".000", 0), Some(0));
        assert_eq!(parse_decimal(b"-0", 2), Some(0));
        assert_eq!(parse_decimal(b"0", 255), Some(0));
        assert_eq!(parse_decimal(b"1", 39), None);
        assert_eq!(parse_decimal(b"1..5", 2), None);
        assert_eq!(parse_decimal(b"1.5.", 2), None);
        assert_eq!(parse_decimal(b"--1", 0), None);
        assert_eq!(parse_decimal(b"-+1", 0), None);
        assert_eq!(parse_decimal(b"1 5", 0), None);
    }
}
