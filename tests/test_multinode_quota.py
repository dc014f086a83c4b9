"""Keys' limits on a three-node Ray cluster deployed with `gateway ray deploy`: they hold for the cluster.

A key with tokens_per_minute T, one with rps R and one with max_in_flight M, each driven through all three
nodes' gateways at once for a minute: served at most T x 1.1 tokens, R x 60 x 1.1 (+ burst) requests, and never
more than M at once. Then the quota ledger actor is killed under load and Ray restarts it: it reads its state back
from the GCS store. Then it is killed for good: requests keep flowing (each gateway on an equal share), a new
ledger starts from the state it kept, and for the next minute the limits hold for the cluster again.
`gateway keys usage --ray-address` sums the three gateways' counts.

    flock /tmp/heavy.lock .venv/bin/pytest -m multinode tests/test_multinode_quota.py -v -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("ray", reason="needs the [ray] extra: ray[serve]==2.60.0")
pytest.importorskip("pyarrow", reason="Ray's LLMRouter import needs pyarrow")

from gateway.security.keys import digest_of
from gateway.stacks.cluster import RayCluster
from tests.conftest import CHAT, wait_until
from tests.test_multinode import gateway_cli, gateway_pids

pytestmark = pytest.mark.multinode

PORT = 18471
MINUTE_S = 60.0
T, R, M = 3000, 2.0, 2
KEYS = {"tpm": "sk-mn-tpm-0123456789", "rps": "sk-mn-rps-0123456789", "conc": "sk-mn-conc-0123456789"}
LIMITS = {"tpm": f"tokens_per_minute = {T}\n", "rps": f"rps = {R}\nburst = {R}\n", "conc": f"max_in_flight = {M}\n"}


# The window measured once the ledger is back: a whole minute. Right after the kill the gateways' equal shares
# spend what the first minute left (2,470 tokens in 10 s in one run), so a shorter window can read 0 and prove little.
AFTER_S = MINUTE_S


class Driver:
    """Threads sending one key's requests through every gateway as fast as answers come; counts what was served."""

    def __init__(self, urls: list[str], key: str, body: dict, per_url: int = 2) -> None:
        self.key, self.body = key, body
        self.lock = threading.Lock()
        self.ok: list[tuple[float, float, int]] = []  # (first byte, end, tokens) of each 200
        self.refused = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(url,), daemon=True) for url in urls
                        for _ in range(per_url)]

    def run(self, url: str) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    with client.stream("POST", url + "/v1/chat/completions", json=self.body,
                                       headers=headers) as response:
                        lines = response.iter_lines()
                        first = None
                        text = []
                        for line in lines:
                            first = first or time.monotonic()
                            text.append(line)
                        end = time.monotonic()
                    if response.status_code == 200:
                        usage = next(l for l in reversed(text) if '"usage"' in l)
                        tokens = json.loads(usage[6:])["usage"]["total_tokens"]
                        with self.lock:
                            self.ok.append((first or end, end, tokens))
                    elif response.status_code == 429:
                        with self.lock:
                            self.refused += 1
                        self.stop.wait(0.05)
                    else:
                        self.errors.append(f"{response.status_code}")
                except (httpx.HTTPError, StopIteration, ValueError) as exc:
                    self.errors.append(repr(exc))

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        with self.lock:
            return [item for item in self.ok if start <= item[1] < end]

    def __enter__(self) -> "Driver":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def most_at_once(served: list[tuple[float, float, int]], margin_s: float = 0.03) -> int:
    events = sorted([(first, 1) for first, _, _ in served] + [(end - margin_s, -1) for _, end, _ in served])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def ledger_call(stack: "Nodes", what: str) -> dict:
    """The ledger actor's info(), or kill it (for good, or for Ray to restart), from a driver of our own."""
    script = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
              "a = ray.get_actor('gateway-quota-ledger', namespace='gateway'); ") % stack.address
    script += {"kill": "ray.kill(a, no_restart=True); print('{}')", "restart": "ray.kill(a, no_restart=False); print('{}')",
               "info": "print(json.dumps(ray.get(a.info.remote())))"}[what]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **stack.env()}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ledger_up(ip: str) -> float:
    text = httpx.get(f"http://{ip}:{PORT}/-/metrics", headers={"authorization": f"Bearer {KEYS['tpm']}"},
                     timeout=5).text
    return next((float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("gateway_quota_ledger_up ")), -1.0)


