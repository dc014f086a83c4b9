"""The mock vLLM engine, over real sockets: wire framing, counters, faults."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from gateway.stacks.procs import Child, free_port, python_module

HOST = "127.0.0.1"


def start_engine(*args: str) -> Child:
    port = free_port()
    return Child(python_module("replicas.mock_engine", "--host", HOST, "--port", str(port), *args), port=port).start()


@pytest.fixture(scope="module")
def engine() -> Iterator[Child]:
    child = start_engine("--replica-id", "r1")
    yield child
    assert child.stop() == 0


@pytest.fixture(scope="module")
def tuned_engine() -> Iterator[Child]:
    # Every CLI knob away from its default.
    child = start_engine("--model", "other", "--ttft-ms", "30", "--itl-ms", "5", "--max-tokens-default", "3",
                         "--unary-bytes", "4096", "--max-model-len", "100")
    yield child
    child.stop()


def url(child: Child, path: str) -> str:
    return f"http://{HOST}:{child.port}{path}"


async def stats(child: Child) -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(url(child, "/mock/stats"))).json()


async def reset(child: Child) -> None:
    async with httpx.AsyncClient() as client:
        (await client.post(url(child, "/mock/reset"))).raise_for_status()


async def eventually(check: Callable[[dict], bool], child: Child, deadline_s: float = 5.0) -> dict:
    """Poll the counters until `check` holds; fail with the last snapshot."""
    end = time.monotonic() + deadline_s
    while True:
        snapshot = await stats(child)
        if check(snapshot):
            return snapshot
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {deadline_s}s: {snapshot}")
        await asyncio.sleep(0.02)


# -- a raw HTTP/1.1 client, to see exactly what goes over the wire ------------------------------

def raw_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", f"Host: {HOST}"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat_body(**extra: object) -> bytes:
    return json.dumps({"model": "mock", "messages": [{"role": "user", "content": "Say hi"}], **extra}).encode()


class RawResponse:
    def __init__(self, status: int, head_lines: list[str], chunks: list[bytes] | None, body: bytes, complete: bool):
        self.status = status
        self.head_lines = head_lines  # "name: value" in wire order, status line excluded
        self.chunks = chunks  # the chunk payloads, None when not chunked
        self.body = body
        self.complete = complete  # the terminating chunk / full length arrived

    def header(self, name: str) -> str | None:
        for line in self.head_lines:
            key, _, value = line.partition(": ")
            if key.lower() == name:
                return value
        return None


def read_response(f) -> RawResponse:
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    head: list[str] = []
    while (line := f.readline()) not in (b"\r\n", b""):
        head.append(line.decode("latin-1").rstrip("\r\n"))
    response = RawResponse(int(status_line.split()[1]), head, None, b"", False)
    if response.header("transfer-encoding") == "chunked":
        response.chunks = []
        while True:
            size_line = f.readline()
            if not size_line:
                break
            size = int(size_line, 16)
            data = f.read(size + 2)
            if size == 0:
                response.complete = data == b"\r\n"
                break
            assert data.endswith(b"\r\n"), data[-10:]
            response.chunks.append(data[:-2])
        response.body = b"".join(response.chunks)
    else:
        length = int(response.header("content-length") or 0)
        response.body = f.read(length)
        response.complete = len(response.body) == length
    return response


def connect(child: Child, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((HOST, child.port))
    return sock


def exchange(child: Child, request: bytes) -> RawResponse:
    with connect(child) as sock, sock.makefile("rb") as f:
        sock.sendall(request)
        return read_response(f)


def events(response: RawResponse) -> list[dict | str]:
    """Each chunk must be exactly one SSE event; returns them decoded."""
    out: list[dict | str] = []
    for chunk in response.chunks or []:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n"), chunk
        payload = chunk[6:-2]
        assert b"\n" not in payload, f"more than one event in a chunk: {chunk!r}"
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


# -- probes and models ------------------------------------------------------------------------------

async def test_health_endpoints(engine: Child) -> None:
    async with httpx.AsyncClient() as client:
        health = await client.get(url(engine, "/health"))
        assert (health.status_code, health.content, health.headers["content-length"]) == (200, b"", "0")
        assert health.headers["x-replica-id"] == "r1" and health.headers["server"] == "uvicorn"
        assert "date" in health.headers
        healthz = await client.get(url(engine, "/-/healthz"))
        assert (healthz.status_code, healthz.text) == (200, "success")


async def test_openai_sdk_streaming_chat_with_usage(engine: Child) -> None:
    client = openai.AsyncOpenAI(base_url=url(engine, "/v1"), api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Request-Id": "abc123"})
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert {c.id for c in chunks} == {"chatcmpl-abc123"}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = chunks[1:-1]
    assert len(content) == 5 and all(c.choices[0].delta.content for c in content)
    assert [c.choices[0].finish_reason for c in content] == [None] * 4 + ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 5
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 5


async def test_openai_sdk_unary_and_models(engine: Child) -> None:
    client = openai.AsyncOpenAI(base_url=url(engine, "/v1"), api_key="unused", max_retries=0)
    chat = await client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.object == "chat.completion" and re.fullmatch(r"chatcmpl-[0-9a-f]{16}", chat.id)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    assert len(chat.choices[0].message.content.split()) == 4 and chat.usage.completion_tokens == 4
    completion = await client.completions.create(model="mock", prompt="hello world", max_tokens=3,
                                                 extra_headers={"X-Request-Id": "q1"})
    assert completion.id == "cmpl-q1" and len(completion.choices[0].text.split()) == 3
    streamed = [c async for c in await client.completions.create(model="mock", prompt="x", max_tokens=2, stream=True)]
    assert [c.choices[0].finish_reason for c in streamed] == [None, "length"]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["mock"] and models.data[0].owned_by == "vllm"
    await client.close()


# -- byte-exact framing -----------------------------------------------------------------------------

def test_sse_framing_is_byte_exact_one_event_per_chunk(engine: Child) -> None:
    response = exchange(engine, raw_request("POST", "/v1/chat/completions", chat_body(
        max_tokens=200, stream=True), {"X-Request-Id": "framing-1"}))
    assert response.status == 200 and response.complete
    names = [line.split(": ", 1)[0] for line in response.head_lines]
    assert names == ["date", "server", "content-type", "vary", "x-replica-id", "x-request-id", "transfer-encoding"]
    assert response.header("content-type") == "text/event-stream; charset=utf-8"
    assert response.header("server") == "uvicorn" and response.header("vary") == "Origin"
    assert response.header("x-request-id") == "framing-1"
    decoded = events(response)
    assert len(decoded) == 202 and decoded[-1] == "[DONE]"  # role + 200 deltas + [DONE]
    role, deltas, last = decoded[0], decoded[1:-1], decoded[-2]
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["prompt_token_ids"] is None and role["prompt_text"] is None
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-framing-1" for e in deltas)
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["stop_reason"] is None
    assert last["system_fingerprint"]  # no usage chunk: the fingerprint rides on the final delta
    # Compact JSON, LF separators, nothing but data: lines.
    assert response.chunks[1].startswith(
        b'data: {"id":"chatcmpl-framing-1","object":"chat.completion.chunk","created":')
    assert response.chunks[-1] == b"data: [DONE]\n\n"


def test_completions_stream_has_no_role_chunk_and_usage_last(engine: Child) -> None:
    response = exchange(engine, raw_request("POST", "/v1/completions", json.dumps({
        "prompt": "abc", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}).encode()))
    decoded = events(response)
    assert [e["object"] for e in decoded[:-1]] == ["text_completion"] * 4
    assert [e["choices"][0]["finish_reason"] for e in decoded[:3]] == [None, None, "length"]
    assert all("text" in e["choices"][0] for e in decoded[:3])
    assert decoded[3]["choices"] == [] and decoded[3]["usage"]["completion_tokens"] == 3
    assert decoded[-1] == "[DONE]"


def test_return_token_ids_and_token_id_prompts_continue_exactly(engine: Child) -> None:
    """vLLM's return_token_ids; a completion from prompt ids + the first K output ids goes on token-exact."""
    def stream(path: str, body: dict) -> list:
        return events(exchange(engine, raw_request("POST", path, json.dumps(body).encode())))

    chat = stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "go"}], "max_tokens": 12,
                                           "stream": True, "return_token_ids": True})
    prompt = chat[0]["prompt_token_ids"]
    assert isinstance(prompt, list) and prompt
    ids = [e["choices"][0]["token_ids"][0] for e in chat[1:-1]]
    text = "".join(e["choices"][0]["delta"]["content"] for e in chat[1:-1])
    assert len(ids) == 12 and len(set(ids)) > 4  # greedy output that varies
    rest = stream("/v1/completions", {"prompt": prompt + ids[:5], "max_tokens": 7, "stream": True,
                                      "return_token_ids": True, "stream_options": {"include_usage": True}})
    assert rest[0]["choices"][0]["prompt_token_ids"] == prompt + ids[:5]  # no BOS added to token ids
    assert [e["choices"][0]["token_ids"][0] for e in rest[:-2]] == ids[5:]
    assert "".join(e["choices"][0]["text"] for e in rest[:-2]) == text[len("".join(
        e["choices"][0]["delta"]["content"] for e in chat[1:6])):]
    assert rest[-2]["usage"] == {"prompt_tokens": len(prompt) + 5, "total_tokens": len(prompt) + 12,
                                 "completion_tokens": 7}
    # Without return_token_ids the keys are there, null, as vLLM sends them.
    plain = stream("/v1/completions", {"prompt": "go", "max_tokens": 2, "stream": True})
    assert plain[0]["choices"][0]["token_ids"] is None and plain[0]["choices"][0]["prompt_token_ids"] is None


