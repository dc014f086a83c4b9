"""Keys' limits for a whole Ray cluster, on one local Ray head: three gateway processes share one quota ledger.

The three-node version (`gateway ray deploy`, a real minute) is in tests/test_multinode.py; this one runs the
same protocol in seconds (--token-minute-s 10) and kills the ledger actor under load.

    .venv/bin/pytest -m ray tests/test_quota_ray.py -v
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
from gateway.stacks.ray import RayStack
from tests.conftest import CHAT, Gateway, start_ray_gateway, wait_until

pytestmark = pytest.mark.ray

KEYS = {"tpm": "sk-quota-tpm-0123456789", "rps": "sk-quota-rps-0123456789", "conc": "sk-quota-conc-0123456789"}
LIMITS = {"tpm": "tokens_per_minute = 600\n", "rps": "rps = 4\nburst = 4\n", "conc": "max_in_flight = 2\n"}
MINUTE_S = 10.0


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


def ledger_up(gateway: Gateway) -> float:
    metrics = httpx.get(f"{gateway.url}/-/metrics", headers={"authorization": f"Bearer {KEYS['tpm']}"}, timeout=5).text
    for line in metrics.splitlines():
        if line.startswith("gateway_quota_ledger_up "):
            return float(line.split()[1])
    return -1.0


def ledger_call(stack: RayStack, what: str) -> dict:
    """The ledger actor's info(), or kill it (for good, or for Ray to restart), from a driver of our own."""
    script = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
              "a = ray.get_actor('gateway-quota-ledger', namespace='gateway'); ") % stack.address
    script += {"kill": "ray.kill(a, no_restart=True); print('{}')", "restart": "ray.kill(a, no_restart=False); print('{}')",
               "info": "print(json.dumps(ray.get(a.info.remote())))"}[what]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **stack.env()}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayStack, list[Gateway]]]:
    stack = RayStack(draining_s=2.0)
    gateways: list[Gateway] = []
    keys_file = tmp_path_factory.mktemp("quota") / "keys.toml"
    keys_file.write_text("".join(f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key).hex()}"\n{LIMITS[name]}\n'
                                 for name, key in KEYS.items()))
    try:
        stack.start()
        stack.deploy("--replicas", "2", "--itl-ms", "20")
        for index in range(3):
            gateways.append(start_ray_gateway(stack, f"quota{index}", "--api-keys-file", str(keys_file),
                                              "--token-minute-s", str(MINUTE_S), "--token-state-file",
                                              str(keys_file.parent / f"t{index}.json")))
        for gateway in gateways:
            wait_until(lambda: ledger_up(gateway) == 1.0, 60, 0.2, "the gateway to reach the quota ledger")
        yield stack, gateways
    finally:
        for gateway in gateways:
            gateway.child.stop()
        stack.stop()


def test_limits_hold_for_the_cluster_and_survive_the_ledger(cluster: tuple[RayStack, list[Gateway]]) -> None:
    stack, gateways = cluster
    urls = [gateway.url for gateway in gateways]
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    tpm = Driver(urls, KEYS["tpm"], {**stream, "max_tokens": 20})
    rps = Driver(urls, KEYS["rps"], {**stream, "max_tokens": 2})
    conc = Driver(urls, KEYS["conc"], {**stream, "max_tokens": 15})
    with tpm, rps, conc:
        start = time.monotonic()
        time.sleep(MINUTE_S * 2)  # the load runs for two windows; measured below from what the threads saw
        window = start + MINUTE_S / 2, start + MINUTE_S * 1.5
        served = sum(tokens for *_, tokens in tpm.between(*window))
        assert 600 * 0.5 <= served <= 600 * 1.1, served  # one window's budget for three gateways, not three
        requests = len(rps.between(*window))
        assert 4 * MINUTE_S * 0.5 <= requests <= 4 * MINUTE_S * 1.1 + 4, requests
        assert most_at_once(conc.ok) <= 2
        assert tpm.refused and rps.refused and conc.refused  # every gateway was driven past its key's limits
        figures = {"tokens_served_in_a_window": served, "limit": 600, "requests_in_a_window": requests,
                   "rps_limit_x_window": 4 * MINUTE_S, "most_at_once": most_at_once(conc.ok)}
        # The ledger actor is killed and Ray restarts it (max_restarts=-1): it reads its state back from the GCS store.
        old = ledger_call(stack, "info")
        ledger_call(stack, "restart")
        restarted = wait_until(lambda: (info := ledger_call(stack, "info"))["pid"] != old["pid"] and info, 60, 0.5,
                               "Ray to restart the ledger")
        assert restarted["restored"]
        # Then it dies for good (no restart): the gateways fall back to an equal share, requests keep flowing, and
        # the next gateway to look starts a new ledger from the state saved in the GCS store.
        killed_at = time.monotonic()
        old = restarted
        ledger_call(stack, "kill")
        time.sleep(MINUTE_S)
        assert tpm.between(killed_at, killed_at + MINUTE_S) and rps.between(killed_at, killed_at + MINUTE_S)
        for gateway in gateways:
            wait_until(lambda: ledger_up(gateway) == 1.0, 30, 0.2, "the gateways back on the ledger")
        new = ledger_call(stack, "info")
        assert new["pid"] != old["pid"] and new["restored"]
        back = time.monotonic()
        time.sleep(MINUTE_S * 1.5)
        served = sum(tokens for *_, tokens in tpm.between(back + MINUTE_S / 2, back + MINUTE_S * 1.5))
        figures["tokens_served_in_a_window_after_the_ledger_came_back"] = served
        print("\nquota figures:", figures)
        assert served <= 600 * 1.1, served  # cluster-wide again
    assert not tpm.errors and not rps.errors and not conc.errors, (tpm.errors, rps.errors, conc.errors)
    logs = "".join(gateway.log() for gateway in gateways)
    assert "quota ledger reached" in logs and "quota ledger unreachable" in logs
    # `gateway keys usage --ray-address` sums every gateway's counts.
    out = subprocess.run([sys.executable, "-m", "gateway", "keys", "usage", "--ray-address", stack.address, "--json"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **stack.env()},
                         check=True).stdout
    report = json.loads(out)
    assert report["gateways"] == 3
    assert report["keys"]["tpm"]["mock"]["since_start"]["total_tokens"] >= sum(t for *_, t in tpm.ok) * 0.9
