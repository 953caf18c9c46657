#!/usr/bin/env bash
# Benchmark: gateway CPU per call with the SIP leg over TLS against UDP, in one run. DEVICES
# simulated devices (default 200) call `thalamus-sim buddy` at RATE calls/s (default 100) for
# SECS seconds (default 20), each call held HOLD_MS (default 1000), three times on a fresh
# gateway each: over UDP, over TLS (`sip:bob@<buddy>;transport=tls`, the buddy's certificate
# checked by the gateway), over UDP again (the spread between the two UDP passes is the noise).
# Every call of a pass goes over one TLS connection (the gateway reuses it), so the figure is
# the cost of encrypting and decrypting the signalling, with one handshake per pass.
#
#   bench/tls.sh            (DEVICES, RATE, SECS, HOLD_MS from the environment)
#
# Prints one line per pass: answered calls, failed calls, gateway CPU per answered call (us).
# Needs openssl (the certificate) and python3.
source "$(dirname "$0")/lib.sh"
DEVICES=${DEVICES:-200}
RATE=${RATE:-100}
SECS=${SECS:-20}
HOLD_MS=${HOLD_MS:-1000}
build
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$WORK/buddy.key" -out "$WORK/buddy.crt" 2>/dev/null
out="$WORK/buddy.out"
"$BIN/thalamus-sim" buddy --listen 127.0.0.1:0 --json --tls-listen 127.0.0.1:0 \
    --tls-certificate "$WORK/buddy.crt" --tls-key "$WORK/buddy.key" >"$out" 2>/dev/null &
PIDS+=("$!")
for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
UDP_TARGET="sip:bob@$(head -1 "$out" | python3 -c "import json,sys;print(json.loads(sys.stdin.readline())['sip'])")"
TLS_TARGET="sip:bob@$(head -1 "$out" | python3 -c "import json,sys;print(json.loads(sys.stdin.readline())['tls'])");transport=tls"
echo "devices=$DEVICES rate=$RATE/s secs=$SECS hold=${HOLD_MS}ms load=$(cut -d' ' -f1-3 /proc/loadavg)"
pass() {
  local name=$1 target=$2
  start_gateway "$name" "[sip.tls]
ca_certificates = \"$WORK/buddy.crt\""
  measure_device_calls "$target"
  local answered failed
  answered=$(json_get "$LOAD_JSON" "['answered']")
  failed=$(json_get "$LOAD_JSON" "['failed']")
  python3 -c "import sys;t=int(sys.argv[1]);hz=int(sys.argv[2]);a=int(sys.argv[3]);print('%-5s answered=%d failed=%s cpu_per_call_us=%.0f' % (sys.argv[4], a, sys.argv[5], t*1e6/hz/max(a,1)))" \
      "$((LOAD_CPU_T1 - LOAD_CPU_T0))" "$HZ" "$answered" "$name" "$failed"
}
pass udp "$UDP_TARGET"
pass tls "$TLS_TARGET"
pass udp2 "$UDP_TARGET"
