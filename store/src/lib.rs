//! K-line persistence: the `klines` table and the per-bus commit marker, in SQLite or PostgreSQL.
//!
//! Upstream: the broker's batch writer hands [`Store::write_snapshot`] the K-lines of one snapshot
//! (every K-line closed and every open K-line changed since the last committed one) with the bus
//! sequence number the snapshot covers. Downstream: the broker reads [`Store::committed`] and
//! [`Store::open_klines`] to restart where the database is, and the gateway serves Binance's
//! `GET /api/v3/klines` from [`Store::klines`].
//!
//! # Tables
//!
//! `klines`, one row per K-line, primary key `(symbol, interval, open_time)`:
//!
//! | column | PostgreSQL | SQLite | from [`Kline`] |
//! |---|---|---|---|
//! | `symbol` | TEXT | TEXT | `symbol` (`BTCUSDT`) |
//! | `interval` | TEXT | TEXT | `interval` as Binance names it (`1s` … `1M`) |
//! | `open_time`, `close_time` | BIGINT | INTEGER | `t`, `T` (ms since the epoch) |
//! | `price_scale`, `qty_scale` | SMALLINT | INTEGER | fractional digits of prices / quantities |
//! | `open`, `high`, `low`, `close` | NUMERIC | TEXT | exact decimals at `price_scale` |
//! | `volume`, `taker_buy_volume` | NUMERIC | TEXT | exact decimals at `qty_scale` |
//! | `quote_volume`, `taker_buy_quote_volume` | NUMERIC | TEXT | exact decimals at `price_scale + qty_scale` |
//! | `trade_count`, `first_trade_id`, `last_trade_id` | BIGINT | INTEGER | `n`, `f`, `L` (−1 when empty) |
//! | `closed` | BOOLEAN | INTEGER 0/1 | `x` |
//! | `revision` | INTEGER | INTEGER | 0, +1 per amended close |
//! | `flags` | SMALLINT | INTEGER | `KLINE_FLAG_*` bits (amended, feed gap, empty skipped) |
//! | `updated_at_ms` | BIGINT | INTEGER | when the row was last written (the writer's clock) |
//!
//! Decimals are stored as decimal strings with exactly the digits their scale needs (`"87232.01"`),
//! so a K-line reads back bit for bit, `i128` volumes included (SQLite has no exact decimal type;
//! TEXT keeps the digits). The partial index `klines_open … WHERE NOT closed` holds only the open
//! rows, so [`Store::open_klines`] stays cheap with millions of closed ones. A write never lets an
//! open row replace a closed one; an amended close (a revision at least the stored one) does:
//!
//! ```sql
//! INSERT … ON CONFLICT (symbol, interval, open_time) DO UPDATE SET …
//! WHERE NOT klines.closed OR (excluded.closed AND excluded.revision >= klines.revision)
//! ```
//!
//! `mdbus_commits(bus TEXT PRIMARY KEY, snapshot_id, covered_seq, committed_at_ms)`: per bus, the
//! last snapshot written, in the same transaction as its rows. It is replaced only by a snapshot
//! whose `covered_seq` is at least the stored one, so `covered_seq` never moves backwards.
//!
//! `mdbus_schema_version(version)`: the layout's version (1); [`Store::open`] creates or checks
//! it, idempotently, and refuses a database written by a newer version.
//!
//! # Durability and sharing
//!
//! SQLite runs in WAL mode with `synchronous=FULL` (a returned `write_snapshot` is on disk) and a
//! busy timeout, so one writer and readers (the gateway) share the file. PostgreSQL commits with
//! the server's `synchronous_commit`. Rows go to PostgreSQL through `COPY` into a temporary
//! table and one `INSERT … SELECT … ON CONFLICT`, to SQLite through one prepared statement reused
//! inside the transaction.
//!
//! # Reads
//!
//! Rows are decoded where the driver holds them (SQLite's column text, PostgreSQL's binary
//! results with NUMERIC as base-10000 digits), nothing allocated per row; a row that does not
//! decode is [`StoreError::Corrupt`]. The restart read walks the partial index `klines_open`; on
//! SQLite each open row then costs one primary-key lookup, which is most of what the read costs
//! (`cargo run --release -p mdbus-store --example read_open` times it).
#![forbid(unsafe_code)]

mod pg;
mod row;
mod sql;
mod sqlite;
#[doc(hidden)]
pub mod testing;
mod url;

use mdbus_schema::{Interval, Kline};

pub use url::{DbUrl, DbUrlParseError};

/// The commit marker of one bus: the last snapshot written and the stream position it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub snapshot_id: u64,
    pub covered_seq: u64,
    pub committed_at_ms: i64,
}

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite {url}: {context}: {source}")]
    Sqlite { url: String, context: &'static str, source: rusqlite::Error },
    #[error("postgres {url}: {context}: {source}")]
    Postgres { url: String, context: &'static str, source: postgres::Error },
    #[error("{url}: {context}: {source}")]
    Io { url: String, context: &'static str, source: std::io::Error },
    /// A K-line the tables cannot hold exactly (bad interval, scales, a count beyond `i64`).
    #[error("cannot store K-line {0}")]
    InvalidKline(String),
    /// A value beyond what its column holds (a sequence number above `i64::MAX`).
    #[error("{0}")]
    OutOfRange(String),
    /// A stored row or marker that does not decode (written by something else).
    #[error("corrupt data in the database: {0}")]
    Corrupt(String),
    #[error("{url}: schema version {found} is newer than this build's {supported}: upgrade mdbus")]
    SchemaTooNew { url: String, found: i64, supported: i64 },
}

impl StoreError {
    /// True when the database could not be reached or went away (connection refused, reset or
    /// closed, the server shutting down or not yet accepting connections; a SQLite file busy or
    /// locked past the timeout): back off, open a new [`Store`] and retry. False for errors that
    /// a retry would repeat (bad data, bad SQL, a full disk, authentication).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Postgres { source, .. } => pg::unavailable(source),
            StoreError::Sqlite { source, .. } => sqlite::unavailable(source),
            StoreError::Io { .. } => true,
            _ => false,
        }
    }
}

