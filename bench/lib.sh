# Shared helpers of the load benchmarks (sourced, not run). Everything runs on loopback, every
# process started here is stopped on exit, and every load is bounded in count and time.
#
#   build                       release binaries of the gateway and the simulator
#   start_gateway NAME [TOML]   a gateway with its own data dir; sets GW_PID QUIC SIP FP GW_CONF
#                               (runs $GW_BIN when set, else the release build)
#                               (TOML: extra sections other than the base config's [node] [quic]
#                               [sip] [media] [admin] [log]; per-IP QUIC limit raised to 50,000;
#                               QUIC_EXTRA, MEDIA_EXTRA: more lines of [quic], [media])
#   start_buddy [ARGS]          the simulator's SIP buddy; sets BUDDY_PID BUDDY_SIP
#   measure_device_calls TARGET DEVICES devices on the gateway just started call TARGET at RATE
#                               for SECS, held HOLD_MS (LOAD_ARGS: more `load` options, e.g.
#                               --media); saves its metrics and stops the gateway;
#                               sets LOAD_JSON (the simulator's report), LOAD_CPU_T0/T1 (gateway
#                               CPU ticks around the calling window) and LOAD_RSS (KiB after it)
#   save_metrics / relayed_packets   the gateway's /metrics kept; the packets its relays carried
#   start_sipp_uas PORT         SIPp's built-in uas; sets UAS_PID
#   rss_kib PID / cpu_ticks PID from /proc
#   wait_phase FILE PHASE [MIN_ANSWERED]   waits until `load --status-file` shows the phase
#   sipp_rtt_ms DIR             p50 and p99 of SIPp's -trace_rtt files (ms resolution)
#   sipp_rtt_values DIR         the same as two numbers ("inf inf" when there is none)
#   doc_table MARKER TITLE FILE rewrites one table of docs/benchmarks.md's "Load" section
#   start_kamailio_stateful PORT  Kamailio 5.6 as a stateful proxy (bench/kamailio/stateful.cfg:
#                               tm, rr, dialog, tlsf) to SIPp's uas on PORT; sets KAM_PID and
#                               KAM_PORT (KAM_CHILDREN UDP workers, default 1; KAM_SHM_MIB of
#                               shared memory, default 2048: 256 ran out at 1,500 calls/s)
#   kam_ticks                   CPU ticks (user + system) of Kamailio and every process it forked
#   write_flag "$@"             the arguments of a benchmark whose only option is --write:
#                               sets WRITE (1 with it), exits 2 with the usage on anything else
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-target/release}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
HZ=$(getconf CLK_TCK)
ulimit -n 65536 2>/dev/null || true

build() {
  [ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --bin thalamus --bin thalamus-sim
  command -v sipp >/dev/null || { echo "SIPp is missing: run scripts/install-peers" >&2; exit 1; }
}

write_flag() {
  WRITE=0
  for a in "$@"; do
    case "$a" in
      --write) WRITE=1 ;;
      *) echo "usage: $0 [--write]" >&2; exit 2 ;;
    esac
  done
}

