#!/usr/bin/env bash
# Benchmark (issue 17): the call rate at which SIPp's INVITE-to-200 p99 crosses 50 ms, the
# gateway against Kamailio 5.6 as a stateful proxy, everything on the same two cores.
#
# For each path, SECS seconds of SIPp calls (bench/sipp/uac_devices.xml, hold HOLD_MS) at each
# rate of RATES in turn, stopping after the first rate where the path crosses: p99 above
# LIMIT_MS (50) or any call failed.
#   gateway:  SIPp uac -> `thalamus` -> DEVICES simulated devices (`thalamus-sim load
#             --incoming`, answering at once), as bench/load-sip-calls.sh;
#   Kamailio: SIPp uac -> Kamailio (bench/kamailio/stateful.cfg: tm, rr, dialog, tlsf, one
#             worker) -> SIPp uas.
# p99 is SIPp's own (-trace_rtt, every call, 1 ms resolution). Each row also gives the CPU per
# call of the system under test (the gateway's process; all of Kamailio's).
#
#   bench/p99-curve.sh [--write]   (RATES="250 500 750 1000 1500 2000 3000 4000" SECS=10
#                                   DEVICES=2000 HOLD_MS=1000 LIMIT_MS=50 KAM_CHILDREN=1
#                                   PATHS="gateway kamailio")
#
# KAM_CHILDREN sets Kamailio's UDP workers, KAM_SHM_MIB its shared memory (bench/lib.sh); PATHS runs only some paths; KEEP_WORK=1 keeps the
# working directory (SIPp's logs and error files, the gateway's log).
#
# Prints the table and where each path crossed; with --write puts both between the markers
# "p99-curve" of docs/benchmarks.md.
source "$(dirname "$0")/lib.sh"
write_flag "$@"
RATES=${RATES:-"250 500 750 1000 1500 2000 3000 4000"}
SECS=${SECS:-10}
DEVICES=${DEVICES:-2000}
HOLD_MS=${HOLD_MS:-1000}
LIMIT_MS=${LIMIT_MS:-50}
SCENARIO=$PWD/bench/sipp/uac_devices.xml
LOAD_AVG=$(cut -d' ' -f1-3 /proc/loadavg)
build

# SIPp calls load-0 .. load-N in turn (the uas answers any user).
USERS=$WORK/devices.csv
{ echo SEQUENTIAL; for ((n = 0; n < DEVICES; n++)); do echo "load-$n;"; done; } > "$USERS"
ROWS=$WORK/rows.txt
: > "$ROWS"

sipp_run() { # dir target rate calls
  local dir=$1 target=$2 rate=$3 calls=$4
  mkdir -p "$dir"
  (cd "$dir" && sipp -sf "$SCENARIO" -inf "$USERS" -i 127.0.0.1 -p "$(free_port)" -nostdin \
      -r "$rate" -m "$calls" -l $((rate * (HOLD_MS / 1000 + 2) * 2)) -d "$HOLD_MS" \
      -trace_rtt -rtt_freq 1 -trace_err -timeout $((SECS + 60))s -timeout_error "$target" >"$dir/out.txt" 2>&1) || true
}

# Appends "path rate calls ok failed p50 p99 cpu_us" to ROWS; prints "crossed" when it did.
record() { # path dir rate calls ticks0 ticks1
  local path=$1 dir=$2 rate=$3 calls=$4 t0=$5 t1=$6 ok failed cps
  local p50 p99
  read -r ok failed cps < <(sipp_counts "$dir/out.txt")
  read -r p50 p99 < <(sipp_rtt_values "$dir")
  python3 - "$p50" "$p99" "$path" "$rate" "$calls" "$ok" "$failed" "$t0" "$t1" "$HZ" "$LIMIT_MS" "$ROWS" <<'PY'
import sys
p50, p99 = float(sys.argv[1]), float(sys.argv[2])
path, rate, calls, ok, failed, t0, t1, hz, limit, rows = sys.argv[3:13]
cpu = (int(t1) - int(t0)) / int(hz) * 1e6 / max(int(calls), 1)
with open(rows, "a") as out:
    print(path, rate, calls, int(float(ok)), int(float(failed)), p50, p99, round(cpu), file=out)
if p99 > float(limit) or int(float(failed)) > 0 or int(float(ok)) < int(calls):
    print("crossed")
PY
}

PATHS=${PATHS:-"gateway kamailio"}
runs() { [[ " $PATHS " == *" $1 "* ]]; }

