"""Active health checks, like HAProxy's `check` with fall/rise/inter/fastinter.

One checking loop (`HealthChecker`) serves the gateway's replicas and the development
router's (replicas/health.py); what differs is only the probe. The gateway's probe
(`HttpProbe`) is a GET of the health path (vLLM `/health`, Ray replicas `/-/healthz`):
never /v1/models, a POST or /internal/route, because a real request wakes a deployment
scaled to zero and counts as traffic for autoscaling, while a replica's /-/healthz does not (Ray 2.60.0,
ray/serve/_private/replica.py and router.py). Checks go
straight to the replica, never through the router. Off the hot path, so httpx is the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, Protocol, TypeVar

import httpx

from gateway.config import Config
from gateway.controlplane.targets import Target

log = logging.getLogger("gateway.health")


class Checked(Protocol):
    healthy: bool


M = TypeVar("M", bound=Checked)


class _State:
    __slots__ = ("passes", "fails", "next_check", "running")

    def __init__(self) -> None:
        self.passes = 0
        self.fails = 0
        self.next_check = 0.0
        self.running = False


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Stop a background task and wait until it has stopped."""
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


class HealthChecker(Generic[M]):
    """Probes every member: `fall` failures in a row mark it down, `rise` passes mark it up again.
    A stable member is probed every `interval_s`, one in doubt every `fast_interval_s`."""

    def __init__(self, members: Callable[[], Iterable[M]], probe: Callable[[M], Awaitable[bool]], *,
                 fall: int, rise: int, interval_s: float, fast_interval_s: float,
                 name: Callable[[M], str] = repr, on_change: Callable[[M], None] | None = None,
                 close: Callable[[], Awaitable[None]] | None = None):
        self.members = members
        self.probe = probe
        self.fall, self.rise = fall, rise
        self.interval_s, self.fast_interval_s = interval_s, fast_interval_s
        self.name = name
        self.on_change = on_change
        self._close = close
        self._states: dict[int, _State] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._close is not None:
            await self._close()

    def _state(self, member: M) -> _State:
        state = self._states.get(id(member))
        if state is None:
            state = self._states[id(member)] = _State()
        return state

    def mark_down(self, member: M) -> None:
        """Traffic showed the member is unreachable: stop sending to it until checks pass `rise` times."""
        state = self._state(member)
        state.passes = 0
        state.fails = max(state.fails, self.fall)
        state.next_check = 0.0
        self._set(member, False)

    async def _run(self) -> None:
        tick = min(self.fast_interval_s, 0.25)
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            members = list(self.members())
            live = {id(m) for m in members}
            for key in [key for key in self._states if key not in live]:
                del self._states[key]
            for member in members:
                state = self._state(member)
                if not state.running and now >= state.next_check:
                    state.running = True
                    loop.create_task(self._check(member, state))
            await asyncio.sleep(tick)

    async def _check(self, member: M, state: _State) -> None:
        try:
            ok = await self.probe(member)
        except Exception:  # a probe's bug counts as a failed check, never as a dead checking loop
            log.exception("health probe of %s failed", self.name(member))
            ok = False
        finally:
            state.running = False
        if ok:
            state.passes += 1
            state.fails = 0
            if not member.healthy and state.passes >= self.rise:
                self._set(member, True)
        else:
            state.fails += 1
            state.passes = 0
            if member.healthy and state.fails >= self.fall:
                self._set(member, False)
        stable = member.healthy and state.fails == 0
        state.next_check = time.monotonic() + (self.interval_s if stable else self.fast_interval_s)

    def _set(self, member: M, healthy: bool) -> None:
        if member.healthy != healthy:
            member.healthy = healthy
            log.warning("%s is %s", self.name(member), "UP" if healthy else "DOWN")
            if self.on_change is not None:
                self.on_change(member)


