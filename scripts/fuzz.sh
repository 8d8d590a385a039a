#!/bin/bash
# Runs every cargo-fuzz target (or those named) for SECS seconds each
# (default 60), on stable Rust (`-s none`: no sanitizer; debug assertions
# on), growing the corpus under fuzz/corpus/<target>/ and leaving any
# crash under fuzz/artifacts/<target>/. Prints, per target, the runs, the
# corpus size, the CPU seconds spent and the crashes found; exits 1 if
# any target crashed. Minimise a grown corpus before committing it:
#   MERGE=1 scripts/fuzz.sh <target>
# Usage: SECS=300 JOBS=1 scripts/fuzz.sh [target...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${SECS:-60}
JOBS=${JOBS:-1}
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build -s none -a
status=0
printf '%-14s %10s %8s %8s %8s\n' target runs corpus cpu_s crashes
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(ls "artifacts/$t" | wc -l)
  log=$(mktemp)
  if [ -n "${MERGE:-}" ]; then
    tmp=$(mktemp -d)
    if cargo fuzz run -s none -a "$t" "$tmp" "corpus/$t" -- -merge=1 >"$log" 2>&1; then
      rm -rf "corpus/$t" && mv "$tmp" "corpus/$t"
      echo "$t: corpus merged to $(ls "corpus/$t" | wc -l) inputs"
    else
      # An input crashes the target: keep the corpus as it was.
      echo "$t: merge failed, corpus left as it was:"
      tail -5 "$log" | sed 's/^/    /'
      rm -rf "$tmp"
      status=1
    fi
    rm -f "$log"
    continue
  fi
  t0=$(date +%s.%N)
  # -timeout: one input taking longer than this is a hang (the session
  # targets end every session within seconds once the client closes).
  cargo fuzz run -s none -a "$t" "corpus/$t" -- \
    -max_total_time="$SECS" -timeout=60 -rss_limit_mb=4096 -jobs="$JOBS" -workers="$JOBS" \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || true
  t1=$(date +%s.%N)
  runs=$(grep -h "stat::number_of_executed_units" "$log" fuzz-*.log 2>/dev/null | awk '{s+=$2} END {print s+0}')
  # Each job keeps one core busy for the whole run.
  cpu=$(awk -v a="$t0" -v b="$t1" -v j="$JOBS" 'BEGIN {printf "%.0f", (b - a) * j}')
  after=$(ls "artifacts/$t" | wc -l)
  crashes=$((after - before))
  printf '%-14s %10s %8s %8s %8s\n' "$t" "$runs" "$(ls "corpus/$t" | wc -l)" "$cpu" "$crashes"
  if [ "$crashes" -gt 0 ]; then
    status=1
    grep -E "panicked|ERROR|SUMMARY" "$log" | head -5 | sed 's/^/    /'
    ls "artifacts/$t" | tail -"$crashes" | sed "s|^|    artifacts/$t/|"
  fi
  rm -f "$log" fuzz-*.log
done
exit $status
