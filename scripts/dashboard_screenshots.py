"""The Grafana dashboard's panels with real traffic, drawn without Grafana: docs/img/dashboard-*.png.

    .venv/bin/python scripts/dashboard_screenshots.py [--seconds 60] [--out docs/img]

Starts a local stack (three mock vLLM replicas, the standalone router, one gateway with resume on) and a real
Prometheus (Debian's `prometheus` package: `apt-get install prometheus`) scraping the gateway's /-/metrics every
second, drives streaming traffic through the gateway with the failures an operator meets (a replica SIGKILLed
and restarted, replicas that die before or during a response, clients that go away, requests over a per-replica
limit), then asks Prometheus for every query of every panel of deploy/grafana/gateway.json, exactly as written
there (with `$instance` and `$replica` = all and `$__rate_interval` = 4 scrapes, Grafana's rule), and plots each
row of the dashboard as one image, two panels to a line, as Grafana lays them out. Needs the bench extra
(matplotlib). Everything listens on 127.0.0.1 ports picked free.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.stacks.procs import Child, free_port, python_module, wait_port  # noqa: E402

DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"
SCRAPE_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"  # Grafana's $__rate_interval: at least four scrape intervals
# Grafana's dark theme, so the images read like the dashboard they stand for.
BG, PANEL_BG, GRID, TEXT, DIM = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d",
           "#fade2a", "#ff9830", "#c4162a"]


def panels_by_row(board: dict) -> list[tuple[str, list[dict]]]:
    rows: list[tuple[str, list[dict]]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            rows.append((panel["title"], list(panel.get("panels", []))))
        elif rows:
            rows[-1][1].append(panel)
        else:
            rows.append(("", [panel]))
    return rows


def expand(expr: str) -> str:
    return (expr.replace('=~"$instance"', '=~".*"').replace('=~"$replica"', '=~".*"')
            .replace("$__rate_interval", RATE_INTERVAL))


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or fmt


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []
        self.replicas: dict[str, tuple[int, Child]] = {}

    def replica(self, name: str, port: int | None = None) -> None:
        port = port or free_port()
        child = Child(python_module("replicas.mock_engine", "--port", str(port), "--replica-id", name,
                                    "--ttft-ms", "40", "--itl-ms", "15"), port=port).start()
        self.children.append(child)
        self.replicas[name] = (port, child)

    def start(self) -> tuple[str, int]:
        for name in ("replica-a", "replica-b", "replica-c"):
            self.replica(name)
        router_port = free_port()
        router_args = ["--port", str(router_port), "--health-interval-s", "0.5"]
        for name, (port, _) in self.replicas.items():
            router_args += ["--replica", f"{name}=http://127.0.0.1:{port}"]
        self.children.append(Child(python_module("replicas.router", *router_args), port=router_port).start())
        gateway_port = free_port()
        gateway_args = ["serve", "--port", str(gateway_port), "--router", f"http://127.0.0.1:{router_port}",
                        "--resume-limit", "1", "--max-in-flight-per-replica", "12", "--health-interval-s", "1",
                        "--outlier-failures", "3", "--outlier-ejection-s", "5", "--no-access-log"]
        for name, (port, _) in self.replicas.items():
            gateway_args += ["--replica", f"{name}=http://127.0.0.1:{port}"]
        self.children.append(Child(python_module("gateway", *gateway_args), port=gateway_port).start())
        prom_port = free_port()
        config = self.tmp / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "scrape_configs": [{"job_name": "gateway", "metrics_path": "/-/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]}],
        }))
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise SystemExit("prometheus is not installed: apt-get install prometheus")
        self.children.append(Child([prometheus, f"--config.file={config}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                                   port=prom_port).start(deadline_s=60))
        return f"http://127.0.0.1:{gateway_port}", prom_port

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


async def client(url: str, deadline: float, faults: list[str], rng: random.Random) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            body = {"model": "mock", "stream": True, "max_tokens": rng.randint(16, 80),
                    "messages": [{"role": "user", "content": "hello " * rng.randint(1, 40)}]}
            headers = {}
            roll = rng.random()
            if faults and roll < 0.04:
                headers["x-mock-fault"] = rng.choice(faults)
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                    chunks = 0
                    async for _ in response.aiter_raw():
                        chunks += 1
                        if 0.04 <= roll < 0.07 and chunks >= 3:
                            break  # a client that goes away mid-stream: client_abort
            except httpx.HTTPError:
                pass  # a cut stream is part of the picture
            if rng.random() < 0.05:
                await http.get("/v1/models")


async def traffic(url: str, stack: Stack, seconds: float) -> None:
    """Concurrency steps up and down (6, 24, then 12 clients); in the busy step one replica is SIGKILLed, then
    restarted on its port."""
    rng = random.Random(7)
    faults = ["die-before-head", "close-mid-stream", "status-500", "die-mid-stream"]
    start = time.monotonic()
    tasks = []
    elapsed = 0.0
    for share, clients in ((0.25, 6), (0.35, 24), (0.4, 12)):
        phase_start, elapsed = elapsed, elapsed + share
        deadline = start + seconds * elapsed
        tasks += [asyncio.create_task(client(url, deadline, faults, random.Random(rng.random())))
                  for _ in range(clients)]
        if clients == 24:
            await asyncio.sleep(seconds * 0.1)
            port, child = stack.replicas["replica-c"]
            os.kill(child.pid, signal.SIGKILL)  # its streams break: resumed on another replica, or cut
            await asyncio.sleep(seconds * 0.12)
            stack.replica("replica-c", port)  # back on its port: health checks bring it back into rotation
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    await asyncio.gather(*tasks)


def query_range(prom_port: int, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expand(expr), "start": start, "end": end, "step": SCRAPE_S})
    answer = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query_range?{params}", timeout=30).json()
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def plot(rows: list[tuple[str, list[dict]]], data: dict, start: float, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for title, panels in rows:
        lines = (len(panels) + 1) // 2
        fig, axes = plt.subplots(lines, 2, figsize=(14, 3.4 * lines), squeeze=False, facecolor=BG)
        fig.suptitle(title, color=TEXT, x=0.01, ha="left", fontsize=13, fontweight="bold")
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels):
            ax.set_facecolor(PANEL_BG)
            ax.set_title(panel["title"], color=TEXT, loc="left", fontsize=10)
            ax.tick_params(colors=DIM, labelsize=8)
            for spine in ax.spines.values():
                spine.set_color(GRID)
            ax.grid(color=GRID, linewidth=0.6)
            unit = panel.get("yaxes", [{}])[0].get("format", "short")
            scale, label = {"s": (1000.0, "ms"), "percentunit": (100.0, "%"), "reqps": (1.0, "req/s")}.get(
                unit, (1.0, ""))
            ax.set_ylabel(label, color=DIM, fontsize=8)
            ax.set_xlabel("seconds", color=DIM, fontsize=8)
            series = []
            for target in panel["targets"]:
                for result in data[target["expr"]]:
                    points = [(float(t) - start, float(v) * scale) for t, v in result["values"]
                              if v not in ("NaN", "+Inf", "-Inf")]
                    if points and any(v for _, v in points):
                        series.append((legend(target.get("legendFormat", ""), result["metric"]), points))
            for index, (name, points) in enumerate(sorted(series)):
                xs, ys = zip(*points)
                color = PALETTE[index % len(PALETTE)]
                ax.plot(xs, ys, color=color, linewidth=1.2, label=name)
                ax.fill_between(xs, ys, color=color, alpha=0.08)
            if series:
                ax.set_ylim(bottom=0)
                ax.legend(loc="upper left", fontsize=7, facecolor=PANEL_BG, edgecolor=GRID, labelcolor=TEXT,
                          ncol=2 if len(series) > 4 else 1)
            else:
                ax.text(0.5, 0.5, "no data", color=DIM, ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out / f"dashboard-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.png"
        fig.savefig(path, dpi=80, facecolor=BG)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the traffic runs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    board = json.loads(DASHBOARD.read_text())
    rows = panels_by_row(board)
    with tempfile.TemporaryDirectory(prefix="gateway-dashboard-") as tmp:
        stack = Stack(Path(tmp))
        try:
            url, prom_port = stack.start()
            # Prometheus is up once it answers its readiness endpoint; the first scrape follows within a second.
            wait_port("127.0.0.1", prom_port)
            start = time.time()
            asyncio.run(traffic(url, stack, args.seconds))
            end = time.time() + 2 * SCRAPE_S
            deadline = time.monotonic() + 30
            while time.time() < end and time.monotonic() < deadline:  # the last scrapes after the traffic
                time.sleep(0.2)
            data = {target["expr"]: query_range(prom_port, target["expr"], start, end)
                    for _, panels in rows for panel in panels for target in panel["targets"]}
        finally:
            stack.stop()
    for path in plot(rows, data, start, out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
