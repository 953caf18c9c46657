#!/usr/bin/env bash
# Benchmark: gateway memory per idle connected device and per confirmed dialog.
#
# Idle devices: IDLE_DEVICES (default 10,000) devices log in to a fresh gateway (`thalamus-sim
# load --cps 0`, each its own QUIC connection, answering the gateway's pings) and sit idle;
# RSS per device = (RSS with them connected - RSS before, after a two-device warm-up) / devices.
# The per-IP connection limit is raised in the gateway's config for this (all come from
# 127.0.0.1).
#
# Dialogs: DIALOG_DEVICES devices log in to another fresh gateway and idle (RSS sampled), then
# place CALLS calls to the simulator's buddy that stay answered (held HOLD_MS); RSS is sampled
# again with all of them confirmed. RSS per dialog = difference / answered calls: the gateway's
# whole cost of a live call (SIP dialog, call task, media relay and its sockets, device-side
# state). Baseline in the same run: the buddy's own RSS per dialog (the SIP stack alone as a
# UAS, in another process).
#
#   bench/load-memory.sh       (IDLE_DEVICES=10000 DIALOG_DEVICES=1000 CALLS=2000 HOLD_MS=20000)
#
# Rewrites the "Memory" table of docs/benchmarks.md.
source "$(dirname "$0")/lib.sh"
IDLE_DEVICES=${IDLE_DEVICES:-10000}
DIALOG_DEVICES=${DIALOG_DEVICES:-1000}
CALLS=${CALLS:-2000}
HOLD_MS=${HOLD_MS:-20000}
build
TABLE=$WORK/table.md
cat > "$TABLE" <<EOF
| measure | count | RSS before -> with them | per item | process |
| --- | --- | --- | --- | --- |
EOF
row() { # name count before_kib after_kib process
  python3 - "$@" >> "$TABLE" <<'PY'
import sys
name, count, before, after, proc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
print(f"| {name} | {count:,} | {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB | {(after - before) / max(count, 1):.1f} KiB | {proc} |")
PY
  if [ -n "${FIGURES:-}" ]; then
    python3 - "$FIGURES" "$@" <<'PY'
import json, os, sys
path, name, count, before, after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fig = json.load(open(path)) if os.path.exists(path) else {}
fig.setdefault("memory", {})[name] = (after - before) / max(count, 1)
json.dump(fig, open(path, "w"), indent=1)
PY
  fi
}

# --- idle devices
start_gateway idle
SECRET=$("$BIN/thalamus-sim" provision --devices "$IDLE_DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
LOAD=("$BIN/thalamus-sim" load --quiet --gateway "$QUIC" --fingerprint "$FP" --secret "$SECRET")
# Warm-up: two logins allocate the credential checkers' working memory (one set per core).
"${LOAD[@]}" --devices 2 --cps 0 --duration 0 >/dev/null 2>&1 || true
sleep 1
RSS0=$(rss_kib "$GW_PID")
ST=$WORK/idle.status
"${LOAD[@]}" --devices "$IDLE_DEVICES" --cps 0 --duration 8 --endpoints 8 --status-file "$ST" \
    --json "$WORK/idle.json" >/dev/null 2>"$WORK/idle.err" &
SIM=$!
wait_phase "$ST" calling
sleep 4
RSS1=$(rss_kib "$GW_PID")
wait "$SIM" || true
UP=$(json_get "$WORK/idle.json" "['devices_connected']")
row "idle connected devices (first login, then idle 4 s)" "$UP" "$RSS0" "$RSS1" "gateway"
stop_pid "$GW_PID"

# --- confirmed dialogs
dialogs() { # name gateway-toml with-baseline
  start_gateway "dialogs-$RANDOM" "$2"
  local secret
  secret=$("$BIN/thalamus-sim" provision --devices "$DIALOG_DEVICES" --registry "$GW_DIR/data/devices.toml" 2>/dev/null)
  start_buddy
  local load=("$BIN/thalamus-sim" load --quiet --gateway "$QUIC" --fingerprint "$FP" --secret "$secret"
        --devices "$DIALOG_DEVICES" --target "sip:hold@$BUDDY_SIP")
  # Warm-up: logins and a few short calls, so first-use allocations are not counted per dialog.
  "${load[@]}" --cps 100 --duration 2 --hold-ms 200 >/dev/null 2>&1 || true
  sleep 1
  local st=$GW_DIR/dialogs.status rate=500
  "${load[@]}" --cps "$rate" --duration "$(python3 -c "print($CALLS / $rate)")" --hold-ms "$HOLD_MS" \
      --idle-secs 4 --status-file "$st" --json "$GW_DIR/dialogs.json" >/dev/null 2>"$GW_DIR/dialogs.err" &
  local sim=$!
  wait_phase "$st" connected
  sleep 2
  local gw0 buddy0 gw1 buddy1 live
  gw0=$(rss_kib "$GW_PID"); buddy0=$(rss_kib "$BUDDY_PID")
  wait_phase "$st" calling "$CALLS"
  sleep 1
  gw1=$(rss_kib "$GW_PID"); buddy1=$(rss_kib "$BUDDY_PID")
  live=$(json_get "$st" "['answered']")
  wait "$sim" || true
  row "$1" "$live" "$gw0" "$gw1" "gateway"
  if [ "$3" = yes ]; then
    row "baseline: the same dialogs in the buddy (SIP stack only, UAS)" "$live" "$buddy0" "$buddy1" "buddy"
  fi
  stop_pid "$GW_PID"; stop_pid "$BUDDY_PID"
}
dialogs "confirmed dialogs (device calls held open; default config: replicated to the embedded store)" "" yes
dialogs "confirmed dialogs, replication off" $'[cluster]\nreplication = "off"' no
cat "$TABLE"
doc_table memory "Memory" "$TABLE"
