"""Per-replica metric series leave /-/metrics with their replica (Ray replaces replicas, with new ids, on every
redeploy, scale-down and crash: series kept for ever would grow with that churn).

The gateway runs in this process so the test can change its target set the way discovery does
(`TargetSet.replace`, what gateway/controlplane/ray_discovery.py calls); replicas are real processes and every
request and scrape goes over a real socket. tests/test_ray.py checks the same through real Ray discovery.
"""

from __future__ import annotations

import socket

import httpx

from gateway.config import parse_replica, resolve
from gateway.process.server import Gateway
from tests.conftest import CHAT

PER_REPLICA = ("gateway_replica_healthy", "gateway_replica_ejected", "gateway_pool_idle_connections",
               "gateway_time_to_first_byte_seconds_count",
               "gateway_replica_failures_total")


def series_of(text: str, replica_id: str) -> list[str]:
    return [line for line in text.splitlines()
            if not line.startswith("#") and (f'replica="{replica_id}"' in line or f'pool="{replica_id}"' in line)]


async def test_a_removed_replica_leaves_no_series(stack) -> None:
    replicas = [stack.replica("keep"), stack.replica("gone")]
    specs = [parse_replica(f"{r.replica_id}={r.url}") for r in replicas]
    config = resolve(None, {"GATEWAY_REPLICAS": ",".join(f"{r.replica_id}={r.url}" for r in replicas),
                            "GATEWAY_ACCESS_LOG": "false"})
    gateway = Gateway(config)
    sock = socket.create_server(("127.0.0.1", 0))
    await gateway.start(sock)
    try:
        url = f"http://127.0.0.1:{gateway.port}"
        async with httpx.AsyncClient(timeout=10) as client:
            seen: set[str] = set()
            while seen != {"keep", "gone"}:  # least-loaded rotates: both replicas answer within a few requests
                response = await client.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True})
                assert response.status_code == 200
                seen.add(response.headers["x-replica-id"])
            gateway.metrics.replica_failure("gone")  # a failure counted for it (the relay's own call)
            before = series_of((await client.get(f"{url}/-/metrics")).text, "gone")
            assert {line.split("{")[0] for line in before} >= set(PER_REPLICA), before

            gateway.targets.replace([specs[0]])  # "gone" leaves the target set, as on a Ray redeploy

            text = (await client.get(f"{url}/-/metrics")).text
            assert series_of(text, "gone") == []
            assert series_of(text, "keep"), "the remaining replica keeps its series"
            assert not [name for name in gateway.metrics.ttfb.children if name[0] == "gone"]
    finally:
        await gateway.drain()
        await gateway.close()
