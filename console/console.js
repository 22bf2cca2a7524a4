// herald console: plain JavaScript, no dependency. Every action is a call to this node's
// /api/v1 with the signed-in key, so the API's authorization applies unchanged; the overview
// reads /metrics and /readyz, which cost the shards nothing (counters read on the API thread).
"use strict";

const KEY = "herald.console.key";
const POLL_MS = 2000;
const WINDOW = 150; // samples kept per series: 5 minutes at POLL_MS
const PAGE = 50;

const $ = (id) => document.getElementById(id);
const el = (tag, attrs, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
};

const state = {
  key: sessionStorage.getItem(KEY),
  admin: false,
  projects: [], // ids the key acts on
  view: "overview",
  timer: null,
  series: new Map(), // name -> [{t, v}]
  last: null, // previous /metrics sample (for rates)
  cursors: [], // connection pages: cursor of each page shown
  tail: null,
};

// ---------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + state.key };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "unreachable", "the node did not answer: " + e.message);
  }
  const text = await r.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch (e) {
      json = null;
    }
  }
  if (!r.ok) {
    // The API's own message, verbatim.
    if (json && typeof json.message === "string") throw new ApiError(r.status, json.error, json.message);
    throw new ApiError(r.status, "http", `${r.status} ${r.statusText}`);
  }
  return json;
}

function showError(id, e) {
  const p = $(id);
  if (!e) {
    p.hidden = true;
    p.textContent = "";
    return;
  }
  p.textContent = e.message;
  p.hidden = false;
  if (e.status === 401) signOut(e.message);
}

// ---------------------------------------------------------------------------------------
// Sign-in
// ---------------------------------------------------------------------------------------

async function signIn() {
  // Which key is it? GET /api/v1/projects answers the projects it acts on (401 for none);
  // /api/v1/stats answers the admin key only.
  const list = await api("GET", "/api/v1/projects");
  state.projects = list.projects.map((p) => p.id);
  try {
    await api("GET", "/api/v1/stats");
    state.admin = true;
  } catch (e) {
    if (e.status !== 403) throw e;
    state.admin = false;
  }
  $("who-name").textContent = state.admin ? "admin key" : `project ${state.projects.join(", ")}`;
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  fillProjectSelect($("conn-project"), state.admin);
  fillProjectSelect($("pub-project"), false);
  show(location.hash.slice(1) || "overview");
}

function fillProjectSelect(select, withAll) {
  select.replaceChildren();
  if (withAll) select.append(el("option", { value: "" }, "all projects"));
  for (const p of state.projects) select.append(el("option", { value: p }, p));
}

function signOut(why) {
  sessionStorage.removeItem(KEY);
  state.key = null;
  stopTail();
  clearInterval(state.timer);
  state.timer = null;
  state.series.clear();
  state.last = null;
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("key").value = "";
  // Nothing of this session stays on the page for whoever signs in next on this tab.
  for (const id of ["tail-log", "charts", "warnings", "pub-answer"]) $(id).replaceChildren();
  for (const t of ["projects-table", "connections-table"]) $(t).querySelector("tbody").replaceChildren();
  for (const id of ["overview-error", "projects-error", "connections-error", "pub-error", "tail-error"]) $(id).hidden = true;
  const err = $("signin-error");
  err.hidden = !why;
  err.textContent = why || "";
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.key = $("key").value.trim();
  try {
    await signIn();
    sessionStorage.setItem(KEY, state.key);
    $("key").value = "";
    $("signin-error").hidden = true;
  } catch (e) {
    signOut(e.message);
  }
});
$("sign-out").addEventListener("click", () => signOut());

// ---------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------

const VIEWS = { overview: startOverview, projects: loadProjects, connections: () => loadConnections(true), publish: () => {} };

function show(view) {
  if (!Object.hasOwn(VIEWS, view)) view = "overview";
  state.view = view;
  if (location.hash.slice(1) !== view) history.replaceState(null, "", "#" + view);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + view;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.view === view);
  if (view !== "overview") {
    clearInterval(state.timer);
    state.timer = null;
  }
  VIEWS[view]();
}

