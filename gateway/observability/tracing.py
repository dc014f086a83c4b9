"""OpenTelemetry traces of relayed requests: one SERVER span per sampled request, with its phases.

The request already records what a trace needs (its start, the router's answer time, the
replica's first byte, its end), so spans are built after the fact, in the finish hook, and
only for sampled requests; the event loop never holds a span per chunk. The one thing that
must be decided up front is sampling, because a sampled request's replica must receive a
`traceparent` naming the gateway's span (vLLM's own spans then nest under it). So:

* `start()` (every request while tracing is on): continue a client's W3C context (a sampled
  parent is always traced, an unsampled one never), otherwise sample `ratio` of the requests;
  for a sampled one, pick its span id and swap the forwarded `traceparent` for ours.
* `finish()` (sampled requests only): the root span and its children `router`, `replica first
  byte` and `replica stream`, finished, with explicit start and end times and the attributes.

Export is the SDK's BatchSpanProcessor with the OTLP/HTTP exporter: spans are queued in
memory (bounded, dropped when full) and a thread of the SDK encodes and posts them in batches,
so a slow or dead collector never touches the event loop. The OpenTelemetry packages are the
`otel` extra: nothing of them is imported until a tracer is built.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Protocol

from gateway.config import ConfigError

log = logging.getLogger("gateway.tracing")

_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
_EXPORT_BATCH = 64


class Traced(Protocol):
    """What the tracer reads and writes of a request (the data plane's Request)."""
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    request_id: bytes
    started: float
    router_s: float
    first_byte_s: float
    status: int
    reason: str
    replica_id: str
    bytes_out: int
    retries: int
    resumes: int
    queued_s: float
    router_fallback: str
    trace: Any
    meter: Any  # token counts (usage.py) when the request was metered


class _Trace:
    """A sampled request's identity in its trace, and the wall-clock time of its start."""
    __slots__ = ("trace_id", "span_id", "parent", "start_ns")

    def __init__(self, trace_id: int, span_id: int, parent: Any, start_ns: int):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent  # the client's SpanContext, or None for a new trace
        self.start_ns = start_ns


def _new_id(bits: int) -> int:
    # The SDK's RandomIdGenerator does the same; 0 is the W3C's invalid id.
    return random.getrandbits(bits) or 1


class RequestTracer:
    def __init__(self, endpoint: str, ratio: float, *, service_name: str = "gateway"):
        try:
            from opentelemetry import trace as trace_api
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ConfigError(f"--otlp-endpoint needs the OpenTelemetry packages: pip install 'gateway[otel]' "
                              f"({exc})") from None
        self._api = trace_api
        self._span = ReadableSpan
        self._context = trace_api.SpanContext
        self._sampled = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
        self._no_state = trace_api.TraceState()
        self._server, self._client, self._internal = (trace_api.SpanKind.SERVER, trace_api.SpanKind.CLIENT,
                                                      trace_api.SpanKind.INTERNAL)
        self._status = trace_api.Status
        self._unset = trace_api.Status(trace_api.StatusCode.UNSET)
        self._error = trace_api.StatusCode.ERROR
        self._propagator = TraceContextTextMapPropagator()
        self.ratio = ratio
        self.endpoint = endpoint
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES still win, as in every OpenTelemetry SDK.
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        self._resource = resource
        self._scope = InstrumentationScope("gateway")
        # Finished spans go straight to the batch processor, built as the SDK's tracer would end them:
        # building four through the tracer's live-span machinery (locks, limits, contexts) took 81 us,
        # here 9 us. The SDK's OTEL_BSP_* variables apply. No exit hook is registered:
        # the SDK's would wait up to 30 s for a dead collector; close() bounds the wait.
        # Its per-post timeout is the SDK's (10 s, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT): it only holds that thread.
        # Batches of 64, not the SDK's 512: the SDK's encoder holds the GIL ~20 us a span, and 10 ms of that
        # stalled the event loop enough to move the p99 at saturation (docs/operating.md, Tracing: cost).
        batch = os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint),
                                             max_export_batch_size=None if batch else _EXPORT_BATCH)

    # -- the data plane's two calls
    def start(self, request: Traced) -> None:
        """Decide sampling; for a sampled request fix its span id and forward it as the replica's parent."""
        parent = state = None
        for name, value in request.headers:
            if len(name) == 11 and name.lower() == _TRACEPARENT:
                parent = value
            elif len(name) == 10 and name.lower() == _TRACESTATE:
                state = value
        remote = None
        if parent is not None:
            carrier = {"traceparent": parent.decode("latin-1")}
            if state is not None:
                carrier["tracestate"] = state.decode("latin-1")
            remote = self._api.get_current_span(self._propagator.extract(carrier)).get_span_context()
            if not remote.is_valid:
                remote = None  # a malformed traceparent: a new trace, as the W3C spec says
            elif not remote.trace_flags.sampled:
                return  # the client decided: forward its context untouched, record nothing
        if remote is None and random.random() >= self.ratio:
            return
        now_ns, now = time.time_ns(), time.monotonic()
        trace = _Trace(remote.trace_id if remote is not None else _new_id(128), _new_id(64), remote,
                       now_ns - int((now - request.started) * 1e9))
        request.trace = trace
        # The replica's parent is the gateway's span; the client's tracestate is forwarded as it came.
        headers = [item for item in request.headers if item[0].lower() != _TRACEPARENT]
        headers.append((_TRACEPARENT, b"00-%032x-%016x-01" % (trace.trace_id, trace.span_id)))
        request.headers = headers

    def finish(self, request: Traced) -> None:
        """The sampled request ended: its spans, with their attributes, to the exporter's queue."""
        trace: _Trace = request.trace
        request.trace = None
        try:
            for span in self._spans(request, trace):
                self._processor.on_end(span)
        except Exception:  # a tracing bug must never cost the request accounting that runs after it
            log.exception("could not record the trace of request %s", request.request_id.decode("latin-1"))

    def _spans(self, request: Traced, trace: _Trace) -> list[Any]:
        start_ns = trace.start_ns
        end_ns = start_ns + int((time.monotonic() - request.started) * 1e9)
        state = trace.parent.trace_state if trace.parent is not None else self._no_state
        root = self._context(trace.trace_id, trace.span_id, False, self._sampled, state)
        reason = request.reason
        path = request.url.split(b"?", 1)[0].decode("latin-1", "replace")
        error = self._status(self._error, reason or f"status {request.status}") if request.status >= 500 else None
        spans = [self._span(
            f"{request.method.decode('latin-1')} {path}", root, trace.parent, self._resource, {
                "http.request.method": request.method.decode("latin-1"),
                "url.path": path,
                "http.response.status_code": request.status,
                "gateway.request_id": request.request_id.decode("latin-1"),
                "gateway.replica_id": request.replica_id,
                "gateway.router": "router" if request.router_s else "least_loaded",
                "gateway.reason": reason,
                "gateway.retries": request.retries,
                # Resumes are counted by the resume feature when it is there; until then a request has none.
                "gateway.resumes": request.resumes,
                "gateway.response_bytes": request.bytes_out,
                **self._usage(request.meter),
            }, kind=self._server, status=error or self._unset, start_time=start_ns, end_time=end_ns,
            instrumentation_scope=self._scope)]

        def child(name: str, kind: Any, attributes: dict[str, Any], start: int, end: int, failed: bool) -> None:
            context = self._context(trace.trace_id, _new_id(64), False, self._sampled, state)
            status = self._status(self._error, reason) if failed else self._unset
            spans.append(self._span(name, context, root, self._resource, attributes, kind=kind, status=status,
                                    start_time=start, end_time=end, instrumentation_scope=self._scope))

        # Admission's wait (gateway/dataplane/admission.py) comes before the router call: the router decides
        # when the request leaves the queue.
        queued_ns = start_ns + int(request.queued_s * 1e9)
        if request.queued_s:
            shed = reason in ("queue_timeout", "queue_full")
            child("queue", self._internal, {"gateway.queue.outcome": reason if shed else "admitted"},
                  start_ns, queued_ns, shed)
        routed_ns = queued_ns + int(request.router_s * 1e9)
        router_failed = reason.startswith("router_") or reason in ("malformed_decision", "unknown_replica_id")
        if request.router_s:
            outcome = reason if router_failed else "fallback" if request.router_fallback else "decided"
            child("router", self._internal, {"gateway.router.outcome": outcome,
                                             "gateway.router.fallback": request.router_fallback},
                  queued_ns, routed_ns, router_failed)
        if request.replica_id and not router_failed:
            replica = {"gateway.replica_id": request.replica_id}
            if request.first_byte_s:
                first_ns = start_ns + int(request.first_byte_s * 1e9)
                child("replica first byte", self._client, replica, routed_ns, first_ns, False)
                child("replica stream", self._client, replica, first_ns, end_ns, bool(reason))
            else:  # no response head: the whole wait was for the first byte
                child("replica first byte", self._client, replica, routed_ns, end_ns, bool(reason))
        return spans

    @staticmethod
    def _usage(meter: Any) -> dict[str, Any]:
        """Token counts under OpenTelemetry's GenAI names (gen_ai.usage.*: prompt = input, completion = output)."""
        if meter is None or not meter.total:
            return {}
        return {"gen_ai.usage.input_tokens": meter.prompt, "gen_ai.usage.output_tokens": meter.completion,
                "gen_ai.request.model": meter.ask.model}

    # -- lifecycle
    def close(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued, waiting at most `timeout_s` (a dead collector must not hold up exit)."""
        done = threading.Thread(target=self._processor.shutdown, name="otel-shutdown", daemon=True)
        done.start()
        done.join(timeout_s)
        if done.is_alive():
            log.warning("trace export did not finish within %.1f s at shutdown; unsent spans are dropped", timeout_s)
