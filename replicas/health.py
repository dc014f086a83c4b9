"""Background `GET /health` probes of the router's replicas.

Off the hot path, so plain asyncio streams. Each replica keeps one keep-alive
connection for its probes: a probe must not show up in a replica's accepted
connection count once per interval, which tests read to prove that the
gateway pools its own connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.controlplane import health
from replicas.routing import Replica


class _Probe:
    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._request = b"GET /health HTTP/1.1\r\nhost: %s:%d\r\nuser-agent: replicas-router\r\n\r\n" % (
            replica.host.encode(), replica.port)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def check(self, timeout_s: float) -> bool:
        # A pooled connection may have been closed by the replica's idle
        # timeout since the last probe: one retry on a fresh connection.
        for _ in range(2):
            reused = self._conn is not None
            try:
                return await asyncio.wait_for(self._once(), timeout_s)
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError):
                self.close()
                if not reused:
                    return False
        return False

    async def _once(self) -> bool:
        if self._conn is None:
            self._conn = await asyncio.open_connection(self.replica.host, self.replica.port)
        reader, writer = self._conn
        writer.write(self._request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                close = True
            elif name == b"transfer-encoding":
                close = True  # not worth decoding for a probe; start afresh next time
        if length:
            await reader.readexactly(length)
        if close:
            self.close()
        return status == 200

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


class HealthChecker:
    """The gateway's own checking loop (fall 1, rise 1) with keep-alive probes."""

    def __init__(self, replicas: Sequence[Replica], interval_s: float) -> None:
        self.interval_s = interval_s
        self._probes = {id(r): _Probe(r) for r in replicas}
        timeout = min(max(interval_s, 0.5), 5.0)
        self._checker: health.HealthChecker[Replica] = health.HealthChecker(
            lambda: replicas, lambda replica: self._probes[id(replica)].check(timeout),
            fall=1, rise=1, interval_s=interval_s, fast_interval_s=interval_s, name=lambda r: f"replica {r.id}")

    def start(self) -> None:
        if self._probes and self.interval_s > 0:
            self._checker.start()

    async def stop(self) -> None:
        await self._checker.stop()
        for probe in self._probes.values():
            probe.close()
