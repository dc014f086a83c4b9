"""Real vLLM (CPU build, tiny random-weight Llama) behind the gateway, end to end.

Two real vLLM OpenAI servers (Workers pinned to CPU 0 and CPU 1; the session's tiny-model servers,
tests/vllm_servers.py), the standalone router and the gateway, all started in this test's own session: on this
2-core box a setsid-ed server or client gets its own scheduler group and streams then arrive in one burst
(docs/contributing.md, "Real vLLM on CPU"). Covered through the gateway with the official openai SDK: chat and
completions, streaming and not, include_usage, a client that goes away mid-stream (vLLM must abort the
request: its running count drops to 0 and generation stops), and vLLM's own `vllm bench serve` through the
gateway vs direct, which must finish with no failed request. No timing assertions.

Needs `bash scripts/vllm_setup.sh` (about 2.5 min, 2.5 GB) and takes 2-4 min; marked `vllm`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from tests.conftest import (LOG_DIR, Gateway, Router, Stack, assert_bench_complete, bench_vllm,
                            check_completions, wait_until)


_REASON = bench_vllm.missing()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_REASON is not None, reason=f"real vLLM not installed: {_REASON}"),
    pytest.mark.vllm_servers("tiny", 2),
]

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Say hi to the gateway"}]
LONG = 480  # prompt + LONG stays under max-model-len 512; a few seconds of generation at least
BENCH = {"num_prompts": 32, "input_len": 256, "output_len": 64}


@dataclass
class Rig:
    servers: list  # bench_vllm.VllmServer, A then B
    router: Router
    gateway: Gateway
    client: openai.OpenAI

    def total(self, name: str) -> float:
        return sum(bench_vllm.metric(server.metrics(), name) for server in self.servers)

    def running(self) -> float:
        return self.total("vllm:num_requests_running")

    def generated(self) -> float:
        return self.total("vllm:generation_tokens_total")

    def logs(self) -> str:
        text = ""
        for server in self.servers:
            with open(server.log_path, encoding="utf-8", errors="replace") as handle:
                text += handle.read()
        return text


@pytest.fixture(scope="module")
def rig(vllm_servers: list) -> Iterator[Rig]:
    stack = Stack("vllm-e2e")
    try:
        router = stack.router(vllm_servers)
        gateway = stack.gateway([router], vllm_servers)
        bench_vllm.wait_gateway_healthy(gateway.url)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield Rig(vllm_servers, router, gateway, client)
    finally:
        stack.stop()


def _idle(rig: Rig) -> None:
    wait_until(lambda: rig.running() == 0, deadline_s=30, interval_s=0.1, what="no request running in vLLM")


def test_models_through_the_gateway(rig: Rig) -> None:
    assert [model.id for model in rig.client.models.list().data] == [MODEL]


def test_chat_non_streaming(rig: Rig) -> None:
    reply = rig.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    assert reply.system_fingerprint.startswith("vllm-")


def test_chat_streaming_with_usage(rig: Rig) -> None:
    pumped = bench_vllm.metric(rig.gateway.metrics(), "gateway_native_relay_streams_total")
    stream = rig.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 16  # count tokens from usage, never from events
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 16
    # vLLM's stream (uvicorn's chunked framing) went through the C stream pump, not the Python path.
    assert bench_vllm.metric(rig.gateway.metrics(), "gateway_native_relay_streams_total") == pumped + 1


def test_completions_non_streaming_and_streaming(rig: Rig) -> None:
    check_completions(rig.client, MODEL)


def test_requests_are_spread_over_both_replicas(rig: Rig) -> None:
    before = [bench_vllm.metric(s.metrics(), "vllm:request_success_total") for s in rig.servers]
    for _ in range(4):
        rig.client.completions.create(model=MODEL, prompt="round robin", max_tokens=2)
    after = [bench_vllm.metric(s.metrics(), "vllm:request_success_total") for s in rig.servers]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def _assert_aborted(rig: Rig, request_id: str, generated_before: float) -> None:
    """vLLM let go of the request: nothing running, generation stopped well short of LONG, logged as aborted."""
    started = time.monotonic()
    wait_until(lambda: rig.running() == 0, deadline_s=10, interval_s=0.05,
               what="vllm:num_requests_running back to 0 after the client went away")
    abort_s = time.monotonic() - started
    settled = rig.generated()
    time.sleep(1.0)
    assert rig.generated() == settled, "vLLM kept generating tokens after the client disconnected"
    assert settled - generated_before < LONG, "the request ran to max_tokens: it was not aborted"
    wait_until(lambda: any(request_id in line and "abort" in line.lower() for line in rig.logs().splitlines()),
               deadline_s=10, interval_s=0.1, what=f"vLLM's log line for the abort of {request_id}")
    print(f"\n{request_id}: running 0 within {abort_s * 1000:.0f} ms of the disconnect, "
          f"{settled - generated_before:.0f} of {LONG} tokens generated")


def test_client_disconnect_mid_stream_aborts_in_vllm(rig: Rig) -> None:
    _idle(rig)
    before = rig.generated()
    stream = rig.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=LONG, stream=True)
    request_id, deltas = "", 0
    for chunk in stream:
        request_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
            if deltas == 5:
                break
    assert deltas == 5 and request_id.startswith("chatcmpl-")
    assert rig.running() == 1, "the stream should still be generating"
    stream.close()  # the client goes away: the gateway must close its replica connection
    _assert_aborted(rig, request_id, before)


# A client that gives up on a non-streaming request closes its socket normally (FIN): an SDK timeout,
# a killed curl. vLLM aborts on that EOF (the `direct` case, the control); so must the gateway.
@pytest.mark.parametrize("via", ["direct", "gateway"])
def test_client_disconnect_before_a_unary_reply_aborts_in_vllm(rig: Rig, via: str) -> None:
    _idle(rig)
    before = rig.generated()
    port = rig.gateway.port if via == "gateway" else rig.servers[0].port
    request_id = f"e2e-unary-{via}-{uuid.uuid4().hex[:12]}"
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": LONG}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     + f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: rig.running() == 1, deadline_s=20, interval_s=0.02, what="the request running in vLLM")
    # closed (FIN) here, long before the reply could be complete
    _assert_aborted(rig, f"chatcmpl-{request_id}", before)


def test_vllm_bench_serve_through_gateway_and_direct(rig: Rig, capsys: pytest.CaptureFixture) -> None:
    _idle(rig)
    out = os.path.join(LOG_DIR, "vllm-e2e-bench")
    per_replica_before = [bench_vllm.metric(s.metrics(), "vllm:request_success_total") for s in rig.servers]
    through_gateway = bench_vllm.run_bench(rig.gateway.url, "gateway", out, **BENCH)
    per_replica_after = [bench_vllm.metric(s.metrics(), "vllm:request_success_total") for s in rig.servers]
    direct = bench_vllm.run_bench(rig.servers[0].url, "direct", out, **BENCH)
    results = {"direct (replica A)": direct, "gateway (router, A+B)": through_gateway}
    with capsys.disabled():
        print(f"\nvllm bench serve, {BENCH['num_prompts']} prompts, random {BENCH['input_len']} in / "
              f"{BENCH['output_len']} out, all at once; load average {os.getloadavg()[0]:.1f}\n"
              + bench_vllm.table(results))
    assert_bench_complete(results, BENCH)
    served = [after - before for before, after in zip(per_replica_before, per_replica_after)]
    assert all(count > 0 for count in served), f"the gateway run should use both replicas: {served}"
