/**
 * actor-broker.js: the browser client of actor-broker.
 *
 * One ES module, no dependencies, no build step. The daemon serves it at
 * `/client/actor-broker.js`; docs/clients.md describes it for application
 * developers and docs/protocol.md is the wire contract it follows (section
 * numbers below are that file's).
 *
 *   import { connect } from "/client/actor-broker.js";
 *
 *   const client = connect("", { session: "abc123", events: "essential", token });
 *   client.on("task_progress", (msg) => bar(msg.task_id).value = msg.progress);
 *   client.on("gap", (gap) => showLost(gap.from_seq, gap.to_seq));   // to_seq null: epoch changed
 *   client.on("state", (s) => badge(s.state));                       // connecting, connected, reconnecting, closed, failed
 *   for await (const msg of client) render(msg);                       // session messages (and gaps) in seq order
 *   for await (const chunk of client.query("What changed?")) out.append(chunk.content);
 *   client.close();
 *
 * connect(url, options) -> BrokerClient, already connecting.
 *   url: the broker ("" or "/" for the page's own origin, "http://host:8050",
 *        "ws://host:8050"), or a full endpoint URL ("ws://host:8050/ws?session_id=abc",
 *        "/ws/research/abc").
 *   options:
 *     session        session id (required unless the URL names it)
 *     endpoint       "research" (/ws/research/{id}, the default) or "chat" (/ws?session_id=)
 *     events         filter: a string ("all", "essential,-error") or a list (docs/protocol.md 3.4)
 *     user           user_id to connect as
 *     replay         "all" | "missed" | "none": what the first connection replays (3.5);
 *                    the endpoint's default when absent
 *     token          a JWT (string), when the broker requires tokens (3.2)
 *     getToken       async () => JWT: called for the first connection when `token` is
 *                    absent, `refreshMarginMs` before the token's `exp` (then sent as
 *                    `refresh`, 3.6), and once after a 4001 close
 *     tokenIn        "subprotocol" (default: ["bearer", token], kept out of URLs and
 *                    access logs) or "query" (?token=); Server-Sent Events always use ?token=
 *     transport      "websocket" (default), "sse" (EventSource on /sse..., docs/protocol.md
 *                    section 8 of the wire contract) or "auto" (WebSocket; Server-Sent
 *                    Events after `fallbackAfter` failed WebSocket attempts that never
 *                    reached a greeting)
 *     ack            send `ack` for delivered messages (default true), batched every
 *                    `ackIntervalMs` (default 500; at most 2 frames a second, well
 *                    under the server's client rate limit)
 *     backoff        {initialMs: 500, maxMs: 15000, factor: 2}: reconnect delays, each
 *                    with full jitter (a random delay between half and all of it)
 *     connectTimeoutMs  a handshake that has not been greeted after this long is
 *                    abandoned and retried (default 10000)
 *     WebSocket, EventSource   constructors to use (default: the browser's)
 *
 * What the client guarantees: each session message reaches the application
 * once, in seq order, however often the connection drops. It keeps the
 * session's `epoch` and the highest `seq` it has accounted for, reconnects
 * with `last_seq` and `epoch` (3.5), drops anything at or below that seq,
 * and, with the "everything" filter, treats a seq that skips ahead without
 * a `gap` as a loss in transit and reconnects from the last one it has. A
 * `gap` is passed to the application (range lost, or `to_seq: null` when the
 * epoch changed, after which the client starts the session afresh and emits
 * `reset`). Closes it does not retry: 1008 (bad parameter), 1009, 4001
 * (token; one retry with `getToken` when given), 4003, and 1000 after
 * `session_closed`. `server_shutdown` is honoured: the next attempt waits
 * `reconnect_after_ms`. 4008 (slow consumer) and every other close or
 * network failure reconnect with backoff.
 *
 * client.on(type, fn) -> off(): `type` is a message type (any wire type:
 *   "task_progress", "keepalive", "system_notification", ...), "message"
 *   (every session message and gap, in order), or one of the client's own
 *   events: "state" {state, attempt, delayMs, retryAt, code, reason, transport},
 *   "open" (the greeting), "recovered" {count, from_seq, to_seq} after a resume,
 *   "reset" {epoch, previous_epoch}, "closed" {code, reason, fatal}.
 * for await (const msg of client): session messages and gaps, in order; ends
 *   when the client is closed, or after yielding `session_closed`; throws a BrokerError
 *   on a close it does not retry.
 * client.query(text, extra) -> async iterable of `chunk` messages; `.done` is a
 *   promise of the `complete` message; iteration throws a BrokerError at the
 *   query's `error` (or a `busy` answer).
 * client.subscribe(events) / client.unsubscribe(events) -> promise of the new
 *   filter's echo (3.6). client.send(obj) sends a raw message.
 * client.close(): ends the client (a `disconnect`, then close 1000).
 * Read-only: client.state, client.epoch, client.lastSeq, client.filter,
 *   client.transport, client.sessionId, client.connectionId, client.userId.
 */

