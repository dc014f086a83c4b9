"""A Ray Serve LLM application in direct-streaming shape, fronted by Ray's real LLMRouter.

    python -m replicas.serve_app deploy [--backend mock|vllm] [--policy round_robin|consistent_hash|prefix_affinity]
                                        [--model DIR|HF_ID] [--model-id NAME] [--accelerator gpu|cpu]
                                        [--replicas N] [--min-replicas 0] [--name llm] [--address 127.0.0.1:26379]
    python -m replicas.serve_app shutdown [--address ...]
    python -m replicas.serve_app status|kill REPLICA_ID [--address ...]   (helpers for tests and humans)

Shape (as Ray 2.60.0's ray/llm/_internal/serve/core/ingress/builder.py wires direct streaming): the
server deployment is the app's ingress and serves
OpenAI-compatible HTTP on each replica's direct-ingress port; Ray's own
`LLMRouter` (ray.llm._internal.serve.core.ingress.router) is attached as the
app's ingress request router with the private `Application._with_ingress_request_router`,
exactly as `build_openai_app` does when RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1.
The routing policy is the server deployment's `request_router_config`.

Backends:
- `mock` (default): `MockLLMServer`, a `@serve.ingress(FastAPI)` deployment whose
  answers come from `replicas.mock_engine.MockEngine` (the same code, so the same
  vLLM-exact SSE bytes, `x-replica-id` = the Serve replica id, `/mock/stats`).
- `vllm`: the real engine through `ray.serve.llm.build_openai_app` with direct
  streaming (Ray's LLMServer as the ingress, LLMRouter attached by Ray). `--accelerator cpu`
  runs vLLM's CPU build, two replicas on 2 cores (`gateway up --ray --backend vllm`,
  tests/test_ray_vllm.py); `gpu` keeps Ray's defaults.

Whoever builds the app (this driver) needs RAY_SERVE_ENABLE_HA_PROXY=1 in its
environment, or `build_app` refuses the ingress request router.
"""

import argparse
import asyncio
import json
import os
import sys
import time

from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from ray import serve
from starlette.responses import Response

from replicas.http_server import Request as EngineRequest
from replicas.mock_engine import EngineConfig, MockEngine

APP_NAME = "llm"
SERVER_NAME = "MockLLMServer"
ROUTER_NAME = "LLMRouter"

# Policy name -> Ray's request router class (import paths as of Ray 2.60.0).
POLICIES = {
    "round_robin": "ray.serve.experimental.round_robin_router.RoundRobinRouter",
    "consistent_hash": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    "prefix_affinity": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
}


# --------------------------------------------------------------------------- the mock backend
def _split_headers(block: bytes | list) -> list[tuple[bytes, bytes]]:
    """The engine hands over pre-rendered `name: value\\r\\n` blocks; ASGI wants pairs."""
    if not isinstance(block, bytes):
        return [(n if isinstance(n, bytes) else n.encode("latin-1"), v if isinstance(v, bytes) else v.encode("latin-1"))
                for n, v in block]
    pairs = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name != b"x-request-id":  # Serve's direct ingress already echoes it; once is enough
                pairs.append((name, value.strip()))
    return pairs


