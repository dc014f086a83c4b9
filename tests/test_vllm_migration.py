"""Drain by migration with real vLLM: the serving server leaves the target set mid-stream, the stream moves on.

Two vLLM CPU servers of the varied tiny Llama (greedy output that varies, so a wrong continuation shows; the
session's, tests/vllm_servers.py: a drain is the gateway's, the servers are left as they were), the
router and a gateway with `--resume-limit 1 --drain-migrate-after-s 0.1`. After some tokens of a 400-token
stream, the server generating it is drained (`POST /-/replicas/ID/drain` on the admin listener, what a Serve
scale-down does through discovery): the client's text and usage equal the uninterrupted reference, and the
drained server stops generating for it within a second, long before the stream would have ended. Needs
`bash scripts/vllm_setup.sh`; marked `vllm`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.stacks.procs import free_port
from tests.conftest import Gateway, Stack, wait_until
from tests.test_vllm_e2e import bench_vllm
from tests.test_vllm_resume import running

_REASON = bench_vllm.missing(bench_vllm.VARIED_MODEL_DIR)
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_REASON is not None, reason=f"real vLLM not ready: {_REASON}"),
    pytest.mark.vllm_servers("varied", 2),
]

# Long enough that the stream is still being generated when the move is due: on a quiet machine the tiny model
# makes ~2.3 ms per token, and a 200-token stream once ended 462 ms after it began, before a 0.5 s move was due.
N = 400
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell the story of a replica that was drained"}],
        "max_tokens": N, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def rig(vllm_servers: list) -> Iterator[tuple[Gateway, int, list]]:
    stack = Stack("vllm-migration")
    servers = vllm_servers
    try:
        admin = free_port()
        gateway = stack.gateway([stack.router(servers)], servers, "--resume-limit", "1", "--drain-migrate-after-s",
                                "0.1", "--admin-port", str(admin), "--health-path", "/health")
        bench_vllm.wait_gateway_healthy(f"http://127.0.0.1:{admin}")  # /-/routes is on the admin listener
        yield gateway, admin, servers
    finally:
        stack.stop()


def test_a_stream_moves_off_a_drained_vllm_and_reads_as_one(rig) -> None:
    gateway, admin, servers = rig
    wait_until(lambda: all(running(s) == 0 for s in servers), deadline_s=30, interval_s=0.1, what="nothing running")

    def read(base_url: str, drain_after: int | None = None) -> tuple[str, dict, dict]:
        text, usage, tokens, seen = "", {}, 0, {}
        with httpx.Client(timeout=300) as client:
            with client.stream("POST", base_url + "/v1/chat/completions", json=CHAT) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    usage = event.get("usage") or usage
                    for choice in event["choices"]:
                        if choice["delta"].get("content"):
                            text += choice["delta"]["content"]
                            tokens += 1
                    if drain_after is not None and tokens >= drain_after:
                        drain_after = None
                        serving = [s for s in servers if running(s) >= 1]
                        assert len(serving) == 1
                        seen["victim"] = victim = serving[0]
                        seen["at"] = time.monotonic()
                        answer = httpx.post(f"http://127.0.0.1:{admin}/-/replicas/{victim.replica_id}/drain")
                        assert answer.status_code == 200 and answer.json()["in_flight"] == 1
                    if "victim" in seen and "idle_after_s" not in seen and running(seen["victim"]) == 0:
                        seen["idle_after_s"] = round(time.monotonic() - seen["at"], 2)
                        seen["tokens_then"] = tokens
        return text, usage, seen

    reference_text, reference_usage, _ = read(servers[0].url)
    assert len(set(reference_text.split())) > 8, "the varied model's output should vary"
    text, usage, seen = read(gateway.url, drain_after=20)
    print(f"\ndrained {seen['victim'].replica_id} after 20 tokens: it stopped generating "
          f"{seen.get('idle_after_s')} s later (at token {seen.get('tokens_then')} of {N})")
    assert text == reference_text
    assert usage == reference_usage and usage["completion_tokens"] == N
    assert seen.get("tokens_then", N) < N  # the drained server was idle before the stream ended
    metrics = httpx.get(f"http://127.0.0.1:{admin}/-/metrics").text
    assert 'gateway_resumes_total{outcome="migrated"} 1.0' in metrics
