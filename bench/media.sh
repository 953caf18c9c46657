#!/usr/bin/env bash
# Benchmark: the media relay at N concurrent calls (default 100) of 50 packets/s each (20 ms
# PCMU frames), everything on loopback: N simulated devices (one thalamus-sim process, one QUIC
# connection each) call `thalamus-sim buddy --echo` through one gateway for SECS seconds
# (default 20) and check every echoed frame byte for byte.
#
#   bench/media.sh [N] [SECS] [--write]
#
# Figures:
# - device round trip (device -> gateway -> buddy echo -> gateway -> device), p50/p99, from the
#   simulator's media_summary;
# - baseline, same run (before and after the calls): the same N flows of 20 ms frames as plain
#   RTP/UDP from the same simulator straight to N echo ports of the same buddy
#   (`thalamus-sim echo-probe`), no gateway;
# - added latency = device round trip - baseline round trip (p50 and p99 of each);
# - the gateway's own relay latency (a packet's arrival at the relay to its send), p50/p99 per
#   direction over every packet, from its metrics (media_relay_latency_seconds);
# - gateway CPU (user + system, /proc/<pid>/stat) during a window in which all N calls stream,
#   per 1,000 packets relayed (both directions: N x 50/s x 2 x window, minus measured loss).
#
# GW_BIN=<path> runs that gateway binary instead of the release build (to compare builds in
# alternating runs; the build still happens). KEEP_WORK=1 keeps the working directory (logs, the simulator's JSON events, metrics).
# With --write the section "## Media relay" of docs/benchmarks.md (up to the next "## " heading,
# hand-written notes included) is replaced, or appended when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
WRITE=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--write" ]; then WRITE=1; else ARGS+=("$a"); fi
done
N=${ARGS[0]:-100}
SECS=${ARGS[1]:-20}
if [ "$SECS" -lt 10 ]; then echo "SECS must be at least 10" >&2; exit 2; fi
# The CPU window: from 3 s after every call is answered to 3 s before the first hangup.
WINDOW=$((SECS - 6))
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
cargo build --release --quiet --bin thalamus --bin thalamus-sim
BIN=target/release
GW_BIN=${GW_BIN:-$BIN/thalamus}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
cat > "$WORK/thalamus.toml" <<TOML
[node]
data_dir = "$WORK/data"
[quic]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[sip]
listen = "127.0.0.1:0"
[media]
address = "127.0.0.1"
[log]
level = "warn"
TOML
json() { python3 -c "import json,sys;print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }
SECRET=$("$GW_BIN" --config "$WORK/thalamus.toml" device add-bulk --prefix media- --count "$N" 2>/dev/null)
"$GW_BIN" --config "$WORK/thalamus.toml" run --ready-file "$WORK/ready.json" >/dev/null 2>"$WORK/gw.log" &
GW_PID=$!
PIDS+=("$GW_PID")
for _ in $(seq 200); do [ -s "$WORK/ready.json" ] && break; sleep 0.1; done
QUIC=$(json "$WORK/ready.json" quic)
FP=$(json "$WORK/ready.json" fingerprint)
ADMIN=$(json "$WORK/ready.json" admin)
$BIN/thalamus-sim buddy --listen 127.0.0.1:0 --echo --standing-echoes "$N" --json >"$WORK/buddy.out" 2>/dev/null &
PIDS+=("$!")
for _ in $(seq 200); do [ -s "$WORK/buddy.out" ] && break; sleep 0.1; done
BUDDY_SIP=$(head -1 "$WORK/buddy.out" | python3 -c "import json,sys;print(json.loads(sys.stdin.read())['sip'])")
# One echo port per baseline flow, as every call through the gateway gets its own.
ECHO_TARGETS=$(head -1 "$WORK/buddy.out" | python3 -c "import json,sys;print(' '.join('--target 127.0.0.1:%d' % p for p in json.loads(sys.stdin.read())['echo_ports']))")
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# Datagrams the kernel dropped on the gateway's QUIC socket (receive buffer full), from
# /proc/net/udp: lost QUIC packets are retransmitted, the media datagrams in them are not.
QUIC_PORT_HEX=$(printf '%04X' "${QUIC##*:}")
quic_drops() { awk -v p=":$QUIC_PORT_HEX" '$2 ~ p"$" {print $NF}' /proc/net/udp | head -1; }
HZ=$(getconf CLK_TCK)

phase() { echo "$(date +%T) $*" >&2; }
phase "gateway and buddy up; warming up $N logins"
# Warm-up: one login per device (the first login checks the argon2 hash; later ones hit the
# gateway's cache of verified secrets, so the calls below measure media, not argon2).
$BIN/thalamus-sim swarm --gateway "$QUIC" --fingerprint "$FP" --prefix media- --devices "$N" \
    --secret="$SECRET" --concurrency 16 --hold-secs 0 >/dev/null 2>&1

phase "baseline before"
# Baseline: the same flows straight to the buddy's echo (before the gateway run, and again
# after it: on a shared machine the load moves, and two samples show how much).
$BIN/thalamus-sim echo-probe $ECHO_TARGETS --flows "$N" --secs "$SECS" --json \
    > "$WORK/baseline-before.json"

phase "$N calls through the gateway"
# Through the gateway.
$BIN/thalamus-sim call --gateway "$QUIC" --fingerprint "$FP" --device media- --secret="$SECRET" \
    --parallel "$N" --target "sip:bob@$BUDDY_SIP" --hold-ms $((SECS * 1000)) --media \
    --ready-file "$WORK/answered" --json > "$WORK/calls.json" &
SIM_PID=$!
PIDS+=("$SIM_PID")
DROPS0=$(quic_drops)
for _ in $(seq 600); do [ -f "$WORK/answered" ] && break; sleep 0.1; done
[ -f "$WORK/answered" ] || { echo "not every call was answered within 60 s" >&2; exit 1; }
sleep 3
CPU0=$(cpu_ticks "$GW_PID"); SIM0=$(cpu_ticks "$SIM_PID"); T0=$(date +%s.%N)
sleep "$WINDOW"
CPU1=$(cpu_ticks "$GW_PID"); SIM1=$(cpu_ticks "$SIM_PID"); T1=$(date +%s.%N)
wait "$SIM_PID" || true
DROPS1=$(quic_drops)
curl -s "http://$ADMIN/metrics" > "$WORK/metrics.txt"
phase "baseline after"
$BIN/thalamus-sim echo-probe $ECHO_TARGETS --flows "$N" --secs "$SECS" --json \
    > "$WORK/baseline-after.json"

python3 - "$WORK" "$N" "$SECS" "$CPU0" "$CPU1" "$SIM0" "$SIM1" "$T0" "$T1" "$HZ" "$WRITE" "$LOAD" "$((DROPS1 - DROPS0))" <<'PY'
import datetime, json, os, platform, re, subprocess, sys
work, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cpu0, cpu1, sim0, sim1 = (int(x) for x in sys.argv[4:8])
t0, t1, hz, write = float(sys.argv[8]), float(sys.argv[9]), int(sys.argv[10]), sys.argv[11] == "1"

def event(path, name):
    found = [json.loads(l) for l in open(path) if l.startswith("{")]
    found = [v for v in found if v.get("event") == name]
    if not found:
        raise SystemExit(f"no {name} event in {path}")
    return found[-1]

before = event(f"{work}/baseline-before.json", "media_summary")
after = event(f"{work}/baseline-after.json", "media_summary")
gw = event(f"{work}/calls.json", "media_summary")
summary = event(f"{work}/calls.json", "summary")
metrics = open(f"{work}/metrics.txt").read()
def metric(name, **labels):
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{lab}}}" if lab else name
    for line in metrics.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise SystemExit(f"no {key} in the gateway's metrics")

