"""`gateway up --ray`: a private local Ray head, the Serve app with Ray's LLMRouter, and the gateway.

The recipe (docs/contributing.md, "Ray on one machine"): node IP 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
HAProxy mode with direct ingress, HAProxy files and Ray's temp dir in one private
directory, and non-default ports everywhere, so that this stack never collides
with another Ray on the machine.

Stopping: `ray stop` is global (it kills every Ray process of every cluster on the
host, matched by process name), so it is never used. The head runs as
`ray start --block` in the foreground of a child process; at stop we take the
process tree under it (GCS, raylet, workers, HAProxy), SIGTERM it and SIGKILL
what is left after a grace period: only our own PIDs.

`RayStack` is also what tests/test_ray.py and scripts/bench_ray.py use.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from gateway.stacks.procs import (
    descendants,
    free_port,
    port_open,
    terminate_pids,
)
from gateway.stacks.usage import USAGE

EXAMPLE = ("Ray stack is up: a local Ray head (2 CPUs, {root}), Serve app {app!r} with {replicas} {engines},"
           "\nRay's LLMRouter ({policy}), and the gateway discovering them from Ray at {address}.\n\n"
           + USAGE + "  Ray's own HAProxy ingress, for comparison: http://127.0.0.1:{http_port}/v1\n"
           "Ctrl-C stops everything (gateway, Serve, and this Ray head only).\n")
# The served model name of the default tiny model (the name the real-vLLM tests and benchmarks use).
TINY_MODEL = "tiny"


def _ray_bin(python: str) -> str:
    candidate = os.path.join(os.path.dirname(python), "ray")
    return candidate if os.path.exists(candidate) else "ray"


# The repo root: a driver in another venv (python=...) imports replicas.serve_app from here.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _window_port(low: int, high: int) -> int:
    """A free loopback port in [low, high)."""
    for _ in range(200):
        port = random.randrange(low, high)
        if not port_open("127.0.0.1", port, timeout=0.05):
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return free_port()


@dataclass
class RayStack:
    """One private Ray node (a head on 127.0.0.1 by default, or any node of a RayCluster) plus the Serve app;
    `start()` / `deploy()` / `stop()`."""

    num_cpus: int = 2
    # The Python of `ray start` (so of every Ray worker) and of the deploying driver. Ray Serve LLM's vLLM
    # engines need vLLM in it (.venv-vllm), while the gateway, a driver only for discovery, stays in its own
    # venv: Ray only requires the same Ray and Python versions on both sides.
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)  # more environment for the head and the drivers
    draining_s: float = 2.0  # RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (Ray's default 30)
    # A multi-node cluster on one machine (docs/contributing.md, "Ray on one machine"): each node on its own
    # loopback address, none on 127.0.0.1, a worker joining the head's GCS address.
    node_ip: str = "127.0.0.1"
    join: str = ""
    root: str = ""
    log_path: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    _log: object = None

    def __post_init__(self) -> None:
        if not self.root:
            # Short: Ray puts unix sockets under it, and their paths are limited to 107 bytes.
            self.root = tempfile.mkdtemp(prefix="gwray-")
        os.makedirs(os.path.join(self.root, "hap"), exist_ok=True)
        self.log_path = self.log_path or os.path.join(self.root, "ray-start.log")
        if not self.ports:
            names = ("gcs", "http", "fallback", "fallback_grpc", "hap_metrics", "hap_stats", "client",
                     "agent_listen", "agent_grpc", "runtime_env", "metrics_export", "node_manager", "object_manager",
                     "worker_http", "worker_grpc")
            # Below the kernel's ephemeral range (32768-60999 here): vLLM's engine processes bind random
            # loopback ports there at any time (a replacement replica too), and HAProxy binds its stats and
            # metrics ports only at serve.start; a port picked there could be taken by then. Above Ray's
            # worker ports (10002-19999) and the direct-ingress window below (21000-28999).
            taken: set[int] = set()
            for name in names:
                port = _window_port(29000, 30000)
                while port in taken:
                    port = _window_port(29000, 30000)
                taken.add(port)
                self.ports[name] = port
            # Direct-ingress replica ports: a private window (Ray allocates lowest-free first).
            base = random.randrange(21000, 29000, 100)
            self.ports["di_min"], self.ports["di_max"] = base, base + 99
            self.ports["di_grpc_min"], self.ports["di_grpc_max"] = base + 10000, base + 10099

    @property
    def address(self) -> str:
        """The cluster's GCS address (a worker node's is its head's)."""
        return self.join or f"{self.node_ip}:{self.ports['gcs']}"

    @property
    def http_port(self) -> int:
        """Ray's HAProxy frontend."""
        return self.ports["http"]

    def env(self) -> dict[str, str]:
        """The environment of `ray start` and of every driver that deploys: Ray's HAProxy-mode settings
        (ray/serve/_private/constants.py, Ray 2.60.0) pointed into our private directory."""
        hap = os.path.join(self.root, "hap")
        p = self.ports
        multi_node = {} if self.node_ip == "127.0.0.1" else {
            # Left unset off 127.0.0.1 (§g); on a worker node Serve's HAProxy needs its own frontend port.
            "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(p["worker_http"]),
            "RAY_SERVE_WORKER_PROXY_GRPC_PORT": str(p["worker_grpc"]),
        }
        return {
            **({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if self.node_ip == "127.0.0.1" else multi_node),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
            "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{hap}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{hap}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": hap,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{hap}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{hap}/metrics.sock",
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(p["hap_metrics"]),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(p["hap_stats"]),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(p["fallback"]),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(p["fallback_grpc"]),
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(p["di_min"]),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(p["di_max"]),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(p["di_grpc_min"]),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(p["di_grpc_max"]),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(self.draining_s),
            **({} if self.python == sys.executable else
               {"PYTHONPATH": os.pathsep.join(part for part in (ROOT, os.environ.get("PYTHONPATH", "")) if part)}),
            **self.extra_env,
        }

    # -- the head
    def start(self, deadline_s: float = 90.0) -> RayStack:
        p = self.ports
        node = (["--head", f"--port={p['gcs']}", "--include-dashboard=false", f"--ray-client-server-port={p['client']}"]
                if not self.join else [f"--address={self.join}"])
        argv = [_ray_bin(self.python), "start", *node, "--block", f"--node-ip-address={self.node_ip}",
                f"--num-cpus={self.num_cpus}", f"--temp-dir={self.root}",
                f"--dashboard-agent-listen-port={p['agent_listen']}",
                f"--dashboard-agent-grpc-port={p['agent_grpc']}", f"--runtime-env-agent-port={p['runtime_env']}",
                f"--metrics-export-port={p['metrics_export']}", f"--node-manager-port={p['node_manager']}",
                f"--object-manager-port={p['object_manager']}", "--disable-usage-stats"]
        self._log = open(self.log_path, "ab")
        # Own process group (not session): a terminal Ctrl-C must not kill Ray before Serve is shut down.
        self.proc = subprocess.Popen(argv, env={**os.environ, **self.env()}, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
        deadline = time.monotonic() + deadline_s
        # `ray start --block` prints this once GCS and the raylet are up.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; see {self.log_path}")
            with open(self.log_path, "rb") as handle:
                if b"will now block forever" in handle.read():
                    return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"ray start did not come up within {deadline_s}s; see {self.log_path}")

    # -- the Serve app (each call is a short-lived driver process)
    def serve_app(self, command: str, *args: str, timeout_s: float = 180.0) -> dict:
        argv = [self.python, "-m", "replicas.serve_app", command, "--address", self.address,
                "--http-port", str(self.http_port), *args]
        log = os.path.join(self.root, f"serve_app-{command}.log")
        with open(log, "ab") as handle:
            done = subprocess.run(argv, env={**os.environ, **self.env()}, stdout=subprocess.PIPE, stderr=handle,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL, process_group=0)
        if done.returncode != 0:
            with open(log, "rb") as handle:
                tail = handle.read()[-3000:].decode("utf-8", "replace")
            raise RuntimeError(f"serve_app {command} failed ({done.returncode}):\n{tail}")
        lines = [line for line in done.stdout.decode().splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}

    def deploy(self, *args: str, timeout_s: float = 180.0) -> dict:
        return self.serve_app("deploy", *args, timeout_s=timeout_s)

    def shutdown_serve(self, timeout_s: float = 45.0) -> bool:
        try:
            self.serve_app("shutdown", timeout_s=timeout_s)
            return True
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop this head only: SIGTERM our process tree, then SIGKILL stragglers. Never `ray stop`."""
        if self.proc is None:
            return
        # GCS, raylet, agents, workers, HAProxy; anything spawned meanwhile is caught by a second look.
        head = self.proc.pid
        terminate_pids([*descendants(head), *self.strays()], grace_s,
                       latecomers=lambda: [*descendants(head), *self.strays()])
        # `ray start --block` ignores SIGTERM; with its children gone it has nothing left to clean up.
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def strays(self) -> list[int]:
        """Our processes that left the head's tree. A SIGKILLed vLLM front end orphans its EngineCore and Worker
        (vLLM 0.32 on CPU, docs/contributing.md "Real vLLM on CPU"; ~2 GB, reparented to init), and `ray.kill`
        is a SIGKILL: the safety net, by PID, for them.
        They carry this stack's environment, which names our private directory."""
        mark = f"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC={self.root}/hap/haproxy.cfg".encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as handle:
                        if mark in handle.read().split(b"\0"):
                            found.append(int(entry))
                except OSError:
                    continue
        return found

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def vllm_python(venv: str) -> str:
    """The vLLM venv's python, checked: it must import vllm and ray.serve.llm (scripts/vllm_setup.sh makes it)."""
    python = os.path.abspath(os.path.join(venv, "bin", "python"))
    if not os.path.exists(python):
        raise RuntimeError(f"{python} is missing: run `bash scripts/vllm_setup.sh` (about 3 min, 3.0 GB), "
                           f"or point --vllm-venv / VLLM_VENV at a venv with vllm and ray[serve]==2.60.0")
    probe = ("import importlib.util as u, sys; "
             "sys.exit(0 if u.find_spec('vllm') and u.find_spec('ray.serve.llm') else 1)")
    check = subprocess.run([python, "-c", probe], stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                           check=False)
    if check.returncode != 0:
        raise RuntimeError(f"{python} lacks vllm or ray.serve.llm: run `bash scripts/vllm_setup.sh`")
    return python


def tiny_model(python: str) -> str:
    """The tiny test model (TINY_LLAMA or ./.tiny-llama), built with make-tiny-llama when missing."""
    model = os.path.abspath(os.environ.get("TINY_LLAMA", ".tiny-llama"))
    if os.path.exists(os.path.join(model, "config.json")):
        return model
    shared = os.environ.get("SHARED_DIR", os.path.join(os.path.dirname(ROOT), "shared"))
    tool = os.path.join(shared, "tools", "make-tiny-llama")
    if not os.path.exists(tool):
        raise RuntimeError(f"no model at {model} and no {tool} to make one: pass --model DIR")
    print(f"gateway up --ray: making the tiny test model in {model} (about 10 s)...", flush=True)
    subprocess.run([python, tool, model + ".tmp"], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, timeout=300)
    os.replace(model + ".tmp", model)
    return model


def _deploy_args(args: argparse.Namespace, python: str) -> tuple[list[str], str, str]:
    """serve_app deploy arguments, the engines' description, the served model name."""
    common = ["--policy", args.policy, "--replicas", str(args.replicas)]
    if args.backend == "mock":
        return [*common, "--ttft-ms", str(args.ttft_ms), "--itl-ms", str(args.itl_ms)], "mock vLLM replicas", "mock"
    model = os.path.abspath(args.model) if args.model else tiny_model(python)
    name = TINY_MODEL if not args.model else os.path.basename(model.rstrip("/")).lstrip(".") or TINY_MODEL
    return ([*common, "--backend", "vllm", "--accelerator", "cpu", "--model", model, "--model-id", name],
            f"vLLM engines on CPU (Ray Serve LLM, model {name!r} from {model})", name)


def run_ray_up(args: argparse.Namespace) -> int:
    """Start the head, deploy the app (mock or vLLM engines), run the gateway in this process until Ctrl-C."""

    import uvloop

    from gateway.config import Config

    backend = getattr(args, "backend", "mock")
    try:
        python = vllm_python(args.vllm_venv) if backend == "vllm" else sys.executable
        deploy_args, engines, model_name = _deploy_args(args, python)
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"gateway up --ray: {exc}", file=sys.stderr)
        return 1
    stack = RayStack(python=python)
    print(f"gateway up --ray: starting a private Ray head in {stack.root} (ray start takes 6-12 s)...", flush=True)
    try:
        stack.start()
        took = "about 10 s" if backend == "mock" else "50-80 s: vLLM loads and warms up per replica"
        print(f"gateway up --ray: Ray head at {stack.address}; deploying the Serve app ({took})...", flush=True)
        deployed = stack.deploy(*deploy_args, timeout_s=180.0 if backend == "mock" else 600.0)
        config = Config(host=args.host, port=args.port, ray_address=stack.address, strict_replica_id=True,
                        forward_body=True, health_path="/-/healthz", access_log=False,
                        token_accounting=True, log_level="warning").validate()
        from gateway.process.serve import serve_async

        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        usage = EXAMPLE.format(root=stack.root, app=deployed.get("app", "llm"), replicas=args.replicas,
                               engines=engines, policy=args.policy, address=stack.address,
                               base=f"http://{host}:{args.port}", http_port=stack.http_port)
        usage = usage.replace("'mock'", repr(model_name)).replace('"model": "mock"', f'"model": "{model_name}"')

        async def main() -> int:
            return await serve_async(config, on_ready=lambda: print(usage, flush=True))

        # Ctrl-C reaches the gateway's signal handler (drain, stop discovery), then we tear Ray down;
        # the head is in its own process group, so the terminal's Ctrl-C does not hit it first.
        return uvloop.run(main())
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        print(f"gateway up --ray: {exc}", file=sys.stderr)
        return 1
    finally:
        # Children of ours see the terminal's Ctrl-C too; stop in order regardless of their state.
        if stack.proc is not None:
            print("gateway up --ray: stopping Serve and the Ray head...", file=sys.stderr, flush=True)
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave Ray behind
            try:
                if port_open("127.0.0.1", stack.ports["gcs"]):
                    stack.shutdown_serve(timeout_s=20.0)
                stack.stop()
                stack.cleanup()
            finally:
                signal.signal(signal.SIGINT, previous)
