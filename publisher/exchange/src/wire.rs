//! Binance market-stream messages as the exchange sends them: `aggTrade` and `trade` events
//! (bare or wrapped as `{"stream":…,"data":…}`), subscription replies, `serverShutdown`; and the
//! REST `aggTrades` / `historicalTrades` rows used for backfill.
//!
//! Untrusted input: every failure is a [`WireError`] naming what was wrong, never a panic.

use std::borrow::Cow;

use mdbus_publisher::source::EXTERNAL_SCALE;
use mdbus_schema::Fixed;
use serde::Deserialize;

/// A trade as parsed (symbol not yet resolved to an id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTrade<'a> {
    pub symbol: Cow<'a, str>,
    /// `a` (aggregate trade id) or `t` (trade id).
    pub id: i64,
    pub price: i64,
    pub qty: i64,
    pub time_us: i64,
    pub buyer_maker: bool,
}

/// What a message was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Trade(WireTrade<'a>),
    /// The server is going away: reconnect now.
    Shutdown,
    /// `{"result":…,"id":…}` or an error reply.
    Reply,
    /// Another event type (ignored).
    Other,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("bad decimal in {0}: {1:?}")]
    Decimal(&'static str, String),
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow, default)]
    e: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    s: Option<Cow<'a, str>>,
    #[serde(default)]
    a: Option<i64>,
    #[serde(default)]
    t: Option<i64>,
    #[serde(borrow, default)]
    p: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    q: Option<Cow<'a, str>>,
    #[serde(rename = "T", default)]
    time: Option<i64>,
    #[serde(default)]
    m: Option<bool>,
}

#[derive(Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    data: Event<'a>,
}

#[derive(Deserialize)]
struct ShutdownWrapper<'a> {
    #[serde(borrow)]
    event: Event<'a>,
}

/// A Binance time in ms or µs (by digit count: µs from 16 digits on) → µs.
pub fn to_us(t: i64) -> i64 {
    if t.unsigned_abs() >= 1_000_000_000_000_000 {
        t
    } else {
        t.saturating_mul(1000)
    }
}

fn decimal(field: &'static str, s: &str) -> Result<i64, WireError> {
    Fixed::parse_i64(s, EXTERNAL_SCALE).map_err(|_| WireError::Decimal(field, s.chars().take(40).collect()))
}

fn trade_from<'a>(ev: Event<'a>, reply: bool) -> Result<Message<'a>, WireError> {
    let e = ev.e.as_deref().unwrap_or("");
    match e {
        "aggTrade" | "trade" => {
            let id = if e == "aggTrade" {
                ev.a.ok_or(WireError::Missing("a"))?
            } else {
                ev.t.ok_or(WireError::Missing("t"))?
            };
            let price = decimal("p", ev.p.as_deref().ok_or(WireError::Missing("p"))?)?;
            let qty = decimal("q", ev.q.as_deref().ok_or(WireError::Missing("q"))?)?;
            Ok(Message::Trade(WireTrade {
                symbol: ev.s.ok_or(WireError::Missing("s"))?,
                id,
                price,
                qty,
                time_us: to_us(ev.time.ok_or(WireError::Missing("T"))?),
                buyer_maker: ev.m.ok_or(WireError::Missing("m"))?,
            }))
        }
        "serverShutdown" => Ok(Message::Shutdown),
        "" if reply => Ok(Message::Reply),
        "" => Err(WireError::Missing("e")),
        _ => Ok(Message::Other),
    }
}

/// Parses one text message from a market-stream connection.
pub fn parse(text: &str) -> Result<Message<'_>, WireError> {
    if text.contains("\"data\"") {
        if let Ok(w) = serde_json::from_str::<Wrapped<'_>>(text) {
            return trade_from(w.data, false);
        }
    }
    if text.contains("\"event\"") {
        if let Ok(w) = serde_json::from_str::<ShutdownWrapper<'_>>(text) {
            return trade_from(w.event, false);
        }
    }
    let ev: Event<'_> = serde_json::from_str(text).map_err(|e| WireError::Json(e.to_string()))?;
    // A reply to a request: `{"result":…,"id":…}` or `{"error":…,"id":…}`.
    let reply = text.contains("\"result\"") || text.contains("\"error\"");
    trade_from(ev, reply)
}

