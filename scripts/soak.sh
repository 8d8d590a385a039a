#!/usr/bin/env bash
# Soak: mixed load against one broker (`sluice serve` on a fresh data
# directory, free ports on 127.0.0.1) for SOAK_SECS seconds (default an
# hour), sampling every SOAK_SAMPLE seconds (default 10) the messages
# published and delivered per second (from /metrics), the broker's RSS,
# open file descriptors and threads. Writes $SOAK_OUT/soak.csv (default
# target/soak/) and prints each sample.
#
# Load, all at fixed rates so a run is comparable over time:
#   - 1 KiB persistent, confirms (100 in flight), manual acks, prefetch 200: 300 msg/s
#   - 512 B transient, auto-ack: 1,000 msg/s
#   - STOMP 256 B send/subscribe: 200 msg/s
#   - fan-out to 5 queues, a consumer on each, 128 B: 100 msg/s in, 500 out
#   - 20 queues, a producer and a consumer on each: 2 msg/s each producer
#   - connection churn: a 200-message run with fresh connections every 2 s
#
# Fails (exit 1) if a load run failed, the broker died or logged an error,
# messages were left in the queues once every load run drained (a load
# that builds a backlog measures the backlog, not the broker),
# its file descriptors did not come back once the load stopped, or its
# RSS at the end of the load is more than twice (plus 64 MiB) what it
# was a quarter of the way in.
# Usage: SOAK_SECS=3600 BIN=target/release/sluice scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SOAK_SECS:-3600}
SAMPLE=${SOAK_SAMPLE:-10}
OUT=${SOAK_OUT:-target/soak}
BIN=${BIN:-target/release/sluice}
if [ ! -x "$BIN" ]; then
  cargo build --locked --release --bin sluice
fi
mkdir -p "$OUT"
data=$(mktemp -d)
log="$OUT/broker.log"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${broker:-}" ] && kill "$broker" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT

SLUICE_LOG=warn "$BIN" serve --data-dir "$data" --amqp 127.0.0.1:0 --stomp 127.0.0.1:0 --web-stomp 127.0.0.1:0 \
  --metrics 127.0.0.1:0 --admin 127.0.0.1:0 >"$OUT/broker.out" 2>"$log" &
broker=$!
for _ in $(seq 1 200); do
  grep -q "^Web-STOMP listening on" "$OUT/broker.out" 2>/dev/null && break
  sleep 0.1
done
amqp=$(sed -n 's/^AMQP listening on //p' "$OUT/broker.out")
stomp=$(sed -n 's/^STOMP listening on //p' "$OUT/broker.out")
metrics=$(sed -n 's/^metrics listening on //p' "$OUT/broker.out")
[ -n "$amqp" ] && [ -n "$metrics" ] || { echo "soak: the broker did not start"; cat "$log"; exit 1; }
uri="amqp://guest:guest@$amqp"

