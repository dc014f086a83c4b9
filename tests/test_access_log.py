"""The access log's writer against a stdout reader that goes away (EPIPE) or never reads: the gateway serves on,
memory stays bounded, and every dropped line is counted (metric) and said (stderr)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from gateway.stacks.procs import free_port, python_module, wait_port
from tests.conftest import LOG_DIR, wait_until

# The case: a 60 KB x-request-id (under the 64 KiB head limit) is echoed into every line.
BIG_ID = "r" * 60_000
REQUESTS = 1500


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def dropped(url: str) -> float:
    for line in httpx.get(f"{url}/-/metrics", timeout=5).text.splitlines():
        if line.startswith("gateway_access_log_dropped_lines_total "):
            return float(line.split()[1])
    raise AssertionError("no gateway_access_log_dropped_lines_total")


class PipedGateway:
    """A gateway whose stdout (the access log) is a pipe this test holds; stderr goes to a file."""

    def __init__(self, replica_url: str, name: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err_path = f"{LOG_DIR}/{name}-gateway-{self.port}.err"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            python_module("gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                          "--replica", replica_url, *args),
            stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, 20, self.proc)
        assert self.proc.stdout is not None
        self.startup = self.proc.stdout.readline()  # the startup line: stdout works, then the access log follows

    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def hammer(self, count: int) -> None:
        """`count` requests with the big x-request-id on one keep-alive connection, all answered 200."""
        with httpx.Client(timeout=10) as client:
            for _ in range(count):
                response = client.get(f"{self.url}/-/healthz", headers={"x-request-id": BIG_ID})
                assert response.status_code == 200

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        self._err.close()
        return code


@pytest.fixture
def piped(stack, request) -> Iterator[PipedGateway]:
    replica = stack.replica("a")
    gateway = PipedGateway(f"a={replica.url}", request.node.name[:40], *getattr(request, "param", ()))
    yield gateway
    gateway.stop()


def test_epipe_on_the_access_log_drops_and_counts_lines_and_memory_stays_bounded(piped: PipedGateway) -> None:
    assert piped.startup.startswith(b"gateway: listening on")
    piped.hammer(20)
    wait_until(lambda: piped.proc.stdout.read1(1 << 20), what="access-log lines on stdout")  # the writer works
    piped.proc.stdout.close()  # the reader goes away: the next write gets EPIPE
    piped.hammer(100)  # the writer meets EPIPE
    wait_until(lambda: "access log: writer stopped (EPIPE" in piped.stderr(), what="the writer saying it stopped")
    before = rss_kib(piped.proc.pid)
    piped.hammer(REQUESTS)
    wait_until(lambda: dropped(piped.url) >= REQUESTS, what="every line since EPIPE counted as dropped")
    grown_mib = (rss_kib(piped.proc.pid) - before) / 1024
    # Unbounded, the 1,500 lines of ~60 KB would stay queued: +87 MiB measured before the fix.
    assert grown_mib < 20, f"RSS grew {grown_mib:.1f} MiB for {REQUESTS} requests"
    assert "access log:" in piped.stderr() and "lines dropped" in piped.stderr()
    assert httpx.get(f"{piped.url}/-/healthz", timeout=5).status_code == 200
    assert piped.stop() == 0


@pytest.mark.parametrize("piped", [("--access-log-buffer-bytes", str(2 * 1024 * 1024))], indirect=True)
def test_a_stdout_reader_that_never_reads_costs_a_bounded_buffer_and_the_writer_resumes(piped: PipedGateway) -> None:
    os.set_blocking(piped.proc.stdout.fileno(), False)
    before = rss_kib(piped.proc.pid)
    piped.hammer(REQUESTS)  # nobody reads stdout: the pipe fills (64 KiB), then the 2 MiB buffer
    wait_until(lambda: dropped(piped.url) > 0, what="lines dropped once the buffer is full")
    grown_mib = (rss_kib(piped.proc.pid) - before) / 1024
    assert grown_mib < 20, f"RSS grew {grown_mib:.1f} MiB for {REQUESTS} requests"
    wait_until(lambda: "stdout is not read fast enough" in piped.stderr(), what="the drops said on stderr")
    # The reader catches up: the writer was only waiting, and lines written after flow again.
    marker = "after-the-stall"
    seen = bytearray()

    def read_marker() -> bool:
        try:
            while chunk := piped.proc.stdout.read1(1 << 20):
                seen.extend(chunk[-200_000:])
                del seen[:-400_000]
        except BlockingIOError:
            pass
        httpx.get(f"{piped.url}/-/healthz", headers={"x-request-id": marker}, timeout=5)
        return marker.encode() in seen

    wait_until(read_marker, deadline_s=20, interval_s=0.2, what="new lines after the reader caught up")
    assert "writer stopped" not in piped.stderr()
