"""The gateway's configuration, in one place.

Every setting has one row in OPTIONS: its flag, the env vars it reads (Ray's
own name where one exists), its type, default and help. The Config dataclass,
the flags, the env, the config file, `gateway serve --help` and the docs'
configuration reference are all generated from that table, so they cannot
drift apart. Precedence: flag > env > config file > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A user mistake in flags, env or config file: reported in one line, no traceback."""


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"expected a boolean (1/0, true/false), got {text!r}")


def _auto_bool(text: str | bool | None) -> bool | None:
    """A switch that may also be left to the gateway: `auto` (None) decides from the rest of the config."""
    if text is None or isinstance(text, str) and text.strip().lower() == "auto":
        return None
    try:
        return _bool(text)
    except ConfigError:
        raise ConfigError(f"expected a boolean (1/0, true/false) or auto, got {text!r}") from None


_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(text: str | float) -> float:
    """Seconds, also in HAProxy's time format ("250ms", "5s", "1m"), since Ray's HAProxy env vars carry units."""
    if isinstance(text, (int, float)):
        return float(text)
    value = str(text).strip().lower()
    for unit in ("us", "ms", "s", "m", "h", "d"):
        if value.endswith(unit) and value[: -len(unit)].replace(".", "", 1).isdigit():
            return float(value[: -len(unit)]) * _TIME_UNITS[unit]
    return float(value)


def _list(text: str | Sequence[str]) -> list[str]:
    if isinstance(text, str):
        return [item.strip() for item in text.split(",") if item.strip()]
    return [str(item) for item in text]


