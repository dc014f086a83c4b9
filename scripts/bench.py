#!/usr/bin/env python
"""Side-by-side benchmark: direct to a replica vs HAProxy+Lua (as Ray 2.60) vs the gateway.

One command from a fresh clone (after `pip install -e '.[test,bench,ray]'`)::

    .venv/bin/python scripts/bench.py                 # full sweep, ~14 min
    .venv/bin/python scripts/bench.py --quick         # a few points, < 3 min
    .venv/bin/python scripts/bench.py --smoke         # seconds; what tests/test_bench_quick.py runs
    .venv/bin/python scripts/bench.py --systems direct,haproxy --out bench-results/

Layout of one run (all processes in this process's session: no setsid, see docs/contributing.md, "Real vLLM on CPU"):

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
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import uvloop  # noqa: E402

import haproxy_ray  # noqa: E402
from benchkit import load  # noqa: E402
from benchkit.load import hold_streams, perf, run_phase  # noqa: E402
from benchkit.report import write_outputs  # noqa: E402
from benchkit.stack import Stack, gateway_runnable, upstream_modules_ok  # noqa: E402
from benchkit.sweep import sweep, sweep_paced  # noqa: E402
from benchkit.systems import GATEWAY_SYSTEMS, SYSTEM_ARGS, SYSTEM_LABEL, WORKLOADS  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few points, short slices (< 3 min)")
    ap.add_argument("--smoke", action="store_true", help="tiny: 2 points, 0.5 s slices, small memory point")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--systems", default="direct,haproxy,gateway,gateway2",
                    help="comma list of direct,haproxy,gateway,gateway2,gateway-resume (gateway 1w with --resume-limit 2),"
                         " gateway-py (gateway 1w with --no-native-relay: the Python relay),"
                         " gateway-tokens (gateway 1w with --token-accounting), gateway-py-tokens (both), gateway-both (resume and token accounting on)")
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
    ap.add_argument("--old-tree", default=None, metavar="PATH",
                    help="source tree of system gateway-old (e.g. a `git worktree` at an older commit, its pump "
                         "built): the same gateway serve, side by side with this tree's")
    ap.add_argument("--pythonpath", action="append", default=[], help="extra PYTHONPATH entry for children")
    ap.add_argument("--request-extra", default="", metavar="JSON",
                    help='fields added to every request body, e.g. \'{"return_token_ids": true}\' (what resume asks '
                         "the replica for, so a system without resume gets the same bytes)")
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
    if "gateway-old" in a.systems and not a.old_tree:
        ap.error("system gateway-old needs --old-tree PATH")
    if a.old_tree:
        a.old_tree = str(Path(a.old_tree).resolve())
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    sys.path[:0] = a.pythonpath
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.request_extra:
        load.REQUEST_EXTRA.update(json.loads(a.request_extra))
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
                    c = stack.gateway("", router, reps, w, a.proxy_cpu if w == 1 else a.gw2_cpus, SYSTEM_ARGS.get(s, ()),
                                      a.old_tree if s == "gateway-old" else None)
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
