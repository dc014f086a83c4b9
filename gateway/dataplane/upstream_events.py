"""What an UpstreamConnection reports, and to whom: the protocols between the replica side and its owner.

A leaf module, so that upstream.py, pumping.py and exchange.py can name each other's roles without
importing each other round a circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.dataplane.response_head import Framing


class PayloadSink(Protocol):
    """Where a response's payload goes when it is rewritten rather than relayed as it is (resume.py):
    the parser appends each chunk's payload to `pending`, then `flush` takes one read's worth."""
    pending: list[bytes]

    def flush(self) -> None: ...


class Counters(Protocol):
    in_flight: int
    metrics: Any  # observability/metrics.py's Metrics


class Pumpable(Protocol):
    """A connection whose chunked body the C pump can take over (pumping.PumpedResponses)."""
    meter: Any
    streaming: bool  # a resumable stream: the pump takes its flags from resume, not from the meter

    def start_pump(self, pump: Any, client_fd: int, body_so_far: bytes) -> bool: ...


class UpstreamEvents(Protocol):
    """What the connection reports to the exchange that owns it (exchange.py)."""
    state: Counters  # in_flight decides coalescing

    def upstream_head(self, status: int, head: bytes, framing: Framing, body_start: bytes,
                      must_close: bool) -> None: ...

    def body_follows(self, conn: Pumpable, body_so_far: bytes) -> bool: ...

    def upstream_complete(self) -> None: ...

    def upstream_upgraded(self, head: bytes, rest: bytes) -> None: ...

    def upstream_failed(self, why: str) -> None: ...

    def write_through(self, data: bytes) -> None: ...

    def client_write_failed(self) -> None: ...
