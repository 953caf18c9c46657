#!/usr/bin/env bash
# Benchmark: the cost of dialog replication. The same device-originated load (RATE calls/s for
# SECS s, DEVICES devices, calls held HOLD_MS, to the simulator's buddy) against one gateway per
# setting: replication off (the baseline, same run), and confirmed dialogs replicated to the
# memory store, the embedded store (redb on local disk, the default) and Redis (a local
# redis-server, when installed). Reports set-up latency and gateway CPU per call.
#
#   bench/load-replication.sh           (RATE=250 SECS=10 DEVICES=500 HOLD_MS=1000)
#
# Rewrites the "Replication on against off" table of docs/benchmarks.md. When the gateway has
# no `cluster.replication` setting the table says so instead.
source "$(dirname "$0")/lib.sh"
RATE=${RATE:-250}
SECS=${SECS:-10}
DEVICES=${DEVICES:-500}
HOLD_MS=${HOLD_MS:-1000}
build
TABLE=$WORK/table.md
cat > "$TABLE" <<EOF
| setting | calls/s asked -> placed | attempted / answered / failed | set-up ms p50 / p99 / p99.9 | gateway CPU us per call | gateway RSS after |
| --- | --- | --- | --- | --- | --- |
EOF
if ! "$BIN/thalamus" config 2>/dev/null | grep -q '^replication = '; then
  echo "| replication on | pending: clustering issue (no cluster.replication setting in this gateway) | | | | |" >> "$TABLE"
  cat "$TABLE"
  doc_table replication "Replication on against off" "$TABLE"
  exit 0
fi
start_buddy
TARGET="sip:load@$BUDDY_SIP"

run_with() {
  local name=$1 toml=$2
  start_gateway "gw-${name//[^a-z0-9]/_}" "$toml"
  measure_device_calls "$TARGET"
  python3 - "$LOAD_JSON" "$name" "$LOAD_CPU_T0" "$LOAD_CPU_T1" "$HZ" "$LOAD_RSS" >> "$TABLE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); name = sys.argv[2]
cpu = (int(sys.argv[4]) - int(sys.argv[3])) / int(sys.argv[5])
l = r["setup_latency"]
fails = "; failed: " + ", ".join(f"{k} x{v}" for k, v in r["failures"].items()) if r["failures"] else ""
print(f"| {name} | {r['target_cps']:.0f} -> {r['achieved_cps']:.0f} | {r['attempted']} / {r['answered']} / {r['failed']}{fails} | "
      f"{l['p50_ms']:.2f} / {l['p99_ms']:.2f} / {l['p99_9_ms']:.2f} | {cpu * 1e6 / max(r['attempted'], 1):.0f} | "
      f"{int(sys.argv[6]) / 1024:.1f} MiB |")
PY
}

run_with "baseline: replication off" $'[cluster]\nreplication = "off"'
run_with "confirmed dialogs -> memory store" $'[cluster]\nreplication = "confirmed-dialog"\n[cluster.store]\nbackend = "memory"'
run_with "confirmed dialogs -> embedded store (default)" $'[cluster]\nreplication = "confirmed-dialog"\n[cluster.store]\nbackend = "embedded"'
if command -v redis-server >/dev/null; then
  REDIS_PORT=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  run_with "confirmed dialogs -> Redis (local, no persistence)" \
      $'[cluster]\nreplication = "confirmed-dialog"\n[cluster.store]\nbackend = "redis"\n[cluster.store.redis]\nurl = "redis://127.0.0.1:'"$REDIS_PORT"$'"'
else
  echo "| confirmed dialogs -> Redis | not measured: redis-server is not installed | | | | |" >> "$TABLE"
fi
cat "$TABLE"
doc_table replication "Replication on against off" "$TABLE"
