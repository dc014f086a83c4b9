"""A keep-alive connection to one replica's direct-ingress port: it moves bytes and reports events.

This is the per-chunk hot path, so it is a raw asyncio Protocol, not an ASGI app or an httpx
stream: after the response head, each read from the replica is fed to httptools (only to find
where the message ends) and the very same bytes are written to the client transport, chunked
framing included. No re-encoding, no per-chunk coroutine or future: one read and one write per
chunk, like HAProxy.

It decides nothing about the request: what the head means for the client, whether the
connection goes back to the pool, retries and timeouts belong to the exchange that owns it for
one attempt (exchange.py), which it reports to through `UpstreamEvents`. The head's rewriting
lives in response_head.py, the C pump's glue in pumping.py.

Where a response ends is decided by the parser (`on_message_complete`), whatever the replica's
write pattern: uvicorn writes a head and its body in separate writes, so nothing here may look
at the first read only. Bytes after the end of a response (a second, unsolicited response in
the same read) are never relayed: the client gets its response up to its end and the connection
is retired.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from typing import Any

import httptools

from gateway.controlplane.targets import Target
from gateway.dataplane.pumping import PumpedResponses
from gateway.dataplane.response_head import MAX_HEAD_BYTES, Framing, client_head, content_length_of, end_of_chunked
from gateway.dataplane.upstream_events import PayloadSink, UpstreamEvents

try:
    from gateway.dataplane._pump import meter_read as _meter_read
except ImportError:  # installed without a C compiler: every metered read goes through StreamMeter.feed
    _meter_read = None

log = logging.getLogger("gateway.upstream")


_monotonic = time.monotonic


class UpstreamConnection(PumpedResponses, asyncio.Protocol):
    def __init__(self, target: Target, coalesce_s: float = 0.0, coalesce_min_streams: int = 0):
        self.target = target
        self.coalesce_s = coalesce_s
        # Below this many requests in flight CPU is plentiful: relay every chunk at once (lowest latency).
        self.coalesce_min_streams = coalesce_min_streams
        self._coalescing = False
        self._held_by_client = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self.exchange: UpstreamEvents | None = None
        self.out: asyncio.Transport | None = None  # the client's transport, while an exchange owns us
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.head_sent = False
        self.complete = False
        self.keep_alive = False
        self.extra = False  # bytes after the end of the response: never relayed, never reused
        self.reads = 0
        self.bytes_in = 0
        # Largest gap between two reads of the current response (after its head): an inter-token stall.
        self.last_read = 0.0
        self.max_gap = 0.0
        # Response head being parsed.
        self._head_buffer = b""
        self._head_parsed = False
        self._head_len = 0
        self._lower = b""
        self._chunked = False
        self._begun = False
        self._no_body = False  # HEAD request: the parser cannot know the body is absent
        self._dechunk = False  # HTTP/1.0 client: it cannot read chunked framing
        self._close_delimited = False
        self._early_body: list[bytes] = []
        self._parser_dechunks: bool | None = False  # None: not a plain parser (a sink's, or one the pump left)
        self._sink: PayloadSink | None = None
        self._feeder: _SinkFeeder | None = None  # the sink's parser callbacks
        self.streaming = False  # a sink gets this response's payload (a 200 chunked stream)
        self.fd = -1
        self._poll: Any = None  # poll(2) on our socket alone: has_unread()
        self.meter: Any = None  # the request's token meter (observability/usage.py): every body read goes through it
        self._upgrade = False  # the request asked for a WebSocket upgrade: a 101 is its answer (tunnel.py)
        self._head_keep_alive = False
        self._status = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd = sock.fileno()
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes nobody asked for (idle in the pool, or after a response ended): the replica is not
            # speaking HTTP/1.1 properly. Retire the connection; they never reach any client.
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
                if self.complete:  # garbage after a complete response
                    self._complete_with_extra(exchange, data)
                else:
                    exchange.upstream_failed("malformed")
                return
            meter = self.meter
            if self.complete:
                if self.extra:
                    self._complete_with_extra(exchange, data)
                    return
                self.out.write(data if meter is None else meter.feed(data))  # type: ignore[union-attr]
                exchange.upstream_complete()
                return
            if meter is None:
                self.out.write(data)  # type: ignore[union-attr]
            elif meter.plain:  # (only with read_test, the C pump's meter_read: see send())
                # Token accounting's common read (usage.py StreamMeter.plain): tested in C, no Python call. Through
                # feed() it was ~3,000 instructions a read, 1.42x accounting off per paced stream (callgrind).
                if _meter_read(data, meter.tally):  # type: ignore[misc]  # its events added to meter.tally, in C
                    self.out.write(data)  # type: ignore[union-attr]
                else:
                    self.out.write(meter.feed_rare(data))  # type: ignore[union-attr]
            else:
                self.out.write(meter.feed(data))  # type: ignore[union-attr]
            if gap < self.coalesce_s and exchange.state.in_flight >= self.coalesce_min_streams:
                self._coalesce()
            return
        self._slow_path(exchange, data, gap)

    def _message_end(self, data: bytes) -> int:
        """Where the current response ends in `data`, the last read (-1: cannot tell)."""
        if not self._chunked:
            length = content_length_of(self._lower)
            return -1 if length < 0 else self._head_len + length - (self.bytes_in - len(data))
        return end_of_chunked(data)

    def _complete_with_extra(self, exchange: UpstreamEvents, data: bytes) -> None:
        self.extra = True
        self.keep_alive = False
        end = self._message_end(data)
        log.warning("replica %s wrote %s bytes after its response: connection retired", self.target.replica_id,
                    "some" if end < 0 else len(data) - end)
        if end < 0:
            exchange.upstream_failed("malformed")
            return
        if end:
            data = data[:end]
            self.out.write(data if self.meter is None else self.meter.feed(data))  # type: ignore[union-attr]
        exchange.upstream_complete()

    def _coalesce(self) -> None:
        """Chunks are arriving back to back: let the next ones pile up in the socket for one window,
        then read them in one go. One read+write per burst instead of per chunk is most of the
        per-chunk cost (docs/performance.md, "Where the time goes"); a chunk waits at most one window, and only in a
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
        exchange = self.exchange
        if exchange is not None and not self.complete:
            if self.head_sent and self._close_delimited:
                # The body ran to EOF by design (no length, not chunked): that is the normal end.
                self.complete = True
                self.keep_alive = False
                exchange.upstream_complete()
            else:
                exchange.upstream_failed("lost")

    def pause_writing(self) -> None:  # request bodies are written whole; nothing to throttle
        pass

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self._begun:
            self.extra = True  # a second response in the same read: nobody asked for it
        self._begun = True

    def on_headers_complete(self) -> None:
        if self.extra:
            return
        self._head_parsed = True
        self._status = self.parser.get_status_code()  # (a second response in the same read would overwrite it)
        # Kept for a body the pump relays: the parser never sees its end (already right here, unlike after feed_data).
        self._head_keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        if self.complete:
            return  # the end of an unsolicited second response
        self.complete = True
        # Only reliable inside this callback: after feed_data returns httptools reports False.
        self.keep_alive = self.parser.should_keep_alive()

    # -- the exchange's API
    @property
    def usable(self) -> bool:
        return not self.closed and self.exchange is None and self.transport is not None \
            and not self.transport.is_closing()

    def has_unread(self) -> bool:
        """Bytes or an EOF wait in the kernel that the loop has not read yet: one poll(2), no wait. An idle
        connection in that state is not taken from the pool: in the loop iteration that takes it those bytes (a
        second, unsolicited response) would otherwise be read as the next request's response."""
        poll = self._poll
        return poll is not None and bool(poll.poll(0))

    def send(self, exchange: UpstreamEvents, out: asyncio.Transport, request: bytes, *, head_request: bool,
             dechunk: bool, sink: PayloadSink | None = None, meter: Any = None, upgrade: bool = False) -> None:
        """Write one request; its response goes to `out` (through `meter` when set) and its events to `exchange`."""
        assert self.transport is not None
        self.exchange = exchange
        self.out = out
        self.meter = meter
        if meter is not None and _meter_read is not None:
            meter.read_test = _meter_read  # the meter's searches in C (usage.py StreamMeter.read_test)
        self._upgrade = upgrade
        self.got_bytes = self.head_sent = self.complete = self.keep_alive = self.extra = False
        self.bytes_in = 0
        self.max_gap = 0.0
        self._head_buffer = b""
        self._head_parsed = self._begun = False
        self._head_len = 0
        self._lower = b""
        self._chunked = False
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
            self._feeder = _SinkFeeder(self, sink.pending)
            self.parser = httptools.HttpResponseParser(self._feeder)
            self._parser_dechunks = None
            self._dechunk = True
        elif dechunk != self._parser_dechunks:
            # Only HTTP/1.0 clients need the payload without chunk framing, so only they pay for an
            # on_body callback per chunk (httptools calls every callback its protocol object defines).
            self.parser = httptools.HttpResponseParser(_Dechunker(self) if dechunk else self)
            self._parser_dechunks = dechunk
        self.transport.write(request)

    def detach(self) -> None:
        """The exchange is over: stop the pump and forget the client (the exchange decides the rest)."""
        if self.pumped is not None:
            self.stop_pump()
        self.exchange = None
        self.out = None
        self.meter = None

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
        self.exchange = None
        self.out = None
        if self.transport is not None:
            self.transport.abort()

    # -- response head (and the slow paths: a client that needs the payload de-chunked, or a sink)
    def _slow_path(self, exchange: UpstreamEvents, data: bytes, gap: float) -> None:
        if self.head_sent:  # dechunking for an HTTP/1.0 client or a sink: on_body takes the payload
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if not self.complete:
                    exchange.upstream_failed("malformed")
                    return
                self.extra = True  # garbage after the end: on_body wrote nothing of it
            if self.streaming:
                if self.extra:
                    self._feeder.cut()  # type: ignore[union-attr]
                self._sink.flush()  # type: ignore[union-attr]  # one pass over what this read brought
            if self.exchange is not exchange:
                return
            if self.complete:
                if self.extra:
                    self.keep_alive = False
                exchange.upstream_complete()
            elif self.streaming and gap < self.coalesce_s and exchange.state.in_flight >= self.coalesce_min_streams:
                self._coalesce()  # a rewritten stream (resume) batches its reads like the fast path
            return
        buffer = self._head_buffer + data if self._head_buffer else data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols: only the answer to a WebSocket upgrade the client asked for (tunnel.py).
            end = buffer.find(b"\r\n\r\n")
            if not self._upgrade or self.parser.get_status_code() != 101 or end < 0:
                exchange.upstream_failed("malformed")
                return
            self.got_bytes = True
            exchange.upstream_upgraded(buffer[:end + 2], buffer[end + 4:])
            return
        except httptools.HttpParserError:
            if not self.complete:
                exchange.upstream_failed("malformed")
                return
            self.extra = True
        if not self._head_parsed:
            if len(buffer) > MAX_HEAD_BYTES:
                exchange.upstream_failed("malformed")
                return
            self._head_buffer = buffer
            return
        status = self._status
        if status < 200:
            # We never send Expect upstream, so an interim response is unexpected: refuse rather than mis-frame.
            exchange.upstream_failed("malformed")
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:  # llhttp also accepts bare-LF heads
            exchange.upstream_failed("malformed")
            return
        head = buffer[:end + 2]
        self.head_sent = True
        self.max_gap = 0.0
        self._head_buffer = b""
        self._head_len = end + 4
        lower = head.lower()
        framing = Framing(lower, status, self._no_body)
        self._lower = lower
        self._chunked = framing.chunked
        self._close_delimited = framing.close_delimited
        chunked = framing.chunked
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
        head = client_head(head, lower, dechunk_client)
        if self.streaming:
            body_start = b""
        elif self._dechunk:
            body_start = b"".join(self._early_body)
        else:
            body_start = buffer[end + 4:]
            if self.extra and self.complete:
                cut = self._message_end(buffer) - (end + 4) if not framing.bodiless else 0
                if cut < 0:
                    exchange.upstream_failed("malformed")
                    return
                body_start = body_start[:cut]
        if self.extra:
            self.keep_alive = False
            log.warning("replica %s wrote bytes after its response: connection retired", self.target.replica_id)
        meter = self.meter
        if meter is not None:
            # Metered only when the body goes through data_received as it is (not a resume's, not de-chunked).
            meter.head(status if sink is None and not dechunk_client else 0, chunked)
            body_start = meter.feed(body_start)
        exchange.upstream_head(status, head, framing, body_start,
                               self._close_delimited or dechunk_client)
        if self.exchange is not exchange:
            return  # the exchange ended on seeing the head
        if framing.bodiless and not self.complete:
            # httptools waits for a body a HEAD response never has; end here and do not reuse the connection.
            self.complete = True
            self.keep_alive = False
        if self.streaming and (self.complete or not exchange.body_follows(self, buffer[end + 4:])):
            if self.extra:
                self._feeder.cut()  # type: ignore[union-attr]
            sink.flush()  # type: ignore[union-attr]  # the payload that came with the head: the pump did not take it
            if self.exchange is not exchange:
                return
        if self.complete:
            exchange.upstream_complete()
        elif chunked and not self._dechunk and sink is None:
            exchange.body_follows(self, buffer[end + 4:])


