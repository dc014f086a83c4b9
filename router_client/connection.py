"""One HTTP/1.1 client connection that buffers whole responses (router answers are small).

Written on a raw asyncio Protocol with httptools rather than httpx: this call is
on every request's path, and httpx's per-request cost (~100+ us of Python) would
be most of the gateway's budget; here it is one write, one read and a C parser.
"""

from __future__ import annotations

import asyncio
import socket

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


class BufferedHTTPConnection(asyncio.Protocol):
    def __init__(self, max_response_bytes: int):
        self.max_response_bytes = max_response_bytes
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._got_bytes = False
        self._closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # A server must not speak while no request is outstanding: the connection is unusable.
            self.close()
            return
        self._got_bytes = True
        self._size += len(data)
        try:
            if self._size > self.max_response_bytes:
                raise MalformedResponse(f"response larger than {self.max_response_bytes} bytes")
            self._parser.feed_data(data)
        except (httptools.HttpParserError, MalformedResponse) as exc:
            self._fail(exc if isinstance(exc, MalformedResponse) else MalformedResponse(str(exc)))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._fail(ConnectionLost(self._got_bytes))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        # should_keep_alive() is only right inside this callback (relay-performance.md, gotchas).
        response = Response(self._parser.get_status_code(), self._headers, b"".join(self._body),
                            self._parser.should_keep_alive())
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # -- API
    @property
    def usable(self) -> bool:
        return not self._closed and self._waiter is None and self.transport is not None \
            and not self.transport.is_closing()

    def request(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._headers = []
        self._body = []
        self._size = 0
        self._got_bytes = False
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


async def open_connection(host: str, port: int, max_response_bytes: int) -> BufferedHTTPConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: BufferedHTTPConnection(max_response_bytes), host, port)
    return protocol
