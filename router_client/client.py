"""RouterClient: ask a router which replica serves a request.

Differences from Ray's Lua, on purpose:
- connections are pooled and kept alive (the Lua opens a TCP connection per request);
- the timeout is one deadline for the whole decision, failover included;
- a reused connection that turns out stale before any response byte is resent once
  on a fresh connection, which is safe because nothing was answered yet.
Like the Lua: routers are tried round-robin and a connect failure moves to the next
router. Unlike it, a 5xx also moves to the next router when there is one (nothing was
sent to a replica yet); a 4xx is final, and so is the last router's answer.

A decision is a RouteCall state machine driven by I/O callbacks, with no task or
coroutine unless a new connection must be opened: on the common path (a pooled
connection) the whole call is one write, one read and two callbacks. Deadlines are
enforced by `expire()`, which the owner calls periodically (the gateway's sweeper),
so no timer is armed per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence

from router_client.connection import BufferedHTTPConnection, Response, open_connection
from router_client.decision import Decision, parse_decision
from router_client.errors import (
    MALFORMED_DECISION,
    ROUTER_NON_200,
    ROUTER_TIMEOUT,
    ROUTER_UNREACHABLE,
    ConnectionLost,
    MalformedResponse,
    RouterError,
)
from router_client.pool import KeepAlivePool

log = logging.getLogger("gateway.router")

Address = tuple[str, int]
Done = Callable[[Decision | None, RouterError | None], None]


class RouterClient:
    def __init__(
        self,
        routers: Callable[[], Sequence[Address]],
        *,
        timeout_s: float = 5.0,
        idle_timeout_s: float = 4.0,
        forward_body: bool = False,
        body_cap: int = 8 * 1024 * 1024,
        session_header: str = "x-session-id",
        max_response_bytes: int = 1024 * 1024,
        local_hosts: frozenset[str] = frozenset(),
    ):
        self._routers = routers
        # Like Ray's Lua: routers on these hosts (this node) are asked first, the others only when they fail.
        self.local_hosts = local_hosts
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.forward_body = forward_body
        self.body_cap = body_cap
        self.session_header = session_header.lower().encode("latin-1")
        self.max_response_bytes = max_response_bytes
        self._pools: dict[Address, KeepAlivePool[BufferedHTTPConnection]] = {}
        self._cursor = itertools.count()
        self._calls: set[RouteCall] = set()
        self.truncations = 0
        # Router calls sent, by router: which router decides (local first) is visible in the metrics.
        self.sent: dict[Address, int] = {}

    # -- pools
    def pool(self, address: Address) -> KeepAlivePool[BufferedHTTPConnection]:
        pool = self._pools.get(address)
        if pool is None:
            host, port = address
            pool = KeepAlivePool(lambda: open_connection(host, port, self.max_response_bytes), self.idle_timeout_s)
            self._pools[address] = pool
        return pool

    def pools(self) -> dict[Address, KeepAlivePool[BufferedHTTPConnection]]:
        return dict(self._pools)

    def expire_idle(self) -> None:
        live = set(self._routers())
        for address, pool in list(self._pools.items()):
            if address in live:
                pool.expire()
            else:
                pool.close()
                del self._pools[address]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    # -- decisions
    def start(self, body: bytes, request_id: bytes, session: bytes | None, content_type: bytes | None,
              done: Done) -> None:
        """Ask for a decision; `done(decision, None)` or `done(None, error)` is called exactly once."""
        routers = self._routers()
        if not routers:
            done(None, RouterError(ROUTER_UNREACHABLE, "no router is known"))
            return
        start = next(self._cursor)
        if self.local_hosts:
            routers, start = self.local_first(routers, start), 0
        call = RouteCall(self, routers, start, body, request_id, session, content_type, done)
        self._calls.add(call)
        call.try_next_router()

    def local_first(self, routers: Sequence[Address], start: int) -> list[Address]:
        """The local routers (rotated), then the others (rotated): failover leaves the node last."""
        local = [address for address in routers if address[0] in self.local_hosts]
        remote = [address for address in routers if address[0] not in self.local_hosts]
        if local:
            cut = start % len(local)
            local = local[cut:] + local[:cut]
        if remote:
            cut = start % len(remote)
            remote = remote[cut:] + remote[:cut]
        return local + remote

    def is_local(self, address: Address) -> bool:
        return address[0] in self.local_hosts

    async def route(self, body: bytes, request_id: bytes, session: bytes | None = None,
                    content_type: bytes | None = None) -> Decision:
        """Awaitable form, for callers without a sweeper: arms its own deadline timer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()

        def done(decision: Decision | None, error: RouterError | None) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(decision)  # type: ignore[arg-type]

        timer = loop.call_later(self.timeout_s, lambda: self.expire(time.monotonic() + self.timeout_s))
        try:
            self.start(body, request_id, session, content_type, done)
            return await future
        finally:
            timer.cancel()

    def expire(self, now: float) -> None:
        """Fail every decision whose deadline has passed with router_timeout."""
        for call in [call for call in self._calls if call.deadline <= now]:
            call.time_out()

    def build_request(self, address: Address, body: bytes, request_id: bytes, session: bytes | None,
                      content_type: bytes | None) -> bytes:
        head = [b"POST /internal/route HTTP/1.1\r\nhost: %s:%d\r\n" % (address[0].encode(), address[1])]
        payload = b""
        if self.forward_body and body:
            payload = body[: self.body_cap]
            if len(payload) < len(body):
                # Ray's Lua marks a cut body the same way; the router then falls back to a load-balanced pick.
                self.truncations += 1
                head.append(b"x-body-truncated: %d/%d\r\n" % (len(payload), len(body)))
        head.append(b"content-type: %s\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
                    % (content_type or b"application/json", len(payload), request_id))
        if session:
            head.append(b"%s: %s\r\n" % (self.session_header, session))
        head.append(b"\r\n")
        head.append(payload)
        return b"".join(head)


