"""File descriptors: the soft limit is raised to the hard one at start, the connections accepted at once fit the
limit (4 fds per pumped stream), and past it new clients get a clean 503, never an EMFILE blamed on a replica."""

from __future__ import annotations

import os
import socket
import sys

import httpx

from gateway.stacks.procs import Child, free_port, python_module
from tests.conftest import LOG_DIR, Gateway, read_until_close, wait_until

# Set RLIMIT_NOFILE, then become the gateway (the limit a service manager or `ulimit -n` would give it).
_WITH_LIMIT = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), "
               "int(sys.argv[2]))); os.execv(sys.executable, [sys.executable, *sys.argv[3:]])")


def limited_gateway(stack, name: str, soft: int, hard: int, *args: str, port: int | None = None) -> Gateway:
    port = port or free_port()
    log_path = f"{LOG_DIR}/{name}-gateway-{port}.log"
    if os.path.exists(log_path):
        os.unlink(log_path)
    argv = [sys.executable, "-c", _WITH_LIMIT, str(soft), str(hard),
            *python_module("gateway", "serve", "--host", "127.0.0.1", "--port", str(port), *args)[1:]]
    child = Child(argv, port=port, log_path=log_path)
    stack.children.append(child)
    child.start()
    return Gateway(port, child, log_path)


def nofile(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files")


def test_the_soft_limit_is_raised_to_the_hard_limit_and_said(stack) -> None:
    replica = stack.replica("a")
    gateway = limited_gateway(stack, "fd-raise", 1024, 8192, "--replica", f"a={replica.url}")
    assert nofile(gateway.child.pid) == (8192, 8192)
    assert "process_max_fds 8192.0" in gateway.metrics()  # the fd headroom, for operators
    wait_until(lambda: "file descriptors: limit 8192 (raised from 1024)" in gateway.log(), what="the startup line")
    assert httpx.get(f"{gateway.url}/-/healthz", timeout=5).status_code == 200


def test_under_a_low_fd_limit_clients_past_it_get_503_and_no_replica_is_blamed(stack) -> None:
    replica = stack.replica("a", "--itl-ms", "50")
    gateway = limited_gateway(stack, "fd-low", 160, 160, "--replica", f"a={replica.url}")
    line = wait_until(lambda: [l for l in gateway.log().splitlines() if "file descriptors: limit 160" in l],
                      what="the fd line")[0]
    cap = int(line.split(" holds ")[1].split()[0])
    assert 4 <= cap < 40, line  # the default max_connections (4096) lowered to what 160 fds hold
    body = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":40,"stream":true}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    streams = []
    for _ in range(cap):  # every connection the limit holds carries a stream (4 fds each)
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
        sock.sendall(request)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        streams.append((sock, first))
    # 30 more at once, while those streams run: without the cap they would need 120 more fds than the limit has
    # (EMFILE at accept or at the replica connect); with it, each is told 503, none is reset.
    extra = [socket.create_connection(("127.0.0.1", gateway.port), timeout=20) for _ in range(30)]
    for sock in extra:
        sock.sendall(request)
    refused = [read_until_close(sock) for sock in extra]
    for sock in extra:
        sock.close()
    assert all(answer.startswith(b"HTTP/1.1 503") and b"x-serve-reason: overloaded" in answer for answer in refused)
    for sock, first in streams:
        whole = first + read_until_close(sock)
        sock.close()
        assert whole.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), whole[-200:]
    metrics = gateway.metrics()
    assert 'gateway_replica_failures_total{replica="a"}' not in metrics
    assert 'gateway_upstream_died_total{replica="a"}' not in metrics
    assert replica.stats()["aborted"] == 0


def test_a_limit_that_cannot_hold_one_connection_is_a_configuration_error() -> None:
    import subprocess

    done = subprocess.run([sys.executable, "-c", _WITH_LIMIT, "40", "40",
                           *python_module("gateway", "serve", "--replica", "http://127.0.0.1:9",
                                          "--port", str(free_port()))[1:]],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "gateway: error: the file descriptor limit (40, hard 40) cannot hold one connection" in done.stderr


def test_tls_handshakes_under_way_count_against_the_cap(stack, tmp_path) -> None:
    """Over TLS a connection holds its descriptor from accept, through a handshake that may never end: it counts."""
    import ssl

    from tests.certs import TestCA

    ca = TestCA(tmp_path)
    server = ca.issue("server")
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], "--tls-cert", server.cert, "--tls-key", server.key,
                            "--max-connections", "2")
    context = ssl.create_default_context(cafile=ca.path)

    def get() -> bytes:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                return read_until_close(tls)

    stalled = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in range(2)]  # no handshake
    try:
        answer = wait_until(lambda: (a := get()).startswith(b"HTTP/1.1 503") and a, what="a 503 while both stall")
        assert b"x-serve-reason: overloaded" in answer
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: (a := get()).startswith(b"HTTP/1.1 200"), what="served once the stalled handshakes are gone")
    assert 'gateway_connections_refused_total{limit="max_connections"}' in httpx.get(
        f"https://127.0.0.1:{gateway.port}/-/metrics", verify=context, timeout=5).text
