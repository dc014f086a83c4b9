"""The processes of a benchmark run: mock engines and the router (upstreams), HAProxy+Lua as Ray 2.60 renders it,
and gateways, each a gateway.stacks.procs.Child of this process pinned with taskset."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import haproxy_ray
from gateway.stacks.procs import Child, free_port

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class StackOptions:
    """What a Stack reads (bench.py's arguments of the same names)."""
    engine_module: str = "replicas.mock_engine"
    router_module: str = "replicas.router"
    gateway_module: str = "gateway"
    pythonpath: list[str] = field(default_factory=list)
    gateway_arg: list[str] = field(default_factory=list)  # extra arguments of every gateway
    old_tree: str | None = None  # another source tree of the gateway (system gateway-old)
    haproxy_env: list[str] = field(default_factory=list)  # KEY=VALUE Ray knobs for the HAProxy render
    unary_bytes: int = 10000
    proxy_cpu: str = "0"
    load_cpu: str = "1"


class Stack:
    """Upstreams + proxies of one run. Every process is a gateway.stacks.procs.Child of this process."""

    def __init__(self, args: StackOptions, log_dir: Path) -> None:
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

    def gateway(self, tag: str, router, reps, workers: int, cpu, extra: Sequence[str] = (),
                tree: str | None = None) -> Child:
        """A gateway; with `tree`, imported from that source tree (-P: the working directory is not put first on
        sys.path, so the tree's own package is the one imported)."""
        port = free_port()
        argv = [sys.executable, *(["-P"] if tree else []), "-m", self.a.gateway_module, "serve", "--host", "127.0.0.1",
                "--port", str(port), "--router", f"http://{router[0]}:{router[1]}"]
        for rid, h, p in reps:
            argv += ["--replica", f"{rid}=http://{h}:{p}"]
        if workers != 1:
            argv += ["--workers", str(workers)]
        argv += [*self.a.gateway_arg, *extra]
        env = {"PYTHONPATH": os.pathsep.join([tree, self.env["PYTHONPATH"]])} if tree else None
        name = f"gateway{tag}-{workers}w{'-' + extra[0].strip('-') if extra else ''}{'-old' if tree else ''}"
        return self.start(name, argv, port, cpu, env)

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
