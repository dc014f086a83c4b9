"""A keep-alive connection to one replica's direct-ingress port, relaying its response.

This is the per-chunk hot path, so it is a raw asyncio Protocol, not an ASGI app or
an httpx stream: after the response head, each read from the replica is fed to
httptools (only to find where the message ends) and the very same bytes are written
to the client transport, chunked framing included. No re-encoding, no per-chunk
coroutine or future: one read and one write per chunk, like HAProxy.

When the C stream pump is built (_pump.c) a chunked body relayed as it is leaves this
protocol after its head: the pump reads and writes it without a Python call per chunk,
and hands the connection back when the response ends.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any, Protocol

import httptools

from gateway.controlplane.targets import Target
from gateway.dataplane.request import Request
from gateway.dataplane.state import ServerState

try:
    from gateway.dataplane import _pump
except ImportError:  # installed without a C compiler: every chunk goes through data_received
    _pump = None  # type: ignore[assignment]
PUMP_BUILT = _pump is not None


class PayloadSink(Protocol):
    """Where a response's payload goes when it is rewritten rather than relayed as it is (resume.py):
    the parser appends each chunk's payload to `pending`, then `flush` takes one read's worth."""
    pending: list[bytes]

    def flush(self) -> None: ...


class Downstream(Protocol):
    """Where a replica's response goes: what this layer needs of the client connection."""
    transport: asyncio.Transport
    state: ServerState
    current: Request | None
    fd: int  # the client socket, -1 when the pump must not write to it (TLS)
    writing_paused: bool

    def upstream_head(self, conn: "UpstreamConnection", status: int, head: bytes, has_request_id: bool,
                      body_start: bytes, must_close: bool) -> None: ...

    def upstream_complete(self, conn: "UpstreamConnection") -> None: ...

    def upstream_upgraded(self, conn: "UpstreamConnection", head: bytes, rest: bytes) -> None: ...

    def upstream_failed(self, conn: "UpstreamConnection", why: str) -> None: ...


# Hop-by-hop headers of the replica's response: they describe the replica's connection, not the client's.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"))
# One C-level search over the lowered head instead of a Python loop over the names.
_HOP_BY_HOP_LINE = re.compile(rb"\n(?:" + b"|".join(sorted(_HOP_BY_HOP)) + rb"):")


def _strip_headers(head: bytes, drop_framing: bool) -> bytes:
    """The head without hop-by-hop headers (and Transfer-Encoding when we de-chunk): the rare path."""
    lines = head.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:-1]:
        name = line.split(b":", 1)[0].strip().lower()
        if name in _HOP_BY_HOP or (drop_framing and name == b"transfer-encoding"):
            continue
        kept.append(line)
    kept.append(b"")
    return b"\r\n".join(kept)


MAX_HEAD_BYTES = 64 * 1024
_monotonic = time.monotonic


