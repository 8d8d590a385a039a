#!/usr/bin/env bash
# Sluice and RabbitMQ side by side (issue #8): the same load tool
# (`sluice bench`), the same scenarios, the two brokers alternately on this
# machine, then docs/performance.md with the ratios and plots.
#
#   ./scripts/bench-vs-rabbitmq.sh            # 2 rounds of 8 s per scenario and broker
#   ROUNDS=3 SECS=15 ./scripts/bench-vs-rabbitmq.sh
#   SCENARIOS="transient persistent" ./scripts/bench-vs-rabbitmq.sh
#   KEEP_RESULTS=1 SCENARIOS=stomp ./scripts/bench-vs-rabbitmq.sh   # add to the last results
#
# RabbitMQ 3.10 from Debian (installed if missing, started if not running)
# on 5672 with durable classic queues; Sluice `serve` (single node, release
# build) on 5673. The broker's CPU time per delivered message comes from
# /proc (utime + stime of the broker process before and after a run).
# Not for CI: it takes minutes and wants a quiet machine (no build running).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench_common.sh
. scripts/bench_common.sh
ROUNDS="${ROUNDS:-2}"
SECS="${SECS:-8}"
BACKLOG="${BACKLOG:-1000000}"
SCENARIOS="${SCENARIOS:-transient persistent small large queues100 fanout10 fixed_rate stomp backlog}"
out_dir="target/bench"
mkdir -p "$out_dir"
results="$out_dir/results.jsonl"
# KEEP_RESULTS=1 adds to the results of an earlier run (to re-run some
# scenarios only).
[ "${KEEP_RESULTS:-0}" = 1 ] || : > "$results"

ensure_rabbitmq_installed
rabbitmq-plugins enable --offline rabbitmq_stomp >/dev/null
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  rabbitmq-server -detached
  # await_startup fails until the node has registered with epmd.
  for _ in $(seq 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
  rabbitmqctl -q await_startup
fi
# A running node picks the plugin up without a restart.
rabbitmq-plugins enable rabbitmq_stomp >/dev/null
rabbit_pid=$(pgrep -f 'beam.smp.*rabbit' | head -n1)

cargo build --release --locked --bin sluice
bin=target/release/sluice
data=$(mktemp -d)
"$bin" serve --data-dir "$data/sluice" --amqp 127.0.0.1:5673 --stomp 127.0.0.1:61623 --admin 127.0.0.1:15682 >"$out_dir/sluice.log" 2>&1 &
sluice_pid=$!
trap 'kill $sluice_pid 2>/dev/null; wait $sluice_pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do grep -q "AMQP listening" "$out_dir/sluice.log" && break; sleep 0.1; done

declare -A URI=([sluice]="amqp://guest:guest@127.0.0.1:5673/%2f" [rabbitmq]="amqp://guest:guest@127.0.0.1:5672/%2f")
declare -A STOMP=([sluice]="stomp://guest:guest@127.0.0.1:61623/" [rabbitmq]="stomp://guest:guest@127.0.0.1:61613/")
declare -A PID=([sluice]=$sluice_pid [rabbitmq]=$rabbit_pid)

# scenario name -> bench flags
declare -A FLAGS=(
  [transient]="-s 1024 -a"
  [persistent]="-s 1024 --persistent -c 200 -q 500 --multi-ack 50"
  [small]="-s 16 -a"
  [large]="-s 65536 -a"
  [queues100]="--queues 100 -x 100 -y 100 -s 1024 -a"
  [fanout10]="--fanout 10 -y 10 -s 1024 -a"
  [fixed_rate]="-s 1024 --persistent -c 200 -q 500 -r 5000"
  [stomp]="-s 1024 --persistent -c 200 -q 500 --multi-ack 50"
)

run() { # broker scenario round flags...
  local broker=$1 scenario=$2 round=$3; shift 3
  local uri=${URI[$broker]}
  if [ "$scenario" = stomp ]; then uri=${STOMP[$broker]}; set -- "$@" --manage-uri "${URI[$broker]}"; fi
  measure "${PID[$broker]}" "$results" "$broker" "$scenario" "$round" --uri "$uri" --prefix "bench-${scenario%-*}" "$@"
}

for scenario in $SCENARIOS; do
  for round in $(seq "$ROUNDS"); do
    for broker in sluice rabbitmq; do
      if [ "$scenario" = backlog ]; then
        # Fill (confirmed, persistent, no consumer), then drain.
        run "$broker" backlog-fill "$round" -x 1 -y 0 -C "$BACKLOG" -s 1024 --persistent -c 1000 --keep
        run "$broker" backlog-drain "$round" -x 0 -y 1 -C "$BACKLOG" -s 1024 --persistent -q 1000 --multi-ack 100
      else
        # shellcheck disable=SC2086
        run "$broker" "$scenario" "$round" -z "$SECS" ${FLAGS[$scenario]}
      fi
    done
  done
done

python3 scripts/bench_report.py "$results" docs/performance.md docs/performance
