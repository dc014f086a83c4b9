"""`gateway ray deploy|status|remove`: one gateway on every alive node of a Ray cluster, kept there by Ray.

Ray's HAProxy ingress runs on every node (one HAProxyManager actor per proxy node, started by
Serve). This puts the gateway in the same place, with Ray's own machinery:

- a detached **reconciler** actor (`num_cpus=0`, restarted by Ray if it dies) follows `ray.nodes()`
  every second: a node that joins gets a gateway, a node that leaves loses it, and a node actor
  that died on a live node is replaced;
- on each node a detached **node actor** (gateway.deploy.node.NodeGateway: `num_cpus=0`, hard node
  affinity) runs `python -m gateway serve --host <node IP> --node-ip <node IP> ...` as a child and
  restarts it when it exits;
- `deploy` again with other options replaces the reconciler, which adopts the running node actors
  by name and rolls them **one node at a time**: the old gateway drains (it stops accepting at once
  and finishes its streams), the new one starts on the same port, and the next node waits until
  this one is ready;
- `remove` stops every gateway (each drains) and removes the actors.

The gateway's options are the deployer's, passed as flags; nothing is taken from the raylet's
environment (see node.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from gateway.config import ConfigError
from gateway.deploy.secrets import CLUSTER_SECRET, digest

log = logging.getLogger("gateway.deploy")

NAMESPACE = "gateway"
RECONCILER = "gateway-reconciler"
NODE_PREFIX = "gateway-node-"
RECONCILE_INTERVAL_S = 1.0
ROLL_READY_DEADLINE_S = 60.0


def node_actor_name(node_id: str) -> str:
    return NODE_PREFIX + node_id[:20]


def serve_argv(spec: dict[str, Any], node_ip: str) -> list[str]:
    """The gateway's whole command line on one node: the deployer's options, then where it runs."""
    host = spec.get("host") or node_ip
    return ["serve", *spec["serve_args"], "--host", host, "--port", str(spec["port"]),
            "--ray-address", spec["address"], "--node-ip", node_ip]


class Reconciler:
    """The actor body: one thread reconciles the node actors with the alive nodes and the spec."""

    def __init__(self, spec: dict[str, Any]):
        import ray

        from gateway.deploy.node import NodeGateway

        self.ray = ray
        self.spec = spec
        self.node_class = ray.remote(NodeGateway)
        self.nodes: dict[str, dict[str, Any]] = {}  # node id -> {"ip", "actor", "status"}
        self.events: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="gateway-reconciler", daemon=True)
        self._thread.start()

    def _event(self, text: str) -> None:
        log.warning("reconciler: %s", text)
        self.events = (self.events + [f"{time.strftime('%H:%M:%S')} {text}"])[-50:]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    if not self._stop.is_set():
                        self.reconcile_once()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                self._event(f"reconcile failed: {type(exc).__name__}: {exc}")
            self._stop.wait(RECONCILE_INTERVAL_S)

    def _create(self, node_id: str, ip: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        spec = self.spec
        actor = self.node_class.options(
            name=node_actor_name(node_id), namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(ip, serve_argv(spec, ip), spec["port"], spec.get("secrets") or None, spec.get("log_dir", ""))
        self._event(f"node {ip} joined: gateway on port {spec['port']}")
        return actor

    def reconcile_once(self) -> None:
        ray = self.ray
        alive = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
        for node_id in [node_id for node_id in self.nodes if node_id not in alive]:
            entry = self.nodes.pop(node_id)
            self._event(f"node {entry['ip']} left: its gateway is gone")
            try:
                ray.kill(entry["actor"])
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        for node_id, ip in alive.items():
            if node_id in self.nodes:
                continue
            try:
                actor = ray.get_actor(node_actor_name(node_id), namespace=NAMESPACE)  # from an earlier deploy
            except ValueError:
                actor = self._create(node_id, ip)
            self.nodes[node_id] = {"ip": ip, "actor": actor, "status": None}
        for node_id, entry in list(self.nodes.items()):
            try:
                entry["status"] = ray.get(entry["actor"].status.remote(), timeout=10)
            except ray.exceptions.GetTimeoutError:
                entry["status"] = None  # still being scheduled or busy: next round
            except ray.exceptions.RayActorError:
                self._event(f"node {entry['ip']}: gateway actor died; starting a new one")
                entry["actor"] = self._create(node_id, entry["ip"])
                entry["status"] = None
        # Roll at most one node per round, and wait for it: the others keep serving meanwhile.
        for node_id, entry in self.nodes.items():
            status = entry["status"]
            want = serve_argv(self.spec, entry["ip"])
            if status is None or self._current(status, want):
                continue
            self._event(f"node {entry['ip']}: new options; draining, then starting")
            ray.get(entry["actor"].reconfigure.remote(want, self.spec.get("secrets") or None), timeout=10)
            deadline = time.monotonic() + ROLL_READY_DEADLINE_S
            while time.monotonic() < deadline and not self._stop.is_set():
                status = ray.get(entry["actor"].status.remote(), timeout=10)
                if self._current(status, want) and status["ready"]:
                    break
                time.sleep(0.1)
            entry["status"] = status
            self._event(f"node {entry['ip']}: {'ready' if status['ready'] else 'NOT ready'} with the new options")
            return

    def _current(self, status: dict[str, Any], want: list[str]) -> bool:
        """The node runs these options and these secrets (compared by digest: node.py never returns them)."""
        return status.get("argv") == want and status.get("env_digest", digest({})) == digest(self.spec.get("secrets")
                                                                                           or {})

    # -- actor methods
    def cluster_secret(self) -> str | None:
        """The secret the node gateways share (kept across deploys: see secrets.CLUSTER_SECRET)."""
        return (self.spec.get("secrets") or {}).get(CLUSTER_SECRET)

    def status(self) -> dict[str, Any]:
        nodes = []
        for entry in self.nodes.values():
            status = dict(entry["status"] or {"node_ip": entry["ip"], "ready": False, "pid": None, "restarts": 0,
                                               "url": "", "argv": []})
            status["current"] = self._current(status, serve_argv(self.spec, entry["ip"]))
            nodes.append(status)
        spec = {**self.spec, "secrets": sorted(self.spec.get("secrets") or {})}  # their names, never their values
        return {"spec": spec, "nodes": sorted(nodes, key=lambda n: n["node_ip"]), "events": self.events[-10:]}

    def remove(self, timeout_s: float = 30.0) -> list[dict]:
        self._stop.set()
        with self._lock:  # a round in progress finishes first
            stopped = []
            for entry in self.nodes.values():
                try:
                    stopped.append(self.ray.get(entry["actor"].stop.remote(timeout_s), timeout=timeout_s + 10))
                except Exception:  # noqa: BLE001 - killed below anyway
                    pass
                try:
                    self.ray.kill(entry["actor"])
                except Exception:  # noqa: BLE001
                    pass
            self.nodes.clear()
        return stopped


# --------------------------------------------------------------------------- the CLI side (a driver)
def _connect(address: str) -> Any:
    if address.startswith("ray://"):
        raise ConfigError("Ray Client (ray://) is not supported: give the GCS address host:port")
    host = address.rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        # Else Ray replaces a loopback node IP with the routable one
        # (ray/_private/services.py get_node_ip_address, Ray 2.60.0).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("gateway ray needs Ray: pip install 'gateway[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise ConfigError(f"cannot connect to Ray at {address}: {exc}") from None
    return ray


def _reconciler(ray: Any) -> Any | None:
    try:
        return ray.get_actor(RECONCILER, namespace=NAMESPACE)
    except ValueError:
        return None


def deploy(address: str, port: int, host: str, serve_args: list[str], wait_s: float = 120.0,
           log_dir: str = "", secrets: dict[str, str] | None = None) -> dict[str, Any]:
    """Start (or roll to new options) a gateway on every alive node; return when all are ready.

    `secrets` ({GATEWAY_API_KEY: ...}, see secrets.py) reach each gateway in its environment, never in its argv."""
    ray = _connect(address)
    spec = {"address": address, "port": port, "host": host, "serve_args": list(serve_args), "log_dir": log_dir,
            "secrets": dict(secrets or {})}
    old = _reconciler(ray)
    if CLUSTER_SECRET not in spec["secrets"]:
        try:
            kept = ray.get(old.cluster_secret.remote(), timeout=30) if old is not None else None
        except Exception:  # noqa: BLE001 - a reconciler from before the cluster secret: draw one
            kept = None
        spec["secrets"][CLUSTER_SECRET] = kept or os.urandom(32).hex()
    if old is not None:
        ray.kill(old, no_restart=True)  # the node actors stay and keep serving; the new reconciler adopts them
    actor_class = ray.remote(Reconciler)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reconciler = actor_class.options(name=RECONCILER, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                                             max_restarts=-1, max_concurrency=4).remote(spec)
            break
        except ValueError:  # the killed reconciler's name is not released yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    while time.monotonic() < deadline:
        status = ray.get(reconciler.status.remote(), timeout=30)
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        nodes = status["nodes"]
        if len(nodes) == alive and all(node["ready"] and node["current"] for node in nodes):
            return status
        time.sleep(0.2)
    raise ConfigError(f"gateways not ready on every node within {wait_s:.0f}s: {status['nodes']}")


def status(address: str) -> dict[str, Any] | None:
    ray = _connect(address)
    reconciler = _reconciler(ray)
    if reconciler is None:
        return None
    return ray.get(reconciler.status.remote(), timeout=30)


def remove(address: str, timeout_s: float = 30.0) -> list[str]:
    """Stop every gateway (each drains) and remove the actors, including strays of an earlier deploy."""
    ray = _connect(address)
    removed = []
    reconciler = _reconciler(ray)
    if reconciler is not None:
        for stopped in ray.get(reconciler.remove.remote(timeout_s), timeout=timeout_s + 60):
            removed.append(stopped["node_ip"])
        ray.kill(reconciler, no_restart=True)
    from ray.util import list_named_actors

    for item in list_named_actors(all_namespaces=True):
        if item.get("namespace") == NAMESPACE and item.get("name", "").startswith(NODE_PREFIX):
            actor = ray.get_actor(item["name"], namespace=NAMESPACE)
            try:
                stopped = ray.get(actor.stop.remote(timeout_s), timeout=timeout_s + 10)
                removed.append(stopped["node_ip"])
            except Exception:  # noqa: BLE001 - killed below anyway
                pass
            ray.kill(actor)
    return removed


def format_status(result: dict[str, Any] | None) -> str:
    if result is None:
        return "no gateway is deployed on this cluster (gateway ray deploy starts them)"
    lines = [f"{'NODE':<16} {'URL':<28} {'PID':>8} {'READY':<6} {'RESTARTS':>8}  OPTIONS"]
    for node in result["nodes"]:
        lines.append(f"{node['node_ip']:<16} {node['url'] or '-':<28} {node['pid'] or '-':>8} "
                     f"{'yes' if node['ready'] else 'no':<6} {node['restarts']:>8}  "
                     f"{'current' if node['current'] else 'rolling'}")
    return "\n".join(lines)
