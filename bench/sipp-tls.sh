#!/usr/bin/env bash
# Benchmark: SIPp signalling load over TLS (`-t l1`) against the same load over UDP, in one run.
# SIPp's uac (bench/sipp/uac_devices.xml) calls DEVICES simulated devices (default 500) through
# one gateway at RATE calls/s (default 100) for SECS seconds (default 20), each call held
# HOLD_MS (default 1000); the devices (`thalamus-sim load --incoming`) answer at once. Four
# passes on the same gateway (PASSES picks some of `udp tls tls-ln udp2`): UDP, TLS (SIPp's OpenSSL client against the gateway's rustls
# listener, one connection for the whole pass, `-t l1`), TLS with a connection and so a
# handshake per call (`-t ln`), UDP again (the spread of the two UDP passes is the noise).
# Each pass: SIPp's counts, INVITE to 200 p50 / p99, gateway CPU per call, and the TLS
# handshakes the gateway completed (`sip_tcp_events_total{event="tls_established"}`).
# SIPp opens a connection per call in `-t ln`, all from 127.0.0.1, so the gateway's
# per-address TCP limit (`[sip.limits] max_tcp_connections_per_ip`, 256 by default) is raised.
#
#   SIPP_TLS=/path/to/sipp bench/sipp-tls.sh      (DEVICES, RATE, SECS, HOLD_MS from the env)
#
# Debian's SIPp (package sip-tester) is built without TLS ("To use a TLS transport you must
# compile SIPp with OpenSSL"), so SIPP_TLS names a SIPp built with `cmake -DUSE_SSL=1` (SIPp's
# own sources; not part of this repository). The UDP passes use the same binary.
# The CI test of the same path (SIPp through stunnel's TLS) is tests/tests/sip_tls_load.rs.
source "$(dirname "$0")/lib.sh"
DEVICES=${DEVICES:-500}
RATE=${RATE:-100}
SECS=${SECS:-20}
HOLD_MS=${HOLD_MS:-1000}
SIPP=${SIPP_TLS:-sipp}
SIPP_VERSION=$("$SIPP" -v 2>&1 || true)
grep -q -- "-TLS" <<<"$SIPP_VERSION" || {
  echo "$SIPP has no TLS: set SIPP_TLS to a SIPp built with -DUSE_SSL=1" >&2
  exit 1
}
SCENARIO=$PWD/bench/sipp/uac_devices.xml
build
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$WORK/gw.key" -out "$WORK/gw.crt" 2>/dev/null
free_tcp_port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
TLS_PORT=$(free_tcp_port)
start_gateway gw "[sip.tls]
listen = \"127.0.0.1:$TLS_PORT\"
certificate = \"$WORK/gw.crt\"
private_key = \"$WORK/gw.key\"
[session]
max_calls = 64
[sip.limits]
max_tcp_connections_per_ip = 8192"
SECRET=$("$BIN/thalamus-sim" provision --devices "$DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
USERS=$WORK/devices.csv
{ echo SEQUENTIAL; for ((n = 0; n < DEVICES; n++)); do echo "load-$n;"; done; } > "$USERS"
LOAD=("$BIN/thalamus-sim" load --quiet --incoming --gateway "$QUIC" --fingerprint "$FP"
      --secret "$SECRET" --devices "$DEVICES")
"${LOAD[@]}" --duration 0 >/dev/null 2>&1 || true
echo "devices=$DEVICES rate=$RATE/s secs=$SECS hold=${HOLD_MS}ms sipp=$(grep -o 'SIPp v[^ ]*' <<<"$SIPP_VERSION") load=$(cut -d' ' -f1-3 /proc/loadavg)"

pass() { # name transport target
  local name=$1 transport=$2 target=$3 calls=$((RATE * SECS))
  local dir=$WORK/$name st=$WORK/$name.status json=$WORK/$name.json
  mkdir -p "$dir"
  # SIPp loads cacert.pem and cakey.pem from its directory for TLS, client side included.
  cp "$WORK/gw.crt" "$dir/cacert.pem"; cp "$WORK/gw.key" "$dir/cakey.pem"
  "${LOAD[@]}" --expect-calls "$calls" --duration $((SECS + 90)) --status-file "$st" --json "$json" >/dev/null 2>&1 &
  local sim=$!
  wait_phase "$st" calling
  local t0 t1
  t0=$(cpu_ticks "$GW_PID")
  local port
  if [ "$transport" = u1 ]; then port=$(free_port); else port=$(free_tcp_port); fi
  (cd "$dir" && "$SIPP" -sf "$SCENARIO" -inf "$USERS" -i 127.0.0.1 -p "$port" -nostdin -t "$transport" -max_socket 10000 \
      -r "$RATE" -m "$calls" -l $((RATE * (HOLD_MS / 1000 + 2) * 2)) -d "$HOLD_MS" \
      -trace_rtt -rtt_freq 1 -timeout $((SECS + 60))s -timeout_error "$target" >"$dir/out.txt" 2>&1) || true
  for _ in $(seq 100); do grep -q '"drained"\|"done"' "$st" && break; sleep 0.1; done
  grep -q '"drained"\|"done"' "$st" || kill -TERM "$sim" 2>/dev/null || true
  wait_phase "$st" drained
  t1=$(cpu_ticks "$GW_PID")
  wait "$sim" || true
  local ok failed cps
  read -r ok failed cps < <(sipp_counts "$dir/out.txt")
  local handshakes
  handshakes=$(tls_events established)
  python3 -c "import sys;t=int(sys.argv[1]);hz=int(sys.argv[2]);n=int(sys.argv[3]);print('%-6s sipp -t %s: calls=%d ok=%s failed=%s invite_to_200_ms_p50/p99=%s cpu_per_call_us=%.0f tls_handshakes=%d' % (sys.argv[4], sys.argv[5], n, sys.argv[6], sys.argv[7], sys.argv[8], t*1e6/hz/max(n,1), float(sys.argv[9]) - float(sys.argv[10])))" \
      "$((t1 - t0))" "$HZ" "$calls" "$name" "$transport" "$ok" "$failed" "$(sipp_rtt_ms "$dir")" "$handshakes" "$HANDSHAKES"
  HANDSHAKES=$handshakes
}
ADMIN=$(json_get "$GW_DIR/ready.json" "['admin']")
tls_events() { # the gateway's count of TLS handshakes that ended so ($1: established, handshake_failed)
  python3 - "$ADMIN" "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
want = 'thalamus_sip_tcp_events_total{event="tls_' + sys.argv[2] + '"}'
print(next((l.split()[-1] for l in text.splitlines() if l.startswith(want)), "0"))
PY
}
HANDSHAKES=$(tls_events established)
for name in ${PASSES:-udp tls tls-ln udp2}; do
  case $name in
    udp*) pass "$name" u1 "$SIP" ;;
    tls) pass tls l1 "127.0.0.1:$TLS_PORT" ;;
    tls-ln) pass tls-ln ln "127.0.0.1:$TLS_PORT" ;;
  esac
done
echo "gateway TLS handshakes failed: $(tls_events handshake_failed)"
