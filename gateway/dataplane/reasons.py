"""Every way a request can fail, by name.

Like HAProxy's termination states, each failure has one name that reaches the
client (`X-Serve-Reason`), the access log and the metrics. The names Ray's
HAProxy+Lua path already uses keep their meaning.
"""

from __future__ import annotations

import enum

from starlette.responses import JSONResponse


class Reason(str, enum.Enum):
    # The router call (the names Ray's HAProxy+Lua ingress gives them; docs/operating.md, "Failure reasons").
    ROUTER_UNREACHABLE = "router_unreachable"
    ROUTER_TIMEOUT = "router_timeout"
    ROUTER_NON_200 = "router_non_200"
    MALFORMED_DECISION = "malformed_decision"
    UNKNOWN_REPLICA_ID = "unknown_replica_id"
    # The replica.
    REPLICA_UNAVAILABLE = "replica_unavailable"
    NO_REPLICAS = "no_replicas"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_MALFORMED = "upstream_malformed"
    UPSTREAM_DIED = "upstream_died_mid_response"
    # The client and the gateway's own limits.
    BAD_REQUEST = "bad_request"
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    OVERLOADED = "overloaded"
    # The gateway's own failure while relaying (the C stream pump's PUMP_ERROR: epoll, memory): never the replica's.
    GATEWAY_ERROR = "gateway_error"
    # Admission (admission.py): shed from the queue of a saturated app.
    QUEUE_TIMEOUT = "queue_timeout"
    QUEUE_FULL = "queue_full"
    DRAINING = "draining"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    CLIENT_ABORT = "client_abort"
    CLIENT_TIMEOUT = "client_timeout"  # the client read nothing of its response for idle_timeout_s
    # The front door (gateway/security).
    UNAUTHORIZED = "unauthorized"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    RATE_LIMITED = "rate_limited"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    TOKEN_LIMITED = "token_limited"
    # Responses API affinity (dataplane/responses.py).
    RESPONSE_REPLICA_GONE = "response_replica_gone"


# status, OpenAI error type, default message
_DETAILS: dict[Reason, tuple[int, str, str]] = {
    Reason.ROUTER_UNREACHABLE: (503, "service_unavailable", "no request router could be reached"),
    Reason.ROUTER_TIMEOUT: (504, "timeout", "the request router did not answer in time"),
    Reason.ROUTER_NON_200: (503, "service_unavailable", "the request router failed"),
    Reason.MALFORMED_DECISION: (503, "service_unavailable", "the request router answered with a malformed decision"),
    Reason.UNKNOWN_REPLICA_ID: (503, "service_unavailable", "the request router named a replica the gateway does not know"),
    Reason.REPLICA_UNAVAILABLE: (503, "service_unavailable", "the chosen replica could not be reached"),
    Reason.NO_REPLICAS: (503, "service_unavailable", "no healthy replica is available"),
    Reason.UPSTREAM_TIMEOUT: (504, "timeout", "the replica did not answer in time"),
    Reason.UPSTREAM_MALFORMED: (502, "bad_gateway", "the replica sent a malformed response"),
    Reason.UPSTREAM_DIED: (502, "bad_gateway", "the replica closed the connection mid-response"),
    Reason.BAD_REQUEST: (400, "invalid_request_error", "malformed HTTP request"),
    Reason.HEADERS_TOO_LARGE: (431, "invalid_request_error", "request headers too large"),
    Reason.BODY_TOO_LARGE: (413, "invalid_request_error", "request body too large"),
    Reason.REQUEST_TIMEOUT: (408, "invalid_request_error", "request not received in time"),
    Reason.OVERLOADED: (503, "service_unavailable", "the gateway is at its configured limit"),
    Reason.GATEWAY_ERROR: (503, "service_unavailable", "the gateway failed relaying the response (not the replica)"),
    Reason.QUEUE_TIMEOUT: (429, "rate_limit_error", "waited too long for a replica: every replica is saturated"),
    Reason.QUEUE_FULL: (429, "rate_limit_error", "every replica is saturated and the queue is full"),
    Reason.DRAINING: (503, "service_unavailable", "the gateway is shutting down"),
    Reason.NOT_FOUND: (404, "invalid_request_error", "not found"),
    Reason.MODEL_NOT_FOUND: (404, "invalid_request_error", "the model does not exist"),
    Reason.CLIENT_ABORT: (499, "client_closed_request", "the client closed the connection"),
    Reason.CLIENT_TIMEOUT: (408, "timeout", "the client read nothing of its response in time"),
    Reason.UNAUTHORIZED: (401, "invalid_request_error",
                          "missing or invalid API key: send 'Authorization: Bearer <key>'"),
    Reason.MODEL_NOT_ALLOWED: (403, "permission_error", "this API key may not use the requested model"),
    Reason.RATE_LIMITED: (429, "rate_limit_error", "this API key is over its request limit"),
    Reason.RESPONSE_REPLICA_GONE: (404, "invalid_request_error",
                                   "the replica that stored this response is gone, and the response with it; "
                                   "start over without previous_response_id"),
    Reason.ORIGIN_NOT_ALLOWED: (403, "permission_error", "this origin may not open a WebSocket here (--cors-origins)"),
    Reason.TOKEN_LIMITED: (429, "rate_limit_error", "this API key is over its token budget"),
}
# The OpenAI error code where it differs from our reason name (the SDKs and clients key on OpenAI's).
_CODES = {Reason.UNAUTHORIZED: "invalid_api_key", Reason.TOKEN_LIMITED: "rate_limit_exceeded"}


def status_of(reason: Reason) -> int:
    return _DETAILS[reason][0]


def error_response(reason: Reason, message: str | None = None, *, status: int | None = None,
                   retry_after_s: int | None = None) -> JSONResponse:
    """An OpenAI-shaped error, so the `openai` SDK raises a typed APIError the user can read."""
    default_status, kind, default_message = _DETAILS[reason]
    headers = {"x-serve-reason": reason.value}
    if retry_after_s is not None:
        headers["retry-after"] = str(retry_after_s)
    return JSONResponse(
        {"error": {"message": message or default_message, "type": kind, "code": _CODES.get(reason, reason.value)}},
        status_code=status or default_status,
        headers=headers,
    )


class GatewayError(Exception):
    """A failure that ends one request with a named reason."""

    def __init__(self, reason: Reason, message: str | None = None, *, status: int | None = None,
                 body: bytes | None = None, content_type: bytes | None = None):
        super().__init__(message or reason.value)
        self.reason = reason
        self.message = message
        self.status = status
        # Set when an upstream's own answer (a router's 4xx) must reach the client as it was.
        self.body = body
        self.content_type = content_type
