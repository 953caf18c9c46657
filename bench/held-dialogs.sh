#!/usr/bin/env bash
# Benchmark: does a node's cost per call stay flat as it holds more confirmed dialogs (issue 17)?
#
#   bench/held-dialogs.sh [--write]   (LEVELS="1000 2000 4000 8000 10000" DEVICES=1000
#                                      PROBE_RATE=200 PROBE_SECS=10 PROBES=3 RAMP_RATE=500
#                                      RTCP_MUX=1 RTP_MIN=6200)
#
# Two gateways, each with DEVICES simulated devices answering calls (`thalamus-sim load
# --incoming`): the one measured, and a control that holds the first level's calls all along.
# For each level of LEVELS, in increasing order:
#   1. SIPp "holders" (bench/sipp/uac_devices.xml, the devices in turn) place calls at RAMP_RATE
#      that stay answered for the rest of the run, until the measured gateway holds LEVEL
#      confirmed calls (`thalamus_calls_active`), each with its media relay and its dialog
#      replicated (default config: the embedded store);
#   2. each gateway's CPU is read over IDLE_SECS with nothing else going on (the cost of
#      holding its calls);
#   3. PROBES times (after one probe of each not recorded, at the first level), a probe SIPp places PROBE_RATE x PROBE_SECS short calls (held 1 s) on the
#      measured gateway, then the same on the control: SIPp's counts and INVITE-to-200 p50 / p99,
#      and each gateway's CPU per probe call (CPU over the probe, less its holding cost over the
#      same time, over the calls).
# The figure that must stay flat is the measured gateway's CPU per probe call (a node's capacity
# in calls per second is its inverse). This machine's speed drifts by tens of percent over
# minutes, so the figure is also given over the control's in the same round: the control's
# held calls do not change, so that ratio moves only with the measured gateway's. Held calls
# carry no RTP (SIPp sends none): media timeout and RTCP are off, so a held call costs what an
# idle one does.
#
# With RTCP_MUX=1 (the default) the SIPp calls offer RTCP multiplexed on the RTP port (RFC
# 5761, `a=rtcp-mux`), so each held call's relay has one socket; RTCP_MUX=0 offers plain RTP
# and its relays have two (RTP and RTCP).
#
# Limits of the machine: a process may open `ulimit -Hn` files (20,000 on the machine of
# docs/benchmarks.md), so one gateway there holds at most about 9,000 calls with two sockets
# each, or about 19,000 with one. The RTP ranges are placed from RTP_MIN up to below the
# kernel's ephemeral ports so that SIPp and the simulator do not take them, and above SIPp's
# default media ports (6000 and up); each relay takes a port pair (the odd port stays reserved
# when RTCP is multiplexed), so from 6,200 to 32,767 there are about 13,000 pairs for both
# gateways. The script refuses levels it cannot hold.
#
# Fails (exit 1) if a gateway dies, a level is not reached within 120 s, or a probe call fails.
# Prints a table; with --write also puts it between the markers of "Held dialogs" in
# docs/benchmarks.md.
source "$(dirname "$0")/lib.sh"
write_flag "$@"
LEVELS=${LEVELS:-"1000 2000 4000 8000 10000"}
DEVICES=${DEVICES:-1000}
PROBE_RATE=${PROBE_RATE:-200}
PROBE_SECS=${PROBE_SECS:-10}
PROBES=${PROBES:-3}
RAMP_RATE=${RAMP_RATE:-500}
IDLE_SECS=${IDLE_SECS:-5}
HOLD_MS=3600000
RTCP_MUX=${RTCP_MUX:-1}
RTP_MIN=${RTP_MIN:-6200}
SCENARIO=$PWD/bench/sipp/uac_devices.xml
build
if [ "$RTCP_MUX" = 1 ]; then
  # The same calls, offering RTCP on the RTP port.
  sed 's|^\( *\)a=rtpmap:0 PCMU/8000$|&\n\1a=rtcp-mux|' "$SCENARIO" > "$WORK/uac_devices_mux.xml"
  grep -q 'a=rtcp-mux' "$WORK/uac_devices_mux.xml" || { echo "no a=rtcp-mux in the scenario" >&2; exit 1; }
  SCENARIO=$WORK/uac_devices_mux.xml
  SOCKETS=1
