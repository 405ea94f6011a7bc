// The sidecar's status page: charts, devices, per-code counts and recent events, live from /v1/events
// and /v1/stats. Plain browser JavaScript (no build step, nothing fetched from elsewhere); the charts are
// inline SVG drawn here. Everything from the API is inserted with textContent or as SVG attributes, never
// as HTML, because device ids and error messages are not ours.
"use strict";

const MAX_EVENTS = 100;
const PAGE = 100;  // devices per page: GET /v1/devices?limit=&after= (never all of them)
const SVG = "http://www.w3.org/2000/svg";
const COLORS = { delivered: "#0a7d38", dead_letter: "#b42318", accepted: "#1d4ed8", errors: "#a15c00" };
const PALETTE = ["#a15c00", "#7c3aed", "#0e7490", "#be185d", "#4d7c0f", "#b42318", "#1d4ed8", "#57534e"];
const state = { devices: new Map(), names: new Map(), refreshTimer: null, events: 0,
                page: { after: null, back: [], next: null, total: null }, totals: {}, picked: null,
                userPicked: false, busiest: [] };

const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child === null || child === undefined ? "" : String(child)));
  }
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// The API's times are RFC 3339 strings; epoch seconds are still read.
function epoch(at) {
  if (typeof at === "number") return at;
  if (typeof at !== "string") return null;
  const ms = Date.parse(at);
  return Number.isNaN(ms) ? null : ms / 1000;
}

function clock(at) {
  const t = epoch(at);
  return t === null ? "" : new Date(t * 1000).toISOString().slice(11, 19) + "Z";
}

