"""What of a client's request is forwarded to a replica, and how: the request head we write.

Hop-by-hop and framing headers are dropped (RFC 9110 §7.6.1; we re-frame the body with our own
Content-Length), so are the names Ray's HAProxy ingress reserves for its router
(`serve_multiplexed_model_id` and the `x-serve-router-*` family; docs/migrating.md, "What carries
over, what differs"). Headers a router decision adds are checked here, where they are
applied: a bad one is `malformed_decision`, never a broken head.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gateway.dataplane.reasons import GatewayError, Reason

if TYPE_CHECKING:
    from gateway.controlplane.targets import Target
    from gateway.dataplane.request import Request

# Request headers never forwarded as they are.
DROP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"content-length", b"expect", b"x-request-id", b"serve_multiplexed_model_id", b"serve-multiplexed-model-id",
))
ROUTER_OWNED_PREFIX = b"x-serve-router-"
# Set by the gateway from what it sees (client.py); a client's own are kept only with --trust-forwarded.
FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))

# A header field name is a token (RFC 9110 §5.1, §5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A field value: visible characters, spaces and tabs, obs-text (RFC 9110 §5.5); no CR, LF or NUL.
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")
# Names a decision may never set: they would change the framing or the routing of the forwarded request.
_DECISION_FORBIDDEN = frozenset((
    "content-length", "transfer-encoding", "host", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "expect", "x-request-id",
))


def decision_headers(headers: dict[str, str] | None) -> bytes:
    """The header lines a router decision adds to the forwarded request; GatewayError when malformed."""
    if not headers:
        return b""
    if not isinstance(headers, dict):
        raise GatewayError(Reason.MALFORMED_DECISION, "request_headers is not an object")
    lines = []
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str) or not _TOKEN.match(name) \
                or name.lower() in _DECISION_FORBIDDEN or not _VALUE.match(value):
            raise GatewayError(Reason.MALFORMED_DECISION,
                               f"the router asked for a header the gateway will not send: {name!r}"[:200])
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    return b"".join(lines)


def build_head(request: "Request", target: "Target") -> bytes:
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
