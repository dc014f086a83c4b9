#!/usr/bin/env python
"""Side-by-side benchmark: direct to a replica vs HAProxy+Lua (as Ray 2.60) vs the gateway.

One command from a fresh clone (after `pip install -e '.[test,bench,ray]'`)::

    .venv/bin/python scripts/bench.py                 # full sweep, ~14 min
    .venv/bin/python scripts/bench.py --quick         # a few points, < 3 min
    .venv/bin/python scripts/bench.py --smoke         # seconds; what tests/test_bench_quick.py runs
    .venv/bin/python scripts/bench.py --systems direct,haproxy --out bench-results/

Layout of one run (all processes in this process's session: no setsid, see DEVELOPERS.md):

* upstreams on core 1: ``replicas.router`` (POST /internal/route) and ``--replicas`` mock engines
  (``replicas.mock_engine``, itl 0, ~10 KB unary body);
* proxies on core 0 (``taskset``): HAProxy rendered by Ray 2.60's own templates and code
  (``scripts/haproxy_ray.py``, nbthread 1, Lua router call on a new TCP connection per POST),
  the gateway with 1 worker, and a 2-worker gateway point (``--gw2-cpus``, default ``0,1``, so it
  shares core 1 with the load generator: a scaling sanity check, not a clean measurement);
* the load generator runs in this process on core 1: raw asyncio Protocols on uvloop, httptools
  parsing, one keep-alive connection per concurrent user, closed loop.

Paced points (``--paced``, streams per replica x step ms) use the mock engine's ``step_ms`` mode, shaped like
vLLM's decode loop: one event per stream per engine step, every stream of a replica in the same step. They report
time to first token and inter-token gaps as the client sees them, and proxy CPU per stream.

Per (workload, concurrency) point every system runs ``--slices`` times, in the order
A B C .. then .. C B A, so slow drifts of a noisy machine hit every system alike. A slice is
``--warmup`` s (not counted) then ``--duration`` s measured; a request counts if it completes
inside the window. Proxy CPU = utime+stime from /proc/<pid>/stat summed over the proxy's process
tree (all workers) across the window, divided by requests completed in it. Direct has no proxy.

Outputs in ``--out``: results.md (also printed), results.csv, results.json, latency_throughput.png,
cpu_per_request.png, logs/ (every child's stdout/stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib.util
import json
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import httptools  # noqa: E402
import uvloop  # noqa: E402

import haproxy_ray  # noqa: E402
from gateway.stacks.procs import Child, descendants, free_port  # noqa: E402

perf = time.perf_counter
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

WORKLOADS = {
    # name: (stream, max_tokens)
    "unary": (False, 16),
    "stream50": (True, 50),
    "stream200": (True, 200),
}
SLA_MS = {"unary": 200.0, "stream50": 700.0, "stream200": 700.0}
COLORS = {"direct": "tab:blue", "haproxy": "tab:orange", "gateway": "tab:green", "gateway2": "tab:red",
          "gateway-resume": "tab:purple", "gateway-py": "tab:olive", "gateway-tokens": "tab:brown",
          "gateway-py-tokens": "tab:pink"}
SYSTEM_LABEL = {
    "direct": "direct",
    "haproxy": "HAProxy+Lua",
    "gateway": "gateway 1w",
    "gateway2": "gateway 2w",
    "gateway-resume": "gateway 1w, resume on",
    "gateway-py": "gateway 1w, Python relay",
    "gateway-tokens": "gateway 1w, token accounting on",
    "gateway-py-tokens": "gateway 1w, Python relay, token accounting on",
}
# The extra flags of a system that is the gateway with a feature on (its CPU cost, side by side).
SYSTEM_ARGS = {"gateway-resume": ["--resume-limit", "2"], "gateway-py": ["--no-native-relay"],
               "gateway-tokens": ["--token-accounting"], "gateway-py-tokens": ["--token-accounting", "--no-native-relay"]}
GATEWAY_SYSTEMS = ("gateway", "gateway2", *SYSTEM_ARGS)


# --------------------------------------------------------------------------- /proc helpers

def proc_tree(root: int) -> list[int]:
    """root and all its descendants (workers forked by a master)."""
    return [root, *descendants(root)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def busy_seconds() -> float:
    """CPU time all cores spent busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def foreign_probe() -> tuple[float, float]:
    """(all busy CPU, CPU of this process tree): their difference is load from processes not ours."""
    return busy_seconds(), cpu_seconds(proc_tree(os.getpid()))


def rss_bytes(pids: list[int]) -> dict[int, int]:
    out = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                out[p] = int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return out


# --------------------------------------------------------------------------- load generator

class ClientConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection, httptools-parsed."""

    __slots__ = ("parser", "transport", "waiter", "t_first", "status", "nbody", "events",
                 "tail", "count_events", "keep_alive", "closed")

    def __init__(self, count_events: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.count_events = count_events
        self.closed = False
        self.reset()

    def reset(self) -> None:
        self.t_first = 0.0
        self.status = 0
        self.nbody = 0
        self.events = 0
        self.tail = b""
        self.keep_alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.t_first:
            self.t_first = perf()
        self.nbody += len(body)
        if self.count_events:
            # carry 4 bytes: a "data:" split across two reads is counted once, never twice
            self.events += (self.tail[-4:] + body).count(b"data:")
            self.tail = (self.tail + body)[-24:]

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # only valid in here (httptools)
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_result(perf())

    def _fail(self, exc: BaseException) -> None:
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.transport = None
        self._fail(ConnectionError(f"connection lost: {exc}"))


def build_request(host: str, port: int, stream: bool, max_tokens: int, extra: dict | None = None) -> bytes:
    body = {"model": "mock", "messages": [{"role": "user", "content": "Say something."}],
            "stream": stream, "max_tokens": max_tokens, **(extra or {})}
    b = json.dumps(body, separators=(",", ":")).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Accept: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (host.encode(), port, b"text/event-stream" if stream else b"application/json", len(b), b))


@dataclass
class PhaseStats:
    completed: int = 0
    errors: int = 0
    error_samples: list = field(default_factory=list)
    lat: list = field(default_factory=list)
    ttfb: list = field(default_factory=list)
    events: list = field(default_factory=list)
    body_bytes: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0
    router_cpu_s: float = 0.0
    foreign_cpu_s: float = 0.0
    rss: int = 0


async def connect(addr: tuple[str, int], count_events: bool) -> ClientConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: ClientConn(count_events), addr[0], addr[1])
    return proto


async def run_phase(addrs: list[tuple[str, int]], stream: bool, max_tokens: int, users: int,
                    warmup: float, measure: float, cpu_root: int | None, extra: dict | None = None,
                    drain_s: float = 30.0, router_pid: int | None = None) -> PhaseStats:
    st = PhaseStats()
    reqs = [build_request(a[0], a[1], stream, max_tokens, extra) for a in addrs]
    pids = proc_tree(cpu_root) if cpu_root else []
    rpids = [router_pid] if router_pid else []
    window = [float("inf"), float("-inf")]
    stop_at = [float("inf")]

    async def user(i: int) -> None:
        addr = addrs[i % len(addrs)]
        req = reqs[i % len(addrs)]
        conn = None
        while perf() < stop_at[0]:
            try:
                if conn is None or conn.closed:
                    conn = await connect(addr, stream)
                conn.reset()
                fut = asyncio.get_running_loop().create_future()
                conn.waiter = fut
                t0 = perf()
                conn.transport.write(req)
                t1 = await fut
                ok = conn.status == 200 and (not stream or b"[DONE]" in conn.tail)
            except (OSError, ConnectionError, httptools.HttpParserError) as e:
                ok, t1 = False, perf()
                if len(st.error_samples) < 5:
                    st.error_samples.append(repr(e))
                conn = None
                await asyncio.sleep(0.01)
            if window[0] <= t1 <= window[1]:
                if ok:
                    st.completed += 1
                    st.body_bytes += conn.nbody
                    st.lat.append(t1 - t0)
                    if stream:
                        st.ttfb.append(conn.t_first - t0)
                        st.events.append(conn.events)
                else:
                    st.errors += 1
                    if conn is not None and len(st.error_samples) < 5:
                        st.error_samples.append(f"status={conn.status} tail={conn.tail!r}")
            if conn is not None and not conn.keep_alive and conn.transport is not None:
                conn.transport.close()
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    start = perf()
    tasks = [asyncio.create_task(user(i)) for i in range(users)]
    await asyncio.sleep(max(0.0, start + warmup - perf()))
    fb0, fo0 = foreign_probe()
    cpu0 = cpu_seconds(pids)
    rcpu0 = cpu_seconds(rpids)
    window[0] = perf()
    window[1] = float("inf")
    await asyncio.sleep(measure)
    window[1] = perf()
    cpu1 = cpu_seconds(pids)
    rcpu1 = cpu_seconds(rpids)
    fb1, fo1 = foreign_probe()
    stop_at[0] = window[1]
    st.foreign_cpu_s = max(0.0, (fb1 - fb0) - (fo1 - fo0))
    st.router_cpu_s = rcpu1 - rcpu0
    st.window_s = window[1] - window[0]
    st.cpu_s = cpu1 - cpu0
    st.rss = sum(rss_bytes(pids).values())
    _, pending = await asyncio.wait(tasks, timeout=drain_s)
    for t in pending:  # a request still open drain_s after the window: count it as failed
        t.cancel()
    if pending:
        st.errors += len(pending)
        st.error_samples.append(f"{len(pending)} requests still open {drain_s:.0f} s after the window")
    return st


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def summarize(system: str, workload: str, conc: int, parts: list[PhaseStats], has_proxy: bool) -> dict:
    lat = [x for p in parts for x in p.lat]
    ttfb = [x for p in parts for x in p.ttfb]
    ev = [x for p in parts for x in p.events]
    done = sum(p.completed for p in parts)
    win = sum(p.window_s for p in parts)
    cpu = sum(p.cpu_s for p in parts)
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    return {
        "system": system, "workload": workload, "concurrency": conc,
        "rps": round(done / win, 1) if win else 0.0,
        "p50_ms": ms(pct(lat, 50)), "p90_ms": ms(pct(lat, 90)), "p99_ms": ms(pct(lat, 99)),
        "ttfb_p50_ms": ms(pct(ttfb, 50)) if ttfb else None,
        "ttfb_p99_ms": ms(pct(ttfb, 99)) if ttfb else None,
        "cpu_us_per_req": round(cpu / done * 1e6, 1) if (has_proxy and done) else None,
        "proxy_cpu_util": round(cpu / win, 3) if (has_proxy and win) else None,
        "router_cpu_us_per_req": (round(sum(p.router_cpu_s for p in parts) / done * 1e6, 1)
                                  if (has_proxy and done) else None),
        "proxy_rss_mib": round(max(p.rss for p in parts) / 2**20, 1) if has_proxy else None,
        "events_per_stream": round(sum(ev) / len(ev), 1) if ev else None,
        "other_cpu_cores": round(sum(p.foreign_cpu_s for p in parts) / win, 2) if win else None,
        "bytes_per_resp": round(sum(p.body_bytes for p in parts) / done) if done else None,
        "completed": done, "errors": sum(p.errors for p in parts),
        "error_samples": [e for p in parts for e in p.error_samples][:5],
        "window_s": round(win, 3),
    }


# --------------------------------------------------------------------------- paced (decode-loop) streams

class PacedConn(ClientConn):
    """A client stream that timestamps every SSE event: time to first token and inter-token gaps."""

    __slots__ = ("acc", "t0", "t_last")

    def __init__(self, acc: "PacedAcc") -> None:
        super().__init__(False)
        self.acc = acc
        self.t0 = 0.0
        self.t_last = 0.0

    def reset(self) -> None:
        super().reset()
        self.t_last = 0.0

    def on_body(self, body: bytes) -> None:
        t = perf()
        acc = self.acc
        n = body.count(b"data: {")  # one per token event (httptools calls this per HTTP chunk); not [DONE]
        inside = acc.lo <= t <= acc.hi
        if not self.t_first:
            self.t_first = t
            if inside:
                acc.ttft.append(t - self.t0)
        elif n and inside:
            acc.gaps.append(t - self.t_last)
            if n > 1:
                acc.gaps.extend([0.0] * (n - 1))
        if n:
            self.t_last = t
            if inside:
                acc.events += n
        self.nbody += len(body)
        self.tail = (self.tail + body)[-24:]


@dataclass
class PacedAcc:
    lo: float = float("inf")
    hi: float = float("-inf")
    events: int = 0
    ttft: list = field(default_factory=list)
    gaps: list = field(default_factory=list)


def connect_options(addr: tuple[str, int]) -> dict:
    """Extra create_connection arguments for a paced client's connection (bench_tls.py: its TLS context)."""
    return {}


