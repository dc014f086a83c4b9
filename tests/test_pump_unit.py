"""The C stream pump's hardening, in-process on socket pairs (tests/pump_rig.py): each test reaches one error path
of _pump.c (through its fault injection where a healthy kernel never fails) and fails without the fix it names.
Also run against the sanitizer build (scripts/pump_asan.sh), where a use-after-free is a crash."""

from __future__ import annotations

import gc
import os
import re
import select
import signal
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.dataplane import _pump
from tests.pump_rig import Rig, epoll_registrations

SOURCE = Path(__file__).resolve().parent.parent / "gateway" / "dataplane" / "_pump.c"


@pytest.fixture(autouse=True)
def no_faults() -> Iterator[None]:
    yield
    for name in ("epoll_add", "epoll_del", "epoll_wait", "alloc"):
        _pump._fault(name, 0)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def live_registrations(pump: _pump.Pump, streams: list[weakref.ref]) -> None:
    """Every stream pointer the kernel holds in the pump's epoll set is a stream that is still alive."""
    alive = {id(ref()) for ref in streams if ref() is not None}
    for fd, data in epoll_registrations(pump.fileno()).items():
        if data == 1:
            continue  # the timerfd
        assert data & ~2 in alive, f"fd {fd} is registered with a pointer to a freed stream"


def blocked_client(rig: Rig) -> None:
    """Make the client's socket full so the pump's next write to it is short."""
    rig.cl.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rig.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


# -- a failed EPOLL_CTL_DEL: the stream stays alive while the kernel holds its pointer

def test_a_cancelled_stream_that_could_not_leave_the_epoll_set_is_kept_until_it_does(rigs) -> None:
    rig = Rig()
    rigs.append(rig)
    ref = weakref.ref(rig.stream)
    _pump._fault("epoll_del", 1)
    rig.stream.cancel()
    rig.stream = None
    gc.collect()
    assert rig.pump.zombies == 1
    live_registrations(rig.pump, [ref])  # without the zombie list: the stream is freed, its pointer registered
    # The replica speaks: the pump sees the zombie's fd, takes it out of the set this time, and lets it go.
    rig.replica.sendall(b"5\r\nhello\r\n")
    select.select([rig.pump.fileno()], [], [], 5)
    rig.pump.run()
    gc.collect()
    assert rig.pump.zombies == 0 and ref() is None
    assert set(epoll_registrations(rig.pump.fileno()).values()) == {1}


@pytest.mark.parametrize("failures", [1, 2])
def test_a_failed_disarm_when_the_client_blocks_ends_the_stream_as_the_pumps_error(rigs, failures: int) -> None:
    rig = Rig()
    rigs.append(rig)
    blocked_client(rig)
    ref = weakref.ref(rig.stream)
    _pump._fault("epoll_del", failures)  # block() cannot stop reading the replica (and, with 2, neither can release)
    rig.feed(b"%x\r\n%s\r\n" % (60000, b"x" * 60000))
    assert rig.code == _pump.PUMP_ERROR  # not the client's fault: it was CLIENT_ERROR
    rig.stream = None
    gc.collect()
    live_registrations(rig.pump, [ref])
    assert rig.pump.zombies == failures - 1


@pytest.mark.parametrize("fault", ["epoll_add", "alloc"])
def test_a_pump_failure_while_blocking_is_labelled_as_the_pumps(rigs, fault: str) -> None:
    rig = Rig()
    rigs.append(rig)
    blocked_client(rig)
    _pump._fault(fault, 1)
    rig.feed(b"%x\r\n%s\r\n" % (60000, b"x" * 60000))
    assert rig.code == _pump.PUMP_ERROR
    assert rig.pump.active == 0 and rig.pump.zombies == 0


def test_a_failed_rearm_after_a_coalescing_window_is_the_pumps_error(rigs) -> None:
    pump = _pump.Pump(0.001, 0)
    rig = Rig(pump)
    rigs.append(rig)
    rig.feed(b"1\r\na\r\n")  # back to back after add(): the stream sleeps one window
    _pump._fault("epoll_add", 1)
    while not rig.ended:
        select.select([pump.fileno()], [], [], 5)
        pump.run()
    assert rig.code == _pump.PUMP_ERROR  # was UPSTREAM_ERROR: the replica did nothing wrong


