"""Instructions the gateway process executes per stream, under callgrind: a figure that does not move with the
machine's load, for before/after comparisons of the per-stream path (docs/performance.md, "Instruction counts").

A mock replica and the router run natively; the gateway runs under `valgrind --tool=callgrind --instr-atstart=no`,
counting starts (callgrind_control -i on) after a warm-up and is dumped after N streams, so only the streams are
counted: user space only (the kernel's share of a relayed event, most of its CPU on paced traffic, is not in it).
Every stream is checked to end with [DONE], and a digest of the client's payload (ids and timestamps masked) is
printed, so configurations can be compared byte for byte.

    .venv/bin/python scripts/bench_callgrind.py                    every configuration below, one table
    .venv/bin/python scripts/bench_callgrind.py --only s200-resume,paced-resume --tree ../other-checkout

Under callgrind the gateway runs ~50x slower than the replica, so back-to-back streams (s200) arrive in fewer,
larger reads than they do natively, and how they split moves from run to run: read those figures as a range over
runs. Paced streams (one event per stream per engine step) read one event at a time in both.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httptools

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gateway.stacks.procs import free_port, wait_port  # noqa: E402

# name: (streams counted, concurrency, max_tokens, step_ms, gateway arguments)
CONFIGS = {
    "s200-off": (320, 16, 200, 0, []),
    "s200-resume": (320, 16, 200, 0, ["--resume-limit", "2"]),
    "s200-tokens": (320, 16, 200, 0, ["--token-accounting"]),
    "s200-py-off": (320, 16, 200, 0, ["--no-native-relay"]),
    "s200-py-resume": (320, 16, 200, 0, ["--no-native-relay", "--resume-limit", "2"]),
    "s200-py-tokens": (320, 16, 200, 0, ["--no-native-relay", "--token-accounting"]),
    "paced-off": (64, 16, 100, 10, []),
    "paced-resume": (64, 16, 100, 10, ["--resume-limit", "2"]),
    "paced-tokens": (64, 16, 100, 10, ["--token-accounting"]),
    "paced-py-off": (64, 16, 100, 10, ["--no-native-relay"]),
    "paced-py-resume": (64, 16, 100, 10, ["--no-native-relay", "--resume-limit", "2"]),
    "paced-py-tokens": (64, 16, 100, 10, ["--no-native-relay", "--token-accounting"]),
}
MASK = re.compile(rb'"(id|created|system_fingerprint)":("[^"]*"|\d+)')


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result(b"".join(self.body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("lost"))


async def _streams(port: int, request: bytes, total: int, conc: int) -> tuple[set[str], set[int]]:
    loop = asyncio.get_running_loop()
    digests: set[str] = set()
    events: set[int] = set()
    left = [total]

    async def user() -> None:
        _, client = await loop.create_connection(_Client, "127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            client.body, client.parser = [], httptools.HttpResponseParser(client)
            client.done = loop.create_future()
            client.transport.write(request)
            payload = await client.done
            assert payload.endswith(b"data: [DONE]\n\n"), payload[-200:]
            digests.add(hashlib.sha1(MASK.sub(rb'"\1":X', payload)).hexdigest()[:12])
            events.add(payload.count(b"data: "))
        client.transport.close()

    await asyncio.gather(*(user() for _ in range(conc)))
    return digests, events


def run(tree: Path, name: str, out: Path) -> dict:
    streams, conc, max_tokens, step_ms, gateway_args = CONFIGS[name]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], port: int, log: str, deadline: float = 30.0) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env, cwd=tree, stdout=open(out / f"{log}.log", "w"), stderr=subprocess.STDOUT)
        procs.append(proc)
        wait_port("127.0.0.1", port, deadline, proc)
        return proc

    replica, router, gateway = free_port(), free_port(), free_port()
    py = sys.executable
    cg_out = out / f"callgrind.{name}"
    try:
        start([py, "-m", "replicas.mock_engine", "--port", str(replica), "--replica-id", "r0"], replica, "replica")
        start([py, "-m", "replicas.router", "--port", str(router), "--replica", f"r0=http://127.0.0.1:{replica}"],
              router, "router")
        gw = start(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={cg_out}",
                    py, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(gateway),
                    "--router", f"http://127.0.0.1:{router}", "--replica", f"r0=http://127.0.0.1:{replica}",
                    "--no-access-log", *gateway_args], gateway, f"gateway-{name}", deadline=300)
        body = {"model": "mock", "messages": [{"role": "user", "content": "Say something."}], "stream": True,
                "max_tokens": max_tokens, **({"step_ms": step_ms} if step_ms else {})}
        data = json.dumps(body, separators=(",", ":")).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        asyncio.run(_streams(gateway, request, max(conc, streams // 10), conc))  # warm-up, not counted
        subprocess.run(["callgrind_control", "-i", "on", str(gw.pid)], check=True, capture_output=True)
        started = time.monotonic()
        digests, events = asyncio.run(_streams(gateway, request, streams, conc))
        wall = time.monotonic() - started
        subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", str(gw.pid)], check=True, capture_output=True)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    total = 0
    for dump in out.glob(f"callgrind.{name}.*"):
        found = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M)
        total += int(found.group(1)) if found else 0
    return {"config": name, "streams": streams, "instructions": total, "per_stream": total // streams,
            "events": sorted(events), "digests": sorted(digests), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the source tree whose gateway is measured (pump built)")
    parser.add_argument("--only", default="", help="comma-separated configurations (default: all of them)")
    parser.add_argument("--out", type=Path, default=None, help="where the logs and callgrind dumps go")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        results[name] = run(args.tree.resolve(), name, out)
        print(json.dumps(results[name]), flush=True)
    print(f"\n{'configuration':18} {'instructions/stream':>20} {'x the same path, off':>22}")
    for name, result in results.items():
        base = results.get(name.rsplit("-", 1)[0] + "-off")
        ratio = f"{result['per_stream'] / base['per_stream']:.2f}x" if base else ""
        print(f"{name:18} {result['per_stream']:>20,} {ratio:>22}")


if __name__ == "__main__":
    main()
