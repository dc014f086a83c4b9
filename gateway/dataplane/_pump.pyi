"""Types of the C stream pump (_pump.c)."""
from collections.abc import Callable

COMPLETE: int
COMPLETE_EXTRA: int
EOF: int
UPSTREAM_ERROR: int
MALFORMED: int
CLIENT_ERROR: int
PUMP_ERROR: int  # the pump's own failure (epoll, memory): neither the replica's nor the client's
MAX_CHUNK_LINE: int
MAX_TRAILER_BYTES: int


class Stream:
    reads: int
    bytes_in: int
    max_gap: float
    blocked: bool
    registered: bool

    def cancel(self) -> None: ...


class Pump:
    active: int
    in_flight: int
    broken: bool
    zombies: int

    def __init__(self, coalesce_s: float = 0.0, min_streams: int = 0) -> None: ...

    def add(self, replica_fd: int, client_fd: int, on_end: Callable[[int, bytes | None], None],
            body_so_far: bytes) -> Stream | None: ...

    def run(self) -> None: ...

    def fileno(self) -> int: ...


def _fault(name: str, count: int) -> None: ...
