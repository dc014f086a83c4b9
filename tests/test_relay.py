"""The relay under client and replica misbehaviour: aborts, retries, framing, bad input."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.conftest import CHAT, read_until_close, wait_until


def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while read_until_close:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def chat_request(body: bytes = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":2}',
                 extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST /v1/chat/completions " + version + b"\r\nhost: gw\r\ncontent-type: application/json\r\n"
            + extra + b"content-length: %d\r\n\r\n" % len(body) + body)


def test_client_disconnect_aborts_the_replica_request(stack) -> None:
    replica = stack.replica("a", "--itl-ms", "20")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica])
    body = dict(CHAT, stream=True, max_tokens=1000)
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as response:
            # Keep a reference to the iterator: a closed generator makes httpx close the connection early.
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"content":" ' in line:
                    break
            assert replica.stats()["in_flight"] == 1
    # Closing the client connection must reach the replica as an abort, promptly.
    started = time.monotonic()
    wait_until(lambda: replica.stats()["aborted"] == 1, deadline_s=5, what="replica sees the abort")
    assert time.monotonic() - started < 2
    wait_until(lambda: gateway.routes()["in_flight"] == 0, what="gateway forgets the request")


def test_connect_failure_is_retried_on_another_replica(stack) -> None:
    good = stack.replica("good")
    dead = stack.replica("dead")
    router = stack.router([good, dead], "--health-interval-s", "0")  # the router keeps naming the dead one
    gateway = stack.gateway([router], [good, dead])
    dead.child.kill()
    for _ in range(6):
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert response.status_code == 200
        assert response.headers["x-replica-id"] == "good"
    assert 'gateway_retries_total{kind=' in gateway.metrics()


def test_replica_dying_before_the_head_is_retried(stack) -> None:
    replicas = [stack.replica("a"), stack.replica("b")]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas)
    # The fault header reaches whichever replica is picked first; the retry carries it too, so the
    # client sees the failure only if there was no retry at all. Count the replica-side faults instead.
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"x-mock-fault": "die-before-head"},
                          timeout=10)
    assert response.status_code == 503
    assert response.headers["x-serve-reason"] == "replica_unavailable"
    assert sum(r.stats()["faulted"] for r in replicas) == 2  # tried once, retried once, then a clean error
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_replica_dying_mid_stream_is_an_error_not_a_clean_end(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([stack.router([replica])], [replica])
    body = dict(CHAT, stream=True, max_tokens=20)
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=10,
                          headers={"x-mock-fault": "die-mid-stream", "x-mock-after": "3"}) as response:
            assert response.status_code == 200
            list(response.iter_bytes())
    assert "gateway_upstream_died_total" in gateway.metrics()
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_malformed_replica_response_is_502(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([stack.router([replica])], [replica])
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"x-mock-fault": "malformed"})
    assert response.status_code == 502
    assert response.headers["x-serve-reason"] == "upstream_malformed"


def test_first_byte_timeout(stack) -> None:
    replica = stack.replica("a")
    gateway = stack.gateway([stack.router([replica])], [replica], "--first-byte-timeout-s", "0.5")
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"x-mock-fault": "hang"}, timeout=10)
    assert response.status_code == 504
    assert response.headers["x-serve-reason"] == "upstream_timeout"
    wait_until(lambda: replica.stats()["aborted"] >= 1, what="the hung request is dropped at the replica")


def test_pipelined_requests_are_answered_in_order(basic) -> None:
    first = chat_request(extra=b"x-request-id: first\r\n")
    second = b"GET /v1/models HTTP/1.1\r\nhost: gw\r\nx-request-id: second\r\n\r\n"
    third = chat_request(extra=b"x-request-id: third\r\nconnection: close\r\n")
    raw = raw_exchange(basic.gateway.port, first + second + third)
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    assert raw.index(b"chatcmpl-first") < raw.index(b'"object":"list"') < raw.index(b"chatcmpl-third")


def test_http10_client_gets_an_unchunked_stream(basic) -> None:
    body = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}'
    raw = raw_exchange(basic.gateway.port, chat_request(body, version=b"HTTP/1.0"))
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert payload.startswith(b"data: {") and payload.endswith(b"data: [DONE]\n\n")


def test_expect_100_continue(basic) -> None:
    body = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
    with socket.create_connection(("127.0.0.1", basic.gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                     b"expect: 100-continue\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        rest = read_until_close(sock)
    assert rest.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("garbage", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello",
    b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nhost: 169.254.169.254\r\n\r\n",
])
def test_bad_requests_get_400_and_the_gateway_keeps_serving(basic, garbage: bytes) -> None:
    before = [r.stats()["requests"] for r in basic.replicas]
    raw = raw_exchange(basic.gateway.port, garbage)
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert b"x-serve-reason: bad_request" in raw
    assert [r.stats()["requests"] for r in basic.replicas] == before  # nothing was forwarded
    assert httpx.post(f"{basic.gateway.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_oversized_body_is_413_before_anything_is_forwarded(stack) -> None:
    replica = stack.replica("a")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica], "--max-body-bytes", "1000")
    response = httpx.post(f"{gateway.url}/v1/chat/completions",
                          json=dict(CHAT, messages=[{"role": "user", "content": "x" * 5000}]))
    assert response.status_code == 413
    assert response.headers["x-serve-reason"] == "body_too_large"
    assert router.stats()["requests"] == 0 and replica.stats()["requests"] == 0
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_oversized_headers_are_431(basic) -> None:
    response = httpx.get(f"{basic.gateway.url}/v1/models", headers={"x-big": "y" * 100_000})
    assert response.status_code == 431
    assert httpx.get(f"{basic.gateway.url}/v1/models").status_code == 200


def test_unknown_paths(basic) -> None:
    # A path the replica does not serve: the replica's own 404 is relayed as is.
    response = httpx.post(f"{basic.gateway.url}/v1/nope", json=CHAT)
    assert response.status_code == 404 and "error" in response.json()
    # An unknown gateway endpoint: our own OpenAI-shaped 404.
    response = httpx.get(f"{basic.gateway.url}/-/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_gateway_endpoints(basic) -> None:
    assert httpx.get(f"{basic.gateway.url}/-/healthz").text == "success"
    assert httpx.get(f"{basic.gateway.url}/-/ready").json()["status"] == "ready"
    routes = basic.gateway.routes()
    assert {t["replica_id"] for t in routes["targets"]} == {"r1", "r2"}
    assert routes["routers"] == [f"127.0.0.1:{basic.router.port}"]
    metrics = basic.gateway.metrics()
    assert "gateway_requests_total" in metrics and "gateway_router_latency_seconds_bucket" in metrics


def test_unstarted_replica_does_not_make_the_gateway_unready(stack) -> None:
    from gateway.stacks.procs import free_port

    replica = stack.replica("a")
    router = stack.router([replica])
    gateway = stack.gateway([router], [replica], "--health-fast-interval-s", "0.1",
                            extra_replicas=[f"later=http://127.0.0.1:{free_port()}"])
    assert httpx.get(f"{gateway.url}/-/ready").status_code == 200
    wait_until(lambda: [t for t in gateway.routes()["targets"] if t["replica_id"] == "later" and not t["healthy"]],
               what="the unstarted replica is marked down")
    assert httpx.get(f"{gateway.url}/-/ready").status_code == 200
    # Startup sent no request to the router (nothing that could wake a deployment scaled to zero).
    assert router.stats()["requests"] == 0
    assert replica.stats()["requests"] == 0


def test_head_request_gets_the_head_only(basic) -> None:
    with httpx.Client() as client:
        response = client.head(f"{basic.gateway.url}/v1/models")
        assert response.status_code in (200, 405)  # whatever the replica says about HEAD, relayed as is
        assert response.content == b""
        assert client.get(f"{basic.gateway.url}/v1/models").json()["object"] == "list"  # same connection
