"""CORS for browser clients: the gateway answers preflights and labels every answer.

Only the gateway speaks CORS when it is on: it does not forward the browser's
Origin, so a replica's own CORS layer (vLLM allows * by default) stays silent and a
response never carries two Access-Control-Allow-Origin headers, which browsers reject.
"""

from __future__ import annotations

# The headers a browser client of an OpenAI-style API sends beyond the CORS-safelisted ones.
_ALLOW_HEADERS = b"authorization, content-type, x-request-id, openai-organization, openai-project"
# What page scripts may read: the request id to quote in a bug report, why a request failed, when to retry.
_EXPOSE = b"x-request-id, x-serve-reason, retry-after"
_PREFLIGHT_MAX_AGE_S = 600


class Cors:
    def __init__(self, origins: list[str], session_header: str):
        self.any = "*" in origins
        self.origins = frozenset(origin.rstrip("/").encode("latin-1") for origin in origins if origin != "*")
        allow = _ALLOW_HEADERS + b", " + session_header.lower().encode("latin-1")
        self._any_headers = (b"access-control-allow-origin: *\r\n"
                             b"access-control-expose-headers: " + _EXPOSE + b"\r\n")
        self._preflight = (b"access-control-allow-methods: GET, POST, OPTIONS\r\n"
                           b"access-control-allow-headers: " + allow + b"\r\n"
                           b"access-control-max-age: %d\r\n" % _PREFLIGHT_MAX_AGE_S)

    def headers(self, origin: bytes | None) -> bytes:
        """Header lines (each ending CRLF) for an answer to a request from `origin`; b"" if not allowed."""
        if self.any:
            return self._any_headers
        if origin is not None and origin in self.origins:
            return (b"access-control-allow-origin: %s\r\nvary: origin\r\n"
                    b"access-control-expose-headers: %s\r\n" % (origin, _EXPOSE))
        return b""

    def preflight_headers(self, origin: bytes | None) -> bytes:
        allowed = self.headers(origin)
        return allowed + self._preflight if allowed else b""
