"""A Starlette WebSocket app behind uvicorn: the replica of the gateway's WebSocket tests.

What a FastAPI/Starlette app with WebSocket routes looks like behind Ray's HAProxy, served by
uvicorn as a replica is. Routes:

- `/ws/echo`: every message back as it came (text or bytes), until the client closes.
- `/ws/whoami`: sends the replica id, then echoes.
- `/ws/flood?total=N&size=M`: sends N bytes in M-byte binary messages, then closes (1000). `send`
  waits while the peer is not reading (uvicorn's flow control), so `flood_sent` in `/stats` shows
  how far a client that stopped reading let it get.
- `/ws/server-close`: waits for one message, then closes with 4001 "bye".
- `/ws/refuse`: closes before accepting (uvicorn answers the handshake 403).
- `GET /stats`, `GET /hello`: plain HTTP.

    python -m replicas.ws_app --port 8200 --replica-id ws1
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

STATS = {"accepted": 0, "closed_by_client": 0, "flood_sent": 0, "flood_done": 0, "echoed_bytes": 0,
         "last_close_code": None, "last_headers": {}}


def build(replica_id: str) -> Starlette:
    async def echo(websocket: WebSocket) -> None:
        await _accept(websocket)
        await _echo(websocket)

    async def whoami(websocket: WebSocket) -> None:
        await _accept(websocket)
        await websocket.send_text(replica_id)
        await _echo(websocket)

    async def flood(websocket: WebSocket) -> None:
        await _accept(websocket)
        total = int(websocket.query_params.get("total", 1 << 20))
        size = int(websocket.query_params.get("size", 1 << 16))
        payload = b"\xab" * size
        STATS["flood_sent"] = 0
        try:
            while STATS["flood_sent"] < total:
                part = payload[:min(size, total - STATS["flood_sent"])]
                await websocket.send_bytes(part)
                STATS["flood_sent"] += len(part)
            STATS["flood_done"] += 1
            await websocket.close(1000)
        except (WebSocketDisconnect, RuntimeError, OSError):
            STATS["closed_by_client"] += 1

    async def server_close(websocket: WebSocket) -> None:
        await _accept(websocket)
        await websocket.receive()
        await websocket.close(4001, "bye")

    async def refuse(websocket: WebSocket) -> None:
        await websocket.close()

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(STATS, headers={"x-replica-id": replica_id})

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hello from {replica_id}", headers={"x-replica-id": replica_id})

    return Starlette(routes=[
        WebSocketRoute("/ws/echo", echo), WebSocketRoute("/ws/whoami", whoami), WebSocketRoute("/ws/flood", flood),
        WebSocketRoute("/ws/server-close", server_close), WebSocketRoute("/ws/refuse", refuse),
        Route("/stats", stats), Route("/hello", hello), Route("/health", hello),
    ])


async def _accept(websocket: WebSocket) -> None:
    STATS["last_headers"] = {k: v for k, v in websocket.headers.items()}
    await websocket.accept()
    STATS["accepted"] += 1


async def _echo(websocket: WebSocket) -> None:
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                STATS["closed_by_client"] += 1
                STATS["last_close_code"] = message.get("code")
                return
            if message.get("bytes") is not None:
                STATS["echoed_bytes"] += len(message["bytes"])
                await websocket.send_bytes(message["bytes"])
            else:
                STATS["echoed_bytes"] += len(message["text"])
                await websocket.send_text(message["text"])
    except WebSocketDisconnect as exc:
        STATS["closed_by_client"] += 1
        STATS["last_close_code"] = exc.code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m replicas.ws_app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica-id", default="ws")
    args = parser.parse_args(argv)
    uvicorn.run(build(args.replica_id), host=args.host, port=args.port, ws="websockets-sansio",
                ws_max_size=32 * 1024 * 1024, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
