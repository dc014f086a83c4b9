"""The set of replicas the gateway may connect to, and their state.

This is the SSRF boundary: the relay only ever opens connections to a Target
from this set, never to an address a router (or a client) named. Static mode
fills it once from the config; Ray discovery replaces its contents on every
controller update. Replacing keeps the Target objects of replicas that stay,
so their pools and the streams in flight on them are untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ReplicaSpec
from router_client.pool import KeepAlivePool


@dataclass(eq=False)
class Target:
    replica_id: str
    host: str
    port: int
    healthy: bool = True
    in_flight: int = 0
    removed: bool = False
    # Streams that broke on this replica and were resumed elsewhere / streams resumed on it.
    resumes_from: int = 0
    resumes_to: int = 0
    # Passive outlier ejection (outlier.py): requests served, and the failure streak since the last one.
    successes: int = 0
    failure_streak: int = 0
    streak_mark: int = 0
    ejected: bool = False
    ejections: int = 0
    ejections_in_row: int = 0
    ejected_at_successes: int = -1
    # A vLLM engine's own load, read off its /metrics by the health loop (health.py EngineScraper); and, while
    # the last scrape found it saturated, the requests in flight it had then (admission.py's limit for it).
    engine_waiting: float = 0.0
    engine_running: float = 0.0
    engine_kv: float = 0.0
    saturated_at: int | None = None
    # Filled by the server: the keep-alive pool of the data plane's connections to this replica
    # (typed loosely: the control plane does not know the data plane's connection class).
    pool: KeepAlivePool[Any] = field(default=None, repr=False)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> dict[str, object]:
        return {
            "replica_id": self.replica_id,
            "address": self.address,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "idle_connections": self.pool.idle_count if self.pool is not None else 0,
            "resumes_from": self.resumes_from,
            "resumes_to": self.resumes_to,
            "ejected": self.ejected,
            "ejections": self.ejections,
            "saturated": self.saturated_at is not None,
        }


class TargetSet:
    """Known replicas by replica_id and by address, plus routers and an optional fallback."""

    def __init__(self, specs: Iterable[ReplicaSpec] = (), routers: Iterable[tuple[str, int]] = (),
                 strict_replica_id: bool = False):
        self._by_id: dict[str, Target] = {}
        self._by_address: dict[tuple[str, int], Target] = {}
        self.targets: list[Target] = []
        self.routers: list[tuple[str, int]] = list(routers)
        # Ray's head-node Serve proxy: where POSTs go when an app is scaled to zero, as Ray's HAProxy sends them to
        # its `backup` server (ray/serve/_private/haproxy_templates.py, Ray 2.60.0).
        self.fallback: Target | None = None
        # Ray reuses ports 150 s after release, possibly for another replica: then an id must match exactly.
        self.strict_replica_id = strict_replica_id
        self._cursor = itertools.count()
        self.listeners: list[Callable[[list[Target], list[Target]], None]] = []
        self.replace(specs)

    def replace(self, specs: Iterable[ReplicaSpec], routers: Iterable[tuple[str, int]] | None = None) -> None:
        old = self._by_id
        new_by_id: dict[str, Target] = {}
        for spec in specs:
            target = old.get(spec.replica_id)
            if target is None or (target.host, target.port) != (spec.host, spec.port):
                target = Target(spec.replica_id, spec.host, spec.port)
            new_by_id[spec.replica_id] = target
        removed = [target for rid, target in old.items() if new_by_id.get(rid) is not target]
        added = [target for rid, target in new_by_id.items() if old.get(rid) is not target]
        for target in removed:
            target.removed = True
        self._by_id = new_by_id
        self._by_address = {(t.host, t.port): t for t in new_by_id.values()}
        self.targets = list(new_by_id.values())
        if routers is not None:
            self.routers = list(routers)
        for listener in self.listeners:
            listener(added, removed)

    def __len__(self) -> int:
        return len(self.targets)

    def get(self, replica_id: str) -> Target | None:
        return self._by_id.get(replica_id)

    def lookup(self, replica_id: str, host: str, port: int) -> Target | None:
        """The known target a routing decision names, or None: never a new address."""
        target = self._by_id.get(replica_id)
        if target is not None or self.strict_replica_id:
            return target
        return self._by_address.get((host, port))

    def healthy(self) -> list[Target]:
        return [target for target in self.targets if target.healthy]

    def in_rotation(self) -> list[Target]:
        return [target for target in self.targets if target.healthy and not target.ejected]

    def least_loaded(self, exclude: Target | None = None, avoid: Collection[Target] = ()) -> Target | None:
        """Healthy replica with the fewest requests in flight; ties rotate (HAProxy's leastconn)."""
        candidates = [t for t in self.targets if t.healthy and not t.ejected and t is not exclude and t not in avoid]
        if not candidates:
            return None
        start = next(self._cursor) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda target: target.in_flight)

    def describe(self) -> dict[str, object]:
        return {
            "routers": [f"{host}:{port}" for host, port in self.routers],
            "targets": [target.describe() for target in self.targets],
            "fallback": self.fallback.describe() if self.fallback else None,
        }
