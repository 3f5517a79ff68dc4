//! The PostgreSQL backend: one synchronous connection (no TLS); writes go through `COPY` into a
//! temporary table and one `INSERT … SELECT … ON CONFLICT`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;
use std::time::Duration;

use mdbus_schema::Kline;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{FromSql, ToSql, Type};
use postgres::{Client, NoTls, Statement};

use crate::row::{self, Row, StoredDecimal, StoredRow, COLUMNS};
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
    /// The reads prepared so far, by [`Read`].
    reads: [Option<Statement>; 3],
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
        let mut pg = Pg { client, url, staged: false, reads: [None, None, None] };
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

    pub fn open_klines(&mut self) -> Result<Vec<Kline>, StoreError> {
        self.read(Read::Open, &[], "reading the open K-lines")
    }

    pub fn range(&mut self, q: RangeQuery<'_>, newest_first: bool) -> Result<Vec<Kline>, StoreError> {
        let which = if newest_first { Read::NewestFirst } else { Read::OldestFirst };
        self.read(which, &[&q.0, &q.1, &q.2, &q.3, &q.4], "reading K-lines")
    }

    pub fn count(&mut self) -> Result<i64, StoreError> {
        let row = self.client.query_one("SELECT count(*) FROM klines", &[]).map_err(self.err("counting K-lines"))?;
        Ok(row.get(0))
    }

    /// Streams the rows (binary results: no server-side formatting of the decimals) and decodes
    /// each in place from the received buffer.
    fn read(
        &mut self,
        which: Read,
        params: &[&(dyn ToSql + Sync)],
        context: &'static str,
    ) -> Result<Vec<Kline>, StoreError> {
        let stmt = match &self.reads[which as usize] {
            Some(s) => s.clone(),
            None => {
                let sql = match which {
                    Read::Open => sql::select_open(),
                    Read::OldestFirst => sql::select_range(D, false),
                    Read::NewestFirst => sql::select_range(D, true),
                };
                let s = self.client.prepare(&sql).map_err(self.err(context))?;
                self.reads[which as usize] = Some(s.clone());
                s
            }
        };
        let url = &self.url;
        let err = |context| move |source| StoreError::Postgres { url: url.clone(), context, source };
        let mut rows = self.client.query_raw(&stmt, params.iter().copied()).map_err(err(context))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(err(context))? {
            out.push(read_row(&r).map_err(err("decoding a K-line"))?.to_kline()?);
        }
        Ok(out)
    }
}

/// The prepared reads a connection keeps ([`Pg::reads`]).
#[derive(Debug, Clone, Copy)]
enum Read {
    Open = 0,
    OldestFirst = 1,
    NewestFirst = 2,
}

fn read_row(r: &postgres::Row) -> Result<StoredRow<'_, Numeric<'_>>, postgres::Error> {
    Ok(StoredRow {
        symbol: r.try_get(0)?,
        interval: r.try_get(1)?,
        open_time: r.try_get(2)?,
        close_time: r.try_get(3)?,
        price_scale: r.try_get::<_, i16>(4)?.into(),
        qty_scale: r.try_get::<_, i16>(5)?.into(),
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
        revision: r.try_get::<_, i32>(18)?.into(),
        flags: r.try_get::<_, i16>(19)?.into(),
    })
}

/// A NUMERIC in PostgreSQL's binary form, borrowed from the row: `ndigits`, `weight`, `sign` and
/// `dscale` (16 bits each, big-endian), then `ndigits` base-10000 digits, the first worth
/// 10000^`weight`.
struct Numeric<'a>(&'a [u8]);

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
/// The largest value that one more base-10000 digit leaves within `u128`.
const HORNER_MAX: u128 = (u128::MAX - 9_999) / 10_000;

