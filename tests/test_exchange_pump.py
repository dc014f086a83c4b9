"""The pumped path in-process: the real protocols, relay and exchange on the running event loop, with the real C
pump (gateway/dataplane/_pump.c) relaying bodies between real loopback sockets whose far ends the test plays (the
client and the replicas), through tests/test_exchange_unit.py's Rig with `pump=True`.

What is decided when a response head arrives (does the pump take the body, with which event flags: plain, resume,
token accounting, both, what the client asked for; or does it stay in Python: HTTP/1.0, a length, TLS, a held
chunk, a pump that cannot take it), each way the pump lets go of a stream (complete, complete with bytes after the
end, the replica's EOF or reset, malformed chunking, the client gone, a broken stream handed back to Python for
resume with what the client had not taken written first, the pump's own failure, a timeout, a drain by migration),
and that each attempt ends exactly once. Each test checks what a user would notice: the bytes the client gets, the
replica connection reused or closed, the counts and the reason the request is logged with. Runs under the
sanitizer build too (scripts/pump_asan.sh).
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import ssl
from typing import Any

import orjson
import pytest

from gateway.dataplane.client import ClientConnection
from gateway.dataplane.exchange import Exchange, Outcome, Phase
from gateway.dataplane.pumping import _pump
from tests.certs import TestCA
from tests.test_exchange_unit import Rig, counts_are_zero

pytestmark = pytest.mark.skipif(_pump is None, reason="the C stream pump is not built")

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
LAST = b"0\r\n\r\n"
PROMPT_IDS = [1, 2, 3]
MAX_TOKENS = 6
ERROR_EVENT = (b'data: {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", '
               b'"param": null, "code": 500}}\n\n')


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def text_of(i: int, big: int = 0) -> str:
    return ("x" * big) if big else chr(ord("a") + i)


def events(first: int, count: int, prompt: list[int], ids: bool | None, usage: bool, ident: str = "cmpl-1",
           created: int = 1, big: tuple[int, ...] = (), size: int = 20_000) -> list[bytes]:
    """A vLLM /v1/completions stream (compact JSON, one event a chunk): tokens first..first+count-1 (token i has id
    100+i; those in `big` carry `size` bytes of text), the last one finishing; then the usage chunk if asked, then
    [DONE]. `ids`: True, the token ids as vLLM writes them (return_token_ids); None, as null (what the gateway writes
    for a client that did not ask for them); False, absent."""
    out = []
    for i in range(first, first + count):
        choice: dict[str, Any] = {"index": 0, "text": text_of(i, size if i in big else 0), "logprobs": None,
                                  "finish_reason": "length" if i == first + count - 1 else None, "stop_reason": None}
        if ids is not False:
            choice["prompt_token_ids"] = prompt if ids and i == first else None
            choice["token_ids"] = [100 + i] if ids else None
        out.append({"id": ident, "object": "text_completion", "created": created, "model": "m", "choices": [choice]})
    if usage:
        out.append({"id": ident, "object": "text_completion", "created": created, "model": "m", "choices": [],
                    "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + count,
                              "completion_tokens": count}})
    return [b"data: " + orjson.dumps(document) + b"\n\n" for document in out] + [b"data: [DONE]\n\n"]


def answer(request_body: bytes, **options: Any) -> list[bytes]:
    """What the replica streams for the request the gateway sent it (resume asks for token ids, accounting for usage;
    a resumed request's prompt holds the tokens already generated, so it goes on from there)."""
    asked = orjson.loads(request_body)
    prompt = asked["prompt"] if isinstance(asked["prompt"], list) else PROMPT_IDS
    usage = bool((asked.get("stream_options") or {}).get("include_usage"))
    return events(len(prompt) - len(PROMPT_IDS), asked["max_tokens"], prompt, asked.get("return_token_ids") is True,
                  usage, **options)


def chat_events(count: int, ids: bool | None) -> list[bytes]:
    """The first `count` events of a vLLM /v1/chat/completions stream of MAX_TOKENS tokens (the role chunk names
    the prompt's ids), ids as in `events`; a client's chat stream continued on /v1/completions reads the same."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out: list[dict[str, Any]] = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}],
                                  "prompt_token_ids": PROMPT_IDS if ids else None}]
    for i in range(MAX_TOKENS):
        last = i == MAX_TOKENS - 1
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text_of(i)}, "logprobs": None,
                                  "finish_reason": "length" if last else None}
        if last:
            choice["stop_reason"] = None
        choice["token_ids"] = [100 + i] if ids else None
        out.append({**head, "choices": [choice]})
    return [b"data: " + orjson.dumps(document) + b"\n\n" for document in out[:count]]


def post(chat: bool = False, **fields: Any) -> bytes:
    """A client's streamed completion request (chat: /v1/chat/completions)."""
    asked = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    body = orjson.dumps({"model": "m", **asked, "max_tokens": MAX_TOKENS, "stream": True, **fields})
    return (b"POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (b"/v1/chat/completions" if chat else b"/v1/completions", len(body),
                                                 body))


def body_of(received: bytes) -> bytes:
    """What came after the response head (nothing until the head is whole)."""
    end = received.find(b"\r\n\r\n")
    return received[end + 4:] if end >= 0 else b""


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body, and whether its last chunk came."""
    payload, pos = bytearray(), 0
    while (eol := body.find(b"\r\n", pos)) >= 0:
        size = int(body[pos:eol], 16)
        if size == 0:
            return bytes(payload), body[eol:] == b"\r\n\r\n"
        payload += body[eol + 2:eol + 2 + size]
        pos = eol + 4 + size
    return bytes(payload), False


def ended(received: bytes) -> bool:
    return received.endswith(LAST) and dechunk(body_of(received))[1]


def sample(rig: Rig, name: str, **labels: str) -> float:
    """One series of the gateway's /-/metrics text (0 when absent)."""
    for line in rig.metrics.render().decode().splitlines():
        if re.match(re.escape(name) + r"[{ ]", line) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def pumped(rig: Rig) -> float:
    return sample(rig, "gateway_native_relay_streams_total")


