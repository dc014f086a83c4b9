"""Resuming a stream on another replica when its replica dies mid-response, token-exact.

Only with `--resume-limit N` (> 0), and only for streamed /v1/completions and
/v1/chat/completions. The upstream request gets `"return_token_ids": true`, so vLLM
puts the prompt's token ids in the first chunk and each token's id in every chunk.
When the replica connection ends before `[DONE]`, the engine sends an in-band
`error` event, or the stream is silent past `idle_timeout_s`, the relay asks the
router again (never a replica that failed this stream) and continues on
/v1/completions with `prompt = prompt ids + received ids`, `max_tokens - K`:
vLLM takes a token-id prompt as it is (no BOS), so greedy output continues exactly
(measured: identical in every case tried; resuming by *text* was wrong in 6-51%).

The client sees one stream: the first replica's head, then every event rewritten to
the first event's `id` and `created`, chat chunks even when the rest came from
/v1/completions, usage numbers of an uninterrupted request, one `[DONE]`, and no
token ids unless it asked for them. That rewriting needs the SSE payload parsed,
so this path de-chunks the replica's response and re-frames it (one HTTP chunk per
event, as vLLM sends them); with resume off none of this runs (upstream.py's
per-chunk fast path is untouched).

A request whose output a resume could not reproduce is never resumed (the stream
fails visibly, as without resume) and the reason is counted: see REFUSALS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gateway.observability.usage import json_object

try:
    from gateway.dataplane._pump import token_ids as _token_ids
except ImportError:  # installed without a C compiler: the loop in ResumeStream._batch
    _token_ids = None

if TYPE_CHECKING:
    import asyncio

    from gateway.controlplane.targets import Target

COMPLETIONS = b"/v1/completions"
CHAT = b"/v1/chat/completions"

# Request fields whose effect a resume cannot reproduce, by the refusal reason counted for them.
# frequency/presence penalties count generated tokens only (moved into the prompt, they stop counting);
# a seed's random stream cannot be continued; n > 1, logprobs and echo concern output the resumed request
# cannot rebuild; guided decoding and tools constrain output by a state machine over the generated text;
# a stop string could straddle the break (vLLM matches it in the new request's output only).
REFUSALS = ("n", "seed", "penalty", "logprobs", "guided", "tools", "stop", "other", "no_token_ids")

# Chat request fields that mean the same on /v1/completions: copied into the resumed request.
_CHAT_TO_COMPLETION = (
    "model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "user", "priority", "logit_bias", "allowed_token_ids", "stream_options",
    "request_id", "cache_salt", "kv_transfer_params", "vllm_xargs",
    # the mock engine's pacing knobs, so tests can slow a resumed stream down too
    "ttft_ms", "itl_ms",
)


def _truthy(value: object) -> bool:
    return value is not None and value is not False and value != 0 and value != [] and value != "" and value != {}


# Every field refusal() reads but `prompt`: a body with none of them is never refused (one C call per request where
# the checks below made ~50 calls, ~1.2 us a request, measured).
_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
_OTHER_FIELDS = ("bad_words", "logits_processors", "truncate_prompt_tokens", "suffix", "prompt_embeds")
_REFUSAL_FIELDS = frozenset((
    "n", "best_of", "seed", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "echo",
    "prompt_logprobs", "response_format", "tools", "functions", "stop", *_GUIDED_FIELDS, *_OTHER_FIELDS))


def refusal(body: dict[str, Any], chat: bool) -> str | None:
    """Why this request's output could not be continued exactly on another replica, or None."""
    if (chat or not isinstance(body.get("prompt"), list)) and _REFUSAL_FIELDS.isdisjoint(body):
        return None
    n = body.get("n")
    if (n is not None and n != 1) or (body.get("best_of") not in (None, 1)):
        return "n"
    if not chat and isinstance(body.get("prompt"), list) and body["prompt"] \
            and not all(isinstance(t, int) for t in body["prompt"]):
        return "n"  # a batch of prompts: one choice per prompt
    if body.get("seed") is not None:
        return "seed"
    if _truthy(body.get("frequency_penalty")) or _truthy(body.get("presence_penalty")):
        return "penalty"
    if _truthy(body.get("logprobs")) or _truthy(body.get("top_logprobs")) or _truthy(body.get("echo")) \
            or body.get("prompt_logprobs") is not None:
        return "logprobs"
    response_format = body.get("response_format")
    if (isinstance(response_format, dict) and response_format.get("type") not in (None, "text")) \
            or any(_truthy(body.get(k)) for k in _GUIDED_FIELDS):
        return "guided"
    if _truthy(body.get("tools")) or _truthy(body.get("functions")):
        return "tools"
    if _truthy(body.get("stop")):
        return "stop"
    if any(_truthy(body.get(k)) for k in _OTHER_FIELDS):
        return "other"
    return None


