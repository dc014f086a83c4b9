"""Token accounting: what each completion cost, in prompt and completion tokens, per key and model.

Read from the replica's own `usage` (vLLM's numbers, never a tokenizer of ours):

* a non-streamed answer carries it in its JSON body;
* a stream carries it in a last chunk (`"choices":[]`, then `"usage":{...}`) when the request
  says `stream_options.include_usage`. When the client did not ask for it, the gateway asks
  for it (`ask()` rewrites the upstream body) and removes that chunk from what the client
  receives (`StreamMeter`). vLLM then also moves the final `system_fingerprint` from the last
  content chunk to the usage chunk (vllm/entrypoints/openai/chat_completion/serving.py and
  completion/serving.py, 0.32: "Stamp the fingerprint on terminal chunks only ... When
  include_usage is on, the trailing usage chunk ... is the true final message"), so the
  meter holds the chunks that carry a `finish_reason` until the usage chunk comes, and puts
  the fingerprint back on them: the client gets the bytes it would have got without us.
* a stream cut short has no usage chunk: its completion tokens are the content events that
  reached the client (vLLM sends one event per engine step, one token each without
  speculative decoding), its prompt the estimate admission made (`Ask.prompt_estimate`).

A resumable stream (--resume-limit) is rewritten by resume.py and counted by its token ids.

The C pump (--native-relay) takes a metered stream over once no chunk is split or held
(`StreamMeter.pump_mode`): with EV_STRIP_USAGE it does what `_walk` does, in C; with EV_ON it
counts events and reads the usage chunk; `Stream.usage` and `Stream.events` come back through
`StreamMeter.pumped`. Totals per key and model (since start, this UTC minute, this UTC day) are
kept by `UsageBook`, which also keeps the day's totals in a small state file so they survive a
restart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import orjson

log = logging.getLogger("gateway.usage")

_ACCOUNTED = (b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings")
_USAGE_CHUNK = b'"choices":[]'  # vLLM's usage chunk has no choices (and only it, in a vLLM stream)
_FINISHED = b'"finish_reason":"'  # a choice that ends here (null otherwise)
_CONTENT_END = b'}]}\n\n\r\n'  # a chunk whose event ends with its (non-empty) choices: never the usage chunk
_CONTENT_FROM = -len(_CONTENT_END)
_FINGERPRINT = re.compile(rb'"system_fingerprint":("(?:[^"\\]|\\.)*")')
_FINGERPRINT_KEY = b'"system_fingerprint":"'
_EVENT = b"data: {"
_MAX_HELD = 1 << 20  # a "stream" whose frames never end is not vLLM's: stop filtering, pass it through
_MAX_UNARY = 8 << 20  # non-streamed bodies kept to read their usage (vLLM's are a few KB)
_ASK_USAGE = b'{"stream_options":{"include_usage":true,"continuous_usage_stats":false},'
BYTES_PER_TOKEN = 3  # prompt estimate before the replica counts: a little more tokens than English text has


class Ask:
    """What one completion request asks for, read from its body once at admission."""

    __slots__ = ("model", "stream", "chat", "strip", "max_tokens", "_estimate", "_document")

    def __init__(self, model: str, stream: bool, chat: bool, strip: bool, max_tokens: int | None,
                 prompt_estimate: int = -1, document: dict[str, Any] | None = None):
        self.model = model
        self.stream = stream
        self.chat = chat
        self.strip = strip  # we asked for the usage chunk: the client must not see it
        self.max_tokens = max_tokens
        self._estimate = prompt_estimate
        self._document = document  # the request, read for the estimate only when it is needed

    @property
    def prompt_estimate(self) -> int:
        """The prompt's tokens, estimated from its text: only a token budget (worst_case) and a stream cut short
        (StreamMeter.end) need it, so it is made then (~6,000 instructions a request, callgrind)."""
        if self._estimate < 0:
            document, self._document = self._document, None
            self._estimate = estimate_prompt(document) if document is not None else 0
        return self._estimate

    def worst_case(self, default_max_tokens: int) -> int:
        """The most tokens this request can cost: its prompt estimate plus the completion it allows."""
        return self.prompt_estimate + (self.max_tokens if self.max_tokens is not None else default_max_tokens)


def json_object(body: bytes) -> dict[str, Any] | None:
    """A request body's JSON object, or None: not JSON (the replica answers it with a 400), or not an object."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _text_bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return len(value) * BYTES_PER_TOKEN  # token ids: one token each
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_bytes(item) for key, item in value.items() if key in ("content", "text", "input"))
    return 0


