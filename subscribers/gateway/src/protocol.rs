//! Binance's market-stream protocol: stream names, client requests, replies and errors.
//!
//! Requests are untrusted text from the network: [`parse_request`] never panics, and every
//! failure becomes an [`ErrorReply`] in Binance's shape (`{"error":{"code":…,"msg":…},"id":…}`)
//! with the request's `id` echoed when it could be read.

use std::fmt;

use mdbus_schema::{Interval, Symbol};
use serde_json::Value;

/// Longest string `id` accepted (Binance's limit).
pub const MAX_ID_LEN: usize = 36;

/// The name of the publisher-health stream (ours, not Binance's).
pub const HEALTH_STREAM: &str = "mdbus@health";

/// What a data stream carries for its symbol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    Kline(Interval),
    Trade,
}

/// A data stream: one symbol's K-lines of one interval, or its trades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataKey {
    pub symbol: Symbol,
    pub topic: Topic,
}

/// A stream a client can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamName {
    Data(DataKey),
    /// Publisher health as the gateway sees it (heartbeats, feed state).
    Health,
}

/// A stream name that is not one we serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown stream {0:?} (expected <symbol>@kline_<interval>, <symbol>@trade or mdbus@health)")]
pub struct StreamNameError(pub String);

impl StreamName {
    /// Parses `btcusdt@kline_1m`, `btcusdt@trade` or `mdbus@health`. The symbol may be in any case
    /// (Binance documents lower case); the interval is case-sensitive (`1m` ≠ `1M`).
    pub fn parse(s: &str) -> Result<StreamName, StreamNameError> {
        let err = || StreamNameError(s.chars().take(64).collect());
        if s == HEALTH_STREAM {
            return Ok(StreamName::Health);
        }
        let (sym, rest) = s.split_once('@').ok_or_else(err)?;
        let symbol = Symbol::new(sym).map_err(|_| err())?;
        let topic = if rest == "trade" {
            Topic::Trade
        } else if let Some(iv) = rest.strip_prefix("kline_") {
            Topic::Kline(iv.parse().map_err(|_| err())?)
        } else {
            return Err(err());
        };
        Ok(StreamName::Data(DataKey { symbol, topic }))
    }
}

impl fmt::Display for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.symbol.as_str().chars() {
            write!(f, "{}", c.to_ascii_lowercase())?;
        }
        match self.topic {
            Topic::Kline(i) => write!(f, "@kline_{}", i.as_str()),
            Topic::Trade => f.write_str("@trade"),
        }
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamName::Data(k) => k.fmt(f),
            StreamName::Health => f.write_str(HEALTH_STREAM),
        }
    }
}

/// A request `id`, echoed back with the same JSON type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RequestId {
    #[default]
    Null,
    Int(i64),
    Str(String),
}

impl RequestId {
    fn from_json(v: Option<&Value>) -> Result<RequestId, ()> {
        match v {
            None | Some(Value::Null) => Ok(RequestId::Null),
            Some(Value::Number(n)) => n.as_i64().map(RequestId::Int).ok_or(()),
            Some(Value::String(s)) if s.chars().count() <= MAX_ID_LEN => Ok(RequestId::Str(s.clone())),
            Some(_) => Err(()),
        }
    }

    /// The id as JSON text.
    pub fn to_json(&self) -> String {
        match self {
            RequestId::Null => "null".into(),
            RequestId::Int(i) => i.to_string(),
            RequestId::Str(s) => Value::String(s.clone()).to_string(),
        }
    }
}

/// A connection property (`SET_PROPERTY` / `GET_PROPERTY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    /// Events wrapped as `{"stream":…,"data":…}`.
    Combined,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Subscribe(Vec<StreamName>),
    Unsubscribe(Vec<StreamName>),
    ListSubscriptions,
    SetProperty(Property, bool),
    GetProperty(Property),
}

/// A parsed client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    pub method: Method,
}

/// An error answer in Binance's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: i32,
    pub msg: String,
    pub id: RequestId,
}

impl ErrorReply {
    pub fn new(code: i32, msg: impl Into<String>, id: RequestId) -> ErrorReply {
        ErrorReply { code, msg: msg.into(), id }
    }

    /// `{"error":{"code":…,"msg":…},"id":…}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"error\":{{\"code\":{},\"msg\":{}}},\"id\":{}}}",
            self.code,
            Value::String(self.msg.clone()),
            self.id.to_json()
        )
    }
}

/// Binance's error codes for stream requests.
pub mod code {
    pub const UNKNOWN_PROPERTY: i32 = 0;
    pub const INVALID_VALUE_TYPE: i32 = 1;
    pub const INVALID_REQUEST: i32 = 2;
    pub const INVALID_JSON: i32 = 3;
    /// Over a rate limit (Binance's code for "too many requests").
    pub const TOO_MANY_REQUESTS: i32 = -1003;
}

const METHODS: &str =
    "expected one of `SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`";