async def test_unary_shape_padding_and_headers(engine: Child) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(url(engine, "/v1/chat/completions"), content=chat_body(mock_bytes=10_000))
        assert 10_000 <= len(response.content) <= 10_100
        assert response.headers["content-type"] == "application/json"
        assert "x-request-id" not in response.headers and response.headers["x-replica-id"] == "r1"
        body = response.json()
        assert set(body) >= {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
        assert body["usage"]["completion_tokens"] == 16  # --max-tokens-default


async def test_cli_knobs(tuned_engine: Child) -> None:
    async with httpx.AsyncClient() as client:
        started = time.monotonic()
        body = (await client.post(url(tuned_engine, "/v1/completions"), json={"prompt": "x"})).json()
        assert time.monotonic() - started >= 0.03  # ttft + 2 * itl
        assert body["model"] == "other" and body["usage"]["completion_tokens"] == 3
        assert 4096 <= len(json.dumps(body, separators=(",", ":"))) <= 4200
        models = (await client.get(url(tuned_engine, "/v1/models"))).json()
        assert models["data"][0]["id"] == "other" and models["data"][0]["max_model_len"] == 100
        too_long = await client.post(url(tuned_engine, "/v1/completions"), json={"prompt": "x", "max_tokens": 101})
        assert too_long.status_code == 400
        # Per-request overrides beat the flags.
        started = time.monotonic()
        await client.post(url(tuned_engine, "/v1/completions"), json={"prompt": "x", "ttft_ms": 0, "itl_ms": 0})
        assert time.monotonic() - started < 0.03 + 0.5
        assert (await stats(tuned_engine))["replica_id"] == f"{HOST}:{tuned_engine.port}"


async def test_errors_are_openai_shaped(engine: Child) -> None:
    async with httpx.AsyncClient() as client:
        cases = [
            (client.get(url(engine, "/nope")), 404, "NotFoundError"),
            (client.post(url(engine, "/v1/chat/completions"), content=b"{not json"), 400, "BadRequestError"),
            (client.post(url(engine, "/v1/chat/completions"), json={"model": "mock"}), 400, "BadRequestError"),
            (client.post(url(engine, "/v1/completions"), json={"prompt": "x", "max_tokens": -1}),
             400, "BadRequestError"),
            (client.get(url(engine, "/v1/chat/completions")), 405, "MethodNotAllowed"),
        ]
        for request, status, kind in cases:
            response = await request
            assert response.status_code == status
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["code"]) == (kind, status)
            assert response.headers["x-replica-id"] == "r1"


