"""One attempt at answering one request through one replica: the Exchange.

Like HAProxy's `struct stream` driven by `process_stream()`, or Envoy's `UpstreamRequest`: the
exchange owns everything one attempt holds, and it has explicit states

    ROUTING -> CONNECTING -> AWAITING_HEAD -> STREAMING (Python) or PUMPED (C pump) -> DONE
                                           or TUNNEL (a WebSocket upgrade the replica accepted) -> DONE

and ONE idempotent `end(outcome)` that gives everything back: the target's and the server's
requests in flight (counted here and nowhere else, from dispatch on, so admission sees requests
waiting for the router or a connect), the replica connection (back to the pool only after a
complete response on a connection that may be kept alive), the pump. `end` returns False when the
exchange had already ended, so every caller may call it; the consequences for the client (its
next request, an error answer, a retry or a resume) run once, after the release.

ClientConnection (client.py) and UpstreamConnection (upstream.py) only move bytes and report
events here; what happens after a failure is asked of the relay's policies (relay.py: retry
before the head, resume after it).

Hook points for other parts of the gateway:
- `Exchange.on_end`: a list of callables `(exchange, outcome)` run at the end of every attempt,
  after the release (usage and token accounting: `exchange.request`, `exchange.target`,
  `exchange.conn.bytes_in` are still readable there).
- `Relay.dispatch` (relay.py) is where a request becomes its first exchange: admission queues go
  before it.
- `Exchange.body_follows` decides whether the C pump takes a body (pumping.py).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from gateway.dataplane.pumping import METER_EVENTS
from gateway.dataplane.reasons import Reason
from gateway.dataplane.tunnel import Tunnel

if TYPE_CHECKING:
    import asyncio

    from gateway.config import Config
    from gateway.controlplane.targets import Target
    from gateway.dataplane.request import Request
    from gateway.dataplane.response_head import Framing
    from gateway.dataplane.state import ServerState
    from gateway.dataplane.upstream import UpstreamConnection

log = logging.getLogger("gateway.exchange")


class Phase(enum.IntEnum):
    ROUTING = 0  # asking the router, or choosing the least loaded replica
    CONNECTING = 1  # a target is chosen (and counted); waiting for a connection
    AWAITING_HEAD = 2  # the request is written; no response head yet
    STREAMING = 3  # the head went to the client; the body goes through Python
    PUMPED = 4  # the head went to the client; the C pump moves the body
    TUNNEL = 5  # the replica accepted a WebSocket upgrade: bytes both ways (tunnel.py) until either side closes
    DONE = 6


class Outcome(enum.Enum):
    COMPLETE = "complete"  # the response reached its end
    ANSWERED = "answered"  # the gateway answered (an error) or handed the request to another attempt
    CLIENT_GONE = "client_gone"  # the client closed its connection
    FAILED = "failed"  # the replica connection broke or spoke garbage
    UPSTREAM_TIMEOUT = "upstream_timeout"  # no head, or silence inside the body, past its timeout
    CLIENT_TIMEOUT = "client_timeout"  # the client read nothing for idle_timeout_s
    TUNNEL_CLOSED = "tunnel_closed"  # a WebSocket tunnel ended (either side, its timeout, a drain)


class Client(Protocol):
    """What the relay, the exchange and the gateway's own endpoints use of a client connection (client.py)."""
    transport: "asyncio.Transport"
    closed: bool
    current: "Request | None"
    exchange: "Exchange | None"
    tunnel: Any
    fd: int  # the client socket, -1 when the pump must not write to it (TLS)
    writing_paused: bool

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *,
                close: bool = False) -> None: ...

    def respond_error(self, reason: Reason, message: str | None = None, *, status: int | None = None,
                      retry_after_s: int | None = None, close: bool = False) -> None: ...

    def finish(self, *, close: bool) -> None: ...

    def take_early(self) -> bytes: ...

    def tunnel_client_lost(self) -> None: ...


class Policies(Protocol):
    """What the exchange asks of the relay (relay.py) after a failure: its retry and resume policies."""
    config: "Config"
    state: "ServerState"

    def replica_failed(self, target: "Target") -> None: ...

    def failed_before_head(self, exchange: "Exchange", why: str) -> None: ...

    def stream_broke(self, exchange: "Exchange", why: str) -> None: ...

    def fail_with(self, exchange: "Exchange", reason: Reason, message: str | None = None, *,
                  status: int | None = None, retry_after_s: int | None = None, close: bool = False) -> None: ...