def estimate_prompt(document: dict[str, Any]) -> int:
    """Prompt tokens, estimated from the text a request sends (the replica's count replaces it at the end)."""
    messages = document.get("messages")
    if isinstance(messages, list):
        text = sum(_text_bytes(message) for message in messages)
        return math.ceil(text / BYTES_PER_TOKEN) + 8 * len(messages)  # + each message's chat-template tokens
    return math.ceil(_text_bytes(document.get("prompt", document.get("input"))) / BYTES_PER_TOKEN) + 1


def ask(method: bytes, path: bytes, body: bytes) -> tuple[Ask, bytes | None] | None:
    """The request's Ask, and the body to send instead (the stream now asks for usage) or None; None if not
    a completion we count (then nothing about the request changes)."""
    # Once a request with accounting on: each test and lookup here is a few hundred instructions (callgrind).
    if method != b"POST" or not body or not path.endswith(_ACCOUNTED):
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if document.__class__ is not dict:
        return None
    get = document.get
    model = get("model")
    if model.__class__ is not str:
        model = model if isinstance(model, str) else ""
    chat = path.endswith(b"/chat/completions")
    embeddings = not chat and path.endswith(b"/embeddings")
    stream = get("stream") is True and not embeddings
    limit = get("max_completion_tokens") if chat else None
    if limit is None:
        limit = get("max_tokens")
    if limit.__class__ is not int:
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        elif not isinstance(limit, int) or isinstance(limit, bool):
            limit = None
    max_tokens = limit if limit is not None and limit >= 0 else None
    if embeddings:
        max_tokens = 0
    n = get("n")
    if n is not None and isinstance(n, int) and n > 1 and max_tokens is not None:
        max_tokens *= n
    new_body = None
    strip = False
    if stream:
        options = get("stream_options")
        if not (options.__class__ is dict and options.get("include_usage") is True):
            strip = True
            if options is None and "stream_options" not in document:
                # Spliced in, not re-serialized: the client's body stays as it was, byte for byte, after it.
                new_body = _ASK_USAGE + body[body.index(b"{") + 1:]
            else:
                options = dict(options) if isinstance(options, dict) else {}
                options["include_usage"] = True
                options["continuous_usage_stats"] = False  # one usage chunk, never usage on every chunk
                document["stream_options"] = options
                new_body = orjson.dumps(document)
    return Ask(model, stream, chat, strip, max_tokens, document=document), new_body


def usage_of(document: object) -> tuple[int, int] | None:
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


_OFF, _UNARY, _WATCH, _STRIP, _PLAIN = range(5)


