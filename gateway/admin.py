"""The gateway's own endpoints under /-/, served by a Starlette app.

They are off the hot path, so they get a real framework; `serve()` runs the ASGI
app for one request parsed by ClientConnection and writes its (small, non-streamed)
answer back through the same connection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.errors import Reason, error_response
from gateway.request import Request

log = logging.getLogger("gateway.admin")

if TYPE_CHECKING:
    from gateway.client import ClientConnection
    from gateway.server import Gateway


class Admin:
    def __init__(self, gateway: "Gateway"):
        self.gw = gateway
        self.app = Starlette(routes=[
            Route("/-/healthz", self.healthz),
            Route("/-/ready", self.ready),
            Route("/-/routes", self.routes),
            Route("/-/metrics", self.metrics),
        ])
        self.app.add_exception_handler(404, self.not_found)

    async def healthz(self, request: StarletteRequest) -> Response:
        # Alive means the event loop answers; it never depends on replicas (like HAProxy's frontend check).
        return PlainTextResponse("success")

    async def ready(self, request: StarletteRequest) -> Response:
        if self.gw.draining:
            return error_response(Reason.DRAINING)
        if not self.gw.serving:
            return error_response(Reason.NO_REPLICAS, "the gateway has not started serving yet")
        # An unstarted or broken replica does not make the gateway unready: it answers for them with an error.
        return JSONResponse({"status": "ready", "mode": self.gw.config.mode,
                             "targets": len(self.gw.targets), "healthy": len(self.gw.targets.healthy())})

    async def routes(self, request: StarletteRequest) -> Response:
        body = self.gw.targets.describe()
        body["in_flight"] = self.gw.in_flight
        body["connections"] = len(self.gw.connections)
        body["pid"] = os.getpid()  # which worker answered, with --workers
        return Response(orjson.dumps(body), media_type="application/json")

    async def metrics(self, request: StarletteRequest) -> Response:
        return Response(self.gw.metrics.render(self.gw.refresh_gauges), media_type=self.gw.metrics.content_type)

    async def not_found(self, request: StarletteRequest, exc: Exception) -> Response:
        return error_response(Reason.NOT_FOUND, f"no gateway endpoint {request.url.path}")

    async def serve(self, client: "ClientConnection", request: Request) -> None:
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
