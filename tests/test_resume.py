"""Streams that survive their replica: a replica dies mid-stream, the client sees one coherent stream.

The mock engines die where the stream reaches a sequence length (`x-mock-die-at`), whichever replica
serves that part, so every case is deterministic however the router picks. The reference is the same
request through the same gateway with no fault: the client's bytes must be equal (`created` aside,
which is the second the request started).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.dataplane import resume
from replicas.mock_engine import greedy_text, prompt_ids
from tests.conftest import Gateway, Replica, Stack, wait_until

CHAT_BODY = {"model": "mock", "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 30,
             "stream": True}
CMPL_BODY = {"model": "mock", "prompt": "Once upon a time", "max_tokens": 30, "stream": True}


@pytest.fixture(scope="module")
def rig(request: pytest.FixtureRequest) -> Iterator[tuple[Gateway, list[Replica]]]:
    s = Stack(f"{request.module.__name__}-rig")
    try:
        replicas = [s.replica("r1"), s.replica("r2"), s.replica("r3")]
        router = s.router(replicas)
        # Every test here breaks streams on purpose: outlier ejection would take the replicas away.
        gateway = s.gateway([router], replicas, "--resume-limit", "2", "--idle-timeout-s", "1", "--outlier-failures", "0")
        yield gateway, replicas
    finally:
        s.stop()


def events(gateway: Gateway, path: str, body: dict, headers: dict[str, str] | None = None) -> list[str]:
    """The SSE events the client reads, as sent (the raw `data: ...` payloads)."""
    with httpx.Client(timeout=20) as client:
        with client.stream("POST", gateway.url + path, json=body, headers=headers or {}) as response:
            assert response.status_code == 200
            raw = b"".join(response.iter_bytes())
    text = raw.decode()
    assert text.endswith("\n\n")
    return text[:-2].split("\n\n")


def normalized(stream: list[str]) -> list[str]:
    return [re.sub(r'"created":\d+', '"created":0', event) for event in stream]


def prompt_length(path: str, body: dict) -> int:
    return len(prompt_ids(path.endswith("chat/completions"), body))


def faulted(fault: str, *lengths: int) -> dict[str, str]:
    return {"x-mock-fault": fault, "x-mock-die-at": ",".join(map(str, lengths))}


def content(stream: list[str]) -> str:
    text = ""
    for event in stream[:-1]:
        for choice in json.loads(event[6:])["choices"]:
            text += choice["delta"].get("content") or "" if "delta" in choice else choice["text"]
    return text


def check_one_stream(stream: list[str], chat: bool) -> None:
    decoded = [json.loads(e[6:]) for e in stream[:-1]]
    assert stream[-1] == "data: [DONE]"
    assert len({(d["id"], d["created"]) for d in decoded}) == 1
    assert {d["object"] for d in decoded} == {"chat.completion.chunk" if chat else "text_completion"}
    roles = [d for d in decoded if d["choices"] and d["choices"][0].get("delta", {}).get("role")]
    assert len(roles) == (1 if chat else 0)
    assert sum(1 for d in decoded if d.get("usage")) <= 1
    assert "[DONE]" not in "".join(stream[:-1])


CASES = [
    # (path, body, where it dies: tokens after the prompt, or -1 for "right after the role chunk")
    ("/v1/chat/completions", CHAT_BODY, 0),  # after the role chunk
    ("/v1/chat/completions", CHAT_BODY, 1),  # after the first token
    ("/v1/chat/completions", CHAT_BODY, 13),  # mid-stream
    ("/v1/chat/completions", CHAT_BODY, 30),  # after the last token, before usage / [DONE]
    ("/v1/completions", CMPL_BODY, 1),
    ("/v1/completions", CMPL_BODY, 13),
    ("/v1/completions", CMPL_BODY, 30),
]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("fault", ["close-mid-stream", "error-mid-stream"])
@pytest.mark.parametrize("path,body,after", CASES)
def test_a_replica_dying_mid_stream_is_invisible(rig, path: str, body: dict, after: int, fault: str,
                                                 include_usage: bool) -> None:
    gateway, _ = rig
    body = dict(body, stream_options={"include_usage": include_usage})
    rid = {"x-request-id": f"ref-{after}-{fault}-{include_usage}-{path[-6:]}"}
    reference = events(gateway, path, body, rid)
    p = prompt_length(path, body)
    # Only the original request dies there (a resume that regenerates the last token starts below it too).
    resumed = events(gateway, path, body, {**rid, "x-mock-fault": fault, "x-mock-die-at": f"{p + after}@{p}"})
    assert normalized(resumed) == normalized(reference)
    chat = "chat" in path
    check_one_stream(resumed, chat)
    assert content(resumed) == greedy_text(prompt_ids(chat, body), body["max_tokens"])
    assert "token_ids\":[" not in "".join(resumed)  # the client did not ask for token ids
    if include_usage:
        usage = json.loads(resumed[-2][6:])["usage"]
        assert usage["prompt_tokens"] == prompt_length(path, body)
        assert usage["completion_tokens"] == body["max_tokens"]


def test_two_deaths_in_one_stream(rig) -> None:
    gateway, _ = rig
    before = gateway.routes()
    path, body = "/v1/chat/completions", dict(CHAT_BODY, stream_options={"include_usage": True})
    p = prompt_length(path, body)
    reference = events(gateway, path, body, {"x-request-id": "two"})
    resumed = events(gateway, path, body, {"x-request-id": "two", **faulted("close-mid-stream", p + 5, p + 17)})
    assert normalized(resumed) == normalized(reference)
    after = gateway.routes()
    moved = {t["replica_id"]: t["resumes_from"] for t in after["targets"]}
    old = {t["replica_id"]: t["resumes_from"] for t in before["targets"]}
    assert sum(moved.values()) - sum(old.values()) == 2
    log = wait_until(lambda: [json.loads(line) for line in gateway.log().splitlines()
                              if line.startswith("{") and '"request_id":"two"' in line and '"resumes":2' in line],
                     what="the access log records both resumes")
    assert log[0]["status"] == 200


def test_more_deaths_than_the_limit_cut_the_stream_visibly(rig) -> None:
    gateway, _ = rig
    path, body = "/v1/completions", CMPL_BODY
    p = prompt_length(path, body)
    with pytest.raises(httpx.RemoteProtocolError):
        events(gateway, path, body, faulted("close-mid-stream", p + 3, p + 6, p + 9))
    assert 'gateway_resumes_total{outcome="failed"}' in gateway.metrics()


def test_a_silent_replica_is_resumed_after_the_idle_timeout(rig) -> None:
    gateway, _ = rig
    path, body = "/v1/chat/completions", CHAT_BODY
    reference = events(gateway, path, body, {"x-request-id": "silent"})
    resumed = events(gateway, path, body, {"x-request-id": "silent",
                                           **faulted("stall-mid-stream", prompt_length(path, body) + 7)})
    assert normalized(resumed) == normalized(reference)


def test_token_ids_reach_the_client_only_when_asked(rig) -> None:
    gateway, _ = rig
    path = "/v1/completions"
    body = dict(CMPL_BODY, return_token_ids=True)
    reference = events(gateway, path, body, {"x-request-id": "ids"})
    resumed = events(gateway, path, body, {"x-request-id": "ids",
                                           **faulted("close-mid-stream", prompt_length(path, body) + 9)})
    assert normalized(resumed) == normalized(reference)
    first = json.loads(resumed[0][6:])["choices"][0]
    assert first["prompt_token_ids"] == prompt_ids(False, body)
    ids = [t for e in resumed[:-1] for t in json.loads(e[6:])["choices"][0]["token_ids"]]
    assert len(ids) == body["max_tokens"]


def test_the_openai_sdk_reads_a_resumed_stream_as_one(rig) -> None:
    from openai import OpenAI

    gateway, _ = rig
    client = OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=20)
    p = prompt_length("/v1/chat/completions", CHAT_BODY)
    stream = client.chat.completions.create(
        model="mock", messages=CHAT_BODY["messages"], max_tokens=30, stream=True,
        stream_options={"include_usage": True}, extra_headers=faulted("close-mid-stream", p + 4, p + 20))
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(prompt_ids(True, CHAT_BODY), 30)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == p


REFUSED = [
    ("seed", {"seed": 7}),
    ("penalty", {"frequency_penalty": 0.5}),
    ("penalty", {"presence_penalty": 0.5}),
    ("n", {"n": 2}),
    ("logprobs", {"logprobs": 2}),
    ("logprobs", {"echo": True}),
    ("guided", {"response_format": {"type": "json_object"}}),
    ("guided", {"guided_regex": "[a-z]+"}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("stop", {"stop": ["dark forest"]}),
]


@pytest.mark.parametrize("reason,extra", REFUSED, ids=[f"{r}-{next(iter(e))}" for r, e in REFUSED])
def test_streams_a_resume_could_not_reproduce_fail_visibly(rig, reason: str, extra: dict) -> None:
    gateway, _ = rig
    path, body = "/v1/completions", dict(CMPL_BODY, **extra)
    with pytest.raises(httpx.RemoteProtocolError):
        events(gateway, path, body, faulted("close-mid-stream", prompt_length(path, CMPL_BODY) + 4))
    assert f'gateway_resumes_total{{outcome="refused_{reason}"}}' in gateway.metrics()


class _ReadFields(dict):
    """A request body that notes every field read from it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("chat", [False, True])
