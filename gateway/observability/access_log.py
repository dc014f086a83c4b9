"""Structured access log: one JSON line per request, written by a thread.

The event loop only serializes the record (orjson) and appends the bytes to a
batch; `flush()`, called by the gateway's sweeper every 100 ms, hands the batch
to a writer thread, which does the blocking write to stdout (a slow pipe cannot
stall relaying). Waking a thread per request would cost more than the request
itself (a futex wake and a context switch), and logging.QueueHandler's
per-record formatting even more, hence this small hand-written pipeline.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import BinaryIO

import orjson

_STOP = b""


class AccessLog:
    def __init__(self, enabled: bool, stream: BinaryIO | None = None):
        self.enabled = enabled
        self._batch: list[bytes] = []
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._stream = stream or sys.stdout.buffer
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    def write(self, record: dict[str, object]) -> None:
        if self.enabled:
            self._batch.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

    def flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._queue.put(b"".join(batch))

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            try:
                if data:
                    self._stream.write(data)
                    self._stream.flush()
            except (OSError, ValueError):
                return
            if data == _STOP:
                return

    def close(self) -> None:
        if self._thread is not None:
            self.flush()
            self._queue.put(_STOP)
            self._thread.join(timeout=2)
            self._thread = None
