"""Python baseline of sttproxy: FastAPI + asyncio + websockets, run by Gunicorn with uvicorn workers.

This is the design the reference write-up started from, written the way a competent Python
team would write it today: every Gunicorn worker process runs its own asyncio event loop, its
own FastAPI app and its own pools of pre-established backend WebSocket connections (one pool
per backend URL). A client session leases one backend connection for its whole life and
returns it after the fencing handshake (session.start ... session.end / session.ended).

Environment:
  STTPROXY_BACKENDS            comma-separated ws:// URLs (default ws://127.0.0.1:9001)
  STTPROXY_POOL_SIZE           target idle+leased connections per backend, per worker (64)
  STTPROXY_POOL_MAX            hard maximum per backend, per worker (2048)
  STTPROXY_DRAIN_TIMEOUT       seconds to wait for session.ended when fencing (5)
  STTPROXY_ACQUIRE_TIMEOUT     seconds a session waits for a connection at the maximum (5)
  STTPROXY_MAX_MESSAGE_SIZE    bytes, largest message accepted from a backend (16 MiB)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

log = logging.getLogger("sttproxy.baseline")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


BACKENDS = [
    url.strip()
    for url in os.environ.get("STTPROXY_BACKENDS", "ws://127.0.0.1:9001").split(",")
    if url.strip()
]
POOL_SIZE = _env_int("STTPROXY_POOL_SIZE", 64)
POOL_MAX = max(_env_int("STTPROXY_POOL_MAX", 2048), POOL_SIZE)
DRAIN_TIMEOUT = _env_float("STTPROXY_DRAIN_TIMEOUT", 5.0)
ACQUIRE_TIMEOUT = _env_float("STTPROXY_ACQUIRE_TIMEOUT", 5.0)
MAX_MESSAGE_SIZE = _env_int("STTPROXY_MAX_MESSAGE_SIZE", 16 * 1024 * 1024)
DIAL_CONCURRENCY = 16  # dials in flight per pool while filling it
REFILL_INTERVAL = 1.0  # seconds between pool top-ups (the safety net; releases also wake it)

# Close codes (RFC 6455 / IANA registry).
CLOSE_NORMAL = 1000
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_GATEWAY = 1014


class NoConnection(Exception):
    """No backend connection could be had for a new session."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class BackendPool:
    """Pre-established connections to one backend, for one worker process.

    Idle connections wait in an asyncio.Queue; `live` counts idle + leased + being dialed,
    so the pool never grows past `max_size`. Everything runs on the worker's one event loop,
    so plain integers are enough: no await sits between a check and its update.
    """

    def __init__(self, url: str, target: int, max_size: int) -> None:
        self.url = url
        self.target = target
        self.max_size = max_size
        self.idle: asyncio.Queue[ClientConnection] = asyncio.Queue()
        self.live = 0
        self.dial_failures = 0
        self.waiting = 0  # sessions waiting for a release because the pool is at max_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def dial(self) -> ClientConnection:
        return await connect(
            self.url,
            compression=None,  # audio does not compress; the Rust proxy does not either
            max_size=MAX_MESSAGE_SIZE,
            proxy=None,  # backends are reached directly, whatever *_PROXY says
            open_timeout=10,
        )

    # -- filling ---------------------------------------------------------------------------

    async def fill(self) -> None:
        """Dial until live == target (bounded concurrency); raise on the first failure."""
        missing = self.target - self.live
        if missing <= 0:
            return
        self.live += missing  # reserve the slots before dialing
        sem = asyncio.Semaphore(DIAL_CONCURRENCY)

        async def one() -> None:
            async with sem:
                try:
                    conn = await self.dial()
                except BaseException:
                    self.live -= 1
                    self.dial_failures += 1
                    raise
                self.idle.put_nowait(conn)

        results = await asyncio.gather(*(one() for _ in range(missing)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def prune(self) -> None:
        """Close idle connections that died while waiting (backend closed, keepalive failed)."""
        dead = []
        for _ in range(self.idle.qsize()):
            conn = self.idle.get_nowait()
            if conn.state is State.OPEN:
                self.idle.put_nowait(conn)
            else:
                dead.append(conn)
        for conn in dead:
            await self._close(conn)

    async def _maintain(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self.prune()
                await self.fill()
                backoff = 0.1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), REFILL_INTERVAL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # dial failed: back off with jitter, then try again
                log.warning("pool %s: dial failed: %r", self.url, exc)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 5.0)
            self._wake.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain(), name=f"pool {self.url}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self.idle.empty():
            await self._close(self.idle.get_nowait())

    # -- leasing ---------------------------------------------------------------------------

    async def acquire(self) -> ClientConnection:
        # 1. an idle connection that is still open
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn.state is State.OPEN:
                return conn
            await self._close(conn)  # died while idle (keepalive ping failed, backend closed)
        # 2. none idle: dial one on demand while under the maximum
        if self.live < self.max_size:
            self.live += 1
            try:
                return await self.dial()
            except Exception as exc:
                self.live -= 1
                self.dial_failures += 1
                self._wake.set()
                raise NoConnection(CLOSE_BAD_GATEWAY, "backend unavailable") from exc
        # 3. at the maximum: wait for a release
        self.waiting += 1
        try:
            async with asyncio.timeout(ACQUIRE_TIMEOUT):
                while True:
                    conn = await self.idle.get()
                    if conn.state is State.OPEN:
                        return conn
                    await self._close(conn)
        except TimeoutError:
            raise NoConnection(CLOSE_TRY_AGAIN_LATER, "no backend connection available") from None
        finally:
            self.waiting -= 1

    async def release(self, conn: ClientConnection) -> None:
        """Return a cleanly fenced connection; close it when it is broken or above target."""
        if conn.state is State.OPEN and (self.live <= self.target or self.waiting):
            self.idle.put_nowait(conn)
        else:
            await self._close(conn)

    async def discard(self, conn: ClientConnection) -> None:
        await self._close(conn)

    async def _close(self, conn: ClientConnection) -> None:
        self.live -= 1
        if self.live < self.target:
            self._wake.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)