class _AsgiResponder:
    """`replicas.http_server.Responder`'s interface on top of ASGI `send`, so MockEngine
    runs unchanged inside a Serve replica. Each `write` is one ASGI body message
    (one HTTP chunk on the wire), as with vLLM behind uvicorn."""

    def __init__(self, send, receive) -> None:
        self._send = send
        self._receive = receive
        self._out: list[dict] = []
        self._gone = asyncio.Event()
        self._watch: asyncio.Task | None = None
        self.started = False
        self.finished = False
        self.broken = False  # fault hooks: ASGI cannot break the protocol, so the connection is dropped instead

    @property
    def disconnected(self) -> bool:
        return self._gone.is_set()

    def watch(self) -> None:
        async def wait() -> None:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self._gone.set()
                    return
        self._watch = asyncio.get_running_loop().create_task(wait())

    def send(self, status: int, headers: bytes = b"", body: bytes = b"") -> None:
        self.started = self.finished = True
        pairs = _split_headers(headers) + [(b"content-length", b"%d" % len(body))]
        self._out.append({"type": "http.response.start", "status": status, "headers": pairs})
        self._out.append({"type": "http.response.body", "body": body})

    def start_stream(self, status: int, headers: bytes = b"") -> None:
        self.started = True
        self._out.append({"type": "http.response.start", "status": status, "headers": _split_headers(headers)})

    async def write(self, data: bytes) -> None:
        if data and not self.disconnected:
            self._out.append({"type": "http.response.body", "body": data, "more_body": True})
            await self.flush()

    def end(self) -> None:
        if not self.finished:
            self.finished = True
            self._out.append({"type": "http.response.body", "body": b""})

    async def sleep(self, seconds: float) -> bool:
        await self.flush()
        if self.disconnected:
            return False
        if seconds > 0:
            try:
                await asyncio.wait_for(self._gone.wait(), seconds)
            except TimeoutError:
                pass
        return not self.disconnected

    async def wait_disconnected(self) -> None:
        await self.flush()
        await self._gone.wait()

    def write_raw(self, data: bytes) -> None:
        self.started = True
        self.broken = True

    def close(self) -> None:
        self.finished = True
        self.broken = True

    def abort(self) -> None:
        self.finished = True
        self.broken = True

    async def flush(self) -> None:
        while self._out:
            message = self._out.pop(0)
            try:
                await self._send(message)
            except OSError:
                self._gone.set()
                self._out.clear()

    async def done(self) -> None:
        await self.flush()
        if self._watch is not None:
            self._watch.cancel()


class EngineResponse(Response):
    """A response produced by MockEngine writing straight to ASGI `send`."""

    def __init__(self, engine: MockEngine, request: EngineRequest) -> None:
        self.engine = engine
        self.engine_request = request
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        responder = _AsgiResponder(send, receive)
        responder.watch()
        try:
            await self.engine(self.engine_request, responder)  # type: ignore[arg-type]
        finally:
            await responder.done()
        if responder.broken:
            raise ConnectionAbortedError("mock fault: connection dropped")  # the server resets the connection


api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name=SERVER_NAME)
@serve.ingress(api)
class MockLLMServer:
    """One mock vLLM replica: MockEngine behind FastAPI on the replica's direct-ingress port."""

    def __init__(self, model: str = "mock", ttft_ms: float = 0.0, itl_ms: float = 0.0) -> None:
        replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self.engine = MockEngine(EngineConfig(replica_id=replica_id, model=model, ttft_ms=ttft_ms, itl_ms=itl_ms))
        self.tag = ""

    def reconfigure(self, user_config: dict) -> None:
        self.tag = str(user_config.get("tag", ""))

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
    async def handle(self, request: FastAPIRequest, path: str) -> Response:
        scope = request.scope
        # Under a route prefix Serve mounts the app at root_path: the engine sees the path below it.
        engine_path = scope["path"][len(scope.get("root_path", "")):] or "/"
        engine_request = EngineRequest(
            scope["method"], engine_path, scope.get("query_string", b"").decode("latin-1"),
            list(request.headers.raw), await request.body(), scope.get("http_version", "1.1"), True)
        return EngineResponse(self.engine, engine_request)


def _scaling(replicas: int, min_replicas: int | None, downscale_to_zero_s: float) -> dict:
    if min_replicas is None or min_replicas == replicas:
        return {"num_replicas": replicas}
    return {"autoscaling_config": {
        "min_replicas": min_replicas, "initial_replicas": min_replicas, "max_replicas": max(replicas, 1),
        "target_ongoing_requests": 1, "downscale_to_zero_delay_s": downscale_to_zero_s,
    }}


