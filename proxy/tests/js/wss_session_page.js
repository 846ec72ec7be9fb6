// Browser WebSocket sessions through sttproxy, driven step by step by
// tests/independent_clients.rs (the wss:// test): evaluated once in a
// headless Chromium page, it installs `window.stt` with
//   open(url)    -> a session, once its session.started arrived
//   echo(s, n)   -> n text messages sent and each echoed back unchanged
//   end(s)       -> {"code","wasClean","reason","ended"} after session.end
//                   (ended: the backend's session.ended arrived before the close)
// and a `sessions` object to keep sessions between evaluations.
(() => {
  const open = (url) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const s = { ws, inbox: [], waiters: [], closed: null, onclose: null };
    ws.onmessage = (ev) => {
      const w = s.waiters.shift();
      if (w) w(ev.data);
      else s.inbox.push(ev.data);
    };
    ws.onclose = (ev) => {
      s.closed = { code: ev.code, wasClean: ev.wasClean, reason: ev.reason };
      if (s.onclose) s.onclose(s.closed);
      else reject(new Error(`closed ${ev.code} before session.started`));
    };
    s.next = (ms) => new Promise((res, rej) => {
      if (s.inbox.length) return res(s.inbox.shift());
      const t = setTimeout(() => rej(new Error(`no message within ${ms} ms`)), ms);
      s.waiters.push((d) => { clearTimeout(t); res(d); });
    });
    s.next(5000).then((first) => {
      const v = JSON.parse(first);
      if (v.type !== 'session.started') return reject(new Error(`first message: ${first}`));
      s.id = v.session;
      s.onclose = () => {};
      resolve(s);
    }, reject);
  });
  const echo = async (s, n) => {
    for (let i = 0; i < n; i++) {
      const text = `browser message ${i}`;
      s.ws.send(text);
      const got = await s.next(5000);
      if (got !== text) throw new Error(`echo ${i}: got ${got}`);
    }
    return n;
  };
  const end = (s) => new Promise((resolve, reject) => {
    let ended = false;
    const t = setTimeout(() => reject(new Error('no close within 5 s')), 5000);
    s.onclose = (c) => { clearTimeout(t); resolve({ ...c, ended }); };
    (async () => {
      for (;;) {
        const m = await s.next(6000).catch(() => null);
        if (m === null) return;
        if (JSON.parse(m).type === 'session.ended') ended = true;
      }
    })();
    s.ws.send('{"type":"session.end"}');
  });
  window.stt = { open, echo, end, sessions: {} };
  return 'installed';
})()
