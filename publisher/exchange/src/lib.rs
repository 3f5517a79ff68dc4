//! Exchange connectivity for the broker: a live Binance-compatible trade source ([`client`]) with
//! reconnects and REST backfill, the exchange's message formats ([`wire`]), and a local
//! Binance-compatible exchange with fault injection for tests and demos ([`mock`]).

pub mod client;
pub mod mock;
pub mod wire;
