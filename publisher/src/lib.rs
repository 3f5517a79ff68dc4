//! The broker side of the bus: aggregation, the synthetic feed, and the publish loop.
//!
//! Upstream: a trade source (the synthetic generator today). Downstream: the real-time stream in
//! shared memory (`mdbus-bus`), read by `mdbus-subscribers`, and the optional `--record` CSV.
#![forbid(unsafe_code)]

pub mod affinity;
pub mod aggregator;
pub mod broker;
pub mod engine;
pub mod record;
pub mod synthetic;
pub mod walthread;
