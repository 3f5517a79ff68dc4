//! A trade source that replays Binance dataset files (`data.binance.vision`, spot).
//!
//! `--source csv:PATH`: `PATH` is one `.csv`/`.zip` file or a directory of them (non-recursive,
//! sorted by name). The symbol is the part of the file name before the first `-`
//! (`BTCUSDT-trades-2024-01-01.zip`, `ETHUSDT-aggTrades-2024-01.csv`, our recorder's
//! `BTCUSDT-trades.csv`); several files of one symbol are read one after another in name order.
//! A `.zip` is read through its first `.csv` entry.
//!
//! Two layouts, chosen per file from the name (`aggTrades` / `trades`) or else from the column count
//! of its first data line:
//! - trades (7 columns): `id,price,qty,quote_qty,time,is_buyer_maker,is_best_match`
//! - aggTrades (8 columns): `agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker,is_best_match`
//!
//! Decimals are parsed exactly at scale 8 (Binance's 8 fractional digits) for price and quantity;
//! times are ms or µs per value (16 or more digits: µs), delivered in µs. A header line (a first
//! line whose first field is not a number) is skipped. A bad line is skipped, counted and logged
//! with its `file:line`; an I/O error ends that file.
//!
//! Streaming: one reader thread per symbol parses its files in order and sends batches over a
//! bounded channel (a few thousand trades of read-ahead per symbol, whatever the file size). The
//! feed keeps the head trade of every symbol in a heap and hands out trades merged in event-time
//! order (ties: lower symbol id first; within a symbol, file order). Upstream: files; downstream:
//! the broker's ingest, as [`Trade`]s, with the same interface as
//! [`SyntheticFeed`](crate::synthetic::SyntheticFeed).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use mdbus_schema::{DecimalParseError, Fixed, Symbol, SymbolError, Trade};

use crate::aggregator::SymbolSpec;

/// Price and quantity scale of every replayed symbol: Binance writes 8 fractional digits.
pub const CSV_SCALE: u8 = 8;

/// Trades per batch sent from a reader thread.
const BATCH: usize = 1024;
/// Batches buffered per symbol between its reader thread and the feed.
const CHANNEL_BATCHES: usize = 4;
/// Bytes of file buffered per reader.
const READ_BUFFER: usize = 256 * 1024;
/// Bad lines logged one by one; after that only the 16th, 32nd, 64th, ...
const LOG_FIRST_BAD: u64 = 8;
/// Longest field value quoted in a bad-line reason.
const MAX_QUOTED: usize = 40;

/// The replay could not be set up (nothing is read before these are ruled out).
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no .csv or .zip files")]
    NoFiles { path: PathBuf },
    #[error("{path}: no symbol in the file name (expected SYMBOL-...)")]
    NoSymbol { path: PathBuf },
    #[error("{path}: symbol {name:?}: {source}")]
    BadSymbol {
        path: PathBuf,
        name: String,
        #[source]
        source: SymbolError,
    },
    #[error("{path}: unreadable zip: {source}")]
    Zip {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{path}: no .csv entry in the zip")]
    ZipWithoutCsv { path: PathBuf },
    #[error("starting the reader thread of {symbol}: {source}")]
    Thread {
        symbol: String,
        #[source]
        source: io::Error,
    },
}

/// What has been read so far (reader threads read ahead of what the feed has handed out; once
/// [`CsvFeed::peek_time_us`] is `i64::MAX` the counts are final).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CsvStats {
    /// Data lines read (header and blank lines not counted), good and bad.
    pub lines: u64,
    /// Lines skipped as corrupt.
    pub bad_lines: u64,
    /// The most recent bad line as `file:line: reason`.
    pub last_bad: Option<String>,
    /// Files cut short (or not read at all) by an I/O or zip error.
    pub failed_files: u64,
}

#[derive(Debug, Default)]
struct SharedStats {
    lines: AtomicU64,
    bad_lines: AtomicU64,
    failed_files: AtomicU64,
    last_bad: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Trades,
    AggTrades,
}

impl Layout {
    fn from_name(name: &str) -> Option<Layout> {
        let lower = name.to_ascii_lowercase();
        if lower.contains("aggtrades") {
            Some(Layout::AggTrades)
        } else if lower.contains("trades") {
            Some(Layout::Trades)
        } else {
            None
        }
    }

    fn from_columns(n: usize) -> Option<Layout> {
        match n {
            7 => Some(Layout::Trades),
            8 => Some(Layout::AggTrades),
            _ => None,
        }
    }

    fn columns(self) -> usize {
        match self {
            Layout::Trades => 7,
            Layout::AggTrades => 8,
        }
    }

