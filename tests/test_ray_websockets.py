"""A Ray Serve app with a WebSocket route, through the gateway and through Ray's own HAProxy (issue 23).

One private Ray head (gateway.stacks.ray.RayStack), the FastAPI app of replicas/serve_ws_app.py at /ws
next to the mock LLM app at /: the upgrade goes to the WebSocket app by route prefix, to one of its
replicas, and the tunnel carries messages both ways, as Ray's HAProxy does.

    PYTHONPATH=$PWD .venv/bin/pytest -m ray tests/test_ray_websockets.py -v
"""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest
from websockets.sync.client import connect

pytest.importorskip("ray", reason="needs the [ray] extra: ray[serve]==2.60.0")
pytest.importorskip("pyarrow", reason="Ray's LLMRouter import needs pyarrow")

from gateway.stacks.ray import RayStack
from tests.conftest import CHAT, start_ray_gateway, wait_until

pytestmark = pytest.mark.ray


def deploy_ws_app(stack: RayStack) -> str:
    done = subprocess.run([stack.python, "-m", "replicas.serve_ws_app", "--address", stack.address,
                           "--http-port", str(stack.http_port), "--route-prefix", "/ws"],
                          env={**os.environ, **stack.env()}, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()


def test_a_serve_websocket_route_through_the_gateway_and_through_haproxy() -> None:
    stack = RayStack(draining_s=1.0)
    gateway = None
    try:
        stack.start()
        stack.deploy("--replicas", "1")  # the mock LLM app at / (the WebSocket app's prefix must win over it)
        print(deploy_ws_app(stack))
        gateway = start_ray_gateway(stack, "ws")
        wait_until(lambda: "/ws" in gateway.routes().get("apps", gateway.routes()) or "/ws" in str(gateway.routes()),
                   deadline_s=30, what="the gateway discovers the WebSocket app")
        assert httpx.get(gateway.url + "/ws/hello", timeout=30).json()["replica"]
        for port, who in ((gateway.port, "gateway"), (stack.http_port, "haproxy")):
            seen = set()
            for _ in range(4):
                with connect(f"ws://127.0.0.1:{port}/ws/echo", proxy=None, open_timeout=30, max_size=None) as conn:
                    seen.add(conn.recv(timeout=30))
                    conn.send("over " + who)
                    assert conn.recv(timeout=30) == "over " + who
                    message = os.urandom(1 << 20)
                    conn.send(message)
                    assert conn.recv(timeout=30) == message
            print(who, "reached replicas", sorted(seen))
            assert seen and all(seen)
        # The LLM app at / still answers through the same gateway.
        assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
        assert 'gateway_tunnels_total{outcome="client_closed"} 4.0' in gateway.metrics()
    finally:
        if gateway is not None:
            gateway.child.stop()
        stack.shutdown_serve()
        stack.stop()
