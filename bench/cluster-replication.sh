#!/usr/bin/env bash
# Benchmark: what replicating confirmed dialogs to Redis costs on the SIP side. SIP-originated
# calls (SIPp's built-in uac: INVITE, 200, ACK, BYE at once) to one simulated device answering
# them, against two gateways started side by side: one replicating to a local redis-server, one
# with replication off. Calls are held HOLD_MS between ACK and BYE (so the record is written,
# then tombstoned, rather than both coalesced away in one batch). The runs alternate (ROUNDS
# rounds of each) in the same session, so both see the same machine. Reports the calls per
# second SIPp achieved at RATE calls/s with at most LIMIT calls open, the gateway's CPU time per
# call (user + system, from /proc), and the store writes the Redis gateway made.
#
#   bench/cluster-replication.sh   (RATE=400 CALLS=4000 HOLD_MS=1000 LIMIT=800 ROUNDS=2)
#
# Rewrites the "Replication to Redis against off" table of docs/clustering.md.
source "$(dirname "$0")/lib.sh"
RATE=${RATE:-400}
CALLS=${CALLS:-4000}
HOLD_MS=${HOLD_MS:-1000}
LIMIT=${LIMIT:-800}
ROUNDS=${ROUNDS:-2}
build
command -v redis-server >/dev/null || { echo "redis-server is missing (Debian package redis-server)" >&2; exit 1; }
REDIS_PORT=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 &
PIDS+=("$!")
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

declare -A GW_PIDS GW_SIPS GW_ADMINS
start_node() {
  local name=$1 cluster=$2
  start_gateway "$name" $'[session]\nmax_calls = 1000\n'"$cluster"
  local secret
  secret=$("$BIN/thalamus" --config "$GW_CONF" device add callee 2>/dev/null | tail -1)
  "$BIN/thalamus-sim" listen --gateway "$QUIC" --fingerprint "$FP" --device callee --secret "$secret" \
      >/dev/null 2>&1 &
  PIDS+=("$!")
  GW_PIDS[$name]=$GW_PID
  GW_SIPS[$name]=$SIP
  GW_ADMINS[$name]=$(json_get "$GW_DIR/ready.json" "['admin']")
}
start_node off $'[cluster]\nreplication = "off"\n[cluster.store]\nbackend = "memory"'
start_node redis $'[cluster]\nreplication = "confirmed-dialog"\n[cluster.store]\nbackend = "redis"\n[cluster.store.redis]\nurl = "redis://127.0.0.1:'"$REDIS_PORT"$'/0"'
sleep 1

TABLE=$WORK/table.md
cat > "$TABLE" <<EOF
| setting | round | calls ok / failed | calls/s achieved (SIPp at $RATE, held $HOLD_MS ms) | gateway CPU us per call |
| --- | --- | --- | --- | --- |
EOF
for round in $(seq "$ROUNDS"); do
  for name in off redis; do
    out=$WORK/sipp-$name-$round.out
    pid=${GW_PIDS[$name]}
    t0=$(cpu_ticks "$pid")
    w0=$(date +%s.%N)
    sipp -sn uac -s callee -r "$RATE" -m "$CALLS" -l "$LIMIT" -d "$HOLD_MS" -i 127.0.0.1 -p "$(free_port)" \
         -nostdin -timeout 120s -timeout_error -trace_err -error_file "$out.errors" \
         "${GW_SIPS[$name]}" >"$out" 2>&1 || true
    w1=$(date +%s.%N)
    t1=$(cpu_ticks "$pid")
    read -r ok failed rate < <(sipp_counts "$out")
    if [ "${failed%.*}" != 0 ] && [ -s "$out.errors" ]; then
      echo "$name round $round: SIPp errors (first lines):" >&2
      head -c 1500 "$out.errors" >&2
      echo >&2
    fi
    python3 - "$name" "$round" "$ok" "$failed" "$w0" "$w1" "$t0" "$t1" "$HZ" "$rate" >> "$TABLE" <<'PY'
import sys
name, rnd, ok, failed, w0, w1, t0, t1, hz, rate = sys.argv[1:11]
ok, failed = int(float(ok)), int(float(failed))
calls = max(ok + failed, 1)
wall = float(w1) - float(w0)
cpu = (int(t1) - int(t0)) / int(hz)
label = {"off": "replication off", "redis": "confirmed dialogs -> Redis (local)"}[name]
print(f"| {label} | {rnd} | {ok} / {failed} | {float(rate):.0f} ({wall:.1f} s wall) | {cpu * 1e6 / calls:.0f} |")
PY
    sleep 1
  done
done
metric() { curl -s "http://${GW_ADMINS[redis]}/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
{
  echo
  echo "Redis gateway, all rounds: $(metric thalamus_replication_written_total) store writes applied, $(metric thalamus_replication_coalesced_total) coalesced away, $(metric thalamus_replication_batches_total) batches, $(metric thalamus_replication_errors_total) errors, $(metric thalamus_replication_conflicts_total) conflicts."
} >> "$TABLE"
cat "$TABLE"
DOC=docs/clustering.md doc_table cluster-replication "Replication to Redis against off" "$TABLE"
