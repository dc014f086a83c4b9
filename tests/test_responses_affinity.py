"""Responses API affinity (gateway/dataplane/responses.py): a `previous_response_id` follow-up reaches the
replica that stored the response, through any gateway sharing the cluster secret, with no shared store.

Mock replicas keep `/v1/responses` state in process as vLLM does (a follow-up elsewhere: 404 "not found");
the router alternates replicas (round robin), so without affinity every other follow-up fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from gateway.dataplane.responses import Affinity
from replicas.mock_engine import greedy_text, prompt_ids
from tests.conftest import Gateway, Replica, Router, Stack

SECRET = "test-cluster-secret"


# -- the id codec, in process
def test_an_id_names_its_replica_for_any_holder_of_the_secret() -> None:
    a, b = Affinity(SECRET.encode()), Affinity(SECRET.encode())
    replica = "SERVE_REPLICA::llm#LLMServer#abc123"
    first, second = a.new_id(replica), a.new_id(replica)
    assert first != second and first.startswith("resp_") and replica not in first
    assert b.replica_of(first) == replica and b.replica_of(second) == replica


def test_an_id_that_does_not_authenticate_is_not_ours() -> None:
    ours = Affinity(SECRET.encode())
    for _ in range(200):  # fresh nonces: every last character, whose unused bits must not pass either
        made = ours.new_id("r1")
        assert Affinity(b"another cluster").replica_of(made) is None
        for tampered in (made[:-1] + ("A" if made[-1] != "A" else "B"), made[:8] + made[9:], made + "x"):
            assert ours.replica_of(tampered) is None
    for other in ("resp_0123456789abcdef0123456789abcdef", "resp_", "hello", None, 17, {"id": made}, "resp_" + "x" * 2000):
        assert ours.replica_of(other) is None


def test_which_requests_are_concerned() -> None:
    aff = Affinity(SECRET.encode())
    tag = aff.new_id("r2")
    plan = aff.plan(b"POST", b"/v1/responses", json.dumps({"input": "hi", "previous_response_id": tag}).encode())
    assert plan is not None and plan.pinned == "r2"
    body = plan.body_for("r2")
    assert body is not None and aff.replica_of(json.loads(body)["request_id"]) == "r2"
    assert plan.body_for("r2") is None  # a retry on the same replica keeps its id
    plan = aff.plan(b"POST", b"/llm/v1/responses", b'{"input": "hi", "request_id": "mine"}')
    assert plan is not None and plan.pinned is None and plan.body_for("r1") is None  # the client's own id stays
    assert aff.plan(b"GET", b"/v1/responses/" + tag.encode(), b"").pinned == "r2"  # type: ignore[union-attr]
    assert aff.plan(b"POST", b"/v1/responses/" + tag.encode() + b"/cancel", b"").pinned == "r2"  # type: ignore[union-attr]
    assert aff.plan(b"GET", b"/v1/responses/resp_not_ours", b"") is None
    assert aff.plan(b"POST", b"/v1/responses", b"not json") is None
    assert aff.plan(b"POST", b"/v1/chat/completions", b"{}") is None


# -- end to end
@dataclass
class Rig:
    replicas: list[Replica]
    router: Router
    a: Gateway
    b: Gateway
    plain: Gateway


@pytest.fixture(scope="module")
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    s = Stack(f"{request.module.__name__}-rig")
    try:
        replicas = [s.replica("r1"), s.replica("r2")]
        router = s.router(replicas)  # round robin
        a = s.gateway([router], replicas, "--cluster-secret", SECRET)
        b = s.gateway([router], replicas, "--cluster-secret", SECRET)
        plain = s.gateway([router], replicas, "--no-responses-affinity")
        yield Rig(replicas, router, a, b, plain)
    finally:
        s.stop()


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=20)


def expected(turns: list[tuple[str, str]], question: str, n: int = 16) -> str:
    messages = []
    for asked, answered in turns:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": question})
    return greedy_text(prompt_ids(True, {"messages": messages}), n)


def test_a_conversation_stays_on_its_replica_through_either_gateway(rig: Rig) -> None:
    raw = sdk(rig.a).responses.with_raw_response.create(model="mock", input="Tell me a story")
    first = raw.parse()
    home = raw.headers["x-replica-id"]
    turns = [("Tell me a story", first.output_text)]
    assert first.output_text == expected([], "Tell me a story")
    previous = first.id
    for turn in range(6):
        gateway = rig.b if turn % 2 == 0 else rig.a
        question = f"and then {turn}?"
        raw = sdk(gateway).responses.with_raw_response.create(model="mock", input=question,
                                                              previous_response_id=previous)
        reply = raw.parse()
        assert raw.headers["x-replica-id"] == home
        assert reply.output_text == expected(turns, question)  # the replica had the whole conversation
        assert reply.previous_response_id == previous
        turns.append((question, reply.output_text))
        previous = reply.id


def test_without_affinity_a_follow_up_lands_on_the_wrong_replica(rig: Rig) -> None:
    first = sdk(rig.plain).responses.create(model="mock", input="Tell me a story")
    statuses = []
    for _ in range(4):
        try:
            sdk(rig.plain).responses.create(model="mock", input="more", previous_response_id=first.id)
            statuses.append(200)
        except openai.NotFoundError:
            statuses.append(404)
    assert statuses.count(404) == 2  # the issue: every other follow-up reaches the replica without the state


def test_get_and_cancel_follow_the_id(rig: Rig) -> None:
    created = httpx.post(rig.a.url + "/v1/responses", json={"model": "mock", "input": "keep this"}).json()
    for _ in range(4):
        got = httpx.get(f"{rig.b.url}/v1/responses/{created['id']}")
        assert got.status_code == 200 and got.json()["id"] == created["id"]


def test_a_streamed_response_has_the_tagged_id_and_can_be_followed(rig: Rig) -> None:
    events = list(sdk(rig.a).responses.create(model="mock", input="stream it", stream=True))
    created = events[0].response
    completed = events[-1].response
    assert created.id == completed.id and Affinity(SECRET.encode()).replica_of(created.id) in ("r1", "r2")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == completed.output_text == expected([], "stream it")
    for _ in range(2):
        follow = sdk(rig.b).responses.create(model="mock", input="again", previous_response_id=completed.id)
        assert follow.output_text == expected([("stream it", text)], "again")


def test_an_id_we_did_not_make_is_routed_as_usual(rig: Rig) -> None:
    made = sdk(rig.a).responses.create(model="mock", input="hi").id
    forged = made[:-2] + ("AA" if made[-2:] != "AA" else "BB")
    before = rig.router.stats()["requests"]
    answer = httpx.post(rig.a.url + "/v1/responses", json={"model": "mock", "input": "x",
                                                           "previous_response_id": forged})
    assert answer.status_code == 404 and "not found" in answer.json()["error"]["message"]  # the replica's answer
    assert "x-serve-reason" not in answer.headers
    assert rig.router.stats()["requests"] == before + 1  # routed by the router like any POST


def test_a_client_request_id_is_kept(rig: Rig) -> None:
    answer = httpx.post(rig.a.url + "/v1/responses", json={"model": "mock", "input": "x", "request_id": "resp_mine"})
    assert answer.json()["id"] == "resp_mine"


def test_a_gone_replica_is_a_clear_404_from_any_gateway(rig: Rig, stack: Stack) -> None:
    raw = sdk(rig.a).responses.with_raw_response.create(model="mock", input="remember me")
    home = raw.headers["x-replica-id"]
    other = next(r for r in rig.replicas if r.replica_id != home)
    # A gateway of the same cluster whose target set no longer has that replica (scaled down, redeployed).
    later = stack.gateway([], [other], "--cluster-secret", SECRET)
    served = other.stats()["requests"]
    with pytest.raises(openai.NotFoundError) as gone:
        sdk(later).responses.create(model="mock", input="more", previous_response_id=raw.parse().id)
    assert gone.value.response.headers["x-serve-reason"] == "response_replica_gone"
    assert gone.value.body["code"] == "response_replica_gone"  # type: ignore[index]
    assert other.stats()["requests"] == served  # answered by the gateway, not by a replica without the state


def test_the_workers_of_one_gateway_share_its_secret(stack: Stack) -> None:
    """No --cluster-secret: the gateway draws one before its workers fork, so an id made by one worker is read by
    every other (connections spread over the workers by SO_REUSEPORT)."""
    replicas = [stack.replica("r1"), stack.replica("r2")]
    gateway = stack.gateway([stack.router(replicas)], replicas, "--workers", "2")
    first = httpx.post(gateway.url + "/v1/responses", json={"model": "mock", "input": "hello"}, timeout=20).json()
    pids, previous = set(), first["id"]
    for turn in range(8):
        with httpx.Client(timeout=20) as client:  # a new connection each time: any worker may take it
            pids.add(client.get(gateway.url + "/-/routes").json()["pid"])
        answer = httpx.post(gateway.url + "/v1/responses", timeout=20,
                            json={"model": "mock", "input": f"more {turn}", "previous_response_id": previous})
        assert answer.status_code == 200, answer.text
        previous = answer.json()["id"]
    assert len(pids) == 2  # both workers served
