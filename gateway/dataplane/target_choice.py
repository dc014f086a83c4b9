"""Which app and which replica a request goes to: the choice, not the running of the attempt.

The app by path (or by the body's `model` with --route-by-model); then the replica: the app's
router decides POSTs (relay.py asks it), the rest go to the least loaded replica. A router's
decision is accepted only when it names a known target (`target_for`): the SSRF boundary, a
request never reaches an address outside the TargetSet.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson

from gateway.controlplane.targets import Target
from gateway.dataplane.reasons import GatewayError, Reason
from router_client import Decision

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.controlplane.apps import App, AppTable
    from gateway.dataplane.request import Request
    from gateway.observability.metrics import Metrics

log = logging.getLogger("gateway.relay")


class TargetChoice:
    def __init__(self, config: "Config", apps: "AppTable", metrics: "Metrics", by_model: bool):
        self.apps = apps
        self.metrics = metrics
        # --route-by-model: the one option that parses request bodies (a POST's JSON `model` picks the app).
        self.by_model = by_model
        # Ray mode: a decision naming a replica not discovered yet goes to the fallback proxy, as in Ray's Lua.
        self.pin_miss_to_fallback = config.mode == "ray"

    def app_for(self, request: "Request") -> "App":
        """The app serving this request; GatewayError when none does."""
        app = None
        if self.by_model and request.method == b"POST":
            app = self.app_by_model(request)
        app = app or self.apps.single or self.apps.match(request.url)
        if app is None:
            raise GatewayError(Reason.NOT_FOUND, "no application serves this path")
        return app

    def app_by_model(self, request: "Request") -> "App | None":
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

    def least_loaded(self, app: "App", request: "Request", failed: Target | None) -> Target:
        targets = app.targets
        if request.resume is not None and request.resume.replying:
            # Resuming: never a replica that already failed this stream.
            target = targets.least_loaded(exclude=failed, avoid=request.resume.failed)
        else:
            target = targets.least_loaded(exclude=failed) or (None if failed is None else targets.least_loaded())
        if target is None:
            raise GatewayError(Reason.NO_REPLICAS)
        return target

    def target_for(self, app: "App", decision: Decision, failed: Target | None,
                   request: "Request | None" = None) -> Target:
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
