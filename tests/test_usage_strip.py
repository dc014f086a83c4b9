"""Token accounting's usage strip (observability/usage.py's StreamMeter, the pump's EV_STRIP_USAGE) against a
reference that parses the whole stream at once: when the gateway asked for the usage chunk and the client did
not, the client gets every chunk but the usage chunk, the finishing chunks with the usage chunk's
system_fingerprint back (what vLLM writes without include_usage), whatever the reads look like. The streams are
vLLM's shapes (compact JSON, one event a chunk), with and without a finishing chunk before the usage chunk:
a read holding only the usage chunk, on a chunk boundary, with nothing held, used to pass through."""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.dataplane.pumping import PUMP_BUILT
from gateway.observability.usage import Ask, StreamMeter

SETTINGS = settings(max_examples=int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FINGERPRINT = "fp_77"


def event(document: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(document) + b"\n\n"


def frame(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def vllm_events(chat: bool, texts: list[str], finish: bool, prompt: int) -> tuple[list[bytes], bytes]:
    """A stream that asked for usage (vLLM 0.32: the fingerprint only on the usage chunk), and the usage chunk."""
    head = {"id": "cmpl-9", "object": "chat.completion.chunk" if chat else "text_completion", "created": 3,
            "model": "m"}
    events = []
    if chat:
        events.append(event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}))
    for i, text in enumerate(texts):
        last = finish and i == len(texts) - 1
        choice = {"index": 0, **({"delta": {"content": text}} if chat else {"text": text}), "logprobs": None,
                  "finish_reason": "stop" if last else None}
        events.append(event({**head, "choices": [choice]}))
    usage = event({**head, "choices": [], "usage": {"prompt_tokens": prompt, "total_tokens": prompt + len(texts),
                                                    "completion_tokens": len(texts)},
                   "system_fingerprint": FINGERPRINT})
    return events, usage


def reference(events: list[bytes]) -> bytes:
    """What the client gets without the gateway asking for usage: no usage chunk, the fingerprint on the chunk
    that finishes (vllm/entrypoints/openai/chat_completion/serving.py, 0.32: terminal chunks only)."""
    out = []
    for payload in events:
        if b'"finish_reason":"' in payload:
            payload = payload[:-3] + b',"system_fingerprint":"%s"}\n\n' % FINGERPRINT.encode()
        out.append(frame(payload))
    return b"".join(out) + frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"


@st.composite
def split_stream(draw) -> tuple[list[bytes], bytes, tuple[int, int]]:
    chat = draw(st.booleans())
    texts = draw(st.lists(st.text(max_size=4), max_size=5))
    finish = bool(texts) and draw(st.booleans())
    prompt = draw(st.integers(0, 10**5))
    events, usage = vllm_events(chat, texts, finish, prompt)
    body = b"".join(frame(e) for e in events) + frame(usage) + frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    boundaries = [i + 3 for i in range(len(body)) if body.startswith(b"\n\r\n", i)]  # chunk ends
    cuts = set(draw(st.lists(st.sampled_from(boundaries), max_size=6)))
    if draw(st.booleans()):
        cuts |= set(draw(st.lists(st.integers(1, len(body) - 1), max_size=4)))
    edges = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:])], reference(events), (prompt, len(texts))


# The smallest failing case: a stream with no finishing chunk, the usage chunk a read of its own.
_ROLE, _USAGE = vllm_events(True, [], False, 5)


@SETTINGS
@given(split_stream())
@example(([frame(_ROLE[0]), frame(_USAGE), frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"], reference(_ROLE), (5, 0)))
def test_the_meter_strips_the_usage_chunk_whatever_the_reads(case) -> None:
    reads, expected, usage = case
    meter = StreamMeter(Ask("m", True, True, True, None, 1))
    meter.head(200, True)
    got = b"".join(meter.feed(read) for read in reads)
    meter.end()
    assert got == expected
    assert meter.exact and (meter.prompt, meter.completion) == usage


@pytest.mark.skipif(not PUMP_BUILT, reason="the C pump is not built")
@SETTINGS
@given(split_stream())
def test_the_pump_strips_the_usage_chunk_whatever_the_reads(case) -> None:
    from gateway.dataplane import _pump
    from tests.pump_rig import Rig

    reads, expected, usage = case
    rig = Rig(events=_pump.EV_ON | _pump.EV_STRIP_USAGE)
    try:
        for read in reads:
            rig.feed(read)
            if rig.ended:
                break
        assert bytes(rig.received) == expected
        assert rig.stream.usage == usage
    finally:
        rig.close()


@pytest.mark.skipif(not PUMP_BUILT, reason="the C pump is not built")
@SETTINGS
@given(split_stream(), st.integers(0, 8))
def test_the_pump_takes_over_from_the_meter_with_the_chunk_it_kept_back(case, handoff: int) -> None:
    """The meter relays the first reads (the head's read among them), then the pump the rest, as body_follows hands a
    metered stream over: the start of a chunk the meter kept back goes to the pump (kept_back), which finishes it."""
    from gateway.dataplane import _pump
    from tests.pump_rig import Rig

    reads, expected, usage = case
    meter = StreamMeter(Ask("m", True, True, True, None, 1))
    meter.head(200, True)
    handoff = min(handoff, len(reads) - 1)
    got = b"".join(meter.feed(read) for read in reads[:handoff])
    if meter.pump_mode() != "strip":  # a finishing chunk is held: the meter keeps the stream
        got += b"".join(meter.feed(read) for read in reads[handoff:])
        assert got == expected
        return
    rig = Rig(body_so_far=b"".join(reads[:handoff]), events=_pump.EV_ON | _pump.EV_STRIP_USAGE,
              prefix=meter.kept_back())
    meter.pumping_kept_back()
    try:
        assert rig.stream is not None
        for read in reads[handoff:]:
            rig.feed(read)
            if rig.ended:
                break
        assert got + bytes(rig.received) == expected
        meter.pumped(rig.stream.usage, rig.stream.events)  # as pumping.py's _pumped_done
        meter.end()
        assert meter.exact and (meter.prompt, meter.completion) == usage
    finally:
        rig.close()
