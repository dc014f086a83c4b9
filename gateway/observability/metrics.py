"""Prometheus metrics (prometheus-client), served at /-/metrics.

Hot-path updates go through label children resolved once and cached, because
`.labels(...)` costs more than the increment itself. Router metric names follow
Ray's HAProxy ingress-router metrics (serve_haproxy_ingress_router_*, ray/serve/_private/haproxy_metrics.py,
Ray 2.60.0) so dashboards carry over.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_GAP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class HotHistogram(Collector):
    """A labelled histogram for per-request observations, exported through prometheus-client.

    Written by hand because prometheus-client's Histogram.observe walks its buckets in a
    Python loop under a lock (~3 us); here it is one C bisect and two adds. The event loop
    is single-threaded, so no lock is needed.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.label_names = list(labels)
        self.bounds = list(buckets)
        self.children: dict[tuple[str, ...], list[float]] = {}  # counts per bucket (+Inf last), then the sum
        registry.register(self)

    def child(self, *labels: str) -> list[float]:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = [0.0] * (len(self.bounds) + 2)
        return child

    def observe(self, child: list[float], value: float) -> None:
        child[bisect.bisect_left(self.bounds, value)] += 1
        child[-1] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        for labels, child in self.children.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip([*map(str, self.bounds), "+Inf"], child[:-1]):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, child[-1])
        yield family


RouterCalls = tuple[str, str, bool, int]  # app, router host:port, on this node, calls sent