    /// Column indices of (time, is_buyer_maker); id, price and qty are columns 0, 1, 2 in both.
    fn time_and_side(self) -> (usize, usize) {
        match self {
            Layout::Trades => (4, 5),
            Layout::AggTrades => (5, 6),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Csv,
    /// Index of the first `.csv` entry.
    Zip(usize),
}

#[derive(Debug, Clone)]
struct InputFile {
    path: PathBuf,
    container: Container,
    layout: Option<Layout>,
}

#[derive(Debug)]
struct Stream {
    rx: Option<Receiver<Vec<Trade>>>,
    buf: std::vec::IntoIter<Trade>,
    /// The next trade of this symbol (in the heap under its time); `None`: exhausted or removed.
    head: Option<Trade>,
}

impl Stream {
    /// The next trade from the reader thread, blocking until it has one or is done.
    fn advance(&mut self) -> Option<Trade> {
        loop {
            if let Some(t) = self.buf.next() {
                return Some(t);
            }
            let batch = self.rx.as_ref()?.recv();
            match batch {
                Ok(b) => self.buf = b.into_iter(),
                Err(_) => {
                    self.rx = None;
                    return None;
                }
            }
        }
    }
}

/// Replays Binance trade files. Call [`CsvFeed::next_trade`] for the next trade in event-time order.
#[derive(Debug)]
pub struct CsvFeed {
    specs: Vec<SymbolSpec>,
    streams: Vec<Stream>,
    /// (time of the head trade, symbol id) of every symbol that has one.
    heap: BinaryHeap<Reverse<(i64, u32)>>,
    produced: u64,
    stats: Arc<SharedStats>,
    threads: Vec<JoinHandle<()>>,
}

impl CsvFeed {
    /// Opens a file or a directory of `*.csv` / `*.zip` files and starts one reader thread per
    /// symbol. Blocks until every symbol's first batch is parsed (so [`CsvFeed::peek_time_us`] is
    /// exact from the start).
    pub fn open(path: &Path) -> Result<CsvFeed, CsvError> {
        let meta = std::fs::metadata(path).map_err(|source| CsvError::Open { path: path.to_owned(), source })?;
        let mut paths = if meta.is_dir() { list_dir(path)? } else { vec![path.to_owned()] };
        if paths.is_empty() {
            return Err(CsvError::NoFiles { path: path.to_owned() });
        }
        paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));

        // Group by symbol in order of first appearance; within a symbol, name order.
        let mut groups: Vec<(Symbol, Vec<InputFile>)> = Vec::new();
        for p in paths {
            let (symbol, file) = inspect(p)?;
            match groups.iter_mut().find(|(s, _)| *s == symbol) {
                Some((_, files)) => files.push(file),
                None => groups.push((symbol, vec![file])),
            }
        }

        let stats = Arc::new(SharedStats::default());
        let mut specs = Vec::with_capacity(groups.len());
        let mut streams = Vec::with_capacity(groups.len());
        let mut threads = Vec::with_capacity(groups.len());
        for (id, (symbol, files)) in groups.into_iter().enumerate() {
            let named: Vec<Layout> = files.iter().filter_map(|f| f.layout).collect();
            if named.windows(2).any(|w| w[0] != w[1]) {
                tracing::warn!(
                    symbol = symbol.as_str(),
                    "both trades and aggTrades files for this symbol: they are replayed one after the other"
                );
            }
            let spec = SymbolSpec { symbol, price_scale: CSV_SCALE, qty_scale: CSV_SCALE };
            let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_BATCHES);
            let reader = Reader::new(id as u32, spec, tx, Arc::clone(&stats));
            let handle = std::thread::Builder::new()
                .name(format!("csv-{}", symbol.as_str()))
                .spawn(move || reader.run(&files))
                .map_err(|source| CsvError::Thread { symbol: symbol.as_str().to_owned(), source })?;
            specs.push(spec);
            streams.push(Stream { rx: Some(rx), buf: Vec::new().into_iter(), head: None });
            threads.push(handle);
        }

