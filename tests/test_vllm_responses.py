"""Real vLLM: Responses API affinity across two replicas and two gateways, and what /v1/realtime does on CPU.

Two vLLM CPU servers of the tiny Llama with stored responses on (VLLM_ENABLE_RESPONSES_API_STORE=1: the
session's tiny-model servers have it, tests/vllm_servers.py),
a round-robin router, two gateways sharing a cluster secret and one with affinity off. vLLM keeps a
stored response in the API server process that made it, so without affinity every other
`previous_response_id` follow-up reaches the server that does not have it (404); with it, every follow-up
through either gateway reaches the right one. Needs `bash scripts/vllm_setup.sh`; marked `vllm`.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import Gateway, Stack
from tests.test_vllm_e2e import bench_vllm

_REASON = bench_vllm.missing()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_REASON is not None, reason=f"real vLLM not ready: {_REASON}"),
    pytest.mark.vllm_servers("tiny", 2),
]

SECRET = "vllm-test-cluster-secret"


@pytest.fixture(scope="module")
def rig(vllm_servers: list) -> Iterator[tuple[Gateway, Gateway, Gateway, list]]:
    stack = Stack("vllm-responses")
    servers = vllm_servers
    try:
        router = stack.router(servers)
        a = stack.gateway([router], servers, "--cluster-secret", SECRET, "--health-path", "/health")
        b = stack.gateway([router], servers, "--cluster-secret", SECRET, "--health-path", "/health")
        plain = stack.gateway([router], servers, "--no-responses-affinity", "--health-path", "/health")
        for gateway in (a, b, plain):
            bench_vllm.wait_gateway_healthy(gateway.url)
        yield a, b, plain, servers
    finally:
        stack.stop()


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=120)


ASK = {"model": bench_vllm.MODEL_NAME, "max_output_tokens": 8, "temperature": 0}


def follow_ups(gateway_for_turn, first_id: str, turns: int) -> list[int]:
    statuses, previous = [], first_id
    for turn in range(turns):
        try:
            reply = sdk(gateway_for_turn(turn)).responses.create(input=f"and then {turn}?",
                                                                 previous_response_id=previous, **ASK)
            statuses.append(200)
            previous = reply.id
        except openai.NotFoundError:
            statuses.append(404)
    return statuses


def test_without_affinity_follow_ups_fail_on_the_other_replica(rig) -> None:
    _, _, plain, _ = rig
    first = sdk(plain).responses.create(input="Tell me a story", **ASK)
    statuses = follow_ups(lambda turn: plain, first.id, 4)
    print("without affinity:", statuses)
    assert 404 in statuses


def test_follow_ups_reach_their_replica_through_either_gateway(rig) -> None:
    a, b, _, _ = rig
    first = sdk(a).responses.create(input="Tell me a story", **ASK)
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")  # incomplete: max tokens
    statuses = follow_ups(lambda turn: b if turn % 2 == 0 else a, first.id, 6)
    print("with affinity:", statuses)
    assert statuses == [200] * 6
    for gateway in (a, b):
        got = httpx.get(f"{gateway.url}/v1/responses/{first.id}", timeout=60)
        assert got.status_code == 200 and got.json()["id"] == first.id


def test_a_streamed_response_can_be_followed(rig) -> None:
    a, b, _, _ = rig
    events = list(sdk(a).responses.create(input="Stream a story", stream=True, **ASK))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    rid = events[-1].response.id
    assert events[0].response.id == rid
    assert follow_ups(lambda turn: b, rid, 2) == [200, 200]


def test_what_the_realtime_endpoint_does_on_cpu(rig) -> None:
    """vLLM registers /v1/realtime only for models with the realtime or transcription task (Voxtral realtime,
    Qwen3-ASR realtime: vllm/entrypoints/launchers/api_server/routers.py, vLLM 0.32); with the tiny Llama there
    is no such route, and the gateway must answer the handshake exactly as the server does."""
    a, _, _, servers = rig
    statuses = {}
    for label, port in (("direct", servers[0].port), ("gateway", a.port)):
        try:
            with connect(f"ws://127.0.0.1:{port}/v1/realtime", proxy=None, open_timeout=30):
                statuses[label] = 101
        except InvalidStatus as exc:
            statuses[label] = exc.response.status_code
    print("realtime handshake:", statuses)
    assert statuses["direct"] == statuses["gateway"]
