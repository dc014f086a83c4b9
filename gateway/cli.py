"""`gateway` command line: `serve` (the gateway) and `up` (the embedded local stack)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.config import Config, ConfigError, add_arguments, resolve

if TYPE_CHECKING:
    from gateway.targets import TargetSet

log = logging.getLogger("gateway")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check is noise


def startup_line(config: Config, port: int, targets: "TargetSet") -> str:
    routers = ",".join(f"{host}:{port}" for host, port in targets.routers) or "none (least-loaded for every request)"
    source = f"{len(targets)} static replicas"
    if config.ray_address:
        source = f"{len(targets)} from ray {config.ray_address}" + (f" app {config.app}" if config.app else "") \
            + (" (scaled to zero: fallback proxy)" if not len(targets) and targets.fallback else "")
    return (f"gateway: listening on http://{config.host}:{port} | mode {config.mode} | routers {routers} | "
            f"targets {source} | workers {config.workers} | forward body {'on' if config.forward_body else 'off'}")


async def serve_async(config: Config, ready_message: bool = True,
                      on_ready: Callable[[], None] | None = None) -> int:
    """Run one gateway until SIGTERM/SIGINT; `on_ready` runs once it is listening."""
    from gateway.server import Gateway

    targets = None
    discovery = None
    if config.ray_address:
        from gateway.ray_discovery import RayDiscovery  # only Ray users pay for importing ray

        if config.health_path == "/health":  # the default: Ray replicas answer health on /-/healthz (§e)
            config = config.with_changes(health_path="/-/healthz")
        discovery = RayDiscovery(config)
        targets = await discovery.start()
    gateway = Gateway(config, targets)
    try:
        await gateway.start()
    except OSError as exc:
        if discovery is not None:
            await discovery.stop()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {config.port} on {config.host} is already in use") from None
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    if ready_message:
        print(startup_line(config, gateway.port, gateway.targets), flush=True)
    if on_ready is not None:
        on_ready()
    await gateway.run_until_signalled()
    if discovery is not None:
        await discovery.stop()
    return 0


def run_serve(config: Config) -> int:
    import uvloop

    if config.workers == 1:
        return uvloop.run(serve_async(config))
    return _run_workers(config)


def _run_workers(config: Config) -> int:
    """N forked workers bind the same port with SO_REUSEPORT; the kernel spreads connections."""
    import uvloop

    children = []
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM for all
            try:
                code = uvloop.run(serve_async(config, ready_message=index == 0))
            except ConfigError as exc:
                print(f"gateway: error: {exc}", file=sys.stderr)
                code = 2
            os._exit(code)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway in front of routers and replicas",
                           description="Run the gateway. Every option can also be set by env var or config file; "
                                       "precedence is flag > env > config file > default.")
    add_arguments(serve)
    up = sub.add_parser("up", help="run the embedded local stack: mock vLLM replicas, the router and the gateway")
    up.add_argument("--replicas", type=int, default=2, help="number of mock vLLM replicas (default 2)")
    up.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8000")),
                    help="gateway port (default 8000, env GATEWAY_PORT)")
    up.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"), help="gateway address")
    up.add_argument("--policy", default="round_robin", choices=["round_robin", "consistent_hash", "prefix_affinity"],
                    help="router policy (default round_robin)")
    up.add_argument("--itl-ms", type=float, default=20.0, help="mock inter-token latency (default 20 ms)")
    up.add_argument("--ttft-ms", type=float, default=50.0, help="mock time to first token (default 50 ms)")
    up.add_argument("--ray", action="store_true", help="run the stack on a local Ray head with Ray's LLMRouter")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            config = resolve(args)
            _setup_logging(config.log_level)
            return run_serve(config)
        from gateway.local_stack import run_up

        _setup_logging("warning")
        return run_up(args)
    except ConfigError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
