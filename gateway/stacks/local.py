"""`gateway up`: mock vLLM replicas, the standalone router and the gateway, in one command."""

from __future__ import annotations

import argparse
import sys

import uvloop

from gateway.config import Config
from gateway.process.serve import serve_async
from gateway.stacks.procs import Child, free_port, python_module
from gateway.stacks.usage import USAGE

EXAMPLE = "Local stack is up: {replicas} mock vLLM replicas, router ({policy}), gateway.\n\n" + USAGE + \
    "Ctrl-C stops everything.\n"


def run_up(args: argparse.Namespace) -> int:
    children: list[Child] = []
    try:
        replicas = []
        for index in range(args.replicas):
            port = free_port()
            replica_id = f"replica-{index}"
            children.append(Child(python_module("replicas.mock_engine", "--host", "127.0.0.1", "--port", str(port),
                                                "--replica-id", replica_id, "--ttft-ms", str(args.ttft_ms),
                                                "--itl-ms", str(args.itl_ms)), port=port).start())
            replicas.append(f"{replica_id}=http://127.0.0.1:{port}")
        router_port = free_port()
        router_args = ["--host", "127.0.0.1", "--port", str(router_port), "--policy", args.policy]
        for replica in replicas:
            router_args += ["--replica", replica]
        children.append(Child(python_module("replicas.router", *router_args), port=router_port).start())
        config = Config(host=args.host, port=args.port, routers=[f"http://127.0.0.1:{router_port}"],
                        replicas=replicas, forward_body=args.policy == "prefix_affinity", access_log=False, resume_limit=3,
                        token_accounting=True, log_level="warning").validate()  # /-/usage has counts to show
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        usage = EXAMPLE.format(replicas=args.replicas, policy=args.policy, base=f"http://{host}:{args.port}")
        return uvloop.run(serve_async(config, on_ready=lambda: print(usage, flush=True)))
    except (RuntimeError, TimeoutError) as exc:
        print(f"gateway up: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.stop()
