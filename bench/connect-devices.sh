#!/usr/bin/env bash
# Benchmark: connect N simulated devices (default 1,000) to one gateway on loopback, each its
# own QUIC connection and credential; report handshakes per second and gateway RSS per idle
# connected device. Baseline in the same run: the gateway's RSS before any device connects.
#
#   bench/connect-devices.sh [N]
#
# Two passes: "first login" (each device's argon2id hash is checked once: the real cost of a
# cold start) and "reconnect" (the same devices again: the gateway remembers verified secrets).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
cargo build --release --quiet --bin thalamus --bin thalamus-sim
BIN=target/release
WORK=$(mktemp -d)
trap 'kill $GW_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
cat > "$WORK/thalamus.toml" <<TOML
[node]
data_dir = "$WORK/data"
[quic]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
TOML
SECRET=$($BIN/thalamus --config "$WORK/thalamus.toml" device add-bulk --prefix load- --count "$N" 2>/dev/null)
$BIN/thalamus --config "$WORK/thalamus.toml" run --ready-file "$WORK/ready.json" >/dev/null 2>"$WORK/gw.log" &
GW_PID=$!
for _ in $(seq 100); do [ -s "$WORK/ready.json" ] && break; sleep 0.1; done
QUIC=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['quic'])" "$WORK/ready.json")
FP=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['fingerprint'])" "$WORK/ready.json")
rss_kib() { awk '/^VmRSS/ {print $2}' /proc/$GW_PID/status; }
cpu_ticks() { awk '{print $14+$15}' /proc/$GW_PID/stat; }
# Warm-up: two logins allocate the credential checkers' argon2 working memory (one set per
# core, reused afterwards), so the baseline below holds everything but the devices themselves.
$BIN/thalamus-sim swarm --gateway "$QUIC" --fingerprint "$FP" --prefix load- --devices 2 \
    --secret "$SECRET" --concurrency 2 --hold-secs 0 >/dev/null 2>&1
sleep 1
RSS0=$(rss_kib)

pass() {
  local name=$1
  rm -f "$WORK/up"
  local t0; t0=$(cpu_ticks)
  $BIN/thalamus-sim swarm --gateway "$QUIC" --fingerprint "$FP" --prefix load- --devices "$N" \
      --secret "$SECRET" --concurrency 64 --hold-secs 4 --ready-file "$WORK/up" > "$WORK/$name.json" 2>/dev/null &
  local sim=$!
  for _ in $(seq 1200); do [ -f "$WORK/up" ] && break; sleep 0.1; done
  sleep 2
  local rss; rss=$(rss_kib)
  local t1; t1=$(cpu_ticks)
  wait $sim
  local hz; hz=$(getconf CLK_TCK)
  python3 - "$WORK/$name.json" "$name" "$RSS0" "$rss" "$N" "$t0" "$t1" "$hz" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); name = sys.argv[2]
rss0, rss, n = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cpu = (int(sys.argv[7]) - int(sys.argv[6])) / int(sys.argv[8])
print(f"| {name} | {r['connected']}/{r['attempted']} | {r['handshakes_per_sec']:.0f} | "
      f"{r['latency_ms_p50']:.1f} / {r['latency_ms_p99']:.1f} | {cpu*1e6/max(r['connected'],1):.0f} | "
      f"{rss0/1024:.1f} MiB -> {rss/1024:.1f} MiB | {(rss-rss0)/max(r['connected'],1):.1f} KiB |")
PY
}
echo "| pass | devices up | handshakes/s | handshake p50 / p99 ms | gateway CPU us per login | gateway RSS idle -> with devices | RSS per idle device |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
pass first-login
pass reconnect
