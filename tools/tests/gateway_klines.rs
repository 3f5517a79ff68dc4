//! `GET /api/v3/klines` on a real `mdbus gateway --db sqlite:…` process: K-lines written with
//! `mdbus-store`, read back over HTTP field by field, Binance's limit / startTime / endTime
//! semantics, its error codes, and Binance's own Python connector reading the endpoint.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use mdbus_schema::{Interval, Kline, Symbol};
use mdbus_store::{DbUrl, Store};
use serde_json::{json, Value};

const T0: i64 = 1_700_000_040_000; // a minute boundary

fn minute(i: i64) -> i64 {
    T0 + i * 60_000
}

/// BTCUSDT 1m K-line `i`: prices at scale 2, quantities at scale 5, every field distinct.
fn btc(i: i64) -> Kline {
    let mut k = Kline::empty(Interval::M1, minute(i), Symbol::new("BTCUSDT").unwrap(), 3, 2, 5, 0);
    k.open = 8_723_201 + i;
    k.high = 8_723_500 + i;
    k.low = 8_723_100 + i;
    k.close = 8_723_400 + i;
    k.volume = 1_250_000 + i128::from(i);
    k.quote_volume = 10_904_251_250 + i128::from(i);
    k.taker_buy_volume = 250_000;
    k.taker_buy_quote_volume = 2_180_850_250;
    k.trade_count = 5 + i as u64;
    k.first_trade_id = 1000 + 10 * i;
    k.last_trade_id = 1004 + 10 * i;
    k.closed = true;
    k
}

fn get_json(gw: &Gateway, path: &str) -> (u16, Value) {
    let (status, body) = gw.get(path);
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body:?}"));
    (status, v)
}

fn open_times(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|r| (r[0].as_i64().unwrap() - T0) / 60_000).collect()
}

fn error_code(gw: &Gateway, path: &str) -> (u16, i64) {
    let (status, v) = get_json(gw, path);
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{path}: {v}");
    (status, v["code"].as_i64().unwrap_or_else(|| panic!("{path}: {v}")))
}

#[test]
fn gateway_serves_binance_klines_from_the_database() {
    let dir = TempDir::new("gwklines");
    let db = dir.0.join("klines.db");
    let mut store = Store::open(&DbUrl::Sqlite(db.clone())).unwrap();
    let mut rows: Vec<Kline> = (0..10).map(btc).collect();
    rows[9].closed = false;
    // Another symbol, another interval, decimals beyond 8 digits and beyond i64.
    let mut eth = Kline::empty(Interval::H1, 1_699_999_200_000, Symbol::new("ETHUSDT").unwrap(), 1, 8, 10, 0);
    eth.open = 1;
    eth.high = 123_456_789_012_345_678;
    eth.low = 1;
    eth.close = 99_999_999;
    eth.volume = 123_456_789_012_345_678_901_234_567;
    eth.quote_volume = -1;
    eth.taker_buy_volume = 10_000_000_000;
    eth.taker_buy_quote_volume = 1_000_000_000_000_000_000;
    eth.trade_count = 1;
    rows.push(eth);
    store.write_snapshot("lab", 1, 100, &rows).unwrap();

    let bus = unique_bus("gwklines");
    let db_arg = format!("sqlite:{}", db.display());
    let gw = Gateway::start(&bus, &["--db", &db_arg]);

    // Default limit, lower-case symbol: everything, ascending, the open K-line last.
    let (status, all) = get_json(&gw, "/api/v3/klines?symbol=btcusdt&interval=1m");
    assert_eq!(status, 200, "{all}");
    assert_eq!(open_times(&all), (0..10).collect::<Vec<_>>());
    // Field by field, as Binance sends them.
    assert_eq!(
        all[2],
        json!([
            minute(2),
            "87232.03000000",
            "87235.02000000",
            "87231.02000000",
            "87234.02000000",
            "12.50002000",
            minute(3) - 1,
            "1090.42512520",
            7,
            "2.50000000",
            "218.08502500",
            "0"
        ])
    );
    let (_, e) = get_json(&gw, "/api/v3/klines?symbol=ETHUSDT&interval=1h");
    assert_eq!(
        e,
        json!([[
            1_699_999_200_000i64,
            "0.00000001",
            "1234567890.12345678",
            "0.00000001",
            "0.99999999",
            "12345678901234567.8901234567",
            1_700_002_799_999i64,
            "-0.000000000000000001",
            1,
            "1.00000000",
            "1.00000000",
            "0"
        ]])
    );

    // limit / startTime / endTime (inclusive, on the open time).
    let q = |extra: &str| open_times(&get_json(&gw, &format!("/api/v3/klines?symbol=BTCUSDT&interval=1m{extra}")).1);
    assert_eq!(q("&limit=3"), vec![7, 8, 9]);
    assert_eq!(q(&format!("&endTime={}&limit=2", minute(5))), vec![4, 5]);
    assert_eq!(q(&format!("&endTime={}&limit=2", minute(5) - 1)), vec![3, 4]);
    assert_eq!(q(&format!("&startTime={}&limit=3", minute(2))), vec![2, 3, 4]);
    assert_eq!(q(&format!("&startTime={}&limit=2", minute(2) + 1)), vec![3, 4]);
    assert_eq!(q(&format!("&startTime={}&endTime={}", minute(2), minute(4))), vec![2, 3, 4]);
    assert_eq!(q(&format!("&startTime={}&timeZone=0&limit=1000", minute(8))), vec![8, 9]);
    assert!(q(&format!("&startTime={}", minute(50))).is_empty());
    // A symbol the database holds under other intervals only: empty, not an error.
    assert_eq!(get_json(&gw, "/api/v3/klines?symbol=ETHUSDT&interval=1m"), (200, json!([])));

    // Rows written while the gateway runs are served (the reader sees each commit).
    let mut next = btc(9);
    next.close += 1;
    store.write_snapshot("lab", 2, 101, &[next, btc(10)]).unwrap();
    let (_, latest) = get_json(&gw, "/api/v3/klines?symbol=BTCUSDT&interval=1m&limit=2");
    assert_eq!(open_times(&latest), vec![9, 10]);
    assert_eq!(latest[0][4], "87234.10000000");

    // Binance's error codes, with HTTP 400.
    let base = "/api/v3/klines?";
    for (path, code) in [
        ("interval=1m", -1102),
        ("symbol=BTCUSDT", -1102),
        ("symbol=&interval=1m", -1102),
        ("symbol=BTCUSDT&interval=2m", -1120),
        ("symbol=BTC-USDT&interval=1m", -1121),
        ("symbol=XRPUSDT&interval=1m", -1121),
        ("symbol=BTCUSDT&interval=1m&startTime=abc", -1100),
        ("symbol=BTCUSDT&interval=1m&endTime=-1", -1100),
        ("symbol=BTCUSDT&interval=1m&limit=1.5", -1100),
        ("symbol=BTCUSDT&interval=1m&limit=0", -1130),
        ("symbol=BTCUSDT&interval=1m&limit=1001", -1130),
        ("symbol=BTCUSDT&interval=1m&interval=1h", -1101),
        ("symbol=BTCUSDT&interval=1m&startTime=5&endTime=4", -1023),
    ] {
        assert_eq!(error_code(&gw, &format!("{base}{path}")), (400, code), "{path}");
    }

    // Binance's own Python connector reads it unchanged.
    let script = format!(
        "import json; from binance.spot import Spot; \
         print(json.dumps(Spot(base_url='http://127.0.0.1:{}').klines('BTCUSDT', '1m', limit=3)))",
        gw.port
    );
    let out = Command::new(python()).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_client: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(open_times(&from_client), vec![8, 9, 10]);
    assert_eq!(from_client[0], all[8]);

    let stats = gw.stats();
    assert!(stats["rest_requests"].as_u64().unwrap() >= 26, "{stats}");
    assert!(stats["request_errors"].as_u64().unwrap() >= 13, "{stats}");
    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "gateway failed: {err}");
    forget_bus(&bus);
}

