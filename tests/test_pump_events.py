"""The pump's SSE event layer (Pump.add(..., events=EV_RESUME | ...)) against the Python path it replaces:
resume.py's ResumeStream, fed the same chunked bytes split into the same reads. What the client receives (the
payload; both re-frame one chunk per read) and what a resume would need (token ids, prompt ids, finish, usage,
[DONE], broken, no ids) must be the same, byte for byte. Streams are vLLM's shapes (chat and completions, with
and without token ids, the usage chunk, in-band errors, early [DONE], comments, garbage), made with orjson as
vLLM's pydantic writes them (compact). Runs in the sanitizer build too (scripts/pump_asan.sh)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httptools
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dataplane import _pump
from gateway.dataplane.resume import ResumeStream
from tests.pump_rig import HEAD, Rig

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED = {"events": 0}
ERROR_EVENT = (b'data: {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", '
               b'"param": null, "code": 500}}\n\n')
# How a drawn stream ends: mostly as vLLM ends one; else [DONE] too early, vLLM's in-band error or an event that is
# not JSON somewhere (spoil), cut before [DONE], or one event without token ids.
ENDINGS = ["normal"] * 6 + ["early_done", "error", "garbage", "truncated", "no_ids"]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("GATEWAY_FUZZ_REPORT")
    if path:
        with open(path, "a") as handle:
            handle.write(f"sse_events {TRIED['events']}\n")


def event(document: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


@st.composite
def vllm_stream(draw) -> tuple[list[bytes], dict[str, Any]]:
    """The SSE events of one vLLM stream (return_token_ids on), and the request it answers."""
    chat = draw(st.booleans())
    include_usage = draw(st.booleans())
    wants_ids = draw(st.booleans())
    head = {"id": draw(st.text(min_size=1, max_size=12)), "object": "chat.completion.chunk" if chat else
            "text_completion", "created": draw(st.integers(0, 2**40)), "model": draw(st.text(max_size=8))}
    prompt = draw(st.lists(st.integers(0, 200000), min_size=1, max_size=6))
    tokens = draw(st.lists(st.tuples(st.text(max_size=6), st.lists(st.integers(0, 200000), max_size=2),
                                     st.integers(0, 30)), max_size=8))
    events: list[bytes] = []
    if chat:
        events.append(event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}],
                             "prompt_token_ids": prompt}))
    ending = draw(st.sampled_from(ENDINGS))
    for i, (text, ids, noise) in enumerate(tokens):
        last = i == len(tokens) - 1 and ending in ("normal", "no_ids")
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = "length" if last else None
        if not chat or last:
            choice["stop_reason"] = None
        if not chat:
            choice["prompt_token_ids"] = prompt if i == 0 else None
        if not (ending == "no_ids" and i == 1):
            choice["token_ids"] = ids
        events.append(event({**head, "choices": [choice]}))
        if noise == 0:
            events.append(b": keep-alive\n\n")
        elif noise == 1:
            events.append(b"event: ping\ndata: {}\n\n")
    spoil(draw, events, ending)
    if ending in ("normal", "no_ids", "early_done") and include_usage and ending != "early_done":
        n = len(tokens)
        events.append(event({**head, "choices": [], "usage": {"prompt_tokens": len(prompt), "total_tokens":
                                                              len(prompt) + n, "completion_tokens": n}}))
    if ending != "truncated":
        events.append(b"data: [DONE]\n\n")
    body = {"stream": True, "stream_options": {"include_usage": include_usage}}
    if wants_ids:
        body["return_token_ids"] = True
    return events, {"chat": chat, "wants_ids": wants_ids, "include_usage": include_usage, "body": body,
                    "ended": ending != "truncated"}


def spoil(draw, events: list[bytes], ending: str) -> None:
    """The endings "error" and "garbage": vLLM's in-band error, or an event that is not JSON, at any place."""
    if ending == "error":
        events.insert(draw(st.integers(0, len(events))), ERROR_EVENT)
    elif ending == "garbage":
        events.insert(draw(st.integers(0, len(events))), b"data: this is not json\n\n")


