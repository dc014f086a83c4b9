#!/usr/bin/env python
"""Gateway CPU per resumed stream: this tree against another (e.g. one where the resumed part stays in Python),
side by side against the same mock replicas, slices interleaved (A B, then B A), so the ratio is one run's.

    git worktree add /tmp/old <commit> && (cd /tmp/old && .venv/bin/python setup.py build_ext --inplace -q)
    .venv/bin/python scripts/bench_resumed.py --old-tree /tmp/old [--chat] [--streams 60] [--tokens 1000]

Each stream's replica dies after its first token (`x-mock-die-at`); the rest comes from another replica through
resume (docs/resume.md). Unbroken streams are measured alongside. CPU is utime+stime of the gateway process
(/proc/<pid>/stat, 10 ms ticks: keep slices long), divided by the streams of the slice.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from replicas.mock_engine import prompt_ids  # noqa: E402
from tests.conftest import Stack  # noqa: E402
from benchkit import procstats  # noqa: E402


def cpu_s(pid: int) -> float:
    return procstats.cpu_seconds([pid])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-tree", required=True, metavar="PATH", help="the other source tree, its pump built")
    ap.add_argument("--chat", action="store_true", help="/v1/chat/completions (default /v1/completions)")
    ap.add_argument("--streams", type=int, default=60, help="streams per slice")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--slices", type=int, default=4)
    a = ap.parse_args()
    path = "/v1/chat/completions" if a.chat else "/v1/completions"
    body: dict = {"model": "mock", "max_tokens": a.tokens, "stream": True}
    body.update({"messages": [{"role": "user", "content": "Once upon a time"}]} if a.chat else
                {"prompt": "Once upon a time"})
    p = len(prompt_ids(a.chat, body))
    # `python -m` puts the working directory first on sys.path: run the children from a neutral one, each gateway
    # with its tree on PYTHONPATH (the replicas and the router with this one).
    os.environ["PYTHONPATH"] = str(ROOT)
    os.chdir(tempfile.mkdtemp(prefix="bench-resumed-"))
    stack = Stack("bench-resumed")
    try:
        replicas = [stack.replica(f"r{i}") for i in (1, 2, 3)]
        router = stack.router(replicas)
        trees = {"old": str(Path(a.old_tree).resolve()), "this": str(ROOT)}
        gateways = {name: stack.gateway([router], replicas, "--resume-limit", "2", "--outlier-failures", "0",
                                        env={"PYTHONPATH": tree}) for name, tree in trees.items()}
        kinds = {"resumed": {"x-mock-fault": "close-mid-stream", "x-mock-die-at": f"{p + 1}@{p}"}, "unbroken": {}}
        per_stream: dict[tuple[str, str], list[float]] = {(n, k): [] for n in gateways for k in kinds}
        with httpx.Client(timeout=60) as client:
            for i in range(a.slices):
                for name, gateway in (list(gateways.items()) if i % 2 == 0 else list(gateways.items())[::-1]):
                    for kind, headers in kinds.items():
                        before = cpu_s(gateway.child.pid)
                        for _ in range(a.streams):
                            with client.stream("POST", gateway.url + path, json=body, headers=headers) as response:
                                data = b"".join(response.iter_bytes())
                            assert data.endswith(b"data: [DONE]\n\n"), data[-200:]
                        per_stream[(name, kind)].append((cpu_s(gateway.child.pid) - before) / a.streams * 1e6)
        print(f"{path}, {a.tokens} tokens, {a.streams} streams x {a.slices} slices; gateway CPU per stream (us):")
        for (name, kind), values in per_stream.items():
            values.sort()
            print(f"  {name:5} {kind:9} median {values[len(values) // 2]:7.0f}   slices {[round(v) for v in values]}")
        for name, gateway in gateways.items():
            text = httpx.get(gateway.url + "/-/metrics", timeout=5).text
            pumped = [line for line in text.splitlines() if line.startswith("gateway_native_relay_streams_total")]
            print(f"  {name}: {pumped[0] if pumped else 'no pump'}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
