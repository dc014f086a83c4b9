"""Drain by migration (issue 23): streams on a replica that leaves the target set move to other replicas.

Long greedy streams run on three mock replicas; one replica leaves the gateway's target set (POST
/-/replicas/ID/drain on the admin listener: what a Serve scale-down does through discovery). After
--drain-migrate-after-s its streams continue elsewhere through resume: every client reads one
uninterrupted stream whose text equals the uninterrupted answer, and the leaving replica has no
request in flight long before those streams end (as it would long before its graceful shutdown).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from replicas.mock_engine import greedy_text, prompt_ids
from tests.conftest import Stack, wait_until
from tests.test_resume import check_one_stream, content

N = 120
ITL_MS = 25  # 3 s per stream: long enough to drain a replica in the middle


def body(i: int, chat: bool) -> dict:
    base = {"model": "mock", "max_tokens": N, "stream": True, "itl_ms": ITL_MS,
            "stream_options": {"include_usage": True}}
    if chat:
        return {**base, "messages": [{"role": "user", "content": f"Tell me long story number {i}"}]}
    return {**base, "prompt": f"Once upon a time, story {i},"}


def test_streams_move_off_a_leaving_replica_and_read_as_one(stack: Stack) -> None:
    replicas = [stack.replica("r1"), stack.replica("r2"), stack.replica("r3")]
    admin = __import__("gateway.stacks.procs", fromlist=["free_port"]).free_port()
    gateway = stack.gateway([stack.router(replicas)], replicas, "--resume-limit", "1",
                            "--drain-migrate-after-s", "0.5", "--admin-port", str(admin), "--outlier-failures", "0")
    streams: dict[int, list[str]] = {}
    started = threading.Barrier(7)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        chat = i % 2 == 0
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            with httpx.Client(timeout=60) as client:
                with client.stream("POST", gateway.url + path, json=body(i, chat)) as response:
                    assert response.status_code == 200
                    raw = b""
                    chunks = response.iter_bytes()
                    raw += next(chunks)
                    started.wait(30)
                    for chunk in chunks:
                        raw += chunk
            streams[i] = raw.decode()[:-2].split("\n\n")
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
            started.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    started.wait(30)  # every stream is under way (each read its first bytes)
    on_r1 = replicas[0].stats()["in_flight"]
    assert on_r1 >= 1  # round robin over 3 replicas: two streams each
    drained_at = time.monotonic()
    answer = httpx.post(f"http://127.0.0.1:{admin}/-/replicas/r1/drain", timeout=10)
    assert answer.status_code == 200 and answer.json()["in_flight"] == on_r1
    wait_until(lambda: replicas[0].stats()["in_flight"] == 0, deadline_s=10, what="r1 has no stream left")
    left_after = time.monotonic() - drained_at
    still_running = sum(1 for thread in threads if thread.is_alive())
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    print(f"\nr1 had {on_r1} streams; empty {left_after:.2f} s after leaving; {still_running} streams still running "
          f"then (each {N * ITL_MS / 1000:.1f} s long)")
    assert left_after < 0.5 + 2.0 and still_running >= 4  # gone long before the streams would have ended
    assert replicas[0].stats()["aborted"] == on_r1  # the gateway stopped its generation
    for i, stream in streams.items():
        chat = i % 2 == 0
        check_one_stream(stream, chat)
        assert content(stream) == greedy_text(prompt_ids(chat, body(i, chat)), N), i
        usage = json.loads(stream[-2][6:])["usage"]
        assert usage["completion_tokens"] == N
        assert "token_ids\":[" not in "".join(stream)
    metrics = httpx.get(f"http://127.0.0.1:{admin}/-/metrics").text
    assert f'gateway_resumes_total{{outcome="migrated"}} {float(on_r1)}' in metrics
    assert 'gateway_resumes_total{outcome="resumed"}' not in metrics
    # Nothing counted r1 as failing: it left, it did not break.
    assert 'gateway_replica_failures_total{replica="r1"}' not in metrics
    routes = httpx.get(f"http://127.0.0.1:{admin}/-/routes").json()
    assert {t["replica_id"] for t in routes["targets"]} == {"r2", "r3"}


def test_draining_a_replica_is_for_the_admin_listener_only(stack: Stack) -> None:
    replica = stack.replica("r1")
    gateway = stack.gateway([], [replica])
    answer = httpx.post(f"{gateway.url}/-/replicas/r1/drain", timeout=10)
    assert answer.status_code == 404
    assert {t["replica_id"] for t in gateway.routes()["targets"]} == {"r1"}


@pytest.mark.parametrize("resume", [False, True])
def test_without_resume_streams_finish_on_the_leaving_replica(stack: Stack, resume: bool) -> None:
    """Resume off, or a stream resume would refuse (a seed): it stays where it is until it ends."""
    replicas = [stack.replica("r1"), stack.replica("r2")]
    admin = __import__("gateway.stacks.procs", fromlist=["free_port"]).free_port()
    extra = ("--resume-limit", "1") if resume else ()
    gateway = stack.gateway([], [replicas[0]], *extra, "--drain-migrate-after-s", "0", "--admin-port", str(admin),
                            extra_replicas=[f"r2={replicas[1].url}"])
    request = dict(body(1, False), max_tokens=40, seed=7)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", gateway.url + "/v1/completions", json=request) as response:
            chunks = response.iter_bytes()
            raw = next(chunks)
            home = next(r for r in replicas if r.stats()["in_flight"])
            assert httpx.post(f"http://127.0.0.1:{admin}/-/replicas/{home.replica_id}/drain").status_code == 200
            for chunk in chunks:
                raw += chunk
    stream = raw.decode()[:-2].split("\n\n")
    assert content(stream) == greedy_text(prompt_ids(False, request), 40)
    assert home.stats()["completed"] == 1 and home.stats()["aborted"] == 0
    assert 'outcome="migrated"' not in httpx.get(f"http://127.0.0.1:{admin}/-/metrics").text


def test_a_stream_still_queued_on_a_leaving_replica_starts_over_elsewhere(stack: Stack) -> None:
    """The head reached the client but no event yet (a request waiting in the engine's queue: here r1 takes 30 s to
    its first token): nothing to resume from, so the original request goes to another replica, whose events
    start the client's stream."""
    slow = stack.replica("r1", "--ttft-ms", "30000")
    fast = stack.replica("r2")
    admin = __import__("gateway.stacks.procs", fromlist=["free_port"]).free_port()
    gateway = stack.gateway([], [slow], "--resume-limit", "1", "--drain-migrate-after-s", "0.2",
                            "--admin-port", str(admin), extra_replicas=[f"r2={fast.url}"])
    wait_until(lambda: len(httpx.get(f"http://127.0.0.1:{admin}/-/routes").json()["targets"]) == 2)
    request = dict(body(3, True), itl_ms=0)
    started = time.monotonic()
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", gateway.url + "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            # The first request of a fresh gateway goes to its first replica (least-loaded, ties rotating from it).
            assert slow.stats()["in_flight"] == 1
            assert httpx.post(f"http://127.0.0.1:{admin}/-/replicas/r1/drain").status_code == 200
            raw = b"".join(response.iter_bytes())
    stream = raw.decode()[:-2].split("\n\n")
    check_one_stream(stream, True)
    assert content(stream) == greedy_text(prompt_ids(True, request), N)
    assert time.monotonic() - started < 10  # not the 30 s the slow replica would have taken
    assert slow.stats()["aborted"] == 1 and fast.stats()["completed"] == 1
    metrics = httpx.get(f"http://127.0.0.1:{admin}/-/metrics").text
    assert 'gateway_resumes_total{outcome="migrated"} 1.0' in metrics


