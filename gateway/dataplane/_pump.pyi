"""Types of the C stream pump (_pump.c)."""
from collections.abc import Callable
from typing import overload

COMPLETE: int
COMPLETE_EXTRA: int
EOF: int
UPSTREAM_ERROR: int
MALFORMED: int
CLIENT_ERROR: int
PUMP_ERROR: int  # the pump's own failure (epoll, memory): neither the replica's nor the client's
BROKEN: int  # EV_RESUME: vLLM's in-band error, an early [DONE] or a non-JSON event: Python resumes the stream
EV_ON: int
EV_RESUME: int
EV_STRIP_IDS: int
EV_NEED_USAGE: int
EV_FINISHED: int
EV_USAGE_SENT: int
EV_FIRST: int
EV_STRIP_USAGE: int
EV_PROMPT_KNOWN: int
EV_RESUMED_CHAT: int  # with EV_RESUMED: the client asked for chat (completions choices rebuilt as chat ones)
EV_RESUMED: int  # with EV_RESUME: a resumed part of a /v1/completions client's stream (ids, created, usage rewritten)
MAX_CHUNK_LINE: int
MAX_TRAILER_BYTES: int


class Stream:
    reads: int
    bytes_in: int
    max_gap: float
    blocked: bool
    registered: bool
    events: int
    usage: tuple[int, int] | None
    done_sent: bool
    broken: bool
    finished: bool
    usage_sent: bool
    no_ids: bool
    token_ids: bytes
    prompt_token_ids: bytes | None
    first_event: bytes | None
    unmatched: bool
    partial: bytes

    def cancel(self) -> None: ...


class Pump:
    active: int
    in_flight: int
    broken: bool
    zombies: int

    def __init__(self, coalesce_s: float = 0.0, min_streams: int = 0) -> None: ...

    def add(self, replica_fd: int, client_fd: int, on_end: Callable[[int, bytes | None], None],
            body_so_far: bytes, events: int = 0, prefix: bytes = b"", ident: bytes = b"", created: bytes = b"",
            offset: int = 0, unsent: bool = False) -> Stream | None: ...

    def run(self) -> None: ...

    def fileno(self) -> int: ...


def _fault(name: str, count: int) -> None: ...


def token_ids(read: bytes, strip: bool, frame: bool = False) -> tuple[bytes, bytes, bool, int, int, int] | None: ...


@overload
def meter_read(read: bytes) -> int: ...


@overload
def meter_read(read: bytes, where: bytearray) -> bool: ...


@overload
def meter_read(read: bytes, where: bool) -> tuple[int, int]: ...
