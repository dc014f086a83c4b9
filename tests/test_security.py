"""The front door over real sockets: API keys and their limits, TLS, mTLS, the admin listener, SIGHUP reload.

Clients are the ones users run: the openai SDK and httpx over HTTPS with a test CA made on the spot.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from gateway.security.keys import digest_of
from tests.certs import Pair, TestCA
from tests.conftest import CHAT, LOG_DIR, Gateway, Replica, Stack, wait_until

KEYS = {"alice": "sk-alice-0123456789", "slow": "sk-slow-0123456789", "one": "sk-one-0123456789",
        "narrow": "sk-narrow-0123456789"}
UPSTREAM_KEY = "sk-upstream-replicas-only"


def keys_toml(keys: dict[str, str], extra: dict[str, str] | None = None) -> str:
    extra = extra or {}
    return "".join(f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key).hex()}"\n{extra.get(name, "")}\n'
                   for name, key in keys.items())


LIMITS = {"slow": "rps = 0.5\nburst = 1\n", "one": "max_in_flight = 1\n", "narrow": 'models = ["other-model"]\n'}


def https(gateway: Gateway) -> str:
    return f"https://127.0.0.1:{gateway.port}"


def trusting(ca: TestCA, client_cert: Pair | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.path)
    if client_cert is not None:
        context.load_cert_chain(client_cert.cert, client_cert.key)
    return context


def sdk(gateway: Gateway, ca: TestCA, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{https(gateway)}/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(verify=trusting(ca), timeout=20))


def peer_serial(port: int, ca: TestCA) -> int:
    """The serial number of the certificate a fresh handshake gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with trusting(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


@dataclass
class Door:
    stack: Stack
    replica: Replica
    gateway: Gateway
    ca: TestCA
    server: Pair
    keys_file: Path
    admin_port: int

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def start_door(stack: Stack, directory: Path, *args: str) -> Door:
    from gateway.stacks.procs import free_port

    ca = TestCA(directory)
    server = ca.issue("server-1")
    keys_file = directory / "keys.toml"
    keys_file.write_text(keys_toml(KEYS, LIMITS))
    replica = stack.replica("r1", "--itl-ms", "20")
    router = stack.router([replica])
    admin_port = free_port()
    gateway = stack.gateway([router], [replica], "--tls-cert", server.cert, "--tls-key", server.key,
                            "--api-keys-file", str(keys_file), "--admin-port", str(admin_port),
                            "--upstream-api-key", UPSTREAM_KEY, *args)
    return Door(stack, replica, gateway, ca, server, keys_file, admin_port)


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    stack = Stack("security-door")
    try:
        yield start_door(stack, tmp_path_factory.mktemp("door"))
    finally:
        stack.stop()


def test_openai_sdk_with_a_key_over_https(door: Door) -> None:
    client = sdk(door.gateway, door.ca, KEYS["alice"])
    reply = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=3)
    assert reply.choices[0].message.content
    stream = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=4, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # The replica got the key it expects, never the client's; the router got no key at all.
    seen = door.replica.stats()["last_request"]["headers"]
    auth = [value for name, value in seen if name.lower() == "authorization"] if isinstance(seen, list) \
        else [value for name, value in seen.items() if name.lower() == "authorization"]
    assert auth == [f"Bearer {UPSTREAM_KEY}"]


def test_no_key_and_wrong_key_are_refused_before_anything_is_forwarded(door: Door) -> None:
    before = door.replica.stats()["requests"]
    for key in ("sk-wrong-key", KEYS["alice"] + "x"):
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(door.gateway, door.ca, key).chat.completions.create(model="mock", messages=CHAT["messages"])
        assert info.value.code == "invalid_api_key"
    response = httpx.post(f"{https(door.gateway)}/v1/chat/completions", json=CHAT, verify=trusting(door.ca))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-serve-reason"] == "unauthorized"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert door.replica.stats()["requests"] == before


def test_rate_limit_answers_429_with_retry_after_then_lets_the_key_in(door: Door) -> None:
    client = sdk(door.gateway, door.ca, KEYS["slow"])
    client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)
    assert info.value.response.headers["x-serve-reason"] == "rate_limited"
    assert int(info.value.response.headers["retry-after"]) >= 1

    def admitted() -> bool:
        try:
            client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)
            return True
        except openai.RateLimitError:
            return False

    wait_until(admitted, deadline_s=10, interval_s=0.25, what="the bucket to refill")


def test_max_in_flight_per_key(door: Door) -> None:
    client = sdk(door.gateway, door.ca, KEYS["one"])
    stream = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=40, stream=True)
    first = next(iter(stream))  # the stream is in flight
    assert first
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)
    list(stream)
    reply = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)
    assert reply.choices


