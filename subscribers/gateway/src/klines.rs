//! `GET /api/v3/klines` from the K-line database (`--db`), in Binance's form.
//!
//! Upstream: the request's query string and a [`Store`] (`mdbus-store`; the broker's batch writer
//! fills it). Downstream: the HTTP response, an array of
//! `[openTime, "open", "high", "low", "close", "volume", closeTime, "quoteVolume", trades,
//! "takerBuyBaseVolume", "takerBuyQuoteVolume", "0"]`, decimals rendered as the stream's kline
//! events render them (`Fixed::write_binance`). Queries run on tokio's blocking pool, a few at a
//! time, on connections kept between requests (a connection that lost its server is dropped and
//! the query retried once on a new one).
//!
//! A symbol with no rows in the database that the bus has not carried either is answered with
//! Binance's `-1121 Invalid symbol.`; one the bus carries (or with rows under another interval)
//! gets `[]`.

use std::fmt::Write as _;
use std::sync::Mutex;

use mdbus_schema::{Fixed, Interval, Kline, Symbol};
use mdbus_store::{DbUrl, Store, StoreError};

/// Binance's default and largest `limit`.
pub const DEFAULT_LIMIT: usize = 500;
pub const MAX_LIMIT: usize = 1000;
/// Queries running at once (and connections kept).
const MAX_CONCURRENT: usize = 4;

/// A refused request: HTTP status, Binance code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KlinesError {
    pub status: u16,
    pub code: i32,
    pub msg: String,
}

impl KlinesError {
    fn bad(code: i32, msg: impl Into<String>) -> KlinesError {
        KlinesError { status: 400, code, msg: msg.into() }
    }
}

/// What a klines request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KlinesQuery {
    pub symbol: Symbol,
    pub interval: Interval,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub limit: usize,
}

/// Parses the query string's parameters like Binance does (other parameters, `timeZone` and the
/// gateway's `token` among them, are ignored).
pub fn parse_query(params: &[(String, String)]) -> Result<KlinesQuery, KlinesError> {
    const KNOWN: [&str; 6] = ["symbol", "interval", "startTime", "endTime", "limit", "timeZone"];
    let mut values: [Option<&str>; 6] = [None; 6];
    for (k, v) in params {
        if let Some(i) = KNOWN.iter().position(|n| n == k) {
            if values[i].is_some() {
                return Err(KlinesError::bad(-1101, "Duplicate values for a parameter detected."));
            }
            values[i] = Some(v.as_str());
        }
    }
    let [symbol, interval, start, end, limit, _time_zone] = values;
    let mandatory = |name: &str, v: Option<&str>| match v.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => Ok(v.to_owned()),
        None => Err(KlinesError::bad(
            -1102,
            format!("Mandatory parameter '{name}' was not sent, was empty/null, or malformed."),
        )),
    };
    let symbol = mandatory("symbol", symbol)?;
    let interval = mandatory("interval", interval)?;
    let symbol = Symbol::new(&symbol).map_err(|_| KlinesError::bad(-1121, "Invalid symbol."))?;
    let interval: Interval = interval.parse().map_err(|_| KlinesError::bad(-1120, "Invalid interval."))?;
    let number = |name: &str, v: Option<&str>| -> Result<Option<i64>, KlinesError> {
        let Some(v) = v else { return Ok(None) };
        let ok = !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit());
        match v.parse::<i64>() {
            Ok(n) if ok => Ok(Some(n)),
            _ => Err(KlinesError::bad(
                -1100,
                format!("Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'."),
            )),
        }
    };
    let start_ms = number("startTime", start)?;
    let end_ms = number("endTime", end)?;
    let limit = match number("limit", limit)? {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT as i64).contains(&n) => n as usize,
        Some(_) => {
            return Err(KlinesError::bad(
                -1130,
                format!("Data sent for parameter 'limit' is not valid: expected 1 to {MAX_LIMIT}."),
            ))
        }
    };
    if let (Some(s), Some(e)) = (start_ms, end_ms) {
        if s > e {
            return Err(KlinesError::bad(-1023, "Start time is greater than end time."));
        }
    }
    Ok(KlinesQuery { symbol, interval, start_ms, end_ms, limit })
}

