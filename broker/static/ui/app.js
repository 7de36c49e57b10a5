/**
 * The live page: one session seen through three clients with the seed's
 * three filters (desktop: everything, mobile: essential, dashboard: planning),
 * a chat box, and a view of every session's viewers and how far each has
 * acknowledged. Uses actor-broker.js and nothing else.
 *
 * Everything that comes from the wire is rendered with textContent or as
 * attribute values, never as HTML.
 */

import { connect, describeClose } from "/client/actor-broker.js";

const PRESETS = [
  { name: "desktop", title: "Desktop", events: "all" },
  { name: "mobile", title: "Mobile", events: "essential" },
  { name: "dashboard", title: "Dashboard", events: "planning" },
];
const TIMELINE_LIMIT = 400;

const $ = (selector, root = document) => root.querySelector(selector);

/** An element with text and attributes; children are nodes or strings (as text). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function notice(text, { error = false } = {}) {
  const box = $("#notice");
  box.hidden = !text;
  box.textContent = text ?? "";
  box.classList.toggle("error", error);
}

function currentToken() {
  return $("#token").value.trim() || null;
}

function showTokenState() {
  const token = currentToken();
  $("#token-state").textContent = token ? `(${token.length} characters)` : "(none)";
}

/** A short description of a session message for the timeline. */
function summary(msg) {
  switch (msg.type) {
    case "session_started":
      return msg.query ?? "";
    case "plan_generated":
      return `${msg.plan?.steps?.length ?? 0} steps`;
    case "task_started":
      return `${msg.task_id} ${msg.title ?? ""}`;
    case "task_progress":
      return `${msg.task_id} ${msg.progress}% ${msg.current_action ?? ""}`;
    case "task_completed":
      return `${msg.task_id} ${typeof msg.result === "string" ? msg.result : "done"}`;
    case "task_failed":
      return `${msg.task_id} ${msg.error}`;
    case "report_generated":
      return msg.report?.title ?? "report";
    case "query_start":
      return msg.query ?? "";
    case "chunk":
      return `#${msg.chunk_number} ${msg.content}`;
    case "complete":
      return `${msg.total_chunks} chunks`;
    case "error":
      return msg.error ?? "";
    default:
      return msg.status ?? msg.message ?? "";
  }
}

/** One client with one filter, and what it shows. */
class Pane {
  constructor(preset, sessionId, token) {
    this.preset = preset;
    this.root = $("#pane-template").content.firstElementChild.cloneNode(true);
    this.root.dataset.pane = preset.name;
    $(".pane-name", this.root).textContent = preset.title;
    $(".filter-asked", this.root).textContent = preset.events;
    this.count = 0;
    this.tasks = new Map();
    this.titles = new Map();
    this.countdown = null;
    const options = { session: sessionId, events: preset.events };
    if (token) options.token = token;
    else options.user = preset.name; // without a token the viewers list names the panes
    this.client = connect("", options);
    this.client.on("state", (s) => this.showState(s));
    this.client.on("open", (greeting) => {
      $(".filter-echo", this.root).textContent = JSON.stringify(greeting.events);
    });
    this.client.on("subscribed", (m) => {
      $(".filter-echo", this.root).textContent = JSON.stringify(m.events);
    });
    this.client.on("recovered", (r) => {
      if (r.count > 0 || r.to_seq > r.from_seq - 1) this.note(`recovered ${r.count} messages`, "recovered");
    });
    this.client.on("reset", () => this.reset());
    this.client.on("session_closed", () => this.note("the session was deleted", "error"));
    this.client.on("server_shutdown", (m) => this.note(`the broker is restarting (back in ${m.reconnect_after_ms} ms)`));
    this.client.on("system_notification", (m) => this.note(m.message ?? "notice"));
    this.client.on("closed", (c) => {
      if (c.fatal) {
        const text = describeClose(c.code, c.reason);
        this.note(text, "error");
        notice(text, { error: true });
      }
    });
    this.client.on("message", (msg) => this.apply(msg));
  }

