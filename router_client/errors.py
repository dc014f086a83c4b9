"""Why a routing decision could not be had. The reasons are Ray's HAProxy+Lua names."""

from __future__ import annotations

ROUTER_UNREACHABLE = "router_unreachable"
ROUTER_TIMEOUT = "router_timeout"
ROUTER_NON_200 = "router_non_200"
MALFORMED_DECISION = "malformed_decision"


class RouterError(Exception):
    def __init__(self, reason: str, detail: str, *, status: int | None = None, body: bytes = b"",
                 content_type: bytes | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # For router_non_200: the router's own answer, so a 4xx can reach the client unchanged.
        self.status = status
        self.body = body
        self.content_type = content_type


class ConnectionLost(Exception):
    """The server closed the connection before a whole response arrived."""

    def __init__(self, got_response_bytes: bool):
        super().__init__("connection closed before the response " + ("ended" if got_response_bytes else "began"))
        # A reused keep-alive connection that dies before any byte is "stale": the request is safe to resend.
        self.got_response_bytes = got_response_bytes


class MalformedResponse(Exception):
    """The bytes from the server are not HTTP/1.1, or exceed the size we accept."""
