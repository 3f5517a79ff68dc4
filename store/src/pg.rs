//! The PostgreSQL backend: one synchronous connection (no TLS); writes go through `COPY` into a
//! temporary table and one `INSERT … SELECT … ON CONFLICT`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, NoTls};

use crate::row::{Row, StoredRow, COLUMNS};
use crate::sql::{self, Dialect};
use crate::{RangeQuery, StoreError};

const D: Dialect = Dialect::Postgres;
/// Serialises concurrent migrations (an arbitrary constant: "mdbus" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d_64_62_75_73;
/// Bytes of `COPY` text sent per write.
const COPY_CHUNK: usize = 1 << 20;

pub(crate) struct Pg {
    client: Client,
    pub url: String,
    /// The session's staging table exists.
    staged: bool,
}

/// Connection-level trouble: refused, reset, closed, the server shutting down or starting up.
pub(crate) fn unavailable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return code.code().starts_with("08")
            || [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW]
                .iter()
                .any(|c| c == code)
            || *code == SqlState::TOO_MANY_CONNECTIONS;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn fail<'a>(url: &'a str, context: &'static str) -> impl FnOnce(postgres::Error) -> StoreError + 'a {
    move |source| StoreError::Postgres { url: url.to_owned(), context, source }
}

impl Pg {
    fn err(&self, context: &'static str) -> impl FnOnce(postgres::Error) -> StoreError + '_ {
        fail(&self.url, context)
    }

    /// `conn` is the URL with its password, `shown` the one for messages.
    pub fn open(conn: &str, shown: &str) -> Result<Pg, StoreError> {
        let url = shown.to_owned();
        let err = |context| fail(shown, context);
        let mut config = postgres::Config::from_str(conn).map_err(err("parsing the URL"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("mdbus");
        }
        let client = config.connect(NoTls).map_err(err("connecting"))?;
        let mut pg = Pg { client, url, staged: false };
        pg.migrate()?;
        Ok(pg)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        // A current schema needs no DDL (nor the right to run it: a reader may have none).
        if self.current_version()? == Some(sql::SCHEMA_VERSION) {
            return Ok(());
        }
        let url = &self.url;
        let err = |context| fail(url, context);
        let mut tx = self.client.transaction().map_err(err("starting migration"))?;
        // Two processes opening a fresh database at once would race on CREATE … IF NOT EXISTS.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(err("locking for migration"))?;
        tx.batch_execute(sql::CREATE_VERSION).map_err(err("creating mdbus_schema_version"))?;
        let found: Option<i64> = tx
            .query_one("SELECT max(version)::int8 FROM mdbus_schema_version", &[])
            .map_err(err("reading the schema version"))?
            .get(0);
        match found {
            None => {
                for stmt in sql::create_v1(D) {
                    tx.batch_execute(&stmt).map_err(err("creating the tables"))?;
                }
                tx.execute("INSERT INTO mdbus_schema_version (version) VALUES ($1)", &[&sql::SCHEMA_VERSION])
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

    /// The recorded schema version, `None` without the version table or a row in it.
    fn current_version(&mut self) -> Result<Option<i64>, StoreError> {
        let exists: bool = self
            .client
            .query_one("SELECT to_regclass('mdbus_schema_version') IS NOT NULL", &[])
            .map_err(self.err("looking for mdbus_schema_version"))?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let found: Option<i64> = self
            .client
            .query_one("SELECT max(version)::int8 FROM mdbus_schema_version", &[])
            .map_err(self.err("reading the schema version"))?
            .get(0);
        match found {
            Some(v) if v > sql::SCHEMA_VERSION => {
                Err(StoreError::SchemaTooNew { url: self.url.clone(), found: v, supported: sql::SCHEMA_VERSION })
            }
            v => Ok(v),
        }
    }

    pub fn write_snapshot(&mut self, bus: &str, marker: (i64, i64), rows: &[Row], now: i64) -> Result<(), StoreError> {
        if !self.staged && !rows.is_empty() {
            // This session's own table, emptied by every commit or rollback.
            let ddl = "CREATE TEMP TABLE IF NOT EXISTS mdbus_stage (LIKE klines) ON COMMIT DELETE ROWS";
            self.client.batch_execute(ddl).map_err(self.err("creating the staging table"))?;
            self.staged = true;
        }
        let url = &self.url;
        let err = |context| fail(url, context);
        let mut tx = self.client.transaction().map_err(err("starting a write"))?;
        if !rows.is_empty() {
            // One INSERT may not touch a row twice: keep, per K-line, the row that applying them
            // in order would leave.
            let rows = winners(rows);
            let copy = format!("COPY mdbus_stage ({}) FROM STDIN", COLUMNS.join(", "));
            let mut writer = tx.copy_in(&copy).map_err(err("starting COPY"))?;
            let mut buf = String::with_capacity(COPY_CHUNK + 1024);
            for r in &rows {
                copy_line(&mut buf, r, now);
                if buf.len() >= COPY_CHUNK {
                    writer.write_all(buf.as_bytes()).map_err(|source| StoreError::Io {
                        url: self.url.clone(),
                        context: "sending COPY data",
                        source,
                    })?;
                    buf.clear();
                }
            }
            writer.write_all(buf.as_bytes()).map_err(|source| StoreError::Io {
                url: self.url.clone(),
                context: "sending COPY data",
                source,
            })?;
            writer.finish().map_err(err("finishing COPY"))?;
            let insert = format!(
                "INSERT INTO klines ({cols}) SELECT {cols} FROM mdbus_stage{}",
                sql::on_conflict(),
                cols = COLUMNS.join(", ")
            );
            tx.execute(&insert, &[]).map_err(err("upserting the K-lines"))?;
        }
        tx.execute(&sql::upsert_commit(D), &[&bus, &marker.0, &marker.1, &now])
            .map_err(err("setting the commit marker"))?;
        tx.commit().map_err(err("committing"))
    }

    pub fn committed(&mut self, bus: &str) -> Result<Option<(i64, i64, i64)>, StoreError> {
        let row =
            self.client.query_opt(&sql::select_commit(D), &[&bus]).map_err(self.err("reading the commit marker"))?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    pub fn open_rows(&mut self) -> Result<Vec<StoredRow>, StoreError> {
        let rows = self.client.query(&sql::select_open(D), &[]).map_err(self.err("reading the open K-lines"))?;
        rows.iter().map(|r| read_row(r).map_err(self.err("decoding a K-line"))).collect()
    }

    pub fn range(&mut self, q: RangeQuery<'_>, newest_first: bool) -> Result<Vec<StoredRow>, StoreError> {
        let rows = self
            .client
            .query(&sql::select_range(D, newest_first), &[&q.0, &q.1, &q.2, &q.3, &q.4])
            .map_err(self.err("reading K-lines"))?;
        rows.iter().map(|r| read_row(r).map_err(self.err("decoding a K-line"))).collect()
    }

    pub fn count(&mut self) -> Result<i64, StoreError> {
        let row = self.client.query_one("SELECT count(*) FROM klines", &[]).map_err(self.err("counting K-lines"))?;
        Ok(row.get(0))
    }
}

fn read_row(r: &postgres::Row) -> Result<StoredRow, postgres::Error> {
    Ok(StoredRow {
        symbol: r.try_get(0)?,
        interval: r.try_get(1)?,
        open_time: r.try_get(2)?,
        close_time: r.try_get(3)?,
        price_scale: r.try_get(4)?,
        qty_scale: r.try_get(5)?,
        decimals: [
            r.try_get(6)?,
            r.try_get(7)?,
            r.try_get(8)?,
            r.try_get(9)?,
            r.try_get(10)?,
            r.try_get(11)?,
            r.try_get(12)?,
            r.try_get(13)?,
        ],
        trade_count: r.try_get(14)?,
        first_trade_id: r.try_get(15)?,
        last_trade_id: r.try_get(16)?,
        closed: r.try_get(17)?,
        revision: r.try_get(18)?,
        flags: r.try_get(19)?,
    })
}

/// Per K-line, the row that upserting `rows` one after the other would leave, in first-seen order.
fn winners(rows: &[Row]) -> Vec<&Row> {
    let mut at: HashMap<(mdbus_schema::Symbol, &str, i64), usize> = HashMap::with_capacity(rows.len());
    let mut out: Vec<&Row> = Vec::with_capacity(rows.len());
    for r in rows {
        match at.entry((r.symbol, r.interval, r.open_time)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(out.len());
                out.push(r);
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                let cur = &mut out[*o.get()];
                if !cur.closed || (r.closed && r.revision >= cur.revision) {
                    *cur = r;
                }
            }
        }
    }
    out
}

/// One `COPY … FROM STDIN` text line (symbols, intervals and decimals need no escaping).
fn copy_line(buf: &mut String, r: &Row, now: i64) {
    let _ = write!(
        buf,
        "{}\t{}\t{}\t{}\t{}\t{}",
        r.symbol.as_str(),
        r.interval,
        r.open_time,
        r.close_time,
        r.price_scale,
        r.qty_scale
    );
    for d in &r.decimals {
        buf.push('\t');
        buf.push_str(d);
    }
    let _ = writeln!(
        buf,
        "\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        r.trade_count,
        r.first_trade_id,
        r.last_trade_id,
        if r.closed { 't' } else { 'f' },
        r.revision,
        r.flags,
        now
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use mdbus_schema::{Interval, Kline, Symbol};

    use super::*;

    fn row(open_time: i64, closed: bool, revision: u16, close: i64) -> Row {
        let mut k = Kline::empty(Interval::M1, open_time, Symbol::new("BTCUSDT").unwrap(), 0, 2, 3, close);
        k.closed = closed;
        k.revision = revision;
        Row::from_kline(&k).unwrap()
    }

    #[test]
    fn duplicates_in_one_write_collapse_to_what_sequential_upserts_leave() {
        let rows = vec![
            row(0, false, 0, 1),
            row(60_000, true, 1, 2),
            row(0, false, 0, 3),      // a later open update wins over an open one
            row(60_000, false, 0, 4), // an open row never replaces a closed one
            row(60_000, true, 0, 5),  // nor does an older revision
            row(60_000, true, 1, 6),  // the same revision re-sent does
            row(120_000, true, 2, 7),
            row(120_000, true, 3, 8),
        ];
        let w = winners(&rows);
        let got: Vec<(i64, &str)> = w.iter().map(|r| (r.open_time, r.decimals[3].as_str())).collect();
        assert_eq!(got, vec![(0, "0.03"), (60_000, "0.06"), (120_000, "0.08")]);
    }

    #[test]
    fn copy_lines_have_one_field_per_column() {
        let mut buf = String::new();
        copy_line(&mut buf, &row(0, true, 0, 1), 42);
        assert!(buf.ends_with('\n'));
        assert_eq!(buf.trim_end().split('\t').count(), COLUMNS.len());
    }
}
