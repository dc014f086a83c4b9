"""Fixtures: real processes on 127.0.0.1 — mock vLLM replicas, the router, the gateway."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from gateway.stacks.procs import Child, free_port, python_module

LOG_DIR = os.environ.get("GATEWAY_TEST_LOGS", "/tmp/gateway-test-logs")
os.makedirs(LOG_DIR, exist_ok=True)

# scripts/bench_vllm.py (real vLLM servers, `vllm bench serve`, Prometheus parsing), shared by the vLLM suites.
_spec = importlib.util.spec_from_file_location("bench_vllm", Path(__file__).resolve().parent.parent / "scripts"
                                               / "bench_vllm.py")
bench_vllm: Any = sys.modules.setdefault("bench_vllm", importlib.util.module_from_spec(_spec))  # type: ignore[arg-type]
if not hasattr(bench_vllm, "VllmServer"):
    _spec.loader.exec_module(bench_vllm)  # type: ignore[union-attr]  # registered first: its dataclasses look it up


def wait_until(check: Callable[[], object], deadline_s: float = 10.0, interval_s: float = 0.02, what: str = "") -> object:
    """Poll `check` until it returns something truthy; fail the test at the deadline (no sleep-and-hope)."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {deadline_s}s waiting for {what or check}; last value {last!r}")


def read_until_close(sock) -> bytes:
    """Everything a raw socket receives until the peer closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@dataclass
class Server:
    """A process of ours listening on 127.0.0.1:port."""

    port: int
    child: Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> dict:
        return httpx.get(f"{self.url}{path}", timeout=5).json()


@dataclass
class Replica(Server):
    replica_id: str = ""

    def stats(self) -> dict:
        return self.get_json("/mock/stats")

    def reset(self) -> None:
        httpx.post(f"{self.url}/mock/reset", timeout=5)


@dataclass
class Router(Server):
    def stats(self) -> dict:
        return self.get_json("/-/stats")


@dataclass
class Gateway(Server):
    log_path: str = ""

    def routes(self) -> dict:
        return self.get_json("/-/routes")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/-/metrics", timeout=5).text

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


@dataclass
class Stack:
    """Starts processes and stops them all at teardown."""

    name: str
    children: list[Child] = field(default_factory=list)

    def _start(self, child: Child) -> Child:
        self.children.append(child)
        return child.start()

    def replica(self, replica_id: str | None = None, *args: str, port: int | None = None) -> Replica:
        port = port or free_port()
        replica_id = replica_id or f"replica-{port}"
        argv = python_module("replicas.mock_engine", "--host", "127.0.0.1", "--port", str(port),
                             "--replica-id", replica_id, *args)
        child = self._start(Child(argv, port=port, log_path=f"{LOG_DIR}/{self.name}-{replica_id}.log"))
        return Replica(port, child, replica_id)

    def router(self, replicas: list[Replica], *args: str, port: int | None = None) -> Router:
        port = port or free_port()
        argv = python_module("replicas.router", "--host", "127.0.0.1", "--port", str(port), *args)
        for replica in replicas:
            argv += ["--replica", f"{replica.replica_id}={replica.url}"]
        child = self._start(Child(argv, port=port, log_path=f"{LOG_DIR}/{self.name}-router-{port}.log"))
        return Router(port, child)

    def gateway(self, routers: list[Router], replicas: list[Replica], *args: str,
                env: dict[str, str] | None = None, extra_replicas: list[str] = ()) -> Gateway:
        port = free_port()
        argv = python_module("gateway", "serve", "--host", "127.0.0.1", "--port", str(port), *args)
        for router in routers:
            argv += ["--router", router.url]
        for replica in replicas:
            argv += ["--replica", f"{replica.replica_id}={replica.url}"]
        for text in extra_replicas:
            argv += ["--replica", text]
        log_path = f"{LOG_DIR}/{self.name}-gateway-{port}.log"
        if os.path.exists(log_path):
            os.unlink(log_path)
        # A gateway with keys counts tokens and keeps the day's totals in $XDG_STATE_HOME/gateway/tokens-PORT.json:
        # a fresh directory each, so a gateway never reads what an earlier one on the same port counted.
        env = {"XDG_STATE_HOME": tempfile.mkdtemp(prefix="state-", dir=LOG_DIR), **(env or {})}
        child = self._start(Child(argv, port=port, env=env, log_path=log_path))
        return Gateway(port, child, log_path)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A fresh set of processes for one test."""
    s = Stack(request.node.name[:60].replace("/", "_"))
    yield s
    s.stop()


@dataclass
class Basic:
    """Two replicas, a round-robin router and a gateway: shared by the tests that only read."""

    replicas: list[Replica]
    router: Router
    gateway: Gateway


