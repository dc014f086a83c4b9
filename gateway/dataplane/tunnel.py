"""WebSocket tunnels: after the replica's 101 Switching Protocols, bytes both ways until either side closes.

Like HAProxy in tunnel mode (its `timeout tunnel`), the gateway does not parse WebSocket
frames: once the replica accepted the upgrade (RFC 6455 section 4.2.2), each end's reads
are written to the other end as they are. Both transports are handed to the two `_Side`
protocols (`transport.set_protocol`), so the tunnel costs one read and one write per
segment, no coroutine and no frame decoding.

Backpressure: a side whose transport buffers past its high-water mark (`pause_writing`)
stops reading the other side until it drains, so a peer that stops reading holds the
other one back through TCP instead of growing the gateway's memory.

Ends: a FIN from one side is passed on as a FIN (`write_eof`) and the other direction
keeps flowing until it closes as well (TCP half-close, as HAProxy forwards shutdowns);
a side lost (reset, or closed after both FINs) closes the other, flushing what was read
from it; the sweep aborts both after `timeout_s` with no byte in either direction, or at
once on `abort` (a drain past its deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How long an end may take to flush what the other end sent before it left (with no tunnel timeout set).
FLUSH_S = 10.0


class _Side(asyncio.Protocol):
    """One end of a tunnel: what it reads goes to the other end's transport."""

    __slots__ = ("tunnel", "name", "transport", "peer", "bytes", "eof", "lost")

    def __init__(self, tunnel: "Tunnel", name: str, transport: asyncio.Transport):
        self.tunnel = tunnel
        self.name = name
        self.transport = transport
        self.peer: _Side = None  # type: ignore[assignment]
        self.bytes = 0  # read from this end (and written to the other)
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # never called: set_protocol hands it over
        pass

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        peer = self.peer.transport
        if not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer.eof or peer.lost:
            return False  # both directions are done: let the transport close
        if peer.transport.can_write_eof() and not peer.transport.is_closing():
            peer.transport.write_eof()  # pass the FIN on; the other direction keeps flowing
            return True
        return False  # TLS cannot half-close: close, as a client would see from a plain server

    def pause_writing(self) -> None:
        # Our end is not reading fast enough: stop reading the other end (its sender blocks in TCP).
        peer = self.peer.transport
        if not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if not peer.is_closing():
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel._lost(self, exc)


class Tunnel:
    """Two transports joined after an upgrade. `on_end` runs once when the first side goes (or at a timeout or
    abort); `on_client_lost` when the client's connection is gone (it may outlive the end while flushing)."""

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport, timeout_s: float,
                 on_end: Callable[["Tunnel"], None], on_client_lost: Callable[[], None] = lambda: None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop
        self.client = _Side(self, "client", client)
        self.upstream = _Side(self, "upstream", upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.timeout_s = timeout_s
        self.on_end = on_end
        self.on_client_lost = on_client_lost
        self.ended = False
        self.why = ""  # how it ended: client_closed, upstream_closed, timeout, aborted
        self._moved = -1
        self._since = 0.0
        self._counted = (0, 0)  # bytes already reported to metrics (see take_bytes)

    @property
    def bytes_in(self) -> int:
        """Client to replica."""
        return self.client.bytes

    @property
    def bytes_out(self) -> int:
        """Replica to client."""
        return self.upstream.bytes

    def start(self, to_client: bytes = b"", to_upstream: bytes = b"") -> None:
        """Take both transports over; `to_client` / `to_upstream`: bytes read past the handshake on the other end."""
        client, upstream = self.client.transport, self.upstream.transport
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        if to_client:
            self.upstream.bytes += len(to_client)
            client.write(to_client)
        if to_upstream:
            self.client.bytes += len(to_upstream)
            upstream.write(to_upstream)
        # Either end may have been paused by the HTTP exchange before it (backpressure, an upgrade waiting for 101):
        # read it again unless its peer is past its high-water mark (then the peer's resume_writing will).
        for side in (self.client, self.upstream):
            peer = side.peer.transport
            if not side.transport.is_closing() and peer.get_write_buffer_size() <= peer.get_write_buffer_limits()[1]:
                side.transport.resume_reading()

    def _lost(self, side: _Side, exc: Exception | None) -> None:
        peer = side.peer
        if not peer.lost:
            if exc is None:
                peer.transport.close()  # flushes what this side sent first
                if side is self.client and self.loop is not None:
                    # Nobody sweeps this tunnel once the client is gone: bound the flush to a replica not reading.
                    self.loop.call_later(FLUSH_S, self._give_up_flush)
            else:
                peer.transport.abort()
        self._end(side.name + "_closed")
        if side is self.client:
            self.on_client_lost()

    def _end(self, why: str) -> None:
        if not self.ended:
            self.ended = True
            self.why = why
            self.on_end(self)

    def _give_up_flush(self) -> None:
        if not self.upstream.lost:
            self.upstream.transport.abort()

    def abort(self, why: str = "aborted") -> None:
        """Cut both ends now (a drain past its deadline, a timeout)."""
        self._end(why)
        for side in (self.client, self.upstream):
            if not side.lost:
                side.transport.abort()

    def check_timeouts(self, now: float) -> None:
        """Called by the sweep: no byte either way for timeout_s ends the tunnel (HAProxy's `timeout tunnel`)."""
        moved = self.client.bytes + self.upstream.bytes
        if moved != self._moved:
            self._moved = moved
            self._since = now
            return
        idle = now - self._since
        if self.ended:
            if idle > (self.timeout_s or FLUSH_S):
                self.abort(self.why)  # one end gone, the other never took the last bytes: stop flushing
        elif self.timeout_s and idle > self.timeout_s:
            self.abort("timeout")

    def take_bytes(self) -> tuple[int, int]:
        """Bytes (in, out) moved since the last call: the metrics count as the tunnel goes, not only at its end."""
        before_in, before_out = self._counted
        now_in, now_out = self.client.bytes, self.upstream.bytes
        self._counted = (now_in, now_out)
        return now_in - before_in, now_out - before_out
