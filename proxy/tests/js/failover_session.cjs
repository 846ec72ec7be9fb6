#!/usr/bin/env node
// Resumable sessions through sttproxy, spoken by an independent WebSocket
// implementation (Node's `ws`), while the test kills a backend under them.
//
// Usage: node failover_session.cjs ws://HOST:PORT/v1/stream SESSIONS CHUNKS
// (with NODE_PATH pointing at the node_modules that holds `ws`)
//
// SESSIONS sessions at once, each streaming CHUNKS binary messages of 100 ms
// of audio (3,200 bytes) every 100 ms, then {"type":"session.end"}. Prints
// {"streaming":ID} once a session has had its fifth result (the test kills a
// backend once every session streams), then one JSON line per session:
// {"session":..,"failovers":..,"tiled":..,"finals_end_ms":..,"foreign":..,
//  "ended":..,"code":..,"wasClean":..,"error":..}; exits 0 either way (the
// test judges the lines).
'use strict';

const WebSocket = require('ws');

const CHUNK = 3200;
const CHUNK_MS = 100;
const LIMIT_MS = 60000;

function one(url, chunks) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    const seen = {
      session: null,
      failovers: 0,
      tiled: true,
      finals_end_ms: 0,
      foreign: 0,
      ended: false,
      code: -1,
      wasClean: false,
      error: null,
    };
    let results = 0;
    let sender = null;
    const timer = setTimeout(() => {
      seen.error = 'no close within the limit';
      ws.terminate();
    }, LIMIT_MS);
    ws.addEventListener('error', (ev) => {
      seen.error = String((ev && ev.message) || (ev && ev.error) || 'error');
    });
    ws.addEventListener('message', (ev) => {
      let v;
      try {
        v = JSON.parse(String(ev.data));
      } catch (e) {
        seen.error = 'not JSON: ' + String(ev.data).slice(0, 80);
        return;
      }
      if (v.type === 'session.started') {
        seen.session = v.session;
        let sent = 0;
        const audio = Buffer.alloc(CHUNK, 0x11);
        sender = setInterval(() => {
          if (ws.readyState !== WebSocket.OPEN) return;
          if (sent < chunks) {
            ws.send(audio);
            sent += 1;
          } else {
            clearInterval(sender);
            ws.send('{"type":"session.end"}');
          }
        }, CHUNK_MS);
        return;
      }
      if (v.session !== seen.session) seen.foreign += 1;
      if (v.type === 'session.failover') {
        seen.failovers += 1;
        return;
      }
      if (v.type === 'session.ended') seen.ended = true;
      if (v.type === 'final') {
        if (v.audio_start_ms !== seen.finals_end_ms) seen.tiled = false;
        seen.finals_end_ms = v.audio_end_ms;
      }
      results += 1;
      if (results === 5) console.log(JSON.stringify({ streaming: seen.session }));
    });
    ws.addEventListener('close', (ev) => {
      clearTimeout(timer);
      if (sender) clearInterval(sender);
      seen.code = ev.code;
      seen.wasClean = ev.wasClean;
      resolve(seen);
    });
  });
}

async function main() {
  const [url, n, chunks] = process.argv.slice(2);
  if (!url || !n || !chunks) {
    console.error('usage: failover_session.cjs URL SESSIONS CHUNKS');
    process.exit(2);
  }
  const all = [];
  for (let i = 0; i < Number(n); i++) all.push(one(url, Number(chunks)));
  for (const seen of await Promise.all(all)) console.log(JSON.stringify(seen));
}

main();
