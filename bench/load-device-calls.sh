#!/usr/bin/env bash
# Benchmark: device-originated calls. DEVICES simulated devices (each its own QUIC connection
# and credential) call the simulator's SIP buddy through one gateway at each rate of RATES for
# SECS seconds, each call held HOLD_MS; reports calls per second, set-up latency (Dial to the
# answered event) and the gateway's CPU per call (process CPU time over the calling window /
# calls). One extra run adds media (20 ms frames echoed by the buddy) and texts.
# Baselines in the same run, without the gateway: SIPp uac -> buddy, SIPp uac -> SIPp uas, and
# (issue 17) SIPp uac -> Kamailio as a stateful proxy (bench/kamailio/stateful.cfg) -> SIPp uas
# with Kamailio's CPU per call, and the gateway's CPU per call at the top rate over Kamailio's.
#
#   bench/load-device-calls.sh            (RATES="100 250 500" SECS=10 DEVICES=1000 HOLD_MS=1000)
#
# Rewrites the "Device-originated calls" table of docs/benchmarks.md.
source "$(dirname "$0")/lib.sh"
RATES=${RATES:-"100 250 500"}
SECS=${SECS:-10}
DEVICES=${DEVICES:-1000}
HOLD_MS=${HOLD_MS:-1000}
MEDIA_RATE=${MEDIA_RATE:-100}
build
start_gateway gw
SECRET=$("$BIN/thalamus-sim" provision --devices "$DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
start_buddy --echo
TARGET="sip:load@$BUDDY_SIP"
LOAD=("$BIN/thalamus-sim" load --quiet --gateway "$QUIC" --fingerprint "$FP" --secret "$SECRET"
      --devices "$DEVICES" --target "$TARGET")
# Warm-up: every device logs in once (first logins pay the argon2 check) and calls a little.
"${LOAD[@]}" --cps 50 --duration 2 --hold-ms 100 >/dev/null 2>&1 || true

TABLE=$WORK/table.md
cat > "$TABLE" <<EOF
| run | calls/s asked -> placed | attempted / answered / failed | set-up ms p50 / p90 / p99 / p99.9 / max | gateway CPU us per call | notes |
| --- | --- | --- | --- | --- | --- |
EOF

measure() {
  local name=$1; shift
  local slug=${name//[^a-z0-9]/_}
  local st=$WORK/$slug.status json=$WORK/$slug.json
  "${LOAD[@]}" --status-file "$st" --json "$json" "$@" >/dev/null 2>"$WORK/$slug.err" &
  local sim=$!
  wait_phase "$st" calling
  local t0; t0=$(cpu_ticks "$GW_PID")
  wait_phase "$st" drained
  local t1; t1=$(cpu_ticks "$GW_PID")
  wait "$sim" || true
  python3 - "$json" "$name" "$t0" "$t1" "$HZ" "$WORK/cpu.$slug" >> "$TABLE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); name = sys.argv[2]
cpu = (int(sys.argv[4]) - int(sys.argv[3])) / int(sys.argv[5])
l = r["setup_latency"]
notes = []
if r["failures"]:
    notes.append("failed: " + ", ".join(f"{k} x{v}" for k, v in r["failures"].items()))
if r["not_placed_devices_busy"]:
    notes.append(f"{r['not_placed_devices_busy']} not placed (devices at their call limit)")
if r.get("media"):
    m = r["media"]
    notes.append(f"media {m['frames_sent']} frames, {m['loss_percent']:.2f}% lost")
if r.get("texts"):
    t = r["texts"]
    notes.append(f"texts {t['delivered']}/{t['attempted']} delivered, p50 / p99 {t['latency']['p50_ms']:.2f} / {t['latency']['p99_ms']:.2f} ms")
open(sys.argv[6], "w").write(f"{cpu * 1e6 / max(r['attempted'], 1):.0f}\n")
print(f"| {name} | {r['target_cps']:.0f} -> {r['achieved_cps']:.0f} | {r['attempted']} / {r['answered']} / {r['failed']} | "
      f"{l['p50_ms']:.2f} / {l['p90_ms']:.2f} / {l['p99_ms']:.2f} / {l['p99_9_ms']:.2f} / {l['max_ms']:.2f} | "
      f"{cpu * 1e6 / max(r['attempted'], 1):.0f} | {'; '.join(notes) or '-'} |")
PY
  if [ -n "${FIGURES:-}" ]; then
    python3 - "$FIGURES" "$json" "$name" "$t0" "$t1" "$HZ" <<'PY'
import json, os, sys
path, rep, name = sys.argv[1:4]
r = json.load(open(rep))
cpu = (int(sys.argv[5]) - int(sys.argv[4])) / int(sys.argv[6])
fig = json.load(open(path)) if os.path.exists(path) else {}
fig.setdefault("device_calls", {})[name] = {"cps": r["target_cps"], "p99_ms": r["setup_latency"]["p99_ms"],
    "cpu_us_per_call": cpu * 1e6 / max(r["attempted"], 1), "failed": r["failed"]}
json.dump(fig, open(path, "w"), indent=1)
PY
  fi
}

for rate in $RATES; do
  extra=()
  [ "$rate" = "${RATES##* }" ] && extra=(--plot docs/bench/device-calls.svg)
  mkdir -p docs/bench
  measure "$rate calls/s" --cps "$rate" --duration "$SECS" --hold-ms "$HOLD_MS" "${extra[@]}"
done
measure "$MEDIA_RATE calls/s + media + 20 texts/s" --cps "$MEDIA_RATE" --duration "$SECS" \
    --hold-ms "$HOLD_MS" --media --texts-per-s 20

# Baselines: the same calls from SIPp, straight to the buddy and to SIPp's uas. With TICKS (a
# command printing CPU ticks), the CPU per call of what it measures goes in the CPU column;
# BASELINE_US is set to it.
baseline() {
  local name=$1 target=$2 rate=$3 ticks=${4:-}
  local dir=$WORK/sipp.$RANDOM; mkdir -p "$dir"
  local calls=$((rate * SECS)) t0=0 t1=0 cpu="-"
  [ -z "$ticks" ] || t0=$($ticks)
  (cd "$dir" && sipp -sn uac -i 127.0.0.1 -p "$(free_port)" -nostdin -r "$rate" -m "$calls" \
      -l $((rate * (HOLD_MS / 1000 + 2) * 2)) -d "$HOLD_MS" -trace_rtt -rtt_freq 1 \
      -timeout $((SECS + 60))s -timeout_error "$target" >"$dir/out.txt" 2>&1) || true
  if [ -n "$ticks" ]; then
    t1=$($ticks)
    BASELINE_US=$(python3 -c "import sys;print(round((int(sys.argv[2])-int(sys.argv[1]))/int(sys.argv[3])*1e6/int(sys.argv[4])))" "$t0" "$t1" "$HZ" "$calls")
    cpu="$BASELINE_US (its own)"
  fi
  read -r ok failed cps < <(sipp_counts "$dir/out.txt")
  local rtt; rtt=$(sipp_rtt_ms "$dir")
  echo "| baseline: $name | $rate -> ${cps%.*} | $calls / $ok / $failed | $rtt (p50 / p99, SIPp's 1 ms resolution) | $cpu | no gateway, no devices |" >> "$TABLE"
}
TOP=${RATES##* }
baseline "SIPp uac -> buddy" "$BUDDY_SIP" "$TOP"
UAS_PORT=$(free_port)
start_sipp_uas "$UAS_PORT"
baseline "SIPp uac -> SIPp uas" "127.0.0.1:$UAS_PORT" "$TOP"

# Kamailio's level (issue 17): the same SIPp calls through Kamailio 5.6 as a stateful proxy to
# the same uas; its CPU is that of all its processes.
if command -v kamailio >/dev/null; then
  start_kamailio_stateful "$UAS_PORT"
  baseline "SIPp uac -> Kamailio stateful (tm, rr, dialog; 1 worker) -> SIPp uas" \
      "127.0.0.1:$KAM_PORT" "$TOP" kam_ticks
  kam_us=$BASELINE_US
  gw_us=$(cat "$WORK/cpu.${TOP}_calls_s" 2>/dev/null || echo 0)
  python3 - "$gw_us" "$kam_us" "$TOP" >> "$TABLE" <<'PY'
import sys
gw, kam, top = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print()
print(f"Gateway CPU per device-originated call at {top} calls/s: {gw} us, {gw / max(kam, 1):.1f}x "
      f"Kamailio's {kam} us per call in the same run (issue 17: at most 1.5x).")
PY
fi

cat "$TABLE"
doc_table device-calls "Device-originated calls" "$TABLE"
