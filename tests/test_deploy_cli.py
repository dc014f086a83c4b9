"""`gateway ray deploy` refuses bad options before it touches the cluster (no Ray needed)."""

from __future__ import annotations

import os
import subprocess

from gateway.stacks.procs import python_module


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(python_module("gateway", "ray", *args), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_bad_serve_options_fail_the_deploy_up_front() -> None:
    done = run("deploy", "--ray-address", "127.0.0.1:1", "--no-such-option")
    assert done.returncode == 2
    assert "gateway: error: bad gateway serve options: --no-such-option" in done.stderr
    done = run("deploy", "--ray-address", "127.0.0.1:1", "--workers", "0")
    assert done.returncode == 2 and "workers must be at least 1" in done.stderr


def test_per_node_options_are_the_deployers_own() -> None:
    done = run("deploy", "--ray-address", "127.0.0.1:1", "--node-ip", "10.0.0.1")
    assert done.returncode == 2 and "--node-ip is set per node" in done.stderr


def test_status_needs_an_address() -> None:
    done = subprocess.run(python_module("gateway", "ray", "status"), capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k not in ("GATEWAY_RAY_ADDRESS", "RAY_ADDRESS")},
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "--ray-address" in done.stderr


SECRET = "sk-deploy-secret-0123456789"


def test_secrets_come_from_a_file_or_the_environment_and_leave_the_flags(tmp_path) -> None:
    from gateway.deploy.secrets import split_secrets

    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    args, secrets, warnings = split_secrets(["--workers", "2"], {"--api-key": str(key_file)},
                                            {"GATEWAY_UPSTREAM_API_KEY": "up-secret"})
    assert args == ["--workers", "2"] and not warnings
    assert secrets == {"GATEWAY_API_KEY": SECRET, "GATEWAY_UPSTREAM_API_KEY": "up-secret"}
    # On the command line they still work, with a warning, and are moved out of the gateways' flags all the same.
    args, secrets, warnings = split_secrets(["--api-key", SECRET, "--upstream-api-key=up", "--workers", "2"], {}, {})
    assert args == ["--workers", "2"]
    assert secrets == {"GATEWAY_API_KEY": SECRET, "GATEWAY_UPSTREAM_API_KEY": "up"}
    assert len(warnings) == 2 and "visible to every user (ps)" in warnings[0]
    # An abbreviation argparse would accept for the secret flag is the secret flag.
    args, secrets, _ = split_secrets(["--upstream-api", "up", "--api-keys-file", "keys.toml"], {}, {})
    assert args == ["--api-keys-file", "keys.toml"] and secrets == {"GATEWAY_UPSTREAM_API_KEY": "up"}
    # The Responses API affinity secret every node's gateway shares travels the same way.
    args, secrets, warnings = split_secrets(["--cluster-secret", "shared", "--workers", "2"], {}, {})
    assert args == ["--workers", "2"] and secrets == {"GATEWAY_CLUSTER_SECRET": "shared"}
    args, secrets, warnings = split_secrets([], {}, {"GATEWAY_CLUSTER_SECRET": "from-env"})
    assert secrets == {"GATEWAY_CLUSTER_SECRET": "from-env"} and not warnings


def test_a_secret_file_that_cannot_be_read_fails_the_deploy_up_front(tmp_path) -> None:
    done = run("deploy", "--ray-address", "127.0.0.1:1", "--api-key-file", str(tmp_path / "missing"))
    assert done.returncode == 2 and "--api-key-file" in done.stderr and "No such file" in done.stderr
    (tmp_path / "key").write_text(SECRET)
    done = run("deploy", "--ray-address", "127.0.0.1:1", "--api-key-file", str(tmp_path / "key"),
               "--api-key", SECRET)
    assert done.returncode == 2 and "not both" in done.stderr


def test_a_node_gateway_gets_its_secrets_in_its_environment_not_its_argv(tmp_path) -> None:
    """The node actor's body (gateway/deploy/node.py, a plain class under Ray) runs a real gateway child."""
    import httpx

    from gateway.deploy.node import NodeGateway
    from gateway.stacks.procs import Child, free_port
    from tests.conftest import CHAT, wait_until

    replica_port, port = free_port(), free_port()
    replica = Child(python_module("replicas.mock_engine", "--host", "127.0.0.1", "--port", str(replica_port)),
                    port=replica_port).start()
    node = NodeGateway("127.0.0.1", ["serve", "--host", "127.0.0.1", "--port", str(port),
                                     "--replica", f"http://127.0.0.1:{replica_port}"], port,
                       {"GATEWAY_API_KEY": SECRET}, str(tmp_path))
    try:
        status = wait_until(lambda: (s := node.status())["ready"] and s, deadline_s=30, what="the node's gateway")
        with open(f"/proc/{status['pid']}/cmdline", "rb") as handle:
            assert SECRET.encode() not in handle.read()  # what `ps` shows
        assert SECRET not in repr(status)  # what `gateway ray status` shows
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert httpx.post(url, json=CHAT, timeout=10).status_code == 401
        assert httpx.post(url, json=CHAT, headers={"authorization": f"Bearer {SECRET}"}, timeout=10).status_code == 200
    finally:
        node.stop(10)
        replica.stop()
