"""Summaries of measured phases, the results files (markdown, CSV, JSON) and the target ratios."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from benchkit.load import PhaseStats
from benchkit.plots import plot
from benchkit.systems import GATEWAY_SYSTEMS, SYSTEM_LABEL


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
    kernel = sum(p.kernel_share * p.cpu_s for p in parts)
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


def summarize_paced(system: str, spr: int, step_ms: float, users: int, parts: list[PhaseStats],
                    has_proxy: bool, mean_tokens: float) -> dict:
    ttft = [x for p in parts for x in p.ttfb]
    gaps = [x for p in parts for x in p.lat]
    events = sum(p.events[0] for p in parts)
    win = sum(p.window_s for p in parts)
    cpu = sum(p.cpu_s for p in parts)
    kernel = sum(p.kernel_share * p.cpu_s for p in parts)
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
        # slice by slice, for paired ratios (paced_ratios): slice i of every system ran back to back
        "slice_cpu_us_per_stream": [round(p.cpu_s / p.events[0] * mean_tokens * 1e6, 1) if (has_proxy and p.events[0])
                                    else None for p in parts],
        # the kernel's part of it (stime): a feature's cost shows as user time unless it adds syscalls or wake-ups
        "kernel_share": round(kernel / cpu, 3) if (has_proxy and cpu) else None,
        "proxy_cpu_util": round(cpu / win, 3) if (has_proxy and win) else None,
        "proxy_rss_mib": round(max(p.rss for p in parts) / 2**20, 1) if has_proxy else None,
        "completed": sum(p.completed for p in parts), "errors": sum(p.errors for p in parts),
        "error_samples": [e for p in parts for e in p.error_samples][:5],
        "other_cpu_cores": round(sum(p.foreign_cpu_s for p in parts) / win, 2) if win else None,
        "window_s": round(win, 3),
    }


STANDING_NOTES = [
    "`other load (cores)`: CPU the machine spent outside this benchmark's processes during the window "
    "(all-core busy time from /proc/stat minus this process tree's utime+stime, so it includes some of our own "
    "softirq time). Well above ~0.2 means other jobs were competing and the row is noisy.",
    "Requests/s is closed-loop throughput of the whole rig. The load generator, the router and the replicas "
    "share one core; when `proxy CPU util` is well below 1.0 the proxy was not the bottleneck, that core was.",
    "`router CPU us/req` is the router process's CPU per request: Ray's Lua opens a new TCP connection to the "
    "router for every POST, which the router pays for too.",
    "Proxy CPU is the scheduler's run time of every thread (/proc/<pid>/task/<tid>/schedstat, exact, where utime+stime are 10 ms samples) over the measured window, summed over the proxy's process "
    "tree, divided by the requests completed in that window.",
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
              "kernel_share", "proxy_cpu_util", "proxy_rss_mib", "completed", "errors", "other_cpu_cores"]


def paced_table(rows: list[dict], meta: dict) -> list[str]:
    lo, hi = meta.get("paced_tokens", ("?", "?"))
    hdr = ["step ms", "streams/replica", "streams", "system", "events/s", "client ITL mean ms", "TTFT p50 ms",
           "TTFT p99 ms", "gap p50 ms", "gap p99 ms", "proxy CPU us/event", "proxy CPU us/stream",
           "kernel share", "proxy CPU util", "proxy RSS MiB", "streams done", "errors", "other load (cores)"]
    lines = ["", f"## Paced streams (vLLM-like decode loop: one event per stream per engine step, "
                 f"{lo}-{hi} tokens a stream)", "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]) if c != "system" else SYSTEM_LABEL.get(r[c], r[c])
                                       for c in PACED_COLS) + " |")
    return lines


def paired(a: dict, b: dict) -> tuple[float, float, float] | None:
    """The median, lowest and highest of a's CPU per stream over b's, slice by slice. A paced point's CPU per event
    moves by ~10 % from one slice to the next for one and the same configuration (how many events an epoll wake-up
    finds depends on how the proxy's reads fall against the engines' steps), so a feature's few per cent show only
    over many slices; slice i of two systems ran back to back (ABC CBA ...), which pairs out the machine's drift."""
    xs = sorted(x / y for x, y in zip(a.get("slice_cpu_us_per_stream") or [], b.get("slice_cpu_us_per_stream") or [])
                if x and y)
    if not xs:
        return None
    mid = len(xs) // 2
    return (xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2), xs[0], xs[-1]


