"""One sweep over the points of a run: every system in turn, A B C .. C B A per point, then a summary row each."""

from __future__ import annotations

from benchkit.load import PhaseStats, run_paced_phase, run_phase
from benchkit.report import fmt, summarize, summarize_paced
from benchkit.systems import SYSTEM_LABEL, WORKLOADS


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
                  f"  cpu/stream {fmt(r['cpu_us_per_stream']):>7s} us (kernel {fmt(r['kernel_share'])})  err {r['errors']}"
                  f"  other load {r['other_cpu_cores']}", flush=True)
            if r["errors"]:
                print(f"    errors: {r['error_samples']}", flush=True)
    return rows
