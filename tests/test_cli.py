"""The command line as an operator meets it: help, config errors, env, `gateway up`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import openai

from gateway.stacks.procs import free_port, port_open
from tests.conftest import CHAT


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30,
                          env=env)


def test_serve_help_documents_flags_and_env() -> None:
    result = run_gateway("serve", "--help")
    assert result.returncode == 0
    for text in ("--router", "--replica", "GATEWAY_ROUTERS", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY",
                 "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE", "RAY_SERVE_SESSION_ID_HEADER_KEY",
                 "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S"):
        assert text in result.stdout


def test_bad_configuration_is_one_clear_line_and_exit_2() -> None:
    cases = [
        (["serve"], "no replicas"),
        (["serve", "--replica", "ftp://x:1"], "only http://"),
        (["serve", "--replica", "http://127.0.0.1:99999"], "replica"),
        (["serve", "--replica", "http://127.0.0.1:1", "--port", "abc"], "--port"),
        (["serve", "--replica", "http://127.0.0.1:1", "--router-timeout-s", "-1"], "router_timeout_s"),
    ]
    for argv, expected in cases:
        result = run_gateway(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert expected in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(basic) -> None:
    result = run_gateway("serve", "--port", str(basic.gateway.port), "--replica", basic.replicas[0].url)
    assert result.returncode == 2
    assert "already in use" in result.stderr and "Traceback" not in result.stderr


def test_env_configures_everything_and_flags_win(stack) -> None:
    replica = stack.replica("a")
    router = stack.router([replica])
    port = free_port()
    env = {"GATEWAY_PORT": str(port), "GATEWAY_ROUTERS": router.url, "GATEWAY_REPLICAS": f"a={replica.url}",
           "GATEWAY_HOST": "127.0.0.1"}
    gateway = stack.gateway([], [], env=env)  # the fixture passes --port: the flag wins over GATEWAY_PORT
    assert gateway.port != port
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert router.stats()["requests"] == 1


def test_gateway_up_runs_the_local_stack_and_stops_cleanly() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "up", "--port", str(port), "--itl-ms", "1",
                             "--ttft-ms", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Base URL" in line:
                break
        base = re.search(r"Base URL: (\S+)", "".join(lines)).group(1)
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="mock", messages=CHAT["messages"], stream=True, max_tokens=4) if c.choices)
        assert text.strip()
        # The local stack counts tokens (no keys there: the key is ""), so /-/usage has something to show.
        usage = httpx.get(f"http://127.0.0.1:{port}/-/usage").json()["keys"][""]["mock"]["since_start"]
        assert usage["requests"] == 1 and usage["completion_tokens"] == 4
        routes = httpx.get(f"http://127.0.0.1:{port}/-/routes").json()
        assert len(routes["targets"]) == 2 and len(routes["routers"]) == 1
        children = [f"127.0.0.1:{t['address'].split(':')[1]}" for t in routes["targets"]]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=20) == 0
        assert not port_open("127.0.0.1", port)
        for address in children:
            assert not port_open(*address.split(":")[:1], int(address.split(":")[1]))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_config_file_sets_options_and_env_and_flags_win(stack, tmp_path) -> None:
    replica = stack.replica("a")
    router = stack.router([replica])
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nreplicas = ["a={replica.url}"]\nrouters = ["{router.url}"]\n'
                      f'forward_body = true\nrouter_timeout_s = 3\n')
    gateway = stack.gateway([], [], "--config", str(config))
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT).status_code == 200
    assert "Hello there" in router.stats()["last_body"]  # forward_body came from the file
    assert "forward body on" in gateway.log()


def test_config_file_errors_are_clear(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nno_such_option = 1\n")
    result = run_gateway("serve", "--config", str(bad))
    assert result.returncode == 2 and "unknown option 'no_such_option'" in result.stderr
    bad.write_text("[gateway\n")
    result = run_gateway("serve", "--config", str(bad))
    assert result.returncode == 2 and "bad.toml" in result.stderr and "Traceback" not in result.stderr
    result = run_gateway("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "missing.toml" in result.stderr


def test_example_config_file_is_valid() -> None:
    from gateway.config import load_file

    values = load_file("gateway.toml.example")
    assert values["workers"] == 2 and len(values["replicas"]) == 2


def test_configuration_reference_documents_every_option() -> None:
    from gateway.config import OPTIONS

    with open("docs/reference/configuration.md", encoding="utf-8") as handle:
        reference = handle.read()
    missing = [option.cli_flag for option in OPTIONS if f"`{option.cli_flag}`" not in reference]
    assert not missing, f"the configuration reference lacks {missing}: run scripts/gen_config_reference.py"


def test_ray_haproxy_env_durations_carry_over() -> None:
    """Ray's HAProxy env vars use HAProxy time units ("5s", "250ms"); the gateway reads them as they are."""
    from gateway.config import resolve

    config = resolve(None, {"GATEWAY_REPLICAS": "http://127.0.0.1:1", "RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER": "5s",
                            "RAY_SERVE_HAPROXY_HEALTH_CHECK_FASTINTER": "250ms",
                            "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S": "3"})
    assert (config.health_interval_s, config.health_fast_interval_s, config.router_timeout_s) == (5.0, 0.25, 3.0)


