#!/usr/bin/env bash
# Regenerates BENCHMARKS.md: RUNS runs (default 3) of every `mdbus bench` scenario, then the
# report (medians over the runs against the targets; each scenario's table from its median run;
# the method and analysis texts from benches/report/<scenario>.md). Extra arguments go to
# `mdbus bench all` (e.g. --no-pin, or --quick to try the script itself).
# Run it on a quiet machine: nothing else should compete for the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
cargo build --release --quiet --bin mdbus
out=target/bench-runs
rm -rf "$out"
mkdir -p "$out"
for i in $(seq 1 "$RUNS"); do
    echo "benchmarks: run $i of $RUNS" >&2
    target/release/mdbus bench all --json "$@" > "$out/run-$i.jsonl"
done
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
mem="$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
machine="$(nproc) vCPU ($cpu), $mem, $(uname -sr)"
command="scripts/benchmarks.sh"
if [ "$#" -gt 0 ]; then command="$command $*"; fi
target/release/mdbus bench-report "$out"/run-*.jsonl --machine "$machine" --command "RUNS=$RUNS $command" > BENCHMARKS.md.new
mv BENCHMARKS.md.new BENCHMARKS.md
echo "benchmarks: BENCHMARKS.md written from $RUNS runs" >&2