else
  SOCKETS=2
fi
command -v curl >/dev/null || { echo "curl is missing" >&2; exit 1; }
phase() { echo "$(date +%T) $*" >&2; }

ulimit -n "$(ulimit -Hn)"
FILES=$(ulimit -n)
FIRST=${LEVELS%% *}
MAX_LEVEL=0
for l in $LEVELS; do [ "$l" -gt "$MAX_LEVEL" ] && MAX_LEVEL=$l; done
PROBE_LIVE=$((PROBE_RATE * 3))
# One or two sockets per call, and room for the node's own files and sockets.
NEEDED=$(((MAX_LEVEL + PROBE_LIVE) * SOCKETS + 500))
if [ "$NEEDED" -gt "$FILES" ]; then
  echo "holding $MAX_LEVEL calls needs about $NEEDED open files; this machine allows $FILES" \
       "(ulimit -Hn): lower LEVELS" >&2
  exit 1
fi
# RTP port pairs: the measured gateway's range, then the control's, both below the ephemeral ports.
GW_PAIRS=$((MAX_LEVEL + PROBE_LIVE + 200))
CONTROL_PAIRS=$((FIRST + PROBE_LIVE + 200))
CONTROL_RTP_MIN=$((RTP_MIN + GW_PAIRS * 2 + 2))
LOCAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
[ "$((CONTROL_RTP_MIN + CONTROL_PAIRS * 2 + 1))" -lt "$LOCAL_LOW" ] \
  || { echo "the RTP ranges from $RTP_MIN reach the ephemeral ports ($LOCAL_LOW): lower LEVELS" >&2; exit 1; }
MAX_CALLS=$(((MAX_LEVEL + PROBE_LIVE) / DEVICES + 4))

