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