class RouterCounts(Collector):
    """The router clients' own counts (calls per router, bodies truncated), read when /-/metrics is scraped.

    The router client counts with one integer add per call; reading those counts here, instead of copying
    them into prometheus-client counters at each scrape, needs no remembered last value per series.
    """

    def __init__(self, registry: CollectorRegistry):
        self.read: Callable[[], tuple[int, Iterable[RouterCalls]]] = lambda: (0, ())
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        truncations, calls = self.read()
        family = CounterMetricFamily("gateway_router_body_truncations", "Bodies cut to the router body cap")
        family.add_metric([], truncations)
        yield family
        family = CounterMetricFamily("gateway_router_calls", "Routing calls sent, by app and router (local: on "
                                     "this node)", labels=["app", "router", "local"])
        for app, router, local, count in calls:
            family.add_metric([app, router, "true" if local else "false"], count)
        yield family


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("gateway_requests", "Requests answered, by route kind, status, failure reason and API key name",
                                ["route", "status", "reason", "key"], registry=registry)
        self.router_failures = Counter("gateway_router_failures", "Failed routing decisions by reason",
                                       ["reason"], registry=registry)
        self.router_latency = HotHistogram("gateway_router_latency_seconds", "Time to get a routing decision",
                                           ["outcome"], _LATENCY_BUCKETS, registry)
        self.mismatches = Counter("gateway_decision_mismatches",
                                  "Router decisions naming an unknown replica or an address that differs from ours",
                                  ["kind"], registry=registry)
        self.router_counts = RouterCounts(registry)
        self.pin_miss_fallbacks = Counter("gateway_pin_miss_fallbacks",
                                          "Decisions naming a replica not yet discovered, sent to the fallback proxy",
                                          ["app"], registry=registry)
        self.connect_latency = Histogram("gateway_upstream_connect_seconds", "TCP connect time to replicas",
                                         buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttfb = HotHistogram("gateway_time_to_first_byte_seconds", "Request start to the replica's response head",
                                 ["replica"], _LATENCY_BUCKETS, registry)
        # Per stream, not per chunk: an observation per chunk would cost more than relaying the chunk.
        self.chunk_gap = HotHistogram("gateway_stream_max_chunk_gap_seconds",
                                      "Largest gap between two reads of one response stream, per stream",
                                      ["replica"], _GAP_BUCKETS, registry)
        self.retries = Counter("gateway_retries", "Requests resent before the response head", ["kind"],
                               registry=registry)
        self.upstream_deaths = Counter("gateway_upstream_died", "Responses cut by the replica after the head",
                                       ["replica"], registry=registry)
        self.resumes = Counter("gateway_resumes", "Streams broken mid-response: resumed on another replica, "
                               "failed (no replica or the resume limit), or refused_<reason> (not resumable)",
                               ["outcome"], registry=registry)
        self.replica_failures = Counter("gateway_replica_failures", "Requests that failed on a replica (connect, "
                                        "cut stream, engine error)", ["replica"], registry=registry)
        self.ejections = Counter("gateway_outlier_ejections", "Replicas taken out of rotation for failing requests "
                                 "in a row (passive outlier ejection)", ["replica"], registry=registry)
        self.replica_ejected = Gauge("gateway_replica_ejected", "1 while the replica is ejected as an outlier",
                                     ["replica"], registry=registry)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being relayed now", registry=registry)
        self.connections = Gauge("gateway_client_connections", "Open client connections", registry=registry)
        self.pumped = Counter("gateway_native_relay_streams", "Response bodies relayed by the C stream pump "
                              "(--native-relay); the others go through Python", registry=registry)
        self.pumping = Gauge("gateway_native_relay_active", "Response bodies in the C stream pump now",
                             registry=registry)
        # Counted as a pumped stream ends (pumping.py): Stream.unmatched, an event of a resumed part that the pump
        # does not rewrite byte for byte as resume.py would (_pump.c, EV_RESUMED); it broke the stream there.
        self.pump_unmatched = Counter("gateway_native_relay_unmatched_events", "Events of resumed streams the C "
                                      "pump could not rewrite (not vLLM's compact JSON): each broke its stream, "
                                      "resumed again if --resume-limit allows, else cut. Not 0: a replica, or a "
                                      "proxy in front of it, writes JSON other than vLLM's", registry=registry)
        self.pool_idle = Gauge("gateway_pool_idle_connections", "Idle keep-alive connections by pool",
                               ["pool"], registry=registry)
        self.replica_up = Gauge("gateway_replica_healthy", "1 if the replica passes health checks", ["replica"],
                                registry=registry)
        # The access log's own health (observability/access_log.py): lines lost to a slow or gone stdout reader.
        self.access_log_dropped = Counter("gateway_access_log_dropped_lines", "Access-log lines dropped: stdout's "
                                          "reader is gone (EPIPE) or too slow for the bounded buffer",
                                          registry=registry)
        # WebSocket tunnels (dataplane/tunnel.py): opened, ended by how, bytes each way (counted by the sweep).
        self.tunnels_active = Gauge("gateway_tunnels_active", "WebSocket tunnels open now", registry=registry)
        self.tunnels = Counter("gateway_tunnels", "WebSocket tunnels ended, by how: client_closed, upstream_closed, "
                               "timeout (--tunnel-timeout-s), drain", ["outcome"], registry=registry)
        self.tunnel_bytes = Counter("gateway_tunnel_bytes", "Bytes relayed through WebSocket tunnels: in = client to "
                                    "replica, out = replica to client", ["direction"], registry=registry)
        self._tunnel_in = self.tunnel_bytes.labels("in")
        self._tunnel_out = self.tunnel_bytes.labels("out")
        # Token accounting (observability/usage.py), counted once per request at its end.
        self.tokens = Counter("gateway_tokens", "Tokens of completions relayed, from the replica's usage (a stream "
                              "cut short: what reached the client), by API key name, model and kind",
                              ["key", "model", "kind"], registry=registry)
        self.ledger_up = Gauge("gateway_quota_ledger_up", "1 while the cluster's quota ledger lends this gateway its "
                               "keys' limits; 0: an equal share (or no ledger: without Ray, or no keys)", registry=registry)
        self._token_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        # Accept side (process/refusal.py): clients answered 503 because the connection cap was reached; `limit`
        # says which cap: max_connections, or the lower one the file descriptor limit holds.
        self.connections_refused = Counter("gateway_connections_refused", "New clients answered 503 overloaded at "
                                           "accept: the connection cap was reached", ["limit"], registry=registry)
        # prometheus-client's process_* series (open and max fds, RSS, CPU), read from /proc at scrape time: the fd
        # headroom of the cap above (process/limits.py) is process_max_fds - process_open_fds.
        ProcessCollector(registry=registry)
        # Admission (gateway/dataplane/admission.py): updated only for requests that wait, never on the
        # unsaturated path. `key` is the API key's name ("" without keys); `band` its priority.
        self.queue_depth_gauge = Gauge("gateway_queue_depth", "Requests waiting for a saturated app, by app, "
                                       "priority band and API key", ["app", "band", "key"], registry=registry)
        self.queue_wait = HotHistogram("gateway_queue_wait_seconds", "Time requests waited in the admission queue "
                                       "before being routed", ["app", "band", "key"], _QUEUE_BUCKETS, registry)
        self.queue_shed_total = Counter("gateway_queue_shed", "Requests answered 429 from the admission queue "
                                        "(queue_timeout, queue_full)", ["app", "band", "key", "reason"],
                                        registry=registry)
        self.router_fallbacks = Counter("gateway_router_fallbacks", "Requests sent past an unanswering router: to "
                                        "the fallback proxy (Ray) or the least-loaded replica (--router-fallback)",
                                        ["app", "reason"], registry=registry)
        self._request_children: dict[tuple[str, int, str, str], Counter] = {}
        self._ok = self.router_latency.child("ok")
        self._failed = self.router_latency.child("failed")

    # -- hot path
    def request(self, route: str, status: int, reason: str, key_name: str = "") -> None:
        key = (route, status, reason, key_name)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, str(status), reason, key_name)
        child.inc()

    def tokens_used(self, key: str, model: str, prompt: int, completion: int) -> None:
        children = self._token_children.get((key, model))
        if children is None:
            children = self._token_children[(key, model)] = (self.tokens.labels(key, model, "prompt"),
                                                             self.tokens.labels(key, model, "completion"))
        children[0].inc(prompt)
        children[1].inc(completion)

    def first_byte(self, replica: str, seconds: float) -> None:
        self.ttfb.observe(self.ttfb.child(replica), seconds)

    def router_ok(self, seconds: float) -> None:
        self.router_latency.observe(self._ok, seconds)

    # -- failures and rarer events
    def router_failed(self, reason: str, seconds: float) -> None:
        self.router_failures.labels(reason).inc()
        self.router_latency.observe(self._failed, seconds)

    def decision_mismatch(self, kind: str) -> None:
        self.mismatches.labels(kind).inc()


    def queue_depth(self, app: str, band: int, key: str, delta: int) -> None:
        self.queue_depth_gauge.labels(app, str(band), key).inc(delta)

    def queue_waited(self, app: str, band: int, key: str, seconds: float) -> None:
        self.queue_wait.observe(self.queue_wait.child(app, str(band), key), seconds)

    def queue_shed(self, app: str, band: int, key: str, reason: str) -> None:
        self.queue_shed_total.labels(app, str(band), key, reason).inc()

    def connect_time(self, seconds: float) -> None:
        self.connect_latency.observe(seconds)

    def retry(self, kind: str) -> None:
        self.retries.labels(kind).inc()

    def upstream_died(self, replica: str) -> None:
        self.upstream_deaths.labels(replica).inc()

    def resume(self, outcome: str) -> None:
        self.resumes.labels(outcome).inc()

    def replica_failure(self, replica: str) -> None:
        self.replica_failures.labels(replica).inc()

    def tunnel_bytes_moved(self, bytes_in: int, bytes_out: int) -> None:
        if bytes_in:
            self._tunnel_in.inc(bytes_in)
        if bytes_out:
            self._tunnel_out.inc(bytes_out)

    def stream_gap(self, replica: str, seconds: float) -> None:
        self.chunk_gap.observe(self.chunk_gap.child(replica), seconds)

    # -- per-replica series: only for replicas in the target set (Ray replaces replicas, with new ids, on every
    # redeploy, autoscale and crash; a series per replica ever seen would grow without bound).
    def forget_replicas(self, live: set[str]) -> None:
        """Remove every per-replica series (and pool series) whose replica is not in `live`."""
        # Every metric whose first label is `replica` or `pool`, so one added later is covered too.
        for metric in list(vars(self).values()):
            if isinstance(metric, (Counter, Gauge, Histogram)) and metric._labelnames[:1] in (("replica",), ("pool",)):
                for labels in list(metric._metrics):  # prometheus-client has no public listing of a metric's children
                    if labels[0] not in live:
                        metric.remove(*labels)
            elif isinstance(metric, HotHistogram) and metric.label_names[:1] == ["replica"]:
                for labels in [labels for labels in metric.children if labels[0] not in live]:
                    del metric.children[labels]

    def render(self, refresh: Callable[["Metrics"], None] | None = None) -> bytes:
        if refresh is not None:
            refresh(self)
        return generate_latest(self.registry)
