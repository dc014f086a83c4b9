"""Chunked response framing on the Python path (UpstreamConnection + Exchange, no C pump), httptools as the
reference: a table of shapes, then properties over random bodies fed in random splits (head and body in
separate reads, as uvicorn writes them).

The strategies are the pump fuzzer's (tests/test_pump_fuzz.py: sizes in both cases and zero padded,
extensions, trailers, bytes after the end, truncation), so both relays are held to the same inputs.
"""

from __future__ import annotations

import asyncio

import httptools
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.dataplane.exchange import Outcome
from gateway.dataplane.response_head import end_of_chunked
from tests.test_exchange_unit import Rig
from tests.test_pump_fuzz import FUZZ, framed, splits

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Reference:
    """httptools fed the whole response at once: where it ends, its payload, or that it is malformed."""

    def __init__(self, body: bytes):
        self.payload = bytearray()
        self.complete = False
        self.error = False
        self.end: int | None = None
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(HEAD)
        for i in range(len(body)):  # byte by byte: the end is exact
            try:
                parser.feed_data(body[i:i + 1])
            except httptools.HttpParserError:
                self.error = True
                return
            if self.complete:
                self.end = i + 1
                return

    def on_body(self, body: bytes) -> None:
        self.payload += body

    def on_message_complete(self) -> None:
        self.complete = True


def relay(pieces: list[bytes], http10: bool = False) -> tuple[Rig, bytes, object, bool]:
    """Run one response through the Python path: (rig, the body part the client got, outcome, pooled)."""

    async def run() -> tuple[Rig, bytes, object, bool]:
        rig = Rig(asyncio.get_running_loop())
        try:
            conn = rig.pooled()
            client, out = rig.client()
            client.data_received(b"GET /v1/x HTTP/1.0\r\n\r\n" if http10 else b"GET /v1/x HTTP/1.1\r\nhost: g\r\n\r\n")
            exchange = client.exchange
            for piece in pieces:
                if conn.closed:
                    break
                conn.data_received(piece)  # after the end too: bytes then reach an idle pooled connection
            if not exchange.done:
                conn.connection_lost(None)
            written = bytes(out.written)
            body = written.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in written else b""
            pooled = rig.target.pool.take_idle() is conn
            return rig, body, exchange.outcome, pooled
        finally:
            rig.close()

    return asyncio.run(run())


TABLE = [
    ("one chunk", b"5\r\nhello\r\n0\r\n\r\n"),
    ("upper hex, zero padded", b"000A\r\n0123456789\r\n00\r\n\r\n"),
    ("extensions", b"5;name=value;x\r\nhello\r\n0;done\r\n\r\n"),
    ("trailers", b"5\r\nhello\r\n0\r\nx-usage: 1\r\ny: 2\r\n\r\n"),
    ("empty", b"0\r\n\r\n"),
    ("sse events", b"f\r\ndata: {\"a\":1}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("name,body", TABLE, ids=[name for name, _ in TABLE])
def test_table_every_split(name, body) -> None:
    reference = Reference(body)
    assert reference.end == len(body)
    whole = HEAD + body
    for cut in range(1, len(whole)):
        _, got, outcome, pooled = relay([whole[:cut], whole[cut:]])
        assert outcome is Outcome.COMPLETE and got == body and pooled, cut
        _, got, outcome, _ = relay([whole[:cut], whole[cut:]], http10=True)
        assert outcome is Outcome.COMPLETE and got == bytes(reference.payload), cut


@pytest.mark.parametrize("extra", [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!", b"garbage", b"5\r\nhello\r\n"])
def test_table_bytes_after_the_end_are_cut_and_the_connection_retired(extra) -> None:
    body = b"5\r\nhello\r\n0\r\n\r\n"
    whole = HEAD + body + extra
    terminator = range(len(HEAD) + len(body) - 6, len(HEAD) + len(body))  # cuts inside `\r\n0\r\n\r\n`
    for cut in range(1, len(whole)):
        _, got, outcome, pooled = relay([whole[:cut], whole[cut:]])
        assert not pooled and body.startswith(got), cut  # never a byte of the extra, never reused
        # Exact unless the read that ends the body begins inside its last-chunk line: then the exchange fails
        # rather than guess (the C pump tracks the framing and is exact in every case).
        assert (outcome is Outcome.COMPLETE and got == body) or (cut in terminator and outcome is Outcome.FAILED), cut


@FUZZ
@given(st.data())
def test_python_path_agrees_with_httptools_on_where_a_chunked_body_ends(data) -> None:
    f = data.draw(framed())
    reference = Reference(f.body)
    extra = reference.end is not None and reference.end < len(f.body)
    pieces = data.draw(splits(HEAD + f.body))
    _, got, outcome, pooled = relay(pieces)
    if extra:
        # Bytes after the end: never relayed, the connection never reused. Where the body ended is found by its
        # last-chunk line (the parser says that it ended, not where); when that line is not found in the reads
        # kept, the exchange fails rather than relay a byte too many (the C pump is exact).
        assert not pooled
        assert f.body[:reference.end].startswith(got)
        assert outcome is Outcome.FAILED or got == f.body[:reference.end]
    elif reference.end is not None:
        assert outcome is Outcome.COMPLETE
        assert got == f.body[:reference.end]
        assert pooled
    elif reference.error:
        assert outcome is Outcome.FAILED and not pooled
        assert f.body.startswith(got)
    else:  # truncated: the replica went away mid-body
        assert outcome is Outcome.FAILED and not pooled and got == f.body


@FUZZ
@given(st.data())
def test_python_path_dechunks_like_httptools_for_an_http10_client(data) -> None:
    f = data.draw(framed())
    reference = Reference(f.body)
    assume(reference.end is not None and reference.end == len(f.body))
    pieces = data.draw(splits(HEAD + f.body))
    _, got, outcome, _ = relay(pieces, http10=True)
    assert outcome is Outcome.COMPLETE and got == bytes(reference.payload)
