"""The relay: runs the attempts at answering a request, and the policies after a failure.

Per request: admission (`dispatch`), then one Exchange per attempt (exchange.py): route (the
choice itself is target_choice.py's), take a pooled replica connection or connect, write the
request, return. The response then flows through UpstreamConnection -> Exchange -> client
transport with no coroutine per chunk. After a failure the exchange asks the policies here:
before the response head a request is retried once (a stale pooled connection is resent on a
fresh one); after it, a stream planned for resume (resume.py) continues on another replica.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.controlplane.targets import Target
from gateway.dataplane.exchange import Client, Exchange, Outcome, Phase
from gateway.dataplane.forwarding import build_head, decision_headers
from gateway.dataplane.pumping import resume_as_pumped
from gateway.dataplane.reasons import GatewayError, Reason
from gateway.dataplane.request import Request
from gateway.dataplane.responses import Affinity
from gateway.dataplane.resume import COMPLETIONS, plan
from gateway.dataplane.target_choice import TargetChoice
from router_client import Decision, RouterError

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.controlplane.apps import App, AppTable
    from gateway.dataplane.admission import Admission
    from gateway.dataplane.state import ServerState


# The gateway's own /-/ endpoints: given a parsed request, answer it through the connection.
InternalEndpoints = Callable[[Client, Request], Coroutine[None, None, None]]

log = logging.getLogger("gateway.relay")

_ROUTER_REASONS = {reason.value: reason for reason in Reason}
# No router could decide (none reachable, none in time, the last one answered 5xx: nothing was sent to a replica
# yet), as opposed to a router's 4xx (about the request) or nonsense: --router-fallback applies.
# Read through a module name: an Enum member off its class costs ~5x a global (CPython 3.11; as exchange.py).
_DONE = Phase.DONE
_FALLBACK_REASONS = frozenset((Reason.ROUTER_UNREACHABLE.value, Reason.ROUTER_TIMEOUT.value))
# A connect that fails for want of a local resource says nothing about the replica: local overload.
_LOCAL_EXHAUSTION = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL))


class Relay:
    def __init__(self, config: "Config", state: "ServerState", apps: "AppTable",
                 internal: InternalEndpoints, mark_down: Callable[[Target], None],
                 list_models: Callable[[], bytes] | None = None,
                 replica_failed: Callable[[Target], None] = lambda target: None):
        self.config = config
        self.state = state
        self.apps = apps
        self.by_model = config.route_by_model and list_models is not None
        self.list_models = list_models
        self.metrics = state.metrics
        self.choice = TargetChoice(config, apps, state.metrics, self.by_model)
        self.internal = internal
        # Passive health: traffic that finds a replica unreachable tells the health checker.
        self.mark_down = mark_down
        # Passive outlier ejection: every request that fails on a replica is reported (never a success).
        self.outlier_failed = replica_failed
        # Responses API affinity: a random secret still pins follow-ups that come back to this gateway process.
        self.affinity = Affinity(config.cluster_secret.encode() or os.urandom(32)) \
            if config.responses_affinity else None
        # Admission under overload (admission.py), set by the server when configured: POSTs to a saturated app
        # wait in its queue (their exchange in ROUTING), and are routed (`route_in`) when they leave it.
        self.admission: Admission | None = None
        # When no router answers: off, proxy (the app's fallback Serve proxy) or least-loaded (config.py).
        self.router_fallback = config.router_fallback_mode

    # -- a request arrives (ClientConnection calls this once per request, in order)
    def dispatch(self, client: Client, request: Request) -> None:
        """Admission, then the first attempt. Hook point for an admission queue: before `attempt`."""
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
            # Counted from dispatch (exchange.py): requests waiting for the router or a connect count too.
            client.respond_error(Reason.OVERLOADED, "too many requests in flight", retry_after_s=1)
            return
        if self.by_model and request.method == b"GET" and request.path == b"/v1/models":
            assert self.list_models is not None
            client.respond(200, [(b"content-type", b"application/json")], self.list_models())
            return
        if self.config.resume_limit:
            planned = plan(request.method, request.path, request.url, request.version, request.body,
                           self.config.resume_limit)
            request.resume, request.resume_refused = planned.stream, planned.refused
            if planned.upstream_body is not None:
                request.upstream_body = planned.upstream_body
        if self.affinity is not None and request.url.find(b"/v1/responses") >= 0:  # find: see response_head.Framing
            request.affinity = self.affinity.plan(request.method, request.path, request.body)
        self.attempt(client, request, None)

    def attempt(self, client: Client, request: Request, failed: Target | None) -> Exchange:
        """A new exchange for `request` (the first, a retry or a resume), routed."""
        exchange = Exchange(self, client, request, failed)
        self.route(exchange)
        return exchange

    # -- ROUTING
    def route(self, exchange: Exchange) -> None:
        request = exchange.request
        try:
            app = self.choice.app_for(request)
        except GatewayError as exc:
            self.fail(exchange, exc)
            return
        admission = self.admission
        if admission is not None and request.admission is None and request.method == b"POST" \
                and not admission.admit(exchange.client, request, app):
            return  # it waits for room; admission calls route_in when it leaves the queue (or answers 429)
        self._route_in(exchange, app)

    def route_in(self, client: Client, request: Request, app: "App", failed: Target | None) -> None:
        """Admission's way back in: the request left the queue, route it within `app`."""
        exchange = client.exchange
        if exchange is None or exchange.request is not request or exchange.done:
            return  # its client left meanwhile
        self._route_in(exchange, app)

    def _route_in(self, exchange: Exchange, app: "App") -> None:
        """The replica within the app: its router decides POSTs; the rest go least-loaded."""
        request = exchange.request
        targets = app.targets
        affinity = request.affinity
        if affinity is not None and affinity.pinned is not None:
            # The replica that stored the response is the only one that can continue it (responses.py).
            target = targets.get(affinity.pinned)
            if target is None:
                self.fail(exchange, GatewayError(Reason.RESPONSE_REPLICA_GONE))
                return
            self.connect(exchange, target, b"")
            return
        if not targets.targets and targets.fallback is not None:
            # Scaled to zero: only the fallback Serve proxy can wake the app; the router would hang
            # (docs/ray-serve.md, "On one node: `gateway serve --ray-address`").
            self.connect(exchange, targets.fallback, b"")
            return
        if targets.routers and (request.method == b"POST" or request.upgrade is not None and request.session):
            started = time.monotonic()
            app.router.start(request.body, request.request_id, request.session, request.content_type,
                             lambda decision, error: self.on_decision(exchange, app, started, decision, error))
            return
        try:
            target = self.choice.least_loaded(app, request, exchange.failed)
        except GatewayError as exc:
            self.fail(exchange, exc)
            return
        self.connect(exchange, target, b"")

    def on_decision(self, exchange: Exchange, app: "App", started: float, decision: Decision | None,
                    error: RouterError | None) -> None:
        request = exchange.request
        request.router_s = time.monotonic() - started
        if exchange.phase is _DONE:
            return  # the client left while the router decided
        try:
            if error is not None:
                self.metrics.router_failed(error.reason, request.router_s)
                if self.router_fallback != "off" and (error.reason in _FALLBACK_REASONS or (
                        error.reason == "router_non_200" and (error.status or 500) >= 500)):
                    target = self.past_the_router(app, exchange.failed, error.reason)
                    if target is not None:
                        request.router_fallback = error.reason
                        self.connect(exchange, target, b"")
                        return
                reason = _ROUTER_REASONS[error.reason]
                if error.reason == "router_non_200" and error.status is not None and 400 <= error.status < 500:
                    raise GatewayError(reason, error.detail, status=error.status, body=error.body,
                                       content_type=error.content_type)
                raise GatewayError(reason, f"{reason.value}: {error.detail}")
            assert decision is not None
            self.metrics.router_ok(request.router_s)
            target = self.choice.target_for(app, decision, exchange.failed, request)
            extra = decision_headers(decision.request_headers)
            self.connect(exchange, target, extra)
        except GatewayError as exc:
            self.fail(exchange, exc)
        except Exception:  # a bug must cost one request, never the router connection it was called from
            log.exception("request %s failed unexpectedly", request.request_id.decode("latin-1"))
            self.fail(exchange, GatewayError(Reason.REPLICA_UNAVAILABLE, "internal gateway error", status=500))

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

    # -- CONNECTING
    def connect(self, exchange: Exchange, target: Target, extra_headers: bytes) -> None:
        per_replica = self.config.max_in_flight_per_replica
        if per_replica and target.in_flight >= per_replica:
            self.fail(exchange, GatewayError(Reason.OVERLOADED, f"replica {target.replica_id} is at its limit",
                                             status=429))
            return
        exchange.bind(target)
        request = exchange.request
        request.extra_headers = extra_headers
        conn = target.pool.take_idle()
        while conn is not None and conn.has_unread():
            conn.close()  # unsolicited bytes (or the replica's close) not read yet: never the next response
            conn = target.pool.take_idle()
        if conn is None:
            self.state.loop.create_task(self.connect_fresh(exchange))
            return
        conn.reused = True
        exchange.attach(conn, self.head_for(request, target))

    @staticmethod
    def head_for(request: Request, target: Target) -> bytes:
        affinity = request.affinity
        if affinity is not None:
            body = affinity.body_for(target.replica_id)  # the response id names this replica
            if body is not None:
                request.upstream_body = body
                request.upstream_head = b""
        head = request.upstream_head
        if not head:
            head = request.upstream_head = build_head(request, target)
        return head + request.extra_headers if request.extra_headers else head

    async def connect_fresh(self, exchange: Exchange) -> None:
        target = exchange.target
        assert target is not None
        pool = target.pool
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                conn = await pool.connect()
        except (OSError, TimeoutError) as exc:
            if exchange.end(Outcome.ANSWERED):
                self.connect_failed(exchange, exc)
            return
        self.metrics.connect_time(time.monotonic() - started)
        conn.reused = False
        if exchange.done:
            pool.put(conn)  # the client left while we connected: keep the connection for the next one
            return
        exchange.attach(conn, self.head_for(exchange.request, target))

    # -- policies after a failure (the exchange has ended and released everything when these run)
    def connect_failed(self, exchange: Exchange, exc: BaseException) -> None:
        target = exchange.target
        assert target is not None
        if isinstance(exc, OSError) and exc.errno in _LOCAL_EXHAUSTION:
            # Out of file descriptors or ports here: the replica is not at fault (no mark_down, no failure count).
            log.error("connect to replica %s failed for want of a local resource: %r", target.replica_id, exc)
            self.fail_with(exchange, Reason.OVERLOADED, "the gateway is out of a local resource", retry_after_s=1)
            return
        log.warning("connect to replica %s (%s) failed: %r", target.replica_id, target.address, exc)
        # Like HAProxy's `observe layer4`: a refused connect marks the replica down until health checks pass.
        self.mark_down(target)
        self.retry_or_fail(exchange, Reason.REPLICA_UNAVAILABLE)

    def failed_before_head(self, exchange: Exchange, why: str) -> None:
        conn, target = exchange.conn, exchange.target
        assert conn is not None and target is not None
        if why == "malformed":
            self.fail_with(exchange, Reason.UPSTREAM_MALFORMED, close=True)
            return
        if conn.reused and not conn.got_bytes:
            # A stale keep-alive connection, closed by the replica as we reused it: resend on a fresh one.
            self.metrics.retry("stale_connection")
            retry = Exchange(self, exchange.client, exchange.request, exchange.failed)
            retry.bind(target)
            self.state.loop.create_task(self.connect_fresh(retry))
            return
        self.retry_or_fail(exchange, Reason.REPLICA_UNAVAILABLE)

    def retry_or_fail(self, exchange: Exchange, reason: Reason) -> None:
        client, request, target = exchange.client, exchange.request, exchange.target
        assert target is not None
        if client.closed or client.current is not request:
            return
        self.replica_failed(target)
        if request.resume is not None and request.resume.replying:
            request.resume.failed.add(target)
        if request.retries < 1:
            request.retries += 1
            self.metrics.retry("replica_failed")
            self.attempt(client, request, target)
            return
        self.fail_with(exchange, reason, f"replica {target.replica_id} could not be reached")

    def stream_broke(self, exchange: Exchange, why: str) -> None:
        """The replica's part of a resumable stream ended early: continue it elsewhere, or cut it."""
        request, target = exchange.request, exchange.target
        resume = request.resume
        assert resume is not None and target is not None
        if why != "pump":  # the pump's own failure (pumping.py) is not the replica's: resume, but blame no one
            resume.failed.add(target)
            target.resumes_from += 1
            self.replica_failed(target)
        if resume.can_finish_here():
            resume.finish_here()  # only [DONE] was missing
            self.metrics.resume("resumed")
            exchange.client.finish(close=not request.keep_alive)
            return
        reason = resume.cannot_resume()
        if reason is not None:
            request.reason = Reason.GATEWAY_ERROR.value if why == "pump" else Reason.UPSTREAM_DIED.value
            self.cut(exchange, "failed" if reason == "limit" else "refused_" + reason)
            return
        request.reason = ""
        self.resume_on(exchange, target)

    def resume_on(self, exchange: Exchange, failed: Target) -> None:
        """A new attempt continuing the client's stream on another replica (never `failed`)."""
        request = exchange.request
        resume = request.resume
        assert resume is not None
        # Continue on /v1/completions, keeping an app's route prefix (multi-app routing may have put one
        # before the client's path); the router is asked again with the client's body and session.
        url = request.url
        request.upstream_url = (url[:len(url) - len(resume.url)] if url.endswith(resume.url) else b"") + COMPLETIONS
        request.upstream_body = resume.next_body()
        request.upstream_head = b""
        request.retries = 0
        request.resumes = resume.resumes
        log.info("request %s: replica %s %s; resuming (%d/%d)", request.request_id.decode("latin-1"),
                 failed.replica_id, "left the target set" if resume.outcome == "migrated" else "broke its stream",
                 resume.resumes, resume.limit)
        self.attempt(exchange.client, request, failed)

    # -- drain by migration
    def migrate_off(self, target: Target) -> int:
        """Drain by migration: move the resumable streams still on `target` (gone from its target set) to other
        replicas; returns how many moved. The others finish on their own connection, as before."""
        moved = 0
        for client in list(self.state.connections):
            exchange = getattr(client, "exchange", None)
            if exchange is not None and exchange.target is target and self.migrate(exchange):
                moved += 1
        if moved:
            log.info("replica %s left the target set: %d streams moved to other replicas", target.replica_id, moved)
        return moved

    def migrate(self, exchange: Exchange) -> bool:
        """Move one stream off its replica, which is leaving the target set: the client's stream goes on from
        another replica through resume, token-exact. False: not a stream that can move."""
        request, client, target = exchange.request, exchange.client, exchange.target
        conn = exchange.conn
        if conn is None or target is None or client.closed or not conn.head_sent or exchange.done:
            return False
        resume = request.resume
        if resume is None or not resume.replying or resume.done:
            return False
        pumped = conn.pumped  # the C pump relays the stream: `resume` learns what it sent only when it stops
        if pumped is not None and pumped.blocked:
            return False  # the pump holds bytes the client has not taken, which stopping it would drop: it stays
        if self._unmovable(resume if pumped is None else resume_as_pumped(resume, pumped)):
            return False  # it stays on the leaving replica until it ends, as on the Python path
        exchange.end(Outcome.ANSWERED)  # the leaving replica's engine stops generating for it now
        resume.failed.add(target)  # never back to it
        target.resumes_from += 1
        if resume.segment == 0 and resume.ident is None:
            # Only the head reached the client, no event (a request still queued in the leaving engine): the
            # original request goes to another replica, and its events start the client's stream.
            resume.outcome = "migrated"
            request.reason = ""
            request.retries = 0
            log.info("request %s: replica %s left the target set before its first event; sent to another",
                     request.request_id.decode("latin-1"), target.replica_id)
            self.attempt(exchange.client, request, target)
            return True
        if resume.can_finish_here():
            resume.finish_here()
            self.metrics.resume("migrated")
            client.finish(close=not request.keep_alive)
            return True
        resume.limit += 1  # a planned move does not spend the budget kept for replicas that die
        resume.outcome = "migrated"
        request.reason = ""
        self.resume_on(exchange, target)
        return True

    @staticmethod
    def _unmovable(resume: Any) -> bool:
        """Events went out but a resume could not continue them exactly (see resume.py's refusals)."""
        if resume.segment == 0 and resume.ident is None:
            return False  # nothing went out: the request can start over elsewhere
        return resume.cannot_resume() not in (None, "limit") and not resume.can_finish_here()

    def cut(self, exchange: Exchange, outcome: str) -> None:
        """A resumed stream that cannot go on: the client already has its head, so it can only be cut."""
        request = exchange.request
        self.metrics.resume(outcome)
        if not request.reason:
            request.reason = Reason.UPSTREAM_DIED.value
        request.keep_alive = False
        exchange.client.finish(close=True)

    def replica_failed(self, target: Target) -> None:
        """A request failed on this replica (connect, cut stream, engine error)."""
        self.metrics.replica_failure(target.replica_id)
        self.outlier_failed(target)

    # -- answering a failed attempt
    def fail(self, exchange: Exchange, exc: GatewayError) -> None:
        """End an attempt that has no response of its own and answer the client with `exc`."""
        if not exchange.end(Outcome.ANSWERED):
            return
        if exc.body is not None:
            client, request = exchange.client, exchange.request
            if client.closed or client.current is not request:
                return
            if request.resume is not None and request.resume.replying:
                self.cut(exchange, "failed")
                return
            # A router 4xx keeps its meaning: the client gets the router's status and body.
            request.reason = exc.reason.value
            headers = [(b"content-type", exc.content_type or b"application/json"),
                       (b"x-serve-reason", exc.reason.value.encode())]
            client.respond(exc.status or 400, headers, exc.body)
            return
        retry_after = 1 if exc.reason in (Reason.OVERLOADED, Reason.NO_REPLICAS) else None
        self.fail_with(exchange, exc.reason, exc.message, status=exc.status, retry_after_s=retry_after)

    def fail_with(self, exchange: Exchange, reason: Reason, message: str | None = None, *, status: int | None = None,
                  retry_after_s: int | None = None, close: bool = False) -> None:
        """Answer an ended attempt's client with an error (or cut a resumed stream that has its head)."""
        client, request = exchange.client, exchange.request
        if client.closed or client.current is not request:
            return
        if request.resume is not None and request.resume.replying:
            request.reason = request.reason or reason.value
            self.cut(exchange, "failed")
            return
        client.respond_error(reason, message, status=status, retry_after_s=retry_after_s, close=close)