def _router_config(policy: str):
    from ray.serve.config import RequestRouterConfig

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
    return RequestRouterConfig(request_router_class=POLICIES[policy])


def _attach_llm_router(server_app):
    """Ray's LLMRouter as the ingress request router, with the options Ray's builder uses."""
    # Needs pyarrow (Ray 2.60.0): router.py -> ray.llm._internal.common.utils.lora_utils -> cloud_filesystem.
    from ray.llm._internal.serve.core.ingress.router import LLMRouter

    router = serve.deployment(LLMRouter, name=ROUTER_NAME, max_ongoing_requests=1000,
                              ray_actor_options={"num_cpus": 0})
    return server_app._with_ingress_request_router(router.bind(server=server_app))


def build_mock_app(policy: str = "round_robin", replicas: int = 2, min_replicas: int | None = None,
                   model: str = "mock", ttft_ms: float = 0.0, itl_ms: float = 0.0, tag: str = "v1",
                   num_cpus: float = 0.25, downscale_to_zero_s: float = 30.0):
    server = MockLLMServer.options(
        request_router_config=_router_config(policy),
        user_config={"tag": tag},
        ray_actor_options={"num_cpus": num_cpus},
        # A killed replica is noticed within a few seconds, not the default 10 s period.
        health_check_period_s=2.0,
        health_check_timeout_s=5.0,
        **_scaling(replicas, min_replicas, downscale_to_zero_s),
    ).bind(model=model, ttft_ms=ttft_ms, itl_ms=itl_ms)
    return _attach_llm_router(server)


# --------------------------------------------------------------------------- the vLLM backend
# vLLM's environment on CPU (docs/contributing.md, "Real vLLM on CPU"): 1 GiB of KV cache, loopback only,
# no hub, no telemetry.
# It reaches the replica and vLLM's engine processes through the LLMConfig's runtime_env.
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
# The engine on CPU: float32 (the CPU kernels' safe dtype), a short context (the KV cache stays small), and no
# graph capture (nothing to capture on CPU; it only adds start-up time).
VLLM_CPU_ENGINE_KWARGS = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}


def build_vllm_app(policy: str = "round_robin", replicas: int = 1, min_replicas: int | None = None,
                   model: str = "Qwen/Qwen2.5-0.5B-Instruct", model_id: str | None = None,
                   engine_kwargs: dict | None = None, downscale_to_zero_s: float = 300.0,
                   accelerator: str = "gpu", replica_cpus: float = 0.5):
    """The real thing: Ray Serve LLM's own direct-streaming builder (LLMServer as ingress, LLMRouter attached
    by Ray), with vLLM engines. Needs vLLM and ray[serve] on every node and RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1
    before `ray.serve.llm` is first imported.

    accelerator "gpu": Ray's defaults (one GPU bundle per engine), as on a GPU cluster.
    accelerator "cpu": vLLM's CPU build; each replica's actor and its engine's placement-group bundle ask for
    `replica_cpus` CPUs, so two replicas fit a 2-core machine (without `accelerator_config={"kind": "cpu"}`
    Ray asks for {"GPU": 1} bundles; with it alone, one replica takes [{"CPU": 2}]).
    """
    os.environ.setdefault("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING", "1")
    try:
        from ray.llm._internal.serve import constants as llm_constants
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise RuntimeError(f"--backend vllm needs vLLM and Ray Serve LLM in this Python ({sys.executable}): "
                           f"on CPU `bash scripts/vllm_setup.sh`, on GPUs `pip install 'ray[llm]==2.60.0'` "
                           f"({exc})") from None

    if not llm_constants.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING:
        raise RuntimeError("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1 must be set before ray.serve.llm is imported")
    if accelerator not in ("gpu", "cpu"):
        raise ValueError(f"unknown accelerator {accelerator!r}; one of gpu, cpu")
    deployment_config: dict = {"request_router_config": _router_config(policy),
                               **_scaling(replicas, min_replicas, downscale_to_zero_s)}
    extra: dict = {}
    kwargs = dict(engine_kwargs or {})
    if accelerator == "cpu":
        deployment_config["ray_actor_options"] = {"num_cpus": replica_cpus}
        extra = {"accelerator_config": {"kind": "cpu"},
                 "placement_group_config": {"bundles": [{"CPU": replica_cpus}]},
                 "runtime_env": {"env_vars": dict(VLLM_CPU_ENV)}}
        kwargs = {**VLLM_CPU_ENGINE_KWARGS, **kwargs}
    llm_config = LLMConfig(
        model_loading_config={"model_id": model_id or model, "model_source": model},
        deployment_config=deployment_config,
        engine_kwargs=kwargs,
        **extra,
    )
    return build_openai_app({"llm_configs": [llm_config]})


