#!/usr/bin/env python
"""Admission under overload (issue 22): one key floods, another key's (or band's) first token, side by side.

    .venv/bin/python scripts/bench_admission.py                       # every scenario, ~6 min
    .venv/bin/python scripts/bench_admission.py --scenarios keys --duration 20 --out bench-results/admission

Rig: mock vLLM replicas (``replicas.mock_engine``) with a fixed capacity (``--max-num-seqs``: that many
completions generate at once, the rest wait in the engine's FIFO, as vLLM's scheduler does) and the
development router (``replicas.router``), on the load core with the load generator; the proxy on its own core
(``taskset``): the gateway, or HAProxy+Lua rendered by Ray 2.60's own code (``scripts/haproxy_ray.py``, as in
``scripts/bench.py``). A request generates ``--tokens`` (uniform) tokens after ``--ttft-ms``, ``--itl-ms`` apart,
so the replicas serve about capacity = replicas x slots / mean duration requests per second.

Scenarios (each phase ``--duration`` s, open loop, exponential inter-arrival times from a fixed seed):

* ``keys``: key B alone at ``--b-rate`` (unloaded), then B again while key A sends ``--flood-x`` times the
  capacity. Through the gateway (admission on: ``--saturation-in-flight`` = slots, a queue, fairness across keys)
  and through HAProxy+Lua (what Ray runs today: every request reaches an engine and waits in its FIFO).
  Reported: B's time to first token (p50, p99) and errors; A's requests served, shed with 429 and a reason
  (with Retry-After), or failed otherwise.
* ``bands``: the same through the gateway, with a high-priority key at ``--b-rate`` and a low-priority key
  flooding: the high band's TTFT against its unloaded value, and every low request accounted for.
* ``cost``: nothing saturated (``--cost-users`` closed-loop users, well under capacity): the gateway with
  admission configured and without, in slices ABBA; requests per second, latency and proxy CPU per request.

Every client request has a ``--client-timeout-s`` deadline (a client giving up counts as an error). The
machine this runs on may be shared: the report says which CPUs each side had and how busy the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import uvloop  # noqa: E402

import haproxy_ray  # noqa: E402
from benchkit import procstats  # noqa: E402
from gateway.security.keys import digest_of  # noqa: E402
from gateway.stacks.procs import Child, free_port  # noqa: E402

perf = time.perf_counter
KEYS = {"A": "sk-bench-a-0123456789", "B": "sk-bench-b-0123456789", "low": "sk-bench-low-0123456789",
        "high": "sk-bench-high-0123456789"}
PRIORITY = {"high": 10}


# --------------------------------------------------------------------------- processes

class Rig:
    def __init__(self, args: argparse.Namespace, out: Path):
        self.a = args
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.env = {"PYTHONPATH": str(ROOT)}

    def start(self, name: str, argv: list[str], port: int | None, cpu: str) -> Child:
        child = Child(["taskset", "-c", cpu, *argv], port=port, env=self.env, log_path=str(self.logs / f"{name}.log"))
        child.start(30)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop(timeout=5)
        self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout=5)
        self.children.clear()

    def upstreams(self) -> tuple[tuple[str, int], list[tuple[str, str, int]]]:
        reps = []
        for i in range(self.a.replicas):
            port = free_port()
            rid = haproxy_ray.ray_replica_id(i)
            self.start(f"replica{i}", [sys.executable, "-m", "replicas.mock_engine", "--port", str(port),
                                       "--replica-id", rid, "--max-num-seqs", str(self.a.slots),
                                       "--ttft-ms", str(self.a.ttft_ms), "--itl-ms", str(self.a.itl_ms)],
                       port, self.a.upstream_cpu or self.a.load_cpu)
            reps.append((rid, "127.0.0.1", port))
        rport = free_port()
        argv = [sys.executable, "-m", "replicas.router", "--port", str(rport), "--health-interval-s", "0"]
        for rid, host, port in reps:
            argv += ["--replica", f"{rid}=http://{host}:{port}"]
        self.start("router", argv, rport, self.a.upstream_cpu or self.a.load_cpu)
        return ("127.0.0.1", rport), reps

    def gateway(self, name: str, router: tuple[str, int], reps: list, extra: list[str]) -> Child:
        port = free_port()
        argv = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--router",
                f"http://{router[0]}:{router[1]}", "--api-keys-file", str(self.keys_file()),
                "--access-log" if self.a.access_log else "--no-access-log"]
        for rid, host, rport in reps:
            argv += ["--replica", f"{rid}=http://{host}:{rport}"]
        return self.start(name, argv + extra, port, self.a.proxy_cpu)

    def haproxy(self, router: tuple[str, int], reps: list) -> Child:
        port = free_port()
        work = self.out / "haproxy"
        rendered = haproxy_ray.render(work, port, router, reps, free_port(), free_port())
        sock = work / "metrics.sock"
        if sock.exists():
            sock.unlink()
        # Ray's HAProxyManager reads HAProxy's per-request metrics datagrams; a discard sink stands in for it.
        self.start("haproxy-metrics-sink", haproxy_ray.sink_argv(str(sock)), None, self.a.load_cpu)
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.start("haproxy", rendered.argv(), port, self.a.proxy_cpu)

    def keys_file(self) -> Path:
        path = self.out / "keys.toml"
        path.write_text("".join(f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key).hex()}"\n'
                                f'priority = {PRIORITY.get(name, 0)}\n\n' for name, key in KEYS.items()))
        return path


# --------------------------------------------------------------------------- load

@dataclass
class Result:
    key: str
    status: int = 0
    reason: str = ""
    retry_after: bool = False
    ttft: float = 0.0
    total: float = 0.0
    error: str = ""


def payload(rng: random.Random, args: argparse.Namespace) -> bytes:
    low, high = args.tokens
    return json.dumps({"model": "mock", "prompt": "hello admission", "max_tokens": rng.randint(low, high),
                       "stream": True}).encode()


async def one(port: int, key: str, body: bytes, timeout_s: float, keep: bool = False,
              conn: list | None = None) -> Result:
    """One streamed completion; TTFT is the first SSE event after the head. A new connection unless `conn`."""
    result = Result(key)
    started = perf()
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer %s\r\ncontent-length: %d\r\n%s\r\n"
            % (KEYS.get(key, "none").encode(), len(body), b"" if keep else b"connection: close\r\n"))
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            if conn:
                reader, writer = conn
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if conn is not None:
                    conn[:] = [reader, writer]
            writer.write(head + body)
            response_head = await reader.readuntil(b"\r\n\r\n")
            result.status = int(response_head.split(b" ", 2)[1])
            for line in response_head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"x-serve-reason":
                    result.reason = value.strip().decode()
                elif name == b"retry-after":
                    result.retry_after = True
                elif name == b"content-length":
                    await reader.readexactly(int(value))
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep = False
            if result.status == 200:
                buf = b""
                while not buf.endswith(b"0\r\n\r\n"):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    if not result.ttft and b"data: {" in chunk:
                        result.ttft = perf() - started
                    buf = (buf + chunk)[-16:]
                if not result.ttft:
                    result.error = "no events"
    except TimeoutError:
        result.error = "client_timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = type(exc).__name__
    result.total = perf() - started
    if writer is not None and (not keep or result.error):
        writer.close()
        if conn:
            conn.clear()
    return result


class Pool:
    """Idle keep-alive client connections of one load stream: a request takes one or opens one (as an SDK's
    connection pool does); a connection goes back after a whole answer, so shed requests cost no handshake."""

    def __init__(self) -> None:
        self.idle: list[list] = []

    async def send(self, port: int, key: str, body: bytes, timeout_s: float) -> Result:
        conn = self.idle.pop() if self.idle else []
        result = await one(port, key, body, timeout_s, keep=True, conn=conn)
        if conn:
            self.idle.append(conn)
        return result


async def open_loop(port: int, key: str, rate: float, duration: float, seed: int, args: argparse.Namespace,
                    results: list[Result]) -> None:
    rng = random.Random(seed)
    pool = Pool()
    tasks = []
    end = perf() + duration
    nxt = perf()
    while True:
        nxt += rng.expovariate(rate)
        if nxt >= end:
            break
        await asyncio.sleep(max(0.0, nxt - perf()))
        tasks.append(asyncio.create_task(pool.send(port, key, payload(rng, args), args.client_timeout_s)))
    results.extend(await asyncio.gather(*tasks))
    for conn in pool.idle:
        conn[1].close()


def summary(results: list[Result]) -> dict:
    ok = [r for r in results if r.status == 200 and not r.error]
    ttfts = sorted(r.ttft * 1000 for r in ok)
    shed: dict[str, int] = {}
    for r in results:
        if r.status == 429:
            shed[r.reason or "?"] = shed.get(r.reason or "?", 0) + 1
    errors: dict[str, int] = {}
    for r in results:
        if r.error or r.status not in (200, 429):
            label = r.error or f"{r.status} {r.reason}".strip()
            errors[label] = errors.get(label, 0) + 1
    return {
        "sent": len(results),
        "ok": len(ok),
        "shed_429": shed,
        "shed_with_retry_after": sum(1 for r in results if r.status == 429 and r.retry_after),
        "errors": errors,
        "ttft_p50_ms": round(statistics.median(ttfts), 1) if ttfts else None,
        "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1) if ttfts else None,
        "ttft_max_ms": round(ttfts[-1], 1) if ttfts else None,
        "ttfts_ms": [round(t, 1) for t in ttfts] if len(ttfts) <= 200 else None,
    }


def capacity(args: argparse.Namespace) -> float:
    mean_tokens = sum(args.tokens) / 2
    mean_s = args.ttft_ms / 1000 + args.itl_ms / 1000 * (mean_tokens - 1)
    return args.replicas * args.slots / mean_s


async def flood_phase(port: int, quiet: str, noisy: str | None, args: argparse.Namespace, seed: int) -> dict:
    quiet_results: list[Result] = []
    noisy_results: list[Result] = []
    jobs = [open_loop(port, quiet, args.b_rate, args.duration, seed, args, quiet_results)]
    if noisy is not None:
        jobs.append(open_loop(port, noisy, args.flood_x * capacity(args), args.duration, seed + 1, args,
                              noisy_results))
    await asyncio.gather(*jobs)
    out = {quiet: summary(quiet_results)}
    if noisy is not None:
        out[noisy] = summary(noisy_results)
    return out


async def wait_ready(port: int) -> None:
    """The proxy answers a completion (its health checks have marked the replicas up): no sleep-and-hope."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = await one(port, "B", b'{"model":"mock","prompt":"x","max_tokens":1,"stream":true}', 5)
        if result.status == 200 and not result.error:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"proxy on {port} never served a request")


