"""The answers the gateway writes itself (errors, preflights, its own endpoints), rendered to bytes.

Kept apart from the HTTP/1 server (client.py) so that the framing of our own answers lives in
one place: Content-Length always, `connection: close` when the connection ends after it, and
no body for HEAD (RFC 9110 §9.3.2).
"""

from __future__ import annotations

from gateway.dataplane.reasons import Reason, error_response

_PHRASES = {100: b"Continue", 200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
            404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
            429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 499: b"Client Closed Request",
            500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SKIP = (b"content-length", b"connection", b"transfer-encoding")


def phrase(status: int) -> bytes:
    return _PHRASES.get(status, b"Unknown")


def render(status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, request_id: bytes | None,
           extra: bytes, keep_alive: bool, head_only: bool) -> bytes:
    """One whole response: `extra` is pre-rendered header lines (the front door's CORS headers)."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, phrase(status))]
    for name, value in headers:
        if name.lower() not in _SKIP:
            out.append(b"%s: %s\r\n" % (name, value))
    if request_id is not None:
        out.append(b"x-request-id: %s\r\n" % request_id)
    if extra:
        out.append(extra)
    out.append(b"content-length: %d\r\n%s\r\n" % (len(body), b"" if keep_alive else b"connection: close\r\n"))
    if not head_only:
        out.append(body)
    return b"".join(out)


def error_parts(reason: Reason, message: str | None = None, *, status: int | None = None,
                retry_after_s: int | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """status, headers and body of an OpenAI-shaped error (reasons.error_response)."""
    response = error_response(reason, message, status=status, retry_after_s=retry_after_s)
    return response.status_code, response.raw_headers, bytes(response.body)