window = t1 - t0
cpu_s = (cpu1 - cpu0) / hz
sim_cpu_s = (sim1 - sim0) / hz
loss = gw["loss_percent"] / 100
packets = window * n * 50 * 2 * (1 - loss)
cpu_per_k_ms = cpu_s * 1000 / (packets / 1000)
lat = {(d, q): metric("thalamus_media_relay_latency_seconds", direction=d, quantile=q) * 1e6
       for d in ("to_peer", "to_device") for q in ("0.5", "0.99", "1")}
relayed = metric("thalamus_media_relayed_packets_total", direction="to_peer") + \
    metric("thalamus_media_relayed_packets_total", direction="to_device")
cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem_gib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 2**20
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
load = sys.argv[12].split()
quic_drops = int(sys.argv[13])
ms = lambda us: f"{us / 1000:.2f}"
us = lambda v: f"{v:,.0f}"
def row(name, calls, s):
    return (f"| {name} | {calls} | {s['frames_sent']:,} | {100 - s['loss_percent']:.3f}% | "
            f"{s['frames_in_order']:,} | {s['frames_foreign']} | {ms(s['rtt_us_p50'])} / {ms(s['rtt_us_p99'])} |")
base50 = (before['rtt_us_p50'] + after['rtt_us_p50']) / 2
base99 = (before['rtt_us_p99'] + after['rtt_us_p99']) / 2

