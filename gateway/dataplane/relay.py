"""The relay: for each request, pick a replica (asking the router for POSTs) and start the exchange.

Per request: route, take a pooled replica connection (or connect), write the request,
return. The response then flows through UpstreamConnection/ClientConnection callbacks
with no coroutine per chunk. Failures before the response head are retried once; a
request never reaches an address outside the TargetSet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Protocol

import orjson

from gateway.controlplane.targets import Target
from gateway.dataplane.reasons import GatewayError, Reason
from gateway.dataplane.request import Request
from gateway.dataplane.responses import Affinity
from gateway.dataplane.resume import COMPLETIONS, plan
from gateway.dataplane.upstream import Downstream, UpstreamConnection
from router_client import Decision, RouterError

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.dataplane.admission import Admission
    from gateway.controlplane.apps import App, AppTable
    from gateway.dataplane.state import ServerState


class Client(Downstream, Protocol):
    """What the relay uses of the client connection that handed it a request."""
    closed: bool
    upstream: UpstreamConnection | None
    idle_reads: int
    first_byte_deadline: float

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *,
                close: bool = False) -> None: ...

    def respond_error(self, reason: Reason, message: str | None = None, *, status: int | None = None,
                      retry_after_s: int | None = None, close: bool = False) -> None: ...


# The gateway's own /-/ endpoints: given a parsed request, answer it through the connection.
InternalEndpoints = Callable[[Client, Request], Coroutine[None, None, None]]

log = logging.getLogger("gateway.relay")

_ROUTER_REASONS = {reason.value: reason for reason in Reason}
# No router answered at all (as opposed to one that answered 4xx/5xx or nonsense): --router-fallback applies.
_FALLBACK_REASONS = frozenset((Reason.ROUTER_UNREACHABLE.value, Reason.ROUTER_TIMEOUT.value))


class Relay:
    def __init__(self, config: "Config", state: "ServerState", apps: "AppTable",
                 internal: InternalEndpoints, mark_down: Callable[[Target], None],
                 list_models: Callable[[], bytes] | None = None,
                 replica_failed: Callable[[Target], None] = lambda target: None):
        self.config = config
        self.state = state
        self.apps = apps
        # --route-by-model: the one option that parses request bodies (a POST's JSON `model` picks the app).
        self.by_model = config.route_by_model and list_models is not None
        self.list_models = list_models
        # Ray mode: a decision naming a replica not discovered yet goes to the fallback proxy, as in Ray's Lua.
        self.pin_miss_to_fallback = config.mode == "ray"
        self.metrics = state.metrics
        self.internal = internal
        # Passive health: traffic that finds a replica unreachable tells the health checker.
        self.mark_down = mark_down
        # Passive outlier ejection: every request that fails on a replica is reported (never a success).
        self.outlier_failed = replica_failed
        # Responses API affinity: a random secret still pins follow-ups that come back to this gateway process.
        self.affinity = Affinity(config.cluster_secret.encode() or os.urandom(32)) \
            if config.responses_affinity else None
        # Admission under overload (admission.py), set by the server when configured: POSTs to a saturated app
        # wait in its queue, and are routed (`route_in`) when they leave it.
        self.admission: Admission | None = None
        # When no router answers: off, proxy (the app's fallback Serve proxy) or least-loaded (config.py).
        self.router_fallback = config.router_fallback_mode

    def dispatch(self, client: "Client", request: Request) -> None:
        door = self.state.door
        if door is not None and not door.admit(client, request):
            return  # answered by the front door: no key, over a limit, a CORS preflight, an admin-only path
        if request.url.startswith(b"/-/"):
            self.state.loop.create_task(self.internal(client, request))
            return
        tracer = self.state.tracer
        if tracer is not None:
            tracer.start(request)
        limit = self.config.max_in_flight
        if limit and self.state.in_flight >= limit:
            client.respond_error(Reason.OVERLOADED, "too many requests in flight", retry_after_s=1)
            return
        if self.by_model and request.method == b"GET" and request.path == b"/v1/models":
            assert self.list_models is not None
            client.respond(200, [(b"content-type", b"application/json")], self.list_models())
            return
        if self.config.resume_limit:
            request.resume = plan(request, self.config.resume_limit)
        if self.affinity is not None and b"/v1/responses" in request.url:
            request.affinity = self.affinity.plan(request.method, request.path, request.body)
        self.route(client, request, None)

    def app_by_model(self, request: Request) -> "App | None":
        """The app serving the body's model, or None when the body names none (then the path decides)."""
        model = model_of(request.body)
        if model is None:
            return None
        app = self.apps.model_table.get(model)
        if app is None:
            raise GatewayError(Reason.MODEL_NOT_FOUND, f"The model `{model}` does not exist.")
        if not app.matches(request.path):
            # One base URL for every model: the replica serves its app under the app's route prefix.
            request.url = app.prefix_bytes + request.url
            request.upstream_head = b""
        return app

    def resume(self, client: "Client", request: Request, failed: Target) -> None:
        """Continue a broken stream: ask the router again (the client's body and session), on /v1/completions."""
        resume = request.resume
        assert resume is not None
        # Keep an app's route prefix (multi-app routing may have put one before the client's path).
        url = request.url
        request.upstream_url = (url[:len(url) - len(resume.url)] if url.endswith(resume.url) else b"") + COMPLETIONS
        request.upstream_body = resume.next_body()
        request.upstream_head = b""
        request.retries = 0
        request.resumes = resume.resumes
        log.info("request %s: replica %s broke its stream; resuming (%d/%d)", request.request_id.decode("latin-1"),
                 failed.replica_id, resume.resumes, resume.limit)
        self.route(client, request, failed)

    def migrate_off(self, target: Target) -> int:
        """Drain by migration: move the resumable streams still on `target` (gone from its target set) to other
        replicas; returns how many moved. The others finish on their own connection, as before."""
        moved = 0
        for client in list(self.state.connections):
            upstream = getattr(client, "upstream", None)
            if upstream is not None and upstream.target is target and client.migrate():  # type: ignore[attr-defined]
                moved += 1
        if moved:
            log.info("replica %s left the target set: %d streams moved to other replicas", target.replica_id, moved)
        return moved

    def replica_failed(self, target: Target) -> None:
        """A request failed on this replica (connect, cut stream, engine error)."""
        self.metrics.replica_failure(target.replica_id)
        self.outlier_failed(target)

    def route(self, client: "Client", request: Request, failed: Target | None) -> None:
        """Pick the app by path, then the replica: the app's router decides POSTs; the rest go least-loaded."""
        app = None
        if self.by_model and request.method == b"POST":
            try:
                app = self.app_by_model(request)
            except GatewayError as exc:
                self.fail(client, request, exc)
                return
        app = app or self.apps.single or self.apps.match(request.url)
        if app is None:
            self.fail(client, request, GatewayError(Reason.NOT_FOUND, "no application serves this path"))
            return
        admission = self.admission
        if admission is not None and request.admission is None and request.method == b"POST" \
                and not admission.admit(client, request, app):
            return  # it waits for room; admission calls route_in when it leaves the queue (or answers 429)
        self.route_in(client, request, app, failed)

    def route_in(self, client: "Client", request: Request, app: "App", failed: Target | None) -> None:
        """The replica within the app: its router decides POSTs; the rest go least-loaded."""
        targets = app.targets
        affinity = request.affinity
        if affinity is not None and affinity.pinned is not None:
            # The replica that stored the response is the only one that can continue it (responses.py).
            target = targets.get(affinity.pinned)
            if target is None:
                self.fail(client, request, GatewayError(Reason.RESPONSE_REPLICA_GONE))
                return
            self.connect_to(client, request, target, None)
            return
        if not targets.targets and targets.fallback is not None:
            # Scaled to zero: only the fallback Serve proxy can wake the app; the router would hang (ray-serve.md §e).
            self.connect_to(client, request, targets.fallback, None)
            return
        if targets.routers and (request.method == b"POST" or request.upgrade is not None and request.session):
            started = time.monotonic()
            app.router.start(request.body, request.request_id, request.session, request.content_type,
                             lambda decision, error: self.on_decision(client, request, app, failed, started, decision,
                                                                      error))
            return
        if request.resume is not None and request.resume.replying:
            # Resuming: never a replica that already failed this stream.
            target = targets.least_loaded(exclude=failed, avoid=request.resume.failed)
        else:
            target = targets.least_loaded(exclude=failed) or (None if failed is None else targets.least_loaded())
        if target is None:
            self.fail(client, request, GatewayError(Reason.NO_REPLICAS))
            return
        self.connect_to(client, request, target, None)

    def on_decision(self, client: "Client", request: Request, app: "App", failed: Target | None, started: float,
                    decision: Decision | None, error: RouterError | None) -> None:
        request.router_s = time.monotonic() - started
        if client.closed or client.current is not request:
            return
        try:
            if error is not None:
                self.metrics.router_failed(error.reason, request.router_s)
                if error.reason in _FALLBACK_REASONS and self.router_fallback != "off":
                    target = self.past_the_router(app, failed, error.reason)
                    if target is not None:
                        request.router_fallback = error.reason
                        self.connect_to(client, request, target, None)
                        return
                reason = _ROUTER_REASONS[error.reason]
                if error.reason == "router_non_200" and error.status is not None and 400 <= error.status < 500:
                    raise GatewayError(reason, error.detail, status=error.status, body=error.body,
                                       content_type=error.content_type)
                raise GatewayError(reason, f"{reason.value}: {error.detail}")
            assert decision is not None
            self.metrics.router_ok(request.router_s)
            target = self.target_for(app, decision, failed, request)
            self.connect_to(client, request, target, decision.request_headers or None)
        except GatewayError as exc:
            self.fail(client, request, exc)
        except Exception:  # a bug must cost one request, never the router connection it was called from
            log.exception("request %s failed unexpectedly", request.request_id.decode("latin-1"))
            self.fail(client, request, GatewayError(Reason.REPLICA_UNAVAILABLE, "internal gateway error", status=500))

    def past_the_router(self, app: "App", failed: Target | None, why: str) -> Target | None:
        """Where a request goes when no router answers (--router-fallback): the app's fallback Serve proxy in
        Ray mode (which picks through its own handle, as pin misses already go), else the least-loaded replica."""
        targets = app.targets
        target = targets.fallback if self.router_fallback == "proxy" else None
        if target is None:
            target = targets.least_loaded(exclude=failed) or (None if failed is None else targets.least_loaded())
        if target is not None:
            self.metrics.router_fallbacks.labels(app.name, why).inc()
        return target

    def target_for(self, app: "App", decision: Decision, failed: Target | None,
                   request: Request | None = None) -> Target:
        """The known target a decision names: the SSRF boundary (never an address we do not know)."""
        targets = app.targets
        target = targets.lookup(decision.replica_id, decision.host, decision.port)
        resume = request.resume if request is not None else None
        if target is None and resume is not None and resume.replying:
            # Resuming (a migration off a replica leaving the set, which the router may still name): any other one.
            target = targets.least_loaded(exclude=failed, avoid=resume.failed)
            if target is None:
                raise GatewayError(Reason.NO_REPLICAS, "no other replica to resume the stream on")
            return target
        if target is None:
            self.metrics.decision_mismatch("unknown_replica_id")
            if self.pin_miss_to_fallback and targets.fallback is not None:
                # The router's view is ahead of our long poll (a replica just started): Ray's Lua sends such a
                # request to the fallback Serve proxy, which picks again through its handle. So do we.
                self.metrics.pin_miss_fallbacks.labels(app.name).inc()
                log.info("router named %s, not discovered yet: app %r request goes to the fallback proxy",
                         decision.replica_id, app.name)
                return targets.fallback
            log.warning("router named %s at %s:%d, which is not a known target", decision.replica_id,
                        decision.host, decision.port)
            raise GatewayError(Reason.UNKNOWN_REPLICA_ID,
                               f"the router named replica {decision.replica_id!r}, which is not a known target")
        if target.replica_id != decision.replica_id:
            self.metrics.decision_mismatch("replica_id")  # accepted by its address (non-strict mode)
        elif (target.host, target.port) != (decision.host, decision.port):
            # We still connect only to the address we know for that replica.
            self.metrics.decision_mismatch("address")
        if resume is not None and resume.replying:
            if target is failed or target in resume.failed or not target.healthy or target.ejected:
                # A resume never goes back to a replica that failed this stream.
                other = targets.least_loaded(exclude=failed, avoid=resume.failed)
                if other is None:
                    raise GatewayError(Reason.NO_REPLICAS, "no other replica to resume the stream on")
                return other
            return target
        if target is failed or not target.healthy or target.ejected:
            # Like HAProxy's `option redispatch`: the pinned replica is down, serve elsewhere (breaks affinity).
            other = targets.least_loaded(exclude=target)
            if other is not None:
                self.metrics.retry("redispatch")
                return other
        return target

    def fail(self, client: "Client", request: Request, exc: GatewayError) -> None:
        if client.closed or client.current is not request:
            return
        if exc.body is not None:
            # A router 4xx keeps its meaning: the client gets the router's status and body.
            request.reason = exc.reason.value
            headers = [(b"content-type", exc.content_type or b"application/json"),
                       (b"x-serve-reason", exc.reason.value.encode())]
            client.respond(exc.status or 400, headers, exc.body)
            return
        retry_after = 1 if exc.reason in (Reason.OVERLOADED, Reason.NO_REPLICAS) else None
        client.respond_error(exc.reason, exc.message, status=exc.status, retry_after_s=retry_after)

    def connect_to(self, client: "Client", request: Request, target: Target,
                   extra_headers: dict[str, str] | None) -> None:
        per_replica = self.config.max_in_flight_per_replica
        if per_replica and target.in_flight >= per_replica:
            self.fail(client, request, GatewayError(Reason.OVERLOADED, f"replica {target.replica_id} is at its limit",
                                                    status=429))
            return
        conn = target.pool.take_idle()
        if conn is None:
            self.state.loop.create_task(self.connect_fresh(client, request, target, extra_headers))
            return
        conn.reused = True
        self.start_exchange(client, request, target, conn, extra_headers)

    async def connect_fresh(self, client: "Client", request: Request, target: Target,
                            extra_headers: dict[str, str] | None) -> None:
        pool = target.pool
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                conn = await pool.connect()
        except (OSError, TimeoutError) as exc:
            self.connect_failed(client, request, target, exc)
            return
        self.metrics.connect_time(time.monotonic() - started)
        conn.reused = False
        if client.closed or client.current is not request:
            pool.put(conn)
            return
        self.start_exchange(client, request, target, conn, extra_headers)

    def start_exchange(self, client: "Client", request: Request, target: Target,
                       conn: UpstreamConnection, extra_headers: dict[str, str] | None) -> None:
        affinity = request.affinity
        if affinity is not None:
            body = affinity.body_for(target.replica_id)  # the response id names this replica
            if body is not None:
                request.upstream_body = body
                request.upstream_head = b""
        head = request.upstream_head
        if not head:
            head = request.upstream_head = build_head(request, target)
        request.extra_headers = extra_headers
        if extra_headers:
            head = head + b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                                   for k, v in extra_headers.items())
        target.in_flight += 1
        self.state.exchange_started()
        request.replica_id = target.replica_id
        client.upstream = conn
        conn.meter = request.meter
        client.idle_reads = -1
        timeout = self.config.first_byte_timeout_s
        client.first_byte_deadline = time.monotonic() + timeout if timeout else 0.0
        conn.send(client, head + b"\r\n" + request.upstream_body, head_request=request.method == b"HEAD",
                  dechunk=request.version == "1.0", sink=request.resume)
        if client.writing_paused:
            conn.pause_reading()

    def exchange_ended(self, conn: UpstreamConnection) -> None:
        conn.stop_pump()  # counts what the pump relayed; a pumped stream ending here is being cut
        client = conn.client
        if client is not None and client.current is not None:
            client.current.bytes_out += conn.bytes_in
            if conn.reads > 2:  # a stream, not a one-read answer
                self.metrics.stream_gap(conn.target.replica_id, conn.max_gap)
        conn.target.in_flight -= 1
        self.state.exchange_ended()

    def connect_failed(self, client: "Client", request: Request, target: Target, exc: BaseException) -> None:
        log.warning("connect to replica %s (%s) failed: %r", target.replica_id, target.address, exc)
        # Like HAProxy's `observe layer4`: a refused connect marks the replica down until health checks pass.
        self.mark_down(target)
        self.retry_or_fail(client, request, target, Reason.REPLICA_UNAVAILABLE)

    def upstream_failed_before_head(self, client: "Client", request: Request, conn: UpstreamConnection,
                                    why: str) -> None:
        target = conn.target
        if why == "malformed":
            client.respond_error(Reason.UPSTREAM_MALFORMED, close=True)
            return
        if conn.reused and not conn.got_bytes:
            # A stale keep-alive connection, closed by the replica as we reused it: resend on a fresh one.
            self.metrics.retry("stale_connection")
            self.state.loop.create_task(self.connect_fresh(client, request, target, request.extra_headers))
            return
        self.retry_or_fail(client, request, target, Reason.REPLICA_UNAVAILABLE)

    def retry_or_fail(self, client: "Client", request: Request, target: Target, reason: Reason) -> None:
        if client.closed or client.current is not request:
            return
        self.replica_failed(target)
        if request.resume is not None and request.resume.replying:
            request.resume.failed.add(target)
        if request.retries < 1:
            request.retries += 1
            self.metrics.retry("replica_failed")
            self.route(client, request, target)
            return
        client.respond_error(reason, f"replica {target.replica_id} could not be reached")


def build_head(request: Request, target: Target) -> bytes:
    """The request head for the replica, without the final CRLF (the router may add headers)."""
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method, request.upstream_url or request.url)]
    parts.extend([b"%s: %s\r\n" % header for header in request.headers])
    if not request.has_host:
        parts.append(b"host: %s\r\n" % target.address.encode())
    parts.append(b"x-request-id: %s\r\n" % request.request_id)
    if request.upgrade is not None:
        parts.append(b"connection: upgrade\r\nupgrade: %s\r\n" % request.upgrade)
    if request.upstream_body or request.method in (b"POST", b"PUT", b"PATCH"):
        parts.append(b"content-length: %d\r\n" % len(request.upstream_body))
    return b"".join(parts)


def model_of(body: bytes) -> str | None:
    """The `model` of a JSON object body, or None (not JSON, not an object, no string model)."""
    if not body or body[:64].lstrip()[:1] != b"{":
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None