#[test]
fn gateway_without_a_database_answers_klines_with_503() {
    let bus = unique_bus("gwnodb");
    let gw = Gateway::start(&bus, &[]);
    let (status, v) = get_json(&gw, "/api/v3/klines?symbol=BTCUSDT&interval=1m");
    assert_eq!(status, 503, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("--db"), "{v}");
    // Parameters are still checked first.
    assert_eq!(error_code(&gw, "/api/v3/klines?symbol=BTCUSDT&interval=7m"), (400, -1120));
    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "gateway failed: {err}");
    forget_bus(&bus);
}

#[test]
fn gateway_refuses_a_malformed_database_url() {
    let out = Command::new(EXE).args(["gateway", "--db", "mysql://u:topsecret@h/db"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sqlite:PATH") && !err.contains("topsecret"), "{err}");
}

#[test]
fn gateway_reads_postgres_and_rides_out_a_server_restart() {
    let dir = TempDir::new("gwklinespg");
    let mut pg = mdbus_store::testing::PgServer::start(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let url: DbUrl = pg.url().parse().unwrap();
    let rows: Vec<Kline> = (0..5).map(btc).collect();
    Store::open(&url).unwrap().write_snapshot("lab", 1, 10, &rows).unwrap();
    let bus = unique_bus("gwklinespg");
    let gw = Gateway::start(&bus, &["--db", &pg.url()]);
    let path = "/api/v3/klines?symbol=BTCUSDT&interval=1m";
    let (status, first) = get_json(&gw, path);
    assert_eq!((status, open_times(&first)), (200, vec![0, 1, 2, 3, 4]), "{first}");
    assert_eq!(first[2][7], "1090.42512520");

    // The kept connection died with the server: the request reconnects and is answered.
    pg.stop().unwrap();
    pg.start_again().unwrap();
    assert_eq!(get_json(&gw, path), (200, first.clone()));

    // While the server is down: 503 with Binance's -1001; served again once it is back.
    pg.stop().unwrap();
    assert_eq!(error_code(&gw, path), (503, -1001));
    pg.start_again().unwrap();
    assert_eq!(get_json(&gw, path), (200, first));

    let (ok, err) = gw.proc.stop(Duration::from_secs(10));
    assert!(ok, "gateway failed: {err}");
    forget_bus(&bus);
}
