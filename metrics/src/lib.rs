//! Metrics of every long-running mdbus process, in Prometheus text format.
//!
//! Upstream: the processes' own counters (cache-padded atomics written on their hot paths) and
//! [`Latency`] recorders. Downstream: `GET /metrics` on `--metrics ADDR` ([`serve`]), scraped by
//! Prometheus and by `mdbus stats`.
//!
//! Nothing here runs per message except [`Latency::record`], which touches only a thread-local
//! histogram (no allocation once warm, no lock). Counters are read when a scrape arrives: each
//! process hands [`serve`] a function that fills a [`Families`] from its atomics.

#![forbid(unsafe_code)]

mod client;
mod exposition;
mod latency;
mod server;

pub use client::{scrape, ScrapeError};
pub use exposition::{parse_text, Families, Sample};
pub use latency::{Latency, LatencySnapshot};
pub use server::{serve, MetricsServer, MetricsServerError};