def start_pump(loop: asyncio.AbstractEventLoop, coalesce_s: float, min_streams: int) -> "_pump.Pump | None":
    """The loop's C stream pump, watched by the loop; None when the extension is not built."""
    if _pump is None:
        return None
    pump = _pump.Pump(coalesce_s, min_streams)
    loop.add_reader(pump.fileno(), pump.run)
    return pump


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, target: Target, coalesce_s: float = 0.0, coalesce_min_streams: int = 0):
        self.target = target
        self.coalesce_s = coalesce_s
        # Below this many requests in flight CPU is plentiful: relay every chunk at once (lowest latency).
        self.coalesce_min_streams = coalesce_min_streams
        self._coalescing = False
        self._held_by_client = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self.client: Downstream | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.head_sent = False
        self.complete = False
        self.keep_alive = False
        self.reads = 0
        self.bytes_in = 0
        # Largest gap between two reads of the current response (after its head): an inter-token stall.
        self.last_read = 0.0
        self.max_gap = 0.0
        # Response head being parsed.
        self._head_buffer = b""
        self._head_parsed = False
        self._no_body = False  # HEAD request: the parser cannot know the body is absent
        self._dechunk = False  # HTTP/1.0 client: it cannot read chunked framing
        self._close_delimited = False
        self._early_body: list[bytes] = []
        self._parser_dechunks: bool | None = False  # None: not a plain parser (a sink's, or one the pump left)
        self._sink: PayloadSink | None = None
        self.streaming = False  # a sink gets this response's payload (a 200 chunked stream)
        self.fd = -1
        self.pumped: _pump.Stream | None = None  # the C pump's handle while it relays this response's body
        self.meter: Any = None  # the request's token meter (observability/usage.py): every body read goes through it
        self._head_keep_alive = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd = sock.fileno()

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Bytes while idle in the pool: the replica is not speaking HTTP/1.1 properly. Drop it.
            self.close()
            return
        self.got_bytes = True
        self.reads += 1
        self.bytes_in += len(data)
        now = _monotonic()
        gap = now - self.last_read
        if gap > self.max_gap:
            self.max_gap = gap
        self.last_read = now
        if self.head_sent and not self._dechunk:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                client.upstream_failed(self, "malformed")
                return
            meter = self.meter
            client.transport.write(data if meter is None else meter.feed(data))
            if self.complete:
                if len(data) > 3 and not data.endswith(b"\r\n\r\n"):
                    self.keep_alive = False  # bytes after the end: the replica is off-protocol, do not reuse
                client.upstream_complete(self)
            elif gap < self.coalesce_s and client.state.in_flight >= self.coalesce_min_streams:
                self._coalesce()
            return
        self._slow_path(data, gap)

    def _coalesce(self) -> None:
        """Chunks are arriving back to back: let the next ones pile up in the socket for one window,
        then read them in one go. One read+write per burst instead of per chunk is most of the
        per-chunk cost (relay-performance.md); a chunk waits at most one window, and only in a
        burst: tokens spaced wider than the window are relayed the moment they arrive."""
        self._coalescing = True
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._loop.call_later(self.coalesce_s, self._end_coalescing)  # type: ignore[union-attr]

    def _end_coalescing(self) -> None:
        self._coalescing = False
        if not self._held_by_client and not self.closed and self.pumped is None:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        if client is not None and not self.complete:
            if self.head_sent and self._close_delimited:
                # The body ran to EOF by design (no length, not chunked): that is the normal end.
                self.complete = True
                self.keep_alive = False
                client.upstream_complete(self)
            else:
                client.upstream_failed(self, "lost")

    def pause_writing(self) -> None:  # request bodies are written whole; nothing to throttle
        pass

    # -- httptools callbacks
    def on_headers_complete(self) -> None:
        self._head_parsed = True
        # Kept for a body the pump relays: the parser never sees its end (already right here, unlike after feed_data).
        self._head_keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete = True
        # Only reliable inside this callback (relay-performance.md, httptools gotchas).
        self.keep_alive = self.parser.should_keep_alive()

    # -- the relay's API
    @property
    def usable(self) -> bool:
        return not self.closed and self.client is None and self.transport is not None \
            and not self.transport.is_closing()

    def send(self, client: Downstream, request: bytes, *, head_request: bool, dechunk: bool,
             sink: PayloadSink | None = None) -> None:
        assert self.transport is not None
        self.client = client
        self.got_bytes = self.head_sent = self.complete = self.keep_alive = False
        self.bytes_in = 0
        self.max_gap = 0.0
        self._head_buffer = b""
        self._head_parsed = False
        self._no_body = head_request
        self._dechunk = dechunk
        self._close_delimited = False
        self._early_body = []
        self.streaming = False
        if self._held_by_client:
            self.resume_reading()  # the previous client stopped reading just as its response ended
        self._sink = sink
        if sink is not None:
            # Resume: the payload goes to the sink, which re-frames it (the slow path, as for HTTP/1.0).
            sink.pending.clear()
            self.parser = httptools.HttpResponseParser(_SinkFeeder(self, sink.pending))
            self._parser_dechunks = None
            self._dechunk = True
        elif dechunk != self._parser_dechunks:
            # Only HTTP/1.0 clients need the payload without chunk framing, so only they pay for an
            # on_body callback per chunk (httptools calls every callback its protocol object defines).
            self.parser = httptools.HttpResponseParser(_Dechunker(self) if dechunk else self)
            self._parser_dechunks = dechunk
        self.transport.write(request)

    def release(self) -> None:
        """Detach from the client once the exchange is over."""
        self.client = None

    def pause_reading(self) -> None:
        """The client is not keeping up (backpressure)."""
        self._held_by_client = True
        if self.transport is not None and not self.closed and self.pumped is None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._held_by_client = False
        if self.transport is not None and not self.closed and not self._coalescing and self.pumped is None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.stop_pump()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, so the replica sees the client is gone and aborts generation."""
        self.stop_pump()
        self.closed = True
        self.client = None
        if self.transport is not None:
            self.transport.abort()

    # -- the C pump (_pump.c)
    @property
    def progress(self) -> int:
        """Reads of the current response so far, the pump's included (the idle timeout watches it move)."""
        pumped = self.pumped
        return self.reads if pumped is None else self.reads + pumped.reads

    @property
    def held_by_client(self) -> bool:
        """The client is not reading: silence is then the client's, not the replica's."""
        pumped = self.pumped
        return self._held_by_client if pumped is None else pumped.blocked

    def _start_pump(self, pump: "_pump.Pump", client: Downstream, body_so_far: bytes) -> None:
        stream = pump.add(self.fd, client.fd, self._pump_ended, body_so_far)
        if stream is None:
            return  # framing the pump would not follow: httptools goes on deciding
        self.pumped = stream
        self.transport.pause_reading()  # type: ignore[union-attr]
        client.state.metrics.pumped.inc()

    def stop_pump(self) -> None:
        """End pumping without a callback: the exchange is over (client gone, abort, timeout)."""
        stream, self.pumped = self.pumped, None
        if stream is not None:
            stream.cancel()
            self._pumped_done(stream)

    def _pumped_done(self, stream: "_pump.Stream") -> None:
        self.reads += stream.reads
        self.bytes_in += stream.bytes_in
        if stream.max_gap > self.max_gap:
            self.max_gap = stream.max_gap
        self._parser_dechunks = None  # httptools stopped mid-message: the next response gets a fresh parser

    def _pump_ended(self, code: int, leftover: bytes | None) -> None:
        stream, self.pumped = self.pumped, None
        if stream is None:
            return
        self._pumped_done(stream)
        client = self.client
        if client is None:
            return
        if leftover:
            client.transport.write(leftover)  # what the client had not taken yet: it is sent before anything else
        if code == _pump.COMPLETE or code == _pump.COMPLETE_EXTRA:
            self.complete = True
            # Bytes after the end of the response: the replica is not speaking HTTP/1.1 properly, do not reuse.
            self.keep_alive = self._head_keep_alive and code == _pump.COMPLETE
            if not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]  # idle in the pool: watch for a close
            client.upstream_complete(self)
        elif code == _pump.CLIENT_ERROR:
            client.transport.abort()  # as a failed write does: the client's connection_lost aborts the replica
        else:
            client.upstream_failed(self, "malformed" if code == _pump.MALFORMED else "lost")

    # -- response head
    def _slow_path(self, data: bytes, gap: float) -> None:
        client = self.client
        assert client is not None
        if self.head_sent:  # dechunking for an HTTP/1.0 client or a sink: on_body takes the payload
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self.client is client:
                    client.upstream_failed(self, "malformed")
                return
            if self.streaming:
                self._sink.flush()  # type: ignore[union-attr]  # one pass over what this read brought
            if self.complete:
                if self.client is client:
                    client.upstream_complete(self)
            elif self.streaming and gap < self.coalesce_s and client.state.in_flight >= self.coalesce_min_streams:
                self._coalesce()  # a rewritten stream (resume) batches its reads like the fast path
            return
        buffer = self._head_buffer + data if self._head_buffer else data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            client.upstream_failed(self, "malformed")
            return
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols: only the answer to a WebSocket upgrade the client asked for (tunnel.py).
            request = client.current
            end = buffer.find(b"\r\n\r\n")
            if request is None or request.upgrade is None or self.parser.get_status_code() != 101 or end < 0:
                client.upstream_failed(self, "malformed")
                return
            self.got_bytes = True
            client.upstream_upgraded(self, buffer[:end + 2], buffer[end + 4:])
            return
        if not self._head_parsed:
            if len(buffer) > MAX_HEAD_BYTES:
                client.upstream_failed(self, "malformed")
                return
            self._head_buffer = buffer
            return
        status = self.parser.get_status_code()
        if status < 200:
            # We never send Expect upstream, so an interim response is unexpected: refuse rather than mis-frame.
            client.upstream_failed(self, "malformed")
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:  # llhttp also accepts bare-LF heads
            client.upstream_failed(self, "malformed")
            return
        head = buffer[:end + 2]
        self.head_sent = True
        self.max_gap = 0.0
        self._head_buffer = b""
        # Header names are matched on the lowered head bytes instead of per-header httptools callbacks:
        # the head is passed on spliced, not rebuilt, which is most of a unary request's Python time.
        lower = head.lower()
        chunked = b"\ntransfer-encoding:" in lower
        bodiless = self._no_body or status in (204, 304)
        self._close_delimited = not (chunked or b"\ncontent-length:" in lower or bodiless)
        sink = self._sink
        if sink is not None:
            # Only a 200 stream is rewritten (its payload so far waits in the sink); anything else (an
            # error's JSON) is relayed as it is.
            self.streaming = self._dechunk = chunked and status == 200
            if not self.streaming:
                sink.pending.clear()
            dechunk_client = False
        else:
            if not chunked:
                self._dechunk = False  # the payload bytes are already what an HTTP/1.0 client reads
            dechunk_client = self._dechunk
        if dechunk_client or _HOP_BY_HOP_LINE.search(lower):
            head = _strip_headers(head, drop_framing=dechunk_client)
        if head.startswith(b"HTTP/1.0 "):
            head = b"HTTP/1.1 " + head[9:]  # we speak 1.1 to the client; framing is handled above
        body_start = b"" if self.streaming else b"".join(self._early_body) if self._dechunk else buffer[end + 4:]
        meter = self.meter
        if meter is not None:
            # Metered only when the body goes through data_received as it is (not a resume's, not de-chunked).
            meter.head(status if sink is None and not dechunk_client else 0, chunked)
            body_start = meter.feed(body_start)
        client.upstream_head(self, status, head, b"\nx-request-id:" in lower, body_start,
                             must_close=self._close_delimited or dechunk_client)
        if self.client is not client:
            return  # the client ended the exchange on seeing the head
        if bodiless and not self.complete:
            # httptools waits for a body a HEAD response never has; end here and do not reuse the connection.
            self.complete = True
            self.keep_alive = False
        if self.complete:
            client.upstream_complete(self)
        elif chunked and not self._dechunk and sink is None and meter is None:
            pump = client.state.pump
            if pump is not None and client.fd >= 0 and not client.writing_paused \
                    and not client.transport.get_write_buffer_size():
                self._start_pump(pump, client, buffer[end + 4:])


class _SinkFeeder:
    """Parser callbacks for a rewritten stream: each chunk's payload is queued for the sink, no call per chunk
    beyond this one."""

    def __init__(self, conn: UpstreamConnection, pending: list[bytes]):
        self.conn = conn
        self.pending = pending

    def on_headers_complete(self) -> None:
        self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        conn = self.conn
        if conn.streaming or not conn.head_sent:
            self.pending.append(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


class _Dechunker:
    """Parser callbacks for an HTTP/1.0 client: the payload is written without its chunk framing."""

    def __init__(self, conn: UpstreamConnection):
        self.conn = conn

    def on_headers_complete(self) -> None:
        self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        conn = self.conn
        if not conn.head_sent:
            conn._early_body.append(body)
        elif conn.client is not None:
            conn.client.transport.write(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


async def open_upstream(target: Target, coalesce_s: float = 0.0, coalesce_min_streams: int = 0
                        ) -> UpstreamConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: UpstreamConnection(target, coalesce_s, coalesce_min_streams),
                                               target.host, target.port)
    return protocol
