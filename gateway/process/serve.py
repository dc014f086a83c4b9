"""Run the gateway: one process (`serve_async`) or N workers on one port, until SIGTERM/SIGINT.

Below both the CLI and the development stacks, which all start a gateway through here.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
from collections.abc import Callable

from gateway.config import Config, ConfigError
from gateway.controlplane.apps import AppTable
from gateway.dataplane.pumping import PUMP_BUILT
from gateway.process.server import Gateway
from gateway.process.workers import CONFIG_ERROR, Workers


def startup_line(config: Config, port: int, apps: AppTable) -> str:
    all_routers = [address for app in apps for address in app.targets.routers]
    routers = ",".join(f"{host}:{port}" for host, port in all_routers) or "none (least-loaded for every request)"
    count = len(apps.all_targets())
    source = f"{count} static replicas"
    if config.ray_address:
        names = ", ".join(f"{app.name} at {app.prefix}" for app in apps) or "none yet"
        zero = any(not app.targets.targets and app.targets.fallback for app in apps)
        source = f"{count} from ray {config.ray_address} (apps: {names})" \
            + (" (scaled to zero: fallback proxy)" if zero else "")
    scheme = "https" if config.tls_cert else "http"
    admin = f" | admin http://{config.admin_host}:{config.admin_port}" if config.admin_port else ""
    return (f"gateway: listening on {scheme}://{config.host}:{port}{admin} | mode {config.mode} | routers {routers} | "
            f"targets {source} | workers {config.workers} | forward body {'on' if config.forward_body else 'off'} | "
            f"native relay {native_relay_state(config)}")


def native_relay_state(config: Config) -> str:
    if not config.native_relay:
        return "off"
    return "on" if PUMP_BUILT else "off (the C extension is not built: every stream through Python)"


async def serve_async(config: Config, ready_message: bool = True,
                      on_ready: Callable[[], None] | None = None) -> int:
    """Run one gateway until SIGTERM/SIGINT; `on_ready` runs once it is listening."""
    apps = None
    discovery = None
    local_hosts: frozenset[str] = frozenset()
    if config.ray_address:
        from gateway.controlplane.ray_discovery import (
            RayDiscovery,  # only Ray users pay for importing ray
        )

        if config.health_path == "/health":  # the default: Ray replicas answer health on /-/healthz (§e)
            config = config.with_changes(health_path="/-/healthz")
        discovery = RayDiscovery(config)
        apps = await discovery.start()
        local_hosts = frozenset([discovery.node_ip])
    gateway = Gateway(config, apps, local_hosts)
    try:
        await gateway.start()
    except OSError as exc:
        if discovery is not None:
            await discovery.stop()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {config.port} on {config.host} is already in use") from None
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    ledger = None
    if discovery is not None and config.quota_ledger and gateway.door is not None and gateway.door.needs_key:
        from gateway.controlplane.ledger import LeaseClient  # keys' limits for the whole cluster

        ledger = LeaseClient(gateway.door, gateway.metrics, f"{discovery.node_ip}:{gateway.port}:{os.getpid()}",
                             gateway.usage)
        await ledger.start(config.workers)
    # Everything alive now (modules, config, metrics registry: ~35,000 objects) lives as long as the process;
    # frozen, the collector stops traversing it. Measured under the bench's load: without it one full collection
    # paused the loop for 99 ms (wall, on a busy core) and GC took 138 ms in all; with it no full collection ran,
    # 34 ms in all, longest pause 7 ms. CPU per request did not move (gc is ~1% of it, perf).
    gc.freeze()
    if ready_message:
        print(startup_line(config, gateway.port, gateway.apps), flush=True)
    if on_ready is not None:
        on_ready()
    await gateway.run_until_signalled()
    if ledger is not None:
        await ledger.close()
    if discovery is not None:
        await discovery.stop()
    return 0


def run_serve(config: Config) -> int:
    import uvloop

    # SIGHUP means "reload" here, never "exit" (its default action): ignored until Gateway.start installs the
    # reload handler (Ray discovery may take seconds before that).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.workers == 1:
        return uvloop.run(serve_async(config))
    if not config.cluster_secret:
        # One secret for all the workers (drawn before they fork): a Responses API id made by one is read by all.
        config = config.with_changes(cluster_secret=os.urandom(32).hex())
    return _run_workers(config)


def _run_workers(config: Config) -> int:
    """N forked workers bind the same port with SO_REUSEPORT; the kernel spreads connections (process/workers.py)."""
    import uvloop

    def run(index: int, first: bool) -> int:
        try:
            return uvloop.run(serve_async(config, ready_message=first and index == 0))
        except ConfigError as exc:
            print(f"gateway: error: {exc}", file=sys.stderr)
            return CONFIG_ERROR

    return Workers(config.workers, run).serve()
