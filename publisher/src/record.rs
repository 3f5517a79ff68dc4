//! `--record DIR`: every ingested trade, as Binance dataset "trades" CSV files.
//!
//! One file per symbol, `DIR/<SYMBOL>-trades.csv`, no header, columns
//! `id,price,qty,quote_qty,time,is_buyer_maker,is_best_match` with the spot dataset's
//! conventions (decimals as written by Binance, time in µs, `True`/`False`). Anyone can recompute
//! the K-lines from these files without our code. Upstream: the broker's ingest; downstream: files.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mdbus_schema::{Symbol, Trade};

/// Writes trades to per-symbol CSV files (buffered; flushed on [`Recorder::flush`] and drop).
#[derive(Debug)]
pub struct Recorder {
    dir: PathBuf,
    files: Vec<Option<BufWriter<File>>>,
    line: String,
    /// Append to existing files (a resumed recording) instead of truncating them.
    append: bool,
}

/// A recording file could not be created or written.
#[derive(Debug, thiserror::Error)]
#[error("recording to {path}: {source}")]
pub struct RecordWriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl Recorder {
    /// Creates `dir` if needed. Files are created on a symbol's first trade (truncating any old one).
    pub fn new(dir: &Path) -> Result<Recorder, RecordWriteError> {
        std::fs::create_dir_all(dir).map_err(|source| RecordWriteError { path: dir.to_owned(), source })?;
        Ok(Recorder { dir: dir.to_owned(), files: Vec::new(), line: String::with_capacity(128), append: false })
    }

    /// Continues the recording in `dir` after a restart: files are appended to. Returns the
    /// recorder and, per file (by symbol), the last trade id in it; a torn last line (the process
    /// died mid-write) is cut off.
    pub fn resume(dir: &Path) -> Result<(Recorder, HashMap<String, i64>), RecordWriteError> {
        let mut r = Recorder::new(dir)?;
        r.append = true;
        let mut last = HashMap::new();
        let entries = std::fs::read_dir(dir).map_err(err(dir))?;
        for e in entries {
            let path = e.map_err(err(dir))?.path();
            let Some(sym) = symbol_of(&path) else { continue };
            let (keep, last_id) = scan(&path, i64::MAX)?;
            cut(&path, keep)?;
            last.insert(sym, last_id);
        }
        Ok((r, last))
    }

    /// Cuts a symbol's file back to its trades with id `<= id` (trades recorded but never logged
    /// before a crash: they will be ingested again).
    pub fn truncate_after(&mut self, symbol: &Symbol, id: i64) -> Result<(), RecordWriteError> {
        let path = Self::path_for(&self.dir, symbol);
        if !path.exists() {
            return Ok(());
        }
        let (keep, last_id) = scan(&path, id)?;
        if cut(&path, keep)? {
            tracing::info!(file = %path.display(), kept_through = last_id, "recording cut back to the logged trades");
        }
        Ok(())
    }

    /// The path of a symbol's file.
    pub fn path_for(dir: &Path, symbol: &Symbol) -> PathBuf {
        dir.join(format!("{}-trades.csv", symbol.as_str()))
    }

    pub fn write(&mut self, t: &Trade) -> Result<(), RecordWriteError> {
        let idx = t.symbol_id as usize;
        if self.files.len() <= idx {
            self.files.resize_with(idx + 1, || None);
        }
        if self.files[idx].is_none() {
            let path = Self::path_for(&self.dir, &t.symbol);
            let f =
                if self.append { File::options().create(true).append(true).open(&path) } else { File::create(&path) };
            let f = f.map_err(|source| RecordWriteError { path, source })?;
            self.files[idx] = Some(BufWriter::with_capacity(64 * 1024, f));
        }
        self.line.clear();
        use std::fmt::Write as _;
        let _ = write!(self.line, "{},", t.trade_id);
        t.price_fixed().write_binance(&mut self.line);
        self.line.push(',');
        t.qty_fixed().write_binance(&mut self.line);
        self.line.push(',');
        t.quote_qty().write_binance(&mut self.line);
        let _ = writeln!(self.line, ",{},{},True", t.time_us, if t.is_buyer_maker { "True" } else { "False" });
        if let Some(w) = self.files[idx].as_mut() {
            w.write_all(self.line.as_bytes())
                .map_err(|source| RecordWriteError { path: Self::path_for(&self.dir, &t.symbol), source })?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), RecordWriteError> {
        for w in self.files.iter_mut().flatten() {
            w.flush().map_err(|source| RecordWriteError { path: self.dir.clone(), source })?;
        }
        Ok(())
    }
}

fn err(path: &Path) -> impl Fn(std::io::Error) -> RecordWriteError {
    let path = path.to_owned();
    move |source| RecordWriteError { path: path.clone(), source }
}

fn symbol_of(path: &Path) -> Option<String> {
    path.file_name()?.to_str()?.strip_suffix("-trades.csv").map(str::to_owned)
}

/// Bytes of whole lines with trade id `<= limit` from the start of the file, and the last such id.
fn scan(path: &Path, limit: i64) -> Result<(usize, i64), RecordWriteError> {
    let text = std::fs::read_to_string(path).map_err(err(path))?;
    let (mut keep, mut last_id) = (0usize, i64::MIN);
    for line in text.split_inclusive('\n') {
        match line.split(',').next().and_then(|x| x.parse::<i64>().ok()) {
            Some(id) if id <= limit && line.ends_with('\n') => {
                keep += line.len();
                last_id = id;
            }
            _ => break,
        }
    }
    Ok((keep, last_id))
}

/// Truncates `path` to `len` bytes if longer; true if it was.
fn cut(path: &Path, len: usize) -> Result<bool, RecordWriteError> {
    let f = std::fs::OpenOptions::new().write(true).open(path).map_err(err(path))?;
    let size = f.metadata().map_err(err(path))?.len();
    if size > len as u64 {
        f.set_len(len as u64).map_err(err(path))?;
        return Ok(true);
    }
    Ok(false)
}
