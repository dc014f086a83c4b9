"""The answer to a client accepted past the connection cap (max_connections, or what the fd limit holds).

Writing `503 overloaded` and closing at once loses the answer whenever the client's request arrives after the
close: the kernel answers data on a closed socket with a reset, and a reset discards what the client had not read
yet (RFC 9112 §9.6 describes the same hazard; nginx's `lingering_close` and Apache's lingering close answer it the
same way). So the refusal half-closes after its answer (FIN), reads and drops whatever the client sends, and
closes when the client does, or after LINGER_S. Lingering costs a descriptor, which is what may be short here:
at most MAX_LINGERING connections linger at once; past that a refusal closes at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.dataplane.reasons import Reason, error_response
from gateway.observability.metrics import Metrics

log = logging.getLogger("gateway")

LINGER_S = 2.0
MAX_LINGERING = 32
REPORT_INTERVAL_S = 10.0


def _answer() -> bytes:
    response = error_response(Reason.OVERLOADED, "too many connections", retry_after_s=1)
    head = [b"HTTP/1.1 503 Service Unavailable\r\n"]
    for name, value in response.raw_headers:
        if name.lower() not in (b"content-length", b"connection"):
            head.append(b"%s: %s\r\n" % (name, value))
    body = bytes(response.body)
    return b"".join(head) + b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)


class Refusals:
    """Makes the refusing protocols of one listener, counts them, and says so in the log now and then."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.answer = _answer()
        self.lingering = 0
        self.refused = 0
        self._reported = 0
        self._reported_at = 0.0

    def new(self, why: str, open_connections: int, cap: int) -> "Refusal":
        self.refused += 1
        self.metrics.connections_refused.labels(why).inc()
        now = time.monotonic()
        if now - self._reported_at >= REPORT_INTERVAL_S:
            log.warning("refusing new clients with 503 overloaded: %d connections open, at most %d (%s); "
                        "%d refused since the last such line", open_connections, cap, why,
                        self.refused - self._reported)
            self._reported, self._reported_at = self.refused, now
        return Refusal(self)


class Refusal(asyncio.Protocol):
    def __init__(self, refusals: Refusals):
        self.refusals = refusals
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.lingers = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        refusals = self.refusals
        transport.write(refusals.answer)  # type: ignore[attr-defined]
        if refusals.lingering >= MAX_LINGERING or not transport.can_write_eof():  # type: ignore[attr-defined]
            transport.close()
            return
        transport.write_eof()  # type: ignore[attr-defined]
        self.lingers = True
        refusals.lingering += 1
        self.timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request we refused: dropped as it comes

    def eof_received(self) -> bool:
        return False  # the client is done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.lingers:
            self.lingers = False
            self.refusals.lingering -= 1