class _PayloadCallbacks:
    """Parser callbacks that take a response's payload (`on_body`, below) and leave the rest to the connection."""

    def __init__(self, conn: UpstreamConnection):
        self.conn = conn

    def on_message_begin(self) -> None:
        self.conn.on_message_begin()

    def on_headers_complete(self) -> None:
        self.conn.on_headers_complete()

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


class _SinkFeeder(_PayloadCallbacks):
    """Parser callbacks for a rewritten stream: each chunk's payload is queued for the sink by `pending.append`
    itself, a C call per chunk and no Python frame (httptools calls the on_body it finds when the parser is made):
    a Python on_body cost ~1,100 instructions a chunk (callgrind, one vLLM chunk through httptools: 3,396 -> 2,293).
    What is queued after the response's end (a second, unsolicited response) is cut off before the sink
    reads it (`cut`); what an answer that is not a stream queues is never read (upstream.py clears it at the head,
    and `send` at the next request)."""

    def __init__(self, conn: UpstreamConnection, pending: list[bytes]):
        super().__init__(conn)
        self.pending = pending
        self.on_body = pending.append
        self.complete_at = -1

    def on_message_complete(self) -> None:
        if self.complete_at < 0:
            self.complete_at = len(self.pending)
        self.conn.on_message_complete()

    def cut(self) -> None:
        """Drop the payload of anything after the end of the response."""
        if self.complete_at >= 0:
            del self.pending[self.complete_at:]


class _Dechunker(_PayloadCallbacks):
    """Parser callbacks for an HTTP/1.0 client: the payload is written without its chunk framing."""

    def on_body(self, body: bytes) -> None:
        conn = self.conn
        if conn.complete:
            return  # an unsolicited second response
        if not conn.head_sent:
            conn._early_body.append(body)
        elif conn.out is not None:
            conn.out.write(body)


async def open_upstream(target: Target, coalesce_s: float = 0.0, coalesce_min_streams: int = 0
                        ) -> UpstreamConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: UpstreamConnection(target, coalesce_s, coalesce_min_streams),
                                               target.host, target.port)
    return protocol
