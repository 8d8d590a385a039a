#!/usr/bin/env bash
# Three-node clusters side by side (issue #8): a 3-node RabbitMQ cluster
# with quorum queues against a 3-node Sluice cluster behind one gateway,
# both on this machine, the same load tool (`sluice bench`) alternately,
# then the "three-node clusters" section of docs/performance.md.
#
#   ./scripts/bench-cluster-vs-rabbitmq.sh            # 2 rounds of 8 s per scenario and broker
#   ROUNDS=3 SECS=15 ./scripts/bench-cluster-vs-rabbitmq.sh
#   SCENARIOS="persistent" ./scripts/bench-cluster-vs-rabbitmq.sh
#
# RabbitMQ 3.10 (Debian; installed if missing): nodes rq1..rq3@localhost on
# AMQP ports 5701..5703, joined into one cluster; the queues are quorum
# queues (x-queue-type=quorum: Raft, 3 replicas, leader on the declaring
# node). Sluice: `sluice node` n1..n3 (release build; every queue has 3
# replicas, Raft, leader placed by rendezvous hashing) and one `sluice
# gateway` on 5704; the load tool connects to rq1 and to the gateway. The
# brokers' CPU is the sum over their processes (3 beams; 3 nodes and the
# gateway). Both clusters are stopped and their data removed at the end.
# Not for CI: it takes minutes and wants a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench_common.sh
. scripts/bench_common.sh
ROUNDS="${ROUNDS:-2}"
SECS="${SECS:-8}"
SCENARIOS="${SCENARIOS:-persistent queues10 fixed_rate}"
out_dir="target/bench"
mkdir -p "$out_dir"
results="$out_dir/cluster.jsonl"
: > "$results"

ensure_rabbitmq_installed

cargo build --release --locked --bin sluice
bin=$PWD/target/release/sluice
data=$(mktemp -d)
pids=()
cleanup() {
  for i in 1 2 3; do rabbitmqctl -q -n "rq$i@localhost" stop >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$data"
}
trap cleanup EXIT

# --- RabbitMQ: three nodes on one host, no plugins, joined to rq1.
rq_env() { # node number -> the environment of that node
  local i=$1
  echo "RABBITMQ_NODENAME=rq$i@localhost RABBITMQ_NODE_PORT=$((5700 + i)) RABBITMQ_DIST_PORT=$((25700 + i))" \
    "RABBITMQ_MNESIA_BASE=$data/rq$i/mnesia RABBITMQ_LOG_BASE=$data/rq$i/log" \
    "RABBITMQ_ENABLED_PLUGINS_FILE=$data/rq$i/enabled_plugins RABBITMQ_PID_FILE=$data/rq$i/pid"
}
# rabbitmq-server runs as the rabbitmq user (Debian's wrapper), which
# must be able to reach and write its directories.
chmod 755 "$data"
for i in 1 2 3; do
  mkdir -p "$data/rq$i"
  echo "[]." > "$data/rq$i/enabled_plugins"
  if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq:rabbitmq "$data/rq$i"; fi
  # shellcheck disable=SC2046
  env $(rq_env "$i") rabbitmq-server -detached
done
for i in 1 2 3; do
  for _ in $(seq 90); do rabbitmqctl -q -n "rq$i@localhost" await_startup >/dev/null 2>&1 && break; sleep 1; done
  rabbitmqctl -q -n "rq$i@localhost" await_startup
done
for i in 2 3; do
  rabbitmqctl -q -n "rq$i@localhost" stop_app
  rabbitmqctl -q -n "rq$i@localhost" join_cluster rq1@localhost
  rabbitmqctl -q -n "rq$i@localhost" start_app
done
rabbitmqctl -q -n rq1@localhost cluster_status | grep -c "rq[123]@localhost" >/dev/null
rabbit_pids=$(for i in 1 2 3; do echo "$(cat "$data/rq$i/pid")"; done | tr '\n' ' ')

# --- Sluice: three nodes and a gateway.
export XDG_CONFIG_HOME="$data/config"
start_node() { # id port seeds...
  local id=$1 port=$2; shift 2
  "$bin" node --id "$id" --listen "127.0.0.1:$port" --data-dir "$data/$id" --metrics 127.0.0.1:0 "$@" >"$out_dir/cluster-$id.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do grep -q "node protocol listening" "$out_dir/cluster-$id.log" && break; sleep 0.1; done
}
start_node n1 7301
start_node n2 7302 --seeds 127.0.0.1:7301
start_node n3 7303 --seeds 127.0.0.1:7301
sleep 2
"$bin" gateway --nodes 127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303 --amqp 127.0.0.1:5704 --stomp 127.0.0.1:61704 \
  --web-stomp 127.0.0.1:15704 --metrics 127.0.0.1:0 --admin 127.0.0.1:0 >"$out_dir/cluster-gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do grep -q "Web-STOMP listening" "$out_dir/cluster-gateway.log" && break; sleep 0.1; done
sluice_pids="${pids[*]}"

declare -A URI=([sluice]="amqp://guest:guest@127.0.0.1:5704/%2f" [rabbitmq]="amqp://guest:guest@127.0.0.1:5701/%2f")
declare -A PIDS=([sluice]="$sluice_pids" [rabbitmq]="$rabbit_pids")
declare -A ARGS=([sluice]="" [rabbitmq]="--queue-arg x-queue-type=quorum")

# scenario name -> bench flags (every message persistent: quorum queues
# store every message anyway)
declare -A FLAGS=(
  [persistent]="-s 1024 --persistent -c 200 -q 500 --multi-ack 50"
  [queues10]="--queues 10 -x 10 -y 10 -s 1024 --persistent -c 100 -q 500 --multi-ack 50"
  [fixed_rate]="-s 1024 --persistent -c 200 -q 500 -r 2000"
)

run() { # broker scenario round flags...
  local broker=$1 scenario=$2 round=$3; shift 3
  # shellcheck disable=SC2086
  measure "${PIDS[$broker]}" "$results" "$broker" "$scenario" "$round" --uri "${URI[$broker]}" --prefix "cbench-$scenario" ${ARGS[$broker]} "$@"
}

for scenario in $SCENARIOS; do
  for round in $(seq "$ROUNDS"); do
    for broker in sluice rabbitmq; do
      # shellcheck disable=SC2086
      run "$broker" "$scenario" "$round" -z "$SECS" ${FLAGS[$scenario]}
    done
  done
done

python3 scripts/bench_report.py "$results" docs/performance.md docs/performance cluster