/// Parses one request. Unknown fields are ignored; everything else wrong is an error reply.
pub fn parse_request(text: &str) -> Result<Request, ErrorReply> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ErrorReply::new(code::INVALID_JSON, format!("Invalid JSON: {e}"), RequestId::Null))?;
    let Value::Object(obj) = v else {
        return Err(ErrorReply::new(code::INVALID_REQUEST, "Invalid request: expected a JSON object", RequestId::Null));
    };
    let id = RequestId::from_json(obj.get("id")).map_err(|()| {
        ErrorReply::new(
            code::INVALID_REQUEST,
            "Invalid request: request ID must be an integer, a string of at most 36 characters, or null",
            RequestId::Null,
        )
    })?;
    let invalid = |msg: String| ErrorReply::new(code::INVALID_REQUEST, format!("Invalid request: {msg}"), id.clone());
    let method = match obj.get("method") {
        None => return Err(invalid("missing field `method`".into())),
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return Err(invalid("method must be a string".into())),
    };
    let params: &[Value] = match obj.get("params") {
        None | Some(Value::Null) => &[],
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("params must be an array".into())),
    };
    let streams = || -> Result<Vec<StreamName>, ErrorReply> {
        params
            .iter()
            .map(|p| match p {
                Value::String(s) => StreamName::parse(s).map_err(|e| invalid(e.to_string())),
                _ => Err(invalid("stream names must be strings".into())),
            })
            .collect()
    };
    let property = |p: Option<&Value>| -> Result<Property, ErrorReply> {
        match p {
            Some(Value::String(s)) if s == "combined" => Ok(Property::Combined),
            Some(Value::String(_)) => Err(ErrorReply::new(code::UNKNOWN_PROPERTY, "Unknown property", id.clone())),
            _ => Err(invalid("property name must be a string".into())),
        }
    };
    let method = match method {
        "SUBSCRIBE" => Method::Subscribe(streams()?),
        "UNSUBSCRIBE" => Method::Unsubscribe(streams()?),
        "LIST_SUBSCRIPTIONS" => Method::ListSubscriptions,
        "SET_PROPERTY" => {
            if params.len() > 2 {
                return Err(invalid("too many parameters".into()));
            }
            let prop = property(params.first())?;
            match params.get(1) {
                Some(Value::Bool(b)) => Method::SetProperty(prop, *b),
                _ => return Err(ErrorReply::new(code::INVALID_VALUE_TYPE, "Invalid value type: expected Boolean", id)),
            }
        }
        "GET_PROPERTY" => {
            if params.len() > 1 {
                return Err(invalid("too many parameters".into()));
            }
            Method::GetProperty(property(params.first())?)
        }
        other => {
            let shown: String = other.chars().take(40).collect();
            return Err(invalid(format!("unknown variant `{shown}`, {METHODS}")));
        }
    };
    Ok(Request { id, method })
}

/// `{"result":<result>,"id":…}`.
pub fn result_reply(result_json: &str, id: &RequestId) -> String {
    format!("{{\"result\":{result_json},\"id\":{}}}", id.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_round_trip() {
        for s in ["btcusdt@kline_1m", "btcusdt@kline_1M", "ethusdt@trade", "mdbus@health", "x1@kline_3d"] {
            assert_eq!(StreamName::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(StreamName::parse("BTCUSDT@trade").unwrap().to_string(), "btcusdt@trade");
        for bad in ["", "btcusdt", "btcusdt@kline_2m", "btc-usdt@trade", "@trade", "btcusdt@aggTrade", "a@kline_"] {
            assert!(StreamName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_parse_like_binance() {
        let r =
            parse_request(r#"{"method":"SUBSCRIBE","params":["btcusdt@trade","btcusdt@kline_1s"],"id":1}"#).unwrap();
        assert_eq!(r.id, RequestId::Int(1));
        assert!(matches!(r.method, Method::Subscribe(ref v) if v.len() == 2));
        let r = parse_request(r#"{"method":"LIST_SUBSCRIPTIONS","id":"abc-1"}"#).unwrap();
        assert_eq!(r.id.to_json(), "\"abc-1\"");
        let r = parse_request(r#"{"method":"SET_PROPERTY","params":["combined",true],"id":null}"#).unwrap();
        assert_eq!(r.method, Method::SetProperty(Property::Combined, true));
        assert_eq!(r.id.to_json(), "null");
    }

    #[test]
    fn errors_have_binance_codes_and_echo_the_id() {
        let e = parse_request("{not json").unwrap_err();
        assert_eq!(e.code, code::INVALID_JSON);
        assert!(e.to_json().starts_with(r#"{"error":{"code":3,"msg":"Invalid JSON: "#), "{}", e.to_json());
        let e = parse_request(r#"{"method":"FOO","id":7}"#).unwrap_err();
        assert_eq!((e.code, e.id.clone()), (code::INVALID_REQUEST, RequestId::Int(7)));
        assert!(e.msg.contains("unknown variant `FOO`"));
        let e = parse_request(r#"{"method":"SET_PROPERTY","params":["combined","yes"],"id":2}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_VALUE_TYPE);
        let e = parse_request(r#"{"method":"GET_PROPERTY","params":["colour"],"id":"x"}"#).unwrap_err();
        assert_eq!(e.to_json(), r#"{"error":{"code":0,"msg":"Unknown property"},"id":"x"}"#);
        let e = parse_request(r#"{"method":"SUBSCRIBE","params":["nope"],"id":3}"#).unwrap_err();
        assert_eq!(e.id, RequestId::Int(3));
        let long = "a".repeat(37);
        let e = parse_request(&format!(r#"{{"method":"LIST_SUBSCRIPTIONS","id":"{long}"}}"#)).unwrap_err();
        assert_eq!(e.code, code::INVALID_REQUEST);
        assert!(parse_request(r#"{"method":"LIST_SUBSCRIPTIONS","id":1.5}"#).is_err());
        assert!(parse_request("[]").is_err());
    }
}
