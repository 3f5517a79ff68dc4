//! Client requests are untrusted text: `parse_request` never panics on garbage or near-misses,
//! every error reply is valid JSON in Binance's shape, and the request `id` is echoed faithfully.

#![allow(clippy::unwrap_used)]

use mdbus_gateway::protocol::{
    code, parse_request, result_reply, ErrorReply, Method, Request, StreamName, HEALTH_STREAM, MAX_ID_LEN,
};
use mdbus_schema::Interval;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const METHODS: [&str; 5] = ["SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY"];

/// Checks an error reply's JSON shape, `{"error":{"code":int,"msg":string},"id":…}`, and returns
/// the parsed reply.
fn check_error_json(err: &ErrorReply) -> Value {
    let text = err.to_json();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("error reply {text:?} is not JSON: {e}"));
    let obj = v.as_object().unwrap_or_else(|| panic!("error reply {text:?} is not an object"));
    assert_eq!(obj.len(), 2, "{text}");
    let error = obj["error"].as_object().unwrap_or_else(|| panic!("{text}: `error` is not an object"));
    assert_eq!(error.len(), 2, "{text}");
    assert_eq!(error["code"].as_i64(), Some(i64::from(err.code)), "{text}");
    assert_eq!(error["msg"].as_str(), Some(err.msg.as_str()), "{text}");
    assert!(obj.contains_key("id"), "{text}");
    assert_eq!(obj["id"], serde_json::from_str::<Value>(&err.id.to_json()).unwrap(), "{text}");
    assert!(
        [code::UNKNOWN_PROPERTY, code::INVALID_VALUE_TYPE, code::INVALID_REQUEST, code::INVALID_JSON]
            .contains(&err.code),
        "{text}: unexpected code"
    );
    v
}

/// Checks a successful parse's reply: valid JSON with the id in it.
fn check_ok(req: &Request) -> Value {
    let reply = result_reply("null", &req.id);
    let v: Value = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("result reply {reply:?} is not JSON: {e}"));
    v["id"].clone()
}

fn interval() -> impl Strategy<Value = Interval> {
    proptest::sample::select(Interval::ALL.to_vec())
}

/// A stream name we serve, symbol in any case.
fn valid_stream() -> impl Strategy<Value = String> {
    prop_oneof![
        ("[a-zA-Z0-9]{1,24}", interval()).prop_map(|(s, i)| format!("{s}@kline_{}", i.as_str())),
        "[a-zA-Z0-9]{1,24}".prop_map(|s| format!("{s}@trade")),
        Just(HEALTH_STREAM.to_string()),
    ]
}

/// Strings that look like stream names but mostly are not.
fn near_stream() -> impl Strategy<Value = String> {
    prop_oneof![
        valid_stream(),
        "[a-zA-Z0-9_@-]{0,30}@(kline_[0-9a-zA-Z]{0,4}|trade|Trade|aggTrade|health|depth)",
        "(MDBUS|mdbus|Mdbus)@(health|HEALTH)",
        valid_stream().prop_map(|s| format!(" {s}")),
        valid_stream().prop_map(|s| format!("{s}\u{0}")),
        ".{0,40}",
    ]
}

/// Any JSON value, nesting included.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN/inf become null
        ".{0,20}".prop_map(Value::String),
        near_stream().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// The `method` member: absent, a valid name, a near-miss, or not a string.
fn method() -> impl Strategy<Value = Option<Value>> {
    let name = prop::sample::select(METHODS.to_vec());
    prop_oneof![
        6 => name.clone().prop_map(|m| Some(json!(m))),
        1 => name.clone().prop_map(|m| Some(json!(m.to_lowercase()))),
        1 => (name.clone(), any::<u64>()).prop_map(|(m, bits)| {
            // Random case per letter.
            let s: String = m
                .chars()
                .enumerate()
                .map(|(i, c)| if bits >> (i % 64) & 1 == 1 { c.to_ascii_lowercase() } else { c })
                .collect();
            Some(json!(s))
        }),
        1 => name.prop_map(|m| Some(json!(format!("{m} ")))),
        1 => ".{0,60}".prop_map(|s| Some(json!(s))),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ]
}

