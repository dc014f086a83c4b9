"""The C pump's own failure (PUMP_ERROR: epoll, memory) is the gateway's, never the replica's: the stream is cut
with reason gateway_error, and neither the replica's failure counters nor passive outlier ejection hear of it.

The gateway runs in this process so the test can reach the pump's fault injection (`_pump._fault`, the hook
tests/test_pump_unit.py uses); the replica is a real process and the stream goes over real sockets.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from gateway.config import resolve
from gateway.dataplane.pumping import _pump
from gateway.process.server import Gateway
from tests.conftest import CHAT, wait_until

pytestmark = pytest.mark.skipif(_pump is None, reason="the C stream pump is not built")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series of /-/metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_pump_failure_mid_stream_is_the_gateways_error_not_the_replicas(stack) -> None:
    replica = stack.replica("slow", "--itl-ms", "20")
    config = resolve(None, {"GATEWAY_REPLICAS": f"{replica.replica_id}={replica.url}", "GATEWAY_ACCESS_LOG": "false",
                            "GATEWAY_OUTLIER_FAILURES": "1"})
    gateway = Gateway(config)
    await gateway.start(socket.create_server(("127.0.0.1", 0)))
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            body = {**CHAT, "stream": True, "max_tokens": 200}
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                chunks = response.aiter_raw()
                await chunks.__anext__()
                assert gateway.state.pump.active == 1  # the body is in the pump
                _pump._fault("epoll_wait", -1)  # its next wait fails: every stream it holds ends with PUMP_ERROR
                with pytest.raises(httpx.RemoteProtocolError):  # cut: the client sees a broken stream
                    async for _ in chunks:
                        pass
            _pump._fault("epoll_wait", 0)
            deadline = time.monotonic() + 10
            while True:  # the request is counted as its connection closes
                text = (await client.get(f"{url}/-/metrics")).text
                if sample(text, "gateway_requests_total", reason="gateway_error") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            assert sample(text, "gateway_requests_total", reason="gateway_error") == 1, text
            assert sample(text, "gateway_requests_total", reason="upstream_died_mid_response") == 0
            # Not the replica's failure: no failure counted, and (one failure would eject it here) still in rotation.
            assert sample(text, "gateway_replica_failures_total", replica=replica.replica_id) == 0
            assert sample(text, "gateway_upstream_died_total", replica=replica.replica_id) == 0
            assert sample(text, "gateway_replica_ejected", replica=replica.replica_id) == 0
            # The broken pump lets go of new streams: the Python path relays them, from the same replica.
            response = await client.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True})
            assert response.status_code == 200 and b"[DONE]" in response.content
    finally:
        _pump._fault("epoll_wait", 0)
        await gateway.drain()
        await gateway.close()