class Stream:
    """One client's stream through the rig, up to its first events relayed by the pump."""

    async def start(self, rig: Rig, request: bytes, first: int = 1, split: int = 0, **client: int) -> "Stream":
        """The replica's first read holds the head, `first` events and `split` bytes of the next chunk."""
        self.rig = rig
        self.client, self.peer = await rig.socket_client(**client)
        await self.peer.send(request)
        self.conn, self.replica, self.upstream_body = await rig.replica_request()
        self.events = answer(self.upstream_body)
        self.body = b"".join(chunk(e) for e in self.events) + LAST
        self.at = sum(len(chunk(e)) for e in self.events[:first]) + split
        await self.replica.send(HEAD + self.body[:self.at])
        await self.peer.until(lambda got: b"\r\n\r\n" in got and body_of(got).count(b"data: ") >= first,
                              "the head and first events")
        self.exchange = self.client.exchange
        assert self.exchange is not None
        return self

    def in_pump(self) -> bool:
        return self.exchange.phase is Phase.PUMPED and self.conn.pumped is not None and self.rig.pump.active == 1

    async def rest(self, extra: bytes = b"") -> bytes:
        """The replica sends the rest of its stream; what the client got, once it has the last chunk."""
        # Sent while the client reads: a client that reads slowly holds the replica's writes back.
        sending = asyncio.ensure_future(self.replica.send(self.body[self.at:] + extra))
        self.at = len(self.body)
        try:
            got = await self.peer.until(ended, "the end of the stream")
        except BaseException:
            sending.cancel()
            raise
        await sending
        return got

    async def logged(self) -> dict[str, object]:
        await self.rig.until(lambda: self.rig.finished, "the request logged")
        return self.rig.finished[-1].log_record()


@pytest.fixture
async def loop():
    return asyncio.get_running_loop()


def settled(rig: Rig) -> bool:
    return counts_are_zero(rig) and (rig.pump is None or rig.pump.active == 0)


# -- which streams the pump takes, and with which flags ---------------------------------------------------------

USAGE = {"stream_options": {"include_usage": True}}
IDS = {"return_token_ids": True}
ACCOUNTING = {"token_accounting": True}
RESUME = {"resume_limit": 1}
BOTH = {**ACCOUNTING, **RESUME}
CASES = [
    ("plain", {}, {}),
    ("plain, usage and ids asked", {}, {**USAGE, **IDS}),
    ("accounting, usage asked", ACCOUNTING, USAGE),  # the pump counts (EV_ON)
    ("accounting, usage not asked", ACCOUNTING, {}),  # the pump drops the usage chunk the gateway asked for
    ("accounting, ids asked", ACCOUNTING, IDS),  # the meter leaves the ids as the replica wrote them
    ("resume", RESUME, {}),  # EV_RESUME | EV_STRIP_IDS: the ids the gateway asked for written as null
    ("resume, ids asked", RESUME, IDS),
    ("resume, usage asked", RESUME, USAGE),  # EV_NEED_USAGE: [DONE] only after the usage chunk
    ("both", BOTH, {}),  # fixed in 1b2d5a0: the meter is off for a resumable stream, resume gives the flags
    ("both, usage and ids asked", BOTH, {**USAGE, **IDS}),
    ("both, not resumable", BOTH, {"seed": 7}),  # resume refuses a seed: the meter gives the flags
]


@pytest.mark.parametrize(("first", "split"), [(0, 0), (1, 0), (1, 40)],
                         ids=["the head alone", "whole chunks", "a chunk split at the hand-over"])
@pytest.mark.parametrize(("config", "asked"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
async def test_every_configuration_hands_the_stream_to_the_pump_with_what_the_client_asked(loop, config, asked,
                                                                                            first, split) -> None:
    """Plain, resume, token accounting and both: the body goes through the pump, and the client gets exactly the
    events it asked for (token ids and the usage chunk only when it asked), counted when accounting is on. The read
    that brings the head may hold no event (uvicorn writes the head on its own), whole ones, or end inside a chunk:
    the pump finishes what Python had begun, nothing lost or doubled."""
    with Rig(loop, pump=True, **config) as rig:
        stream = await Stream().start(rig, post(**asked), first=first, split=split)
        assert stream.in_pump(), stream.exchange.phase
        got = await stream.rest()
        payload, complete = dechunk(body_of(got))
        wants_ids, wants_usage = "return_token_ids" in asked, "stream_options" in asked
        # With resume on, the gateway asked for the ids: the client that did not gets them as null.
        ids = True if wants_ids else (None if config.get("resume_limit") and "seed" not in asked else False)
        assert complete and payload == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, ids, wants_usage))
        record = await stream.logged()
        assert record["status"] == 200 and record["reason"] == "" and pumped(rig) == 1
        if config.get("token_accounting"):
            assert (record["prompt_tokens"], record["completion_tokens"]) == (len(PROMPT_IDS), MAX_TOKENS)
        assert [outcome for _, outcome in rig.ended] == [Outcome.COMPLETE]
        assert rig.target.pool.idle_count == 1 and settled(rig)  # the replica connection is kept for the next one


async def test_a_metered_stream_whose_finishing_chunk_came_with_the_head_stays_in_python(loop) -> None:
    """Token accounting, usage not asked: the chunk that finishes the choice is held until the usage chunk says which
    fingerprint it carries (usage.py). Held when the head arrives, the stream stays with the meter; the client still
    gets every event but the usage chunk, and the count is the replica's."""
    with Rig(loop, pump=True, **ACCOUNTING) as rig:
        client, peer = await rig.socket_client()
        await peer.send(post())
        _, replica, sent = await rig.replica_request()
        stream = answer(sent)
        await replica.send(HEAD + b"".join(chunk(e) for e in stream[:MAX_TOKENS]))
        await peer.until(lambda got: body_of(got).count(b"data: ") == MAX_TOKENS - 1, "the events not held")
        assert client.exchange.phase is Phase.STREAMING and pumped(rig) == 0
        await replica.send(b"".join(chunk(e) for e in stream[MAX_TOKENS:]) + LAST)
        got = await peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, False, False))
        await rig.until(lambda: rig.finished, "the request logged")
        record = rig.finished[0].log_record()
        assert (record["prompt_tokens"], record["completion_tokens"]) == (len(PROMPT_IDS), MAX_TOKENS)
        assert pumped(rig) == 0 and [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)


