//! The statements, written once with `$N` placeholders; SQLite gets `?N` (the same numbering).

use crate::row::COLUMNS;

/// The schema this code writes and reads.
pub(crate) const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `sql` with its `$N` placeholders in this dialect.
    pub fn sql(self, sql: &str) -> String {
        match self {
            Dialect::Sqlite => sql.replace('$', "?"),
            Dialect::Postgres => sql.to_owned(),
        }
    }
}

/// The version table (created before anything else, so a migration can read it).
pub(crate) const CREATE_VERSION: &str = "CREATE TABLE IF NOT EXISTS mdbus_schema_version (version BIGINT NOT NULL)";

/// Schema version 1: `klines`, its open-row index and `mdbus_commits`.
pub(crate) fn create_v1(d: Dialect) -> Vec<String> {
    let (decimal, small, revision, boolean, tail) = match d {
        // TEXT affinity keeps `"1.50"` as written (NUMERIC affinity would turn it into a float).
        Dialect::Sqlite => ("TEXT", "INTEGER", "INTEGER", "INTEGER", " WITHOUT ROWID"),
        Dialect::Postgres => ("NUMERIC", "SMALLINT", "INTEGER", "BOOLEAN", ""),
    };
    let klines = format!(
        "CREATE TABLE IF NOT EXISTS klines (
            symbol TEXT NOT NULL,
            \"interval\" TEXT NOT NULL,
            open_time BIGINT NOT NULL,
            close_time BIGINT NOT NULL,
            price_scale {small} NOT NULL,
            qty_scale {small} NOT NULL,
            open {decimal} NOT NULL,
            high {decimal} NOT NULL,
            low {decimal} NOT NULL,
            close {decimal} NOT NULL,
            volume {decimal} NOT NULL,
            quote_volume {decimal} NOT NULL,
            taker_buy_volume {decimal} NOT NULL,
            taker_buy_quote_volume {decimal} NOT NULL,
            trade_count BIGINT NOT NULL,
            first_trade_id BIGINT NOT NULL,
            last_trade_id BIGINT NOT NULL,
            closed {boolean} NOT NULL,
            revision {revision} NOT NULL,
            flags {small} NOT NULL,
            updated_at_ms BIGINT NOT NULL,
            PRIMARY KEY (symbol, \"interval\", open_time)
        ){tail}"
    );
    vec![
        klines,
        "CREATE INDEX IF NOT EXISTS klines_open ON klines (symbol, \"interval\", open_time) WHERE NOT closed".into(),
        "CREATE TABLE IF NOT EXISTS mdbus_commits (
            bus TEXT PRIMARY KEY,
            snapshot_id BIGINT NOT NULL,
            covered_seq BIGINT NOT NULL,
            committed_at_ms BIGINT NOT NULL
        )"
        .into(),
    ]
}

/// `ON CONFLICT … DO UPDATE`: every non-key column from the new row, unless the stored row is
/// closed and the new one is open or an older revision.
pub(crate) fn on_conflict() -> String {
    let set: Vec<String> = COLUMNS[3..].iter().map(|c| format!("{c} = excluded.{c}")).collect();
    format!(
        " ON CONFLICT (symbol, \"interval\", open_time) DO UPDATE SET {} \
         WHERE NOT klines.closed OR (excluded.closed AND excluded.revision >= klines.revision)",
        set.join(", ")
    )
}

/// The single-row upsert (SQLite, one prepared statement per transaction).
pub(crate) fn upsert_one(d: Dialect) -> String {
    let params: Vec<String> = (1..=COLUMNS.len()).map(|i| format!("${i}")).collect();
    d.sql(&format!("INSERT INTO klines ({}) VALUES ({}){}", COLUMNS.join(", "), params.join(", "), on_conflict()))
}

/// The commit marker: replaced only by a snapshot that covers at least as much of the stream.
pub(crate) fn upsert_commit(d: Dialect) -> String {
    d.sql(
        "INSERT INTO mdbus_commits (bus, snapshot_id, covered_seq, committed_at_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (bus) DO UPDATE SET snapshot_id = excluded.snapshot_id, covered_seq = excluded.covered_seq, \
         committed_at_ms = excluded.committed_at_ms WHERE excluded.covered_seq >= mdbus_commits.covered_seq",
    )
}

pub(crate) fn select_commit(d: Dialect) -> String {
    d.sql("SELECT snapshot_id, covered_seq, committed_at_ms FROM mdbus_commits WHERE bus = $1")
}

/// The columns a K-line is read from (all but `updated_at_ms`), in their stored types (PostgreSQL
/// sends them in binary: NUMERIC's base-10000 digits, no text formatting on the server).
pub(crate) fn select_list() -> String {
    COLUMNS[..COLUMNS.len() - 1].join(", ")
}

pub(crate) fn select_open() -> String {
    format!("SELECT {} FROM klines WHERE NOT closed ORDER BY symbol, \"interval\", open_time", select_list())
}

/// `klines()`: `$1` symbol, `$2` interval, `$3`..`$4` the open-time range, `$5` the limit;
/// `newest_first` for the most recent rows (reversed by the caller).
pub(crate) fn select_range(d: Dialect, newest_first: bool) -> String {
    d.sql(&format!(
        "SELECT {} FROM klines WHERE symbol = $1 AND \"interval\" = $2 AND open_time >= $3 AND open_time <= $4 \
         ORDER BY open_time {} LIMIT $5",
        select_list(),
        if newest_first { "DESC" } else { "ASC" }
    ))
}
