"""Admission under overload (issue 22) through real processes: mock vLLM replicas with a fixed capacity
(--max-num-seqs), the gateway with API keys, httpx clients on 127.0.0.1.

Behaviour only (who is served, in what order, what the shed get); the timing figures are in
scripts/bench_admission.py. The queue's policy in isolation: tests/test_admission_unit.py.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson

from gateway.security.keys import digest_of
from tests.conftest import Gateway, Stack, wait_until

KEYS = {"A": "sk-key-a-0123456789", "B": "sk-key-b-0123456789", "low": "sk-low-0123456789",
        "high": "sk-high-0123456789", "svc": "sk-svc-0123456789", "cheat": "sk-cheat-0123456789"}
FIELDS = {"high": "priority = 10\n", "svc": "may_set_priority = true\n"}
SHED = ("queue_full", "queue_timeout")


def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "keys.toml"
    path.write_text("".join(f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key).hex()}"\n{FIELDS.get(name, "")}\n'
                            for name, key in KEYS.items()))
    return str(path)


def body(tokens: int = 10, itl_ms: float = 30) -> dict:
    return {"model": "mock", "prompt": "hello", "max_tokens": tokens, "stream": True, "itl_ms": itl_ms}


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 if none)."""
    text = httpx.get(f"{gateway.url}/-/metrics", headers=auth("A"), timeout=5).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if match:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(2))
    return total


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


class Outcome:
    """One streamed request as the client saw it."""

    def __init__(self, key: str, status: int, reason: str, retry_after: str | None, text: str, done_at: float):
        self.key, self.status, self.reason, self.retry_after, self.text, self.done_at = \
            key, status, reason, retry_after, text, done_at

    def __repr__(self) -> str:
        return f"{self.key}:{self.status}:{self.reason}"


async def stream(client: httpx.AsyncClient, key: str, payload: dict, headers: dict | None = None) -> Outcome:
    async with client.stream("POST", "/v1/completions", json=payload, headers={**auth(key), **(headers or {})}) as r:
        raw = await r.aread()
    text = ""
    if r.status_code == 200:
        for line in raw.split(b"\n"):
            if line.startswith(b"data: {"):
                text += orjson.loads(line[6:])["choices"][0]["text"]
        assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    return Outcome(key, r.status_code, r.headers.get("x-serve-reason", ""), r.headers.get("retry-after"), text,
                   time.monotonic())


def assert_served_or_shed(outcomes: list[Outcome], tokens: int) -> None:
    """Nothing lost silently: a whole stream, or 429 with a named reason and Retry-After."""
    for o in outcomes:
        if o.status == 200:
            assert len(o.text.split()) == tokens, o.text
        else:
            assert o.status == 429 and o.reason in SHED and o.retry_after and int(o.retry_after) >= 1, o


def test_a_flooding_key_is_queued_and_shed_while_the_other_key_is_served(stack: Stack, tmp_path: Path) -> None:
    replica = stack.replica("r1", "--max-num-seqs", "2")
    gateway = stack.gateway([], [replica], "--api-keys-file", keys_file(tmp_path), "--saturation-in-flight", "2",
                            "--queue-size", "6", "--queue-timeout-s", "5")

    async def run() -> tuple[list[Outcome], list[Outcome]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                     limits=httpx.Limits(max_connections=100)) as client:
            flood = [asyncio.create_task(stream(client, "A", body())) for _ in range(30)]
            await asyncio.to_thread(wait_until, lambda: metric(gateway, "gateway_queue_depth", key="A") >= 6,
                                    20, 0.02, "A's requests filling the queue")
            b = [await stream(client, "B", body()) for _ in range(3)]
            return list(await asyncio.gather(*flood)), b

    flood, b = asyncio.run(run())
    assert [o.status for o in b] == [200, 200, 200]
    assert_served_or_shed(flood + b, 10)
    served = [o for o in flood if o.status == 200]
    shed = [o for o in flood if o.status == 429]
    assert served and any(o.reason == "queue_full" for o in shed)
    # B went ahead of A's requests already waiting: some of them finished after B's first one.
    assert any(o.done_at > b[0].done_at for o in served)
    assert metric(gateway, "gateway_queue_shed_total", key="B") == 0
    assert metric(gateway, "gateway_queue_shed_total", key="A", reason="queue_full") == \
        sum(o.reason == "queue_full" for o in shed)
    # The engine never queued: the gateway held the flood (its own waiting queue stayed empty).
    assert replica.stats()["faulted"] == 0