class StreamMeter:
    """One request's count, filled from the replica's response as it is relayed.

    The data path calls `head()` with the response head, passes every read of the body through
    `feed()` (which returns what the client gets), and `end()` once when the exchange is over.
    Per read of a stream this costs a test of its end (and, for a read that ends inside a chunk, one search
    back from its end) and, when the client did not ask for usage, a search for a finish_reason and, in a read
    that does not end with a content chunk, for the usage chunk: everything else happens in the few reads that
    end a stream. With the C pump built, the Python relay gives `read_test` (_pump.c meter_read) and, while
    `plain`, tests each read with it without calling feed() (its events go to `tally`); the walk's searches use
    it too.
    """

    __slots__ = ("ask", "prompt", "completion", "exact", "_events", "tally", "_mode", "_parts", "_size", "_tail",
                 "_held", "_single", "_early", "_prev", "_last", "_quick", "plain", "read_test")

    def __init__(self, ask: Ask):
        self.ask = ask
        self.prompt = 0
        self.completion = 0
        self.exact = False  # the replica's own numbers (else: what reached the client, estimated)
        self._events = 0
        self._mode = _OFF
        self._parts: list[bytes] = []
        self._size = 0
        self._tail = b""
        self._held: list[bytes] = []
        self._single = 0  # a read shorter than this holds one event
        self._early = self._prev = self._last = b""
        self._quick = _OFF  # _STRIP or _WATCH while nothing is kept back or held: feed()'s first test
        # _STRIP while nothing is kept back or held, and read_test is given: the Python relay may test the next read
        # with it (a whole content chunk last, no finish_reason; its events go to `tally`) without calling feed().
        self.plain = False
        # The events the Python relay's meter_read counted (its native int64, added in C): `events` adds them up.
        self.tally = bytearray(8)
        # The C pump's meter_read (`plain` above), given by the Python relay when the pump is built: _general tests
        # a read's whole chunks with it too (a read that ends inside a chunk: most of them on back-to-back streams).
        self.read_test: Any = None

    def head(self, status: int, chunked: bool) -> None:
        """A new response head (a retry starts over): count only a 200."""
        if status != 200:
            self._mode = _OFF
        elif not (chunked and self.ask.stream):
            self._mode = _UNARY
        else:
            self._mode = _STRIP if self.ask.strip else _WATCH
        self._parts = []
        self._size = 0
        self._tail = b""
        self._held = []
        self._single = 0
        self._early = self._prev = self._last = b""
        self._events = 0
        self.tally = bytearray(8)
        self.exact = False
        self._quick = self._mode if self._mode == _STRIP or self._mode == _WATCH else _OFF
        self.plain = self._mode == _STRIP and self.read_test is not None

    def feed(self, data: bytes) -> bytes:
        # The common read first, in as few bytecodes as it takes (the Python relay calls this once a read): nothing
        # kept back or held, and the read ends with a content chunk and finishes no choice (_STRIP: no usage chunk
        # either, see _feed), or ends on a chunk boundary (_WATCH). A slice compare and `partition` (METH_O), not
        # endswith/find, whose argument parsing costs more than the test (CPython 3.11 Objects/bytesobject.c).
        quick = self._quick
        if quick == _STRIP:
            test = self.read_test
            if test is not None:  # the C pump's test (see `plain`): a read with the response head can be long
                events = test(data)
                if events < 0:
                    return self._feed(data)
                self._events += events
                return data
            if data[_CONTENT_FROM:] != _CONTENT_END or data.partition(_FINISHED)[1]:
                return self._feed(data)
        elif quick == _WATCH:
            if data[-3:] != b"\n\r\n":
                return self._feed(data)
            self._early, self._prev, self._last = self._prev, self._last, data
        elif quick == _PLAIN:
            return data  # after the usage chunk, or not vLLM's framing
        else:
            return self._feed(data)
        if len(data) < self._single:
            self._events += 1
        else:
            self._count(data)
        return data

    @property
    def events(self) -> int:
        """The events that reached the client, or are held for it (a stream cut short counts them)."""
        return self._events + int.from_bytes(self.tally, sys.byteorder, signed=True)

    def feed_rare(self, data: bytes) -> bytes:
        """feed() for a read the Python relay's meter_read did not take (`plain`): its tests are not made twice."""
        return self._feed(data)

    def _count(self, data: bytes) -> None:
        events = data.count(_EVENT)
        if not self._single and events:
            self._single = len(data) // events * 3 // 2  # half again an event's size: two events never fit
        self._events += events

    def _feed(self, data: bytes) -> bytes:
        out = self._general(data)
        mode = self._mode
        if mode == _STRIP or mode == _WATCH:
            self._quick = mode if not self._tail and not self._held else _OFF
        else:
            self._quick = _PLAIN if mode == _PLAIN else _OFF
        self.plain = self._quick == _STRIP and self.read_test is not None
        return out

    def _general(self, data: bytes) -> bytes:
        mode = self._mode
        if mode == _STRIP or mode == _WATCH:
            # Where the last whole chunk of this read ends: vLLM's chunks end `\n\n\r\n` (an event, then the chunk's
            # CRLF; JSON never holds a raw CR or LF), the last one `\r\n\r\n`. What follows is a chunk split across
            # reads: kept (`_tail`) and searched once whole, so a search never misses a key cut in two and the rest
            # of a read is not walked chunk by chunk (stream200 c=16 with accounting on, reads split that way under
            # load: 3.4-3.6M instructions a stream, 8-9x accounting off, in callgrind; docs/performance.md).
            tail = self._tail
            whole = tail + data if tail else data
            if not whole.endswith(b"\n\r\n"):
                cut = whole.rfind(b"\n\r\n") + 3
                if cut < 3 or len(whole) - cut > _MAX_HELD:
                    if len(whole) > _MAX_HELD:  # a "stream" whose frames never end is not vLLM's: pass it through
                        self._tail = b""
                        return self._give_up([], whole) if mode == _STRIP else data
                    self._tail = whole
                    return b"" if mode == _STRIP else data
                self._tail = whole[cut:]
                whole = whole[:cut]
            elif tail:
                self._tail = b""
            if mode == _STRIP:
                # The read that finishes a choice is held until the usage chunk, and so is everything after it; a
                # read that may hold the usage chunk (a stream need not finish a choice before it) is walked: one
                # ending in a content chunk (its `choices` last and not empty, as vLLM's pydantic models order
                # them) cannot, vLLM writes nothing but [DONE] after the usage chunk. `find`, not `in`: on bytes
                # `in` first tries its argument as an integer and formats the TypeError it clears (~2,400
                # instructions, CPython 3.11 Objects/bytesobject.c _Py_bytes_contains).
                test = self.read_test
                if self._held:
                    at = start = 0
                elif test is not None:
                    # The same, chunk by chunk in C (_pump.c meter_read): the events before that chunk, its start.
                    events, at = test(whole, True)
                    start = at
                    self._events += events
                else:
                    at = whole.find(_FINISHED)
                    if at < 0 and not whole.endswith(_CONTENT_END):
                        at = whole.find(_USAGE_CHUNK)
                    elif at > 0 and not whole.endswith(_CONTENT_END):
                        usage = whole.find(_USAGE_CHUNK, 0, at)
                        at = usage if usage >= 0 else at
                    start = whole.rfind(b"\n\r\n", 0, at) + 3 if at > 0 else 0
                    if start < 3:
                        start = 0
                    if start:
                        self._events += whole.count(_EVENT, 0, start)
                if at >= 0:
                    # Walked chunk by chunk from the chunk that holds it on: a back-to-back stream often brings
                    # much of itself in the read that finishes it.
                    tail, self._tail = self._tail, b""
                    out = self._walk(whole[start:] if start else whole)
                    if start:  # one copy of what comes before it, not two (a slice, then the sum)
                        out = b"".join((memoryview(whole)[:start], out))
                    if self._mode == _PLAIN:  # the last chunk, or not vLLM's framing: the rest passes as it comes
                        return out + tail if tail else out
                    self._tail += tail  # after what _walk kept of `whole`, if anything
                    return out
                if test is not None:
                    return whole  # its events counted in C
                data = whole
            else:
                # The usage chunk is in one of the last whole reads (then [DONE], then the last chunk): read at the
                # end. The bytes go on as they came.
                self._early, self._prev, self._last = self._prev, self._last, whole
        elif mode == _UNARY:
            if self._size < _MAX_UNARY:
                self._parts.append(data)
                self._size += len(data)
            return data
        else:
            return data
        if len(data) < self._single:
            self._events += 1
        elif data:
            self._count(data)
        return data

    def _walk(self, data: bytes) -> bytes:
        """Chunk by chunk: the rare reads (a usage chunk, a finish, a chunk split across reads)."""
        buffer = self._tail + data if self._tail else data
        self._tail = b""
        out: list[bytes] = []
        pos, size_of = 0, len(buffer)
        while pos < size_of:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(buffer[pos:eol], 16)
            except ValueError:  # a chunk extension (RFC 9112 section 7.1.1), or not a size line at all
                try:
                    size = int(buffer[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    return self._give_up(out, buffer[pos:])
            if size == 0:  # the last chunk (and trailers): the response ends, nothing may stay held
                self._mode = _PLAIN  # the rest of the last chunk, split across reads, passes as it comes
                out += self._held
                self._held = []
                out.append(buffer[pos:])
                pos = size_of
                break
            end = eol + 4 + size
            if end > size_of:
                break
            self._chunk(buffer[pos:end], buffer[eol + 2:end - 2], out)
            pos = end
            if self._mode == _PLAIN:  # the usage chunk went: what follows ([DONE], the last chunk) passes as it is
                break
        if pos < size_of and self._mode == _PLAIN:
            out.append(buffer[pos:])
        elif pos < size_of:
            self._tail = buffer[pos:]
            if len(self._tail) > _MAX_HELD:
                tail, self._tail = self._tail, b""
                return self._give_up(out, tail)
        return b"".join(out)

    def _give_up(self, out: list[bytes], rest: bytes) -> bytes:
        self._mode = _PLAIN
        out += self._held
        self._held = []
        out.append(rest)
        return b"".join(out)

    def _chunk(self, frame: bytes, payload: bytes, out: list[bytes]) -> None:
        if payload.find(_USAGE_CHUNK) >= 0:
            counts = _usage_event(payload)
            if counts is not None:
                self.prompt, self.completion = counts
                self.exact = True
            if counts is not None and self._mode == _STRIP:
                fingerprint = _fingerprint_of(payload)
                for held in self._held:
                    out.append(_with_fingerprint(held, fingerprint) if fingerprint else held)
                self._held = []
                # vLLM writes only [DONE] and the last chunk after it (vllm/entrypoints/openai/chat_completion/
                # serving.py, 0.32): nothing left to hold or count, the rest passes as it comes (two reads walked
                # for nothing, ~15,000 instructions a stream).
                self._mode = _PLAIN
                return  # the client did not ask for it
        self._events += payload.count(_EVENT)
        if self._mode == _STRIP and (self._held or payload.find(_FINISHED) >= 0) \
                and not payload.startswith(b"data: [DONE]"):
            self._held.append(frame)  # until the usage chunk says which fingerprint it carried
            return
        out += self._held
        self._held = []
        out.append(frame)

    def pump_mode(self) -> str | None:
        """How the C pump may take the rest of this stream: "strip" (it does what _walk does: drop the usage chunk,
        fingerprint back on the finishing chunks; `kept_back()` is the start of a chunk it finishes), "count" (count
        events, read the usage chunk), or None: it stays here (a chunk is held, or the body is not a stream)."""
        mode = self._mode
        if self._held or mode not in (_STRIP, _WATCH):
            return None
        return "strip" if mode == _STRIP else "count"

    def kept_back(self) -> bytes:
        """What of the reads so far has not gone to the client yet (the start of a chunk split across reads)."""
        return self._tail if self._mode == _STRIP else b""

    def pumping_kept_back(self) -> None:
        """The C pump took `kept_back()` over with the stream (EV_STRIP_USAGE): it writes it."""
        self._tail = b""

    def pumped(self, usage: tuple[int, int] | None, events: int) -> None:
        """The C pump relayed the rest of the stream (pump_mode): its usage chunk's counts and its events."""
        self._events += events
        if usage is not None:
            self.prompt, self.completion = usage
            self.exact = True

    def end(self, resume: Any = None) -> None:
        """The exchange is over: settle the counts (the replica's, else what reached the client). A resumable
        stream (resume.py rewrites it, so it never comes through here) is counted by its token ids."""
        mode, self._mode = self._mode, _OFF
        self._quick = _OFF
        self.plain = False
        if resume is not None and self.ask.stream:
            counts = resume.token_counts()
            if counts is not None:
                self.prompt, self.completion = counts
                self.exact = True
            return
        if mode == _OFF:
            return
        if mode == _UNARY:
            parts, self._parts = self._parts, []
            if parts:
                try:
                    counts = usage_of(orjson.loads(b"".join(parts)))
                except orjson.JSONDecodeError:
                    counts = None
                if counts is not None:
                    self.prompt, self.completion = counts
                    self.exact = True
            return
        if not self.exact and (self._prev or self._last):  # a stream whose client asked for usage (_WATCH)
            tail = self._early + self._prev + self._last + self._tail
            self._early = self._prev = self._last = self._tail = b""
            start = tail.rfind(_USAGE_CHUNK)
            if start >= 0:
                # The event's object starts at the last `{` before its empty choices (id, object, created and
                # model are plain values), so a `data: ` prefix cut across reads does not matter.
                begin = tail.rfind(b"{", 0, start)
                finish = tail.find(b"\n\n", start)
                counts = _usage_event(b"data: " + tail[begin:finish]) if begin >= 0 and finish > 0 else None
                if counts is not None:
                    self.prompt, self.completion = counts
                    self.exact = True
        events = self.events
        if not self.exact and events:
            # Cut short: the content events the client got (chat's first event only names the role).
            self.completion = max(0, events - (1 if self.ask.chat else 0))
            self.prompt = self.ask.prompt_estimate

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _usage_event(payload: bytes) -> tuple[int, int] | None:
    """The counts of a usage event (`data: {...}`), or None."""
    start = payload.find(b"data: ")
    if start < 0:
        return None
    try:
        return usage_of(orjson.loads(payload[start + 6:].strip()))
    except orjson.JSONDecodeError:
        return None


def _fingerprint_of(payload: bytes) -> bytes | None:
    """The usage chunk's `"system_fingerprint":"..."` value, quotes included, or None. Two finds, the regex only
    for a value with an escape in it: the regex was ~8,000 instructions a stream (callgrind)."""
    key = payload.find(_FINGERPRINT_KEY)
    if key < 0:
        return None
    begin = key + len(_FINGERPRINT_KEY) - 1  # the value's opening quote
    close = payload.find(b'"', begin + 1)
    if close < 0:
        return None
    if payload.find(b"\\", begin, close) >= 0:
        found = _FINGERPRINT.search(payload, key)
        return found.group(1) if found else None
    return payload[begin:close + 1]


def _with_fingerprint(frame: bytes, fingerprint: bytes) -> bytes:
    """A finishing chunk as vLLM writes it when no usage chunk follows: with the fingerprint, re-framed."""
    start = frame.find(b"\r\n") + 2
    payload = frame[start:-2]
    if payload.find(b'"system_fingerprint"') >= 0 or not payload.endswith(b"}\n\n") or payload.find(_FINISHED) < 0:
        return frame
    payload = payload[:-3] + b',"system_fingerprint":' + fingerprint + b"}\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


# -- totals per key and model
def _utc_minute(now: float) -> int:
    return int(now // 60)


def _utc_day(now: float) -> int:
    return int(now // 86400)


class _Counts:
    __slots__ = ("requests", "prompt", "completion")

    def __init__(self, requests: int = 0, prompt: int = 0, completion: int = 0):
        self.requests, self.prompt, self.completion = requests, prompt, completion

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


def default_state_file(port: int) -> str:
    """Where the day's totals are kept when --token-state-file is not given: $XDG_STATE_HOME (or
    ~/.local/state, or the temp dir when there is no home) /gateway/tokens-PORT.json."""
    base = os.environ.get("XDG_STATE_HOME") or (os.path.join(os.path.expanduser("~"), ".local", "state")
                                                if os.path.expanduser("~") != "~" else tempfile.gettempdir())
    return os.path.join(base, "gateway", f"tokens-{port}.json")


class UsageBook:
    """Totals per (key, model): since this process started, this UTC minute, this UTC day.

    The day's totals are written to `state_file` (every few seconds and at exit, atomically) and read back
    at start when the file is of the same UTC day, so a restart does not forget what a key used today. With
    --workers every worker adds its own part of the day to the same file, under a lock.
    """

    def __init__(self, state_file: str = "", clock: Any = time.time):
        self.clock = clock
        self.total: dict[tuple[str, str], _Counts] = {}
        self.minute: dict[tuple[str, str], _Counts] = {}
        self.day: dict[tuple[str, str], _Counts] = {}
        self.started = clock()
        now = self.started
        self.minute_index = _utc_minute(now)
        self.day_index = _utc_day(now)
        self.state_file = state_file
        self._unsaved: dict[tuple[str, str], _Counts] = {}  # this process's part since the last save
        self.listeners: list[Any] = []  # called with (key, model, prompt, completion) for every count
        if state_file:
            self._load()

    def _roll(self, now: float) -> None:
        minute = _utc_minute(now)
        if minute != self.minute_index:
            self.minute_index = minute
            self.minute = {}
        day = _utc_day(now)
        if day != self.day_index:
            self.save()  # yesterday's part goes to yesterday
            self.day_index = day
            self.day = {}

    def record(self, key: str, model: str, prompt: int, completion: int) -> None:
        # Once a counted request: the roll only when the minute moved (a day ends on a minute's end), the adds
        # inline (~3,000 of its ~8,000 instructions were the two, callgrind).
        now = self.clock()
        if _utc_minute(now) != self.minute_index:
            self._roll(now)
        label = (key, model)
        for table in (self.total, self.minute, self.day, self._unsaved):
            counts = table.get(label)
            if counts is None:
                counts = table[label] = _Counts()
            counts.requests += 1
            counts.prompt += prompt
            counts.completion += completion
        for listener in self.listeners:
            listener(key, model, prompt, completion)

    def day_tokens(self, key: str) -> int:
        """What `key` used today (UTC), every model, including what the state file brought back."""
        self._roll(self.clock())
        return sum(c.prompt + c.completion for (name, _), c in self.day.items() if name == key)

    def report(self, key: str | None = None) -> dict[str, Any]:
        """The /-/usage body: every key (or one), per model."""
        now = self.clock()
        self._roll(now)
        keys: dict[str, Any] = {}
        for period, table in (("since_start", self.total), ("minute", self.minute), ("day", self.day)):
            for (name, model), counts in table.items():
                if key is not None and name != key:
                    continue
                models = keys.setdefault(name, {})
                models.setdefault(model, {})[period] = counts.as_dict()
        for models in keys.values():
            for periods in models.values():
                for period in ("since_start", "minute", "day"):
                    periods.setdefault(period, _Counts().as_dict())
        return {"started": int(self.started), "minute_start": self.minute_index * 60, "day_start":
                self.day_index * 86400, "keys": keys}

    # -- the day's state file
    def _load(self) -> None:
        try:
            with open(self.state_file, "rb") as handle:
                data = json.loads(handle.read() or b"{}")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("token state file %s unreadable, the day starts from 0: %s", self.state_file, exc)
            return
        if data.get("day") != self.day_index:
            return
        for entry in data.get("usage", []):
            try:
                label = (str(entry["key"]), str(entry["model"]))
                self.day[label] = _Counts(int(entry["requests"]), int(entry["prompt_tokens"]),
                                          int(entry["completion_tokens"]))
            except (KeyError, TypeError, ValueError):
                continue

    def save(self) -> None:
        """Add this process's part of the day to the state file (lock, read, add, write, rename)."""
        if not self.state_file or not self._unsaved:
            return
        unsaved, self._unsaved = self._unsaved, {}
        day = self.day_index
        try:
            import fcntl

            os.makedirs(os.path.dirname(self.state_file) or ".", exist_ok=True)
            with open(self.state_file + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    with open(self.state_file, "rb") as handle:
                        data = json.loads(handle.read() or b"{}")
                except (FileNotFoundError, ValueError):
                    data = {}
                rows = {(e["key"], e["model"]): e for e in data.get("usage", [])} if data.get("day") == day else {}
                for (key, model), counts in unsaved.items():
                    row = rows.setdefault((key, model), {"key": key, "model": model, "requests": 0,
                                                         "prompt_tokens": 0, "completion_tokens": 0})
                    row["requests"] += counts.requests
                    row["prompt_tokens"] += counts.prompt
                    row["completion_tokens"] += counts.completion
                temporary = f"{self.state_file}.{os.getpid()}.tmp"
                with open(temporary, "w") as handle:
                    json.dump({"day": day, "usage": list(rows.values())}, handle)
                os.replace(temporary, self.state_file)
        except OSError as exc:
            log.warning("token state file %s not written: %s", self.state_file, exc)


# -- for `gateway keys usage`
_PERIODS = ("since_start", "minute", "day")


def merge_usage(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several gateways' /-/usage bodies summed; a minute or day is summed only from reports of the latest one."""
    minute = max((r.get("minute_start", 0) for r in reports), default=0)
    day = max((r.get("day_start", 0) for r in reports), default=0)
    keys: dict[str, Any] = {}
    for report in reports:
        current = {"since_start": True, "minute": report.get("minute_start") == minute,
                   "day": report.get("day_start") == day}
        for key, models in report.get("keys", {}).items():
            for model, periods in models.items():
                into = keys.setdefault(key, {}).setdefault(model, {p: _Counts().as_dict() for p in _PERIODS})
                for period in _PERIODS:
                    if current[period] and period in periods:
                        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
                            into[period][field] += periods[period].get(field, 0)
    return {"minute_start": minute, "day_start": day, "keys": keys}


def format_usage(report: dict[str, Any]) -> str:
    lines = [f"{'KEY':<20} {'MODEL':<28} {'TODAY prompt/completion':>26} {'THIS MINUTE':>20} {'SINCE START':>22}"]
    for key, models in sorted(report.get("keys", {}).items()):
        for model, periods in sorted(models.items()):
            cells = [f"{periods[p]['prompt_tokens']}/{periods[p]['completion_tokens']}" for p in ("day", "minute",
                                                                                                   "since_start")]
            lines.append(f"{key or '-':<20} {model or '-':<28} {cells[0]:>26} {cells[1]:>20} {cells[2]:>22}")
    if len(lines) == 1:
        lines.append("(no tokens counted yet)")
    if "gateways" in report:
        lines.append(f"({report['gateways']} gateways)")
    return "\n".join(lines)