# A gateway and its devices: sets <NAME>_PID _SIP _ADMIN _DIR _USERS (the CSV of its devices).
gateway_with_devices() { # name rtp_min pairs
  local name=$1 rtp_min=$2 pairs=$3
  MEDIA_EXTRA=$(printf 'rtp_port_min = %d\nrtp_port_max = %d\nmedia_timeout_ms = 0\nrtcp_interval_ms = 0' \
      "$rtp_min" "$((rtp_min + pairs * 2 + 1))")
  export MEDIA_EXTRA
  start_gateway "$name" $'[session]\nmax_calls = '"$MAX_CALLS"
  local secret users="$GW_DIR/devices.csv" st="$GW_DIR/devices.status"
  secret=$("$BIN/thalamus-sim" provision --devices "$DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
  { echo SEQUENTIAL; for ((n = 0; n < DEVICES; n++)); do echo "load-$n;"; done; } > "$users"
  local load=("$BIN/thalamus-sim" load --quiet --incoming --gateway "$QUIC" --fingerprint "$FP"
        --secret "$secret" --devices "$DEVICES" --max-calls-per-device "$MAX_CALLS")
  # Warm-up: every device logs in once (first logins pay the argon2 check).
  "${load[@]}" --duration 0 >/dev/null 2>&1 || true
  "${load[@]}" --duration 3000 --status-file "$st" --json "$GW_DIR/devices.json" >/dev/null \
      2>"$GW_DIR/devices.err" &
  PIDS+=("$!")
  wait_phase "$st" calling
  printf -v "${name}_PID" %s "$GW_PID"
  printf -v "${name}_SIP" %s "$SIP"
  printf -v "${name}_ADMIN" %s "$(json_get "$GW_DIR/ready.json" "['admin']")"
  printf -v "${name}_DIR" %s "$GW_DIR"
  printf -v "${name}_USERS" %s "$users"
}
gateway_with_devices gw "$RTP_MIN" "$GW_PAIRS"
gateway_with_devices control "$CONTROL_RTP_MIN" "$CONTROL_PAIRS"
alive() {
  for p in "$gw_PID:$gw_DIR" "$control_PID:$control_DIR"; do
    kill -0 "${p%%:*}" 2>/dev/null || { echo "a gateway died:" >&2; tail -20 "${p#*:}/gw.log" >&2; exit 1; }
  done
}
active_calls() { curl -s "http://$1/metrics" | awk '$1 == "thalamus_calls_active" && !seen {print $2; seen = 1}'; }

hold() { # sip users calls: SIPp holders in the background, as SIPp itself (the exit trap stops it)
  local dir=$WORK/hold.$RANDOM
  mkdir -p "$dir"
  (cd "$dir" && exec sipp -sf "$SCENARIO" -inf "$2" -i 127.0.0.1 -p "$(free_port)" -nostdin \
      -r "$RAMP_RATE" -m "$3" -l "$3" -d "$HOLD_MS" "$1" >out.txt 2>&1) &
  PIDS+=("$!")
}
wait_held() { # admin level
  local active=0
  for _ in $(seq 1200); do
    alive
    active=$(active_calls "$1")
    [ "${active%.*}" -ge "$2" ] 2>/dev/null && return 0
    sleep 0.1
  done
  echo "a gateway did not reach $2 held calls (at ${active:-?})" >&2
  exit 1
}
CALLS=$((PROBE_RATE * PROBE_SECS))
FAILED=0
# One probe of CALLS short calls: prints "ok failed p50 p99 cpu_ticks seconds" of the gateway.
probe() { # dir sip users pid
  local code=0 t0 t1 w0 w1 ok failed cps p50 p99
  mkdir -p "$1"
  t0=$(cpu_ticks "$4"); w0=$(date +%s.%N)
  (cd "$1" && sipp -sf "$SCENARIO" -inf "$3" -i 127.0.0.1 -p "$(free_port)" -nostdin \
      -r "$PROBE_RATE" -m "$CALLS" -l "$CALLS" -d 1000 -trace_rtt -rtt_freq 1 \
      -timeout $((PROBE_SECS + 120))s -timeout_error "$2" >"$1/out.txt" 2>&1) || code=$?
  t1=$(cpu_ticks "$4"); w1=$(date +%s.%N)
  read -r ok failed cps < <(sipp_counts "$1/out.txt")
  read -r p50 p99 < <(sipp_rtt_values "$1")
  if [ "$code" != 0 ] || [ "${failed%.*}" != 0 ] || [ "${ok%.*}" != "$CALLS" ]; then
    echo "probe $1: SIPp exit $code, $ok successful, $failed failed" >&2
    echo 1 > "$WORK/failed"
  fi
  echo "$ok $failed $p50 $p99 $((t1 - t0)) $(python3 -c "print($w1 - $w0)")"
}
idle_share() { # pid: its share of one core over IDLE_SECS
  local t0 t1
  t0=$(cpu_ticks "$1"); sleep "$IDLE_SECS"; t1=$(cpu_ticks "$1")
  python3 -c "print(($t1 - $t0) / $HZ / $IDLE_SECS)"
}

phase "the control holds $FIRST calls"
hold "$control_SIP" "$control_USERS" "$FIRST"
wait_held "$control_ADMIN" "$FIRST"
ROWS=$WORK/rows.txt
: > "$ROWS"
HELD=0
for level in $LEVELS; do
  batch=$((level - HELD))
  if [ "$batch" -gt 0 ]; then
    phase "holding $level calls: $batch more at $RAMP_RATE/s"
    hold "$gw_SIP" "$gw_USERS" "$batch"
    wait_held "$gw_ADMIN" "$level"
    HELD=$level
  fi
  if [ "$level" = "$FIRST" ]; then
    # Not recorded: the first calls after a ramp cost more on either gateway (allocator and
    # store warm-up), and the control just had its own.
    phase "warm-up: one probe on each"
    probe "$WORK/warmup.gw" "$gw_SIP" "$gw_USERS" "$gw_PID" >/dev/null
    probe "$WORK/warmup.control" "$control_SIP" "$control_USERS" "$control_PID" >/dev/null
  fi
  sleep 2
  gw_idle=$(idle_share "$gw_PID")
  control_idle=$(idle_share "$control_PID")
  rss=$(rss_kib "$gw_PID")
  for k in $(seq "$PROBES"); do
    phase "probe $k: $CALLS calls at $PROBE_RATE/s over $level held, then the same on the control"
    g=$(probe "$WORK/probe.$level.$k.gw" "$gw_SIP" "$gw_USERS" "$gw_PID")
    alive
    sleep 2
    c=$(probe "$WORK/probe.$level.$k.control" "$control_SIP" "$control_USERS" "$control_PID")
    alive
    sleep 2
    echo "$level $rss $gw_idle $control_idle $g $c" >> "$ROWS"
  done
done
[ -e "$WORK/failed" ] && FAILED=1

TABLE=$WORK/table.md
python3 - "$ROWS" "$HZ" > "$TABLE" <<'PY'
import sys
rows, hz = sys.argv[1], int(sys.argv[2])
fmt = lambda x: "< 1" if x < 1 else f"{x:.0f}"
def per_call(ok, ticks, secs, idle):
    return ((int(ticks) / hz) - float(idle) * float(secs)) * 1e6 / max(int(float(ok)), 1)
print("| confirmed calls held | gateway RSS | gateway CPU holding them (% of one core) "
      "| probe calls ok / failed (gateway, control) | probe INVITE to 200 ms p50 / p99 (gateway) "
      "| gateway CPU us per probe call | control CPU us per probe call | gateway / control |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
by_level = {}
for line in open(rows):
    (level, rss, g_idle, c_idle, g_ok, g_failed, g_p50, g_p99, g_ticks, g_secs,
     c_ok, c_failed, _c_p50, _c_p99, c_ticks, c_secs) = line.split()
    g = per_call(g_ok, g_ticks, g_secs, g_idle)
    c = per_call(c_ok, c_ticks, c_secs, c_idle)
    by_level.setdefault(int(level), []).append((g, c))
    print(f"| {int(level):,} | {int(rss) / 1024:.0f} MiB | {float(g_idle) * 100:.1f} "
          f"| {int(float(g_ok)):,} / {int(float(g_failed)):,}, {int(float(c_ok)):,} / {int(float(c_failed)):,} "
          f"| {fmt(float(g_p50))} / {fmt(float(g_p99))} | **{g:.0f}** | {c:.0f} | {g / c:.2f} |")
levels = sorted(by_level)
median = lambda xs: sorted(xs)[len(xs) // 2] if len(xs) % 2 else sum(sorted(xs)[len(xs) // 2 - 1:len(xs) // 2 + 1]) / 2
raw = [median([g for g, _ in by_level[l]]) for l in levels]
ratio = [median([g / c for g, c in by_level[l]]) for l in levels]
dev = lambda xs: max(abs(x - xs[0]) / xs[0] for x in xs) * 100
print(f"\nFrom {levels[0]:,} to {levels[-1]:,} held (medians of each level's probes): the gateway's "
      f"CPU per probe call {', '.join(f'{x:.0f}' for x in raw)} us, at most {dev(raw):.0f}% from "
      f"the first level; over the control's in the same rounds {', '.join(f'{x:.2f}' for x in ratio)}, "
      f"at most {dev(ratio):.0f}% from the first level (goal: flat within 10%). CPU time is read in "
      f"ticks of {1e6 / hz:,.0f} us.")
PY
{
  echo "$(date +%F). Command: \`bench/held-dialogs.sh --write\` (LEVELS=\"$LEVELS\" DEVICES=$DEVICES" \
       "PROBE_RATE=$PROBE_RATE PROBE_SECS=$PROBE_SECS PROBES=$PROBES RTCP_MUX=$RTCP_MUX). Held calls" \
       "have $SOCKETS media socket(s) each. Machine: $(nproc) cores, open file limit $FILES." \
       "$(rustc --version 2>/dev/null || true), release build, loopback."
  echo
  cat "$TABLE"
} > "$WORK/section.md"
cat "$WORK/section.md"
[ "$WRITE" = 1 ] && doc_table held-dialogs "Held dialogs" "$WORK/section.md"
exit "$FAILED"
