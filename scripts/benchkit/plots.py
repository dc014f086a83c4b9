"""The run's two pictures: latency against throughput, and proxy CPU per request (matplotlib, the bench extra)."""

from __future__ import annotations

from pathlib import Path

from benchkit.systems import COLORS, SLA_MS, SYSTEM_LABEL, WORKLOADS


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
