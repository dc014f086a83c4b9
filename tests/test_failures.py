"""Every failure gets a meaningful status, an OpenAI-shaped error and X-Serve-Reason; the gateway keeps serving."""

from __future__ import annotations

import socket
import threading

import httpx
import openai
import pytest

from gateway.stacks.procs import free_port
from tests.conftest import CHAT, wait_until


def post(gateway, **kwargs) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=15, **kwargs)


def assert_error(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["x-serve-reason"] == reason
    error = response.json()["error"]
    assert error["code"] == reason and error["message"] and error["type"]


def test_router_unreachable(stack) -> None:
    replicas = [stack.replica("a")]
    gateway = stack.gateway([], replicas, "--router", f"http://127.0.0.1:{free_port()}")
    assert_error(post(gateway), 503, "router_unreachable")
    # GETs never need the router.
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 200


def test_router_timeout(stack) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas, "--fault", "slow")
    gateway = stack.gateway([router], replicas, env={"RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S": "0.5"})
    assert_error(post(gateway), 504, "router_timeout")


def test_router_5xx_is_router_non_200(stack) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas, "--fault", "status-503")
    gateway = stack.gateway([router], replicas)
    assert_error(post(gateway), 503, "router_non_200")


def test_router_4xx_keeps_its_meaning(stack) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas, "--fault", "status-400")
    gateway = stack.gateway([router], replicas)
    response = post(gateway)
    assert response.status_code == 400
    assert response.headers["x-serve-reason"] == "router_non_200"
    assert "detail" in response.json()  # the router's own body


@pytest.mark.parametrize("fault", ["garbage", "truncated_json", "wrong_types", "huge_body"])
def test_malformed_decision(stack, fault: str) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas, "--fault", fault)
    gateway = stack.gateway([router], replicas)
    assert_error(post(gateway), 503, "malformed_decision")
    assert_error(post(gateway), 503, "malformed_decision")  # and it still answers
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 200


def test_unknown_replica_id(stack) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas, "--fault", "unknown_replica")
    strict = stack.gateway([router], replicas, "--strict-replica-id")
    assert_error(post(strict), 503, "unknown_replica_id")
    assert 'gateway_decision_mismatches_total{kind="unknown_replica_id"} 1.0' in strict.metrics()
    # Not strict (the default for static lists): a known host:port is accepted, and the mismatch counted.
    lenient = stack.gateway([router], replicas)
    assert post(lenient).status_code == 200
    assert 'gateway_decision_mismatches_total{kind="replica_id"} 1.0' in lenient.metrics()


def test_router_cannot_send_traffic_outside_the_target_set(stack) -> None:
    """A compromised router names 127.0.0.2:9; nothing may ever connect there (no SSRF)."""
    trap = socket.socket()
    trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    trap.bind(("127.0.0.2", 9))
    trap.listen(16)
    trap.settimeout(0.2)
    accepted = []

    def watch() -> None:
        while not stop.is_set():
            try:
                accepted.append(trap.accept())
            except OSError:
                pass

    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        replicas = [stack.replica("a")]
        router = stack.router(replicas, "--fault", "outside_target")
        gateway = stack.gateway([router], replicas)
        for _ in range(5):
            assert_error(post(gateway), 503, "unknown_replica_id")
        assert router.stats()["requests"] == 5
    finally:
        stop.set()
        watcher.join()
        trap.close()
    assert accepted == []


def test_replica_down_is_replica_unavailable(stack) -> None:
    replica = stack.replica("a")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica])
    replica.child.kill()
    assert_error(post(gateway), 503, "replica_unavailable")


def test_no_healthy_replica(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], "--health-interval-s", "0.2", "--health-fast-interval-s", "0.1")
    replica.child.kill()
    wait_until(lambda: not gateway.routes()["targets"][0]["healthy"], what="replica marked down")
    assert_error(httpx.get(f"{gateway.url}/v1/models"), 503, "no_replicas")


def test_openai_sdk_sees_a_typed_error(stack) -> None:
    replicas = [stack.replica("a")]
    gateway = stack.gateway([], replicas, "--router", f"http://127.0.0.1:{free_port()}")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="mock", messages=CHAT["messages"])
    assert caught.value.status_code == 503
    assert caught.value.response.headers["x-serve-reason"] == "router_unreachable"