def _control(**fields: object) -> str:
    """A control message as compact JSON, e.g. {"type":"session.end","session":"..."}."""
    return json.dumps(fields, separators=(",", ":"))


def _is_session_end(text: str) -> bool:
    # Cheap substring test first: audio/data text frames are relayed without a JSON parse.
    if "session.end" not in text:
        return False
    try:
        msg = json.loads(text)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("type") == "session.end"


def _is_session_ended(text: str, session: str) -> bool:
    if "session.ended" not in text:
        return False
    try:
        msg = json.loads(text)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("type") == "session.ended" and msg.get("session") == session


class BackendGone(Exception):
    """The leased backend connection closed or failed mid-session."""


class ClientGone(Exception):
    """The client went away (Close frame, reset, or a failed send)."""


class Session:
    def __init__(self, ws: WebSocket, conn: ClientConnection, sid: str) -> None:
        self.ws = ws
        self.conn = conn
        self.sid = sid
        self.end_sent = False

    async def send_backend(self, data: str | bytes) -> None:
        try:
            await self.conn.send(data)
        except ConnectionClosed as exc:
            raise BackendGone from exc

    async def client_to_backend(self) -> None:
        """Relay client frames until the client goes away (raises ClientGone)."""
        ws = self.ws
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise ClientGone
            if self.end_sent:
                continue  # after session.end the session only waits for its last results
            text = msg.get("text")
            if text is not None:
                if _is_session_end(text):
                    self.end_sent = True
                    await self.send_backend(_control(type="session.end", session=self.sid))
                else:
                    await self.send_backend(text)
            else:
                data = msg.get("bytes")
                if data is not None:
                    await self.send_backend(data)

    async def backend_to_client(self) -> None:
        """Relay backend messages; return after forwarding this session's session.ended."""
        ws, conn, sid = self.ws, self.conn, self.sid
        while True:
            try:
                msg = await conn.recv()
            except ConnectionClosed as exc:
                raise BackendGone from exc
            try:
                if isinstance(msg, str):
                    ended = self.end_sent and _is_session_ended(msg, sid)
                    await ws.send_text(msg)
                    if ended:
                        return
                else:
                    await ws.send_bytes(msg)
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                raise ClientGone from exc

    async def fence(self) -> bool:
        """After an abrupt client end: session.end, discard results until session.ended."""
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                if not self.end_sent:
                    self.end_sent = True
                    await self.conn.send(_control(type="session.end", session=self.sid))
                while True:
                    msg = await self.conn.recv()
                    if isinstance(msg, str) and _is_session_ended(msg, self.sid):
                        return True
        except (TimeoutError, ConnectionClosed):
            return False