def test_every_field_a_refusal_reads_makes_a_body_take_the_checks(chat: bool) -> None:
    """refusal() returns at once for a body with none of the fields it reads: a check on a field missing from that
    list would never run, and such a stream would be resumed when it cannot be reproduced."""
    body = _ReadFields({"n": 1, "prompt": [1, 2]})  # a field of the list, refused by none: every check runs
    assert resume.refusal(body, chat) is None
    assert body.read - {"prompt"} <= resume._REFUSAL_FIELDS


def test_a_replica_without_token_ids_is_not_resumed(rig) -> None:
    gateway, _ = rig
    path, body = "/v1/chat/completions", CHAT_BODY
    with pytest.raises(httpx.RemoteProtocolError):
        events(gateway, path, body, {"x-mock-no-token-ids": "1",
                                     **faulted("close-mid-stream", prompt_length(path, body) + 4)})
    assert 'gateway_resumes_total{outcome="refused_no_token_ids"}' in gateway.metrics()


def test_all_replicas_dead_fails_visibly(stack: Stack) -> None:
    replicas = [stack.replica("a"), stack.replica("b")]
    gateway = stack.gateway([stack.router(replicas)], replicas, "--resume-limit", "3", "--outlier-failures", "0")
    path, body = "/v1/chat/completions", CHAT_BODY
    p = prompt_length(path, body)
    with pytest.raises(httpx.RemoteProtocolError):
        events(gateway, path, body, faulted("close-mid-stream", p + 3, p + 6, p + 9))
    # Both replicas broke this stream; neither was tried twice.
    assert sum(r.stats()["faulted"] for r in replicas) == 2
    assert 'gateway_resumes_total{outcome="failed"}' in gateway.metrics()
    # The gateway keeps serving.
    assert httpx.post(f"{gateway.url}/v1/completions", json=dict(CMPL_BODY, stream=False)).status_code == 200