# Module-level names for the members: reading an Enum member off its class costs ~5x a global (CPython 3.11).
_ROUTING = Phase.ROUTING
_CONNECTING = Phase.CONNECTING
_AWAITING_HEAD = Phase.AWAITING_HEAD
_STREAMING = Phase.STREAMING
_PUMPED = Phase.PUMPED
_TUNNEL = Phase.TUNNEL
_DONE = Phase.DONE
_O_COMPLETE = Outcome.COMPLETE
_O_ANSWERED = Outcome.ANSWERED
_O_CLIENT_GONE = Outcome.CLIENT_GONE
_O_FAILED = Outcome.FAILED
_O_UPSTREAM_TIMEOUT = Outcome.UPSTREAM_TIMEOUT
_O_CLIENT_TIMEOUT = Outcome.CLIENT_TIMEOUT
_O_TUNNEL_CLOSED = Outcome.TUNNEL_CLOSED


# Exchange end hooks: (exchange, outcome), in order, once per attempt.
EndHook = Callable[["Exchange", Outcome], None]


class Exchange:
    __slots__ = ("relay", "client", "request", "state", "phase", "target", "conn", "failed", "first_byte_deadline",
                 "idle_reads", "idle_since", "blocked_since", "blocked_size", "blocked_reads", "outcome", "__weakref__")

    # Hook point: appended to by other components (token accounting); run by `end`.
    on_end: list[EndHook] = []

    def __init__(self, relay: Policies, client: Client, request: "Request", failed: "Target | None" = None):
        self.relay = relay
        self.client = client
        self.request = request
        self.state: ServerState = relay.state
        self.phase = _ROUTING
        self.target: Target | None = None
        self.conn: UpstreamConnection | None = None
        self.failed = failed  # the target the previous attempt failed on (a retry avoids it)
        self.first_byte_deadline = 0.0
        self.idle_reads = -1
        self.idle_since = 0.0
        self.blocked_since = 0.0
        self.blocked_size = -1
        self.blocked_reads = -1
        self.outcome: Outcome | None = None
        client.exchange = self
        self.state.exchange_started()

    @property
    def done(self) -> bool:
        return self.phase is _DONE

    def __repr__(self) -> str:
        return f"<Exchange {self.request.request_id.decode('latin-1')} {self.phase.name}>"

    # -- ROUTING -> CONNECTING -> AWAITING_HEAD (driven by the relay)
    def bind(self, target: "Target") -> None:
        """A target is chosen: from now on it counts this request."""
        assert self.phase is _ROUTING, self.phase
        self.phase = _CONNECTING
        self.target = target
        target.in_flight += 1
        self.request.replica_id = target.replica_id

    def attach(self, conn: "UpstreamConnection", head: bytes) -> None:
        """Write the request on `conn`: the response now flows back through this exchange."""
        assert self.phase is _CONNECTING, self.phase
        self.phase = _AWAITING_HEAD
        self.conn = conn
        client, request = self.client, self.request
        timeout = self.relay.config.first_byte_timeout_s
        self.first_byte_deadline = time.monotonic() + timeout if timeout else 0.0
        conn.send(self, client.transport, head + b"\r\n" + request.upstream_body,
                  head_request=request.method == b"HEAD", dechunk=request.version == "1.0", sink=request.resume,
                  meter=request.meter, upgrade=request.upgrade is not None)
        if client.writing_paused and self.conn is conn:
            conn.pause_reading()

    # -- events from the UpstreamConnection
    def upstream_head(self, status: int, head: bytes, framing: "Framing", body_start: bytes,
                      must_close: bool) -> None:
        """Pass the replica's response head on, spliced: `head` ends with its last header's CRLF."""
        request = self.request
        resume = request.resume
        if resume is not None and (self.conn.streaming or resume.replying):  # type: ignore[union-attr]
            self._resume_head(resume, head, framing, must_close)
            return
        self.phase = _STREAMING
        request.status = status
        request.first_byte_s = time.monotonic() - request.started
        if status >= 500:
            self.relay.replica_failed(self.target)  # type: ignore[arg-type]
        client = self.client
        keep = request.keep_alive and not must_close and not self.state.draining and request.version != "1.0"
        extra = b"" if framing.has_request_id else b"x-request-id: %s\r\n" % request.request_id
        door = self.state.door
        if door is not None:
            extra += door.response_headers(request)
        if not keep:
            request.keep_alive = False
            extra += b"connection: close\r\n"
        client.transport.write(b"%s%s\r\n%s" % (head, extra, body_start))

    def body_follows(self, conn: "UpstreamConnection", body_so_far: bytes) -> bool:
        """A plain chunked body follows the head: the C pump takes it when it can write to the client (True)."""
        pump = self.state.pump
        client = self.client
        meter = conn.meter
        # Metered: the pump counts. A resumable stream's meter is off (resume counts it by its token ids) and the
        # pump takes its flags from resume (start_pump): with both on, asking the meter kept every stream in Python.
        events = 0 if meter is None or conn.streaming else METER_EVENTS.get(meter.pump_mode(), -1)
        if pump is not None and client.fd >= 0 and not client.writing_paused and events >= 0 \
                and not client.transport.get_write_buffer_size():
            try:
                taken = conn.start_pump(pump, client.fd, body_so_far, events)
            except OSError as exc:
                # The pump could not take the stream: it dups both sockets (at the fd limit that fails) and registers
                # them in its epoll set. The gateway's own limit: Python relays the body, as with the pump off (raised
                # out of data_received, it cut the stream as the replica's failure).
                log.warning("the stream pump could not take a response, relayed in Python: %r", exc)
                return False
            if taken:
                self.phase = _PUMPED
                self.state.metrics.pumped.inc()
                return True
        return False

    def upstream_upgraded(self, head: bytes, rest: bytes) -> None:
        """The replica switched protocols (101) for a WebSocket upgrade: join the two connections (tunnel.py).
        `head` ends with its last header's CRLF; `rest` is what the replica sent after it."""
        conn, client, request = self.conn, self.client, self.request
        assert conn is not None and conn.transport is not None
        self.phase = _TUNNEL
        conn.exchange = None
        conn.closed = True  # the tunnel owns its socket now: never pooled, never resumed by a coalescing timer
        request.status = 101
        request.first_byte_s = time.monotonic() - request.started
        extra = b"" if b"\nx-request-id:" in head.lower() else b"x-request-id: %s\r\n" % request.request_id
        door = self.state.door
        if door is not None:
            extra += door.response_headers(request)
        client.transport.write(b"%s%s\r\n" % (head, extra))
        request.bytes_out = len(head) + len(extra) + 2
        metrics = self.state.metrics

        def ended(tunnel: Tunnel) -> None:
            metrics.tunnels_active.dec()
            metrics.tunnels.labels(tunnel.why).inc()
            metrics.tunnel_bytes_moved(*tunnel.take_bytes())
            request.bytes_in = tunnel.bytes_in
            request.bytes_out += tunnel.bytes_out
            if tunnel.why in ("timeout", "drain"):
                request.reason = Reason.UPSTREAM_TIMEOUT.value if tunnel.why == "timeout" else Reason.DRAINING.value
            self.end(_O_TUNNEL_CLOSED)
            if client.current is request:
                client.current = None
                self.state.request_finished(request)

        client.tunnel = tunnel = Tunnel(client.transport, conn.transport, self.relay.config.tunnel_timeout_s, ended,
                                        client.tunnel_client_lost, self.state.loop)
        metrics.tunnels_active.inc()
        tunnel.start(to_client=rest, to_upstream=client.take_early())

    def write_through(self, data: bytes) -> None:
        self.client.transport.write(data)

    def upstream_complete(self) -> None:
        request = self.request
        resume = request.resume
        if resume is not None and resume.replying:
            if not resume.done:
                if not resume.can_finish_here():
                    self.upstream_failed("incomplete")  # an in-band error, or an end without [DONE]
                    return
                resume.finish_here()
            else:
                self.client.transport.write(resume.end_chunk())
        if not self.end(_O_COMPLETE):
            return
        if request.status < 500:
            self.target.successes += 1  # type: ignore[union-attr]
        self.client.finish(close=not request.keep_alive)

    def upstream_failed(self, why: str) -> None:
        """The replica connection broke or spoke garbage before the response ended."""
        phase = self.phase
        if not self.end(_O_FAILED, why):
            return
        request = self.request
        if self.client.closed:
            return
        if phase < _STREAMING and not (request.resume is not None and request.resume.replying):
            self.relay.failed_before_head(self, why)
            return
        if request.resume is not None and request.resume.replying:
            self.relay.stream_broke(self, why)
            return
        if request.resume_refused is not None and self.relay.config.resume_limit:
            self.state.metrics.resume("refused_" + request.resume_refused)
        # Bytes already reached the client: nothing can be retried. Closing without the final chunk
        # makes the client see a broken stream, never a clean (and wrong) end.
        request.keep_alive = False
        if why == "pump":  # the gateway's own failure (pumping.py): the replica is not blamed for it
            request.reason = Reason.GATEWAY_ERROR.value
            self.client.finish(close=True)
            return
        request.reason = Reason.UPSTREAM_MALFORMED.value if why == "malformed" else Reason.UPSTREAM_DIED.value
        self.relay.replica_failed(self.target)  # type: ignore[arg-type]
        self.state.metrics.upstream_died(self.target.replica_id)  # type: ignore[union-attr]
        self.client.finish(close=True)

    def client_write_failed(self) -> None:
        """The pump could not write to the client: as a failed write does, its connection_lost ends us."""
        self.client.transport.abort()

    # -- events from the ClientConnection
    def client_gone(self) -> None:
        """The client closed: drop the replica connection at once so the engine aborts generation."""
        self.end(_O_CLIENT_GONE)

    def client_paused(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def client_resumed(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- timeouts (the server's sweep, through the client)
    def check_timeouts(self, now: float) -> None:
        phase = self.phase
        if phase is _AWAITING_HEAD:
            if self.first_byte_deadline and now > self.first_byte_deadline:
                if self.end(_O_UPSTREAM_TIMEOUT):
                    self.relay.fail_with(self, Reason.UPSTREAM_TIMEOUT, "the replica sent no response head in time",
                                         close=True)
            return
        if phase is not _STREAMING and phase is not _PUMPED:
            return
        idle = self.relay.config.idle_timeout_s
        if not idle:
            return
        conn = self.conn
        assert conn is not None
        if self.client.writing_paused or conn.held_by_client:
            # The client is not reading. Silence is then the client's: cut it after idle_timeout_s of
            # reading nothing (HAProxy's `timeout client`), and the replica connection with it.
            size = self.client.transport.get_write_buffer_size()
            progress = conn.progress
            if not self.blocked_since or size != self.blocked_size or progress != self.blocked_reads:
                # A client reading slowly drains the buffer, or (the pump's backlog is not in it) lets the pump read
                # the replica again: that is progress.
                self.blocked_since = now
                self.blocked_size = size
                self.blocked_reads = progress
            elif now - self.blocked_since > idle:
                self.request.reason = Reason.CLIENT_TIMEOUT.value
                self.request.keep_alive = False
                if self.end(_O_CLIENT_TIMEOUT):
                    self.client.transport.abort()  # what it has not read is lost anyway
            return
        if self.blocked_since:
            self.blocked_since = 0.0
            self.idle_reads = -1  # the replica's silence is counted from now
        progress = conn.progress
        if progress != self.idle_reads:
            self.idle_reads = progress
            self.idle_since = now
        elif now - self.idle_since > idle:
            request = self.request
            if request.resume is not None and request.resume.replying:
                self.upstream_failed("idle")
                return
            request.reason = Reason.UPSTREAM_TIMEOUT.value
            if self.end(_O_UPSTREAM_TIMEOUT):
                self.client.finish(close=True)

    # -- the end
    def end(self, outcome: Outcome, why: str = "") -> bool:
        """Release what this attempt holds, once. False: it had already ended."""
        if self.phase is _DONE:
            return False
        self.phase = _DONE
        self.outcome = outcome
        request = self.request
        conn, target = self.conn, self.target
        if conn is not None:
            conn.detach()  # counts what the pump relayed; a pumped stream ending here is being cut
            if outcome is not _O_TUNNEL_CLOSED:  # a tunnel counts its own bytes
                request.bytes_out += conn.bytes_in
            if conn.reads > 2 and target is not None:  # a stream, not a one-read answer
                self.state.metrics.stream_gap(target.replica_id, conn.max_gap)
            if outcome is _O_TUNNEL_CLOSED:
                pass  # the tunnel owns (and closes) both sockets
            elif outcome is _O_COMPLETE and conn.keep_alive and not conn.closed:
                conn.target.pool.put(conn)
            elif outcome is _O_COMPLETE:
                conn.close()
            else:
                conn.abort()
        if target is not None:
            target.in_flight -= 1
        self.state.exchange_ended()
        client = self.client
        if client.exchange is self:
            client.exchange = None
        for hook in self.on_end:
            hook(self, outcome)
        return True

    # -- resume (resume.py): only requests planned for it get here
    def _resume_head(self, resume: Any, head: bytes, framing: "Framing", must_close: bool) -> None:
        conn = self.conn
        assert conn is not None
        if not conn.streaming:
            # A replica we resumed on answered with an error, not a stream: try the next one.
            self.upstream_failed("not_a_stream")
            return
        self.phase = _STREAMING
        request = self.request
        client = self.client
        resume.start_segment(client.transport)
        if resume.replying:
            self.target.resumes_to += 1  # type: ignore[union-attr]
            self.state.metrics.resume(resume.outcome)  # "resumed", or "migrated" (Relay.migrate)
            resume.outcome = "resumed"
        else:
            resume.replying = True
            request.status = 200
            request.first_byte_s = time.monotonic() - request.started
            keep = request.keep_alive and not must_close and not self.state.draining
            extra = b"" if framing.has_request_id else b"x-request-id: %s\r\n" % request.request_id
            if not keep:
                request.keep_alive = False
                extra += b"connection: close\r\n"
            client.transport.write(b"%s%s\r\n" % (head, extra))
        # The payload that came with the head waits in resume.pending: the pump takes it with the stream, or the
        # connection flushes it (upstream.py, after body_follows).
