//! `mdbus tail`: print a stream's frames as JSON lines; report gaps, duplicates and reordering.

use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use mdbus_schema::json::write_frame_line;
use mdbus_schema::service::stream_id;
use mdbus_schema::{FrameKind, Interval};
use mdbus_subscribers::{Reader, ReaderOptions, WaitMode};

use crate::config::Config;
use crate::Cli;

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Stream to read.
    #[arg(long, default_value = "realtime")]
    pub stream: String,
    /// Only these symbols (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub symbol: Vec<String>,
    /// Only K-lines of these intervals (repeat or comma-separate; trades still pass unless
    /// --kind says otherwise).
    #[arg(long, value_delimiter = ',')]
    pub interval: Vec<String>,
    /// Only these kinds: trade, kline, heartbeat (default: trade and kline).
    #[arg(long, value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Exit after printing this many frames.
    #[arg(long)]
    pub count: Option<u64>,
    /// Give up after this many seconds (exit status 1 if --count was not reached).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Busy-poll instead of sleeping on the wake-up event (lowest latency, one core).
    #[arg(long)]
    pub spin: bool,
    /// Samples queued for this reader before the oldest is lost.
    #[arg(long)]
    pub buffer: Option<usize>,
    /// Start at this seq: older frames come from the write-ahead log, then the live stream joins
    /// with no gap and no duplicate (gaps while live are filled from the log too).
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// The write-ahead log to fill from (default: the broker's, <data dir>/<bus>/wal/<stream>);
    /// giving it also fills live gaps without --from-seq.
    #[arg(long, env = "MDBUS_WAL", value_name = "DIR")]
    pub wal: Option<std::path::PathBuf>,
}

pub fn run(cli: &Cli, a: &TailArgs) -> Result<ExitCode> {
    let cfg = Config::load(cli.config.as_deref())?;
    if stream_id(&a.stream).is_none() {
        bail!("--stream {:?}: unknown stream (known: realtime, snapshot, acks)", a.stream);
    }
    // Each stream's shared memory is sized its own way; both sides must agree.
    let settings = match a.stream.as_str() {
        "snapshot" => mdbus_bus::StreamSettings::snapshot(),
        "acks" => mdbus_bus::StreamSettings::acks(),
        _ => cfg.stream_settings(),
    };
    let mut opts = ReaderOptions::default().settings(settings).node_name("tail");
    if let Some(b) = a.buffer {
        opts = opts.buffer(b);
    }
    for s in &a.symbol {
        opts = opts.symbol(s).with_context(|| format!("--symbol {s:?}"))?;
    }
    for i in &a.interval {
        let iv: Interval = i.parse().with_context(|| format!("--interval {i:?}"))?;
        opts = opts.interval(iv);
    }
    for k in &a.kind {
        let kind = match k.as_str() {
            "trade" => FrameKind::Trade,
            "kline" => FrameKind::Kline,
            "heartbeat" => FrameKind::Heartbeat,
            "snapshot" => FrameKind::Snapshot,
            other => bail!("--kind {other:?}: expected trade, kline, heartbeat or snapshot"),
        };
        opts = opts.kind(kind);
    }
    if !a.interval.is_empty() && a.kind.is_empty() {
        opts = opts.kind(FrameKind::Kline);
    }
    if a.from_seq.is_some() || a.wal.is_some() {
        opts = opts.wal(&a.wal.clone().unwrap_or_else(|| cfg.wal.dir_for(&cli.bus(), &a.stream)));
    }
    let stop = crate::signals::stop_flag()?;
    let mut reader = Reader::open(&cli.bus(), &a.stream, opts).context("opening stream")?;
    if let Some(seq) = a.from_seq {
        reader.start_at(seq);
    }
    tracing::info!(service = reader.service(), "tail subscribed");

    let deadline = a.timeout.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut line = String::with_capacity(512);
    let mut printed: u64 = 0;
    let mut bad_lines: u64 = 0;
    let mut broken_pipe = false;
    let wait = Duration::from_millis(100);
    let mode = if a.spin { WaitMode::Spin(wait) } else { WaitMode::Block(wait) };
    let done = |printed: u64| a.count.is_some_and(|c| printed >= c);
    let mut last_health = (reader.health(), reader.feed_state());

    while !stop.load(Ordering::Relaxed) && !done(printed) && !broken_pipe {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        reader.next_batch(mode, |frame| {
            if done(printed) || broken_pipe {
                return;
            }
            line.clear();
            if write_frame_line(&mut line, frame).is_err() {
                bad_lines += 1;
                return;
            }
            line.push('\n');
            if out.write_all(line.as_bytes()).is_err() {
                broken_pipe = true;
                return;
            }
            printed += 1;
        })?;
        if out.flush().is_err() {
            broken_pipe = true;
        }
        let now = (reader.health(), reader.feed_state());
        if now != last_health {
            tracing::info!(health = now.0.as_str(), feed = now.1.as_str(), "publisher health changed");
            last_health = now;
        }
    }
    let _ = out.flush();
    let s = reader.stats();
    eprintln!(
        "tail: {printed} frames printed; {} received in {} samples, {} from the log; gaps {} (missing {}), duplicates {}, reordered {}, decode errors {}, heartbeats {}, publisher restarts {}, health {}",
        s.frames,
        s.samples,
        s.replayed,
        s.seq.gaps,
        s.seq.missing,
        s.seq.duplicates,
        s.seq.reordered,
        s.decode_errors + bad_lines,
        s.heartbeats,
        s.publisher_restarts,
        reader.health().as_str(),
    );
    if let Some(c) = a.count {
        if printed < c && !broken_pipe && !stop.load(Ordering::Relaxed) {
            eprintln!("mdbus: error: timed out with {printed} of {c} frames");
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}