# -- connection handling ----------------------------------------------------------------------------

async def test_keep_alive_reuses_one_connection(engine: Child) -> None:
    await reset(engine)
    async with httpx.AsyncClient() as client:
        for _ in range(10):
            (await client.post(url(engine, "/v1/chat/completions"), content=chat_body(max_tokens=2))).raise_for_status()
        snapshot = (await client.get(url(engine, "/mock/stats"))).json()
    assert snapshot["connections"] == 1
    assert (snapshot["requests"], snapshot["completed"], snapshot["in_flight"]) == (10, 10, 0)


def test_pipelined_requests_are_answered_in_order(engine: Child) -> None:
    batch = (raw_request("POST", "/v1/chat/completions", chat_body(max_tokens=3, stream=True, itl_ms=5))
             + raw_request("GET", "/v1/models")
             + raw_request("POST", "/v1/completions", b'{"prompt":"p","max_tokens":2}', {"X-Request-Id": "third"}))
    with connect(engine) as sock, sock.makefile("rb") as f:
        sock.sendall(batch)
        first, second, third = read_response(f), read_response(f), read_response(f)
    assert events(first)[-1] == "[DONE]" and first.complete
    assert json.loads(second.body)["object"] == "list"
    assert json.loads(third.body)["id"] == "cmpl-third"


