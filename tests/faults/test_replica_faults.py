"""Replica faults: what the client sees, and that the gateway serves afterwards."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.conftest import CHAT, wait_until

pytestmark = pytest.mark.faults


def chat(gateway, **kwargs) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=15, **kwargs)


def test_replica_killed_before_its_head_is_retried_elsewhere_and_the_client_sees_success(stack) -> None:
    slow = stack.replica("slow", "--ttft-ms", "30000")
    fast = stack.replica("fast")
    router = stack.router([slow, fast], "--health-interval-s", "0")
    gateway = stack.gateway([router], [slow, fast])
    with httpx.Client(timeout=15) as client:
        # Round robin: one of the first two requests waits on the slow replica; kill it while it waits.
        responses = {}
        import threading

        def call(i: int) -> None:
            responses[i] = client.post(f"{gateway.url}/v1/chat/completions", json=CHAT)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: gateway.routes()["targets"][0]["in_flight"] == 1, what="a request waits on 'slow'")
        slow.child.kill()
        for thread in threads:
            thread.join(15)
    assert [r.status_code for r in responses.values()] == [200, 200]
    assert {r.headers["x-replica-id"] for r in responses.values()} == {"fast"}


def test_replica_stalling_mid_stream_hits_the_idle_timeout(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([stack.router([replica])], [replica], "--idle-timeout-s", "0.5")
    body = dict(CHAT, stream=True, max_tokens=3, itl_ms=5000)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=15) as response:
            assert response.status_code == 200
            list(response.iter_bytes())
    assert time.monotonic() - started < 4  # cut by the gateway, not by the replica finishing
    wait_until(lambda: replica.stats()["aborted"] == 1, what="the stalled stream aborted at the replica")
    assert chat(gateway).status_code == 200


def test_slow_client_pauses_the_replica_and_memory_stays_bounded(stack) -> None:
    """The replica would write ~1 GB as fast as it can; the client does not read. Gateway RSS must stay flat,
    and the stream must still be running at the replica: socket buffers alone cannot hold it (kernel autotuning
    lets a few MB sit in each of them, which is why the stream is this long)."""
    replica = stack.replica("a", "--max-model-len", "10000000")
    gateway = stack.gateway([stack.router([replica])], [replica])

    def rss_kib() -> int:
        with open(f"/proc/{gateway.child.pid}/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS"))

    body = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":5000000,"stream":true}'
    before = rss_kib()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        sock.recv(1024)
        # Wait until the replica is blocked by backpressure: its progress stops.
        def stalled() -> bool:
            first = rss_kib()
            time.sleep(0.3)
            return abs(rss_kib() - first) < 256
        wait_until(stalled, deadline_s=30, what="relay stalls under backpressure")
        grown = rss_kib() - before
        assert replica.stats()["in_flight"] == 1
    assert grown < 8 * 1024, f"gateway grew by {grown} KiB while the client did not read"
    wait_until(lambda: replica.stats()["aborted"] == 1, what="the replica sees the abort")
    assert chat(gateway).status_code == 200


def test_replica_refusing_connections_marks_it_down_until_it_returns(stack) -> None:
    a = stack.replica("a")
    b = stack.replica("b")
    gateway = stack.gateway([], [a, b], "--health-fast-interval-s", "0.1", "--health-interval-s", "0.2")
    port = a.port
    a.child.kill()
    for _ in range(6):
        assert httpx.get(f"{gateway.url}/v1/models").headers["x-replica-id"] == "b"
    wait_until(lambda: not gateway.routes()["targets"][0]["healthy"], what="a marked down")
    stack.replica("a", port=port)
    wait_until(lambda: gateway.routes()["targets"][0]["healthy"], what="a back up after rise checks")
    seen = {httpx.get(f"{gateway.url}/v1/models").headers["x-replica-id"] for _ in range(6)}
    assert seen == {"a", "b"}
