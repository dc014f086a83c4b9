"""An OpenAI-compatible stand-in for one vLLM replica, byte-faithful on the wire.

The framing copies vLLM 0.32 behind uvicorn (vllm/entrypoints/openai/chat_completion/serving.py and
completion/serving.py, as seen byte for byte on a raw socket):
`data: <compact JSON>\\n\\n` events each in their own HTTP chunk, the chat role
chunk first, `finish_reason` riding on the last content delta, the optional
usage chunk with `choices: []`, then `data: [DONE]`; errors are plain JSON
before any SSE output. Events are spliced from precomputed byte templates so a
200-event stream costs the engine little more than its 200 writes.

Like vLLM, `return_token_ids` adds `token_ids` to every chunk's choice and
`prompt_token_ids` to the first chunk, `/v1/completions` takes a prompt of token
ids (no BOS added), and greedy output is deterministic: each token is a hash of
every token before it (prompt included), so a stream resumed from the wrong
tokens gives different text (see `greedy_ids`).

Test hooks, none of which vLLM has: `x-replica-id` on every response, per
request `ttft_ms` / `itl_ms` / `step_ms` / `mock_bytes` body fields, the `x-mock-fault`
request header, and the counters at `GET /mock/stats` (`POST /mock/reset`).
`x-mock-spaced-from: L`: a stream request that starts at sequence length L or later writes its
JSON events as `json.dumps` does (a blank after each separator), not as vLLM's compact JSON:
a resume's continuation, when L is above the original request's prompt.
The mid-stream faults (`close-mid-stream`: a FIN after a complete chunk, as a
SIGKILLed replica; `error-mid-stream`: vLLM's in-band error event, `[DONE]`
and a clean end, as a dead engine; `stall-mid-stream`: silence) strike where
the sequence (prompt + generated tokens) reaches a length in `x-mock-die-at`
(comma-separated; `L@S`: only for a request starting at length S), only on a
request that starts below it: every replica a stream is resumed on dies at the
same point of the stream, once.

`step_ms` shapes a stream like vLLM's decode loop instead of `itl_ms`'s
per-stream timers: one engine clock ticks every `step_ms`, and on each tick
every stream joined to that clock gets its next event, all in the same loop
iteration (a new stream gets its first token on the next tick, as after a
prefill step). One write per stream per step: the chat role event rides with
the first token, `[DONE]` and the final chunk with the last.

    python -m replicas.mock_engine --host 127.0.0.1 --port 8100 --replica-id r1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import logging
import os
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from replicas.http_server import WRITE_MODES, HttpServer, Request, Responder, render_headers, run

SYSTEM_FINGERPRINT = "vllm-0.32.0-mock"
LAST_BODY_CAP = 64 * 1024

# One printable-ASCII token per event, none needing JSON escapes, like the tiny
# test model's deltas; their JSON forms are precomputed below.
_WORDS = ("the quick brown fox jumps over lazy dog and then runs far away into dark green "
          "forest where many small birds sing their songs all day long under bright blue sky").split()
TOKENS = tuple(" " + word for word in _WORDS)
_FILLER = "".join(TOKENS) * 64  # padding source for `mock_bytes`, sliced not built

# Outcomes of one counted request; exactly one counter moves per request.
COMPLETED, ABORTED, FAULTED = "completed", "aborted", "faulted"
FAULTS = ("die-before-head", "die-mid-stream", "hang", "malformed", "status-500",
          "close-mid-stream", "error-mid-stream", "stall-mid-stream")
RESUMABLE_FAULTS = ("close-mid-stream", "error-mid-stream", "stall-mid-stream")
# vLLM writes this one with json.dumps (spaces after separators), unlike its chunks.
_ENGINE_ERROR = (b'data: {"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the '
                 b'root cause.", "type": "InternalServerError", "param": null, "code": 500}}\n\n')
MALFORMED = b"this is not HTTP\r\n\x00\xff\xfe garbage {\"data\": \r\n\r\n"


@dataclass(frozen=True)
class EngineConfig:
    replica_id: str
    model: str = "mock"
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    max_tokens_default: int = 16
    unary_bytes: int = 0
    max_model_len: int = 65536
    fault: str | None = None  # x-mock-fault for requests that name none: a replica broken for good
    max_num_seqs: int = 0  # like vLLM's: completions generating at once; the rest wait in FIFO order. 0 = no limit


class BadRequest(Exception):
    """Rejected before any output, as vLLM does (plain JSON even when streaming)."""


def openai_error(message: str, status: int, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})


def _number(value: object, default: float, name: str) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadRequest(f"{name} must be a non-negative number")
    return float(value)


VOCAB = len(TOKENS)
# Token ids: generated ones are indexes into TOKENS; prompt words map above them.
BOS = VOCAB
_ROLE_IDS = {"system": VOCAB + 1, "user": VOCAB + 2, "assistant": VOCAB + 3, "tool": VOCAB + 4}
END_OF_TURN = VOCAB + 5
_WORD_BASE = VOCAB + 16
_MASK64 = (1 << 64) - 1


def _word_ids(text: str) -> list[int]:
    return [_WORD_BASE + zlib.crc32(word.encode()) % 50000 for word in text.split()]


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_ids(chat: bool, body: dict) -> list[int]:
    """The prompt as token ids, as the engine sees it: a string gets a BOS, token ids are taken as they are,
    chat messages go through a template (role marker, words, end of turn, then the assistant marker)."""
    if chat:
        ids = [BOS]
        for message in body["messages"]:
            if not isinstance(message, dict):
                continue
            ids.append(_ROLE_IDS.get(message.get("role"), END_OF_TURN))
            ids += _word_ids(_content_text(message.get("content")))
            ids.append(END_OF_TURN)
        if body.get("add_generation_prompt", True) and not body.get("continue_final_message"):
            ids.append(_ROLE_IDS["assistant"])
        return ids
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0:
            raise BadRequest("token ids must be non-negative")
        return list(prompt)
    if isinstance(prompt, list):
        prompt = " ".join(p for p in prompt if isinstance(p, str))
    return [BOS, *_word_ids(prompt)]


def _fold(state: int, token: int) -> int:
    return ((state ^ token) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64


def _state_of(ids: list[int]) -> int:
    state = 0
    for token in ids:
        state = _fold(state, token)
    return state


def greedy_ids(prompt: list[int], n: int) -> list[int]:
    """The engine's greedy output: each token depends on every token before it."""
    state = _state_of(prompt)
    out = []
    for _ in range(n):
        token = (state >> 29) % VOCAB
        out.append(token)
        state = _fold(state, token)
    return out


