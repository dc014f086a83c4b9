"""A request followed from the client through the gateway into real vLLM, in one trace.

One real vLLM server (CPU build, tiny model) exports its own spans (`--otlp-traces-endpoint`,
OTLP/HTTP) to the same collector as the gateway; vLLM's `llm_request` span must be a child of
the gateway's span, in the client's trace. Marked `vllm` (one vLLM start, about a minute).
"""

from __future__ import annotations

import random
import time

import openai
import pytest

from tests.conftest import LOG_DIR, Stack, wait_until
from tests.test_vllm_e2e import _REASON, MESSAGES, MODEL, bench_vllm

pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter", reason="needs the otel extra")
from tests.otlp_receiver import Receiver  # noqa: E402

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_REASON is not None, reason=f"real vLLM not installed: {_REASON}"),
]


def test_vllm_spans_nest_under_the_gateway_span(monkeypatch) -> None:
    receiver = Receiver().start()
    stack = Stack("vllm-tracing")
    server = None
    try:
        from gateway.stacks.procs import free_port

        # vLLM exports over gRPC unless told otherwise; the collector here speaks OTLP/HTTP.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        port = free_port()
        server = bench_vllm.VllmServer(
            "vllm-traced", port, cpu=0, log_path=f"{LOG_DIR}/vllm-tracing-{port}.log",
            extra_args=["--otlp-traces-endpoint", f"{receiver.url}/v1/traces"]).start()
        server.wait_ready()
        router = stack.router([server])
        gateway = stack.gateway([router], [server], "--otlp-endpoint", receiver.url, "--trace-sample-ratio", "0")
        bench_vllm.wait_gateway_healthy(gateway.url)

        trace_id, client_span = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        started = time.monotonic()
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True,
                                                extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        def spans() -> dict[str, object]:
            found = {span.name: span for span in receiver.trace(trace_id)}
            return found if {"POST /v1/chat/completions", "llm_request"} <= set(found) else {}

        found = wait_until(spans, deadline_s=60, interval_s=0.2, what="the gateway's and vLLM's spans")
        gateway_span, vllm_span = found["POST /v1/chat/completions"], found["llm_request"]
        assert gateway_span.parent_span_id == client_span and gateway_span.service == "gateway"
        assert vllm_span.parent_span_id == gateway_span.span_id
        print(f"\ntrace {trace_id}: " + ", ".join(
            f"{span.name} ({span.service or 'vllm'}) {(span.end_ns - span.start_ns) / 1e6:.1f} ms"
            for span in sorted(receiver.trace(trace_id), key=lambda span: span.start_ns))
            + f"; spans in {time.monotonic() - started:.1f} s")
    finally:
        stack.stop()
        if server is not None:
            server.stop()
        receiver.stop()
