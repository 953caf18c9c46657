// MBFP v1 for the browser (docs/protocol.md): control frames (a 4-byte big-endian length, then
// a protobuf Envelope) and the 13-byte media datagram header (section 7), for the messages the
// device page uses. The protobuf wire format is written by hand here (varints and
// length-delimited fields): no dependency and no build step. Unknown fields and unknown bodies
// are skipped, as protobuf requires; 64-bit fields are read as JavaScript numbers. A malformed
// frame is an error the caller handles (it ends the session).
// What it does not do: not every MBFP message (video, presence, transfers), no groups (wire
// types 3 and 4 are errors), no session logic (device.js).

// Message schemas: field number -> [name, kind], kind one of "uint", "bool", "string",
// "bytes", "uints" (a repeated enum), or the name of another schema.
const SCHEMAS = {
  Envelope: {
    1: ["request_id", "uint"],
    10: ["hello", "Hello"], 11: ["welcome", "Welcome"], 13: ["goodbye", "Goodbye"],
    14: ["ping", "Ping"], 15: ["pong", "Ping"], 16: ["error", "Error"],
    20: ["dial", "Dial"], 21: ["call_event", "CallEvent"], 22: ["incoming_call", "IncomingCall"],
    23: ["answer", "Answer"], 24: ["reject", "Reject"], 25: ["hangup", "CallRef"],
    26: ["hold", "CallRef"], 27: ["resume", "CallRef"], 28: ["dtmf", "Dtmf"],
    30: ["send_text", "SendText"], 31: ["text_received", "TextReceived"],
    32: ["text_status", "TextStatus"],
  },
  Hello: { 1: ["device_id", "string"], 2: ["credential", "string"],
           3: ["capabilities", "Capabilities"], 4: ["software_version", "string"] },
  Capabilities: { 1: ["audio_codecs", "uints"], 4: ["text", "bool"] },
  Welcome: { 1: ["session_id", "string"], 3: ["address_of_record", "string"],
             4: ["limits", "Limits"], 5: ["keepalive_interval_ms", "uint"],
             6: ["idle_timeout_ms", "uint"], 9: ["node_id", "string"] },
  Limits: { 1: ["max_frame_bytes", "uint"], 2: ["max_calls", "uint"],
            3: ["max_datagram_bytes", "uint"], 4: ["max_text_bytes", "uint"] },
  Goodbye: { 1: ["reason", "uint"], 2: ["message", "string"] },
  Ping: { 1: ["nonce", "uint"] },
  Error: { 1: ["code", "uint"], 2: ["message", "string"], 3: ["request_id", "uint"] },
  MediaOffer: { 1: ["audio_codecs", "uints"] },
  Dial: { 1: ["call_ref", "uint"], 2: ["target", "string"], 3: ["media", "MediaOffer"] },
  CallEvent: { 1: ["call_ref", "uint"], 2: ["state", "uint"], 3: ["sip_status", "uint"],
               4: ["reason", "string"], 5: ["end_reason", "uint"], 6: ["media", "MediaOffer"],
               7: ["stats", "MediaStats"] },
  MediaStats: { 1: ["packets_sent", "uint"], 2: ["packets_received", "uint"],
                5: ["packets_lost", "uint"], 6: ["jitter_us", "uint"],
                9: ["round_trip_us", "uint"] },
  IncomingCall: { 1: ["call_ref", "uint"], 2: ["from_uri", "string"],
                  3: ["display_name", "string"], 5: ["media", "MediaOffer"] },
  Answer: { 1: ["call_ref", "uint"], 2: ["media", "MediaOffer"] },
  Reject: { 1: ["call_ref", "uint"], 2: ["sip_status", "uint"] },
  CallRef: { 1: ["call_ref", "uint"] },
  Dtmf: { 1: ["call_ref", "uint"], 2: ["digit", "string"], 3: ["duration_ms", "uint"] },
  SendText: { 1: ["to", "string"], 2: ["content_type", "string"], 3: ["body", "bytes"] },
  TextReceived: { 1: ["from_uri", "string"], 2: ["display_name", "string"],
                  3: ["content_type", "string"], 4: ["body", "bytes"] },
  TextStatus: { 1: ["sip_status", "uint"], 2: ["reason", "string"], 3: ["delivered", "bool"] },
};

export const CALL_STATES = ["unspecified", "trying", "ringing", "early_media", "answered",
                            "held", "resumed", "ended"];
export const AUDIO_PCMU = 1;
export const AUDIO_PCMA = 2;

function pushVarint(out, value) {
  let v = BigInt(value);
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) byte |= 0x80;
    out.push(byte);
  } while (v > 0n);
}

function encodeMessage(schemaName, msg) {
  const schema = SCHEMAS[schemaName];
  const out = [];
  for (const [number, [name, kind]] of Object.entries(schema)) {
    const value = msg[name];
    if (value === undefined || value === null) continue;
    const field = Number(number);
    if (kind === "uint" || kind === "bool") {
      const n = kind === "bool" ? (value ? 1 : 0) : value;
      if (n === 0) continue;
      pushVarint(out, field << 3);
      pushVarint(out, n);
    } else if (kind === "uints") {
      if (value.length === 0) continue;
      const packed = [];
      for (const v of value) pushVarint(packed, v);
      pushVarint(out, (field << 3) | 2);
      pushVarint(out, packed.length);
      for (const b of packed) out.push(b);
    } else {
      let bytes;
      if (kind === "string") {
        if (value === "") continue;
        bytes = new TextEncoder().encode(value);
      } else if (kind === "bytes") {
        bytes = value;
      } else {
        bytes = encodeMessage(kind, value);
      }
      pushVarint(out, (field << 3) | 2);
      pushVarint(out, bytes.length);
      for (const b of bytes) out.push(b);
    }
  }
  return Uint8Array.from(out);
}

