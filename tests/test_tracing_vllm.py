"""A request followed from the client through the gateway into real vLLM, in one trace.

One real vLLM server (CPU build, tiny model) exports its own spans (`--otlp-traces-endpoint`,
OTLP/HTTP) to the same collector as the gateway; vLLM's `llm_request` span must be a child of
the gateway's span, in the client's trace. The server and the collector are the session's
(tests/vllm_servers.py: every tiny-model server exports to one receiver). Marked `vllm`.
"""

from __future__ import annotations

import random
import time

import openai
import pytest

from tests.conftest import Stack, wait_until
from tests.test_vllm_e2e import _REASON, MESSAGES, MODEL, bench_vllm

pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter", reason="needs the otel extra")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_REASON is not None, reason=f"real vLLM not installed: {_REASON}"),
    pytest.mark.vllm_servers("tiny", 1),
]


def test_vllm_spans_nest_under_the_gateway_span(vllm_servers: list, vllm_pool) -> None:
    # The session's tiny-model servers export to the pool's receiver (tests/vllm_servers.py).
    receiver = vllm_pool.receiver
    assert receiver is not None, "the tiny-model servers were started without --otlp-traces-endpoint"
    server = vllm_servers[0]
    stack = Stack("vllm-tracing")
    try:
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
