#!/usr/bin/env python
"""Writes deploy/grafana/gateway.json, the Grafana dashboard for the gateway's /-/metrics.

Built like Ray 2.60's own Serve dashboards (ray/dashboard/modules/metrics/): the same legacy
graph panel, a `datasource` variable, 12-wide panels two to a line under collapsible rows, so
the gateway's board sits beside Ray's "Serve" and "Serve LLM" boards and reads the same way.

    python deploy/grafana/make_dashboard.py        # rewrite gateway.json after editing PANELS

tests/test_dashboard.py checks that gateway.json is what this script writes, and that every
metric a panel queries is one a running gateway exports.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "gateway.json"

# Every query is filtered by the dashboard's variables; `$__rate_interval` follows the scrape interval.
F = 'instance=~"$instance"'
R = f'{F},replica=~"$replica"'
W = "[$__rate_interval]"


@dataclass
class Panel:
    title: str
    description: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def quantiles(metric: str, labels: str, by: str = "", legend: str = "") -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    return [(f"histogram_quantile({q}, sum(rate({metric}_bucket{{{labels}}}{W})) by ({group}))",
             f"P{int(q * 100)}{' ' + legend if legend else ''}") for q in (0.5, 0.99)]


ROWS = [
    Row("Requests", [
        Panel("Requests per second by status",
              "Requests the gateway answered (relayed or refused), by HTTP status. Admin /-/ requests excluded.",
              "reqps",
              [(f'sum(rate(gateway_requests_total{{route="proxy",{F}}}{W})) by (status)', "{{status}}")],
              stack=True),
        Panel("Failures per second by reason",
              "Requests that ended with a named failure reason (the X-Serve-Reason header and the access log's "
              "`reason`): router_*, replica_unavailable, upstream_*, overloaded, client_abort, ...",
              "reqps",
              [(f'sum(rate(gateway_requests_total{{route="proxy",reason!="",{F}}}{W})) by (reason)', "{{reason}}")],
              stack=True),
        Panel("Error ratio (5xx)",
              "Share of relayed requests answered with a 5xx (the gateway's own 502/503/504 and the replicas').",
              "percentunit",
              [(f'sum(rate(gateway_requests_total{{route="proxy",status=~"5..",{F}}}{W})) / '
                f'sum(rate(gateway_requests_total{{route="proxy",{F}}}{W}))', "5xx ratio")]),
        Panel("In flight",
              "Requests being relayed now and open client connections (keep-alive ones included).",
              "short",
              [(f"sum(gateway_requests_in_flight{{{F}}})", "requests in flight"),
               (f"sum(gateway_client_connections{{{F}}})", "client connections")]),
    ]),
    Row("Router", [
        Panel("Router latency",
              "Time to a routing decision from POST /internal/route (Ray's LLMRouter), successful decisions.",
              "s", quantiles("gateway_router_latency_seconds", f'outcome="ok",{F}')),
        Panel("Router decisions per second",
              "Routing calls by outcome; a failed call ends its request with a router_* reason.",
              "reqps",
              [(f"sum(rate(gateway_router_latency_seconds_count{{{F}}}{W})) by (outcome)", "{{outcome}}")],
              stack=True),
        Panel("Router failures and mismatches",
              "Failed decisions by Ray's reason names; decisions naming a replica the gateway does not know "
              "(or at another address); bodies cut to the router body cap.",
              "reqps",
              [(f"sum(rate(gateway_router_failures_total{{{F}}}{W})) by (reason)", "{{reason}}"),
               (f"sum(rate(gateway_decision_mismatches_total{{{F}}}{W})) by (kind)", "mismatch: {{kind}}"),
               (f"sum(rate(gateway_router_body_truncations_total{{{F}}}{W}))", "body truncated")]),
    ]),
    Row("Replicas", [
        Panel("Time to first byte P50 per replica",
              "Request start (at the gateway) to the replica's response head: routing, queueing and prefill. "
              "For a stream this is the time to the first token event.",
              "s", quantiles("gateway_time_to_first_byte_seconds", R, by="replica", legend="{{replica}}")[:1]),
        Panel("Time to first byte P99 per replica",
              "As on the left, the 99th percentile: a replica with a long queue shows here first.",
              "s", quantiles("gateway_time_to_first_byte_seconds", R, by="replica", legend="{{replica}}")[1:]),
        Panel("Largest stream gap P99 per replica",
              "Per stream, the largest gap between two reads from the replica (an inter-token stall); "
              "the 99th percentile over the streams of each replica.",
              "s", quantiles("gateway_stream_max_chunk_gap_seconds", R, by="replica", legend="{{replica}}")[1:]),
        Panel("Responses per second per replica",
              "Responses whose head reached the gateway, per replica: how the router spreads the load.",
              "reqps",
              [(f"sum(rate(gateway_time_to_first_byte_seconds_count{{{R}}}{W})) by (replica)", "{{replica}}")],
              stack=True),
        Panel("Replica health",
              "1 while the replica passes the gateway's health checks (and no connect to it was refused).",
              "short",
              [(f"max(gateway_replica_healthy{{{R}}}) by (replica)", "{{replica}}")]),
        Panel("Retries and cut responses",
              "Resends before the response head, by kind (replica_failed, stale_connection, redispatch), and "
              "responses a replica cut after the head (the client saw a broken stream).",
              "reqps",
              [(f"sum(rate(gateway_retries_total{{{F}}}{W})) by (kind)", "retry: {{kind}}"),
               (f"sum(rate(gateway_upstream_died_total{{{R}}}{W})) by (replica)", "cut: {{replica}}")]),
        Panel("Resumes",
              "Streams broken mid-response, by outcome: resumed on another replica (the client saw a short pause), "
              "failed (no replica, or past --resume-limit), or refused_<reason> (not resumable exactly).",
              "reqps",
              [(f"sum(rate(gateway_resumes_total{{{F}}}{W})) by (outcome)", "{{outcome}}")]),
        Panel("Replica failures and outlier ejection",
              "Requests that failed on a replica (connect, cut stream, in-band engine error, 5xx), and 1 while a "
              "replica is out of rotation for failing in a row (passive outlier ejection).",
              "short",
              [(f"sum(rate(gateway_replica_failures_total{{{R}}}{W})) by (replica)", "failures/s: {{replica}}"),
               (f"max(gateway_replica_ejected{{{R}}}) by (replica)", "ejected: {{replica}}")]),
    ]),
    Row("Connections", [
        Panel("Idle pooled connections",
              "Idle keep-alive connections per replica pool and per router pool (router:host:port).",
              "short",
              [(f"sum(gateway_pool_idle_connections{{{F}}}) by (pool)", "{{pool}}")], stack=True),
        Panel("Replica connect time",
              "TCP connect time for new replica connections (a pooled connection needs none).",
              "s", quantiles("gateway_upstream_connect_seconds", F)
              + [(f"sum(rate(gateway_upstream_connect_seconds_count{{{F}}}{W}))", "connects/s")]),
    ]),
]

# Ray's graph panel (dashboards/common.py GRAPH_PANEL_TEMPLATE), minus its Ray-specific series overrides.
GRAPH = {
    "aliasColors": {}, "bars": False, "dashLength": 10, "dashes": False, "datasource": "${datasource}",
    "fieldConfig": {"defaults": {}, "overrides": []}, "fill": 10, "fillGradient": 0, "hiddenSeries": False,
    "legend": {"alignAsTable": True, "avg": True, "current": True, "hideEmpty": False, "hideZero": True,
               "max": True, "min": False, "rightSide": False, "show": True, "sort": "current", "sortDesc": True,
               "total": False, "values": True},
    "lines": True, "linewidth": 1, "nullPointMode": None, "options": {"alertThreshold": True}, "percentage": False,
    "pluginVersion": "7.5.17", "pointradius": 2, "points": False, "renderer": "flot", "seriesOverrides": [],
    "spaceLength": 10, "stack": True, "steppedLine": False, "thresholds": [], "timeFrom": None, "timeRegions": [],
    "timeShift": None, "tooltip": {"shared": True, "sort": 0, "value_type": "individual"}, "type": "graph",
    "xaxis": {"buckets": None, "mode": "time", "name": None, "show": True, "values": []},
    "yaxes": [{"format": "short", "label": "", "logBase": 1, "max": None, "min": "0", "show": True},
              {"format": "short", "label": None, "logBase": 1, "max": None, "min": None, "show": True}],
    "yaxis": {"align": False, "alignLevel": None},
}


def variable(name: str, label: str, query: str) -> dict:
    return {
        "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": "${datasource}", "definition": query, "hide": 0, "includeAll": True, "label": label,
        "multi": True, "name": name, "options": [], "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 1, "type": "query",
    }


def dashboard() -> dict:
    panels: list[dict] = []
    next_id = 1
    y = 0
    for row in ROWS:
        panels.append({"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": next_id,
                       "panels": [], "title": row.title, "type": "row"})
        next_id += 1
        y += 1
        for index, panel in enumerate(row.panels):
            graph = copy.deepcopy(GRAPH)
            graph.update({
                "id": next_id, "title": panel.title, "description": panel.description, "stack": panel.stack,
                "fill": 10 if panel.stack else 1,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": y + 8 * (index // 2)},
                "targets": [{"exemplar": True, "expr": expr, "interval": "", "legendFormat": legend,
                             "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(panel.targets)],
            })
            graph["yaxes"][0]["format"] = panel.unit
            panels.append(graph)
            next_id += 1
        y += 8 * ((len(row.panels) + 1) // 2)
    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": "-- Grafana --", "enable": True, "hide": True,
                                  "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                                  "type": "dashboard"}]},
        "description": "The gateway in front of Ray Serve LLM replicas: requests and failure reasons, the router, "
                       "time to first byte and stream gaps per replica, retries, pools, replica health. "
                       "Source: deploy/grafana/make_dashboard.py.",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": panels,
        "refresh": "10s",
        "schemaVersion": 27,
        "style": "dark",
        "tags": ["gateway", "ray-serve", "llm"],
        "templating": {"list": [
            {"current": {"selected": False}, "description": "The Prometheus that scrapes the gateway's /-/metrics.",
             "hide": 0, "includeAll": False, "label": "Data source", "multi": False, "name": "datasource",
             "options": [], "query": "prometheus", "refresh": 1, "regex": "", "skipUrlSync": False,
             "type": "datasource"},
            variable("instance", "Gateway", "label_values(gateway_requests_total, instance)"),
            variable("replica", "Replica", "label_values(gateway_replica_healthy, replica)"),
        ]},
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "Gateway",
        "uid": "gatewayDashboard",
        "version": 1,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