# --------------------------------------------------------------------------- cost (nothing saturated)

def cpu_seconds(pid: int) -> float:
    return procstats.cpu_seconds(procstats.proc_tree(pid))


async def closed_loop(port: int, users: int, duration: float, args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    end = perf() + duration

    async def user(seed: int) -> None:
        rng = random.Random(seed)
        conn: list = []
        while perf() < end:
            body = json.dumps({"model": "mock", "prompt": "hi", "max_tokens": 16, "stream": True,
                               "ttft_ms": 0, "itl_ms": args.cost_itl_ms}).encode()
            results.append(await one(port, "B", body, args.client_timeout_s, keep=True, conn=conn))
            rng.random()
        if conn:
            conn[1].close()

    await asyncio.gather(*(user(i) for i in range(users)))
    return results


# --------------------------------------------------------------------------- main

def queue_metrics(port: int) -> dict:
    """The gateway's own count of requests that waited in its queue, and how long in all, per key."""
    import urllib.request
    request = urllib.request.Request(f"http://127.0.0.1:{port}/-/metrics",
                                     headers={"authorization": f"Bearer {KEYS['A']}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    out: dict = {}
    for line in text.splitlines():
        for name in ("gateway_queue_wait_seconds_count", "gateway_queue_wait_seconds_sum"):
            if line.startswith(name + "{"):
                key = line.split('key="', 1)[1].split('"', 1)[0]
                out.setdefault(key, {})[name.rsplit("_", 1)[1]] = round(float(line.split()[-1]), 3)
    return out


def fmt(value: object) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="keys,bands,cost")
    ap.add_argument("--systems", default="gateway,haproxy", help="for the keys scenario")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--slots", type=int, default=16, help="each replica's --max-num-seqs")
    ap.add_argument("--ttft-ms", type=float, default=300.0)
    ap.add_argument("--itl-ms", type=float, default=20.0)
    ap.add_argument("--tokens", type=lambda s: tuple(int(x) for x in s.split(":")), default=(15, 45),
                    help="max_tokens per request, uniform LOW:HIGH")
    ap.add_argument("--target", type=int, default=12, help="the gateway's --saturation-in-flight per replica")
    ap.add_argument("--burst", type=int, default=4, help="the gateway's --saturation-burst per replica")
    ap.add_argument("--b-rate", type=float, default=1.0, help="the quiet key's requests per second")
    ap.add_argument("--flood-x", type=float, default=10.0, help="the noisy key's rate, in multiples of capacity")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--queue-timeout-s", type=float, default=10.0)
    ap.add_argument("--client-timeout-s", type=float, default=30.0)
    ap.add_argument("--cost-users", type=int, default=8)
    ap.add_argument("--cost-itl-ms", type=float, default=5.0)
    ap.add_argument("--cost-slices", type=int, default=4, help="slices per system (ABBA order)")
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    ap.add_argument("--upstream-cpu", default="", help="replicas and router (default: --load-cpu)")
    ap.add_argument("--access-log", action="store_true")
    ap.add_argument("--out", default="bench-results/admission")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    scenarios = args.scenarios.split(",")
    rig = Rig(args, out)
    report: dict = {"args": {k: v for k, v in vars(args).items()}, "capacity_rps": round(capacity(args), 1),
                    "results": {}}
    gateway_admission = ["--saturation-in-flight", str(args.target), "--saturation-burst", str(args.burst),
                         "--queue-size", str(args.queue_size), "--queue-timeout-s", str(args.queue_timeout_s)]
    loop = uvloop.new_event_loop()
    try:
        router, reps = rig.upstreams()
        if "keys" in scenarios:
            for system in args.systems.split(","):
                proxy = rig.gateway("gateway", router, reps, gateway_admission) if system == "gateway" \
                    else rig.haproxy(router, reps)
                port = proxy.port
                assert port is not None
                loop.run_until_complete(wait_ready(port))
                print(f"[keys/{system}] B alone ...", flush=True)
                unloaded = loop.run_until_complete(flood_phase(port, "B", None, args, 1))
                print(f"[keys/{system}] B while A floods at {args.flood_x:g}x capacity ...", flush=True)
                loaded = loop.run_until_complete(flood_phase(port, "B", "A", args, 2))
                report["results"][f"keys/{system}"] = {"unloaded": unloaded, "loaded": loaded}
                if system == "gateway":
                    report["queued_in_gateway"] = {"keys": queue_metrics(port)}
                print(json.dumps(report["results"][f"keys/{system}"], indent=1), flush=True)
                rig.stop(proxy)
        if "bands" in scenarios:
            proxy = rig.gateway("gateway-bands", router, reps, gateway_admission)
            port = proxy.port
            assert port is not None
            loop.run_until_complete(wait_ready(port))
            print("[bands/gateway] high alone ...", flush=True)
            unloaded = loop.run_until_complete(flood_phase(port, "high", None, args, 3))
            print(f"[bands/gateway] high while low floods at {args.flood_x:g}x capacity ...", flush=True)
            loaded = loop.run_until_complete(flood_phase(port, "high", "low", args, 4))
            report["results"]["bands/gateway"] = {"unloaded": unloaded, "loaded": loaded}
            report.setdefault("queued_in_gateway", {})["bands"] = queue_metrics(port)
            print(json.dumps(report["results"]["bands/gateway"], indent=1), flush=True)
            rig.stop(proxy)
        if "cost" in scenarios:
            systems = {"admission on": gateway_admission, "admission off": []}
            proxies = {name: rig.gateway("gateway-" + name.replace(" ", "-"), router, reps, extra)
                       for name, extra in systems.items()}
            for proxy in proxies.values():
                loop.run_until_complete(wait_ready(proxy.port))  # type: ignore[arg-type]
            order = []
            for _ in range(args.cost_slices // 2 or 1):
                order += ["admission on", "admission off", "admission off", "admission on"]
            totals = {name: {"requests": 0, "cpu_s": 0.0, "wall_s": 0.0, "latencies": [], "errors": 0, "slices": []}
                      for name in systems}
            for name in order:
                proxy = proxies[name]
                loop.run_until_complete(closed_loop(proxy.port, args.cost_users, 2.0, args))  # warm-up
                cpu0, t0 = cpu_seconds(proxy.pid), perf()
                results = loop.run_until_complete(closed_loop(proxy.port, args.cost_users, args.duration / 2, args))
                cpu1, t1 = cpu_seconds(proxy.pid), perf()
                total = totals[name]
                ok = [r for r in results if r.status == 200 and not r.error]
                total["requests"] += len(ok)
                total["errors"] += len(results) - len(ok)
                total["cpu_s"] += cpu1 - cpu0
                total["wall_s"] += t1 - t0
                total["latencies"] += [r.total * 1000 for r in ok]
                total["slices"].append((round(len(ok) / (t1 - t0), 1), round((cpu1 - cpu0) / max(1, len(ok)) * 1e6, 1)))
                print(f"[cost] {name}: {len(ok) / (t1 - t0):.0f} req/s, {(cpu1 - cpu0) / max(1, len(ok)) * 1e6:.0f} "
                      f"us CPU/request", flush=True)
            cost = {}
            for name, total in totals.items():
                lat = sorted(total["latencies"])
                cost[name] = {
                    "requests_per_s": round(total["requests"] / total["wall_s"], 1),
                    "cpu_us_per_request": round(total["cpu_s"] / max(1, total["requests"]) * 1e6, 1),
                    # Per slice, so one slice slowed by a neighbour on a shared machine shows as such.
                    "median_slice_cpu_us_per_request": statistics.median(c for _, c in total["slices"]),
                    "slices_rps_cpu_us": total["slices"],
                    "latency_p50_ms": round(statistics.median(lat), 2) if lat else None,
                    "latency_p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
                    "errors": total["errors"],
                }
            report["results"]["cost"] = cost
            print(json.dumps(cost, indent=1), flush=True)
            for proxy in proxies.values():
                rig.stop(proxy)
    finally:
        rig.stop_all()
        loop.close()
    report["load_avg"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Admission under overload (capacity ~{report['capacity_rps']} req/s: {args.replicas} replica(s) x "
             f"{args.slots} slots, TTFT {args.ttft_ms:g} ms, {args.tokens[0]}-{args.tokens[1]} tokens "
             f"{args.itl_ms:g} ms apart; gateway target {args.target} + burst {args.burst} per replica; "
             f"flood {args.flood_x:g}x capacity; proxy on CPU {args.proxy_cpu}, load generator on CPU {args.load_cpu}, "
             f"replicas and router on CPU {args.upstream_cpu or args.load_cpu}; load average at the end {report['load_avg'][0]:.1f})", ""]
    for name, value in report["results"].items():
        if name == "cost":
            lines += ["| nothing saturated | req/s | CPU us/request (all) | median slice | slices (req/s, us) | "
                      "p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {system} | {v['requests_per_s']} | {v['cpu_us_per_request']} | "
                      f"{v['median_slice_cpu_us_per_request']} | {v['slices_rps_cpu_us']} | {fmt(v['latency_p50_ms'])} | "
                      f"{fmt(v['latency_p99_ms'])} | {v['errors']} |" for system, v in value.items()]
            continue
        lines += [f"## {name}", "", "| phase | key | sent | ok | 429 (reason) | 429 with Retry-After | other errors | "
                  "TTFT p50 ms | TTFT p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
        for phase, keys in value.items():
            for key, s in keys.items():
                lines.append(f"| {phase} | {key} | {s['sent']} | {s['ok']} | {s['shed_429'] or '-'} | "
                             f"{s['shed_with_retry_after']} | {s['errors'] or '-'} | {fmt(s['ttft_p50_ms'])} | "
                             f"{fmt(s['ttft_p99_ms'])} |")
        quiet = next(iter(value["unloaded"]))
        base, loaded = value["unloaded"][quiet]["ttft_p99_ms"], value["loaded"][quiet]["ttft_p99_ms"]
        if base and loaded:
            lines += ["", f"{quiet}'s TTFT p99 loaded / unloaded: **{loaded / base:.2f}x**"]
        lines.append("")
    if report.get("queued_in_gateway"):
        lines += ["Requests that waited in the gateway's queue (count, total seconds), by key: "
                  + json.dumps(report["queued_in_gateway"]), ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