@dataclass(frozen=True)
class Option:
    name: str
    env: tuple[str, ...]
    kind: Callable[[Any], Any]
    default: Any
    help: str
    flag: str | None = None
    repeat: bool = False  # list options: the flag may be given many times

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("host", ("GATEWAY_HOST",), str, "127.0.0.1", "address to listen on"),
    Option("port", ("GATEWAY_PORT",), int, 8000, "port to listen on"),
    Option("workers", ("GATEWAY_WORKERS",), int, 1, "worker processes sharing the port (SO_REUSEPORT)"),
    Option("routers", ("GATEWAY_ROUTERS",), _list, [], "router base URL speaking POST /internal/route (repeat; env: comma-separated)",
           flag="--router", repeat=True),
    Option("replicas", ("GATEWAY_REPLICAS",), _list, [], "replica direct-ingress target [ID=]URL; ID is the replica_id the router names, default host:port (repeat; env: comma-separated)",
           flag="--replica", repeat=True),
    Option("ray_address", ("GATEWAY_RAY_ADDRESS",), str, "", "discover routers and replicas from this Ray cluster (GCS address) instead of static lists"),
    Option("app", ("GATEWAY_RAY_APP",), str, "", "front only this Ray Serve application (default: every application, matched by route prefix, longest first)"),
    Option("node_ip", ("GATEWAY_NODE_IP",), str, "",
           "this node's IP: its routers are asked first, the others on failure (default with --ray-address: --host unless 0.0.0.0/::, else Ray's node IP; static mode: no preference)"),
    Option("route_by_model", ("GATEWAY_ROUTE_BY_MODEL",), _bool, False,
           "a POST whose JSON body names a `model` goes to the app serving it, whatever the path; GET /v1/models lists every app's models; an unknown model: 404 model_not_found (parses each POST body)"),
    Option("strict_replica_id", ("GATEWAY_STRICT_REPLICA_ID",), _bool, False,
           "accept a decision only by replica_id; off: a decision naming a known host:port is also accepted (always on with Ray discovery, where ports get reused)"),
    Option("forward_body", ("RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY", "GATEWAY_FORWARD_BODY"), _bool, False,
           "send the request body to the router (needed by prefix-aware policies and LoRA)"),
    Option("router_body_cap", ("RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE", "GATEWAY_ROUTER_BODY_CAP"), int, 8 * MiB,
           "most body bytes sent to the router; a longer body is cut and marked X-Body-Truncated: sent/total"),
    Option("router_timeout_s", ("RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S", "GATEWAY_ROUTER_TIMEOUT_S"), _seconds, 5.0,
           "deadline for one routing decision (connect + send + answer); past it: 504 router_timeout"),
    Option("router_fallback", ("GATEWAY_ROUTER_FALLBACK",), str, "auto",
           "when no router can decide (router_unreachable, router_timeout, a 5xx router_non_200): `proxy` sends the request to the app's fallback Serve proxy (Ray mode; least-loaded if there is none), `least-loaded` to the least-loaded healthy replica, `off` answers 503/504; `auto` = proxy in Ray mode, off in static mode"),
    Option("session_header", ("RAY_SERVE_SESSION_ID_HEADER_KEY", "GATEWAY_SESSION_HEADER"), str, "x-session-id",
           "session header forwarded to the router for stickiness ('-' and '_' spellings both accepted)"),
    Option("router_idle_s", ("GATEWAY_ROUTER_IDLE_S",), _seconds, 4.0,
           "close pooled router connections idle this long (below the router's keep-alive timeout, uvicorn's is 5 s)"),
    Option("upstream_idle_s", ("GATEWAY_UPSTREAM_IDLE_S",), _seconds, 4.0,
           "close pooled replica connections idle this long (below vLLM's 5 s keep-alive timeout)"),
    Option("connect_timeout_s", ("RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S", "GATEWAY_CONNECT_TIMEOUT_S"), _seconds, 5.0,
           "TCP connect timeout to a replica"),
    Option("first_byte_timeout_s", ("GATEWAY_FIRST_BYTE_TIMEOUT_S",), _seconds, 600.0,
           "longest wait for a replica's response head (a long queue before the first token is normal for LLMs); 0 = none"),
    Option("idle_timeout_s", ("GATEWAY_IDLE_TIMEOUT_S",), _seconds, 600.0,
           "longest silence inside a response stream before the gateway gives up on the replica; 0 = none"),
    Option("tunnel_timeout_s", ("GATEWAY_TUNNEL_TIMEOUT_S",), _seconds, 3600.0,
           "a WebSocket tunnel with no byte in either direction this long is closed (HAProxy's `timeout tunnel`); 0 = none"),
    Option("client_timeout_s", ("GATEWAY_CLIENT_TIMEOUT_S",), _seconds, 90.0,
           "close client keep-alive connections idle this long (Ray's keep_alive_timeout_s)"),
    Option("header_timeout_s", ("GATEWAY_HEADER_TIMEOUT_S",), _seconds, 10.0,
           "a client must send a whole request head (and body) within this time (slowloris guard): 408"),
    Option("max_header_bytes", ("GATEWAY_MAX_HEADER_BYTES",), int, 64 * 1024, "largest request head accepted: 431"),
    Option("max_body_bytes", ("GATEWAY_MAX_BODY_BYTES",), int, 64 * MiB, "largest request body accepted: 413, before anything is forwarded"),
    Option("max_buffered_body_bytes", ("GATEWAY_MAX_BUFFERED_BODY_BYTES",), int, 1024 * MiB,
           "request bodies held in memory at once, all connections together; a request past it: 503 overloaded; 0 = no limit"),
    Option("trust_forwarded", ("GATEWAY_TRUST_FORWARDED",), _bool, False,
           "keep a client's X-Forwarded-For (appending its address) and X-Forwarded-Proto (a proxy in front of the gateway); "
           "false: both are replaced by what the gateway sees"),
    Option("max_connections", ("RAY_SERVE_HAPROXY_MAXCONN", "GATEWAY_MAX_CONNECTIONS"), int, 4096,
           "client connections accepted at once; past it new connections get 503 and are closed"),
    Option("max_in_flight", ("GATEWAY_MAX_IN_FLIGHT",), int, 0, "requests relayed at once in total; past it: 503 + Retry-After; 0 = no limit"),
    Option("max_in_flight_per_replica", ("GATEWAY_MAX_IN_FLIGHT_PER_REPLICA",), int, 0,
           "requests in flight to one replica; past it: 429 + Retry-After; 0 = no limit"),
    Option("saturation_in_flight", ("GATEWAY_SATURATION_IN_FLIGHT",), int, 0,
           "admission: a replica with this many requests in flight is saturated; when every replica of an app is, new POSTs wait in the gateway's queue (priority bands, fair across keys); 0 = no in-flight target"),
    Option("saturation_burst", ("GATEWAY_SATURATION_BURST",), int, 0,
           "admission: a key below its weighted share of the in-flight target may go this many requests per replica past it, so a key that is not flooding never waits behind one that is (the replicas must have that room: vLLM's max_num_seqs above the target); 0 = off"),
    Option("saturation_engine", ("GATEWAY_SATURATION_ENGINE",), _bool, False,
           "admission: read each vLLM replica's /metrics (num_requests_waiting, num_requests_running, KV cache usage) in the health loop; a replica whose engine queues requests, or whose KV cache is past --saturation-kv, is saturated"),
    Option("saturation_kv", ("GATEWAY_SATURATION_KV",), float, 0.95, "admission: KV cache usage (0..1) at which a vLLM replica is saturated"),
    Option("engine_metrics_interval_s", ("GATEWAY_ENGINE_METRICS_INTERVAL_S",), _seconds, 1.0,
           "admission: how often the health loop reads a vLLM replica's /metrics (with --saturation-engine)"),
    Option("queue_size", ("GATEWAY_QUEUE_SIZE",), int, 1024,
           "admission: requests waiting per app at most; past it the one furthest behind (lowest band, the key most over its share) gets 429 queue_full"),
    Option("queue_timeout_s", ("GATEWAY_QUEUE_TIMEOUT_S",), _seconds, 30.0,
           "admission: longest wait in the queue; past it: 429 queue_timeout + Retry-After"),
    Option("health_path", ("GATEWAY_HEALTH_PATH",), str, "/health", "replica health-check path (Ray replicas: /-/healthz)"),
    Option("health_interval_s", ("RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER", "GATEWAY_HEALTH_INTERVAL_S"), _seconds, 5.0, "health-check interval of a stable replica"),
    Option("health_fast_interval_s", ("RAY_SERVE_HAPROXY_HEALTH_CHECK_FASTINTER", "GATEWAY_HEALTH_FAST_INTERVAL_S"), _seconds, 0.25,
           "health-check interval while a replica is down or changing state"),
    Option("health_fall", ("RAY_SERVE_HAPROXY_HEALTH_CHECK_FALL", "GATEWAY_HEALTH_FALL"), int, 2, "failed checks that mark a replica down"),
    Option("health_rise", ("RAY_SERVE_HAPROXY_HEALTH_CHECK_RISE", "GATEWAY_HEALTH_RISE"), int, 2, "passed checks that mark a replica up"),
    Option("health_timeout_s", ("GATEWAY_HEALTH_TIMEOUT_S",), _seconds, 2.0, "timeout of one health check"),
    # Ray's names: its proxy stays up, reporting unready, for at least PROXY_MIN_DRAINING_PERIOD_S, and its HAProxy
    # ends a soft stop by `hard-stop-after` (ray/serve/_private/constants.py and haproxy.py, Ray 2.60.0): one after
    # the other, as here.
    Option("min_draining_s", ("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", "GATEWAY_MIN_DRAINING_S"), _seconds, 0.0,
           "on SIGTERM, keep accepting (and serving) this long while /-/ready answers 503, so a load balancer stops sending first; then stop accepting; 0 = stop accepting at once"),
    Option("drain_timeout_s", ("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", "GATEWAY_DRAIN_TIMEOUT_S"), _seconds, 30.0,
           "on SIGTERM, once the gateway stops accepting (after the minimum draining period), how long requests in flight may run before they are cut and the gateway exits"),
    Option("coalesce_ms", ("GATEWAY_COALESCE_MS",), float, 1.0,
           "when a replica's chunks arrive back to back, read them in batches at most this far apart (fewer syscalls per chunk); tokens spaced wider are relayed at once; 0 = off"),
    Option("coalesce_min_streams", ("GATEWAY_COALESCE_MIN_STREAMS",), int, 4,
           "coalesce only while at least this many requests are in flight: when idle, every chunk goes out at once"),
    Option("native_relay", ("GATEWAY_NATIVE_RELAY",), _bool, True,
           "relay chunked response bodies through the C stream pump when it is built (fewer CPU cycles per token); false = every chunk through Python"),
    Option("otlp_endpoint", ("GATEWAY_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), str, "",
           "send OpenTelemetry traces to this OTLP/HTTP collector (http://host:4318, or the full .../v1/traces URL); needs the otel extra; empty = tracing off"),
    Option("trace_sample_ratio", ("GATEWAY_TRACE_SAMPLE_RATIO",), float, 0.01,
           "share of requests traced when an OTLP endpoint is set (0..1); a client's sampled traceparent is always traced"),
    Option("api_key", ("GATEWAY_API_KEY",), str, "",
           "one API key clients must send as 'Authorization: Bearer KEY' (like vLLM's --api-key); its name is 'default'"),
    Option("api_keys_file", ("GATEWAY_API_KEYS_FILE",), str, "",
           "TOML file of [[keys]] (name, sha256, optional rps, burst, max_in_flight, models, tokens_per_minute, tokens_per_day, priority, weight, may_set_priority); reloaded on SIGHUP"),
    Option("token_accounting", ("GATEWAY_TOKEN_ACCOUNTING",), _auto_bool, None,
           "count every completion's prompt and completion tokens per key and model (gateway_tokens_total, /-/usage, "
           "the access log); auto: on when API keys are configured (each key is a tenant), off without (`gateway up` "
           "turns it on); always on for keys with a token budget. On, a stream whose client did not ask for usage is "
           "sent with stream_options.include_usage and its usage chunk is removed from what the client gets "
           "(see docs/security.md)"),
    Option("token_default_max_tokens", ("GATEWAY_TOKEN_DEFAULT_MAX_TOKENS",), int, 1024,
           "completion tokens a token budget reserves for a request that sets no max_tokens"),
    Option("token_minute_s", ("GATEWAY_TOKEN_MINUTE_S",), _seconds, 60.0,
           "length of the tokens_per_minute window (shorter only to test budgets)"),
    Option("token_state_file", ("GATEWAY_TOKEN_STATE_FILE",), str, "",
           "file keeping today's token totals across restarts (default $XDG_STATE_HOME or ~/.local/state, "
           "then gateway/tokens-PORT.json)"),
    Option("quota_ledger", ("GATEWAY_QUOTA_LEDGER",), _bool, True,
           "with --ray-address: keys' limits hold for the whole cluster, lent out by one quota ledger actor"),
    Option("upstream_api_key", ("GATEWAY_UPSTREAM_API_KEY",), str, "",
           "Authorization sent to replicas (a vLLM started with --api-key); the client's own never reaches them"),
    Option("tls_cert", ("GATEWAY_TLS_CERT",), str, "", "PEM certificate chain: the public listener speaks HTTPS (TLS 1.2+); reloaded on SIGHUP"),
    Option("tls_key", ("GATEWAY_TLS_KEY",), str, "", "PEM private key of --tls-cert"),
    Option("tls_client_ca", ("GATEWAY_TLS_CLIENT_CA",), str, "", "PEM CA bundle: require client certificates signed by it (mTLS)"),
    Option("admin_port", ("GATEWAY_ADMIN_PORT",), int, 0,
           "serve /-/routes and /-/metrics on this port only (the public port keeps /-/healthz and /-/ready); 0 = off"),
    Option("admin_host", ("GATEWAY_ADMIN_HOST",), str, "127.0.0.1", "address of the admin listener"),
    Option("cors_origins", ("GATEWAY_CORS_ORIGINS",), _list, [],
           "origins browsers may call the gateway from (comma-separated, or *); the gateway answers preflights itself"),
    Option("resume_limit", ("GATEWAY_RESUME_LIMIT",), int, 0,
           "times one streamed completion may be resumed on another replica when its replica dies mid-stream (token-exact, see docs/resume.md); 0 = off"),
    Option("drain_migrate_after_s", ("GATEWAY_DRAIN_MIGRATE_AFTER_S",), _seconds, 3.0,
           "with --resume-limit: streams still on a replica this long after it left the target set (Serve scale-down, redeploy, POST /-/replicas/ID/drain) move to other replicas, token-exact, so it can go in seconds (see docs/resume.md)"),
    Option("responses_affinity", ("GATEWAY_RESPONSES_AFFINITY",), _bool, True,
           "Responses API (see docs/resume.md): name the replica in each response id, so a previous_response_id follow-up (or a GET/cancel of it) reaches the replica holding its state, from any gateway sharing --cluster-secret; a gone replica: 404 response_replica_gone"),
    Option("cluster_secret", ("GATEWAY_CLUSTER_SECRET",), str, "",
           "secret every gateway of a cluster shares: authenticates the replica named in Responses API ids (HMAC-SHA256); empty = a random one per gateway process (shared by its workers)"),
    Option("outlier_failures", ("GATEWAY_OUTLIER_FAILURES",), int, 5,
           "passive outlier ejection: a replica failing this many requests in a row (connect failure, cut stream, engine error, 5xx) leaves rotation for a while; 0 = off"),
    Option("outlier_ejection_s", ("GATEWAY_OUTLIER_EJECTION_S",), _seconds, 10.0,
           "first ejection's length; each further ejection in a row (no success in between) adds as much again"),
    Option("outlier_max_ejection_s", ("GATEWAY_OUTLIER_MAX_EJECTION_S",), _seconds, 300.0, "longest ejection"),
    Option("access_log", ("GATEWAY_ACCESS_LOG",), _bool, True, "one JSON line per request on stdout (written off the event loop)"),
    Option("access_log_buffer_bytes", ("GATEWAY_ACCESS_LOG_BUFFER_BYTES",), int, 8 * MiB,
           "most access-log bytes held for a slow or gone stdout reader; past it lines are dropped and counted (gateway_access_log_dropped_lines)"),
    Option("log_level", ("GATEWAY_LOG_LEVEL",), str, "info", "debug, info, warning or error"),
)