function readVarint(buf, at) {
  let result = 0n, shift = 0n;
  for (;;) {
    if (at.i >= buf.length || shift > 63n) throw new Error("bad varint");
    if (shift === 63n && buf[at.i] > 1) throw new Error("varint beyond 64 bits");
    const byte = buf[at.i++];
    result |= BigInt(byte & 0x7f) << shift;
    if ((byte & 0x80) === 0) return result;
    shift += 7n;
  }
}

function decodeMessage(schemaName, buf) {
  const schema = SCHEMAS[schemaName] || {};
  const msg = {};
  const at = { i: 0 };
  while (at.i < buf.length) {
    const key = readVarint(buf, at);
    if (key > 0xffffffffn) throw new Error("field number out of range");
    const field = Number(key >> 3n), wire = Number(key & 7n);
    let [name, kind] = schema[field] || [null, null];
    const scalar = kind === "uint" || kind === "bool";
    // A field whose wire type does not fit its schema is skipped, like an unknown one.
    if (name !== null && !(wire === 0 ? scalar || kind === "uints" : wire === 2 && !scalar)) {
      name = null;
    }
    if (wire === 0) {
      const v = readVarint(buf, at);
      if (name === null) continue;
      if (kind === "bool") msg[name] = v !== 0n;
      else if (kind === "uints") (msg[name] ||= []).push(Number(v));
      else msg[name] = Number(v);
    } else if (wire === 2) {
      const len = Number(readVarint(buf, at));
      if (at.i + len > buf.length) throw new Error("truncated field");
      const bytes = buf.subarray(at.i, at.i + len);
      at.i += len;
      if (name === null) continue;
      if (kind === "string") msg[name] = new TextDecoder().decode(bytes);
      else if (kind === "bytes") msg[name] = bytes.slice();
      else if (kind === "uints") {
        const inner = { i: 0 };
        msg[name] = msg[name] || [];
        while (inner.i < bytes.length) msg[name].push(Number(readVarint(bytes, inner)));
      } else msg[name] = decodeMessage(kind, bytes);
    } else if (wire === 1 || wire === 5) {
      at.i += wire === 1 ? 8 : 4;
      if (at.i > buf.length) throw new Error("truncated field");
    } else {
      throw new Error("unsupported wire type " + wire);
    }
  }
  return msg;
}

/// One control frame: `envelope` is `{request_id, <body name>: {...}}`.
export function encodeFrame(envelope) {
  const body = encodeMessage("Envelope", envelope);
  const frame = new Uint8Array(4 + body.length);
  new DataView(frame.buffer).setUint32(0, body.length);
  frame.set(body, 4);
  return frame;
}

/// Reads control frames out of the bytes of the control stream as they arrive.
export class FrameReader {
  constructor(maxFrameBytes = 65536) {
    this.buf = new Uint8Array(0);
    this.max = maxFrameBytes;
  }
  /// Adds received bytes; returns the envelopes now complete.
  push(chunk) {
    const joined = new Uint8Array(this.buf.length + chunk.length);
    joined.set(this.buf);
    joined.set(chunk, this.buf.length);
    this.buf = joined;
    const frames = [];
    for (;;) {
      if (this.buf.length < 4) break;
      const len = new DataView(this.buf.buffer, this.buf.byteOffset).getUint32(0);
      if (len > this.max) throw new Error("frame too large");
      if (this.buf.length < 4 + len) break;
      frames.push(decodeMessage("Envelope", this.buf.subarray(4, 4 + len)));
      this.buf = this.buf.slice(4 + len);
    }
    return frames;
  }
}

/// A media datagram: the 13-byte header (version 1) and the payload.
export function encodeMedia({ marker, payloadType, sequence, timestamp, callRef, streamId = 0 },
                            payload) {
  const d = new Uint8Array(13 + payload.length);
  const v = new DataView(d.buffer);
  d[0] = 0x40 | (marker ? 0x20 : 0);
  d[1] = payloadType & 0x7f;
  v.setUint16(2, sequence & 0xffff);
  v.setUint32(4, timestamp >>> 0);
  v.setUint32(8, callRef >>> 0);
  d[12] = streamId;
  d.set(payload, 13);
  return d;
}

/// The header of a media datagram, or null when it is not one.
export function decodeMedia(d) {
  if (d.length < 13 || (d[0] >> 6) !== 1) return null;
  const v = new DataView(d.buffer, d.byteOffset, d.length);
  return {
    marker: (d[0] & 0x20) !== 0, payloadType: d[1] & 0x7f, sequence: v.getUint16(2),
    timestamp: v.getUint32(4), callRef: v.getUint32(8), streamId: d[12],
    payload: d.subarray(13),
  };
}

// G.711 mu-law (ITU-T G.711), 16-bit linear samples.
export function muLawEncode(sample) {
  const BIAS = 0x84, CLIP = 32635;
  let sign = (sample >> 8) & 0x80;
  if (sign) sample = -sample;
  if (sample > CLIP) sample = CLIP;
  sample += BIAS;
  let exponent = 7;
  for (let mask = 0x4000; (sample & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
  const mantissa = (sample >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

export function muLawDecode(byte) {
  byte = ~byte & 0xff;
  const sign = byte & 0x80, exponent = (byte >> 4) & 0x07, mantissa = byte & 0x0f;
  let sample = ((mantissa << 3) + 0x84) << exponent;
  sample -= 0x84;
  return sign ? -sample : sample;
}
