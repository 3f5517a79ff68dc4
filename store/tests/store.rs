//! The store against both backends: a SQLite file and a PostgreSQL server of the test's own
//! (`PgServer`; `scripts/test.sh` installs PostgreSQL where it is missing). Every check runs on
//! both; the outage test is PostgreSQL's.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use mdbus_schema::body::{KLINE_FLAG_AMENDED, KLINE_FLAG_FEED_GAP};
use mdbus_schema::{Interval, Kline, Symbol};
use mdbus_store::testing::PgServer;
use mdbus_store::{DbUrl, Store};

/// A fresh folder under `target/tmp`, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "store-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A database of each kind; the server and folders live as long as this.
struct Dbs {
    urls: Vec<DbUrl>,
    _pg: PgServer,
    _dirs: (TempDir, TempDir),
}

fn dbs(tag: &str) -> Dbs {
    let sqlite_dir = TempDir::new(&format!("{tag}-sqlite"));
    let pg_dir = TempDir::new(&format!("{tag}-pg"));
    let pg = PgServer::start(&pg_dir.0).unwrap_or_else(|e| panic!("{e}"));
    let urls = vec![DbUrl::Sqlite(sqlite_dir.0.join("klines.db")), pg.url().parse().unwrap()];
    Dbs { urls, _pg: pg, _dirs: (sqlite_dir, pg_dir) }
}

fn kline(symbol: &str, interval: Interval, open_time: i64) -> Kline {
    let mut k = Kline::empty(interval, open_time, Symbol::new(symbol).unwrap(), 7, 2, 6, 8_723_201);
    k.first_trade_id = 100;
    k.last_trade_id = 104;
    k.trade_count = 5;
    k.high = 8_723_500;
    k.low = 8_723_100;
    k.close = 8_723_400;
    k.volume = 1_250_000;
    k.quote_volume = 109_042_512_500_000;
    k.taker_buy_volume = 250_000;
    k.taker_buy_quote_volume = 21_808_502_500_000;
    k
}

/// As read back: the database knows no symbol ids.
fn stored(mut k: Kline) -> Kline {
    k.symbol_id = 0;
    k
}

fn extremes() -> Vec<Kline> {
    let mut a = kline("BTCUSDT", Interval::M1, 1_700_000_040_000);
    a.price_scale = 0;
    a.qty_scale = 18;
    a.open = i64::MAX;
    a.high = i64::MAX;
    a.low = i64::MIN;
    a.close = i64::MIN;
    a.volume = i128::MAX;
    a.quote_volume = i128::MIN;
    a.taker_buy_volume = -1;
    a.taker_buy_quote_volume = i128::MAX;
    a.trade_count = i64::MAX as u64;
    a.first_trade_id = i64::MIN;
    a.last_trade_id = i64::MAX;
    a.closed = true;
    a.revision = u16::MAX;
    a.flags = u8::MAX;
    let mut b = kline("ETHBTC", Interval::Mo1, -2_678_400_000);
    b.price_scale = 18;
    b.qty_scale = 0;
    b.open = 1;
    b.high = 1;
    b.low = 1;
    b.close = 1;
    b.volume = 0;
    b.quote_volume = 10_i128.pow(37);
    b.taker_buy_volume = 0;
    b.taker_buy_quote_volume = -(10_i128.pow(37));
    b.flags = KLINE_FLAG_FEED_GAP;
    let mut c = Kline::empty(Interval::S1, 0, Symbol::new("A").unwrap(), 0, 8, 8, 0);
    c.closed = true;
    vec![a, b, c]
}

#[test]
fn klines_round_trip_exactly_including_extreme_values() {
    let d = dbs("roundtrip");
    for url in &d.urls {
        let mut s = Store::open(url).unwrap();
        let mut rows = extremes();
        rows.push(kline("BTCUSDT", Interval::H1, 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000));
        s.write_snapshot("b", 1, 10, &rows).unwrap();
        assert_eq!(s.count().unwrap(), 4, "{url}");
        for k in &rows {
            let interval = k.interval().unwrap();
            let got = s.klines(k.symbol.as_str(), interval, Some(k.open_time), Some(k.open_time), 10).unwrap();
            assert_eq!(got, vec![stored(*k)], "{url}");
        }
        // By symbol, interval name and open time.
        let mut open: Vec<Kline> = rows.iter().filter(|k| !k.closed).map(|k| stored(*k)).collect();
        open.sort_by_key(|k| (k.symbol, k.interval().unwrap().as_str(), k.open_time));
        assert_eq!(s.open_klines().unwrap(), open, "{url}");
    }
}