async def test_a_tls_client_is_never_handed_to_the_pump(loop, tmp_path) -> None:
    """The pump writes plain bytes to a socket: through TLS it would corrupt the stream. A TLS client's streams are
    relayed by Python, and it reads them whole."""
    ca = TestCA(tmp_path)
    pair = ca.issue("gateway")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pair.cert, pair.key)
    with Rig(loop, pump=True) as rig:
        ours, theirs = rig.tcp_pair()
        theirs.setblocking(False)
        client = ClientConnection(rig.config, rig.state, rig.relay)
        (transport, _), (reader, writer) = await asyncio.gather(
            loop.connect_accepted_socket(lambda: client, sock=ours, ssl=server),
            asyncio.open_connection(sock=theirs, ssl=ssl.create_default_context(cafile=ca.path),
                                    server_hostname="127.0.0.1"))
        try:
            assert client.fd == -1
            writer.write(post())
            _, replica, sent = await rig.replica_request()
            stream = b"".join(chunk(e) for e in answer(sent)) + LAST
            await replica.send(HEAD + stream[:100])
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                first = await reader.readexactly(100)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and first == stream[:100]
            assert client.exchange.phase is Phase.STREAMING
            await replica.send(stream[100:])
            async with asyncio.timeout(5):
                assert await reader.readexactly(len(stream) - 100) == stream[100:]
            await rig.until(lambda: rig.finished, "the request logged")
            assert pumped(rig) == 0 and [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)
            assert rig.target.pool.idle_count == 1
        finally:
            # Both ends are transports here (the rig's Peer is not): aborted before the rig closes their sockets, so
            # no reader stays registered for a descriptor the next test's sockets reuse.
            writer.transport.abort()
            transport.abort()


@pytest.mark.parametrize("why", ["http/1.0 client", "content-length body"])
async def test_bodies_the_pump_cannot_frame_stay_in_python(loop, why) -> None:
    """An HTTP/1.0 client reads the payload without chunk framing, and a body with a length is not chunked: Python
    relays them (the pump only follows chunked framing to the client as it is)."""
    with Rig(loop, pump=True) as rig:
        client, peer = await rig.socket_client()
        request = post()
        if why == "http/1.0 client":
            request = request.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        await peer.send(request)
        _, replica, sent = await rig.replica_request()
        stream = answer(sent)
        if why == "http/1.0 client":
            head, body = HEAD, b"".join(chunk(e) for e in stream) + LAST
        else:
            body = b"".join(stream)
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)
        first = len(chunk(stream[0])) if why == "http/1.0 client" else len(stream[0])
        await replica.send(head + body[:first])  # the body goes on after its head's read
        await peer.until(lambda got: body_of(got) == stream[0], "the first event")
        assert client.exchange.phase is Phase.STREAMING
        await replica.send(body[first:])
        got = await peer.until(lambda got: got.endswith(b"data: [DONE]\n\n"), "the whole stream")
        assert body_of(got) == b"".join(stream)  # the payload as it is, no chunk framing around it
        await rig.until(lambda: rig.finished, "the request logged")
        assert pumped(rig) == 0 and [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)


# -- how the pump lets go of a stream, and what the exchange does then ---------------------------------------------

async def test_complete_gives_the_replica_connection_back_and_the_next_request_reuses_it(loop) -> None:
    with Rig(loop, pump=True) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        await stream.rest()
        await stream.logged()
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE] and rig.target.pool.idle_count == 1
        # The next request of the same client goes on the same replica connection, read by Python again.
        stream.peer.take()
        await stream.peer.send(b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n")
        await stream.replica.until(lambda got: got.startswith(b"GET /v1/models ") and got.endswith(b"\r\n\r\n"),
                                   "the second request on the same connection")
        await stream.replica.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await stream.peer.until(lambda got: got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n{}"),
                                "the second answer")
        await rig.until(lambda: len(rig.finished) == 2, "the second request logged")
        assert len(rig.upstreams) == 1 and rig.connected.empty()  # no second connection was opened
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE, Outcome.COMPLETE] and settled(rig)


async def test_a_pipelined_request_waits_for_the_pumped_stream_then_reuses_its_connection(loop) -> None:
    """The client sends its next request while the pump writes the first response: that one is answered after the
    pump's last byte, on the same replica connection, pumped too."""
    with Rig(loop, pump=True) as rig:
        client, peer = await rig.socket_client()
        await peer.send(post())
        _, replica, sent = await rig.replica_request()
        stream = b"".join(chunk(e) for e in answer(sent)) + LAST
        await replica.send(HEAD + stream[:100])
        await peer.until(lambda got: len(body_of(got)) >= 100, "the first bytes")
        assert client.exchange.phase is Phase.PUMPED
        await peer.send(post(max_tokens=2))  # the next request, while the pump relays
        await replica.send(stream[100:])
        await replica.until(lambda got: got.endswith(b'"max_tokens":2,"stream":true}'), "the next request")
        second = b"".join(chunk(e) for e in events(0, 2, PROMPT_IDS, False, False)) + LAST
        await replica.send(HEAD + second[:100])
        await peer.until(lambda got: got.count(b"HTTP/1.1 200 OK\r\n") == 2 and got.endswith(second[:100]),
                         "the second response's first bytes")
        await replica.send(second[100:])
        got = await peer.until(lambda got: got.endswith(second), "the second response")
        assert got.count(b"HTTP/1.1 200 OK\r\n") == 2 and got.index(stream) < got.index(b"HTTP/1.1", len(stream))
        await rig.until(lambda: len(rig.finished) == 2, "both requests logged")
        assert len(rig.upstreams) == 1 and pumped(rig) == 2
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE, Outcome.COMPLETE] and settled(rig)


@pytest.mark.parametrize("who", ["client", "replica"])
async def test_connection_close_after_a_pumped_stream(loop, who) -> None:
    """The client's `connection: close` closes its connection after the whole stream (the replica connection is
    kept); the replica's closes the replica connection (never pooled), the client's stays."""
    with Rig(loop, pump=True) as rig:
        client, peer = await rig.socket_client()
        await peer.send(post().replace(b"host: gw\r\n", b"host: gw\r\nconnection: close\r\n")
                        if who == "client" else post())
        _, replica, sent = await rig.replica_request()
        stream = b"".join(chunk(e) for e in answer(sent)) + LAST
        head = HEAD if who == "client" else HEAD.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        await replica.send(head + stream[:100])
        await peer.until(lambda got: len(body_of(got)) >= 100, "the first bytes")
        assert client.exchange.phase is Phase.PUMPED
        await replica.send(stream[100:])
        if who == "client":
            got = await peer.closed("the client connection closed after its last response")
            assert body_of(got) == stream and b"connection: close" in got
            await rig.until(lambda: rig.finished, "the request logged")
            assert rig.target.pool.idle_count == 1
        else:
            got = await peer.until(lambda got: got.endswith(stream), "the whole stream")
            await replica.closed("the replica connection closed")
            await rig.until(lambda: rig.finished, "the request logged")
            assert rig.target.pool.idle_count == 0 and not peer.eof
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)