        let mut heap = BinaryHeap::with_capacity(streams.len());
        for (id, s) in streams.iter_mut().enumerate() {
            s.head = s.advance();
            if let Some(t) = &s.head {
                heap.push(Reverse((t.time_us, id as u32)));
            }
        }
        Ok(CsvFeed { specs, streams, heap, produced: 0, stats, threads })
    }

    /// The symbols in id order (id = index), all at scale [`CSV_SCALE`].
    pub fn specs(&self) -> Vec<SymbolSpec> {
        self.specs.clone()
    }

    /// (id, name) of the symbols that still have trades to replay.
    pub fn active_symbols(&self) -> Vec<(u32, String)> {
        self.streams
            .iter()
            .zip(&self.specs)
            .enumerate()
            .filter(|(_, (s, _))| s.head.is_some())
            .map(|(i, (_, spec))| (i as u32, spec.symbol.as_str().to_owned()))
            .collect()
    }

    /// Stops replaying a symbol (its reader thread ends; its id is never reused).
    pub fn remove_symbol(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(id as usize) {
            s.rx = None;
            s.head = None;
            s.buf = Vec::new().into_iter();
            self.heap.retain(|Reverse((_, i))| *i != id);
        }
    }

    /// Trades handed out so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Event time (µs) of the next trade, without producing it; `i64::MAX` once the data is exhausted.
    pub fn peek_time_us(&self) -> i64 {
        self.heap.peek().map_or(i64::MAX, |Reverse((t, _))| *t)
    }

    /// The next trade in event-time order, or `None` once every file is exhausted. May block
    /// while the symbol's reader thread parses its next batch.
    pub fn next_trade(&mut self) -> Option<Trade> {
        let Reverse((_, id)) = self.heap.pop()?;
        let s = self.streams.get_mut(id as usize)?;
        let t = s.head.take()?;
        s.head = s.advance();
        if let Some(next) = &s.head {
            self.heap.push(Reverse((next.time_us, id)));
        }
        self.produced += 1;
        Some(t)
    }

    /// A restarted broker continues after the trades it already has: drops every symbol's trades
    /// with id `<= last[symbol id]` (ids rise within a dataset file). Returns how many were dropped.
    pub fn skip_through(&mut self, last: &[i64]) -> u64 {
        let mut skipped = 0;
        let ids: Vec<u32> = self.heap.iter().map(|Reverse((_, i))| *i).collect();
        for id in ids {
            let Some(&limit) = last.get(id as usize) else { continue };
            let Some(s) = self.streams.get_mut(id as usize) else { continue };
            while s.head.as_ref().is_some_and(|t| t.trade_id <= limit) {
                s.head = s.advance();
                skipped += 1;
            }
        }
        self.heap = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.head.as_ref().map(|t| Reverse((t.time_us, i as u32))))
            .collect();
        skipped
    }

    /// Lines read and skipped so far.
    pub fn stats(&self) -> CsvStats {
        let s = &self.stats;
        CsvStats {
            lines: s.lines.load(Ordering::Relaxed),
            bad_lines: s.bad_lines.load(Ordering::Relaxed),
            last_bad: s.last_bad.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            failed_files: s.failed_files.load(Ordering::Relaxed),
        }
    }
}

