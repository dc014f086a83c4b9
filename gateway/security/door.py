"""The front door: what every public request passes before the relay routes it.

API keys (401 / 403 / 429), the split of /-/ endpoints between the public and the
admin listener, CORS, and the Authorization header replicas expect. The data plane
holds one of these only when one of those features is configured (`Config.front_door`),
so a gateway without them runs exactly the code it ran before.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import orjson

from gateway.config import Config
from gateway.dataplane.reasons import Reason, error_response
from gateway.dataplane.request import Request
from gateway.security.cors import Cors
from gateway.security.budgets import TokenBudget
from gateway.security.keys import ApiKey, KeyRing, KeysError, load_keys
from gateway.observability.usage import StreamMeter, UsageBook, ask
from gateway.security.limits import KeyStates

if TYPE_CHECKING:
    from gateway.dataplane.relay import Client

log = logging.getLogger("gateway.security")

# The public listener's own endpoints that load balancers and probes call without a key.
_OPEN_PATHS = frozenset((b"/-/healthz", b"/-/ready"))
_BEARER = b"bearer "


def _error(reason: Reason, message: str | None = None, *, retry_after_s: int | None = None,
           extra: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    response = error_response(reason, message, retry_after_s=retry_after_s)
    return response.status_code, response.raw_headers + list(extra), bytes(response.body)


class FrontDoor:
    def __init__(self, config: Config, usage: UsageBook | None = None):
        self.config = config
        self.keys: KeyRing = load_keys(config.api_key, config.api_keys_file)
        self.usage = usage
        self.accounting = config.counts_tokens
        # What each key name has used: outlives reloads (a request gives back to the state it took from).
        self.states = KeyStates(config.token_minute_s, usage.day_tokens if usage is not None else lambda name: 0)
        self.states.attach(self.keys.keys)
        self.cors = Cors(config.cors_origins, config.session_header) if config.cors_origins else None
        self.admin_elsewhere = bool(config.admin_port)
        self.upstream_auth = (b"authorization", b"Bearer " + config.upstream_api_key.encode("latin-1")) \
            if config.upstream_api_key else None
        # The client's Authorization is ours to check, never the replica's to see; with CORS on, the
        # browser's Origin is ours too (see cors.py).
        drop = set()
        if self.keys or self.upstream_auth:
            drop.add(b"authorization")
        if self.cors is not None:
            drop.add(b"origin")
        self.drop = frozenset(drop)
        self._unauthorized = _error(Reason.UNAUTHORIZED, extra=((b"www-authenticate", b"Bearer"),))

    def drop_set(self, base: frozenset[bytes]) -> frozenset[bytes]:
        return base | self.drop

    @property
    def needs_key(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: bytes | None) -> ApiKey | None:
        """The key an Authorization header value names, or None (no header, not Bearer, unknown key)."""
        if authorization is None or not self.keys or authorization[:7].lower() != _BEARER:
            return None
        return self.keys.lookup(authorization[7:].strip())

    def reload(self) -> None:
        """SIGHUP: re-read the keys file; on any error keep the keys we have."""
        if not self.config.api_keys_file:
            return
        try:
            fresh = load_keys(self.config.api_key, self.config.api_keys_file)
        except KeysError as exc:
            log.error("keys not reloaded, the previous %d keys stay: %s", len(self.keys), exc)
            return
        self.states.attach(fresh.keys)
        self.keys = fresh
        log.info("keys reloaded: %d keys", len(self.keys))

    # -- per request (only when the door exists)
    def admit(self, client: "Client", request: Request) -> bool:
        """True: route the request. False: it has been answered here."""
        if self.cors is not None and request.method == b"OPTIONS" and request.origin is not None:
            # A preflight: the browser asks before the real request; never forwarded. 200 with an empty body,
            # not 204, since respond() always frames with Content-Length (which a 204 must not carry).
            client.respond(200, [], b"")
            return False
        if request.upgrade is not None and self.cors is not None and request.origin is not None \
                and not self.cors.headers(request.origin):
            # Browsers do not apply CORS to WebSockets: the server must check the Origin of a handshake itself
            # (RFC 6455 section 10.2), or any page could open one with the user's credentials.
            client.respond_error(Reason.ORIGIN_NOT_ALLOWED)
            return False
        url = request.url
        if url[:3] == b"/-/":
            path = request.path
            if path in _OPEN_PATHS:
                return True
            if self.admin_elsewhere:
                client.respond_error(Reason.NOT_FOUND, f"no gateway endpoint {path.decode('latin-1')}")
                return False
        if self.keys:
            key = request.key  # matched by authenticate() when the head arrived
            if key is None:
                request.reason = Reason.UNAUTHORIZED.value
                client.respond(*self._unauthorized)
                return False
            if key.models is not None and request.body and not self._model_allowed(key.models, request.body):
                client.respond_error(Reason.MODEL_NOT_ALLOWED)
                return False
            state = key.state
            if state.max_in_flight and state.in_flight_full():
                client.respond_error(Reason.RATE_LIMITED, f"key {key.name!r} has {state.in_flight} requests in "
                                     f"flight, its limit", retry_after_s=1)
                return False
            wait = state.take_request(time.monotonic())
            if wait:
                client.respond_error(Reason.RATE_LIMITED, f"key {key.name!r} is over its rate of {state.rps:g}/s",
                                     retry_after_s=max(1, math.ceil(wait)))
                return False
            if (state.tokens is not None or self.accounting) and not self._meter(client, request, state.tokens):
                return False
            state.in_flight += 1
            request.key_counted = state
        elif self.accounting:
            self._meter(client, request, None)
        if self.upstream_auth is not None:
            request.headers.append(self.upstream_auth)
        return True

    def _meter(self, client: "Client", request: Request, budget: TokenBudget | None) -> bool:
        """Count the request's tokens (a completion only) and reserve its worst case on the key's budget."""
        asked = ask(request.method, request.path, request.body)
        if asked is None:
            return True
        what, body = asked
        if budget is not None:
            reservation, wait, which = budget.reserve(what.worst_case(self.config.token_default_max_tokens))
            if reservation is None:
                limit = budget.per_minute if which == "minute" else budget.per_day
                client.respond_error(Reason.TOKEN_LIMITED, f"key {request.key.name!r} is over its "
                                     f"tokens_per_{which} of {limit}", retry_after_s=max(1, math.ceil(wait)))
                return False
            request.reservation = (budget, reservation)
        request.meter = StreamMeter(what)
        if body is not None:
            request.upstream_body = body  # the stream now asks for its usage chunk (the client will not see it)
        return True

    def budgets(self) -> dict[str, object]:
        """Each configured key's token budgets and what is used of them now (for /-/usage)."""
        return {key.name: key.state.tokens.describe() for key in self.keys.keys if key.state.tokens is not None}

    @staticmethod
    def _model_allowed(models: frozenset[str], body: bytes) -> bool:
        try:
            model = orjson.loads(body).get("model")
        except (orjson.JSONDecodeError, AttributeError):
            return False
        return isinstance(model, str) and model in models

    def finished(self, request: Request) -> None:
        held = request.reservation
        if held is not None:
            request.reservation = None
            meter = request.meter
            held[0].settle(held[1], meter.total if meter is not None else 0)
        state = request.key_counted
        if state is not None:
            state.finished()  # the state it was counted against, whatever reloads happened since
            request.key_counted = None

    def response_headers(self, request: Request | None) -> bytes:
        if self.cors is None or request is None:
            return b""
        if request.method == b"OPTIONS" and request.status == 0:
            return self.cors.preflight_headers(request.origin)
        return self.cors.headers(request.origin)
