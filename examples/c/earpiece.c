/*
 * A whole device in C on the Thalamus device SDK's C ABI (device-ffi, header
 * device-ffi/include/thalamus_device.h): log in, call a SIP address, send 20 ms PCMU frames
 * read from a file, count the frames that come back (an echoing peer sends them all back),
 * hang up.
 *
 *   cc -I device-ffi/include examples/c/earpiece.c target/debug/libthalamus_device_ffi.a \
 *      -lpthread -ldl -lm -o earpiece
 *   ./earpiece 127.0.0.1:4433 <fingerprint> earpiece-1 <secret> sip:echo@127.0.0.1:5070 audio.pcmu
 *
 * Exits 0 when the call was answered and audio came back, 1 otherwise.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "thalamus_device.h"

static void fail(const char *what) {
    char message[256];
    thalamus_last_error(message, sizeof message);
    fprintf(stderr, "%s: %s\n", what, message);
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Waits for call `call` to reach `state` (ThalamusEvent.call_state); 0 when it did. */
static int wait_state(ThalamusDevice *d, uint32_t call, int32_t state) {
    for (int i = 0; i < 100; i++) {
        ThalamusEvent ev;
        int got = thalamus_device_next_event(d, &ev, 200);
        if (got < 0) {
            fail("event");
            return -1;
        }
        if (got == 0 || ev.kind != THALAMUS_EVENT_KIND_CALL_STATE || ev.call_ref != call) {
            continue;
        }
        if (ev.call_state == state) {
            return 0;
        }
        if (ev.call_state == 7 /* ended */) {
            fprintf(stderr, "the call ended (SIP %u)\n", ev.sip_status);
            return -1;
        }
    }
    fprintf(stderr, "the call never reached state %d\n", state);
    return -1;
}

static int drain_audio(ThalamusDevice *d, uint32_t call, int wait_ms) {
    uint8_t buf[1500];
    uint32_t from = 0;
    int n = 0;
    while (thalamus_device_recv_audio(d, &from, buf, sizeof buf, wait_ms) > 0) {
        if (from == call) {
            n++;
        }
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s <gateway> <fingerprint> <device> <secret> <sip uri> <pcmu file>\n",
                argv[0]);
        return 1;
    }
    FILE *audio = fopen(argv[6], "rb");
    if (!audio) {
        perror(argv[6]);
        return 1;
    }
    ThalamusDevice *d = thalamus_device_connect(argv[1], argv[2], argv[3], argv[4], 10000);
    if (!d) {
        fail("connect");
        return 1;
    }
    printf("live\n");
    uint32_t call = 0;
    if (thalamus_device_dial(d, argv[5], &call) != 0) {
        fail("dial");
        thalamus_device_close(d);
        return 1;
    }
    if (wait_state(d, call, 4 /* answered */) != 0) {
        thalamus_device_close(d);
        return 1;
    }
    printf("answered\n");
    uint8_t frame[160];
    int sent = 0, back = 0;
    while (fread(frame, 1, sizeof frame, audio) == sizeof frame) {
        if (thalamus_device_send_audio(d, call, frame, sizeof frame) != 0) {
            fail("send");
            break;
        }
        sent++;
        back += drain_audio(d, call, 0);
        sleep_ms(20);
    }
    fclose(audio);
    back += drain_audio(d, call, 300);
    printf("sent %d frames, %d came back\n", sent, back);
    thalamus_device_dtmf(d, call, '5');
    thalamus_device_hangup(d, call);
    wait_state(d, call, 7 /* ended */);
    thalamus_device_close(d);
    return (sent > 0 && back > 0) ? 0 : 1;
}