#[test]
fn upserts_never_let_an_open_row_replace_a_closed_one_and_amendments_win() {
    let d = dbs("upsert");
    for url in &d.urls {
        let mut s = Store::open(url).unwrap();
        let t = 1_700_000_040_000;
        let mut open = kline("BTCUSDT", Interval::M1, t);
        s.write_snapshot("b", 1, 1, &[open]).unwrap();
        // A later update of the open K-line replaces it.
        open.close = 8_723_300;
        open.trade_count = 6;
        s.write_snapshot("b", 2, 2, &[open]).unwrap();
        assert_eq!(s.open_klines().unwrap(), vec![stored(open)], "{url}");

        let mut closed = open;
        closed.closed = true;
        closed.close = 8_723_250;
        s.write_snapshot("b", 3, 3, &[closed]).unwrap();
        // The same snapshot again, and a stale open update: nothing moves.
        s.write_snapshot("b", 3, 3, &[closed]).unwrap();
        s.write_snapshot("b", 4, 4, &[open]).unwrap();
        assert_eq!(s.klines("BTCUSDT", Interval::M1, None, None, 10).unwrap(), vec![stored(closed)], "{url}");
        assert!(s.open_klines().unwrap().is_empty(), "{url}");

        // An amended close (higher revision) replaces the close; an older revision does not.
        let mut amended = closed;
        amended.revision = 1;
        amended.flags = KLINE_FLAG_AMENDED;
        amended.volume += 1;
        s.write_snapshot("b", 5, 5, &[amended]).unwrap();
        s.write_snapshot("b", 6, 6, &[closed]).unwrap();
        assert_eq!(s.klines("BTCUSDT", Interval::M1, None, None, 10).unwrap(), vec![stored(amended)], "{url}");

        // Duplicates inside one write apply in order under the same rule.
        let t2 = t + 60_000;
        let mut a = kline("BTCUSDT", Interval::M1, t2);
        let mut b = a;
        b.closed = true;
        b.close = 1;
        a.close = 2;
        let mut c = b;
        c.close = 3;
        s.write_snapshot("b", 7, 7, &[a, b, a, c, a]).unwrap();
        assert_eq!(s.klines("BTCUSDT", Interval::M1, Some(t2), None, 10).unwrap(), vec![stored(c)], "{url}");
        assert_eq!(s.count().unwrap(), 2, "{url}");
    }
}

#[test]
fn commit_markers_are_per_bus_and_never_move_backwards() {
    let d = dbs("commits");
    for url in &d.urls {
        let mut s = Store::open(url).unwrap();
        assert_eq!(s.committed("a").unwrap(), None, "{url}");
        s.write_snapshot("a", 1, 100, &[]).unwrap();
        s.write_snapshot("b", 9, 5, &[kline("BTCUSDT", Interval::M1, 0)]).unwrap();
        let a = s.committed("a").unwrap().unwrap();
        assert_eq!((a.snapshot_id, a.covered_seq), (1, 100), "{url}");
        assert!(a.committed_at_ms > 1_600_000_000_000, "{url}");
        // A re-sent older snapshot leaves the marker where it is; the rows still count.
        s.write_snapshot("a", 0, 99, &[kline("ETHUSDT", Interval::M1, 0)]).unwrap();
        assert_eq!(s.committed("a").unwrap().unwrap(), a, "{url}");
        assert_eq!(s.count().unwrap(), 2, "{url}");
        // A newer broker's snapshot ids may restart: the stream position decides.
        s.write_snapshot("a", 1, 250, &[]).unwrap();
        let a2 = s.committed("a").unwrap().unwrap();
        assert_eq!((a2.snapshot_id, a2.covered_seq), (1, 250), "{url}");
        let b = s.committed("b").unwrap().unwrap();
        assert_eq!((b.snapshot_id, b.covered_seq), (9, 5), "{url}");
        assert!(s.write_snapshot("a", 1, u64::MAX, &[]).unwrap_err().to_string().contains("covered_seq"), "{url}");
    }
}

