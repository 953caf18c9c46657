#!/usr/bin/env bash
# Benchmark: the SIP load balancer's CPU per call under SIPp load, against a plain UDP forwarder
# measured in the same run as the floor.
#
#   bench/balancer.sh [--write]     (CALLS=10000 RATE=500 ROUNDS=2 PAUSE_MS=0)
#
# One SIPp uas stands in for a gateway node (tests/scenarios/bench_balancer_uas.xml: 180, 200
# with SDP, copies the Record-Route; a bash loop sends its heartbeats to the balancer). SIPp's
# uac (tests/scenarios/bench_balancer_uac.xml: INVITE, 180, 200, ACK, BYE, 200; ACK and BYE
# over the Record-Route) places CALLS calls at RATE calls/s:
#   (a) uac -> `thalamus balancer` -> uas       (release build)
#   (b) uac -> udp_forwarder example -> uas     (the floor, release build: reads a datagram,
#                                                sends it on, sends replies back to the client;
#                                                tokio's multi-thread runtime, as the balancer)
#   (c) the same forwarder with --single-thread (tokio's current-thread runtime)
#   (d) uac -> the same `thalamus balancer` with `[sip] queue = 8192` -> uas (each message
#       handed from the receiving task to one router task through a queue, as before issue 17)
#   (e) uac -> Kamailio 5.6 dispatcher -> uas and a second uas (bench/kamailio/dispatcher.cfg:
#       tm, rr, dispatcher hashing the Call-ID over the two; one UDP worker: with two, a 180
#       relayed by one worker can overtake the 200 relayed by the other, which SIPp refuses), the baseline
# They alternate, ROUNDS rounds of each, against the same uas in the same session. For each
# run the CPU time (user + system, /proc/PID/stat) of the balancer, the forwarder or every
# Kamailio process is read before and after; the figure is microseconds of CPU per call.
# Fails (exit 1) if SIPp reports a failed call or any process of the run dies.
#
# With BEFORE_BIN=<path of another `thalamus` binary> (an older build, say), a second balancer
# from that binary joins the rounds as a fourth path, so a change is compared before and after
# in one run (the ratio is printed).
#
# Prints a table; with --write, also puts it between the markers of the "SIP load balancer"
# section of docs/benchmarks.md (the section is appended when absent; text outside the markers
# is kept).
source "$(dirname "$0")/lib.sh"
write_flag "$@"
CALLS=${CALLS:-10000}
RATE=${RATE:-500}
ROUNDS=${ROUNDS:-2}
PAUSE_MS=${PAUSE_MS:-0}
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet -p thalamus --bin thalamus -p thalamus-balancer --example udp_forwarder
command -v sipp >/dev/null || { echo "SIPp is missing: run scripts/install-peers" >&2; exit 1; }
command -v kamailio >/dev/null || { echo "Kamailio is missing: run scripts/install-peers" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is missing" >&2; exit 1; }
SCEN=tests/scenarios
phase() { echo "$(date +%T) $*" >&2; }
alive() { kill -0 "$1" 2>/dev/null || { echo "$2 (pid $1) died" >&2; exit 1; }; }

# The stand-in node.
UAS_PORT=$(free_port)
sipp -sf "$SCEN/bench_balancer_uas.xml" -i 127.0.0.1 -p "$UAS_PORT" -mp "$(free_port)" -nostdin \
     >/dev/null 2>"$WORK/uas.err" &
UAS_PID=$!
PIDS+=("$UAS_PID")
sleep 0.3
alive "$UAS_PID" "SIPp uas"

# Kamailio's second destination.
UAS2_PORT=$(free_port)
sipp -sf "$SCEN/bench_balancer_uas.xml" -i 127.0.0.1 -p "$UAS2_PORT" -mp "$(free_port)" -nostdin \
     >/dev/null 2>"$WORK/uas2.err" &
UAS2_PID=$!
PIDS+=("$UAS2_PID")

# The baseline: Kamailio's dispatcher over both.
printf '1 sip:127.0.0.1:%s\n1 sip:127.0.0.1:%s\n' "$UAS_PORT" "$UAS2_PORT" > "$WORK/dispatcher.list"
KAM_PORT=$(free_port)
mkdir -p "$WORK/kamailio-run"
THALAMUS_DS_LIST="$WORK/dispatcher.list" kamailio -f bench/kamailio/dispatcher.cfg -DD -E \
    -l "udp:127.0.0.1:$KAM_PORT" -m 256 -M 16 -Y "$WORK/kamailio-run" -P "$WORK/kamailio.pid" \
    >/dev/null 2>"$WORK/kamailio.log" &
KAM_PID=$!
PIDS+=("$KAM_PID")
sleep 1
alive "$KAM_PID" "kamailio"

# The balancer, and the same with the queue between its sockets and its router.
for queue in 0 8192; do
cat > "$WORK/balancer-$queue.toml" <<TOML
[sip]
listen = "127.0.0.1:0"
queue = $queue
[heartbeat]
listen = "127.0.0.1:0"
interval_ms = 500
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
TOML
done
cp "$WORK/balancer-0.toml" "$WORK/balancer.toml"
"$BIN/thalamus" balancer --config "$WORK/balancer-0.toml" --ready-file "$WORK/lb.json" \
    >/dev/null 2>"$WORK/lb.log" &
LB_PID=$!
PIDS+=("$LB_PID")
"$BIN/thalamus" balancer --config "$WORK/balancer-8192.toml" --ready-file "$WORK/lbq.json" \
    >/dev/null 2>"$WORK/lbq.log" &
LBQ_PID=$!
PIDS+=("$LBQ_PID")
for f in lb lbq; do
  for _ in $(seq 200); do [ -s "$WORK/$f.json" ] && break; sleep 0.05; done
  [ -s "$WORK/$f.json" ] || { echo "balancer did not start:" >&2; cat "$WORK/$f.log" >&2; exit 1; }
done
LB_SIP=$(json_get "$WORK/lb.json" "['sip_udp']")
LB_HB=$(json_get "$WORK/lb.json" "['heartbeat']")
LB_ADMIN=$(json_get "$WORK/lb.json" "['admin']")
LBQ_SIP=$(json_get "$WORK/lbq.json" "['sip_udp']")
LBQ_ADMIN=$(json_get "$WORK/lbq.json" "['admin']")
HB_TARGETS=("$LB_HB" "$(json_get "$WORK/lbq.json" "['heartbeat']")")
if [ -n "${BEFORE_BIN:-}" ]; then
  "$BEFORE_BIN" balancer --config "$WORK/balancer.toml" --ready-file "$WORK/lb0.json" \
      >/dev/null 2>"$WORK/lb0.log" &
  LB0_PID=$!
  PIDS+=("$LB0_PID")
  for _ in $(seq 200); do [ -s "$WORK/lb0.json" ] && break; sleep 0.05; done
  [ -s "$WORK/lb0.json" ] || { echo "the before balancer did not start:" >&2; cat "$WORK/lb0.log" >&2; exit 1; }
  LB0_SIP=$(json_get "$WORK/lb0.json" "['sip_udp']")
  LB0_ADMIN=$(json_get "$WORK/lb0.json" "['admin']")
  HB_TARGETS+=("$(json_get "$WORK/lb0.json" "['heartbeat']")")
fi

# Heartbeats of the stand-in node (format: docs/balancer.md, "Heartbeats").
SESSION=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
(
  seq=0
  while :; do
    seq=$((seq + 1))
    for hb in "${HB_TARGETS[@]}"; do
      printf '{"v":1,"node":"bench-node","session":"%s","seq":%d,"sip":"127.0.0.1:%s"}' \
          "$SESSION" "$seq" "$UAS_PORT" > "/dev/udp/${hb%:*}/${hb##*:}" || true
    done
    sleep 0.5
  done
) &
HB_PID=$!
PIDS+=("$HB_PID")
for _ in $(seq 100); do
  curl -s "http://$LB_ADMIN/nodes" | grep -q '"eligible":true' && break
  sleep 0.1
done
curl -s "http://$LB_ADMIN/nodes" | grep -q '"eligible":true' \
  || { echo "the stand-in node never came up at the balancer" >&2; exit 1; }
for _ in $(seq 100); do
  curl -s "http://$LBQ_ADMIN/nodes" | grep -q '"eligible":true' && break
  sleep 0.1
done
if [ -n "${BEFORE_BIN:-}" ]; then
  for _ in $(seq 100); do
    curl -s "http://$LB0_ADMIN/nodes" | grep -q '"eligible":true' && break
    sleep 0.1
  done
fi

# The floor: the forwarder on tokio's multi-thread runtime (as the balancer), and on the
# current-thread one.
FWD_PORT=$(free_port)
"$BIN/examples/udp_forwarder" --listen "127.0.0.1:$FWD_PORT" --to "127.0.0.1:$UAS_PORT" \
    2>"$WORK/fwd.log" &
FWD_PID=$!
PIDS+=("$FWD_PID")
FWD1_PORT=$(free_port)
"$BIN/examples/udp_forwarder" --listen "127.0.0.1:$FWD1_PORT" --to "127.0.0.1:$UAS_PORT" \
    --single-thread 2>"$WORK/fwd1.log" &
FWD1_PID=$!
PIDS+=("$FWD1_PID")
sleep 0.3
alive "$FWD_PID" "udp_forwarder"
alive "$FWD1_PID" "udp_forwarder --single-thread"

# User and system CPU ticks of a process (all its threads), /proc/PID/stat fields 14 and 15;
# for Kamailio, of it and every process it forked (its children).
cpu_user_sys() {
  local pids=$1
  if [ "$1" = "$KAM_PID" ]; then pids="$1 $(pgrep -P "$1" | tr '\n' ' ')"; fi
  for p in $pids; do cat "/proc/$p/stat"; done | awk '{u += $14; s += $15} END {print u, s}'
}
ROWS=$WORK/rows.txt
: > "$ROWS"
FAILED=0
run() {
  local name=$1 round=$2 pid=$3 target=$4
  local out=$WORK/sipp-$name-$round.out
  phase "round $round: $CALLS calls at $RATE/s through the $name"
  local u0 s0 u1 s1 w0 w1 code=0
  read -r u0 s0 < <(cpu_user_sys "$pid")
  w0=$(date +%s.%N)
  sipp -sf "$SCEN/bench_balancer_uac.xml" -s bench-device -r "$RATE" -m "$CALLS" -d "$PAUSE_MS" \
       -i 127.0.0.1 -p "$(free_port)" -mp "$(free_port)" -nostdin -timeout 300s -timeout_error \
       -trace_err -error_file "$out.errors" "$target" >"$out" 2>&1 || code=$?
  w1=$(date +%s.%N)
  alive "$pid" "$name"
  read -r u1 s1 < <(cpu_user_sys "$pid")
  alive "$UAS_PID" "SIPp uas"
  alive "$UAS2_PID" "the second SIPp uas"
  alive "$HB_PID" "heartbeat loop"
  local ok failed rate
  read -r ok failed rate < <(sipp_counts "$out")
  if [ "$code" != 0 ] || [ "${failed%.*}" != 0 ] || [ "${ok%.*}" != "$CALLS" ]; then
    echo "$name round $round: SIPp exit $code, $ok successful, $failed failed calls" >&2
    [ -s "$out.errors" ] && head -c 1500 "$out.errors" >&2 && echo >&2
    FAILED=1
  fi
  echo "$name $round $ok $failed $rate $w0 $w1 $u0 $s0 $u1 $s1" >> "$ROWS"
}
for round in $(seq "$ROUNDS"); do
  run balancer "$round" "$LB_PID" "$LB_SIP"
  sleep 1
  if [ -n "${BEFORE_BIN:-}" ]; then
    run balancer-before "$round" "$LB0_PID" "$LB0_SIP"
    sleep 1
  fi
  run balancer-queued "$round" "$LBQ_PID" "$LBQ_SIP"
  sleep 1
  run forwarder "$round" "$FWD_PID" "127.0.0.1:$FWD_PORT"
  sleep 1
  run forwarder-1 "$round" "$FWD1_PID" "127.0.0.1:$FWD1_PORT"
  sleep 1
  run kamailio "$round" "$KAM_PID" "127.0.0.1:$KAM_PORT"
  sleep 1
done
curl -s "http://$LB_ADMIN/metrics" > "$WORK/metrics.txt"

python3 - "$ROWS" "$WORK/metrics.txt" "$HZ" "$CALLS" "$RATE" "$PAUSE_MS" "$ROUNDS" "$LOAD" \
    "$WRITE" "$FAILED" <<'PY'
import datetime, os, platform, re, subprocess, sys, textwrap
rows_path, metrics_path, hz, calls, rate, pause_ms, rounds, load, write, failed = sys.argv[1:11]
hz, calls, rounds = int(hz), int(calls), int(rounds)
write, failed = write == "1", failed == "1"

rows = []
for line in open(rows_path):
    name, rnd, ok, fail, achieved, w0, w1, u0, s0, u1, s1 = line.split()
    per_call = lambda a, b: (int(b) - int(a)) / hz * 1e6 / calls
    user, system = per_call(u0, u1), per_call(s0, s1)
    rows.append(dict(name=name, round=int(rnd), ok=int(float(ok)), failed=int(float(fail)),
                     achieved=float(achieved), wall=float(w1) - float(w0),
                     user=user, system=system, us=user + system))

metrics = open(metrics_path).read()
def total(name):
    """Sum of every series of a counter of the balancer's /metrics."""
    pat = re.compile(r"^thalamus_balancer_" + name + r"(_total)?(\{[^}]*\})? ([0-9.e+]+)$", re.M)
    return sum(float(m.group(3)) for m in pat.finditer(metrics))
forwarded = total("requests_forwarded") + total("responses_forwarded")
answered, dropped, send_errors = total("answered"), total("dropped"), total("send_errors")

def mean(name, key="us"):
    v = [r[key] for r in rows if r["name"] == name]
    return sum(v) / len(v)
lb, fwd, fwd1 = mean("balancer"), mean("forwarder"), mean("forwarder-1")
lb_user, lb_sys = mean("balancer", "user"), mean("balancer", "system")
fwd_user, fwd_sys = mean("forwarder", "user"), mean("forwarder", "system")
label = {"balancer": "SIPp uac -> `thalamus balancer` -> SIPp uas",
         "balancer-before": "the same through the balancer of `BEFORE_BIN`",
         "forwarder": "SIPp uac -> plain UDP forwarder (floor) -> SIPp uas",
         "forwarder-1": "the same, forwarder on one thread (`--single-thread`)",
         "balancer-queued": "the same balancer with `[sip] queue = 8192` (a hand-off per message)",
         "kamailio": "SIPp uac -> Kamailio dispatcher (tm, rr; Call-ID hash over 2; 1 worker) -> SIPp uas"}
cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                  if l.startswith("model name")), "?")
mem_gib = next(int(l.split()[1]) for l in open("/proc/meminfo")
               if l.startswith("MemTotal")) / 2**20
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
env = []
if calls != 10000: env.append(f"CALLS={calls}")
if rate != "500": env.append(f"RATE={rate}")
if rounds != 2: env.append(f"ROUNDS={rounds}")
if pause_ms != "0": env.append(f"PAUSE_MS={pause_ms}")
if os.environ.get("BEFORE_BIN"): env.append("BEFORE_BIN=" + os.environ["BEFORE_BIN"])
command = " ".join(env + ["bench/balancer.sh"] + (["--write"] if write else []))
pause = "no pause" if pause_ms == "0" else f"{pause_ms} ms between ACK and BYE"

