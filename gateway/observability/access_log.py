"""Structured access log: one JSON line per request, written by a thread.

The event loop only serializes the record (orjson) and appends the bytes to a
batch; `flush()`, called by the gateway's sweeper every 100 ms, hands the batch
to a writer thread, which does the blocking write to stdout (a slow pipe cannot
stall relaying). Waking a thread per request would cost more than the request
itself (a futex wake and a context switch), and logging.QueueHandler's
per-record formatting even more, hence this small hand-written pipeline.

Memory is bounded: the batch and the lines waiting for the writer together hold at
most `max_buffer_bytes`. Past that (the reader of stdout is slow or stuck), or once
the writer is dead (the reader went away: EPIPE), lines are dropped and counted
(`on_drop`, the gateway_access_log_dropped_lines metric), with a log line on stderr
at most every DROP_REPORT_INTERVAL_S. The writer never stops without saying why.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

import orjson

log = logging.getLogger("gateway.access_log")

DEFAULT_MAX_BUFFER_BYTES = 8 * 1024 * 1024
DROP_REPORT_INTERVAL_S = 10.0
_STOP = (b"", 0)


class AccessLog:
    def __init__(self, enabled: bool, stream: BinaryIO | None = None,
                 max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES, on_drop: Callable[[int], None] | None = None):
        self.enabled = enabled
        self.max_buffer_bytes = max_buffer_bytes
        self._on_drop = on_drop
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_dropped = 0
        # Written by the event loop, taken by the writer thread: (bytes, lines) chunks, and their total size.
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._queued_bytes = 0
        self._lost_lines = 0  # lines the writer had taken or was holding when it died (counted at the next flush)
        self._ready = threading.Condition()
        self.dead: str | None = None  # why the writer stopped, once it has
        self.dropped = 0
        self._reported = 0
        self._reported_at = 0.0
        self._stream = stream or sys.stdout.buffer
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    # -- the event loop's side
    def write(self, record: dict[str, object]) -> None:
        if self.enabled:
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
            if self._batch_bytes + len(line) > self.max_buffer_bytes:
                self._batch_dropped += 1
                return
            self._batch_bytes += len(line)
            self._batch.append(line)

    def flush(self) -> None:
        dropped, self._batch_dropped = self._batch_dropped, 0
        if self._batch:
            batch, self._batch = self._batch, []
            data, self._batch_bytes = b"".join(batch), 0
            with self._ready:
                if self.dead is None and self._queued_bytes + len(data) <= self.max_buffer_bytes:
                    self._chunks.append((data, len(batch)))
                    self._queued_bytes += len(data)
                    self._ready.notify()
                else:
                    dropped += len(batch)
        if self._lost_lines:
            with self._ready:
                dropped, self._lost_lines = dropped + self._lost_lines, 0
        if dropped:
            self.dropped += dropped
            if self._on_drop is not None:
                self._on_drop(dropped)
            now = time.monotonic()
            if now - self._reported_at >= DROP_REPORT_INTERVAL_S:
                self._report(now)

    def _report(self, now: float) -> None:
        why = f"the writer stopped: {self.dead}" if self.dead else "stdout is not read fast enough"
        log.warning("access log: %d lines dropped (%d in all; %s)", self.dropped - self._reported, self.dropped, why)
        self._reported, self._reported_at = self.dropped, now

    # -- the writer thread
    def _run(self) -> None:
        holding = 0
        try:
            fd = self._stream.fileno()
            while True:
                with self._ready:
                    while not self._chunks:
                        self._ready.wait()
                    data, holding = self._chunks.popleft()
                if data == _STOP[0]:
                    return
                # os.write on the fd, not the buffered stream: a write blocked on a stuck pipe then holds no
                # Python-level lock, so the interpreter can still exit (a daemon thread holding stdout's buffer
                # lock aborts it at shutdown).
                _write_all(fd, data)
                with self._ready:
                    self._queued_bytes -= len(data)
                holding = 0
        except BaseException as exc:  # noqa: BLE001 - any end but _STOP is reported, never silent
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BrokenPipeError) else "EPIPE (its reader is gone)"
            with self._ready:
                self.dead = why
                self._lost_lines += holding + sum(lines for _, lines in self._chunks)
                self._chunks.clear()
                self._queued_bytes = 0
            log.error("access log: writer stopped (%s); every later line is dropped and counted in "
                      "gateway_access_log_dropped_lines", why)

    def close(self) -> None:
        if self._thread is not None:
            self.flush()
            with self._ready:
                self._chunks.append(_STOP)
                self._ready.notify()
            self._thread.join(timeout=2)
            self._thread = None
            self.flush()
            if self.dropped > self._reported:
                self._report(time.monotonic())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # stdout shared with a non-blocking user: wait until it can take more
            select.select([], [fd], [], 1.0)
