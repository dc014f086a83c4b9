"""Token accounting against real vLLM (CPU build, tiny Llama): the gateway's counts are vLLM's own.

One vLLM server (the first of the session's tiny-model servers, tests/vllm_servers.py) behind two gateways
with --token-accounting (streams metered by the C pump, and by Python with --no-native-relay). For chat and
completions, streamed (the client asking for include_usage or not) and not: the gateway's /-/usage grows by
exactly what vLLM's own Prometheus counters (vllm:prompt_tokens_total, vllm:generation_tokens_total) grew by,
and by the usage vLLM reports to a client that asks. A stream whose client did not ask for usage is byte for
byte what vLLM sends directly (ids and timestamps aside; the system fingerprint back on the last chunk), and
never shows a usage chunk.

Needs `bash scripts/vllm_setup.sh`; marked `vllm`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import LOG_DIR, Gateway, Stack, bench_vllm
from tests.test_tokens import raw_stream

_REASON = bench_vllm.missing()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(_REASON is not None, reason=f"real vLLM not installed: {_REASON}"),
    pytest.mark.vllm_servers("tiny", 1),
]

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Count the tokens of this sentence, gateway"}]


@dataclass
class Rig:
    server: object
    gateway: Gateway
    client: openai.OpenAI
    python: Gateway  # the same, with --no-native-relay: streams metered by usage.py, not the C pump

    def on(self, relay: str) -> "Rig":
        if relay == "pump":
            return self
        client = openai.OpenAI(base_url=f"{self.python.url}/v1", api_key="unused", max_retries=0, timeout=120)
        return Rig(self.server, self.python, client, self.python)

    def vllm_counts(self) -> tuple[int, int]:
        text = self.server.metrics()  # type: ignore[attr-defined]
        return (int(bench_vllm.metric(text, "vllm:prompt_tokens_total")),
                int(bench_vllm.metric(text, "vllm:generation_tokens_total")))

    def gateway_counts(self) -> tuple[int, int]:
        report = httpx.get(f"{self.gateway.url}/-/usage", timeout=5).json()["keys"].get("", {}).get(MODEL)
        if report is None:
            return 0, 0
        return report["since_start"]["prompt_tokens"], report["since_start"]["completion_tokens"]


@pytest.fixture(scope="module")
def rig(vllm_servers: list) -> Iterator[Rig]:
    stack = Stack("tokens-vllm")
    servers = vllm_servers
    try:
        gateway = stack.gateway([], servers, "--token-accounting", "--token-state-file",
                                f"{LOG_DIR}/tokens-vllm-state.json")
        python = stack.gateway([], servers, "--token-accounting", "--no-native-relay", "--token-state-file",
                               f"{LOG_DIR}/tokens-vllm-state-py.json")
        for each in (gateway, python):
            bench_vllm.wait_gateway_healthy(each.url)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield Rig(servers[0], gateway, client, python)
    finally:
        stack.stop()


def settled(rig: Rig, before_vllm: tuple[int, int], before_gateway: tuple[int, int]) -> tuple[tuple, tuple]:
    """(vLLM's growth, the gateway's growth) once both have counted the request (vLLM's counters lag a little)."""
    deadline = time.monotonic() + 10
    while True:
        grown_vllm = tuple(a - b for a, b in zip(rig.vllm_counts(), before_vllm))
        grown_gateway = tuple(a - b for a, b in zip(rig.gateway_counts(), before_gateway))
        if grown_vllm == grown_gateway or time.monotonic() > deadline:
            return grown_vllm, grown_gateway
        time.sleep(0.1)


CASES = ["chat", "chat-stream-usage", "chat-stream", "completion", "completion-stream-usage", "completion-stream"]


@pytest.mark.parametrize("relay", ["pump", "python"])
@pytest.mark.parametrize("case", CASES)
def test_counts_equal_vllms_own(rig: Rig, case: str, relay: str) -> None:
    rig = rig.on(relay)
    before = rig.vllm_counts(), rig.gateway_counts()
    chat = case.startswith("chat")
    create = rig.client.chat.completions.create if chat else rig.client.completions.create
    what = {"messages": MESSAGES} if chat else {"prompt": "Count the tokens of this prompt, gateway"}
    told = None
    if "stream" not in case:
        told = create(model=MODEL, max_tokens=12, temperature=0, **what).usage
    else:
        options = {"stream_options": {"include_usage": True}} if case.endswith("usage") else {}
        chunks = list(create(model=MODEL, max_tokens=12, temperature=0, stream=True, **options, **what))
        if options:
            told = chunks[-1].usage
            assert told is not None and chunks[-1].choices == []
        else:
            assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    grown_vllm, grown_gateway = settled(rig, *before)
    assert grown_gateway == grown_vllm and grown_vllm[1] > 0, (case, grown_vllm, grown_gateway)
    if told is not None:
        assert (told.prompt_tokens, told.completion_tokens) == grown_gateway


@pytest.mark.parametrize("relay", ["pump", "python"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_without_include_usage_is_what_vllm_sends(rig: Rig, path: str, relay: str) -> None:
    rig = rig.on(relay)
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": True}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "Say hi"})

    def normalized(port: int) -> bytes:
        raw = raw_stream(port, path, body, b"same-request-id")
        return re.sub(rb'"id":"[^"]*"', b'"id":""', raw)

    direct = normalized(rig.server.port)  # type: ignore[attr-defined]
    through = normalized(rig.gateway.port)
    assert through == direct
    assert b'"choices":[]' not in through and b"system_fingerprint" in through