def test_token_accounting_is_auto_on_with_keys_and_flags_env_and_file_override(tmp_path) -> None:
    from gateway.config import ConfigError, resolve

    base = {"GATEWAY_REPLICAS": "http://127.0.0.1:1"}
    assert resolve(None, base).token_accounting is None and not resolve(None, base).counts_tokens
    assert resolve(None, {**base, "GATEWAY_API_KEYS_FILE": "keys.toml"}).counts_tokens
    assert resolve(None, {**base, "GATEWAY_API_KEY": "sk-1"}).counts_tokens
    assert not resolve(None, {**base, "GATEWAY_API_KEY": "sk-1", "GATEWAY_TOKEN_ACCOUNTING": "false"}).counts_tokens
    assert resolve(None, {**base, "GATEWAY_TOKEN_ACCOUNTING": "on"}).counts_tokens
    assert resolve(None, {**base, "GATEWAY_API_KEY": "sk-1", "GATEWAY_TOKEN_ACCOUNTING": "auto"}).counts_tokens
    config = tmp_path / "gateway.toml"
    config.write_text('token_accounting = false\napi_key = "sk-1"\n')
    assert not resolve(None, {**base, "GATEWAY_CONFIG": str(config)}).counts_tokens
    config.write_text('token_accounting = "auto"\napi_key = "sk-1"\n')
    assert resolve(None, {**base, "GATEWAY_CONFIG": str(config)}).counts_tokens
    try:
        resolve(None, {**base, "GATEWAY_TOKEN_ACCOUNTING": "sometimes"})
        raise AssertionError("accepted")
    except ConfigError as exc:
        assert "or auto" in str(exc)
    text = " ".join(run_gateway("serve", "--help").stdout.split())  # as argparse wraps it, on one line
    assert "--token-accounting, --no-token-accounting" in text and "default: auto]" in text


def test_gateway_up_vllm_backend_explains_what_is_missing(tmp_path) -> None:
    # The real Ray Serve LLM stack runs on Ray only, and needs the vLLM venv: both are said plainly, before
    # anything starts (no Ray head, no temp dir left behind).
    result = run_gateway("up", "--backend", "vllm")
    assert result.returncode == 2 and "--backend vllm runs on Ray: add --ray" in result.stderr
    result = run_gateway("up", "--ray", "--backend", "vllm", "--vllm-venv", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "bin/python is missing: run `bash scripts/vllm_setup.sh`" in result.stderr
    assert "starting a private Ray head" not in result.stdout


def test_config_fields_come_from_the_options_table() -> None:
    # Defaults are written once, in OPTIONS; the Config dataclass is made from it, each default of its option's type.
    import dataclasses

    from gateway.config import _TYPES, OPTIONS, Config

    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert list(fields) == [option.name for option in OPTIONS]
    config = Config()
    for option in OPTIONS:
        assert option.kind in _TYPES, f"{option.name}: add its parser's type to config._TYPES"
        kind = _TYPES[option.kind]
        assert isinstance(getattr(config, option.name), getattr(kind, "__origin__", kind)), option.name
        assert getattr(config, option.name) == option.default
