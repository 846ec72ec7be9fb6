#!/usr/bin/env node
// The close handshake through sttproxy, spoken by an independent WebSocket
// implementation (Node's `ws`), against an echo backend.
//
// Usage: node close_handshake.cjs ws://HOST:PORT/v1/stream SESSIONS
// (with NODE_PATH pointing at the node_modules that holds `ws`)
//
// For each of the modes "1000" and "4001" (the client closes with that code
// once session.started arrived) and "end" (the client sends
// {"type":"session.end"} and waits for the proxy's close), SESSIONS sessions
// one after another. Prints one JSON line per session:
// {"mode":..,"code":..,"wasClean":..,"error":..}; exits 0 either way (the
// test judges the lines).
'use strict';

const WebSocket = require('ws');

const STEP_MS = 5000;

function one(url, mode) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    let error = null;
    let started = false;
    const timer = setTimeout(() => {
      resolve({ mode, code: -1, wasClean: false, error: 'no close within 5 s' });
      ws.terminate();
    }, STEP_MS);
    ws.addEventListener('error', (ev) => {
      error = String((ev && ev.message) || (ev && ev.error) || 'error');
    });
    ws.addEventListener('message', () => {
      if (started) return;
      started = true;
      if (mode === 'end') ws.send('{"type":"session.end"}');
      else ws.close(Number(mode));
    });
    ws.addEventListener('close', (ev) => {
      clearTimeout(timer);
      resolve({ mode, code: ev.code, wasClean: ev.wasClean, error });
    });
  });
}

async function main() {
  const [url, n] = process.argv.slice(2);
  if (!url || !n) {
    console.error('usage: close_handshake.cjs URL SESSIONS');
    process.exit(2);
  }
  for (const mode of ['1000', '4001', 'end']) {
    for (let i = 0; i < Number(n); i++) {
      console.log(JSON.stringify(await one(url, mode)));
    }
  }
}

main();
