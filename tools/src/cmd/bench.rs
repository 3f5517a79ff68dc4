//! `mdbus bench <scenario>`: benchmarks with same-run baselines (see `mdbus-benches`).

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use mdbus_benches::peer::{run_publisher, run_subscriber, PeerSpec};
use mdbus_benches::{render_table, run_scenario, BenchOptions};

use crate::Cli;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// `latency`, `throughput`, `fanout`, `broker`, `wal`, `memory`, `recovery`, `gateway`,
    /// `ingest`, `batch` (or `all`).
    pub scenario: String,
    /// A short run (under a minute for all scenarios).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object per scenario instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do not pin the two processes to cores 0 and 1.
    #[arg(long)]
    pub no_pin: bool,
    /// Latency scenario: messages per second.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Messages per measurement.
    #[arg(long)]
    pub count: Option<u64>,
    /// Gateway scenario: WebSocket clients.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Gateway scenario: the gateway's tokio threads.
    #[arg(long, default_value_t = 1)]
    pub gateway_threads: usize,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Files of `mdbus bench all --json` output, one per run.
    #[arg(required = true)]
    pub runs: Vec<std::path::PathBuf>,
    /// Folder of `<scenario>.md` texts (method and analysis) placed above each table.
    #[arg(long, default_value = "benches/report")]
    pub analysis: std::path::PathBuf,
    /// The machine, as the header should name it.
    #[arg(long)]
    pub machine: String,
    /// The command that produced the runs, for the header.
    #[arg(long, default_value = "scripts/benchmarks.sh")]
    pub command: String,
}

/// Prints `BENCHMARKS.md` rendered from the runs' JSON lines.
pub fn report(a: &ReportArgs) -> Result<ExitCode> {
    let mut runs = Vec::new();
    for f in &a.runs {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let mut run = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| l.starts_with('{')) {
            let r: mdbus_benches::ScenarioReport =
                serde_json::from_str(line).with_context(|| format!("{}:{}: not a bench report", f.display(), i + 1))?;
            run.push(r);
        }
        runs.push(run);
    }
    let mut analysis = std::collections::BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(&a.analysis) {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md") {
                if let (Some(stem), Ok(text)) = (p.file_stem(), std::fs::read_to_string(&p)) {
                    analysis.insert(stem.to_string_lossy().into_owned(), text);
                }
            }
        }
    }
    let info = mdbus_benches::report::RunInfo {
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        machine: a.machine.clone(),
        command: a.command.clone(),
    };
    print!("{}", mdbus_benches::report::render_markdown(&runs, &info, &analysis));
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct PeerArgs {
    /// `pub` or `sub`.
    #[arg(long)]
    pub role: String,
    /// The peer's spec as JSON (written by `mdbus bench`).
    #[arg(long)]
    pub spec: String,
}

pub fn run(_cli: &Cli, a: &BenchArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the mdbus executable")?;
    let opts = BenchOptions {
        exe,
        quick: a.quick,
        pin: !a.no_pin,
        rate: a.rate,
        count: a.count,
        clients: a.clients,
        gateway_threads: a.gateway_threads,
    };
    let scenarios: Vec<&str> = match a.scenario.as_str() {
        "all" => {
            vec!["latency", "throughput", "fanout", "broker", "wal", "memory", "recovery", "gateway", "ingest", "batch"]
        }
        s => vec![s],
    };
    for s in scenarios {
        let report = run_scenario(s, &opts).with_context(|| format!("benchmark {s}"))?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", render_table(&report));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn peer(_cli: &Cli, a: &PeerArgs) -> Result<ExitCode> {
    let spec: PeerSpec = serde_json::from_str(&a.spec).context("parsing --spec")?;
    match a.role.as_str() {
        "pub" => {
            let report = run_publisher(&spec).context("bench publisher")?;
            println!("{}", serde_json::to_string(&report)?);
        }
        "sub" => {
            let report = run_subscriber(&spec, |word| {
                println!("{word}");
                let _ = std::io::stdout().flush();
            })
            .context("bench subscriber")?;
            println!("{}", serde_json::to_string(&report)?);
        }
        other => bail!("--role {other:?}: expected pub or sub"),
    }
    Ok(ExitCode::SUCCESS)
}
