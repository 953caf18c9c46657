#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for a given time each and prints a
# table: time, executions, executions per second, edges covered (libFuzzer's `cov`), corpus
# size before and after, findings.
# Exits non-zero when any target crashed, hung, leaked or ran out of memory.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default 60 s, every target)
#
# Engine: cargo-fuzz with libFuzzer, on the nightly toolchain with AddressSanitizer. cargo-fuzz
# is installed from crates.io when missing, and nightly with rustup when missing; if nightly
# cannot be had, the targets build on stable without a sanitizer (`--sanitizer none`: libFuzzer's
# coverage guidance and every Rust panic still count; only ASan's memory checks are lost, which
# matter for `unsafe` code in dependencies only: the project forbids `unsafe`). The table says
# which was used.
#
# Each run works on a scratch copy of fuzz/corpus/<target>, so the committed seed corpus never
# grows; the grown corpora, logs and crash files stay in bench/out/fuzz/ (not committed). A
# crashing input worth keeping goes into fuzz/corpus/<target>/ by hand, with the fix and a
# regression test beside the code at fault. Builds once (release, debug assertions and overflow
# checks on) into fuzz/target/. FUZZ_OUT overrides the output directory; FUZZ_RSS_MB the memory
# limit per target (default 2048); FUZZ_TIMEOUT the per-input hang limit (default 10 s);
# FUZZ_PARALLEL how many targets run at once (default 1; CI uses 2, one per core).
# It does not minimize corpora or crashes (`cargo fuzz cmin` / `tmin` do) and measures no
# coverage report.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-60}
shift || true
ALL_TARGETS=(mbfp_frame sip_message sdp digest_params heartbeat live_set rtp rtcp)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
OUT=${FUZZ_OUT:-bench/out/fuzz}
RSS_MB=${FUZZ_RSS_MB:-2048}
TIMEOUT=${FUZZ_TIMEOUT:-10}
case $SECS in '' | *[!0-9]*) echo "usage: bench/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

# --- engine -------------------------------------------------------------------------------
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked --quiet
fi
TOOLCHAIN=nightly
SANITIZER=address
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "installing the nightly toolchain (minimal profile)"
  if ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1 \
    || ! cargo +nightly --version >/dev/null 2>&1; then
    echo "nightly unavailable: building on stable without a sanitizer"
    TOOLCHAIN=stable
    SANITIZER=none
  fi
fi
FUZZ=(cargo "+$TOOLCHAIN" fuzz)
FLAGS=(--release --debug-assertions --sanitizer "$SANITIZER")
ENGINE="cargo-fuzz $(cargo fuzz --version 2>/dev/null | awk '{print $2}'), libFuzzer (libfuzzer-sys $(
  awk '/^name = "libfuzzer-sys"/{getline; gsub(/"/, "", $3); print $3}' fuzz/Cargo.lock
)), $(rustc "+$TOOLCHAIN" --version), sanitizer: $SANITIZER"
echo "engine: $ENGINE"

# --- build once ---------------------------------------------------------------------------
start=$(date +%s)
(cd fuzz && "${FUZZ[@]}" build "${FLAGS[@]}")
echo "build: $(($(date +%s) - start)) s"

# --- run ----------------------------------------------------------------------------------
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/corpus" "$OUT/artifacts" "$OUT"/*.row "$OUT"/*.log

# Runs one target; writes its table row to $OUT/<target>.row and exits non-zero on a finding.
run_target() {
  local t=$1 seeds=fuzz/corpus/$1 corpus=$OUT/corpus/$1 artifacts=$OUT/artifacts/$1
  local log=$OUT/$1.log rc=0 before after execs rate cov found kinds finding
  mkdir -p "$corpus" "$artifacts"
  cp "$seeds"/* "$corpus"/
  before=$(find "$corpus" -type f | wc -l)
  echo "== $t: ${SECS} s from $before seeds"
  # -max_total_time bounds the run; -timeout turns a hang into a finding; -rss_limit_mb an
  # allocation blow-up. -print_final_stats gives the execution count.
  (cd fuzz && "${FUZZ[@]}" run "${FLAGS[@]}" "$t" "$corpus" -- \
    -max_total_time="$SECS" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" \
    -artifact_prefix="$artifacts/" -print_final_stats=1) >"$log" 2>&1 || rc=$?
  execs=$(awk '/^stat::number_of_executed_units:/{print $2}' "$log" | tail -1)
  rate=$(awk '/^stat::average_exec_per_sec:/{print $2}' "$log" | tail -1)
  if [ -z "$execs" ]; then
    # A crash ends the run before the final stats: take the last progress line instead.
    execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
  fi
  cov=$(grep -oE 'DONE +cov: [0-9]+' "$log" | awk '{print $3}' | tail -1 || true)
  after=$(find "$corpus" -type f | wc -l)
  found=$(find "$artifacts" -type f | wc -l)
  finding=none
  if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
    kinds=$(find "$artifacts" -type f -printf '%f\n' | sed 's/-.*//' | sort | uniq -c |
      awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2}')
    finding="FAILED (exit $rc; ${kinds:-no artifact}; see $log)"
    echo "== $t FAILED:"
    grep -m1 -A3 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" || tail -20 "$log"
  fi
  echo "| $t | $SECS | ${execs:-?} | ${rate:-?} | ${cov:-?} | $before -> $after | $finding |" \
    >"$OUT/$t.row"
  [ "$finding" = none ]
}

for t in "${TARGETS[@]}"; do
  [ -d "fuzz/corpus/$t" ] || { echo "no seed corpus fuzz/corpus/$t" >&2; exit 2; }
done
# FUZZ_PARALLEL targets at a time (default 1: each gets the machine to itself, as the table's
# exec/s assume); a failure is read from the rows afterwards, so no job is left behind.
running=0
for t in "${TARGETS[@]}"; do
  if [ "$running" -ge "${FUZZ_PARALLEL:-1}" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run_target "$t" &
  running=$((running + 1))
done
wait || true

failed=()
rows=()
for t in "${TARGETS[@]}"; do
  row=$(cat "$OUT/$t.row" 2>/dev/null || echo "| $t | $SECS | ? | ? | ? | ? | FAILED (no result) |")
  rows+=("$row")
  case $row in *"| none |") ;; *) failed+=("$t") ;; esac
done

{
  echo "engine: $ENGINE"
  echo
  echo "| target | seconds | executions | exec/s | edges covered | corpus (files) | findings |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT/summary.md"

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found problems in: ${failed[*]} (inputs in $OUT/artifacts/)" >&2
  exit 1
fi
