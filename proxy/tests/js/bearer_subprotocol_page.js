// A JWT sent the only way a browser's WebSocket can send one: as a
// subprotocol. Evaluated in a headless Chromium page by tests/jwt_auth.rs as
// `(SOURCE)(URL, TOKEN)`: resolves to a JSON array of two
// {"case","opened","protocol","echoed","code","wasClean"} results — "stt+token"
// offers ['stt', 'bearer.' + TOKEN], waits for session.started, sends a text
// and waits for its echo, then sends session.end and waits for the proxy's
// close; "token only" offers just the token protocol (the proxy answers 400).
async (url, token) => {
  const run = (name, protocols) => new Promise((resolve) => {
    const out = { case: name, opened: false, protocol: null, echoed: false, code: -1, wasClean: false };
    const ws = new WebSocket(url, protocols);
    const timer = setTimeout(() => { out.code = -2; resolve(out); }, 5000);
    let started = false;
    ws.onopen = () => { out.opened = true; out.protocol = ws.protocol; };
    ws.onmessage = (ev) => {
      if (!started) { started = true; ws.send('ping through the proxy'); return; }
      if (ev.data === 'ping through the proxy') {
        out.echoed = true;
        ws.send('{"type":"session.end"}');
      }
    };
    ws.onclose = (ev) => {
      clearTimeout(timer);
      out.code = ev.code;
      out.wasClean = ev.wasClean;
      resolve(out);
    };
  });
  const results = [];
  results.push(await run('stt+token', ['stt', 'bearer.' + token]));
  results.push(await run('token only', ['bearer.' + token]));
  return JSON.stringify(results);
}
