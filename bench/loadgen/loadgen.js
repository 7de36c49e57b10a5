'use strict';
// WebSocket load generator for bench/run.py: opens the clients, checks every
// message they get, and reports. Driven over stdin/stdout, one JSON object a line.
//
//   node loadgen.js '<config json>'
//
// config: {bases: ["ws://127.0.0.1:P/ws/research/", ...], query: "?replay=none",
//          warm: {session, clients}, sessions: [ids], perSession: n,
//          latency: bool, warmupEvents: i, connectConcurrency: k,
//          churn: {concurrency, minMs, maxMs, sessions: [ids]}}
//
// out: {"event":"warm"} once the warm-up clients are greeted; then, after the
// "open" command, {"event":"ready"} once every client is greeted.
// in:  {"cmd":"open"} | {"cmd":"finish","maxSeq":{sid:n}} | {"cmd":"churn","count":n}
//      | {"cmd":"close_all"} | {"cmd":"exit"}
// "churn" opens (and closes) n more connections, `concurrency` at a time, and
// answers {"event":"churned", ...} when the last one has closed.
//
// Every client checks the seq of every message against the last_seq of its
// greeting: a seq seen twice is a duplicate, one below the highest seen and
// not seen before is out of order, and at the end every seq after last_seq up
// to the session's last one (a client that stays) or up to the highest it saw
// (a client that left early) must have arrived, or it is lost.
// With several bases (nodes of one cluster), client i connects to bases[i % n]
// and a churning client to a random one.
// Times are ms since the Unix epoch from a monotonic clock
// (performance.timeOrigin + performance.now()), comparable with Python's
// time.time() * 1000 on the same machine.

const WebSocket = require('ws');
const { performance } = require('perf_hooks');
const readline = require('readline');

const cfg = JSON.parse(process.argv[2]);
const bases = cfg.bases || [cfg.base];
const now = () => performance.timeOrigin + performance.now();
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

const totals = {
  received: 0, distinct: 0, dup: 0, reorder: 0, lost: 0, control: 0,
  bytes: 0, errors: 0, firstRecv: 0, lastRecv: 0, beforeGreeting: 0,
};
const errorSamples = [];
function error(what) {
  totals.errors += 1;
  if (errorSamples.length < 20) errorSamples.push(what);
}

const latencies = [];
const recordLatency = !!cfg.latency;
const warmupEvents = cfg.warmupEvents || 0;

const SEQ_KEY = Buffer.from('"seq":');

// The integer after '"seq":' in a message's bytes, read without decoding them
// (decoding every message to a string was a good part of the load generator's
// time); null if there is none; NaN if it is there but not a non-negative
// integer (then the caller reports a bad seq). Searched from the end: both
// servers add "seq" after the payload, so the last one is the top-level one
// (3x faster than from the start; the spot check below would see a misread).
function seqOf(buf) {
  const at = buf.lastIndexOf(SEQ_KEY);
  if (at < 0) return null;
  let i = at + SEQ_KEY.length;
  while (buf[i] === 32) i++;
  let n = 0;
  const start = i;
  for (;;) {
    const c = buf[i];
    if (c >= 48 && c <= 57) { n = n * 10 + (c - 48); i++; } else break;
  }
  const next = buf[i];
  if (i === start || next === 46 || next === 101 || next === 69) return NaN; // none, or a fraction / exponent
  return n;
}

// The number after `key` (e.g. '"ts":') in a JSON text, or null.
function numberField(text, key) {
  const at = text.indexOf(key);
  if (at < 0) return null;
  let i = at + key.length;
  while (text.charCodeAt(i) === 32) i++;
  let end = i;
  for (;;) {
    const c = text.charCodeAt(end);
    if ((c >= 48 && c <= 57) || c === 46 || c === 45 || c === 101 || c === 69 || c === 43) end++;
    else break;
  }
  if (end === i) return null;
  return Number(text.slice(i, end));
}

class Seen {
  constructor() { this.bits = new Uint8Array(64); }
  test(s) { return s < this.bits.length && this.bits[s] === 1; }
  set(s) {
    if (s >= this.bits.length) {
      let n = this.bits.length;
      while (n <= s) n *= 2;
      const bigger = new Uint8Array(n);
      bigger.set(this.bits);
      this.bits = bigger;
    }
    this.bits[s] = 1;
  }
  missing(from, to) { // seqs in [from, to] not seen
    let n = 0;
    for (let s = from; s <= to; s++) if (!this.test(s)) n++;
    return n;
  }
}

class Client {
  // counted: one of the clients the 'open' command opens, whose deliveries the
  // 'finish' target counts (not a warm-up or churning client)
  constructor(session, counted, base) {
    this.session = session;
    this.baseUrl = base;
    this.counted = counted;
    this.base = null; // last_seq of the greeting
    this.seen = new Seen();
    this.hi = 0;
    this.distinct = 0;
    this.closing = false;
    this.closed = false;
  }

