"""Drives the C stream pump in-process on socket pairs: the replica's and the client's side of one stream, the
pump's run() called as uvloop would, with a deadline. Shared by the pump's unit and fuzz tests (test_pump_unit.py,
test_pump_fuzz.py), which also run against the sanitizer build (scripts/pump_asan.sh)."""

from __future__ import annotations

import fcntl
import re
import select
import socket
import struct
import termios
import time

import httptools

from gateway.dataplane import _pump

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
ENDED = {_pump.COMPLETE, _pump.COMPLETE_EXTRA, _pump.EOF, _pump.UPSTREAM_ERROR, _pump.MALFORMED,
         _pump.CLIENT_ERROR, _pump.PUMP_ERROR}


def unread(sock: socket.socket) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def epoll_registrations(epfd: int) -> dict[int, int]:
    """What the kernel holds in an epoll set: fd -> the 64-bit data word (/proc/self/fdinfo, proc(5))."""
    with open(f"/proc/self/fdinfo/{epfd}") as handle:
        return {int(fd): int(data, 16) for fd, data in
                re.findall(r"^tfd:\s*(\d+)\s+events:\s*[0-9a-f]+\s+data:\s*([0-9a-f]+)", handle.read(), re.M)}


class Rig:
    """One pumped stream between two socket pairs (the pump reads `up`, writes `cl`; the test plays the replica on
    `replica` and the client on `client`)."""

    def __init__(self, pump: _pump.Pump | None = None, body_so_far: bytes = b"", blocking: bool = False,
                 add: bool = True, **add_options: object):
        self.pump = pump if pump is not None else _pump.Pump()
        self.up, self.replica = socket.socketpair()
        self.cl, self.client = socket.socketpair()
        if not blocking:
            self.up.setblocking(False)
            self.cl.setblocking(False)
        self.client.setblocking(False)
        self.ended: list[tuple[int, bytes | None]] = []
        self.received = bytearray()
        self.stream = None
        if add:
            self.stream = self.pump.add(self.up.fileno(), self.cl.fileno(), self.on_end, body_so_far, **add_options)

    def on_end(self, code: int, leftover: bytes | None) -> None:
        self.ended.append((code, leftover))

    @property
    def code(self) -> int | None:
        return self.ended[0][0] if self.ended else None

    def run_once(self) -> None:
        self.pump.run()

    def feed(self, piece: bytes, deadline_s: float = 10.0) -> None:
        """The replica writes one piece; the pump runs until it read it (one read) or the stream ended."""
        self.replica.sendall(piece)
        deadline = time.monotonic() + deadline_s
        while not self.ended and unread(self.up) and not (self.stream is not None and self.stream.blocked):
            assert time.monotonic() < deadline, "the pump did not read what the replica sent"
            select.select([self.pump.fileno()], [], [], 1.0)
            self.pump.run()
        self.drain()

    def feed_reads(self, reads: list[bytes]) -> None:
        """The replica writes each read in turn, until the stream ended."""
        for piece in reads:
            self.feed(piece)
            if self.ended:
                return

    def drain(self) -> bytes:
        """What the client received so far (all of it, kept in `received`)."""
        while True:
            try:
                data = self.client.recv(1 << 20)
            except BlockingIOError:
                return bytes(self.received)
            if not data:
                return bytes(self.received)
            self.received += data

    def close(self) -> None:
        if self.stream is not None and not self.ended:
            self.stream.cancel()
        for sock in (self.up, self.replica, self.cl, self.client):
            sock.close()


class Reference:
    """httptools (llhttp) as the reference for chunked framing: fed byte by byte after the head, it says where the
    message ends (`end`), or where it turned malformed (`error_at`), or neither (the message goes on)."""

    def __init__(self, body: bytes):
        self.end: int | None = None
        self.error_at: int | None = None
        self._i = -1
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(HEAD)
        for i in range(len(body)):
            self._i = i
            try:
                parser.feed_data(body[i:i + 1])
            except httptools.HttpParserError:
                self.error_at = i
                return
            if self.end is not None:
                return

    def on_message_complete(self) -> None:
        self.end = self._i + 1
