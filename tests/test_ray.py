"""The gateway in front of a real local Ray Serve app with Ray's own LLMRouter.

One private Ray head (gateway.stacks.ray.RayStack: own temp dir, own ports, stopped
by its own PIDs) and one Serve app for the whole module; the tests run in file
order because the last ones redeploy, kill, scale to zero and add a WebSocket app.

    .venv/bin/pytest -m ray tests/test_ray.py -v
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

pytest.importorskip("ray", reason="needs the [ray] extra: ray[serve]==2.60.0")
pytest.importorskip("pyarrow", reason="Ray's LLMRouter import needs pyarrow")

from gateway.stacks.ray import RayStack
from tests.conftest import CHAT, Gateway, start_ray_gateway, wait_until

pytestmark = pytest.mark.ray

URL = "/v1/chat/completions"


@dataclass
class RayGateway(Gateway):
    started_s: float = 0.0

    def replica_ids(self) -> set[str]:
        return {t["replica_id"] for t in self.routes()["targets"]}

    def router_decisions(self) -> float:
        for line in self.metrics().splitlines():
            if line.startswith("gateway_router_latency_seconds_count"):
                return float(line.split()[-1])
        return 0.0


def start_gateway(stack: RayStack, name: str, *extra: str) -> RayGateway:
    started = time.monotonic()
    gateway = start_ray_gateway(stack, name, *extra, cls=RayGateway)
    gateway.started_s = time.monotonic() - started
    return gateway


@dataclass
class Cluster:
    stack: RayStack
    deployed: dict
    gateway: RayGateway
    figures: dict


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    stack = RayStack(draining_s=2.0)
    figures: dict = {}
    gateway = None
    try:
        t0 = time.monotonic()
        stack.start()
        figures["ray_start_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        deployed = stack.deploy("--policy", "consistent_hash", "--replicas", "2")
        figures["deploy_s"] = round(time.monotonic() - t0, 1)
        gateway = start_gateway(stack, "main")
        figures["gateway_ready_s"] = round(gateway.started_s, 2)
        yield Cluster(stack, deployed, gateway, figures)
    finally:
        print("\nray test figures:", json.dumps(figures))
        if gateway is not None:
            gateway.child.stop()
        stack.shutdown_serve(timeout_s=30)
        stack.stop()
        stack.cleanup()


def chat(client: httpx.Client, base: str, headers: dict | None = None, stream: bool = False,
         timeout: float = 10.0) -> httpx.Response:
    return client.post(base + URL, json={**CHAT, "stream": stream}, headers=headers or {}, timeout=timeout)


class Load:
    """Steady sequential traffic in a thread: (time, status, replica) per request."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                try:
                    response = chat(client, self.base, stream=True)
                    # The replica that answered; for the gateway's own errors, the failure reason instead.
                    self.results.append((time.monotonic(), response.status_code,
                                         response.headers.get("x-replica-id")
                                         or response.headers.get("x-serve-reason", "")))
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), 0, type(exc).__name__))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def process_titles(stack: RayStack, prefix: str) -> list[str]:
    """Ray sets worker process titles (`ray::ServeReplica:<app>:<deployment>`): count replicas from /proc."""
    from gateway.stacks.procs import descendants

    found = []
    for pid in descendants(stack.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().split(b"\0")[0].decode("utf-8", "replace")
        except OSError:
            continue
        if title.startswith(prefix):
            found.append(title)
    return found


# ---------------------------------------------------------------------------------------------- tests
def test_gateway_discovers_app(cluster: Cluster) -> None:
    routes = cluster.gateway.routes()
    expected = {line.split()[1] for line in cluster.deployed["targets"]}
    assert {t["replica_id"] for t in routes["targets"]} == expected
    assert {t["address"] for t in routes["targets"]} == {line.split()[0] for line in cluster.deployed["targets"]}
    assert routes["routers"] == [line.split()[0] for line in cluster.deployed["routers"]]
    assert routes["fallback"] is not None and routes["fallback"]["replica_id"].startswith("SERVE_PROXY_ACTOR-fallback")
    # The health checks went to /-/healthz and passed.
    assert all(t["healthy"] for t in routes["targets"])
    assert "ray discovery: app 'llm'" in cluster.gateway.log()


def test_a_stopped_discovery_never_starts_a_ray_cluster_of_its_own(cluster: Cluster, tmp_path) -> None:
    """After Ray discovery stops (ray.shutdown()), a Ray call still on its way (a quota-ledger sync in a thread)
    fails instead of making Ray start a local cluster, which would also write ~/.ray/auth_token and turn token
    auth on for every cluster started later on the machine (seen in CI: later deploys got InvalidAuthToken)."""
    script = (
        "import asyncio, sys\n"
        "from gateway.config import Config\n"
        "from gateway.controlplane.ray_discovery import RayDiscovery\n"
        "async def main():\n"
        "    discovery = RayDiscovery(Config(ray_address=sys.argv[1]))\n"
        "    await discovery.start()\n"
        "    await discovery.stop()\n"
        "asyncio.run(main())\n"
        "import ray\n"
        "from gateway.controlplane.ledger import ledger_actor\n"
        "try:\n"
        "    ledger_actor(ray)  # what a quota-ledger sync calls\n"
        "    print('started a local cluster')\n"
        "except Exception as exc:\n"
        "    print('refused:', type(exc).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script, cluster.stack.address], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **cluster.stack.env(), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("refused:"), done.stdout
    assert not (tmp_path / ".ray" / "auth_token").exists()


def test_openai_sdk_through_ray_router(cluster: Cluster) -> None:
    from openai import OpenAI

    gw = cluster.gateway
    before = gw.router_decisions()
    client = OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=5, stream=True)
    deltas = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    from replicas.mock_engine import greedy_text, prompt_ids
    assert "".join(d for d in deltas if d) == greedy_text(prompt_ids(True, CHAT), 5)
    raw = client.chat.completions.with_raw_response.create(model="mock", messages=CHAT["messages"], max_tokens=3)
    completion = raw.parse()
    assert completion.choices[0].message.content == greedy_text(prompt_ids(True, CHAT), 3)
    assert raw.headers["x-replica-id"] in gw.replica_ids()
    # Both POSTs were decided by Ray's LLMRouter (/internal/route), not by a local pick.
    assert gw.router_decisions() >= before + 2


def test_session_stickiness_consistent_hash(cluster: Cluster) -> None:
    gw = cluster.gateway
    pinned: dict[str, str] = {}
    with httpx.Client() as client:
        for n in range(16):
            session = f"sess-{n}"
            seen = collections.Counter()
            for header in ("x-session-id", "x_session_id"):
                for _ in range(3):
                    response = chat(client, gw.url, {header: session})
                    assert response.status_code == 200, response.text
                    seen[response.headers["x-replica-id"]] += 1
            assert len(seen) == 1, f"{session} was served by {dict(seen)}"
            pinned[session] = next(iter(seen))
    # The ring spreads sessions over both replicas.
    assert set(pinned.values()) == gw.replica_ids()


def test_redeploy_traffic_follows(cluster: Cluster) -> None:
    gw, stack = cluster.gateway, cluster.stack
    old = gw.routes()["targets"]
    old_ids = {t["replica_id"] for t in old}
    with Load(gw.url) as load:
        t0 = time.monotonic()
        deployed = stack.deploy("--policy", "consistent_hash", "--replicas", "2", "--tag", "v2")
        deployed_at = time.monotonic()
        new_ids = {line.split()[1] for line in deployed["targets"]}
        assert not new_ids & old_ids
        wait_until(lambda: gw.replica_ids() == new_ids, 20, 0.05, "the gateway to follow the redeploy")
        followed_at = time.monotonic()
        # New traffic lands on the new replicas only.
        wait_until(lambda: load.results and load.results[-1][2] in new_ids, 10, 0.05, "traffic on new replicas")
        mark = time.monotonic()
        wait_until(lambda: sum(1 for r in load.results if r[0] > mark) >= 20, 20, 0.05, "20 requests after the move")
    after = [r for r in load.results if r[0] > mark]
    assert all(status == 200 and replica in new_ids for _, status, replica in after), after
    during = [r for r in load.results if t0 <= r[0] <= mark]
    failures = collections.Counter(status for _, status, _ in during if status != 200)
    cluster.figures["redeploy"] = {"deploy_s": round(deployed_at - t0, 1),
                                   "follow_after_deploy_returned_s": round(followed_at - deployed_at, 2),
                                   "requests_during": len(during), "failures_during": dict(failures)}
    # The old replicas' per-replica series left /-/metrics with them (Ray's churn must not grow the series).
    metrics = gw.metrics()
    assert not [line for line in metrics.splitlines() if any(f'"{rid}"' in line for rid in old_ids)]
    new_ports = {t["address"] for t in gw.routes()["targets"]}
    assert not new_ports & {t["address"] for t in old}, "Ray moves ports on a redeploy"
    # The gateway process never restarted.
    assert gw.child.alive()
    # Most requests during the roll succeed (the old replicas drain, the router moves).
    assert len(failures) == 0 or sum(failures.values()) <= max(3, len(during) // 10), failures


def read_stream(url: str, body: dict, expected: str, outcomes: list[object]) -> None:
    """One streamed chat completion: True in `outcomes` when its text is `expected` and its usage counts every token
    asked for, else False or the name of the error that cut it."""
    text, usage = "", None
    try:
        with httpx.Client(timeout=60) as client, client.stream("POST", url + URL, json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    usage = event.get("usage") or usage
                    text += "".join(c["delta"].get("content") or "" for c in event["choices"])
        outcomes.append(text == expected and usage is not None and usage["completion_tokens"] == body["max_tokens"])
    except httpx.HTTPError as exc:
        outcomes.append(type(exc).__name__)


def long_streams(url: str, count: int = 4) -> tuple[list[threading.Thread], list[object]]:
    """`count` greedy streams of 20 s (500 tokens, 40 ms apart: longer than a redeploy, ~7 s, plus Ray's graceful
    shutdown, draining 2 s + 5 s), each read by read_stream in its own thread, started."""
    from replicas.mock_engine import greedy_text, prompt_ids

    body = {**CHAT, "stream": True, "max_tokens": 500, "itl_ms": 40, "stream_options": {"include_usage": True}}
    expected = greedy_text(prompt_ids(True, body), 500)
    outcomes: list[object] = []
    threads = [threading.Thread(target=read_stream, args=(url, body, expected, outcomes), daemon=True)
               for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def resumes(gw: Gateway, outcome: str) -> float:
    """gateway_resumes_total{outcome}: 0 before the first."""
    return sum(float(line.split()[-1]) for line in gw.metrics().splitlines()
               if line.startswith(f'gateway_resumes_total{{outcome="{outcome}"}}'))


def test_redeploy_with_resume_keeps_long_streams_whole(cluster: Cluster) -> None:
    """Streams longer than Ray's graceful shutdown (draining + 5 s) outlive their replica: resumed, not cut."""
    gw = start_gateway(cluster.stack, "resume", "--resume-limit", "3")
    try:
        threads, outcomes = long_streams(gw.url)
        old = gw.replica_ids()
        deployed = cluster.stack.deploy("--policy", "consistent_hash", "--replicas", "2", "--tag", "v3")
        new_ids = {line.split()[1] for line in deployed["targets"]}
        assert not new_ids & old
        for thread in threads:
            thread.join(90)
        resumed = resumes(gw, "resumed")
        cluster.figures["redeploy_with_resume"] = {"streams": len(outcomes), "resumed": resumed}
        # 0 client-visible failures, every text exact. (Whether Ray's graceful shutdown cut any of them, so
        # that they were resumed, depends on its timing: recorded in the figures, not asserted.)
        assert outcomes == [True] * 4, outcomes
    finally:
        gw.child.stop()


def test_redeploy_migrates_long_streams_off_the_old_replicas(cluster: Cluster) -> None:
    """Drain by migration (issue 23): once a redeploy takes the old replicas out of the target groups, their
    streams move to the new replicas after --drain-migrate-after-s, long before Ray's graceful shutdown would
    have cut them, and every client reads one stream whose text is the uninterrupted answer."""
    gw = start_gateway(cluster.stack, "migrate", "--resume-limit", "1", "--drain-migrate-after-s", "1")
    try:
        threads, outcomes = long_streams(gw.url)
        old = gw.replica_ids()
        wait_until(lambda: gw.get_json("/-/routes")["in_flight"] == 4, 20, what="four streams under way")
        t0 = time.monotonic()
        deployed = cluster.stack.deploy("--policy", "consistent_hash", "--replicas", "2", "--tag", "v4")
        new_ids = {line.split()[1] for line in deployed["targets"]}
        wait_until(lambda: not gw.replica_ids() & old, 60, 0.05, "the old replicas leave the target set")
        for thread in threads:
            thread.join(90)
        # Serve replaces replicas one at a time: a stream may move twice (to an old replica that leaves next).
        # Each move follows its replica's removal from the target set by --drain-migrate-after-s.
        stamps = [(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line) for line in
                  gw.log().splitlines() if line[:2] == "20" and (" replicas (+" in line or "streams moved" in line)]
        delays, removed_at = [], None
        for at, line in stamps:
            if " replicas (+" in line and " -0)" not in line:
                removed_at = at
            elif "streams moved" in line and removed_at is not None:
                delays.append(round(at - removed_at, 2))
        cluster.figures["redeploy_with_migration"] = {
            "streams": len(outcomes), "migrated": resumes(gw, "migrated"), "resumed": resumes(gw, "resumed"),
            "moved_after_removal_s": delays, "streams_ended_after_s": round(time.monotonic() - t0, 1)}
        print("\nredeploy with migration:", cluster.figures["redeploy_with_migration"])
        assert gw.replica_ids() == new_ids
        assert outcomes == [True] * 4, outcomes
        # Moved ~1 s after their replica left, not cut by Ray's graceful shutdown (draining 2 s + 5 s) and resumed.
        assert resumes(gw, "migrated") >= 4 and resumes(gw, "resumed") == 0
        assert delays and all(delay < 1 + 2 for delay in delays), delays
    finally:
        gw.child.stop()


def test_all_routers_killed_requests_go_to_the_fallback_proxy(cluster: Cluster) -> None:
    """Issue 22: no router answering is no outage. Every LLMRouter process is SIGKILLed (a crash); until Ray has
    replaced them, the gateway sends POSTs to the app's fallback Serve proxy (the default in Ray mode)."""
    import os
    import signal

    from gateway.stacks.procs import descendants

    gw, stack = cluster.gateway, cluster.stack

    def fallbacks() -> float:
        return sum(float(line.split()[-1]) for line in gw.metrics().splitlines()
                   if line.startswith("gateway_router_fallbacks_total{"))

    routers = []
    for pid in descendants(stack.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if handle.read().startswith(b"ray::ServeReplica:llm:LLMRouter"):
                    routers.append(pid)
        except OSError:
            continue
    assert routers, "no LLMRouter process found"
    with Load(gw.url) as load:
        wait_until(lambda: len(load.results) >= 5, 10, 0.05, "load to start")
        for pid in routers:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: fallbacks() >= 10, 60, 0.1, "requests through the fallback proxy")
        wait_until(lambda: sum(1 for r in load.results if r[0] > killed_at) >= 30, 60, 0.05, "more traffic")
    since_kill = [r for r in load.results if r[0] > killed_at]
    assert [r for r in since_kill if r[1] != 200] == []
    cluster.figures["routers_killed"] = {"routers": len(routers), "requests_since_kill": len(since_kill),
                                         "fallbacks": fallbacks()}
    assert '"router_fallback":"router_unreachable"' in gw.log()
    # Ray replaces the routers; decisions come from them again.

    def decided_by_a_router() -> bool:
        before = fallbacks()
        with httpx.Client() as client:
            return chat(client, gw.url).status_code == 200 and fallbacks() == before

    wait_until(decided_by_a_router, 120, 0.5, "Ray's new routers deciding")


def test_killed_replica_stops_receiving(cluster: Cluster) -> None:
    gw, stack = cluster.gateway, cluster.stack
    ids = sorted(gw.replica_ids())
    victim = ids[0]
    with Load(gw.url) as load:
        wait_until(lambda: len(load.results) >= 5, 10, 0.05, "load to start")
        kill_started = time.monotonic()
        stack.serve_app("kill", victim, timeout_s=60)  # a driver process: ray.kill(actor, no_restart=True)
        killed_at = time.monotonic()
        wait_until(lambda: victim not in gw.replica_ids(), 30, 0.1, "Ray to withdraw the killed replica")
        withdrawn_at = time.monotonic()
        wait_until(lambda: sum(1 for r in load.results if r[0] > withdrawn_at + 1) >= 50, 30, 0.05, "more traffic")
    since_kill = [r for r in load.results if r[0] > kill_started]
    # Every request succeeds (a refused connect marks the replica down and the request is redispatched), except
    # at most one in the moment of the kill (the load is sequential): the stream in flight on the victim, cut
    # (a transport error at the client), or a named 503 while Ray's router still settles (its own 503, or a
    # decision for the dying replica). Never a clean but wrong answer.
    failed = [r for r in since_kill if r[1] != 200]
    window_failures = {"RemoteProtocolError", "ReadError", "router_non_200", "replica_unavailable"}
    assert len(failed) <= 1 and all(reason in window_failures for _, _, reason in failed), failed
    later = [r for r in load.results if r[0] > withdrawn_at]
    assert not [r for r in later if r[2] == victim]
    cluster.figures["kill"] = {"kill_call_s": round(killed_at - kill_started, 1),
                               "withdrawn_after_kill_call_s": round(withdrawn_at - killed_at, 1),
                               "requests_since_kill": len(since_kill),
                               "served_by_victim_after_kill_call": sum(1 for r in load.results
                                                                       if r[0] > killed_at and r[2] == victim)}
    # Ray replaces it; the gateway picks the newcomer up.
    wait_until(lambda: len(gw.replica_ids()) == 2, 40, 0.2, "the replacement replica")


def test_scale_to_zero_idle_then_wake(cluster: Cluster) -> None:
    stack = cluster.stack
    cluster.gateway.child.stop()  # leave only the fresh gateway below
    stack.deploy("--policy", "consistent_hash", "--replicas", "2", "--min-replicas", "0", "--tag", "zero",
                 "--downscale-to-zero-s", "600")
    wait_until(lambda: not process_titles(stack, "ray::ServeReplica:llm:MockLLMServer"), 30, 0.2,
               "the old replicas to stop")
    gw = start_gateway(stack, "zero")
    routes = gw.routes()
    assert routes["targets"] == [] and routes["routers"] == [] and routes["fallback"] is not None
    # Left idle (health checks running, no traffic): no replica starts.
    window_end = time.monotonic() + 20
    while time.monotonic() < window_end:
        assert not process_titles(stack, "ray::ServeReplica:llm:MockLLMServer"), "a replica started while idle"
        assert gw.routes()["targets"] == []
        time.sleep(0.5)
    status = stack.serve_app("status")
    assert status["deployments"]["MockLLMServer"].get("RUNNING", 0) == 0, status
    # The first real request goes to the fallback Serve proxy, wakes the app, and succeeds.
    t0 = time.monotonic()
    with httpx.Client() as client:
        response = chat(client, gw.url, stream=True, timeout=90)
    woke_s = time.monotonic() - t0
    assert response.status_code == 200, response.text
    assert response.text.rstrip().endswith("data: [DONE]")
    cluster.figures["scale_from_zero_first_request_s"] = round(woke_s, 1)
    wait_until(lambda: gw.routes()["targets"], 30, 0.2, "the woken replica to be published")
    # Later requests go direct through the router again.
    with httpx.Client() as client:
        response = chat(client, gw.url)
    assert response.status_code == 200
    assert response.headers["x-replica-id"] in gw.replica_ids()
    gw.child.stop()


def deploy_ws_app(stack: RayStack) -> str:
    done = subprocess.run([stack.python, "-m", "replicas.serve_ws_app", "--address", stack.address,
                           "--http-port", str(stack.http_port), "--route-prefix", "/ws"],
                          env={**os.environ, **stack.env()}, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()


# Last in this module: it adds an app to the cluster, which the tests above do not expect.
def test_a_serve_websocket_route_through_the_gateway_and_through_haproxy(cluster: Cluster) -> None:
    """A Ray Serve app with a WebSocket route (replicas/serve_ws_app.py's FastAPI app at /ws, next to the mock LLM
    app at /, whose prefix must not win over it), through the gateway and through Ray's own HAProxy (issue 23):
    the upgrade goes to the WebSocket app by route prefix, to one of its replicas, and the tunnel carries messages
    both ways, as Ray's HAProxy does."""
    from websockets.sync.client import connect

    stack = cluster.stack
    gateway = None
    try:
        print(deploy_ws_app(stack))
        gateway = start_gateway(stack, "ws")
        wait_until(lambda: "/ws" in gateway.routes().get("apps", gateway.routes()) or "/ws" in str(gateway.routes()),
                   deadline_s=30, what="the gateway discovers the WebSocket app")
        assert httpx.get(gateway.url + "/ws/hello", timeout=30).json()["replica"]
        for port, who in ((gateway.port, "gateway"), (stack.http_port, "haproxy")):
            seen = set()
            for _ in range(4):
                with connect(f"ws://127.0.0.1:{port}/ws/echo", proxy=None, open_timeout=30, max_size=None) as conn:
                    seen.add(conn.recv(timeout=30))
                    conn.send("over " + who)
                    assert conn.recv(timeout=30) == "over " + who
                    message = os.urandom(1 << 20)
                    conn.send(message)
                    assert conn.recv(timeout=30) == message
            print(who, "reached replicas", sorted(seen))
            assert seen and all(seen)
        # The LLM app at / still answers through the same gateway.
        assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
        assert 'gateway_tunnels_total{outcome="client_closed"} 4.0' in gateway.metrics()
    finally:
        if gateway is not None:
            gateway.child.stop()