/// The `params` member: absent, an array of plausible and implausible items, or not an array.
fn params() -> impl Strategy<Value = Option<Value>> {
    let item = prop_oneof![
        12 => valid_stream().prop_map(Value::String),
        2 => near_stream().prop_map(Value::String),
        1 => Just(json!("combined")),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => json_value(),
    ];
    prop_oneof![
        4 => prop::collection::vec(item, 0..6).prop_map(|v| Some(Value::Array(v))),
        1 => any::<bool>().prop_map(|b| Some(json!(["combined", b]))),
        1 => Just(Some(json!(["combined"]))),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ]
}

/// The `id` member as sent.
#[derive(Debug, Clone)]
enum IdCase {
    Missing,
    Null,
    Int(i64),
    /// Above `i64::MAX`: not an id we accept.
    BigUint(u64),
    Float(f64),
    Str(String),
    Other(Value),
}

impl IdCase {
    /// What the id is as JSON, `null` when absent.
    fn value(&self) -> Option<Value> {
        match self {
            IdCase::Missing => None,
            IdCase::Null => Some(Value::Null),
            IdCase::Int(i) => Some(json!(i)),
            IdCase::BigUint(u) => Some(json!(u)),
            IdCase::Float(f) => Some(json!(f)),
            IdCase::Str(s) => Some(json!(s)),
            IdCase::Other(v) => Some(v.clone()),
        }
    }

    /// Whether Binance accepts it: a 64-bit signed integer, a string of at most 36 bytes, or null.
    fn is_valid(&self) -> bool {
        match self {
            IdCase::Missing | IdCase::Null | IdCase::Int(_) => true,
            IdCase::Str(s) => s.chars().count() <= MAX_ID_LEN,
            IdCase::BigUint(_) | IdCase::Float(_) | IdCase::Other(_) => false,
        }
    }
}

fn id_case() -> impl Strategy<Value = IdCase> {
    let edges = vec![i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX];
    let big = vec![i64::MAX as u64 + 1, u64::MAX];
    let floats = vec![0.0, -0.0, 1.0, -1.0, 1.5, 9.223372036854776e18, 1e300];
    prop_oneof![
        1 => Just(IdCase::Missing),
        1 => Just(IdCase::Null),
        3 => any::<i64>().prop_map(IdCase::Int),
        2 => prop::sample::select(edges).prop_map(IdCase::Int),
        1 => ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(IdCase::BigUint),
        1 => prop::sample::select(big).prop_map(IdCase::BigUint),
        1 => prop::num::f64::NORMAL.prop_map(IdCase::Float),
        1 => prop::sample::select(floats).prop_map(IdCase::Float),
        3 => "[a-zA-Z0-9-]{0,40}".prop_map(IdCase::Str),
        1 => ".{0,40}".prop_map(IdCase::Str),
        1 => "[\"\\\\\u{0}-\u{1f}\u{7f}\u{2028}\u{2029}\u{fffd}]{0,40}".prop_map(IdCase::Str),
        1 => json_value()
            .prop_filter("not an accepted id type", |v| {
                !(v.is_null() || v.is_i64() || v.is_u64() || v.is_f64() || v.is_string())
            })
            .prop_map(IdCase::Other),
    ]
}

/// A request object as text, with the id case it carries.
fn request() -> impl Strategy<Value = (String, IdCase)> {
    (method(), params(), id_case(), prop::option::of(("[a-z]{1,8}", json_value())), any::<u8>()).prop_map(
        |(method, params, id, extra, order)| {
            let mut members = Vec::new();
            if let Some(m) = method {
                members.push(("method".to_string(), m));
            }
            if let Some(p) = params {
                members.push(("params".to_string(), p));
            }
            if let Some(v) = id.value() {
                members.push(("id".to_string(), v));
            }
            if let Some((k, v)) = extra {
                if !["method", "params", "id"].contains(&k.as_str()) {
                    members.push((k, v));
                }
            }
            // Member order varies (a rotation is enough to put each one first).
            let n = members.len().max(1);
            members.rotate_left(usize::from(order) % n);
            let body: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), serde_json::to_string(v).unwrap()))
                .collect();
            (format!("{{{}}}", body.join(",")), id)
        },
    )
}

