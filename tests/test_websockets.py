"""WebSockets through the gateway, end to end: the `websockets` client, the gateway, Starlette replicas under uvicorn.

HAProxy parity (issue 23): an upgrade goes to a replica like any GET and is tunnelled both ways with
backpressure until either side closes; API keys, per-key in-flight limits and the CORS origin check
apply; tunnels show in the metrics, the access log and the drain. The tunnel in process: test_tunnel.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
from dataclasses import dataclass

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from gateway.stacks.procs import Child, free_port, python_module
from tests.conftest import LOG_DIR, Gateway, Stack, read_until_close, wait_until


@dataclass
class WsReplica:
    port: int
    replica_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=5).json()


def ws_replica(stack: Stack, replica_id: str) -> WsReplica:
    port = free_port()
    argv = python_module("replicas.ws_app", "--port", str(port), "--replica-id", replica_id)
    stack._start(Child(argv, port=port, log_path=f"{LOG_DIR}/{stack.name}-{replica_id}.log"))
    return WsReplica(port, replica_id)


def ws_gateway(stack: Stack, replicas: list[WsReplica], *args: str, routers=()) -> Gateway:
    return stack.gateway(list(routers), [], *args, extra_replicas=[f"{r.replica_id}={r.url}" for r in replicas])


def ws(gateway: Gateway, path: str, **kwargs):
    kwargs.setdefault("max_size", 32 * 1024 * 1024)
    return connect(f"ws://127.0.0.1:{gateway.port}{path}", proxy=None, open_timeout=10, **kwargs)


def metric(gateway: Gateway, line_start: str) -> float:
    for line in gateway.metrics().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def access_records(gateway: Gateway) -> list[dict]:
    return [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def rig(request: pytest.FixtureRequest):
    s = Stack(f"{request.module.__name__}-rig")
    try:
        replicas = [ws_replica(s, "ws1"), ws_replica(s, "ws2")]
        gateway = ws_gateway(s, replicas)
        yield gateway, replicas
    finally:
        s.stop()


def test_echo_text_and_bytes_and_the_records_of_a_tunnel(rig) -> None:
    gateway, replicas = rig
    assert httpx.get(gateway.url + "/hello").text.startswith("hello from ws")  # plain HTTP still goes through
    with ws(gateway, "/ws/whoami", additional_headers={"x-request-id": "tunnel-1"}) as conn:
        who = conn.recv(timeout=10)
        assert who in ("ws1", "ws2")
        assert metric(gateway, "gateway_tunnels_active") == 1
        conn.send("hello")
        assert conn.recv(timeout=10) == "hello"
        conn.send(b"\x00\x01binary")
        assert conn.recv(timeout=10) == b"\x00\x01binary"
    replica = next(r for r in replicas if r.replica_id == who)
    wait_until(lambda: replica.stats()["last_close_code"] == 1000, what="the replica sees the client's close")
    wait_until(lambda: metric(gateway, "gateway_tunnels_active") == 0, what="the tunnel is counted closed")
    assert metric(gateway, 'gateway_tunnel_bytes_total{direction="in"}') > len("hello") + 8
    assert metric(gateway, 'gateway_tunnel_bytes_total{direction="out"}') > len("hello") + 8 + 3
    record = wait_until(lambda: [r for r in access_records(gateway) if r["request_id"] == "tunnel-1"],
                        what="the tunnel's access log line")[0]  # type: ignore[index]
    assert record["status"] == 101 and record["upgrade"] == "websocket" and record["replica_id"] == who
    assert record["bytes_in"] > 0 and record["bytes"] > 0 and record["total_ms"] > 0
    headers = replica.stats()["last_headers"]
    assert headers["upgrade"].lower() == "websocket" and headers["x-request-id"] == "tunnel-1"


def test_a_10_mb_message_both_ways(rig) -> None:
    gateway, _ = rig
    message = os.urandom(10 * 1024 * 1024)
    with ws(gateway, "/ws/echo") as conn:
        conn.send(message)
        assert hashlib.sha256(conn.recv(timeout=60)).digest() == hashlib.sha256(message).digest()


def raw_handshake(port: int, path: str) -> socket.socket:
    """A WebSocket client on a bare socket (RFC 6455 section 4.1) that reads only when told to: the
    `websockets` client reads every frame into its own memory, so it cannot show backpressure."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), key))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing past the head is taken off the socket
    assert head.startswith(b"HTTP/1.1 101 "), head
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert b"sec-websocket-accept: " + accept.lower() in head.lower()
    return sock


