"""Token accounting and token budgets over real sockets, against the mock engine (which reports usage as vLLM).

The gateway's counts must be the replica's own `usage`; a stream whose client did not ask for usage gets the
bytes it would have got without the gateway; budgets answer 429 `token_limited` with a Retry-After that holds.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from gateway.dataplane.pumping import PUMP_BUILT
from gateway.security.keys import digest_of
from tests.conftest import CHAT, Stack, wait_until

KEY = "sk-tokens-0123456789"


def raw_stream(port: int, path: str, body: dict, request_id: bytes, headers: bytes = b"") -> bytes:
    """The response body of a streamed POST as it arrives on the socket, chunk framing and all."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: %s\r\n%s"
                     b"content-length: %d\r\n\r\n%s" % (path.encode(), request_id, headers, len(data), data))
        out = b""
        while not out.endswith(b"\r\n0\r\n\r\n"):
            piece = conn.recv(65536)
            if not piece:
                break
            out += piece
    return re.sub(rb'"created":\d+', b'"created":0', out.partition(b"\r\n\r\n")[2])


def usage_of(gateway_url: str, key: str | None = None) -> dict:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{gateway_url}/-/usage", headers=headers, timeout=5).json()


@pytest.mark.parametrize("relay", ["pump", "python"])
def test_counts_are_the_replicas_usage_and_streams_stay_byte_exact(stack: Stack, tmp_path: Path, relay: str) -> None:
    """Streams are metered by the C pump (its EV_STRIP_USAGE / EV_ON events) or by usage.py's StreamMeter."""
    if relay == "pump" and not PUMP_BUILT:
        pytest.skip("the C pump is not built")
    replica = stack.replica("r1", "--itl-ms", "2")
    gateway = stack.gateway([], [replica], "--token-accounting", "--token-state-file", str(tmp_path / "t.json"),
                            *(["--no-native-relay"] if relay == "python" else []))
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
    expected = [0, 0]

    def add(usage: object) -> None:
        expected[0] += usage.prompt_tokens  # type: ignore[attr-defined]
        expected[1] += usage.completion_tokens  # type: ignore[attr-defined]

    add(client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=7).usage)
    add(client.completions.create(model="mock", prompt="hello world again", max_tokens=5).usage)
    for create, kwargs in ((client.chat.completions.create, {"messages": CHAT["messages"]}),
                           (client.completions.create, {"prompt": "a longer prompt of a few words"})):
        chunks = list(create(model="mock", max_tokens=9, stream=True, stream_options={"include_usage": True},
                             **kwargs))
        assert chunks[-1].usage is not None  # the client asked: it gets the usage chunk
        add(chunks[-1].usage)
        plain = list(create(model="mock", max_tokens=9, stream=True, **kwargs))
        assert all(chunk.usage is None and chunk.choices for chunk in plain)  # it did not: it never sees one
        add(chunks[-1].usage)  # the same request: the same usage
    # Byte for byte what the replica sends (same id through x-request-id, `created` aside), framing included.
    for path, body in (("/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 6}),
                       ("/v1/completions", {"model": "mock", "prompt": "hi", "max_tokens": 4, "stream": True}),
                       ("/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 3,
                                                 "stream_options": {"include_usage": False}})):
        assert raw_stream(gateway.port, path, body, b"same-id") == raw_stream(replica.port, path, body, b"same-id")
        direct = raw_stream(replica.port, path, {**body, "stream_options": {"include_usage": True}}, b"u")
        expected[0] += int(re.search(rb'"prompt_tokens":(\d+)', direct).group(1))
        expected[1] += int(re.search(rb'"completion_tokens":(\d+)', direct).group(1))
    report = usage_of(gateway.url)["keys"][""]["mock"]
    for period in ("since_start", "minute", "day"):
        assert (report[period]["prompt_tokens"], report[period]["completion_tokens"]) == tuple(expected), period
    metrics = gateway.metrics()
    assert f'gateway_tokens_total{{key="",kind="prompt",model="mock"}} {expected[0]}.0' in metrics
    assert f'gateway_tokens_total{{key="",kind="completion",model="mock"}} {expected[1]}.0' in metrics
    wait_until(lambda: '"completion_tokens":9' in gateway.log(), what="the counts in the access log")
    pumped = re.search(r"^gateway_native_relay_streams_total (\S+)", metrics, re.M)
    assert float(pumped.group(1)) == (7 if relay == "pump" else 0), pumped  # all 7 streams above went there


