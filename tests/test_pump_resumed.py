"""The pump's rewrite of a resumed part (Pump.add(..., events=EV_RESUME | EV_RESUMED [| EV_RESUMED_CHAT], ident,
created, offset)) against the Python path it replaces: resume.py's ResumeStream in its second segment (`_resumed`:
for a chat client, completions chunks turned into chat ones), fed the same
chunked bytes split into the same reads. What the client receives must be the same bytes on the wire (both write
one chunk per event), and so must what a second resume needs (token ids, finish, usage, [DONE], broken, no ids).
The flags and the template come from pumping.py's own glue (resume_flags, as start_pump passes them).

Events are /v1/completions chunks as vLLM's pydantic writes them (compact, made here with orjson), with the
variations the rewrite must follow: the original's id and created of any JSON value, the continuation's members in
any order or missing, usage on every chunk (continuous_usage_stats) or only in the usage chunk, prompt ids on the
first chunk, comments, in-band errors, early [DONE], garbage, cuts anywhere. Runs in the sanitizer build too
(scripts/pump_asan.sh)."""

from __future__ import annotations

import os
import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dataplane import _pump
from gateway.dataplane.pumping import resume_absorb, resume_flags
from gateway.dataplane.resume import ResumeStream
from tests.pump_rig import Rig
from tests.test_pump_events import ENDINGS, Collect, chunked, dechunk, event, feed_as_upstream, feed_python, spoil

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_scalar = st.one_of(st.none(), st.integers(-2**53, 2**53), st.text(max_size=10), st.booleans())
# Any value orjson writes back as it reads it (what vLLM's pydantic writes: no floats in these chunks).
json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**18 + 1, 10**18 - 1), st.text(max_size=8)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                          max_leaves=8)