/** Close codes that a reconnect with the same parameters cannot cure (docs/protocol.md 3.11). */
const FATAL_CLOSES = new Set([1008, 1009, 4001, 4003]);
const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 15000, factor: 2 };
/** Without a message for this long, a resumed connection's replay is taken as complete. */
const RECOVERY_IDLE_MS = 300;

/** A failure the application should see: a refused connection, a query error, a bad answer. */
export class BrokerError extends Error {
  constructor(message, { code = null, reason = null, kind = "error", detail = null } = {}) {
    super(message);
    this.name = "BrokerError";
    /** the WebSocket close code, HTTP status or error `code` string */
    this.code = code;
    this.reason = reason;
    /** "closed" (connection refused or ended for good), "query", "request", "unsupported" */
    this.kind = kind;
    this.detail = detail;
  }
}

/** Open a client; it starts connecting at once. */
export function connect(url, options = {}) {
  const client = new BrokerClient(url, options);
  client.start();
  return client;
}

/** The `exp` claim of a JWT (seconds), read without verifying it; null if absent. */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/** A human sentence for a close the client reports; the page shows it. */
export function describeClose(code, reason) {
  const why = reason ? `: ${reason}` : "";
  switch (code) {
    case 4001:
      return `A token is required or it is not valid (4001${why}). Paste a token, or start a research run to get one.`;
    case 4003:
      return `This token does not cover the session or user (4003${why}).`;
    case 1008:
      return `The broker refused the connection's parameters (1008${why}).`;
    case 1009:
      return `A message was too large for the broker (1009${why}).`;
    default:
      return `Connection closed (${code}${why}).`;
  }
}

function normaliseEvents(events) {
  if (events == null) return null;
  if (Array.isArray(events)) return events.join(",");
  return String(events);
}

/** The handshake's `events` value that reproduces a filter echo (docs/protocol.md 3.4). */
function eventsParamFromEcho(echo) {
  if (!Array.isArray(echo) || echo.length === 0) return null;
  return echo.join(",");
}

/** True when a filter echo admits `type`. */
function filterAdmits(echo, type) {
  if (!Array.isArray(echo)) return true;
  if (echo[0] === "*") return !echo.includes(`-${type}`);
  return echo.includes(type);
}