async def run_paced_phase(addrs: list[tuple[str, int]], users: int, step_ms: float, tokens: tuple[int, int],
                          warmup: float, measure: float, cpu_root: int | None, seed: int = 0) -> PhaseStats:
    """`users` closed-loop streams, each of tokens[0]..tokens[1] events, one event per engine step.

    A user's first stream is 1..tokens[1] long so that streams end (and new ones start) at a steady rate
    from the beginning, as on a busy engine, instead of all together. At the end of the window every
    connection is aborted rather than drained: a 256-token stream at 30 ms would take 8 s to finish."""
    rng = random.Random(seed)
    st = PhaseStats()
    acc = PacedAcc()
    pids = proc_tree(cpu_root) if cpu_root else []
    lengths = list(range(tokens[0], tokens[1] + 1))
    reqs = {(a, n): build_request(a[0], a[1], True, n, {"step_ms": step_ms})
            for a in addrs for n in range(1, tokens[1] + 1)}
    conns: list[PacedConn] = []
    loop = asyncio.get_running_loop()

    async def user(i: int) -> None:
        addr = addrs[i % len(addrs)]
        conn: PacedConn | None = None
        n = rng.randint(1, tokens[1])
        while True:
            try:
                if conn is None or conn.closed:
                    _, conn = await loop.create_connection(lambda: PacedConn(acc), addr[0], addr[1],
                                                           **connect_options(addr))
                    conns.append(conn)
                conn.reset()
                fut = loop.create_future()
                conn.waiter = fut
                conn.t0 = perf()
                conn.transport.write(reqs[(addr, n)])
                await fut
                ok = conn.status == 200 and b"[DONE]" in conn.tail
            except (OSError, ConnectionError, httptools.HttpParserError) as e:
                ok = False
                if len(st.error_samples) < 5:
                    st.error_samples.append(repr(e))
                conn = None
                await asyncio.sleep(0.01)
            t1 = perf()
            if acc.lo <= t1 <= acc.hi:
                if ok:
                    st.completed += 1
                else:
                    st.errors += 1
            if conn is not None and not conn.keep_alive and conn.transport is not None:
                conn.transport.close()
                conn = None
            n = rng.choice(lengths)

    tasks = [asyncio.create_task(user(i)) for i in range(users)]
    await asyncio.sleep(warmup)
    fb0, fo0 = foreign_probe()
    cpu0 = cpu_seconds(pids)
    acc.lo, acc.hi = perf(), float("inf")
    await asyncio.sleep(measure)
    acc.hi = perf()
    cpu1 = cpu_seconds(pids)
    fb1, fo1 = foreign_probe()
    for t in tasks:
        t.cancel()
    for c in conns:
        if c.transport is not None:
            c.transport.abort()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.3)  # let the proxies and engines see the aborts before the next slice starts
    st.foreign_cpu_s = max(0.0, (fb1 - fb0) - (fo1 - fo0))
    st.window_s = acc.hi - acc.lo
    st.cpu_s = cpu1 - cpu0
    st.rss = sum(rss_bytes(pids).values())
    st.ttfb = acc.ttft
    st.lat = acc.gaps
    st.events = [acc.events]
    return st


def summarize_paced(system: str, spr: int, step_ms: float, users: int, parts: list[PhaseStats],
                    has_proxy: bool, mean_tokens: float) -> dict:
    ttft = [x for p in parts for x in p.ttfb]
    gaps = [x for p in parts for x in p.lat]
    events = sum(p.events[0] for p in parts)
    win = sum(p.window_s for p in parts)
    cpu = sum(p.cpu_s for p in parts)
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    per_event = cpu / events if (has_proxy and events) else None
    return {
        "system": system, "workload": f"paced{step_ms:g}ms", "concurrency": users,
        "streams_per_replica": spr, "step_ms": step_ms,
        "events_per_s": round(events / win, 1) if win else 0.0,
        # what the client saw: the engine's step plus whatever the rig could not keep up with
        "itl_mean_ms": round(users * win / events * 1000, 2) if events else None,
        "ttfb_p50_ms": ms(pct(ttft, 50)) if ttft else None, "ttfb_p99_ms": ms(pct(ttft, 99)) if ttft else None,
        "gap_p50_ms": ms(pct(gaps, 50)) if gaps else None, "gap_p99_ms": ms(pct(gaps, 99)) if gaps else None,
        "cpu_us_per_event": round(per_event * 1e6, 2) if per_event is not None else None,
        "cpu_us_per_stream": round(per_event * mean_tokens * 1e6, 1) if per_event is not None else None,
        "proxy_cpu_util": round(cpu / win, 3) if (has_proxy and win) else None,
        "proxy_rss_mib": round(max(p.rss for p in parts) / 2**20, 1) if has_proxy else None,
        "completed": sum(p.completed for p in parts), "errors": sum(p.errors for p in parts),
        "error_samples": [e for p in parts for e in p.error_samples][:5],
        "other_cpu_cores": round(sum(p.foreign_cpu_s for p in parts) / win, 2) if win else None,
        "window_s": round(win, 3),
    }


# --------------------------------------------------------------------------- memory point

async def hold_streams(addr: tuple[str, int], n: int, root_pid: int, settle_s: float) -> dict:
    """Open n slow SSE streams through a proxy, report its RSS growth per stream."""
    pids = proc_tree(root_pid)
    # warm the proxy's pools first so idle RSS is not its cold-start footprint
    await run_phase([addr], True, 2, 16, 0.0, 1.0, None, extra={"itl_ms": 0}, drain_s=5.0)
    await asyncio.sleep(0.3)
    idle = rss_bytes(pids)
    req = build_request(addr[0], addr[1], True, 60_000, {"itl_ms": 1000})
    conns: list[ClientConn] = []
    sem = asyncio.Semaphore(64)

    async def open_one() -> None:
        async with sem:
            c = await connect(addr, False)
            c.waiter = asyncio.get_running_loop().create_future()
            c.waiter.add_done_callback(lambda f: f.exception())
            c.transport.write(req)
            conns.append(c)

    t0 = perf()
    await asyncio.gather(*[open_one() for _ in range(n)], return_exceptions=True)
    deadline = perf() + 60
    while perf() < deadline and sum(1 for c in conns if c.t_first) < len(conns):
        await asyncio.sleep(0.1)
    streaming = sum(1 for c in conns if c.t_first)
    await asyncio.sleep(settle_s)
    held = rss_bytes(proc_tree(root_pid))
    for c in conns:
        if c.transport is not None:
            c.transport.abort()
    delta = {p: held.get(p, 0) - idle.get(p, 0) for p in held}
    worker = max(delta, key=lambda p: delta[p]) if delta else root_pid
    return {
        "streams_requested": n, "streams_flowing": streaming, "open_s": round(perf() - t0, 2),
        "idle_rss_kib_total": sum(idle.values()) // 1024, "held_rss_kib_total": sum(held.values()) // 1024,
        "kib_per_stream_total": round(sum(delta.values()) / 1024 / max(1, streaming), 1),
        "worker_pid": worker,
        "worker_idle_rss_kib": idle.get(worker, 0) // 1024, "worker_held_rss_kib": held.get(worker, 0) // 1024,
        "kib_per_stream_worker": round(delta.get(worker, 0) / 1024 / max(1, streaming), 1),
    }