async def test_trailers_end_a_pumped_stream_and_the_connection_is_reused(loop) -> None:
    with Rig(loop, pump=True) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        stream.body = stream.body[:-len(LAST)] + b"0\r\nx-trailer: 1\r\n\r\n"
        await stream.replica.send(stream.body[stream.at:])
        got = await stream.peer.until(lambda got: got.endswith(b"0\r\nx-trailer: 1\r\n\r\n"), "the trailers")
        assert body_of(got) == stream.body
        await stream.logged()
        assert rig.target.pool.idle_count == 1 and [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)


async def test_a_client_reading_slowly_gets_the_whole_pumped_stream(loop) -> None:
    """The pump holds what the client's socket cannot take and writes it as the client reads (never dropped, never
    reordered), then gives the connection back."""
    with Rig(loop, pump=True) as rig:
        stream = await Stream().start(rig, post(), peer_rcvbuf=4096, our_sndbuf=4096)
        assert stream.in_pump()
        stream.events = events(0, MAX_TOKENS, PROMPT_IDS, False, False, big=(1, 2, 3, 4), size=100_000)
        stream.body = b"".join(chunk(e) for e in stream.events) + LAST
        stream.at = len(chunk(stream.events[0]))
        await stream.replica.send(stream.body[stream.at:stream.at + 100_000])
        stream.at += 100_000
        await until_blocked(stream)
        got = await stream.rest()
        assert body_of(got) == stream.body
        await stream.logged()
        assert rig.target.pool.idle_count == 1 and [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)


