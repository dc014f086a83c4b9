#!/usr/bin/env python
"""Plot locust ``--csv`` output written by scripts/locustfile.py.

    .venv/bin/python scripts/plot_locust.py bench-results/locust [--out bench-results/locust/locust.png]

Input: a directory (or explicit files) of ``<prefix>_stats.csv`` files, one per locust run, e.g.
``u1_stats.csv``, ``u16_stats.csv`` from the sweep in the locustfile's docstring. The x axis is
the user count parsed from the prefix (``u16`` -> 16), else taken from ``<prefix>_stats_history.csv``.

Output: one PNG with, per metric (TTFT, ITL, E2E): p50 / p90 / p99 vs users, plus E2E requests/s
and failures vs users. With a single run the x axis has one point; the history file (if any) is
then plotted over time instead (users, requests/s, p50/p95 of the aggregate).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

METRICS = ("TTFT", "ITL", "E2E", "POST")


def _num(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load_runs(paths: list[Path]) -> list[dict]:
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*_stats.csv")) if p.is_dir() else [p]
    runs = []
    for f in files:
        prefix = f.name[: -len("_stats.csv")]
        m = re.search(r"(\d+)$", prefix)
        users = int(m.group(1)) if m else None
        hist = f.with_name(prefix + "_stats_history.csv")
        if users is None and hist.exists():
            with open(hist, newline="") as h:
                counts = [_num(r.get("User Count")) for r in csv.DictReader(h)]
            users = int(max((c for c in counts if c is not None), default=0))
        rows = {}
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                rows[r["Type"]] = r
        runs.append({"prefix": prefix, "users": users, "rows": rows, "history": hist if hist.exists() else None})
    runs.sort(key=lambda r: (r["users"] is None, r["users"] or 0))
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default <first dir>/locust.png)")
    a = ap.parse_args(argv)
    runs = load_runs(a.paths)
    if not runs:
        print("no *_stats.csv found", file=sys.stderr)
        return 1
    out = a.out or ((a.paths[0] if a.paths[0].is_dir() else a.paths[0].parent) / "locust.png")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in METRICS if any(m in r["rows"] for r in runs)]
    ncols = len(present) + 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.8 * ncols, 4.2), squeeze=False)
    xs = [r["users"] if r["users"] is not None else i for i, r in enumerate(runs)]
    for ax, m in zip(axes[0], present):
        for q in ("50%", "90%", "99%"):
            ys = [_num(r["rows"].get(m, {}).get(q)) for r in runs]
            ax.plot(xs, ys, marker="o", label=f"p{q[:-1]}")
        ax.set_title(m + (" (mean per request)" if m == "ITL" else ""))
        ax.set_xlabel("users")
        ax.set_ylabel("ms")
        ax.set_xscale("symlog", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    main_metric = "E2E" if "E2E" in present else present[0]
    ax.plot(xs, [_num(r["rows"].get(main_metric, {}).get("Requests/s")) for r in runs], marker="o", label="req/s")
    ax.plot(xs, [_num(r["rows"].get(main_metric, {}).get("Failures/s")) for r in runs], marker="x", label="failures/s")
    ax.set_title(f"{main_metric} throughput")
    ax.set_xlabel("users")
    ax.set_xscale("symlog", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    for r in runs:
        cells = []
        for m in present:
            row = r["rows"].get(m)
            if row:
                cells.append(f"{m} p50 {row['50%']} p99 {row['99%']} ms n={row['Request Count']} "
                             f"fail={row['Failure Count']}")
        print(f"users={r['users']}: " + "; ".join(cells))

    if len(runs) == 1 and runs[0]["history"]:
        hist_out = out.with_name(out.stem + "_history.png")
        with open(runs[0]["history"], newline="") as h:
            hist = [row for row in csv.DictReader(h) if row.get("Name") == "Aggregated"]
        if hist:
            t0 = _num(hist[0]["Timestamp"]) or 0
            t = [(_num(row["Timestamp"]) or 0) - t0 for row in hist]
            fig, ax = plt.subplots(1, 2, figsize=(10, 4))
            ax[0].plot(t, [_num(row["User Count"]) for row in hist], label="users")
            ax[0].plot(t, [_num(row["Requests/s"]) for row in hist], label="req/s (all types)")
            ax[0].legend(fontsize=8)
            ax[0].set_xlabel("s")
            ax[1].plot(t, [_num(row["50%"]) for row in hist], label="p50")
            ax[1].plot(t, [_num(row["95%"]) for row in hist], label="p95")
            ax[1].set_ylabel("ms (aggregate of all types)")
            ax[1].set_xlabel("s")
            ax[1].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(hist_out, dpi=110)
            plt.close(fig)
            print(f"wrote {hist_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
