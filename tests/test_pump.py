"""The C stream pump (--native-relay): chunked bodies it relays arrive byte for byte, whatever the framing or
the way the replica splits its writes; its connections go back to the pool only after a clean end; bad framing
and a client that stops reading are handled as on the Python path. Every test runs both ways."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.stacks.procs import free_port
from tests.conftest import Replica, Stack, wait_until

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

# Framing the pump must follow: chunk extensions, upper-case and zero-padded sizes, a chunk bigger than a read,
# and trailers after the last chunk.
BIG = b"x" * 100_000
SCRIPTS: dict[str, list[bytes]] = {
    "plain": [HEAD, b"6\r\ndata: \r\n", b"7\r\nhello\n\n\r\n", b"0\r\n\r\n"],
    "framing": [HEAD, b"5;name=value\r\nhello\r\n", b"00A\r\n0123456789\r\n", b"%X\r\n" % len(BIG) + BIG + b"\r\n",
                b"0;last\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n"],
    "garbage_after_end": [HEAD, b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"],
    "bad_framing": [HEAD, b"5\r\nhello\r\n", b"zz\r\nnot a chunk\r\n"],
    # 16 MB: more than the socket buffers between replica and client hold (~4 MB a send buffer here).
    "big": [HEAD, *[b"10000\r\n" + bytes([65 + i % 26]) * 0x10000 + b"\r\n" for i in range(256)], b"0\r\n\r\n"],
}
# Each piece is also sent one byte at a time, the replica pausing between bytes, so every parser state is
# crossed at a read boundary.
BYTEWISE = {"framing"}


class ScriptedReplica:
    """A replica speaking raw HTTP/1.1 on 127.0.0.1: GET /health is 200, GET /script/NAME plays SCRIPTS[NAME]."""

    def __init__(self) -> None:
        self.port = free_port()
        self.connections = 0
        self.finished = 0  # scripts played to the end
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if path == "/health":
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                name = path.rsplit("/", 1)[-1]
                for piece in SCRIPTS[name]:
                    if name in BYTEWISE and piece is not HEAD and len(piece) < 1000:
                        for i in range(len(piece)):
                            conn.sendall(piece[i:i + 1])
                            time.sleep(0.002)
                    else:
                        conn.sendall(piece)
                        if name != "big":
                            time.sleep(0.02)
                self.finished += 1
                if name in ("bad_framing", "garbage_after_end"):
                    time.sleep(0.5)  # the gateway should be the one to close

    def close(self) -> None:
        self._stop = True
        self._listener.close()


@pytest.fixture(params=["native", "python"])
def relay_stack(request: pytest.FixtureRequest, stack: Stack) -> Iterator[tuple[ScriptedReplica, str, str]]:
    replica = ScriptedReplica()
    router = stack.router([])
    native = "--native-relay" if request.param == "native" else "--no-native-relay"
    gateway = stack.gateway([router], [], native, extra_replicas=[f"scripted=http://127.0.0.1:{replica.port}"])
    wait_until(lambda: gateway.routes()["targets"][0]["healthy"], what="the scripted replica is healthy")
    yield replica, gateway.url, request.param
    replica.close()


def expected_body(name: str) -> bytes:
    return b"".join(SCRIPTS[name][1:])


def raw_get(sock: socket.socket, path: str) -> None:
    sock.sendall(b"GET %s HTTP/1.1\r\nhost: gw\r\n\r\n" % path.encode())


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One chunked response off a keep-alive connection: (head, body with its chunk framing)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    body = bytearray(rest)
    while not re.search(rb"(^|\r\n)0(;[^\r\n]*)?\r\n([^\r\n]+\r\n)*\r\n$", body[-256:]):
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(body)} body bytes"
        body += chunk
    return head, bytes(body)


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/-/metrics", timeout=5).text, re.M)
    return float(match.group(1)) if match else 0.0


def test_chunk_framing_arrives_byte_for_byte_and_the_connection_is_reused(relay_stack) -> None:
    replica, url, mode = relay_stack
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        for name in ("framing", "plain", "framing"):
            raw_get(sock, f"/script/{name}")
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200")
            assert body == expected_body(name)  # extensions, padded sizes, trailers: untouched
    # The health checker has a connection of its own; every relayed response reused one pooled connection.
    assert replica.connections == 2
    assert metric(url, "gateway_native_relay_streams_total") == (3 if mode == "native" else 0)


def test_bytes_after_the_end_of_a_response_retire_the_connection(relay_stack) -> None:
    replica, url, _ = relay_stack
    for _ in range(2):
        response = httpx.get(f"{url}/script/garbage_after_end", timeout=10)
        assert response.status_code == 200 and response.text == "hello"
    assert replica.connections == 3  # health + one per request: a connection that said too much is not reused


def test_bad_framing_mid_stream_cuts_the_client_and_the_gateway_keeps_serving(relay_stack) -> None:
    replica, url, _ = relay_stack
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        raw_get(sock, "/script/bad_framing")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    # What was valid reached the client, then the connection closed with no last chunk: a broken stream, not an end.
    assert data.endswith(b"5\r\nhello\r\n") and b"zz" not in data
    assert 'reason="upstream_malformed"' in httpx.get(f"{url}/-/metrics", timeout=5).text
    assert httpx.get(f"{url}/script/plain", timeout=10).text == "data: hello\n\n"


def test_a_client_that_stops_reading_gets_everything_once_it_reads_again(relay_stack, stack: Stack) -> None:
    """The body is larger than the socket buffers between: the relay must hold the rest, then finish it."""
    replica, url, _ = relay_stack
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        raw_get(sock, "/script/big")
        time.sleep(1.0)  # not reading: the gateway's writes to this client stop short...
        assert replica.finished == 0  # ...and the replica waits: the gateway did not buffer the rest
        head, body = read_response(sock)
    assert body == expected_body("big")
    assert replica.finished == 1
    assert metric(url, "gateway_requests_in_flight") == 0


def test_streams_from_the_mock_engine_go_through_the_pump(stack: Stack) -> None:
    """The default: an SSE stream from a replica is relayed by the pump, and the pump lets go of it at the end."""
    replica: Replica = stack.replica("a", "--itl-ms", "1")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica])
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none")
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True))
    assert text
    assert metric(gateway.url, "gateway_native_relay_streams_total") == 1
    assert metric(gateway.url, "gateway_native_relay_active") == 0


def test_a_resumable_stream_goes_through_the_pump_and_resumes_from_what_it_saw(stack: Stack) -> None:
    """Resume on: the original part of a stream is pumped (its token ids recorded in C, stripped for a client that
    did not ask); when its replica dies the resume continues from the pump's record, and the client's stream is the
    one an unbroken request gets. The resumed part is pumped too (EV_RESUMED: the original's id and created, the
    usage of an uninterrupted request, chat chunks for a chat client), and a second death resumes from the pump's
    record of it."""
    from replicas.mock_engine import greedy_text, prompt_ids
    from tests.test_resume import content, events, normalized, prompt_length

    # three replicas: a stream never goes back to one that failed it, and one here dies twice
    replicas = [stack.replica(f"r{i}", "--itl-ms", "1") for i in (1, 2, 3)]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas, "--resume-limit", "2", "--outlier-failures", "0")
    for path, body in (("/v1/chat/completions", {"model": "mock", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 30, "stream": True}),
                       ("/v1/completions", {"model": "mock", "prompt": "Once", "max_tokens": 30, "stream": True})):
        before = metric(gateway.url, "gateway_native_relay_streams_total")
        rid = {"x-request-id": f"pumped-{path[-6:]}"}
        clean = events(gateway, path, body, rid)
        assert metric(gateway.url, "gateway_native_relay_streams_total") == before + 1
        assert 'token_ids":[' not in "".join(clean)  # the client did not ask for them
        p = prompt_length(path, body)
        broken = events(gateway, path, body, {**rid, "x-mock-fault": "close-mid-stream", "x-mock-die-at": f"{p + 12}@{p}"})
        chat = "chat" in path
        # the clean stream, the original part and the resumed part
        assert metric(gateway.url, "gateway_native_relay_streams_total") == before + 3
        assert normalized(broken) == normalized(clean)
        assert content(broken) == greedy_text(prompt_ids(chat, body), 30)
        # twice: the second resume starts from what the pump recorded of the first resumed part
        usage = {**body, "stream_options": {"include_usage": True}}
        clean = events(gateway, path, usage, rid)
        before = metric(gateway.url, "gateway_native_relay_streams_total")
        broken = events(gateway, path, usage, {**rid, "x-mock-fault": "close-mid-stream",
                                               "x-mock-die-at": f"{p + 7},{p + 19}"})
        assert metric(gateway.url, "gateway_native_relay_streams_total") == before + 3
        assert normalized(broken) == normalized(clean)
        assert json.loads(broken[-2][6:])["usage"] == {"prompt_tokens": p, "total_tokens": p + 30,
                                                      "completion_tokens": 30}
    assert 'gateway_resumes_total{outcome="resumed"} 6.0' in httpx.get(f"{gateway.url}/-/metrics", timeout=5).text


def test_a_metered_stream_goes_through_the_pump_byte_for_byte(stack: Stack, tmp_path) -> None:
    """Token accounting on: the pump reads the usage chunk (and drops it when only the gateway asked for it)."""
    from tests.test_tokens import raw_stream, usage_of

    replica = stack.replica("r1", "--itl-ms", "2")
    gateway = stack.gateway([], [replica], "--token-accounting", "--token-state-file", str(tmp_path / "t.json"))
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    for options in ({}, {"stream_options": {"include_usage": True}}):
        asked = {**body, **options}
        assert raw_stream(gateway.port, "/v1/chat/completions", asked, b"id") == \
            raw_stream(replica.port, "/v1/chat/completions", asked, b"id")
    assert metric(gateway.url, "gateway_native_relay_streams_total") == 2
    counted = usage_of(gateway.url)["keys"][""]["mock"]["since_start"]
    assert counted["completion_tokens"] == 12 and counted["prompt_tokens"] > 0


def test_a_pumped_resumable_stream_ends_with_one_last_chunk_and_the_connection_goes_on(stack: Stack) -> None:
    """Resume on: the pump sends the response's last chunk with [DONE] (Stream.last_sent) instead of Python writing
    it after the pump lets go; the client gets it once, and the next request on the connection is answered."""
    replica = stack.replica("r1", "--itl-ms", "1")
    gateway = stack.gateway([], [replica], "--resume-limit", "2")
    body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                       "stream": True}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(body), body))
    before = metric(gateway.url, "gateway_native_relay_streams_total")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(request)
            head, chunks = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ")  # not a stray last chunk of the response before
            assert chunks.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            assert chunks.count(b"\r\n0\r\n\r\n") == 1
            assert b'"token_ids":[' not in chunks  # recorded by the pump, not sent: the client did not ask
    assert metric(gateway.url, "gateway_native_relay_streams_total") == before + 2