def test_http10_and_connection_close_end_the_connection(engine: Child) -> None:
    for request in (raw_request("GET", "/v1/models", version="1.0"),
                    raw_request("GET", "/v1/models", headers={"Connection": "close"})):
        with connect(engine) as sock, sock.makefile("rb") as f:
            sock.sendall(request)
            response = read_response(f)
            assert response.status == 200 and response.header("connection") == "close"
            assert f.read() == b""  # the server closed


async def test_chunked_request_body(engine: Child) -> None:
    async def parts():
        yield b'{"messages":[{"role":"user",'
        yield b'"content":"chunked body"}],"max_tokens":2}'

    async with httpx.AsyncClient() as client:
        response = await client.post(url(engine, "/v1/chat/completions"), content=parts())
        assert response.status_code == 200
        last = (await client.get(url(engine, "/mock/stats"))).json()["last_request"]
    assert last["headers"]["transfer-encoding"] == "chunked"
    assert json.loads(last["body"])["messages"][0]["content"] == "chunked body"


def test_unparsable_request_gets_400_and_close(engine: Child) -> None:
    with connect(engine) as sock, sock.makefile("rb") as f:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 400 ")
        rest = f.read()
    assert b"connection: close" in rest


async def test_backpressure_keeps_the_stream_intact() -> None:
    # ~9 MB of events to a reader with a tiny receive window that does not read
    # for a while: more than the kernel buffers hold, so the server must pause
    # (the stream stays in flight), then finish intact once the reader reads.
    child = start_engine()
    try:
        with connect(child, rcvbuf=4096) as sock, sock.makefile("rb") as f:
            sock.sendall(raw_request("POST", "/v1/chat/completions", chat_body(max_tokens=40_000, stream=True)))
            await asyncio.sleep(0.5)
            assert (await stats(child))["in_flight"] == 1
            response = read_response(f)
        assert response.complete and len(events(response)) == 40_002
    finally:
        assert child.stop() == 0


# -- aborts and counters ----------------------------------------------------------------------------

async def disconnect_after_first_event(engine: Child, **pacing: float) -> dict:
    """Read one event of a long stream, then close: the engine must count an abort and nothing completed."""
    await reset(engine)
    with connect(engine) as sock, sock.makefile("rb") as f:
        sock.sendall(raw_request("POST", "/v1/chat/completions", chat_body(max_tokens=4000, stream=True, **pacing)))
        assert f.readline().startswith(b"HTTP/1.1 200")
        while f.readline() != b"\r\n":
            pass
        f.readline(), f.readline()  # the first event's chunk
    return await eventually(lambda s: s["aborted"] == 1 and s["in_flight"] == 0, engine, deadline_s=2.0)


async def test_client_disconnect_mid_stream_counts_as_abort(engine: Child) -> None:
    assert (await disconnect_after_first_event(engine, itl_ms=10))["completed"] == 0


async def test_client_disconnect_while_unary_waits_counts_as_abort(engine: Child) -> None:
    await reset(engine)
    started = time.monotonic()
    with connect(engine) as sock:
        sock.sendall(raw_request("POST", "/v1/chat/completions", chat_body(ttft_ms=20_000)))
        await eventually(lambda s: s["in_flight"] == 1, engine)
    await eventually(lambda s: s["aborted"] == 1 and s["in_flight"] == 0, engine, deadline_s=2.0)
    assert time.monotonic() - started < 5


