"""A Ray Serve app with a WebSocket route (FastAPI ingress): what the gateway must tunnel like Ray's HAProxy.

    python -m replicas.serve_ws_app --address 127.0.0.1:6379 --http-port 8000 [--name ws --route-prefix /ws]

`/echo` sends the Serve replica id first, then echoes every message; `/hello` is plain HTTP.
Prints one JSON line (the published targets) once Ray publishes both replicas.
"""

import argparse
import json
import os
import sys
import time

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from ray import serve

api = FastAPI()


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class WsEcho:
    def __init__(self) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    @api.get("/hello")
    def hello(self) -> dict:
        return {"replica": self.replica_id}

    @api.websocket("/echo")
    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(self.replica_id)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await websocket.send_bytes(message["bytes"])
                else:
                    await websocket.send_text(message["text"])
        except WebSocketDisconnect:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicas.serve_ws_app")
    parser.add_argument("--address", required=True)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--name", default="ws")
    parser.add_argument("--route-prefix", default="/ws")
    args = parser.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address=args.address, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    serve.run(WsEcho.bind(), name=args.name, route_prefix=args.route_prefix)
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        groups = [tg for tg in ray.get(controller.get_target_groups.remote(from_proxy_manager=True))
                  if tg.app_name == args.name and tg.protocol.value == "HTTP"]
        if groups and len(groups[0].targets) >= 2:
            print(json.dumps({"app": args.name, "targets": [f"{t.ip}:{t.port} {t.name}" for t in groups[0].targets]}),
                  flush=True)
            return 0
        time.sleep(0.1)
    print("serve_ws_app: targets not published in 120 s", file=sys.stderr)
    return 2


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray pickles the deployment class by reference.
    from replicas import serve_ws_app

    sys.exit(serve_ws_app.main())