def test_resume_off_leaves_the_request_untouched(stack: Stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica])
    events(gateway, "/v1/completions", CMPL_BODY)
    assert "return_token_ids" not in replica.stats()["last_request"]["body"]
    with pytest.raises(httpx.RemoteProtocolError):
        events(gateway, "/v1/completions", CMPL_BODY,
               faulted("close-mid-stream", prompt_length("/v1/completions", CMPL_BODY) + 3))
    assert "gateway_resumes_total{" not in gateway.metrics()


def test_a_replica_failing_in_a_row_is_ejected_with_growing_backoff(stack: Stack) -> None:
    good = stack.replica("good")
    bad = stack.replica("bad", "--fault", "status-500")  # its /health still says 200
    gateway = stack.gateway([stack.router([good, bad])], [good, bad], "--outlier-failures", "3",
                            "--outlier-ejection-s", "0.5", "--outlier-max-ejection-s", "5")
    body = dict(CMPL_BODY, stream=False)

    def statuses(n: int) -> list[int]:
        return [httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=10).status_code for _ in range(n)]

    assert statuses(12).count(500) == 3  # three in a row, then out of rotation
    routes = {t["replica_id"]: t for t in gateway.routes()["targets"]}
    assert routes["bad"]["ejected"] and routes["bad"]["ejections"] == 1 and routes["bad"]["healthy"]
    assert 'gateway_outlier_ejections_total{replica="bad"} 1.0' in gateway.metrics()
    wait_until(lambda: not {t["replica_id"]: t for t in gateway.routes()["targets"]}["bad"]["ejected"],
               what="the ejection ends")
    # Still failing when it comes back: ejected again, for twice as long.
    assert statuses(12).count(500) == 3
    wait_until(lambda: "ejected for 1.0 s" in gateway.log(), what="the second, longer ejection")


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT_BODY), ("/v1/completions", CMPL_BODY)],
                         ids=["chat", "completions"])