_TOKEN_COUNTS = ("max_tokens", "max_completion_tokens", "min_tokens")


def token_count(value: object) -> int | None:
    """A token count as vLLM reads it, or None: its request models are pydantic, whose lax mode takes 100, 100.0,
    "100" and " 100 " alike (vllm/entrypoints/openai/protocol.py, `max_tokens: Optional[int]`). Read as anything
    else, a resume would ask for the wrong count (none at all for `"100"`: more tokens than the client asked)."""
    if isinstance(value, int):  # bool included, as pydantic does
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        whole, dot, fraction = text.partition(".")
        if dot and fraction.strip("0") == "":
            text = whole
        try:
            return int(text)
        except ValueError:
            return None
    return None


class Plan:
    """What `plan` decided for one request: its stream (None: not resumed), why it is refused, and the body to
    send upstream when it differs from the client's (`return_token_ids` added)."""
    __slots__ = ("stream", "refused", "upstream_body")

    def __init__(self, stream: "ResumeStream | None" = None, refused: str | None = None,
                 upstream_body: bytes | None = None):
        self.stream = stream
        self.refused = refused
        self.upstream_body = upstream_body


_NO_PLAN = Plan()


def plan(method: bytes, path: bytes, url: bytes, version: str, body_bytes: bytes, limit: int) -> Plan:
    """Set up resume for one request, or say why it cannot be resumed. Per request, resume on only.
    Plain values in, so that this module does not depend on the request's class (request.py keeps the result)."""
    chat = path == CHAT
    if method != b"POST" or not (chat or path == COMPLETIONS) or version != "1.1":
        return _NO_PLAN
    body = json_object(body_bytes)
    if body is None or body.get("stream") is not True:
        return _NO_PLAN
    if chat and not isinstance(body.get("messages"), list) or not chat and "prompt" not in body:
        return _NO_PLAN
    reason = refusal(body, chat)
    if reason is not None:
        return Plan(refused=reason)
    rewritten = "return_token_ids" in body
    for key in _TOKEN_COUNTS:  # the counts a resume lowers by the tokens already sent, as integers
        value = body.get(key)
        if value is not None and type(value) is not int:
            count = token_count(value)
            if count is None:
                return _NO_PLAN  # the replica refuses such a request (400): nothing to resume
            body[key] = count
            rewritten = True
    wants_ids = body.get("return_token_ids") is True
    upstream_body = None
    if not wants_ids:
        body["return_token_ids"] = True
        if rewritten:
            upstream_body = orjson.dumps(body)
        else:  # the client's bytes with the member added before the object's closing brace (no orjson.dumps)
            upstream_body = body_bytes.rstrip()[:-1] + b',"return_token_ids":true}'
    stream = ResumeStream(body, chat, wants_ids, limit)
    stream.url = url
    return Plan(stream, None, upstream_body)


