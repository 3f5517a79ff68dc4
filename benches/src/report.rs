//! `BENCHMARKS.md`, rendered from the JSON lines of `mdbus bench all --json` (several runs): the
//! key figures against the targets as medians over the runs, then each scenario's table from its
//! median run, with the method and the analysis kept in `benches/report/<scenario>.md`.
//!
//! Upstream: `scripts/benchmarks.sh` (runs the benchmarks, then `mdbus bench-report`). Downstream:
//! the file in the repository root. Nothing here is typed by hand but the analysis files.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::{render_table, ScenarioReport};

/// One key figure of a run, and the target it is held to.
#[derive(Debug, Clone)]
pub struct Figure {
    pub label: String,
    pub value: f64,
    pub unit: &'static str,
    /// `(at least?, threshold)`.
    pub target: Option<(bool, f64)>,
}

fn fig(label: &str, value: f64, unit: &'static str, target: Option<(bool, f64)>) -> Figure {
    Figure { label: label.into(), value, unit, target }
}

fn find<'a>(r: &'a ScenarioReport, part: &str) -> Option<&'a crate::Row> {
    r.rows.iter().find(|x| x.name.contains(part))
}

/// The figures the targets speak of, for one scenario report.
pub fn figures(r: &ScenarioReport) -> Vec<Figure> {
    let mut out = Vec::new();
    match r.scenario.as_str() {
        "latency" => {
            if let (Some(raw), Some(uds), Some(ours)) = (find(r, "raw iceoryx2"), find(r, "unix"), find(r, "mdbus")) {
                let p = |x: u64| x.max(1) as f64;
                out.push(fig("latency p50, mdbus", ours.p50_ns as f64 / 1e3, "µs", None));
                out.push(fig("latency p99, mdbus", ours.p99_ns as f64 / 1e3, "µs", None));
                out.push(fig(
                    "latency p50 / raw iceoryx2 p50",
                    p(ours.p50_ns) / p(raw.p50_ns),
                    "×",
                    Some((false, 1.25)),
                ));
                out.push(fig(
                    "latency p99 / raw iceoryx2 p99",
                    p(ours.p99_ns) / p(raw.p99_ns),
                    "×",
                    Some((false, 1.5)),
                ));
                out.push(fig("Unix socket p50 / mdbus p50", p(uds.p50_ns) / p(ours.p50_ns), "×", Some((true, 5.0))));
            }
        }
        "throughput" => {
            if let Some(ours) = find(r, "mdbus") {
                out.push(fig("throughput, mdbus", ours.per_second / 1e6, "M frames/s", Some((true, 10.0))));
                out.push(fig("throughput / raw one frame per sample", ours.ratio_vs_baseline, "×", Some((true, 10.0))));
            }
        }
        "fanout" => {
            if let Some(eight) = find(r, "publisher, lossy stream, 8 subscribers") {
                out.push(fig("fanout, publisher with 8 subscribers", eight.per_second / 1e6, "M frames/s", None));
                out.push(fig(
                    "fanout, publisher with 8 subscribers / 1",
                    eight.ratio_vs_baseline,
                    "×",
                    Some((true, 0.8)),
                ));
            }
            if let Some(eight) = find(r, "lossless stream, 8 subscribers") {
                out.push(fig("fanout lossless, slowest of 8 subscribers / 1", eight.ratio_vs_baseline, "×", None));
            }
        }
        "broker" => {
            if let Some(w) = find(r, "WAL on") {
                out.push(fig("broker end to end, WAL on", w.per_second / 1e6, "M trades/s", Some((true, 3.0))));
                if let Some(c) = find(r, "disk ceiling") {
                    out.push(fig(
                        "disk ceiling for that log (same bytes, same syncs)",
                        c.per_second / 1e6,
                        "M trades/s",
                        None,
                    ));
                    out.push(fig("broker WAL on / disk ceiling", w.per_second / c.per_second.max(1e-9), "×", None));
                }
            }
        }
        "wal" => {
            // The target is held by the durable policies (the broker's default and every-batch);
            // with no sync the raw write is a copy into the page cache (see the wal analysis).
            for (policy, label, target) in [
                ("interval", "interval:10", Some((true, 0.7))),
                ("every-batch", "every-batch", Some((true, 0.7))),
                ("none", "none, no sync", None),
            ] {
                if let Some(a) = find(r, &format!("wal append, durability {policy}")) {
                    out.push(fig(&format!("WAL append ({label}) / raw write"), a.ratio_vs_baseline, "×", target));
                }
            }
            if let Some(p) = find(r, "wal replay (records") {
                out.push(fig("WAL replay", p.per_second / 1e6, "M frames/s", Some((true, 10.0))));
            }
        }
        "memory" => {
            if let Some(m) = find(r, "10 000 symbols") {
                out.push(fig(
                    "broker RSS, 10 000 symbols × 16 intervals",
                    m.rss_bytes as f64 / 1e6,
                    "MB",
                    Some((false, 200.0)),
                ));
            }
        }
        "recovery" => {
            if let Some(x) = find(r, "kill -9") {
                out.push(fig(
                    "restart after kill -9 → first frame",
                    x.p50_ns as f64 / 1e6,
                    "ms",
                    Some((false, 1000.0)),
                ));
            }
        }
        "gateway" => {
            let best =
                r.rows.iter().filter(|x| x.name.ends_with("(sustained)")).map(|x| x.per_second).fold(0.0, f64::max);
            out.push(fig("gateway sustained, 1 000 clients", best, "msgs/s", Some((true, 200_000.0))));
            if let Some(h) = find(r, "half load") {
                out.push(fig("gateway p99 at half load", h.p99_ns as f64 / 1e6, "ms", Some((false, 5.0))));
            }
        }
        "ingest" => {
            if let Some(j) = find(r, "typed and borrowed") {
                out.push(fig("JSON parse per aggTrade message", j.p50_ns as f64, "ns", None));
            }
            if let Some(c) = find(r, "csv:DIR") {
                out.push(fig("broker from CSV, end to end", c.per_second / 1e6, "M trades/s", None));
            }
        }
        "batch" => {
            if let Some(s) = find(r, "SQLite upsert") {
                out.push(fig("snapshot rows written to SQLite", s.per_second / 1e3, "k rows/s", None));
            }
            if let Some(p) = find(r, "PostgreSQL upsert, one") {
                out.push(fig("snapshot rows written to PostgreSQL", p.per_second / 1e3, "k rows/s", None));
            }
            for x in r.rows.iter().filter(|x| x.name.starts_with("broker restart after kill -9")) {
                out.push(fig(
                    &format!("{}: start to publishing", x.name),
                    x.p50_ns as f64 / 1e9,
                    "s",
                    Some((false, 1.0)),
                ));
            }
        }
        _ => {}
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                out.push(' ');
            }
            out.push(c);
        }
        out
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The machine and the run, for the header.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub date: String,
    pub machine: String,
    pub command: String,
}