/// One row of `/api/v3/aggTrades` (or `/api/v3/historicalTrades`: `id` instead of `a`,
/// `time` instead of `T`, `isBuyerMaker` instead of `m`).
#[derive(Debug, Deserialize)]
pub struct RestTrade {
    #[serde(alias = "id")]
    pub a: i64,
    #[serde(alias = "price")]
    pub p: String,
    #[serde(alias = "qty")]
    pub q: String,
    #[serde(rename = "T", alias = "time")]
    pub time: i64,
    #[serde(alias = "isBuyerMaker")]
    pub m: bool,
}

impl RestTrade {
    pub fn to_wire(&self, symbol: &str) -> Result<WireTrade<'static>, WireError> {
        Ok(WireTrade {
            symbol: Cow::Owned(symbol.to_owned()),
            id: self.a,
            price: decimal("p", &self.p)?,
            qty: decimal("q", &self.q)?,
            time_us: to_us(self.time),
            buyer_maker: self.m,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn binance_messages_parse() {
        let raw = r#"{"e":"aggTrade","E":1672515782136,"s":"BNBBTC","a":12345,"p":"0.001","q":"100","f":100,"l":105,"T":1672515782136,"m":true,"M":true}"#;
        let Message::Trade(t) = parse(raw).unwrap() else { panic!() };
        assert_eq!((t.symbol.as_ref(), t.id, t.price, t.qty), ("BNBBTC", 12345, 100_000, 10_000_000_000));
        assert_eq!(t.time_us, 1_672_515_782_136_000);
        assert!(t.buyer_maker);
        let wrapped = format!(r#"{{"stream":"bnbbtc@aggTrade","data":{raw}}}"#);
        assert_eq!(parse(&wrapped).unwrap(), parse(raw).unwrap());
        let trade = r#"{"e":"trade","E":1,"s":"BTCUSDT","t":7,"p":"87232.01000000","q":"0.5","T":1672515782136123,"m":false,"M":true}"#;
        let Message::Trade(t) = parse(trade).unwrap() else { panic!() };
        assert_eq!((t.id, t.time_us), (7, 1_672_515_782_136_123));
        assert_eq!(parse(r#"{"result":null,"id":1}"#).unwrap(), Message::Reply);
        assert_eq!(parse(r#"{"e":"serverShutdown","E":1}"#).unwrap(), Message::Shutdown);
        assert_eq!(parse(r#"{"event":{"e":"serverShutdown","E":1}}"#).unwrap(), Message::Shutdown);
        assert_eq!(parse(r#"{"e":"kline","E":1}"#).unwrap(), Message::Other);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{",
            "[]",
            "null",
            r#"{"e":"aggTrade"}"#,
            r#"{"e":"aggTrade","s":"X","a":1,"p":"x","q":"1","T":1,"m":true}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rest_rows_parse() {
        let rows: Vec<RestTrade> =
            serde_json::from_str(r#"[{"a":26129,"p":"0.01633102","q":"4.70443515","f":27781,"l":27781,"T":1498793709153,"m":true,"M":true}]"#)
                .unwrap();
        let t = rows[0].to_wire("ETHBTC").unwrap();
        assert_eq!((t.id, t.price, t.time_us), (26129, 1_633_102, 1_498_793_709_153_000));
        let rows: Vec<RestTrade> = serde_json::from_str(
            r#"[{"id":28457,"price":"4.00000100","qty":"12.00000000","quoteQty":"48.000012","time":1499865549590,"isBuyerMaker":true,"isBestMatch":true}]"#,
        )
        .unwrap();
        assert_eq!(rows[0].a, 28457);
    }
}