@pytest.mark.parametrize("relay", ["pump", "python"])
def test_a_stream_cut_short_counts_what_reached_the_client(stack: Stack, relay: str) -> None:
    if relay == "pump" and not PUMP_BUILT:
        pytest.skip("the C pump is not built")
    replica = stack.replica("r1", "--itl-ms", "2")
    gateway = stack.gateway([], [replica], "--token-accounting", *(["--no-native-relay"] if relay == "python" else []))
    with pytest.raises(httpx.RemoteProtocolError):  # the client sees the stream break
        httpx.post(f"{gateway.url}/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 20},
                   headers={"x-mock-fault": "die-mid-stream", "x-mock-after": "6"}, timeout=10)
    wait_until(lambda: usage_of(gateway.url)["keys"], what="the cut stream's count")
    report = usage_of(gateway.url)["keys"][""]["mock"]["since_start"]
    assert report["completion_tokens"] == 5  # six events out: the role event and five tokens
    assert report["prompt_tokens"] > 0  # the admission estimate (the replica never said)


def keys_file(path: Path, extra: str) -> Path:
    path.write_text(f'[[keys]]\nname = "budget"\nsha256 = "{digest_of(KEY).hex()}"\n{extra}\n')
    return path


ASKED_USAGE = b'{"stream_options":{"include_usage":true,"continuous_usage_stats":false},'  # usage.py's splice


def tenants_file(path: Path) -> Path:
    """Two keys, no budget: each a tenant whose tokens are counted by default."""
    path.write_text("".join(f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key).hex()}"\n'
                            for name, key in (("alice", KEY), ("bob", KEY + "-bob"))))
    return path


@pytest.mark.parametrize("relay", ["pump", "python"])
def test_a_gateway_with_keys_counts_tokens_without_being_asked(stack: Stack, tmp_path: Path, relay: str) -> None:
    """token_accounting defaults to auto: a keys file alone turns it on (every key is a tenant)."""
    if relay == "pump" and not PUMP_BUILT:
        pytest.skip("the C pump is not built")
    replica = stack.replica("r1", "--itl-ms", "2")
    gateway = stack.gateway([], [replica], "--api-keys-file", str(tenants_file(tmp_path / "k.toml")),
                            *(["--no-native-relay"] if relay == "python" else []))
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    unary = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=7).usage
    asked = list(client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=9, stream=True,
                                                stream_options={"include_usage": True}))[-1].usage
    plain = list(client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=9, stream=True))
    assert plain and all(chunk.usage is None and chunk.choices for chunk in plain)  # no usage chunk it did not ask for
    completion = list(client.completions.create(model="mock", prompt="a few words", max_tokens=5, stream=True))
    assert all(chunk.usage is None and chunk.choices for chunk in completion)
    direct = raw_stream(replica.port, "/v1/completions", {"model": "mock", "prompt": "a few words", "max_tokens": 5,
                                                          "stream": True, "stream_options": {"include_usage": True}},
                        b"d")
    prompt = unary.prompt_tokens + 2 * asked.prompt_tokens + int(re.search(rb'"prompt_tokens":(\d+)', direct)[1])
    completed = unary.completion_tokens + 2 * asked.completion_tokens \
        + int(re.search(rb'"completion_tokens":(\d+)', direct)[1])
    report = usage_of(gateway.url, KEY)
    counts = report["keys"]["alice"]["mock"]
    for period in ("since_start", "minute", "day"):
        assert (counts[period]["requests"], counts[period]["prompt_tokens"],
                counts[period]["completion_tokens"]) == (4, prompt, completed), period
    assert "bob" not in report["keys"]
    # What the replica got: the client's body, plus only stream_options for a stream that did not ask for usage.
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 3}, separators=(",", ":")).encode()
    response = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, timeout=10,
                          headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert response.status_code == 200 and b'"usage"' not in response.content
    assert replica.stats()["last_request"]["body"].encode() == ASKED_USAGE + body[1:]
    unary_body = json.dumps({**CHAT, "max_tokens": 3}).encode()
    httpx.post(f"{gateway.url}/v1/chat/completions", content=unary_body, timeout=10,
               headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert replica.stats()["last_request"]["body"].encode() == unary_body


def test_no_token_accounting_with_keys_and_no_keys_leave_bodies_alone(stack: Stack, tmp_path: Path) -> None:
    """The explicit off switch wins over auto; without keys auto is off: the replica sees the client's bytes."""
    replica = stack.replica("r1", "--itl-ms", "1")
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 3}).encode()
    for args, headers in ((("--api-keys-file", str(tenants_file(tmp_path / "k.toml")), "--no-token-accounting"),
                           {"authorization": f"Bearer {KEY}"}), ((), {})):
        gateway = stack.gateway([], [replica], *args)
        response = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, timeout=10,
                              headers={**headers, "content-type": "application/json"})
        assert response.status_code == 200
        assert replica.stats()["last_request"]["body"].encode() == body, args
        assert usage_of(gateway.url, headers.get("authorization", "")[7:] or None)["keys"] == {}, args