def test_a_client_that_stops_reading_holds_the_replica_back(rig) -> None:
    """Backpressure: the replica floods 256 MB at a client that does not read; the replica's sends block and the
    gateway's memory stays bounded; when the client reads again, every byte arrives, then the replica's close."""
    gateway, replicas = rig
    total, size = 256 * 1024 * 1024, 64 * 1024
    pid = gateway.child.proc.pid  # type: ignore[union-attr]
    before = rss_kib(pid)
    sock = raw_handshake(gateway.port, f"/ws/flood?total={total}&size={size}")
    with sock:
        sent = [-1]

        def stalled() -> bool:
            now = max(r.stats()["flood_sent"] for r in replicas)
            still, sent[0] = now == sent[0], now
            return still and now > 0

        wait_until(stalled, deadline_s=30, interval_s=0.5, what="the replica's sends stall")
        grown = rss_kib(pid) - before
        print(f"stalled after {sent[0] / 2**20:.1f} MiB of {total / 2**20:.0f} MiB; gateway RSS +{grown / 1024:.1f} MiB")
        assert sent[0] < 32 * 1024 * 1024  # socket buffers and the high-water marks, never the whole flood
        assert grown < 32 * 1024
        # Every frame: 0x82, 127 and a 64-bit length (RFC 6455 section 5.2), then the close frame with 1000.
        expected = total + (total // size) * 10 + 4
        received = 0
        last = b""
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
            last = (last + chunk)[-4:]
        assert received == expected
        assert last == b"\x88\x02\x03\xe8"


def test_the_replica_closes(rig) -> None:
    gateway, _ = rig
    with ws(gateway, "/ws/server-close") as conn:
        conn.send("go")
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=10)
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")


def test_the_client_closes_with_a_code(rig) -> None:
    gateway, replicas = rig
    with ws(gateway, "/ws/whoami") as conn:
        who = conn.recv(timeout=10)
        conn.close(code=4321, reason="done here")
    replica = next(r for r in replicas if r.replica_id == who)
    wait_until(lambda: replica.stats()["last_close_code"] == 4321, what="the replica sees the client's close code")


def test_a_refused_handshake_is_relayed(rig) -> None:
    gateway, _ = rig
    with pytest.raises(InvalidStatus) as refused:
        ws(gateway, "/ws/refuse")
    assert refused.value.response.status_code == 403


def test_other_upgrades_are_refused(rig) -> None:
    gateway, replicas = rig
    accepted = sum(r.stats()["accepted"] for r in replicas)
    for head in (b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                 b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
                 b"POST /ws/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Content-Length: 0\r\n\r\n",
                 b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(head)
            answer = read_until_close(sock)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"x-serve-reason: bad_request" in answer
    assert sum(r.stats()["accepted"] for r in replicas) == accepted


def test_the_tunnel_timeout_closes_a_silent_tunnel(stack: Stack) -> None:
    replica = ws_replica(stack, "ws1")
    gateway = ws_gateway(stack, [replica], "--tunnel-timeout-s", "0.5")
    with ws(gateway, "/ws/echo", ping_interval=None) as conn:
        conn.send("still here")
        assert conn.recv(timeout=10) == "still here"
        with pytest.raises(ConnectionClosed):
            conn.recv(timeout=20)  # nothing moves: the gateway closes the tunnel
    wait_until(lambda: 'gateway_tunnels_total{outcome="timeout"} 1.0' in gateway.metrics(), what="counted a timeout")


def test_keys_and_their_in_flight_limit_apply_to_upgrades(stack: Stack, tmp_path) -> None:
    replica = ws_replica(stack, "ws1")
    keys = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"sk-one").hexdigest()
    keys.write_text(f'[[keys]]\nname = "one"\nsha256 = "{digest}"\nmax_in_flight = 1\n')
    gateway = ws_gateway(stack, [replica], "--api-keys-file", str(keys))
    with pytest.raises(InvalidStatus) as refused:
        ws(gateway, "/ws/echo")
    assert refused.value.response.status_code == 401
    auth = {"Authorization": "Bearer sk-one"}
    with ws(gateway, "/ws/echo", additional_headers=auth) as conn:
        conn.send("a")
        assert conn.recv(timeout=10) == "a"
        with pytest.raises(InvalidStatus) as limited:
            ws(gateway, "/ws/echo", additional_headers=auth)  # the open tunnel counts against the key
        assert limited.value.response.status_code == 429
        assert "authorization" not in replica.stats()["last_headers"]  # the client's key is the gateway's
    wait_until(lambda: metric(gateway, "gateway_tunnels_active") == 0, what="the first tunnel is closed")
    with ws(gateway, "/ws/echo", additional_headers=auth) as conn:
        conn.send("b")
        assert conn.recv(timeout=10) == "b"


