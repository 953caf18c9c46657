"""A whole device in Python on the Thalamus device SDK (module thalamus_device, device-py/):
log in, call a SIP address, send 20 ms PCMU frames read from a file, count the frames that come
back (an echoing peer sends them all back), hang up.

    maturin develop -m device-py/Cargo.toml      # or: cargo build -p thalamus-device-py and
                                                 # copy libthalamus_device_py.so to thalamus_device.so
    python3 examples/python/earpiece.py 127.0.0.1:4433 <fingerprint> earpiece-1 <secret> \
        sip:echo@127.0.0.1:5070 audio.pcmu

Exits 0 when the call was answered and audio came back, 1 otherwise.
"""
import sys
import time

import thalamus_device

ANSWERED, ENDED = 4, 7


def wait_state(device, call_ref, state):
    """Waits (at most 20 s) for call_ref to reach state; False when it ended first."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        event = device.next_event(200)
        if not event or event["kind"] != "call_state" or event["call_ref"] != call_ref:
            continue
        if event["call_state"] == state:
            return True
        if event["call_state"] == ENDED:
            print(f"the call ended (SIP {event['sip_status']})", file=sys.stderr)
            return False
    print(f"the call never reached state {state}", file=sys.stderr)
    return False


def drain_audio(device, call_ref, wait_ms):
    n = 0
    while True:
        got = device.recv_audio(wait_ms)
        if got is None:
            return n
        if got[0] == call_ref:
            n += 1


def main(gateway, fingerprint, device_id, secret, target, audio_file):
    try:
        device = thalamus_device.Device(gateway, fingerprint, device_id, secret)
    except ConnectionError as e:
        print(f"connect: {e}", file=sys.stderr)
        return 1
    print("live")
    call_ref = device.dial(target)
    if not wait_state(device, call_ref, ANSWERED):
        device.close()
        return 1
    print("answered")
    sent = back = 0
    with open(audio_file, "rb") as audio:
        while True:
            frame = audio.read(160)
            if len(frame) < 160:
                break
            device.send_audio(call_ref, frame)
            sent += 1
            back += drain_audio(device, call_ref, 0)
            time.sleep(0.02)
    back += drain_audio(device, call_ref, 300)
    print(f"sent {sent} frames, {back} came back")
    device.dtmf(call_ref, "5")
    device.hangup(call_ref)
    wait_state(device, call_ref, ENDED)
    device.close()
    return 0 if sent and back else 1


if __name__ == "__main__":
    if len(sys.argv) != 7:
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    sys.exit(main(*sys.argv[1:]))
