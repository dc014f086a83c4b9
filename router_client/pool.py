"""A keep-alive connection pool, generic over the connection type.

Used for router connections and for replica connections. Idle connections are
reused newest-first (LIFO keeps the hot ones hot and lets the rest expire), and
are closed once idle for `idle_timeout_s`, chosen below the server's own
keep-alive timeout so we close first and rarely race a server-side close.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar


class PooledConnection(Protocol):
    @property
    def usable(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=PooledConnection)


class KeepAlivePool(Generic[C]):
    def __init__(self, connect: Callable[[], Awaitable[C]], idle_timeout_s: float, max_idle: int = 256):
        self._connect = connect
        self.idle_timeout_s = idle_timeout_s
        self.max_idle = max_idle
        self._idle: list[tuple[C, float]] = []
        self.connects = 0
        self.reuses = 0
        self.closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def take_idle(self) -> C | None:
        """The newest idle connection still worth using, or None."""
        idle = self._idle
        if not idle:
            return None
        cutoff = time.monotonic() - self.idle_timeout_s
        while idle:
            conn, since = idle.pop()
            if since > cutoff and conn.usable:
                self.reuses += 1
                return conn
            conn.close()
        return None

    async def connect(self) -> C:
        self.connects += 1
        return await self._connect()

    def put(self, conn: C) -> None:
        if self.closed or not conn.usable or len(self._idle) >= self.max_idle:
            conn.close()
            return
        self._idle.append((conn, time.monotonic()))

    def expire(self) -> None:
        """Close connections idle past the timeout; called periodically by the owner."""
        cutoff = time.monotonic() - self.idle_timeout_s
        keep = []
        for conn, since in self._idle:
            if since > cutoff and conn.usable:
                keep.append((conn, since))
            else:
                conn.close()
        self._idle = keep

    def close(self) -> None:
        self.closed = True
        for conn, _ in self._idle:
            conn.close()
        self._idle = []
