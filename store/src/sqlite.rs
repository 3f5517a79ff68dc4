//! The SQLite backend: one connection in WAL mode, `synchronous=FULL`, a busy timeout.

use std::path::Path;
use std::time::Duration;

use mdbus_schema::Kline;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use crate::row::{DecimalText, Row, StoredRow, COLUMNS};
use crate::sql::{self, Dialect};
use crate::{RangeQuery, StoreError};

const D: Dialect = Dialect::Sqlite;
/// How long a statement waits for the other side's lock (a writer's commit, a reader's checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Sqlite {
    conn: Connection,
    pub url: String,
}

pub(crate) fn unavailable(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

fn fail<'a>(url: &'a str, context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Sqlite { url: url.to_owned(), context, source }
}

impl Sqlite {
    fn err(&self, context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        fail(&self.url, context)
    }

    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
        let url = format!("sqlite:{}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                url: url.clone(),
                context: "creating the database folder",
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            url: url.clone(),
            context: "opening the database",
            source,
        })?;
        let mut s = Sqlite { conn, url };
        s.conn.busy_timeout(BUSY_TIMEOUT).map_err(s.err("setting the busy timeout"))?;
        s.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)).map_err(s.err("enabling WAL"))?;
        s.conn.execute_batch("PRAGMA synchronous=FULL").map_err(s.err("setting synchronous=FULL"))?;
        s.migrate()?;
        Ok(s)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        // A current schema needs no write lock (readers open the file while the writer writes).
        let exists: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mdbus_schema_version')",
                [],
                |r| r.get(0),
            )
            .map_err(self.err("looking for mdbus_schema_version"))?;
        if exists {
            let found: Option<i64> = self
                .conn
                .query_row("SELECT max(version) FROM mdbus_schema_version", [], |r| r.get(0))
                .map_err(self.err("reading the schema version"))?;
            if found == Some(sql::SCHEMA_VERSION) {
                return Ok(());
            }
        }
        let url = &self.url;
        let err = |context| fail(url, context);
        // IMMEDIATE: the write lock up front, so two processes opening a fresh file take turns.
        let tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err("starting migration"))?;
        tx.execute_batch(sql::CREATE_VERSION).map_err(err("creating mdbus_schema_version"))?;
        let found: Option<i64> = tx
            .query_row("SELECT max(version) FROM mdbus_schema_version", [], |r| r.get(0))
            .map_err(err("reading the schema version"))?;
        match found {
            None => {
                for stmt in sql::create_v1(D) {
                    tx.execute_batch(&stmt).map_err(err("creating the tables"))?;
                }
                tx.execute("INSERT INTO mdbus_schema_version (version) VALUES (?1)", [sql::SCHEMA_VERSION])
                    .map_err(err("recording the schema version"))?;
            }
            Some(v) if v > sql::SCHEMA_VERSION => {
                return Err(StoreError::SchemaTooNew {
                    url: self.url.clone(),
                    found: v,
                    supported: sql::SCHEMA_VERSION,
                })
            }
            Some(_) => {}
        }
        tx.commit().map_err(err("committing the migration"))
    }

    pub fn write_snapshot(&mut self, bus: &str, marker: (i64, i64), rows: &[Row], now: i64) -> Result<(), StoreError> {
        let url = &self.url;
        let err = |context| fail(url, context);
        let tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err("starting a write"))?;
        {
            let mut upsert = tx.prepare_cached(&sql::upsert_one(D)).map_err(err("preparing the upsert"))?;
            for r in rows {
                let [o, h, l, c, v, q, tv, tq] = &r.decimals;
                upsert
                    .execute(params![
                        r.symbol.as_str(),
                        r.interval,
                        r.open_time,
                        r.close_time,
                        r.price_scale,
                        r.qty_scale,
                        o,
                        h,
                        l,
                        c,
                        v,
                        q,
                        tv,
                        tq,
                        r.trade_count,
                        r.first_trade_id,
                        r.last_trade_id,
                        r.closed,
                        r.revision,
                        r.flags,
                        now
                    ])
                    .map_err(err("upserting a K-line"))?;
            }
            tx.prepare_cached(&sql::upsert_commit(D))
                .and_then(|mut s| s.execute(params![bus, marker.0, marker.1, now]))
                .map_err(err("setting the commit marker"))?;
        }
        tx.commit().map_err(err("committing"))
    }

    pub fn committed(&mut self, bus: &str) -> Result<Option<(i64, i64, i64)>, StoreError> {
        self.conn
            .prepare_cached(&sql::select_commit(D))
            .and_then(|mut s| s.query_row([bus], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
            .map_err(self.err("reading the commit marker"))
    }

    pub fn open_klines(&mut self) -> Result<Vec<Kline>, StoreError> {
        self.read(&sql::select_open(), [], "reading the open K-lines")
    }

    pub fn range(&mut self, q: RangeQuery<'_>, newest_first: bool) -> Result<Vec<Kline>, StoreError> {
        let sql = sql::select_range(D, newest_first);
        self.read(&sql, params![q.0, q.1, q.2, q.3, q.4], "reading K-lines")
    }

    pub fn count(&mut self) -> Result<i64, StoreError> {
        self.conn.query_row("SELECT count(*) FROM klines", [], |r| r.get(0)).map_err(self.err("counting K-lines"))
    }

    /// Steps through the rows and decodes each from the statement's own buffers (no copies).
    fn read(&self, sql: &str, params: impl rusqlite::Params, context: &'static str) -> Result<Vec<Kline>, StoreError> {
        let err = |source| StoreError::Sqlite { url: self.url.clone(), context, source };
        let mut stmt = self.conn.prepare_cached(sql).map_err(err)?;
        let mut rows = stmt.query(params).map_err(err)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(err)? {
            out.push(read_row(r).map_err(err)?.to_kline()?);
        }
        Ok(out)
    }
}

/// Text column `i`, borrowed (valid until the next step).
fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> rusqlite::Result<&'r [u8]> {
    match r.get_ref(i)? {
        ValueRef::Text(t) => Ok(t),
        v => Err(rusqlite::Error::InvalidColumnType(i, COLUMNS[i].to_owned(), v.data_type())),
    }
}

fn utf8<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
    std::str::from_utf8(text(r, i)?).map_err(|e| rusqlite::Error::Utf8Error(i, e))
}

fn read_row<'r>(r: &'r rusqlite::Row<'_>) -> rusqlite::Result<StoredRow<'r, DecimalText<'r>>> {
    let d = |i: usize| text(r, i).map(DecimalText);
    Ok(StoredRow {
        symbol: utf8(r, 0)?,
        interval: utf8(r, 1)?,
        open_time: r.get(2)?,
        close_time: r.get(3)?,
        price_scale: r.get(4)?,
        qty_scale: r.get(5)?,
        decimals: [d(6)?, d(7)?, d(8)?, d(9)?, d(10)?, d(11)?, d(12)?, d(13)?],
        trade_count: r.get(14)?,
        first_trade_id: r.get(15)?,
        last_trade_id: r.get(16)?,
        closed: r.get(17)?,
        revision: r.get(18)?,
        flags: r.get(19)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// `open_klines` must not scan the closed rows: SQLite picks the partial index.
    #[test]
    fn open_rows_query_uses_the_partial_index() {
        let dir = std::env::temp_dir().join(format!("mdbus-store-plan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = super::Sqlite::open(&dir.join("k.db")).unwrap();
        let plan: Vec<String> = s
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", super::sql::select_open()))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(plan.iter().any(|p| p.contains("klines_open")), "{plan:?}");
    }
}