# --------------------------------------------------------------------------- driver commands
def connect(address: str):
    import ray

    if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        # Else Ray rewrites a loopback address to the routable IP
        # (ray/_private/services.py get_node_ip_address, Ray 2.60.0).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return ray


def target_groups(app_name: str) -> list:
    import ray

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    return [tg for tg in ray.get(controller.get_target_groups.remote(from_proxy_manager=True))
            if tg.app_name == app_name]


def deploy(address: str, backend: str = "mock", policy: str = "round_robin", replicas: int = 2,
           min_replicas: int | None = None, name: str = APP_NAME, http_port: int = 8000, tag: str = "v1",
           ttft_ms: float = 0.0, itl_ms: float = 0.0, model: str | None = None,
           downscale_to_zero_s: float = 30.0, wait_s: float = 120.0, model_id: str | None = None,
           accelerator: str = "gpu", route_prefix: str = "/", host: str = "127.0.0.1") -> dict:
    """Deploy (or redeploy) the app and wait until Ray publishes its targets. Returns timings."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        raise RuntimeError("set RAY_SERVE_ENABLE_HA_PROXY=1 (here and in `ray start`): "
                           "the ingress request router requires HAProxy mode")
    t0 = time.monotonic()
    connect(address)
    # host is also what every direct-ingress replica binds: 0.0.0.0 on a multi-node cluster, else replicas on the
    # other nodes listen on 127.0.0.1 while advertising their node IP (ray#62522).
    serve.start(http_options={"host": host, "port": http_port})
    if backend == "mock":
        app = build_mock_app(policy, replicas, min_replicas, model or "mock", ttft_ms, itl_ms, tag,
                             downscale_to_zero_s=downscale_to_zero_s)
    elif backend == "vllm":
        app = build_vllm_app(policy, replicas, min_replicas, model or "Qwen/Qwen2.5-0.5B-Instruct", model_id,
                             downscale_to_zero_s=downscale_to_zero_s, accelerator=accelerator)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    t1 = time.monotonic()
    serve.run(app, name=name, route_prefix=route_prefix)
    t2 = time.monotonic()
    want = replicas if min_replicas is None else min_replicas
    deadline = time.monotonic() + wait_s
    groups: list = []
    while time.monotonic() < deadline:
        groups = [tg for tg in target_groups(name) if tg.protocol.value == "HTTP"]
        if groups and len(groups[0].targets) >= want and (want == 0 or groups[0].ingress_request_router_targets):
            break
        time.sleep(0.1)
    else:
        raise TimeoutError(f"app {name!r}: targets not published within {wait_s}s: {groups!r}")
    tg = groups[0]
    return {"app": name, "serve_run_s": round(t2 - t1, 2), "total_s": round(time.monotonic() - t0, 2),
            "targets": [f"{t.ip}:{t.port} {t.name}" for t in tg.targets],
            "routers": [f"{t.ip}:{t.port} {t.name}" for t in tg.ingress_request_router_targets]}


def shutdown(address: str) -> None:
    connect(address)
    serve.shutdown()


def status(address: str, name: str = APP_NAME) -> dict:
    """Replica states per deployment and the published targets: what tests and humans check."""
    connect(address)
    app = serve.status().applications.get(name)
    deployments = {} if app is None else {
        key: {str(getattr(state, "value", state)): count for state, count in value.replica_states.items()}
        for key, value in app.deployments.items()}
    groups = [tg for tg in target_groups(name) if tg.protocol.value == "HTTP"]
    return {"app": name, "status": None if app is None else str(getattr(app.status, "value", app.status)),
            "deployments": deployments,
            "targets": [t.name for tg in groups for t in tg.targets],
            "routers": [f"{t.ip}:{t.port}" for tg in groups for t in tg.ingress_request_router_targets],
            "router_ids": {f"{t.ip}:{t.port}": t.name for tg in groups for t in tg.ingress_request_router_targets}}


def kill_replica(address: str, replica_id: str) -> None:
    """ray.kill the replica's actor (its name is the replica id), as a crash would."""
    ray = connect(address)
    ray.kill(ray.get_actor(replica_id, namespace="serve"), no_restart=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicas.serve_app", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["deploy", "shutdown", "status", "kill"])
    parser.add_argument("replica_id", nargs="?", help="kill: the replica (actor) to kill")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "127.0.0.1:6379"), help="Ray GCS address")
    parser.add_argument("--backend", default="mock", choices=["mock", "vllm"])
    parser.add_argument("--policy", default="round_robin", choices=list(POLICIES))
    parser.add_argument("--replicas", type=int, default=2, help="replicas (max replicas when autoscaling)")
    parser.add_argument("--min-replicas", type=int, default=None,
                        help="autoscale between this and --replicas; 0 = scale to zero (starts at 0)")
    parser.add_argument("--name", default=APP_NAME, help="application name")
    parser.add_argument("--http-port", type=int, default=8000, help="Ray's HAProxy frontend port")
    parser.add_argument("--tag", default="v1", help="user_config tag (a new value still replaces every replica)")
    parser.add_argument("--model", default=None, help="mock: served model name; vllm: HF model id or path")
    parser.add_argument("--model-id", default=None, help="vllm: the served model name (default: --model)")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"],
                        help="vllm: gpu (Ray's defaults) or cpu (vLLM's CPU build, 0.5 CPU per replica)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="mock: delay before the first token")
    parser.add_argument("--itl-ms", type=float, default=0.0, help="mock: delay between tokens")
    parser.add_argument("--route-prefix", default="/", help="the app's route prefix")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Serve http_options.host, also what replicas bind: 0.0.0.0 for a multi-node cluster")
    parser.add_argument("--downscale-to-zero-s", type=float, default=30.0, help="idle time before 1 -> 0 replicas")
    args = parser.parse_intermixed_args(argv)
    if args.command == "status":
        print(json.dumps(status(args.address, args.name)))
        return 0
    if args.command == "kill":
        if not args.replica_id:
            parser.error("kill needs a replica id (SERVE_REPLICA::app#Deployment#suffix)")
        kill_replica(args.address, args.replica_id)
        print(json.dumps({"killed": args.replica_id}))
        return 0
    if args.command == "shutdown":
        shutdown(args.address)
        print(json.dumps({"shutdown": True}))
        return 0
    try:
        result = deploy(args.address, args.backend, args.policy, args.replicas, args.min_replicas, args.name,
                        args.http_port, args.tag, args.ttft_ms, args.itl_ms, args.model, args.downscale_to_zero_s,
                        model_id=args.model_id, accelerator=args.accelerator, route_prefix=args.route_prefix,
                        host=args.host)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"serve_app: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray pickles the deployment class by reference.
    from replicas import serve_app

    sys.exit(serve_app.main())