@pytest.mark.parametrize("relay", ["native", "python"])
def test_a_stream_without_token_ids_stays_on_the_leaving_replica(stack: Stack, relay: str) -> None:
    """Events without token ids (a replica that does not return them, as when a reasoning parser hides them): a
    resume could not continue the stream exactly, so draining its replica leaves it there to finish. With the C
    pump relaying it, what the pump saw so far decides, before the stream leaves the pump (it used to be stopped
    first, and the stream cut as refused_no_token_ids: the client lost a stream the Python relay finished)."""
    replicas = [stack.replica("r1"), stack.replica("r2")]
    admin = __import__("gateway.stacks.procs", fromlist=["free_port"]).free_port()
    gateway = stack.gateway([], [replicas[0]], "--resume-limit", "1", "--drain-migrate-after-s", "0.2",
                            "--admin-port", str(admin), "--native-relay" if relay == "native" else "--no-native-relay",
                            extra_replicas=[f"r2={replicas[1].url}"])
    request = body(4, False)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", gateway.url + "/v1/completions", json=request,
                           headers={"x-mock-no-token-ids": "1"}) as response:
            chunks = response.iter_bytes()
            raw = next(chunks)
            assert b'"text":"' in raw  # events went out: there is something a resume would have to continue
            home = next(r for r in replicas if r.stats()["in_flight"])
            assert httpx.post(f"http://127.0.0.1:{admin}/-/replicas/{home.replica_id}/drain").status_code == 200
            for chunk in chunks:  # a cut stream raises httpx.RemoteProtocolError here
                raw += chunk
    stream = raw.decode()[:-2].split("\n\n")
    check_one_stream(stream, False)
    assert content(stream) == greedy_text(prompt_ids(False, request), N)
    assert home.stats()["completed"] == 1 and home.stats()["aborted"] == 0
    metrics = httpx.get(f"http://127.0.0.1:{admin}/-/metrics").text
    assert "gateway_resumes_total{" not in metrics  # neither moved nor refused: it did not break
    assert f"gateway_native_relay_streams_total {1.0 if relay == 'native' else 0.0}" in metrics
