"""How the gateway talks to the router: keep-alive, body forwarding, session stickiness, failover."""

from __future__ import annotations

import httpx

from tests.conftest import CHAT, wait_until


def post(gateway, body=CHAT, path="/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=10, **kwargs)


def test_router_connections_are_kept_alive(stack) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas)
    with httpx.Client() as client:
        for _ in range(50):
            assert client.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200
    stats = router.stats()
    assert stats["requests"] == 50
    # Ray's Lua opens one TCP connection per request; the gateway reuses one (+1 for our stats call).
    assert stats["connections"] <= 3


def test_body_is_not_forwarded_by_default(basic) -> None:
    post(basic.gateway)
    stats = basic.router.stats()
    assert stats["last_body"] == ""
    assert stats["last_headers"]["content-length"] == "0"


def test_body_forwarding_and_truncation(stack) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas, "--forward-body", "--router-body-cap", "64")
    small = {"model": "mock", "prompt": "hi", "max_tokens": 1}
    assert post(gateway, small, "/v1/completions").status_code == 200
    stats = router.stats()
    assert stats["last_body"] == httpx.Request("POST", "/", json=small).content.decode()
    assert "x-body-truncated" not in stats["last_headers"]

    big = {"model": "mock", "prompt": "x" * 500, "max_tokens": 1}
    total = len(httpx.Request("POST", "/", json=big).content)
    response = post(gateway, big, "/v1/completions")
    assert response.status_code == 200  # the replica still gets the whole body
    stats = router.stats()
    assert stats["last_headers"]["x-body-truncated"] == f"64/{total}"
    assert len(stats["last_body"]) == 64
    assert replicas[0].stats()["last_request"]["body"] == httpx.Request("POST", "/", json=big).content.decode()
    assert "gateway_router_body_truncations_total 1.0" in gateway.metrics()


def test_env_enables_body_forwarding_like_ray(stack) -> None:
    replicas = [stack.replica("a")]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas, env={"RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"})
    post(gateway)
    assert "Hello there" in router.stats()["last_body"]


def test_session_header_pins_to_one_replica(stack) -> None:
    replicas = [stack.replica("a"), stack.replica("b"), stack.replica("c")]
    router = stack.router(replicas, "--policy", "consistent_hash")
    gateway = stack.gateway([router], replicas)
    for session in ("alice", "bob", "carol"):
        seen = {post(gateway, headers={"x-session-id": session}).headers["x-replica-id"] for _ in range(4)}
        seen |= {post(gateway, headers={"x_session_id": session}).headers["x-replica-id"] for _ in range(4)}
        assert len(seen) == 1, f"session {session} hit {seen}"
    assert router.stats()["last_headers"]["x-session-id"] == "carol"


def test_get_requests_go_least_loaded_without_the_router(stack) -> None:
    replicas = [stack.replica("a"), stack.replica("b")]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas)
    # Keep one slow stream open on whichever replica gets it; GETs must then avoid that replica.
    slow = dict(CHAT, stream=True, max_tokens=3, ttft_ms=3000)
    with httpx.Client(timeout=10) as client, client.stream("POST", f"{gateway.url}/v1/chat/completions",
                                                           json=slow) as busy:
        busy_replica = busy.headers["x-replica-id"]
        for _ in range(4):
            response = client.get(f"{gateway.url}/v1/models")
            assert response.status_code == 200
            assert response.headers["x-replica-id"] != busy_replica
    assert router.stats()["requests"] == 1


def test_second_router_takes_over_when_one_is_down(stack) -> None:
    replicas = [stack.replica("a")]
    live = stack.router(replicas)
    dead = stack.router(replicas)
    gateway = stack.gateway([dead, live], replicas)
    dead.child.stop()
    for _ in range(10):
        assert post(gateway).status_code == 200
    assert live.stats()["requests"] == 10


def test_stale_router_connection_is_resent(stack) -> None:
    """The router closes idle keep-alive connections; the gateway must not fail the next request."""
    replicas = [stack.replica("a")]
    router = stack.router(replicas, "--fault", "close_early")
    gateway = stack.gateway([router], replicas)
    for _ in range(10):
        assert post(gateway).status_code == 200


def test_router_request_headers_reach_the_replica(basic) -> None:
    """Client headers are forwarded; router-owned ones (Ray's x-serve-router-*) are stripped."""
    post(basic.gateway, headers={"x-custom": "yes", "x-serve-router-kv-token-key": "forged"})
    last = wait_until(lambda: [r.stats()["last_request"] for r in basic.replicas
                               if r.stats()["last_request"] and "x-custom" in r.stats()["last_request"]["headers"]])
    headers = last[0]["headers"]
    assert headers["x-custom"] == "yes"
    assert "x-serve-router-kv-token-key" not in headers