def test_models_allow_list(door: Door) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(door.gateway, door.ca, KEYS["narrow"]).chat.completions.create(model="mock", messages=CHAT["messages"])
    assert info.value.code == "model_not_allowed"
    assert info.value.response.headers["x-serve-reason"] == "model_not_allowed"


def test_admin_endpoints_only_on_the_admin_listener(door: Door) -> None:
    verify = trusting(door.ca)
    assert httpx.get(f"{https(door.gateway)}/-/healthz", verify=verify).status_code == 200
    assert httpx.get(f"{https(door.gateway)}/-/ready", verify=verify).status_code == 200
    auth = {"authorization": f"Bearer {KEYS['alice']}"}
    for path in ("/-/routes", "/-/metrics"):
        assert httpx.get(f"{https(door.gateway)}{path}", verify=verify, headers=auth).status_code == 404
        assert httpx.get(f"{door.admin}{path}").status_code == 200
    metrics = httpx.get(f"{door.admin}/-/metrics").text
    assert 'key="alice"' in metrics and 'reason="unauthorized"' in metrics


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_old_tls_versions_and_plain_http_are_refused_at_once(door: Door) -> None:
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = version
        with socket.create_connection(("127.0.0.1", door.gateway.port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                context.wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", door.gateway.port), timeout=5) as raw:
        raw.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)  # closed at once: no HTTP answer, no hang until a timeout
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/1.1 200")


def test_no_key_in_any_log_line(door: Door) -> None:
    sdk(door.gateway, door.ca, KEYS["alice"]).chat.completions.create(model="mock", messages=CHAT["messages"],
                                                                       max_tokens=1)
    wait_until(lambda: '"key":"alice"' in door.gateway.log(), what="alice's request in the access log")
    logs = door.gateway.log()
    for path in Path(LOG_DIR).glob("security-door-*"):
        logs += path.read_text(errors="replace")
    logs += httpx.get(f"{door.admin}/-/metrics").text
    for key in [*KEYS.values(), UPSTREAM_KEY, "sk-wrong-key"]:
        assert key not in logs


def test_sighup_reloads_keys_and_certificate_while_a_stream_is_in_flight(
        tmp_path: Path, stack: Stack) -> None:
    door = start_door(stack, tmp_path)
    old_serial = peer_serial(door.gateway.port, door.ca)
    assert old_serial == door.server.serial
    client = sdk(door.gateway, door.ca, KEYS["alice"])
    stream = client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=60, stream=True)
    chunks = iter(stream)
    assert next(chunks)
    # New keys (alice leaves, bob arrives) and a new certificate, then SIGHUP, all while alice streams.
    bob = "sk-bob-0123456789"
    door.keys_file.write_text(keys_toml({"bob": bob}))
    fresh = door.ca.issue("server-2")
    Path(door.server.cert).write_bytes(Path(fresh.cert).read_bytes())
    Path(door.server.key).write_bytes(Path(fresh.key).read_bytes())
    door.gateway.child.signal(signal.SIGHUP)
    wait_until(lambda: "keys reloaded" in door.gateway.log() and "TLS certificate reloaded" in door.gateway.log(),
               what="the reload log lines")
    assert peer_serial(door.gateway.port, door.ca) == fresh.serial
    assert sdk(door.gateway, door.ca, bob).chat.completions.create(model="mock", messages=CHAT["messages"],
                                                                   max_tokens=1).choices
    with pytest.raises(openai.AuthenticationError):
        sdk(door.gateway, door.ca, KEYS["alice"]).chat.completions.create(model="mock", messages=CHAT["messages"])
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"  # the stream in flight ran to its end
    # A broken file on reload: logged, and the keys in force stay.
    door.keys_file.write_text("[[keys]]\nname = 'x'\nsha256 = 'not-hex'\n")
    door.gateway.child.signal(signal.SIGHUP)
    wait_until(lambda: "keys not reloaded" in door.gateway.log(), what="the refused reload")
    assert sdk(door.gateway, door.ca, bob).chat.completions.create(model="mock", messages=CHAT["messages"],
                                                                   max_tokens=1).choices
    # SIGTERM still drains and exits cleanly with idle TLS keep-alive connections open.
    assert door.gateway.child.stop() == 0


