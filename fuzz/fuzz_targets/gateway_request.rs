//! Any bytes as a client's WebSocket request: parsing never panics, every error reply is valid
//! JSON in Binance's shape, and every stream name that parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mdbus_gateway::protocol::{parse_request, result_reply, StreamName};
use serde_json::Value;

fn check(text: &str) {
    match parse_request(text) {
        Ok(req) => {
            let reply = result_reply("null", &req.id);
            let v: Value = serde_json::from_str(&reply).expect("result reply is not valid JSON");
            assert_eq!(v["id"], serde_json::from_str::<Value>(&req.id.to_json()).expect("id is not valid JSON"));
        }
        Err(err) => {
            let json = err.to_json();
            let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("invalid error JSON {json:?}: {e}"));
            assert!(v["error"]["code"].is_i64(), "{json}");
            assert!(v["error"]["msg"].is_string(), "{json}");
            assert!(v.get("id").is_some(), "{json}");
        }
    }
    if let Ok(name) = StreamName::parse(text) {
        let shown = name.to_string();
        assert_eq!(StreamName::parse(&shown), Ok(name), "{text:?} -> {shown:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    } else {
        check(&String::from_utf8_lossy(data));
    }
});