def _frame(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


_DONE_EVENT = b"data: [DONE]\n\n"
_DONE_FROM = -len(_DONE_EVENT)
# A choice's token ids as vLLM writes them: `"token_ids":[12]` (`[12,7]` when vLLM merged two outputs).
_IDS_KEY = b'"token_ids":['
_IDS_NULL = b'"token_ids":null'
_NOT_FINISHED = (b'"finish_reason":null,', b'"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,')
_DONE_CHUNK = _frame(_DONE_EVENT)
_LAST_CHUNK = b"0\r\n\r\n"


class ResumeStream:
    """One resumable stream: what the client has been sent, and how to continue it."""

    # What every stream starts with, on the class: an instance gets its own value only when one changes (the
    # assignments in __init__ were ~3,000 of its ~6,500 instructions, callgrind). Immutable values only.
    transport: "asyncio.Transport | None" = None
    replying = False  # the client has the response head: from now on failures are resumed
    outcome = "resumed"  # counted when the next segment starts: "migrated" when moved off a leaving replica
    segment = 0  # 0: the original request; then one per resume
    resumes = 0
    prompt_ids: list[int] | None = None
    offset = 0  # tokens in the prompt of the current segment that the original request generated
    skip = 0  # tokens of the current segment the client already has (a rewound resume)
    _ident: Any = None
    _created: Any = None
    # The first event as the pump recorded it (pumping.py's resume_absorb): `ident` and `created` are read from
    # it when something asks for them, which only a resume or a migration does (orjson.loads of the event at
    # every pumped stream's end was ~1.1 us of the ~1.8 us resume_absorb took, measured).
    first_event: bytes | None = None
    no_ids = False
    finished = False  # a choice carried its finish_reason
    usage_sent = False
    done = False  # [DONE] went out
    last_sent = False  # and the response's last chunk: the pump wrote it with [DONE] (pumping.py)
    broken = False  # this segment ended in an in-band error or garbage: drop the rest of it
    _buffer = b""

    def __init__(self, body: dict[str, Any], chat: bool, wants_ids: bool, limit: int):
        self.body = body
        self.chat = chat
        self.wants_ids = wants_ids
        self.limit = limit
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        max_tokens = body.get("max_tokens")
        if max_tokens is None and chat:
            max_tokens = body.get("max_completion_tokens")
        self.max_tokens: int | None = max_tokens if isinstance(max_tokens, int) else None
        self.url = CHAT if chat else COMPLETIONS  # the client's request target (the replica's may be prefixed)
        self.failed: set[Target] = set()
        self.received: list[int] = []
        self.pending: list[bytes] = []  # filled by the upstream connection's parser, one chunk at a time
        # The received token ids as the replica wrote them (b"12" or b"12,7"): parsed only to resume.
        self._raw_ids: list[bytes] = []

    def _read_first(self) -> None:
        first, self.first_event = self.first_event, None
        try:
            ev = orjson.loads(first)  # type: ignore[arg-type]
        except orjson.JSONDecodeError:  # the pump records an event that looks like an object: not all of them are
            return
        if isinstance(ev, dict):
            self._ident, self._created = ev.get("id"), ev.get("created")

    @property
    def ident(self) -> Any:
        """The first event's `id`: every event of a resumed part gets it. None: no event went out yet."""
        if self.first_event is not None:
            self._read_first()
        return self._ident

    @ident.setter
    def ident(self, value: Any) -> None:
        if self.first_event is not None:
            self._read_first()
        self._ident = value

    @property
    def created(self) -> Any:
        """The first event's `created`, for the events of a resumed part too."""
        if self.first_event is not None:
            self._read_first()
        return self._created

    @created.setter
    def created(self, value: Any) -> None:
        if self.first_event is not None:
            self._read_first()
        self._created = value

    # -- the replica's payload, event by event
    def start_segment(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.broken = False
        self._buffer = b""

    def flush(self) -> None:
        """Process what one read from the replica brought (its chunks' payloads, in `pending`)."""
        pending = self.pending
        if not pending:
            return
        buffer = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if self._buffer:
            buffer = self._buffer + buffer
            self._buffer = b""
        if buffer[-2:] != b"\n\n":  # an event split across reads (rare: vLLM writes one per chunk)
            end = buffer.rfind(b"\n\n") + 2
            if end < 2:
                self._buffer = buffer
                return
            self._buffer = buffer[end:]
            buffer = buffer[:end]
        if self.broken or self.done:
            return
        if self.segment == 0:
            if self.prompt_ids is None and (first := buffer.find(b"\n\n") + 2) < len(buffer):
                # The first event names the prompt's token ids (the JSON path, for it alone); the rest of the read
                # then takes the batch path as later reads do: a stream that comes whole with its head is not
                # JSON-parsed event by event (stream200 c=16 with resume on: 2.3x the CPU of resume off, before).
                out: list[bytes] = []
                self._event(buffer[:first], out)
                if out and self.transport is not None:
                    self.transport.write(b"".join(out))
                buffer = buffer[first:]
                if self.broken or self.done:
                    return
            if self.prompt_ids is not None and self._batch(buffer):
                return
        out = []
        start = 0
        find = buffer.find
        while (end := find(b"\n\n", start)) >= 0:
            if not self.broken:
                self._event(buffer[start:end + 2], out)
            start = end + 2
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _ended_well(self, usage: bool, done: bool) -> bool:
        """Fold one read's usage and [DONE] into the stream's state; False when its [DONE] must be held back
        (the engine gave up without finishing: the stream is broken, not ended)."""
        if usage:
            self.usage_sent = True
        if not done:
            return True
        if self.finished and (self.usage_sent or not self.include_usage):
            self.done = True
            return True
        self.broken = True
        return False

    def _batch(self, buffer: bytes) -> bool:
        """The per-read path of the original stream: all events of one read at once, with C-speed byte
        operations and no JSON round trip (a per-event JSON path cost 4x the relay itself, measured).
        vLLM writes a choice's token ids as `"token_ids":[..]`, which no JSON string can hold unescaped.
        False: the read holds something unusual (an error event, an event without token ids)."""
        batched = _token_ids(buffer, not self.wants_ids, True) if _token_ids is not None else None
        if batched is None:
            return self._batch_loop(buffer)
        # The C pump's loop (_pump.c token_ids, the read back framed as one chunk), the same as _batch_loop's.
        framed, ids, finished, n, events, usage = batched
        if not n:
            return False  # the usage chunk or [DONE] alone: the event path
        done = False
        if events != n:
            done = buffer[_DONE_FROM:] == _DONE_EVENT
            if events != n + usage + done:
                return False
        if ids:
            self._raw_ids.append(ids)
        if finished:
            self.finished = True
        if (usage or done) and not self._ended_well(usage, done):
            framed = _frame(framed[framed.index(b"\r\n") + 2:-2 - len(_DONE_EVENT)])
        if self.transport is not None:
            self.transport.write(framed)
        return True

    def _batch_loop(self, buffer: bytes) -> bool:
        """_batch without the C pump built."""
        parts = buffer.split(_IDS_KEY)
        n = len(parts) - 1
        if not n:
            return False  # the usage chunk or [DONE] alone: the event path
        events = buffer.count(b"\n\n")
        usage = 0
        done = 0
        if events != n:
            done = buffer.endswith(_DONE_EVENT)
            usage = buffer.count(b'"choices":[]')
            if events != n + usage + done:
                return False
        raw = self._raw_ids
        wants_ids = self.wants_ids
        out = [parts[0]]
        for part in parts[1:]:
            end = part.find(b"]")
            raw.append(part[:end])
            out.append(part if wants_ids else part[end + 1:])
        # finish_reason rides on the last content chunk, before its token ids; vLLM's two shapes of a chunk
        # that does not finish are recognized at their end (O(1)), anything else is searched.
        last = parts[-2]
        if not last.endswith(_NOT_FINISHED) and last.find(b'"finish_reason":"') >= 0:
            self.finished = True
        if not self._ended_well(usage, done):
            out[-1] = out[-1][:-len(_DONE_EVENT)]
        buffer = (_IDS_KEY if wants_ids else _IDS_NULL).join(out)
        if buffer and self.transport is not None:
            self.transport.write(b"%x\r\n%s\r\n" % (len(buffer), buffer))
        return True

    def _event(self, event: bytes, out: list[bytes]) -> None:
        if self.done:
            return
        if not event.startswith(b"data: "):
            if self.segment == 0:
                out.append(_frame(event))  # not vLLM's framing, but not ours to drop either
            return
        data = event[6:-2]
        if data == b"[DONE]":
            if self.finished and (self.usage_sent or not self.include_usage):
                self.done = True
                out.append(_DONE_CHUNK)
            else:
                self.broken = True  # the engine gave up without finishing (after an error event)
            return
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.broken = True
            return
        if not isinstance(ev, dict) or "error" in ev and "choices" not in ev:
            self.broken = True  # vLLM's in-band engine error: resume from what the client has
            return
        if self.segment == 0:
            self._original(ev)
        elif not self._resumed(ev):
            return
        out.append(_frame(b"data: " + orjson.dumps(ev) + b"\n\n"))

    def _original(self, ev: dict[str, Any]) -> None:
        if self.ident is None:
            self.ident, self.created = ev.get("id"), ev.get("created")
        wants_ids = self.wants_ids
        if "prompt_token_ids" in ev:  # chat: on the role chunk
            ids = ev["prompt_token_ids"]
            if isinstance(ids, list):
                self.prompt_ids = ids
                if not wants_ids:
                    ev["prompt_token_ids"] = None
        choices = ev.get("choices")
        if choices:
            for choice in choices:
                if "prompt_token_ids" in choice:  # completions: on the first chunk's choice
                    ids = choice["prompt_token_ids"]
                    if isinstance(ids, list):
                        self.prompt_ids = ids
                        if not wants_ids:
                            choice["prompt_token_ids"] = None
                self._tokens(choice, choice.get("delta", {}).get("content") if self.chat else choice.get("text"))
        elif "usage" in ev:
            self.usage_sent = True

    def _tokens(self, choice: dict[str, Any], text: object) -> None:
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.received_ids(ids)
            if not self.wants_ids:
                choice["token_ids"] = None
        elif text:
            self.no_ids = True  # output we could not resume from
        if choice.get("finish_reason") is not None:
            self.finished = True

    def _resumed(self, ev: dict[str, Any]) -> bool:
        """A /v1/completions chunk of a resumed segment, rewritten into the client's stream; False: drop it."""
        ev["id"] = self.ident
        ev["created"] = self.created
        choices = ev.get("choices")
        usage = ev.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            usage["prompt_tokens"] -= self.offset
            if isinstance(usage.get("completion_tokens"), int):
                usage["completion_tokens"] += self.offset
        if self.chat:
            ev["object"] = "chat.completion.chunk"
        if not choices:
            if usage is not None:
                self.usage_sent = True
            return True
        kept = []
        for choice in choices:
            ids = choice.get("token_ids")
            if self.skip:
                # A rewound resume regenerates the last token the client already has: drop it.
                self.skip -= len(ids) if isinstance(ids, list) else 1
                if isinstance(ids, list):
                    self.received_ids(ids)
                if choice.get("finish_reason") is not None:
                    self.finished = True
                continue
            if "prompt_token_ids" in choice:
                choice["prompt_token_ids"] = None  # the resumed prompt: not the client's
            if self.chat:
                text = choice.get("text")
                finish = choice.get("finish_reason")
                converted: dict[str, Any] = {"index": choice.get("index", 0), "delta": {"content": text},
                                             "logprobs": None, "finish_reason": finish}
                if finish is not None:
                    converted["stop_reason"] = choice.get("stop_reason")
                converted["token_ids"] = ids
                choice = converted
            self._tokens(choice, choice["delta"]["content"] if self.chat else choice.get("text"))
            kept.append(choice)
        if not kept:
            return False
        ev["choices"] = kept
        return True

    def received_ids(self, ids: list[int]) -> None:
        if self._raw_ids:
            self._parse_raw_ids()
        self.received.extend(ids)

    def _parse_raw_ids(self) -> None:
        raw, self._raw_ids = self._raw_ids, []
        self.received.extend(orjson.loads(b"[" + b",".join(part for part in raw if part) + b"]"))

    def token_counts(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens of the stream the client got, from the token ids seen (token accounting:
        exact, resumes included), or None when the prompt's ids never came."""
        if self.prompt_ids is None:
            return None
        raw = sum(part.count(b",") + 1 for part in self._raw_ids if part)
        return len(self.prompt_ids), len(self.received) + raw

    # -- the end of one replica's part
    @property
    def complete(self) -> bool:
        return self.done

    def can_finish_here(self) -> bool:
        """Everything but `[DONE]` reached the client: the stream can end without another replica."""
        return not self.done and self.finished and (self.usage_sent or not self.include_usage)

    def finish_here(self) -> None:
        assert self.transport is not None
        self.done = True
        self.transport.write(_DONE_CHUNK + _LAST_CHUNK)

    def end_chunk(self) -> bytes:
        return b"" if self.last_sent else _LAST_CHUNK

    def cannot_resume(self) -> str | None:
        """Why this stream cannot be continued now: None, "limit", or a refusal reason."""
        if self.no_ids or self.prompt_ids is None:
            return "no_token_ids"
        if self.resumes >= self.limit:
            return "limit"
        return None

    def next_body(self) -> bytes:
        """The /v1/completions request that continues the stream from the tokens the client has."""
        if self._raw_ids:
            self._parse_raw_ids()
        received = self.received
        # All tokens out but the usage chunk: regenerate the last one (dropped) to get vLLM's usage chunk.
        self.skip = 1 if self.finished else 0
        if self.skip:
            received = received[:-1]
            del self.received[len(received):]
        k = len(received)
        body = self.body
        if self.chat:
            new: dict[str, Any] = {key: body[key] for key in _CHAT_TO_COMPLETION if key in body}
        else:
            new = {key: value for key, value in body.items() if key != "prompt"}
        new.pop("max_completion_tokens", None)
        new["prompt"] = [*(self.prompt_ids or ()), *received]
        if self.skip:
            new["max_tokens"] = 1
        elif self.max_tokens is not None:
            new["max_tokens"] = max(1, self.max_tokens - k)
        if isinstance(body.get("min_tokens"), int):
            new["min_tokens"] = max(0, body["min_tokens"] - k)
        new["stream"] = True
        new["return_token_ids"] = True
        self.offset = k
        self.segment += 1
        self.resumes += 1
        self.finished = False
        return orjson.dumps(new)
