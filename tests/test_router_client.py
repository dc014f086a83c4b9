"""router_client on its own, against the standalone router: the layer the gateway builds on."""

from __future__ import annotations

import pytest

from gateway.stacks.procs import free_port
from router_client import Decision, RouterClient, RouterError


async def test_decision_over_one_kept_alive_connection(stack) -> None:
    replica = stack.replica("a")
    router = stack.router([replica])
    client = RouterClient(lambda: [("127.0.0.1", router.port)])
    decisions = [await client.route(b"", b"id-%d" % i) for i in range(20)]
    assert decisions[0] == Decision("127.0.0.1", replica.port, "a", {})
    # one pooled connection, plus the readiness probe of the test harness and the stats call itself
    assert router.stats()["connections"] <= 3
    client.close()


async def test_failover_timeout_and_errors(stack) -> None:
    replica = stack.replica("a")
    live = stack.router([replica])
    dead = ("127.0.0.1", free_port())
    client = RouterClient(lambda: [dead, ("127.0.0.1", live.port)])
    assert (await client.route(b"", b"x")).replica_id == "a"  # whichever comes first, the live one answers

    slow = stack.router([replica], "--fault", "slow")
    client = RouterClient(lambda: [("127.0.0.1", slow.port)], timeout_s=0.3)
    with pytest.raises(RouterError) as caught:
        await client.route(b"", b"x")
    assert caught.value.reason == "router_timeout"

    client = RouterClient(lambda: [dead])
    with pytest.raises(RouterError) as caught:
        await client.route(b"", b"x")
    assert caught.value.reason == "router_unreachable"


async def test_body_forwarding_cap_and_session(stack) -> None:
    replica = stack.replica("a")
    router = stack.router([replica])
    client = RouterClient(lambda: [("127.0.0.1", router.port)], forward_body=True, body_cap=10,
                          session_header="x-session-id")
    await client.route(b'{"prompt": "0123456789abcdef"}', b"x", session=b"s1")
    stats = router.stats()
    assert stats["last_headers"]["x-body-truncated"] == "10/30"
    assert stats["last_headers"]["x-session-id"] == "s1"
    assert stats["last_body"] == '{"prompt":'