function until(value) {
  const at = epoch(value);
  if (at === null) return "";
  const seconds = at - Date.now() / 1000;
  if (seconds <= 0) return "now";
  if (seconds < 120) return `in ${seconds.toFixed(1)} s`;
  const when = new Date(at * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  return seconds < 7200 ? `in ${Math.round(seconds / 60)} min (${when})` : when;
}

function codeText(code, name) {
  if (code === null || code === undefined) return "";
  return name ? `${code} ${name}` : String(code);
}

// -- devices ------------------------------------------------------------------------------------------

function renderDevices() {
  const body = document.querySelector("#devices tbody");
  const rows = [];
  for (const d of [...state.devices.values()].sort(byId)) {
    const err = d.last_error || {};
    const counts = state.totals[d.id] || {};
    const row = el("tr", { "data-device": d.id, class: d.id === state.picked ? "picked" : null },
      el("td", { class: "id code" }, d.id),
      el("td", { class: "protocol" }, d.protocol),
      el("td", { class: `state state-${d.state}`, title: d.reason || "" }, d.state),
      el("td", { class: "last-code code", title: err.message || "" }, codeText(err.code, err.name)),
      el("td", { class: "action" }, err.action || ""),
      el("td", { class: "next" }, until(d.next_attempt_at)),
      el("td", { class: "num queued" }, d.queued ?? ""),
      el("td", { class: "num held" }, d.held ?? ""),
      el("td", { class: "num delivered" }, counts.delivered ?? ""),
      el("td", { class: "num dead" }, counts.dead_letter ?? ""),
      el("td", { class: "num errors" }, counts.errors ?? ""),
    );
    row.addEventListener("click", () => pick(d.id));
    rows.push(row);
  }
  body.replaceChildren(...rows);
  document.getElementById("no-devices").hidden = rows.length > 0;
}

function pageQuery() {
  const after = state.page.after === null ? "" : `&after=${encodeURIComponent(state.page.after)}`;
  return `limit=${PAGE}${after}`;
}

async function loadDevices() {
  const data = await getJSON(`/v1/devices?${pageQuery()}`);
  let devices = data.devices;
  if (data.total === undefined) {  // a sidecar without paging answers all of them: page them here
    const all = [...devices].sort(byId);
    let start = state.page.after === null ? 0 : all.findIndex((d) => d.id > state.page.after);
    if (start < 0) start = all.length;
    devices = all.slice(start, start + PAGE);
    state.page.next = all.length > start + PAGE ? devices[devices.length - 1].id : null;
    state.page.total = all.length;
  } else {
    devices = devices.slice(0, PAGE);
    state.page.next = data.next ?? null;
    state.page.total = data.total;
  }
  state.devices = new Map(devices.map((d) => [d.id, d]));
  const first = state.page.back.length * PAGE;
  document.getElementById("device-range").textContent = devices.length
    ? `${first + 1}–${first + devices.length} of ${state.page.total}` : "";
  document.getElementById("prev").disabled = state.page.back.length === 0;
  document.getElementById("next").disabled = state.page.next === null;
  if (state.picked === null && devices.length) state.picked = devices[0].id;
  renderDevices();
}

function turn(forward) {
  if (forward && state.page.next !== null) {
    state.page.back.push(state.page.after);
    state.page.after = state.page.next;
  } else if (!forward && state.page.back.length) {
    state.page.after = state.page.back.pop();
  } else {
    return;
  }
  refreshSoon(0);
}

// -- charts and counts (from /v1/stats: counters kept as things happen) -------------------------------

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Draws `lines` ([{name, label, color, values}]) into `target` as polylines over the window; each keeps
// its numbers in data attributes (data-series, data-sum, data-max, data-values) so tests read what is drawn.
function lineChart(target, legend, lines, windowSeconds) {
  const W = 600, H = 170, left = 34, right = 8, top = 8, bottom = 20;
  const n = Math.max(2, windowSeconds);
  const max = Math.max(1, ...lines.flatMap((line) => line.values));
  const x = (i) => left + (i * (W - left - right)) / (n - 1);
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  const nodes = [];
  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    nodes.push(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    nodes.push(svg("text", { class: "axis", x: left - 4, y: y(v) + 4, "text-anchor": "end" },
      Number.isInteger(v) ? String(v) : v.toFixed(1)));
  }
  nodes.push(svg("text", { class: "axis", x: left, y: H - 4 }, `−${Math.round(n / 60)} min`));
  nodes.push(svg("text", { class: "axis", x: W - right, y: H - 4, "text-anchor": "end" }, "now"));
  let sum = 0;
  for (const line of lines) {
    const total = line.values.reduce((a, b) => a + b, 0);
    sum += total;
    const points = line.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    nodes.push(svg("polyline", { points, stroke: line.color, "data-series": line.name, "data-sum": total,
      "data-max": Math.max(0, ...line.values), "data-values": line.values.join(",") }));
  }
  if (sum === 0) {
    nodes.push(svg("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, "nothing in this window"));
  }
  target.replaceChildren(...nodes);
  target.dataset.sum = String(sum);
  legend.replaceChildren(...lines.map((line) => el("span", { "data-series": line.name },
    el("span", { class: "swatch", style: `background:${line.color}` }), `${line.label} `,
    el("b", {}, String(line.values.reduce((a, b) => a + b, 0))))));
}

function codeLabel(row) {
  return row.name ? `${row.code} ${row.name}` : String(row.code);
}

function renderStats(all, one) {
  const win = all.window;
  document.getElementById("window").textContent = win % 60 === 0 ? `${win / 60} minutes` : `${win} s`;
  document.getElementById("span").textContent =
    `Counts in the tables are totals since this sidecar started (${clock(all.started)}); the charts show the ` +
    `last ${win} s. Both come from the same counters, so they agree. Accepted ${all.totals.accepted}, ` +
    `delivered ${all.totals.delivered}, dead-lettered ${all.totals.dead_letter}, refused by the API ` +
    `${all.totals.rejected}.` + (all.truncated ? " (Per-device charts hold the busiest devices of each second.)" : "");
  lineChart(document.getElementById("chart-messages"), document.getElementById("legend-messages"), [
    { name: "delivered", label: "delivered", color: COLORS.delivered, values: all.series.delivered },
    { name: "dead_letter", label: "dead-lettered", color: COLORS.dead_letter, values: all.series.dead_letter },
  ], win);
  lineChart(document.getElementById("chart-codes"), document.getElementById("legend-codes"),
    all.codes.map((row, i) => ({ name: String(row.code), label: codeLabel(row), color: PALETTE[i % PALETTE.length],
      values: row.series })), win);
  if (one) {
    lineChart(document.getElementById("chart-device"), document.getElementById("legend-device"), [
      { name: "delivered", label: "delivered", color: COLORS.delivered, values: one.series.delivered },
      { name: "dead_letter", label: "dead-lettered", color: COLORS.dead_letter, values: one.series.dead_letter },
      { name: "errors", label: "codes", color: COLORS.errors, values: one.series.errors },
    ], win);
    document.getElementById("chart-device").dataset.for = one.device;
  }
  const rows = all.code_totals.map((row) => el("tr", { "data-code": row.code },
    el("td", { class: "code" }, row.code),
    el("td", {}, row.name || state.names.get(row.code) || ""),
    el("td", { class: "num count" }, row.count),
    el("td", { class: "outcomes" }, Object.entries(row.outcomes).map(([name, n]) => `${name} ${n}`).join(", ")),
  ));
  document.querySelector("#codes tbody").replaceChildren(...rows);
  document.getElementById("no-codes").hidden = rows.length > 0;
  state.totals = all.devices || {};
  state.busiest = (all.busiest || []).map((b) => b.id);
  if (!state.userPicked && state.busiest.length) state.picked = state.busiest[0];  // until the user picks one
  renderPicker();
  renderDevices();
}

function renderPicker() {
  const select = document.getElementById("device-pick");
  const ids = [...new Set([state.picked, ...state.busiest, ...state.devices.keys()].filter((id) => id !== null))]
    .slice(0, 50);
  const current = [...select.options].map((o) => o.value).join("\n");
  if (current !== ids.join("\n")) select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  if (state.picked !== null) select.value = state.picked;
}

function pick(id) {
  state.picked = id;
  state.userPicked = true;
  renderPicker();
  loadStats();
}

async function loadStats() {
  const all = await getJSON(`/v1/stats?${pageQuery()}`);
  let one = null;
  if (state.picked !== null) {
    try {
      one = await getJSON(`/v1/stats?device=${encodeURIComponent(state.picked)}`);
    } catch (err) {
      state.picked = null;
    }
  }
  renderStats(all, one);
  document.getElementById("charts").dataset.updated = String(Date.now());
}

async function loadNames() {
  const data = await getJSON("/v1/codes");
  for (const row of data.codes) state.names.set(row.code, row.name);
}

async function loadOutbox() {
  const response = await fetch("/readyz", { cache: "no-store" });
  document.getElementById("outbox").textContent = response.ok ? "accepting messages" : "not accepting messages";
}

function refreshSoon(delay = 250) {
  if (state.refreshTimer !== null) return;
  state.refreshTimer = setTimeout(async () => {
    state.refreshTimer = null;
    await Promise.allSettled([loadDevices().then(loadStats), loadOutbox()]);
  }, delay);
}

// -- events -------------------------------------------------------------------------------------------

function addEvent(kind, data) {
  const list = document.getElementById("events");
  const parts = [el("span", { class: "at" }, clock(data.at)), el("span", { class: "kind" }, kind), " ",
    el("span", { class: "code" }, data.device || ""), " "];
  if (kind === "state") {
    parts.push(el("span", { class: `state state-${data.state}` }, data.state));
  } else {
    parts.push(`message ${data.id || ""}`);
  }
  if (data.code !== null && data.code !== undefined) {
    parts.push(": ", el("span", { class: "code" }, codeText(data.code, data.name)));
  }
  if (data.action) parts.push(` → ${data.action}`);
  if (data.until) parts.push(` (until ${clock(data.until)})`);
  if (data.reason && data.reason !== data.state) parts.push(" ", el("span", { class: "reason" }, `– ${data.reason}`));
  list.prepend(el("li", { class: kind, "data-code": data.code ?? "" }, ...parts));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  state.events += 1;
}

function onState(event) {
  const data = JSON.parse(event.data);
  addEvent("state", data);
  const device = state.devices.get(data.device);
  if (device) {  // show it at once; the refresh that follows fills in the counts
    device.state = data.state;
    device.next_attempt_at = data.until;
    if (data.code !== null && data.code !== undefined) {
      device.last_error = { ...(device.last_error || {}), code: data.code, name: data.name, action: data.action };
    }
    renderDevices();
  }
  refreshSoon();
}

function onDeadLetter(event) {
  addEvent("dead_letter", JSON.parse(event.data));
  refreshSoon();
}

function connectEvents() {
  const live = document.getElementById("live");
  const source = new EventSource("/v1/events?after=0");  // replays the recent events first
  source.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; refreshSoon(0); });
  source.addEventListener("error", () => { live.textContent = "reconnecting…"; live.className = "live off"; });
  source.addEventListener("state", onState);
  source.addEventListener("dead_letter", onDeadLetter);
}

async function main() {
  try {
    await loadNames();
  } catch (err) {
    console.warn("codes not loaded", err);
  }
  document.getElementById("prev").addEventListener("click", () => turn(false));
  document.getElementById("next").addEventListener("click", () => turn(true));
  document.getElementById("device-pick").addEventListener("change", (event) => pick(event.target.value));
  await Promise.allSettled([loadDevices().then(loadStats), loadOutbox()]);
  connectEvents();
  setInterval(() => loadStats().catch(() => {}), 1000);  // the charts move every second
  setInterval(() => refreshSoon(0), 5000);  // queued counts and "next attempt" move without events too
}

main();