impl Drop for CsvFeed {
    fn drop(&mut self) {
        // Disconnect first: a reader blocked on a full channel then wakes up and ends.
        for s in &mut self.streams {
            s.rx = None;
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn is_input(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv") || e.eq_ignore_ascii_case("zip"))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, CsvError> {
    let open_err = |source| CsvError::Open { path: dir.to_owned(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(open_err)? {
        let p = entry.map_err(open_err)?.path();
        if is_input(&p) && p.is_file() {
            out.push(p);
        }
    }
    Ok(out)
}

/// The symbol of a file, and how to read it. Checks the file can be opened (and the zip parsed).
fn inspect(path: PathBuf) -> Result<(Symbol, InputFile), CsvError> {
    let name = match path.file_name().and_then(|n| n.to_str()) {
        Some(n) => n.to_owned(),
        None => return Err(CsvError::NoSymbol { path }),
    };
    let symbol = match name.split_once('-') {
        Some((s, _)) if !s.is_empty() => {
            Symbol::new(s).map_err(|source| CsvError::BadSymbol { path: path.clone(), name: s.to_owned(), source })?
        }
        _ => return Err(CsvError::NoSymbol { path }),
    };
    let layout = Layout::from_name(&name);
    let file = File::open(&path).map_err(|source| CsvError::Open { path: path.clone(), source })?;
    let is_zip = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    let container = if is_zip {
        let archive = zip::ZipArchive::new(BufReader::new(file))
            .map_err(|source| CsvError::Zip { path: path.clone(), source })?;
        match first_csv_entry(&archive) {
            Some(i) => Container::Zip(i),
            None => return Err(CsvError::ZipWithoutCsv { path }),
        }
    } else {
        Container::Csv
    };
    Ok((symbol, InputFile { path, container, layout }))
}

fn first_csv_entry<R: io::Read + io::Seek>(archive: &zip::ZipArchive<R>) -> Option<usize> {
    archive.file_names_raw().position(|n| n.len() > 4 && n[n.len() - 4..].eq_ignore_ascii_case(b".csv"))
}

/// The reader side of the channel was dropped: stop reading.
#[derive(Debug)]
struct Disconnected;

/// Why a line was skipped.
#[derive(Debug, thiserror::Error)]
enum LineError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error("{found} columns, expected {expected}")]
    Columns { found: usize, expected: &'static str },
    #[error("{column} {value:?} is not an integer")]
    Integer { column: &'static str, value: String },
    #[error("{column} {value:?}: {source}")]
    Decimal {
        column: &'static str,
        value: String,
        #[source]
        source: DecimalParseError,
    },
    #[error("{column} {value:?} is not positive")]
    NotPositive { column: &'static str, value: String },
    #[error("time {value:?} out of range")]
    Time { value: String },
    #[error("is_buyer_maker {value:?} is not True or False")]
    Bool { value: String },
}

/// A field value for an error message, cut to a sane length.
fn quoted(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

fn parse_int(column: &'static str, s: &str) -> Result<i64, LineError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LineError::Integer { column, value: quoted(s) });
    }
    s.parse::<i64>().map_err(|_| LineError::Integer { column, value: quoted(s) })
}

fn parse_positive_decimal(column: &'static str, s: &str) -> Result<i64, LineError> {
    let v = Fixed::parse_i64(s, CSV_SCALE).map_err(|source| LineError::Decimal { column, value: quoted(s), source })?;
    if v <= 0 {
        return Err(LineError::NotPositive { column, value: quoted(s) });
    }
    Ok(v)
}

/// Values of 16 or more digits are µs (the spot dataset since 2025), shorter ones ms.
fn parse_time_us(s: &str) -> Result<i64, LineError> {
    const FIRST_16_DIGITS: i64 = 1_000_000_000_000_000;
    let v = parse_int("time", s)?;
    if v >= FIRST_16_DIGITS {
        Ok(v)
    } else {
        v.checked_mul(1000).ok_or_else(|| LineError::Time { value: quoted(s) })
    }
}

fn parse_bool(s: &str) -> Result<bool, LineError> {
    if s.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if s.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(LineError::Bool { value: quoted(s) })
    }
}

/// A header is a first line whose first field is not a number.
fn is_header(line: &str) -> bool {
    let first = line.split(',').next().unwrap_or("").trim();
    first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit())
}

/// Parses one data line; fixes the file's layout from the column count if the name did not.
fn parse_line(line: &str, layout: &mut Option<Layout>, spec: &SymbolSpec, symbol_id: u32) -> Result<Trade, LineError> {
    let mut cols = [""; 8];
    let mut n = 0;
    for field in line.split(',') {
        if let Some(c) = cols.get_mut(n) {
            *c = field.trim();
        }
        n += 1;
    }
    let l = match *layout {
        Some(l) if n == l.columns() => l,
        Some(Layout::Trades) => return Err(LineError::Columns { found: n, expected: "7 (trades)" }),
        Some(Layout::AggTrades) => return Err(LineError::Columns { found: n, expected: "8 (aggTrades)" }),
        None => match Layout::from_columns(n) {
            Some(l) => l,
            None => return Err(LineError::Columns { found: n, expected: "7 (trades) or 8 (aggTrades)" }),
        },
    };
    let (time_col, side_col) = l.time_and_side();
    let trade = Trade {
        symbol: spec.symbol,
        symbol_id,
        price_scale: spec.price_scale,
        qty_scale: spec.qty_scale,
        trade_id: parse_int("id", cols[0])?,
        price: parse_positive_decimal("price", cols[1])?,
        qty: parse_positive_decimal("qty", cols[2])?,
        time_us: parse_time_us(cols[time_col])?,
        is_buyer_maker: parse_bool(cols[side_col])?,
    };
    *layout = Some(l);
    Ok(trade)
}

/// One symbol's reader thread: parses its files in order into batches of trades.
#[derive(Debug)]
struct Reader {
    symbol_id: u32,
    spec: SymbolSpec,
    tx: SyncSender<Vec<Trade>>,
    stats: Arc<SharedStats>,
    batch: Vec<Trade>,
    /// Lines read but not yet added to `stats`.
    lines: u64,
}

impl Reader {
    fn new(symbol_id: u32, spec: SymbolSpec, tx: SyncSender<Vec<Trade>>, stats: Arc<SharedStats>) -> Reader {
        Reader { symbol_id, spec, tx, stats, batch: Vec::with_capacity(BATCH), lines: 0 }
    }

    fn run(mut self, files: &[InputFile]) {
        for f in files {
            if self.read_file(f).is_err() {
                return;
            }
        }
        // Dropping `self.tx` after the last send tells the feed this symbol is done.
        let _ = self.flush();
    }

    fn read_file(&mut self, f: &InputFile) -> Result<(), Disconnected> {
        let result = match f.container {
            Container::Csv => self.read_csv(f),
            Container::Zip(index) => self.read_zip(f, index),
        };
        let outcome = match result {
            Ok(()) => Ok(()),
            Err(ReadError::Disconnected) => Err(Disconnected),
            Err(e) => {
                self.stats.failed_files.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(file = %f.path.display(), error = %e, "read error: skipping the rest of the file");
                Ok(())
            }
        };
        self.stats.lines.fetch_add(std::mem::take(&mut self.lines), Ordering::Relaxed);
        outcome
    }

    fn read_csv(&mut self, f: &InputFile) -> Result<(), ReadError> {
        let file = File::open(&f.path).map_err(ReadError::Io)?;
        self.read_lines(BufReader::with_capacity(READ_BUFFER, file), f)
    }

    fn read_zip(&mut self, f: &InputFile, index: usize) -> Result<(), ReadError> {
        let file = File::open(&f.path).map_err(ReadError::Io)?;
        let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(ReadError::Zip)?;
        let entry = archive.by_index(index).map_err(ReadError::Zip)?;
        self.read_lines(BufReader::with_capacity(READ_BUFFER, entry), f)
    }

    fn read_lines<R: BufRead>(&mut self, mut r: R, f: &InputFile) -> Result<(), ReadError> {
        let mut layout = f.layout;
        let mut buf = Vec::with_capacity(256);
        let mut line_no: u64 = 0;
        let mut first = true;
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf).map_err(ReadError::Io)? == 0 {
                return Ok(());
            }
            line_no += 1;
            let mut bytes = buf.as_slice();
            if first {
                bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
            }
            let bytes = bytes.trim_ascii();
            if bytes.is_empty() {
                continue;
            }
            let Ok(line) = std::str::from_utf8(bytes) else {
                self.lines += 1;
                first = false;
                self.bad_line(&f.path, line_no, &LineError::NotUtf8);
                continue;
            };
            if std::mem::replace(&mut first, false) && is_header(line) {
                continue;
            }
            self.lines += 1;
            match parse_line(line, &mut layout, &self.spec, self.symbol_id) {
                Ok(t) => {
                    self.batch.push(t);
                    if self.batch.len() >= BATCH {
                        self.flush().map_err(|Disconnected| ReadError::Disconnected)?;
                    }
                }
                Err(e) => self.bad_line(&f.path, line_no, &e),
            }
        }
    }

    /// Sends the batch (blocking while the channel is full).
    fn flush(&mut self) -> Result<(), Disconnected> {
        self.stats.lines.fetch_add(std::mem::take(&mut self.lines), Ordering::Relaxed);
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.tx.send(batch).map_err(|_| Disconnected)
    }

    fn bad_line(&self, path: &Path, line: u64, err: &LineError) {
        let n = self.stats.bad_lines.fetch_add(1, Ordering::Relaxed) + 1;
        let msg = format!("{}:{line}: {err}", path.display());
        if n <= LOG_FIRST_BAD || n.is_power_of_two() {
            tracing::warn!(bad_lines = n, "skipping bad CSV line {msg}");
        }
        *self.stats.last_bad.lock().unwrap_or_else(PoisonError::into_inner) = Some(msg);
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(io::Error),
    #[error("{0}")]
    Zip(zip::result::ZipError),
    #[error("feed dropped")]
    Disconnected,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::AtomicUsize;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("mdbus-csvfeed-{name}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn drain(feed: &mut CsvFeed) -> Vec<Trade> {
        let v: Vec<Trade> = std::iter::from_fn(|| feed.next_trade()).collect();
        assert_eq!(feed.peek_time_us(), i64::MAX);
        assert_eq!(feed.produced(), v.len() as u64);
        assert!(feed.active_symbols().is_empty());
        v
    }

    fn read_all(path: &Path) -> (Vec<Trade>, CsvStats) {
        let mut feed = CsvFeed::open(path).unwrap();
        let trades = drain(&mut feed);
        (trades, feed.stats())
    }

    const TRADES_MS: &str = "\
3370000001,42283.58000000,0.00073000,30.86701340,1704067200000,True,True
3370000002,42283.59000000,0.01000000,422.83590000,1704067200001,False,True
3370000003,42283.58000000,1.50000000,63425.37000000,1704067200001,true,True
3370000004,42284.00000000,0.10000000,4228.40000000,1704067201500,false,True
";

    const TRADES_US: &str = "\
3370000001,42283.58000000,0.00073000,30.86701340,1704067200000000,True,True
3370000002,42283.59000000,0.01000000,422.83590000,1704067200001000,False,True
3370000003,42283.58000000,1.50000000,63425.37000000,1704067200001000,true,True
3370000004,42284.00000000,0.10000000,4228.40000000,1704067201500000,false,True
";

    #[test]
    fn ms_and_us_files_give_identical_trades() {
        let a = TempDir::new("ms");
        let b = TempDir::new("us");
        let (ms, sa) = read_all(&a.write("BTCUSDT-trades-2024-01-01.csv", TRADES_MS));
        let (us, sb) = read_all(&b.write("BTCUSDT-trades-2025-01-01.csv", TRADES_US));
        assert_eq!(ms.len(), 4);
        assert_eq!(ms, us);
        assert_eq!((sa.lines, sa.bad_lines, sb.bad_lines), (4, 0, 0));
        let t = ms[0];
        assert_eq!(t.symbol.as_str(), "BTCUSDT");
        assert_eq!((t.symbol_id, t.price_scale, t.qty_scale), (0, 8, 8));
        assert_eq!((t.trade_id, t.price, t.qty), (3_370_000_001, 4_228_358_000_000, 73_000));
        assert_eq!(t.time_us, 1_704_067_200_000_000);
        assert!(t.is_buyer_maker);
        assert_eq!(ms.iter().map(|t| t.is_buyer_maker).collect::<Vec<_>>(), [true, false, true, false]);
        assert_eq!(ms[3].time_us, 1_704_067_201_500_000);
    }

    #[test]
    fn agg_trades_layout_by_name_and_by_column_count() {
        let text = "\
agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker,is_best_match
900,2281.10000000,0.50000000,5000,5002,1704067200123,False,True
901,2281.09000000,2.00000000,5003,5003,1704067200456,True,True
";
        let d = TempDir::new("agg");
        let (by_name, s) = read_all(&d.write("ETHUSDT-aggTrades-2024-01.csv", text));
        assert_eq!((s.lines, s.bad_lines), (2, 0));
        assert_eq!(by_name.len(), 2);
        let t = by_name[0];
        assert_eq!((t.trade_id, t.price, t.qty, t.time_us), (900, 228_110_000_000, 50_000_000, 1_704_067_200_123_000));
        assert!(!t.is_buyer_maker);
        assert!(by_name[1].is_buyer_maker);
        assert_eq!(by_name[1].trade_id, 901);

        let e = TempDir::new("agg-cols");
        let (by_cols, s) = read_all(&e.write("ETHUSDT-2024-01.csv", text));
        assert_eq!(s.bad_lines, 0);
        assert_eq!(by_cols, by_name);

        // A trades line in a file named aggTrades is a bad line, not a silently misread trade.
        let f = TempDir::new("agg-mixed");
        let (trades, s) = read_all(&f.write("ETHUSDT-aggTrades-2024-02.csv", TRADES_MS));
        assert!(trades.is_empty());
        assert_eq!(s.bad_lines, 4);
        assert!(s.last_bad.unwrap().contains("7 columns, expected 8"));
    }

    #[test]
    fn header_is_skipped() {
        let d = TempDir::new("header");
        let text = format!("\u{feff}id,price,qty,quote_qty,time,is_buyer_maker,is_best_match\r\n{}", TRADES_MS);
        let (with_header, s) = read_all(&d.write("BTCUSDT-trades-2024-01-01.csv", &text));
        assert_eq!((s.lines, s.bad_lines), (4, 0));
        let e = TempDir::new("no-header");
        let (plain, _) = read_all(&e.write("BTCUSDT-trades-2024-01-01.csv", TRADES_MS));
        assert_eq!(with_header, plain);
    }

    #[test]
    fn two_symbols_are_merged_in_time_order() {
        let d = TempDir::new("merge");
        d.write(
            "ETHUSDT-trades-2024-01-01.csv",
            "\
10,2000.00000000,1.00000000,2000,1704067200000,True,True
11,2001.00000000,1.00000000,2001,1704067200005,False,True
12,2002.00000000,1.00000000,2002,1704067200010,False,True
",
        );
        d.write(
            "BTCUSDT-trades-2024-01-01.csv",
            "\
20,42000.00000000,0.10000000,4200,1704067200003,True,True
21,42001.00000000,0.10000000,4200.1,1704067200005,True,True
22,42002.00000000,0.10000000,4200.2,1704067200020,True,True
",
        );
        let mut feed = CsvFeed::open(&d.0).unwrap();
        let names: Vec<_> = feed.specs().iter().map(|s| s.symbol.as_str().to_owned()).collect();
        assert_eq!(names, ["BTCUSDT", "ETHUSDT"]);
        assert_eq!(feed.active_symbols(), [(0, "BTCUSDT".to_owned()), (1, "ETHUSDT".to_owned())]);
        assert_eq!(feed.peek_time_us(), 1_704_067_200_000_000);
        let got: Vec<_> = drain(&mut feed).iter().map(|t| (t.symbol_id, t.trade_id)).collect();
        // At the tie (…005) the lower symbol id (BTCUSDT) comes first.
        assert_eq!(got, [(1, 10), (0, 20), (0, 21), (1, 11), (1, 12), (0, 22)]);
    }

    #[test]
    fn many_batches_merge_in_order() {
        let d = TempDir::new("batches");
        for (sym, offset) in [("AAAUSDT", 0), ("BBBUSDT", 1)] {
            let mut text = String::new();
            for i in 0..5_000i64 {
                let t = 1_704_067_200_000 + 2 * i + offset;
                text.push_str(&format!("{i},1.00000000,2.00000000,2,{t},False,True\n"));
            }
            d.write(&format!("{sym}-trades.csv"), &text);
        }
        let (trades, s) = read_all(&d.0);
        assert_eq!((trades.len(), s.lines, s.bad_lines), (10_000, 10_000, 0));
        assert!(trades.windows(2).all(|w| w[0].time_us < w[1].time_us));
        assert!(trades.iter().enumerate().all(|(i, t)| t.trade_id == i as i64 / 2));
    }

    #[test]
    fn consecutive_files_of_one_symbol_are_read_in_name_order() {
        let d = TempDir::new("days");
        d.write("BTCUSDT-trades-2024-01-02.csv", "3,1.0,1.0,1.0,1704153600000,True,True\n");
        d.write(
            "BTCUSDT-trades-2024-01-01.csv",
            "1,1.0,1.0,1.0,1704067200000,True,True\n2,1.0,1.0,1.0,1704067300000,True,True\n",
        );
        d.write("BTCUSDT-trades-2024-01-01.zip.CHECKSUM", "not data\n");
        let mut feed = CsvFeed::open(&d.0).unwrap();
        assert_eq!(feed.specs().len(), 1);
        let ids: Vec<_> = drain(&mut feed).iter().map(|t| t.trade_id).collect();
        assert_eq!(ids, [1, 2, 3]);
    }

    fn write_zip(path: &Path, entry: &str, text: &str) {
        let mut w = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        w.start_file("README.txt", opts).unwrap();
        w.write_all(b"not the data").unwrap();
        w.start_file(entry, opts).unwrap();
        w.write_all(text.as_bytes()).unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn zip_gives_the_same_as_the_plain_csv() {
        let d = TempDir::new("zip");
        let zipped = d.0.join("BTCUSDT-trades-2024-01-01.zip");
        write_zip(&zipped, "BTCUSDT-trades-2024-01-01.csv", TRADES_MS);
        let e = TempDir::new("zip-plain");
        let (plain, _) = read_all(&e.write("BTCUSDT-trades-2024-01-01.csv", TRADES_MS));
        let (from_file, s) = read_all(&zipped);
        assert_eq!((s.lines, s.bad_lines, s.failed_files), (4, 0, 0));
        assert_eq!(from_file, plain);
        let (from_dir, _) = read_all(&d.0);
        assert_eq!(from_dir, plain);
    }

    #[test]
    fn corrupt_lines_are_skipped_and_reported() {
        let d = TempDir::new("corrupt");
        let mut text = String::from("id,price,qty,quote_qty,time,is_buyer_maker,is_best_match\n");
        text.push_str("1,100.00000000,1.00000000,100,1704067200000,True,True\n");
        text.push_str("2,100.000000001,1.00000000,100,1704067200000,True,True\n"); // 9 fractional digits
        text.push_str("3,100.0,1.0,100,1704067200000,Maybe,True\n");
        text.push_str("4,100.0,1.0,100,1704067200000,True\n");
        text.push('\n');
        text.push_str("x5,100.0,1.0,100,1704067200000,True,True\n");
        text.push_str("6,-1.0,1.0,100,1704067200000,True,True\n");
        text.push_str("7,100.0,1.0,100,99999999999999999999,True,True\n");
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(b"8,100.0,\xff\xfe,100,1704067200000,True,True\n");
        bytes.extend_from_slice(b"9,100.0,1.0,100,1704067200001,False,True");
        let path = d.0.join("BTCUSDT-trades-2024-01-01.csv");
        std::fs::write(&path, bytes).unwrap();
        let (trades, s) = read_all(&path);
        assert_eq!(trades.iter().map(|t| t.trade_id).collect::<Vec<_>>(), [1, 9]);
        assert_eq!((s.lines, s.bad_lines), (9, 7));
        let last = s.last_bad.unwrap();
        assert!(last.contains("BTCUSDT-trades-2024-01-01.csv:10: not UTF-8"), "{last}");
    }

    #[test]
    fn corrupt_line_reports_file_and_line() {
        let d = TempDir::new("corrupt-one");
        let text = "1,1.0,1.0,1.0,1704067200000,True,True\n2,1.0,1.0,1.0,1704067200000,True,True\n3,abc,1.0,1.0,1704067200000,True,True\n";
        let (trades, s) = read_all(&d.write("BTCUSDT-trades-2024-01-01.csv", text));
        assert_eq!(trades.len(), 2);
        assert_eq!(s.bad_lines, 1);
        let last = s.last_bad.unwrap();
        assert!(last.contains("BTCUSDT-trades-2024-01-01.csv:3: price \"abc\""), "{last}");
    }

    #[test]
    fn open_errors() {
        let d = TempDir::new("empty");
        assert!(matches!(CsvFeed::open(&d.0), Err(CsvError::NoFiles { .. })));
        d.write("notes.txt", "x");
        let err = CsvFeed::open(&d.0).unwrap_err();
        assert!(matches!(err, CsvError::NoFiles { .. }));
        assert!(err.to_string().contains("mdbus-csvfeed-empty"), "{err}");

        let missing = d.0.join("nope");
        let err = CsvFeed::open(&missing).unwrap_err();
        assert!(matches!(err, CsvError::Open { .. }) && err.to_string().contains("nope"), "{err}");

        let e = TempDir::new("nosym");
        e.write("trades.csv", TRADES_MS);
        assert!(matches!(CsvFeed::open(&e.0), Err(CsvError::NoSymbol { .. })));
        let f = TempDir::new("badsym");
        f.write("BTC_USDT-trades.csv", TRADES_MS);
        assert!(matches!(CsvFeed::open(&f.0), Err(CsvError::BadSymbol { .. })));
        let g = TempDir::new("badzip");
        g.write("BTCUSDT-trades-2024-01-01.zip", "this is no zip");
        let err = CsvFeed::open(&g.0).unwrap_err();
        assert!(matches!(err, CsvError::Zip { .. }) && err.to_string().contains("BTCUSDT-trades-2024-01-01.zip"));
        let h = TempDir::new("zipnocsv");
        let mut w = zip::ZipWriter::new(File::create(h.0.join("BTCUSDT-trades-2024-01-01.zip")).unwrap());
        w.start_file("README.txt", zip::write::SimpleFileOptions::default()).unwrap();
        w.finish().unwrap();
        assert!(matches!(CsvFeed::open(&h.0), Err(CsvError::ZipWithoutCsv { .. })));
    }

    #[test]
    fn remove_symbol_stops_it() {
        let d = TempDir::new("remove");
        d.write("AAAUSDT-trades.csv", TRADES_MS);
        d.write("BBBUSDT-trades.csv", TRADES_US);
        let mut feed = CsvFeed::open(&d.0).unwrap();
        feed.remove_symbol(0);
        assert_eq!(feed.active_symbols(), [(1, "BBBUSDT".to_owned())]);
        let got = drain(&mut feed);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|t| t.symbol_id == 1));
    }

    #[test]
    fn dropping_a_feed_midway_ends_its_readers() {
        let d = TempDir::new("drop");
        let mut text = String::new();
        for i in 0..50_000i64 {
            text.push_str(&format!("{i},1.0,1.0,1.0,{},False,True\n", 1_704_067_200_000 + i));
        }
        d.write("AAAUSDT-trades.csv", &text);
        let mut feed = CsvFeed::open(&d.0).unwrap();
        assert_eq!(feed.next_trade().unwrap().trade_id, 0);
        drop(feed); // joins the reader, which is blocked on the full channel
    }

    #[test]
    fn recorder_files_round_trip() {
        use crate::record::Recorder;
        use crate::synthetic::{symbol_names, SyntheticConfig, SyntheticFeed};
        let d = TempDir::new("record");
        let cfg = SyntheticConfig {
            seed: 3,
            symbols: symbol_names(4),
            rate: 500.0,
            start_us: 1_740_000_000_123_456,
            max_trades: Some(3_000),
            steady: false,
        };
        let mut synth = SyntheticFeed::new(&cfg).unwrap();
        let mut rec = Recorder::new(&d.0).unwrap();
        let mut written = Vec::new();
        while let Some(t) = synth.next_trade() {
            rec.write(&t).unwrap();
            written.push(t);
        }
        rec.flush().unwrap();
        drop(rec);

        let (read, s) = read_all(&d.0);
        assert_eq!((s.lines, s.bad_lines), (3_000, 0));
        assert_eq!(read.len(), written.len());
        assert!(read.windows(2).all(|w| w[0].time_us <= w[1].time_us));
        let rescale = |v: i64, scale: u8| v * 10i64.pow(u32::from(CSV_SCALE - scale));
        for name in symbol_names(4) {
            let want: Vec<_> = written
                .iter()
                .filter(|t| t.symbol.as_str() == name)
                .map(|t| {
                    (
                        t.trade_id,
                        rescale(t.price, t.price_scale),
                        rescale(t.qty, t.qty_scale),
                        t.time_us,
                        t.is_buyer_maker,
                    )
                })
                .collect();
            let got: Vec<_> = read
                .iter()
                .filter(|t| t.symbol.as_str() == name)
                .map(|t| (t.trade_id, t.price, t.qty, t.time_us, t.is_buyer_maker))
                .collect();
            assert!(!want.is_empty());
            assert_eq!(got, want, "{name}");
        }
    }
}
