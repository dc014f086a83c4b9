"""The stream meter in-process: byte-exact output for any split of the replica's bytes into reads.

A stream as vLLM 0.32 frames it (one chunk per event) is cut at random places; what the meter passes on,
joined, must be the stream the client would have got from vLLM without include_usage, and the counts the
usage chunk's.
"""

from __future__ import annotations

import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.observability.usage import _FINGERPRINT, StreamMeter, UsageBook, _fingerprint_of, ask

try:
    from gateway.dataplane._pump import meter_read
except ImportError:  # installed without a C compiler
    meter_read = None

FP = b'"vllm-0.32.0-abc"'


def frame(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def vllm_stream(tokens: int, chat: bool, with_usage: bool) -> bytes:
    """What vLLM writes for one choice, with or without the usage chunk (the fingerprint moves to it)."""
    prefix = b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":['
    events = []
    if chat:
        events.append(prefix + b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n')
    for i in range(tokens):
        last = i == tokens - 1
        finish = b'"length"' if last else b"null"
        event = prefix + b'{"index":0,"delta":{"content":"t%d"},"finish_reason":%s}]' % (i, finish)
        event += b',"system_fingerprint":%s}\n\n' % FP if last and not with_usage else b"}\n\n"
        events.append(event)
    if with_usage:
        events.append(prefix + b'],"usage":{"prompt_tokens":7,"total_tokens":%d,"completion_tokens":%d},'
                      b'"system_fingerprint":%s}\n\n' % (7 + tokens, tokens, FP))
    events.append(b"data: [DONE]\n\n")
    return b"".join(frame(event) for event in events) + b"0\r\n\r\n"


def meter_for(body: dict, path: bytes = b"/v1/chat/completions") -> tuple[StreamMeter, bytes | None]:
    asked = ask(b"POST", path, orjson.dumps(body))
    assert asked is not None
    meter = StreamMeter(asked[0])
    meter.head(200, True)
    return meter, asked[1]


@settings(max_examples=300, deadline=None)
@given(tokens=st.integers(1, 12), chat=st.booleans(), client_asked=st.booleans(), cuts=st.lists(st.integers(0, 4000)))
def test_any_split_gives_the_client_its_own_stream(tokens: int, chat: bool, client_asked: bool,
                                                   cuts: list[int]) -> None:
    body = {"model": "m", "stream": True, "max_tokens": tokens}
    if client_asked:
        body["stream_options"] = {"include_usage": True}
    meter, new_body = meter_for(body, b"/v1/chat/completions" if chat else b"/v1/completions")
    assert (new_body is None) == client_asked
    if new_body is not None:
        assert orjson.loads(new_body) == {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
    sent = vllm_stream(tokens, chat, with_usage=True)
    points = sorted({cut % (len(sent) + 1) for cut in cuts} | {0, len(sent)})
    out = b"".join(meter.feed(sent[a:b]) for a, b in zip(points, points[1:]))
    meter.end()
    assert out == (sent if client_asked else vllm_stream(tokens, chat, with_usage=False))
    assert (meter.prompt, meter.completion, meter.exact) == (7, tokens, True)


def test_a_cut_stream_counts_the_events_the_client_got() -> None:
    meter, _ = meter_for({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x" * 30}]})
    sent = vllm_stream(10, True, with_usage=True)
    meter.feed(sent[:sent.index(b"t5")])  # the role event and tokens 0-4 complete, token 5 cut
    meter.end()
    assert (meter.completion, meter.exact) == (5, False)
    assert meter.prompt == meter.ask.prompt_estimate == 10 + 8


def test_not_a_completion_is_left_alone() -> None:
    assert ask(b"GET", b"/v1/models", b"") is None
    assert ask(b"POST", b"/v1/chat/completions", b"not json") is None
    assert ask(b"POST", b"/other", b'{"model":"m"}') is None
    what, body = ask(b"POST", b"/v1/chat/completions", b'{"model":"m","max_completion_tokens":9,"n":2}')
    assert body is None and what.max_tokens == 18 and not what.stream


def _relay_hook(meter: StreamMeter, read: bytes) -> bytes:
    """What the Python relay does with a read of a metered stream (gateway/dataplane/upstream.py data_received)."""
    if meter.plain:
        if meter_read(read, meter.tally):
            return read
        return meter.feed_rare(read)
    return meter.feed(read)


@pytest.mark.skipif(meter_read is None, reason="the C pump is not built")
@settings(max_examples=300, deadline=None)
@given(tokens=st.integers(1, 12), chat=st.booleans(), client_asked=st.booleans(),
       cuts=st.lists(st.integers(0, 4000)), bounds=st.lists(st.integers(0, 40)), stop=st.integers(0, 4000))
def test_the_relays_c_read_test_counts_and_passes_what_feed_does(tokens: int, chat: bool, client_asked: bool,
                                                                 cuts: list[int], bounds: list[int], stop: int) -> None:
    """meter_read in place of feed() for the common read, and in feed() for a read's whole chunks: the same bytes to
    the client and the same counts as feed() without it, for any split of the stream into reads, whole or cut short
    anywhere."""
    body = {"model": "m", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}
    if client_asked:
        body["stream_options"] = {"include_usage": True}
    path = b"/v1/chat/completions" if chat else b"/v1/completions"
    sent = vllm_stream(tokens, chat, with_usage=True)
    sent = sent[:len(sent) - stop % (len(sent) + 1) if stop % 3 == 0 else len(sent)]  # a third of them cut short
    ends = [at + 3 for at in range(len(sent)) if sent.startswith(b"\n\r\n", at)]  # chunk boundaries
    points = {cut % (len(sent) + 1) for cut in cuts} | {ends[bound % len(ends)] for bound in bounds if ends}
    points = sorted(point for point in points | {0, len(sent)} if point <= len(sent))
    reads = [sent[a:b] for a, b in zip(points, points[1:])]
    plain, _ = meter_for(body, path)
    asked = ask(b"POST", path, orjson.dumps(body))
    assert asked is not None
    hooked = StreamMeter(asked[0])
    hooked.read_test = meter_read  # as the Python relay gives it, before the head (gateway/dataplane/upstream.py send)
    hooked.head(200, True)
    assert hooked.plain == (not client_asked)
    out_plain = b"".join(plain.feed(read) for read in reads)
    out_hooked = b"".join(_relay_hook(hooked, read) for read in reads)
    plain.end()
    hooked.end()
    assert out_hooked == out_plain
    assert (hooked.prompt, hooked.completion, hooked.exact, hooked.events) == \
        (plain.prompt, plain.completion, plain.exact, plain.events)


def test_the_c_read_test_takes_only_plain_reads() -> None:
    if meter_read is None:
        pytest.skip("the C pump is not built")
    content = frame(b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n')
    finish = frame(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    usage = frame(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n')
    assert meter_read(content) == 1 and meter_read(content * 3) == 3
    assert meter_read(content[:-1]) == -1  # a chunk split across reads
    assert meter_read(finish) == -1 and meter_read(content + finish + content) == -1
    assert meter_read(content + usage) == -1 and meter_read(b"") == -1
    with pytest.raises(TypeError):
        meter_read(bytearray(content))
    tally = bytearray(8)  # the relay's form: the events added in place, a bool back
    assert meter_read(content * 2, tally) is True and meter_read(finish, tally) is False
    assert meter_read(content, tally) is True and int.from_bytes(tally, sys.byteorder) == 3
    with pytest.raises(ValueError):
        meter_read(content, bytearray(4))
    assert meter_read(content + finish + usage, True) == (1, len(content))  # the walk's form
    assert meter_read(content * 2, True) == (2, -1)


@settings(max_examples=300, deadline=None)
@given(value=st.text(alphabet='ab"\\ {}', max_size=8), before=st.sampled_from([b"", b'"x":1,']),
       after=st.sampled_from([b"}", b',"y":"z"}']))
def test_the_fingerprint_is_read_as_the_regex_reads_it(value: str, before: bytes, after: bytes) -> None:
    """_fingerprint_of (two finds) against the regex it replaced, escapes and all."""
    payload = b'data: {' + before + b'"system_fingerprint":' + orjson.dumps(value) + after + b"\n\n"
    found = _FINGERPRINT.search(payload)
    assert _fingerprint_of(payload) == (found.group(1) if found else None) == orjson.dumps(value)
    assert _fingerprint_of(b'data: {"system_fingerprint":null}\n\n') is None


def test_the_book_rolls_its_minute_and_day_when_they_end() -> None:
    """record() rolls only when the minute moved: a new minute starts from 0, a new day too, the total stays."""
    now = [86400 * 20000 + 30.0]  # 30 s into a UTC day
    book = UsageBook(clock=lambda: now[0])
    book.record("k", "m", 3, 4)
    book.record("k", "m", 1, 1)
    totals = book.report("k")["keys"]["k"]["m"]
    assert [totals[period]["total_tokens"] for period in ("minute", "day", "since_start")] == [9, 9, 9]
    now[0] += 40  # the next minute, the same day
    book.record("k", "m", 2, 0)
    totals = book.report("k")["keys"]["k"]["m"]
    assert (totals["minute"]["total_tokens"], totals["day"]["total_tokens"]) == (2, 11)
    assert totals["minute"]["requests"] == 1 and totals["day"]["requests"] == 3
    now[0] += 86400  # the next day
    book.record("k", "m", 5, 5)
    totals = book.report("k")["keys"]["k"]["m"]
    assert (totals["minute"]["total_tokens"], totals["day"]["total_tokens"], totals["since_start"]["total_tokens"]) \
        == (10, 10, 21)
