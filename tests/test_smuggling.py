"""Request smuggling: every ambiguous or malformed framing is refused with a 400, the connection closed, and
nothing reaches the replica (RFC 9112 §6.1, §6.3, §11.2; RFC 9110 §8.6). Real sockets on 127.0.0.1: each case is
written as raw bytes to the gateway, a mock replica counts what reaches it.

Each refused case carries a second request after it (SMUGGLED) where that matters: a desync would make it a
request of its own. The gateway re-frames every forwarded body with its own Content-Length, so what it accepts
cannot desync the replica; what it cannot frame unambiguously it refuses (llhttp, through httptools, in its
strict mode, plus the gateway's own checks: origin-form targets only, no upgrades).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.conftest import Replica, Stack, read_until_close, wait_until

H = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
B = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
SMUGGLED = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


REFUSED = {
 # Content-Length and Transfer-Encoding together (RFC 9112 §6.1: the classic CL.TE / TE.CL desync)
 "cl_then_te": H + b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(chunked(B)) + chunked(B) + SMUGGLED,
 "te_then_cl": H + b"transfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n" + chunked(B) + SMUGGLED,
 "cl_zero_te": H + b"content-length: 0\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(B),
 # Content-Length ambiguity (RFC 9110 §8.6)
 "duplicate_cl_differ": H + b"content-length: %d\r\ncontent-length: %d\r\n\r\n" % (len(B), len(B) + 38) + B + SMUGGLED,
 "duplicate_cl_same": H + b"content-length: %d\r\ncontent-length: %d\r\n\r\n" % (len(B), len(B)) + B,
 "cl_list": H + b"content-length: %d, %d\r\n\r\n" % (len(B), len(B)) + B,
 "cl_plus_sign": H + b"content-length: +%d\r\n\r\n" % len(B) + B,
 "cl_negative": H + b"content-length: -1\r\n\r\n" + B,
 "cl_hex": H + b"content-length: 0x4b\r\n\r\n" + B,
 "cl_inner_space": H + b"content-length: 7 5\r\n\r\n" + B,
 "cl_overflow": H + b"content-length: 99999999999999999999999999\r\n\r\n" + B,
 "cl_letters": H + b"content-length: 75abc\r\n\r\n" + B,
 # Transfer-Encoding obfuscation
 "te_chunked_twice": H + b"transfer-encoding: chunked, chunked\r\n\r\n" + chunked(chunked(B)),
 "cl_empty": H + b"content-length: \r\n\r\n" + B,
 "space_before_first_header": b"POST /v1/chat/completions HTTP/1.1\r\n host: x\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "te_not_last_chunked": H + b"transfer-encoding: chunked, identity\r\n\r\n" + chunked(B),
 "te_identity_only": H + b"transfer-encoding: identity\r\n\r\n" + B,
 "te_xchunked": H + b"transfer-encoding: xchunked\r\n\r\n" + chunked(B),
 "te_space_before_colon": H + b"transfer-encoding : chunked\r\n\r\n" + chunked(B),
 "te_duplicate_last_identity": H + b"transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n" + chunked(B),
 "te_obs_fold": H + b"transfer-encoding:\r\n chunked\r\n\r\n" + chunked(B),
 "te_vertical_tab": H + b"transfer-encoding:\x0bchunked\r\n\r\n" + chunked(B),
 "te_quoted": H + b'transfer-encoding: "chunked"\r\n\r\n' + chunked(B),
 # Line endings and control characters
 "bare_lf_request_line": b"POST /v1/chat/completions HTTP/1.1\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "bare_lf_headers": H.replace(b"\r\n", b"\n") + b"content-length: %d\n\n" % len(B) + B,
 "bare_cr_in_value": H + b"x-note: a\rb\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "obs_fold_header": H + b"x-note: a\r\n b\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "nul_in_value": H + b"x-note: a\x00b\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "nul_in_url": b"POST /v1/chat\x00/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "nul_in_name": H + b"x-no\x00te: a\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "space_in_name": H + b"content length: %d\r\n\r\n" % len(B) + B,
 "header_without_colon": H + b"content-length %d\r\n\r\n" % len(B) + B,
 "del_in_name": H + b"x-no\x7fte: a\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 # Chunked body framing
 "chunk_size_overflow": H + b"transfer-encoding: chunked\r\n\r\nffffffffffffffffff1\r\n" + B,
 "chunk_size_invalid_char": H + b"transfer-encoding: chunked\r\n\r\n4g\r\n" + B,
 "chunk_size_negative": H + b"transfer-encoding: chunked\r\n\r\n-4b\r\n" + B,
 "chunk_size_leading_space": H + b"transfer-encoding: chunked\r\n\r\n 4b\r\n" + B + b"\r\n0\r\n\r\n",
 "chunk_size_0x": H + b"transfer-encoding: chunked\r\n\r\n0x4b\r\n" + B + b"\r\n0\r\n\r\n",
 "chunk_data_overrun": H + b"transfer-encoding: chunked\r\n\r\n5\r\n" + B + b"\r\n0\r\n\r\n",
 "chunk_bare_lf": H + b"transfer-encoding: chunked\r\n\r\n%x\n%s\n0\n\n" % (len(B), B),
 # Request line and target
 "absolute_form": b"POST http://evil.example/v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "bad_version": b"POST /v1/chat/completions HTTP/1.x\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "method_with_nul": b"PO\x00ST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "h2c_upgrade": H + b"connection: upgrade, http2-settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\ncontent-length: %d\r\n\r\n" % len(B) + B,
 "h2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


class Target:
    def __init__(self, replica: Replica, port: int):
        self.replica = replica
        self.port = port

    def send(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)
            return read_until_close(sock)

    def forwarded(self) -> int:
        return self.replica.stats()["requests"]


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    stack = Stack(f"{request.module.__name__}")
    try:
        replica = stack.replica("a")
        gateway = stack.gateway([], [replica])
        yield Target(replica, gateway.port)
    finally:
        stack.stop()


def test_the_corpus_is_large() -> None:
    assert len(REFUSED) >= 27


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_400_and_nothing_forwarded(target: Target, case: str) -> None:
    before = target.forwarded()
    answer = target.send(REFUSED[case])
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert answer.count(b"HTTP/1.") == 1, answer  # one answer, then the connection is closed: nothing desyncs
    assert b"x-serve-reason: bad_request" in answer
    assert target.forwarded() == before


def test_transfer_encoding_in_http_1_0_is_served_once_then_closed(target: Target) -> None:
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; it may be processed, and the
    connection is closed after it. The replica gets one request, re-framed with a Content-Length."""
    before = target.forwarded()
    answer = target.send(b"POST /v1/chat/completions HTTP/1.0\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n" + chunked(B))
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.") == 1
    wait_until(lambda: target.forwarded() == before + 1, what="the one request at the replica")
    last = target.replica.stats()["last_request"]
    assert last["path"] == "/v1/chat/completions" and last["body"] == B.decode()