async def test_bytes_after_the_end_are_not_relayed_and_the_replica_connection_is_closed(loop) -> None:
    with Rig(loop, pump=True) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        got = await stream.rest(extra=b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!")
        await stream.logged()
        assert b"EVIL" not in got and got.endswith(b"data: [DONE]\n\n\r\n" + LAST)
        await stream.replica.closed("the replica connection closed")  # never reused after a response overran
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE] and rig.target.pool.idle_count == 0
        # The client's own connection is fine: its next request gets a fresh replica connection.
        await stream.peer.send(b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n")
        fresh, replica, _ = await rig.replica_request()
        assert fresh is not stream.conn
        await replica.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await stream.peer.until(lambda got: got.endswith(b"\r\n\r\n{}"), "the next answer")
        await rig.until(lambda: len(rig.finished) == 2, "the second request logged")
        assert settled(rig)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_the_replica_closing_mid_stream_cuts_the_client_and_is_the_replicas_failure(loop, how) -> None:
    """The replica's EOF (EOF) or reset (UPSTREAM_ERROR) inside the body."""
    with Rig(loop, pump=True) as rig:
        stream = await Stream().start(rig, post(), first=2)
        assert stream.in_pump()
        if how == "reset":
            stream.replica.reset_now()
        else:
            stream.replica.sock.close()
        got = await stream.peer.closed("the client's connection cut")
        assert not dechunk(body_of(got))[1] and body_of(got).count(b"data: ") == 2  # broken, never a clean end
        record = await stream.logged()
        assert record["status"] == 200 and record["reason"] == "upstream_died_mid_response"
        assert rig.failed_on == [rig.target]
        assert sample(rig, "gateway_upstream_died_total", replica="r1") == 1
        assert [o for _, o in rig.ended] == [Outcome.FAILED] and rig.target.pool.idle_count == 0 and settled(rig)


async def test_malformed_chunking_cuts_the_client_and_drops_the_replica_connection(loop) -> None:
    with Rig(loop, pump=True) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        await stream.replica.send(b"zz\r\nnot a chunk\r\n")
        got = await stream.peer.closed("the client's connection cut")
        assert b"not a chunk" not in got and not dechunk(body_of(got))[1]
        record = await stream.logged()
        assert record["reason"] == "upstream_malformed" and rig.failed_on == [rig.target]
        await stream.replica.closed("the replica connection dropped")
        assert [o for _, o in rig.ended] == [Outcome.FAILED] and settled(rig)


@pytest.mark.parametrize("noticed_by", ["pump", "loop"])
async def test_a_client_that_leaves_aborts_the_replica_connection(loop, noticed_by) -> None:
    """The pump's failed write (CLIENT_ERROR) or the loop's read of the close, whichever comes first: the replica
    connection is dropped at once (its engine stops generating), and the attempt ends once, as client_abort."""
    with Rig(loop, pump=True) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        if noticed_by == "pump":
            # The loop reads the client's socket to see it close: without that read, only the pump's next write
            # (the replica's next event) can find out.
            stream.client.transport.pause_reading()
        stream.peer.reset_now()
        if noticed_by == "pump":
            await stream.replica.send(chunk(stream.events[1]))
        await stream.replica.closed("the replica connection dropped")
        record = await stream.logged()
        assert record["status"] == 200 and record["reason"] == "client_abort"
        assert rig.failed_on == [] and rig.target.pool.idle_count == 0
        assert [o for _, o in rig.ended] == [Outcome.CLIENT_GONE] and settled(rig)


@pytest.mark.parametrize("config", [RESUME, BOTH], ids=["resume", "resume and accounting"])
@pytest.mark.parametrize("caught_up", [True, False], ids=["client caught up", "client still behind"])
async def test_a_broken_stream_resumes_elsewhere_after_what_the_client_had_not_taken(loop, caught_up,
                                                                                     config) -> None:
    """vLLM's in-band error breaks a resumable stream in the pump (BROKEN) while the client, reading slowly, has not
    taken everything the pump wrote: those bytes reach it first, then the stream goes on from another replica, one
    continuous stream with the original id, every token once, one [DONE]. The resumed part is pumped when the client
    has caught up by then; when it has not (bytes still queued for it), Python relays it, after them. Counted (with
    accounting on) by the token ids of both parts, each once."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **config) as rig:
        stream = await Stream().start(rig, post(), peer_rcvbuf=4096, our_sndbuf=4096)
        assert stream.in_pump()
        original = events(0, MAX_TOKENS, PROMPT_IDS, True, False, big=(1, 2))[:3]  # none finishes
        unsent: list[int] = []  # what the client's transport still held as the first attempt ended

        def at_end(exchange: Exchange, outcome: Outcome) -> None:
            unsent.append(exchange.client.transport.get_write_buffer_size())

        Exchange.on_end.append(at_end)
        try:
            # Two large events, then the error, in one read of the pump (< 64 KiB): it cannot write them all.
            await stream.replica.send(chunk(original[1]) + chunk(original[2]) + chunk(ERROR_EVENT))
            second, replica, sent = await rig.replica_request()
        finally:
            Exchange.on_end.remove(at_end)
        assert second.target is rig.targets.targets[1] and unsent[0] > 0  # bytes were still unsent
        resumed = orjson.loads(sent)
        assert resumed["prompt"] == PROMPT_IDS + [100, 101, 102] and resumed["max_tokens"] == MAX_TOKENS - 3
        rest = events(3, MAX_TOKENS - 3, resumed["prompt"], True, False, ident="cmpl-2", created=2)
        if caught_up:
            expected = events(0, MAX_TOKENS, PROMPT_IDS, None, False, big=(1, 2))[:3]
            await stream.peer.until(lambda got: dechunk(body_of(got))[0] == b"".join(expected), "the first part")
            await replica.send(HEAD + chunk(rest[0]))
            await stream.peer.until(lambda got: body_of(got).count(b"data: ") == 4, "the first resumed event")
            resuming = stream.client.exchange
            assert resuming is not stream.exchange and resuming.phase is Phase.PUMPED and rig.pump.active == 1
            await replica.send(b"".join(chunk(e) for e in rest[1:]) + LAST)
        else:
            await replica.send(HEAD + b"".join(chunk(e) for e in rest) + LAST)
        got = await stream.peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, None, False, big=(1, 2)))
        record = await stream.logged()
        assert record["status"] == 200 and record["reason"] == "" and record["resumes"] == 1
        assert sample(rig, "gateway_resumes_total", outcome="resumed") == 1
        assert pumped(rig) == (2 if caught_up else 1)
        if config.get("token_accounting"):
            assert (record["prompt_tokens"], record["completion_tokens"]) == (len(PROMPT_IDS), MAX_TOKENS)
        assert rig.failed_on == [rig.target]
        await stream.replica.closed("the first replica's connection dropped")
        assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.COMPLETE] and settled(rig)


async def test_a_chat_stream_resumed_through_the_pump_reads_as_one_chat_stream(loop) -> None:
    """A chat client's stream broken by its replica goes on from /v1/completions on another; the pump relays both
    parts (the resumed one rebuilt as chat chunks, EV_RESUMED_CHAT) and the client reads one chat stream."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **RESUME) as rig:
        client, peer = await rig.socket_client()
        await peer.send(post(chat=True))
        _, replica, sent = await rig.replica_request()
        assert orjson.loads(sent)["return_token_ids"] is True
        await replica.send(HEAD + b"".join(chunk(e) for e in chat_events(3, True)))  # the role chunk, two tokens
        await peer.until(lambda got: body_of(got).count(b"data: ") == 3, "the first events")
        assert client.exchange.phase is Phase.PUMPED
        replica.sock.close()
        _, replica, sent = await rig.replica_request()
        assert replica.request_line == b"POST /v1/completions HTTP/1.1"
        assert orjson.loads(sent)["prompt"] == PROMPT_IDS + [100, 101]
        await replica.send(HEAD + chunk(answer(sent, ident="cmpl-2", created=2)[0]))
        await peer.until(lambda got: body_of(got).count(b"data: ") == 4, "the first resumed event")
        assert client.exchange.phase is Phase.PUMPED
        await replica.send(b"".join(chunk(e) for e in answer(sent, ident="cmpl-2", created=2)[1:]) + LAST)
        got = await peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(chat_events(MAX_TOKENS + 1, None)) + b"data: [DONE]\n\n"
        await rig.until(lambda: rig.finished, "the request logged")
        assert rig.finished[0].log_record()["resumes"] == 1 and pumped(rig) == 2
        assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.COMPLETE] and settled(rig)


async def test_a_pumped_stream_moves_off_a_replica_that_leaves(loop) -> None:
    """Drain by migration while the pump relays the stream: the pump lets go (what it saw is what the resume starts
    from), the leaving replica's connection is dropped, the client's stream goes on from another one, token-exact,
    and the leaving replica is not blamed."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **RESUME) as rig:
        stream = await Stream().start(rig, post(), first=2)
        assert stream.in_pump()
        assert rig.relay.migrate_off(rig.target) == 1
        _, replica, sent = await rig.replica_request()
        resumed = orjson.loads(sent)
        assert resumed["prompt"] == PROMPT_IDS + [100, 101] and resumed["max_tokens"] == MAX_TOKENS - 2
        await replica.send(HEAD + b"".join(chunk(e) for e in answer(sent, ident="cmpl-2", created=2)) + LAST)
        got = await stream.peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, None, False))
        record = await stream.logged()
        assert record["reason"] == "" and record["resumes"] == 1
        assert sample(rig, "gateway_resumes_total", outcome="migrated") == 1 and rig.failed_on == []
        await stream.replica.closed("the leaving replica's connection dropped")
        assert [o for _, o in rig.ended] == [Outcome.ANSWERED, Outcome.COMPLETE] and settled(rig)


@pytest.mark.parametrize("config", [{}, RESUME], ids=["plain", "resume"])
async def test_a_replica_silent_in_the_pump_times_out(loop, config) -> None:
    """The idle timeout counts the pump's reads: a replica that sends is not idle; one silent past idle_timeout_s
    is cut (upstream_timeout) or, resumable, resumed on another replica."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, idle_timeout_s=2.0, **config) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        stream.client.check_timeouts(100.0)
        await stream.replica.send(chunk(stream.events[1]))
        await stream.peer.until(lambda got: body_of(got).count(b"data: ") == 2, "the second event")
        stream.client.check_timeouts(102.5)  # it read meanwhile: not idle
        assert stream.in_pump()
        stream.client.check_timeouts(105.0)
        await stream.replica.closed("the silent replica's connection dropped")
        if not config:
            got = await stream.peer.closed("the client's connection cut")
            assert not dechunk(body_of(got))[1]
            record = await stream.logged()
            assert record["reason"] == "upstream_timeout"
            assert [o for _, o in rig.ended] == [Outcome.UPSTREAM_TIMEOUT]
        else:
            await resumed_whole_on_the_next_replica(rig, stream)
        assert settled(rig)


