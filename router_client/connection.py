"""One HTTP/1.1 client connection that buffers whole responses (router answers are small).

Written on a raw asyncio Protocol with httptools rather than httpx, and driven by
callbacks rather than awaited: this call is on every request's path, and httpx's
per-request cost (~100+ us of Python), or even a chain of coroutines, would be most
of the gateway's budget. Here it is one write, one read and a C parser.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

import httptools

from router_client.errors import ConnectionLost, MalformedResponse


class Response:
    __slots__ = ("status", "headers", "body", "keep_alive")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool):
        self.status = status
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Exchange(Protocol):
    """Whoever waits for the response: told exactly once, by one of these."""

    def on_response(self, conn: "BufferedHTTPConnection", response: Response) -> None: ...

    def on_error(self, conn: "BufferedHTTPConnection", exc: Exception) -> None: ...


class BufferedHTTPConnection(asyncio.Protocol):
    def __init__(self, max_response_bytes: int):
        self.max_response_bytes = max_response_bytes
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._exchange: Exchange | None = None
        self._first_bytes = b""
        self._body: list[bytes] = []
        self._size = 0
        self._got_bytes = False
        self._closed = False
        self.reused = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._exchange is None:
            # A server must not speak while no request is outstanding: the connection is unusable.
            self.close()
            return
        if not self._got_bytes:
            self._first_bytes = data  # holds the head, read back only for a non-200 (content-type)
            self._got_bytes = True
        self._size += len(data)
        try:
            if self._size > self.max_response_bytes:
                raise MalformedResponse(f"response larger than {self.max_response_bytes} bytes")
            self._parser.feed_data(data)
        except (httptools.HttpParserError, MalformedResponse) as exc:
            self.close()
            self._fail(exc if isinstance(exc, MalformedResponse) else MalformedResponse(str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._fail(ConnectionLost(self._got_bytes))

    # -- httptools callbacks (no on_header: a decision needs none, so none is paid for per request)
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        # should_keep_alive() is only right inside this callback: once feed_data() returns, httptools 0.6 (llhttp)
        # has reset the parser for the next message and it reports False, which would close every pooled connection.
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        status = self._parser.get_status_code()
        headers = [] if status == 200 else _head_headers(self._first_bytes)
        response = Response(status, headers, body, self._parser.should_keep_alive())
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.on_response(self, response)

    # -- API
    @property
    def usable(self) -> bool:
        return not self._closed and self._exchange is None and self.transport is not None \
            and not self.transport.is_closing()

    def request(self, data: bytes, exchange: Exchange) -> None:
        assert self.transport is not None and self._exchange is None
        self._exchange = exchange
        self._body = []
        self._size = 0
        self._got_bytes = False
        self.transport.write(data)

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """Forget the exchange (it timed out) and drop the connection: its state is unknown."""
        self._exchange = None
        self.close()

    def _fail(self, exc: Exception) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.on_error(self, exc)


def _head_headers(data: bytes) -> list[tuple[bytes, bytes]]:
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(name.strip(), value.strip()) for name, _, value in (line.partition(b":") for line in head)]


async def open_connection(host: str, port: int, max_response_bytes: int) -> BufferedHTTPConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: BufferedHTTPConnection(max_response_bytes), host, port)
    return protocol