@pytest.mark.parametrize("written", [30.0, "30"], ids=["float", "string"])
def test_max_tokens_written_as_a_float_or_a_string_bounds_the_resumed_stream(rig, path: str, body: dict,
                                                                           written: object) -> None:
    """vLLM reads max_tokens 30.0 and "30" as 30 (pydantic): a resume must ask for the rest of those 30, never more."""
    gateway, _ = rig
    body = dict(body, max_tokens=written, stream_options={"include_usage": True})
    p = prompt_length(path, body)
    resumed = events(gateway, path, body, {"x-request-id": f"lax-{written}-{path[-6:]}",
                                           **faulted("close-mid-stream", f"{p + 13}@{p}")})
    chat = "chat" in path
    check_one_stream(resumed, chat)
    assert content(resumed) == greedy_text(prompt_ids(chat, body), 30)
    assert json.loads(resumed[-2][6:])["usage"]["completion_tokens"] == 30


@pytest.mark.parametrize("relay", ["native", "python"])
def test_a_resumed_part_the_pump_does_not_follow_is_counted(stack: Stack, relay: str) -> None:
    """A continuation whose events are not vLLM's compact JSON (the mock writes them as json.dumps does): the C pump
    does not rewrite them byte for byte (Stream.unmatched), so the stream breaks at the first one, which /-/metrics
    counts; with no resume left the client's stream is cut. The Python relay re-serializes them: one whole stream."""
    replicas = [stack.replica("r1"), stack.replica("r2")]
    gateway = stack.gateway([], replicas, "--resume-limit", "1", "--outlier-failures", "0",
                            "--native-relay" if relay == "native" else "--no-native-relay")
    # ttft_ms (the continuation inherits it): its events come after its head. Events in the read that brings a
    # continuation's head the pump does not take when it cannot follow them: the Python path relays that stream.
    path, body = "/v1/completions", dict(CMPL_BODY, ttft_ms=30)
    p = prompt_length(path, body)
    reference = events(gateway, path, body, {"x-request-id": "spaced"})
    # The original request (from length p) dies after 4 tokens; its continuation (from p + 4) writes blanks.
    headers = {"x-request-id": "spaced", "x-mock-spaced-from": str(p + 1),
               **faulted("close-mid-stream", f"{p + 4}@{p}")}
    if relay == "native":
        with pytest.raises(httpx.RemoteProtocolError):
            events(gateway, path, body, headers)
        metrics = gateway.metrics()
        assert "gateway_native_relay_unmatched_events_total 1.0" in metrics
        assert 'gateway_resumes_total{outcome="failed"} 1.0' in metrics
    else:
        assert normalized(events(gateway, path, body, headers)) == normalized(reference)
        assert "gateway_native_relay_unmatched_events_total 0.0" in gateway.metrics()


def test_the_upstream_body_is_the_clients_bytes_with_return_token_ids_added() -> None:
    """resume.plan adds `"return_token_ids":true` to the client's bytes before its closing brace (no re-serializing);
    a body whose token counts it normalizes, or that names return_token_ids already, is written anew (one key)."""
    from gateway.dataplane.resume import CHAT, plan

    client = b'{"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 5}\n'
    planned = plan(b"POST", CHAT, CHAT, "1.1", client, 2)
    assert planned.upstream_body == client.rstrip()[:-1] + b',"return_token_ids":true}'
    assert json.loads(planned.upstream_body) == {**json.loads(client), "return_token_ids": True}
    for body, max_tokens in (({"max_tokens": "5"}, 5), ({"max_tokens": 5, "return_token_ids": False}, 5)):
        document = {"model": "mock", "messages": [], "stream": True, **body}
        upstream = plan(b"POST", CHAT, CHAT, "1.1", json.dumps(document).encode(), 2).upstream_body
        assert upstream.count(b"return_token_ids") == 1
        assert json.loads(upstream) == {**document, "max_tokens": max_tokens, "return_token_ids": True}
    asked = json.dumps({"model": "mock", "messages": [], "stream": True, "return_token_ids": True}).encode()
    assert plan(b"POST", CHAT, CHAT, "1.1", asked, 2).upstream_body is None  # sent as the client wrote it