  open() {
    return new Promise((resolve) => {
      this.greeted = resolve;
      const ws = new WebSocket(this.baseUrl + encodeURIComponent(this.session) + (cfg.query || ''), {
        perMessageDeflate: false,
        skipUTF8Validation: true, // the servers are trusted; spare the load generator
      });
      this.ws = ws;
      ws.on('message', (data) => this.onMessage(data));
      ws.on('unexpected-response', (req, res) => {
        error(`handshake ${this.session}: HTTP ${res.statusCode}`);
        this.closing = true;
        this.closed = true;
        req.destroy();
        resolve(false);
      });
      ws.on('error', (err) => {
        if (!this.closing) error(`socket ${this.session}: ${err.message}`);
        if (this.base === null) resolve(false);
      });
      ws.on('close', (code, reason) => {
        this.closed = true;
        if (!this.closing) error(`closed by server ${this.session}: ${code} ${reason}`);
        if (this.base === null) resolve(false);
        if (this.onClosed) this.onClosed();
      });
    });
  }

  onMessage(data) {
    if (this.closing) return;
    const t = now();
    // Session messages are read without JSON.parse, or even decoding them (the
    // load generator's biggest costs at 200 000+ messages/s): the top-level
    // "seq", "i" and "ts" are the only fields it needs, and no payload here
    // has those names nested.
    const s = seqOf(data);
    if (s === null) {
      const text = data.toString();
      const m = JSON.parse(text);
      totals.control += 1;
      if (this.base === null && m.type === 'connection_established') {
        this.base = m.last_seq || 0;
        this.hi = this.base;
        this.greeted(true);
      } else if (m.type !== 'keepalive' && m.type !== 'pong') {
        // gap, error, session_closed, server_shutdown...: none belongs in these runs
        error(`unexpected ${m.type} on ${this.session}: ${text.slice(0, 200)}`);
      }
      return;
    }
    totals.received += 1;
    totals.bytes += data.length;
    if ((totals.received & 1023) === 1) { // spot check: valid JSON, and the seq read above is its seq
      const text = data.toString();
      let m = null;
      try { m = JSON.parse(text); } catch (err) { error(`not JSON: ${text.slice(0, 200)}`); }
      if (m !== null && m.seq !== s) error(`seq misread: ${s} in ${text.slice(0, 200)}`);
    }
    if (!Number.isInteger(s) || s < 1) { error(`bad seq ${s} in ${data.toString().slice(0, 200)}`); return; }
    if (totals.firstRecv === 0) totals.firstRecv = t;
    totals.lastRecv = t;
    if (this.base === null) {
      totals.beforeGreeting += 1;
      error(`message before greeting ${this.session}: seq ${s}`);
      return;
    }
    if (s <= this.base) {
      totals.dup += 1; // replay=none: nothing at or before last_seq may come
      return;
    }
    if (this.seen.test(s)) {
      totals.dup += 1;
      return;
    }
    this.seen.set(s);
    if (!(sessionHi[this.session] >= s)) sessionHi[this.session] = s;
    this.distinct += 1;
    totals.distinct += 1;
    if (this.counted) countedDistinct += 1;
    if (s < this.hi) totals.reorder += 1;
    else this.hi = s;
    if (recordLatency) {
      const text = data.toString();
      const ts = numberField(text, '"ts":');
      if (ts !== null && numberField(text, '"i":') >= warmupEvents) latencies.push(t - ts);
    }
    if (target !== null && countedDistinct >= target) finishNow();
  }

  // seqs this client should have had and did not get
  lostUpTo(to) {
    if (this.base === null) return 0;
    return this.seen.missing(this.base + 1, to);
  }

  close(abrupt) {
    this.closing = true;
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      this.onClosed = resolve;
      if (abrupt) this.ws.terminate();
      else this.ws.close(1000);
    });
  }
}

async function openAll(specs, concurrency, counted) {
  const clients = new Array(specs.length);
  let next = 0;
  async function worker() {
    while (next < specs.length) {
      const i = next++;
      const c = new Client(specs[i], counted, bases[i % bases.length]);
      clients[i] = c;
      await c.open();
    }
  }
  const workers = [];
  for (let w = 0; w < Math.min(concurrency, specs.length); w++) workers.push(worker());
  await Promise.all(workers);
  return clients;
}

const sessionHi = {}; // highest seq any client saw, per session
let stable = [];
let warm = [];
let target = null; // deliveries the stable clients are owed once publishing is over
let countedDistinct = 0; // distinct deliveries to them so far (warm-up and churning clients' are not theirs)
let maxSeq = null;
let finishTimer = null;
let lastProgress = 0;
let finished = false;

function expectedTotal() {
  let n = 0;
  for (const c of stable) {
    if (c.base === null) continue;
    const top = maxSeq[c.session] || 0;
    if (top > c.base) n += top - c.base;
  }
  return n;
}