async def _close_client(ws: WebSocket, code: int, reason: str = "") -> None:
    with contextlib.suppress(Exception):
        await ws.close(code, reason)


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


pools: list[BackendPool] = []
_round_robin: Iterator[BackendPool] | None = None


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI):
    global _round_robin
    pools[:] = [BackendPool(url, POOL_SIZE, POOL_MAX) for url in BACKENDS]
    _round_robin = itertools.cycle(pools)
    # Warm the pools before taking traffic (bounded, so a dead backend cannot block startup);
    # the maintain tasks keep them at target afterwards.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            asyncio.gather(*(p.fill() for p in pools), return_exceptions=True), 15
        )
    for p in pools:
        p.start()
    log.info("pools ready: %s", [(p.url, p.live) for p in pools])
    try:
        yield
    finally:
        await asyncio.gather(*(p.stop() for p in pools), return_exceptions=True)


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    """Alive (this worker finished its startup, so its pools were warmed)."""
    return "ok\n"


@app.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    await ws.accept()
    sid = uuid.uuid4().hex
    params = dict(ws.query_params)
    pool: BackendPool = next(_round_robin)  # type: ignore[arg-type]

    # Lease a connection and open the session on it. A pooled connection that turns out to
    # be dead when session.start is sent is discarded and the next one is tried.
    start = _control(type="session.start", session=sid, params=params)
    conn: ClientConnection | None = None
    for _attempt in range(3):
        try:
            conn = await pool.acquire()
        except NoConnection as exc:
            await _close_client(ws, exc.code, exc.reason)
            return
        try:
            await conn.send(start)
            break
        except ConnectionClosed:
            await pool.discard(conn)
            conn = None
    if conn is None:
        await _close_client(ws, CLOSE_BAD_GATEWAY, "backend unavailable")
        return

    session = Session(ws, conn, sid)
    up = asyncio.create_task(session.client_to_backend())
    down = asyncio.create_task(session.backend_to_client())
    released = False
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if down in done:
            await _cancel(up)
            exc = down.exception()
        else:
            await _cancel(down)  # cancelling recv() is safe: no message is lost
            exc = up.exception()

        if exc is None:
            # Graceful end: session.ended was forwarded; the connection is clean.
            await _close_client(ws, CLOSE_NORMAL)
            await pool.release(conn)
            released = True
        elif isinstance(exc, ClientGone):
            # Abrupt end: fence the backend connection before it can serve anyone else.
            if await session.fence():
                await pool.release(conn)
            else:
                await pool.discard(conn)
            released = True
        elif isinstance(exc, BackendGone):
            await _close_client(ws, CLOSE_BAD_GATEWAY, "backend connection lost")
            await pool.discard(conn)
            released = True
        else:
            log.error("session %s failed: %r", sid, exc)
            await _close_client(ws, CLOSE_INTERNAL_ERROR, "internal error")
    finally:
        if not released:  # error or cancellation (worker shutdown): never reuse unfenced
            await _cancel(up)
            await _cancel(down)
            await pool.discard(conn)
            await _close_client(ws, CLOSE_INTERNAL_ERROR)
