#!/usr/bin/env bash
# Benchmark: SIP-originated calls. SIPp's uac (bench/sipp/uac_devices.xml) calls DEVICES
# simulated devices through one gateway, one device per call in turn from a CSV injection file
# of the device ids; the devices (`thalamus-sim load --incoming`) answer at once and SIPp hangs
# up after HOLD_MS. For each rate of RATES, SECS seconds of calls: SIPp's counts and INVITE to
# 200 response time (1 ms resolution), the devices' IncomingCall to answered latency, and the
# gateway's CPU per call. Baselines in the same run: the same SIPp calls straight to SIPp's uas,
# and through Kamailio as a stateful proxy (bench/kamailio/stateful.cfg) to it, with
# Kamailio's CPU per call (issue 17: the gateway at most 1.5x that).
#
#   bench/load-sip-calls.sh             (RATES="100 250 500" SECS=10 DEVICES=1000 HOLD_MS=1000)
#
# Rewrites the "SIP-originated calls" table of docs/benchmarks.md.
source "$(dirname "$0")/lib.sh"
RATES=${RATES:-"100 250 500"}
SECS=${SECS:-10}
DEVICES=${DEVICES:-1000}
HOLD_MS=${HOLD_MS:-1000}
SCENARIO=$PWD/bench/sipp/uac_devices.xml
build
start_gateway gw
SECRET=$("$BIN/thalamus-sim" provision --devices "$DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
USERS=$WORK/devices.csv
{ echo SEQUENTIAL; for ((n = 0; n < DEVICES; n++)); do echo "load-$n;"; done; } > "$USERS"
LOAD=("$BIN/thalamus-sim" load --quiet --incoming --gateway "$QUIC" --fingerprint "$FP"
      --secret "$SECRET" --devices "$DEVICES")
# Warm-up: every device logs in once (first logins pay the argon2 check).
"${LOAD[@]}" --duration 0 >/dev/null 2>&1 || true

TABLE=$WORK/table.md
cat > "$TABLE" <<EOF
| run | calls/s asked -> SIPp average | SIPp calls / successful / failed | INVITE to 200 ms p50 / p99 (SIPp) | device IncomingCall to answered ms p50 / p99 / max | gateway CPU us per call |
| --- | --- | --- | --- | --- | --- |
EOF

sipp_run() { # dir target rate calls
  local dir=$1 target=$2 rate=$3 calls=$4
  mkdir -p "$dir"
  (cd "$dir" && sipp -sf "$SCENARIO" -inf "$USERS" -i 127.0.0.1 -p "$(free_port)" -nostdin \
      -r "$rate" -m "$calls" -l $((rate * (HOLD_MS / 1000 + 2) * 2)) -d "$HOLD_MS" \
      -trace_rtt -rtt_freq 1 -timeout $((SECS + 60))s -timeout_error "$target" >"$dir/out.txt" 2>&1) || true
}

for rate in $RATES; do
  calls=$((rate * SECS))
  st=$WORK/st.$rate json=$WORK/r.$rate.json
  "${LOAD[@]}" --expect-calls "$calls" --duration $((SECS + 90)) --status-file "$st" --json "$json" >/dev/null 2>&1 &
  sim=$!
  wait_phase "$st" calling
  t0=$(cpu_ticks "$GW_PID")
  sipp_run "$WORK/sipp.$rate" "$SIP" "$rate" "$calls"
  # Calls SIPp gave up on never reach the devices: stop waiting for them after a while.
  for _ in $(seq 100); do grep -q '"drained"\|"done"' "$st" && break; sleep 0.1; done
  grep -q '"drained"\|"done"' "$st" || kill -TERM "$sim" 2>/dev/null || true
  wait_phase "$st" drained
  t1=$(cpu_ticks "$GW_PID")
  wait "$sim" || true
  read -r ok failed cps < <(sipp_counts "$WORK/sipp.$rate/out.txt")
  rtt=$(sipp_rtt_ms "$WORK/sipp.$rate")
  python3 - "$json" "$rate" "$calls" "$ok" "$failed" "$cps" "$rtt" "$t0" "$t1" "$HZ" >> "$TABLE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rate, calls, ok, failed, cps, rtt = sys.argv[2:8]
cpu = (int(sys.argv[9]) - int(sys.argv[8])) / int(sys.argv[10])
l = r["setup_latency"]
print(f"| {rate} calls/s to {r['devices_connected']} devices | {rate} -> {float(cps):.0f} | {calls} / {ok} / {failed} | {rtt} | "
      f"{l['p50_ms']:.2f} / {l['p99_ms']:.2f} / {l['max_ms']:.2f} | {cpu * 1e6 / max(int(calls), 1):.0f} |")
PY
  if [ -n "${FIGURES:-}" ]; then
    python3 - "$FIGURES" "$rate" "$ok" "$failed" "$t0" "$t1" "$HZ" "$calls" <<'PY'
import json, os, sys
path, rate, ok, failed = sys.argv[1:5]
cpu = (int(sys.argv[6]) - int(sys.argv[5])) / int(sys.argv[7])
fig = json.load(open(path)) if os.path.exists(path) else {}
fig.setdefault("sip_calls", {})[rate] = {"ok": int(ok), "failed": int(failed), "cpu_us_per_call": cpu * 1e6 / max(int(sys.argv[8]), 1)}
json.dump(fig, open(path, "w"), indent=1)
PY
  fi
done

UAS_PORT=$(free_port)
start_sipp_uas "$UAS_PORT"
for rate in ${RATES##* }; do
  calls=$((rate * SECS))
  sipp_run "$WORK/base.$rate" "127.0.0.1:$UAS_PORT" "$rate" "$calls"
  read -r ok failed cps < <(sipp_counts "$WORK/base.$rate/out.txt")
  echo "| baseline: SIPp uac -> SIPp uas, $rate calls/s | $rate -> ${cps%.*} | $calls / $ok / $failed | $(sipp_rtt_ms "$WORK/base.$rate") | - | - |" >> "$TABLE"
done

# Kamailio's level (issue 17): the same SIPp calls through Kamailio 5.6 as a stateful proxy
# with record-routing and dialog tracking (bench/kamailio/stateful.cfg, tlsf, one worker) to the
# same uas; its CPU is that of all its processes.
if command -v kamailio >/dev/null; then
  start_kamailio_stateful "$UAS_PORT"
  for rate in ${RATES##* }; do
    calls=$((rate * SECS))
    k0=$(kam_ticks)
    sipp_run "$WORK/kam.$rate" "127.0.0.1:$KAM_PORT" "$rate" "$calls"
    k1=$(kam_ticks)
    read -r ok failed cps < <(sipp_counts "$WORK/kam.$rate/out.txt")
    echo "| Kamailio stateful (tm, rr, dialog): SIPp uac -> Kamailio -> SIPp uas, $rate calls/s | $rate -> ${cps%.*} | $calls / $ok / $failed | $(sipp_rtt_ms "$WORK/kam.$rate") | - | $(python3 -c "import sys;print(round((int(sys.argv[2])-int(sys.argv[1]))/int(sys.argv[3])*1e6/int(sys.argv[4])))" "$k0" "$k1" "$HZ" "$calls") (Kamailio's) |" >> "$TABLE"
  done
fi
cat "$TABLE"
doc_table sip-calls "SIP-originated calls" "$TABLE"