async def resumed_whole_on_the_next_replica(rig: Rig, stream: Stream) -> None:
    """The stream resumes on the next replica, which answers in full: the client reads every token once, ids null
    (it did not ask for them), and the request is logged as one success after one resume."""
    _, replica, sent = await rig.replica_request()
    _pump._fault("epoll_wait", 0)  # (a no-op unless a test made the pump's wait fail)
    await replica.send(HEAD + b"".join(chunk(e) for e in answer(sent)) + LAST)
    got = await stream.peer.until(ended, "the end of the stream")
    assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, None, False))
    record = await stream.logged()
    assert record["reason"] == "" and record["resumes"] == 1
    assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.COMPLETE]


async def until_blocked(stream: Stream, timeout_s: float = 5.0) -> None:
    """The pump found the client's socket full. No event says so: checked at each turn of the loop, with a deadline."""
    async with asyncio.timeout(timeout_s):
        while not (stream.conn.pumped is not None and stream.conn.pumped.blocked):
            await asyncio.sleep(0)


async def test_a_client_that_stops_reading_a_pumped_stream_times_out(loop) -> None:
    """The pump holds what the client does not take: silence is then the client's (client_timeout), never the
    replica's, and both connections are dropped."""
    with Rig(loop, pump=True, idle_timeout_s=2.0) as rig:
        stream = await Stream().start(rig, post(), peer_rcvbuf=4096, our_sndbuf=4096)
        big = events(0, MAX_TOKENS, PROMPT_IDS, False, False, big=(1,), size=200_000)[1]
        await stream.replica.send(chunk(big))
        await until_blocked(stream)
        stream.client.check_timeouts(200.0)
        stream.client.check_timeouts(201.0)
        assert stream.in_pump()  # not yet
        stream.client.check_timeouts(203.0)
        await stream.replica.closed("the replica connection dropped")
        await stream.peer.closed("the client's connection dropped")
        record = await stream.logged()
        assert record["reason"] == "client_timeout" and rig.failed_on == []
        assert [o for _, o in rig.ended] == [Outcome.CLIENT_TIMEOUT] and settled(rig)


def held(stream: Stream) -> bool:
    """The client is not taking what it is sent: Python's transport paused it, or the pump holds bytes for it."""
    pumped = stream.conn.pumped
    return stream.client.writing_paused or (pumped is not None and pumped.blocked)


@pytest.mark.parametrize("pump", [True, False], ids=["pump", "python relay"])
async def test_a_client_reading_slower_than_the_replica_writes_is_not_cut(loop, pump) -> None:
    """A client that reads, only slower than the replica writes, is behind at every sweep of the timeouts; it is not
    silent, so it is not cut (idle_timeout_s), by either relay: what it reads between two sweeps is progress."""
    with Rig(loop, sockets=True, pump=pump, idle_timeout_s=2.0) as rig:
        stream = await Stream().start(rig, post(max_tokens=40), peer_rcvbuf=4096, our_sndbuf=4096)
        assert stream.in_pump() if pump else stream.exchange.phase is Phase.STREAMING
        stream.events = events(0, 40, PROMPT_IDS, False, False, big=tuple(range(1, 40)), size=50_000)
        stream.body = b"".join(chunk(e) for e in stream.events) + LAST
        stream.at = len(chunk(stream.events[0]))
        sending = asyncio.ensure_future(stream.replica.send(stream.body[stream.at:]))  # ~2 MB, as fast as it goes
        try:
            for now in (200.0, 201.5, 203.0, 204.5):
                async with asyncio.timeout(5):
                    while not held(stream):
                        await asyncio.sleep(0)  # no event says so: checked at each turn of the loop
                stream.client.check_timeouts(now)
                assert stream.client.exchange is stream.exchange, f"cut at {now}"
                read = len(stream.peer.received)
                await stream.peer.until(lambda got: len(got) > read + 300_000, "300 kB more")  # then slow again
            stream.at = len(stream.body)
            got = await stream.peer.until(ended, "the end of the stream")
        finally:
            sending.cancel()
        assert body_of(got) == stream.body
        await stream.logged()
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)


@pytest.mark.parametrize("config", [{}, RESUME], ids=["plain", "resume"])
async def test_the_pumps_own_failure_is_the_gateways_error_not_the_replicas(loop, config) -> None:
    """PUMP_ERROR (epoll, memory): a plain stream is cut with reason gateway_error, a resumable one resumes; the
    replica is blamed for neither."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **config) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        _pump._fault("epoll_wait", -1)  # its next wait fails: every stream it holds ends with PUMP_ERROR
        try:
            await stream.replica.send(chunk(stream.events[1]))
            if not config:
                got = await stream.peer.closed("the client's connection cut")
                assert not dechunk(body_of(got))[1]
                record = await stream.logged()
                assert record["reason"] == "gateway_error"
                assert [o for _, o in rig.ended] == [Outcome.FAILED]
            else:
                await resumed_whole_on_the_next_replica(rig, stream)
        finally:
            _pump._fault("epoll_wait", 0)
        assert rig.failed_on == [] and sample(rig, "gateway_upstream_died_total", replica="r1") == 0
        assert settled(rig)


class NoFreeDescriptor:
    """RLIMIT_NOFILE lowered to the lowest free descriptor for a moment: every new one fails with EMFILE (a gateway at
    its fd limit), those open stay usable."""

    def __enter__(self) -> None:
        probe = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor
        os.close(probe)
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, self.limits[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


class EpollRefuses:
    """The pump's next registration fails (the fault hook tests/test_pump_unit.py uses)."""

    def __enter__(self) -> None:
        _pump._fault("epoll_add", 1)

    def __exit__(self, *exc: object) -> None:
        _pump._fault("epoll_add", 0)