function finishNow() {
  if (finished) return;
  finished = true;
  if (finishTimer) clearInterval(finishTimer);
  const lostBySession = {};
  for (const c of stable) {
    const lost = c.lostUpTo(maxSeq[c.session] || 0);
    if (lost) {
      totals.lost += lost;
      // which sessions, how many clients, and the first seq missed: enough to start looking
      const entry = lostBySession[c.session] || (lostBySession[c.session] = { clients: 0, lost: 0, firstMissed: null });
      entry.clients += 1;
      entry.lost += lost;
      for (let s = c.base + 1; s <= (maxSeq[c.session] || 0); s++) {
        if (!c.seen.test(s)) {
          if (entry.firstMissed === null || s < entry.firstMissed) entry.firstMissed = s;
          break;
        }
      }
    }
  }
  const res = Object.assign({}, totals, {
    event: 'results',
    clients: stable.length,
    greeted: stable.filter((c) => c.base !== null).length,
    expected: target,
    errorSamples,
    lostBySession: Object.fromEntries(Object.entries(lostBySession).slice(0, 5)),
    churn: churnStats,
  });
  if (recordLatency) {
    const a = Float64Array.from(latencies).sort();
    const q = (p) => (a.length ? a[Math.min(a.length - 1, Math.floor(p * (a.length - 1)))] : null);
    res.latency = { n: a.length, min: a.length ? a[0] : null, p50: q(0.5), p99: q(0.99), max: a.length ? a[a.length - 1] : null };
  }
  out(res);
}

// -- churn: connections that come and go while events flow --------------------

const churnStats = { opened: 0, greeted: 0, closedAbrupt: 0, closedGraceful: 0, received: 0, lost: 0 };
let churnLeft = 0;

function rand(min, max) { return min + Math.random() * (max - min); }

async function churnLoop() {
  const ch = cfg.churn;
  while (churnLeft > 0) {
    churnLeft -= 1;
    const session = ch.sessions[Math.floor(Math.random() * ch.sessions.length)];
    const c = new Client(session, false, bases[Math.floor(Math.random() * bases.length)]);
    churnStats.opened += 1;
    const ok = await c.open();
    if (ok) {
      churnStats.greeted += 1;
      await new Promise((r) => setTimeout(r, rand(ch.minMs, ch.maxMs)));
    }
    const abrupt = Math.random() < 0.5;
    if (!c.closed) {
      if (abrupt) churnStats.closedAbrupt += 1;
      else churnStats.closedGraceful += 1;
    }
    await c.close(abrupt);
    churnStats.received += c.distinct;
    const lost = c.lostUpTo(c.hi);
    churnStats.lost += lost;
    totals.lost += lost;
  }
}

// -- commands ------------------------------------------------------------------

async function main() {
  const concurrency = cfg.connectConcurrency || 100;
  if (cfg.warm && cfg.warm.clients) {
    warm = await openAll(new Array(cfg.warm.clients).fill(cfg.warm.session), concurrency, false);
  }
  out({ event: 'warm', greeted: warm.filter((c) => c.base !== null).length });

  const rl = readline.createInterface({ input: process.stdin });
  rl.on('close', () => process.exit(0));
  rl.on('line', async (line) => {
    const cmd = JSON.parse(line);
    switch (cmd.cmd) {
      case 'open': {
        const specs = [];
        for (const s of cfg.sessions) for (let i = 0; i < cfg.perSession; i++) specs.push(s);
        const t0 = now();
        stable = await openAll(specs, concurrency, true);
        const greeted = stable.filter((c) => c.base !== null).length;
        out({ event: 'ready', clients: stable.length, greeted, connectMs: now() - t0 });
        break;
      }
      case 'finish': {
        // a seq the publisher was not told about (a publish that failed half way) still counts
        maxSeq = Object.assign({}, cmd.maxSeq);
        for (const [session, hi] of Object.entries(sessionHi)) {
          if (hi > (maxSeq[session] || 0)) {
            totals.unpublishedSeqs = (totals.unpublishedSeqs || 0) + hi - (maxSeq[session] || 0);
            maxSeq[session] = hi;
          }
        }
        target = expectedTotal();
        lastProgress = now();
        let lastDistinct = totals.distinct;
        const timeoutMs = cmd.timeoutMs || 10000;
        if (countedDistinct >= target) { finishNow(); break; }
        finishTimer = setInterval(() => {
          if (totals.distinct !== lastDistinct) { lastDistinct = totals.distinct; lastProgress = now(); }
          if (now() - lastProgress > timeoutMs) finishNow();
        }, 50);
        break;
      }
      case 'churn': {
        const t0 = now();
        churnLeft = cmd.count;
        const loops = [];
        for (let i = 0; i < cfg.churn.concurrency; i++) loops.push(churnLoop());
        await Promise.all(loops);
        out(Object.assign({ event: 'churned', ms: now() - t0 }, churnStats));
        break;
      }
      case 'close_all': {
        await Promise.all(stable.concat(warm).map((c) => c.close(false)));
        out({ event: 'closed' });
        break;
      }
      case 'exit':
        process.exit(0);
        break;
      default:
        error(`unknown command ${line}`);
    }
  });
}

main().catch((err) => {
  out({ event: 'fatal', error: String(err && err.stack || err) });
  process.exit(1);
});
