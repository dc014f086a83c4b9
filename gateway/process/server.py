"""The Gateway: wires config, targets, router client, relay, health, metrics and logs,
and owns the lifecycle (start, serve, drain on SIGTERM, shutdown) in one place."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from gateway.admin.endpoints import Admin, AdminListener
from gateway.config import Config, ConfigError
from gateway.controlplane.apps import App, AppTable
from gateway.controlplane.health import EngineScraper, replica_health
from gateway.controlplane.models import ModelCatalog
from gateway.controlplane.outlier import OutlierDetector
from gateway.controlplane.targets import Target, TargetSet
from gateway.dataplane.admission import Admission
from gateway.dataplane.client import ClientConnection
from gateway.dataplane.relay import Relay
from gateway.dataplane.request import Request
from gateway.dataplane.state import ServerState
from gateway.dataplane.pumping import start_pump
from gateway.dataplane.upstream import UpstreamConnection, open_upstream
from gateway.observability.access_log import AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import RequestTracer
from gateway.observability.usage import UsageBook, default_state_file
from gateway.process.limits import connection_cap
from gateway.process.refusal import Refusal, Refusals
from gateway.security.door import FrontDoor
from gateway.security.keys import KeysError
from gateway.security.tls import TlsError, TlsFiles
from router_client import RouterClient
from router_client.pool import KeepAlivePool

log = logging.getLogger("gateway")

# Timeouts (router, first byte, idle, slowloris) are enforced at this granularity.
SWEEP_INTERVAL_S = 0.1
TLS_SHUTDOWN_TIMEOUT_S = 10.0
USAGE_SAVE_S = 5.0  # how often today's token totals reach the state file (and at exit)


class Gateway:
    def __init__(self, config: Config, apps: AppTable | None = None, local_hosts: frozenset[str] = frozenset()):
        self.config = config
        if apps is None:
            # Static mode: one app at `/` (the relay's app lookup is then one attribute read).
            targets = TargetSet(config.replica_specs, config.router_addresses,
                                strict_replica_id=config.strict_replica_id)
            apps = AppTable([App("", "/", targets)])
        self.apps = apps
        self.local_hosts = local_hosts or (frozenset([config.node_ip]) if config.node_ip else frozenset())
        self.metrics = Metrics()
        self.state = ServerState(self.metrics, config.max_connections, config.session_header, self.request_finished)
        self.health = replica_health(config, self.apps.all_targets, on_change=lambda target: self._admission_wake())
        self.admin = Admin(config, self.state, self.apps, self.metrics, self.refresh_gauges)
        # --route-by-model only: which app serves which model, learned from the replicas on discovery updates.
        self.models = ModelCatalog(self.apps, config.health_timeout_s) if config.route_by_model else None
        self.outliers = OutlierDetector(self._app_targets, config.outlier_failures, config.outlier_ejection_s,
                                        config.outlier_max_ejection_s,
                                        on_eject=lambda target: self.metrics.ejections.labels(target.replica_id).inc())
        self.relay = Relay(config, self.state, self.apps, self.admin.serve, self.health.mark_down,
                           self.models.listing if self.models is not None else None, self.outliers.failed)
        # Admission under overload (issue 22): a queue per app when its replicas are saturated; None when off.
        self.admission: Admission | None = None
        self.engines: EngineScraper | None = None
        if config.admission:
            self.admission = self.relay.admission = Admission(
                target_in_flight=config.saturation_in_flight, burst_in_flight=config.saturation_burst,
                queue_size=config.queue_size,
                queue_timeout_s=config.queue_timeout_s, metrics=self.metrics,
                go=lambda client, request, app: self.relay.route_in(client, request, app, None))
            if config.saturation_engine:
                self.engines = EngineScraper(self.apps.all_targets, config.engine_metrics_interval_s,
                                             config.health_timeout_s, config.saturation_kv, self._admission_wake)
        self.access_log = AccessLog(config.access_log, max_buffer_bytes=config.access_log_buffer_bytes,
                                    on_drop=self.metrics.access_log_dropped.inc)
        self.tracer: RequestTracer | None = None
        if config.otlp_traces_url:
            self.tracer = self.state.tracer = RequestTracer(config.otlp_traces_url, config.trace_sample_ratio)
        # Token totals per key and model (/-/usage, gateway_tokens_total); today's survive a restart in a file.
        self.usage = UsageBook(config.token_state_file or default_state_file(config.port))
        self.usage.listeners.append(self.metrics.tokens_used)
        self.admin.usage = self.usage
        try:
            self.door = FrontDoor(config, self.usage) if config.front_door else None
            self.tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
        except (KeysError, TlsError) as exc:
            raise ConfigError(str(exc)) from None
        self.state.door = self.door
        self.admin.door = self.door
        # The admin listener's connections are its own: never counted, drained or checked with the public ones.
        self.admin_state = ServerState(self.metrics, config.max_connections, config.session_header,
                                       self.request_finished)
        self._admin_server: asyncio.base_events.Server | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self._usage_saved = 0.0
        self.metrics.router_counts.read = self._router_counts
        self.apps.listeners.append(self._apps_changed)
        self._apps_changed(list(self.apps), [])

    @property
    def targets(self) -> TargetSet:
        """The targets of the app at `/` (or the first app): what a single-app user means by "the targets"."""
        first = self.apps.single or next(iter(self.apps), None)
        return first.targets if first is not None else TargetSet()

    def _app_targets(self, target: Target) -> list[Target]:
        """The targets of the app `target` serves (what outlier ejection must never empty)."""
        for app in self.apps:
            if target in app.targets.targets:
                return app.targets.targets
        return []

    def routers(self) -> list[RouterClient]:
        return [app.router for app in self.apps if app.router is not None]

    # -- apps and targets
    def _apps_changed(self, added: list[App], removed: list[App]) -> None:
        config = self.config
        for app in added:
            targets = app.targets
            app.router = RouterClient(
                lambda targets=targets: targets.routers,  # type: ignore[misc]
                timeout_s=config.router_timeout_s,
                idle_timeout_s=config.router_idle_s,
                forward_body=config.forward_body,
                body_cap=config.router_body_cap,
                session_header=config.session_header,
                local_hosts=self.local_hosts,
            )
            targets.listeners.append(self._listener(app))
            self._targets_changed(app, targets.targets, [])
        for app in removed:
            # Streams in flight on its replicas finish on their own connections; idle ones go now.
            for target in app.targets.targets:
                if target.pool is not None:
                    target.pool.close()
            if app.router is not None:
                app.router.close()
            if self.models is not None:
                self.models.forget(app)
        if removed:
            self.metrics.forget_replicas(self._metric_series())

    def _listener(self, app: App) -> Callable[[list[Target], list[Target]], None]:
        return lambda added, removed: self._targets_changed(app, added, removed)

    def _targets_changed(self, app: App, added: list[Target], removed: list[Target]) -> None:
        targets = app.targets
        if self.models is not None and (added or removed):
            self.models.refresh(app)
        for target in added:
            target.pool = self._new_pool(target)
        for target in removed:
            # Idle connections go now; streams in flight on a removed replica finish on their own connection,
            # or with resume on, move to other replicas after drain_migrate_after_s (drain by migration).
            if target.pool is not None:
                target.pool.close()
            if self.config.resume_limit and target.in_flight and self.state.loop is not None:
                self.state.loop.call_later(self.config.drain_migrate_after_s, self._migrate_off, target)
        fallback = targets.fallback
        if fallback is not None and fallback.pool is None:
            fallback.pool = self._new_pool(fallback)
        if added and getattr(self, "admission", None) is not None:
            self.admission.wake(app)  # new replicas: room for requests waiting
        if removed:
            self.metrics.forget_replicas(self._metric_series())

    def _migrate_off(self, target: Target) -> None:
        if target.removed and target.in_flight:
            self.relay.migrate_off(target)

    def _new_pool(self, target: Target) -> KeepAlivePool[UpstreamConnection]:
        coalesce_s = self.config.coalesce_ms / 1000
        min_streams = self.config.coalesce_min_streams
        return KeepAlivePool(lambda: open_upstream(target, coalesce_s, min_streams), self.config.upstream_idle_s)

    def _admission_wake(self) -> None:
        if self.admission is not None:
            self.admission.wake_all()

    # -- requests (called through the server state)
    def request_finished(self, request: Request) -> None:
        if request.admission is not None:
            self.admission.finished(request)  # type: ignore[union-attr]  # a place freed, or it left the queue
        key = request.key
        meter = request.meter
        if meter is not None:
            meter.end(request.resume)  # before the trace and the access log, which show its counts
            if meter.total:
                self.usage.record(key.name if key is not None else "", meter.ask.model, meter.prompt,
                                  meter.completion)
        if request.trace is not None:
            self.tracer.finish(request)  # type: ignore[union-attr]
        route = "admin" if request.url.startswith(b"/-/") else "proxy"
        if key is not None:
            if self.door is not None:
                self.door.finished(request)
            self.metrics.request(route, request.status, request.reason, key.name)
        else:
            self.metrics.request(route, request.status, request.reason)
        if request.first_byte_s and request.replica_id:
            self.metrics.first_byte(request.replica_id, request.first_byte_s)
        if self.config.access_log:
            self.access_log.write(request.log_record())

    def refresh_gauges(self, metrics: Metrics) -> None:
        metrics.in_flight.set(self.state.in_flight)
        metrics.connections.set(len(self.state.connections))
        metrics.pumping.set(self.state.pump.active if self.state.pump is not None else 0)
        for target in self.apps.all_targets():
            metrics.pool_idle.labels(target.replica_id).set(target.pool.idle_count if target.pool is not None else 0)
            metrics.replica_up.labels(target.replica_id).set(1 if target.healthy else 0)
            metrics.replica_ejected.labels(target.replica_id).set(1 if target.ejected else 0)
        for router in self.routers():
            for (host, port), pool in router.pools().items():
                metrics.pool_idle.labels(f"router:{host}:{port}").set(pool.idle_count)
        # Also here, not only when a replica leaves: a stream that outlived its replica's removal adds its series
        # back when it ends.
        metrics.forget_replicas(self._metric_series())

    def _metric_series(self) -> set[str]:
        """The replica (and pool) label values of series worth keeping: the current targets, fallbacks, routers."""
        live = {target.replica_id for target in self.apps.all_targets()}
        for app in self.apps:
            if app.targets.fallback is not None:
                live.add(app.targets.fallback.replica_id)
        for router in self.routers():
            live.update(f"router:{host}:{port}" for host, port in router.pools())
        return live

    def _router_counts(self) -> tuple[int, list[tuple[str, str, bool, int]]]:
        truncations, calls = 0, []
        for app in self.apps:
            router = app.router
            if router is not None:
                truncations += router.truncations
                calls += [(app.name, f"{host}:{port}", router.is_local((host, port)), sent)
                          for (host, port), sent in router.sent.items()]
        return truncations, calls

    # -- lifecycle
    async def start(self, sock: socket.socket | None = None) -> None:
        self.state.loop = loop = asyncio.get_running_loop()
        config, state, relay = self.config, self.state, self.relay
        # Raise the fd limit and accept no more clients than it holds: past that, a clean 503 (process/limits.py).
        state.max_connections = connection_cap(config.max_connections)
        state.pump = start_pump(loop, config.coalesce_ms / 1000, config.coalesce_min_streams) \
            if config.native_relay else None

        refusals = Refusals(self.metrics)
        why = "max_connections" if state.max_connections >= config.max_connections else "fd_limit"
        # Accepted, but connection_made not run yet (it is deferred a loop turn, and over TLS until the handshake
        # is done): counted against the cap too, or a burst of accepts (or of handshakes) would overshoot it. A
        # handshake that fails drops its protocol, which then leaves this set by itself.
        unmade: weakref.WeakSet[ClientConnection] = weakref.WeakSet()
        collected_at = 0.0

        def waiting() -> int:
            for conn in [conn for conn in unmade if getattr(conn, "transport", None) is not None]:
                unmade.discard(conn)
            return len(unmade)

        def protocol() -> ClientConnection | Refusal:
            # Decided at accept: a client past the cap gets a 503 it can read (process/refusal.py).
            nonlocal collected_at
            if len(state.connections) + waiting() >= state.max_connections:
                if unmade and time.monotonic() - collected_at > 1.0:
                    # A protocol whose handshake failed is in a cycle with its parser: it leaves the set only when
                    # collected. At the cap, at most once a second, collect before refusing anyone.
                    collected_at = time.monotonic()
                    gc.collect()
                if len(state.connections) + waiting() >= state.max_connections:
                    return refusals.new(why, len(state.connections), state.max_connections)
            conn = ClientConnection(config, state, relay)
            unmade.add(conn)
            return conn

        # A TLS handshake is part of sending the request head: a stalled one is cut at header_timeout_s.
        # Closing a TLS connection waits for the peer's close_notify, which an idle pooled client never sends:
        # bound that wait (it also bounds flushing the tail of a `connection: close` answer).
        tls: dict[str, Any] = {} if self.tls is None else {"ssl": self.tls.context,
                                           "ssl_handshake_timeout": self.config.header_timeout_s,
                                           "ssl_shutdown_timeout": TLS_SHUTDOWN_TIMEOUT_S}
        if sock is not None:
            self._server = await loop.create_server(protocol, sock=sock, backlog=4096, **tls)
        else:
            self._server = await loop.create_server(
                protocol, self.config.host, self.config.port, backlog=4096,
                reuse_port=self.config.workers > 1 or None, **tls,
            )
        if self.config.admin_port:
            self.admin_state.loop = loop
            admin_state, admin_relay = self.admin_state, AdminListener(self.admin, self.admin_state)
            try:
                self._admin_server = await loop.create_server(
                    lambda: ClientConnection(config, admin_state, admin_relay),  # type: ignore[arg-type]
                    self.config.admin_host, self.config.admin_port, reuse_port=self.config.workers > 1 or None)
            except OSError as exc:
                self._server.close()
                raise ConfigError(f"cannot listen on admin {self.config.admin_host}:{self.config.admin_port}: "
                                  f"{exc.strerror}") from None
        # Installed before we serve: an early SIGHUP must reload, never kill (its default action).
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.health.start()
        if self.engines is not None:
            self.engines.start()
        if self.models is not None:
            self.models.start()
        self._sweeper = loop.create_task(self._sweep())
        self.state.serving = True

    def reload(self) -> None:
        """SIGHUP: new keys and certificate for new requests and handshakes; nothing open is dropped."""
        if self.door is not None:
            self.door.reload()
        if self.tls is not None:
            try:
                self.tls.reload()
                log.info("TLS certificate reloaded from %s", self.tls.cert)
            except TlsError as exc:
                log.error("TLS certificate not reloaded, the previous one stays: %s", exc)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        """Timeouts at 100 ms granularity: one timer for all connections, instead of timers per request."""
        tick = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            tick += 1
            try:
                self._sweep_once(time.monotonic(), expire_pools=tick % 4 == 0)
            except Exception:  # the sweeper must outlive any bug, or no timeout would ever fire again
                log.exception("sweep failed")

    def _sweep_once(self, now: float, expire_pools: bool) -> None:
        self.access_log.flush()
        if self._usage_saved + USAGE_SAVE_S <= now:
            self._usage_saved = now
            self.usage.save()
        if self.admission is not None:
            self.admission.expire(now)
        routers = self.routers()
        for router in routers:
            router.expire(now)
        for conn in list(self.state.connections):
            conn.check_timeouts(now)
        for conn in list(self.admin_state.connections):
            conn.check_timeouts(now)
        if expire_pools:
            for router in routers:
                router.expire_idle()
            for target in self.apps.all_targets():
                if target.pool is not None:
                    target.pool.expire()

    async def drain(self) -> None:
        """SIGTERM: report unready at once, keep accepting for the minimum draining period (a load balancer needs
        a few failed checks of /-/ready before it stops sending), then stop accepting and let the requests in flight
        finish, uploads included, for at most `drain_timeout_s` more (HAProxy's hard-stop-after)."""
        state, config = self.state, self.config
        if state.draining:
            return
        state.draining = True  # /-/ready answers 503; every answer from now on closes its connection
        log.info("draining: /-/ready answers 503; accepting for %.1f s more, then finishing what is in flight "
                 "(at most %.1f s more)", config.min_draining_s, config.drain_timeout_s)
        if config.min_draining_s > 0:
            # A minimum, whatever is in flight: new clients are served (with `connection: close`) until it ends.
            await asyncio.sleep(config.min_draining_s)
        if self._server is not None:
            self._server.close()
        log.info("draining: stopped accepting; %d connections, %d requests in flight", len(state.connections),
                 state.in_flight)
        for conn in list(state.connections):
            # Idle keep-alive: nothing is lost by closing it now. A connection in the middle of sending a request
            # (head or body: in_head until the message is complete) is not idle: its request is served.
            if conn.current is None and not conn.pending and not conn.in_head:
                # Over TLS nothing is left to flush either, and a graceful close would wait on a close_notify the
                # idle client never sends: close at once.
                if self.tls is not None:
                    conn.transport.abort()
                else:
                    conn.transport.close()
        if state.connections:
            state.all_closed.clear()  # it may have been set during the minimum period, before later clients came
            try:
                await asyncio.wait_for(state.all_closed.wait(), config.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timeout: closing %d connections with requests in flight", len(state.connections))
                for conn in list(state.connections):
                    tunnel = getattr(conn, "tunnel", None)  # a WebSocket tunnel: both of its ends go
                    if tunnel is not None:
                        tunnel.abort("drain")
                    else:
                        conn.transport.abort()

    async def close(self) -> None:
        self.state.serving = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.health.stop()
        if self.engines is not None:
            await self.engines.stop()
        if self.models is not None:
            await self.models.close()
        for router in self.routers():
            router.close()
        for target in self.apps.all_targets():
            if target.pool is not None:
                target.pool.close()
        if self._server is not None:
            self._server.close()
        if self.state.pump is not None:
            asyncio.get_running_loop().remove_reader(self.state.pump.fileno())
        if self._admin_server is not None:
            self._admin_server.close()
            for conn in list(self.admin_state.connections):
                conn.transport.close()
        self.access_log.close()
        self.usage.save()
        if self.tracer is not None:
            # The SDK's flush blocks (HTTP in its thread): off the loop, and bounded.
            await asyncio.to_thread(self.tracer.close)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and close. Exit status 0 on a clean drain."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.drain()
        await self.close()
