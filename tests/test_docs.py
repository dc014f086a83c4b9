"""The docs cannot drift from what the program does.

- The commands of docs/getting-started.md run as written against a real `gateway up` (real processes, real
  sockets on 127.0.0.1; only the port is changed to a free one).
- docs/security.md's key example: `gateway keys new` writes what the page shows, and a gateway given that
  keys file lets the key in and nobody else.
- The two commands for a fresh machine are the same in the README and on that page, and run what they say.
- Every `gateway ...` command on the docs pages and in the README uses flags the program has; every
  `gateway serve` command parses and validates against the option table.
- docs/reference/configuration.md is what scripts/gen_config_reference.py makes from that table, and every
  failure reason of gateway/dataplane/reasons.py has its row on docs/operating.md.
- The site builds with `mkdocs build --strict` (every internal link and anchor resolves), and the README's
  relative links point at files that exist.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from gateway.config import ConfigError, add_arguments, resolve
from gateway.stacks.procs import free_port
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [README]
# The two commands for a fresh machine: one installs and runs the local stack, one installs and runs the tests.
FRESH_MACHINE = ("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/gateway up", "bash .ci/run")
# Where the page's examples expect the local stack (gateway up's default port).
PAGE_ADDRESS = "127.0.0.1:8000"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def fenced(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a Markdown page, in order."""
    return [(match.group(1), match.group(2)) for match in FENCE.finditer(path.read_text(encoding="utf-8"))]


def shell_lines(text: str) -> list[str]:
    """The commands of a shell block, continuation lines joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def test_configuration_reference_is_generated_from_the_option_table() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_config_reference.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_fresh_machine_commands_are_the_same_in_readme_and_getting_started() -> None:
    for path in (README, GETTING_STARTED):
        blocks = [text.strip() for lang, text in fenced(path) if lang == "sh"]
        for command in FRESH_MACHINE:
            assert command in blocks, f"{path.name} lacks the fresh-machine command {command!r}"
    # The README's SDK example is the page's (which the test below runs).
    page_python = [text for lang, text in fenced(GETTING_STARTED) if lang == "python"]
    assert all(text in page_python for lang, text in fenced(README) if lang == "python")
    # What they run exists: the console script the install makes, and the CI script.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gateway"] == "gateway.cli:main"
    assert (ROOT / ".ci" / "run").read_text().startswith("#!/usr/bin/env bash")


def test_site_builds_with_every_link_and_anchor_resolved(tmp_path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    # Not --quiet: it hides the warnings that --strict turns into a failure.
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr


def test_every_failure_reason_is_documented() -> None:
    # Every reason the gateway can answer with (gateway/dataplane/reasons.py) has its row in the operating page.
    from gateway.dataplane.reasons import Reason

    page = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    missing = [reason.value for reason in Reason if f"| `{reason.value}` |" not in page]
    assert not missing, f"docs/operating.md, Failure reasons, lacks {missing}"


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    missing = [target for target in targets if "://" not in target and not (ROOT / target).exists()]
    assert not missing, missing


@functools.cache
def help_text(*command: str) -> str:
    result = subprocess.run([sys.executable, "-m", "gateway", *command, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout


def documented_commands() -> list[tuple[str, list[str]]]:
    """(page, argv after `gateway`) of every `gateway ...` command line in a shell block."""
    commands = []
    for path in PAGES:
        for lang, text in fenced(path):
            if lang not in ("sh", "bash", ""):
                continue
            for line in shell_lines(text):
                # Synopses: `[--app llm]` is an option shown as optional; `...` stands for more options.
                line = re.sub(r"(^|\s)#.*", "", line.replace("[", " ").replace("]", " "))
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                for index, word in enumerate(words):
                    if word.endswith("/gateway") or word == "gateway" and (index == 0 or words[index - 1] in (
                            "-m", "&&", "exec", "$")):
                        argv = [w for w in words[index + 1:] if w != "..."]
                        if argv and argv[0] in ("serve", "up", "keys", "ray"):
                            commands.append((path.name, argv))
                        break
    return commands


def test_every_documented_gateway_command_uses_real_flags() -> None:
    commands = documented_commands()
    assert sum(argv[0] == "serve" for _, argv in commands) >= 3
    problems = []
    for page, argv in commands:
        sub = list(argv[:2]) if argv[0] in ("keys", "ray") and len(argv) > 1 else list(argv[:1])
        flags = {word.split("=")[0] for word in argv if word.startswith("--")}
        known = help_text(*sub)
        if sub == ["ray", "deploy"]:  # it passes any `gateway serve` option on to the gateways
            known += help_text("serve")
        problems += [f"{page}: gateway {' '.join(argv)}: {flag} is not an option of `gateway {' '.join(sub)}`"
                     for flag in sorted(flags) if not re.search(re.escape(flag) + r"\b", known)]
        if argv[0] == "serve":
            parser = argparse.ArgumentParser(exit_on_error=False, allow_abbrev=False)
            add_arguments(parser)
            try:
                args, unknown = parser.parse_known_args(argv[1:])
                assert not unknown, unknown
                if args.config is None:  # a config file named on the page need not exist here
                    resolve(args, {"GATEWAY_REPLICAS": "http://127.0.0.1:1"})
            except (argparse.ArgumentError, ConfigError, AssertionError) as exc:
                problems.append(f"{page}: gateway {' '.join(argv)}: {exc}")
    assert not problems, "\n".join(problems)


class Output:
    """A child's output, read by a thread, so the test can wait for a line with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.text += line


