//! Where the broker's trades come from: the synthetic generator, Binance dataset files, or a live
//! exchange connection feeding the [`Ingress`] queue. One interface for the ingest loop.
//!
//! Pull sources (synthetic, CSV) are paced by the broker on event time; a live source is taken
//! as it arrives (its trades carry the exchange's own clock) and also reports each symbol's feed
//! going down and coming back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mdbus_schema::{Symbol, Trade};

use crate::aggregator::SymbolSpec;
use crate::csvfeed::{CsvError, CsvFeed};
use crate::ingress::{Ingress, LiveEvent};
use crate::synthetic::{SymbolNamesError, SyntheticConfig, SyntheticFeed};

/// Which source, configured.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    Synthetic(SyntheticConfig),
    /// Binance dataset files: a file or a folder (see [`CsvFeed`]).
    Csv(PathBuf),
    /// A live connection (started by the caller) pushing into `ingress`; `symbols[i]` has id `i`.
    Live {
        ingress: Arc<Ingress>,
        symbols: Vec<String>,
    },
}

impl SourceConfig {
    pub fn describe(&self) -> String {
        match self {
            SourceConfig::Synthetic(c) => format!("synthetic ({} symbols, {} trades/s)", c.symbols.len(), c.rate),
            SourceConfig::Csv(p) => format!("csv:{}", p.display()),
            SourceConfig::Live { symbols, .. } => format!("live ({} symbols)", symbols.len()),
        }
    }
}

/// A source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Symbols(#[from] SymbolNamesError),
    #[error(transparent)]
    Csv(#[from] CsvError),
    #[error("symbol {0:?}: {1}")]
    Symbol(String, mdbus_schema::SymbolError),
}

/// One thing from a source.
#[derive(Debug, Clone, Copy)]
pub enum Item {
    Trade(Trade),
    Down(u32),
    Up { symbol: u32, backfilled: bool },
    Reconnected,
}

/// Price and quantity scale of external data (Binance's 8 fractional digits).
pub const EXTERNAL_SCALE: u8 = 8;

/// Returned by `peek_time_us` of a live source with nothing queued: not due, not ended.
pub const NOT_YET: i64 = i64::MAX - 1;

#[derive(Debug)]
pub(crate) enum Feed {
    Synthetic(SyntheticFeed),
    Csv(CsvFeed),
    Live { ingress: Arc<Ingress>, specs: Vec<SymbolSpec>, produced: u64 },
}

impl Feed {
    pub(crate) fn open(c: &SourceConfig) -> Result<Feed, SourceError> {
        Ok(match c {
            SourceConfig::Synthetic(s) => Feed::Synthetic(SyntheticFeed::new(s)?),
            SourceConfig::Csv(p) => Feed::Csv(CsvFeed::open(p)?),
            SourceConfig::Live { ingress, symbols } => {
                let specs = symbols
                    .iter()
                    .map(|s| {
                        Symbol::new(s)
                            .map(|symbol| SymbolSpec { symbol, price_scale: EXTERNAL_SCALE, qty_scale: EXTERNAL_SCALE })
                            .map_err(|e| SourceError::Symbol(s.clone(), e))
                    })
                    .collect::<Result<_, _>>()?;
                Feed::Live { ingress: Arc::clone(ingress), specs, produced: 0 }
            }
        })
    }

    pub(crate) fn specs(&self) -> Vec<SymbolSpec> {
        match self {
            Feed::Synthetic(f) => f.specs(),
            Feed::Csv(f) => f.specs(),
            Feed::Live { specs, .. } => specs.clone(),
        }
    }

    /// A live source's trades carry the exchange's clock: no shift to the wall clock.
    pub(crate) fn is_live(&self) -> bool {
        matches!(self, Feed::Live { .. })
    }

    /// Event time of the next item (µs): `i64::MAX` once exhausted, [`NOT_YET`] for a live
    /// source with nothing queued, `i64::MIN` for a queued feed-state event.
    pub(crate) fn peek_time_us(&self) -> i64 {
        match self {
            Feed::Synthetic(f) => f.peek_time_us(),
            Feed::Csv(f) => f.peek_time_us(),
            // Live items are due on arrival.
            Feed::Live { ingress, .. } => ingress.peek_time_us().map_or(NOT_YET, |_| i64::MIN),
        }
    }

    pub(crate) fn next(&mut self) -> Option<Item> {
        match self {
            Feed::Synthetic(f) => f.next_trade().map(Item::Trade),
            Feed::Csv(f) => f.next_trade().map(Item::Trade),
            Feed::Live { ingress, produced, specs } => loop {
                let e = ingress.pop()?;
                return Some(match e {
                    LiveEvent::Trade(t) => {
                        if t.symbol_id as usize >= specs.len() {
                            continue;
                        }
                        *produced += 1;
                        Item::Trade(t)
                    }
                    LiveEvent::Down(s) => Item::Down(s),
                    LiveEvent::Up { symbol, backfilled } => Item::Up { symbol, backfilled },
                    LiveEvent::Reconnected => Item::Reconnected,
                });
            },
        }
    }

    pub(crate) fn produced(&self) -> u64 {
        match self {
            Feed::Synthetic(f) => f.produced(),
            Feed::Csv(f) => f.produced(),
            Feed::Live { produced, .. } => *produced,
        }
    }

    /// Idles up to `d`; a live source returns as soon as something arrives.
    pub(crate) fn idle(&self, d: Duration) {
        match self {
            Feed::Live { ingress, .. } => {
                ingress.wait(d);
            }
            _ => std::thread::sleep(d),
        }
    }

    /// A restarted broker continues after the trades it already has (`last[id]`: last trade id
    /// and price per symbol). A dataset skips them now (so replay timing starts at the restart
    /// point); the generator continues its ids; a live source's repeats are dropped as they come.
    pub(crate) fn resume_after(&mut self, last: &[(i64, Option<i64>)]) -> u64 {
        match self {
            Feed::Synthetic(f) => {
                f.resume_after(last);
                0
            }
            Feed::Csv(f) => f.skip_through(&last.iter().map(|l| l.0).collect::<Vec<_>>()),
            Feed::Live { .. } => 0,
        }
    }

    pub(crate) fn synthetic_mut(&mut self) -> Option<&mut SyntheticFeed> {
        match self {
            Feed::Synthetic(f) => Some(f),
            _ => None,
        }
    }
}
