"""The WebSocket tunnel (gateway/dataplane/tunnel.py) in process, over mock transports (uvicorn's test style).

The end-to-end tests (real websockets client, gateway and replica processes) are in test_websockets.py.
"""

from __future__ import annotations

import asyncio

from gateway.dataplane.tunnel import Tunnel


class MockTransport(asyncio.Transport):
    """Records what is written; a high-water mark makes it call pause_writing like a real transport."""

    def __init__(self, high_water: int = 1 << 30):
        super().__init__()
        self.protocol: asyncio.Protocol | None = None
        self.written: list[bytes] = []
        self.buffered = 0
        self.high_water = high_water
        self.write_paused = False
        self.reading = True
        self.closing = False
        self.aborted = False
        self.eof_written = False
        self.half_close = True

    # -- asyncio.Transport
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[return-value]

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.written.append(bytes(data))
        self.buffered += len(data)
        if self.buffered > self.high_water and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()  # type: ignore[union-attr]

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 0, self.high_water

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    # -- the test's side of it
    def drain(self) -> bytes:
        """The peer read everything buffered."""
        data = b"".join(self.written)
        self.written.clear()
        self.buffered = 0
        if self.write_paused:
            self.write_paused = False
            self.protocol.pause_writing and self.protocol.resume_writing()  # type: ignore[union-attr]
        return data

    def receive(self, data: bytes) -> None:
        assert self.reading, "the tunnel reads a paused transport"
        self.protocol.data_received(data)  # type: ignore[union-attr]

    def lose(self, exc: Exception | None = None) -> None:
        self.closing = True
        self.protocol.connection_lost(exc)  # type: ignore[union-attr]


def tunnel(timeout_s: float = 60.0, client_high: int = 1 << 30, upstream_high: int = 1 << 30):
    client, upstream = MockTransport(client_high), MockTransport(upstream_high)
    ended: list[Tunnel] = []
    client_gone: list[bool] = []
    t = Tunnel(client, upstream, timeout_s, ended.append, lambda: client_gone.append(True))
    return t, client, upstream, ended, client_gone


def test_start_leaves_an_end_paused_while_its_peer_is_past_its_high_water_mark() -> None:
    t, client, upstream, _, _ = tunnel(upstream_high=4)
    client.pause_reading()
    t.start(to_upstream=b"early frames")  # the replica has not taken them yet
    assert not client.reading
    upstream.drain()  # now it has: resume_writing reads the client again
    assert client.reading
    t, client, upstream, _, _ = tunnel(upstream_high=1024)
    client.pause_reading()
    t.start(to_upstream=b"early")  # buffered, but below the mark: read on
    assert client.reading


def test_bytes_flow_both_ways_as_they_are() -> None:
    t, client, upstream, ended, _ = tunnel()
    t.start(to_client=b"\x81\x02hi", to_upstream=b"\x81\x82abcdXY")
    assert client.protocol is t.client and upstream.protocol is t.upstream
    assert client.drain() == b"\x81\x02hi" and upstream.drain() == b"\x81\x82abcdXY"
    client.receive(b"frame-1")
    upstream.receive(b"reply-1")
    upstream.receive(b"reply-2")
    assert upstream.drain() == b"frame-1"
    assert client.drain() == b"reply-1reply-2"
    assert (t.bytes_in, t.bytes_out) == (len(b"\x81\x82abcdXY") + 7, len(b"\x81\x02hi") + 14)
    assert not ended


def test_a_client_that_stops_reading_stops_the_replica_being_read() -> None:
    t, client, upstream, _, _ = tunnel(client_high=64 * 1024)
    t.start()
    chunk = b"x" * 16 * 1024
    while upstream.reading:
        upstream.receive(chunk)
    # The client's transport is past its high-water mark: the replica's socket is no longer read.
    assert client.buffered <= 64 * 1024 + len(chunk)
    client.drain()
    assert upstream.reading
    upstream.receive(chunk)
    assert client.drain() == chunk


def test_a_replica_that_stops_reading_stops_the_client_being_read() -> None:
    t, client, upstream, _, _ = tunnel(upstream_high=1024)
    t.start()
    client.receive(b"y" * 2048)
    assert not client.reading
    upstream.drain()
    assert client.reading


def test_start_resumes_reading_both_ends() -> None:
    t, client, upstream, _, _ = tunnel()
    client.pause_reading()  # the client connection stops reading once it sees an upgrade
    upstream.pause_reading()  # the replica connection may be coalescing or held by backpressure
    t.start()
    assert client.reading and upstream.reading


def test_a_fin_is_passed_on_and_the_other_direction_keeps_flowing() -> None:
    t, client, upstream, ended, _ = tunnel()
    t.start()
    assert t.client.eof_received() is True  # keep the client's socket open for the replica's last bytes
    assert upstream.eof_written and not upstream.closing
    upstream.receive(b"last words")
    assert client.drain() == b"last words"
    assert t.upstream.eof_received() is False  # both directions done: the transport closes itself
    assert not ended
    upstream.lose()
    assert client.closing and not client.aborted  # closed after flushing
    assert ended == [t] and t.why == "upstream_closed"


def test_without_half_close_a_fin_closes_the_tunnel() -> None:
    t, client, upstream, ended, gone = tunnel()
    upstream.half_close = False  # e.g. TLS
    t.start()
    assert t.client.eof_received() is False
    client.lose()
    assert upstream.closing and not upstream.aborted
    assert ended == [t] and t.why == "client_closed" and gone == [True]


def test_a_reset_is_passed_on_as_a_reset() -> None:
    t, client, upstream, ended, _ = tunnel()
    t.start()
    upstream.lose(ConnectionResetError())
    assert client.aborted
    assert ended == [t]


def test_ending_is_reported_once() -> None:
    t, client, upstream, ended, gone = tunnel()
    t.start()
    upstream.lose()
    client.lose()
    assert ended == [t] and gone == [True]


def test_the_tunnel_timeout_counts_silence_in_both_directions() -> None:
    t, client, upstream, ended, _ = tunnel(timeout_s=5.0)
    t.start()
    t.check_timeouts(100.0)
    t.check_timeouts(104.0)
    client.receive(b"ping")
    t.check_timeouts(108.0)  # a byte moved: the silence starts again
    upstream.receive(b"pong")
    t.check_timeouts(112.0)
    assert not ended
    t.check_timeouts(117.5)
    assert ended == [t] and t.why == "timeout"
    assert client.aborted and upstream.aborted


def test_abort_cuts_both_ends() -> None:
    t, client, upstream, ended, _ = tunnel()
    t.start()
    t.abort("drain")
    assert client.aborted and upstream.aborted and t.why == "drain" and ended == [t]


def test_take_bytes_reports_what_moved_since_the_last_call() -> None:
    t, client, upstream, _, _ = tunnel()
    t.start(to_client=b"abc")
    client.receive(b"12345")
    assert t.take_bytes() == (5, 3)
    upstream.receive(b"zz")
    assert t.take_bytes() == (0, 2)
    assert t.take_bytes() == (0, 0)