@pytest.mark.parametrize(("config", "failure"), [
    ({}, NoFreeDescriptor), (ACCOUNTING, NoFreeDescriptor), (RESUME, NoFreeDescriptor), (BOTH, NoFreeDescriptor),
    ({}, EpollRefuses), (ACCOUNTING, EpollRefuses),
    # A resumable stream's events that came with the head are written by add() itself (unsent=True), after it
    # registers the replica's socket: a registration that fails leaves them to Python, written once.
    (RESUME, EpollRefuses),
], ids=["plain, fd limit", "accounting, fd limit", "resume, fd limit", "both, fd limit", "plain, epoll refuses",
        "accounting, epoll refuses", "resume, epoll refuses"])
async def test_a_stream_the_pump_cannot_take_stays_in_python(loop, config, failure) -> None:
    """The pump cannot take a stream when it hands over (it dups both descriptors: at the fd limit that fails, as a
    registration in its epoll set can): the stream goes on in Python, whole, and it is nobody's failure."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **config) as rig:
        client, peer = await rig.socket_client()
        await peer.send(post())
        _, replica, sent = await rig.replica_request()
        stream = answer(sent)
        with failure():
            await replica.send(HEAD + chunk(stream[0]))
            await peer.until(lambda got: body_of(got).count(b"data: ") >= 1, "the first event")
        assert client.exchange is not None and client.exchange.phase is Phase.STREAMING
        await replica.send(b"".join(chunk(e) for e in stream[1:]) + LAST)
        got = await peer.until(ended, "the end of the stream")
        ids = None if config.get("resume_limit") else False
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, ids, False))
        await rig.until(lambda: rig.finished, "the request logged")
        record = rig.finished[0].log_record()
        assert record["reason"] == "" and record["resumes"] == 0 and rig.failed_on == [] and pumped(rig) == 0
        if config.get("token_accounting"):
            assert (record["prompt_tokens"], record["completion_tokens"]) == (len(PROMPT_IDS), MAX_TOKENS)
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE] and settled(rig)


@pytest.mark.parametrize("split", [0, 40], ids=["whole chunks", "a chunk split at the hand-over"])
@pytest.mark.parametrize(("config", "asked"), [(ACCOUNTING, {}), (ACCOUNTING, USAGE), (BOTH, {})],
                         ids=["accounting", "accounting, usage asked", "both"])
async def test_a_client_that_leaves_a_metered_pumped_stream_is_counted_for_what_it_got(loop, config, asked,
                                                                                        split) -> None:
    """No usage chunk comes when the client leaves: the count is the events it got, those Python relayed with the
    head and those the pump relayed after, each once (with resume on, by the token ids the pump recorded)."""
    with Rig(loop, pump=True, **config) as rig:
        stream = await Stream().start(rig, post(**asked), first=2, split=split)
        assert stream.in_pump()
        await stream.replica.send(stream.body[stream.at:stream.at + len(chunk(stream.events[2])) - split])
        await stream.peer.until(lambda got: body_of(got).count(b"data: ") == 3, "the third event")
        stream.peer.reset_now()
        await stream.replica.closed("the replica connection dropped")
        record = await stream.logged()
        assert record["reason"] == "client_abort" and record["completion_tokens"] == 3
        if config.get("resume_limit"):
            assert record["prompt_tokens"] == len(PROMPT_IDS)
        assert [o for _, o in rig.ended] == [Outcome.CLIENT_GONE] and settled(rig)


@pytest.mark.parametrize("cut", ["no [DONE]", "before the finish"])
async def test_a_resumable_stream_the_replica_ends_early_in_the_pump(loop, cut) -> None:
    """The replica ends its chunked body cleanly (COMPLETE for the pump) but not its stream: without [DONE] after the
    finish, the gateway ends the stream itself and the connection is kept; before the finish, the stream goes on
    from another replica."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **RESUME) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        sent = stream.events[1:-1] if cut == "no [DONE]" else stream.events[1:3]
        await stream.replica.send(b"".join(chunk(e) for e in sent) + LAST)
        if cut == "before the finish":
            _, replica, body = await rig.replica_request()
            assert orjson.loads(body)["prompt"] == PROMPT_IDS + [100, 101, 102]
            await replica.send(HEAD + b"".join(chunk(e) for e in answer(body)) + LAST)
        got = await stream.peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, None, False))
        record = await stream.logged()
        assert record["reason"] == ""
        if cut == "no [DONE]":
            assert record["resumes"] == 0 and rig.target.pool.idle_count == 1
            assert [o for _, o in rig.ended] == [Outcome.COMPLETE]
        else:
            assert record["resumes"] == 1 and rig.failed_on == [rig.target]
            assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.COMPLETE]
        assert settled(rig)


@pytest.mark.parametrize("config", [{}, RESUME, ACCOUNTING], ids=["plain", "resume", "accounting"])
async def test_coalescing_streams_complete_whole_or_end_once_when_the_client_leaves(loop, config) -> None:
    """Chunks back to back make the pump hold a stream for a coalescing window (coalesce_ms; here with any number of
    streams in flight): it still reaches the client whole and in order, and a client that leaves meanwhile ends it
    once, the replica connection dropped."""
    with Rig(loop, pump=True, coalesce_min_streams=0, **config) as rig:
        stream = await Stream().start(rig, post())
        assert stream.in_pump()
        for e in stream.events[1:4]:
            await stream.replica.send(chunk(e))  # back to back: within one window of each other
        stream.at += sum(len(chunk(e)) for e in stream.events[1:4])
        await stream.peer.until(lambda got: body_of(got).count(b"data: ") == 4, "the back-to-back events")
        got = await stream.rest()
        ids = None if config.get("resume_limit") else False
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, ids, False))
        await stream.logged()
        kept = rig.target.pool.take_idle()
        assert kept is stream.conn
        kept.close()  # the next stream on a connection of its own, whose replica end the test plays afresh

        second = await Stream().start(rig, post())
        assert second.in_pump()
        await second.replica.send(chunk(second.events[1]) + chunk(second.events[2]))
        await second.replica.send(chunk(second.events[3]))
        second.peer.reset_now()
        await second.replica.closed("the replica connection dropped")
        await rig.until(lambda: len(rig.finished) == 2, "the second request logged")
        assert rig.finished[1].log_record()["reason"] == "client_abort"
        assert [o for _, o in rig.ended] == [Outcome.COMPLETE, Outcome.CLIENT_GONE] and settled(rig)


