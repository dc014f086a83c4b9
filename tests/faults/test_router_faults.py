"""Router faults beyond the failure-reason tests: many requests, both routers, keep-alive churn."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.conftest import CHAT

pytestmark = pytest.mark.faults


def test_one_of_two_routers_down_loses_nothing_under_concurrency(stack) -> None:
    replicas = [stack.replica("a"), stack.replica("b")]
    live = stack.router(replicas)
    doomed = stack.router(replicas)
    gateway = stack.gateway([live, doomed], replicas)

    def call(_: int) -> int:
        return httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=15).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        first = list(pool.map(call, range(100)))
        doomed.child.kill()
        second = list(pool.map(call, range(200)))
    assert first.count(200) == 100 and second.count(200) == 200
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_router_restart_on_the_same_port_is_transparent(stack) -> None:
    """Pooled connections to the old router process are stale; the gateway resends on fresh ones."""
    replicas = [stack.replica("a")]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas)
    with httpx.Client() as client:
        for _ in range(5):
            assert client.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200
        port = router.port
        router.child.stop()
        stack.router(replicas, port=port)
        statuses = [client.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code for _ in range(5)]
    assert statuses == [200] * 5


def test_a_router_answering_5xx_fails_over_to_the_next_one(stack) -> None:
    replicas = [stack.replica("a")]
    failing = stack.router(replicas, "--fault", "status-503")
    healthy = stack.router(replicas)
    gateway = stack.gateway([failing, healthy], replicas)
    statuses = [httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10).status_code
                for _ in range(10)]
    assert statuses == [200] * 10
    assert failing.stats()["requests"] >= 1 and healthy.stats()["requests"] == 10