  note(text, kind = "") {
    $(".notes", this.root).append(el("li", { class: kind, text }));
  }

  showState(s) {
    const badge = $(".state", this.root);
    badge.className = `badge state ${s.state}`;
    clearInterval(this.countdown);
    this.countdown = null;
    if (s.state === "reconnecting" && s.retryAt) {
      const tick = () => {
        const left = Math.max(0, (s.retryAt - Date.now()) / 1000);
        badge.textContent = `reconnecting in ${left.toFixed(1)} s (attempt ${s.attempt})`;
      };
      tick();
      this.countdown = setInterval(tick, 100);
    } else if (s.state === "connected") {
      badge.textContent = s.transport === "sse" ? "connected (SSE)" : "connected";
    } else if (s.state === "failed") {
      badge.textContent = `refused (${s.code})`;
    } else {
      badge.textContent = s.state;
    }
  }

  reset() {
    this.note("the session's history started afresh (epoch changed): the view is cleared", "gap");
    this.tasks.clear();
    this.titles.clear();
    $(".tasks", this.root).replaceChildren();
    $(".plan", this.root).replaceChildren();
    $(".report", this.root).replaceChildren();
    for (const block of [".plan-block", ".tasks-block", ".report-block"]) $(block, this.root).hidden = true;
    this.timeline(el("li", { class: "divider", text: "new epoch" }));
  }

  timeline(item) {
    const list = $(".timeline", this.root);
    list.append(item);
    while (list.childElementCount > TIMELINE_LIMIT) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  }

  apply(msg) {
    if (msg.type === "gap") {
      const range = msg.to_seq === null ? `from seq ${msg.from_seq} on (epoch changed)` : `seq ${msg.from_seq}-${msg.to_seq}`;
      this.note(`gap: ${range} lost`, "gap");
      this.timeline(el("li", { class: "gap", "data-from": msg.from_seq, "data-to": msg.to_seq ?? "", text: `gap: ${range}` }));
      return;
    }
    this.count += 1;
    $(".count", this.root).textContent = String(this.count);
    $(".last-seq", this.root).textContent = String(msg.seq);
    this.timeline(
      el(
        "li",
        { "data-seq": msg.seq, "data-type": msg.type },
        el("span", { class: "seq", text: msg.seq }),
        el("span", { class: "type", text: msg.type }),
        el("span", { class: "what", text: summary(msg) }),
      ),
    );
    switch (msg.type) {
      case "plan_generated":
        this.plan(msg.plan);
        break;
      case "task_started":
        this.task(msg.task_id, { title: msg.title });
        break;
      case "task_progress":
        this.task(msg.task_id, { progress: msg.progress, action: msg.current_action });
        break;
      case "task_completed":
        this.task(msg.task_id, { progress: 100, state: "done", action: "completed" });
        break;
      case "task_failed":
        this.task(msg.task_id, { state: "failed", action: msg.error });
        break;
      case "report_generated":
        this.report(msg.report);
        break;
      default:
        break;
    }
  }

  plan(plan) {
    $(".plan-block", this.root).hidden = false;
    const list = $(".plan", this.root);
    list.replaceChildren();
    for (const step of plan?.steps ?? []) {
      list.append(el("li", { "data-task": step.task_id, text: step.title ?? step.task_id }));
      // A title for the task's bar, which the task's own events create (a
      // filter without task events shows the plan and no bars).
      this.titles.set(step.task_id, step.title);
      this.tasks.get(step.task_id)?.name.replaceChildren(step.title ?? step.task_id);
    }
  }

