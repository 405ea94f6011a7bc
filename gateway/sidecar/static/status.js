// The sidecar's status page: devices, per-code counts and recent events, live from /v1/events.
// Plain browser JavaScript (no build step, nothing fetched from elsewhere). Everything from the API is
// inserted with textContent, never as HTML, because device ids and error messages are not ours.
"use strict";

const MAX_EVENTS = 100;
const state = { devices: new Map(), names: new Map(), refreshTimer: null, events: 0 };

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
  for (const d of [...state.devices.values()].sort((a, b) => a.id.localeCompare(b.id))) {
    const err = d.last_error || {};
    const messages = d.messages || {};
    rows.push(el("tr", { "data-device": d.id },
      el("td", { class: "id code" }, d.id),
      el("td", { class: "protocol" }, d.protocol),
      el("td", { class: `state state-${d.state}`, title: d.reason || "" }, d.state),
      el("td", { class: "last-code code", title: err.message || "" }, codeText(err.code, err.name)),
      el("td", { class: "action" }, err.action || ""),
      el("td", { class: "next" }, until(d.next_attempt_at)),
      el("td", { class: "num queued" }, d.queued ?? ""),
      el("td", { class: "num held" }, d.held ?? ""),
      el("td", { class: "num delivered" }, messages.delivered ?? ""),
      el("td", { class: "num dead" }, messages.dead ?? ""),
    ));
  }
  body.replaceChildren(...rows);
  document.getElementById("no-devices").hidden = rows.length > 0;
}

async function loadDevices() {
  const data = await getJSON("/v1/devices");
  state.devices = new Map(data.devices.map((d) => [d.id, d]));
  renderDevices();
}

// -- per-code counts (from the Prometheus text at /metrics) -----------------------------------------

const SAMPLE = /^(iothub_gateway_(?:handler_events|messages)_total)\{([^}]*)\}\s+([0-9.eE+-]+)$/;
const LABEL = /(\w+)="((?:[^"\\]|\\.)*)"/g;

function parseMetrics(text) {
  const byCode = new Map();
  for (const line of text.split("\n")) {
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of match[2].matchAll(LABEL)) labels[key] = value;
    const value = Number(match[3]);
    // state:* counters repeat what the other outcomes already count; "accepted"/"delivered" carry no code.
    if (!labels.code || !value || (labels.outcome || "").startsWith("state:")) continue;
    const outcome = match[1].startsWith("iothub_gateway_messages") ? `message ${labels.outcome}` : labels.outcome;
    const entry = byCode.get(labels.code) || { total: 0, outcomes: new Map() };
    entry.total += value;
    entry.outcomes.set(outcome, (entry.outcomes.get(outcome) || 0) + value);
    byCode.set(labels.code, entry);
  }
  return byCode;
}

async function loadCodes() {
  const response = await fetch("/metrics", { cache: "no-store" });
  if (!response.ok) return;
  const byCode = parseMetrics(await response.text());
  const rows = [...byCode.entries()].sort((a, b) => b[1].total - a[1].total || a[0].localeCompare(b[0]))
    .map(([code, entry]) => el("tr", { "data-code": code },
      el("td", { class: "code" }, code),
      el("td", {}, state.names.get(Number(code)) || ""),
      el("td", { class: "num count" }, entry.total),
      el("td", { class: "outcomes" },
        [...entry.outcomes.entries()].map(([name, n]) => `${name} ${n}`).join(", ")),
    ));
  document.querySelector("#codes tbody").replaceChildren(...rows);
  document.getElementById("no-codes").hidden = rows.length > 0;
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
    await Promise.allSettled([loadDevices(), loadCodes(), loadOutbox()]);
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
  await Promise.allSettled([loadDevices(), loadCodes(), loadOutbox()]);
  connectEvents();
  setInterval(() => refreshSoon(0), 5000);  // queued counts and "next attempt" move without events too
}

main();
