"""The data path in-process, in uvicorn's test style: the real protocols, relay and exchange on a real event
loop, with mock transports for the sockets (no subprocess, no network).

Every phase of an Exchange, every way it ends (exactly once), and when a replica connection goes back to
the pool. The C pump is off here (`state.pump is None`): the Python path, which the pump's own tests mirror.
The same Rig with `pump=True` runs the pumped path on real sockets (tests/test_exchange_pump.py).
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import struct
from collections.abc import Callable

import pytest

from gateway.config import Config, ReplicaSpec
from gateway.controlplane.apps import App, AppTable
from gateway.controlplane.targets import TargetSet
from gateway.dataplane.client import ClientConnection
from gateway.dataplane.exchange import Exchange, Outcome, Phase
from gateway.dataplane.forwarding import decision_headers
from gateway.dataplane.pumping import start_pump
from gateway.dataplane.reasons import GatewayError
from gateway.dataplane.relay import Relay
from gateway.dataplane.state import ServerState
from gateway.dataplane.upstream import UpstreamConnection
from gateway.observability.metrics import Metrics
from gateway.security.door import FrontDoor
from router_client.pool import KeepAlivePool


class MockTransport(asyncio.Transport):
    """What a socket transport does, recorded: writes, closes, aborts, paused reading, a write buffer."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)):
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.eof = False
        self.reading = True
        self.peer = peer
        self.buffer_size = 0
        self.protocol: asyncio.Protocol | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed or not self.aborted
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": self.peer}.get(name, default)

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data