def test_a_clean_request_after_the_corpus_is_served(target: Target) -> None:
    body = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n"
    answer = target.send(body + b"content-length: %d\r\n\r\n" % len(B) + B)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_bytes_after_a_connection_close_request_are_ignored_not_fatal(target: Target) -> None:
    """RFC 9112 §9.6: the request that carried `close` is answered, and nothing after it is processed."""
    before = target.forwarded()
    answer = target.send(H + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(B) + B + SMUGGLED)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.") == 1
    assert target.forwarded() == before + 1
    # Pipelined: the keep-alive request before it is answered too, in order; what follows `close` is not.
    before = target.forwarded()
    answer = target.send(H + b"content-length: %d\r\n\r\n" % len(B) + B
                         + H + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(B) + B + SMUGGLED * 3)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 200 ") == 2
    assert answer.count(b"HTTP/1.") == 2 and target.forwarded() == before + 2


@pytest.mark.parametrize("head", [
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nhost: y\r\n",  # two Host lines
    b"POST /v1/chat/completions HTTP/1.1\r\n",  # HTTP/1.1 without Host
], ids=["duplicate_host", "no_host_http11"])
def test_host_must_be_there_once(target: Target, head: bytes) -> None:
    """RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host or with more than one."""
    before = target.forwarded()
    answer = target.send(head + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(B) + B)
    assert answer.startswith(b"HTTP/1.1 400 ") and target.forwarded() == before
