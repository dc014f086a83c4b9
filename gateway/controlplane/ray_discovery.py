"""Routers, replicas and the fallback proxy of every Ray Serve application, followed live.

The gateway becomes a Ray driver (private Ray 2.60.0 APIs: ServeController.get_target_groups in
ray/serve/_private/controller.py, LongPollClient in ray/serve/_private/long_poll.py): it finds the Serve controller,
reads `get_target_groups(from_proxy_manager=True)` once, then follows Ray's own
long poll on TARGET_GROUPS and FALLBACK_TARGETS, the two keys HAProxyManager
follows. Like HAProxyManager it follows every application (one `App` per HTTP
target group, matched by route prefix), or only `--app`. Every update replaces an
app's TargetSet contents; Target objects of replicas that stay are kept
(TargetSet.replace), so their pools and the streams in flight on them are untouched:
a redeploy or an autoscaling step never cuts a stream on a replica that stays
(Ray's HAProxy reloads instead, and `hard-stop-after` cuts long streams, ray#66056).

Scale to zero (§e): while the app has no data-plane target, the relay sends each
request to the fallback Serve proxy (FALLBACK_TARGETS[HTTP]) without calling the
router, because only a request queued on a DeploymentHandle wakes the app; the
controller also withdraws the router targets then. Discovery never sends traffic.

This is the only module of the gateway that imports `ray`, and only when
--ray-address is given. Everything it touches under ray.serve._private is private
to Ray and checked against ray[serve]==2.60.0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.config import Config, ConfigError, ReplicaSpec
from gateway.controlplane.apps import App, AppTable
from gateway.controlplane.targets import Target, TargetSet

log = logging.getLogger("gateway.ray")

CONTROLLER_NAME = "SERVE_CONTROLLER_ACTOR"  # ray/serve/_private/constants.py SERVE_CONTROLLER_NAME
SERVE_NAMESPACE = "serve"
CONNECT_DEADLINE_S = 15.0
CALL_DEADLINE_S = 15.0
FIRST_UPDATE_DEADLINE_S = 5.0
WATCHDOG_INTERVAL_S = 1.0


def _split_address(address: str) -> tuple[str, int]:
    if address.startswith("ray://"):
        raise ConfigError(f"ray address {address!r}: Ray Client (ray://) is not supported; give the GCS "
                          "address host:port and run the gateway on a node of the cluster")
    text = address.split("://", 1)[-1]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"ray address {address!r}: expected the GCS address as host:port, e.g. 127.0.0.1:6379")
    return host.strip("[]"), int(port)


class RayDiscovery:
    def __init__(self, config: Config):
        self.config = config
        self.address = config.ray_address
        self.only: str | None = config.app or None
        self.apps = AppTable()
        self.fallback: Target | None = None
        self.node_ip = ""
        self.updates = 0
        self.started_s = 0.0  # how long start() took, for the logs and the tests
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ray: Any = None
        self._controller: Any = None
        self._client: Any = None
        self._watchdog: asyncio.Task | None = None
        self._stopping = False
        self._we_initialized = False
        self._seen: dict[str, tuple[list[ReplicaSpec], list[tuple[str, int]]]] = {}
        self._first_groups = asyncio.Event()
        self._first_fallback = asyncio.Event()

    # -- blocking Ray calls run in a daemon thread, with a deadline the event loop enforces
    async def _blocking(self, fn: Callable[[], Any], deadline_s: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the loop
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        # A daemon thread (not the default executor): a call stuck in Ray must not hold up process exit.
        threading.Thread(target=run, name=f"ray-discovery-{what}", daemon=True).start()
        try:
            return await asyncio.wait_for(future, deadline_s)
        except TimeoutError:
            hint = " (is it a Ray GCS address?)" if what == "connect" else ""
            raise ConfigError(f"ray {what} at {self.address} did not finish within {deadline_s:.0f}s{hint}") from None

    # -- lifecycle
    async def start(self) -> AppTable:
        started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        host, port = _split_address(self.address)
        await self._check_reachable(host, port)
        if host in ("127.0.0.1", "localhost", "::1"):
            # Otherwise Ray rewrites a loopback address to the routable IP
            # (ray/_private/services.py get_node_ip_address, Ray 2.60.0).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # The gateway never starts a Ray cluster of its own. Ray calls `ray.init()` by itself when an API is used
        # while not connected (ray/_private/auto_init_hook.py, Ray 2.60.0, read once at import): a ledger sync
        # still in its thread after shutdown's ray.shutdown() did so in our CI, and the new local cluster wrote
        # ~/.ray/auth_token (ray/_private/authentication/authentication_token_setup.py), after which every
        # cluster started on that machine refused drivers with InvalidAuthToken.
        os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray-address needs Ray: pip install 'gateway[ray]' (ray[serve]==2.60.0, pyarrow)") from None
        self._ray = ray
        try:
            await self._blocking(self._init_ray, CONNECT_DEADLINE_S, "connect")
            self._controller = await self._blocking(self._find_controller, CALL_DEADLINE_S, "controller lookup")
            groups = await self._blocking(self._get_groups, CALL_DEADLINE_S, "get_target_groups")
        except ConfigError:
            raise
        except Exception as exc:  # a Ray error at startup is a setup problem: one line, no traceback
            raise ConfigError(f"ray at {self.address}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        self._check_apps(groups)
        self.node_ip = self.config.node_ip or (self.config.host if self.config.host not in ("0.0.0.0", "::", "")
                                                else self._ray.util.get_node_ip_address())
        if self.only:
            self._add_app(self.only, "/")  # kept while not deployed: its requests get 503 no_replicas, not 404
        self._on_target_groups(groups, initial=True)
        self._start_client()
        # The long poll answers at once with both keys (snapshot ids start at -1): wait for the
        # fallback so a scaled-to-zero app is servable from the first request.
        try:
            await asyncio.wait_for(self._first_fallback.wait(), FIRST_UPDATE_DEADLINE_S)
        except TimeoutError:
            log.warning("ray discovery: no FALLBACK_TARGETS update within %.0fs; continuing without a fallback",
                        FIRST_UPDATE_DEADLINE_S)
        self._watchdog = self._loop.create_task(self._watch())
        self.started_s = time.monotonic() - started
        for app in self.apps:
            log.info("ray discovery: app %r at %s (%s): %d replicas, %d routers, fallback %s (%.0f ms)", app.name,
                     app.prefix, self.address, len(app.targets), len(app.targets.routers),
                     self.fallback.address if self.fallback else "none", self.started_s * 1000)
        if not len(self.apps):
            log.warning("ray discovery: no Serve application at %s yet; answering 404 until one is deployed",
                        self.address)
        return self.apps

    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            self._client.stop()
        if self._we_initialized and self._ray is not None:
            try:
                await self._blocking(self._ray.shutdown, 5.0, "shutdown")
            except ConfigError:
                log.warning("ray discovery: ray.shutdown() did not finish within 5 s")

    async def _check_reachable(self, host: str, port: int) -> None:
        """Fail fast and clearly: ray.init on a dead address retries for minutes."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"ray address {self.address!r}: cannot resolve {host!r} ({exc.strerror})") from None
        reason = "unreachable"
        for _family, _kind, _proto, _, sockaddr in infos:
            try:
                async with asyncio.timeout(3.0):
                    _, writer = await asyncio.open_connection(str(sockaddr[0]), int(sockaddr[1]))
                writer.close()
                return
            except TimeoutError:
                reason = "connect timed out after 3 s"
            except OSError as exc:
                reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot reach the Ray cluster at {self.address} ({reason}); is it up "
                          "(`ray start --head`), and is this its GCS address?")

    # -- blocking helpers (thread)
    def _init_ray(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        # We connect from a helper thread on purpose (the gateway owns SIGTERM): drop Ray's warning about it.
        logging.getLogger("ray._private.worker").addFilter(
            lambda record: not str(record.msg).startswith("SIGTERM handler is not set"))
        ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
        self._we_initialized = True

    def _find_controller(self) -> Any:
        try:
            return self._ray.get_actor(CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            raise ConfigError(f"Ray at {self.address} runs no Serve controller: deploy a Serve application first") from None

    def _get_groups(self) -> list:
        # from_proxy_manager=True: replica-level targets. The default returns only HAProxy frontends (§c).
        return self._ray.get(self._controller.get_target_groups.remote(from_proxy_manager=True), timeout=CALL_DEADLINE_S)

    # -- the applications
    @staticmethod
    def _http(groups: list) -> list:
        return [tg for tg in groups if getattr(tg.protocol, "value", tg.protocol) == "HTTP" and tg.app_name]

    def _check_apps(self, groups: list) -> None:
        names = sorted({tg.app_name for tg in self._http(groups)})
        if self.only and self.only not in names:
            log.warning("ray discovery: app %r is not deployed (apps: %s); answering 503 until it is",
                        self.only, ", ".join(names) or "none")

    def _add_app(self, name: str, prefix: str) -> App:
        # Ray reuses ports: accept a decision by replica id only.
        targets = TargetSet(strict_replica_id=True)
        targets.fallback = self.fallback
        app = App(name, prefix, targets)
        self.apps.add(app)  # the gateway's listener attaches the router client and the pools' hooks
        return app

    # -- updates (on the event loop)
    def _on_target_groups(self, groups: list, initial: bool = False) -> None:
        wanted: dict[str, Any] = {}
        for tg in self._http(groups):
            if self.only and tg.app_name != self.only:
                continue
            if tg.route_prefix is None and not self.only:
                continue  # an app without an HTTP route: HAProxy gives it no backend either
            wanted[tg.app_name] = tg
        if not initial:
            self._first_groups.set()
        for name in [app.name for app in self.apps if app.name not in wanted and app.name != self.only]:
            app = self.apps.get(name)
            assert app is not None
            app.targets.replace([], [])
            self.apps.remove(name)
            self._seen.pop(name, None)
            self.updates += 1
            log.info("ray discovery: app %r is gone", name)
        if self.only and self.only not in wanted and self.only in self._seen:
            del self._seen[self.only]
            only = self.apps.get(self.only)
            if only is not None:
                only.targets.replace([], [])
            log.info("ray discovery: app %r is not deployed any more", self.only)
        for name, tg in wanted.items():
            specs = [ReplicaSpec(t.name, t.ip, t.port) for t in tg.targets]
            routers = sorted((t.ip, t.port) for t in tg.ingress_request_router_targets)
            app = self.apps.get(name)
            if app is None:
                app = self._add_app(name, tg.route_prefix or "/")
                log.info("ray discovery: app %r at %s", name, app.prefix)
            elif tg.route_prefix and app.prefix != "/" + tg.route_prefix.strip("/"):
                self.apps.set_prefix(app, tg.route_prefix)
                log.info("ray discovery: app %r moved to %s", name, app.prefix)
            before_specs, before_routers = self._seen.get(name, ([], []))
            if (specs, routers) == (before_specs, before_routers) and name in self._seen:
                continue
            self._seen[name] = (specs, routers)
            self.updates += 1
            app.targets.replace(specs, routers)
            if not initial:
                before = {spec.replica_id for spec in before_specs}
                after = {spec.replica_id for spec in specs}
                log.info("ray discovery: app %r now %d replicas (+%d -%d), routers %s", name, len(specs),
                         len(after - before), len(before - after),
                         ",".join(f"{h}:{p}" for h, p in routers) or "none")

    def _on_fallback(self, snapshot: dict) -> None:
        http = next((t for proto, t in snapshot.items() if getattr(proto, "value", proto) == "HTTP"), None)
        current = self.fallback
        if http is None:
            new = None
        elif current is not None and (current.replica_id, current.host, current.port) == (http.name, http.ip, http.port):
            new = current
        else:
            new = Target(http.name, http.ip, http.port)
        self._first_fallback.set()
        if new is current:
            return
        if current is not None and current.pool is not None:
            current.pool.close()  # type: ignore[attr-defined]
        # Fallback first, then replace(): the gateway's listener attaches a pool to the new fallback.
        self.fallback = new
        for app in self.apps:
            app.targets.fallback = new
            app.targets.replace(list(self._seen.get(app.name, ([], []))[0]))
        log.info("ray discovery: fallback proxy %s", new.address if new else "none (unhealthy)")

    # -- the long poll
    def _start_client(self) -> None:
        from ray.serve._private.long_poll import LongPollClient, LongPollNamespace

        assert self._loop is not None
        self._client = LongPollClient(
            self._controller,
            {LongPollNamespace.TARGET_GROUPS: self._on_target_groups,
             LongPollNamespace.FALLBACK_TARGETS: self._on_fallback},
            call_in_event_loop=self._loop,
            client_id=f"gateway-{os.getpid()}",
        )

    async def _watch(self) -> None:
        """The client stops itself when the controller dies: re-resolve it and start a new client."""
        backoff = WATCHDOG_INTERVAL_S
        while not self._stopping:
            await asyncio.sleep(backoff)
            if self._client is not None and self._client.is_running:
                backoff = WATCHDOG_INTERVAL_S
                continue
            try:
                self._controller = await self._blocking(self._find_controller, CALL_DEADLINE_S, "controller lookup")
            except Exception as exc:  # noqa: BLE001 - keep serving the last known targets and retry
                log.warning("ray discovery: Serve controller unavailable (%s); keeping %d known replicas, retrying",
                            exc, len(self.apps.all_targets()))
                backoff = min(backoff * 2, 10.0)
                continue
            log.warning("ray discovery: long poll stopped; following the Serve controller again")
            self._start_client()
            backoff = WATCHDOG_INTERVAL_S
