#!/usr/bin/env node
// A JWT sent the way a browser can send one: as a WebSocket subprotocol,
// spoken by an independent client (Node's `ws`, which like browsers fails a
// handshake whose answer names no protocol it offered).
//
// Usage: node bearer_subprotocol.cjs ws://HOST:PORT/v1/stream TOKEN
// (with NODE_PATH pointing at the node_modules that holds `ws`)
//
// Case "stt+token": offers ['stt', 'bearer.' + TOKEN], waits for
// session.started, sends a text and waits for its echo, sends session.end
// and waits for the proxy's close. Case "token only": offers just the token
// protocol (the proxy refuses: nothing to answer with). Prints one JSON line
// per case: {"case","opened","protocol","echoed","code","error"};
// exits 0 either way (the test judges the lines).
'use strict';

const WebSocket = require('ws');

function run(name, url, protocols) {
  return new Promise((resolve) => {
    const out = { case: name, opened: false, protocol: null, echoed: false, code: -1, error: null };
    const ws = new WebSocket(url, protocols);
    const timer = setTimeout(() => {
      out.error = out.error || 'no close within 5 s';
      ws.terminate();
      resolve(out);
    }, 5000);
    let started = false;
    ws.on('open', () => {
      out.opened = true;
      out.protocol = ws.protocol;
    });
    ws.on('message', (data) => {
      const text = data.toString();
      if (!started) {
        started = true;
        ws.send('ping through the proxy');
        return;
      }
      if (text === 'ping through the proxy') {
        out.echoed = true;
        ws.send('{"type":"session.end"}');
      }
    });
    ws.on('error', (e) => {
      out.error = String((e && e.message) || e);
    });
    ws.on('close', (code) => {
      clearTimeout(timer);
      out.code = code;
      resolve(out);
    });
  });
}

async function main() {
  const [url, token] = process.argv.slice(2);
  if (!url || !token) {
    console.error('usage: bearer_subprotocol.cjs URL TOKEN');
    process.exit(2);
  }
  console.log(JSON.stringify(await run('stt+token', url, ['stt', 'bearer.' + token])));
  console.log(JSON.stringify(await run('token only', url, ['bearer.' + token])));
}

main();