fds() { ls "/proc/$broker/fd" 2>/dev/null | wc -l; }
rss_mib() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$broker/status" 2>/dev/null; }
threads() { awk '/Threads/ {print $2}' "/proc/$broker/status" 2>/dev/null; }
# Sum of a counter over its label sets.
# (Plain bash, no curl: CI machines may not have it.)
scrape() {
  exec 3<>"/dev/tcp/${metrics%:*}/${metrics##*:}"
  printf 'GET /metrics HTTP/1.0\r\nHost: soak\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
counter() { scrape | awk -v n="$1" '$1 ~ "^"n"({|$)" {s += $2} END {printf "%.0f", s}'; }

fds_before=$(fds)
: >"$OUT/load-churn.txt"
bench() { "$BIN" bench --uri "$uri" -z "$SECS" --drain-timeout 60 "$@"; }
bench --prefix soak-p -s 1024 --persistent -c 100 -q 200 -r 300 >"$OUT/load-persistent.txt" 2>&1 & pids+=($!)
bench --prefix soak-t -s 512 -a -r 1000 >"$OUT/load-transient.txt" 2>&1 & pids+=($!)
"$BIN" bench --uri "stomp://guest:guest@$stomp" --manage-uri "$uri" -z "$SECS" --drain-timeout 60 --prefix soak-s -s 256 -r 200 \
  >"$OUT/load-stomp.txt" 2>&1 & pids+=($!)
bench --prefix soak-f --fanout 5 -y 5 -s 128 -r 100 >"$OUT/load-fanout.txt" 2>&1 & pids+=($!)
bench --prefix soak-m --queues 20 -x 20 -y 20 -s 256 -r 2 >"$OUT/load-queues.txt" 2>&1 & pids+=($!)
(
  end=$((SECONDS + SECS))
  while [ $SECONDS -lt $end ]; do
    "$BIN" bench --uri "$uri" --prefix soak-c -C 200 -s 64 >>"$OUT/load-churn.txt" 2>&1 || { echo "churn run failed" >>"$OUT/load-churn.txt"; exit 1; }
    sleep 2
  done
) & pids+=($!)

echo "t_s,published_per_s,delivered_per_s,rss_mib,fds,threads" >"$OUT/soak.csv"
printf '%6s %10s %10s %8s %6s %7s\n' t_s pub/s deliv/s rss_mib fds threads
t0=$SECONDS
prev_pub=$(counter sluice_vhost_messages_published_total)
prev_del=$(counter sluice_vhost_messages_delivered_total)
quarter_rss=""
while [ $((SECONDS - t0)) -lt "$SECS" ]; do
  sleep "$SAMPLE"
  kill -0 "$broker" 2>/dev/null || { echo "soak: the broker died"; tail -20 "$log"; exit 1; }
  pub=$(counter sluice_vhost_messages_published_total)
  del=$(counter sluice_vhost_messages_delivered_total)
  t=$((SECONDS - t0))
  row="$t,$(((pub - prev_pub) / SAMPLE)),$(((del - prev_del) / SAMPLE)),$(rss_mib),$(fds),$(threads)"
  echo "$row" >>"$OUT/soak.csv"
  echo "$row" | awk -F, '{printf "%6s %10s %10s %8s %6s %7s\n", $1, $2, $3, $4, $5, $6}'
  prev_pub=$pub
  prev_del=$del
  if [ -z "$quarter_rss" ] && [ "$t" -ge $((SECS / 4)) ]; then quarter_rss=$(rss_mib); fi
done
end_rss=$(rss_mib)

failed=0
for p in "${pids[@]}"; do
  wait "$p" || failed=$((failed + 1))
done
# Longer than the exporter keeps a deleted queue's series (4 s): the load
# runs delete their queues at the end.
sleep 6
fds_after=$(fds)
# Queues the load runs delete, and consumers' closes, may still be on
# their way (debug builds on a busy machine): what is left is read again
# for up to 30 s before it counts.
left=$(counter sluice_queue_messages)
for _ in $(seq 1 30); do
  [ "$left" -eq 0 ] && break
  sleep 1
  left=$(counter sluice_queue_messages)
done
errors=$(grep -c " ERROR " "$log" || true)
echo "soak: ${SECS}s; RSS a quarter in ${quarter_rss} MiB, at the end ${end_rss} MiB; fds ${fds_before} before the load, ${fds_after} after; ${failed} failed load runs; ${errors} errors logged; ${left} messages left in queues"
for f in "$OUT"/load-*.txt; do
  name=$(basename "$f" .txt)
  if [ "$name" = load-churn ]; then
    echo "  $name: $(grep -c '^published' "$f") runs of 200 messages on fresh connections, $(grep -c 'failed' "$f") failed"
  else
    echo "  $name: $(grep -hE '^(published|confirmed|consumed) ' "$f" | sed 's/  */ /g' | tr '\n' ';')"
  fi
done
status=0
[ "$failed" -eq 0 ] || { echo "soak: $failed load runs failed"; status=1; }
[ "$left" -eq 0 ] || {
  echo "soak: $left messages left in the queues after the load drained:"
  scrape | grep -E '^sluice_queue_messages(_ready|_unacked)?\{' | awk '$2 != 0'
  status=1
}
[ "$errors" -eq 0 ] || { echo "soak: the broker logged errors:"; grep " ERROR " "$log" | head -5; status=1; }
[ "$fds_after" -le $((fds_before + 10)) ] || { echo "soak: file descriptors leaked ($fds_before -> $fds_after)"; status=1; }
if [ -n "$quarter_rss" ] && [ "$end_rss" -gt $((2 * quarter_rss + 64)) ]; then
  echo "soak: RSS kept growing ($quarter_rss -> $end_rss MiB)"
  status=1
fi
exit $status