impl<'a> Numeric<'a> {
    /// Negative or not, the weight and the digits; `None` for NaN, the infinities or a malformed
    /// value.
    fn parts(&self) -> Option<(bool, i32, impl Iterator<Item = u16> + 'a)> {
        let raw = self.0;
        let word = |i: usize| raw.get(2 * i..2 * i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        let ndigits = usize::from(word(0)?);
        let weight = i32::from(word(1)? as i16);
        let neg = match word(2)? {
            NUMERIC_POS => false,
            NUMERIC_NEG => true,
            _ => return None,
        };
        if raw.len() != 8 + 2 * ndigits {
            return None;
        }
        Some((neg, weight, raw[8..].chunks_exact(2).map(|b| u16::from_be_bytes([b[0], b[1]]))))
    }
}

impl StoredDecimal for Numeric<'_> {
    /// The same rule as decimal text: every digit beyond `scale` zero, the mantissa within `i128`.
    fn mantissa(&self, scale: u8) -> Option<i128> {
        let (neg, weight, digits) = self.parts()?;
        // Digit i is worth d × 10^(p0 − 4i) in units of 10^−scale. Those with a non-negative
        // power go through Horner's rule in base 10000 (then one shift by the last power); at
        // most one has a power in −3..=−1 and adds d / 10^−p; any further one must be zero.
        let p0 = 4 * weight + i32::from(scale);
        let (mut mag, mut last, mut below) = (0u128, None, 0u128);
        for (i, d) in digits.enumerate() {
            if d >= 10_000 {
                return None;
            }
            let p = p0 - 4 * i32::try_from(i).ok()?;
            if p >= 0 {
                if mag > HORNER_MAX {
                    return None;
                }
                mag = mag * 10_000 + u128::from(d);
                last = Some(p);
            } else if d != 0 {
                let q = 10_u16.checked_pow(p.unsigned_abs()).filter(|q| d % q == 0)?;
                below = u128::from(d / q);
            }
        }
        let mag = match last {
            Some(p) => row::shift(mag, usize::try_from(p).ok()?)?,
            None => 0,
        };
        row::signed(neg, mag.checked_add(below)?)
    }
}

impl std::fmt::Debug for Numeric<'_> {
    /// Quoted, as PostgreSQL prints it (for error messages, like decimal text's).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some((neg, weight, digits)) = self.parts() else {
            return match self.0.get(4..6) {
                Some([0xc0, 0]) => write!(f, "{:?}", "NaN"),
                Some([0xd0, 0]) => write!(f, "{:?}", "Infinity"),
                Some([0xf0, 0]) => write!(f, "{:?}", "-Infinity"),
                _ => write!(f, "NUMERIC {:?}", self.0),
            };
        };
        let digits: Vec<u16> = digits.collect();
        let at = |e: i32| usize::try_from(weight - e).ok().and_then(|i| digits.get(i)).copied().unwrap_or(0);
        let mut s = String::from(if neg { "-" } else { "" });
        s.push_str(&at(weight.max(0)).to_string());
        for e in (0..weight).rev() {
            s.push_str(&format!("{:04}", at(e)));
        }
        let last = weight - i32::try_from(digits.len()).unwrap_or(i32::MAX) + 1;
        if last < 0 {
            s.push('.');
            for e in (last..0).rev() {
                s.push_str(&format!("{:04}", at(e)));
            }
            let dscale = self.0.get(6..8).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
            while s.ends_with('0') && s.len() - s.find('.').map_or(0, |d| d + 1) > dscale {
                s.pop();
            }
            if s.ends_with('.') {
                s.pop();
            }
        }
        write!(f, "{s:?}")
    }
}

