//! `--record DIR`: every ingested trade, as Binance dataset "trades" CSV files.
//!
//! One file per symbol, `DIR/<SYMBOL>-trades.csv`, no header, columns
//! `id,price,qty,quote_qty,time,is_buyer_maker,is_best_match` with the spot dataset's
//! conventions (decimals as written by Binance, time in µs, `True`/`False`). Anyone can recompute
//! the K-lines from these files without our code. Upstream: the broker's ingest; downstream: files.

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
        Ok(Recorder { dir: dir.to_owned(), files: Vec::new(), line: String::with_capacity(128) })
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
            let f = File::create(&path).map_err(|source| RecordWriteError { path, source })?;
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