# -- the Stream is GC-tracked; on_end must be callable

class Holder:
    def __init__(self, pump: _pump.Pump, rig: Rig):
        self.pump = pump
        self.stream = pump.add(rig.up.fileno(), rig.cl.fileno(), self.on_end, b"")

    def on_end(self, code: int, leftover: bytes | None) -> None:
        pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_stream_and_its_pump_left_in_a_cycle_are_collected_and_close_their_sockets(rigs) -> None:
    rig = Rig(add=False)
    rigs.append(rig)
    before = open_fds()
    holder = Holder(_pump.Pump(), rig)  # stream -> on_end -> holder -> stream, pump <-> stream
    assert gc.is_tracked(holder.stream)
    stream_ref = weakref.ref(holder.stream)
    del holder
    gc.collect()
    assert stream_ref() is None
    assert open_fds() == before  # the dups, the epoll fd and the timerfd are closed


def test_on_end_must_be_callable(rigs) -> None:
    rig = Rig(add=False)
    rigs.append(rig)
    before = open_fds()
    with pytest.raises(TypeError):
        rig.pump.add(rig.up.fileno(), rig.cl.fileno(), 42, b"")
    assert rig.pump.active == 0 and open_fds() == before


# -- chunk framing: caps, zero padding

def test_a_zero_padded_size_is_valid(rigs) -> None:
    rig = Rig()
    rigs.append(rig)
    body = b"0000000000000000000000005\r\nhello\r\n00000000000000000000\r\n\r\n"
    rig.feed(body)
    assert rig.code == _pump.COMPLETE and rig.received == body  # was MALFORMED: leading zeros counted as digits


def test_a_size_of_2_to_the_60_is_malformed(rigs) -> None:
    rig = Rig()
    rigs.append(rig)
    rig.feed(b"1000000000000000\r\n")
    assert rig.code == _pump.MALFORMED and rig.received == b""


@pytest.mark.parametrize("where", ["extension", "trailer"])
def test_extension_and_trailer_bytes_are_capped(rigs, where: str) -> None:
    if where == "extension":
        ok = b"5;n=" + b"v" * (_pump.MAX_CHUNK_LINE - 5) + b"\r\nhello\r\n"
        too_long = b"5;n=" + b"v" * _pump.MAX_CHUNK_LINE + b"\r\nhello\r\n"
    else:
        ok = b"0\r\nx: " + b"v" * (_pump.MAX_TRAILER_BYTES - 10) + b"\r\n\r\n"
        too_long = b"0\r\nx: " + b"v" * _pump.MAX_TRAILER_BYTES + b"\r\n\r\n"
    rig = Rig()
    rigs.append(rig)
    rig.feed(ok)
    assert rig.code in (None, _pump.COMPLETE) and rig.received == ok
    rig = Rig()
    rigs.append(rig)
    for i in range(0, len(too_long), 1000):  # byte runs across reads: the count carries over
        rig.feed(too_long[i:i + 1000])
        if rig.ended:
            break
    assert rig.code == _pump.MALFORMED


# -- reads never block; an epoll_wait error is reported once

def test_a_read_never_blocks_even_on_a_blocking_socket(rigs) -> None:
    """A's end callback takes B's bytes from B's socket in the same batch: B's read must not block."""
    pump = _pump.Pump()
    a, b = Rig(pump, blocking=True, add=False), Rig(pump, blocking=True, add=False)
    rigs += [a, b]
    a.stream = pump.add(a.up.fileno(), a.cl.fileno(), lambda code, leftover: b.up.recv(100), b"")
    b.stream = pump.add(b.up.fileno(), b.cl.fileno(), b.on_end, b"")
    a.replica.sendall(b"0\r\n\r\n")
    b.replica.sendall(b"5\r\nhello\r\n")

    def blocked(signum, frame):
        raise TimeoutError("Pump.run() blocked in a read")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        pump.run()  # a blocking read() here hangs until the alarm: EINTR, then TimeoutError
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert pump.active == 1 and not b.ended


