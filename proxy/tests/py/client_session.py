#!/usr/bin/env python3
"""One client session through sttproxy, spoken by an independent WebSocket
implementation (the `websockets` library), against an echo backend.

Usage: client_session.py ws://HOST:PORT/v1/stream

Checks: the backend's session.started arrives first; text and binary messages
(empty, small, non-ASCII, 64 KiB) come back unchanged, in order, with their
type; {"type":"session.end"} is answered with session.ended for the same
session and then a close with code 1000. Prints one "client_session: ok" line
and exits 0, or prints what went wrong to stderr and exits 1.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

STEP = 5.0  # seconds allowed for any one expected event


def fail(why):
    print(f"client_session: FAIL: {why}", file=sys.stderr)
    sys.exit(1)


async def recv(ws):
    try:
        return await asyncio.wait_for(ws.recv(), STEP)
    except asyncio.TimeoutError:
        fail("no message within the time allowed")
    except ConnectionClosed as e:
        fail(f"connection closed early: {e!r}")


async def session(url):
    messages = [
        "hello",
        "",
        "ünïcödé ✓ 音声",
        "x" * 1000,
        b"\x00\x01\x02\xff",
        b"",
        bytes(range(256)) * 256,  # 64 KiB
    ]
    async with connect(url, open_timeout=STEP, close_timeout=STEP, max_size=2**21) as ws:
        started = json.loads(await recv(ws))
        if started.get("type") != "session.started" or not started.get("session"):
            fail(f"expected session.started first, got {started!r}")
        sid = started["session"]
        for m in messages:
            await ws.send(m)
        for i, m in enumerate(messages):
            got = await recv(ws)
            if type(got) is not type(m) or got != m:
                fail(f"message {i}: sent {type(m).__name__} of {len(m)}, "
                     f"got {type(got).__name__} of {len(got)}")
        await ws.send(json.dumps({"type": "session.end"}))
        ended = json.loads(await recv(ws))
        if ended != {"type": "session.ended", "session": sid}:
            fail(f"expected session.ended for {sid}, got {ended!r}")
        try:
            extra = await asyncio.wait_for(ws.recv(), STEP)
            fail(f"message after session.ended: {extra!r}")
        except ConnectionClosed:
            pass
        except asyncio.TimeoutError:
            fail("the proxy did not close the connection after session.ended")
        if ws.close_code != 1000:
            fail(f"close code {ws.close_code} ({ws.close_reason!r}), expected 1000")
    print(f"client_session: ok session={sid} messages={len(messages)} close=1000")


def main():
    if len(sys.argv) != 2:
        fail("usage: client_session.py ws://HOST:PORT/PATH")
    asyncio.run(session(sys.argv[1]))


if __name__ == "__main__":
    main()