/// Renders the whole file from `runs` (each the reports of one `bench all` run) and the analysis
/// texts by scenario.
pub fn render_markdown(runs: &[Vec<ScenarioReport>], info: &RunInfo, analysis: &BTreeMap<String, String>) -> String {
    let mut by_scenario: BTreeMap<&str, Vec<&ScenarioReport>> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    for run in runs {
        for r in run {
            if !order.contains(&r.scenario.as_str()) {
                order.push(&r.scenario);
            }
            by_scenario.entry(&r.scenario).or_default().push(r);
        }
    }
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `{}` on {} — do not edit by hand (the method and analysis of each scenario \
         live in `benches/report/<scenario>.md`).\n",
        info.command, info.date
    );
    let _ = writeln!(s, "Machine: {}. Runs: {}.\n", info.machine, runs.len());
    let _ = writeln!(
        s,
        "Every scenario measures its baseline **in the same run**; the summary gives the median over \
         the runs of each figure (a ratio is taken within each run, then the median of those), and \
         each scenario's table is its median run. Absolute figures on a shared 2-vCPU VM move from \
         run to run, ratios much less.\n"
    );
    let _ = writeln!(s, "## Summary against the targets\n");
    let _ = writeln!(s, "| figure | median | runs | target | |");
    let _ = writeln!(s, "|---|---:|---|---|---|");
    for sc in &order {
        let reports = &by_scenario[sc];
        let per_run: Vec<Vec<Figure>> = reports.iter().map(|r| figures(r)).collect();
        let Some(first) = per_run.first() else { continue };
        for (i, f) in first.iter().enumerate() {
            let values: Vec<f64> = per_run.iter().filter_map(|v| v.get(i)).map(|x| x.value).collect();
            let m = median(values.clone());
            let all = values.iter().map(|v| num(*v)).collect::<Vec<_>>().join(", ");
            let (target, verdict) = match f.target {
                None => ("—".to_string(), String::new()),
                Some((at_least, t)) => {
                    let ok = if at_least { m >= t } else { m <= t };
                    let by = if at_least { m / t } else { t / m };
                    (
                        format!("{} {} {}", if at_least { "≥" } else { "≤" }, num(t), f.unit),
                        if ok { "met".into() } else { format!("**missed** ({:.0} % of the way)", by * 100.0) },
                    )
                }
            };
            let _ = writeln!(s, "| {} | {} {} | {} | {} | {} |", f.label, num(m), f.unit, all, target, verdict);
        }
    }
    let _ = writeln!(s);
    for sc in &order {
        let reports = &by_scenario[sc];
        // The median run by the scenario's first figure.
        let mut idx: Vec<(f64, usize)> =
            reports.iter().enumerate().map(|(i, r)| (figures(r).first().map_or(0.0, |f| f.value), i)).collect();
        idx.sort_by(|a, b| a.0.total_cmp(&b.0));
        let Some(&(_, mid)) = idx.get(idx.len() / 2) else { continue };
        let r = reports[mid];
        let _ = writeln!(s, "## `{sc}`\n");
        if let Some(text) = analysis.get(*sc) {
            let _ = writeln!(s, "{}\n", text.trim());
        }
        let _ = writeln!(s, "`mdbus bench {sc}` — median run of {}:\n", reports.len());
        let _ = writeln!(s, "```text\n{}```\n", render_table(r));
    }
    if let Some(text) = analysis.get("_appendix") {
        let _ = writeln!(s, "{}", text.trim());
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Row;

    fn report(rate: f64) -> ScenarioReport {
        let mut a = Row::rate(
            "raw iceoryx2, one frame per sample (baseline)",
            "iox2",
            10,
            std::time::Duration::from_secs(1),
            0,
        );
        a.per_second = 1e6;
        let mut b = Row::rate("mdbus, frames batched per sample", "mdbus", 10, std::time::Duration::from_secs(1), 0);
        b.per_second = rate;
        b.ratio_vs_baseline = rate / 1e6;
        ScenarioReport {
            scenario: "throughput".into(),
            payload_bytes: 224,
            cores: 2,
            pinned: true,
            cpu: "x".into(),
            rows: vec![a, b],
        }
    }

    #[test]
    fn the_summary_is_the_median_of_the_runs_and_says_which_targets_are_missed() {
        let runs = vec![vec![report(12e6)], vec![report(8e6)], vec![report(11e6)]];
        let info = RunInfo { date: "d".into(), machine: "m".into(), command: "c".into() };
        let md = render_markdown(&runs, &info, &BTreeMap::new());
        assert!(
            md.contains("| throughput, mdbus | 11.0 M frames/s | 12.0, 8.00, 11.0 | ≥ 10.0 M frames/s | met |"),
            "{md}"
        );
        assert!(md.contains("| throughput / raw one frame per sample | 11.0 × |"), "{md}");
        assert!(md.contains("median run of 3"), "{md}");
        let md = render_markdown(&[vec![report(5e6)]], &info, &BTreeMap::new());
        assert!(md.contains("**missed** (50 % of the way)"), "{md}");
    }
}
