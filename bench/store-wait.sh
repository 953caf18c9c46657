#!/usr/bin/env bash
# Benchmark: what WAIT costs a replicated write (issue 16). A Redis master with one replica on
# loopback; `dialog-store/examples/store_latency.rs` creates WRITES/2 dialogs and updates each
# once through the Redis store, CONCURRENCY at a time, with `wait_replicas` 0 (the write is
# acknowledged when the master has it) and 1 (when the replica has it too: WAIT 1 in the same
# pipeline), alternating ROUNDS times in one run. Prints one JSON line per run (writes per
# second, p50/p99/max latency of one write) into bench/out/store-wait.txt.
#
#   bench/store-wait.sh        (WRITES=20000 CONCURRENCY=16 ROUNDS=2)
source "$(dirname "$0")/lib.sh"
WRITES=${WRITES:-20000}
CONCURRENCY=${CONCURRENCY:-16}
ROUNDS=${ROUNDS:-2}
command -v redis-server >/dev/null || { echo "redis-server is missing (Debian package redis-server)" >&2; exit 1; }
cargo build --release --quiet -p thalamus-dialog-store --example store_latency
free_port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
MASTER=$(free_port)
REPLICA=$(free_port)
mkdir -p "$WORK/m" "$WORK/r"
redis-server --bind 127.0.0.1 --port "$MASTER" --save "" --appendonly no --dir "$WORK/m" >/dev/null 2>&1 &
PIDS+=("$!")
redis-server --bind 127.0.0.1 --port "$REPLICA" --save "" --appendonly no --dir "$WORK/r" \
  --replicaof 127.0.0.1 "$MASTER" >/dev/null 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do
  redis-cli -p "$REPLICA" info replication 2>/dev/null | grep -q "master_link_status:up" && break
  sleep 0.1
done
mkdir -p bench/out
OUT=bench/out/store-wait.txt
: >"$OUT"
for round in $(seq "$ROUNDS"); do
  for wait in 0 1; do
    target/release/examples/store_latency --url "redis://127.0.0.1:$MASTER/0" \
      --wait-replicas "$wait" --writes "$WRITES" --concurrency "$CONCURRENCY" | tee -a "$OUT"
  done
done
echo "results in $OUT"