/// Binance's klines array for `rows`.
pub fn render(rows: &[Kline]) -> String {
    let mut out = String::with_capacity(16 + rows.len() * 200);
    out.push('[');
    for (i, k) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let (ps, qs) = (k.price_scale, k.qty_scale);
        let _ = write!(out, "[{},", k.open_time);
        for p in [k.open, k.high, k.low, k.close] {
            decimal(&mut out, i128::from(p), ps);
        }
        decimal(&mut out, k.volume, qs);
        let _ = write!(out, "{},", k.close_time);
        decimal(&mut out, k.quote_volume, ps + qs);
        let _ = write!(out, "{},", k.trade_count);
        decimal(&mut out, k.taker_buy_volume, qs);
        decimal(&mut out, k.taker_buy_quote_volume, ps + qs);
        out.push_str("\"0\"]");
    }
    out.push(']');
    out
}

/// `"<decimal>",`
fn decimal(out: &mut String, mantissa: i128, scale: u8) {
    out.push('"');
    Fixed::new(mantissa, scale).write_binance(out);
    out.push_str("\",");
}

/// The database behind the endpoint: connections kept between requests, a few queries at once.
#[derive(Debug)]
pub struct KlinesDb {
    url: DbUrl,
    idle: Mutex<Vec<Store>>,
    permits: tokio::sync::Semaphore,
}

impl KlinesDb {
    pub fn new(url: DbUrl) -> KlinesDb {
        KlinesDb { url, idle: Mutex::new(Vec::new()), permits: tokio::sync::Semaphore::new(MAX_CONCURRENT) }
    }

    pub fn url(&self) -> &DbUrl {
        &self.url
    }

    /// Runs `q` on the blocking pool; `known` says whether the bus has carried the symbol.
    pub async fn query(self: &std::sync::Arc<Self>, q: KlinesQuery, known: bool) -> Result<Vec<Kline>, KlinesError> {
        let _permit = self.permits.acquire().await.map_err(|_| internal("the gateway is shutting down".into()))?;
        let db = std::sync::Arc::clone(self);
        tokio::task::spawn_blocking(move || db.query_blocking(&q, known))
            .await
            .map_err(|e| internal(format!("database query failed: {e}")))?
    }

    fn query_blocking(&self, q: &KlinesQuery, known: bool) -> Result<Vec<Kline>, KlinesError> {
        let sym = q.symbol.as_str();
        let rows = self.with_store(|s| {
            let rows = s.klines(sym, q.interval, q.start_ms, q.end_ms, q.limit)?;
            if !rows.is_empty() || known {
                return Ok(Some(rows));
            }
            // Nothing here and unknown to the bus: is the symbol in the database at all?
            for iv in Interval::ALL {
                if !s.klines(sym, iv, None, None, 1)?.is_empty() {
                    return Ok(Some(rows));
                }
            }
            Ok(None)
        })?;
        rows.ok_or_else(|| KlinesError::bad(-1121, "Invalid symbol."))
    }

    /// `f` on a kept connection (or a new one); once more on a new one if the kept one had lost
    /// its server.
    fn with_store<T>(&self, f: impl Fn(&mut Store) -> Result<T, StoreError>) -> Result<T, KlinesError> {
        let kept = self.idle.lock().ok().and_then(|mut v| v.pop());
        let fresh = kept.is_none();
        let mut store = match kept {
            Some(s) => s,
            None => self.open()?,
        };
        let result = match f(&mut store) {
            Err(e) if e.is_unavailable() && !fresh => {
                tracing::info!(db = %self.url, error = %e, "database connection lost; reconnecting");
                store = self.open()?;
                f(&mut store)
            }
            r => r,
        };
        match result {
            Ok(v) => {
                self.keep(store);
                Ok(v)
            }
            Err(e) => {
                tracing::warn!(db = %self.url, error = %e, "klines query failed");
                if !e.is_unavailable() {
                    self.keep(store);
                }
                Err(db_error(&e))
            }
        }
    }