/// Arbitrary text: unicode, JSON-ish punctuation, and lossily decoded bytes.
fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::string::string_regex(r#"[\[\]{}":,0-9a-zA-Z_@.eE+\- \\nutrfals\u{0}\u{fffd}\u{1F600}]{0,80}"#)
            .unwrap(),
        prop::collection::vec(any::<u8>(), 0..120).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        // A valid request cut short, or with a byte flipped.
        (request(), any::<prop::sample::Index>()).prop_map(|((text, _), at)| {
            let cut = at.index(text.len() + 1);
            let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            text[..cut].to_string()
        }),
        (request(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|((text, _), at, b)| {
            let mut bytes = text.into_bytes();
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }),
    ]
}

proptest! {
    #[test]
    fn garbage_never_panics_and_errors_are_json(text in garbage()) {
        match parse_request(&text) {
            Ok(req) => {
                // Whatever parsed was a JSON object with a valid method.
                let v: Value = serde_json::from_str(&text).unwrap();
                prop_assert!(v.is_object());
                let m = v["method"].as_str().unwrap();
                prop_assert!(METHODS.contains(&m), "{m}");
                check_ok(&req);
            }
            Err(err) => {
                check_error_json(&err);
                if serde_json::from_str::<Value>(&text).is_err() {
                    prop_assert_eq!(err.code, code::INVALID_JSON);
                }
            }
        }
    }

    #[test]
    fn near_miss_requests_echo_the_id((text, id) in request()) {
        let sent = id.value().unwrap_or(Value::Null);
        match parse_request(&text) {
            Ok(req) => {
                prop_assert!(id.is_valid(), "accepted invalid id {id:?} in {text}");
                let echoed: Value = serde_json::from_str(&req.id.to_json()).unwrap();
                prop_assert_eq!(&echoed, &sent, "{}", text);
                prop_assert_eq!(&check_ok(&req), &sent, "{}", text);
                let v: Value = serde_json::from_str(&text).unwrap();
                let m = v["method"].as_str().unwrap();
                let params = v.get("params").and_then(Value::as_array).cloned().unwrap_or_default();
                match req.method {
                    Method::Subscribe(names) | Method::Unsubscribe(names) => {
                        prop_assert!(m == "SUBSCRIBE" || m == "UNSUBSCRIBE", "{m}");
                        prop_assert_eq!(names.len(), params.len());
                        for (name, p) in names.iter().zip(&params) {
                            prop_assert_eq!(Ok(*name), StreamName::parse(p.as_str().unwrap()));
                        }
                    }
                    Method::ListSubscriptions => prop_assert_eq!(m, "LIST_SUBSCRIPTIONS"),
                    Method::SetProperty(_, b) => {
                        prop_assert_eq!(m, "SET_PROPERTY");
                        prop_assert_eq!(params, vec![json!("combined"), json!(b)]);
                    }
                    Method::GetProperty(_) => {
                        prop_assert_eq!(m, "GET_PROPERTY");
                        prop_assert_eq!(params, vec![json!("combined")]);
                    }
                }
            }
            Err(err) => {
                let reply = check_error_json(&err);
                prop_assert_ne!(err.code, code::INVALID_JSON, "{}", text);
                let expected = if id.is_valid() { sent } else { Value::Null };
                prop_assert_eq!(&reply["id"], &expected, "{}", text);
            }
        }
    }

    #[test]
    fn stream_names_print_back_to_themselves(s in prop_oneof![any::<String>(), near_stream()]) {
        if let Ok(name) = StreamName::parse(&s) {
            let shown = name.to_string();
            prop_assert_eq!(StreamName::parse(&shown), Ok(name), "{:?} -> {:?}", s, shown);
            prop_assert_eq!(StreamName::parse(&shown).unwrap().to_string(), shown.clone());
            // Only the symbol's case changes; the interval is case-sensitive and kept.
            let (sym, rest) = s.split_once('@').unwrap();
            prop_assert_eq!(shown, format!("{}@{rest}", sym.to_ascii_lowercase()));
        }
    }

    #[test]
    fn valid_stream_names_parse(s in valid_stream()) {
        let name = StreamName::parse(&s).unwrap();
        let shown = name.to_string();
        prop_assert_eq!(StreamName::parse(&shown), Ok(name));
    }
}
