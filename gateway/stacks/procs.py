"""Child processes of the local stack, the tests and the benchmarks.

Everything that starts a server process goes through here, so that "started"
always means "its port accepts connections" and "stopped" always means the
whole process is gone, never sleep-and-hope.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out; good enough for tests and local stacks."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, deadline_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Block until host:port accepts a TCP connection, the process dies, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        if port_open(host, port):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {deadline_s}s")


class Child:
    """One server process: started in our session (docs/contributing.md, "Real vLLM on CPU": a
    setsid-ed process gets its own scheduler group and streams arrive in bursts)."""

    def __init__(self, argv: Sequence[str], port: int | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, log_path: str | None = None, cpu: int | None = None):
        self.argv = list(argv)
        if cpu is not None:
            self.argv = ["taskset", "-c", str(cpu), *self.argv]
        self.port = port
        self.host = host
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self, deadline_s: float = 20.0) -> "Child":
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.log_path:
            self._log = out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if self.port is not None:
            try:
                wait_port(self.host, self.port, deadline_s, self.proc)
            except BaseException:
                self.stop()
                raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Child":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (from /proc), parents before their children."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Field 4 is the parent pid; the command (field 2) may contain spaces, so split after its ')'.
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def terminate_pids(pids: Iterable[int], grace_s: float,
                   latecomers: Callable[[], Iterable[int]] = lambda: ()) -> None:
    """SIGTERM each process, wait up to `grace_s` for all to exit, then SIGKILL what is left (and `latecomers()`:
    processes that appeared meanwhile, e.g. a worker being spawned under a tree we are stopping)."""
    pids = [pid for pid in pids if pid_alive(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in [*pids, *latecomers()]:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