def greedy_text(prompt: list[int], n: int) -> str:
    """What a client reads for `n` greedy tokens after `prompt` (tests compare against it)."""
    return "".join(TOKENS[t] for t in greedy_ids(prompt, n))


class _Templates:
    """The byte tails of every event kind, per token, computed once per engine."""

    def __init__(self) -> None:
        fp = orjson.dumps(SYSTEM_FINGERPRINT)
        toks = [orjson.dumps(t) for t in TOKENS]
        self.chat_role = (b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                          b'"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n')
        self.chat_delta = [b'{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":null,'
                           b'"token_ids":null}]}\n\n' % t for t in toks]
        last = (b'{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":"length",'
                b'"stop_reason":null,"token_ids":null}]')
        self.chat_last = [last % t + b"}\n\n" for t in toks]
        self.chat_last_fp = [last % t + b',"system_fingerprint":%s}\n\n' % fp for t in toks]
        self.cmpl_delta = [b'{"index":0,"text":%s,"logprobs":null,"finish_reason":null,"stop_reason":null,'
                           b'"prompt_token_ids":null,"token_ids":null}]}\n\n' % t for t in toks]
        last = (b'{"index":0,"text":%s,"logprobs":null,"finish_reason":"length","stop_reason":null,'
                b'"prompt_token_ids":null,"token_ids":null}]')
        self.cmpl_last = [last % t + b"}\n\n" for t in toks]
        self.cmpl_last_fp = [last % t + b',"system_fingerprint":%s}\n\n' % fp for t in toks]
        self.usage = (b'],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d},'
                      b'"system_fingerprint":' + fp + b"}\n\n")
        # The same events with their token id (return_token_ids): as cheap to send as the plain ones.
        for name in ("chat_delta", "chat_last", "chat_last_fp", "cmpl_delta", "cmpl_last", "cmpl_last_fp"):
            setattr(self, name + "_ids", [event.replace(b'"token_ids":null', b'"token_ids":[%d]' % token)
                                          for token, event in enumerate(getattr(self, name))])