section = f"""## Media relay: {n} concurrent calls of 50 packets/s

{datetime.date.today().isoformat()}. Command: `bench/media.sh {n} {secs}`. Machine: {os.cpu_count()} cores
({cpu_model}), {mem_gib:.0f} GiB, {platform.system()} {platform.release()}, {rustc}, release
builds, loopback; load average before the run {' / '.join(load)} (the machine is shared).

{n} simulated devices (one `thalamus-sim call --parallel {n} --media` process, one QUIC
connection each) call `thalamus-sim buddy --echo` through one gateway and stream 20 ms PCMU
frames (160 bytes, 50/s) for {secs} s; every echoed frame is checked byte for byte. **Baseline**
(same run, same simulator and echo process): `thalamus-sim echo-probe --flows {n}` sends the
same frames as plain RTP/UDP from {n} sockets straight to {n} echo ports of the same buddy (one
per flow, as each call has its own), no gateway in between; it runs before and after the calls.

| path | calls | frames sent | back intact | in order | foreign | round trip p50 / p99 ms |
| --- | --- | --- | --- | --- | --- | --- |
{row("baseline before: UDP echo, no gateway", f"{before['calls']} flows", before)}
{row("device -> gateway -> echo -> gateway -> device", f"{summary['succeeded']}/{summary['calls']}", gw)}
{row("baseline after: UDP echo, no gateway", f"{after['calls']} flows", after)}

- **Added latency** (device round trip - mean of the two baselines; two relay passes and QUIC
  both ways): p50 {ms(gw['rtt_us_p50'] - base50)} ms, p99 {ms(gw['rtt_us_p99'] - base99)} ms.
- **Relay latency measured by the gateway** (a packet's arrival at the relay to its send,
  every packet of every call, `thalamus_media_relay_latency_seconds`), in microseconds:

  | direction | p50 us | p99 us | max us |
  | --- | --- | --- | --- |
  | device -> peer | {us(lat[('to_peer', '0.5')])} | {us(lat[('to_peer', '0.99')])} | {us(lat[('to_peer', '1')])} |
  | peer -> device | {us(lat[('to_device', '0.5')])} | {us(lat[('to_device', '0.99')])} | {us(lat[('to_device', '1')])} |

  Packets relayed over the whole run: {relayed:,.0f}.
- **Gateway CPU per 1,000 packets relayed**: {cpu_per_k_ms:.1f} ms ({cpu_s:.2f} s of CPU in a
  {window:.1f} s window with all {n} calls streaming, {packets:,.0f} packets both directions,
  i.e. {100 * cpu_s / window:.0f}% of one core). The simulator used {sim_cpu_s:.2f} s in the same window.
- **Frames lost**: {gw['frames_sent'] - gw['payload_matches']:,} of {gw['frames_sent']:,}; UDP datagrams the kernel dropped on the
  gateway's QUIC socket during the calls (receive buffer full): {quic_drops:,}.
"""
print(section)
if write:
    path = "docs/benchmarks.md"
    text = open(path).read()
    start = text.find("\n## Media relay")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    open(path, "w").write(text.rstrip("\n") + "\n\n" + section)
    print(f"written to {path}", file=sys.stderr)
PY
