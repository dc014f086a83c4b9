"""--workers N: N forked gateways on one port (SO_REUSEPORT), kept alive by the parent.

The parent does nothing but supervise: a worker that dies is started again (at once if it had lived a while,
then backing off while it keeps dying young), SIGTERM/SIGINT are forwarded to the workers alive, SIGHUP too
(each reloads its keys and certificate). Signal handlers only note what arrived; the supervising loop, woken
through signal.set_wakeup_fd, does the reaping and the forwarding, so a PID is never signalled after it was
reaped (the kernel may have given it to another process by then).

A worker ignores SIGHUP from the fork until its event loop installs the reload handler (Gateway.start): SIGHUP's
default action would kill it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("gateway")

QUICK_DEATH_S = 10.0  # a worker that dies younger than this backs the next start off
MAX_BACKOFF_S = 30.0
CONFIG_ERROR = 2  # a worker's exit status for a configuration error (port in use, ...): restarting cannot help


def _die_with_parent() -> None:
    """A worker whose parent is killed (SIGKILL, no forwarding) stops too, instead of serving on as an orphan."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Workers:
    def __init__(self, count: int, run: Callable[[int, bool], int]):
        """`run(index, first)` serves in a forked worker and returns its exit status (`first`: its first start)."""
        self.count = count
        self.run = run
        self.pids: dict[int, int] = {}  # live (unreaped) worker pid -> its index
        self.started: dict[int, float] = {}  # index -> when its current process started
        self.quick_deaths: dict[int, int] = {}
        self.due: dict[int, float] = {}  # index -> when to start it again
        self.restarts = 0
        self._stop_signal = 0  # SIGTERM/SIGINT seen: forward SIGTERM, start nothing more
        self._stopped = False
        self._hup = False
        self._status = 0
        self._wake_r = self._wake_w = -1

    # -- signal handlers: note only (they may run between any two bytecodes of the loop)
    def _on_stop(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    def _on_hup(self, signum: int, frame: object) -> None:
        self._hup = True

    def _on_child(self, signum: int, frame: object) -> None:
        pass  # the wakeup fd already woke the loop

    def _spawn(self, index: int, first: bool) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # Before anything else: the parent's handlers and wakeup fd are not the worker's.
                signal.set_wakeup_fd(-1)
                os.close(self._wake_r)
                os.close(self._wake_w)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's reload handler (Gateway.start)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing to drain before the loop serves
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM for all
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _die_with_parent()
                code = self.run(index, first)
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids[pid] = index
        self.started[index] = time.monotonic()

    def _reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.pids.clear()
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)  # gone from the live set before anything can signal it again
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self._stopped:
                # Our SIGTERM ended a worker still starting (its default action, before its loop's handler): clean.
                self._status = self._status or (0 if code == -signal.SIGTERM else code)
                continue
            if code == CONFIG_ERROR:
                log.error("worker %d (pid %d) exited with a configuration error: stopping", index, pid)
                self._status = CONFIG_ERROR
                self._stop()
                continue
            lived = time.monotonic() - self.started[index]
            quick = self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1 if lived < QUICK_DEATH_S else 0
            delay = 0.0 if quick == 0 else min(0.5 * 2 ** (quick - 1), MAX_BACKOFF_S)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            log.warning("worker %d (pid %d) %s after %.1f s; starting it again in %.1f s", index, pid, how, lived,
                        delay)
            self.due[index] = time.monotonic() + delay

    def _stop(self) -> None:
        self._stopped = True
        self.due.clear()
        self._forward(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        for pid in list(self.pids):  # live and not reaped: the PID is still this worker's
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def serve(self) -> int:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        # Installed before the first fork: a signal in between must not take the default action.
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, self._on_child)
        for index in range(self.count):
            self._spawn(index, first=True)
        while True:
            self._reap()
            if self._stop_signal and not self._stopped:
                self._stop()
            if self._hup:
                self._hup = False
                self._forward(signal.SIGHUP)  # each worker reloads its own keys and certificate
            if self._stopped and not self.pids:
                return self._status
            now = time.monotonic()
            for index, when in list(self.due.items()):
                if when <= now:
                    del self.due[index]
                    self.restarts += 1
                    self._spawn(index, first=False)
            timeout = max(0.0, min(self.due.values()) - time.monotonic()) if self.due else None
            try:
                select.select([self._wake_r], [], [], timeout)
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
