//! One module per subcommand.

pub mod batch;
pub mod bench;
pub mod broker;
pub mod demo;
pub mod gateway;
pub mod mock_exchange;
pub mod replay;
pub mod stats;
pub mod tail;
