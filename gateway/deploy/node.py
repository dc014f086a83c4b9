"""One gateway on one Ray node: a detached actor pinned to the node runs `python -m gateway serve` and restarts it.

The actor needs no CPU (`num_cpus=0`) and is pinned with a hard node affinity, like Ray's own
HAProxyManager (one per proxy node). The gateway itself runs as a child process, not inside the
actor: it owns its event loop, its signals and (with --workers) its forked workers, and a crash of
the gateway is a child exit the actor sees and answers by starting it again (backing off while it
keeps crashing).

Its options come only from the deployer (`argv`), and its environment is built here from a short
allowlist: nothing is inherited by accident from the raylet, whose environment carries Ray's
RAY_SERVE_* variables (some of which the gateway reads as option defaults).

The child gets PR_SET_PDEATHSIG: if the actor process dies (ray.kill, node loss), the kernel
terminates the gateway with it, so no gateway outlives its actor.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from gateway.deploy.secrets import digest

# Environment the gateway child may see; everything else (RAY_*, GATEWAY_*) is left behind on purpose.
ENV_ALLOWLIST = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
SUPERVISE_INTERVAL_S = 0.1
MAX_BACKOFF_S = 10.0
PR_SET_PDEATHSIG = 1
# The node's own gateway is never reached through an HTTP proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervising thread's process goes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {name: os.environ[name] for name in ENV_ALLOWLIST if name in os.environ}
    # The gateway package the actor itself was loaded from: the child runs the same code.
    import gateway

    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(gateway.__file__)))
    env.update(extra or {})
    return env


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class NodeGateway:
    """The actor body (wrapped with ray.remote by the reconciler). Methods return plain dicts."""

    def __init__(self, node_ip: str, argv: list[str], port: int, env: dict[str, str] | None = None,
                 log_dir: str = ""):
        self.node_ip = node_ip
        self.argv = list(argv)
        self.port = port
        self.extra_env = dict(env or {})
        self.log_dir = log_dir or os.path.join(tempfile.gettempdir(), f"gateway-ray-{port}")
        os.makedirs(self.log_dir, exist_ok=True)
        self.log_path = os.path.join(self.log_dir, f"gateway-{node_ip}.log")
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.draining: list[subprocess.Popen] = []
        self._pending: tuple[list[str], dict[str, str]] | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        # One long-lived thread starts every child: PR_SET_PDEATHSIG follows the thread that forked.
        self._thread = threading.Thread(target=self._supervise, name="gateway-supervisor", daemon=True)
        self._thread.start()

    # -- the supervising thread
    def _spawn(self) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *self.argv], env=child_env(self.extra_env),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent, cwd=self.log_dir)
        finally:
            log.close()
        self.started_at = time.monotonic()

    def _connect_host(self) -> str:
        host = self._flag("--host") or self.node_ip
        return self.node_ip if host in ("0.0.0.0", "::") else host

    def _flag(self, name: str) -> str | None:
        argv = self.argv
        for index, item in enumerate(argv):
            if item == name and index + 1 < len(argv):
                return argv[index + 1]
            if item.startswith(name + "="):
                return item.split("=", 1)[1]
        return None

    def _drain_current(self) -> None:
        """SIGTERM the running gateway (it keeps accepting for its --min-draining-s, then stops and drains),
        wait until its port is free, and let it finish its streams in the background."""
        proc = self.proc
        self.proc = None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        self.draining.append(proc)
        host = self._connect_host()
        from gateway.config import _seconds

        deadline = time.monotonic() + 10.0 + _seconds(self._flag("--min-draining-s") or 0)
        while time.monotonic() < deadline and proc.poll() is None and _port_open(host, self.port):
            time.sleep(0.02)

    def _supervise(self) -> None:
        backoff = 0.5
        self._spawn()
        while not self._stopping.is_set():
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is not None:
                self._drain_current()
                self.argv, self.extra_env = pending
                self._spawn()
                backoff = 0.5
            elif self.proc is not None and self.proc.poll() is not None:
                # Crashed (or killed): start it again; back off while it keeps dying young.
                lived = time.monotonic() - self.started_at
                backoff = 0.5 if lived > 30 else min(backoff * 2, MAX_BACKOFF_S)
                if lived < 2.0:
                    self._stopping.wait(backoff)
                    if self._stopping.is_set():
                        break
                self.restarts += 1
                self._spawn()
            self.draining = [proc for proc in self.draining if proc.poll() is None]
            self._stopping.wait(SUPERVISE_INTERVAL_S)
        self._stopped.set()

    # -- actor methods
    def status(self) -> dict:
        proc = self.proc
        host = self._connect_host()
        ready = False
        if proc is not None and proc.poll() is None:
            try:
                with _NO_PROXY.open(f"http://{host}:{self.port}/-/ready", timeout=1.0) as response:
                    ready = response.status == 200
            except OSError:
                ready = False
        # The environment (the deployer's secrets) only as a digest: status is read by `gateway ray status`.
        return {"node_ip": self.node_ip, "url": f"http://{host}:{self.port}", "pid": proc.pid if proc else None,
                "ready": ready, "restarts": self.restarts, "argv": self.argv, "env_digest": digest(self.extra_env),
                "log": self.log_path,
                "draining": len(self.draining), "actor_pid": os.getpid()}

    def reconfigure(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Drain the running gateway, then start it with these options (done by the supervising thread)."""
        with self._lock:
            self._pending = (list(argv), dict(env or {}))

    def stop(self, timeout_s: float = 30.0) -> dict:
        """Stop for good: SIGTERM (the gateway drains its streams), SIGKILL past the timeout."""
        self._stopping.set()
        self._stopped.wait(5.0)
        procs = [proc for proc in [self.proc, *self.draining] if proc is not None and proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None
        self.draining = []
        return {"node_ip": self.node_ip, "stopped": [proc.pid for proc in procs]}
