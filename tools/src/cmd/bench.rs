//! `mdbus bench`: placeholder wired below.
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use crate::Cli;

#[derive(Debug, Args)]
pub struct BenchArgs {}

#[derive(Debug, Args)]
pub struct PeerArgs {}

pub fn run(_cli: &Cli, _a: &BenchArgs) -> Result<ExitCode> {
    anyhow::bail!("not yet")
}
pub fn peer(_cli: &Cli, _a: &PeerArgs) -> Result<ExitCode> {
    anyhow::bail!("not yet")
}