def test_mutual_tls_and_reload_with_workers(tmp_path: Path, stack: Stack) -> None:
    ca = TestCA(tmp_path)
    server = ca.issue("server")
    client_cert = ca.issue("client", server=False)
    stranger = TestCA(tmp_path, "stranger CA").issue("stranger", server=False)
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(keys_toml({"alice": KEYS["alice"]}))
    replica = stack.replica("r1")
    gateway = stack.gateway([], [replica], "--tls-cert", server.cert, "--tls-key", server.key,
                            "--tls-client-ca", ca.path, "--workers", "2", "--api-keys-file", str(keys_file))
    url = f"{https(gateway)}/v1/chat/completions"

    def post(key: str, cert: Pair | None = client_cert) -> int:
        with httpx.Client(verify=trusting(ca, cert)) as client:  # a new connection: either worker
            return client.post(url, json=CHAT, headers={"authorization": f"Bearer {key}"}).status_code

    assert [post(KEYS["alice"]) for _ in range(4)] == [200] * 4
    for cert in (None, stranger):
        with pytest.raises(httpx.TransportError):
            post(KEYS["alice"], cert)
    # SIGHUP to the parent reaches every worker.
    keys_file.write_text(keys_toml({"bob": "sk-bob-0123456789"}))
    gateway.child.signal(signal.SIGHUP)
    wait_until(lambda: gateway.log().count("keys reloaded") == 2, what="both workers reloading")
    assert [post("sk-bob-0123456789") for _ in range(4)] == [200] * 4
    assert [post(KEYS["alice"]) for _ in range(4)] == [401] * 4


def test_stalled_handshake_counts_against_the_header_timeout(stack: Stack, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server = ca.issue("server")
    gateway = stack.gateway([], [stack.replica("r1")], "--tls-cert", server.cert, "--tls-key", server.key,
                            "--header-timeout-s", "0.5")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        closed = threading.Event()

        def read() -> None:
            try:
                while raw.recv(4096):
                    pass
            except OSError:
                pass
            closed.set()

        threading.Thread(target=read, daemon=True).start()
        assert closed.wait(8), "the gateway kept a stalled handshake open"


def test_keys_new_prints_a_key_and_an_entry_that_work(tmp_path: Path, stack: Stack) -> None:
    import re
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, "-m", "gateway", "keys", "new", "carol"], capture_output=True,
                             text=True, timeout=30, check=True)
    key = re.search(r"(sk-gw-\S+)", printed.stderr).group(1)
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(printed.stdout)  # as `gateway keys new carol >> keys.toml` would
    assert key not in printed.stdout
    replica = stack.replica("r1")
    gateway = stack.gateway([], [replica], "--api-keys-file", str(keys_file))
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1).choices
    wait_until(lambda: '"key":"carol"' in gateway.log(), what="carol in the access log")


def test_unusable_key_and_certificate_files_are_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    ca = TestCA(tmp_path)
    one, two = ca.issue("one"), ca.issue("two")
    bad_keys = tmp_path / "bad.toml"
    bad_keys.write_text('[[keys]]\nname = "x"\nsha256 = "abc"\n')
    base = ["serve", "--replica", "http://127.0.0.1:1"]
    cases = [
        (["--api-keys-file", str(bad_keys)], "sha256 must be the 64 hex digits"),
        (["--api-keys-file", str(tmp_path / "missing.toml")], "No such file"),
        (["--tls-cert", one.cert], "give both --tls-cert and --tls-key"),
        (["--tls-cert", one.cert, "--tls-key", two.key], "TLS certificate"),
        (["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", one.key], "no such file"),
    ]
    for args, expected in cases:
        result = subprocess.run([sys.executable, "-m", "gateway", *base, *args], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_sighup_during_a_keys_stream_keeps_its_counts(tmp_path: Path, stack: Stack) -> None:
    """Issue 25: a key's in-flight count and request bucket live per key name, so a reload mid-stream neither
    wedges the key (the stream ends on the same counters it started on) nor refills its bucket."""
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(keys_toml(KEYS, LIMITS))
    replica = stack.replica("r1", "--itl-ms", "20")
    gateway = stack.gateway([], [replica], "--api-keys-file", str(keys_file))
    one = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS["one"], max_retries=0)
    slow = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS["slow"], max_retries=0)

    def reload(times: int) -> None:
        before = gateway.log().count("keys reloaded")
        gateway.child.signal(signal.SIGHUP)
        wait_until(lambda: gateway.log().count("keys reloaded") == before + 1, what=f"reload {times}")

    slow.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)  # its one request
    stream = one.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=150, stream=True)
    chunks = iter(stream)
    assert next(chunks)
    # The reloaded file changes the keys' other fields; the limits that count stay as they were.
    keys_file.write_text(keys_toml(KEYS, {**LIMITS, "one": "max_in_flight = 1\nrps = 1000\n"}))
    for times in range(3):
        reload(times)
        with pytest.raises(openai.RateLimitError):  # the stream still counts against the reloaded key
            one.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)
        with pytest.raises(openai.RateLimitError):  # a reload is not a refill
            slow.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1)
    assert list(chunks)[-1].choices[0].finish_reason == "length"
    # The stream gave its slot back to the key it was counted on: admitted again, and after more reloads too.
    for times in range(3, 5):
        assert one.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1).choices
        reload(times)
    assert one.chat.completions.create(model="mock", messages=CHAT["messages"], max_tokens=1).choices
