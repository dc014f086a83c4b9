"""One unauthenticated connection at a time against the public edge (issue 25, data-path rows).

Real gateway, replica and router processes on 127.0.0.1; raw sockets where a well-behaved client
library would not send what is tested. Memory is read from /proc (the gateway's RSS).
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import CHAT, wait_until

MiB = 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def recv_some(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except (TimeoutError, ConnectionResetError):
        return b""


@pytest.mark.parametrize("where", ["value", "name"])
def test_a_head_that_never_ends_gets_431_at_max_header_bytes(stack, where) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica])
    start = b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n" + (b"x-long: " if where == "value" else b"")
    with httpx.Client(timeout=5) as client:  # warm: the first answers load what answers need
        client.get(f"{gateway.url}/-/healthz")
    before = rss(gateway.child.pid)
    slow: list[float] = []
    stop = threading.Event()

    def health() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.get(f"{gateway.url}/-/healthz").status_code == 200
                slow.append(time.monotonic() - started)

    watcher = threading.Thread(target=health)
    watcher.start()
    wait_until(lambda: slow, what="the other client is served")
    try:
        # Just past the limit, then nothing more: the header never ends, so only the byte count can refuse it,
        # well before the 10 s header timeout.
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(start + b"a" * (64 * 1024 + 100 - len(start)))
            answer = recv_some(sock)
            took = time.monotonic() - started
        # A client that keeps sending: refused the same, its bytes dropped as they come (no growth).
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(start)
            sent = 0
            try:
                while sent < 8 * MiB:
                    sock.sendall(b"a" * 65536)
                    sent += 65536
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
        served = len(slow)
        wait_until(lambda: len(slow) > served, what="the other client still served")
    finally:
        stop.set()
        watcher.join()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"headers_too_large" in answer
    assert took < 5
    assert rss(gateway.child.pid) - before < 16 * MiB
    assert slow and max(slow) < 1.0, max(slow)  # another client is served meanwhile (p99 measured in the bench)


def test_a_body_in_one_byte_chunks_stays_in_one_bounded_buffer(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica])
    before = rss(gateway.child.pid)
    size = 1 * MiB
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        piece = b"1\r\nx\r\n" * 8192
        for _ in range(size // 8192):
            sock.sendall(piece)
        sock.sendall(b"0\r\n\r\n")
        answer = recv_some(sock, 30)
    assert answer.startswith(b"HTTP/1.1 400 ")  # the replica's answer to a body that is not JSON
    # One bytearray of 1 MiB (and its copy), not a list of a million one-byte objects (~60 MiB).
    assert rss(gateway.child.pid) - before < 24 * MiB


def test_bodies_held_at_once_have_a_budget(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], "--max-buffered-body-bytes", "100000")
    body = b'{"model":"mock","prompt":"' + b"x" * 79950 + b'","max_tokens":1}'
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as first:
        first.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n" % len(body) + body[:60000])
        wait_until(lambda: httpx.post(f"{gateway.url}/v1/completions", json={"model": "mock", "prompt": "y" * 50000,
                                                                           "max_tokens": 1}).status_code == 503,
                   what="a new request past the budget gets 503")
        second = httpx.post(f"{gateway.url}/v1/completions", json={"model": "mock", "prompt": "y" * 50000,
                                                                  "max_tokens": 1})
        assert second.headers["x-serve-reason"] == "overloaded"
        first.sendall(body[60000:])
        assert recv_some(first).startswith(b"HTTP/1.1 200 ")
    # Served and released: the budget is free again.
    assert httpx.post(f"{gateway.url}/v1/completions", json={"model": "mock", "prompt": "y" * 50000,
                                                            "max_tokens": 1}).status_code == 200


def test_ten_thousand_pipelined_answers_in_order_and_no_connection_leaked(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], "--api-key", "sekret")
    n = 10_000
    data = b"GET /-/healthz HTTP/1.1\r\nhost: gw\r\n\r\n" + b"".join(
        b"GET /v1/models HTTP/1.1\r\nhost: gw\r\nx-request-id: r%05d\r\n\r\n" % i for i in range(n))
    received = b""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        deadline = time.monotonic() + 60
        while received.count(b"x-request-id: r") < n and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        sender.join()
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.count(b"HTTP/1.1 401 ") == n
    ids = [received[i + 15:i + 20] for i in range(len(received)) if received.startswith(b"x-request-id: r", i)]
    assert ids == [b"%05d" % i for i in range(n)]  # in order
    routes = lambda: httpx.get(f"{gateway.url}/-/routes", headers={"authorization": "Bearer sekret"}).json()  # noqa: E731
    wait_until(lambda: routes()["connections"] == 1, what="the pipelining connection is forgotten")
    assert routes()["in_flight"] == 0


def test_a_client_not_reading_its_answers_is_paused_not_buffered(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], "--api-key", "sekret", "--no-access-log")
    request = b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as warm:  # the same answers, read
        sender = threading.Thread(target=warm.sendall, args=(request * 20000,))
        sender.start()
        count, tail = 0, b""
        while count < 20000:
            chunk = tail + warm.recv(1 << 20)
            count += chunk.count(b"HTTP/1.1 401")
            tail = chunk[-11:]  # a status line cut between two reads is counted once, in the next
        sender.join()
    before = rss(gateway.child.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    sock.setblocking(False)
    batch = request * 1000
    sent, stalled_since = 0, None
    try:
        while sent < 40 * MiB:
            try:
                sent += sock.send(batch)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 2:
                    break  # the gateway stopped reading us: backpressure reached the client
                time.sleep(0.01)
        grown = rss(gateway.child.pid) - before
    finally:
        sock.close()
    assert sent < 40 * MiB, "the gateway kept reading a client that reads none of its answers"
    assert grown < 32 * MiB, grown
    routes = lambda: httpx.get(f"{gateway.url}/-/routes", headers={"authorization": "Bearer sekret"}).json()  # noqa: E731
    wait_until(lambda: routes()["connections"] == 1, what="its close is seen")


def _race(gateway, n: int) -> list[httpx.Response]:
    body = dict(CHAT, stream=True, max_tokens=50)

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as response:
                response.read()
                return response

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.parametrize("flag,status", [("--max-in-flight", 503), ("--max-in-flight-per-replica", 429)])
def test_admission_counts_a_request_from_dispatch(stack, flag, status) -> None:
    replica = stack.replica("a", "--ttft-ms", "300", "--itl-ms", "20")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica], flag, "2")
    responses = _race(gateway, 30)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == status]
    assert len(served) == 2, [r.status_code for r in responses]
    assert len(refused) == 28
    assert {r.headers["x-serve-reason"] for r in refused} == {"overloaded"}


@pytest.mark.parametrize("fault", ["header_name_space", "header_content_length", "header_host", "header_non_latin1"])
def test_a_bad_decision_header_is_malformed_decision(stack, fault) -> None:
    replica = stack.replica("a")
    router = stack.router([replica], "--fault", fault)
    gateway = stack.gateway([router], [replica])
    with httpx.Client(timeout=10) as client:
        for _ in range(3):  # the same on a fresh and on a pooled replica connection
            response = client.post(f"{gateway.url}/v1/chat/completions", json=CHAT)
            assert response.status_code == 503
            assert response.headers["x-serve-reason"] == "malformed_decision"
        assert client.get(f"{gateway.url}/v1/models").status_code == 200
    assert replica.stats()["requests"] == 1  # only the GET reached it
    assert gateway.routes()["in_flight"] == 0


def test_forwarding_strips_trailers_and_connection_named_headers(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica])
    body = b'{"model":"mock","prompt":"hi","max_tokens":1}'
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     b"connection: keep-alive, x-hop\r\nx-hop: secret\r\nx-kept: yes\r\n"
                     b"transfer-encoding: chunked\r\ntrailer: x-evil\r\n\r\n"
                     b"%x\r\n%s\r\n0\r\nx-evil: 1\r\n\r\n" % (len(body), body))
        assert recv_some(sock).startswith(b"HTTP/1.1 200 ")
    headers = {k.lower(): v for k, v in replica.stats()["last_request"]["headers"].items()}
    assert headers["x-kept"] == "yes"
    assert "x-hop" not in headers and "x-evil" not in headers and "trailer" not in headers


@pytest.mark.parametrize("trust", [False, True])
def test_x_forwarded_for_and_proto(stack, trust) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica], *(["--trust-forwarded"] if trust else []))
    httpx.get(f"{gateway.url}/v1/models", headers={"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"})
    headers = {k.lower(): v for k, v in replica.stats()["last_request"]["headers"].items()}
    if trust:
        assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
        assert headers["x-forwarded-proto"] == "https"
    else:
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"


def test_h2c_upgrade_is_refused_with_400_and_not_forwarded(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([], [replica])
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade, HTTP2-Settings\r\n"
                     b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n")
        answer = recv_some(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert replica.stats()["requests"] == 0


class _UnsolicitedReplica:
    """A replica that answers each request, then writes a second response nobody asked for."""

    EVIL = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nEVIL!"

    def __init__(self, same_write: bool):
        self.same_write = same_write
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.wrote_extra = threading.Event()
        self.closed_by_gateway = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    self.closed_by_gateway.set()
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    if head.startswith(b"GET /health"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        continue
                    answer = b'{"object":"list","data":[]}'
                    good = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
                        len(answer), answer)
                    if self.same_write:
                        conn.sendall(good + self.EVIL)
                    else:
                        conn.sendall(good)
                        time.sleep(0.05)
                        try:
                            conn.sendall(self.EVIL)
                        except OSError:
                            pass
                    self.wrote_extra.set()

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("same_write", [True, False])
def test_an_unsolicited_response_is_never_relayed(stack, same_write) -> None:
    fake = _UnsolicitedReplica(same_write)
    try:
        gateway = stack.gateway([], [], extra_replicas=[f"evil=http://127.0.0.1:{fake.port}"],
                                env=None)
        with httpx.Client(timeout=10) as client:
            for _ in range(5):
                fake.wrote_extra.clear()
                fake.closed_by_gateway.clear()
                response = client.get(f"{gateway.url}/v1/models")
                assert response.status_code == 200 and response.text == '{"object":"list","data":[]}'
                assert fake.wrote_extra.wait(5)
                # The gateway retires the connection the unsolicited bytes came on (a later write: once it reads
                # them; the same write: at once), so the next request never gets them.
                assert fake.closed_by_gateway.wait(5)
        # Every connection that carried an unsolicited response was retired, never reused.
        assert fake.connections >= 5
    finally:
        fake.close()
