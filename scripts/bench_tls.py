#!/usr/bin/env python
"""The TLS row: the gateway and HAProxy+Lua (as Ray 2.60 renders it) both terminating TLS, side by side.

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_tls.py            # ~2.5 min (unary, stream200, paced 64x10)
    flock /tmp/heavy.lock .venv/bin/python scripts/bench_tls.py --plain --with-key
                               # + both proxies without TLS, + a TLS gateway checking an API key

Same rig as scripts/bench.py (whose parts in scripts/benchkit/ this reuses: clients, processes, sweeps):
upstreams (mock engines + router) and the load generator on core 1, each proxy alone on core 0,
HAProxy nbthread 1 and a 1-worker gateway. Both proxies serve one certificate (ECDSA P-256, made
here with `cryptography`): HAProxy via `bind ... ssl crt <pem> alpn http/1.1 ssl-min-ver TLSv1.2`,
the gateway via --tls-cert/--tls-key. Clients hold keep-alive TLS connections (handshakes happen
once per connection, in the warm-up), so the rows compare the per-request and per-chunk cost of
relaying through TLS: record encryption and decryption plus each proxy's TLS read/write path.
The paced point (--paced, bench.py's vLLM decode-loop workload) reports proxy CPU per stream; a TLS
client's stream is relayed by the gateway's Python path (the C pump writes to plain sockets only).

Proxy CPU per request = utime+stime of the proxy's processes over the measured window divided by
the requests completed in it (bench.py's method). Outputs: results_tls.md/json in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import re
import ssl
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import haproxy_ray  # noqa: E402
from benchkit import load  # noqa: E402
from benchkit.stack import Stack, StackOptions  # noqa: E402
from benchkit.sweep import sweep, sweep_paced  # noqa: E402
from benchkit.systems import SYSTEM_LABEL  # noqa: E402
from gateway.stacks.procs import Child, free_port  # noqa: E402

LABEL = {"haproxy-tls": "HAProxy+Lua TLS", "gateway-tls": "gateway TLS", "gateway-tls-key": "gateway TLS+key",
         "haproxy": "HAProxy+Lua", "gateway": "gateway"}
BENCH_KEY = "sk-bench-0123456789abcdef"
SYSTEM_LABEL.update(LABEL)


def make_certificate(directory: Path) -> tuple[str, str, str, str]:
    """(CA file, cert file, key file, HAProxy's combined cert+key PEM) for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = {"ca.pem": pem(ca), "cert.pem": pem(cert), "key.pem": key_pem, "combined.pem": pem(cert) + key_pem}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return tuple(str(directory / name) for name in files)  # type: ignore[return-value]


# Every system gets the key's header (only gateway-tls-key checks it); TLS systems are reached over TLS.
load.EXTRA_HEADERS = b"Authorization: Bearer %s\r\n" % BENCH_KEY.encode()
TLS_ADDRS = load.TLS_CONTEXTS


def start_haproxy(stack: Stack, tag: str, router, reps, combined_pem: str | None) -> tuple[Child, int]:
    """bench.Stack.haproxy, with `ssl crt` on the frontend's bind line when combined_pem is given."""
    port = free_port()
    work = stack.log_dir.parent / f"haproxy-{tag}"
    r = haproxy_ray.render(work, port, router, reps, free_port(), free_port())
    cfg = Path(r.cfg_path).read_text()
    if combined_pem:
        cfg, n = re.subn(rf"(\n\s*bind 127\.0\.0\.1:{port})\n",
                         rf"\1 ssl crt {combined_pem} alpn http/1.1 ssl-min-ver TLSv1.2\n", cfg)
        assert n == 1, "the rendered config has no frontend bind line to put TLS on"
    cfg_path = work / f"haproxy-{tag}.cfg"
    cfg_path.write_text(cfg)
    sock = work / "metrics.sock"
    if sock.exists():
        sock.unlink()
    stack.start(f"haproxy-{tag}-metrics-sink", haproxy_ray.sink_argv(str(sock)), None, stack.a.load_cpu)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    child = stack.start(f"haproxy-{tag}", [r.binary, "-db", "-f", str(cfg_path), "-dR"], port, stack.a.proxy_cpu)
    time.sleep(0.8)  # health checks: rise 2 x fastinter 250 ms before servers are UP (as bench.py)
    return child, port


def start_gateway(stack: Stack, tag: str, router, reps, tls: list[str]) -> tuple[Child, int]:
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--router", f"http://{router[0]}:{router[1]}", *tls]
    for rid, host, rport in reps:
        argv += ["--replica", f"{rid}=http://{host}:{rport}"]
    return stack.start(f"gateway-{tag}", argv, port, stack.a.proxy_cpu), port


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "tls"))
    ap.add_argument("--plain", action="store_true", help="also run both proxies without TLS (the cost of TLS itself)")
    ap.add_argument("--with-key", action="store_true",
                    help="also a TLS gateway with --api-key, checking the key every request sends (the front door on)")
    ap.add_argument("--unary-conc", default="16", help="comma list (default 16)")
    ap.add_argument("--stream-conc", default="16", help="comma list (default 16)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per slice")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--slices", type=int, default=2, help="slices per system per point, order A..Z Z..A")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--unary-bytes", type=int, default=10000)
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    ap.add_argument("--workloads", default="unary,stream200", help="comma list of unary,stream200 ('' = none)")
    ap.add_argument("--paced", default="64x10", help="paced points STREAMSxSTEP_MS,... ('' = none; bench.py --paced)")
    ap.add_argument("--paced-tokens", default="128-256", help="tokens per paced stream, MIN-MAX")
    ap.add_argument("--paced-duration", type=float, default=3.0, help="measured seconds per paced slice")
    ap.add_argument("--paced-warmup", type=float, default=2.0, help="warm-up seconds per paced slice")
    a = ap.parse_args(argv)
    a.unary_conc = [int(x) for x in a.unary_conc.split(",")]
    a.stream_conc = [int(x) for x in a.stream_conc.split(",")]
    a.workloads = [w for w in a.workloads.split(",") if w]
    a.paced = [(int(x.split("x")[0]), float(x.split("x")[1])) for x in a.paced.split(",") if x.strip()]
    lo, hi = a.paced_tokens.split("-")
    a.paced_tokens = (int(lo), int(hi))
    return a