    fn open(&self) -> Result<Store, KlinesError> {
        Store::open(&self.url).map_err(|e| {
            tracing::warn!(db = %self.url, error = %e, "cannot open the database");
            db_error(&e)
        })
    }

    fn keep(&self, store: Store) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_CONCURRENT {
                idle.push(store);
            }
        }
    }
}

fn internal(msg: String) -> KlinesError {
    KlinesError { status: 500, code: -1000, msg }
}

/// The database's failure as the client sees it (details stay in the gateway's log).
fn db_error(e: &StoreError) -> KlinesError {
    if e.is_unavailable() {
        KlinesError { status: 503, code: -1001, msg: "The K-line database is unavailable; try again later.".into() }
    } else {
        internal("The K-line database could not answer this request.".into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn requests_parse_like_binance() {
        let q = parse_query(&p(&[("symbol", "btcusdt"), ("interval", "1M"), ("timeZone", "8")])).unwrap();
        assert_eq!(q.symbol.as_str(), "BTCUSDT");
        assert_eq!((q.interval, q.start_ms, q.end_ms, q.limit), (Interval::Mo1, None, None, 500));
        let q = parse_query(&p(&[
            ("symbol", "ETHBTC"),
            ("interval", "1s"),
            ("startTime", "0"),
            ("endTime", "1700000000000"),
            ("limit", "1000"),
            ("token", "x"),
        ]))
        .unwrap();
        assert_eq!((q.start_ms, q.end_ms, q.limit), (Some(0), Some(1_700_000_000_000), 1000));
    }

    #[test]
    fn bad_requests_get_binance_codes() {
        let code = |pairs: &[(&str, &str)]| parse_query(&p(pairs)).unwrap_err().code;
        assert_eq!(code(&[("interval", "1m")]), -1102);
        assert_eq!(code(&[("symbol", ""), ("interval", "1m")]), -1102);
        assert_eq!(code(&[("symbol", "BTCUSDT")]), -1102);
        assert_eq!(code(&[("symbol", "BTC-USDT"), ("interval", "1m")]), -1121);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1mo")]), -1120);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1m"), ("startTime", "-5")]), -1100);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1m"), ("endTime", "12x")]), -1100);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1m"), ("endTime", "99999999999999999999")]), -1100);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1m"), ("limit", "abc")]), -1100);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1m"), ("limit", "0")]), -1130);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1m"), ("limit", "1001")]), -1130);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("symbol", "ETHUSDT"), ("interval", "1m")]), -1101);
        assert_eq!(code(&[("symbol", "BTCUSDT"), ("interval", "1m"), ("startTime", "5"), ("endTime", "4")]), -1023);
    }

    #[test]
    fn rows_render_as_binance_arrays() {
        let mut k = Kline::empty(Interval::M1, 1_499_040_000_000, Symbol::new("ETHBTC").unwrap(), 0, 8, 8, 1_634_790);
        k.high = 80_000_000;
        k.low = 1_575_800;
        k.close = 1_577_100;
        k.volume = 14_897_611_427_815;
        k.quote_volume = 243_419_055_334 * 100_000_000;
        k.taker_buy_volume = 175_687_402_397;
        k.taker_buy_quote_volume = 2_846_694_368 * 100_000_000 + 1;
        k.trade_count = 308;
        let v: serde_json::Value = serde_json::from_str(&render(&[k, k])).unwrap();
        assert_eq!(
            v[0],
            serde_json::json!([
                1_499_040_000_000i64,
                "0.01634790",
                "0.80000000",
                "0.01575800",
                "0.01577100",
                "148976.11427815",
                1_499_040_059_999i64,
                "2434.19055334",
                308,
                "1756.87402397",
                "28.4669436800000001",
                "0"
            ])
        );
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(render(&[]), "[]");
    }
}