@pytest.fixture(scope="module")
def basic(request: pytest.FixtureRequest) -> Iterator[Basic]:
    s = Stack(f"{request.module.__name__}-basic")
    try:
        replicas = [s.replica("r1"), s.replica("r2")]
        router = s.router(replicas)
        gateway = s.gateway([router], replicas)
        yield Basic(replicas, router, gateway)
    finally:
        s.stop()


CHAT = {"model": "mock", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}


def mock_reply(n: int) -> str:
    """What the mock engine answers CHAT with in n greedy tokens (its output depends on every previous token)."""
    from replicas.mock_engine import greedy_text, prompt_ids
    return greedy_text(prompt_ids(True, CHAT), n)


def check_completions(client: openai.OpenAI, model: str) -> None:
    """The openai SDK's completions, non-streaming and streaming with usage: greedy, the same text both ways."""
    reply = client.completions.create(model=model, prompt="hello world", max_tokens=8, temperature=0)
    assert reply.choices[0].text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=model, prompt="hello world", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text


G = TypeVar("G", bound=Gateway)


def start_ray_gateway(stack: Any, name: str, *extra: str, cls: type[G] = Gateway) -> G:  # type: ignore[assignment]
    """A gateway discovering from a RayStack's head, in the stack's env (forward body on, as Ray's HAProxy is
    configured there); its log is LOG_DIR/ray-NAME-gateway-PORT.log."""
    port = free_port()
    log_path = f"{LOG_DIR}/ray-{name}-gateway-{port}.log"
    if os.path.exists(log_path):
        os.unlink(log_path)
    argv = python_module("gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                         "--ray-address", stack.address, "--log-level", "info", *extra)
    child = Child(argv, port=port, env=stack.env(), log_path=log_path).start(deadline_s=60)
    return cls(port, child, log_path)


def assert_bench_complete(results: dict[str, dict], bench: dict) -> None:
    """Every `vllm bench serve` run answered every prompt in full: no failure, every output token."""
    for label, result in results.items():
        assert result["failed"] == 0, f"{label}: {result['failed']} failed, e.g. {result['first_errors']}"
        assert result["completed"] == bench["num_prompts"], label
        assert result["total_output_tokens"] == bench["num_prompts"] * bench["output_len"], label


# Real vLLM servers shared by the vLLM modules (tests/vllm_servers.py). A module marked
# `vllm_servers(MODEL, COUNT)` takes its servers from the `vllm_servers` fixture; nothing here starts vLLM
# unless such a test runs (the default suite deselects them with the `vllm` marker).

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules that share a model's vLLM servers run one after another, at the place of the first, models in
    the order they first appear: only one model's servers are up at a time (memory: at most 3 servers, as when
    each module had its own), and none of them sits idle through the unrelated modules in between."""
    from tests.vllm_servers import need

    first = next((i for i, item in enumerate(items) if need(item)), None)
    if first is None:
        return
    shared = [item for item in items if need(item)]
    order = list(dict.fromkeys(need(item)[0] for item in shared))  # type: ignore[index]
    shared.sort(key=lambda item: order.index(need(item)[0]))  # type: ignore[index]  # stable: modules stay whole
    rest = [item for item in items if not need(item)]
    items[:] = rest[:first] + shared + rest[first:]


_VLLM_POOL = pytest.StashKey[Any]()  # the session's VllmPool, for the teardown hook below


@pytest.fixture(scope="session")
def vllm_pool(request: pytest.FixtureRequest) -> Iterator[Any]:
    from tests.vllm_servers import VllmPool, need

    sizes: dict[str, int] = {}
    for item in request.session.items:
        if wanted := need(item):
            sizes[wanted[0]] = max(sizes.get(wanted[0], 0), wanted[1])
    pool = VllmPool(bench_vllm, LOG_DIR, sizes)
    request.config.stash[_VLLM_POOL] = pool
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def vllm_servers(request: pytest.FixtureRequest, vllm_pool: Any) -> list:
    """The module's real vLLM servers, as its `vllm_servers(MODEL, COUNT)` marker asks: live and idle."""
    from tests.vllm_servers import need

    wanted = need(request.node)
    assert wanted, f"{request.module.__name__}: mark the module with pytest.mark.vllm_servers(MODEL, COUNT)"
    return vllm_pool.take(*wanted)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After the last test of a run of modules on one model (their module fixtures are gone by then), that
    model's servers stop: the next model's start on a machine without them."""
    yield
    pool = item.config.stash.get(_VLLM_POOL, None)
    if pool is None:
        return
    from tests.vllm_servers import need

    wanted = need(item)
    if wanted and (nextitem is None or need(nextitem) is None or need(nextitem)[0] != wanted[0]):
        pool.release(wanted[0])