@st.composite
def resumed_part(draw) -> tuple[list[bytes], dict[str, Any]]:
    """The SSE events of a resumed part (the continuation's /v1/completions stream), and the stream's state."""
    chat = draw(st.booleans())
    include_usage = draw(st.booleans())
    continuous = include_usage and draw(st.integers(0, 3)) == 0
    prompt = draw(st.lists(st.integers(0, 200000), min_size=1, max_size=4))
    offset = draw(st.integers(0, 40))
    members = {"id": draw(st.text(max_size=12)), "object": "text_completion", "created": draw(st.integers(0, 2**40)),
               "model": draw(st.text(max_size=8))}
    shape = draw(st.sampled_from(["vllm"] * 5 + ["shuffled", "no_id", "no_created", "no_object", "extra", "choices"]))
    if shape.startswith("no_"):
        del members[shape[3:]]
    tokens = draw(st.lists(st.tuples(st.text(max_size=6), st.lists(st.integers(0, 200000), max_size=2),
                                     st.integers(0, 30)), max_size=8))
    ending = draw(st.sampled_from(ENDINGS))
    order = random.Random(draw(st.integers(0, 2**16)))
    extra = draw(json_value)

    def make(choices: list[dict[str, Any]], usage: Any) -> bytes:
        doc: dict[str, Any] = {**members, "choices": choices}
        if usage is not None or shape == "extra":
            doc["usage"] = usage
        if shape == "extra":
            doc["system_fingerprint"] = "fp"
            doc["kv_transfer_params"] = extra
        if shape == "shuffled":
            keys = list(doc)
            order.shuffle(keys)
            doc = {k: doc[k] for k in keys}
        return event(doc)

    events: list[bytes] = []
    for i, (text, ids, noise) in enumerate(tokens):
        last = i == len(tokens) - 1 and ending in ("normal", "no_ids")
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                                  "finish_reason": draw(st.sampled_from(["length", "stop"])) if last else None,
                                  "stop_reason": draw(st.sampled_from([None, None, 7, "</s>"])) if last else None,
                                  "prompt_token_ids": [*prompt, 1, 2] if i == 0 else None}
        if not (ending == "no_ids" and i == 1):
            choice["token_ids"] = ids
        if shape == "choices":  # members missing, or in another order; a second choice
            for key in draw(st.lists(st.sampled_from(["index", "text", "stop_reason", "logprobs"]), max_size=2)):
                choice.pop(key, None)
            keys = list(choice)
            order.shuffle(keys)
            choice = {k: choice[k] for k in keys}
        usage = {"prompt_tokens": len(prompt) + offset, "total_tokens": len(prompt) + offset + i + 1,
                 "completion_tokens": i + 1} if continuous else None
        events.append(make([choice, {**choice, "index": 1}] if shape == "choices" and noise == 3 else [choice], usage))
        if noise == 0:
            events.append(b": keep-alive\n\n")
        elif noise == 1:
            events.append(b"event: ping\ndata: {}\n\n")
        elif noise == 2:
            events.append(b"data: {}\n\n")
    spoil(draw, events, ending)
    if ending in ("normal", "no_ids") and include_usage:
        n = len(tokens)
        usage = {"prompt_tokens": len(prompt) + offset, "total_tokens": len(prompt) + offset + n,
                 "completion_tokens": n}
        if draw(st.booleans()):
            usage = {"completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 3}, **usage}
        events.append(make([], usage))
    if ending != "truncated":
        events.append(b"data: [DONE]\n\n")
    body = {"messages": [], "model": "m"} if chat else {"prompt": "x"}
    body.update({"stream": True, "stream_options": {"include_usage": include_usage}})
    wants_ids = draw(st.booleans())
    if wants_ids:
        body["return_token_ids"] = True
    return events, {"chat": chat, "wants_ids": wants_ids, "include_usage": include_usage, "body": body, "offset": offset,
                    "prompt": prompt, "ident": draw(json_scalar), "created": draw(json_scalar),
                    "ended": ending != "truncated"}


def resumed_stream(meta: dict[str, Any], transport: Collect) -> ResumeStream:
    """A ResumeStream as relay.py leaves it when the second segment's head comes (next_body, then start_segment)."""
    stream = ResumeStream(dict(meta["body"]), meta.get("chat", False), meta["wants_ids"], 2)
    stream.prompt_ids = list(meta["prompt"])
    stream.ident, stream.created = meta["ident"], meta["created"]
    stream.replying = True
    stream.next_body()
    stream.offset = meta["offset"]
    stream.start_segment(transport)  # type: ignore[arg-type]
    return stream


def python_path(reads: list[bytes], meta: dict[str, Any]) -> tuple[ResumeStream, bytes]:
    transport = Collect()
    stream = resumed_stream(meta, transport)
    feed_python(stream, reads)
    return stream, bytes(transport.data)


def on_the_wire(reference: ResumeStream, written: bytes, ended: bool) -> bytes:
    """What the client gets on the Python path: the stream's writes, then, once the replica's response ended after
    [DONE], the last chunk exchange.py's upstream_complete writes (the pump sends it with [DONE]: Stream.last_sent)."""
    return written + (reference.end_chunk() if ended and reference.done else b"")


def pump_rig(meta: dict[str, Any], **options: Any) -> tuple[Rig, ResumeStream]:
    state = resumed_stream(meta, Collect())
    flags = resume_flags(state)
    assert flags & _pump.EV_RESUMED
    return Rig(events=flags, ident=orjson.dumps(state.ident), created=orjson.dumps(state.created),
               offset=state.offset, **options), state


@FUZZ
@given(st.data())
def test_the_pump_rewrites_a_resumed_part_as_the_python_path_does(data) -> None:
    events, meta = data.draw(resumed_part())
    reads = data.draw(chunked(events, meta["ended"]))
    reference, expected = python_path(reads, meta)
    # The read that brought the continuation's head: its payload handed to add() unsent, as upstream.py does.
    with_head = bool(reads) and data.draw(st.booleans())
    rig, state = pump_rig(meta, body_so_far=reads[0], unsent=True) if with_head else pump_rig(meta)
    try:
        stream = feed_as_upstream(rig, reads, with_head, meta, python_path)
        if stream is None:
            return
        got = bytes(rig.received) + (rig.ended[0][1] or b"" if rig.ended else b"")
        assert got == on_the_wire(reference, expected, meta["ended"])  # one chunk per event on both paths
        assert stream.last_sent == (meta["ended"] and reference.done)
        assert stream.broken == reference.broken
        assert not stream.unmatched
        assert stream.done_sent == reference.done
        if not reference.broken:
            assert stream.finished == reference.finished
            assert stream.usage_sent == reference.usage_sent
            assert stream.no_ids == reference.no_ids
        # What a second resume starts from: the glue's record equals the Python path's.
        resume_absorb(state, stream)
        state._parse_raw_ids()
        reference._parse_raw_ids()
        assert state.received == reference.received
        assert state.prompt_ids == reference.prompt_ids
        assert state.token_counts() == reference.token_counts()
        if rig.ended:
            assert rig.code == (_pump.BROKEN if reference.broken else _pump.COMPLETE)
        else:
            assert not meta["ended"] or reference.broken
    finally:
        rig.close()


META = {"wants_ids": False, "include_usage": True, "body": {"prompt": "x", "stream": True}, "offset": 7,
        "prompt": [1, 2, 3], "ident": "cmpl-orig", "created": 1700000000, "ended": True}


def feed_all(meta: dict[str, Any], events: list[bytes]) -> tuple[Rig, bytes]:
    payload = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    rig, _ = pump_rig(meta)
    rig.feed(payload)
    return rig, on_the_wire(*python_path([payload], meta), True)


def vllm_part(finish: bytes, stop: bytes) -> list[bytes]:
    """A continuation as vLLM writes it: two tokens (the second ends it with `finish` and `stop`), usage, [DONE]."""
    head = b'{"id":"cmpl-new","object":"text_completion","created":1700000099,"model":"m","choices":['
    return [b"data: " + head + b'{"index":0,"text":" on","logprobs":null,"finish_reason":null,"stop_reason":null,'
            b'"prompt_token_ids":[1,2,3,9,9],"token_ids":[11]}]}\n\n',
            b"data: " + head + b'{"index":0,"text":"ce","logprobs":null,"finish_reason":' + finish + b','
            b'"stop_reason":' + stop + b',"prompt_token_ids":null,"token_ids":[12]}]}\n\n',
            b"data: " + head + b'],"usage":{"prompt_tokens":10,"total_tokens":12,"completion_tokens":2}}\n\n',
            b"data: [DONE]\n\n"]


def test_a_vllm_resumed_part_reads_as_the_original_stream() -> None:
    """The example: a continuation's chunks come out with the original's id and created, no token ids, the usage of
    an uninterrupted request, each event its own chunk."""
    events = vllm_part(finish=b'"length"', stop=b"null")
    rig, expected = feed_all(META, events)
    try:
        assert rig.code == _pump.COMPLETE and bytes(rig.received) == expected
        text = dechunk(bytes(rig.received))
        assert b'"id":"cmpl-orig"' in text and b"cmpl-new" not in text and b"1700000099" not in text
        assert b'"prompt_tokens":3,"total_tokens":12,"completion_tokens":9' in text
        assert b"token_ids\":[" not in text and rig.stream.token_ids == b"11,12"
        assert rig.stream.usage == (3, 9)
    finally:
        rig.close()


@pytest.mark.parametrize("data", [
    b'{"id": "x", "choices": []}', b'{"id":"x" ,"choices":[]}', b'{"id":"x","id":"y","choices":[]}',
    b'{"id":"x","n":1 }', b'{"model":"caf\\u00e9","choices":[]}', b'{"model":"a\\/b","choices":[]}',
    b'{"x":1.5,"choices":[]}', b'{"x":-0,"choices":[]}', b'{"x":1E2,"choices":[]}', b'{"x":007,"choices":[]}',
    b'{"x":{"a":1,"a":2},"choices":[]}', b'{"x":[1, 2],"choices":[]}', b'{"model":"\xff","choices":[]}',
    b'{"model":"\xed\xa0\x80","choices":[]}', b'{"x":[1,2},"choices":[]}', b'{"x":{"a":1],"choices":[]}',
    b'{"x":tru,"choices":[]}', b'{"model":"tab\there","choices":[]}', b'{"model":"\\u0009","choices":[]}',
])
def test_an_event_the_rewrite_does_not_follow_breaks_the_stream(data: bytes) -> None:
    """Not what orjson writes back unchanged (blanks, other escapes, floats, a key twice, invalid UTF-8, malformed):
    the stream breaks there (Python resumes it from what the client has) rather than reach the client in other
    bytes than the Python path's, which re-serializes (or refuses) it."""
    # (1.5 is written back as it is, but floats are not followed at all: orjson writes 1E2 as 100.0)
    if b"\xff" not in data and b"\xed" not in data and b"1.5" not in data:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
        assert parsed is None or orjson.dumps(parsed) != data  # the case is one the Python path rewrites or refuses
    first = event({"id": "c", "choices": [{"index": 0, "text": "a", "finish_reason": None, "token_ids": [4]}]})
    rig, _ = feed_all(META, [first, b"data: " + data + b"\n\n", b"data: [DONE]\n\n"])
    try:
        assert rig.code == _pump.BROKEN and rig.stream.broken and rig.stream.unmatched
        assert rig.stream.token_ids == b"4"
        assert dechunk(bytes(rig.received) + (rig.ended[0][1] or b"")).count(b"data: ") == 1
    finally:
        rig.close()


def test_resumed_needs_its_template() -> None:
    with pytest.raises(TypeError):
        Rig(events=_pump.EV_RESUME | _pump.EV_RESUMED)


def test_a_rewound_resumed_part_stays_in_python() -> None:
    chat = ResumeStream({"messages": [], "stream": True}, True, False, 2)
    chat.prompt_ids = [1]
    chat.next_body()
    assert resume_flags(chat) & _pump.EV_RESUMED_CHAT
    rewound = ResumeStream({"prompt": "x", "stream": True}, False, False, 2)
    rewound.prompt_ids, rewound.finished = [1], True
    rewound.received_ids([5])
    rewound.next_body()
    assert rewound.skip and resume_flags(rewound) == -1


def test_a_chat_clients_resumed_part_reads_as_chat_chunks() -> None:
    """A chat client's stream resumed on /v1/completions: the pump writes chat chunks, as resume.py does."""
    meta = {**META, "chat": True, "body": {"messages": [], "stream": True}}
    events = vllm_part(finish=b'"stop"', stop=b"7")
    rig, expected = feed_all(meta, events)
    try:
        assert rig.code == _pump.COMPLETE and bytes(rig.received) == expected
        text = dechunk(bytes(rig.received))
        assert text.startswith(b'data: {"id":"cmpl-orig","object":"chat.completion.chunk","created":1700000000,'
                               b'"model":"m","choices":[{"index":0,"delta":{"content":" on"},"logprobs":null,'
                               b'"finish_reason":null,"token_ids":null}]}\n\n')
        assert b'"finish_reason":"stop","stop_reason":7,"token_ids":null}' in text
        assert rig.stream.token_ids == b"11,12" and rig.stream.finished
    finally:
        rig.close()


def test_a_chat_choice_the_rewrite_does_not_follow_breaks_the_stream() -> None:
    meta = {**META, "chat": True, "body": {"messages": [], "stream": True}}
    first = event({"id": "c", "choices": [{"index": 0, "text": "a", "finish_reason": None, "token_ids": [4]}]})
    odd = b'data: {"id":"c","choices":[{"index": 0,"text":"b"}]}\n\n'
    rig, _ = feed_all(meta, [first, odd, b"data: [DONE]\n\n"])
    try:
        assert rig.code == _pump.BROKEN and rig.stream.unmatched and rig.stream.token_ids == b"4"
        assert dechunk(bytes(rig.received) + (rig.ended[0][1] or b"")).count(b"data: ") == 1
    finally:
        rig.close()