@st.composite
def chunked(draw, events: list[bytes], ended: bool, cut_events: bool = True) -> list[bytes]:
    """The events framed as chunks (mostly one event a chunk, as vLLM; sometimes cut anywhere) and split into
    reads at random places."""
    payload = b"".join(events)
    bounds = {0, len(payload)}
    at = 0
    for ev in events:
        at += len(ev)
        bounds.add(at)
    if payload and cut_events and draw(st.booleans()):
        bounds |= set(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    bounds = sorted(bounds)
    body = b"".join(b"%x\r\n%s\r\n" % (b - a, payload[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a)
    if ended:
        body += b"0\r\n\r\n"
    if not body:
        return []
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=10))))
    edges = [0, *[c for c in cuts if 0 < c < len(body)], len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])]


class Collect:
    """A transport that keeps what is written (the Python path's client)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class Feeder:
    """upstream.py's _SinkFeeder: each chunk's payload queued for the ResumeStream."""

    def __init__(self, pending: list[bytes]):
        self.pending = pending

    def on_body(self, body: bytes) -> None:
        self.pending.append(body)


def dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while pos < len(data):
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol], 16)
        out.append(data[eol + 2:eol + 2 + size])
        assert data[eol + 2 + size:eol + 4 + size] == b"\r\n"
        pos = eol + 4 + size
    return b"".join(out)


def python_path(reads: list[bytes], meta: dict[str, Any]) -> tuple[ResumeStream, bytes]:
    stream = ResumeStream(dict(meta["body"]), meta["chat"], meta["wants_ids"], 1)
    transport = Collect()
    stream.start_segment(transport)  # type: ignore[arg-type]
    feed_python(stream, reads)
    return stream, dechunk(bytes(transport.data))


def feed_python(stream: ResumeStream, reads: list[bytes]) -> None:
    """The reads through httptools into the stream as upstream.py feeds it (_SinkFeeder), flushed after each."""
    parser = httptools.HttpResponseParser(Feeder(stream.pending))
    parser.feed_data(HEAD)
    for piece in reads:
        parser.feed_data(piece)
        stream.flush()


def flags(meta: dict[str, Any]) -> int:
    value = _pump.EV_RESUME | _pump.EV_FIRST
    if not meta["wants_ids"]:
        value |= _pump.EV_STRIP_IDS
    if meta["include_usage"]:
        value |= _pump.EV_NEED_USAGE
    return value


def ids(raw: bytes | None) -> list[int] | None:
    return None if raw is None else orjson.loads(b"[" + raw + b"]")


def feed_as_upstream(rig: Any, reads: list[bytes], with_head: bool, meta: dict[str, Any],
                     python_path: Callable[[list[bytes], dict[str, Any]], tuple[Any, bytes]]) -> Any:
    """Every read to the pump as upstream.py hands a stream over (the head's read unsent when `with_head`): its
    Stream, or None when the pump declined that first read, which the Python path then relays whole (an error,
    garbage, or the end), as `python_path` shows."""
    if rig.stream is None:
        first, _ = python_path(reads[:1], meta)
        assert with_head and (first.broken or meta["ended"] and len(reads) == 1)
        return None
    rig.feed_reads(reads[1:] if with_head else reads)
    rig.drain()
    return rig.stream


@FUZZ
@given(st.data())
def test_the_pump_handles_events_as_the_python_path_does(data) -> None:
    TRIED["events"] += 1
    events, meta = data.draw(vllm_stream())
    reads = data.draw(chunked(events, meta["ended"]))
    reference, expected = python_path(reads, meta)
    if reference._raw_ids:
        reference._parse_raw_ids()
    # The read that brought the head: its payload handed to add() unsent, as upstream.py hands a resumable stream over.
    with_head = bool(reads) and data.draw(st.booleans())
    rig = Rig(events=flags(meta), body_so_far=reads[0], unsent=True) if with_head else Rig(events=flags(meta))
    try:
        stream = feed_as_upstream(rig, reads, with_head, meta, python_path)
        if stream is None:
            return
        got = dechunk(bytes(rig.received) + (rig.ended[0][1] or b"" if rig.ended else b""))
        assert got == expected
        assert stream.broken == reference.broken
        assert stream.done_sent == reference.done
        if not reference.broken:
            assert stream.finished == reference.finished
            assert stream.usage_sent == reference.usage_sent
            assert stream.no_ids == reference.no_ids
        assert ids(stream.token_ids) == reference.received
        assert ids(stream.prompt_token_ids) == reference.prompt_ids
        if reference.ident is not None:
            first = orjson.loads(stream.first_event)
            assert (first["id"], first["created"]) == (reference.ident, reference.created)
        if rig.ended:
            expected_code = _pump.BROKEN if reference.broken else _pump.COMPLETE
            assert rig.code == expected_code
        else:
            assert not meta["ended"] or reference.broken
    finally:
        rig.close()


def test_the_usage_chunk_is_read_in_every_event_mode() -> None:
    """EV_ON alone (token accounting, resume off): bytes relayed as they are, the usage counts kept."""
    usage = event({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 17, "total_tokens": 42, "completion_tokens": 25}})
    content = event({"id": "x", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
    body = b"%x\r\n%s\r\n" % (len(content), content) + b"%x\r\n%s\r\n" % (len(usage), usage)
    body += b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    rig = Rig(events=_pump.EV_ON)
    try:
        for i in range(0, len(body), 7):
            rig.feed(body[i:i + 7])
        assert rig.code == _pump.COMPLETE and rig.received == body
        assert rig.stream.usage == (17, 25) and rig.stream.events == 1  # content events: the usage chunk aside
    finally:
        rig.close()


def test_an_event_begun_on_the_python_path_is_finished_by_the_pump() -> None:
    """The hand-over: Python read the head and the start of an event; the pump gets the rest of it as `prefix`."""
    ev = event({"id": "x", "choices": [{"index": 0, "text": "a", "finish_reason": None, "token_ids": [5]}]})
    rig = Rig(events=_pump.EV_RESUME | _pump.EV_STRIP_IDS, prefix=ev[:20], body_so_far=b"%x\r\n" % len(ev) + ev[:20])
    try:
        rig.feed(ev[20:] + b"\r\n")
        assert dechunk(bytes(rig.received)) == ev.replace(b"[5]", b"null")
        assert rig.stream.token_ids == b"5"
    finally:
        rig.close()


# -- token accounting: usage.py's StreamMeter, chunk by chunk with the replica's framing kept

FINGERPRINT = "fp_1234"


@st.composite
def metered_stream(draw) -> tuple[list[bytes], bool]:
    """vLLM's events for a stream that asked for usage (the gateway did, for the client or for itself)."""
    chat = draw(st.booleans())
    head = {"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
            "model": "m"}
    events = []
    if chat:
        events.append(event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}))
    n = draw(st.integers(1, 6))  # vLLM always ends a choice with a finish_reason
    for i in range(n):
        last = i == n - 1
        text = draw(st.text(max_size=5))
        choice: dict[str, Any] = {"index": 0, **({"delta": {"content": text}} if chat else {"text": text}),
                                  "logprobs": None, "finish_reason": "stop" if last else None}
        events.append(event({**head, "choices": [choice]}))
    ending = draw(st.sampled_from(["usage", "usage", "usage_fp_null", "no_usage", "truncated"]))
    if ending.startswith("usage"):
        events.append(event({**head, "choices": [], "usage": {"prompt_tokens": draw(st.integers(0, 10**6)),
                                                              "total_tokens": 9, "completion_tokens": n},
                             "system_fingerprint": None if ending == "usage_fp_null" else FINGERPRINT}))
    if ending != "truncated":
        events.append(b"data: [DONE]\n\n")
    return events, ending != "truncated"


