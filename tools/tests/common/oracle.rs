//! An independent K-line oracle: written from the Binance rules and a trades CSV alone (chrono
//! for the calendar, its own decimal handling); it shares no code with the aggregator.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{Datelike, Duration as ChronoDuration, NaiveDate, TimeZone, Utc};
use serde_json::Value;

// ---------------------------------------------------------------- the independent oracle

/// A decimal string as an integer count of 1e-8 (every value in these files has ≤ 8 decimals).
pub fn e8(s: &str) -> i128 {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    assert!(frac.len() <= 8 || frac[8..].bytes().all(|b| b == b'0'), "more than 8 decimals: {s}");
    let mut f = frac.chars().take(8).collect::<String>();
    while f.len() < 8 {
        f.push('0');
    }
    let neg = int.starts_with('-');
    let v = int.trim_start_matches('-').parse::<i128>().unwrap() * 100_000_000 + f.parse::<i128>().unwrap();
    if neg {
        -v
    } else {
        v
    }
}

pub fn render_e8(v: i128) -> String {
    let sign = if v < 0 { "-" } else { "" };
    let a = v.abs();
    format!("{sign}{}.{:08}", a / 100_000_000, a % 100_000_000)
}

#[derive(Debug, Clone)]
pub struct CsvTrade {
    pub id: i64,
    pub price: i128,
    pub qty: i128,
    pub quote: i128,
    pub time_ms: i64,
    pub buyer_maker: bool,
}

pub fn read_csv(path: &std::path::Path) -> Vec<CsvTrade> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            assert_eq!(c.len(), 7, "bad CSV line {l}");
            assert_eq!(c[6], "True");
            let time: i64 = c[4].parse().unwrap();
            // Binance spot files switched to µs in 2025: 16 digits.
            let time_ms = if c[4].len() >= 16 { time / 1000 } else { time };
            CsvTrade {
                id: c[0].parse().unwrap(),
                price: e8(c[1]),
                qty: e8(c[2]),
                quote: e8(c[3]),
                time_ms,
                buyer_maker: match c[5] {
                    "True" => true,
                    "False" => false,
                    o => panic!("bad is_buyer_maker {o}"),
                },
            }
        })
        .collect()
}

pub const INTERVALS: [&str; 16] =
    ["1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"];

pub fn fixed_ms(i: &str) -> Option<i64> {
    let (n, unit) = i.split_at(i.len() - 1);
    let n: i64 = n.parse().unwrap();
    Some(
        n * match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => return None,
            "M" => return None,
            _ => unreachable!(),
        },
    )
}

/// Binance: buckets on UTC; weeks from Monday; months by the calendar; 3d from the epoch.
pub fn bucket(i: &str, ms: i64) -> i64 {
    if let Some(len) = fixed_ms(i) {
        return ms.div_euclid(len) * len;
    }
    let dt = Utc.timestamp_millis_opt(ms).unwrap();
    let day = dt.date_naive();
    let start = if i == "1w" {
        day - ChronoDuration::days(i64::from(day.weekday().num_days_from_monday()))
    } else {
        NaiveDate::from_ymd_opt(day.year(), day.month(), 1).unwrap()
    };
    start.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis()
}

pub fn next_bucket(i: &str, open: i64) -> i64 {
    match fixed_ms(i) {
        Some(len) => open + len,
        None if i == "1w" => open + 7 * 86_400_000,
        None => {
            let d = Utc.timestamp_millis_opt(open).unwrap().date_naive();
            let (y, m) = if d.month() == 12 { (d.year() + 1, 1) } else { (d.year(), d.month() + 1) };
            NaiveDate::from_ymd_opt(y, m, 1).unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis()
        }
    }
}