# --------------------------------------------------------------------------- processes

class Stack:
    """Upstreams + proxies of one run. Every process is a gateway.stacks.procs.Child of this process."""

    def __init__(self, args, log_dir: Path) -> None:
        self.a = args
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.env = {"PYTHONPATH": os.pathsep.join([str(ROOT), *args.pythonpath, os.environ.get("PYTHONPATH", "")]),
                    "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, argv: list[str], port: int | None, cpu, env: dict | None = None,
              deadline_s: float = 30.0) -> Child:
        c = Child(argv, port=port, cpu=cpu, env={**self.env, **(env or {})},
                  log_path=str(self.log_dir / f"{name}.log"))
        c.start(deadline_s)
        self.children.append(c)
        return c

    def upstreams(self, tag: str, n: int, itl_ms: float) -> tuple[tuple[str, int], list[tuple[str, str, int]]]:
        py = sys.executable
        reps = []
        for i in range(n):
            port = free_port()
            rid = haproxy_ray.ray_replica_id(i) if not tag else f"{haproxy_ray.RAY_REPLICA_PREFIX}{tag}{i}"
            self.start(f"replica-{tag}{i}", [py, "-m", self.a.engine_module, "--host", "127.0.0.1", "--port", str(port),
                                             "--replica-id", rid, "--itl-ms", str(itl_ms),
                                             "--unary-bytes", str(self.a.unary_bytes)], port, self.a.load_cpu)
            reps.append((rid, "127.0.0.1", port))
        rport = free_port()
        argv = [py, "-m", self.a.router_module, "--host", "127.0.0.1", "--port", str(rport)]
        for rid, h, p in reps:
            argv += ["--replica", f"{rid}=http://{h}:{p}"]
        self.router_pid = self.start(f"router{tag}", argv, rport, self.a.load_cpu).pid
        return ("127.0.0.1", rport), reps

    def haproxy(self, tag: str, router, reps) -> Child:
        port = free_port()
        work = self.log_dir.parent / f"haproxy{tag}"
        extra = dict(kv.split("=", 1) for kv in self.a.haproxy_env)
        r = haproxy_ray.render(work, port, router, reps, free_port(), free_port(), extra_env=extra)
        # Ray's HAProxyManager reads the per-request rfc5424 metrics datagrams from metrics.sock;
        # a discard sink on the upstream core stands in for it.
        sock = work / "metrics.sock"
        if sock.exists():
            sock.unlink()
        self.start(f"haproxy{tag}-metrics-sink", haproxy_ray.sink_argv(str(sock)), None, self.a.load_cpu)
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        c = self.start(f"haproxy{tag}", r.argv(), port, self.a.proxy_cpu)
        time.sleep(0.8)  # health checks: rise 2 x fastinter 250 ms before servers are UP
        return c

    def gateway(self, tag: str, router, reps, workers: int, cpu, extra: Sequence[str] = ()) -> Child:
        port = free_port()
        argv = [sys.executable, "-m", self.a.gateway_module, "serve", "--host", "127.0.0.1", "--port", str(port),
                "--router", f"http://{router[0]}:{router[1]}"]
        for rid, h, p in reps:
            argv += ["--replica", f"{rid}=http://{h}:{p}"]
        if workers != 1:
            argv += ["--workers", str(workers)]
        argv += [*self.a.gateway_arg, *extra]
        return self.start(f"gateway{tag}-{workers}w{'-' + extra[0].strip('-') if extra else ''}", argv, port, cpu)

    def stop(self) -> None:
        for c in reversed(self.children):
            try:
                c.stop(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        self.children.clear()


def gateway_runnable(args) -> str | None:
    """None if `python -m gateway serve --help` works, else the reason it does not."""
    mod = args.gateway_module
    try:
        if importlib.util.find_spec(mod) is None or importlib.util.find_spec(f"{mod}.__main__") is None:
            return f"no module {mod}.__main__ yet"
    except ImportError as e:
        return f"{mod}: {e}"
    try:
        p = subprocess.run([sys.executable, "-m", mod, "serve", "--help"], capture_output=True, text=True, check=False,
                           timeout=30, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return f"`python -m {mod} serve --help` timed out"
    if p.returncode != 0:
        return f"`python -m {mod} serve --help` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
    return None


def upstream_modules_ok(args) -> str | None:
    for m in (args.engine_module, args.router_module):
        try:
            if importlib.util.find_spec(m) is None:
                return f"module {m} not found"
        except ImportError as e:
            return f"module {m}: {e}"
    return None


# --------------------------------------------------------------------------- reporting

STANDING_NOTES = [
    "`other load (cores)`: CPU the machine spent outside this benchmark's processes during the window "
    "(all-core busy time from /proc/stat minus this process tree's utime+stime, so it includes some of our own "
    "softirq time). Well above ~0.2 means other jobs were competing and the row is noisy.",
    "Requests/s is closed-loop throughput of the whole rig. The load generator, the router and the replicas "
    "share one core; when `proxy CPU util` is well below 1.0 the proxy was not the bottleneck, that core was.",
    "`router CPU us/req` is the router process's CPU per request: Ray's Lua opens a new TCP connection to the "
    "router for every POST, which the router pays for too.",
    "Proxy CPU is utime+stime from /proc/<pid>/stat over the measured window, summed over the proxy's process "
    "tree, divided by the requests completed in that window; 10 ms tick granularity.",
    "Latencies are client-side, from writing the request to the last byte (TTFB: to the first body byte, "
    "i.e. the first SSE event). Streams use itl 0: events back to back.",
    "Paced streams: the mock engine's `step_ms` mode (one clock per replica writes the next event of every "
    "stream it serves in the same loop iteration, like vLLM's decode loop; a new stream gets its first token "
    "on the next step). Closed loop, streams/replica x replicas users. TTFT is from writing the request to "
    "the first event; a gap is the time between two reads that carried events, so events arriving in one "
    "read count as gaps of 0 (what a client rendering tokens sees). Both are client-side, so they include "
    "the rig's own queueing on the load core: compare a proxy's figure with direct's, measured alongside. "
    "`client ITL mean` above the step means the rig, not only the proxy, fell behind. Proxy CPU per stream "
    "= CPU per event over the window x the mean tokens a stream (per-request costs such as the router call "
    "are in the window's CPU, so they are included). Connections are aborted at the end of each window.",
]

COLS = ["workload", "concurrency", "system", "rps", "p50_ms", "p90_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms",
        "cpu_us_per_req", "proxy_cpu_util", "router_cpu_us_per_req", "proxy_rss_mib", "events_per_stream", "bytes_per_resp", "completed", "errors", "other_cpu_cores"]


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def ratios(rows: list[dict], systems: list[str]) -> tuple[list[str], dict]:
    idx = {(r["system"], r["workload"], r["concurrency"]): r for r in rows}
    lines, out = [], {}
    gws = [s for s in GATEWAY_SYSTEMS if s in systems]

    def get(s, w, c, k):
        r = idx.get((s, w, c))
        return None if r is None else r.get(k)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    for gw in gws or ["gateway"]:
        if "haproxy" not in systems:
            break
        lab = SYSTEM_LABEL[gw]
        # added p50 latency over direct at unary c=1
        d, h, g = (get(s, "unary", 1, "p50_ms") for s in ("direct", "haproxy", gw))
        if None not in (d, h, g):
            r = ratio(g - d, h - d)
            out[f"{gw}.added_p50_unary_c1_ratio"] = r
            lines.append(f"added p50 over direct, unary c=1: {lab} {g - d:.3f} ms vs HAProxy+Lua {h - d:.3f} ms"
                         f" -> ratio {r:.2f}" if r is not None else "")
        for w in ("unary", "stream50", "stream200"):
            for c in sorted({r["concurrency"] for r in rows if r["workload"] == w}):
                h, g = get("haproxy", w, c, "cpu_us_per_req"), get(gw, w, c, "cpu_us_per_req")
                if h and g:
                    out[f"{gw}.cpu_ratio.{w}.c{c}"] = g / h
                    if w == "unary" or (w == "stream200" and c == 16):
                        lines.append(f"CPU/request {w} c={c}: {lab} {g:.1f} us vs HAProxy+Lua {h:.1f} us"
                                     f" -> ratio {g / h:.2f}")
        d, h, g = (get(s, "stream200", 16, "ttfb_p50_ms") for s in ("direct", "haproxy", gw))
        if None not in (d, h, g):
            out[f"{gw}.ttfb_added_stream200_c16_ms"] = g - d
            out["haproxy.ttfb_added_stream200_c16_ms"] = h - d
            r = ratio(g - d, h - d)
            lines.append(f"TTFB p50 added over direct, stream200 c=16: {lab} {g - d:.3f} ms vs HAProxy+Lua "
                         f"{h - d:.3f} ms" + (f" -> ratio {r:.2f}" if r is not None else ""))
        ph = max((r["rps"] for r in rows if r["system"] == "haproxy" and r["workload"] == "unary"), default=None)
        pg = max((r["rps"] for r in rows if r["system"] == gw and r["workload"] == "unary"), default=None)
        if ph and pg:
            out[f"{gw}.peak_unary_rps_ratio"] = pg / ph
            lines.append(f"peak unary throughput: {lab} {pg:.0f} req/s vs HAProxy+Lua {ph:.0f} req/s -> ratio {pg / ph:.2f}")
    return [x for x in lines if x], out


PACED_COLS = ["step_ms", "streams_per_replica", "concurrency", "system", "events_per_s", "itl_mean_ms",
              "ttfb_p50_ms", "ttfb_p99_ms", "gap_p50_ms", "gap_p99_ms", "cpu_us_per_event", "cpu_us_per_stream",
              "proxy_cpu_util", "proxy_rss_mib", "completed", "errors", "other_cpu_cores"]


def paced_table(rows: list[dict], meta: dict) -> list[str]:
    lo, hi = meta.get("paced_tokens", ("?", "?"))
    hdr = ["step ms", "streams/replica", "streams", "system", "events/s", "client ITL mean ms", "TTFT p50 ms",
           "TTFT p99 ms", "gap p50 ms", "gap p99 ms", "proxy CPU us/event", "proxy CPU us/stream",
           "proxy CPU util", "proxy RSS MiB", "streams done", "errors", "other load (cores)"]
    lines = ["", f"## Paced streams (vLLM-like decode loop: one event per stream per engine step, "
                 f"{lo}-{hi} tokens a stream)", "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]) if c != "system" else SYSTEM_LABEL.get(r[c], r[c])
                                       for c in PACED_COLS) + " |")
    return lines


def paced_ratios(rows: list[dict], systems: list[str]) -> tuple[list[str], dict]:
    idx = {(r["system"], r["step_ms"], r["streams_per_replica"]): r for r in rows}
    lines, out = [], {}
    if "haproxy" not in systems:
        return lines, out
    for gw in [s for s in ("gateway", "gateway2", "gateway-py") if s in systems]:
        for (s, step, spr), g in sorted(idx.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if s != gw:
                continue
            h, d = idx.get(("haproxy", step, spr)), idx.get(("direct", step, spr))
            if h is None or not h["cpu_us_per_stream"] or g["cpu_us_per_stream"] is None:
                continue
            key = f"{gw}.paced.{step:g}ms.{spr}"
            out[key + ".cpu_ratio"] = g["cpu_us_per_stream"] / h["cpu_us_per_stream"]
            text = (f"paced {spr}/replica x {step:g} ms, CPU/stream: {SYSTEM_LABEL[gw]} {g['cpu_us_per_stream']:.0f} us"
                    f" vs HAProxy+Lua {h['cpu_us_per_stream']:.0f} us -> ratio {out[key + '.cpu_ratio']:.2f}")
            if d is not None and None not in (d["ttfb_p50_ms"], d["ttfb_p99_ms"], d["gap_p99_ms"]):
                add = {k: (g[k] - d[k], h[k] - d[k]) for k in ("ttfb_p50_ms", "ttfb_p99_ms", "gap_p99_ms")
                       if g[k] is not None and h[k] is not None}
                for k, (ga, ha) in add.items():
                    out[f"{key}.added_{k}"] = {"gateway": ga, "haproxy": ha}
                text += "; added over direct (gateway / HAProxy+Lua): " + ", ".join(
                    f"{k.replace('ttfb', 'TTFT').replace('_ms', '').replace('_', ' ')} {ga:+.2f} / {ha:+.2f} ms"
                    for k, (ga, ha) in add.items())
            lines.append(text)
    return lines, out


def write_outputs(out: Path, rows: list[dict], meta: dict, systems: list[str],
                  paced_rows: list[dict] | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# gateway benchmark", "",
             f"{meta['started']} · {meta['host']} · {meta['cpus']} CPUs · mode {meta['mode']} · "
             f"proxies on core {meta['proxy_cpu']}, load generator + upstreams on core {meta['load_cpu']} · "
             f"{meta['slices']} x {meta['duration_s']} s per system per point (+{meta['warmup_s']} s warm-up) · "
             f"load average at start {' '.join(meta.get('loadavg_start', []))}, "
             f"at end {' '.join(meta.get('loadavg_end', []))}", ""]
    for s, why in meta.get("skipped", {}).items():
        lines.append(f"**{SYSTEM_LABEL.get(s, s)} skipped:** {why}")
    if meta.get("skipped"):
        lines.append("")
    hdr = ["workload", "c", "system", "req/s", "p50 ms", "p90 ms", "p99 ms", "TTFB p50 ms", "TTFB p99 ms",
           "proxy CPU us/req", "proxy CPU util", "router CPU us/req", "proxy RSS MiB", "events/stream", "body B/resp", "ok", "errors", "other load (cores)"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]) if c != "system" else SYSTEM_LABEL.get(r[c], r[c]) for c in COLS) + " |")
    rl, rv = ratios(rows, systems)
    meta["ratios"] = rv
    if paced_rows:
        lines += paced_table(paced_rows, meta)
        pl, pv = paced_ratios(paced_rows, systems)
        rl += pl
        rv.update(pv)
    if rl:
        lines += ["", "## Target ratios (gateway / HAProxy+Lua; lower is better except throughput)", ""]
        lines += [f"- {x}" for x in rl]
    if meta.get("memory"):
        lines += ["", "## Memory: RSS per open stream (slow streams, itl 1000 ms)", ""]
        for s, m in meta["memory"].items():
            if "error" in m:
                lines.append(f"- {SYSTEM_LABEL.get(s, s)}: error {m['error']}")
                continue
            lines.append(f"- {SYSTEM_LABEL.get(s, s)}: {m['streams_flowing']}/{m['streams_requested']} streams open, "
                         f"worker RSS {m['worker_idle_rss_kib']} -> {m['worker_held_rss_kib']} KiB = "
                         f"**{m['kib_per_stream_worker']} KiB/stream** (whole process tree "
                         f"{m['kib_per_stream_total']} KiB/stream; target for the gateway <= 50 KiB)")
    lines += ["", "## Notes", ""]
    lines += [f"- {x}" for x in STANDING_NOTES]
    if meta.get("haproxy_version"):
        lines.append(f"- HAProxy: `{meta['haproxy_binary']}` ({meta['haproxy_version']}); config and Lua rendered "
                     "by Ray 2.60's own `HAProxyApi._generate_config_file_internal` (scripts/haproxy_ray.py), "
                     "`nbthread 1`, every other setting Ray's default (rendered files: `haproxy/` next to this report).")
    if any(r["system"].startswith("gateway") for r in rows):
        lines.append("- gateway: run with its defaults (`forward body` off, as Ray's default "
                     "`RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=0`; JSON access log on, as HAProxy logs every "
                     f"request too); the 2-worker point is pinned to cores {meta['gw2_cpus']}, so it shares the load "
                     "generator's core: a scaling sanity check, not a clean measurement.")
    for k, v in meta.get("notes", {}).items():
        lines.append(f"- {k}: {v}")
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS + ["window_s"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if paced_rows:
        with open(out / "results_paced.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=PACED_COLS + ["window_s"], extrasaction="ignore")
            w.writeheader()
            w.writerows(paced_rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "paced": paced_rows or []},
                                                 indent=1, default=str))
    try:
        plot(out, rows)
    except ImportError as e:
        print(f"plots skipped: {e} (pip install -e '.[bench]' for matplotlib)", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (plots are a convenience; the data files are the result)
        print(f"plotting failed: {e!r}", file=sys.stderr)
    return md


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wls = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    systems = [s for s in SYSTEM_LABEL if any(r["system"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(wls), figsize=(5.5 * len(wls), 4.5), squeeze=False)
    for ax, w in zip(axes[0], wls):
        for s in systems:
            pts = sorted((r for r in rows if r["workload"] == w and r["system"] == s), key=lambda r: r["concurrency"])
            if not pts:
                continue
            ax.plot([p["rps"] for p in pts], [p["p50_ms"] for p in pts], marker="o", label=SYSTEM_LABEL[s],
                    color=COLORS[s])
            for p in pts:
                ax.annotate(f"c{p['concurrency']}", (p["rps"], p["p50_ms"]), fontsize=7, alpha=0.7)
        ax.axhline(SLA_MS[w], color="red", ls="--", lw=1, label=f"SLA {SLA_MS[w]:.0f} ms")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (req/s)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(w)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_throughput.png", dpi=110)
    plt.close(fig)

    proxies = [s for s in systems if s != "direct"]
    fig, axes = plt.subplots(1, len(wls), figsize=(5.5 * len(wls), 4.2), squeeze=False)
    for ax, w in zip(axes[0], wls):
        concs = sorted({r["concurrency"] for r in rows if r["workload"] == w})
        width = 0.8 / max(1, len(proxies))
        for i, s in enumerate(proxies):
            vals = []
            for c in concs:
                r = next((r for r in rows if r["workload"] == w and r["system"] == s and r["concurrency"] == c), None)
                vals.append(r["cpu_us_per_req"] if r and r["cpu_us_per_req"] is not None else 0)
            ax.bar([j + i * width for j in range(len(concs))], vals, width, label=SYSTEM_LABEL[s], color=COLORS[s])
        ax.set_xticks([j + width * (len(proxies) - 1) / 2 for j in range(len(concs))], [f"c={c}" for c in concs])
        ax.set_ylabel("proxy CPU per request (us)")
        ax.set_title(w)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cpu_per_request.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few points, short slices (< 3 min)")
    ap.add_argument("--smoke", action="store_true", help="tiny: 2 points, 0.5 s slices, small memory point")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--systems", default="direct,haproxy,gateway,gateway2",
                    help="comma list of direct,haproxy,gateway,gateway2,gateway-resume (gateway 1w with --resume-limit 2),"
                         " gateway-py (gateway 1w with --no-native-relay: the Python relay),"
                         " gateway-tokens (gateway 1w with --token-accounting), gateway-py-tokens (both)")
    ap.add_argument("--workloads", default=None, help="comma list of unary,stream50,stream200 ('' = none: paced points only)")
    ap.add_argument("--unary-conc", default=None, help="default 1,4,16,64,256 (quick: 1,16,64)")
    ap.add_argument("--stream-conc", default=None, help="default 1,4,16,64,128 (quick: 16)")
    ap.add_argument("--paced", default=None,
                    help="paced points STREAMSxSTEP_MS per replica, comma list (default 64x10,256x10,512x10,"
                         "64x30,256x30,512x30; quick: 64x10,256x30; '' = none)")
    ap.add_argument("--paced-tokens", default=None, help="tokens per paced stream, MIN-MAX (default 128-256)")
    ap.add_argument("--paced-duration", type=float, default=None, help="measured seconds per paced slice")
    ap.add_argument("--paced-warmup", type=float, default=None, help="warm-up seconds per paced slice")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per slice")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per slice")
    ap.add_argument("--slices", type=int, default=2, help="slices per system per point, order A..Z Z..A")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--unary-bytes", type=int, default=10000)
    ap.add_argument("--mem-streams", type=int, default=None, help="open streams for the memory point (0 = skip)")
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    ap.add_argument("--gw2-cpus", default="0,1", help="cpus of the 2-worker gateway point")
    ap.add_argument("--engine-module", default="replicas.mock_engine")
    ap.add_argument("--router-module", default="replicas.router")
    ap.add_argument("--gateway-module", default="gateway")
    ap.add_argument("--pythonpath", action="append", default=[], help="extra PYTHONPATH entry for children")
    ap.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `gateway serve` (repeatable), e.g. --gateway-arg=--no-access-log")
    ap.add_argument("--haproxy-env", action="append", default=[], metavar="KEY=VALUE",
                    help="Ray knob for the HAProxy render (repeatable), e.g. RAY_SERVE_HAPROXY_NBTHREAD=2")
    a = ap.parse_args(argv)
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    dflt = {
        "full": dict(workloads="unary,stream50,stream200", unary="1,4,16,64,256", stream="1,4,16,64,128",
                     duration=3.0, warmup=1.0, mem=1000, paced="64x10,256x10,512x10,64x30,256x30,512x30",
                     ptokens="128-256", pdur=3.0, pwarm=2.0),
        "quick": dict(workloads="unary,stream50,stream200", unary="1,16,64", stream="16",
                      duration=1.2, warmup=0.4, mem=1000, paced="64x10,256x30", ptokens="128-256",
                      pdur=1.5, pwarm=1.2),
        "smoke": dict(workloads="unary,stream50", unary="4", stream="4", duration=0.5, warmup=0.3, mem=50,
                      paced="4x10", ptokens="8-16", pdur=0.5, pwarm=0.3),
    }[mode]
    a.mode = mode
    a.workloads = [w for w in (dflt["workloads"] if a.workloads is None else a.workloads).split(",") if w]
    a.unary_conc = [int(x) for x in (a.unary_conc or dflt["unary"]).split(",")]
    a.stream_conc = [int(x) for x in (a.stream_conc or dflt["stream"]).split(",")]
    a.duration = a.duration if a.duration is not None else dflt["duration"]
    a.warmup = a.warmup if a.warmup is not None else dflt["warmup"]
    a.mem_streams = a.mem_streams if a.mem_streams is not None else dflt["mem"]
    paced = dflt["paced"] if a.paced is None else a.paced
    try:
        a.paced = [(int(x.split("x")[0]), float(x.split("x")[1])) for x in paced.split(",") if x.strip()]
        lo, hi = (a.paced_tokens or dflt["ptokens"]).split("-")
        a.paced_tokens = (int(lo), int(hi))
    except (ValueError, IndexError):
        ap.error("--paced takes STREAMSxSTEP_MS,... (e.g. 64x10) and --paced-tokens MIN-MAX")
    a.paced_duration = a.paced_duration if a.paced_duration is not None else dflt["pdur"]
    a.paced_warmup = a.paced_warmup if a.paced_warmup is not None else dflt["pwarm"]
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    for s in a.systems:
        if s not in SYSTEM_LABEL:
            ap.error(f"unknown system {s!r}")
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    sys.path[:0] = a.pythonpath
    return a


async def sweep(a, targets: dict[str, dict]) -> list[dict]:
    rows = []
    systems = list(targets)
    points = [(w, c) for w in a.workloads for c in (a.unary_conc if w == "unary" else a.stream_conc)]
    for pi, (w, c) in enumerate(points):
        stream, max_tokens = WORKLOADS[w]
        rot = systems[pi % len(systems):] + systems[:pi % len(systems)]
        parts: dict[str, list[PhaseStats]] = {s: [] for s in systems}
        for sl in range(a.slices):
            for s in (rot if sl % 2 == 0 else rot[::-1]):
                t = targets[s]
                parts[s].append(await run_phase(t["addrs"], stream, max_tokens, c, a.warmup, a.duration, t["pid"],
                                                router_pid=t.get("router_pid")))
        for s in systems:
            r = summarize(s, w, c, parts[s], targets[s]["pid"] is not None)
            rows.append(r)
            print(f"  {w:9s} c={c:<4d} {SYSTEM_LABEL[s]:12s} {r['rps']:9.1f} req/s  p50 {fmt(r['p50_ms']):>7s} ms"
                  f"  p99 {fmt(r['p99_ms']):>7s} ms  ttfb50 {fmt(r['ttfb_p50_ms']):>6s}"
                  f"  cpu/req {fmt(r['cpu_us_per_req']):>6s} us  err {r['errors']}  other load {r['other_cpu_cores']}",
                  flush=True)
            if r["errors"]:
                print(f"    errors: {r['error_samples']}", flush=True)
    return rows


async def sweep_paced(a, targets: dict[str, dict]) -> list[dict]:
    rows = []
    systems = list(targets)
    mean_tokens = (a.paced_tokens[0] + a.paced_tokens[1]) / 2
    for pi, (spr, step_ms) in enumerate(a.paced):
        users = spr * a.replicas
        rot = systems[pi % len(systems):] + systems[:pi % len(systems)]
        parts: dict[str, list[PhaseStats]] = {s: [] for s in systems}
        for sl in range(a.slices):
            for s in (rot if sl % 2 == 0 else rot[::-1]):
                t = targets[s]
                parts[s].append(await run_paced_phase(t["addrs"], users, step_ms, a.paced_tokens, a.paced_warmup,
                                                      a.paced_duration, t["pid"], seed=sl))
        for s in systems:
            r = summarize_paced(s, spr, step_ms, users, parts[s], targets[s]["pid"] is not None, mean_tokens)
            rows.append(r)
            print(f"  paced {spr:4d}/replica x {step_ms:g} ms {SYSTEM_LABEL[s]:12s} {r['events_per_s']:9.0f} ev/s"
                  f"  itl {fmt(r['itl_mean_ms']):>6s}  ttft50 {fmt(r['ttfb_p50_ms']):>6s}"
                  f"  ttft99 {fmt(r['ttfb_p99_ms']):>6s}  gap99 {fmt(r['gap_p99_ms']):>6s} ms"
                  f"  cpu/stream {fmt(r['cpu_us_per_stream']):>7s} us  err {r['errors']}"
                  f"  other load {r['other_cpu_cores']}", flush=True)
            if r["errors"]:
                print(f"    errors: {r['error_samples']}", flush=True)
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out).resolve()
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        a.proxy_cpu = a.load_cpu = a.gw2_cpus = "0"
    # The load generator (this process) shares core(s) with the upstreams; children get their own taskset.
    os.sched_setaffinity(0, {int(x) for x in str(a.load_cpu).split(",")})

    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": ncpu, "mode": a.mode,
            "proxy_cpu": a.proxy_cpu, "load_cpu": a.load_cpu, "gw2_cpus": a.gw2_cpus,
            "slices": a.slices, "duration_s": a.duration, "warmup_s": a.warmup, "replicas": a.replicas,
            "systems": a.systems, "skipped": {}, "notes": {}, "argv": sys.argv,
            "gateway_args": a.gateway_arg, "haproxy_env": a.haproxy_env,
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    why = upstream_modules_ok(a)
    if why:
        print(f"cannot run: {why} (the mock engine/router modules are required)", file=sys.stderr)
        return 2
    if any(s.startswith("gateway") for s in a.systems):
        why = gateway_runnable(a)
        if why:
            print(f"gateway: SKIPPED - {why}", flush=True)
            for s in [s for s in a.systems if s.startswith("gateway")]:
                meta["skipped"][s] = why
            a.systems = [s for s in a.systems if not s.startswith("gateway")]
    if "haproxy" in a.systems:
        try:
            meta["haproxy_binary"] = haproxy_ray.haproxy_binary()
            meta["haproxy_version"] = subprocess.run([meta["haproxy_binary"], "-v"], capture_output=True,
                                                     text=True, check=False).stdout.splitlines()[0]
        except (FileNotFoundError, OSError, IndexError) as e:
            print(f"haproxy: SKIPPED - {e}", flush=True)
            meta["skipped"]["haproxy"] = str(e)
            a.systems.remove("haproxy")

    stack = Stack(a, log_dir)
    rows: list[dict] = []
    paced_rows: list[dict] = []
    try:
        t0 = perf()
        router, reps = stack.upstreams("", a.replicas, 0)
        targets: dict[str, dict] = {}
        for s in a.systems:
            if s == "direct":
                targets[s] = {"addrs": [(h, p) for _, h, p in reps], "pid": None}
            elif s == "haproxy":
                try:
                    c = stack.haproxy("", router, reps)
                except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                    why = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
                    print(f"haproxy: SKIPPED - {why} (needs `.venv/bin/pip install 'ray[serve]==2.60.0'`)",
                          flush=True)
                    meta["skipped"][s] = why
                    continue
                targets[s] = {"addrs": [("127.0.0.1", c.port)], "pid": c.pid, "router_pid": stack.router_pid}
            elif s in GATEWAY_SYSTEMS:
                w = 2 if s == "gateway2" else 1
                try:
                    c = stack.gateway("", router, reps, w, a.proxy_cpu if w == 1 else a.gw2_cpus, SYSTEM_ARGS.get(s, ()))
                except (RuntimeError, TimeoutError) as e:
                    print(f"{s}: SKIPPED - failed to start: {e}", flush=True)
                    meta["skipped"][s] = f"failed to start: {e}"
                    continue
                targets[s] = {"addrs": [("127.0.0.1", c.port)], "pid": c.pid, "router_pid": stack.router_pid}
        meta["startup_s"] = round(perf() - t0, 2)
        uvloop.install()
        # sanity: one request of each kind through every system before measuring
        for s, t in list(targets.items()):
            deadline = perf() + 8.0  # give health checks time to mark replicas up before giving up
            while True:
                st = asyncio.run(run_phase(t["addrs"], True, 5, 1, 0.0, 0.3, None))
                st2 = asyncio.run(run_phase(t["addrs"], False, 5, 1, 0.0, 0.3, None))
                if (st.completed and st2.completed and not st.errors and not st2.errors) or perf() > deadline:
                    break
                time.sleep(0.5)
            if st.completed == 0 or st2.completed == 0:
                msg = f"sanity requests failed: {(st.error_samples + st2.error_samples)[:3]}"
                print(f"{s}: SKIPPED - {msg}", flush=True)
                meta["skipped"][s] = msg
                del targets[s]
        a.systems = list(targets)
        print(f"systems: {', '.join(SYSTEM_LABEL[s] for s in targets)}; "
              f"{len(a.workloads)} workloads, unary c={a.unary_conc}, streams c={a.stream_conc}", flush=True)
        rows = asyncio.run(sweep(a, targets))
        if a.paced:
            paced_rows = asyncio.run(sweep_paced(a, targets))

        if a.mem_streams > 0:
            mem_systems = [s for s in ("gateway", "haproxy") if s in a.systems]
            if mem_systems:
                print(f"memory point: {a.mem_streams} slow streams", flush=True)
                srouter, sreps = stack.upstreams("slow", 1, 1000)
                meta["memory"] = {}
                for s in mem_systems:
                    try:
                        c = (stack.gateway("slow", srouter, sreps, 1, a.proxy_cpu) if s == "gateway"
                             else stack.haproxy("slow", srouter, sreps))
                        m = asyncio.run(hold_streams(("127.0.0.1", c.port), a.mem_streams, c.pid, 2.0))
                        c.stop()
                    except Exception as e:  # noqa: BLE001
                        m = {"error": repr(e)}
                    meta["memory"][s] = m
                    print(f"  {SYSTEM_LABEL[s]}: {m}", flush=True)
    finally:
        stack.stop()
    meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    meta["paced_tokens"] = a.paced_tokens
    md = write_outputs(out, rows, meta, a.systems, paced_rows)
    print()
    print(md)
    print(f"wrote {out}/results.md, results.csv, results.json, latency_throughput.png, cpu_per_request.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