impl<'a> FromSql<'a> for Numeric<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Numeric(raw))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
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

    /// PostgreSQL's binary NUMERIC for decimal text (`[-]digits[.digits]`), as the server sends
    /// it: base-10000 digits without leading or trailing zero digits.
    fn numeric(text: &str) -> Vec<u8> {
        let (neg, body) = text.strip_prefix('-').map_or((false, text), |b| (true, b));
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let int = format!("{}{int}", "0".repeat((4 - int.len() % 4) % 4));
        let padded = format!("{frac}{}", "0".repeat((4 - frac.len() % 4) % 4));
        let mut digits: Vec<u16> = int
            .as_bytes()
            .chunks(4)
            .chain(padded.as_bytes().chunks(4))
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let mut weight = i16::try_from(int.len() / 4).unwrap() - 1;
        while digits.first() == Some(&0) {
            digits.remove(0);
            weight -= 1;
        }
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            weight = 0;
        }
        let sign = if neg && !digits.is_empty() { NUMERIC_NEG } else { NUMERIC_POS };
        let mut out = Vec::new();
        for w in [digits.len() as u16, weight as u16, sign, frac.len() as u16].into_iter().chain(digits) {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out
    }

    #[test]
    fn binary_numerics_decode_as_their_text_does() {
        let mut texts: Vec<String> =
            ["0", "1.5000", "1.05", "-0.01", "0.0001", "0.00005", "12345678.9", "10000", "-99990000.0001"]
                .map(String::from)
                .to_vec();
        for scale in [0u8, 1, 2, 4, 8, 16, 18] {
            for m in
                [0i128, 1, -1, 9999, 10_000, -12345, i128::from(i64::MAX), i128::from(i64::MIN), i128::MAX, i128::MIN]
            {
                texts.push(mdbus_schema::Fixed::new(m, scale).to_plain_string());
            }
        }
        for text in &texts {
            let raw = numeric(text);
            for scale in 0..=20 {
                let want = crate::row::parse_decimal(text.as_bytes(), scale);
                assert_eq!(Numeric(&raw).mantissa(scale), want, "{text} at {scale}");
            }
            let shown = format!("{:?}", Numeric(&raw)).replace('"', "");
            assert_eq!(
                crate::row::parse_decimal(shown.as_bytes(), 18),
                crate::row::parse_decimal(text.as_bytes(), 18),
                "{text} shown as {shown}"
            );
        }
        assert_eq!(format!("{:?}", Numeric(&numeric("-1.50"))), "\"-1.50\"");
        assert_eq!(format!("{:?}", Numeric(&numeric("0.0001"))), "\"0.0001\"");
        assert_eq!(format!("{:?}", Numeric(&numeric("120000"))), "\"120000\"");
    }

    #[test]
    fn nan_infinities_and_malformed_numerics_are_refused() {
        let special = |sign: u16| [0u16, 0, sign, 0].iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
        for (sign, shown) in [(0xc000, "NaN"), (0xd000, "Infinity"), (0xf000, "-Infinity")] {
            assert_eq!(Numeric(&special(sign)).mantissa(2), None);
            assert_eq!(format!("{:?}", Numeric(&special(sign))), format!("{shown:?}"));
        }
        let mut raw = numeric("1.5");
        assert_eq!(Numeric(&raw[..raw.len() - 1]).mantissa(1), None);
        assert_eq!(Numeric(&raw[..3]).mantissa(1), None);
        assert_eq!(Numeric(&[]).mantissa(1), None);
        raw.extend_from_slice(&[0, 0]);
        assert_eq!(Numeric(&raw).mantissa(1), None);
        // A digit of 10000 or more.
        let big: Vec<u8> = [1u16, 0, 0, 0, 10_000].iter().flat_map(|w| w.to_be_bytes()).collect();
        assert_eq!(Numeric(&big).mantissa(0), None);
        // 2^128 and beyond fit no i128; 10^40 none either.
        assert_eq!(Numeric(&numeric("340282366920938463463374607431768211456")).mantissa(0), None);
        assert_eq!(Numeric(&numeric("10000000000000000000000000000000000000000")).mantissa(0), None);
        assert_eq!(Numeric(&numeric("1")).mantissa(39), None);
        assert_eq!(Numeric(&numeric("0")).mantissa(200), Some(0));
    }

    #[test]
    fn copy_lines_have_one_field_per_column() {
        let mut buf = String::new();
        copy_line(&mut buf, &row(0, true, 0, 1), 42);
        assert!(buf.ends_with('\n'));
        assert_eq!(buf.trim_end().split('\t').count(), COLUMNS.len());
    }
}