json_get() { python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(eval('d'+sys.argv[2]))" "$1" "$2"; }

start_gateway() {
  local name=$1 extra=${2:-}
  GW_DIR="$WORK/$name"
  mkdir -p "$GW_DIR"
  GW_CONF="$GW_DIR/thalamus.toml"
  cat > "$GW_CONF" <<TOML
[node]
data_dir = "$GW_DIR/data"
[quic]
listen = "127.0.0.1:0"
max_connections_per_ip = 50000
${QUIC_EXTRA:-}
[sip]
listen = "127.0.0.1:0"
[media]
address = "127.0.0.1"
${MEDIA_EXTRA:-}
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
$extra
TOML
  "${GW_BIN:-$BIN/thalamus}" --config "$GW_CONF" run --ready-file "$GW_DIR/ready.json" >/dev/null 2>"$GW_DIR/gw.log" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  for _ in $(seq 200); do [ -s "$GW_DIR/ready.json" ] && break; sleep 0.05; done
  [ -s "$GW_DIR/ready.json" ] || { echo "gateway $name did not start:" >&2; cat "$GW_DIR/gw.log" >&2; exit 1; }
  QUIC=$(json_get "$GW_DIR/ready.json" "['quic']")
  SIP=$(json_get "$GW_DIR/ready.json" "['sip']")
  FP=$(json_get "$GW_DIR/ready.json" "['fingerprint']")
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

start_buddy() {
  local out="$WORK/buddy.$RANDOM.out"
  "$BIN/thalamus-sim" buddy --listen 127.0.0.1:0 --json "$@" >"$out" 2>/dev/null &
  BUDDY_PID=$!
  PIDS+=("$BUDDY_PID")
  for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
  BUDDY_SIP=$(head -1 "$out" | python3 -c "import json,sys;print(json.loads(sys.stdin.readline())['sip'])")
}

measure_device_calls() {
  local secret
  secret=$("$BIN/thalamus-sim" provision --devices "$DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
  local load=("$BIN/thalamus-sim" load --quiet --gateway "$QUIC" --fingerprint "$FP" --secret "$secret"
              --devices "$DEVICES" --target "$1" ${LOAD_ARGS:-})
  # Warm-up: every device logs in (first logins pay the argon2 check) and calls a little.
  "${load[@]}" --cps 50 --duration 1 --hold-ms 100 >/dev/null 2>&1 || true
  local st=$GW_DIR/status
  LOAD_JSON=$GW_DIR/report.json
  "${load[@]}" --cps "$RATE" --duration "$SECS" --hold-ms "$HOLD_MS" --status-file "$st" \
      --json "$LOAD_JSON" >/dev/null 2>&1 &
  local sim=$!
  wait_phase "$st" calling
  LOAD_CPU_T0=$(cpu_ticks "$GW_PID")
  wait_phase "$st" drained
  LOAD_CPU_T1=$(cpu_ticks "$GW_PID")
  LOAD_RSS=$(rss_kib "$GW_PID")
  wait "$sim" || true
  save_metrics
  stop_pid "$GW_PID"
}

# The gateway's /metrics into $GW_DIR/metrics.txt (for figures the simulator cannot see).
save_metrics() {
  curl -s "http://$(json_get "$GW_DIR/ready.json" "['admin']")/metrics" > "$GW_DIR/metrics.txt" || true
}

# Packets the gateway's finished relays carried: "<to the SIP peer> <to the devices>".
relayed_packets() {
  python3 - "$GW_DIR/metrics.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def n(d):
    m = re.search(r'^thalamus_media_relayed_packets_total\{direction="%s"\} (\S+)$' % d, text, re.M)
    return int(float(m.group(1))) if m else 0
print(n("to_peer"), n("to_device"))
PY
}

start_sipp_uas() {
  sipp -sn uas -i 127.0.0.1 -p "$1" -nostdin >/dev/null 2>&1 &
  UAS_PID=$!
  PIDS+=("$UAS_PID")
  sleep 0.3
}

free_port() { python3 -c "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

wait_phase() {
  local file=$1 phase=$2 min=${3:-0}
  python3 - "$file" "$phase" "$min" <<'PY'
import json, sys, time
path, phase, least = sys.argv[1], sys.argv[2], int(sys.argv[3])
order = ["connected", "calling", "draining", "drained", "done"]
deadline = time.time() + 900
while time.time() < deadline:
    try:
        s = json.load(open(path))
        if order.index(s["phase"]) >= order.index(phase) and s["answered"] >= least:
            sys.exit(0)
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.01)
sys.exit("timed out waiting for phase " + phase)
PY
}

# p50 and p99 of SIPp's -trace_rtt files in DIR as numbers of ms ("inf inf" when none).
sipp_rtt_values() {
  python3 - "$1" <<'PY'
import glob, sys
v = []
for f in glob.glob(sys.argv[1] + "/*_rtt.csv"):
    for line in open(f).read().splitlines()[1:]:
        parts = line.split(";")
        if len(parts) >= 2:
            try: v.append(float(parts[1]))
            except ValueError: pass
v.sort()
pct = lambda p: v[min(len(v) - 1, int(round((len(v) - 1) * p)))] if v else float("inf")
print(pct(0.5), pct(0.99))
PY
}

sipp_rtt_ms() {
  local p50 p99
  read -r p50 p99 < <(sipp_rtt_values "$1")
  python3 -c '
import sys
fmt = lambda x: "none" if x == float("inf") else ("< 1" if x < 1 else f"{x:.0f}")
print(f"{fmt(float(sys.argv[1]))} / {fmt(float(sys.argv[2]))}")' "$p50" "$p99"
}

# SIPp's final counters: "successful failed rate".
sipp_counts() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
def last(label):
    m = re.findall(r"^\s*" + label + r".*\|\s*([0-9.]+)[^|\n]*$", text, re.M)
    return m[-1] if m else "0"
print(last("Successful call"), last("Failed call"), last("Call Rate"))
PY
}

start_kamailio_stateful() {
  command -v kamailio >/dev/null || { echo "Kamailio is missing: run scripts/install-peers" >&2; exit 1; }
  KAM_PORT=$(free_port)
  mkdir -p "$WORK/kamailio-run"
  THALAMUS_KAM_DEST="sip:127.0.0.1:$1" THALAMUS_KAM_CHILDREN="${KAM_CHILDREN:-1}" \
      kamailio -f bench/kamailio/stateful.cfg -DD -E -x tlsf -l "udp:127.0.0.1:$KAM_PORT" \
      -m "${KAM_SHM_MIB:-2048}" -M 16 -Y "$WORK/kamailio-run" -P "$WORK/kamailio.pid" \
      >/dev/null 2>"$WORK/kamailio.log" &
  KAM_PID=$!
  PIDS+=("$KAM_PID")
  sleep 1
  kill -0 "$KAM_PID" 2>/dev/null || { echo "Kamailio did not start:" >&2; cat "$WORK/kamailio.log" >&2; exit 1; }
}

kam_ticks() {
  for p in "$KAM_PID" $(pgrep -P "$KAM_PID"); do cat "/proc/$p/stat"; done | awk '{t += $14 + $15} END {print t}'
}

doc_table() {
  python3 - "${DOC:-docs/benchmarks.md}" "$1" "$2" "$3" <<'PY'
import sys
path, marker, title, table = sys.argv[1:5]
doc = open(path).read()
body = open(table).read().rstrip("\n") + "\n"
begin, end = f"<!-- bench:{marker} -->", f"<!-- /bench:{marker} -->"
block = f"{begin}\n{body}{end}"
if begin in doc and end in doc:
    head, rest = doc.split(begin, 1)
    doc = head + block + rest.split(end, 1)[1]
else:
    if "\n## Load\n" not in doc:
        doc = doc.rstrip("\n") + "\n\n## Load\n"
    doc = doc.rstrip("\n") + f"\n\n### {title}\n\n{block}\n"
open(path, "w").write(doc)
PY
}