table = [
    f"{datetime.date.today().isoformat()}. Command: `{command}`. Machine: {os.cpu_count()} cores "
    f"({cpu_model}), {mem_gib:.0f} GiB, {platform.system()} {platform.release()}, {rustc}, "
    f"release builds, loopback; load average before the run {' / '.join(load.split())} "
    f"(the machine is shared).",
    "",
    f"{calls:,} calls per run at {rate} calls/s (INVITE, 180, 200, ACK, {pause}, BYE, 200: "
    f"six messages through the proxy per call), the paths alternating, {rounds} "
    f"round{'s' if rounds != 1 else ''} each, same SIPp uas (and a second one for Kamailio).",
    "",
    "| path | round | calls ok / failed | calls/s achieved (wall) | proxy CPU us per call "
    "| of which user / system |",
    "| --- | --- | --- | --- | --- | --- |",
]
for r in rows:
    table.append(f"| {label[r['name']]} | {r['round']} | {r['ok']:,} / {r['failed']} | "
                 f"{r['achieved']:.0f} ({r['wall']:.1f} s) | **{r['us']:.0f}** | "
                 f"{r['user']:.0f} / {r['system']:.0f} |")
table += [
    "",
    f"**Balancer {lb:.0f} us of CPU per call, floor {fwd:.0f} us: {lb / fwd:.2f}x the plain "
    f"forwarder** (means of the rounds; {lb / 6:.1f} us against {fwd / 6:.1f} us per "
    f"message). The forwarder on one thread: {fwd1:.0f} us per call, the balancer "
    f"{lb / fwd1:.2f}x that. User / system: balancer {lb_user:.0f} / {lb_sys:.0f} us, "
    f"forwarder {fwd_user:.0f} / {fwd_sys:.0f} us. CPU time is read in ticks of "
    f"{1e6 / hz:,.0f} us, i.e. {1e6 / hz / calls:.1f} us per call.",
    "",
    f"The balancer's counters over all its rounds: {forwarded:,.0f} messages forwarded "
    f"({forwarded / max(1, rounds * calls):.2f} per call; above 6 means retransmissions), "
    f"{answered:,.0f} answered itself, {dropped:,.0f} dropped, {send_errors:,.0f} send errors.",
]
kam, queued = mean("kamailio"), mean("balancer-queued")
table += ["", f"**Against Kamailio's dispatcher in this run: {kam:.0f} us per call, the balancer "
          f"{lb / kam:.2f}x that.** The balancer with a queue between its sockets and its "
          f"router: {queued:.0f} us per call (the one without: {lb / queued:.2f}x that)."]
if any(r["name"] == "balancer-before" for r in rows):
    before = mean("balancer-before")
    table += ["", f"**Before and after in this run: the balancer of `BEFORE_BIN` {before:.0f} us "
              f"per call, this build {lb:.0f} us: {lb / before:.2f}x.**"]
if failed:
    table += ["", "**This run had failed calls or SIPp errors: the figures are not valid.**"]
# Prose paragraphs wrapped as the rest of the file; table rows left as they are.
table = [l if l.startswith("|") else textwrap.fill(l, 96, break_on_hyphens=False) for l in table]
body = "\n".join(table) + "\n"
print(body)
if write and not failed:
    path = "docs/benchmarks.md"
    doc = open(path).read()
    begin, end = "<!-- bench:balancer -->", "<!-- /bench:balancer -->"
    block = f"{begin}\n{body}{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## SIP load balancer: CPU per call against a plain UDP " \
              "forwarder\n\n" + block + "\n"
    open(path, "w").write(doc)
    print(f"written to {path}", file=sys.stderr)
PY
[ "$FAILED" = 0 ] || { echo "failed calls: see above" >&2; exit 1; }
