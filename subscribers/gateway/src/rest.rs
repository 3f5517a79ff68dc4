//! The REST calls Binance clients make before streaming: `exchangeInfo` lists the symbols the bus
//! carries (those the gateway has seen on the stream).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::Ctx;

/// Quote assets, longest first, to split `BTCUSDT` into `BTC` / `USDT`.
const QUOTES: [&str; 14] =
    ["FDUSD", "USDT", "USDC", "TUSD", "BUSD", "DAI", "EUR", "TRY", "BRL", "BTC", "ETH", "BNB", "JPY", "USD"];

fn split(symbol: &str) -> (&str, &str) {
    for q in QUOTES {
        if let Some(base) = symbol.strip_suffix(q) {
            if !base.is_empty() {
                return (base, q);
            }
        }
    }
    (symbol, "")
}

/// `/api/v3/exchangeInfo[?symbol=X | ?symbols=["X","Y"]]`.
pub fn exchange_info(ctx: &Ctx, params: &[(String, String)]) -> Response<Full<Bytes>> {
    let wanted: Option<Vec<String>> = params.iter().find_map(|(k, v)| match k.as_str() {
        "symbol" => Some(vec![v.to_ascii_uppercase()]),
        "symbols" => {
            serde_json::from_str::<Vec<String>>(v).ok().map(|l| l.into_iter().map(|s| s.to_ascii_uppercase()).collect())
        }
        _ => None,
    });
    let known: Vec<String> =
        ctx.state.symbols.lock().map(|s| s.iter().map(|x| x.as_str().to_owned()).collect()).unwrap_or_default();
    if let Some(w) = &wanted {
        if let Some(missing) = w.iter().find(|s| !known.contains(s)) {
            let body = json!({ "code": -1121, "msg": format!("Invalid symbol: {missing}") }).to_string();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
    }
    let symbols: Vec<serde_json::Value> = known
        .iter()
        .filter(|s| wanted.as_ref().is_none_or(|w| w.contains(s)))
        .map(|s| {
            let (base, quote) = split(s);
            json!({
                "symbol": s, "status": "TRADING", "baseAsset": base, "baseAssetPrecision": 8,
                "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
                "orderTypes": ["LIMIT", "MARKET"], "icebergAllowed": false, "ocoAllowed": false,
                "isSpotTradingAllowed": true, "isMarginTradingAllowed": false,
                "filters": [], "permissions": ["SPOT"],
            })
        })
        .collect();
    let body = json!({
        "timezone": "UTC",
        "serverTime": crate::now_ns() / 1_000_000,
        "rateLimits": [],
        "exchangeFilters": [],
        "symbols": symbols,
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn splits_base_and_quote() {
        assert_eq!(super::split("BTCUSDT"), ("BTC", "USDT"));
        assert_eq!(super::split("ETHBTC"), ("ETH", "BTC"));
        assert_eq!(super::split("BTCFDUSD"), ("BTC", "FDUSD"));
        assert_eq!(super::split("SYM0001"), ("SYM0001", ""));
    }
}