async def test_a_resume_after_the_last_token_rewinds_it_in_python(loop) -> None:
    """The replica dies after the last token but before the usage chunk the client asked for: the resume asks
    another for that token again (its usage chunk comes with it) and drops it. That rewound part stays in Python
    (the pump does not drop tokens); the client reads every token once and the usage of an uninterrupted request."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **RESUME) as rig:
        stream = await Stream().start(rig, post(**USAGE))
        assert stream.in_pump()
        await stream.replica.send(b"".join(chunk(e) for e in stream.events[1:MAX_TOKENS]))
        await stream.peer.until(lambda got: body_of(got).count(b"data: ") == MAX_TOKENS, "every token")
        stream.replica.sock.close()
        _, replica, sent = await rig.replica_request()
        resumed = orjson.loads(sent)
        assert resumed["prompt"] == PROMPT_IDS + [100 + i for i in range(MAX_TOKENS - 1)] and resumed["max_tokens"] == 1
        await replica.send(HEAD + b"".join(chunk(e) for e in answer(sent, ident="cmpl-2", created=2)) + LAST)
        got = await stream.peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, None, True))
        record = await stream.logged()
        assert record["resumes"] == 1 and pumped(rig) == 1
        assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.COMPLETE] and settled(rig)


async def test_a_resumed_part_in_the_pump_moves_off_a_replica_that_leaves(loop) -> None:
    """A stream resumed once (its resumed part in the pump) whose second replica leaves the set: it moves to a
    third from what the pump had relayed of the resumed part, token-exact, one [DONE]; only the first is blamed."""
    with Rig(loop, replicas=("r1", "r2", "r3"), pump=True, **RESUME) as rig:
        stream = await Stream().start(rig, post(), first=2)
        assert stream.in_pump()
        stream.replica.sock.close()
        second, replica, sent = await rig.replica_request()
        part = answer(sent, ident="cmpl-2", created=2)
        await replica.send(HEAD + chunk(part[0]))
        await stream.peer.until(lambda got: body_of(got).count(b"data: ") == 3, "the first resumed event")
        assert stream.client.exchange.phase is Phase.PUMPED
        assert rig.relay.migrate_off(second.target) == 1
        _, replica, sent = await rig.replica_request()
        assert orjson.loads(sent)["prompt"] == PROMPT_IDS + [100, 101, 102]
        await replica.send(HEAD + b"".join(chunk(e) for e in answer(sent, ident="cmpl-3", created=3)) + LAST)
        got = await stream.peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, None, False))
        record = await stream.logged()
        assert record["resumes"] == 2 and rig.failed_on == [rig.target]
        assert sample(rig, "gateway_resumes_total", outcome="resumed") == 1
        assert sample(rig, "gateway_resumes_total", outcome="migrated") == 1
        assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.ANSWERED, Outcome.COMPLETE] and settled(rig)


async def test_a_stream_whose_client_is_behind_stays_on_a_leaving_replica(loop) -> None:
    """Drain by migration while the pump holds bytes the client has not taken: stopping the pump would drop them (the
    client would read a cut chunk, then the resumed events), so the stream stays on the leaving replica, as a stream
    resume refuses does; once the client has caught up it can move, token-exact."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **RESUME) as rig:
        stream = await Stream().start(rig, post(), peer_rcvbuf=4096, our_sndbuf=4096)
        assert stream.in_pump()
        original = events(0, MAX_TOKENS, PROMPT_IDS, True, False, big=(1, 2))
        await stream.replica.send(chunk(original[1]) + chunk(original[2]))
        await until_blocked(stream)
        assert rig.relay.migrate_off(rig.target) == 0 and stream.in_pump()
        expected = events(0, MAX_TOKENS, PROMPT_IDS, None, False, big=(1, 2))
        await stream.peer.until(lambda got: dechunk(body_of(got))[0] == b"".join(expected[:3]), "what was held")
        assert rig.relay.migrate_off(rig.target) == 1  # caught up: it moves
        _, replica, sent = await rig.replica_request()
        assert orjson.loads(sent)["prompt"] == PROMPT_IDS + [100, 101, 102]
        await replica.send(HEAD + b"".join(chunk(e) for e in answer(sent, ident="cmpl-2", created=2)) + LAST)
        got = await stream.peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(expected)
        record = await stream.logged()
        assert record["resumes"] == 1 and rig.failed_on == []
        assert [o for _, o in rig.ended] == [Outcome.ANSWERED, Outcome.COMPLETE] and settled(rig)


async def test_an_error_that_comes_with_the_head_leaves_the_stream_to_python_which_resumes_it(loop) -> None:
    """vLLM's in-band error already in the read that brings the head: the pump declines the stream (add() saw it
    break) and Python handles it as a broken stream, resumed on another replica once the first ends its response."""
    with Rig(loop, replicas=("r1", "r2"), pump=True, **RESUME) as rig:
        client, peer = await rig.socket_client()
        await peer.send(post())
        _, replica, sent = await rig.replica_request()
        original = answer(sent)
        await replica.send(HEAD + chunk(original[0]) + chunk(ERROR_EVENT))
        await peer.until(lambda got: body_of(got).count(b"data: ") == 1, "the first event")
        assert client.exchange.phase is Phase.STREAMING and pumped(rig) == 0
        await replica.send(chunk(b"data: [DONE]\n\n") + LAST)  # vLLM ends its response after the error
        _, replica, sent = await rig.replica_request()
        assert orjson.loads(sent)["prompt"] == PROMPT_IDS + [100]
        rest = answer(sent, ident="cmpl-2", created=2)
        await replica.send(HEAD + chunk(rest[0]))
        await peer.until(lambda got: body_of(got).count(b"data: ") == 2, "the first resumed event")
        assert client.exchange.phase is Phase.PUMPED  # the resumed part goes to the pump
        await replica.send(b"".join(chunk(e) for e in rest[1:]) + LAST)
        got = await peer.until(ended, "the end of the stream")
        assert dechunk(body_of(got))[0] == b"".join(events(0, MAX_TOKENS, PROMPT_IDS, None, False))
        await rig.until(lambda: rig.finished, "the request logged")
        assert rig.finished[0].log_record()["resumes"] == 1 and pumped(rig) == 1
        assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.COMPLETE] and settled(rig)
