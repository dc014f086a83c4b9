"""Structured access log: one JSON line per request, written by a thread.

The event loop only serializes the record (orjson) and puts the bytes on a queue;
a writer thread does the blocking write to stdout (which may be a slow pipe), so
a stalled log reader never stalls relaying. logging.QueueHandler was not used:
its per-record formatting and copying cost more than the whole request here.
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
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._stream = stream or sys.stdout.buffer
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()

    def write(self, record: dict[str, object]) -> None:
        if self.enabled:
            self._queue.put(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

    def _run(self) -> None:
        while True:
            lines = [self._queue.get()]
            while True:  # batch what is already queued into one write
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in lines
            try:
                self._stream.write(b"".join(lines))
                self._stream.flush()
            except (OSError, ValueError):
                return
            if stop:
                return

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=2)
            self._thread = None
