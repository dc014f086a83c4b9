"""`gateway` command line: `serve` (the gateway) and `up` (the embedded local stack)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gateway.config import ConfigError, add_arguments, resolve

log = logging.getLogger("gateway")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check is noise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway in front of routers and replicas",
                           description="Run the gateway. Every option can also be set by env var or config file; "
                                       "precedence is flag > env > config file > default.")
    add_arguments(serve)
    up = sub.add_parser("up", help="run the embedded local stack: mock vLLM replicas, the router and the gateway")
    up.add_argument("--replicas", type=int, default=2, help="number of mock vLLM replicas (default 2)")
    up.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8000")),
                    help="gateway port (default 8000, env GATEWAY_PORT)")
    up.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"), help="gateway address")
    up.add_argument("--policy", default="round_robin", choices=["round_robin", "consistent_hash", "prefix_affinity"],
                    help="router policy (default round_robin)")
    up.add_argument("--itl-ms", type=float, default=20.0, help="mock inter-token latency (default 20 ms)")
    up.add_argument("--ttft-ms", type=float, default=50.0, help="mock time to first token (default 50 ms)")
    up.add_argument("--ray", action="store_true", help="run the stack on a local Ray head with Ray's LLMRouter")
    up.add_argument("--backend", default="mock", choices=["mock", "vllm"],
                    help="with --ray: mock engines (default) or Ray Serve LLM's real vLLM engines on CPU "
                         "(needs `bash scripts/vllm_setup.sh`)")
    up.add_argument("--model", default=None,
                    help="with --backend vllm: a local model directory (default: the tiny test model .tiny-llama, "
                         "made when missing)")
    up.add_argument("--vllm-venv", default=os.environ.get("VLLM_VENV", ".venv-vllm"),
                    help="with --backend vllm: the venv holding vLLM and ray[serve] (default .venv-vllm, env VLLM_VENV)")
    keys = sub.add_parser("keys", help="make API keys for --api-keys-file")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a fresh random key once (stderr; stored nowhere) and its [[keys]] "
                                          "entry (stdout): gateway keys new NAME >> keys.toml")
    new.add_argument("name", help="the key's name, as it appears in the access log and metrics")
    usage = keys_sub.add_parser("usage", help="tokens per key and model: since start, this UTC minute, this UTC day "
                                              "(one gateway's /-/usage, or a whole Ray cluster's)")
    usage.add_argument("--ray-address", default=os.environ.get("GATEWAY_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                       help="sum every gateway of this Ray cluster (from its quota ledger) [env: GATEWAY_RAY_ADDRESS, "
                            "RAY_ADDRESS]")
    usage.add_argument("--url", default="http://127.0.0.1:8000",
                       help="without --ray-address: the gateway (its admin listener) to ask, default "
                            "http://127.0.0.1:8000")
    usage.add_argument("--api-key", default=os.environ.get("GATEWAY_API_KEY", ""),
                       help="a key of that gateway, when it has keys [env: GATEWAY_API_KEY]")
    usage.add_argument("--json", action="store_true", help="print the JSON instead of a table")
    ray_parser = sub.add_parser("ray", help="run a gateway on every node of a Ray cluster (like Ray's HAProxy)",
                                description="One gateway per alive node, run and restarted by detached Ray actors.")
    ray_sub = ray_parser.add_subparsers(dest="ray_command", required=True)
    address_default = os.environ.get("GATEWAY_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    for name, text in (("deploy", "start a gateway on every node, or roll them to new options one node at a time"),
                       ("status", "print node -> URL, pid, ready, restarts"),
                       ("remove", "stop every gateway (each drains) and remove the actors")):
        command = ray_sub.add_parser(name, help=text, allow_abbrev=False, description=text + (
            ". Any `gateway serve` option may follow; they are passed to every gateway as given (never taken "
            "from the raylet's environment)." if name == "deploy" else ""))
        command.add_argument("--ray-address", default=address_default, required=address_default is None,
                             help="the cluster's GCS address host:port [env: GATEWAY_RAY_ADDRESS, RAY_ADDRESS]")
        if name == "deploy":
            command.add_argument("--port", type=int, default=8000, help="port of every gateway (default 8000)")
            command.add_argument("--host", default="",
                                 help="address every gateway binds (default: its node's IP)")
            command.add_argument("--wait-s", type=float, default=120.0,
                                 help="how long to wait for every node's gateway to be ready (default 120)")
            for secret in ("api-key", "upstream-api-key"):  # kept off argv: see gateway/deploy/secrets.py
                command.add_argument(f"--{secret}-file", metavar="FILE",
                                     help=f"--{secret} for every gateway, from the first line of FILE [env: GATEWAY_"
                                          f"{secret.upper().replace('-', '_')}]; passed in their environment")
    args, rest = parser.parse_known_args(argv)
    if rest and not (args.command == "ray" and args.ray_command == "deploy"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "keys":
            if args.keys_command == "usage":
                return _usage(args)
            return _new_key(args.name)
        if args.command == "ray":
            _setup_logging("warning")
            return _ray_command(args, rest)
        if args.command == "serve":
            config = resolve(args)
            _setup_logging(config.log_level)
            from gateway.process.serve import run_serve

            return run_serve(config)
        _setup_logging("warning")
        if args.backend != "mock" and not args.ray:
            parser.error("--backend vllm runs on Ray: add --ray")
        if args.ray:
            from gateway.stacks.ray import run_ray_up  # needs the [ray] extra

            return run_ray_up(args)
        from gateway.stacks.local import run_up

        return run_up(args)
    except ConfigError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _new_key(name: str) -> int:
    from gateway.security.keys import KeysError, check_name, new_key, toml_entry

    try:
        check_name(name, "gateway keys new")
    except KeysError as exc:
        raise ConfigError(str(exc)) from None
    key = new_key()
    # The key on stderr (the terminal), the entry on stdout: `gateway keys new NAME >> keys.toml` shows the key
    # once and appends only its digest to the file.
    print(f"API key for {name!r} (shown once, stored nowhere; give it to the client): {key}", file=sys.stderr)
    print(f"# {name}: add to --api-keys-file, then SIGHUP the gateway\n{toml_entry(name, key)}", end="", flush=True)
    return 0


def _usage(args: argparse.Namespace) -> int:
    import json

    from gateway.observability.usage import format_usage, merge_usage

    if args.ray_address:
        from gateway.deploy.cluster import _connect

        from gateway.controlplane.ledger import LEDGER, NAMESPACE

        ray = _connect(args.ray_address)
        try:
            ledger = ray.get_actor(LEDGER, namespace=NAMESPACE)
        except ValueError:
            raise ConfigError("no quota ledger on this cluster: no gateway with keys runs there") from None
        reports = list(ray.get(ledger.report.remote(), timeout=30)["gateways"].values())
        report = merge_usage(reports)
        report["gateways"] = len(reports)
    else:
        import httpx

        headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        try:
            response = httpx.get(args.url.rstrip("/") + "/-/usage", headers=headers, timeout=10)
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot reach {args.url}: {exc}") from None
        if response.status_code != 200:
            raise ConfigError(f"{args.url}/-/usage answered {response.status_code}: {response.text[:200]}")
        report = response.json()
    print(json.dumps(report, indent=2) if args.json else format_usage(report), flush=True)
    return 0


def _ray_command(args: argparse.Namespace, serve_args: list[str]) -> int:
    from gateway.deploy import cluster  # needs the [ray] extra

    if args.ray_command == "deploy":
        for flag in ("--ray-address", "--node-ip"):
            if any(arg == flag or arg.startswith(flag + "=") for arg in serve_args):
                raise ConfigError(f"{flag} is set per node by `gateway ray deploy`")
        from gateway.deploy.secrets import split_secrets

        serve_args, secrets, warnings = split_secrets(
            serve_args, {"--api-key": args.api_key_file, "--upstream-api-key": args.upstream_api_key_file}, os.environ)
        for warning in warnings:
            print(f"gateway ray deploy: warning: {warning}", file=sys.stderr, flush=True)
        # Check the options here, once, rather than on every node: a bad flag fails the deploy, not the cluster.
        check = argparse.ArgumentParser(prog="gateway ray deploy", add_help=False)
        add_arguments(check)
        try:
            parsed = check.parse_args([*serve_args, "--ray-address", args.ray_address])
        except SystemExit:
            raise ConfigError(f"bad gateway serve options: {' '.join(serve_args)}") from None
        resolve(parsed, environ={})
        print(f"gateway ray deploy: a gateway on every node of {args.ray_address}, port {args.port}...", flush=True)
        result = cluster.deploy(args.ray_address, args.port, args.host, serve_args, wait_s=args.wait_s,
                                secrets=secrets)
        print(cluster.format_status(result), flush=True)
        return 0
    if args.ray_command == "status":
        print(cluster.format_status(cluster.status(args.ray_address)), flush=True)
        return 0
    removed = cluster.remove(args.ray_address)
    print(f"gateway ray remove: stopped {len(removed)} gateways ({', '.join(sorted(removed)) or 'none'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