def test_tokens_per_minute_answers_429_token_limited_then_admits_again(stack: Stack, tmp_path: Path) -> None:
    replica = stack.replica("r1", "--itl-ms", "1")
    # A 6 s "minute" (slots of 0.1 s), so the test waits seconds, not a minute.
    gateway = stack.gateway([], [replica], "--api-keys-file", str(keys_file(tmp_path / "k.toml",
                                                                            "tokens_per_minute = 100")),
                            "--token-minute-s", "6", "--token-state-file", str(tmp_path / "t.json"))
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    # Each request reserves its prompt estimate + max_tokens (40) and settles at its real usage (6 + 40).
    for _ in range(2):
        assert client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=40).usage
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=40)
    response = info.value.response
    assert response.headers["x-serve-reason"] == "token_limited"
    assert info.value.code == "rate_limit_exceeded"
    assert response.json()["error"]["type"] == "rate_limit_error"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 6
    refused_at = time.monotonic()
    # Admitted again once Retry-After has passed (polled with a deadline; never before the window frees).
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=40)

    def admitted() -> bool:
        try:
            client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=40)
            return True
        except openai.RateLimitError:
            return False

    wait_until(admitted, deadline_s=retry_after + 2, interval_s=0.1, what="the window to free up")
    assert time.monotonic() - refused_at <= retry_after + 1
    budgets = usage_of(gateway.url, KEY)["budgets"]["budget"]
    assert budgets["tokens_per_minute"] == 100 and budgets["minute_used"] <= 100
    # /-/usage needs a key when keys are on.
    assert httpx.get(f"{gateway.url}/-/usage", timeout=5).status_code == 401


def test_tokens_per_day_survive_a_restart(stack: Stack, tmp_path: Path) -> None:
    replica = stack.replica("r1", "--itl-ms", "1")
    state = tmp_path / "tokens.json"
    keys = keys_file(tmp_path / "k.toml", "tokens_per_day = 60")
    args = ("--api-keys-file", str(keys), "--token-state-file", str(state))
    gateway = stack.gateway([], [replica], *args)
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    used = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=30).usage.total_tokens
    gateway.child.signal(signal.SIGTERM)
    assert gateway.child.stop() == 0
    assert json.loads(state.read_text())["usage"][0]["completion_tokens"] == 30
    gateway = stack.gateway([], [replica], *args)
    day = usage_of(gateway.url, KEY)["keys"]["budget"]["mock"]["day"]
    assert day["total_tokens"] == used
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=30)
    assert info.value.response.headers["x-serve-reason"] == "token_limited"
    midnight = 86400 - time.time() % 86400
    assert abs(int(info.value.response.headers["retry-after"]) - midnight) <= 5
    assert client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=5).usage


def test_keys_usage_prints_what_the_gateway_counted(stack: Stack, tmp_path: Path) -> None:
    import subprocess
    import sys

    replica = stack.replica("r1", "--itl-ms", "1")
    gateway = stack.gateway([], [replica], "--api-keys-file", str(keys_file(tmp_path / "k.toml", "")),
                            "--token-accounting", "--token-state-file", str(tmp_path / "t.json"))
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    usage = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=4).usage
    result = subprocess.run([sys.executable, "-m", "gateway", "keys", "usage", "--url", gateway.url, "--api-key", KEY],
                            capture_output=True, text=True, timeout=30, check=True)
    row = next(line for line in result.stdout.splitlines() if line.startswith("budget"))
    assert row.split()[1:3] == ["mock", f"{usage.prompt_tokens}/{usage.completion_tokens}"]
    refused = subprocess.run([sys.executable, "-m", "gateway", "keys", "usage", "--url", gateway.url],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "401" in refused.stderr


def test_a_resumed_stream_counts_what_the_client_got(stack: Stack) -> None:
    """--resume-limit: a stream broken and resumed is counted once, by its token ids (resume.py rewrites it)."""
    from replicas.mock_engine import prompt_ids

    replicas = [stack.replica("r1", "--itl-ms", "1"), stack.replica("r2", "--itl-ms", "1")]
    gateway = stack.gateway([], replicas, "--token-accounting", "--resume-limit", "2")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
    p = len(prompt_ids(True, CHAT))
    broken = {"x-mock-fault": "close-mid-stream", "x-mock-die-at": f"{p + 7}"}
    chunks = list(client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=20, stream=True,
                                                 extra_headers=broken))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) and all(c.choices for c in chunks)
    wait_until(lambda: usage_of(gateway.url)["keys"], what="the resumed stream's count")
    report = usage_of(gateway.url)["keys"][""]["mock"]["since_start"]
    assert (report["prompt_tokens"], report["completion_tokens"]) == (p, 20)
    assert 'gateway_resumes_total{outcome="resumed"} 1.0' in gateway.metrics()


