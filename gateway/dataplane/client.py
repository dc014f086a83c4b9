"""The client side of the gateway: one asyncio Protocol per client connection.

Parses requests with httptools, enforces the request limits, hands complete
requests to the relay one at a time (pipelined ones wait their turn), writes
the replica's response through, and propagates backpressure and disconnects
to the replica connection. No ASGI on this path (see upstream.py for why).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from gateway.dataplane.reasons import Reason, error_response
from gateway.dataplane.request import Request
from gateway.dataplane.tunnel import Tunnel

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.dataplane.relay import Relay
    from gateway.dataplane.resume import ResumeStream
    from gateway.dataplane.state import ServerState
    from gateway.dataplane.upstream import UpstreamConnection

# Request headers never forwarded as they are: hop-by-hop and framing headers (we re-frame the body
# with our own Content-Length), and the names Ray's HAProxy reserves for the router (ray-serve.md §b).
_DROP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"content-length", b"expect", b"x-request-id", b"serve_multiplexed_model_id", b"serve-multiplexed-model-id",
))
_ROUTER_OWNED_PREFIX = b"x-serve-router-"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_WRITE_HIGH_WATER = 256 * 1024


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
        self.closed = False
        self.current: Request | None = None
        self.upstream: "UpstreamConnection | None" = None
        self.pending: deque[Request] = deque()
        self.reading_paused = False
        self.writing_paused = False
        # Deadline for the next byte from the client (slowloris / idle keep-alive); None while we are the slow one.
        self.deadline: float | None = time.monotonic() + self.config.header_timeout_s
        self.in_head = False
        self.first_byte_deadline = 0.0
        self.idle_reads = -1
        self.fd = -1
        self.idle_since = 0.0
        self._session_key_len = len(state.session_header_key)
        # The front door (gateway/security), when configured: it also claims the Authorization (and, for
        # CORS, Origin) headers, which then land in the drop branch below and are never forwarded.
        self.door = door = state.door
        self._drop = _DROP if door is None else door.drop_set(_DROP)
        self._auth: bytes | None = None
        self._origin: bytes | None = None
        self._key: object = None
        # A WebSocket upgrade: client bytes read past its head, then the tunnel once the replica answered 101.
        self.tunnel: Tunnel | None = None
        self._early = b""
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._request_id: bytes | None = None
        self._session: bytes | None = None
        self._content_type: bytes | None = None
        self._has_host = False
        self._expect_continue = False
        self._content_length = 0
        self._reject: Reason | None = None
        self._discard_body = False
        self._upgrade: bytes | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport.get_extra_info("ssl_object") is None:
                self.fd = sock.fileno()  # the C pump may write stream bodies to it (never through TLS)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        if not self.state.admit(self):
            self.respond_error(Reason.OVERLOADED, "too many connections", retry_after_s=1, close=True)

    def data_received(self, data: bytes) -> None:
        if self.current is None and not self.in_head:
            self.deadline = time.monotonic() + self.config.header_timeout_s
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._upgrade is None:
                self._reject_now(Reason.BAD_REQUEST, "protocol upgrades other than websocket are not supported")
                return
            # The request is dispatched; what follows its head belongs to the tunnel, if the replica accepts.
            self._early = data[exc.args[0]:]
            self.reading_paused = True
            self.transport.pause_reading()
        except httptools.HttpParserError as exc:
            reason = self._reject or Reason.BAD_REQUEST
            self._reject_now(reason, None if self._reject else f"malformed HTTP request: {exc}")

    def eof_received(self) -> bool | None:
        # A client FIN mid-request means it gave up (an SDK timeout, a killed curl): close, so that
        # connection_lost aborts the replica request at once, like HAProxy's `option abortonclose`
        # (set by Ray) and uvicorn. Keeping the half-open socket would let the engine generate on.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.closed(self)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            # The client is gone: drop the replica connection at once so the engine aborts generation.
            self.relay.exchange_ended(upstream)
            upstream.abort()
        request = self.current
        if request is not None:
            if not request.status or not request.reason:
                request.reason = Reason.CLIENT_ABORT.value
            if not request.status:
                request.status = 499
            self.current = None
            self.state.request_finished(request)
        self.pending.clear()

    def pause_writing(self) -> None:
        # The client reads slower than the replica writes: stop reading the replica (memory stays bounded).
        self.writing_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.in_head = True
        self._reset_message()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        lower = name.lower()
        if lower in self._drop:
            if lower == b"x-request-id":
                self._request_id = value
            elif lower == b"expect":
                self._expect_continue = value.lower() == b"100-continue"
            elif lower == b"content-length" and value.isdigit():
                self._content_length = int(value)
            elif lower == b"authorization":
                self._auth = value
            elif lower == b"origin":
                self._origin = value
            elif lower == b"upgrade":
                self._upgrade = value
            return
        if lower[:15] == _ROUTER_OWNED_PREFIX:
            return
        if lower == b"content-type":
            self._content_type = value
        elif lower == b"host":
            self._has_host = True
        elif len(lower) == self._session_key_len and self._session is None \
                and lower.replace(b"_", b"-") == self.state.session_header_key:
            # Ray matches the session header case-insensitively with '-' and '_' alike; first match wins.
            self._session = value
        # (llhttp has already refused CR, LF and NUL in names and values: no header injection here.)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._url[:1] != b"/":
            # Absolute-form or authority-form targets name another host: a gateway never follows them.
            self._reject = Reason.BAD_REQUEST
            raise RequestRejected(Reason.BAD_REQUEST)
        if self._content_length > self.config.max_body_bytes:
            # Refused before a single body byte is read or anything is forwarded.
            self._reject = Reason.BODY_TOO_LARGE
            raise RequestRejected(Reason.BODY_TOO_LARGE)
        door = self.door
        if door is not None:
            # The key is checked as soon as the head is in: a caller without one is answered 401 once its
            # body has gone by, and that body is dropped as it arrives, never buffered.
            self._key = key = door.authenticate(self._auth)
            self._discard_body = key is None and door.needs_key
        if self._expect_continue:
            self.transport.write(_CONTINUE)
        if self._upgrade is not None and (not self.parser.should_upgrade() or self._upgrade.lower() != b"websocket"
                                          or self.parser.get_method() != b"GET"):
            # Only WebSocket upgrades are tunnelled (RFC 6455 section 4.1: a GET); h2c and others are refused by
            # data_received (a plain GET with a stray Upgrade header is just a GET: the header is not forwarded).
            self._upgrade = None

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.config.max_body_bytes:
            self._reject = Reason.BODY_TOO_LARGE
            raise RequestRejected(Reason.BODY_TOO_LARGE)
        if not self._discard_body:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        if parser.should_upgrade() and self._upgrade is None:
            return  # an upgrade we refuse: answered 400 by data_received, never forwarded
        request = Request(
            parser.get_method(), self._url, parser.get_http_version(), self._headers,
            b"".join(self._body) if len(self._body) != 1 else self._body[0],
            parser.should_keep_alive(),
            self._request_id or new_request_id(),
            self._session, self._content_type, self._has_host,
        )
        if self.door is not None:
            request.key, request.origin = self._key, self._origin
            self._auth = self._origin = self._key = None
        if self._upgrade is not None:
            request.upgrade = b"websocket"
            request.keep_alive = False  # refused by the replica (no 101): nothing more can be read on this connection
        if self.current is None:
            self.deadline = None
            self.current = request
            self.relay.dispatch(self, request)
        else:
            # Pipelined: answer in order; stop reading until the queue drains (bounded memory).
            self.pending.append(request)
            if not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.config.max_header_bytes:
            self._reject = Reason.HEADERS_TOO_LARGE
            raise RequestRejected(Reason.HEADERS_TOO_LARGE)

    # -- writing answers the gateway makes itself
    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool = False) -> None:
        request = self.current
        if self.closed:
            return
        if request is not None and request.resume is not None and request.resume.replying:
            # A resume attempt failed and the client already has a stream: it can only be cut.
            self._cut(request, "failed")
            return
        keep = not close and request is not None and request.keep_alive and not self.state.draining
        out = [b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status))]
        for name, value in headers:
            if name.lower() not in (b"content-length", b"connection"):
                out.append(b"%s: %s\r\n" % (name, value))
        if request is not None:
            out.append(b"x-request-id: %s\r\n" % request.request_id)
        if self.door is not None:
            out.append(self.door.response_headers(request))
        out.append(b"content-length: %d\r\n%s\r\n" % (len(body), b"" if keep else b"connection: close\r\n"))
        if not (request is not None and request.method == b"HEAD"):
            out.append(body)
        self.transport.write(b"".join(out))
        if request is not None:
            request.status = status
            request.bytes_out += len(body)
            if not keep:
                request.keep_alive = False
        self.finish(close=not keep)

    def respond_error(self, reason: Reason, message: str | None = None, *, status: int | None = None,
                      retry_after_s: int | None = None, close: bool = False) -> None:
        response = error_response(reason, message, status=status, retry_after_s=retry_after_s)
        if self.current is not None:
            self.current.reason = reason.value
        self.respond(response.status_code, response.raw_headers, bytes(response.body), close=close)

    def _reject_now(self, reason: Reason, message: str | None) -> None:
        """A request we will not read any further: answer it and close the connection."""
        if self.current is None:
            # Account for it like any request so metrics and the access log see it.
            self.current = Request(b"-", self._url[:256] or b"-", "1.1", [], b"", False,
                                   self._request_id or new_request_id(), None, None, False)
            self.respond_error(reason, message, close=True)
        else:
            self.transport.close()

    # -- called by the relay and by UpstreamConnection
    def upstream_head(self, conn: "UpstreamConnection", status: int, head: bytes, has_request_id: bool,
                      body_start: bytes, must_close: bool) -> None:
        """Pass the replica's response head on, spliced: `head` ends with its last header's CRLF."""
        request = self.current
        assert request is not None
        resume = request.resume
        if resume is not None and (conn.streaming or resume.replying):
            self._resume_head(conn, request, resume, head, has_request_id, body_start, must_close)
            return
        request.status = status
        request.first_byte_s = time.monotonic() - request.started
        if status >= 500:
            self.relay.replica_failed(conn.target)
        keep = request.keep_alive and not must_close and not self.state.draining and request.version != "1.0"
        extra = b"" if has_request_id else b"x-request-id: %s\r\n" % request.request_id
        if self.door is not None:
            extra += self.door.response_headers(request)
        if not keep:
            request.keep_alive = False
            extra += b"connection: close\r\n"
        self.transport.write(b"%s%s\r\n%s" % (head, extra, body_start))

    def upstream_upgraded(self, conn: "UpstreamConnection", head: bytes, rest: bytes) -> None:
        """The replica switched protocols (101) for a WebSocket upgrade: join the two connections (tunnel.py).
        `head` ends with its last header's CRLF; `rest` is what the replica sent after it."""
        request = self.current
        assert request is not None and conn.transport is not None
        self.upstream = None
        conn.client = None
        conn.closed = True  # the tunnel owns its socket now: never pooled, never resumed by a coalescing timer
        request.status = 101
        request.first_byte_s = time.monotonic() - request.started
        extra = b"" if b"\nx-request-id:" in head.lower() else b"x-request-id: %s\r\n" % request.request_id
        if self.door is not None:
            extra += self.door.response_headers(request)
        self.transport.write(b"%s%s\r\n" % (head, extra))
        request.bytes_out = len(head) + len(extra) + 2
        metrics = self.state.metrics

        def ended(tunnel: Tunnel) -> None:
            self.relay.exchange_ended(conn)
            metrics.tunnels_active.dec()
            metrics.tunnels.labels(tunnel.why).inc()
            metrics.tunnel_bytes_moved(*tunnel.take_bytes())
            request.bytes_in = tunnel.bytes_in
            request.bytes_out += tunnel.bytes_out
            if tunnel.why in ("timeout", "drain"):
                request.reason = Reason.UPSTREAM_TIMEOUT.value if tunnel.why == "timeout" else Reason.DRAINING.value
            if self.current is request:
                self.current = None
                self.state.request_finished(request)

        def client_lost() -> None:
            self.closed = True
            self.state.closed(self)

        self.tunnel = tunnel = Tunnel(self.transport, conn.transport, self.config.tunnel_timeout_s, ended,
                                      client_lost, self.state.loop)
        metrics.tunnels_active.inc()
        early, self._early = self._early, b""
        tunnel.start(to_client=rest, to_upstream=early)

    def upstream_complete(self, conn: "UpstreamConnection") -> None:
        request = self.current
        if request is not None and request.resume is not None and request.resume.replying:
            resume = request.resume
            if not resume.done:
                if not resume.can_finish_here():
                    self.upstream_failed(conn, "incomplete")  # an in-band error, or an end without [DONE]
                    return
                resume.finish_here()
            else:
                self.transport.write(resume.end_chunk())
        self.upstream = None
        self.relay.exchange_ended(conn)
        if request is not None and request.status < 500:
            conn.target.successes += 1
        conn.release()
        if conn.keep_alive and not conn.closed:
            conn.target.pool.put(conn)
        else:
            conn.close()
        self.finish(close=not (self.current is not None and self.current.keep_alive))

    def upstream_failed(self, conn: "UpstreamConnection", why: str) -> None:
        """The replica connection broke or spoke garbage before the response ended."""
        self.upstream = None
        self.relay.exchange_ended(conn)
        head_sent = conn.head_sent
        conn.abort()
        request = self.current
        if request is None or self.closed:
            return
        if not head_sent:
            self.relay.upstream_failed_before_head(self, request, conn, why)
            return
        if request.resume is not None and request.resume.replying:
            self._stream_broke(request, conn, why)
            return
        if request.resume_refused is not None and self.config.resume_limit:
            self.state.metrics.resume("refused_" + request.resume_refused)
        # Bytes already reached the client: nothing can be retried. Closing without the final chunk
        # makes the client see a broken stream, never a clean (and wrong) end.
        request.reason = Reason.UPSTREAM_MALFORMED.value if why == "malformed" else Reason.UPSTREAM_DIED.value
        request.keep_alive = False
        self.relay.replica_failed(conn.target)
        self.state.metrics.upstream_died(conn.target.replica_id)
        self.finish(close=True)

    # -- resume (resume.py): only requests planned for it get here
    def _resume_head(self, conn: "UpstreamConnection", request: Request, resume: "ResumeStream", head: bytes,
                     has_request_id: bool, body_start: bytes, must_close: bool) -> None:
        if not conn.streaming:
            # A replica we resumed on answered with an error, not a stream: try the next one.
            self.upstream_failed(conn, "not_a_stream")
            return
        resume.start_segment(self.transport)
        if resume.replying:
            conn.target.resumes_to += 1
            self.state.metrics.resume(resume.outcome)
            resume.outcome = "resumed"
        else:
            resume.replying = True
            request.status = 200
            request.first_byte_s = time.monotonic() - request.started
            keep = request.keep_alive and not must_close and not self.state.draining
            extra = b"" if has_request_id else b"x-request-id: %s\r\n" % request.request_id
            if not keep:
                request.keep_alive = False
                extra += b"connection: close\r\n"
            self.transport.write(b"%s%s\r\n" % (head, extra))
        resume.flush()  # the payload that came with the head

    def _stream_broke(self, request: Request, conn: "UpstreamConnection", why: str) -> None:
        """The replica's part of a resumable stream ended early: continue it elsewhere, or cut it."""
        resume = request.resume
        assert resume is not None
        target = conn.target
        resume.failed.add(target)
        target.resumes_from += 1
        self.relay.replica_failed(target)
        if resume.can_finish_here():
            resume.finish_here()  # only [DONE] was missing
            self.state.metrics.resume("resumed")
            self.finish(close=not request.keep_alive)
            return
        reason = resume.cannot_resume()
        if reason is not None:
            request.reason = Reason.UPSTREAM_DIED.value
            self._cut(request, "failed" if reason == "limit" else "refused_" + reason)
            return
        request.reason = ""
        self.relay.resume(self, request, target)

    def migrate(self) -> bool:
        """Move this stream off its replica, which is leaving the target set (drain by migration): the client's
        stream goes on from another replica through resume, token-exact. False: not a stream that can move."""
        upstream, request = self.upstream, self.current
        if upstream is None or request is None or self.closed or not upstream.head_sent:
            return False
        resume = request.resume
        if resume is None or not resume.replying or resume.done or \
                (resume.cannot_resume() not in (None, "limit") and not resume.can_finish_here()):
            return False
        target = upstream.target
        self.upstream = None
        self.relay.exchange_ended(upstream)
        upstream.abort()  # the leaving replica's engine stops generating for it now
        resume.failed.add(target)  # never back to it
        target.resumes_from += 1
        if resume.can_finish_here():
            resume.finish_here()
            self.state.metrics.resume("migrated")
            self.finish(close=not request.keep_alive)
            return True
        resume.limit += 1  # a planned move does not spend the budget kept for replicas that die
        resume.outcome = "migrated"
        request.reason = ""
        self.relay.resume(self, request, target)
        return True

    def _cut(self, request: Request, outcome: str) -> None:
        self.state.metrics.resume(outcome)
        if not request.reason:
            request.reason = Reason.UPSTREAM_DIED.value
        request.keep_alive = False
        self.finish(close=True)

    def finish(self, *, close: bool) -> None:
        """The current request is answered: log it, then serve the next one or close."""
        request, self.current = self.current, None
        if request is not None:
            self.state.request_finished(request)
        if self.closed:
            return
        if close or self.state.draining and not self.pending:
            self.transport.close()
            self.closed = True
            return
        if self.pending:
            self.current = self.pending.popleft()
            self.relay.dispatch(self, self.current)
            return
        self.deadline = time.monotonic() + self.config.client_timeout_s
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- the gateway's periodic sweep
    def check_timeouts(self, now: float) -> None:
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
        upstream = self.upstream
        if upstream is None:
            return
        if not upstream.head_sent:
            if self.first_byte_deadline and now > self.first_byte_deadline:
                self.upstream = None
                self.relay.exchange_ended(upstream)
                upstream.abort()
                self.respond_error(Reason.UPSTREAM_TIMEOUT, "the replica sent no response head in time", close=True)
            return
        idle = self.config.idle_timeout_s
        if idle and not self.writing_paused and not upstream.held_by_client:
            progress = upstream.progress
            if progress != self.idle_reads:
                self.idle_reads = progress
                self.idle_since = now
            elif now - self.idle_since > idle:
                if self.current is not None and self.current.resume is not None and self.current.resume.replying:
                    self.upstream_failed(upstream, "idle")
                    return
                if self.current is not None:
                    self.current.reason = Reason.UPSTREAM_TIMEOUT.value
                self.upstream = None
                self.relay.exchange_ended(upstream)
                upstream.abort()
                self.finish(close=True)


_PHRASES = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
            405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
            429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 499: b"Client Closed Request",
            500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}


def _phrase(status: int) -> bytes:
    return _PHRASES.get(status, b"Unknown")
