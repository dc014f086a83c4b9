"""A standalone stand-in for Ray 2.60's `LLMRouter`, on the same contract.

`POST /internal/route` (body optional) answers 200 with the flat JSON
`{"host": str, "port": int, "replica_id": str}`; errors are FastAPI-style
`{"detail": str}`: 400 for a payload the policy cannot read, 503 when there is
no replica at all. `GET /health` is `{"status": "ok"}`. The original:
LLMRouter in ray/llm/_internal/serve/core/ingress/router.py (Ray 2.60.0).

Test hooks Ray does not have: `GET /-/stats` (`POST /-/reset`) and `--fault`.

    python -m replicas.router --port 8200 --replica r1=http://127.0.0.1:8100 \\
        --replica r2=http://127.0.0.1:8101 --policy consistent_hash
"""

from __future__ import annotations

import argparse
import logging
import os
import urllib.parse
from collections.abc import Sequence

import orjson

from replicas.health import HealthChecker
from replicas.http_server import HttpServer, Request, Responder, render_headers, run
from replicas.routing import POLICIES, LoadTracker, Replica, make_policy

log = logging.getLogger("replicas.router")

LAST_BODY_CAP = 64 * 1024
FAULTS = ("garbage", "truncated_json", "huge_body", "wrong_types", "outside_target", "slow",
          "status-400", "status-503", "close_early", "unknown_replica",
          # request_headers a gateway must refuse (malformed_decision): not a token, a framing header, not latin-1
          "header_name_space", "header_content_length", "header_host", "header_non_latin1")
_BAD_HEADERS = {"header_name_space": {"bad name": "1"}, "header_content_length": {"content-length": "0"},
                "header_host": {"Host": "evil.example"}, "header_non_latin1": {"x-model": "\u6a21\u578b"}}
_JSON = render_headers([("content-type", "application/json")])
_NOT_ALLOWED = render_headers([("allow", "POST"), ("content-type", "application/json")])
_HUGE_PAD = "x" * (2 * 1024 * 1024)


def _detail(message: str) -> bytes:
    return orjson.dumps({"detail": message})


def _normalise_header(name: bytes | str) -> bytes:
    # Ray's _matches_session_id_header: case-insensitive, '-' and '_' alike.
    raw = name.encode("latin-1") if isinstance(name, str) else name
    return raw.lower().replace(b"_", b"-")


def _routing_payload(body: bytes) -> dict | None:
    """Ray's _parse_request_body + _get_routing_payload_from_body: anything but a
    JSON object with a truthy `messages` or `prompt` means "no payload"."""
    if not body:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or not (parsed.get("messages") or parsed.get("prompt")):
        return None
    return parsed


