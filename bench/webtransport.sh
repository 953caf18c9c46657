#!/usr/bin/env bash
# Benchmark: devices over WebTransport (browsers' way in) against devices over raw QUIC, in one
# run, on gateways with `[quic] webtransport = true`:
#
#   1. memory per idle device: IDLE_DEVICES (default 2,000) QUIC devices (`thalamus-sim load
#      --cps 0`) on one fresh gateway, then as many WebTransport devices (`thalamus-sim
#      wt-load`) on another; RSS per device = (RSS with them connected - RSS before) / devices;
#   2. gateway CPU per call: RATE calls/s (default 50) for SECS (default 10) to the echo buddy,
#      held HOLD_MS (default 1000) with 20 ms audio both ways, from QUIC devices (`load`) and
#      from WebTransport devices (`wt-load --cps`, one call per device), each on a fresh
#      gateway; CPU from when the devices are in until the calls are done.
#
#   bench/webtransport.sh        (IDLE_DEVICES, RATE, SECS, HOLD_MS from the environment)
#
# Prints one line per measure.
source "$(dirname "$0")/lib.sh"
IDLE_DEVICES=${IDLE_DEVICES:-2000}
RATE=${RATE:-50}
SECS=${SECS:-10}
HOLD_MS=${HOLD_MS:-1000}
build
export QUIC_EXTRA="webtransport = true"
echo "idle_devices=$IDLE_DEVICES rate=$RATE/s secs=$SECS hold=${HOLD_MS}ms load=$(cut -d' ' -f1-3 /proc/loadavg)"
hash_of() { json_get "$GW_DIR/ready.json" "['webtransport_certificate_hash']"; }
per_device() { python3 -c "import sys;b,a,n=map(int,sys.argv[1:]);print('%.1f KiB' % ((a-b)/max(n,1)))" "$@"; }

# --- 1. memory per idle device
start_gateway idle-quic
SECRET=$("$BIN/thalamus-sim" provision --devices "$IDLE_DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
"$BIN/thalamus-sim" load --quiet --gateway "$QUIC" --fingerprint "$FP" --secret "$SECRET" --devices 2 --cps 0 --duration 0 >/dev/null 2>&1 || true
sleep 1
RSS0=$(rss_kib "$GW_PID")
"$BIN/thalamus-sim" load --quiet --gateway "$QUIC" --fingerprint "$FP" --secret "$SECRET" \
    --devices "$IDLE_DEVICES" --cps 0 --duration 8 --endpoints 8 --status-file "$WORK/q.status" >/dev/null 2>&1 &
SIM=$!
wait_phase "$WORK/q.status" calling
sleep 2
RSS1=$(rss_kib "$GW_PID")
wait "$SIM" || true
echo "idle QUIC devices:         $IDLE_DEVICES, RSS ${RSS0} -> ${RSS1} KiB, $(per_device "$RSS0" "$RSS1" "$IDLE_DEVICES") per device"
stop_pid "$GW_PID"

start_gateway idle-wt
SECRET=$("$BIN/thalamus-sim" provision --devices "$IDLE_DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
"$BIN/thalamus-sim" wt-load --gateway "$QUIC" --certificate-hash "$(hash_of)" --secret "$SECRET" --devices 2 --duration 0 >/dev/null 2>&1 || true
sleep 1
RSS0=$(rss_kib "$GW_PID")
"$BIN/thalamus-sim" wt-load --gateway "$QUIC" --certificate-hash "$(hash_of)" --secret "$SECRET" \
    --devices "$IDLE_DEVICES" --duration 6 --status-file "$WORK/w.status" >"$WORK/w.json" 2>/dev/null &
SIM=$!
wait_phase "$WORK/w.status" connected
sleep 2
RSS1=$(rss_kib "$GW_PID")
wait "$SIM" || true
CONNECTED=$(json_get "$WORK/w.status" "['connected']")
echo "idle WebTransport devices: $CONNECTED of $IDLE_DEVICES, RSS ${RSS0} -> ${RSS1} KiB, $(per_device "$RSS0" "$RSS1" "$CONNECTED") per device"
stop_pid "$GW_PID"

# --- 2. gateway CPU per call
start_buddy --echo
TARGET="sip:echo@$BUDDY_SIP"
CALLS=$((RATE * SECS))
start_gateway calls-quic
# Audio both ways, as the WebTransport devices stream it.
LOAD_ARGS=--media DEVICES=$CALLS measure_device_calls "$TARGET"
python3 -c "import sys;t=int(sys.argv[1]);hz=int(sys.argv[2]);a=int(sys.argv[3]);print('calls from QUIC devices:         answered=%d failed=%s cpu_per_call_us=%.0f' % (a, sys.argv[4], t*1e6/hz/max(a,1)))" \
    "$((LOAD_CPU_T1 - LOAD_CPU_T0))" "$HZ" "$(json_get "$LOAD_JSON" "['answered']")" "$(json_get "$LOAD_JSON" "['failed']")"
read -r TO_PEER TO_DEVICE < <(relayed_packets)
echo "  QUIC frames: devices sent $(json_get "$LOAD_JSON" "['media']['frames_sent']" 2>/dev/null || echo ?), relayed to the buddy $TO_PEER, relayed back $TO_DEVICE, devices got $(json_get "$LOAD_JSON" "['media']['frames_received']" 2>/dev/null || echo ?)"

start_gateway calls-wt
SECRET=$("$BIN/thalamus-sim" provision --devices "$CALLS" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
"$BIN/thalamus-sim" wt-load --gateway "$QUIC" --certificate-hash "$(hash_of)" --secret "$SECRET" \
    --devices "$CALLS" --target "$TARGET" --cps "$RATE" --hold-ms "$HOLD_MS" \
    --duration $((SECS + HOLD_MS / 1000 + 3)) --status-file "$WORK/c.status" --json >"$WORK/c.json" 2>/dev/null &
SIM=$!
wait_phase "$WORK/c.status" connected
T0=$(cpu_ticks "$GW_PID")
wait "$SIM" || true
T1=$(cpu_ticks "$GW_PID")
python3 - "$WORK/c.json" "$((T1 - T0))" "$HZ" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
t, hz, a = int(sys.argv[2]), int(sys.argv[3]), r["calls_answered"]
print("calls from WebTransport devices: answered=%d of %d cpu_per_call_us=%.0f frames sent/received %d/%d"
      % (a, r["devices"], t * 1e6 / hz / max(a, 1), r["frames_sent"], r["frames_received"]))
PY
save_metrics
read -r TO_PEER TO_DEVICE < <(relayed_packets)
echo "  WebTransport frames: relayed to the buddy $TO_PEER, relayed back $TO_DEVICE (sent and received: above)"
stop_pid "$GW_PID"