#[test]
fn klines_follow_binance_start_end_and_limit_semantics() {
    let d = dbs("range");
    let minute = |i: i64| 1_700_000_040_000 + i * 60_000;
    for url in &d.urls {
        let mut s = Store::open(url).unwrap();
        let mut rows: Vec<Kline> = (0..10).map(|i| kline("BTCUSDT", Interval::M1, minute(i))).collect();
        for k in &mut rows[..9] {
            k.closed = true;
        }
        // Other symbols and intervals in the same table are not mixed in.
        rows.push(kline("ETHUSDT", Interval::M1, minute(3)));
        rows.push(kline("BTCUSDT", Interval::M5, 1_700_000_100_000));
        s.write_snapshot("b", 1, 1, &rows).unwrap();
        let times = |v: Vec<Kline>| v.iter().map(|k| (k.open_time - minute(0)) / 60_000).collect::<Vec<_>>();
        let q = |s: &mut Store, start, end, limit| times(s.klines("BTCUSDT", Interval::M1, start, end, limit).unwrap());
        // No start: the most recent `limit`, ascending, the open one last.
        assert_eq!(q(&mut s, None, None, 500), (0..10).collect::<Vec<_>>(), "{url}");
        assert_eq!(q(&mut s, None, None, 3), vec![7, 8, 9], "{url}");
        // End only: the most recent up to it (inclusive on open time).
        assert_eq!(q(&mut s, None, Some(minute(5)), 2), vec![4, 5], "{url}");
        assert_eq!(q(&mut s, None, Some(minute(5) - 1), 2), vec![3, 4], "{url}");
        // Start: the first `limit` from it (inclusive).
        assert_eq!(q(&mut s, Some(minute(2)), None, 3), vec![2, 3, 4], "{url}");
        assert_eq!(q(&mut s, Some(minute(2) + 1), None, 2), vec![3, 4], "{url}");
        assert_eq!(q(&mut s, Some(minute(2)), Some(minute(4)), 1000), vec![2, 3, 4], "{url}");
        assert_eq!(q(&mut s, Some(minute(8)), Some(minute(100)), 1000), vec![8, 9], "{url}");
        assert!(q(&mut s, Some(minute(5)), Some(minute(4)), 10).is_empty(), "{url}");
        assert!(q(&mut s, Some(minute(20)), None, 10).is_empty(), "{url}");
        assert!(q(&mut s, None, None, 0).is_empty(), "{url}");
        assert!(s.klines("XRPUSDT", Interval::M1, None, None, 10).unwrap().is_empty(), "{url}");
        assert_eq!(s.klines("BTCUSDT", Interval::M5, None, None, 10).unwrap().len(), 1, "{url}");
    }
}

#[test]
fn opening_twice_keeps_the_schema_and_the_rows() {
    let d = dbs("reopen");
    for url in &d.urls {
        let k = kline("BTCUSDT", Interval::M1, 0);
        Store::open(url).unwrap().write_snapshot("b", 1, 1, &[k]).unwrap();
        let mut again = Store::open(url).unwrap();
        let mut third = Store::open(url).unwrap();
        assert_eq!(again.count().unwrap(), 1, "{url}");
        assert_eq!(third.open_klines().unwrap(), vec![stored(k)], "{url}");
        assert_eq!(again.committed("b").unwrap().unwrap().covered_seq, 1, "{url}");
    }
}

