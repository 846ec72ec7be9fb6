#!/usr/bin/env python3
"""The close handshake through sttproxy, spoken by an independent WebSocket
implementation (the `websockets` library), against an echo backend.

Usage: close_handshake.py ws://HOST:PORT/v1/stream SESSIONS

For each of the modes "1000" and "4001" (the client closes with that code once
session.started arrived) and "end" (the client sends {"type":"session.end"} and
waits for the proxy's close), SESSIONS sessions one after another. Prints one
JSON line per session: {"mode", "code", "wasClean", "error"}, where code is the
close code received from the proxy (1006 if none) and wasClean says that close
frames went both ways and the connection then ended without an error. Exits 0
either way (the test judges the lines).
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

STEP = 5.0  # seconds allowed for any one expected event


async def one(url, mode):
    error = None
    try:
        async with asyncio.timeout(STEP):
            ws = await connect(url, close_timeout=STEP)
            await ws.recv()  # session.started
            if mode == "end":
                await ws.send(json.dumps({"type": "session.end"}))
                try:
                    while True:
                        await ws.recv()
                except ConnectionClosedOK:
                    pass
                except ConnectionClosed as e:
                    error = repr(e)
            else:
                await ws.close(int(mode))
            await ws.wait_closed()
    except (TimeoutError, asyncio.TimeoutError):
        return {"mode": mode, "code": -1, "wasClean": False, "error": "no close within 5 s"}
    except Exception as e:  # noqa: BLE001 - reported, judged by the test
        return {"mode": mode, "code": -1, "wasClean": False, "error": repr(e)}
    proto = ws.protocol
    rcvd, sent = proto.close_rcvd, proto.close_sent
    code = rcvd.code if rcvd is not None else 1006
    clean = rcvd is not None and sent is not None and error is None
    return {"mode": mode, "code": code, "wasClean": clean, "error": error}


async def main():
    if len(sys.argv) != 3:
        print("usage: close_handshake.py URL SESSIONS", file=sys.stderr)
        sys.exit(2)
    url, n = sys.argv[1], int(sys.argv[2])
    for mode in ("1000", "4001", "end"):
        for _ in range(n):
            print(json.dumps(await one(url, mode)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
