"""The Grafana dashboard (deploy/grafana/gateway.json) queries only metrics the gateway really exports."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import httpx

from replicas.mock_engine import prompt_ids
from tests.conftest import CHAT, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway.json"


def panels(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return found


def queried_metrics(board: dict) -> set[str]:
    names = set()
    for panel in panels(board):
        for target in panel.get("targets", []):
            names.update(re.findall(r"\b(gateway_[a-z_]+)\b", target["expr"]))
    for var in board["templating"]["list"]:
        names.update(re.findall(r"\b(gateway_[a-z_]+)\b", var.get("definition", "")))
    return names


def exported(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (what a query can select)."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_file_is_what_the_generator_writes() -> None:
    render = runpy.run_path(str(ROOT / "deploy" / "grafana" / "make_dashboard.py"))["render"]
    assert DASHBOARD.read_text() == render(), "run: python deploy/grafana/make_dashboard.py"
    board = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == "${datasource}" and panel["targets"], panel["title"]
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_every_metric_a_panel_queries_is_exported(stack) -> None:
    r1, r2 = stack.replica("r1"), stack.replica("r2")
    router = stack.router([r1, r2])
    # The gateway knows r1 only: the round-robin router's decisions for r2 are unknown replicas (a mismatch).
    gateway = stack.gateway([router], [r1], "--resume-limit", "1")
    url = gateway.url
    statuses = []
    for _ in range(4):
        body = {**CHAT, "stream": True, "itl_ms": 5}
        statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).status_code)
    assert 200 in statuses and 503 in statuses
    # A response cut after its head, and a replica that closes before it (a retry, then a named 503).
    assert httpx.get(f"{url}/v1/models", headers={"x-mock-fault": "die-before-head"}, timeout=10).status_code == 503
    try:
        httpx.get(f"{url}/v1/models", headers={"x-mock-fault": "die-mid-stream"}, timeout=10)
    except httpx.HTTPError:
        pass  # the client sees the broken body: that is the point
    # A stream broken mid-response with resume on: whatever the outcome, it is counted.
    body = {"model": "mock", "prompt": "hello", "max_tokens": 8, "stream": True}
    cut_at = len(prompt_ids(False, body)) + 3
    for _ in range(4):  # the router alternates with r2, which this gateway refuses before any stream starts
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10,
                          headers={"x-mock-fault": "close-mid-stream", "x-mock-die-at": f"{cut_at}"}) as response:
            try:
                response.read()
            except httpx.HTTPError:
                pass
        if response.status_code == 200:
            break
    # The router goes away: decisions fail with a router_* reason.
    router.child.stop()
    answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
    assert answer.headers["x-serve-reason"].startswith("router_")

    wanted = queried_metrics(json.loads(DASHBOARD.read_text()))
    assert len(wanted) >= 12
    wait_until(lambda: not wanted - exported(gateway.metrics()), deadline_s=10,
               what=f"the dashboard's metrics {sorted(wanted - exported(gateway.metrics()))} in /-/metrics")