def test_getting_started_commands_work_against_gateway_up() -> None:
    blocks = fenced(GETTING_STARTED)
    install = next(text.strip() for lang, text in blocks if lang == "sh" and text.strip() == FRESH_MACHINE[0])
    # The install itself is what .ci/run does; this runs what the page then runs: `gateway up`.
    up = shlex.split(install.split("&&")[-1])
    assert up[0].endswith("/gateway")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", *up[1:], "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(proc)
    try:
        wait_until(lambda: "Base URL" in output.text or proc.poll() is not None, deadline_s=60,
                   what="gateway up to print its base URL")
        assert proc.poll() is None, output.text
        assert f"http://127.0.0.1:{port}/v1" in output.text
        ran = {"sh": 0, "python": 0}
        for lang, text in blocks:
            if PAGE_ADDRESS not in text or lang not in ran:
                continue
            text = text.replace(PAGE_ADDRESS, f"127.0.0.1:{port}")
            if lang == "sh":
                if "curl" in text and shutil.which("curl") is None:
                    pytest.fail("curl is not installed: the page's curl commands cannot be checked")
                result = subprocess.run(["bash", "-euo", "pipefail", "-c", text], capture_output=True, text=True,
                                        timeout=60)
            else:
                result = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and result.stdout.strip(), (text, result.stdout, result.stderr)
            if '"stream": true' in text:
                assert "data: [DONE]" in result.stdout, result.stdout
            if "/-/metrics" in text:
                assert "gateway_requests_total" in result.stdout
            if "/-/routes" in text:
                assert '"targets"' in result.stdout
            ran[lang] += 1
        assert ran["sh"] >= 2 and ran["python"] >= 1, ran
        proc.send_signal(signal.SIGINT)  # the page: "Ctrl-C stops everything"
        assert proc.wait(timeout=30) == 0, output.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_security_page_key_example_works(stack, tmp_path) -> None:
    """docs/security.md, step 1: `gateway keys new alice >> keys.toml` makes what the page shows, and a gateway
    given that file lets the key in and nobody else."""
    import openai

    page = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    session = next(text for lang, text in fenced(ROOT / "docs" / "security.md")
                   if lang == "sh" and text.startswith("$ gateway keys new alice >> keys.toml"))
    shown = session.splitlines()
    keys_file = tmp_path / "keys.toml"
    with keys_file.open("w") as stdout:
        result = subprocess.run([sys.executable, "-m", "gateway", "keys", "new", "alice"], cwd=ROOT, stdout=stdout,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # stderr: the page's line, but for the key itself.
    prefix, _, key_shown = shown[1].rpartition(" ")
    key = result.stderr.strip().rpartition(" ")[2]
    assert result.stderr.strip().startswith(prefix) and key.startswith(key_shown[:6]), (result.stderr, shown[1])
    # stdout: the page's `cat keys.toml`, line for line up to the elision, but for the digest.
    written = keys_file.read_text().splitlines()
    expected = shown[shown.index("$ cat keys.toml") + 1:]
    for want, got in zip(expected[:expected.index("…")], written):
        assert re.sub(r'"[0-9a-f]{64}"', "DIGEST", want) == re.sub(r'"[0-9a-f]{64}"', "DIGEST", got), (want, got)
    assert "--api-keys-file" in page
    replica = stack.replica("r1")
    gateway = stack.gateway([stack.router([replica])], [replica], "--api-keys-file", str(keys_file))
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-gw-wrong", max_retries=0).models.list()
