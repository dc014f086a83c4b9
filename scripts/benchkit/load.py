"""The load generator: closed-loop clients on raw asyncio Protocols (httptools-parsed), one keep-alive connection per
user; paced clients that timestamp every SSE event; and the memory point's slow streams.

TLS (bench_tls.py): an address in TLS_CONTEXTS is reached over TLS with that client context; EXTRA_HEADERS go into
every request."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
import time
from dataclasses import dataclass, field

import httptools

from benchkit.procstats import cpu_seconds, foreign_probe, proc_tree, rss_bytes, tick_seconds

perf = time.perf_counter
TLS_CONTEXTS: dict[tuple[str, int], ssl.SSLContext] = {}
EXTRA_HEADERS = b""  # whole header lines, each ending with CRLF
REQUEST_EXTRA: dict = {}  # fields added to every request body (bench.py --request-extra)


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
            "stream": stream, "max_tokens": max_tokens, **REQUEST_EXTRA, **(extra or {})}
    b = json.dumps(body, separators=(",", ":")).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\n%sContent-Type: application/json\r\n"
            b"Accept: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (host.encode(), port, EXTRA_HEADERS, b"text/event-stream" if stream else b"application/json", len(b), b))


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
    kernel_share: float = 0.0
    router_cpu_s: float = 0.0
    foreign_cpu_s: float = 0.0
    rss: int = 0


async def connect(addr: tuple[str, int], count_events: bool) -> ClientConn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: ClientConn(count_events), addr[0], addr[1],
                                            **connect_options(addr))
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
    """create_connection's TLS arguments for an address in TLS_CONTEXTS."""
    context = TLS_CONTEXTS.get(tuple(addr))  # type: ignore[arg-type]
    return {"ssl": context, "server_hostname": addr[0]} if context is not None else {}


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
    cpu0, tick0, ktick0 = cpu_seconds(pids), tick_seconds(pids), tick_seconds(pids, kernel_only=True)
    acc.lo, acc.hi = perf(), float("inf")
    await asyncio.sleep(measure)
    acc.hi = perf()
    cpu1, tick1, ktick1 = cpu_seconds(pids), tick_seconds(pids), tick_seconds(pids, kernel_only=True)
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
    st.kernel_share = (ktick1 - ktick0) / (tick1 - tick0) if tick1 > tick0 else 0.0
    st.rss = sum(rss_bytes(pids).values())
    st.ttfb = acc.ttft
    st.lat = acc.gaps
    st.events = [acc.events]
    return st


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