class RouteCall:
    """One routing decision in progress: routers in turn until one answers, or the deadline passes."""

    __slots__ = ("client", "routers", "start", "attempt", "body", "request_id", "session", "content_type", "done",
                 "deadline", "conn", "connecting", "resent_stale", "errors", "finished", "pool", "address")

    def __init__(self, client: RouterClient, routers: Sequence[Address], start: int, body: bytes, request_id: bytes,
                 session: bytes | None, content_type: bytes | None, done: Done):
        self.client = client
        self.routers = routers
        self.start = start
        self.attempt = 0
        self.body = body
        self.request_id = request_id
        self.session = session
        self.content_type = content_type
        self.done = done
        self.deadline = time.monotonic() + client.timeout_s
        self.conn: BufferedHTTPConnection | None = None
        self.connecting: asyncio.Task | None = None
        self.resent_stale = False
        self.errors: list[str] = []
        self.finished = False
        self.pool: KeepAlivePool[BufferedHTTPConnection] | None = None
        self.address: Address = ("", 0)

    def try_next_router(self) -> None:
        if self.attempt >= len(self.routers):
            self.finish(None, RouterError(ROUTER_UNREACHABLE, "; ".join(self.errors)))
            return
        self.address = self.routers[(self.start + self.attempt) % len(self.routers)]
        self.pool = self.client.pool(self.address)
        conn = self.pool.take_idle()
        if conn is None:
            self.connect()
            return
        conn.reused = True
        self.send(conn)

    def connect(self) -> None:
        assert self.pool is not None
        self.connecting = asyncio.get_running_loop().create_task(self.pool.connect())
        self.connecting.add_done_callback(self.on_connected)

    def on_connected(self, task: asyncio.Task) -> None:
        self.connecting = None
        if task.cancelled():
            return  # timed out; time_out() already answered
        exc = task.exception()
        if self.finished:
            if exc is None:
                self.pool.put(task.result())  # type: ignore[union-attr]
            return
        if exc is not None:
            self.router_failed(exc)
            return
        conn = task.result()
        conn.reused = False
        self.send(conn)

    def send(self, conn: BufferedHTTPConnection) -> None:
        self.conn = conn
        client = self.client
        address = self.address
        client.sent[address] = client.sent.get(address, 0) + 1
        conn.request(client.build_request(address, self.body, self.request_id, self.session, self.content_type),
                     self)

    def on_response(self, conn: BufferedHTTPConnection, response: Response) -> None:
        self.conn = None
        if response.keep_alive:
            self.pool.put(conn)  # type: ignore[union-attr]
        else:
            conn.close()
        if response.status != 200:
            if response.status >= 500 and self.attempt + 1 < len(self.routers):
                # A 5xx means "this router cannot decide now" (Ray: no replica in its view yet): nothing was sent
                # to a replica, so another router may answer. A 4xx is about the request and is final.
                self.router_failed(RuntimeError(f"answered {response.status}"))
                return
            self.finish(None, RouterError(ROUTER_NON_200, f"router answered {response.status}", status=response.status,
                                          body=response.body, content_type=response.header(b"content-type")))
            return
        try:
            decision = parse_decision(response.body)
        except RouterError as exc:
            self.finish(None, exc)
            return
        self.finish(decision, None)

    def on_error(self, conn: BufferedHTTPConnection, exc: Exception) -> None:
        self.conn = None
        if isinstance(exc, MalformedResponse):
            self.finish(None, RouterError(MALFORMED_DECISION, f"router answer is not valid HTTP: {exc}"))
        elif isinstance(exc, ConnectionLost) and conn.reused and not exc.got_response_bytes and not self.resent_stale:
            # Stale keep-alive connection: the router closed it as we reused it. Resend once, fresh.
            self.resent_stale = True
            self.connect()
        else:
            self.router_failed(exc)

    def router_failed(self, exc: BaseException) -> None:
        log.warning("router %s:%d unreachable: %s", *self.address, exc)
        self.errors.append(f"{self.address[0]}:{self.address[1]}: {exc}")
        self.attempt += 1
        self.resent_stale = False
        self.try_next_router()

    def time_out(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        if self.conn is not None:
            self.conn.abandon()  # mid-exchange: its state is unknown, it never goes back to a pool
            self.conn = None
        self.finish(None, RouterError(ROUTER_TIMEOUT, f"no decision within {self.client.timeout_s}s"))

    def finish(self, decision: Decision | None, error: RouterError | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.client._calls.discard(self)
        self.done(decision, error)