/// One database connection (send it to a writer thread; it is not shared between threads).
pub struct Store {
    backend: Backend,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(Box<pg::Pg>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match &self.backend {
            Backend::Sqlite(s) => &s.url,
            Backend::Postgres(p) => &p.url,
        };
        f.debug_struct("Store").field("url", url).finish_non_exhaustive()
    }
}

impl Store {
    /// Connects and creates or checks the schema (idempotent; concurrent opens are serialised).
    pub fn open(url: &DbUrl) -> Result<Store, StoreError> {
        let backend = match url {
            DbUrl::Sqlite(path) => Backend::Sqlite(sqlite::Sqlite::open(path)?),
            DbUrl::Postgres(u) => Backend::Postgres(Box::new(pg::Pg::open(u, &url.to_string())?)),
        };
        Ok(Store { backend })
    }

    /// One transaction: upsert every row, then set the bus's committed marker. Idempotent: the
    /// same snapshot written twice leaves the same rows and marker. Rows of the same K-line within
    /// `rows` apply in order under the upsert rule (see the crate docs).
    pub fn write_snapshot(
        &mut self,
        bus: &str,
        snapshot_id: u64,
        covered_seq: u64,
        rows: &[Kline],
    ) -> Result<(), StoreError> {
        let big = |name: &str, v: u64| {
            i64::try_from(v).map_err(|_| StoreError::OutOfRange(format!("{name} {v} above {}", i64::MAX)))
        };
        let marker = (big("snapshot_id", snapshot_id)?, big("covered_seq", covered_seq)?);
        let rows = rows.iter().map(row::Row::from_kline).collect::<Result<Vec<_>, _>>()?;
        let now = now_ms();
        match &mut self.backend {
            Backend::Sqlite(s) => s.write_snapshot(bus, marker, &rows, now),
            Backend::Postgres(p) => p.write_snapshot(bus, marker, &rows, now),
        }
    }

    /// The bus's commit marker, if a snapshot was ever written for it.
    pub fn committed(&mut self, bus: &str) -> Result<Option<Committed>, StoreError> {
        let raw = match &mut self.backend {
            Backend::Sqlite(s) => s.committed(bus)?,
            Backend::Postgres(p) => p.committed(bus)?,
        };
        raw.map(|(snapshot_id, covered_seq, committed_at_ms)| {
            let unsigned = |name: &str, v: i64| {
                u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("mdbus_commits {bus:?}: {name} {v}")))
            };
            Ok(Committed {
                snapshot_id: unsigned("snapshot_id", snapshot_id)?,
                covered_seq: unsigned("covered_seq", covered_seq)?,
                committed_at_ms,
            })
        })
        .transpose()
    }

    /// Every open (not closed) K-line row, by symbol, interval and open time: the broker's
    /// restart state. `symbol_id` is 0 in the result.
    pub fn open_klines(&mut self) -> Result<Vec<Kline>, StoreError> {
        match &mut self.backend {
            Backend::Sqlite(s) => s.open_klines(),
            Backend::Postgres(p) => p.open_klines(),
        }
    }

    /// Binance `/api/v3/klines` semantics: ascending `open_time`; `start_ms` / `end_ms` filter on
    /// `open_time`, inclusive; with `start_ms`, the first `limit` rows from it; without, the most
    /// recent `limit` rows (up to `end_ms` if given). `limit` is the caller's (Binance: 1..=1000).
    /// `symbol` is matched exactly (upper case, as stored).
    pub fn klines(
        &mut self,
        symbol: &str,
        interval: Interval,
        start_ms: Option<i64>,
        end_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Kline>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let newest_first = start_ms.is_none();
        let (from, to) = (start_ms.unwrap_or(i64::MIN), end_ms.unwrap_or(i64::MAX));
        if limit == 0 || from > to {
            return Ok(Vec::new());
        }
        let q = (symbol, interval.as_str(), from, to, limit);
        let mut rows = match &mut self.backend {
            Backend::Sqlite(s) => s.range(q, newest_first)?,
            Backend::Postgres(p) => p.range(q, newest_first)?,
        };
        if newest_first {
            rows.reverse();
        }
        Ok(rows)
    }

    /// Number of rows in `klines` (tests, benchmarks).
    pub fn count(&mut self) -> Result<u64, StoreError> {
        let n = match &mut self.backend {
            Backend::Sqlite(s) => s.count()?,
            Backend::Postgres(p) => p.count()?,
        };
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("count {n}")))
    }
}

/// `klines()`'s bound parameters: symbol, interval name, open-time range, limit.
pub(crate) type RangeQuery<'a> = (&'a str, &'static str, i64, i64, i64);

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    /// The broker hands the store to its writer thread.
    #[test]
    fn store_is_send() {
        fn send<T: Send>() {}
        send::<super::Store>();
        send::<super::StoreError>();
    }
}
