#!/usr/bin/env bash
# The whole load benchmark: device-originated calls, SIP-originated calls, memory per idle
# device and per dialog, replication on against off; then the goals table. Each script rewrites
# its own table in docs/benchmarks.md ("Load" section); everything runs on loopback and is
# bounded (about 15 minutes on the 2-core CI machine).
#
#   bench/load.sh
#
# Settings of the single scripts pass through the environment (RATES, SECS, DEVICES, ...).
source "$(dirname "$0")/lib.sh"
build
export SKIP_BUILD=1
export FIGURES=$WORK/figures.json
bench/load-device-calls.sh
bench/load-sip-calls.sh
bench/load-memory.sh
bench/load-replication.sh

TABLE=$WORK/goals.md
python3 - "$FIGURES" > "$TABLE" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
calls = f.get("device_calls", {})
top = max(calls.values(), key=lambda r: r["cps"], default=None)
mem = f.get("memory", {})
idle = next((v for k, v in mem.items() if k.startswith("idle")), None)
dialog = next((v for k, v in mem.items() if k.startswith("confirmed dialogs (")), None)
def row(goal, target, got, ok):
    status = "n/a" if got is None else ("met" if ok else "not met")
    print(f"| {goal} | {target} | {'-' if got is None else got} | {status} |")
print("| goal | target | measured (this run) | |")
print("| --- | --- | --- | --- |")
row(f"device call set-up p99 at {top['cps']:.0f} calls/s, 2 cores" if top else "device call set-up p99",
    "< 5 ms at 500 calls/s", f"{top['p99_ms']:.2f} ms" if top else None, bool(top) and top["p99_ms"] < 5 and top["cps"] >= 500)
row("gateway CPU per device-originated call", "< 150 us",
    f"{top['cpu_us_per_call']:.0f} us" if top else None, bool(top) and top["cpu_us_per_call"] < 150)
row("RSS per idle connected device", "< 32 KiB", f"{idle:.1f} KiB" if idle is not None else None, idle is not None and idle < 32)
row("RSS per confirmed dialog", "< 4 KiB", f"{dialog:.1f} KiB" if dialog is not None else None, dialog is not None and dialog < 4)
PY
cat "$TABLE"
doc_table goals "Goals" "$TABLE"
