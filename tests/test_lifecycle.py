"""Lifecycle: graceful drain on SIGTERM, drain timeout, several workers on one port."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pytest

from gateway.config import ConfigError, resolve

from gateway.stacks.procs import Child, descendants, free_port, pid_alive, port_open, python_module
from tests.conftest import CHAT, LOG_DIR, read_until_close, wait_until

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


def test_sigterm_mid_upload_serves_that_request(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([stack.router([replica])], [replica])
    body = json.dumps(CHAT).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
    # 100 Continue: the gateway has the head, so the request is under way; half the body follows, then SIGTERM.
    assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(body[:10])
    gateway.child.signal(signal.SIGTERM)
    wait_until(lambda: not port_open("127.0.0.1", gateway.port), deadline_s=5, what="the listener closed")
    sock.sendall(body[10:])  # the upload finishes after the gateway stopped accepting
    answer = read_until_close(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"connection: close" in answer.lower() and b'"finish_reason":"length"' in answer
    assert gateway.child.proc.wait(timeout=10) == 0


def test_min_draining_period_is_a_minimum_served_while_unready(stack) -> None:
    """Ray's RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S: new clients are served (never refused) while /-/ready says 503,
    for at least that long; a stream longer than the period still finishes (it is no maximum)."""
    replica = stack.replica("a", "--itl-ms", "40")
    gateway = stack.gateway([stack.router([replica])], [replica], env={"RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "3"})
    sock = open_stream(gateway.port, 120)  # ~4.8 s: outlives the 3 s period
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    signalled = time.monotonic()
    gateway.child.signal(signal.SIGTERM)
    # Every probe is accepted (a refusal would raise here): 200 until the signal lands, then 503 draining.
    probe = wait_until(lambda: (r := httpx.get(f"{gateway.url}/-/ready", timeout=5)).status_code == 503 and r,
                       what="/-/ready answering 503")
    assert probe.headers["x-serve-reason"] == "draining"
    served = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10)  # a new client, still served
    assert served.status_code == 200 and served.headers["connection"] == "close"
    wait_until(lambda: not port_open("127.0.0.1", gateway.port), deadline_s=10, what="accepting to stop")
    assert time.monotonic() - signalled >= 3.0
    rest = read_until_close(sock)
    sock.close()
    assert rest.count(b"data: {") >= 110 and rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert gateway.child.proc.wait(timeout=10) == 0
    assert replica.stats()["aborted"] == 0


def test_drain_options_take_rays_names() -> None:
    config = resolve(None, {"GATEWAY_REPLICAS": "http://127.0.0.1:1", "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "45",
                            "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": "120"})
    assert (config.min_draining_s, config.drain_timeout_s) == (45.0, 120.0)
    with pytest.raises(ConfigError, match="must be >= 0"):
        resolve(None, {"GATEWAY_REPLICAS": "http://127.0.0.1:1", "GATEWAY_MIN_DRAINING_S": "-1"})


def test_the_drain_timeout_runs_after_the_minimum_draining_period(stack) -> None:
    replica = stack.replica("a", "--itl-ms", "100")
    gateway = stack.gateway([stack.router([replica])], [replica], "--min-draining-s", "1", "--drain-timeout-s", "1")
    sock = open_stream(gateway.port, 10000)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    gateway.child.signal(signal.SIGTERM)
    assert gateway.child.proc.wait(timeout=10) == 0
    assert time.monotonic() - started >= 2.0  # 1 s still accepting, then 1 s for the stream in flight
    sock.close()


def worker_serving(gateway, pid: int) -> bool:
    with httpx.Client() as client:  # a new connection: the kernel picks a worker
        return client.get(f"{gateway.url}/-/routes", timeout=5).json().get("pid") == pid


def two_workers(gateway, gone: int = 0) -> list[int] | None:
    pids = descendants(gateway.child.pid)
    return pids if len(pids) == 2 and gone not in pids else None


def test_a_dead_worker_is_started_again_with_a_backoff(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], "--workers", "2")
    first = wait_until(lambda: two_workers(gateway), what="two workers")
    victim = first[1]
    os.kill(victim, signal.SIGKILL)
    second = wait_until(lambda: two_workers(gateway, victim), what="the worker started again")
    assert re.search(rf"worker \d \(pid {victim}\) was killed by signal 9 after [\d.]+ s; starting it again in 0\.5 s",
                     gateway.log())
    (new,) = set(second) - set(first)
    wait_until(lambda: worker_serving(gateway, new), what="the new worker serving")
    os.kill(new, signal.SIGKILL)  # dies young again: the next start waits longer
    wait_until(lambda: re.search(rf"\(pid {new}\) was killed by signal 9 after [\d.]+ s; starting it again in 1\.0 s",
                                 gateway.log()), what="the backoff doubling")
    wait_until(lambda: two_workers(gateway, new), what="started again")
    for _ in range(20):
        assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
    gateway.child.signal(signal.SIGTERM)
    assert gateway.child.proc.wait(timeout=10) == 0


def test_sighup_before_the_reload_handler_does_not_kill_a_worker(stack) -> None:
    replica = stack.replica("a")
    port = free_port()
    log_path = f"{LOG_DIR}/sighup-early-gateway-{port}.log"
    child = Child(python_module("gateway", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                                "--replica", f"a={replica.url}"), log_path=log_path)
    stack.children.append(child)
    child.start()
    hupped: set[int] = set()
    deadline = time.monotonic() + 20
    # SIGHUP every worker from the moment it exists until the port is open (and a little after): while it is still
    # importing and starting, no reload handler is installed yet.
    while time.monotonic() < deadline and not port_open("127.0.0.1", port, timeout=0.01):
        for pid in descendants(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
                hupped.add(pid)
    assert len(hupped) >= 2 and child.alive()
    assert all(pid_alive(pid) for pid in hupped), open(log_path).read()
    assert "starting it again" not in open(log_path).read()
    for _ in range(10):
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
    child.signal(signal.SIGTERM)
    assert child.proc.wait(timeout=10) == 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the parent's kill() calls")
def test_a_reaped_worker_is_never_signalled_again(stack, tmp_path) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], "--workers", "2")
    first = wait_until(lambda: two_workers(gateway), what="two workers")
    trace = tmp_path / "kill.trace"
    # Only the parent's own kill() calls (no -f): what it forwards, and to which PIDs.
    tracer = subprocess.Popen(["strace", "-qq", "-e", "trace=kill", "-e", "signal=none", "-o", str(trace), "-p",
                               str(gateway.child.pid)],
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: "TracerPid:\t0" not in open(f"/proc/{gateway.child.pid}/status").read(),
                   what="strace attached")
        dead = first[0]
        os.kill(dead, signal.SIGKILL)
        wait_until(lambda: two_workers(gateway, dead), what="the worker started again")
        gateway.child.signal(signal.SIGHUP)  # forwarded to the workers alive
        wait_until(lambda: trace.read_text().count(", SIGHUP)") == 2, what="SIGHUP forwarded to both workers")
        gateway.child.signal(signal.SIGTERM)
        assert gateway.child.proc.wait(timeout=10) == 0
    finally:
        if tracer.poll() is None:  # the parent is gone when the test passes: strace then ends by itself
            tracer.terminate()
        tracer.wait(timeout=10)
    calls = [line for line in trace.read_text().splitlines() if line.startswith("kill(")]
    assert calls and not [line for line in calls if line.startswith(f"kill({dead},")], calls
