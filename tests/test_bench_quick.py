"""Smoke test of the side-by-side benchmark: it runs end to end and writes its outputs.

No timing assertions: numbers on a shared 2-core machine mean nothing in a test.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_writes_table_csv_json(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--systems", "direct,gateway",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    md = (out / "results.md").read_text()
    assert "| workload | c | system |" in md
    assert "| unary | 4 | direct |" in md

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["workload"] for r in rows} == {"unary", "stream50"}
    assert all(int(r["completed"]) > 0 for r in rows), rows
    assert all(int(r["errors"]) == 0 for r in rows), rows

    assert "## Paced streams" in md
    with open(out / "results_paced.csv", newline="") as f:
        paced = list(csv.DictReader(f))
    assert {r["system"] for r in paced} == {r["system"] for r in rows}
    assert all(int(r["completed"]) > 0 and float(r["events_per_s"]) > 0 for r in paced), paced

    data = json.loads((out / "results.json").read_text())
    systems = {r["system"] for r in data["rows"]}
    assert "direct" in systems
    # The gateway is either measured or explicitly reported as skipped, never silently missing.
    assert "gateway" in systems or "gateway" in data["meta"]["skipped"], data["meta"]
    if "gateway" in systems:
        assert all(r["cpu_us_per_req"] is not None for r in data["rows"] if r["system"] == "gateway")
    if importlib.util.find_spec("matplotlib") is not None:  # plots need the [bench] extra; CI installs [test]
        assert (out / "latency_throughput.png").stat().st_size > 0
        assert (out / "cpu_per_request.png").stat().st_size > 0