class Nodes:
    def __init__(self, ray: RayCluster):
        self.ray = ray
        self.address = ray.address

    def env(self) -> dict[str, str]:
        return self.ray.head.env()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    keys_file = tmp_path_factory.mktemp("mnquota") / "keys.toml"
    keys_file.write_text("".join(f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key).hex()}"\n{LIMITS[name]}\n'
                                 for name, key in KEYS.items()))
    ray_cluster = RayCluster(draining_s=2.0)
    try:
        ray_cluster.start()
        ray_cluster.deploy("--name", "llm", "--replicas", "3", "--model", "mock", "--itl-ms", "20")
        gateway_cli("deploy", "--ray-address", ray_cluster.address, "--port", str(PORT), "--forward-body",
                    "--log-level", "info", "--api-keys-file", str(keys_file))
        for ip in ray_cluster.ips:
            wait_until(lambda: ledger_up(ip) == 1.0, 60, 0.5, f"the gateway on {ip} to reach the quota ledger")
        yield ray_cluster
    finally:
        try:
            if ray_cluster.nodes and gateway_pids():
                gateway_cli("remove", "--ray-address", ray_cluster.address, timeout_s=90)
        finally:
            ray_cluster.stop()


def test_a_keys_limits_hold_for_the_cluster_for_a_minute_and_after_the_ledger_dies(cluster: RayCluster) -> None:
    urls = [f"http://{ip}:{PORT}" for ip in cluster.ips]
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    tpm = Driver(urls, KEYS["tpm"], {**stream, "max_tokens": 20})
    rps = Driver(urls, KEYS["rps"], {**stream, "max_tokens": 2})
    conc = Driver(urls, KEYS["conc"], {**stream, "max_tokens": 15})
    figures: dict = {}
    with tpm, rps, conc:
        start = time.monotonic()
        time.sleep(MINUTE_S)
        served = sum(tokens for *_, tokens in tpm.between(start, start + MINUTE_S))
        requests = len(rps.between(start, start + MINUTE_S))
        figures["minute_1"] = {"tokens": served, "T": T, "requests": requests, "R_x_60": R * 60,
                               "most_at_once": most_at_once(conc.ok), "M": M}
        nodes = Nodes(cluster)
        # Killed, and restarted by Ray (max_restarts=-1): it reads its state back from the GCS store.
        old = ledger_call(nodes, "info")
        ledger_call(nodes, "restart")
        restarted = wait_until(lambda: (info := ledger_call(nodes, "info"))["pid"] != old["pid"] and info, 60, 0.5,
                               "Ray to restart the ledger")
        figures["restarted_restored"] = restarted["restored"]
        # Killed for good: the gateways fall back to an equal share, and the next one to look starts a new ledger.
        killed_at = time.monotonic()
        ledger_call(nodes, "kill")
        time.sleep(10)
        figures["after_kill_10s"] = {"tokens": sum(t for *_, t in tpm.between(killed_at, killed_at + 10)),
                                     "requests": len(rps.between(killed_at, killed_at + 10))}
        for ip in cluster.ips:
            wait_until(lambda: ledger_up(ip) == 1.0, 60, 0.5, "the gateways back on a ledger")
        figures["new_ledger_restored"] = ledger_call(nodes, "info")["restored"]
        back = time.monotonic()
        time.sleep(AFTER_S)
        figures["after_the_ledger_came_back"] = {
            "seconds": AFTER_S, "tokens": sum(t for *_, t in tpm.between(back, back + AFTER_S)),
            "requests": len(rps.between(back, back + AFTER_S)),
            "most_at_once": most_at_once([item for item in conc.ok if item[0] >= back])}
    print("\nmultinode quota figures:", json.dumps(figures))
    assert T * 0.5 <= figures["minute_1"]["tokens"] <= T * 1.1
    assert figures["minute_1"]["requests"] <= R * 60 * 1.1 + R
    assert figures["minute_1"]["most_at_once"] <= M
    assert tpm.refused and rps.refused and conc.refused  # every key was driven past its limits
    assert figures["restarted_restored"] and figures["new_ledger_restored"]
    assert figures["after_kill_10s"]["tokens"] > 0 and figures["after_kill_10s"]["requests"] > 0
    after = figures["after_the_ledger_came_back"]
    assert after["tokens"] <= T * 1.1
    assert after["requests"] <= R * AFTER_S * 1.1 + R
    assert after["most_at_once"] <= M
    assert not tpm.errors and not rps.errors and not conc.errors, (tpm.errors, rps.errors, conc.errors)
    # `gateway keys usage --ray-address` sums every gateway's counts.
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "usage", "--ray-address", cluster.address, "--json"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **nodes.env()},
                         check=True).stdout
    report = json.loads(out)
    assert report["gateways"] == len(cluster.ips)
    assert report["keys"]["tpm"]["mock"]["since_start"]["total_tokens"] >= sum(t for *_, t in tpm.ok) * 0.9
