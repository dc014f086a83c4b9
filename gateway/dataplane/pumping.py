"""Glue between an UpstreamConnection and the C stream pump (_pump.c).

When the pump is built, a chunked body relayed as it is leaves the Python protocol after its
head: the pump reads the replica socket and writes the client socket without a Python call per
chunk, and hands the connection back when the response ends (`_pump_ended`). Everything the
Python side needs to know about a pumped body (its reads, bytes, largest gap, whether the client
blocks it) is read here, so the rest of the data path does not care who moved the bytes.

Hook point for the event-aware pump (issue 20): `PumpedResponses._pump_ended` is the one place a
pumped body's end comes back to Python; `start_pump`/`stop_pump` the only places it starts and stops.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

try:
    from gateway.dataplane import _pump
except ImportError:  # installed without a C compiler: every chunk goes through data_received
    _pump = None  # type: ignore[assignment]
PUMP_BUILT = _pump is not None
# A metered stream's pump_mode() (observability/usage.py) as the pump's event flags.
METER_EVENTS = {"strip": _pump.EV_STRIP_USAGE, "count": _pump.EV_ON} if _pump is not None else {}

if TYPE_CHECKING:
    from gateway.dataplane.upstream import UpstreamEvents


def start_pump(loop: asyncio.AbstractEventLoop, coalesce_s: float, min_streams: int) -> "_pump.Pump | None":
    """The loop's C stream pump, watched by the loop; None when the extension is not built."""
    if _pump is None:
        return None
    pump = _pump.Pump(coalesce_s, min_streams)
    loop.add_reader(pump.fileno(), pump.run)
    return pump


class PumpedResponses:
    """The pump side of UpstreamConnection (a mixin: the hot path keeps plain attribute reads)."""

    # Provided by UpstreamConnection.
    transport: asyncio.Transport | None
    exchange: "UpstreamEvents | None"
    fd: int
    closed: bool
    reads: int
    bytes_in: int
    max_gap: float
    complete: bool
    keep_alive: bool
    _held_by_client: bool
    _head_keep_alive: bool
    _parser_dechunks: bool | None
    meter: Any

    pumped: Any = None  # the C pump's handle (_pump.Stream) while it relays this response's body

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

    def start_pump(self, pump: "_pump.Pump", client_fd: int, body_so_far: bytes, events: int = 0) -> bool:
        """Hand the rest of this chunked body to the pump; False: framing it would not follow."""
        stream = pump.add(self.fd, client_fd, self._pump_ended, body_so_far, events)
        if stream is None:
            return False  # httptools goes on deciding
        self.pumped = stream
        self.transport.pause_reading()  # type: ignore[union-attr]
        return True

    def stop_pump(self) -> None:
        """End pumping without a callback: the exchange is over (client gone, abort, timeout)."""
        stream, self.pumped = self.pumped, None
        if stream is not None:
            stream.cancel()
            self._pumped_done(stream)

    def _pumped_done(self, stream: Any) -> None:
        self.reads += stream.reads
        self.bytes_in += stream.bytes_in
        if stream.max_gap > self.max_gap:
            self.max_gap = stream.max_gap
        meter = self.meter
        if meter is not None:
            meter.pumped(stream.usage, stream.events)  # token accounting: what the pump counted (usage.py)
        self._parser_dechunks = None  # httptools stopped mid-message: the next response gets a fresh parser

    def _pump_ended(self, code: int, leftover: bytes | None) -> None:
        stream, self.pumped = self.pumped, None
        if stream is None:
            return
        self._pumped_done(stream)
        exchange = self.exchange
        if exchange is None:
            return
        if leftover:
            exchange.write_through(leftover)  # what the client had not taken yet: it goes before anything else
        if code == _pump.COMPLETE or code == _pump.COMPLETE_EXTRA:
            self.complete = True
            # Bytes after the end of the response: the replica is not speaking HTTP/1.1 properly, do not reuse.
            self.keep_alive = self._head_keep_alive and code == _pump.COMPLETE
            if not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]  # idle in the pool: watch for a close
            exchange.upstream_complete()
        elif code == _pump.CLIENT_ERROR:
            exchange.client_write_failed()
        else:
            exchange.upstream_failed("malformed" if code == _pump.MALFORMED else "lost")
