"""Active health checks of replicas, like HAProxy's `check` with fall/rise/inter/fastinter.

Only a GET of the health path (vLLM `/health`, Ray replicas `/-/healthz`) is ever
sent: never /v1/models, a POST or /internal/route, because a real request wakes a
deployment scaled to zero and counts as traffic for autoscaling (ray-serve.md §e).
Checks go straight to the replica, never through the router. Off the hot path,
so httpx is the client.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from gateway.config import Config
from gateway.targets import Target, TargetSet

log = logging.getLogger("gateway.health")


class _State:
    __slots__ = ("passes", "fails", "next_check", "running")

    def __init__(self) -> None:
        self.passes = 0
        self.fails = 0
        self.next_check = 0.0
        self.running = False


class HealthChecker:
    def __init__(self, config: Config, targets: TargetSet, on_change=None):
        self.config = config
        self.targets = targets
        self.on_change = on_change
        self._states: dict[int, _State] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.config.health_timeout_s, trust_env=False)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            await self._client.aclose()

    def _state(self, target: Target) -> _State:
        state = self._states.get(id(target))
        if state is None:
            state = self._states[id(target)] = _State()
        return state

    def mark_down(self, target: Target) -> None:
        """Traffic showed the replica is unreachable: stop sending to it until checks pass `rise` times."""
        state = self._state(target)
        state.passes = 0
        state.fails = max(state.fails, self.config.health_fall)
        state.next_check = 0.0
        self._set(target, False)

    async def _run(self) -> None:
        tick = min(self.config.health_fast_interval_s, 0.25)
        while True:
            now = time.monotonic()
            live = {id(t) for t in self.targets.targets}
            for key in [key for key in self._states if key not in live]:
                del self._states[key]
            for target in list(self.targets.targets):
                state = self._state(target)
                if not state.running and now >= state.next_check:
                    state.running = True
                    asyncio.get_running_loop().create_task(self._check(target, state))
            await asyncio.sleep(tick)

    async def _check(self, target: Target, state: _State) -> None:
        config = self.config
        ok = False
        try:
            assert self._client is not None
            response = await self._client.get(f"http://{target.host}:{target.port}{config.health_path}")
            ok = response.status_code == 200
        except (httpx.HTTPError, OSError):
            ok = False
        finally:
            state.running = False
        if ok:
            state.passes += 1
            state.fails = 0
            if not target.healthy and state.passes >= config.health_rise:
                self._set(target, True)
        else:
            state.fails += 1
            state.passes = 0
            if target.healthy and state.fails >= config.health_fall:
                self._set(target, False)
        stable = (target.healthy and state.fails == 0)
        interval = config.health_interval_s if stable else config.health_fast_interval_s
        state.next_check = time.monotonic() + interval

    def _set(self, target: Target, healthy: bool) -> None:
        if target.healthy != healthy:
            target.healthy = healthy
            log.warning("replica %s (%s) is %s", target.replica_id, target.address, "UP" if healthy else "DOWN")
            if self.on_change is not None:
                self.on_change(target)
