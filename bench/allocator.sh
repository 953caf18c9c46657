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
cargo build --release --quiet -p thalamus --features mimalloc --bin thalamus
cp "$BIN/thalamus" "$WORK/thalamus-mimalloc"
build
cp "$BIN/thalamus" "$WORK/thalamus-system"
start_buddy
TARGET="sip:load@$BUDDY_SIP"
RESULTS=$WORK/results.txt

run_with() { # allocator
  GW_BIN="$WORK/thalamus-$1" start_gateway "gw-$1-$RANDOM"
  measure_device_calls "$TARGET"
  local answered failed
  answered=$(json_get "$LOAD_JSON" "['answered']"); failed=$(json_get "$LOAD_JSON" "['failed']")
  echo "$1 $LOAD_CPU_T0 $LOAD_CPU_T1 $answered $failed $LOAD_RSS" >> "$RESULTS"
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
