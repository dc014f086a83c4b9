"""The standalone router: Ray 2.60's `/internal/route` contract, policies, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.stacks.procs import Child, free_port, python_module
from replicas.routing import ConsistentHash, LoadTracker, PrefixAffinity, Replica

HOST = "127.0.0.1"
FAULTS = ("garbage", "truncated_json", "huge_body", "wrong_types", "outside_target", "slow",
          "status-400", "status-503", "close_early", "unknown_replica")


def start(module: str, *args: str) -> Child:
    port = free_port()
    return Child(python_module(module, "--host", HOST, "--port", str(port), *args), port=port).start()


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Child]]:
    children = {rid: start("replicas.mock_engine", "--replica-id", rid) for rid in ("r1", "r2")}
    yield children
    for child in children.values():
        child.stop()


def replica_args(engines: dict[str, Child], **extra: int) -> list[str]:
    specs = {rid: child.port for rid, child in engines.items()} | extra
    return [arg for rid, port in specs.items() for arg in ("--replica", f"{rid}=http://{HOST}:{port}")]


@contextlib.contextmanager
def router(*args: str) -> Iterator[str]:
    child = start("replicas.router", *args)
    try:
        yield f"http://{HOST}:{child.port}"
    finally:
        assert child.stop() == 0


@pytest.fixture(scope="module")
def round_robin(engines: dict[str, Child]) -> Iterator[str]:
    with router(*replica_args(engines)) as base:
        yield base


async def route(client: httpx.AsyncClient, base: str, body: object = None, **headers: str) -> httpx.Response:
    content = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(f"{base}/internal/route", content=content, headers=headers)


async def picks(client: httpx.AsyncClient, base: str, n: int, body: object = None, **headers: str) -> list[str]:
    out = []
    for _ in range(n):
        response = await route(client, base, body, **headers)
        assert response.status_code == 200, response.text
        out.append(response.json()["replica_id"])
    return out


# -- the contract -----------------------------------------------------------------------------------

async def test_answer_is_flat_and_round_robin_alternates(round_robin: str, engines: dict[str, Child]) -> None:
    async with httpx.AsyncClient() as client:
        await client.post(f"{round_robin}/-/reset")
        answer = (await route(client, round_robin)).json()
        assert set(answer) == {"host", "port", "replica_id"} and answer["host"] == HOST
        assert answer["port"] == engines[answer["replica_id"]].port
        chosen = await picks(client, round_robin, 10)
        assert all(a != b for a, b in zip(chosen, chosen[1:]))
        stats = (await client.get(f"{round_robin}/-/stats")).json()
    assert stats["requests"] == 11 and sum(stats["by_replica"].values()) == 11
    assert sorted(stats["by_replica"].values()) == [5, 6]


async def test_methods_health_and_unknown_paths(round_robin: str) -> None:
    async with httpx.AsyncClient() as client:
        wrong_method = await client.get(f"{round_robin}/internal/route")
        assert wrong_method.status_code == 405 and wrong_method.json() == {"detail": "Method Not Allowed"}
        health = await client.get(f"{round_robin}/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        missing = await client.get(f"{round_robin}/nope")
        assert missing.status_code == 404 and "detail" in missing.json()


async def test_body_is_optional_and_any_shape_is_load_balanced(round_robin: str) -> None:
    async with httpx.AsyncClient() as client:
        for body in (None, b"not json", b"[1, 2]", b'{"model": "x"}', b'{"prompt": "hi"}'):
            assert (await route(client, round_robin, body)).status_code == 200


async def test_keep_alive_reuse_is_visible_in_connections(round_robin: str) -> None:
    async with httpx.AsyncClient() as client:
        before = (await client.get(f"{round_robin}/-/stats")).json()
        await picks(client, round_robin, 20)
        after = (await client.get(f"{round_robin}/-/stats")).json()
    assert after["connections"] == before["connections"] and after["requests"] == before["requests"] + 20


def test_lua_style_http10_connection_close(round_robin: str) -> None:
    # What Ray's HAProxy Lua sends: HTTP/1.0, Connection: close, read until EOF.
    port = int(round_robin.rsplit(":", 1)[1])
    body = b'{"messages":[{"role":"user","content":"hi"}]}'
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"POST /internal/route HTTP/1.0\r\nHost: %s:%d\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\nx-session-id: s1\r\n\r\n%s"
                     % (HOST.encode(), port, len(body), body))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(payload)["replica_id"] in ("r1", "r2")


async def test_stats_record_headers_and_body(round_robin: str) -> None:
    async with httpx.AsyncClient() as client:
        await route(client, round_robin, b'{"prompt": "tru', **{"x-body-truncated": "15/4000", "x-request-id": "q7"})
        stats = (await client.get(f"{round_robin}/-/stats")).json()
    assert stats["last_headers"]["x-body-truncated"] == "15/4000"
    assert stats["last_headers"]["x-request-id"] == "q7" and stats["last_body"] == '{"prompt": "tru'
    assert stats["healthy"] == {"r1": True, "r2": True} and stats["policy"] == "round_robin"


# -- policies ---------------------------------------------------------------------------------------

async def test_consistent_hash_pins_sessions_under_both_spellings(engines: dict[str, Child]) -> None:
    with router(*replica_args(engines), "--policy", "consistent_hash") as base:
        async with httpx.AsyncClient() as client:
            seen = set()
            for i in range(20):
                session = f"session-{i}"
                pinned = await picks(client, base, 3, **{"x-session-id": session})
                pinned += await picks(client, base, 3, **{"X_Session_Id": session})
                assert len(set(pinned)) == 1, (session, pinned)
                seen.add(pinned[0])
            assert seen == {"r1", "r2"}  # 20 sessions do not all hash to one of two replicas
            # No session: round robin.
            unpinned = await picks(client, base, 6)
            assert all(a != b for a, b in zip(unpinned, unpinned[1:]))


async def test_prefix_affinity_follows_the_prompt(engines: dict[str, Child]) -> None:
    system = "You are a helpful assistant that answers questions about the history of computing. " * 5
    with router(*replica_args(engines), "--policy", "prefix_affinity", "--health-interval-s", "0") as base:
        async with httpx.AsyncClient() as client:
            first = await picks(client, base, 5, {"messages": [{"role": "system", "content": system},
                                                               {"role": "user", "content": "Who built ENIAC?"}]})
            assert len(set(first)) == 1
            # A different prompt goes to the least loaded replica, and then sticks there too.
            other = await picks(client, base, 3, {"prompt": "Completely unrelated text about gardening. " * 10})
            assert len(set(other)) == 1 and other[0] != first[0]
            # Sharing the long system prompt is enough to follow it.
            follow = await picks(client, base, 2, {"messages": [{"role": "system", "content": system},
                                                                {"role": "user", "content": "And the Z3?"}]})
            assert set(follow) == {first[0]}
            bad = await route(client, base, {"messages": "not a list"})
            assert bad.status_code == 400 and "messages" in bad.json()["detail"]
            assert (await route(client, base, b"{truncated")).status_code == 200  # no payload: load-balanced


def test_consistent_hash_moves_only_the_departed_replicas_sessions() -> None:
    replicas = [Replica(f"r{i}", HOST, 8000 + i) for i in range(4)]
    ring = ConsistentHash(replicas)
    sessions = [f"user-{i}" for i in range(2000)]
    before = {s: ring.pick(replicas, s, None).id for s in sessions}
    shares = {r.id: list(before.values()).count(r.id) for r in replicas}
    assert all(300 < n < 700 for n in shares.values()), shares  # ~100 virtual nodes spread the load
    survivors = replicas[:2] + replicas[3:]
    after = {s: ring.pick(survivors, s, None).id for s in sessions}
    assert all(after[s] == before[s] for s in sessions if before[s] != "r2")
    assert all(after[s] != "r2" for s in sessions)


def test_prefix_affinity_memory_is_bounded() -> None:
    policy = PrefixAffinity(LoadTracker(), max_prefixes=1000)
    replicas = [Replica("a", HOST, 1), Replica("b", HOST, 2)]
    for i in range(500):
        policy.pick(replicas, None, {"prompt": f"{i:08d} " + "x" * 200})
    assert len(policy._owners) <= 1000


async def test_no_replicas_is_503() -> None:
    with router() as base:
        async with httpx.AsyncClient() as client:
            response = await route(client, base)
    assert response.status_code == 503 and "detail" in response.json()


async def test_unhealthy_replicas_are_skipped_but_never_all(engines: dict[str, Child]) -> None:
    dead = free_port()
    with router(*replica_args(engines, dead=dead), "--health-interval-s", "0.1") as base, \
            router("--replica", f"dead=http://{HOST}:{dead}", "--health-interval-s", "0.1") as only_dead:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 5
            while (await client.get(f"{base}/-/stats")).json()["healthy"]["dead"]:
                assert time.monotonic() < deadline, "the dead replica never looked unhealthy"
                await asyncio.sleep(0.05)
            assert "dead" not in await picks(client, base, 10)
            while (await client.get(f"{only_dead}/-/stats")).json()["healthy"]["dead"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            # Ray's view lags: with every replica down it still names one.
            assert await picks(client, only_dead, 2) == ["dead", "dead"]


async def test_health_probes_reuse_one_connection_per_replica(engines: dict[str, Child]) -> None:
    engine = engines["r1"]
    engine_url = f"http://{HOST}:{engine.port}"
    async with httpx.AsyncClient() as client:
        with router(*replica_args({"r1": engine}), "--health-interval-s", "0.05"):
            await client.post(f"{engine_url}/mock/reset")
            await asyncio.sleep(0.5)  # about ten probes
            stats = (await client.get(f"{engine_url}/mock/stats")).json()
    assert stats["connections"] <= 2  # ours, plus at most the probe's reconnect after the reset


# -- faults -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty(engines: dict[str, Child]) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        yield {fault: stack.enter_context(router(*replica_args(engines), "--fault", fault, "--health-interval-s", "0"))
               for fault in FAULTS}


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


@pytest.mark.parametrize("fault", FAULTS)
async def test_fault_modes(fault: str, faulty: dict[str, str]) -> None:
    base = faulty[fault]
    async with httpx.AsyncClient(timeout=0.5 if fault == "slow" else 5) as client:
        if fault == "slow":
            with pytest.raises(httpx.ReadTimeout):
                await route(client, base)
            return
        await client.post(f"{base}/-/reset")
        response = await route(client, base)
        body = _json_or_none(response)
        if fault in ("garbage", "truncated_json"):
            assert response.status_code == 200 and body is None
        elif fault == "huge_body":
            assert response.status_code == 200 and len(response.content) >= 2 * 1024 * 1024
            assert body["replica_id"] in ("r1", "r2")
        elif fault == "wrong_types":
            assert response.status_code == 200 and isinstance(body["port"], str) and body["port"].isdigit()
        elif fault == "outside_target":
            assert body == {"host": "127.0.0.2", "port": 9, "replica_id": "evil"}
        elif fault in ("status-400", "status-503"):
            assert response.status_code == int(fault[-3:]) and "detail" in body
        elif fault == "unknown_replica":
            assert response.status_code == 200 and body["replica_id"] not in ("r1", "r2")
            assert isinstance(body["port"], int)
        elif fault == "close_early":
            assert response.status_code == 200 and body["replica_id"] in ("r1", "r2")
            assert "connection" not in response.headers
            before = (await client.get(f"{base}/-/stats")).json()["connections"]
            await route(client, base)  # on the connection the stats call reused: closed after it
            await route(client, base)
            after = (await client.get(f"{base}/-/stats")).json()["connections"]
            assert after - before == 2  # each route answer closed the connection it came on
