// The operator console: this node's state, devices and calls, live from the admin endpoint's
// server-sent events (`/console/events`, with the admin token), charts of calls per second,
// failures and set-up time from `/metrics` (sampled every 2 s, kept 5 minutes), and the drain
// action. `window.console_state` holds the last state, `window.console_charts` the series
// drawn (the tests read them).
// The cluster: the balancers' node table (every node's state and load), and for another node
// the dialogs it owns in the store, each with a claim action. What it does not do: list other
// nodes' calls (each node's console lists its own).

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("thalamus-token") || "";
$("token").value = token;
window.console_state = null;

function text(el, value) { el.textContent = value; }

function duration(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function media(streams) {
  if (!streams || !streams.length) return "-";
  return streams.map((m) => {
    const expected = m.packets_received + m.packets_lost;
    const loss = expected ? (100 * m.packets_lost / expected).toFixed(1) : "0.0";
    const rtt = m.round_trip_ms != null ? `${m.round_trip_ms.toFixed(0)} ms` : "-";
    return `${m.stream}: ${loss}% lost, ${m.jitter_ms.toFixed(1)} ms, ${rtt} (${m.packets_received} packets)`;
  }).join("\n");
}

function render(state) {
  window.console_state = state;
  text($("node"), state.node);
  text($("devices-online"), state.devices_online);
  text($("calls-active"), state.calls_active);
  text($("node-state"), state.draining ? "draining" : "serving");
  $("node-state").className = "pill" + (state.draining ? " warn" : "");
  text($("store"), state.store_up ? "up" : "not answering");
  $("store").className = "pill" + (state.store_up ? "" : " warn");
  const calls = $("calls");
  calls.replaceChildren(...state.calls.map((c) => {
    const tr = document.createElement("tr");
    for (const v of [c.device, c.call_ref, c.remote, c.state,
                     c.answered_ms != null ? duration(c.answered_ms) : `(${duration(c.age_ms)})`]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    const td = document.createElement("td");
    td.className = "media";
    td.textContent = media(c.media);
    tr.append(td);
    tr.dataset.device = c.device;
    return tr;
  }));
  text($("devices"), state.devices.length ? state.devices.join(", ") : "none");
  // A table that does not read as expected must not end the live updates.
  try { renderCluster(state); } catch (e) { text($("cluster-note"), `cluster table unreadable (${e})`); }
}

function cells(tr, values) {
  for (const v of values) {
    const td = document.createElement("td");
    td.textContent = v;
    tr.append(td);
  }
}

function button(label, onclick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.onclick = onclick;
  return b;
}

// The balancers' node table (every node, its state and load) when the node knows their admin
// addresses (`[admin] balancers`); else the live set from their heartbeat reports.
function renderCluster(state) {
  const live = state.cluster && state.cluster.live_set;
  const table = state.nodes;
  const rows = [];
  if (table && table.nodes) {
    for (const n of [...table.nodes].sort((a, b) => a.id.localeCompare(b.id))) {
      const tr = document.createElement("tr");
      tr.dataset.node = n.id;
      const status = n.state === "up" ? (n.draining ? "draining" : "up") : n.state;
      cells(tr, [n.id + (n.id === state.node ? " (this node)" : ""), status, n.load.devices,
                 n.load.calls, `${Math.round(100 * n.load.cpu)}%`,
                 `${(n.last_heartbeat_ms / 1000).toFixed(1)} s ago`, n.quic || "-"]);
      const td = document.createElement("td");
      if (n.id !== state.node) td.append(button("Dialogs", () => showDialogs(n.id)));
      tr.append(td);
      if (status !== "up") tr.className = "warn";
      rows.push(tr);
    }
    text($("cluster-note"), `node table from balancer ${table.from}`);
  } else {
    for (const n of live ? live.eligible : []) {
      const tr = document.createElement("tr");
      tr.dataset.node = n.node;
      cells(tr, [n.node, "eligible", "-", "-", "-", "-", n.quic || "-", ""]);
      rows.push(tr);
    }
    const why = table && table.error ? `no balancer answered (${table.error}); ` : "";
    text($("cluster-note"), why + (live ? `live set from ${live.from}, ${live.age_ms} ms ago`
                                        : "no balancer heartbeats (a single node)"));
  }
  $("cluster").replaceChildren(...rows);
}

// The stored dialogs another node owns, each with a claim action (the dialog is taken over by
// this node: `POST /dialogs/.../claim`, with the token).
let dialogsOf = null;
const LISTED_AT_MOST = 200;
// A key part a URL path cannot carry (empty, or "." and "..", which browsers fold away).
const unaddressable = (part) => part === "" || part === "." || part === "..";
async function showDialogs(node) {
  dialogsOf = node;
  $("dialogs-panel").hidden = false;
  text($("dialogs-node"), node);
  const response = await fetch(`/nodes/${encodeURIComponent(node)}/dialogs`,
                               { headers: { Authorization: `Bearer ${token}` } });
  // Another node was chosen meanwhile: its list is the one to show.
  if (node !== dialogsOf) return;
  if (!response.ok) { text($("dialogs-note"), `refused (${response.status})`); return; }
  const records = await response.json();
  if (node !== dialogsOf) return;
  window.console_dialogs = records;
  $("dialogs").replaceChildren(...records.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.callId = r.call_id;
    cells(tr, [r.device_id, r.call_ref, r.call_id, r.owner, r.epoch,
               r.subscription ? "subscription" : r.early ? "early" : "call"]);
    const td = document.createElement("td");
    if (r.held_here) td.textContent = "held here";
    else if ([r.call_id, r.local_tag, r.remote_tag].some(unaddressable)) td.textContent = "claim by API";
    else td.append(button("Claim here", () => claim(r)));
    tr.append(td);
    return tr;
  }));
  if (!$("dialogs-note").dataset.keep) {
    text($("dialogs-note"), records.length >= LISTED_AT_MOST ? `the first ${records.length} listed`
                            : records.length ? `${records.length} live` : "none");
  }
}