for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));

function confirmAction(text) {
  const d = $("confirm");
  $("confirm-text").textContent = text;
  d.showModal();
  return new Promise((resolve) => {
    const done = (ok) => {
      $("confirm-ok").onclick = $("confirm-cancel").onclick = d.oncancel = null;
      d.close();
      resolve(ok);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
    d.oncancel = () => done(false);
  });
}

// ---------------------------------------------------------------------------------------
// Overview: /metrics every POLL_MS, rates from consecutive samples
// ---------------------------------------------------------------------------------------

// Prometheus text: name{labels} value -> [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) for (const kv of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function sum(samples, name, filter) {
  let s = 0;
  for (const x of samples) if (x.name === name && (!filter || filter(x.labels))) s += x.value;
  return s;
}

function push(name, t, v) {
  let s = state.series.get(name);
  if (!s) state.series.set(name, (s = []));
  s.push({ t, v });
  if (s.length > WINDOW) s.shift();
}

async function poll() {
  let text, ready;
  try {
    const [m, r] = await Promise.all([
      fetch("/metrics", { headers: { Accept: "text/plain" }, cache: "no-store" }),
      fetch("/readyz", { cache: "no-store" }),
    ]);
    if (!m.ok) throw new Error(`/metrics answered ${m.status}`);
    text = await m.text();
    ready = (await r.json()).status;
    showError("overview-error", null);
  } catch (e) {
    showError("overview-error", e);
    $("engine").textContent = "unreachable";
    $("engine").className = "badge bad";
    return;
  }
  $("engine").textContent = ready;
  $("engine").className = "badge " + (ready === "ready" ? "good" : "bad");
  const t = Date.now() / 1000;
  const now = parseMetrics(text);
  const shards = [...new Set(now.filter((x) => x.name === "herald_connections").map((x) => x.labels.shard))];
  const mine = (l) => state.admin || state.projects.includes(l.project);
  if (state.admin) {
    push("connections: node", t, sum(now, "herald_connections"));
    for (const s of shards) push("connections: shard " + s, t, sum(now, "herald_connections", (l) => l.shard === s));
  }
  for (const p of state.projects) {
    push("connections: " + p, t, sum(now, "herald_project_connections", (l) => l.project === p));
  }
  const prev = state.last;
  state.last = { t, now };
  if (state.admin && prev) {
    const dt = t - prev.t;
    const rate = (name, filter) => Math.max(0, (sum(now, name, filter) - sum(prev.now, name, filter)) / dt);
    const outcomes = new Set(now.filter((x) => x.name === "herald_handshakes_total").map((x) => x.labels.outcome));
    for (const o of outcomes) push("handshakes/s: " + o, t, rate("herald_handshakes_total", (l) => l.outcome === o));
    push("deliveries/s", t, rate("herald_messages_delivered_total"));
    push("publishes/s", t, rate("herald_messages_published_total"));
    push("dropped/s", t, rate("herald_messages_dropped_total"));
    push("slow-consumer closes/s", t, rate("herald_slow_consumer_closes_total"));
    push("inbox depth", t, sum(now, "herald_shard_inbox_depth"));
  }
  // Near-cap warnings: the node's and each project's 90% flags.
  const warnings = [];
  if (state.admin && sum(now, "herald_connections_near_cap") > 0) {
    warnings.push(`The node is near its connection cap: ${sum(now, "herald_connections")} of ${sum(now, "herald_connection_cap")}.`);
  }
  for (const x of now) {
    if (x.name === "herald_project_connections_near_cap" && x.value > 0 && mine(x.labels)) {
      const p = x.labels.project;
      warnings.push(`Project ${p} is near its connection cap: ${sum(now, "herald_project_connections", (l) => l.project === p)} of ${sum(now, "herald_project_connection_cap", (l) => l.project === p)}.`);
    }
  }
  $("warnings").replaceChildren(...warnings.map((w) => el("p", { class: "warning", role: "status" }, w)));
  drawCharts();
}