#[test]
fn a_stopped_server_is_unavailable_and_a_new_store_works_once_it_is_back() {
    let dir = TempDir::new("outage");
    let mut pg = PgServer::start(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let url: DbUrl = pg.url().parse().unwrap();
    let mut s = Store::open(&url).unwrap();
    let k = kline("BTCUSDT", Interval::M1, 0);
    s.write_snapshot("b", 1, 1, &[k]).unwrap();

    pg.stop().unwrap();
    let e = s.write_snapshot("b", 2, 2, &[k]).unwrap_err();
    assert!(e.is_unavailable(), "write on a stopped server: {e}");
    let e = s.committed("b").unwrap_err();
    assert!(e.is_unavailable(), "read on a stopped server: {e}");
    let e = Store::open(&url).unwrap_err();
    assert!(e.is_unavailable(), "connect to a stopped server: {e}");
    assert!(!e.to_string().is_empty());

    pg.start_again().unwrap();
    let mut s = Store::open(&url).unwrap();
    assert_eq!(s.committed("b").unwrap().unwrap().covered_seq, 1);
    s.write_snapshot("b", 2, 2, &[k]).unwrap();
    assert_eq!(s.count().unwrap(), 1);
}

#[test]
fn data_errors_are_not_unavailability() {
    let dir = TempDir::new("invalid");
    let mut s = Store::open(&DbUrl::Sqlite(dir.0.join("k.db"))).unwrap();
    let mut k = kline("BTCUSDT", Interval::M1, 0);
    k.interval = 99;
    let e = s.write_snapshot("b", 1, 1, &[k]).unwrap_err();
    assert!(!e.is_unavailable() && e.to_string().contains("interval"), "{e}");
    let mut k = kline("BTCUSDT", Interval::M1, 0);
    k.price_scale = 10;
    k.qty_scale = 10;
    assert!(s.write_snapshot("b", 1, 1, &[k]).is_err());
    // Nothing of a failed snapshot is kept.
    assert_eq!(s.count().unwrap(), 0);
    assert_eq!(s.committed("b").unwrap(), None);
}

#[test]
fn a_schema_from_a_newer_version_is_refused() {
    let d = dbs("newer");
    for url in &d.urls {
        Store::open(url).unwrap();
        let bump = "INSERT INTO mdbus_schema_version (version) VALUES (99)";
        match url {
            DbUrl::Sqlite(path) => {
                rusqlite::Connection::open(path).unwrap().execute_batch(bump).unwrap();
            }
            DbUrl::Postgres(u) => {
                postgres::Client::connect(u, postgres::NoTls).unwrap().batch_execute(bump).unwrap();
            }
        }
        let e = Store::open(url).unwrap_err();
        assert!(!e.is_unavailable() && e.to_string().contains("99"), "{url}: {e}");
    }
}

#[test]
fn a_postgres_role_that_may_only_read_can_query() {
    let dir = TempDir::new("reader");
    let pg = PgServer::start(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let url: DbUrl = pg.url().parse().unwrap();
    let k = kline("BTCUSDT", Interval::M1, 0);
    Store::open(&url).unwrap().write_snapshot("b", 1, 1, &[k]).unwrap();
    let mut admin = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "CREATE ROLE reader LOGIN; GRANT SELECT ON klines, mdbus_commits, mdbus_schema_version TO reader",
        )
        .unwrap();
    let reader: DbUrl = pg.url().replace("postgres@", "reader@").parse().unwrap();
    let mut s = Store::open(&reader).unwrap();
    assert_eq!(s.klines("BTCUSDT", Interval::M1, None, None, 10).unwrap(), vec![stored(k)]);
    assert_eq!(s.committed("b").unwrap().unwrap().covered_seq, 1);
    let e = s.write_snapshot("b", 2, 2, &[k]).unwrap_err();
    assert!(!e.is_unavailable(), "{e}");
}

/// A row the store did not write decodes to an error naming what is wrong, never to a panic or a
/// wrong K-line, on the restart read and on the range read alike.
#[test]
fn corrupt_rows_are_errors() {
    let d = dbs("corrupt");
    let k = kline("BTCUSDT", Interval::M1, 1_700_000_040_000);
    let common = [
        ("open = '1.005'", "open \"1.005\" at scale 2"),
        ("volume = '1e40'", "volume"),
        ("taker_buy_quote_volume = '-1701411834604692317316873037158841057.29'", "taker_buy_quote_volume"),
        ("open = '92233720368547758.08'", "open out of range"),
        ("price_scale = 300", "price_scale 300"),
        ("price_scale = 10, qty_scale = 10", "scales 10 + 10"),
        ("revision = -1", "revision -1"),
        ("flags = 256", "flags 256"),
        ("trade_count = -5", "trade_count -5"),
        ("symbol = 'BTC-USDT'", "symbol"),
        ("\"interval\" = '7m'", "7m"),
    ];
    for url in &d.urls {
        let mut s = Store::open(url).unwrap();
        let specific: &[(&str, &str)] = match url {
            DbUrl::Sqlite(_) => &[
                ("volume = '12x'", "volume \"12x\""),
                ("open = x'31'", "open"),
                ("symbol = CAST(x'ff' AS TEXT)", "utf-8"),
            ],
            DbUrl::Postgres(_) => &[("open = 'NaN'", "open \"NaN\""), ("high = '-Infinity'", "high \"-Infinity\"")],
        };
        let exec = |sql: &str| match url {
            DbUrl::Sqlite(path) => {
                rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
            }
            DbUrl::Postgres(u) => {
                postgres::Client::connect(u, postgres::NoTls).unwrap().batch_execute(sql).unwrap();
            }
        };
        for (set, mention) in common.iter().chain(specific) {
            exec("DELETE FROM klines");
            s.write_snapshot("b", 1, 1, &[k]).unwrap();
            assert_eq!(s.open_klines().unwrap(), vec![stored(k)], "{url}");
            exec(&format!("UPDATE klines SET {set}"));
            let e = s.open_klines().unwrap_err();
            assert!(!e.is_unavailable() && e.to_string().contains(mention), "{url} {set}: {e}");
            // The range read finds the row unless its key is what was damaged.
            let range = s.klines("BTCUSDT", Interval::M1, None, None, 10);
            if set.starts_with("symbol") || set.starts_with("\"interval\"") {
                assert_eq!(range.unwrap(), vec![], "{url} {set}");
            } else {
                let e = range.unwrap_err();
                assert!(e.to_string().contains(mention), "{url} {set}: {e}");
            }
        }
    }
}
