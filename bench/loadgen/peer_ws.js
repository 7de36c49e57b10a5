'use strict';
// The bare Node `ws` fan-out: a peer bench/run.py measures actor-broker against.
//
//   node peer_ws.js --port 8061
//
// A Map of session -> {seq, clients: Set}. A publish assigns each event the
// session's next seq, encodes it once with JSON.stringify and calls ws.send on
// every client of the session, inside the request, on the one event loop. No
// history, filters, throttling, queue limits, keepalives or logs: the least a
// Node server can do. It speaks the part of actor-broker's protocol that
// bench/baseline.py speaks, so the same load generator and publisher drive it:
//
//   POST /api/sessions/{id}/events  one event or a JSON array -> 202 {"accepted": n, "seq": [...]}
//   GET  /ws/research/{id}          greets {"type": "connection_established", "session_id", "last_seq"},
//                                   then live messages only; what clients send is ignored
//   GET  /healthz, GET /stats       {"active_connections", "active_sessions", "rss_kib"}
//
// It lives beside the load generator so that require('ws') finds the same pinned package.

const http = require('http');
const { WebSocketServer } = require('ws');

function arg(name, fallback) {
  const at = process.argv.indexOf(name);
  return at >= 0 ? process.argv[at + 1] : fallback;
}

const sessions = new Map();
function session(id) {
  let s = sessions.get(id);
  if (s === undefined) {
    s = { seq: 0, clients: new Set() };
    sessions.set(id, s);
  }
  return s;
}

function answer(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

const PUBLISH = /^\/api\/sessions\/([^/?]+)\/events$/;
const SOCKET = /^\/ws\/research\/([^/?]+)/;

function publish(req, res, sessionId) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString());
    } catch (err) {
      answer(res, 400, { error: 'bad JSON' });
      return;
    }
    const events = Array.isArray(body) ? body : [body];
    const s = session(sessionId);
    const seqs = [];
    for (const event of events) {
      s.seq += 1;
      event.session_id = sessionId;
      event.seq = s.seq;
      const data = JSON.stringify(event);
      for (const ws of s.clients) ws.send(data);
      seqs.push(s.seq);
    }
    answer(res, 202, { accepted: events.length, seq: seqs });
  });
}

function stats() {
  let connections = 0;
  for (const s of sessions.values()) connections += s.clients.size;
  return {
    active_connections: connections,
    active_sessions: sessions.size,
    rss_kib: Math.round(process.memoryUsage.rss() / 1024),
  };
}

const server = http.createServer((req, res) => {
  const path = req.url;
  const m = req.method === 'POST' ? PUBLISH.exec(path) : null;
  if (m) publish(req, res, decodeURIComponent(m[1]));
  else if (req.method === 'GET' && path === '/healthz') answer(res, 200, { status: 'ok' });
  else if (req.method === 'GET' && path === '/stats') answer(res, 200, stats());
  else answer(res, 404, { error: 'not found' });
});
// The driver keeps one connection for /stats between rounds: no idle keep-alive timeout.
server.keepAliveTimeout = 0;

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
server.on('upgrade', (req, socket, head) => {
  const m = SOCKET.exec(req.url);
  if (!m) {
    socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  const sessionId = decodeURIComponent(m[1]);
  wss.handleUpgrade(req, socket, head, (ws) => {
    const s = session(sessionId);
    s.clients.add(ws);
    ws.send(JSON.stringify({ type: 'connection_established', session_id: sessionId, last_seq: s.seq }));
    ws.on('close', () => s.clients.delete(ws));
    ws.on('error', () => {}); // a client that drops its TCP connection (churn) is not an error; 'close' follows
  });
});

server.listen(Number(arg('--port', '8061')), arg('--host', '127.0.0.1'));
process.on('SIGTERM', () => process.exit(0));
