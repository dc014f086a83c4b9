"""One client request as the relay sees it, plus what the access log records about it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.dataplane.responses import ResponsesRequest
    from gateway.dataplane.resume import ResumeStream


class Request:
    __slots__ = (
        "method", "url", "version", "headers", "body", "keep_alive", "request_id", "session", "content_type",
        "has_host", "started", "router_s", "first_byte_s", "status", "reason", "replica_id", "bytes_out",
        "retries", "upstream_head", "extra_headers", "trace", "origin", "key", "key_counted",
        "upstream_url", "upstream_body", "resume", "resume_refused", "resumes", "upgrade", "bytes_in",
        "meter", "reservation", "body_charge", "affinity", "admission", "queued_s", "router_fallback",
    )

    def __init__(self, method: bytes, url: bytes, version: str, headers: list[tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool, request_id: bytes, session: bytes | None, content_type: bytes | None,
                 has_host: bool):
        self.method = method
        self.url = url
        self.version = version
        # Client headers minus hop-by-hop, framing and router-owned ones: safe to forward as they are.
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.request_id = request_id
        self.session = session
        self.content_type = content_type
        self.has_host = has_host
        self.started = time.monotonic()
        self.router_s = 0.0
        self.first_byte_s = 0.0
        self.status = 0
        self.reason = ""
        self.replica_id = ""
        self.bytes_out = 0
        self.retries = 0
        self.upstream_head = b""
        self.extra_headers = b""  # header lines a router decision added (forwarding.decision_headers)
        # Set by the tracer for a sampled request only (observability/tracing.py); None costs nothing.
        self.trace: object | None = None
        # Set only when the front door is on (gateway/security): the client's Origin and the API key its
        # Authorization matched (anything with a `name`), and the per-name counters it is counted against while
        # in flight (key_counted: given back to that same object at the end, whatever reloads happened meanwhile).
        self.origin: bytes | None = None
        self.key: Any = None
        self.key_counted: Any = None
        # Token accounting (observability/usage.py), set by the front door for a completion it counts: the meter
        # the response is read through, and the key's budget reservation settled with its count at the end.
        self.meter: Any = None
        self.reservation: Any = None
        # What goes to the replica: the client's URL and body, unless a resume rewrote them.
        self.upstream_url: bytes | None = None
        self.upstream_body = body
        self.body_charge = 0  # bytes of the global body budget it holds (ServerState.buffered_body) until it ends
        self.resume: ResumeStream | None = None
        self.resume_refused: str | None = None  # why this stream would not be resumed, counted if it breaks
        self.resumes = 0
        # A WebSocket upgrade (the Upgrade header's value), tunnelled after the replica's 101 (tunnel.py).
        self.upgrade: bytes | None = None
        self.bytes_in = 0  # a tunnel's bytes from the client to the replica
        self.affinity: ResponsesRequest | None = None  # a Responses API request (responses.py)
        # Admission (admission.py): its ticket while queued, or the app it holds a place in; the time it waited;
        # and why the router was bypassed (router_unreachable, router_timeout), for the access log.
        self.admission: Any = None
        self.queued_s = 0.0
        self.router_fallback = ""

    @property
    def path(self) -> bytes:
        return self.url.split(b"?", 1)[0]

    def log_record(self) -> dict[str, object]:
        now = time.monotonic()
        meter, key = self.meter, self.key
        record = {
            "request_id": self.request_id.decode("latin-1"),
            "method": self.method.decode("latin-1"),
            "path": self.path.decode("latin-1", "replace"),
            "replica_id": self.replica_id,
            "status": self.status,
            "reason": self.reason,
            "bytes": self.bytes_out,
            "retries": self.retries,
            "resumes": self.resumes,
            "router_ms": round(self.router_s * 1000, 3),
            "ttfb_ms": round(self.first_byte_s * 1000, 3) if self.first_byte_s else None,
            "total_ms": round((now - self.started) * 1000, 3),
            "key": key.name if key is not None else None,
            "prompt_tokens": meter.prompt if meter is not None else None,
            "completion_tokens": meter.completion if meter is not None else None,
            "queued_ms": round(self.queued_s * 1000, 3) if self.queued_s else None,
            "router_fallback": self.router_fallback or None,
        }
        if self.upgrade is not None:  # a tunnel: total_ms is its duration, bytes go replica to client
            record["upgrade"] = self.upgrade.decode("latin-1")
            record["bytes_in"] = self.bytes_in
        return record