class Peer:
    """The far end of one of the gateway's real sockets, played by the test: a client or a replica. Reads wait on the
    running loop (which meanwhile runs the protocols and the pump) with a deadline, never a sleep."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket):
        sock.setblocking(False)
        self.loop = loop
        self.sock = sock
        self.received = bytearray()
        self.eof = False
        self.reset = False  # the gateway aborted the connection (RST), not a FIN
        self.request_line = b""  # a replica's: the last request's first line (Rig.replica_request)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _read(self) -> None:
        try:
            data = await self.loop.sock_recv(self.sock, 1 << 16)
        except ConnectionResetError:
            self.reset, data = True, b""
        if not data:
            self.eof = True
        self.received += data

    async def until(self, check: Callable[[bytes], object], what: str, timeout_s: float = 5.0) -> bytes:
        """What arrived so far, once `check` holds for it."""
        try:
            async with asyncio.timeout(timeout_s):
                while not check(bytes(self.received)):
                    if self.eof:
                        raise AssertionError(f"closed before {what}; got {bytes(self.received)[-400:]!r}")
                    await self._read()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout_s} s; got {bytes(self.received)[-400:]!r}") from None
        return bytes(self.received)

    async def closed(self, what: str = "the gateway's close", timeout_s: float = 5.0) -> bytes:
        """Everything, once the gateway closed (FIN) or aborted (RST) its side."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self.eof:
                    await self._read()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout_s} s; got {bytes(self.received)[-400:]!r}") from None
        return bytes(self.received)

    def take(self) -> bytes:
        data = bytes(self.received)
        self.received.clear()
        return data

    def reset_now(self) -> None:
        """Leave at once: close with SO_LINGER 0, so the kernel sends an RST (a killed client)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.eof = True


class Rig:
    """One gateway's data path with replica targets whose connections are mock transports; with `pump=True`, the C
    pump on and every connection a real socket (the pump needs fds it can epoll) whose far end the test plays
    (`sockets=True` alone: real sockets, the Python relay)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, replicas: tuple[str, ...] = ("r1",), pump: bool = False,
                 sockets: bool = False, **config: object):
        self.loop = loop
        self.config = Config().with_changes(**config)
        self.metrics = Metrics()
        self.finished: list = []
        self.state = ServerState(self.metrics, 100_000, "x-session-id", self._finished)
        self.state.loop = loop
        # Keys, CORS or token accounting configured: every request passes the front door, as the server wires it.
        self.state.door = FrontDoor(self.config) if self.config.front_door else None
        self.targets = TargetSet([ReplicaSpec(name, "127.0.0.1", 9) for name in replicas])
        self.target = self.targets.targets[0]
        self.upstreams: list[UpstreamConnection] = []
        self.connect_error: OSError | None = None
        self.connect_gate: asyncio.Event | None = None
        for target in self.targets.targets:
            target.pool = KeepAlivePool(lambda target=target: self._connect(target), 4.0)
        self.apps = AppTable([App("", "/v1", self.targets)])
        self.failed_on: list = []
        self.marked_down: list = []
        self.relay = Relay(self.config, self.state, self.apps, self._internal, self.marked_down.append,
                           replica_failed=self.failed_on.append)
        self.ended: list[tuple[Exchange, Outcome]] = []
        self._changed = asyncio.Event()
        # Real sockets: the pump as the server starts it, the replica connections as they connect.
        self.coalesce_s, self.coalesce_min_streams = self.config.coalesce_ms / 1000, self.config.coalesce_min_streams
        self.pump = start_pump(loop, self.coalesce_s, self.coalesce_min_streams) if pump else None
        self.state.pump = self.pump
        self.sockets = sockets or pump
        self.connected: asyncio.Queue[UpstreamConnection] = asyncio.Queue()
        self._listener: socket.socket | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._peers: list[socket.socket] = []
        Exchange.on_end.append(self._on_end)

    def close(self) -> None:
        Exchange.on_end.remove(self._on_end)
        for transport in self._transports:
            transport.abort()
        for sock in self._peers:
            sock.close()
        if self._listener is not None:
            self._listener.close()
        if self.pump is not None:
            self.loop.remove_reader(self.pump.fileno())

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_end(self, exchange: Exchange, outcome: Outcome) -> None:
        self.ended.append((exchange, outcome))
        self._changed.set()

    def _finished(self, request) -> None:
        if request.meter is not None:
            request.meter.end(request.resume)  # settled first, as the server's request_finished does
        self.finished.append(request)
        self._changed.set()

    async def until(self, check: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
        """Wait until `check()` holds, woken by the rig's events (an exchange ended, a request finished)."""
        try:
            async with asyncio.timeout(timeout_s):
                while not check():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout_s} s") from None

    async def _internal(self, client, request) -> None:
        client.respond(200, [], b"internal")

    async def _connect(self, target=None) -> UpstreamConnection:
        if self.connect_gate is not None:
            await self.connect_gate.wait()
        if self.connect_error is not None:
            raise self.connect_error
        if self.sockets:
            return await self.socket_upstream(target or self.target)
        return self.new_upstream(target)

    def new_upstream(self, target=None) -> UpstreamConnection:
        conn = UpstreamConnection(target or self.target)
        transport = MockTransport(("127.0.0.1", 9))
        conn.connection_made(transport)
        conn.mock = transport  # type: ignore[attr-defined]
        self.upstreams.append(conn)
        return conn

    def pooled(self) -> UpstreamConnection:
        conn = self.new_upstream()
        self.target.pool.put(conn)
        return conn

    def client(self) -> tuple[ClientConnection, MockTransport]:
        client = ClientConnection(self.config, self.state, self.relay)
        transport = MockTransport()
        client.connection_made(transport)
        return client, transport

    def get(self) -> tuple[UpstreamConnection, ClientConnection, MockTransport]:
        """A client's GET, sent on a pooled replica connection."""
        conn = self.pooled()
        client, out = self.client()
        client.data_received(GET)
        return conn, client, out

    def streaming(self) -> tuple[UpstreamConnection, ClientConnection, MockTransport]:
        """A client's GET whose chunked answer has begun (head and first event relayed)."""
        conn, client, out = self.get()
        conn.data_received(CHUNKED[:100])
        return conn, client, out

    # -- real sockets (pump=True or sockets=True)
    def tcp_pair(self, peer_rcvbuf: int = 0, our_sndbuf: int = 0) -> tuple[socket.socket, socket.socket]:
        """Two connected loopback TCP sockets, (the gateway's, the peer's): a socketpair the protocols accept as they
        accept the server's (connection_made sets TCP_NODELAY, which an AF_UNIX pair refuses). Small buffers make a
        client that cannot take what it is sent (the receive buffer is set before connect: no autotuning)."""
        if self._listener is None:
            self._listener = socket.create_server(("127.0.0.1", 0))
        peer = socket.socket()
        if peer_rcvbuf:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
        peer.connect(self._listener.getsockname())
        ours, _ = self._listener.accept()
        if our_sndbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, our_sndbuf)
        ours.setblocking(False)
        self._peers.append(peer)
        return ours, peer

    async def socket_upstream(self, target) -> UpstreamConnection:
        ours, peer = self.tcp_pair()
        transport, conn = await self.loop.create_connection(
            lambda: UpstreamConnection(target, self.coalesce_s, self.coalesce_min_streams), sock=ours)
        self._transports.append(transport)
        conn.replica = Peer(self.loop, peer)  # type: ignore[attr-defined]
        self.upstreams.append(conn)
        self.connected.put_nowait(conn)
        return conn

    async def socket_client(self, peer_rcvbuf: int = 0, our_sndbuf: int = 0) -> tuple[ClientConnection, Peer]:
        ours, peer = self.tcp_pair(peer_rcvbuf, our_sndbuf)
        client = ClientConnection(self.config, self.state, self.relay)
        transport, _ = await self.loop.connect_accepted_socket(lambda: client, sock=ours)
        self._transports.append(transport)
        return client, Peer(self.loop, peer)

    async def replica_request(self, timeout_s: float = 5.0) -> tuple[UpstreamConnection, Peer, bytes]:
        """The next replica connection the gateway opens, its far end, and the body of the request written on it."""
        try:
            conn = await asyncio.wait_for(self.connected.get(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"no replica connection within {timeout_s} s") from None
        replica: Peer = conn.replica  # type: ignore[attr-defined]
        body = whole_request(await replica.until(lambda got: whole_request(got) is not None, "the request"))
        replica.request_line = replica.take().split(b"\r\n", 1)[0]
        return conn, replica, body  # type: ignore[return-value]


def whole_request(data: bytes) -> bytes | None:
    """The body of the request in `data` once it is whole (a content-length body, as the gateway sends), else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = data[end + 4:]
    return body if len(body) >= length else None


@pytest.fixture
async def loop():
    return asyncio.get_running_loop()


@pytest.fixture
async def rig(loop):
    with Rig(loop) as rig:
        yield rig


async def settle(loop: asyncio.AbstractEventLoop, rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


GET = b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n"
BODY = b'{"object":"list","data":[]}'
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
           b"b\r\ndata: one\n\n\r\nb\r\ndata: two\n\n\r\n0\r\n\r\n")


def counts_are_zero(rig: Rig) -> bool:
    return rig.state.in_flight == 0 and rig.target.in_flight == 0


# -- phases and the pool ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response", [RESPONSE, CHUNKED], ids=["length", "chunked"])
async def test_every_split_of_a_response_completes_and_pools_the_connection(rig, response) -> None:
    """Head and body in separate reads (uvicorn), at every split point: keep-alive is decided at the end."""
    for cut in range(1, len(response)):
        conn, client, out = rig.get()
        exchange = client.exchange
        assert exchange is not None and exchange.phase is Phase.AWAITING_HEAD
        assert conn.mock.take().startswith(b"GET /v1/models HTTP/1.1\r\n")  # type: ignore[attr-defined]
        assert rig.state.in_flight == 1 and rig.target.in_flight == 1
        conn.data_received(response[:cut])
        conn.data_received(response[cut:])
        assert exchange.phase is Phase.DONE and exchange.outcome is Outcome.COMPLETE
        relayed = out.take()
        assert relayed.endswith(response[response.index(b"\r\n\r\n") + 4:])
        assert rig.target.pool.take_idle() is conn, cut  # back in the pool
        assert counts_are_zero(rig)
        assert client.current is None and not out.closed


async def test_phases_in_order_and_one_end(rig) -> None:
    phases = []
    conn, client, out = rig.get()
    exchange = client.exchange
    phases.append(exchange.phase)
    conn.data_received(CHUNKED[:90])
    phases.append(exchange.phase)
    conn.data_received(CHUNKED[90:])
    phases.append(exchange.phase)
    assert phases == [Phase.AWAITING_HEAD, Phase.STREAMING, Phase.DONE]
    assert [outcome for _, outcome in rig.ended] == [Outcome.COMPLETE]
    assert exchange.end(Outcome.FAILED) is False  # idempotent: nothing is released twice
    assert counts_are_zero(rig)


async def test_connecting_then_the_client_leaves_keeps_the_new_connection(rig, loop) -> None:
    rig.connect_gate = asyncio.Event()
    client, out = rig.client()
    client.data_received(GET)
    exchange = client.exchange
    await settle(loop)
    assert exchange.phase is Phase.CONNECTING and rig.target.in_flight == 1  # counted before the connect
    client.connection_lost(None)
    assert exchange.phase is Phase.DONE and exchange.outcome is Outcome.CLIENT_GONE
    assert counts_are_zero(rig)
    rig.connect_gate.set()
    await settle(loop)
    assert rig.target.pool.idle_count == 1  # the connection made meanwhile is kept for the next request
    assert len(rig.ended) == 1


async def test_client_gone_while_awaiting_the_head_aborts_the_replica_connection(rig) -> None:
    conn, client, _ = rig.get()
    client.connection_lost(None)
    assert conn.mock.aborted and rig.target.pool.idle_count == 0  # type: ignore[attr-defined]
    assert [o for _, o in rig.ended] == [Outcome.CLIENT_GONE]
    assert rig.finished[0].status == 499 and rig.finished[0].reason == "client_abort"
    conn.connection_lost(None)  # the abort's own callback: no second end
    assert len(rig.ended) == 1 and counts_are_zero(rig)


async def test_replica_lost_mid_body_cuts_the_client_and_never_pools(rig) -> None:
    conn, client, out = rig.streaming()
    conn.connection_lost(None)
    assert [o for _, o in rig.ended] == [Outcome.FAILED]
    assert out.closed and rig.target.pool.idle_count == 0
    assert rig.finished[0].reason == "upstream_died_mid_response"
    assert rig.failed_on == [rig.target] and counts_are_zero(rig)


async def test_replica_lost_before_the_head_is_retried_once_then_503(rig, loop) -> None:
    first, client, out = rig.get()
    first.data_received(b"HTTP/1.1 2")  # some bytes: not a stale connection
    first.connection_lost(None)
    await settle(loop)
    second = rig.upstreams[-1]
    assert second is not first and client.exchange is not None and client.exchange.phase is Phase.AWAITING_HEAD
    second.connection_lost(None)
    await settle(loop)
    assert out.take().startswith(b"HTTP/1.1 503 ")
    assert [o for _, o in rig.ended] == [Outcome.FAILED, Outcome.FAILED]
    assert counts_are_zero(rig)


async def test_a_stale_pooled_connection_is_resent_on_a_fresh_one(rig, loop) -> None:
    stale, client, out = rig.get()
    stale.connection_lost(None)  # closed by the replica as we reused it, before any byte
    await settle(loop)
    fresh = rig.upstreams[-1]
    assert fresh is not stale and fresh.mock.take().startswith(b"GET ")  # type: ignore[attr-defined]
    fresh.data_received(RESPONSE)
    assert out.take().endswith(BODY) and counts_are_zero(rig)
    assert rig.target.pool.idle_count == 1


async def test_connection_close_from_the_replica_is_not_pooled(rig) -> None:
    conn, client, out = rig.get()
    conn.data_received(RESPONSE.replace(b"content-length", b"connection: close\r\ncontent-length"))
    assert conn.mock.closed and rig.target.pool.idle_count == 0  # type: ignore[attr-defined]
    assert not out.closed  # the client's own connection stays


@pytest.mark.parametrize("same_read", [True, False])
async def test_bytes_after_the_response_are_never_relayed(rig, same_read) -> None:
    evil = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!"
    for response in (RESPONSE, CHUNKED):
        conn, client, out = rig.get()
        if same_read:
            conn.data_received(response + evil)
        else:
            conn.data_received(response)
            conn.data_received(evil)  # idle in the pool by now
        assert b"EVIL" not in out.take()
        assert conn.mock.closed and rig.target.pool.take_idle() is None  # type: ignore[attr-defined]
        assert counts_are_zero(rig)


async def test_first_byte_timeout_is_504(loop) -> None:
    with Rig(loop, first_byte_timeout_s=1.0) as rig:
        conn, client, out = rig.get()
        exchange = client.exchange
        client.check_timeouts(exchange.first_byte_deadline + 0.1)
        assert exchange.outcome is Outcome.UPSTREAM_TIMEOUT and conn.mock.aborted  # type: ignore[attr-defined]
        assert out.take().startswith(b"HTTP/1.1 504 ") and counts_are_zero(rig)


async def test_a_silent_replica_is_upstream_timeout_and_a_client_not_reading_is_client_timeout(loop) -> None:
    with Rig(loop, idle_timeout_s=2.0) as rig:
        conn, client, out = rig.streaming()
        exchange = client.exchange
        client.check_timeouts(100.0)
        client.check_timeouts(103.0)
        assert exchange.outcome is Outcome.UPSTREAM_TIMEOUT and rig.finished[0].reason == "upstream_timeout"

        conn, client, out = rig.streaming()
        exchange = client.exchange
        client.pause_writing()  # the client stopped reading
        assert not conn.mock.reading  # type: ignore[attr-defined]  # backpressure reaches the replica
        out.buffer_size = 300_000
        client.check_timeouts(200.0)
        client.check_timeouts(201.0)
        assert exchange.phase is Phase.STREAMING  # not yet
        client.check_timeouts(203.0)
        assert exchange.outcome is Outcome.CLIENT_TIMEOUT and out.aborted and conn.mock.aborted  # type: ignore
        client.connection_lost(None)
        assert rig.finished[1].reason == "client_timeout" and counts_are_zero(rig)


async def test_a_slow_client_that_reads_is_not_cut(loop) -> None:
    with Rig(loop, idle_timeout_s=2.0) as rig:
        conn, client, out = rig.streaming()
        exchange = client.exchange
        client.pause_writing()
        for second in range(10):
            out.buffer_size = 300_000 - second * 1000  # it drains, slowly
            client.check_timeouts(300.0 + second * 1.5)
        assert exchange.phase is Phase.STREAMING


async def test_emfile_on_connect_is_local_overload_not_a_replica_failure(rig, loop) -> None:
    rig.connect_error = OSError(errno.EMFILE, "Too many open files")
    client, out = rig.client()
    client.data_received(GET)
    await settle(loop)
    answer = out.take()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"x-serve-reason: overloaded" in answer
    assert rig.failed_on == [] and rig.marked_down == [] and counts_are_zero(rig)


async def test_max_in_flight_counts_requests_still_connecting(loop) -> None:
    with Rig(loop, max_in_flight=2) as rig:
        rig.connect_gate = asyncio.Event()
        outs = []
        for _ in range(5):
            client, out = rig.client()
            client.data_received(GET)
            outs.append(out)
        await settle(loop)
        refused = [o for o in outs if o.written.startswith(b"HTTP/1.1 503 ")]
        assert len(refused) == 3 and rig.state.in_flight == 2


# -- the client side ------------------------------------------------------------------------------------------------

async def test_ten_thousand_self_answered_pipelined_requests_in_one_read(rig) -> None:
    client, out = rig.client()
    client.data_received(b"".join(b"GET /nope%d HTTP/1.1\r\nhost: gw\r\n\r\n" % i for i in range(10_000)))
    answers = out.take()
    assert answers.count(b"HTTP/1.1 404 ") == 10_000  # served by a loop: no RecursionError
    assert len(rig.finished) == 10_000 and [r.url for r in rig.finished[:3]] == [b"/nope0", b"/nope1", b"/nope2"]


async def test_pipelined_requests_wait_parsed_at_most_a_few_ahead(rig) -> None:
    conn = rig.pooled()
    client, out = rig.client()
    client.data_received(GET * 1000)
    assert len(client.pending) <= 4 + 8192 // len(GET)  # the rest waits unparsed
    conn.data_received(RESPONSE)
    assert out.take().count(b"HTTP/1.1 200 ") == 1


async def test_expect_continue_behind_another_request_waits_for_its_turn(rig) -> None:
    conn = rig.pooled()
    client, out = rig.client()
    body = b'{"x":1}'
    client.data_received(GET + b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\nexpect: 100-continue\r\n"
                         b"content-length: %d\r\n\r\n" % len(body))
    assert b"100 Continue" not in out.written
    conn.data_received(CHUNKED)
    written = out.take()
    assert written.endswith(b"0\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")  # after the first response, not inside


@pytest.mark.parametrize("where", [b"x-long: ", b""])
async def test_a_head_that_never_ends_is_431_at_the_byte_limit(rig, where) -> None:
    client, out = rig.client()
    client.data_received(b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n" + where)
    for _ in range(8):
        client.data_received(b"a" * 8192)
    answer = out.take()
    assert answer.startswith(b"HTTP/1.1 431 ") and out.eof  # answered, then a FIN (lingering close)
    assert rig.finished[0].reason == "headers_too_large"


async def test_the_body_budget_refuses_new_requests_past_it(loop) -> None:
    with Rig(loop, max_buffered_body_bytes=1000) as rig:
        first, _ = rig.client()
        first.data_received(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 900\r\n\r\n" + b"x" * 800)
        assert rig.state.buffered_body == 800
        second, out = rig.client()
        second.data_received(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 300\r\n\r\n")
        assert out.take().startswith(b"HTTP/1.1 503 ")
        first.connection_lost(None)
        assert rig.state.buffered_body == 0  # given back by a client that left mid-body


async def test_forwarded_headers_trailers_and_connection_named(rig) -> None:
    conn = rig.pooled()
    client, _ = rig.client()
    client.data_received(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\nx-forwarded-for: 10.9.9.9\r\n"
                         b"connection: x-hop\r\nx-hop: 1\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"2\r\n{}\r\n0\r\nx-trailer: 1\r\n\r\n")
    head = conn.mock.take()  # type: ignore[attr-defined]
    assert b"x-forwarded-for: 127.0.0.1\r\n" in head and b"10.9.9.9" not in head
    assert b"x-forwarded-proto: http\r\n" in head
    assert b"x-hop" not in head and b"x-trailer" not in head


async def test_decision_headers_are_tokens_not_framing_and_latin1() -> None:
    assert decision_headers({"x-model": "m", "serve_multiplexed_model_id": "lora"}) == \
        b"x-model: m\r\nserve_multiplexed_model_id: lora\r\n"
    for bad in ({"bad name": "1"}, {"Content-Length": "0"}, {"host": "x"}, {"transfer-encoding": "chunked"},
                {"x": "\u6a21"}, {"x": "a\r\nb"}, {"": "1"}, {"connection": "close"}):
        with pytest.raises(GatewayError) as info:
            decision_headers(bad)
        assert info.value.reason.value == "malformed_decision"


async def test_random_interleavings_keep_counts_exact(loop) -> None:
    """Random requests, splits, client departures and replica failures: every exchange ends once, nothing leaks."""
    rng = random.Random(7)
    with Rig(loop) as rig:
        for _ in range(300):
            conn = rig.pooled() if rng.random() < 0.7 else None
            client, out = rig.client()
            client.data_received(GET)
            await settle(loop, 2)
            conn = rig.upstreams[-1] if conn is None else conn
            response = rng.choice([RESPONSE, CHUNKED])
            cut = rng.randrange(1, len(response))
            action = rng.choice(["complete", "client_gone", "replica_lost", "client_gone_mid"])
            if action == "client_gone":
                client.connection_lost(None)
            else:
                conn.data_received(response[:cut])
                if action == "client_gone_mid":
                    client.connection_lost(None)
                elif action == "replica_lost":
                    conn.connection_lost(None)
                else:
                    conn.data_received(response[cut:])
            await settle(loop, 2)
            client.connection_lost(None)
            await settle(loop, 2)
            assert counts_are_zero(rig), action
        ids = [id(exchange) for exchange, _ in rig.ended]
        assert len(ids) == len(set(ids))  # each exchange ended exactly once


@pytest.mark.parametrize("same_read", [True, False])
async def test_bytes_after_a_resumable_stream_are_never_relayed(loop, same_read) -> None:
    """A resumable stream's payload is queued for resume.py by list.append itself (upstream.py's _SinkFeeder): what
    a second, unsolicited response brings after the end is cut off before resume.py reads it."""
    event = (b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"a",'
             b'"logprobs":null,"finish_reason":"stop","token_ids":[5],"prompt_token_ids":[1]}]}\n\n')
    # No [DONE]: the gateway ends the stream itself (resume.md), so resume.py still reads what follows the end.
    stream = b"%x\r\n%s\r\n" % (len(event), event) + b"0\r\n\r\n"
    evil = b'data: {"id":"EVIL","choices":[{"index":0,"text":"EVIL","token_ids":[6]}]}\n\n'
    second = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(evil), evil))
    body = b'{"model":"m","prompt":"x","max_tokens":5,"stream":true}'
    with Rig(loop, resume_limit=1) as rig:
        conn = rig.pooled()
        client, out = rig.client()
        client.data_received(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await settle(loop)
        assert client.current is not None and client.current.resume is not None
        head = CHUNKED[:CHUNKED.index(b"\r\n\r\n") + 4]
        if same_read:
            conn.data_received(head + stream + second)
        else:
            conn.data_received(head + stream[:40])
            conn.data_received(stream[40:] + second)
        got = out.take()
        assert b"EVIL" not in got and b'"text":"a"' in got and got.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert conn.mock.closed and rig.target.pool.take_idle() is None  # type: ignore[attr-defined]
        assert counts_are_zero(rig)
