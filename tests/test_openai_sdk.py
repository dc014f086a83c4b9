"""The official openai SDK through the gateway, as a user would use it."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.conftest import CHAT


@pytest.fixture(scope="module")
def client(basic) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{basic.gateway.url}/v1", api_key="unused", max_retries=0)


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=4)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 4


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_completions_stream_and_unary(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="mock", prompt="Once upon", max_tokens=3)
    assert reply.choices[0].text
    chunks = list(client.completions.create(model="mock", prompt="Once upon", max_tokens=3, stream=True))
    assert len([c for c in chunks if c.choices]) == 3


def test_models_list_skips_the_router(client: openai.OpenAI, basic) -> None:
    before = basic.router.stats()["requests"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["mock"]
    assert basic.router.stats()["requests"] == before


def test_request_id_is_generated_forwarded_and_returned(basic) -> None:
    response = httpx.post(f"{basic.gateway.url}/v1/chat/completions", json=CHAT)
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32
    # The replica saw the same id (vLLM puts it in the body id) and so did the router.
    assert response.json()["id"] == f"chatcmpl-{request_id}"
    assert basic.router.stats()["last_headers"]["x-request-id"] == request_id


def test_client_request_id_is_kept(basic) -> None:
    response = httpx.post(f"{basic.gateway.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["id"] == "chatcmpl-abc-123"


def test_round_robin_reaches_both_replicas(basic) -> None:
    seen = {httpx.post(f"{basic.gateway.url}/v1/chat/completions", json=CHAT).headers["x-replica-id"]
            for _ in range(6)}
    assert seen == {"r1", "r2"}


def test_sse_bytes_arrive_unchanged(basic) -> None:
    """The gateway relays the replica's bytes as they are: compare with the replica directly."""
    body = dict(CHAT, stream=True, max_tokens=8)
    headers = {"x-request-id": "same-id"}
    replica = basic.replicas[0]
    direct = httpx.post(f"{replica.url}/v1/chat/completions", json=body, headers=headers).content
    via = b""
    for _ in range(4):  # round robin: find the response served by the same replica
        response = httpx.post(f"{basic.gateway.url}/v1/chat/completions", json=body, headers=headers)
        if response.headers["x-replica-id"] == replica.replica_id:
            via = response.content
            break
    created = re.compile(rb'"created":\d+')  # the only field that differs between two generations
    assert via and created.sub(b"", via) == created.sub(b"", direct)
    assert via.endswith(b"data: [DONE]\n\n")
