// The device page: the browser is an MBFP device (docs/protocol.md) over WebTransport. It logs
// in with a device id and secret, calls a SIP address or answers a call, holds, resumes, hangs
// up, sends DTMF and texts, and streams the microphone as G.711 mu-law in 20 ms datagrams,
// playing back what comes in. `window.thalamus` holds its state and counters (the tests read
// them). What it does not do: no video, no reconnect or resume after a lost session.
import { AUDIO_PCMU, CALL_STATES, FrameReader, decodeMedia, encodeFrame, encodeMedia,
         muLawDecode, muLawEncode } from "/mbfp.js";

const $ = (id) => document.getElementById(id);
const state = window.thalamus = {
  session: "offline", aor: null, call: null, framesSent: 0, framesReceived: 0,
  events: [], texts: [], errors: [],
};
let wt = null, writer = null, datagrams = null, nextRequest = 1, nextCallRef = 1;
let keepalive = null, audio = null;

function log(text) {
  state.events.push(text);
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").prepend(li);
}

function render() {
  $("status").textContent = state.session;
  $("status").className = "pill" + (state.session === "live" ? " live" : "");
  $("aor").textContent = state.aor || "";
  const live = state.session === "live", call = state.call;
  $("login").disabled = state.session !== "offline";
  $("logout").disabled = !live;
  $("dial").disabled = !live || !!call;
  $("send-text").disabled = !live;
  $("answer").disabled = !(call && call.incoming && call.state === "ringing");
  $("hangup").disabled = !call;
  $("hold").disabled = !(call && (call.state === "answered" || call.state === "resumed"));
  $("resume").disabled = !(call && call.state === "held");
  $("call-state").textContent = call ? `${call.state} (${call.peer})` : "none";
  $("frames-sent").textContent = state.framesSent;
  $("frames-received").textContent = state.framesReceived;
}

async function send(body) {
  const request_id = nextRequest++;
  await writer.write(encodeFrame({ request_id, ...body }));
  return request_id;
}

async function login() {
  state.session = "connecting";
  render();
  try {
    const config = await (await fetch("/webtransport.json")).json();
    const hashes = config.certificate_hashes.map((hex) => ({
      algorithm: "sha-256",
      value: new Uint8Array(hex.match(/../g).map((b) => parseInt(b, 16))),
    }));
    wt = new WebTransport(config.url, { serverCertificateHashes: hashes });
    await wt.ready;
    wt.closed.then(() => ended("closed"), (e) => ended(String(e)));
    const stream = await wt.createBidirectionalStream();
    writer = stream.writable.getWriter();
    datagrams = wt.datagrams.writable.getWriter();
    readFrames(stream.readable.getReader());
    readDatagrams(wt.datagrams.readable.getReader());
    await send({ hello: {
      device_id: $("device").value, credential: $("secret").value,
      capabilities: { audio_codecs: [AUDIO_PCMU], text: true },
      software_version: "thalamus-device-page",
    } });
  } catch (e) {
    state.errors.push(String(e));
    log(`login failed: ${e}`);
    ended("failed");
  }
}

function ended(why) {
  if (state.session === "offline") return;
  state.session = "offline";
  state.call = null;
  stopAudio();
  clearInterval(keepalive);
  log(`session ended: ${why}`);
  render();
}

async function readFrames(reader) {
  const frames = new FrameReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      for (const env of frames.push(value)) {
        if (env.welcome && env.welcome.limits && env.welcome.limits.max_frame_bytes) {
          frames.max = env.welcome.limits.max_frame_bytes;
        }
        handle(env);
      }
    }
  } catch (e) {
    // A frame the page cannot read: the session cannot go on (protocol.md section 4.4).
    state.errors.push(String(e));
    log(`bad frame from the node: ${e}`);
    if (wt) wt.close({ closeCode: 1, reason: "bad frame" });
    ended("bad frame");
  }
}

function handle(env) {
  if (env.welcome) {
    state.session = "live";
    state.aor = env.welcome.address_of_record;
    log(`welcome from ${env.welcome.node_id}: ${state.aor}`);
    const every = Math.max(1000, (env.welcome.keepalive_interval_ms || 10000) / 2);
    keepalive = setInterval(() => send({ ping: { nonce: Date.now() } }).catch(() => {}), every);
  } else if (env.error) {
    state.errors.push(env.error.message);
    log(`error ${env.error.code}: ${env.error.message}`);
    // A Dial the node refused leaves no call.
    if (state.call && state.call.request === env.error.request_id) state.call = null;
  } else if (env.goodbye) {
    log(`goodbye: ${env.goodbye.message || env.goodbye.reason}`);
  } else if (env.incoming_call) {
    const c = env.incoming_call;
    if (state.call) {
      // One call at a time on this page: busy.
      send({ reject: { call_ref: c.call_ref, sip_status: 486 } }).catch(() => {});
      log(`busy: refused a call from ${c.from_uri}`);
      return;
    }
    state.call = { ref: c.call_ref, peer: c.from_uri, state: "ringing", incoming: true };
    log(`incoming call from ${c.from_uri}`);
  } else if (env.call_event) {
    const e = env.call_event;
    if (!state.call || state.call.ref !== e.call_ref) return;
    const name = CALL_STATES[e.state] || String(e.state);
    if (e.reason === "media statistics") {
      log(`media statistics: ${JSON.stringify(e.stats || {})}`);
      return;
    }
    log(`call ${name}${e.sip_status ? " " + e.sip_status : ""}${e.reason ? " " + e.reason : ""}`);
    if (name === "ended") {
      state.lastCall = { ...state.call, state: "ended" };
      state.call = null;
      stopAudio();
    } else {
      state.call.state = name;
      if (name === "answered" || name === "early_media") startAudio();
    }
  } else if (env.text_received) {
    const t = env.text_received;
    const text = new TextDecoder().decode(t.body || new Uint8Array());
    state.texts.push({ from: t.from_uri, text });
    log(`text from ${t.from_uri}: ${text}`);
  } else if (env.text_status) {
    log(`text ${env.text_status.delivered ? "delivered" : "not delivered"} (${env.text_status.sip_status})`);
  }
  render();
}

