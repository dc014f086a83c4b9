"""TTFT on one local Ray cluster: straight to a replica vs Ray's HAProxy+Lua ingress vs the gateway.

    .venv/bin/python scripts/bench_ray.py [--requests 200] [--concurrency 1 8] [--max-tokens 16]

One private Ray head (gateway.stacks.ray.RayStack), the mock Serve app with Ray's
real LLMRouter (round robin, 2 replicas), Ray's own HAProxy frontend
(RAY_SERVE_ENABLE_HA_PROXY=1, FORWARD_BODY=1) and the gateway discovering the same app.
The same streaming chat request goes to:

  direct   a replica's direct-ingress port (no routing at all: the floor)
  haproxy  Ray's HAProxy frontend: Lua asks LLMRouter (new TCP connection per request), then relays
  gateway  the gateway: asks LLMRouter over pooled connections, then relays
  (router_call: LLMRouter's POST /internal/route alone over a pooled connection, for reference)

TTFT here = request start to the first SSE event's bytes at the client. Rounds
rotate the order of the three paths so drift in machine load (shared 2-core box)
hits them alike. `direct` alternates over both replicas, as the routed paths spread load. Prints a markdown table: p50/p90 TTFT, the TTFT each path adds
over direct, and gateway_added / haproxy_added (goal <= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway.stacks.procs import Child, free_port, python_module
from gateway.stacks.ray import RayStack

PATHS = ("direct", "haproxy", "gateway")
# Not a path to the model: LLMRouter's POST /internal/route alone, to show how much of "added" is the router.
ROUTER = "router_call"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def route_only(client: httpx.AsyncClient, url: str, body: bytes) -> float:
    """One LLMRouter decision over a pooled connection: the floor any router-consulting proxy pays."""
    started = time.perf_counter()
    response = await client.post(url, content=body, headers={"content-type": "application/json"})
    if response.status_code != 200:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]!r}")
    return time.perf_counter() - started


async def one(client: httpx.AsyncClient, url: str | list[str], body: bytes) -> float:
    if isinstance(url, list):  # direct: spread over the replicas client-side, as the routed paths do
        url.append(url.pop(0))
        url = url[0]
    if url.endswith("/internal/route"):
        return await route_only(client, url, body)
    started = time.perf_counter()
    async with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:200]!r}")
        first = None
        async for chunk in response.aiter_raw():
            if first is None and b"data:" in chunk:
                first = time.perf_counter() - started
        if first is None:
            raise RuntimeError(f"{url}: no SSE event")
    return first


async def run_batch(url: str | list[str], body: bytes, n: int, concurrency: int) -> list[float]:
    # Room for one keep-alive connection per worker per host (direct alternates over two hosts).
    limits = httpx.Limits(max_connections=2 * concurrency, max_keepalive_connections=2 * concurrency)
    results: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=30.0, trust_env=False) as client:
        for _ in range(min(10, n)):  # warm the connections (and the pools behind them)
            await one(client, url, body)
        queue = list(range(n))

        async def worker() -> None:
            while queue:
                queue.pop()
                results.append(await one(client, url, body))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def bench(urls: dict[str, object], body: bytes, requests: int, concurrency: int, rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in urls}
    per_round = max(1, requests // rounds)
    for index in range(rounds):
        order = list(urls)[index % len(urls):] + list(urls)[:index % len(urls)]
        for name in order:
            samples[name] += await run_batch(urls[name], body, per_round, concurrency)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per path and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=4, help="rounds rotating the path order")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", default="", help="also write the raw figures here")
    args = parser.parse_args()

    stack = RayStack(draining_s=2.0)
    gateway = None
    try:
        t0 = time.monotonic()
        stack.start()
        deployed = stack.deploy("--policy", "round_robin", "--replicas", "2")
        setup_s = time.monotonic() - t0
        port = free_port()
        gateway = Child(python_module("gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                                      "--ray-address", stack.address, "--no-access-log", "--log-level", "warning"),
                        port=port, env=stack.env(), log_path=os.path.join(stack.root, "gateway.log")).start(60)
        replicas = [line.split()[0] for line in deployed["targets"]]
        router = deployed["routers"][0].split()[0]
        urls = {
            "direct": [f"http://{replica}/v1/chat/completions" for replica in replicas],
            ROUTER: f"http://{router}/internal/route",
            "haproxy": f"http://127.0.0.1:{stack.http_port}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{port}/v1/chat/completions",
        }
        body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "Hello there, how are you?"}],
                           "max_tokens": args.max_tokens, "stream": True}).encode()
        rows, raw = [], {"setup_s": round(setup_s, 1), "deployed": deployed, "results": {}}
        for concurrency in args.concurrency:
            samples = asyncio.run(bench(urls, body, args.requests, concurrency, args.rounds))
            stats = {name: {"p50": statistics.median(v) * 1e3, "p90": pct(v, 90) * 1e3, "n": len(v)}
                     for name, v in samples.items()}
            raw["results"][concurrency] = stats
            base = stats["direct"]
            added = {name: {q: stats[name][q] - base[q] for q in ("p50", "p90")} for name in PATHS}
            for name in PATHS:
                s, a = stats[name], added[name]
                rows.append(f"| {concurrency} | {name} | {s['n']} | {s['p50']:.2f} | {s['p90']:.2f} | "
                            + ("-" if name == "direct" else f"{a['p50']:+.2f}") + " | "
                            + ("-" if name == "direct" else f"{a['p90']:+.2f}") + " |")
            r = stats[ROUTER]
            rows.append(f"| {concurrency} | ({ROUTER}: LLMRouter /internal/route alone, pooled) | {r['n']} | "
                        f"{r['p50']:.2f} | {r['p90']:.2f} | | |")
            ratio = {q: (added["gateway"][q] / added["haproxy"][q]) if added["haproxy"][q] > 0 else float("nan")
                     for q in ("p50", "p90")}
            raw["results"][concurrency]["ratio"] = ratio
            rows.append(f"| {concurrency} | **gateway_added / haproxy_added** | | | | "
                        f"**{ratio['p50']:.2f}** | **{ratio['p90']:.2f}** |")
        print(f"\nTTFT (ms), streaming chat, max_tokens={args.max_tokens}, {args.requests} requests per cell, "
              f"2 mock replicas on a local Ray head, Ray LLMRouter round robin, forward body on\n")
        print("| concurrency | path | n | p50 | p90 | added p50 vs direct | added p90 vs direct |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(raw, handle, indent=1)
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        stack.shutdown_serve(timeout_s=30)
        stack.stop()
        stack.cleanup()


if __name__ == "__main__":
    sys.exit(main())