def test_an_epoll_wait_error_ends_every_stream_once_and_is_not_repeated(rigs) -> None:
    pump = _pump.Pump(0.001, 0)
    a, b = Rig(pump), Rig(pump)
    rigs += [a, b]
    a.feed(b"1\r\na\r\n")  # sleeping in a coalescing window: the timer is armed
    _pump._fault("epoll_wait", -1)
    with pytest.raises(OSError):
        pump.run()
    assert a.code == b.code == _pump.PUMP_ERROR and pump.broken and pump.active == 0
    pump.run()  # was: OSError again, on every pass of the loop
    assert select.select([pump.fileno()], [], [], 0.05)[0] == []  # uvloop is not woken for it again
    c = Rig(pump)
    rigs.append(c)
    assert c.stream is None  # the Python path relays new streams


# -- module init and member definitions

def test_module_init_checks_every_addition_and_uses_no_deprecated_member_names() -> None:
    source = SOURCE.read_text()
    init = source[source.index("PyMODINIT_FUNC"):]
    assert "PyModule_AddObject(" not in source  # steals a reference only on success: the leak-prone API
    additions = re.findall(r"PyModule_Add\w+\(", init)
    checked = re.findall(r"PyModule_Add\w+\([^;]*?\) < 0", init)
    assert additions and len(additions) == len(checked)
    assert "Py_DECREF(m);" in init  # the module is not leaked when an addition fails
    # structmember.h's T_INT / READONLY are deprecated since 3.12: only a 3.11 fallback may name them.
    outside_fallback = re.sub(r"#if PY_VERSION_HEX < 0x030C0000.*?#endif", "", source, flags=re.S)
    assert not re.search(r"\b(T_INT|T_OBJECT|READONLY)\b", outside_fallback)


# -- add() with a resumable stream's events from the head's read (unsent): it registers before it writes them

def _unsent_events(size: int) -> bytes:
    event = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
             b'"delta":{"content":"' + b"x" * size + b'"},"logprobs":null,"finish_reason":null,"token_ids":[7]}]}\n\n')
    return b"%x\r\n%s\r\n" % (len(event), event)


RESUMABLE = _pump.EV_RESUME | _pump.EV_FIRST | _pump.EV_STRIP_IDS


def test_a_registration_add_cannot_make_fails_it_before_it_writes_the_heads_events(rigs) -> None:
    rig = Rig(add=False)
    rigs.append(rig)
    _pump._fault("epoll_add", 1)
    with pytest.raises(OSError):
        rig.pump.add(rig.up.fileno(), rig.cl.fileno(), rig.on_end, _unsent_events(100), RESUMABLE, unsent=True)
    assert rig.drain() == b""  # Python relays them: written once
    assert rig.pump.active == 0 and rig.pump.zombies == 0
    assert set(epoll_registrations(rig.pump.fileno()).values()) == {1}


def test_add_failing_while_the_replica_cannot_leave_the_epoll_set_keeps_the_stream_until_it_does(rigs) -> None:
    """The client takes only part of the head's events and add() cannot block (the replica's socket does not leave
    the set): the stream is kept among the zombies, never freed while the kernel holds its pointer."""
    rig = Rig(add=False)
    rigs.append(rig)
    blocked_client(rig)
    _pump._fault("epoll_del", -1)
    try:
        with pytest.raises(OSError):
            rig.pump.add(rig.up.fileno(), rig.cl.fileno(), rig.on_end, _unsent_events(200_000), RESUMABLE,
                         unsent=True)
    finally:
        _pump._fault("epoll_del", 0)
    gc.collect()
    assert rig.pump.zombies == 1 and rig.pump.active == 0
    registered = set(epoll_registrations(rig.pump.fileno()).values()) - {1}
    assert len(registered) == 1  # the replica's socket, with the zombie's pointer
    rig.replica.sendall(b"5\r\nhello\r\n")  # the zombie's fd turns readable: the pump takes it out this time
    select.select([rig.pump.fileno()], [], [], 5)
    rig.pump.run()
    gc.collect()
    assert rig.pump.zombies == 0
    assert set(epoll_registrations(rig.pump.fileno()).values()) == {1}