async function readDatagrams(reader) {
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const media = decodeMedia(value);
    if (!media || !state.call || media.callRef !== state.call.ref || media.streamId !== 0) continue;
    // Audio frames (PCMU); the peer's telephone-events come as `Dtmf` frames too.
    if (media.payloadType !== 0) continue;
    state.framesReceived++;
    play(media.payload);
  }
}

// Audio: the microphone (or, without one, a 440 Hz tone) at 8 kHz, 160 samples a frame.
async function startAudio() {
  if (audio) return;
  const ctx = new AudioContext({ sampleRate: 8000 });
  audio = { ctx, pending: [], sequence: 0, timestamp: 0, playAt: 0 };
  let source;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    source = ctx.createMediaStreamSource(stream);
    audio.stream = stream;
  } catch (e) {
    log(`no microphone (${e.name}): sending a tone`);
    source = ctx.createOscillator();
    source.frequency.value = 440;
    source.start();
  }
  const processor = ctx.createScriptProcessor(1024, 1, 1);
  processor.onaudioprocess = (ev) => {
    if (!audio || !state.call) return;
    const input = ev.inputBuffer.getChannelData(0);
    for (const s of input) audio.pending.push(s);
    while (audio.pending.length >= 160) {
      const frame = audio.pending.splice(0, 160);
      const payload = Uint8Array.from(frame, (s) => muLawEncode(Math.round(Math.max(-1, Math.min(1, s)) * 32767)));
      const datagram = encodeMedia({ marker: audio.sequence === 0, payloadType: 0,
        sequence: audio.sequence++, timestamp: audio.timestamp, callRef: state.call.ref }, payload);
      audio.timestamp += 160;
      state.framesSent++;
      datagrams.write(datagram).catch(() => { state.sendFailed = (state.sendFailed || 0) + 1; });
    }
  };
  source.connect(processor);
  processor.connect(ctx.destination);
  audio.source = source;
  audio.processor = processor;
  if (ctx.state === "suspended") await ctx.resume().catch(() => {});
}

function play(payload) {
  if (!audio) return;
  const ctx = audio.ctx;
  const buffer = ctx.createBuffer(1, payload.length, 8000);
  const data = buffer.getChannelData(0);
  for (let i = 0; i < payload.length; i++) data[i] = muLawDecode(payload[i]) / 32768;
  const node = ctx.createBufferSource();
  node.buffer = buffer;
  node.connect(ctx.destination);
  audio.playAt = Math.max(audio.playAt, ctx.currentTime + 0.06);
  node.start(audio.playAt);
  audio.playAt += payload.length / 8000;
}

function stopAudio() {
  if (!audio) return;
  audio.processor.disconnect();
  audio.source.disconnect();
  if (audio.stream) audio.stream.getTracks().forEach((t) => t.stop());
  audio.ctx.close().catch(() => {});
  audio = null;
}

function callRef() {
  return state.call && state.call.ref;
}

$("login").onclick = () => login();
$("logout").onclick = () => { if (wt) wt.close({ closeCode: 0, reason: "log out" }); };
$("dial").onclick = async () => {
  const ref = nextCallRef++;
  const call = { ref, peer: $("target").value, state: "trying", incoming: false };
  state.call = call;
  render();
  call.request = await send({ dial: { call_ref: ref, target: call.peer,
                                      media: { audio_codecs: [AUDIO_PCMU] } } });
};
$("answer").onclick = async () => {
  await send({ answer: { call_ref: callRef(), media: { audio_codecs: [AUDIO_PCMU] } } });
};
$("hangup").onclick = () => send({ hangup: { call_ref: callRef() } });
$("hold").onclick = () => send({ hold: { call_ref: callRef() } });
$("resume").onclick = () => send({ resume: { call_ref: callRef() } });
$("send-text").onclick = async () => {
  const body = new TextEncoder().encode($("text-body").value);
  await send({ send_text: { to: $("text-to").value, content_type: "text/plain", body } });
  log(`text to ${$("text-to").value}: ${$("text-body").value}`);
};
for (const digit of "123456789*0#") {
  const b = document.createElement("button");
  b.textContent = digit;
  b.className = "dtmf";
  b.dataset.digit = digit;
  b.onclick = () => {
    if (!callRef()) return;
    send({ dtmf: { call_ref: callRef(), digit, duration_ms: 160 } });
    log(`dtmf ${digit}`);
  };
  $("keypad").append(b);
}
render();
