"""Locust users that speak the OpenAI chat API through the gateway (or anything OpenAI-compatible).

Each streaming request is recorded four ways (locust ``request_type`` / name):

* ``TTFT``  / chat-stream: time to the first SSE event that carries a token (ms)
* ``ITL``   / chat-stream: mean gap between consecutive token events of that request (ms)
* ``E2E``   / chat-stream: request start to ``data: [DONE]`` (ms); failures (non-200, a missing
  ``[DONE]``, a transport error) are recorded here
* ``POST``  / chat-unary: non-stream requests, when ``LOCUST_UNARY_WEIGHT`` > 0

Knobs (environment): ``LOCUST_MAX_TOKENS`` (200), ``LOCUST_MODEL`` ("mock"), ``LOCUST_ITL_MS``
(sent as the mock engine's ``itl_ms`` body field when set), ``LOCUST_STREAM_WEIGHT`` (1),
``LOCUST_UNARY_WEIGHT`` (0), ``LOCUST_TIMEOUT_S`` (120), ``LOCUST_SESSION_HEADER`` (unset: when
set, every user sends a stable ``<header>: user-<n>`` so a session-affinity router pins it).

Stack to point it at (one shell; no setsid, see docs/contributing.md, "Real vLLM on CPU")::

    .venv/bin/python -m replicas.mock_engine --port 8101 --replica-id r1 &
    .venv/bin/python -m replicas.mock_engine --port 8102 --replica-id r2 &
    .venv/bin/python -m replicas.router --port 8100 --replica r1=http://127.0.0.1:8101 \\
        --replica r2=http://127.0.0.1:8102 &
    taskset -c 0 .venv/bin/python -m gateway serve --port 8000 --router http://127.0.0.1:8100 \\
        --replica r1=http://127.0.0.1:8101 --replica r2=http://127.0.0.1:8102 &

Headless concurrency sweep (one CSV set per user count), then the plots::

    mkdir -p bench-results/locust
    for u in 1 4 16 64 128; do
      taskset -c 1 .venv/bin/locust -f scripts/locustfile.py --headless -H http://127.0.0.1:8000 \\
          -u $u -r $u -t 60s --only-summary --csv bench-results/locust/u$u
    done
    .venv/bin/python scripts/plot_locust.py bench-results/locust --out bench-results/locust/locust.png

Locust (gevent, one process) is much heavier per request than ``scripts/bench.py``'s load
generator: use it for TTFT/ITL under realistic pacing (``LOCUST_ITL_MS=20``), not for proxy CPU.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import httpx
from locust import User, between, events, task  # noqa: F401  (between: handy for -f overrides)

MAX_TOKENS = int(os.environ.get("LOCUST_MAX_TOKENS", "200"))
MODEL = os.environ.get("LOCUST_MODEL", "mock")
ITL_MS = os.environ.get("LOCUST_ITL_MS")
STREAM_WEIGHT = int(os.environ.get("LOCUST_STREAM_WEIGHT", "1"))
UNARY_WEIGHT = int(os.environ.get("LOCUST_UNARY_WEIGHT", "0"))
TIMEOUT_S = float(os.environ.get("LOCUST_TIMEOUT_S", "120"))
SESSION_HEADER = os.environ.get("LOCUST_SESSION_HEADER")
_user_ids = itertools.count()


def _body(stream: bool) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": MAX_TOKENS, "stream": stream}
    if ITL_MS is not None:
        body["itl_ms"] = float(ITL_MS)
    return body


def _has_token(event: bytes) -> bool:
    """True for a chat/completions chunk that carries generated text (not the role-only or usage chunk)."""
    try:
        obj = json.loads(event)
    except ValueError:
        return False
    for ch in obj.get("choices") or ():
        delta = ch.get("delta")
        if delta is not None and delta.get("content"):
            return True
        if ch.get("text"):
            return True
    return False


class OpenAIStreamUser(User):
    """One user = one keep-alive httpx connection, closed loop (no think time by default)."""

    def __init__(self, environment) -> None:
        super().__init__(environment)
        headers = {}
        if SESSION_HEADER:
            headers[SESSION_HEADER] = f"user-{next(_user_ids)}"
        self.client = httpx.Client(base_url=self.host, timeout=TIMEOUT_S, headers=headers,
                                   limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    def on_stop(self) -> None:
        self.client.close()

    def _fire(self, kind: str, name: str, ms: float, length: int = 0, exc: BaseException | None = None) -> None:
        events.request.fire(request_type=kind, name=name, response_time=ms, response_length=length,
                            exception=exc, context={})

    @task(STREAM_WEIGHT)
    def chat_stream(self) -> None:
        name = "chat-stream"
        t0 = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        nbytes = 0
        done = False
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=_body(True)) as r:
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                for line in r.iter_lines():
                    nbytes += len(line) + 1
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    if _has_token(data.encode()):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
            if not done:
                raise RuntimeError("stream ended without data: [DONE]")
        except Exception as e:  # noqa: BLE001
            self._fire("E2E", name, (time.perf_counter() - t0) * 1000, nbytes, e)
            return
        end = time.perf_counter()
        if first is not None:
            self._fire("TTFT", name, (first - t0) * 1000)
        if gaps:
            self._fire("ITL", name, sum(gaps) / len(gaps) * 1000)
        self._fire("E2E", name, (end - t0) * 1000, nbytes)

    @task(UNARY_WEIGHT)
    def chat_unary(self) -> None:
        t0 = time.perf_counter()
        try:
            r = self.client.post("/v1/chat/completions", json=_body(False))
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            self._fire("POST", "chat-unary", (time.perf_counter() - t0) * 1000, len(r.content))
        except Exception as e:  # noqa: BLE001
            self._fire("POST", "chat-unary", (time.perf_counter() - t0) * 1000, 0, e)
