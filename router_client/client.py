"""RouterClient: ask a router which replica serves a request.

Differences from Ray's Lua, on purpose:
- connections are pooled and kept alive (the Lua opens a TCP connection per request);
- the timeout is one deadline for the whole decision, failover included;
- a reused connection that turns out stale before any response byte is resent once
  on a fresh connection, which is safe because nothing was answered yet.
Like the Lua: routers are tried round-robin, a connect failure moves to the next
router, a non-200 is not retried.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence

from router_client.connection import BufferedHTTPConnection, Response, open_connection
from router_client.decision import Decision, parse_decision
from router_client.errors import (
    ROUTER_NON_200,
    ROUTER_TIMEOUT,
    ROUTER_UNREACHABLE,
    ConnectionLost,
    MalformedResponse,
    MALFORMED_DECISION,
    RouterError,
)
from router_client.pool import KeepAlivePool

log = logging.getLogger("gateway.router")

Address = tuple[str, int]


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
    ):
        self._routers = routers
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.forward_body = forward_body
        self.body_cap = body_cap
        self.session_header = session_header.lower().encode("latin-1")
        self.max_response_bytes = max_response_bytes
        self._pools: dict[Address, KeepAlivePool[BufferedHTTPConnection]] = {}
        self._cursor = itertools.count()
        self.truncations = 0
        # Called with (outcome, seconds) after each decision: the gateway's metrics hook.
        self.observe: Callable[[str, float], None] | None = None

    def pool(self, address: Address) -> KeepAlivePool[BufferedHTTPConnection]:
        pool = self._pools.get(address)
        if pool is None:
            host, port = address
            pool = KeepAlivePool(lambda: open_connection(host, port, self.max_response_bytes), self.idle_timeout_s)
            self._pools[address] = pool
        return pool

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

    async def route(self, body: bytes, request_id: bytes, session: bytes | None = None,
                    content_type: bytes | None = None) -> Decision:
        routers = self._routers()
        if not routers:
            raise RouterError(ROUTER_UNREACHABLE, "no router is known")
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._ask_any(routers, body, request_id, session, content_type)
        except TimeoutError:
            raise RouterError(ROUTER_TIMEOUT, f"no decision within {self.timeout_s}s") from None
        if response.status != 200:
            raise RouterError(ROUTER_NON_200, f"router answered {response.status}", status=response.status,
                              body=response.body, content_type=response.header(b"content-type"))
        return parse_decision(response.body)

    async def _ask_any(self, routers: Sequence[Address], body: bytes, request_id: bytes, session: bytes | None,
                       content_type: bytes | None) -> Response:
        start = next(self._cursor)
        errors = []
        for i in range(len(routers)):
            address = routers[(start + i) % len(routers)]
            try:
                return await self._ask(address, body, request_id, session, content_type)
            except (OSError, ConnectionLost) as exc:
                log.warning("router %s:%d unreachable: %s", *address, exc)
                errors.append(f"{address[0]}:{address[1]}: {exc}")
        raise RouterError(ROUTER_UNREACHABLE, "; ".join(errors))

    async def _ask(self, address: Address, body: bytes, request_id: bytes, session: bytes | None,
                   content_type: bytes | None) -> Response:
        pool = self.pool(address)
        request = self.build_request(address, body, request_id, session, content_type)
        conn = pool.take_idle()
        if conn is not None:
            try:
                return await self._exchange(pool, conn, request)
            except ConnectionLost as exc:
                if exc.got_response_bytes:
                    raise
                # Stale keep-alive connection: the router closed it as we reused it. Resend once, fresh.
        conn = await pool.connect()
        return await self._exchange(pool, conn, request)

    @staticmethod
    async def _exchange(pool: KeepAlivePool[BufferedHTTPConnection], conn: BufferedHTTPConnection,
                        request: bytes) -> Response:
        try:
            response = await conn.request(request)
        except MalformedResponse as exc:
            conn.close()
            raise RouterError(MALFORMED_DECISION, f"router answer is not valid HTTP: {exc}") from None
        except BaseException:
            # Timeout/cancel mid-exchange: the connection's state is unknown, so it never goes back to the pool.
            conn.close()
            raise
        if response.keep_alive:
            pool.put(conn)
        else:
            conn.close()
        return response
