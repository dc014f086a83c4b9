"""The stream meter in-process: byte-exact output for any split of the replica's bytes into reads.

A stream as vLLM 0.32 frames it (one chunk per event) is cut at random places; what the meter passes on,
joined, must be the stream the client would have got from vLLM without include_usage, and the counts the
usage chunk's.
"""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.observability.usage import StreamMeter, ask

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