const GROUPS = [
  ["Connections", "connections: "],
  ["Handshakes per second, by outcome", "handshakes/s: "],
  ["Messages per second", "deliveries/s", "publishes/s", "dropped/s"],
  ["Slow-consumer closes per second", "slow-consumer closes/s"],
  ["Shard inbox depth", "inbox depth"],
];
const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"];

function drawCharts() {
  const charts = [];
  for (const [title, ...prefixes] of GROUPS) {
    const names = [...state.series.keys()].filter((n) => prefixes.some((p) => (p.endsWith(" ") ? n.startsWith(p) : n === p)));
    if (names.length) charts.push(chart(title, names));
  }
  $("charts").replaceChildren(...charts);
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function fmt(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

// One chart: a line per series over the last WINDOW samples, the latest values in the legend.
function chart(title, names) {
  const W = 480, H = 140;
  // From the first sample (at least a minute back) to now, at most the whole window.
  const t1 = Date.now() / 1000;
  let max = 1, first = t1;
  for (const n of names) {
    for (const p of state.series.get(n)) max = Math.max(max, p.v);
    if (state.series.get(n).length) first = Math.min(first, state.series.get(n)[0].t);
  }
  const t0 = Math.max(t1 - (WINDOW * POLL_MS) / 1000, Math.min(first, t1 - 60));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  g.append(svg("line", { x1: 0, y1: H - 1, x2: W, y2: H - 1, class: "axis" }));
  const top = svg("text", { x: 2, y: 10, class: "tick" });
  top.textContent = fmt(max);
  g.append(top);
  const legend = el("ul", { class: "legend" });
  names.forEach((n, i) => {
    const pts = state.series.get(n);
    const color = COLORS[i % COLORS.length];
    const xy = pts.map((p) => `${(((p.t - t0) / (t1 - t0)) * W).toFixed(1)},${(H - 2 - (p.v / max) * (H - 14)).toFixed(1)}`);
    g.append(svg("polyline", { points: xy.join(" "), stroke: color, class: "line" }));
    const last = pts.length ? pts[pts.length - 1].v : 0;
    const label = n.includes(": ") ? n.split(": ")[1] : n;
    legend.append(el("li", { "data-series": n }, el("i", { class: "swatch c" + (i % COLORS.length) }), `${label} `, el("b", {}, fmt(last))));
  });
  return el("figure", { class: "chart" }, el("figcaption", {}, title), g, legend);
}

function startOverview() {
  $("overview-hint").textContent = state.admin
    ? "Up to the last 5 minutes, every 2 s, from /metrics (this tab keeps the history)."
    : "Your project's connections; node-wide charts need the admin key.";
  if (!state.timer) {
    poll();
    state.timer = setInterval(poll, POLL_MS);
  }
}

// ---------------------------------------------------------------------------------------
// Projects
// ---------------------------------------------------------------------------------------

async function loadProjects() {
  const body = $("projects-table").tBodies[0];
  try {
    const { projects } = await api("GET", "/api/v1/projects");
    showError("projects-error", null);
    body.replaceChildren(
      ...projects.map((p) => {
        const cap = p.max_connections;
        const pct = cap ? Math.min(100, (100 * p.connections) / cap) : 0;
        const meter = el("span", { class: "meter" + (pct >= 90 ? " hot" : "") }, el("span", { class: "fill w" + Math.round(pct / 5) * 5 }));
        const keys = el("ul", { class: "keys" }, ...p.keys.map((k) => el("li", {}, `${k.kid ?? "(no kid)"} · ${k.alg} · ${k.kind} · ${k.source}`)));
        return el(
          "tr",
          { "data-project": p.id },
          el("td", {}, p.id),
          el("td", {}, el("span", { class: "badge " + (p.enabled ? "good" : "bad") }, p.enabled ? "enabled" : "disabled")),
          el("td", {}, `${p.connections} / ${cap || "no cap"} `, cap ? meter : ""),
          el("td", {}, p.keys.length ? keys : "no keys"),
          el("td", {}, p.source)
        );
      })
    );
    $("projects-empty").hidden = projects.length > 0;
  } catch (e) {
    showError("projects-error", e);
  }
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

function age(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d";
}

async function loadConnections(first) {
  if (first) state.cursors = [""];
  const cursor = state.cursors[state.cursors.length - 1];
  const q = new URLSearchParams({ limit: PAGE });
  for (const [k, id] of [["project", "conn-project"], ["user", "conn-user"], ["topic", "conn-topic"]]) {
    const v = $(id).value.trim();
    if (v) q.set(k, v);
  }
  if (cursor) q.set("cursor", cursor);
  const body = $("connections-table").tBodies[0];
  $("connections-notice").hidden = true;
  try {
    const page = await api("GET", "/api/v1/connections?" + q);
    showError("connections-error", null);
    body.replaceChildren(...page.connections.map(connectionRow));
    $("connections-empty").hidden = page.connections.length > 0;
    $("conn-next").disabled = !page.next_cursor;
    $("conn-next").dataset.cursor = page.next_cursor || "";
    $("conn-first").disabled = state.cursors.length < 2;
    // Counts the listings shown (tests wait for the next one rather than for a time).
    $("connections-table").dataset.listings = String(Number($("connections-table").dataset.listings || 0) + 1);
  } catch (e) {
    body.replaceChildren();
    $("connections-empty").hidden = true;
    showError("connections-error", e);
  }
}

function connectionRow(c) {
  const kick = el("button", { type: "button", class: "danger", "data-action": "kick" }, "Kick");
  kick.addEventListener("click", async () => {
    if (!(await confirmAction(`Close connection ${c.id} (user ${c.user}, project ${c.project}) with 4003?`))) return;
    try {
      await api("DELETE", "/api/v1/connections/" + encodeURIComponent(c.id));
      showError("connections-error", null);
      // 204: the close (4003) is ordered; the row goes now, whatever a listing in flight says.
      removeRows((r) => r.dataset.conn === c.id);
      notice(`Closed connection ${c.id} (4003).`);
    } catch (e) {
      showError("connections-error", e);
    }
  });
  const user = el("button", { type: "button", class: "danger", "data-action": "disconnect-user" }, "Disconnect user");
  user.addEventListener("click", async () => {
    if (!(await confirmAction(`Close every connection of user ${c.user} in project ${c.project} with 4003?`))) return;
    try {
      const r = await api("POST", "/api/v1/disconnect", JSON.stringify({ project: c.project, user: c.user }));
      showError("connections-error", null);
      removeRows((row) => row.dataset.project === c.project && row.dataset.user === c.user);
      notice(`Closed ${r.disconnected} connection(s) of user ${c.user} (4003).`);
    } catch (e) {
      showError("connections-error", e);
    }
  });
  return el(
    "tr",
    { "data-conn": c.id, "data-project": c.project, "data-user": c.user },
    el("td", {}, el("code", {}, c.id)),
    el("td", {}, c.project),
    el("td", {}, c.user),
    el("td", {}, c.topics.join(", ")),
    el("td", {}, c.ip),
    el("td", { title: new Date(c.connected_at).toISOString() }, age(c.connected_at)),
    el("td", { class: "actions" }, kick, " ", user)
  );
}

function removeRows(which) {
  for (const r of [...$("connections-table").tBodies[0].rows]) if (which(r)) r.remove();
  $("connections-empty").hidden = $("connections-table").tBodies[0].rows.length > 0;
}

function notice(text) {
  const n = $("connections-notice");
  n.textContent = text;
  n.hidden = false;
}

$("conn-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadConnections(true);
});
$("conn-next").addEventListener("click", () => {
  state.cursors.push($("conn-next").dataset.cursor);
  loadConnections(false);
});
$("conn-first").addEventListener("click", () => loadConnections(true));

// ---------------------------------------------------------------------------------------
// Publish and live tail
// ---------------------------------------------------------------------------------------

$("pub-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const answer = $("pub-answer");
  answer.hidden = true;
  let data;
  try {
    data = JSON.parse($("pub-data").value);
  } catch (e) {
    showError("pub-error", new Error("Data is not JSON: " + e.message));
    return;
  }
  const body = { project: $("pub-project").value, topic: $("pub-topic").value.trim(), data };
  try {
    const r = await api("POST", "/api/v1/publish", JSON.stringify(body));
    showError("pub-error", null);
    answer.textContent = JSON.stringify(r);
    answer.hidden = false;
  } catch (e) {
    showError("pub-error", e);
  }
});

function tailStatus(text) {
  $("tail-status").textContent = text;
}

function stopTail() {
  const t = state.tail;
  state.tail = null;
  if (t && t.ws) t.ws.close(1000);
  $("tail-start").disabled = false;
  $("tail-stop").disabled = true;
}

async function startTail(project, topic, renewals = 0) {
  stopTail();
  const tail = { project, topic, ws: null, renewals };
  state.tail = tail;
  $("tail-start").disabled = true;
  $("tail-stop").disabled = false;
  let grant;
  try {
    grant = await api("POST", `/api/v1/projects/${encodeURIComponent(project)}/console-token`, JSON.stringify({ topic }));
    showError("tail-error", null);
  } catch (e) {
    showError("tail-error", e);
    tailStatus("Not tailing.");
    if (state.tail === tail) stopTail();
    return;
  }
  if (state.tail !== tail) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
  const ws = new WebSocket(`${scheme}//${host}:${grant.client_port}${grant.path}`, ["herald.v1", "bearer." + grant.token]);
  tail.ws = ws;
  tailStatus(`Connecting to ${project} for ${topic} …`);
  ws.onmessage = (ev) => {
    let m;
    try {
      m = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    if (m.type === "welcome") {
      if (topic === "all") tailStatus(`Tailing ${topic} of ${project} (connection ${m.conn}).`);
      else ws.send(JSON.stringify({ op: "subscribe", topic, id: 1 }));
    } else if (m.type === "ack" && m.id === 1) {
      tailStatus(`Tailing ${topic} of ${project}.`);
    } else if (m.type === "error") {
      showError("tail-error", new Error(m.message));
    } else if (m.type === "message" && m.topic === topic) {
      tail.renewals = 0;
      const log = $("tail-log");
      log.prepend(el("div", { class: "line" }, `${new Date(m.ts).toLocaleTimeString()} ${JSON.stringify(m.data)}`));
      while (log.childNodes.length > 200) log.lastChild.remove();
    }
  };
  ws.onclose = (ev) => {
    if (state.tail !== tail) return;
    if (ev.code === 4001 && tail.renewals < 3) {
      // The token expired: a new one, and on (after a pause, and only a few times in a row
      // without a message between, so a project with very short token lifetimes does not
      // make the console mint tokens in a loop).
      const renewals = tail.renewals + 1;
      tailStatus(`Token expired; renewing (${renewals})…`);
      setTimeout(() => { if (state.tail === tail) startTail(project, topic, renewals); }, 1000 * renewals);
      return;
    }
    showError("tail-error", new Error(`The tail connection closed (${ev.code}${ev.reason ? " " + ev.reason : ""}).`));
    tailStatus("Not tailing.");
    stopTail();
  };
}

$("tail-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  $("tail-log").replaceChildren();
  startTail($("pub-project").value, $("tail-topic").value.trim());
});
$("tail-stop").addEventListener("click", () => {
  stopTail();
  tailStatus("Not tailing.");
});

// ---------------------------------------------------------------------------------------

if (state.key) signIn().catch((e) => signOut(e.message));