@FUZZ
@given(st.data())
def test_the_pump_strips_the_usage_chunk_as_the_meter_does(data) -> None:
    from gateway.observability.usage import Ask, StreamMeter
    TRIED["events"] += 1
    events, ended = data.draw(metered_stream())
    reads = data.draw(chunked(events, ended, cut_events=False))  # the meter reads vLLM's one event a chunk
    strip = data.draw(st.booleans())
    meter = StreamMeter(Ask("m", True, True, strip, None, 1))
    meter.head(200, True)
    expected = b"".join(meter.feed(piece) for piece in reads)
    meter.end()
    rig = Rig(events=_pump.EV_ON | (_pump.EV_STRIP_USAGE if strip else 0))
    try:
        rig.feed_reads(reads)
        assert bytes(rig.received) == expected
        assert rig.stream.usage == ((meter.prompt, meter.completion) if meter.exact else None)
    finally:
        rig.close()


@FUZZ
@given(st.data())
def test_the_c_batch_loop_is_resume_pys_own(data) -> None:
    """resume.py's _batch takes the pump's token_ids() for its loop when the pump is built: the same client bytes
    and the same state as its Python loop (what an install without a C compiler runs)."""
    import gateway.dataplane.resume as resume

    TRIED["events"] += 1
    events, meta = data.draw(vllm_stream())
    reads = data.draw(chunked(events, meta["ended"]))
    with_c, out_c = python_path(reads, meta)
    saved, resume._token_ids = resume._token_ids, None
    try:
        without_c, out_py = python_path(reads, meta)
    finally:
        resume._token_ids = saved
    assert out_c == out_py
    for name in ("finished", "usage_sent", "done", "broken", "no_ids", "prompt_ids", "ident", "created"):
        assert getattr(with_c, name) == getattr(without_c, name), name
    for stream in (with_c, without_c):
        if stream._raw_ids:
            stream._parse_raw_ids()
    assert with_c.received == without_c.received