async function claim(r) {
  const path = ["dialogs", r.call_id, r.local_tag, r.remote_tag].map(encodeURIComponent).join("/");
  const response = await fetch(`/${path}/claim`, { method: "POST",
                                                   headers: { Authorization: `Bearer ${token}` } });
  const body = await response.text();
  text($("dialogs-note"), response.ok ? `claimed ${r.call_id} here` : `claim refused (${response.status}): ${body}`);
  $("dialogs-note").dataset.keep = "1";
  await showDialogs(dialogsOf);
  delete $("dialogs-note").dataset.keep;
}

async function follow() {
  sessionStorage.setItem("thalamus-token", token);
  for (;;) {
    try {
      const response = await fetch("/console/events", { headers: { Authorization: `Bearer ${token}` } });
      if (response.status === 401) { text($("link"), "wrong token"); return; }
      text($("link"), "live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).trimStart()).join("\n");
          if (data) render(JSON.parse(data));
        }
      }
    } catch (e) {
      text($("link"), `reconnecting (${e})`);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// Charts from /metrics: counters sampled every 2 s, rates per second; set-up time
// percentiles from the histogram's buckets over each 10 s.
const samples = [];
function sum(textBody, name, filter = () => true) {
  let total = 0;
  for (const line of textBody.split("\n")) {
    if (!line.startsWith(name)) continue;
    const [series, value] = line.split(/\s+/);
    if (series.startsWith(name + "{") || series === name) {
      if (filter(series)) total += Number(value);
    }
  }
  return total;
}
function buckets(textBody) {
  const out = [];
  for (const line of textBody.split("\n")) {
    const m = line.match(/^thalamus_call_setup_seconds_bucket\{.*le="([^"]+)".*\}\s+(\S+)/);
    if (m) out.push([m[1] === "+Inf" ? Infinity : Number(m[1]), Number(m[2])]);
  }
  const merged = new Map();
  for (const [le, n] of out) merged.set(le, (merged.get(le) || 0) + n);
  return [...merged.entries()].sort((a, b) => a[0] - b[0]);
}
function percentile(now, before, q) {
  const diff = now.map(([le, n], i) => [le, n - ((before[i] || [le, 0])[1])]);
  const total = diff.length ? diff[diff.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  const hit = diff.find(([, n]) => n >= rank);
  return hit && isFinite(hit[0]) ? hit[0] * 1000 : null;
}
async function sample() {
  try {
    const body = await (await fetch("/metrics")).text();
    samples.push({
      at: Date.now(),
      started: sum(body, "thalamus_calls_started_total"),
      failed: sum(body, "thalamus_calls_ended_total",
                  (s) => !/reason="(remote_hangup|local_hangup|normal|replaced|transferred)"/.test(s)),
      buckets: buckets(body),
    });
    while (samples.length > 150) samples.shift();
    draw();
  } catch (e) { /* the next sample tries again */ }
}
function rates(key) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = (samples[i].at - samples[i - 1].at) / 1000;
    out.push(dt > 0 ? (samples[i][key] - samples[i - 1][key]) / dt : 0);
  }
  return out;
}
// One line per series; a gap (null) breaks the line, and every point gets a dot, so that a
// lone value shows.
function plot(canvas, series, colors) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const max = Math.max(1, ...series.flat().filter((v) => v != null));
  series.forEach((values, k) => {
    const at = (v, i) => [(i / Math.max(1, 149)) * canvas.width,
                          canvas.height - 4 - (v / max) * (canvas.height - 8)];
    ctx.strokeStyle = colors[k];
    ctx.fillStyle = colors[k];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (v == null) { pen = false; return; }
      const [x, y] = at(v, i);
      pen ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
    values.forEach((v, i) => {
      if (v == null) return;
      const [x, y] = at(v, i);
      ctx.fillRect(x - 2, y - 2, 4, 4);
    });
  });
}
function draw() {
  const started = rates("started"), failed = rates("failed");
  plot($("chart-calls"), [started, failed], ["#2f6fed", "#c2412d"]);
  text($("rate-started"), (started[started.length - 1] || 0).toFixed(1));
  text($("rate-failed"), (failed[failed.length - 1] || 0).toFixed(1));
  const p50 = [], p99 = [];
  for (let i = 5; i < samples.length; i++) {
    p50.push(percentile(samples[i].buckets, samples[i - 5].buckets, 0.5));
    p99.push(percentile(samples[i].buckets, samples[i - 5].buckets, 0.99));
  }
  plot($("chart-setup"), [p50, p99], ["#2f6fed", "#c2412d"]);
  window.console_charts = { started, failed, p50, p99 };
  const last = (a) => a.length && a[a.length - 1] != null ? a[a.length - 1].toFixed(0) : "-";
  text($("setup-p50"), last(p50));
  text($("setup-p99"), last(p99));
}

async function drain(on) {
  const response = await fetch("/drain", { method: on ? "POST" : "DELETE",
                                           headers: { Authorization: `Bearer ${token}` } });
  text($("drain-result"), response.ok ? (on ? "draining" : "serving") : `refused (${response.status})`);
}

$("connect").onclick = () => { token = $("token").value.trim(); follow(); };
$("drain").onclick = () => drain(true);
$("undrain").onclick = () => drain(false);
setInterval(sample, 2000);
sample();
if (token) follow();