def test_high_band_overtakes_a_waiting_low_band_and_x_priority_only_counts_when_allowed(
        stack: Stack, tmp_path: Path) -> None:
    replica = stack.replica("r1", "--max-num-seqs", "2")
    gateway = stack.gateway([], [replica], "--api-keys-file", keys_file(tmp_path), "--saturation-in-flight", "2",
                            "--queue-size", "100", "--queue-timeout-s", "60")

    async def run() -> tuple[list[Outcome], dict[str, Outcome]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            low = [asyncio.create_task(stream(client, "low", body())) for _ in range(16)]
            await asyncio.to_thread(wait_until, lambda: metric(gateway, "gateway_queue_depth", band="0") >= 10,
                                    20, 0.02, "the low band waiting")
            firsts = {}
            for name, headers in (("high", None), ("svc", {"x-priority": "10"})):
                firsts[name] = await stream(client, name, body(), headers)
                # It went ahead of the low band: low requests queued before it are still waiting.
                assert metric(gateway, "gateway_queue_depth", band="0") >= 1, name
            cheat = asyncio.create_task(stream(client, "cheat", body(), {"x-priority": "10"}))
            outcomes = list(await asyncio.gather(*low, cheat))
            return outcomes, firsts

    outcomes, firsts = asyncio.run(run())
    assert [o.status for o in firsts.values()] == [200, 200]
    assert_served_or_shed(outcomes, 10)
    assert all(o.status == 200 for o in outcomes)  # no timeout, no full queue: every low request served
    assert metric(gateway, "gateway_queue_wait_seconds_count", band="10", key="svc") == 1
    # A key not allowed to set its band stays in its own: its x-priority is ignored.
    assert metric(gateway, "gateway_queue_wait_seconds_count", band="0", key="cheat") == 1
    assert metric(gateway, "gateway_queue_wait_seconds_count", band="10", key="cheat") == 0


def test_a_client_leaving_the_queue_leaves_at_once_and_a_long_wait_gets_429_queue_timeout(
        stack: Stack, tmp_path: Path) -> None:
    replica = stack.replica("r1", "--max-num-seqs", "1")
    gateway = stack.gateway([], [replica], "--api-keys-file", keys_file(tmp_path), "--saturation-in-flight", "1",
                            "--queue-timeout-s", "3")
    long = body(tokens=20, itl_ms=400)  # ~8 s on the replica's one slot
    results: list[httpx.Response] = []
    blocker = threading.Thread(target=lambda: results.append(
        httpx.post(f"{gateway.url}/v1/completions", json=long, headers=auth("A"), timeout=30)))
    blocker.start()
    wait_until(lambda: replica.stats()["in_flight"] == 1, what="the replica's slot taken")
    raw = socket.create_connection(("127.0.0.1", gateway.port))
    payload = orjson.dumps(long)
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\ncontent-type: "
                b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (KEYS["B"].encode(), len(payload), payload))
    wait_until(lambda: metric(gateway, "gateway_queue_depth", key="B") == 1, what="B waiting")
    raw.close()
    # Gone from the queue at once, long before its timeout (3 s) or a free slot (~8 s).
    wait_until(lambda: metric(gateway, "gateway_queue_depth", key="B") == 0, deadline_s=2, what="B leaving")
    started = time.monotonic()
    shed = httpx.post(f"{gateway.url}/v1/completions", json=long, headers=auth("B"), timeout=30)
    assert shed.status_code == 429 and shed.headers["x-serve-reason"] == "queue_timeout"
    assert int(shed.headers["retry-after"]) >= 1 and shed.json()["error"]["code"] == "queue_timeout"
    assert time.monotonic() - started < 7  # shed at its timeout, not served when the slot freed
    blocker.join()
    assert results[0].status_code == 200
    # The request that left never reached the replica.
    assert replica.stats()["requests"] == 1
    log = gateway.log()
    assert '"reason":"queue_timeout"' in log and '"queued_ms":' in log


def test_engine_saturation_from_vllm_metrics_queues_in_the_gateway(stack: Stack, tmp_path: Path) -> None:
    replica = stack.replica("r1", "--max-num-seqs", "2")
    gateway = stack.gateway([], [replica], "--api-keys-file", keys_file(tmp_path), "--saturation-engine",
                            "--engine-metrics-interval-s", "0.05")

    async def run() -> list[Outcome]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            first = [asyncio.create_task(stream(client, "A", body(tokens=20, itl_ms=50))) for _ in range(4)]
            # The scrape sees the engine queueing (4 sent, 2 slots): the gateway holds what comes next.
            await asyncio.to_thread(wait_until, lambda: metric(gateway, "gateway_queue_depth", key="A") >= 1
                                    or any(t.done() for t in first), 20, 0.01, "queueing")
            more = [asyncio.create_task(stream(client, "A", body(tokens=20, itl_ms=50))) for _ in range(6)]
            return list(await asyncio.gather(*first, *more))

    outcomes = asyncio.run(run())
    assert all(o.status == 200 for o in outcomes), outcomes
    assert metric(gateway, "gateway_queue_wait_seconds_count", key="A") >= 1