  task(taskId, { title, progress, action, state } = {}) {
    $(".tasks-block", this.root).hidden = false;
    let task = this.tasks.get(taskId);
    if (!task) {
      const fill = el("div", { class: "bar-fill" });
      const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": 0 }, fill);
      const name = el("span", { class: "task-title", text: title ?? this.titles.get(taskId) ?? taskId });
      const percent = el("span", { class: "task-percent", text: "0 %" });
      const actionLine = el("div", { class: "task-action" });
      const root = el("div", { class: "task", "data-task": taskId, "data-progress": 0 }, el("div", { class: "task-label" }, name, percent), bar, actionLine);
      $(".tasks", this.root).append(root);
      task = { root, bar, fill, name, percent, actionLine };
      this.tasks.set(taskId, task);
    }
    if (title) task.name.textContent = title;
    if (typeof progress === "number") {
      const value = Math.max(0, Math.min(100, progress));
      task.fill.style.width = `${value}%`;
      task.bar.setAttribute("aria-valuenow", String(value));
      task.root.dataset.progress = String(value);
      task.percent.textContent = `${Math.round(value)} %`;
    }
    if (action !== undefined) task.actionLine.textContent = action ?? "";
    if (state) {
      task.root.classList.add(state);
      if (state === "failed") task.percent.textContent = "failed";
    }
  }

  report(report) {
    $(".report-block", this.root).hidden = false;
    const box = $(".report", this.root);
    box.replaceChildren();
    if (report && typeof report === "object") {
      box.append(el("h4", { text: report.title ?? "Report" }));
      if (report.summary) box.append(el("p", { text: report.summary }));
      if (Array.isArray(report.sections)) box.append(el("ul", {}, ...report.sections.map((s) => el("li", { text: typeof s === "string" ? s : JSON.stringify(s) }))));
    } else {
      box.append(el("p", { text: String(report) }));
    }
  }

  close() {
    clearInterval(this.countdown);
    this.client.close();
  }
}

/** The session view: three panes and the chat box for one session. */
const view = {
  panes: [],
  sessionId: null,

  watch(sessionId) {
    for (const pane of this.panes) pane.close();
    this.sessionId = sessionId;
    const token = currentToken();
    this.panes = PRESETS.map((preset) => new Pane(preset, sessionId, token));
    $("#panes").replaceChildren(...this.panes.map((p) => p.root));
    $("#session-shown").textContent = sessionId;
    $("#session-line").hidden = false;
    $("#chat").hidden = false;
    $("#chat-log").replaceChildren();
    $("#session-id").value = sessionId;
    const url = new URL(location.href);
    url.searchParams.set("session", sessionId);
    history.replaceState(null, "", url);
  },

  async ask(text) {
    const desktop = this.panes[0];
    if (!desktop) return;
    $("#chat-log").append(el("div", { class: "question", text }));
    const answer = el("div", { class: "answer streaming" });
    const meta = el("span", { class: "meta", text: "streaming..." });
    const body = document.createTextNode("");
    answer.append(body, meta);
    $("#chat-log").append(answer);
    try {
      const stream = desktop.client.query(text);
      for await (const chunk of stream) body.data += chunk.content;
      const complete = await stream.done;
      answer.classList.replace("streaming", "complete");
      meta.textContent = `${complete.total_chunks} chunks, seq ${complete.seq}`;
    } catch (err) {
      answer.classList.replace("streaming", "failed");
      meta.textContent = `error: ${err.message}`;
    }
  },
};

async function startResearch(query) {
  notice("Starting a research run...");
  let response;
  let body;
  try {
    response = await fetch("/api/research/start", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query, user_id: "page" }),
    });
    body = await response.json();
  } catch (err) {
    notice(`The broker could not be reached: ${err.message}`, { error: true });
    return;
  }
  if (response.status !== 201) {
    notice(`Research start refused (${response.status}): ${body?.error ?? "no reason given"}`, { error: true });
    return;
  }
  if (body.token) {
    $("#token").value = body.token;
    showTokenState();
  }
  notice(body.token ? "Research started; the broker answered with a token, which the panes use." : "Research started.");
  view.watch(body.session_id);
}

