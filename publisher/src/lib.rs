//! The broker side of the bus: aggregation, the synthetic feed, and the publish loop.
//!
//! Upstream: a trade source (`source.rs`: the synthetic generator, Binance dataset files, or a
//! live exchange connection through the `ingress` queue). Downstream: the real-time stream in
//! shared memory (`mdbus-bus`), read by `mdbus-subscribers`, and the optional `--record` CSV.
#![forbid(unsafe_code)]

pub mod affinity;
pub mod aggregator;
pub mod broker;
pub mod csvfeed;
pub mod engine;
pub mod ingress;
pub mod metrics;
pub mod record;
pub mod snapshot;
pub mod source;
pub mod synthetic;
pub mod walthread;