# Each gateway beside the HAProxy it is compared with (the keyed gateway with the TLS HAProxy, which has no keys).
PAIRS = (("haproxy-tls", "gateway-tls"), ("haproxy-tls", "gateway-tls-key"), ("haproxy", "gateway"))


def compare(index: dict, point: tuple, cpu: str, name: str, summary: dict, lines: list[str], cells) -> None:
    """One point's rows (`cells` of a row, then the gateway's CPU over HAProxy's) and its CPU ratios in `summary`."""
    for haproxy, gateway in PAIRS:
        h, g = index.get((haproxy, *point)), index.get((gateway, *point))
        if h is None or g is None:
            continue
        ratio = g[cpu] / h[cpu] if h[cpu] and g[cpu] else None
        summary[f"{gateway}/{haproxy} {name}"] = round(ratio, 3) if ratio else None
        for row in (h, g) if gateway != "gateway-tls-key" else (g,):  # that HAProxy's row is printed once
            ratio_cell = f"{ratio:.2f}" if row is g and ratio else ""
            lines.append("| " + " | ".join(str(cell) for cell in cells(row)) + f" | {ratio_cell} |")


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out).resolve()
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if (os.cpu_count() or 1) < 2:
        a.proxy_cpu = a.load_cpu = "0"
    os.sched_setaffinity(0, {int(x) for x in str(a.load_cpu).split(",")})
    ca, cert, key, combined = make_certificate(out)
    client_context = ssl.create_default_context(cafile=ca)
    stack = Stack(StackOptions(unary_bytes=a.unary_bytes, proxy_cpu=a.proxy_cpu, load_cpu=a.load_cpu), log_dir)
    try:
        router, reps = stack.upstreams("", a.replicas, 0.0)
        targets: dict[str, dict] = {}
        child, port = start_haproxy(stack, "tls", router, reps, combined)
        targets["haproxy-tls"] = {"addrs": [("127.0.0.1", port)], "pid": child.pid}
        TLS_ADDRS[("127.0.0.1", port)] = client_context
        child, port = start_gateway(stack, "tls", router, reps, ["--tls-cert", cert, "--tls-key", key])
        targets["gateway-tls"] = {"addrs": [("127.0.0.1", port)], "pid": child.pid}
        TLS_ADDRS[("127.0.0.1", port)] = client_context
        if a.with_key:
            child, port = start_gateway(stack, "tls-key", router, reps,
                                        ["--tls-cert", cert, "--tls-key", key, "--api-key", BENCH_KEY])
            targets["gateway-tls-key"] = {"addrs": [("127.0.0.1", port)], "pid": child.pid}
            TLS_ADDRS[("127.0.0.1", port)] = client_context
        if a.plain:
            child, port = start_haproxy(stack, "plain", router, reps, None)
            targets["haproxy"] = {"addrs": [("127.0.0.1", port)], "pid": child.pid}
            child, port = start_gateway(stack, "plain", router, reps, [])
            targets["gateway"] = {"addrs": [("127.0.0.1", port)], "pid": child.pid}
        for target in targets.values():
            target["router_pid"] = stack.router_pid
        rows = asyncio.run(sweep(a, targets)) if a.workloads else []
        if a.paced:
            rows += asyncio.run(sweep_paced(a, targets))
    finally:
        stack.stop()
    index = {(r["system"], r["workload"], r["concurrency"]): r for r in rows}
    lines = ["| workload | conc | system | req/s | p50 ms | cpu us/req | gateway / HAProxy CPU |",
             "|---|---|---|---|---|---|---|"]
    summary: dict[str, float | None] = {}
    for workload in a.workloads:
        for conc in (a.unary_conc if workload == "unary" else a.stream_conc):
            compare(index, (workload, conc), "cpu_us_per_req", f"{workload} c{conc}", summary, lines,
                    lambda row: [workload, conc, LABEL[row["system"]], row["rps"], row["p50_ms"], row["cpu_us_per_req"]])
    if a.paced:
        lines += ["", "| paced point | system | events/s | TTFT p50 ms | gap p99 ms | cpu us/stream | gateway / HAProxy CPU |",
                  "|---|---|---|---|---|---|---|"]
        paced = {(r["system"], r["streams_per_replica"], r["step_ms"]): r for r in rows if "cpu_us_per_stream" in r}
        for spr, step in a.paced:
            compare(paced, (spr, step), "cpu_us_per_stream", f"paced {spr}x{step:g}", summary, lines,
                    lambda row: [f"{spr}x{step:g} ms", LABEL[row["system"]], row["events_per_s"], row["ttfb_p50_ms"],
                                 row["gap_p99_ms"], row["cpu_us_per_stream"]])
    text = "\n".join(lines)
    print("\n" + text)
    (out / "results_tls.md").write_text(text + "\n")
    (out / "results_tls.json").write_text(json.dumps({"rows": rows, "cpu_ratio": summary, "argv": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