// -- the viewers view --------------------------------------------------------------

let viewersTimer = null;

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refreshViewers() {
  let stats;
  try {
    stats = await getJson("/api/websocket/stats");
  } catch (err) {
    $("#stats-summary").textContent = `Stats unavailable: ${err.message}`;
    return;
  }
  $("#stats-summary").textContent =
    `${stats.active_connections} connections, ${stats.active_sessions} sessions, ` +
    `${stats.total_messages_sent} messages sent, up ${Math.round(stats.uptime_seconds)} s`;
  const ids = (stats.connected_sessions ?? []).map((s) => (typeof s === "string" ? s : s.session_id));
  const cards = await Promise.all(
    ids.map(async (id) => {
      try {
        return sessionCard(await getJson(`/api/sessions/${encodeURIComponent(id)}`));
      } catch {
        return null; // gone between the two requests
      }
    }),
  );
  const shown = cards.filter(Boolean);
  $("#sessions-list").replaceChildren(...(shown.length ? shown : [el("p", { class: "muted", text: "No session has a viewer right now." })]));
}

function sessionCard(info) {
  const link = el("a", { href: `/?session=${encodeURIComponent(info.session_id)}`, text: "watch" });
  const head = el(
    "h3",
    {},
    el("code", { text: info.session_id }),
    el("span", { class: "muted", text: `last seq ${info.last_seq}, ${info.buffered_messages} buffered, epoch ${info.epoch}` }),
    link,
  );
  const rows = (info.connections ?? []).map((c) => {
    const behind = typeof c.acked_seq === "number" ? info.last_seq - c.acked_seq : null;
    return el(
      "tr",
      { "data-connection": c.connection_id },
      el("td", {}, el("code", { text: c.connection_id })),
      el("td", { text: c.user_id ?? "-" }),
      el("td", { text: c.transport ?? "-" }),
      el("td", {}, el("code", { text: JSON.stringify(c.events) })),
      el("td", { class: "acked", text: c.acked_seq ?? "-" }),
      el("td", { text: behind === null ? "-" : String(behind) }),
      el("td", { text: c.queued_bytes ?? 0 }),
    );
  });
  const table = el(
    "table",
    {},
    el("thead", {}, el("tr", {}, ...["connection", "user", "transport", "filter", "acked seq", "behind", "queued bytes"].map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows),
  );
  return el("section", { class: "session-card card", "data-session": info.session_id }, head, table);
}

// -- wiring --------------------------------------------------------------------------

function showView() {
  const viewers = location.hash === "#viewers";
  $("#view-session").hidden = viewers;
  $("#view-viewers").hidden = !viewers;
  $("#tab-session").toggleAttribute("aria-current", !viewers);
  $("#tab-viewers").toggleAttribute("aria-current", viewers);
  if (viewers) $("#tab-viewers").setAttribute("aria-current", "page");
  else $("#tab-session").setAttribute("aria-current", "page");
  clearInterval(viewersTimer);
  if (viewers) {
    refreshViewers();
    viewersTimer = setInterval(refreshViewers, 2000);
  }
}

function main() {
  const params = new URL(location.href).searchParams;
  if (params.get("token")) $("#token").value = params.get("token");
  showTokenState();
  $("#token").addEventListener("input", showTokenState);
  $("#start-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = $("#query").value.trim();
    if (query) startResearch(query);
  });
  $("#watch-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("#session-id").value.trim();
    if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(id)) {
      notice("A session id is 1 to 128 letters, digits or _ . : -", { error: true });
      return;
    }
    notice(null);
    view.watch(id);
  });
  $("#chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("#chat-input").value.trim();
    if (text) view.ask(text);
  });
  window.addEventListener("hashchange", showView);
  showView();
  if (params.get("session")) view.watch(params.get("session"));
  window.actorBrokerPage = view; // for tests and curious developers
}

main();