class HttpProbe:
    """GET of the health path straight at the replica; 200 is healthy."""

    def __init__(self, path: str, timeout_s: float):
        self.path = path
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, target: Target) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
        try:
            response = await self._client.get(f"http://{target.host}:{target.port}{self.path}")
        except (httpx.HTTPError, OSError):
            return False
        return response.status_code == 200

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def replica_health(config: Config, targets: Callable[[], Iterable[Target]],
                   on_change: Callable[[Target], None] | None = None) -> HealthChecker[Target]:
    """The gateway's checker of its replicas (of every app), from the config's health options."""
    probe = HttpProbe(config.health_path, config.health_timeout_s)
    return HealthChecker(targets, probe, fall=config.health_fall, rise=config.health_rise,
                         interval_s=config.health_interval_s, fast_interval_s=config.health_fast_interval_s,
                         name=lambda t: f"replica {t.replica_id} ({t.address})", on_change=on_change,
                         close=probe.close)


# vLLM's Prometheus names (vllm/v1/metrics/loggers.py, vLLM 0.10+; `gpu_cache_usage_perc` before the V1 rename).
_RUNNING = b"vllm:num_requests_running"
_WAITING = b"vllm:num_requests_waiting"
_KV = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
# A replica without vLLM's metrics (404, not Prometheus text) is asked again this much later.
_NOT_AN_ENGINE_RETRY_S = 60.0


def parse_engine_metrics(text: bytes) -> tuple[float, float, float] | None:
    """(running, waiting, KV cache usage 0..1) from a vLLM /metrics page, or None if it has none of them.
    Summed over engines (data-parallel ranks label theirs `engine="N"`); KV usage is the fullest engine's."""
    running = waiting = kv = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        name = line.split(b"{", 1)[0].split(b" ", 1)[0]
        try:
            value = float(line.rsplit(b" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if name == _RUNNING:
            running += value
        elif name == _WAITING:
            waiting += value
        elif name in _KV:
            kv = max(kv, value)
        else:
            continue
        found = True
    return (running, waiting, kv) if found else None


class EngineScraper:
    """Reads each replica's engine load off its /metrics for admission (gateway/dataplane/admission.py).

    Beside the health checks and like them off the request path: a loop that GETs /metrics of every healthy
    replica each `interval_s`. A replica whose engine has requests waiting, or a KV cache at `kv_limit`, is
    saturated: its limit becomes the requests the gateway has in flight there minus those the engine queues,
    so the engine's own queue drains while the gateway holds the rest; the next scrape without waiting
    requests lifts the limit. `on_update` runs after each round (admission lets waiting requests go).
    """

    def __init__(self, targets: Callable[[], Iterable[Target]], interval_s: float, timeout_s: float, kv_limit: float,
                 on_update: Callable[[], None]):
        self.targets = targets
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.kv_limit = kv_limit
        self.on_update = on_update
        self._skip_until: dict[int, float] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
        while True:
            now = time.monotonic()
            members = [t for t in self.targets() if self._skip_until.get(id(t), 0.0) <= now]
            if members:
                await asyncio.gather(*(self.scrape(t) for t in members))
                try:
                    self.on_update()
                except Exception:  # admission's bug must not stop the scraping
                    log.exception("engine metrics update failed")
            await asyncio.sleep(self.interval_s)

    async def scrape(self, target: Target) -> None:
        assert self._client is not None
        if not target.healthy:
            target.saturated_at = None  # out of rotation anyway; its old numbers must not linger
            return
        try:
            response = await self._client.get(f"http://{target.host}:{target.port}/metrics")
        except (httpx.HTTPError, OSError):
            return  # the health checks judge reachability; keep the last reading
        parsed = parse_engine_metrics(response.content) if response.status_code == 200 else None
        if parsed is None:
            self._skip_until[id(target)] = time.monotonic() + _NOT_AN_ENGINE_RETRY_S
            target.saturated_at = None
            return
        self.update(target, *parsed)

    def update(self, target: Target, running: float, waiting: float, kv: float) -> None:
        target.engine_running, target.engine_waiting, target.engine_kv = running, waiting, kv
        if waiting > 0 or kv >= self.kv_limit:
            target.saturated_at = max(0, target.in_flight - int(waiting))
        else:
            target.saturated_at = None
