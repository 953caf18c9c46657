#!/usr/bin/env bash
# Benchmark: the gateway binary's allocator. The same device-originated load (RATE calls/s for
# SECS s, DEVICES devices, calls held HOLD_MS, to the simulator's buddy) against a gateway built
# on the system allocator (the default build) and one built with `--features mimalloc`,
# alternating ROUNDS times so both see the same machine. Reports gateway CPU per call, its RSS
# after the load, and the ratio of the medians (the system allocator is the baseline).
#
#   bench/allocator.sh           (RATE=250 SECS=10 DEVICES=500 HOLD_MS=1000 ROUNDS=3)
#
# Rewrites the "Allocator" table of docs/benchmarks.md. Memory per idle device and per call
# with each allocator: run bench/load-memory.sh with GW_BIN set to either binary.
source "$(dirname "$0")/lib.sh"
RATE=${RATE:-250}
SECS=${SECS:-10}
DEVICES=${DEVICES:-500}
HOLD_MS=${HOLD_MS:-1000}
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet -p thalamus-gateway --features mimalloc --bin thalamus
cp "$BIN/thalamus" "$WORK/thalamus-mimalloc"
build
cp "$BIN/thalamus" "$WORK/thalamus-system"
start_buddy
TARGET="sip:load@$BUDDY_SIP"
RESULTS=$WORK/results.txt

run_with() { # allocator
  GW_BIN="$WORK/thalamus-$1" start_gateway "gw-$1-$RANDOM"
  local secret
  secret=$("$BIN/thalamus-sim" provision --devices "$DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
  local load=("$BIN/thalamus-sim" load --quiet --gateway "$QUIC" --fingerprint "$FP" --secret "$secret"
              --devices "$DEVICES" --target "$TARGET")
  "${load[@]}" --cps 50 --duration 1 --hold-ms 100 >/dev/null 2>&1 || true
  local st=$GW_DIR/status json=$GW_DIR/report.json
  "${load[@]}" --cps "$RATE" --duration "$SECS" --hold-ms "$HOLD_MS" --status-file "$st" --json "$json" >/dev/null 2>&1 &
  local sim=$!
  wait_phase "$st" calling
  local t0; t0=$(cpu_ticks "$GW_PID")
  wait_phase "$st" drained
  local t1; t1=$(cpu_ticks "$GW_PID")
  local rss; rss=$(rss_kib "$GW_PID")
  wait "$sim" || true
  stop_pid "$GW_PID"
  local answered failed
  answered=$(json_get "$json" "['answered']"); failed=$(json_get "$json" "['failed']")
  echo "$1 $t0 $t1 $answered $failed $rss" >> "$RESULTS"
}

for _ in $(seq "$ROUNDS"); do
  run_with system
  run_with mimalloc
done
TABLE=$WORK/table.md
python3 - "$RESULTS" "$HZ" "$RATE" > "$TABLE" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, t0, t1, answered, failed, rss = line.split()
    cpu_us = (int(t1) - int(t0)) / int(sys.argv[2]) * 1e6 / max(int(answered), 1)
    rows.setdefault(name, []).append((cpu_us, int(answered), int(failed), int(rss)))
base = statistics.median(r[0] for r in rows["system"])
print("| allocator | calls/s | answered / failed (all rounds) | gateway CPU us per call, each round | median | vs system | gateway RSS after (median) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, label in [("system", "baseline: system allocator (glibc, the default build)"), ("mimalloc", "mimalloc (`--features mimalloc`)")]:
    r = rows[name]
    med = statistics.median(x[0] for x in r)
    print(f"| {label} | {sys.argv[3]} | {sum(x[1] for x in r)} / {sum(x[2] for x in r)} | "
          f"{', '.join(f'{x[0]:.0f}' for x in r)} | {med:.0f} | {med / base:.2f}x | "
          f"{statistics.median(x[3] for x in r) / 1024:.1f} MiB |")
PY
cat "$TABLE"
doc_table allocator "Allocator" "$TABLE"
