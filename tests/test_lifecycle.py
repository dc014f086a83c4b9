"""Lifecycle: graceful drain on SIGTERM, drain timeout, several workers on one port."""

from __future__ import annotations

import signal
import socket
import time

import httpx

from gateway.stacks.procs import port_open
from tests.conftest import CHAT, read_until_close, wait_until

STREAM = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":%d,"stream":true}'


def open_stream(port: int, tokens: int, then: bytes = b"") -> socket.socket:
    body = STREAM % tokens
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s%s" % (len(body), body, then))
    return sock


def test_sigterm_drains_streams_in_flight_then_exits_0(stack) -> None:
    replica = stack.replica("a", "--itl-ms", "20")
    gateway = stack.gateway([stack.router([replica])], [replica])
    # A 50-token stream (~1 s), with a readiness probe pipelined behind it on the same connection.
    sock = open_stream(gateway.port, 50, then=b"GET /-/ready HTTP/1.1\r\nhost: x\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    gateway.child.signal(signal.SIGTERM)
    wait_until(lambda: not port_open("127.0.0.1", gateway.port), deadline_s=5, what="listener closed at once")
    rest = first + read_until_close(sock)
    sock.close()
    stream, _, probe = rest.partition(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert stream.count(b"data: {") == 50 + 1  # role chunk + 50 tokens: nothing lost
    assert probe.startswith(b"HTTP/1.1 503") and b"x-serve-reason: draining" in probe
    assert gateway.child.proc.wait(timeout=10) == 0
    assert replica.stats()["completed"] == 1 and replica.stats()["aborted"] == 0


def test_drain_timeout_bounds_shutdown(stack) -> None:
    replica = stack.replica("a", "--itl-ms", "100")
    gateway = stack.gateway([stack.router([replica])], [replica], "--drain-timeout-s", "1")
    sock = open_stream(gateway.port, 10000)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    gateway.child.signal(signal.SIGTERM)
    assert gateway.child.proc.wait(timeout=10) == 0
    assert 0.9 < time.monotonic() - started < 5
    sock.close()
    wait_until(lambda: replica.stats()["aborted"] == 1, what="the cut stream aborted at the replica")


def test_two_workers_share_the_port(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([stack.router([replica])], [replica], "--workers", "2")
    pids = set()
    for _ in range(40):
        with httpx.Client() as client:  # new connection each time: the kernel spreads them
            assert client.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200
            pids.add(client.get(f"{gateway.url}/-/routes").json().get("pid"))
    assert len(pids) == 2
    gateway.child.signal(signal.SIGTERM)
    assert gateway.child.proc.wait(timeout=10) == 0