def test_all_routers_killed_loses_no_request_with_router_fallback_least_loaded(stack: Stack) -> None:
    replicas = [stack.replica("r1", "--itl-ms", "5"), stack.replica("r2", "--itl-ms", "5")]
    routers = [stack.router(replicas), stack.router(replicas)]
    gateway = stack.gateway(routers, replicas, "--router-fallback", "least-loaded", "--log-level", "info")
    statuses: list[int] = []
    stop = threading.Event()

    def user() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            while not stop.is_set():
                r = client.post("/v1/completions", json={"model": "mock", "prompt": "hi", "max_tokens": 8,
                                                         "stream": True})
                statuses.append(r.status_code)

    users = [threading.Thread(target=user) for _ in range(4)]
    for thread in users:
        thread.start()
    wait_until(lambda: len(statuses) >= 40, what="traffic through the routers")
    for router in routers:
        router.child.signal(signal.SIGKILL)
    before = len(statuses)
    wait_until(lambda: len(statuses) >= before + 80, what="traffic with every router dead")
    stop.set()
    for thread in users:
        thread.join()
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    fallbacks = metric(gateway, "gateway_router_fallbacks_total", reason="router_unreachable")
    assert fallbacks >= 70  # the requests routed just before the kill went through a router
    assert '"router_fallback":"router_unreachable"' in gateway.log()


def test_a_router_answering_5xx_falls_back_and_a_4xx_is_still_the_answer(stack: Stack) -> None:
    replica = stack.replica("r1")
    failing = stack.router([replica], "--fault", "status-503")
    refusing = stack.router([replica], "--fault", "status-400")
    with_fallback = stack.gateway([failing], [replica], "--router-fallback", "least-loaded")
    without = stack.gateway([failing], [replica])  # static mode: off unless asked for
    four_hundred = stack.gateway([refusing], [replica], "--router-fallback", "least-loaded")
    chat = {"model": "mock", "prompt": "hi", "max_tokens": 3}
    assert httpx.post(f"{with_fallback.url}/v1/completions", json=chat, timeout=10).status_code == 200
    assert metric(with_fallback, "gateway_router_fallbacks_total", reason="router_non_200") == 1
    off = httpx.post(f"{without.url}/v1/completions", json=chat, timeout=10)
    assert off.status_code == 503 and off.headers["x-serve-reason"] == "router_non_200"
    bad = httpx.post(f"{four_hundred.url}/v1/completions", json=chat, timeout=10)
    assert bad.status_code == 400 and bad.headers["x-serve-reason"] == "router_non_200"


def test_the_wait_in_the_queue_is_a_span_before_the_router(stack: Stack, tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from tests.otlp_receiver import Receiver

    receiver = Receiver().start()
    try:
        replica = stack.replica("r1", "--max-num-seqs", "1")
        router = stack.router([replica])
        gateway = stack.gateway([router], [replica], "--api-keys-file", keys_file(tmp_path),
                                "--saturation-in-flight", "1", "--otlp-endpoint", receiver.url,
                                "--trace-sample-ratio", "0")
        blocker = threading.Thread(target=lambda: httpx.post(f"{gateway.url}/v1/completions", json=body(10, 50),
                                                             headers=auth("A"), timeout=30))
        blocker.start()
        wait_until(lambda: replica.stats()["in_flight"] == 1, what="the replica's slot taken")
        trace_id = "%032x" % 0xADA
        traced = {**auth("B"), "traceparent": f"00-{trace_id}-{'%016x' % 0xB}-01"}
        answer = httpx.post(f"{gateway.url}/v1/completions", json=body(3, 1), headers=traced, timeout=30)
        blocker.join()
        assert answer.status_code == 200
        spans = wait_until(lambda: {s.name: s for s in receiver.trace(trace_id)} if
                           {"queue", "router"} <= {s.name for s in receiver.trace(trace_id)} else None,
                           20, what="the queue and router spans")
        queue, routed, root = spans["queue"], spans["router"], spans["POST /v1/completions"]
        assert queue.parent_span_id == root.span_id and root.start_ns == queue.start_ns
        # The router decided when the request left the queue, not before.
        assert queue.end_ns == routed.start_ns and queue.end_ns > queue.start_ns
        assert queue.attributes["gateway.queue.outcome"] == "admitted"
    finally:
        receiver.stop()
