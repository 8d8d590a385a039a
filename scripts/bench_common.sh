# Shared by scripts/bench-vs-rabbitmq.sh and scripts/bench-cluster-vs-rabbitmq.sh
# (sourced; expects $bin, the sluice binary).

# RabbitMQ from Debian, installed if missing.
ensure_rabbitmq_installed() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "installing rabbitmq-server (Debian package)"
    apt-get install -y --no-install-recommends rabbitmq-server >/dev/null || { apt-get update >/dev/null && apt-get install -y --no-install-recommends rabbitmq-server >/dev/null; }
  fi
}

# CPU ticks (user + system) and RSS (KiB) summed over the given pids.
cpu_ticks() { local t=0 p; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
rss_kib() { local t=0 p; for p in $1; do t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$t"; }

# measure "PIDS" RESULTS BROKER SCENARIO ROUND BENCH-ARGS...: runs
# `sluice bench --json BENCH-ARGS`, appends its report to RESULTS with the
# broker, round, and the CPU time and RSS of PIDS before and after, and
# prints a line. A failed run is reported and not counted.
measure() {
  local pids=$1 results=$2 broker=$3 scenario=$4 round=$5; shift 5
  local before after rss0 rss1 json
  before=$(cpu_ticks "$pids"); rss0=$(rss_kib "$pids")
  if ! json=$("$bin" bench --json "$@"); then
    echo "$scenario $broker round $round: the run failed (see above); not counted"
    return 0
  fi
  after=$(cpu_ticks "$pids"); rss1=$(rss_kib "$pids")
  python3 - "$broker" "$scenario" "$round" "$before" "$after" "$rss0" "$rss1" "$(getconf CLK_TCK)" "$json" >>"$results" <<'PY'
import json, sys
broker, scenario, rnd, before, after, rss0, rss1, tck, report = sys.argv[1:]
r = json.loads(report)
r.update(broker=broker, scenario=scenario, round=int(rnd),
         broker_cpu_secs=(int(after) - int(before)) / int(tck),
         rss_before_kib=int(rss0), rss_after_kib=int(rss1))
print(json.dumps(r))
PY
  tail -n1 "$results" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%14s %8s round %d: publish %.0f/s, consume %.0f/s, broker CPU %.1f s" % (r["scenario"], r["broker"], r["round"], r["publish_rate"], r["consume_rate"], r["broker_cpu_secs"]))'
}