class Router:
    """The request handler; one per process."""

    def __init__(self, replicas: Sequence[Replica], policy: str = "round_robin",
                 session_header: str = "x-session-id", fault: str | None = None) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        self.replicas = list(replicas)
        self.policy_name = policy
        self.load = LoadTracker()
        self.policy = make_policy(policy, self.replicas, self.load)
        self.fault = fault
        self._session_key = _normalise_header(session_header)
        self.server: HttpServer | None = None
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_replica: dict[str, int] = {r.id: 0 for r in self.replicas}
        self.last_request: Request | None = None  # rendered only when /-/stats asks
        if self.server is not None:
            self.server.connections_accepted = 0

    def stats(self) -> dict:
        last = self.last_request
        return {
            "requests": self.requests,
            "connections": self.server.connections_accepted if self.server else 0,
            "last_headers": last.headers if last else {},
            "last_body": last.body[:LAST_BODY_CAP].decode("utf-8", "replace") if last else "",
            "by_replica": self.by_replica,
            "healthy": {r.id: r.healthy for r in self.replicas},
            "policy": self.policy_name,
            "fault": self.fault,
        }

    async def __call__(self, request: Request, responder: Responder) -> None:
        path, method = request.path, request.method
        if path == "/internal/route":
            if method != "POST":
                return responder.send(405, _NOT_ALLOWED, _detail("Method Not Allowed"))
            return await self._route(request, responder)
        if path == "/health" and method == "GET":
            return responder.send(200, _JSON, b'{"status":"ok"}')
        if path == "/-/stats" and method == "GET":
            return responder.send(200, _JSON, orjson.dumps(self.stats()))
        if path == "/-/reset" and method == "POST":
            self.reset()
            return responder.send(200, _JSON, orjson.dumps(self.stats()))
        responder.send(404, _JSON, _detail("Not Found"))

    def _session(self, request: Request) -> str | None:
        key = self._session_key
        for name, value in request.raw_headers:
            if len(name) == len(key) and _normalise_header(name) == key:
                return value.decode("latin-1") or None  # first match wins, even if empty
        return None

    async def _route(self, request: Request, responder: Responder) -> None:
        self.requests += 1
        self.last_request = request
        truncated = request.header(b"x-body-truncated")
        if truncated is not None:
            log.info("route request with body_truncated=%s", truncated.decode("latin-1"))

        candidates = [r for r in self.replicas if r.healthy] or self.replicas
        if not candidates:
            return responder.send(503, _JSON, _detail("No replica available for the deployment"))
        payload = _routing_payload(request.body) if self.policy.uses_body else None
        try:
            replica = self.policy.pick(candidates, self._session(request), payload)
        except ValueError as exc:
            return responder.send(400, _JSON, _detail(str(exc)))
        self.load.record(replica.id)
        self.by_replica[replica.id] += 1
        if self.fault is None:
            return responder.send(200, _JSON, replica.answer)
        await self._faulty_answer(replica, responder)

    async def _faulty_answer(self, replica: Replica, responder: Responder) -> None:
        fault = self.fault
        if fault == "garbage":
            responder.send(200, _JSON, b"<html>this is not json</html>")
        elif fault == "truncated_json":
            responder.send(200, _JSON, replica.answer[: len(replica.answer) // 2])
        elif fault == "huge_body":
            responder.send(200, _JSON, orjson.dumps(
                {"host": replica.host, "port": replica.port, "replica_id": replica.id, "padding": _HUGE_PAD}))
        elif fault == "wrong_types":
            responder.send(200, _JSON, orjson.dumps(
                {"host": replica.host, "port": str(replica.port), "replica_id": replica.id}))
        elif fault == "outside_target":
            responder.send(200, _JSON, b'{"host":"127.0.0.2","port":9,"replica_id":"evil"}')
        elif fault == "slow":
            if await responder.sleep(30.0):
                responder.send(200, _JSON, replica.answer)
            else:
                responder.abort()
        elif fault == "status-400":
            responder.send(400, _JSON, _detail("mock fault: bad routing request"))
        elif fault == "status-503":
            responder.send(503, _JSON, _detail("mock fault: no replica available"))
        elif fault == "close_early":
            # A keep-alive answer in every respect, then the FIN anyway.
            responder.send(200, _JSON, replica.answer)
            responder.close()
        elif fault in _BAD_HEADERS:
            responder.send(200, _JSON, orjson.dumps(
                {"host": replica.host, "port": replica.port, "replica_id": replica.id,
                 "request_headers": _BAD_HEADERS[fault]}))
        elif fault == "unknown_replica":
            responder.send(200, _JSON, orjson.dumps(
                {"host": replica.host, "port": replica.port, "replica_id": "SERVE_REPLICA::llm#Unknown#zzzzzzzz"}))


def parse_replica(spec: str) -> Replica:
    """`ID=URL`, the URL `http://host:port` (scheme optional)."""
    rid, sep, url = spec.partition("=")
    if not sep or not rid or not url:
        raise argparse.ArgumentTypeError(f"--replica wants ID=URL, got {spec!r}")
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if not parts.hostname or not parts.port:
        raise argparse.ArgumentTypeError(f"--replica URL needs host and port, got {url!r}")
    return Replica(rid, parts.hostname, parts.port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m replicas.router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", type=parse_replica, action="append", default=[], metavar="ID=URL",
                        help="a replica to route to; repeat for more (none: every route call is a 503)")
    parser.add_argument("--policy", choices=POLICIES, default="round_robin")
    parser.add_argument("--session-header", default=os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id"))
    parser.add_argument("--health-interval-s", type=float, default=1.0, help="0 disables health checks")
    parser.add_argument("--fault", choices=FAULTS, default=None)
    parser.add_argument("--timeout-keep-alive", type=float, default=5.0, help="close idle connections after (s)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if len({r.id for r in args.replica}) != len(args.replica):
        parser.error("replica ids must be unique")

    router = Router(args.replica, args.policy, args.session_header, args.fault)
    health = HealthChecker(router.replicas, args.health_interval_s)

    async def startup(server: HttpServer) -> None:
        router.server = server
        health.start()

    async def shutdown(server: HttpServer) -> None:
        await health.stop()

    run(router, args.host, args.port, keep_alive_s=args.timeout_keep_alive, on_startup=startup, on_shutdown=shutdown)


if __name__ == "__main__":
    main()
