#!/usr/bin/env bash
# Before and after in one run: bench/load-sip-calls.sh (SIPp calling simulated devices through
# one gateway) with the gateway binary of BEFORE_BIN and with this build's, alternating, ROUNDS
# rounds each, with the same simulator, SIPp, rates and devices. Prints every run's table, then
# per rate the mean gateway CPU per call of each and the ratio after / before. docs/ is not
# touched.
#
#   BEFORE_BIN=/path/to/older/thalamus bench/compare-gateway.sh
#       (ROUNDS=2; RATES, SECS, DEVICES, HOLD_MS as bench/load-sip-calls.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BEFORE_BIN:?set BEFORE_BIN to the thalamus binary to compare with}"
ROUNDS=${ROUNDS:-2}
export RATES=${RATES:-"250 500"}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin thalamus --bin thalamus-sim
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cp docs/benchmarks.md "$OUT/doc.md"
for round in $(seq "$ROUNDS"); do
  for side in before after; do
    echo "== round $round: $side" >&2
    if [ "$side" = before ]; then gw=$BEFORE_BIN; else gw=$PWD/target/release/thalamus; fi
    GW_BIN=$gw SKIP_BUILD=1 DOC="$OUT/doc.md" FIGURES="$OUT/$side.$round.json" \
      bench/load-sip-calls.sh > "$OUT/$side.$round.txt"
    cat "$OUT/$side.$round.txt"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import glob, json, os, sys
out, rounds = sys.argv[1], int(sys.argv[2])
runs = {"before": [], "after": []}
for side in runs:
    for r in range(1, rounds + 1):
        runs[side].append(json.load(open(os.path.join(out, f"{side}.{r}.json")))["sip_calls"])
rates = sorted(runs["after"][0], key=int)
print("| calls/s | gateway before: CPU us per call (runs) | after | after / before | calls failed before / after |")
print("| --- | --- | --- | --- | --- |")
for rate in rates:
    b = [r[rate]["cpu_us_per_call"] for r in runs["before"]]
    a = [r[rate]["cpu_us_per_call"] for r in runs["after"]]
    fb = sum(r[rate]["failed"] for r in runs["before"])
    fa = sum(r[rate]["failed"] for r in runs["after"])
    mb, ma = sum(b) / len(b), sum(a) / len(a)
    print(f"| {rate} | {mb:.0f} ({', '.join(f'{x:.0f}' for x in b)}) | {ma:.0f} ({', '.join(f'{x:.0f}' for x in a)}) | "
          f"**{ma / mb:.2f}x** | {fb} / {fa} |")
PY