# --- the gateway
if runs gateway; then
start_gateway gw
SECRET=$("$BIN/thalamus-sim" provision --devices "$DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
LOAD=("$BIN/thalamus-sim" load --quiet --incoming --gateway "$QUIC" --fingerprint "$FP"
      --secret "$SECRET" --devices "$DEVICES")
# Warm-up: every device logs in once (first logins pay the argon2 check).
"${LOAD[@]}" --duration 0 >/dev/null 2>&1 || true
for rate in $RATES; do
  calls=$((rate * SECS))
  st=$WORK/st.$rate
  echo "$(date +%T) gateway: $rate calls/s" >&2
  "${LOAD[@]}" --expect-calls "$calls" --duration $((SECS + 90)) --status-file "$st" >/dev/null 2>&1 &
  sim=$!
  wait_phase "$st" calling
  t0=$(cpu_ticks "$GW_PID")
  sipp_run "$WORK/gw.$rate" "$SIP" "$rate" "$calls"
  for _ in $(seq 100); do grep -q '"drained"\|"done"' "$st" && break; sleep 0.1; done
  grep -q '"drained"\|"done"' "$st" || kill -TERM "$sim" 2>/dev/null || true
  t1=$(cpu_ticks "$GW_PID")
  wait "$sim" || true
  kill -0 "$GW_PID" 2>/dev/null || { echo "the gateway died" >&2; exit 1; }
  crossed=$(record gateway "$WORK/gw.$rate" "$rate" "$calls" "$t0" "$t1")
  [ -z "$crossed" ] || break
done
kill "$GW_PID" 2>/dev/null || true
fi

# --- Kamailio
if runs kamailio; then
UAS_PORT=$(free_port)
start_sipp_uas "$UAS_PORT"
start_kamailio_stateful "$UAS_PORT"
for rate in $RATES; do
  calls=$((rate * SECS))
  echo "$(date +%T) Kamailio: $rate calls/s" >&2
  k0=$(kam_ticks)
  sipp_run "$WORK/kam.$rate" "127.0.0.1:$KAM_PORT" "$rate" "$calls"
  k1=$(kam_ticks)
  crossed=$(record kamailio "$WORK/kam.$rate" "$rate" "$calls" "$k0" "$k1")
  [ -z "$crossed" ] || break
done
fi

OUT=$WORK/out.md
python3 - "$ROWS" "$LIMIT_MS" "$SECS" "$HOLD_MS" "$DEVICES" "$LOAD_AVG" "$RATES" > "$OUT" <<'PY'
import datetime, os, platform, subprocess, sys
rows_path, limit, secs, hold_ms, devices, load, rates = sys.argv[1:8]
limit = float(limit)
rows = [l.split() for l in open(rows_path) if l.strip()]
ms = lambda x: "none" if x == float("inf") else ("< 1" if x < 1 else f"{x:.0f}")
children = os.environ.get("KAM_CHILDREN", "1")
name = {"gateway": f"SIPp -> `thalamus` -> {int(devices):,} simulated devices",
        "kamailio": f"SIPp -> Kamailio stateful (tm, rr, dialog; {children} UDP worker{'s' if children != '1' else ''}) -> SIPp uas"}
cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
print(f"{datetime.date.today()}. Command: `bench/p99-curve.sh --write` (RATES=\"{rates}\" SECS={secs} "
      f"HOLD_MS={hold_ms}). Machine: {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
      f"{rustc}, release build, loopback; load average before the run {load}.")
print()
print("| path | calls/s | calls / ok / failed | INVITE to 200 p50 / p99 ms | CPU us per call |")
print("| --- | --- | --- | --- | --- |")
crossing = {}
last_ok = {}
for path, rate, calls, ok, failed, p50, p99, cpu_us in rows:
    p50, p99 = float(p50), float(p99)
    crossed = p99 > limit or int(failed) > 0 or int(ok) < int(calls)
    mark = " **crossed**" if crossed else ""
    print(f"| {name[path]} | {int(rate):,} | {int(calls):,} / {int(ok):,} / {int(failed):,} | "
          f"{ms(p50)} / {ms(p99)}{mark} | {cpu_us} |")
    if crossed:
        crossing.setdefault(path, int(rate))
    else:
        last_ok[path] = int(rate)
print()
by = {(r[0], int(r[1])): r for r in rows}
for path in ("gateway", "kamailio"):
    label = "The gateway" if path == "gateway" else "Kamailio"
    if path in crossing:
        below = last_ok.get(path)
        r = by[(path, crossing[path])]
        why = []
        if float(r[6]) > limit:
            why.append(f"p99 {ms(float(r[6]))} ms")
        if int(r[4]) > 0 or int(r[3]) < int(r[2]):
            why.append(f"{int(r[2]) - int(r[3]):,} calls not answered")
        at = f"at {crossing[path]:,} calls/s: {' and '.join(why)}"
        print(f"- {label}: p99 under {limit:.0f} ms with every call answered up to {below:,} calls/s; {at}"
              if below else f"- {label}: crossed at the first rate, {at}")
    elif path in last_ok:
        print(f"- {label}: p99 under {limit:.0f} ms with every call answered at every rate tried (up to {last_ok[path]:,} calls/s)")
gw500 = [r for r in rows if r[0] == "gateway" and r[1] == "500"]
if gw500:
    p99 = float(gw500[0][6])
    print(f"- The gateway's p99 at 500 calls/s: {ms(p99)} ms (issue 17: at most 20 ms; "
          f"{'met' if p99 <= 20 else 'not met'}).")
PY
cat "$OUT"
if [ "$WRITE" = 1 ]; then
  DOC=${DOC:-docs/benchmarks.md} doc_table p99-curve "The rate where p99 crosses 50 ms" "$OUT"
fi
