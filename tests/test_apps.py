"""Apps by route prefix, and node-local routers first (the Ray cluster features that need no Ray)."""

from __future__ import annotations

import httpx

from gateway.controlplane.apps import App, AppTable
from gateway.controlplane.targets import TargetSet
from gateway.stacks.procs import Child, free_port, python_module
from tests.conftest import CHAT, LOG_DIR, Router, mock_reply, wait_until


def test_paths_match_the_longest_prefix_first_and_root_last() -> None:
    table = AppTable([App("root", "/", TargetSet()), App("a", "/a", TargetSet()), App("ab", "/a/b/", TargetSet())])
    assert [app.name for app in table] == ["ab", "a", "root"]
    assert table.single is None
    found = {url: table.match(url).name for url in (b"/a/b", b"/a/b/v1/models?x=1", b"/a/v1/models", b"/a",
                                                   b"/ab/v1", b"/abc", b"/", b"/v1/chat/completions")}
    # `path_beg <prefix>/` or an exact match, as Ray's HAProxy: /ab and /abc are not under /a.
    assert found == {b"/a/b": "ab", b"/a/b/v1/models?x=1": "ab", b"/a/v1/models": "a", b"/a": "a",
                     b"/ab/v1": "root", b"/abc": "root", b"/": "root", b"/v1/chat/completions": "root"}
    without_root = AppTable([App("a", "/a", TargetSet())])
    assert without_root.match(b"/b/v1/models") is None  # 404, like HAProxy with no `/` app
    assert AppTable([App("only", "/", TargetSet())]).single is not None


def router_on(stack, host: str, replicas) -> Router:
    port = free_port(host)
    argv = python_module("replicas.router", "--host", host, "--port", str(port))
    for replica in replicas:
        argv += ["--replica", f"{replica.replica_id}={replica.url}"]
    child = Child(argv, port=port, host=host, log_path=f"{LOG_DIR}/{stack.name}-router-{host}-{port}.log")
    stack.children.append(child)
    child.start()
    return Router(port, child)


def router_calls(metrics: str) -> dict[str, float]:
    calls = {}
    for line in metrics.splitlines():
        if line.startswith("gateway_router_calls_total{"):
            labels, value = line.rsplit(" ", 1)
            router = labels.split('router="', 1)[1].split('"', 1)[0]
            local = 'local="true"' in labels
            calls[f"{router} {'local' if local else 'remote'}"] = float(value)
    return calls


def test_node_local_router_first_then_the_others(stack) -> None:
    replicas = [stack.replica("r1"), stack.replica("r2")]
    # Two "nodes" on loopback: this gateway's node is 127.0.0.2.
    local = router_on(stack, "127.0.0.2", replicas)
    remote = router_on(stack, "127.0.0.1", replicas)
    gateway = stack.gateway([], replicas, "--node-ip", "127.0.0.2", "--router", f"http://127.0.0.2:{local.port}",
                            "--router", f"http://127.0.0.1:{remote.port}")
    local_address, remote_address = f"127.0.0.2:{local.port}", f"127.0.0.1:{remote.port}"
    routes = gateway.routes()
    assert routes["local_routers"] == [local_address]
    assert {r["address"]: r["local"] for r in routes["apps"][0]["routers"]} == {local_address: True,
                                                                             remote_address: False}
    with httpx.Client(timeout=10) as client:
        for _ in range(10):
            assert client.post(gateway.url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert router_calls(gateway.metrics()) == {f"{local_address} local": 10.0}
    # The local router dies: every request still succeeds, decided by the other node's router.
    local.child.kill()
    with httpx.Client(timeout=10) as client:
        for _ in range(10):
            response = client.post(gateway.url + "/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
    calls = router_calls(gateway.metrics())
    assert calls[f"{remote_address} remote"] == 10.0
    by_address = {r["address"]: r["calls"] for r in gateway.routes()["apps"][0]["routers"]}
    assert by_address[remote_address] == 10


def test_without_node_ip_static_routers_are_all_equal(basic) -> None:
    routes = basic.gateway.routes()
    assert routes["local_routers"] == []
    assert routes["routes"] == {"/": ""}
    assert wait_until(lambda: basic.gateway.get_json("/-/ready")["apps"] == 1)


def test_route_by_model_lists_models_and_rejects_unknown_ones(stack) -> None:
    from openai import NotFoundError, OpenAI

    replicas = [stack.replica("r1", "--model", "tiny"), stack.replica("r2", "--model", "tiny")]
    router = stack.router(replicas)
    gateway = stack.gateway([router], replicas, "--route-by-model")
    client = OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=10)
    # Learned from the replicas' own /v1/models (never through the router).
    wait_until(lambda: [m.id for m in client.models.list().data] == ["tiny"], what="the model list")
    assert router.stats()["requests"] == 0
    completion = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=3)
    assert completion.choices[0].message.content == mock_reply(3)
    try:
        client.chat.completions.create(model="nope", messages=CHAT["messages"], max_tokens=3)
        raise AssertionError("an unknown model was served")
    except NotFoundError as exc:
        assert exc.status_code == 404 and exc.code == "model_not_found"
        assert exc.response.headers["x-serve-reason"] == "model_not_found"
    # A body that names no model is routed by path as usual; the gateway keeps serving.
    response = httpx.post(gateway.url + "/v1/chat/completions", content=b"not json",
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.headers.get("x-serve-reason") != "model_not_found"
    assert client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=2).choices