_T = _Templates()
_DONE = b"data: [DONE]\n\n"


class MockEngine:
    """The request handler; one per process."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.server: HttpServer | None = None
        self._model_json = orjson.dumps(config.model)
        replica = ("x-replica-id", config.replica_id)
        self._json_headers = render_headers([("content-type", "application/json"), ("vary", "Origin"), replica])
        self._sse_headers = render_headers([("content-type", "text/event-stream; charset=utf-8"),
                                            ("vary", "Origin"), replica])
        self._clocks: dict[float, _StepClock] = {}
        self._slots = _Slots(config.max_num_seqs)
        self._plain_headers = render_headers([("content-type", "text/plain; charset=utf-8"), replica])
        self._bare_headers = render_headers([replica])
        created = int(time.time())
        self._models_body = orjson.dumps({"object": "list", "data": [{
            "id": config.model, "object": "model", "created": created, "owned_by": "vllm",
            "root": config.model, "parent": None, "max_model_len": config.max_model_len,
            "permission": [{
                "id": "modelperm-" + os.urandom(8).hex(), "object": "model_permission", "created": created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False}]}]})
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.completed = 0
        self.aborted = 0
        self.faulted = 0
        self.in_flight = 0  # live, so a reset during traffic keeps it honest
        # Kept as the parsed Request and rendered only when asked for: the hot
        # path pays one reference assignment.
        self.last_request: Request | None = None
        if self.server is not None:
            self.server.connections_accepted = 0

    async def attach(self, server: HttpServer) -> None:
        self.server = server

    def stats(self) -> dict:
        last = self.last_request
        return {
            "replica_id": self.config.replica_id,
            "requests": self.requests,
            "completed": self.completed,
            "aborted": self.aborted,
            "faulted": self.faulted,
            "in_flight": self.in_flight,
            "connections": self.server.connections_accepted if self.server else 0,
            "last_request": None if last is None else {
                "method": last.method,
                "path": last.path,
                "query": last.query,
                "headers": last.headers,
                "body": last.body[:LAST_BODY_CAP].decode("utf-8", "replace"),
            },
        }

    # -- dispatch ---------------------------------------------------------------
    async def __call__(self, request: Request, responder: Responder) -> None:
        path = request.path
        # Probes and the test hooks are not traffic: a gateway health-checking
        # us must not move the counters a test asserts on.
        if path == "/health":
            return responder.send(200, self._bare_headers)
        if path == "/-/healthz":
            return responder.send(200, self._plain_headers, b"success")
        if path.startswith("/mock/"):
            return self._admin(request, responder)
        if path == "/metrics":
            return responder.send(200, self._plain_headers, self._slots.metrics(self.config.model))

        self.requests += 1
        self.in_flight += 1
        self.last_request = request
        slots = self._slots
        try:
            if slots.limit and path in _GENERATES:
                outcome = await slots.run(responder, self._answer(request, responder))
            else:
                outcome = await self._answer(request, responder)
        finally:
            self.in_flight -= 1
        if outcome == COMPLETED:
            self.completed += 1
        elif outcome == ABORTED:
            self.aborted += 1
        else:
            self.faulted += 1

    async def _answer(self, request: Request, responder: Responder) -> str:
        rid = request.header(b"x-request-id")
        echo = b"x-request-id: %s\r\n" % rid if rid is not None else b""
        fault_raw = request.header(b"x-mock-fault")
        fault = fault_raw.decode("latin-1").strip().lower() if fault_raw is not None else self.config.fault
        if fault is not None and fault not in FAULTS:
            return self._json(responder, 400, openai_error(
                f"unknown x-mock-fault {fault!r}; one of {', '.join(FAULTS)}", 400, "BadRequestError"), echo)
        if fault == "die-before-head":
            responder.close()
            return FAULTED
        if fault == "malformed":
            responder.write_raw(MALFORMED)
            responder.close()
            return FAULTED
        if fault == "hang":
            await responder.wait_disconnected()
            return ABORTED
        if fault == "status-500":
            error = openai_error("mock fault: internal server error", 500, "InternalServerError")
            self._json(responder, 500, error, echo)
            return FAULTED

        path, method = request.path, request.method
        if path == "/v1/chat/completions" or path == "/v1/completions":
            if method != "POST":
                return self._json(responder, 405, openai_error("Method Not Allowed", 405, "MethodNotAllowed"), echo)
            try:
                return await self._completion(request, responder, path == "/v1/chat/completions", rid, echo, fault)
            except BadRequest as exc:
                return self._json(responder, 400, openai_error(str(exc), 400, "BadRequestError"), echo)
        if path == "/v1/models":
            if method != "GET":
                return self._json(responder, 405, openai_error("Method Not Allowed", 405, "MethodNotAllowed"), echo)
            return self._json(responder, 200, self._models_body, echo, fault)
        if path == "/v1/responses" or path.startswith("/v1/responses/"):
            try:
                return await self._responses(request, responder, echo)
            except BadRequest as exc:
                return self._json(responder, 400, openai_error(str(exc), 400, "BadRequestError"), echo)
        return self._json(responder, 404, openai_error("Not Found", 404, "NotFoundError"), echo)

    # -- the Responses API: state kept in this process, as vLLM's `response_store` (VLLM_ENABLE_RESPONSES_API_STORE)
    async def _responses(self, request: Request, responder: Responder, echo: bytes) -> str:
        store: dict[str, dict] = self.__dict__.setdefault("response_store", {})
        if request.method == "GET":
            stored = store.get(request.path.split("/")[3])
            if stored is None:
                return self._json(responder, 404, _not_found(request.path.split("/")[3]), echo)
            return self._json(responder, 200, orjson.dumps(stored["response"]), echo)
        body = orjson.loads(request.body or b"null")
        if not isinstance(body, dict) or request.path != "/v1/responses":
            raise BadRequest("POST /v1/responses takes a JSON object")
        previous = body.get("previous_response_id")
        history: list = []
        if previous is not None:
            if previous not in store:
                return self._json(responder, 404, _not_found(previous), echo)  # vLLM's answer on the wrong replica
            history = store[previous]["messages"]
        given = body.get("input")
        messages = history + ([{"role": "user", "content": given}] if isinstance(given, str) else list(given or []))
        n = int(body.get("max_output_tokens") or self.config.max_tokens_default)
        tokens = greedy_ids(prompt_ids(True, {"messages": messages}), n)
        ident = body.get("request_id") or f"resp_{random.getrandbits(128):032x}"
        text = "".join(TOKENS[t] for t in tokens)
        message = {"type": "message", "id": f"msg_{random.getrandbits(64):016x}", "role": "assistant",
                   "status": "completed", "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response = {"id": ident, "object": "response", "created_at": int(time.time()), "model": self.config.model,
                    "status": "completed", "output": [message], "previous_response_id": previous,
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "usage": {"input_tokens": len(messages), "output_tokens": n, "total_tokens": len(messages) + n}}
        if body.get("store", True):
            store[ident] = {"response": response, "messages": messages + [{"role": "assistant", "content": text}]}
        if not body.get("stream"):
            return self._json(responder, 200, orjson.dumps(response), echo)
        itl = _number(body.get("itl_ms"), self.config.itl_ms, "itl_ms") / 1000.0
        responder.start_stream(200, self._sse_headers + echo if echo else self._sse_headers)
        events = [("response.created", {"response": {**response, "status": "in_progress", "output": []}})]
        events += [("response.output_text.delta", {"item_id": message["id"], "output_index": 0, "content_index": 0,
                                                   "delta": TOKENS[t], "logprobs": []}) for t in tokens]
        events.append(("response.completed", {"response": response}))
        for number, (kind, event) in enumerate(events):
            if number > 1 and itl and not await responder.sleep(itl):
                return ABORTED
            await responder.write(b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(
                {"type": kind, "sequence_number": number, **event})))
        responder.end()
        return COMPLETED

    def _json(self, responder: Responder, status: int, body: bytes, echo: bytes, fault: str | None = None) -> str:
        if fault == "die-mid-stream":
            # The head promises the whole body; half of it arrives, then a reset.
            head_and_half = (b"HTTP/1.1 %d OK\r\ncontent-length: %d\r\ncontent-type: application/json\r\n\r\n"
                             % (status, len(body)) + body[: len(body) // 2])
            responder.write_raw(head_and_half)
            responder.abort()
            return FAULTED
        responder.send(status, self._json_headers + echo if echo else self._json_headers, body)
        return COMPLETED

    def _admin(self, request: Request, responder: Responder) -> None:
        if request.path == "/mock/stats" and request.method == "GET":
            return responder.send(200, self._json_headers, orjson.dumps(self.stats()))
        if request.path == "/mock/reset" and request.method == "POST":
            self.reset()
            return responder.send(200, self._json_headers, orjson.dumps(self.stats()))
        responder.send(404, self._json_headers, openai_error("Not Found", 404, "NotFoundError"))

    # -- completions --------------------------------------------------------------
    async def _completion(self, request: Request, responder: Responder, chat: bool,
                          rid: bytes | None, echo: bytes, fault: str | None) -> str:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"JSON decode error: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        if chat:
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                raise BadRequest("'messages' must be a non-empty list")
        elif not isinstance(body.get("prompt"), (str, list)):
            raise BadRequest("'prompt' must be a string or a list")
        cfg = self.config
        max_tokens = body.get("max_tokens")
        if max_tokens is None and chat:
            max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = cfg.max_tokens_default
        # vLLM's request models are pydantic (lax mode): 30.0 and "30" are read as 30.
        if isinstance(max_tokens, float) and max_tokens.is_integer() \
                or isinstance(max_tokens, str) and max_tokens.strip().isdigit():
            max_tokens = int(max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer")
        if max_tokens > cfg.max_model_len:
            raise BadRequest(f"max_tokens={max_tokens} cannot be greater than max_model_len={cfg.max_model_len}")
        ttft = _number(body.get("ttft_ms"), cfg.ttft_ms, "ttft_ms") / 1000.0
        itl = _number(body.get("itl_ms"), cfg.itl_ms, "itl_ms") / 1000.0
        step = _number(body.get("step_ms"), 0.0, "step_ms") / 1000.0
        prompt = prompt_ids(chat, body)
        suffix = rid.decode("latin-1") if rid is not None else f"{random.getrandbits(64):016x}"
        ident = ("chatcmpl-" if chat else "cmpl-") + suffix
        created = int(time.time())

        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            with_ids = body.get("return_token_ids") is True and request.header(b"x-mock-no-token-ids") is None
            spaced_from = request.header(b"x-mock-spaced-from")
            spaced = spaced_from is not None and spaced_from.isdigit() and len(prompt) >= int(spaced_from)
            if step and not fault and not spaced:
                return await self._stepped(responder, chat, ident, created, max_tokens, prompt,
                                           include_usage, step, echo, with_ids)
            die_after = -1
            if fault == "die-mid-stream":
                raw_after = request.header(b"x-mock-after")
                die_after = int(raw_after) if raw_after is not None and raw_after.isdigit() else 2
            elif fault in RESUMABLE_FAULTS:
                die_after = _die_after(request.header(b"x-mock-die-at"), len(prompt), chat)
                if die_after < 0:
                    fault = None
            return await self._stream(responder, chat, ident, created, max_tokens, prompt,
                                      include_usage, ttft, itl, echo, die_after, fault, with_ids, spaced)

        # A non-streaming reply arrives when the whole generation is done.
        if not await responder.sleep(ttft + itl * (max_tokens - 1)):
            return ABORTED
        text = _text(tuple(prompt), max_tokens)
        payload = self._unary(chat, ident, created, text, max_tokens, len(prompt))
        pad_to = int(_number(body.get("mock_bytes"), cfg.unary_bytes, "mock_bytes"))
        if pad_to > len(payload):
            payload = self._unary(chat, ident, created, _padded_text(tuple(prompt), max_tokens, pad_to - len(payload)),
                                  max_tokens, len(prompt))
        return self._json(responder, 200, payload, echo, fault)

    def _unary(self, chat: bool, ident: str, created: int, text: str, n: int, prompt_tokens: int) -> bytes:
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n,
                 "prompt_tokens_details": None}
        if chat:
            choice = {"index": 0, "message": {
                "role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                "function_call": None, "tool_calls": [], "reasoning_content": None},
                "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None}
            return orjson.dumps({
                "id": ident, "object": "chat.completion", "created": created, "model": self.config.model,
                "choices": [choice], "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT,
                "usage": usage, "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                  "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
        return orjson.dumps({
            "id": ident, "object": "text_completion", "created": created, "model": self.config.model,
            "choices": [choice], "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage, "kv_transfer_params": None})

    def _event_templates(self, chat: bool, ident: str, created: int, include_usage: bool,
                         with_ids: bool) -> tuple[bytes, Any, Any]:
        """The event prefix of this response, and the delta / last-event templates (with token ids if asked)."""
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        prefix = b'data: {"id":%s,"object":"%s","created":%d,"model":%s,"choices":[' % (
            orjson.dumps(ident), obj, created, self._model_json)
        if with_ids:
            deltas, lasts = (_T.chat_delta_ids, _T.chat_last_ids if include_usage else _T.chat_last_fp_ids) if chat \
                else (_T.cmpl_delta_ids, _T.cmpl_last_ids if include_usage else _T.cmpl_last_fp_ids)
        else:
            deltas, lasts = (_T.chat_delta, _T.chat_last if include_usage else _T.chat_last_fp) if chat else \
                (_T.cmpl_delta, _T.cmpl_last if include_usage else _T.cmpl_last_fp)
        return prefix, deltas, lasts

    async def _stream(self, responder: Responder, chat: bool, ident: str, created: int, n: int,
                      prompt: list[int], include_usage: bool, ttft: float, itl: float,
                      echo: bytes, die_after: int, fault: str | None, with_ids: bool, spaced: bool = False) -> str:
        """`die_after` >= 0: `fault` strikes once that many events are out (die-mid-stream: a reset)."""
        prefix, deltas, lasts = self._event_templates(chat, ident, created, include_usage, with_ids)
        write = responder.write if not spaced else lambda event: responder.write(_spaced(event))
        tokens = greedy_ids(prompt, n)
        prompt_tokens = len(prompt)

        responder.start_stream(200, self._sse_headers + echo if echo else self._sse_headers)
        if ttft and not await responder.sleep(ttft):
            return ABORTED
        sent = 0
        if chat:
            if sent == die_after:
                return await self._die(responder, fault)
            role = _T.chat_role
            if with_ids:
                role = role.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":' + orjson.dumps(prompt))
            await write(prefix + role)
            sent += 1
        last = n - 1
        for i, token in enumerate(tokens):
            if i and itl and not await responder.sleep(itl):
                return ABORTED
            if sent == die_after:
                return await self._die(responder, fault)
            event = deltas[token] if i != last else lasts[token]
            if with_ids and i == 0 and not chat:
                event = event.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":' + orjson.dumps(prompt))
            await write(prefix + event)
            sent += 1
            if responder.disconnected:
                return ABORTED
        if sent == die_after:
            return await self._die(responder, fault)
        if include_usage:
            await write(prefix + _T.usage % (prompt_tokens, prompt_tokens + n, n))
        if fault == "die-mid-stream" and die_after >= 0:
            # Fewer events than asked to die after: still never finish cleanly.
            responder.abort()
            return FAULTED
        await write(_DONE)
        if responder.disconnected:
            return ABORTED
        responder.end()
        return COMPLETED

    async def _die(self, responder: Responder, fault: str | None) -> str:
        if fault == "close-mid-stream":
            responder.close()  # a FIN after a complete chunk: no [DONE], no terminating chunk
        elif fault == "error-mid-stream":
            await responder.write(_ENGINE_ERROR)
            await responder.write(_DONE)
            responder.end()
        elif fault == "stall-mid-stream":
            await responder.wait_disconnected()
            return ABORTED
        else:
            responder.abort()
        return FAULTED

    async def _stepped(self, responder: Responder, chat: bool, ident: str, created: int, n: int,
                       prompt: list[int], include_usage: bool, step: float, echo: bytes, with_ids: bool) -> str:
        prompt_tokens = len(prompt)
        prefix, deltas, lasts = self._event_templates(chat, ident, created, include_usage, with_ids)
        tail = [prefix + _T.usage % (prompt_tokens, prompt_tokens + n, n)] if include_usage else []
        responder.start_stream(200, self._sse_headers + echo if echo else self._sse_headers)
        loop = self.server.loop if self.server is not None else asyncio.get_running_loop()
        clock = self._clocks.get(step)
        if clock is None:
            clock = self._clocks[step] = _StepClock(loop, step)
        role = None
        if chat:
            role = prefix + (_T.chat_role.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":'
                                                   + orjson.dumps(prompt)) if with_ids else _T.chat_role)
        stream = _SteppedStream(responder, loop.create_future(), greedy_ids(prompt, n), role,
                                [prefix + d for d in deltas], [prefix + d for d in lasts], tail,
                                orjson.dumps(prompt) if with_ids and not chat else None)
        clock.join(stream)
        return await stream.done


_GENERATES = frozenset(("/v1/completions", "/v1/chat/completions"))


class _Slots:
    """A fixed capacity, like vLLM's max_num_seqs: requests past it wait in FIFO order (vLLM's waiting queue,
    reported at /metrics as vllm:num_requests_waiting); a client that disconnects while waiting leaves it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiting: collections.deque[asyncio.Future] = collections.deque()

    async def run(self, responder: Responder, answer: Any) -> str:
        if self.running >= self.limit:
            slot = asyncio.get_running_loop().create_future()
            self.waiting.append(slot)
            gone = asyncio.ensure_future(responder.wait_disconnected())
            await asyncio.wait((slot, gone), return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not slot.done():
                slot.cancel()
                self.waiting.remove(slot)
                answer.close()
                return ABORTED
        else:
            self.running += 1
        try:
            return await answer
        finally:
            self.running -= 1
            while self.waiting:
                slot = self.waiting.popleft()
                if not slot.done():
                    self.running += 1
                    slot.set_result(None)
                    break

    def metrics(self, model: str) -> bytes:
        labels = '{engine="0",model_name="%s"}' % model
        kv = self.running / self.limit if self.limit else 0.0
        return (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{labels} {self.running:.1f}\n"
                f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{labels} {len(self.waiting):.1f}\n"
                f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{labels} {kv}\n").encode()


class _SteppedStream:
    __slots__ = ("responder", "done", "n", "i", "role", "deltas", "lasts", "tail", "tokens", "prompt_ids")

    def __init__(self, responder: Responder, done: asyncio.Future, tokens: list[int], role: bytes | None,
                 deltas: list[bytes], lasts: list[bytes], tail: list[bytes], prompt_ids: bytes | None) -> None:
        self.responder, self.done, self.n, self.i, self.role = responder, done, len(tokens), 0, role
        self.deltas, self.lasts, self.tail, self.tokens = deltas, lasts, tail, tokens
        self.prompt_ids = prompt_ids  # a completion's first chunk carries them (return_token_ids)

    def _first(self, event: bytes) -> bytes:
        if self.prompt_ids is None:
            return event
        return event.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":' + self.prompt_ids)

    def step(self) -> bool:
        """Emit this step's token; False once the stream is over."""
        responder = self.responder
        if responder.disconnected or self.done.done():  # done: the handler was cancelled (shutdown)
            if not self.done.done():
                self.done.set_result(ABORTED)
            return False
        i = self.i
        tokens = self.tokens
        if i == self.n - 1:
            events = [self.lasts[tokens[i]] if i else self._first(self.lasts[tokens[i]]), *self.tail, _DONE]
            if self.role is not None and i == 0:
                events.insert(0, self.role)
            responder.write_events(events, end=True)
            self.done.set_result(ABORTED if responder.disconnected else COMPLETED)
            return False
        if i == 0 and self.role is not None:
            responder.write_events([self.role, self.deltas[tokens[0]]])
        else:
            responder.write_events([self.deltas[tokens[i]] if i else self._first(self.deltas[tokens[0]])])
        self.i = i + 1
        return True


class _StepClock:
    """vLLM's decode loop in miniature: one timer per period serves every stream joined to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self.streams: list[_SteppedStream] = []
        self.next_at = 0.0
        self.handle: asyncio.TimerHandle | None = None

    def join(self, stream: _SteppedStream) -> None:
        self.streams.append(stream)
        if self.handle is None:
            self.next_at = self.loop.time() + self.period
            self.handle = self.loop.call_at(self.next_at, self._tick)

    def _tick(self) -> None:
        self.streams = [s for s in self.streams if s.step()]
        if not self.streams:
            self.handle = None
            return
        now = self.loop.time()
        self.next_at += self.period
        if self.next_at < now:  # an overloaded engine's steps get longer; they do not bunch up afterwards
            self.next_at = now + self.period
        self.handle = self.loop.call_at(self.next_at, self._tick)



def _not_found(response_id: str) -> bytes:
    return orjson.dumps({"error": {"message": f"Response with id '{response_id}' not found.",
                                   "type": "invalid_request_error", "param": "response_id", "code": 404}})


def _spaced(event: bytes) -> bytes:
    """A JSON event as json.dumps writes it (x-mock-spaced-from), not as vLLM's compact JSON; others as they are."""
    if not event.startswith(b"data: {"):
        return event
    return b"data: " + json.dumps(orjson.loads(event[6:])).encode() + b"\n\n"


def _die_after(raw: bytes | None, start: int, chat: bool) -> int:
    """Events to send before dying: the first `x-mock-die-at` length above the request's own start
    (at it, for a chat request: right after its role chunk); -1 if none. `L@S` strikes only a request
    that starts at length S (so a resume that starts elsewhere below L runs through)."""
    if raw is None:
        return -1
    points = []
    try:
        for part in raw.decode("latin-1").split(","):
            if part.strip():
                length, _, only_from = part.partition("@")
                points.append((int(length), int(only_from) if only_from else None))
    except ValueError:
        return -1
    for length, only_from in sorted(points):
        if only_from is not None and only_from != start:
            continue
        if length > start or (length == start and chat):
            return length - start + (1 if chat else 0)
    return -1


@functools.lru_cache(maxsize=256)
def _text(prompt: tuple[int, ...], n: int) -> str:
    return greedy_text(list(prompt), n)


@functools.lru_cache(maxsize=256)
def _padded_text(prompt: tuple[int, ...], n: int, extra: int) -> str:
    # Benchmarks repeat one shape, so the padded text is built once per shape.
    filler = _FILLER if extra <= len(_FILLER) else _FILLER * (extra // len(_FILLER) + 1)
    return _text(prompt, n) + filler[:extra]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m replicas.mock_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica-id", default=None, help="x-replica-id on every response (default host:port)")
    parser.add_argument("--model", default="mock", help="the served model name")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first event")
    parser.add_argument("--itl-ms", type=float, default=0.0, help="delay between events; 0 = back to back")
    parser.add_argument("--max-tokens-default", type=int, default=16, help="events when max_tokens is absent")
    parser.add_argument("--unary-bytes", type=int, default=0, help="pad non-stream responses to about this size")
    parser.add_argument("--max-model-len", type=int, default=65536, help="larger max_tokens are a 400")
    parser.add_argument("--fault", choices=FAULTS, default=None,
                        help="answer every request with this x-mock-fault (health probes still pass)")
    parser.add_argument("--timeout-keep-alive", type=float, default=5.0, help="close idle connections after (s)")
    parser.add_argument("--max-num-seqs", type=int, default=0,
                        help="completions generating at once (like vLLM's); the rest wait in FIFO order; 0 = no limit")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default=None,
                        help="uvicorn: response head and body in separate writes, cut at random points "
                             "(default: $REPLICA_WRITE_MODE, else direct)")
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = MockEngine(EngineConfig(
        replica_id=args.replica_id or f"{args.host}:{args.port}", model=args.model, ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms, max_tokens_default=args.max_tokens_default, unary_bytes=args.unary_bytes,
        max_model_len=args.max_model_len, fault=args.fault, max_num_seqs=args.max_num_seqs))
    run(engine, args.host, args.port, args.reuse_port, keep_alive_s=args.timeout_keep_alive, on_startup=engine.attach,
        write_mode=args.write_mode)


if __name__ == "__main__":
    main()
