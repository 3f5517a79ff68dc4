//! `mdbus replay`: frames from the write-ahead log, as JSON lines or raw frames.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mdbus_schema::json::write_frame_line;
use mdbus_schema::FrameRef;
use mdbus_wal::{check, WalReader};

use crate::config::Config;
use crate::Cli;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReplayFormat {
    /// One JSON line per frame (as `mdbus tail`).
    Json,
    /// The frames' bytes exactly as published, back to back.
    Raw,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// First seq to print.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last seq to print (exit 0 once printed).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Keep printing new frames as they are logged.
    #[arg(long)]
    pub follow: bool,
    /// Stream whose log to read.
    #[arg(long, default_value = "realtime")]
    pub stream: String,
    #[arg(long, value_enum, default_value_t = ReplayFormat::Json)]
    pub format: ReplayFormat,
    /// Log folder (default: the broker's, <data dir>/<bus>/wal/<stream>).
    #[arg(long, env = "MDBUS_WAL", value_name = "DIR")]
    pub wal: Option<PathBuf>,
    /// Read the whole log and report every corrupt record with its file and offset.
    #[arg(long)]
    pub check: bool,
}

pub fn run(cli: &Cli, a: &ReplayArgs) -> Result<ExitCode> {
    let cfg = Config::load(cli.config.as_deref())?;
    let dir = a.wal.clone().unwrap_or_else(|| cfg.wal.dir_for(&cli.bus(), &a.stream));
    if !dir.is_dir() {
        bail!("no write-ahead log at {}", dir.display());
    }
    if a.check {
        let (records, problems) = check(&dir).with_context(|| format!("checking {}", dir.display()))?;
        for p in &problems {
            eprintln!("corrupt: {} at byte {}: {}", p.path.display(), p.offset, p.reason);
        }
        eprintln!("replay --check: {records} valid records, {} problems", problems.len());
        return Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let Some(from) = a.from_seq else { bail!("--from-seq is required (or --check)") };
    if a.to_seq.is_some_and(|t| t < from) {
        bail!("--to-seq {} is before --from-seq {from}", a.to_seq.unwrap_or(0));
    }
    let stop = crate::signals::stop_flag()?;
    let mut reader = WalReader::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    reader.seek(from)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    let mut line = String::with_capacity(512);
    let mut last = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(rec) = reader.next_record()? else {
            if a.follow {
                out.flush()?;
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            break;
        };
        if a.to_seq.is_some_and(|t| rec.seq > t) {
            break;
        }
        last = Some(rec.seq);
        match a.format {
            ReplayFormat::Raw => out.write_all(rec.payload)?,
            ReplayFormat::Json => {
                aligned.clear();
                aligned.extend_from_slice(rec.payload);
                let frame = FrameRef::parse(&aligned).with_context(|| format!("frame seq {} in the log", rec.seq))?;
                line.clear();
                write_frame_line(&mut line, &frame).with_context(|| format!("frame seq {} in the log", rec.seq))?;
                line.push('\n');
                out.write_all(line.as_bytes())?;
            }
        }
        if a.to_seq == Some(rec.seq) {
            break;
        }
    }
    out.flush()?;
    if let Some(t) = a.to_seq {
        if last.is_none_or(|l| l < t) && !stop.load(Ordering::Relaxed) {
            bail!("the log ends at seq {} before --to-seq {t}", last.map_or(from.saturating_sub(1), |l| l));
        }
    }
    Ok(ExitCode::SUCCESS)
}
