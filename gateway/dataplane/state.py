"""What the connections of one server share: counters, the drain flag, and the hooks the process wires in.

Like uvicorn's `ServerState`: the protocols get the config and this, never the server
object, so the data plane imports nothing above it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from gateway.dataplane.request import Request
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import RequestTracer


class Connection(Protocol):
    """What the server does with an open client connection: time it out, or close it on drain."""
    transport: asyncio.Transport
    current: Request | None
    pending: deque[Request]
    in_head: bool  # a request is being received (head or body): the drain lets it finish

    def check_timeouts(self, now: float) -> None: ...


class FrontDoor(Protocol):
    """The checks every public request passes (gateway/security), handed in by the process when configured."""

    @property
    def needs_key(self) -> bool: ...

    def drop_set(self, base: frozenset[bytes]) -> frozenset[bytes]: ...

    def authenticate(self, authorization: bytes | None) -> Any: ...

    def admit(self, client: Any, request: Request) -> bool: ...

    def response_headers(self, request: Request | None) -> bytes: ...


class ServerState:
    def __init__(self, metrics: Metrics, max_connections: int, session_header: str,
                 request_finished: Callable[[Request], None]):
        self.metrics = metrics
        self.max_connections = max_connections
        # Ray matches the session header case-insensitively with '-' and '_' alike (docs/getting-started.md, "Usage").
        self.session_header_key = session_header.lower().replace("_", "-").encode("latin-1")
        self.request_finished = request_finished
        # Set by the process when an OTLP endpoint is configured; None keeps tracing off the path.
        self.tracer: RequestTracer | None = None
        self.connections: set[Connection] = set()
        self.in_flight = 0
        # Request bodies held in memory by every connection (client.py charges and releases them), against
        # config.max_buffered_body_bytes.
        self.buffered_body = 0
        self.draining = False
        self.serving = False
        # Cached by the server at start: asyncio.get_running_loop() costs a getpid() syscall per call.
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.all_closed = asyncio.Event()
        # The C stream pump (upstream.py), set by the server when it is built and --native-relay is on.
        self.pump: Any = None
        # None unless keys, CORS, an admin port or an upstream key is configured: then every request passes it.
        self.door: FrontDoor | None = None

    def exchange_started(self) -> None:
        self.in_flight += 1
        if self.pump is not None:
            self.pump.in_flight = self.in_flight  # the pump's coalescing threshold, as the Python path's

    def exchange_ended(self) -> None:
        self.in_flight -= 1
        if self.pump is not None:
            self.pump.in_flight = self.in_flight

    def admit(self, conn: Connection) -> bool:
        if len(self.connections) >= self.max_connections:
            return False
        self.connections.add(conn)
        return True

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self.all_closed.set()