_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class ReplicaSpec:
    replica_id: str
    host: str
    port: int


def parse_url(url: str, what: str) -> tuple[str, int]:
    """host and port of an http:// URL; anything else is a configuration error."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http":
        raise ConfigError(f"{what} {url!r}: only http:// is supported")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ConfigError(f"{what} {url!r}: {exc}") from None
    if not parts.hostname:
        raise ConfigError(f"{what} {url!r}: no host")
    if parts.path not in ("", "/"):
        raise ConfigError(f"{what} {url!r}: give the base URL, without a path")
    return parts.hostname, port


def parse_replica(text: str) -> ReplicaSpec:
    replica_id, sep, url = text.partition("=")
    if not sep or "://" in replica_id:
        replica_id, url = "", text
    host, port = parse_url(url, "replica")
    return ReplicaSpec(replica_id or f"{host}:{port}", host, port)


# The Python type of each option's value, from the parser that makes it.
_TYPES: dict[Callable[[Any], Any], Any] = {str: str, int: int, float: float, _bool: bool, _seconds: float,
                                           _list: list[str], _auto_bool: bool | None}


class _ConfigMethods:
    """What a Config can do; its fields are made from OPTIONS below (one row per option, defaults there)."""

    @property
    def router_addresses(self) -> list[tuple[str, int]]:
        return [parse_url(url, "router") for url in self.routers]

    @property
    def replica_specs(self) -> list[ReplicaSpec]:
        return [parse_replica(text) for text in self.replicas]

    @property
    def otlp_traces_url(self) -> str:
        """The collector's traces URL: a base URL gets OTLP/HTTP's /v1/traces, a full one is kept."""
        endpoint = self.otlp_endpoint.strip()
        if not endpoint:
            return ""
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"otlp endpoint {endpoint!r}: give the OTLP/HTTP URL, e.g. http://127.0.0.1:4318 "
                              "(OTLP over gRPC is not supported)")
        if parts.path in ("", "/"):
            return endpoint.rstrip("/") + "/v1/traces"
        return endpoint

    @property
    def counts_tokens(self) -> bool:
        """Whether every completion is metered (token_accounting; auto: when the gateway checks API keys)."""
        if self.token_accounting is None:
            return bool(self.api_key or self.api_keys_file)
        return bool(self.token_accounting)

    @property
    def front_door(self) -> bool:
        """Whether requests pass the security checks at all: off, the data plane pays nothing for them."""
        return bool(self.api_key or self.api_keys_file or self.upstream_api_key or self.cors_origins
                    or self.admin_port or self.counts_tokens)

    @property
    def mode(self) -> str:
        return "ray" if self.ray_address else "static"

    @property
    def admission(self) -> bool:
        """Whether POSTs pass admission control (a queue when saturated): off, the data plane pays nothing."""
        return bool(self.saturation_in_flight or self.saturation_engine)

    @property
    def router_fallback_mode(self) -> str:
        """off, proxy or least-loaded: what a request gets when no router answers."""
        if self.router_fallback == "auto":
            return "proxy" if self.mode == "ray" else "off"
        return self.router_fallback

    def validate(self) -> "Config":
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log level {self.log_level!r}: use debug, info, warning or error")
        for name in ("router_timeout_s", "connect_timeout_s", "router_idle_s", "upstream_idle_s", "health_interval_s",
                     "health_fast_interval_s", "health_timeout_s", "client_timeout_s", "header_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.router_fallback not in ("auto", "off", "proxy", "least-loaded"):
            raise ConfigError(f"router fallback {self.router_fallback!r}: use auto, off, proxy or least-loaded")
        if self.saturation_in_flight < 0 or self.queue_size < 0 or self.saturation_burst < 0:
            raise ConfigError("saturation_in_flight, saturation_burst and queue_size must be >= 0")
        if not 0.0 < self.saturation_kv <= 1.0:
            raise ConfigError("saturation_kv must be in (0, 1]")
        if self.queue_timeout_s <= 0 or self.engine_metrics_interval_s <= 0:
            raise ConfigError("queue_timeout_s and engine_metrics_interval_s must be > 0")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ConfigError("trace sample ratio must be between 0 and 1")
        self.otlp_traces_url  # noqa: B018 - parse now, so a bad URL fails at startup
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("give both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        if not 0 <= self.admin_port < 65536:
            raise ConfigError(f"admin port {self.admin_port} is out of range")
        if self.admin_port and self.admin_port == self.port:
            raise ConfigError("the admin port must differ from the public port")
        if self.min_draining_s < 0 or self.drain_timeout_s < 0:
            raise ConfigError("min_draining_s and drain_timeout_s must be >= 0")
        if self.access_log_buffer_bytes <= 0:
            raise ConfigError("access_log_buffer_bytes must be > 0")
        if self.drain_migrate_after_s < 0:
            raise ConfigError("drain_migrate_after_s must be >= 0")
        if self.tunnel_timeout_s < 0:
            raise ConfigError("tunnel_timeout_s must be >= 0")
        if self.resume_limit < 0:
            raise ConfigError("resume_limit must be >= 0")
        if self.outlier_failures < 0:
            raise ConfigError("outlier_failures must be >= 0")
        if self.outlier_failures and not 0 < self.outlier_ejection_s <= self.outlier_max_ejection_s:
            raise ConfigError("outlier ejection times must be > 0, the first no longer than the longest")
        if not self.health_path.startswith("/"):
            raise ConfigError("health path must start with /")
        self.router_addresses  # noqa: B018 - parse now, so a bad URL fails at startup
        specs = self.replica_specs
        ids = [spec.replica_id for spec in specs]
        if len(set(ids)) != len(ids):
            raise ConfigError("two replicas share one replica id")
        if not self.ray_address and not specs:
            raise ConfigError("no replicas: give --replica [ID=]URL (or GATEWAY_REPLICAS), or --ray-address")
        return self

    def with_changes(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def _field(option: Option) -> Any:
    if isinstance(option.default, list):
        return field(default_factory=lambda default=option.default: list(default))
    return field(default=option.default)


# One field per row of OPTIONS, its default taken from the row: adding an option is adding its row.
Config = dataclasses.make_dataclass(
    "Config", [(option.name, _TYPES.get(option.kind, Any), _field(option)) for option in OPTIONS],
    bases=(_ConfigMethods,),
    namespace={"__doc__": "Everything the gateway process needs, resolved and validated.", "__module__": __name__})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; defaults are None so 'not given' can fall through to env and file."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the options below (flag and env win)")
    for option in OPTIONS:
        env = ", ".join(option.env)
        default = ",".join(option.default) if isinstance(option.default, list) else option.default
        if option.kind is _auto_bool and default is None:
            default = "auto"
        text = f"{option.help} [env: {env}; default: {default!s}]"
        if option.kind in (_bool, _auto_bool):
            parser.add_argument(option.cli_flag, dest=option.name, default=None,
                                action=argparse.BooleanOptionalAction, help=text)
        elif option.repeat:
            parser.add_argument(option.cli_flag, dest=option.name, default=None, action="append", help=text)
        else:
            parser.add_argument(option.cli_flag, dest=option.name, default=None, help=text)


def _coerce(option: Option, raw: Any, source: str) -> Any:
    try:
        return option.kind(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError):
        kind = {"_seconds": "duration (5, 5s, 250ms)", "_list": "list"}.get(option.kind.__name__, option.kind.__name__)
        raise ConfigError(f"{source}: {raw!r} is not a valid {kind}") from None


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    # Both a flat file and a [gateway] table are accepted; '-' and '_' both work in keys.
    data = data.get("gateway", data)
    values = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        name = {"router": "routers", "replica": "replicas"}.get(name, name)
        if name not in _BY_NAME:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        values[name] = _coerce(_BY_NAME[name], raw, f"config file {path}, {key}")
    return values


def resolve(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Merge defaults < config file < env < flags into a validated Config."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None) or environ.get("GATEWAY_CONFIG")
    if config_file:
        values.update(load_file(config_file))
    for option in OPTIONS:
        for env_name in option.env:
            if env_name in environ:
                values[option.name] = _coerce(option, environ[env_name], f"env {env_name}")
                break
        given = getattr(args, option.name, None) if args is not None else None
        if given is not None:
            if option.repeat:
                given = [item for text in given for item in _list(text)]
            values[option.name] = _coerce(option, given, option.cli_flag)
    return Config(**values).validate()
