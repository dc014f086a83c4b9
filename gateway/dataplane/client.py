"""The HTTP/1 server side of the gateway: one asyncio Protocol per client connection.

Parses requests with httptools and enforces the request limits as bytes arrive (a head is
bounded by the bytes fed while it is open, whatever the parser's callbacks do; a body lives in
one bounded buffer), hands complete requests to the relay one at a time, in order (pipelined
ones wait their turn, served by a loop, never by recursion), and reports the client's events
(backpressure, disconnect, timeouts) to the current Exchange (exchange.py), which writes the
replica's response through. The answers the gateway writes itself are rendered by answers.py.
No ASGI on this path (see upstream.py for why).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from gateway.dataplane.answers import CONTINUE, error_parts, render
from gateway.dataplane.exchange import Outcome
from gateway.dataplane.forwarding import DROP, FORWARDED, ROUTER_OWNED_PREFIX
from gateway.dataplane.reasons import Reason
from gateway.dataplane.request import Request
from gateway.dataplane.tunnel import Tunnel

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.dataplane.exchange import Exchange
    from gateway.dataplane.relay import Relay
    from gateway.dataplane.state import ServerState

_WRITE_HIGH_WATER = 256 * 1024
# Bytes fed to the parser at once: a head is checked against max_header_bytes after each piece, and a
# pipelining client has at most a piece's worth of requests parsed beyond MAX_PARSED_AHEAD.
_PIECE = 8 * 1024
# Requests parsed ahead of the one being answered; past it the rest of the client's bytes wait unparsed.
MAX_PARSED_AHEAD = 4
# Unparsed bytes kept while requests wait (reading continues so a close is seen); past it reading pauses.
_BACKLOG_MAX = 64 * 1024
# After refusing a request the client may still be sending (a head that never ends, a body too large): answer, send a
# FIN, and drop what it sends for up to this long before closing. Closing with its bytes unread would make the kernel
# reset the connection, and a reset destroys the answer in the client's buffers (RFC 9112 §9.6; nginx's
# `lingering_close`).
_LINGER_S = 2.0
_LINGER_BYTES = 4 * 1024 * 1024


def new_request_id() -> bytes:
    # Unique, not secret: the Mersenne Twister avoids os.urandom's getrandom() syscall per request.
    return b"%032x" % random.getrandbits(128)


class RequestRejected(Exception):
    def __init__(self, reason: Reason):
        self.reason = reason


class ClientConnection(asyncio.Protocol):
    def __init__(self, config: "Config", state: "ServerState", relay: "Relay"):
        self.config = config
        self.state = state
        self.relay = relay
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        # RFC 9112 §9.6: the request that says `Connection: close` (or an HTTP/1.0 one without keep-alive) is the
        # last; it is answered and what follows it is ignored. llhttp refuses bytes after it with an error
        # (HPE_CLOSED_CONNECTION) that would drop the request it already parsed; this makes it skip them.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.closed = False
        self.current: Request | None = None
        # The attempt answering `current` through a replica (exchange.py sets and clears it).
        self.exchange: Exchange | None = None
        self.pending: deque[Request] = deque()
        self.reading_paused = False
        self.writing_paused = False
        # Deadline for the next byte from the client (slowloris / idle keep-alive); None while we are the slow one.
        self.deadline: float | None = time.monotonic() + self.config.header_timeout_s
        self.in_head = False  # a request has begun and is not complete yet
        self.fd = -1
        self.peer = b""
        self._backlog = b""
        self._serving = False  # inside the loop that dispatches pending requests
        self._linger = 0  # > 0: the answer is out with a FIN; bytes still read are dropped (this many left)
        self._reject_close = False
        self._begins = 0
        self._body = bytearray()
        self._session_key_len = len(state.session_header_key)
        # The front door (gateway/security), when configured: it also claims the Authorization (and, for
        # CORS, Origin) headers, which then land in the drop branch below and are never forwarded.
        self.door = door = state.door
        self._drop = (DROP if door is None else door.drop_set(DROP)) | FORWARDED
        self._trust_forwarded = config.trust_forwarded
        self._budget = config.max_buffered_body_bytes
        self._max_head = config.max_header_bytes
        self._auth: bytes | None = None
        self._origin: bytes | None = None
        self._key: object = None
        # A WebSocket upgrade: client bytes read past its head, then the tunnel once the replica answered 101
        # (Exchange.upstream_upgraded, tunnel.py).
        self.tunnel: Tunnel | None = None
        self._early = b""
        self._reset_message()

    def _reset_message(self) -> None:
        body = self._body
        if body:
            self.state.buffered_body -= len(body)  # a message given up before it completed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._head_size = 0
        self._head_raw = 0  # bytes fed while the head is open (an upper bound of the head's size)
        self._head_slack = 0
        self._headers_done = False
        self._request_id: bytes | None = None
        self._session: bytes | None = None
        self._content_type: bytes | None = None
        self._connection: bytes | None = None
        self._upgrade: bytes | None = None
        self._has_host = False
        self._xff: bytes | None = None
        self._proto: bytes | None = None
        self._expect_continue = False
        self._continue_owed = False
        self._content_length = 0
        self._reject: Reason | None = None
        self._discard_body = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport.get_extra_info("ssl_object") is None:
                self.fd = sock.fileno()  # the C pump may write stream bodies to it (never through TLS)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0] if isinstance(peer, tuple) else str(peer or "")).encode("latin-1", "replace")
        self._scheme = b"http" if transport.get_extra_info("ssl_object") is None else b"https"
        if not self.state.admit(self):
            self.respond_error(Reason.OVERLOADED, "too many connections", retry_after_s=1, close=True)

    def data_received(self, data: bytes) -> None:
        if self._linger:
            self._linger -= min(len(data), self._linger)
            if not self._linger:
                self.transport.close()
            return
        if self.current is None and not self.in_head:
            self.deadline = time.monotonic() + self.config.header_timeout_s
        if self._backlog or self.pending or self.writing_paused:
            if self._backlog or self._waiting():
                self._hold(data)
                return
        elif len(data) <= _PIECE and not self.in_head:
            # The common case: a whole request (or several) in one small read, nothing waiting: one feed.
            begins = self._begins
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                self._upgraded(exc, data, b"")
                return
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return
            if self.in_head and not self._headers_done:
                self._head_raw = len(data)  # exact when the head began at this read's first byte
                self._head_slack = 0 if self._begins - begins == 1 else _PIECE
            return
        self._feed(data)

    def _waiting(self) -> bool:
        """Enough requests parsed ahead, or our own answers not being read: parse nothing more for now."""
        return len(self.pending) >= MAX_PARSED_AHEAD or (self.writing_paused and self.current is None)

    def _hold(self, data: bytes) -> None:
        self._backlog += data
        if len(self._backlog) > _BACKLOG_MAX and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _feed(self, data: bytes) -> None:
        """Parse `data` a piece at a time: the head bound is checked, and parsing stops when requests wait."""
        start, size = 0, len(data)
        while start < size:
            if self.closed:
                return
            if self._waiting():
                self._hold(data[start:])
                return
            piece = data[start:start + _PIECE] if size - start > _PIECE else (data[start:] if start else data)
            start += len(piece)
            head_open = self.in_head and not self._headers_done
            between = not self.in_head
            begins = self._begins
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as exc:
                self._upgraded(exc, piece, data[start:])
                return
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return
            if self.in_head and not self._headers_done:
                # The head is still open: the bytes fed since it began bound it (httptools buffers a header
                # name or value that never ends and calls nothing, so only the bytes can). A head that began
                # at this piece's first byte is counted exactly; one that began after another request in the
                # same piece is over-counted by at most that piece, which is allowed for.
                if head_open:
                    self._head_raw += len(piece)
                else:
                    self._head_raw = len(piece)
                    self._head_slack = 0 if between and self._begins - begins == 1 else _PIECE
                if self._head_raw > self.config.max_header_bytes + self._head_slack:
                    self._reject = Reason.HEADERS_TOO_LARGE
                    self._reject_now(Reason.HEADERS_TOO_LARGE, None)
                    return

    def _upgraded(self, exc: httptools.HttpParserUpgrade, piece: bytes, rest: bytes) -> None:
        if self._upgrade is None:
            self._reject_now(Reason.BAD_REQUEST, "protocol upgrades other than websocket are not supported")
            return
        # The request is dispatched; what follows its head belongs to the tunnel, if the replica accepts.
        self._early = piece[exc.args[0]:] + rest
        self.reading_paused = True
        self.transport.pause_reading()

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        reason = self._reject or Reason.BAD_REQUEST
        self._reject_now(reason, None if self._reject else f"malformed HTTP request: {exc}")

    def _feed_backlog(self) -> None:
        backlog, self._backlog = self._backlog, b""
        if backlog:
            self._feed(backlog)
        if self.reading_paused and not self._backlog and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        # A client FIN mid-request means it gave up (an SDK timeout, a killed curl): close, so that
        # connection_lost aborts the replica request at once, like HAProxy's `option abortonclose`
        # (set by Ray) and uvicorn. Keeping the half-open socket would let the engine generate on.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.closed(self)
        exchange = self.exchange
        if exchange is not None:
            exchange.client_gone()
        request = self.current
        if request is not None:
            if not request.status or not request.reason:
                request.reason = Reason.CLIENT_ABORT.value
            if not request.status:
                request.status = 499
            self.current = None
            self._release(request)
            self.state.request_finished(request)
        self._drop_pending()
        if self._body:
            self.state.buffered_body -= len(self._body)
            self._body = bytearray()
        self._backlog = b""

    def pause_writing(self) -> None:
        # The client reads slower than we write: stop reading the replica (memory stays bounded), and parse
        # no further request of this client until it reads (answers we write ourselves are bounded too).
        self.writing_paused = True
        if self.exchange is not None:
            self.exchange.client_paused()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            self.exchange.client_resumed()
        if self.current is None and not self._serving:
            self._serve_pending()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._begins += 1
        self.in_head = True
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self._url += url
        # _count_head, inline: one Python call less per header line
        self._head_size += len(url)
        if self._head_size > self._max_head:
            self._count_head(0)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer field of a chunked body: never merged into the forwarded headers
        self._head_size += len(name) + len(value) + 4  # _count_head, inline
        if self._head_size > self._max_head:
            self._count_head(0)
        lower = name.lower()
        if lower in self._drop:
            if lower == b"x-request-id":
                self._request_id = value
            elif lower == b"expect":
                self._expect_continue = value.lower() == b"100-continue"
            elif lower == b"content-length" and value.isdigit():
                self._content_length = int(value)
            elif lower == b"connection":
                self._connection = value if self._connection is None else self._connection + b"," + value
            elif lower == b"upgrade":
                self._upgrade = value
            elif lower == b"x-forwarded-for":
                if self._trust_forwarded:
                    self._xff = value if self._xff is None else self._xff + b", " + value
            elif lower == b"x-forwarded-proto":
                if self._trust_forwarded and self._proto is None:
                    self._proto = value
            elif lower == b"authorization":
                self._auth = value
            elif lower == b"origin":
                self._origin = value
            return
        if lower[:15] == ROUTER_OWNED_PREFIX:
            return
        if lower == b"content-type":
            self._content_type = value
        elif lower == b"host":
            if self._has_host:  # RFC 9112 §3.2: more than one Host field line is a 400
                self._reject = Reason.BAD_REQUEST
                raise RequestRejected(Reason.BAD_REQUEST)
            self._has_host = True
        elif len(lower) == self._session_key_len and self._session is None \
                and lower.replace(b"_", b"-") == self.state.session_header_key:
            # Ray matches the session header case-insensitively with '-' and '_' alike; first match wins.
            self._session = value
        # (llhttp has already refused CR, LF and NUL in names and values: no header injection here.)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        if self._url[:1] != b"/" or not self._has_host and self.parser.get_http_version() == "1.1":
            # Absolute-form or authority-form targets name another host: a gateway never follows them. An HTTP/1.1
            # request without Host is a 400 too (RFC 9112 §3.2).
            self._reject = Reason.BAD_REQUEST
            raise RequestRejected(Reason.BAD_REQUEST)
        if self._upgrade is not None and (not self.parser.should_upgrade() or self._upgrade.lower() != b"websocket"
                                          or self.parser.get_method() != b"GET"):
            # The upgrade branch: only WebSocket upgrades are tunnelled (RFC 6455 section 4.1: a GET; tunnel.py);
            # h2c and others are refused with a 400 by _feed, never forwarded (a plain GET with a stray Upgrade
            # header is just a GET: the header is not forwarded).
            self._upgrade = None
        if self._content_length > self.config.max_body_bytes:
            # Refused before a single body byte is read or anything is forwarded.
            self._reject = Reason.BODY_TOO_LARGE
            raise RequestRejected(Reason.BODY_TOO_LARGE)
        if self._budget and self._content_length and self.state.buffered_body + self._content_length > self._budget:
            self._reject = Reason.OVERLOADED  # the bodies held by every connection would pass the budget
            raise RequestRejected(Reason.OVERLOADED)
        if self._connection is not None:
            self._drop_connection_named()
        door = self.door
        if door is not None:
            # The key is checked as soon as the head is in: a caller without one is answered 401 once its
            # body has gone by, and that body is dropped as it arrives, never buffered.
            self._key = key = door.authenticate(self._auth)
            self._discard_body = key is None and door.needs_key
        if self._expect_continue:
            # Only once every answer owed before it is written: a 100 must not land inside another response.
            if self.current is None and not self.pending:
                self.transport.write(CONTINUE)
            else:
                self._continue_owed = True

    def _drop_connection_named(self) -> None:
        """Headers the client named in `Connection:` are hop-by-hop (RFC 9110 §7.6.1): not forwarded."""
        named = {token.strip().lower() for token in self._connection.split(b",")}  # type: ignore[union-attr]
        named.discard(b"")
        if named:
            self._headers = [(name, value) for name, value in self._headers if name.lower() not in named]

    def on_body(self, body: bytes) -> None:
        # One bytearray per body, bounded by max_body_bytes (1-byte chunks cost their bytes, not an object each),
        # and charged to the server's budget for buffered bodies as it grows.
        size = len(body)
        if len(self._body) + size > self.config.max_body_bytes:
            self._reject = Reason.BODY_TOO_LARGE
            raise RequestRejected(Reason.BODY_TOO_LARGE)
        if not self._discard_body:
            state = self.state
            if self._budget and state.buffered_body + size > self._budget:
                self._reject = Reason.OVERLOADED
                raise RequestRejected(Reason.OVERLOADED)
            state.buffered_body += size
            self._body += body

    def on_message_complete(self) -> None:
        self.in_head = False
        self._continue_owed = False
        parser = self.parser
        if parser.should_upgrade() and self._upgrade is None:
            return  # an upgrade we refuse: answered 400 by _feed, never forwarded
        headers = self._headers
        # X-Forwarded-For gets the address we see appended (or replaces the client's unless it is trusted);
        # X-Forwarded-Proto says how it reached us (RFC 7239 §5 describes the same in Forwarded).
        headers.append((b"x-forwarded-for", self.peer if self._xff is None else self._xff + b", " + self.peer))
        headers.append((b"x-forwarded-proto", self._proto or self._scheme))
        body = self._body
        request = Request(
            parser.get_method(), self._url, parser.get_http_version(), headers,
            bytes(body), parser.should_keep_alive(),
            self._request_id or new_request_id(),
            self._session, self._content_type, self._has_host,
        )
        request.body_charge = len(body) if not self._discard_body else 0
        self._body = bytearray()
        if self.door is not None:
            request.key, request.origin = self._key, self._origin
            self._auth = self._origin = self._key = None
        if self._upgrade is not None:
            request.upgrade = b"websocket"
            request.keep_alive = False  # refused by the replica (no 101): nothing more can be read on this connection
        if self.current is None and not self._serving and not self.pending and not self.closed \
                and not self.writing_paused:
            # The common case, nothing queued before it: _serve_pending's first turn, without the queue.
            self.deadline = None
            self.current = request
            self._serving = True
            try:
                self.relay.dispatch(self, request)
            finally:
                self._serving = False
            if self.current is None:
                self._serve_pending()  # answered at once: then what waits behind it, as in the loop
            return
        self.pending.append(request)
        if self.current is None and not self._serving:
            self._serve_pending()

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._max_head:
            self._reject = Reason.HEADERS_TOO_LARGE
            raise RequestRejected(Reason.HEADERS_TOO_LARGE)

    # -- serving requests in order: a loop, never recursion
    def _serve_pending(self) -> None:
        """Dispatch pending requests one at a time while each is answered at once (the gateway's own answers);
        stop at one that waits on a replica. Parsing resumes when fewer requests wait."""
        self._serving = True
        try:
            while self.current is None and self.pending and not self.closed and not self.writing_paused:
                self.deadline = None
                self.current = request = self.pending.popleft()
                self.relay.dispatch(self, request)
        finally:
            self._serving = False
        if self.closed or self.current is not None:
            return
        if self._continue_owed and not self.pending:
            self._continue_owed = False
            self.transport.write(CONTINUE)  # the request whose head is in is current now: send its body
        if self._backlog and not self._waiting():
            self._feed_backlog()

    def _release(self, request: Request) -> None:
        if request.body_charge:
            self.state.buffered_body -= request.body_charge
            request.body_charge = 0

    def _drop_pending(self) -> None:
        for waiting in self.pending:
            self._release(waiting)
        self.pending.clear()

    def take_early(self) -> bytes:
        """Client bytes read past a WebSocket upgrade's head (the tunnel sends them on)."""
        early, self._early = self._early, b""
        return early

    def tunnel_client_lost(self) -> None:
        """The tunnel's client end is gone (it owns the transport now, so connection_lost is not ours)."""
        self.closed = True
        self.state.closed(self)

    def finish(self, *, close: bool) -> None:
        """The current request is answered: log it, then serve the next one or close."""
        exchange = self.exchange
        if exchange is not None:
            # Answered by someone other than its exchange (the front door, admission's queue): end it here, so
            # whatever it holds is given back exactly once.
            exchange.end(Outcome.ANSWERED)
        request, self.current = self.current, None
        if request is not None:
            if request.body_charge:  # _release, inline: every POST holds some
                self.state.buffered_body -= request.body_charge
                request.body_charge = 0
            self.state.request_finished(request)
        if self.closed:
            return
        if close or self.state.draining and not self.pending and not self.in_head:
            self.closed = True
            transport = self.transport
            if self._reject_close and transport.can_write_eof() and not transport.is_closing():
                transport.write_eof()
                self._linger = _LINGER_BYTES
                self.deadline = time.monotonic() + _LINGER_S
                self.transport.resume_reading()
            else:
                transport.close()
            return
        if not self.pending and not self.in_head:
            self.deadline = time.monotonic() + self.config.client_timeout_s
        if self.pending and not self._serving:
            self._serve_pending()
        elif self._backlog or self._continue_owed:
            self._serve_pending()

    # -- writing answers the gateway makes itself
    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool = False) -> None:
        if self.closed:
            return
        request = self.current
        keep = not close and request is not None and request.keep_alive and not self.state.draining
        door = self.door
        self.transport.write(render(
            status, headers, body, request_id=request.request_id if request is not None else None,
            extra=door.response_headers(request) if door is not None else b"", keep_alive=keep,
            head_only=request is not None and request.method == b"HEAD"))
        if request is not None:
            request.status = status
            request.bytes_out += len(body)
            if not keep:
                request.keep_alive = False
        self.finish(close=not keep)

    def respond_error(self, reason: Reason, message: str | None = None, *, status: int | None = None,
                      retry_after_s: int | None = None, close: bool = False) -> None:
        if self.current is not None:
            self.current.reason = reason.value
        status, headers, body = error_parts(reason, message, status=status, retry_after_s=retry_after_s)
        self.respond(status, headers, body, close=close)

    def _reject_now(self, reason: Reason, message: str | None) -> None:
        """A request we will not read any further: answer it and close the connection."""
        if self.closed:
            return
        self._reject_close = True
        if self.current is None:
            # Account for it like any request so metrics and the access log see it.
            self.current = Request(b"-", self._url[:256] or b"-", "1.1", [], b"", False,
                                   self._request_id or new_request_id(), None, None, False)
            self._drop_pending()
            self.respond_error(reason, message, close=True)
        else:
            # Answers are owed before this one: nothing more is read; the current one is cut.
            self._drop_pending()
            self.transport.close()

    # -- the gateway's periodic sweep
    def check_timeouts(self, now: float) -> None:
        if self._linger and self.deadline is not None and now > self.deadline:
            self._linger = 0
            self.transport.close()
        if self.closed:
            return
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.check_timeouts(now)
            self.state.metrics.tunnel_bytes_moved(*tunnel.take_bytes())
            return
        if self.deadline is not None and now > self.deadline:
            if self.in_head:
                self._reject_now(Reason.REQUEST_TIMEOUT, None)
            else:
                self.transport.close()  # idle keep-alive connection: close quietly, like any server
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.check_timeouts(now)