def test_a_first_event_that_only_looks_like_json_is_read_when_asked_for_and_leaves_no_id() -> None:
    """resume_absorb keeps the pump's first event as bytes; ResumeStream.ident reads it when asked for. An event the
    pump took for JSON by its braces that is not JSON leaves the id unknown (it raised in the pump's end callback,
    when resume_absorb parsed it there)."""
    from gateway.dataplane.pumping import resume_absorb

    meta = {"chat": True, "wants_ids": False, "include_usage": False, "body": {"stream": True}}
    for first, ident in ((b'{"id":"chatcmpl-1","created":7,"choices":[]}', "chatcmpl-1"), (b"{not json}", None)):
        rig = Rig(events=flags(meta))
        try:
            event = b"data: " + first + b"\n\n"
            rig.feed(b"%x\r\n%s\r\n" % (len(event), event))
            rig.drain()
            state = ResumeStream(dict(meta["body"]), True, False, 1)
            resume_absorb(state, rig.stream)
            assert state.first_event == first  # not parsed yet
            assert state.ident == ident
            assert state.created == (7 if ident else None)
            assert state.first_event is None
        finally:
            rig.close()


@pytest.mark.parametrize("split", [False, True], ids=["one read", "a read a chunk"])
def test_after_the_usage_chunk_a_stripping_pump_passes_the_rest_as_the_meter_does(split) -> None:
    """usage.py's meter passes what follows the usage chunk as it comes (vLLM writes only [DONE] and the last chunk
    there); the pump does the same, in the usage chunk's read and after it: the same bytes, the same events."""
    from gateway.observability.usage import Ask, StreamMeter

    head = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    events = [head + b'[{"index":0,"delta":{"content":" a"},"logprobs":null,"finish_reason":"length"}]}\n\n',
              head + b'[],"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1}}\n\n',
              b'data: {"odd":"not vLLM\'s, after its usage chunk","finish_reason":"stop"}\n\n', b"data: [DONE]\n\n"]
    frames = [b"%x\r\n%s\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]
    reads = frames if split else [b"".join(frames)]
    meter = StreamMeter(Ask("m", True, True, True, None, 1))
    meter.head(200, True)
    expected = b"".join(meter.feed(piece) for piece in reads)
    rig = Rig(events=_pump.EV_ON | _pump.EV_STRIP_USAGE)
    try:
        rig.feed_reads(reads)
        rig.drain()
        assert bytes(rig.received) == expected
        assert b'"usage"' not in expected and expected.endswith(frames[2] + frames[3] + frames[4])
        assert rig.stream.events == meter.events
        assert rig.stream.usage == (3, 1)
    finally:
        rig.close()