/// Expected K-line (Binance kline object fields) of `symbol`/`i` opening at `open`, from trades.
pub fn oracle_kline(symbol: &str, i: &str, trades: &[CsvTrade], open: i64) -> BTreeMap<&'static str, Value> {
    let end = next_bucket(i, open);
    let inside: Vec<&CsvTrade> = trades.iter().filter(|t| t.time_ms >= open && t.time_ms < end).collect();
    let prev_close = trades.iter().rfind(|t| t.time_ms < open).map(|t| t.price);
    let mut k = BTreeMap::new();
    k.insert("t", Value::from(open));
    k.insert("T", Value::from(end - 1));
    k.insert("s", Value::from(symbol));
    k.insert("i", Value::from(i));
    k.insert("x", Value::from(true));
    k.insert("B", Value::from("0"));
    if inside.is_empty() {
        let c = render_e8(prev_close.expect("empty K-line before the first trade"));
        for f in ["o", "h", "l", "c"] {
            k.insert(f, Value::from(c.clone()));
        }
        for f in ["v", "q", "V", "Q"] {
            k.insert(f, Value::from(render_e8(0)));
        }
        k.insert("f", Value::from(-1));
        k.insert("L", Value::from(-1));
        k.insert("n", Value::from(0));
        return k;
    }
    let sum = |f: &dyn Fn(&CsvTrade) -> i128, taker_buy: bool| -> String {
        render_e8(inside.iter().filter(|t| !taker_buy || !t.buyer_maker).map(|t| f(t)).sum())
    };
    k.insert("o", Value::from(render_e8(inside[0].price)));
    k.insert("c", Value::from(render_e8(inside.last().unwrap().price)));
    k.insert("h", Value::from(render_e8(inside.iter().map(|t| t.price).max().unwrap())));
    k.insert("l", Value::from(render_e8(inside.iter().map(|t| t.price).min().unwrap())));
    k.insert("v", Value::from(sum(&|t| t.qty, false)));
    k.insert("q", Value::from(sum(&|t| t.quote, false)));
    k.insert("V", Value::from(sum(&|t| t.qty, true)));
    k.insert("Q", Value::from(sum(&|t| t.quote, true)));
    k.insert("f", Value::from(inside[0].id));
    k.insert("L", Value::from(inside.last().unwrap().id));
    k.insert("n", Value::from(inside.len()));
    k
}

pub fn as_map(k: &Value) -> BTreeMap<&'static str, Value> {
    let mut m = BTreeMap::new();
    for f in ["t", "T", "s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q", "B"] {
        m.insert(f, k.get(f).unwrap_or_else(|| panic!("kline object lacks {f}: {k}")).clone());
    }
    m
}

// ---------------------------------------------------------------- the test

/// Checks every closed K-line in `lines` against the oracle, and that none is missing.
/// Returns how many were checked and the intervals that closed.
pub fn check_klines<'a>(
    lines: impl IntoIterator<Item = &'a Value>,
    trades: &HashMap<String, Vec<CsvTrade>>,
) -> (usize, BTreeSet<String>) {
    let mut seen: BTreeSet<(String, String, i64)> = BTreeSet::new();
    let mut intervals = BTreeSet::new();
    let mut checked = 0;
    for v in lines.into_iter().filter(|v| v["kind"] == "kline" && v["k"]["x"] == true) {
        let k = &v["k"];
        let s = k["s"].as_str().unwrap();
        let i = k["i"].as_str().unwrap();
        let t = k["t"].as_i64().unwrap();
        assert!(seen.insert((s.to_owned(), i.to_owned(), t)), "closed twice: {k}");
        assert_eq!(as_map(k), oracle_kline(s, i, &trades[s], t), "K-line differs from the oracle: {k}");
        intervals.insert(i.to_owned());
        checked += 1;
    }
    for (s, ts) in trades {
        let last = ts.last().unwrap().time_ms;
        for i in INTERVALS {
            let mut open = bucket(i, ts[0].time_ms);
            // Every bucket before the last trade's must have closed.
            while next_bucket(i, open) <= bucket(i, last) {
                assert!(seen.contains(&(s.clone(), i.to_owned(), open)), "{s} {i} {open} never closed");
                open = next_bucket(i, open);
            }
        }
    }
    (checked, intervals)
}

/// The trades of a folder of `<SYMBOL>-trades.csv` files (as `--record` writes them), by symbol.
pub fn read_dataset(dir: &std::path::Path) -> HashMap<String, Vec<CsvTrade>> {
    let mut trades = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap();
        let sym = name.strip_suffix("-trades.csv").unwrap_or_else(|| panic!("unexpected file {name}")).to_owned();
        trades.insert(sym, read_csv(&p));
    }
    trades
}
