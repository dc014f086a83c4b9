"""A replica that writes like uvicorn (vLLM's API server): head and body in separate writes, random splits.

Regression tests for issue 19: keep-alive decided on the first read of a response, a client that
never reads holding its replica connection, and `100 Continue` written into another response.
Real processes and sockets (tests/conftest.py); the replica runs with `--write-mode uvicorn`.
"""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from tests.conftest import CHAT, wait_until

UVICORN = ("--write-mode", "uvicorn")


def connects(gateway) -> int:
    """Replica connections the gateway has opened (every connect is timed: gateway_upstream_connect_seconds)."""
    match = re.search(r"^gateway_upstream_connect_seconds_count (\S+)$", gateway.metrics(), re.M)
    return int(float(match.group(1))) if match else 0


@pytest.mark.parametrize("kind", ["chat", "models"])
def test_uvicorn_replica_keeps_its_pooled_connections(stack, kind) -> None:
    replica = stack.replica("u", *UVICORN)
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica])
    with httpx.Client(timeout=10) as client:
        for _ in range(200):
            if kind == "chat":
                response = client.post(f"{gateway.url}/v1/chat/completions", json=CHAT)
            else:
                response = client.get(f"{gateway.url}/v1/models")
            assert response.status_code == 200, response.text
            assert response.json()  # the whole body, whatever the split
    assert connects(gateway) <= 3


def test_uvicorn_replica_streams_and_errors_relay_whole(stack) -> None:
    replica = stack.replica("u", *UVICORN)
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica])
    with httpx.Client(timeout=10) as client:
        for _ in range(30):
            with client.stream("POST", f"{gateway.url}/v1/chat/completions",
                               json=dict(CHAT, stream=True, max_tokens=20)) as response:
                lines = [line for line in response.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            bad = client.post(f"{gateway.url}/v1/chat/completions", json={"model": "mock", "max_tokens": "x"})
            assert bad.status_code == 400
    assert connects(gateway) <= 3


def test_client_that_never_reads_is_cut_after_idle_timeout(stack) -> None:
    replica = stack.replica("u", "--max-model-len", "10000000")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica], "--idle-timeout-s", "1")
    body = (b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5000000}')
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # set before connect: no autotuning
    sock.connect(("127.0.0.1", gateway.port))
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: replica.stats()["in_flight"] == 1, what="the stream starts")
        # Nothing read: the gateway's buffers fill, then after idle_timeout_s it gives up on this client
        # and closes the replica connection (the engine sees the abort).
        wait_until(lambda: replica.stats()["aborted"] == 1, deadline_s=30, what="the replica request is aborted")
        wait_until(lambda: gateway.routes()["in_flight"] == 0, what="the gateway forgets the request")
        wait_until(lambda: 'reason="client_timeout"' in gateway.metrics(), what="client_timeout counted")
        wait_until(lambda: '"reason": "client_timeout"' in gateway.log() or '"reason":"client_timeout"'
                   in gateway.log(), what="client_timeout in the access log")
    finally:
        sock.close()


def test_pipelined_expect_continue_waits_for_its_turn(stack) -> None:
    """A 100 Continue for a pipelined request must not land inside the response before it."""
    replica = stack.replica("u", *UVICORN, "--itl-ms", "5")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica])
    stream = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":30}'
    second = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(stream), stream)
                     + b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(second))
        data = b""
        deadline = time.monotonic() + 10
        while b"0\r\n\r\n" not in data and time.monotonic() < deadline:
            data += sock.recv(65536)
        first_end = data.index(b"0\r\n\r\n") + 5
        assert b"100 Continue" not in data[:first_end]  # nothing inside the first response
        # Once the first response is done the second request is current: now its 100 comes, then its body is read.
        while b"100 Continue" not in data and time.monotonic() < deadline:
            data += sock.recv(65536)
        assert data[first_end:].startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(second)
        while data.count(b"HTTP/1.1 200") < 2 and time.monotonic() < deadline:
            data += sock.recv(65536)
        assert data.count(b"HTTP/1.1 200") == 2
