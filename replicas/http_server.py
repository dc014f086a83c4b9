"""A minimal HTTP/1.1 server: one asyncio Protocol per connection, httptools parsing.

The replicas are the fake upstreams of a benchmark that measures a proxy's CPU
per request in microseconds, so this stays far below ASGI's cost: no scope
dicts, no receive/send message round trips, headers rendered to bytes once,
one `transport.write` per response (or per streamed chunk, which is what
uvicorn does for vLLM and what the proxy under test has to relay).

What it speaks: keep-alive (HTTP/1.1 default, HTTP/1.0 and `Connection: close`
close), pipelined requests answered in order, Content-Length and chunked
request bodies, `Expect: 100-continue`, chunked streaming responses with
backpressure, 400-and-close on anything unparsable. Not: upgrades, trailers,
HTTP/2.

Write modes (`write_mode`, or the REPLICA_WRITE_MODE environment variable):
"direct" (the default) writes a whole response in one `transport.write`;
"uvicorn" writes like uvicorn does under vLLM's API server: a response head in one
write and its body in a later one (uvicorn's httptools_impl writes
`http.response.start` and each `http.response.body` message as they come from the
ASGI app), every write further cut at random points and delivered over the next
loop iterations (up to `UVICORN_MAX_DELAY_S` apart). A relay that decides anything
on the first read of a response (keep-alive, the end of a body) fails in this mode.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import os
import random
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import httptools
import uvloop

__all__ = ["Handler", "Headers", "HttpServer", "Request", "Responder", "render_headers", "run", "serve"]

log = logging.getLogger("replicas.http")

# Either (name, value) pairs or a block already rendered by `render_headers`;
# hot paths pass the latter so a response costs one join and nothing else.
Headers = Sequence[tuple[bytes | str, bytes | str]] | bytes
Handler = Callable[["Request", "Responder"], Awaitable[None]]

MAX_BODY_BYTES = 64 * 1024 * 1024
# Requests parsed ahead of the one being answered; past this we stop reading so
# a client pipelining without reading answers cannot grow our memory.
MAX_PIPELINE = 32

WRITE_MODES = ("direct", "uvicorn")
UVICORN_MAX_DELAY_S = 0.002


def default_write_mode() -> str:
    mode = os.environ.get("REPLICA_WRITE_MODE", "direct") or "direct"
    if mode not in WRITE_MODES:
        raise ValueError(f"REPLICA_WRITE_MODE={mode!r}: one of {', '.join(WRITE_MODES)}")
    return mode


class _SplitWrites:
    """A transport that delivers each write later and in random pieces, in order (the "uvicorn" mode).

    Stands in for the real transport: writes queue up and a timer hands them over piece by piece, some
    in the next loop iteration, some up to UVICORN_MAX_DELAY_S later. Backpressure is kept: past
    SPLIT_HIGH_WATER queued bytes the protocol is paused, as by a transport's own buffer. close() waits
    for the queue; abort() hands over what is queued (a socket sends what it was given) and resets.
    """

    SPLIT_HIGH_WATER = 64 * 1024

    def __init__(self, transport: asyncio.Transport, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop,
                 rng: random.Random) -> None:
        self._transport = transport
        self._protocol = protocol
        self._loop = loop
        self._rng = rng
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._paused = False
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._close_after = False

    def write(self, data: bytes) -> None:
        if not data or self._transport.is_closing():
            return
        rng = self._rng
        cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 2))))
        start = 0
        for cut in (*cuts, len(data)):
            self._queue.append(data[start:cut])
            start = cut
        self._queued += len(data)
        if self._queued > self.SPLIT_HIGH_WATER and not self._paused:
            self._paused = True
            self._protocol.pause_writing()
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        if self._rng.random() < 0.5:
            self._timer = self._loop.call_soon(self._flush_one)
        else:
            self._timer = self._loop.call_later(self._rng.uniform(0, UVICORN_MAX_DELAY_S), self._flush_one)

    def _flush_one(self) -> None:
        self._timer = None
        if self._transport.get_write_buffer_size() > self.SPLIT_HIGH_WATER and not self._transport.is_closing():
            # The peer is not reading: hold our queue too (the protocol stays paused through it).
            self._timer = self._loop.call_later(UVICORN_MAX_DELAY_S, self._flush_one)
            return
        if self._queue and not self._transport.is_closing():
            piece = self._queue.popleft()
            self._queued -= len(piece)
            self._transport.write(piece)
            if self._paused and self._queued < self.SPLIT_HIGH_WATER // 4:
                self._paused = False
                self._protocol.resume_writing()
        if self._queue and not self._transport.is_closing():
            self._schedule()
        elif self._close_after:
            self._queue.clear()
            self._transport.close()

    def close(self) -> None:
        if self._queue:
            self._close_after = True
        else:
            self._transport.close()

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue and not self._transport.is_closing():
            self._transport.write(b"".join(self._queue))
        self._queue.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._close_after or self._transport.is_closing()

    def __getattr__(self, name: str) -> object:  # pause_reading, get_extra_info, ...
        return getattr(self._transport, name)


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode("latin-1"))


_STATUS_LINES = {status.value: _status_line(status.value) for status in http.HTTPStatus}


def status_line(code: int) -> bytes:
    line = _STATUS_LINES.get(code)
    return line if line is not None else _status_line(code)


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def render_headers(headers: Headers) -> bytes:
    """`name: value\\r\\n` lines, ready to splice into a response head."""
    if isinstance(headers, bytes):
        return headers
    return b"".join(b"%s: %s\r\n" % (_b(name), _b(value)) for name, value in headers)


class Request:
    """One parsed request. `raw_headers` keeps the wire order and spelling."""

    __slots__ = ("method", "path", "query", "raw_headers", "body", "http_version", "keep_alive", "_headers")

    def __init__(self, method: str, path: str, query: str, raw_headers: list[tuple[bytes, bytes]],
                 body: bytes, http_version: str, keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.raw_headers = raw_headers
        self.body = body
        self.http_version = http_version
        self.keep_alive = keep_alive
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Lower-cased names; the first occurrence of a repeated header wins."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for name, value in self.raw_headers:
                headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
            self._headers = headers
        return self._headers

    def header(self, name: bytes) -> bytes | None:
        """First value of a header, `name` given lower-case; cheaper than building `headers`."""
        for key, value in self.raw_headers:
            if len(key) == len(name) and key.lower() == name:
                return value
        return None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Responder:
    """How a handler answers one request: `send` a whole response, or
    `start_stream` / `write`* / `end`. `disconnected` turns true as soon as the
    connection is gone, and `sleep`/`wait_disconnected` wake up at that moment,
    so a handler stops generating for a client that left."""

    __slots__ = ("_conn", "_request", "keep_alive", "started", "finished", "_chunked", "_conn_header")

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self.keep_alive = request.keep_alive
        self.started = False
        self.finished = False
        self._chunked = True
        if not request.keep_alive:
            self._conn_header = b"connection: close\r\n"
        elif request.http_version == "1.0":
            self._conn_header = b"connection: keep-alive\r\n"
        else:
            self._conn_header = b""

    @property
    def disconnected(self) -> bool:
        return self._conn.closed

    def send(self, status: int, headers: Headers = b"", body: bytes = b"") -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        conn = self._conn
        if conn.closed:
            return
        length = b"content-length: %d\r\n" % len(body)
        if self._request.method == "HEAD":
            body = b""
        head = (status_line(status), conn.server.date_server, length, render_headers(headers), self._conn_header,
                b"\r\n")
        if conn.server.write_mode == "uvicorn":
            conn.transport.write(b"".join(head))  # uvicorn: http.response.start, then http.response.body
            conn.transport.write(body)
        else:
            conn.transport.write(b"".join((*head, body)))
        if not self.keep_alive:
            conn.close()

    def start_stream(self, status: int, headers: Headers = b"") -> None:
        """Send the head of a response whose body follows in `write` calls."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        conn = self._conn
        if self._request.http_version == "1.0":
            # No chunked encoding in 1.0: the body runs until we close.
            self._chunked = False
            self.keep_alive = False
            self._conn_header = b"connection: close\r\n"
        if conn.closed:
            return
        conn.transport.write(b"".join((
            status_line(status), conn.server.date_server, render_headers(headers),
            b"transfer-encoding: chunked\r\n" if self._chunked else b"", self._conn_header, b"\r\n")))

    async def write(self, data: bytes) -> None:
        """One HTTP chunk per call, in one transport write (a relay sees each event
        arrive on its own); waits while the peer is not reading."""
        conn = self._conn
        if conn.closed or not data:  # an empty chunk would end the body
            return
        if self._chunked:
            conn.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.transport.write(data)
        if conn.write_paused:
            await conn.drain()

    def write_events(self, events: list[bytes], end: bool = False) -> None:
        """Several chunks (and the terminating one when `end`) in one transport write: what a
        stepped engine emits for one stream in one step, without waiting on backpressure."""
        conn = self._conn
        if conn.closed:
            return
        if self._chunked:
            data = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events if e)
            if end:
                data += b"0\r\n\r\n"
        else:
            data = b"".join(events)
        if end:
            self.finished = True
        conn.transport.write(data)
        if end and not self.keep_alive:
            conn.close()

    def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        conn = self._conn
        if conn.closed:
            return
        if self._chunked:
            conn.transport.write(b"0\r\n\r\n")
        if not self.keep_alive:
            conn.close()

    async def sleep(self, seconds: float) -> bool:
        """Sleep, but return early if the client goes away. True if still connected."""
        conn = self._conn
        if conn.closed:
            return False
        if seconds <= 0:
            return True
        loop = conn.server.loop
        fut = loop.create_future()
        conn.waiter = fut
        handle = loop.call_later(seconds, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            conn.waiter = None
        return not conn.closed

    async def wait_disconnected(self) -> None:
        conn = self._conn
        if conn.closed:
            return
        fut = conn.server.loop.create_future()
        conn.waiter = fut
        try:
            await fut
        finally:
            conn.waiter = None

    # Escape hatches for fault injection: they break the protocol on purpose.
    def write_raw(self, data: bytes) -> None:
        self.started = True
        if not self._conn.closed:
            self._conn.transport.write(data)

    def close(self) -> None:
        """Close after flushing what was written (a FIN, no `Connection: close` needed)."""
        self.finished = True
        self._conn.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding anything unsent."""
        self.finished = True
        self._conn.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.write_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.idle_ticks = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._expect_continue = False
        self._in_message = False
        self._reject_status = 0
        self._reading_paused = False
        # None in the queue stands for a request that failed to parse: it is
        # answered with a 400 in its turn, after the responses owed before it.
        self._queue: deque[Request | None] = deque()
        self._task: asyncio.Task[None] | None = None

    # -- transport callbacks --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.server.write_mode == "uvicorn":
            self.transport = _SplitWrites(transport, self, self.server.loop, self.server.rng)  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.server.connections.add(self)
        self.server.connections_accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._queue.clear()
        if self.waiter is not None:
            _wake(self.waiter)
        if self._drain_waiter is not None:
            _wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain_waiter is not None:
            _wake(self._drain_waiter)

    def data_received(self, data: bytes) -> None:
        self.idle_ticks = 0
        if self._reject_status:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400)
        except httptools.HttpParserError:
            self._reject(self._reject_status or 400)

    # -- httptools callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._raw_headers = []
        self._body = []
        self._body_size = 0
        self._expect_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        # Only when nothing is owed before it: a 100 must not land inside another response.
        if self._expect_continue and self._task is None and self._parser.get_http_version() == "1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY_BYTES:
            self._reject_status = 413
            raise ValueError("request body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        parser = self._parser
        path, _, query = self._url.partition(b"?")
        body = self._body
        request = Request(
            parser.get_method().decode("latin-1"),
            path.decode("latin-1"),
            query.decode("latin-1"),
            self._raw_headers,
            body[0] if len(body) == 1 else b"".join(body),
            parser.get_http_version(),
            # Must be read here: after feed_data returns httptools reports False.
            parser.should_keep_alive(),
        )
        if self._task is None:
            self._task = self.server.loop.create_task(self._serve(request))
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINE and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()

    # -- answering ------------------------------------------------------------
    def _reject(self, status: int) -> None:
        self._reject_status = status
        if self._task is None:
            self._write_error(status)
        else:
            self._queue.append(None)

    def _write_error(self, status: int) -> None:
        if self.closed:
            return
        body = http.HTTPStatus(status).phrase.encode()
        self.transport.write(b"".join((
            status_line(status), self.server.date_server, b"content-length: %d\r\n" % len(body),
            b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n\r\n", body)))
        self.close()

    async def _serve(self, request: Request | None) -> None:
        # One task serves a whole run of pipelined requests, in order.
        handler = self.server.handler
        try:
            while True:
                if request is None:
                    self._write_error(self._reject_status or 400)
                    return
                responder = Responder(self, request)
                try:
                    await handler(request, responder)
                except Exception:
                    log.exception("handler failed on %s %s", request.method, request.path)
                    self._finish_broken(responder)
                else:
                    if not responder.finished and not responder.disconnected:
                        # (a client that went away mid-response is normal: the handler stops early on purpose)
                        log.error("handler returned without finishing %s %s", request.method, request.path)
                        self._finish_broken(responder)
                if self.closed or not responder.keep_alive or not self._queue:
                    return
                request = self._queue.popleft()
                if self._reading_paused and len(self._queue) < MAX_PIPELINE // 2:
                    self._reading_paused = False
                    self.transport.resume_reading()
        finally:
            self._task = None

    def _finish_broken(self, responder: Responder) -> None:
        if self.closed:
            return
        if responder.started:
            self.abort()  # a cut-off body must not look complete
        else:
            self._write_error(500)

    async def drain(self) -> None:
        if not self.write_paused or self.closed:
            return
        fut = self.server.loop.create_future()
        self._drain_waiter = fut
        try:
            await fut
        finally:
            self._drain_waiter = None

    def is_idle(self) -> bool:
        return self._task is None and not self._in_message

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            self._wake_all()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()
            self._wake_all()

    def _wake_all(self) -> None:
        if self.waiter is not None:
            _wake(self.waiter)
        if self._drain_waiter is not None:
            _wake(self._drain_waiter)


class HttpServer:
    """The listening side: accepts connections, keeps the shared `date` header
    fresh and closes keep-alive connections idle for `keep_alive_s` (uvicorn's
    and vLLM's default is 5 s)."""

    def __init__(self, handler: Handler, *, keep_alive_s: float = 5.0, server_name: bytes = b"uvicorn",
                 write_mode: str | None = None) -> None:
        self.handler = handler
        self.write_mode = write_mode or default_write_mode()
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode {self.write_mode!r}: one of {', '.join(WRITE_MODES)}")
        self.rng = random.Random()
        self.keep_alive_s = keep_alive_s
        self.server_name = server_name
        self.connections: set[_Connection] = set()
        self.connections_accepted = 0
        self.date_server = b""
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.base_events.Server | None = None
        self._ticker: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False, backlog: int = 4096) -> None:
        self.loop = asyncio.get_running_loop()
        self._tick()
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None, backlog=backlog)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def _tick(self) -> None:
        # Once a second, as uvicorn does: the date only has second resolution,
        # and a per-request keep-alive timer would cost more than the request.
        self.date_server = b"date: %s\r\nserver: %s\r\n" % (
            email.utils.formatdate(time.time(), usegmt=True).encode(), self.server_name)
        for conn in list(self.connections):
            if conn.is_idle():
                conn.idle_ticks += 1
                if conn.idle_ticks > self.keep_alive_s:
                    conn.close()
        self._ticker = self.loop.call_later(1.0, self._tick)

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop listening and drop every connection; handlers see `disconnected`."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        tasks = [conn._task for conn in self.connections if conn._task is not None]
        for conn in list(self.connections):
            conn.close()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()


async def serve(handler: Handler, host: str, port: int, reuse_port: bool = False,
                *, keep_alive_s: float = 5.0, write_mode: str | None = None) -> HttpServer:
    """Start listening on the running loop; returns once the socket is bound."""
    server = HttpServer(handler, keep_alive_s=keep_alive_s, write_mode=write_mode)
    await server.start(host, port, reuse_port)
    return server


Hook = Callable[[HttpServer], Awaitable[None]]


def run(handler: Handler, host: str, port: int, reuse_port: bool = False, *, keep_alive_s: float = 5.0,
        on_startup: Hook | None = None, on_shutdown: Hook | None = None, write_mode: str | None = None) -> None:
    """Serve on uvloop until SIGTERM or SIGINT, then shut down and return (exit 0)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await serve(handler, host, port, reuse_port, keep_alive_s=keep_alive_s, write_mode=write_mode)
        if on_startup is not None:
            await on_startup(server)
        log.info("listening on http://%s:%d", host, server.port)
        await stop.wait()
        if on_shutdown is not None:
            await on_shutdown(server)
        await server.close()

    uvloop.run(main())
