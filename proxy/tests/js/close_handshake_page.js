// The close handshake through sttproxy, spoken by the browser's WebSocket.
// Evaluated in a headless Chromium page by tests/independent_clients.rs as
// `(SOURCE)(URL, SESSIONS)`: resolves to a JSON array with one
// {"mode","code","wasClean","reason"} per session, for the modes "1000" and
// "4001" (the client closes with that code once session.started arrived) and
// "end" (it sends {"type":"session.end"} and waits for the proxy's close).
async (url, sessions) => {
  const one = (mode) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    let started = false;
    const timer = setTimeout(() => {
      resolve({ mode, code: -1, wasClean: false, reason: 'no close within 5 s' });
    }, 5000);
    ws.onmessage = () => {
      if (started) return;
      started = true;
      if (mode === 'end') ws.send('{"type":"session.end"}');
      else ws.close(Number(mode));
    };
    ws.onclose = (ev) => {
      clearTimeout(timer);
      resolve({ mode, code: ev.code, wasClean: ev.wasClean, reason: ev.reason });
    };
  });
  const results = [];
  for (const mode of ['1000', '4001', 'end']) {
    for (let i = 0; i < sessions; i++) results.push(await one(mode));
  }
  return JSON.stringify(results);
}