def paired_text(p: tuple[float, float, float] | None, n: int) -> str:
    return f" (median of {n} slice pairs {p[0]:.2f}, range {p[1]:.2f}-{p[2]:.2f})" if p and n > 1 else ""


def paced_ratios(rows: list[dict], systems: list[str]) -> tuple[list[str], dict]:
    idx = {(r["system"], r["step_ms"], r["streams_per_replica"]): r for r in rows}
    lines, out = [], {}
    for gw in [] if "haproxy" not in systems else [s for s in GATEWAY_SYSTEMS if s in systems]:
        for (s, step, spr), g in sorted(idx.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if s != gw:
                continue
            h, d = idx.get(("haproxy", step, spr)), idx.get(("direct", step, spr))
            if h is None or not h["cpu_us_per_stream"] or g["cpu_us_per_stream"] is None:
                continue
            key = f"{gw}.paced.{step:g}ms.{spr}"
            out[key + ".cpu_ratio"] = g["cpu_us_per_stream"] / h["cpu_us_per_stream"]
            pr = paired(g, h)
            if pr:
                out[key + ".cpu_ratio_paired"] = list(pr)
            text = (f"paced {spr}/replica x {step:g} ms, CPU/stream: {SYSTEM_LABEL[gw]} {g['cpu_us_per_stream']:.0f} us"
                    f" vs HAProxy+Lua {h['cpu_us_per_stream']:.0f} us -> ratio {out[key + '.cpu_ratio']:.2f}"
                    + paired_text(pr, len(g.get("slice_cpu_us_per_stream") or [])))
            if d is not None and None not in (d["ttfb_p50_ms"], d["ttfb_p99_ms"], d["gap_p99_ms"]):
                add = {k: (g[k] - d[k], h[k] - d[k]) for k in ("ttfb_p50_ms", "ttfb_p99_ms", "gap_p99_ms")
                       if g[k] is not None and h[k] is not None}
                for k, (ga, ha) in add.items():
                    out[f"{key}.added_{k}"] = {"gateway": ga, "haproxy": ha}
                text += "; added over direct (gateway / HAProxy+Lua): " + ", ".join(
                    f"{k.replace('ttfb', 'TTFT').replace('_ms', '').replace('_', ' ')} {ga:+.2f} / {ha:+.2f} ms"
                    for k, (ga, ha) in add.items())
            lines.append(text)
    # A feature's own cost: the gateway with it on against the same gateway with it off, point by point.
    for feature in [s for s in GATEWAY_SYSTEMS if s != "gateway" and s in systems and "gateway" in systems]:
        # a Python-relay feature against the Python relay with it off, when that ran too
        off = "gateway-py" if feature.startswith("gateway-py-") and "gateway-py" in systems else "gateway"
        for (s, step, spr), f in sorted(idx.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            base = idx.get((off, step, spr))
            if s != feature or base is None or not base["cpu_us_per_stream"] or f["cpu_us_per_stream"] is None:
                continue
            r = f["cpu_us_per_stream"] / base["cpu_us_per_stream"]
            out[f"{feature}.paced.{step:g}ms.{spr}.cpu_vs_{off}"] = r
            pr = paired(f, base)
            if pr:
                out[f"{feature}.paced.{step:g}ms.{spr}.cpu_vs_{off}_paired"] = list(pr)
            lines.append(f"paced {spr}/replica x {step:g} ms, CPU/stream: {SYSTEM_LABEL[feature]} "
                         f"{f['cpu_us_per_stream']:.0f} us vs {SYSTEM_LABEL[off]} {base['cpu_us_per_stream']:.0f} us"
                         f" -> ratio {r:.2f}" + paired_text(pr, len(f.get("slice_cpu_us_per_stream") or [])))
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
