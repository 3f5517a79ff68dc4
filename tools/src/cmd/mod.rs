//! One module per subcommand.

pub mod bench;
pub mod broker;
pub mod demo;
pub mod replay;
pub mod tail;