def test_with_resume_on_too_streams_go_through_the_pump_and_are_counted(stack: Stack) -> None:
    """`gateway up`'s pair, --resume-limit with --token-accounting: the pump relays every stream (it once kept all of
    them in Python when both were on), the client gets no token ids it did not ask for, and each is counted."""
    if not PUMP_BUILT:
        pytest.skip("the C pump is not built")
    replica = stack.replica("r1", "--itl-ms", "1")
    gateway = stack.gateway([], [replica], "--token-accounting", "--resume-limit", "2")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
    expected = [0, 0]
    for max_tokens in (5, 8, 13):
        chunks = list(client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=max_tokens,
                                                     stream=True, stream_options={"include_usage": True}))
        assert all("\"token_ids\":[" not in chunk.model_dump_json() for chunk in chunks)  # null: not asked for
        expected[0] += chunks[-1].usage.prompt_tokens
        expected[1] += chunks[-1].usage.completion_tokens
    assert expected[1] == 5 + 8 + 13
    wait_until(lambda: usage_of(gateway.url)["keys"].get("", {}).get("mock", {}).get("since_start", {})
               .get("completion_tokens") == expected[1], what="the three streams' counts")
    assert usage_of(gateway.url)["keys"][""]["mock"]["since_start"]["prompt_tokens"] == expected[0]
    pumped = re.search(r"^gateway_native_relay_streams_total (\S+)", gateway.metrics(), re.M)
    assert float(pumped.group(1)) == 3, pumped


def test_the_span_carries_the_counts(stack: Stack) -> None:
    """OpenTelemetry's GenAI names on the request's SERVER span: gen_ai.usage.input_tokens / output_tokens."""
    from tests.test_tracing import needs_otel

    if needs_otel.args[0]:
        pytest.skip(needs_otel.kwargs["reason"])
    from tests.otlp_receiver import Receiver

    receiver = Receiver().start()
    try:
        replica = stack.replica("r1", "--itl-ms", "1")
        gateway = stack.gateway([], [replica], "--token-accounting", "--otlp-endpoint", receiver.url,
                                "--trace-sample-ratio", "1")
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
        list(client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=7, stream=True))
        root = wait_until(lambda: next((s for s in receiver.spans if s.name == "POST /v1/chat/completions"), None),
                          deadline_s=15, what="the request's span")
        assert root.attributes["gen_ai.usage.output_tokens"] == 7
        assert root.attributes["gen_ai.usage.input_tokens"] > 0 and root.attributes["gen_ai.request.model"] == "mock"
    finally:
        receiver.stop()


def test_usage_on_the_admin_listener_needs_a_key(stack: Stack, tmp_path: Path) -> None:
    from gateway.stacks.procs import free_port

    admin = free_port()
    replica = stack.replica("r1", "--itl-ms", "1")
    gateway = stack.gateway([], [replica], "--api-keys-file", str(keys_file(tmp_path / "k.toml", "")),
                            "--admin-port", str(admin), "--token-accounting", "--token-state-file",
                            str(tmp_path / "t.json"))
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    usage = client.completions.create(model="mock", prompt="hello", max_tokens=3).usage
    url = f"http://127.0.0.1:{admin}/-/usage"
    assert httpx.get(url, timeout=5).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer sk-wrong"}, timeout=5).status_code == 401
    report = httpx.get(url, headers={"authorization": f"Bearer {KEY}"}, timeout=5).json()
    assert report["keys"]["budget"]["mock"]["day"]["completion_tokens"] == usage.completion_tokens == 3
    assert httpx.get(f"{gateway.url}/-/usage", headers={"authorization": f"Bearer {KEY}"}, timeout=5).status_code == 404
