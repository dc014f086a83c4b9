"""The gateway's own endpoints under /-/, served by a Starlette app.

They are off the hot path, so they get a real framework; `serve()` runs the ASGI
app for one request parsed by ClientConnection and writes its (small, non-streamed)
answer back through the same connection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.config import Config, ReplicaSpec
from gateway.controlplane.apps import App, AppTable
from gateway.dataplane.reasons import Reason, error_response
from gateway.dataplane.request import Request
from gateway.dataplane.state import ServerState
from gateway.observability.metrics import Metrics

log = logging.getLogger("gateway.admin")

if TYPE_CHECKING:
    from gateway.dataplane.relay import Client


class Admin:
    def __init__(self, config: Config, state: ServerState, apps: AppTable, metrics: Metrics,
                 refresh_gauges: Callable[[Metrics], None]):
        self.config = config
        self.state = state
        self.apps = apps
        self.metrics = metrics
        self.refresh_gauges = refresh_gauges
        self.app = Starlette(routes=[
            Route("/-/healthz", self.healthz),
            Route("/-/ready", self.ready),
            Route("/-/routes", self.routes),
            Route("/-/metrics", self.prometheus),
            Route("/-/usage", self.usage_report),
            Route("/-/replicas/{replica_id}/drain", self.drain_replica, methods=["POST"]),
        ])
        self.usage: Any = None  # observability.usage.UsageBook, set by the process
        self.door: Any = None  # security.door.FrontDoor when configured
        self.app.add_exception_handler(404, self.not_found)

    async def healthz(self, request: StarletteRequest) -> Response:
        # Alive means the event loop answers; it never depends on replicas (like HAProxy's frontend check).
        return PlainTextResponse("success")

    async def ready(self, request: StarletteRequest) -> Response:
        if self.state.draining:
            return error_response(Reason.DRAINING)
        if not self.state.serving:
            return error_response(Reason.NO_REPLICAS, "the gateway has not started serving yet")
        # An unstarted or broken replica does not make the gateway unready: it answers for them with an error.
        targets = self.apps.all_targets()
        return JSONResponse({"status": "ready", "mode": self.config.mode, "apps": len(self.apps),
                             "targets": len(targets), "healthy": sum(1 for t in targets if t.healthy)})

    @staticmethod
    def describe_app(app: App) -> dict[str, object]:
        body = app.targets.describe()
        router = app.router
        body["routers"] = [{"address": f"{host}:{port}", "local": bool(router and router.is_local((host, port))),
                            "calls": router.sent.get((host, port), 0) if router else 0}
                           for host, port in app.targets.routers]
        return {"name": app.name, "prefix": app.prefix, "models": list(app.models), **body}

    async def routes(self, request: StarletteRequest) -> Response:
        apps = [self.describe_app(app) for app in self.apps]
        # Top level: every app's targets and routers together (one app: exactly that app), then the apps.
        fallback = next((app["fallback"] for app in apps if app["fallback"]), None)
        body: dict[str, object] = {
            "routers": [r["address"] for app in apps for r in app["routers"]],  # type: ignore[attr-defined]
            "local_routers": [r["address"] for app in apps for r in app["routers"]  # type: ignore[attr-defined]
                              if r["local"]],
            "targets": [t for app in apps for t in app["targets"]],  # type: ignore[attr-defined]
            "fallback": fallback,
            "routes": self.apps.routes(),
            "apps": apps,
        }
        body["in_flight"] = self.state.in_flight
        body["connections"] = len(self.state.connections)
        body["pid"] = os.getpid()  # which worker answered, with --workers
        return Response(orjson.dumps(body), media_type="application/json")

    async def prometheus(self, request: StarletteRequest) -> Response:
        return Response(self.metrics.render(self.refresh_gauges), media_type=self.metrics.content_type)

    async def usage_report(self, request: StarletteRequest) -> Response:
        """Tokens per key and model: since start, this UTC minute, this UTC day (and each key's budgets)."""
        door = self.door
        if door is not None and door.needs_key and request.scope.get("gateway.key") is None:
            # Also on the admin listener, which checks no key for its other endpoints: usage is per customer.
            header = request.headers.get("authorization")
            if door.authenticate(header.encode("latin-1") if header else None) is None:
                return error_response(Reason.UNAUTHORIZED)
        body = self.usage.report() if self.usage is not None else {"keys": {}}
        body["pid"] = os.getpid()
        if door is not None:
            body["budgets"] = door.budgets()
        return Response(orjson.dumps(body), media_type="application/json")

    async def drain_replica(self, request: StarletteRequest) -> Response:
        """Take a replica out of its app's target set, as a Serve scale-down does: no new request goes to it, and
        with --resume-limit its streams move to other replicas after --drain-migrate-after-s (drain by migration).
        Only on the --admin-port listener: it changes where traffic goes. Ray discovery puts a replica Serve still
        has back at its next update."""
        if not request.scope.get("gateway.admin"):
            return error_response(Reason.NOT_FOUND, "draining a replica is served on the --admin-port listener only")
        replica_id = request.path_params["replica_id"]
        for app in self.apps:
            target = app.targets.get(replica_id)
            if target is not None:
                in_flight = target.in_flight
                app.targets.replace([ReplicaSpec(t.replica_id, t.host, t.port) for t in app.targets.targets
                                     if t is not target])
                return JSONResponse({"replica_id": replica_id, "app": app.name, "in_flight": in_flight,
                                     "migrate_after_s": self.config.drain_migrate_after_s
                                     if self.config.resume_limit else None})
        return error_response(Reason.NOT_FOUND, f"no replica {replica_id!r} in any app's target set")

    async def not_found(self, request: StarletteRequest, exc: Exception) -> Response:
        return error_response(Reason.NOT_FOUND, f"no gateway endpoint {request.url.path}")

    async def serve(self, client: "Client", request: Request) -> None:
        path, _, query = request.url.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": request.version,
            "method": request.method.decode("latin-1"),
            "scheme": "http",
            "path": path.decode("latin-1"),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": [(name.lower(), value) for name, value in request.headers],
            "client": None,
            "server": None,
            "app": self.app,
            "gateway.key": request.key,  # matched by the public listener's front door (None on the admin listener)
            "gateway.admin": client.state is not self.state,  # came in on the --admin-port listener
        }
        sent_body = False
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        body: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        try:
            await self.app(scope, receive, send)
        except Exception:  # Starlette has already produced its 500; it re-raises for the server to log
            log.exception("gateway endpoint %s failed", scope["path"])
        if not client.closed and client.current is request:
            for name, value in headers:
                if name == b"x-serve-reason":
                    request.reason = value.decode("latin-1")
            client.respond(status, headers, b"".join(body))


class AdminListener:
    """The dispatcher of the --admin-port listener: every /-/ endpoint, nothing relayed, no key needed.

    It stands where the Relay stands for the public listener (ClientConnection calls `dispatch`);
    it never opens a replica connection, so `exchange_ended` never has work to do.
    """

    def __init__(self, admin: Admin, state: ServerState):
        self.admin = admin
        self.state = state

    def dispatch(self, client: "Client", request: Request) -> None:
        if request.url.startswith(b"/-/"):
            self.state.loop.create_task(self.admin.serve(client, request))
            return
        client.respond_error(Reason.NOT_FOUND, "the admin listener serves only the gateway's /-/ endpoints")

    def exchange_ended(self, conn: object) -> None:
        pass
