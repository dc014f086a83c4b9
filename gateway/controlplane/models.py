"""Which app serves which model, for --route-by-model: learned from the replicas, never the router.

On every change of an app's replicas (a discovery update) the catalog GETs `/v1/models` from one
of the app's replicas, straight at its direct-ingress port, like a health check. Never from the
fallback proxy and never while an app has no replica: a request there would wake an app scaled
to zero (Ray 2.60.0: a queued request pushes a cold-start metric, RouterMetricsManager.wrap_queued_request
in ray/serve/_private/router.py). Between updates nothing is sent, so the catalog adds no steady load
and does not keep replicas from scaling down.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import orjson

from gateway.controlplane.apps import App, AppTable

log = logging.getLogger("gateway.models")

ATTEMPTS = 5
RETRY_S = 1.0


class ModelCatalog:
    def __init__(self, apps: AppTable, timeout_s: float):
        self.apps = apps
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._again: set[str] = set()
        # app name -> the replicas' own /v1/models entries, served back as one list by the gateway.
        self.entries: dict[str, list[dict]] = {}

    def refresh(self, app: App) -> None:
        """Learn the app's models again (coalesced: one fetch in flight per app, rerun once if asked meanwhile)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # before the gateway's loop runs: start() refreshes every app
        if app.name in self._running:
            self._again.add(app.name)
            return
        self._running[app.name] = loop.create_task(self._refresh(app))

    def start(self) -> None:
        for app in self.apps:
            self.refresh(app)

    def forget(self, app: App) -> None:
        self.entries.pop(app.name, None)
        self.apps.reindex_models()

    async def _refresh(self, app: App) -> None:
        try:
            while True:
                self._again.discard(app.name)
                await self._fetch(app)
                if app.name not in self._again:
                    return
        finally:
            self._running.pop(app.name, None)

    async def _fetch(self, app: App) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
        path = ("" if app.prefix == "/" else app.prefix) + "/v1/models"
        for attempt in range(ATTEMPTS):
            if self.apps.get(app.name) is not app:
                return  # the app is gone
            targets = app.targets.healthy() or app.targets.targets
            if not targets:
                return  # scaled to zero or not up yet: keep what we knew; never wake it
            target = targets[attempt % len(targets)]
            try:
                response = await self._client.get(f"http://{target.host}:{target.port}{path}")
                if response.status_code == 200:
                    data = orjson.loads(response.content).get("data") or []
                    entries = [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
                    models = tuple(entry["id"] for entry in entries)
                    if models != app.models:
                        log.info("app %r serves models %s", app.name, ", ".join(models) or "none")
                    app.models = models
                    self.entries[app.name] = entries
                    self.apps.reindex_models()
                    return
                reason = f"answered {response.status_code}"
            except (httpx.HTTPError, OSError, ValueError, AttributeError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            log.warning("models of app %r from %s: %s (attempt %d of %d)", app.name, target.address, reason,
                        attempt + 1, ATTEMPTS)
            await asyncio.sleep(RETRY_S)

    def listing(self) -> bytes:
        """`GET /v1/models` for every app: the replicas' own entries, in prefix order."""
        data = [entry for app in self.apps for entry in self.entries.get(app.name, [])]
        return orjson.dumps({"object": "list", "data": data})

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