def test_the_origin_of_a_handshake_is_checked(stack: Stack) -> None:
    replica = ws_replica(stack, "ws1")
    gateway = ws_gateway(stack, [replica], "--cors-origins", "https://app.example")
    with pytest.raises(InvalidStatus) as refused:
        ws(gateway, "/ws/echo", origin="https://evil.example")
    assert refused.value.response.status_code == 403
    assert refused.value.response.headers["x-serve-reason"] == "origin_not_allowed"
    with ws(gateway, "/ws/echo", origin="https://app.example") as conn:
        conn.send("ok")
        assert conn.recv(timeout=10) == "ok"
    with ws(gateway, "/ws/echo") as conn:  # no Origin: not a browser
        conn.send("ok")
        assert conn.recv(timeout=10) == "ok"


def test_a_session_header_sends_the_upgrade_through_the_router(stack: Stack) -> None:
    from tests.conftest import Replica

    replicas = [ws_replica(stack, "ws1"), ws_replica(stack, "ws2")]
    as_mock = [Replica(r.port, None, r.replica_id) for r in replicas]  # type: ignore[arg-type]
    router = stack.router(as_mock, "--policy", "consistent_hash")
    gateway = ws_gateway(stack, replicas, routers=[router])
    seen = set()
    for _ in range(4):
        with ws(gateway, "/ws/whoami", additional_headers={"x-session-id": "user-42"}) as conn:
            seen.add(conn.recv(timeout=10))
    assert len(seen) == 1  # one session, one replica
    assert router.stats()["requests"] == 4
    with ws(gateway, "/ws/whoami") as conn:  # no session: least-loaded, like any GET
        conn.recv(timeout=10)
    assert router.stats()["requests"] == 4


def test_a_drain_waits_for_tunnels_then_closes_them(stack: Stack) -> None:
    replica = ws_replica(stack, "ws1")
    gateway = ws_gateway(stack, [replica], "--drain-timeout-s", "2")
    with ws(gateway, "/ws/echo") as quick, ws(gateway, "/ws/echo", ping_interval=None) as slow:
        proc = gateway.child.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in gateway.log(), what="the drain starts")
        # Tunnels keep working during the drain.
        quick.send("during the drain")
        assert quick.recv(timeout=10) == "during the drain"
        quick.close()
        with pytest.raises(ConnectionClosed):
            slow.recv(timeout=20)  # closed by the gateway at the drain timeout
        proc.wait(timeout=20)
    assert "drain timeout" in gateway.log()
    records = [r for r in access_records(gateway) if r.get("upgrade")]
    assert sorted(r["reason"] for r in records) == ["", "draining"]


def test_wss_through_the_tls_listener(stack: Stack, tmp_path) -> None:
    """TLS on the client side: the tunnel takes over the TLS transport as it does a plain one."""
    import ssl

    from tests.certs import TestCA

    ca = TestCA(tmp_path)
    server = ca.issue("server")
    replica = ws_replica(stack, "ws1")
    gateway = ws_gateway(stack, [replica], "--tls-cert", server.cert, "--tls-key", server.key)
    context = ssl.create_default_context(cafile=ca.path)
    message = os.urandom(3 * 1024 * 1024)
    with connect(f"wss://127.0.0.1:{gateway.port}/ws/echo", ssl=context, proxy=None, max_size=None) as conn:
        conn.send("over tls")
        assert conn.recv(timeout=10) == "over tls"
        conn.send(message)
        assert conn.recv(timeout=30) == message
    with connect(f"wss://127.0.0.1:{gateway.port}/ws/server-close", ssl=context, proxy=None) as conn:
        conn.send("go")
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


def test_frames_sent_with_the_handshake_reach_the_replica(rig) -> None:
    """A client that writes its first frame in the same segment as its upgrade request (before the 101): those
    bytes are held while the replica answers, then sent on through the tunnel."""
    gateway, _ = rig
    key = base64.b64encode(os.urandom(16))
    payload, mask = b"early bird", os.urandom(4)
    frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /ws/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n%s" % (key, frame))
        data = b""
        while not data.endswith(bytes([0x81, len(payload)]) + payload):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 101 ")


def test_an_upgrade_after_a_request_on_the_same_connection(rig) -> None:
    gateway, _ = rig
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"hello from" not in data:
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /ws/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key)
        data = b""
        while not (b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1][2:] in (b"ws1", b"ws2")):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