/** An async queue: what a `for await` reads. */
class Channel {
  constructor() {
    this.items = [];
    this.waiters = [];
    this.ended = false;
    this.failure = null;
  }
  push(item) {
    if (this.ended) return;
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve({ value: item, done: false });
    else this.items.push(item);
  }
  end(failure = null) {
    if (this.ended) return;
    this.ended = true;
    this.failure = failure;
    for (const waiter of this.waiters.splice(0)) {
      if (failure) waiter.reject(failure);
      else waiter.resolve({ value: undefined, done: true });
    }
  }
  next() {
    if (this.items.length) return Promise.resolve({ value: this.items.shift(), done: false });
    if (this.ended) {
      if (this.failure) {
        const failure = this.failure;
        this.failure = null; // thrown once; then the iterator is simply done
        return Promise.reject(failure);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }
}

/** One running query: an async iterable of its chunks (docs/protocol.md 3.7). */
class QueryStream {
  constructor(client, text) {
    this.client = client;
    this.query = text;
    /** set by the query's `query_start` */
    this.queryId = null;
    /** the answer so far */
    this.text = "";
    this.chunks = new Channel();
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    this.done.catch(() => {}); // a caller that only iterates must not see an unhandled rejection
  }
  started(message) {
    this.queryId = message.query_id;
  }
  chunk(message) {
    this.text += message.content;
    this.chunks.push(message);
  }
  complete(message) {
    this.chunks.end();
    this.resolveDone(message);
  }
  fail(error) {
    this.chunks.end(error);
    this.rejectDone(error);
  }
  [Symbol.asyncIterator]() {
    return { next: () => this.chunks.next(), return: async () => ({ value: undefined, done: true }) };
  }
}

export class BrokerClient {
  constructor(url, options = {}) {
    this.options = options;
    const target = this._parseTarget(url ?? "", options);
    this.base = target.base; // http(s)://host:port
    this.sessionId = target.session;
    this.endpoint = target.endpoint; // "research" | "chat"
    if (!this.sessionId) throw new BrokerError("a session id is required (options.session)", { kind: "request" });
    this.userId = options.user ?? target.user ?? null;
    this.replay = options.replay ?? target.replay ?? null;
    /** what the first connection replays: the endpoint's default unless asked (docs/protocol.md 3.1) */
    this.firstReplay = this.replay ?? (this.endpoint === "chat" ? "missed" : "all");
    this.events = normaliseEvents(options.events ?? target.events);
    this.token = options.token ?? target.token ?? null;
    this.tokenIn = options.tokenIn ?? "subprotocol";
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this.ackEnabled = options.ack !== false;
    this.ackIntervalMs = options.ackIntervalMs ?? 500;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this.refreshMarginMs = options.refreshMarginMs ?? 30000;
    this.fallbackAfter = options.fallbackAfter ?? 2;
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    this.EventSourceImpl = options.EventSource ?? globalThis.EventSource;
    this.transport = options.transport === "sse" ? "sse" : "websocket";
    this.autoFallback = options.transport === "auto";

    /** the session's epoch; null until the first greeting */
    this.epoch = null;
    /** highest seq delivered or declared lost (gap); null: none yet in this epoch */
    this.cursor = null;
    /** highest seq delivered to the application */
    this.lastSeq = null;
    /** seq a fresh connection has decided not to want (replay=none) or 0 */
    this.floor = 0;
    /** on the current connection, the seq after which messages are live and must be contiguous */
    this.liveFrom = 0;
    this.filter = null;
    this.connectionId = null;
    this.state = "idle";
    this.attempt = 0;
    this.everGreeted = false;
    this.failedWithoutGreeting = 0;

    this.listeners = new Map();
    this.channels = new Set();
    this.queries = []; // started or waiting for their query_start, oldest first
    this.pending = []; // requests waiting for an answer: {kind, resolve, reject}
    this.outbox = []; // frames to send once connected

    this.socket = null;
    this.source = null;
    this.greeted = false;
    this.closing = false;
    this.finished = false;
    this.sessionClosed = false;
    this.shutdownDelayMs = null;
    this.resumedFrom = null;
    this.recovery = null;
    this.triedTokenAfter4001 = false;
    this.lastAcked = null;
    this.timers = { retry: null, ack: null, refresh: null, connect: null, idle: null, recovery: null };
    this.lastReceivedAt = 0;
    this.keepaliveMs = 0;
  }

  // -- public API ------------------------------------------------------------

  /** Start connecting (connect() calls it). */
  start() {
    if (this.state !== "idle") return;
    if (!this.token && this.options.getToken) {
      this._setState("connecting");
      Promise.resolve()
        .then(() => this.options.getToken())
        .then((token) => {
          this.token = token;
          this._open();
        })
        .catch((err) => this._fail(0, `getToken failed: ${err}`));
    } else {
      this._open();
    }
  }

  /** Listen for a message type or a client event; returns a function that removes the listener. */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }

  /** Session messages (and gaps) from now on, in seq order. */
  [Symbol.asyncIterator]() {
    const channel = new Channel();
    if (this.finished) channel.end(this.finalError);
    else this.channels.add(channel);
    return {
      next: () => channel.next(),
      return: async () => {
        this.channels.delete(channel);
        channel.end();
        return { value: undefined, done: true };
      },
    };
  }

  /** Same as iterating the client: `for await (const msg of client.messages())`. */
  messages() {
    return { [Symbol.asyncIterator]: () => this[Symbol.asyncIterator]() };
  }

  /** Ask the session's agent (docs/protocol.md 3.7); the answer streams as chunks. */
  query(text, extra = {}) {
    this._needWebSocket("query");
    if (!filterAdmits(this.filter, "chunk") || !filterAdmits(this.filter, "complete")) {
      throw new BrokerError("this connection's filter excludes chunk or complete; subscribe to them first", {
        kind: "request",
      });
    }
    const stream = new QueryStream(this, text);
    this.queries.push(stream);
    this._sendSoon({ ...extra, type: "query", query: text });
    return stream;
  }

  /** Add types or presets to the filter; resolves with the new filter echo. */
  subscribe(events) {
    return this._filterRequest("subscribe", events);
  }

  /** Remove types or presets from the filter; resolves with the new filter echo. */
  unsubscribe(events) {
    return this._filterRequest("unsubscribe", events);
  }

  /** Send a raw client message (an object); queued until the connection is greeted. */
  send(message) {
    this._needWebSocket(message?.type ?? "send");
    this._sendSoon(message);
  }

  /** End the client: tells the server, closes the socket, ends every iterator. */
  close() {
    if (this.finished) return;
    this.closing = true;
    const socket = this.socket;
    if (socket && socket.readyState === 1) {
      this._flushAck();
      try {
        socket.send(JSON.stringify({ type: "disconnect" }));
      } catch {
        /* closing anyway */
      }
      socket.close(1000, "client close");
    } else if (socket) {
      socket.close();
    }
    this.source?.close();
    this._finish(null, { code: 1000, reason: "closed by the application", fatal: false });
  }

  // -- connecting --------------------------------------------------------------

  _parseTarget(url, options) {
    const here = globalThis.location?.href ?? "http://127.0.0.1:8050/";
    const parsed = new URL(url || "/", here);
    const protocol = { "ws:": "http:", "wss:": "https:" }[parsed.protocol] ?? parsed.protocol;
    const base = `${protocol}//${parsed.host}`;
    const q = parsed.searchParams;
    const target = {
      base,
      session: options.session ?? null,
      endpoint: options.endpoint ?? "research",
      user: q.get("user_id"),
      events: q.get("events"),
      replay: q.get("replay"),
      token: q.get("token"),
    };
    const research = parsed.pathname.match(/^\/(?:ws|sse)\/research\/([^/]+)$/);
    if (research) {
      target.session = options.session ?? decodeURIComponent(research[1]);
      target.endpoint = "research";
    } else if (/^\/(?:ws|sse)$/.test(parsed.pathname)) {
      target.session = options.session ?? q.get("session_id");
      target.endpoint = "chat";
    }
    return target;
  }

  /** The URL of the next attempt: the endpoint plus filter, resume point and token. */
  _url(kind) {
    const ws = kind === "websocket";
    const scheme = ws ? this.base.replace(/^http/, "ws") : this.base;
    const prefix = ws ? "/ws" : "/sse";
    const path =
      this.endpoint === "research" ? `${prefix}/research/${encodeURIComponent(this.sessionId)}` : prefix;
    const params = new URLSearchParams();
    if (this.endpoint !== "research") params.set("session_id", this.sessionId);
    if (this.userId) params.set("user_id", this.userId);
    const events = this.filter ? eventsParamFromEcho(this.filter) : this.events;
    if (events) params.set("events", events);
    const resume = this._resumePoint();
    if (resume !== null) {
      params.set("last_seq", String(resume));
      params.set("epoch", this.epoch);
    } else if (this.replay) {
      params.set("replay", this.replay);
    }
    if (this.token && (!ws || this.tokenIn !== "subprotocol")) params.set("token", this.token);
    const query = params.toString();
    return `${scheme}${path}${query ? `?${query}` : ""}`;
  }

  /** The `last_seq` to resume after, or null for a first connection. */
  _resumePoint() {
    if (this.epoch === null) return null;
    return this.cursor ?? this.floor;
  }

  _open() {
    if (this.finished) return;
    this.greeted = false;
    this.shutdownDelayMs = null;
    this.resumedFrom = this._resumePoint();
    this._setState(this.attempt === 0 && !this.everGreeted ? "connecting" : "reconnecting-now");
    if (this.transport === "sse") this._openSse();
    else this._openWebSocket();
    clearTimeout(this.timers.connect);
    this.timers.connect = setTimeout(() => {
      if (!this.greeted) this._abandon("no greeting within the connect timeout");
    }, this.connectTimeoutMs);
  }

  _openWebSocket() {
    const protocols = this.token && this.tokenIn === "subprotocol" ? ["bearer", this.token] : undefined;
    let socket;
    try {
      socket = protocols ? new this.WebSocketImpl(this._url("websocket"), protocols) : new this.WebSocketImpl(this._url("websocket"));
    } catch (err) {
      this._fail(0, `cannot open a WebSocket: ${err.message ?? err}`);
      return;
    }
    this.socket = socket;
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // the server sends JSON only; anything else is not ours to act on
      }
      this._receive(message);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this._closed(event.code, event.reason);
    };
    socket.onerror = () => {}; // a close event always follows
  }

  _openSse() {
    if (!this.EventSourceImpl) {
      this._fail(0, "this browser has no EventSource");
      return;
    }
    const url = this._url("sse");
    const source = new this.EventSourceImpl(url);
    this.source = source;
    source.onmessage = (event) => {
      if (this.source !== source) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this._receive(message);
    };
    source.onerror = () => {
      if (this.source !== source) return;
      if (source.readyState === 0) {
        // The browser reconnects by itself, sending Last-Event-ID (<epoch>/<seq>);
        // what arrives twice is dropped by seq as on a WebSocket resume.
        this.greeted = false;
        this.resumedFrom = this._resumePoint();
        this._setState("reconnecting", { delayMs: null, retryAt: null });
        return;
      }
      // Given up (an HTTP error or a wrong content type): find out which, then decide.
      source.close();
      this.source = null;
      this._probeSse(url);
    };
  }

  /** An EventSource hides the HTTP status of a refusal; a plain fetch of the same URL shows it. */
  async _probeSse(url) {
    const abort = new AbortController();
    let status = 0;
    let body = null;
    try {
      const response = await fetch(url, { signal: abort.signal, headers: { Accept: "text/event-stream" } });
      status = response.status;
      if (status !== 200) body = await response.json().catch(() => null);
    } catch {
      status = 0;
    } finally {
      abort.abort();
    }
    if (this.finished) return;
    const code = body?.code ?? (status === 401 ? 4001 : status === 403 ? 4003 : status === 400 ? 1008 : 1006);
    this._closed(code, body?.error ?? (status ? `HTTP ${status}` : "stream ended"));
  }

  /** Give up on a connection that does not work (no greeting, a hole, a silent server) and reconnect. */
  _abandon(reason) {
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onclose = null;
      socket.close(4000, reason.slice(0, 100));
    }
    if (this.source) {
      this.source.close();
      this.source = null;
    }
    this._closed(1006, reason);
  }

  _closed(code, reason) {
    clearTimeout(this.timers.connect);
    clearTimeout(this.timers.idle);
    clearTimeout(this.timers.recovery);
    this._finishRecovery();
    for (const request of this.pending.splice(0)) {
      request.reject(new BrokerError("the connection was lost before the answer came", { kind: "request", code }));
    }
    if (this.finished) return;
    if (this.closing) return;
    if (this.sessionClosed) {
      this._finish(null, { code, reason: reason || "session closed", fatal: false });
      return;
    }
    if (!this.greeted) this.failedWithoutGreeting += 1;
    if (code === 4001 && this.options.getToken && !this.triedTokenAfter4001) {
      this.triedTokenAfter4001 = true;
      Promise.resolve()
        .then(() => this.options.getToken())
        .then((token) => {
          this.token = token;
          this._open();
        })
        .catch(() => this._fail(code, reason));
      return;
    }
    if (FATAL_CLOSES.has(code)) {
      this._fail(code, reason);
      return;
    }
    if (
      this.autoFallback &&
      this.transport === "websocket" &&
      !this.everGreeted &&
      this.failedWithoutGreeting >= this.fallbackAfter
    ) {
      this.transport = "sse"; // WebSockets do not get through here: follow over Server-Sent Events
      this.attempt = 0;
    }
    let delayMs;
    if (this.shutdownDelayMs !== null) {
      delayMs = this.shutdownDelayMs + Math.random() * Math.min(1000, this.shutdownDelayMs / 2);
    } else if (code === 4008) {
      delayMs = Math.random() * this.backoff.initialMs; // not our network's fault: come back at once
    } else {
      const ceiling = Math.min(this.backoff.maxMs, this.backoff.initialMs * this.backoff.factor ** this.attempt);
      delayMs = ceiling / 2 + (Math.random() * ceiling) / 2;
    }
    this.attempt += 1;
    const retryAt = Date.now() + delayMs;
    this._setState("reconnecting", { delayMs: Math.round(delayMs), retryAt, code, reason });
    clearTimeout(this.timers.retry);
    this.timers.retry = setTimeout(() => this._open(), delayMs);
  }

  _fail(code, reason) {
    const error = new BrokerError(describeClose(code, reason), { code, reason, kind: "closed" });
    this._finish(error, { code, reason, fatal: true });
  }

  _finish(error, detail) {
    if (this.finished) return;
    this.finished = true;
    this.finalError = error;
    for (const timer of Object.values(this.timers)) clearTimeout(timer);
    this._setState(error ? "failed" : "closed", detail);
    this._emit("closed", { ...detail });
    for (const channel of this.channels) channel.end(error);
    this.channels.clear();
    const queryError = error ?? new BrokerError("the client was closed", { kind: "closed", code: detail.code });
    for (const stream of this.queries.splice(0)) stream.fail(queryError);
    for (const request of this.pending.splice(0)) request.reject(queryError);
  }

  _setState(state, detail = {}) {
    const shown = state === "reconnecting-now" ? "reconnecting" : state;
    this.state = shown;
    this._emit("state", {
      state: shown,
      attempt: this.attempt,
      transport: this.transport,
      delayMs: null,
      retryAt: null,
      code: null,
      reason: null,
      ...detail,
    });
  }

  // -- receiving -----------------------------------------------------------------

  _receive(message) {
    this.lastReceivedAt = Date.now();
    this._watchIdle();
    if (typeof message !== "object" || message === null) return;
    const type = message.type;
    if (!this.greeted) {
      if (type === "connected" || type === "connection_established") this._greeting(message);
      else this._emit(type, message);
      return;
    }
    if (typeof message.seq === "number") {
      this._sessionMessage(message);
      return;
    }
    switch (type) {
      case "gap":
        this._gap(message);
        return;
      case "subscribed":
        this.filter = message.events;
        this._answer("subscribe", message.events);
        break;
      case "refreshed":
        this._answer("refresh", message);
        this._scheduleRefresh();
        break;
      case "error":
        this._connectionError(message);
        break;
      case "server_shutdown":
        this.shutdownDelayMs = Number(message.reconnect_after_ms) || 2000;
        break;
      case "session_closed":
        this.sessionClosed = true;
        for (const channel of this.channels) channel.push(message); // the stream's last item
        break;
      default:
        break;
    }
    this._emit(type, message);
  }

  _greeting(message) {
    clearTimeout(this.timers.connect);
    const previousEpoch = this.epoch;
    const resumed = this.resumedFrom !== null;
    this.greeted = true;
    this.everGreeted = true;
    this.attempt = 0;
    this.failedWithoutGreeting = 0;
    this.triedTokenAfter4001 = false;
    this.lastAcked = null;
    this.connectionId = message.connection_id ?? null;
    this.userId = message.user_id ?? this.userId;
    this.filter = message.events ?? this.filter;
    this.keepaliveMs = (Number(message.keepalive_interval) || 0) * 1000;
    const newest = Number(message.last_seq) || 0;
    if (previousEpoch !== null && message.epoch !== previousEpoch) {
      // The history we knew is gone (a restart without a durable backend, or
      // the session was deleted and created again): seq starts afresh.
      this.epoch = message.epoch;
      this.cursor = null;
      this.floor = 0;
      this.liveFrom = newest;
      this._emit("reset", { epoch: message.epoch, previous_epoch: previousEpoch });
    } else {
      this.epoch = message.epoch;
      if (resumed) {
        this.liveFrom = this.resumedFrom;
      } else {
        this.liveFrom = newest;
        // A reconnect before any delivery resumes from the start of history
        // (replay=missed may then bring more than it would have); replay=none
        // wants only what follows the greeting.
        if (this.firstReplay === "none") this.cursor = newest;
        this.floor = 0; // never lose a message to save a repeat of history
      }
    }
    this.recovery = resumed ? { count: 0, from: this.resumedFrom + 1, to: newest } : null;
    if (this.recovery && (this.cursor ?? 0) >= newest) this._finishRecovery();
    else if (this.recovery) this._armRecoveryTimer();
    this._setState("connected", { connectionId: this.connectionId });
    this._emit("open", message);
    this._emit(message.type, message);
    this._scheduleRefresh();
    this._scheduleAck();
    for (const frame of this.outbox.splice(0)) this._write(frame);
  }

  _sessionMessage(message) {
    const seq = message.seq;
    if (this.cursor !== null && seq <= this.cursor) return; // delivered (or declared lost) already
    if (seq > this.liveFrom && this._everythingFilter()) {
      const expected = Math.max(this.cursor ?? 0, this.liveFrom) + 1;
      if (seq !== expected) {
        // A hole the server did not announce: lost in transit. Resume from what we have.
        this._abandon(`seq ${seq} arrived where ${expected} was due`);
        return;
      }
    }
    this.cursor = seq;
    this.lastSeq = seq;
    if (this.recovery) {
      if (seq <= this.recovery.to) this.recovery.count += 1;
      if (seq >= this.recovery.to) this._finishRecovery();
      else this._armRecoveryTimer();
    }
    this._routeQuery(message);
    this._deliver(message);
    this._scheduleAck();
  }

  _gap(message) {
    if (message.to_seq === null || message.to_seq === undefined) {
      if (message.epoch && message.epoch !== this.epoch) {
        this._emit("reset", { epoch: message.epoch, previous_epoch: this.epoch });
        this.epoch = message.epoch;
      }
      this.cursor = null;
      this.floor = 0;
    } else {
      if (this.cursor !== null && message.to_seq <= this.cursor) return; // already known (an SSE reconnect repeats it)
      this.cursor = message.to_seq;
    }
    if (this.recovery && message.to_seq !== null && message.to_seq >= this.recovery.to) this._finishRecovery();
    this._deliver({ ...message, reset: message.to_seq === null || message.to_seq === undefined });
  }

  _deliver(message) {
    this._emit("message", message);
    for (const channel of this.channels) channel.push(message);
    this._emit(message.type, message);
  }

  _everythingFilter() {
    return Array.isArray(this.filter) && this.filter.length === 1 && this.filter[0] === "*";
  }

  _armRecoveryTimer() {
    clearTimeout(this.timers.recovery);
    // With a filter, the replay may never reach the greeting's last_seq: a
    // quiet moment after the last replayed message ends the recovery.
    this.timers.recovery = setTimeout(() => this._finishRecovery(), RECOVERY_IDLE_MS);
  }

  _finishRecovery() {
    clearTimeout(this.timers.recovery);
    const recovery = this.recovery;
    if (!recovery) return;
    this.recovery = null;
    this._emit("recovered", { count: recovery.count, from_seq: recovery.from, to_seq: recovery.to });
  }

  /** No message, not even a keepalive, for two keepalive intervals: the path is dead. */
  _watchIdle() {
    clearTimeout(this.timers.idle);
    if (!this.keepaliveMs || this.finished) return;
    this.timers.idle = setTimeout(() => this._abandon("the server went silent"), 2 * this.keepaliveMs + 5000);
  }

  _connectionError(message) {
    const error = new BrokerError(message.error ?? "error", { code: message.code, kind: "request", detail: message });
    if (message.code === "busy") {
      const index = this.queries.findIndex((q) => q.queryId === null);
      if (index >= 0) this.queries.splice(index, 1)[0].fail(error);
      return;
    }
    if (message.code === "bad_token") {
      this._answer("refresh", null, error);
      return;
    }
    if (this.pending.length) this.pending.shift().reject(error);
  }

  // -- queries -------------------------------------------------------------------

  _routeQuery(message) {
    if (!this.queries.length) return;
    const type = message.type;
    if (type === "query_start") {
      // One query runs at a time per session; ours is the oldest waiting one
      // with this text (query_start does not echo client fields).
      const stream = this.queries.find(
        (q) => q.queryId === null && q.query === message.query && (!this.userId || message.user_id === this.userId),
      );
      stream?.started(message);
      return;
    }
    const stream = message.query_id && this.queries.find((q) => q.queryId === message.query_id);
    if (!stream) return;
    if (type === "chunk") stream.chunk(message);
    else if (type === "complete" || type === "error") {
      this.queries.splice(this.queries.indexOf(stream), 1);
      if (type === "complete") stream.complete(message);
      else stream.fail(new BrokerError(message.error ?? "the query failed", { code: message.code, kind: "query", detail: message }));
    }
  }

  // -- sending -------------------------------------------------------------------

  _needWebSocket(what) {
    if (this.transport !== "websocket") {
      throw new BrokerError(`${what} needs a WebSocket; this client follows over Server-Sent Events`, {
        kind: "unsupported",
      });
    }
    if (this.finished) throw new BrokerError("the client is closed", { kind: "closed" });
  }

  _sendSoon(frame) {
    if (this.greeted && this.socket?.readyState === 1) this._write(frame);
    else this.outbox.push(frame);
  }

  _write(frame) {
    try {
      this.socket.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _filterRequest(kind, events) {
    this._needWebSocket(kind);
    const list = Array.isArray(events) ? events : String(events).split(",");
    return new Promise((resolve, reject) => {
      this.pending.push({ kind: "subscribe", resolve, reject });
      this._sendSoon({ type: kind, events: list });
    });
  }

  _answer(kind, value, error = null) {
    const index = this.pending.findIndex((p) => p.kind === kind);
    if (index < 0) return;
    const [request] = this.pending.splice(index, 1);
    if (error) request.reject(error);
    else request.resolve(value);
  }

  _scheduleAck() {
    if (!this.ackEnabled || this.transport !== "websocket" || this.timers.ack) return;
    this.timers.ack = setTimeout(() => {
      this.timers.ack = null;
      this._flushAck();
    }, this.ackIntervalMs);
  }

  _flushAck() {
    if (!this.ackEnabled || this.lastSeq === null || this.lastSeq === this.lastAcked) return;
    if (!this.greeted || this.socket?.readyState !== 1) return;
    if (this._write({ type: "ack", seq: this.lastSeq })) this.lastAcked = this.lastSeq;
  }

  /** Replace the token before it expires (docs/protocol.md 3.6 `refresh`), via options.getToken. */
  _scheduleRefresh() {
    clearTimeout(this.timers.refresh);
    if (!this.options.getToken || !this.token || this.transport !== "websocket") return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const delay = Math.max(0, exp * 1000 - Date.now() - this.refreshMarginMs);
    this.timers.refresh = setTimeout(async () => {
      let token;
      try {
        token = await this.options.getToken();
      } catch (err) {
        this._emit("refresh_failed", { error: String(err) });
        return;
      }
      this.token = token;
      if (!this.greeted || this.socket?.readyState !== 1) return; // the next connection uses it
      const answer = new Promise((resolve, reject) => this.pending.push({ kind: "refresh", resolve, reject }));
      this._write({ type: "refresh", token });
      answer.catch((err) => this._emit("refresh_failed", { error: err.message }));
    }, delay);
  }

  // -- listeners -------------------------------------------------------------------

  _emit(type, payload) {
    const listeners = this.listeners.get(type);
    if (!listeners) return;
    for (const fn of [...listeners]) {
      try {
        fn(payload, this);
      } catch (err) {
        // A listener's bug must not break delivery to the others, nor the client.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}
