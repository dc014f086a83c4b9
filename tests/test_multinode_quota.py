"""Keys' limits on a three-node Ray cluster deployed with `gateway ray deploy`: they hold for the cluster.

A key with tokens_per_minute T, one with rps R and one with max_in_flight M, each driven through all three
nodes' gateways at once for a minute: served at most T x 1.1 tokens, R x 60 x 1.1 (+ burst) requests, and never
more than M at once. Then the quota ledger actor is killed for good mid-run: requests keep flowing (each gateway
on an equal share), a new ledger starts from the state it kept in the GCS store, and for the next minute the
limits hold for the cluster again.

    flock /tmp/heavy.lock .venv/bin/pytest -m multinode tests/test_multinode_quota.py -v -s
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("ray", reason="needs the [ray] extra: ray[serve]==2.60.0")
pytest.importorskip("pyarrow", reason="Ray's LLMRouter import needs pyarrow")

from gateway.security.keys import digest_of
from gateway.stacks.cluster import RayCluster
from tests.conftest import CHAT, wait_until
from tests.test_multinode import gateway_cli, gateway_pids
from tests.test_quota_ray import Driver, ledger_call, most_at_once

pytestmark = pytest.mark.multinode

PORT = 18471
MINUTE_S = 60.0
T, R, M = 3000, 2.0, 2
KEYS = {"tpm": "sk-mn-tpm-0123456789", "rps": "sk-mn-rps-0123456789", "conc": "sk-mn-conc-0123456789"}
LIMITS = {"tpm": f"tokens_per_minute = {T}\n", "rps": f"rps = {R}\nburst = {R}\n", "conc": f"max_in_flight = {M}\n"}


def ledger_up(ip: str) -> float:
    import httpx

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
        killed_at = time.monotonic()
        ledger_call(Nodes(cluster), "kill")  # type: ignore[arg-type]
        time.sleep(10)
        figures["after_kill_10s"] = {"tokens": sum(t for *_, t in tpm.between(killed_at, killed_at + 10)),
                                     "requests": len(rps.between(killed_at, killed_at + 10))}
        for ip in cluster.ips:
            wait_until(lambda: ledger_up(ip) == 1.0, 60, 0.5, "the gateways back on a ledger")
        back = time.monotonic()
        time.sleep(MINUTE_S)
        figures["minute_after_the_ledger_came_back"] = {
            "tokens": sum(t for *_, t in tpm.between(back, back + MINUTE_S)),
            "requests": len(rps.between(back, back + MINUTE_S))}
        peak_after = most_at_once([item for item in conc.ok if item[0] >= back])
        figures["minute_after_the_ledger_came_back"]["most_at_once"] = peak_after
    print("\nmultinode quota figures:", json.dumps(figures))
    assert T * 0.5 <= figures["minute_1"]["tokens"] <= T * 1.1
    assert figures["minute_1"]["requests"] <= R * 60 * 1.1 + R
    assert figures["minute_1"]["most_at_once"] <= M
    assert figures["after_kill_10s"]["tokens"] > 0 and figures["after_kill_10s"]["requests"] > 0
    assert figures["minute_after_the_ledger_came_back"]["tokens"] <= T * 1.1
    assert figures["minute_after_the_ledger_came_back"]["requests"] <= R * 60 * 1.1 + R
    assert peak_after <= M
    assert not tpm.errors and not rps.errors and not conc.errors, (tpm.errors, rps.errors, conc.errors)