async def test_last_request_and_reset(engine: Child) -> None:
    async with httpx.AsyncClient() as client:
        await client.post(url(engine, "/v1/completions?x=1"), content=b'{"prompt":"seen","max_tokens":1}',
                          headers={"X-Custom": "yes"})
        snapshot = (await client.get(url(engine, "/mock/stats"))).json()
        last = snapshot["last_request"]
        assert (last["method"], last["path"], last["query"]) == ("POST", "/v1/completions", "x=1")
        assert last["headers"]["x-custom"] == "yes" and json.loads(last["body"])["prompt"] == "seen"
        cleared = (await client.post(url(engine, "/mock/reset"))).json()
    assert {k: cleared[k] for k in ("requests", "completed", "aborted", "faulted", "connections")} == dict.fromkeys(
        ("requests", "completed", "aborted", "faulted", "connections"), 0)
    assert cleared["last_request"] is None


# -- fault injection --------------------------------------------------------------------------------

async def test_fault_die_before_head_and_malformed(engine: Child) -> None:
    async with httpx.AsyncClient() as client:
        for fault in ("die-before-head", "malformed"):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(url(engine, "/v1/chat/completions"), content=chat_body(),
                                  headers={"x-mock-fault": fault})


def test_fault_die_mid_stream(engine: Child) -> None:
    for after, expected in ((None, 2), ("5", 5)):
        headers = {"x-mock-fault": "die-mid-stream", **({"x-mock-after": after} if after else {})}
        response = exchange(engine, raw_request("POST", "/v1/chat/completions",
                                                chat_body(max_tokens=50, stream=True), headers))
        assert response.status == 200 and not response.complete
        assert len(events(response)) == expected


async def test_fault_hang_counts_abort_when_client_leaves(engine: Child) -> None:
    await reset(engine)
    async with httpx.AsyncClient(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url(engine, "/v1/chat/completions"), content=chat_body(),
                              headers={"x-mock-fault": "hang"})
    await eventually(lambda s: s["aborted"] == 1 and s["in_flight"] == 0, engine, deadline_s=2.0)


async def test_fault_status_500_and_unknown_fault(engine: Child) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(url(engine, "/v1/chat/completions"), content=chat_body(stream=True),
                                     headers={"x-mock-fault": "status-500"})
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == 500
        typo = await client.post(url(engine, "/v1/chat/completions"), content=chat_body(),
                                 headers={"x-mock-fault": "die-befor-head"})
        assert typo.status_code == 400


def test_sigterm_exits_zero_with_open_stream() -> None:
    child = start_engine()
    with connect(child) as sock:
        sock.sendall(raw_request("POST", "/v1/chat/completions", chat_body(max_tokens=4000, stream=True, itl_ms=50)))
        sock.recv(100)
        assert child.stop(timeout=5) == 0


# -- step mode: vLLM's decode loop, one clock for every stream ------------------------------------

async def test_step_mode_streams_are_whole_and_framed_like_the_others(engine: Child) -> None:
    await reset(engine)
    client = openai.AsyncOpenAI(base_url=url(engine, "/v1"), api_key="unused", max_retries=0)

    async def one(n: int) -> list:
        stream = await client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=n, stream=True,
            stream_options={"include_usage": True}, extra_body={"step_ms": 5})
        return [chunk async for chunk in stream]

    results = await asyncio.gather(*(one(n) for n in (1, 3, 20, 20)))
    await client.close()
    for n, chunks in zip((1, 3, 20, 20), results):
        assert chunks[0].choices[0].delta.role == "assistant"
        content = chunks[1:-1]
        assert len(content) == n and [c.choices[0].finish_reason for c in content][-1] == "length"
        assert chunks[-1].usage.completion_tokens == n
    assert (await stats(engine))["completed"] == 4
    # On the wire: still one SSE event per HTTP chunk, however many ride in one write.
    decoded = events(exchange(engine, raw_request("POST", "/v1/chat/completions", chat_body(
        max_tokens=4, stream=True, step_ms=5))))
    assert len(decoded) == 6 and decoded[-1] == "[DONE]"


async def test_step_mode_disconnect_counts_as_abort(engine: Child) -> None:
    assert (await disconnect_after_first_event(engine, step_ms=10))["completed"] == 0
