"""Traces: a request followed from the client through the gateway into the replica, in OTLP spans.

A collector speaking OTLP/HTTP runs in this process on 127.0.0.1 (tests/otlp_receiver.py) and
decodes what the gateway's exporter posts. Needs the `otel` extra; those tests skip cleanly without it.
"""

from __future__ import annotations

import importlib.util
import random
import signal

import httpx
import openai
import pytest

from gateway.config import ConfigError, resolve
from gateway.stacks.procs import free_port
from tests.conftest import CHAT, wait_until
from tests.test_cli import run_gateway


def _have_otel() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in (
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            "opentelemetry.proto.collector.trace.v1.trace_service_pb2"))
    except ModuleNotFoundError:
        return False


needs_otel = pytest.mark.skipif(not _have_otel(), reason="needs the otel extra: pip install '.[otel]'")


@pytest.fixture
def receiver():
    from tests.otlp_receiver import Receiver

    r = Receiver().start()
    yield r
    r.stop()


def test_tracing_options() -> None:
    base = {"GATEWAY_REPLICAS": "http://127.0.0.1:1"}
    assert resolve(None, base).otlp_traces_url == ""  # off by default
    config = resolve(None, {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318"})
    assert config.otlp_traces_url == "http://collector:4318/v1/traces" and config.trace_sample_ratio == 0.01
    config = resolve(None, {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://a:4318",
                            "GATEWAY_OTLP_ENDPOINT": "https://b/otlp/v1/traces"})
    assert config.otlp_traces_url == "https://b/otlp/v1/traces"  # the gateway's own name wins, a path is kept
    with pytest.raises(ConfigError):
        resolve(None, {**base, "GATEWAY_TRACE_SAMPLE_RATIO": "2"})
    for argv, expected in ((["--otlp-endpoint", "grpc://127.0.0.1:4317"], "OTLP/HTTP"),
                           (["--trace-sample-ratio", "1.5"], "between 0 and 1")):
        result = run_gateway("serve", "--replica", "http://127.0.0.1:1", *argv)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def by_name(spans: list) -> dict:
    return {span.name: span for span in spans}


def wait_for_trace(receiver, trace_id: str, names: set[str]) -> dict:
    return wait_until(lambda: names <= set(by_name(receiver.trace(trace_id))) and by_name(receiver.trace(trace_id)),
                      deadline_s=20, what=f"spans {names} of trace {trace_id}")


@needs_otel
def test_client_traceparent_is_continued_and_the_replica_nests_under_the_gateway(stack, receiver) -> None:
    replicas = [stack.replica("r1"), stack.replica("r2")]
    router = stack.router(replicas)
    # Ratio 0: only the client's sampled context makes this request traced.
    gateway = stack.gateway([router], replicas, "--otlp-endpoint", receiver.url, "--trace-sample-ratio", "0")
    header, trace_id, client_span = traceparent()
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(**CHAT, stream=True, extra_headers={
        "traceparent": header, "tracestate": "vendor=abc"})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text

    spans = wait_for_trace(receiver, trace_id, {"POST /v1/chat/completions", "router", "replica first byte",
                                                "replica stream"})
    root = spans["POST /v1/chat/completions"]
    assert root.parent_span_id == client_span and root.kind == "server" and root.service == "gateway"
    for name in ("router", "replica first byte", "replica stream"):
        assert spans[name].parent_span_id == root.span_id, name
    # The phases follow each other inside the request's span.
    assert root.start_ns == spans["router"].start_ns <= spans["router"].end_ns == spans["replica first byte"].start_ns
    assert spans["replica first byte"].end_ns == spans["replica stream"].start_ns
    assert spans["replica stream"].end_ns == root.end_ns
    served_by = root.attributes["gateway.replica_id"]
    assert served_by in ("r1", "r2") and spans["replica stream"].attributes["gateway.replica_id"] == served_by
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["gateway.router"] == "router" and root.attributes["gateway.reason"] == ""
    assert root.attributes["gateway.retries"] == 0 and root.attributes["gateway.response_bytes"] > len(text)

    # The replica got the gateway's span as its parent, and the client's tracestate as it was.
    replica = next(r for r in replicas if r.replica_id == served_by)
    seen = replica.stats()["last_request"]["headers"]
    assert seen["traceparent"] == f"00-{trace_id}-{root.span_id}-01"
    assert seen["tracestate"] == "vendor=abc"


@needs_otel
def test_sampled_roots_failures_and_unsampled_parents(stack, receiver) -> None:
    replicas = [stack.replica("r1"), stack.replica("r2")]
    router = stack.router(replicas)
    # The standard OpenTelemetry variable works too; ratio 1: every request without a context is traced.
    gateway = stack.gateway([router], replicas, "--trace-sample-ratio", "1",
                            env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.url}/v1/traces"})

    # An unsampled client context is respected: nothing recorded, the replica gets the client's header untouched.
    unsampled, unsampled_trace, _ = traceparent(sampled=False)
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"traceparent": unsampled},
                        timeout=10)
    assert answer.status_code == 200
    replica = next(r for r in replicas if r.replica_id == answer.headers["x-replica-id"])
    seen = replica.stats()["last_request"]["headers"]
    assert seen["traceparent"] == unsampled

    # A request with no context starts a trace of its own; the replica sees the gateway's span as parent.
    answer = httpx.get(f"{gateway.url}/v1/models", timeout=10)
    assert answer.status_code == 200
    replica = next(r for r in replicas if r.replica_id == answer.headers["x-replica-id"])
    seen = replica.stats()["last_request"]["headers"]
    _, trace_id, parent_span, flags = seen["traceparent"].split("-")
    assert flags == "01"
    spans = wait_for_trace(receiver, trace_id, {"GET /v1/models", "replica first byte", "replica stream"})
    root = spans["GET /v1/models"]
    assert root.span_id == parent_span and root.parent_span_id == ""
    assert "router" not in spans and root.attributes["gateway.router"] == "least_loaded"  # GETs skip the router

    # A malformed client context starts a new trace (W3C): the replica gets a valid one instead.
    answer = httpx.get(f"{gateway.url}/v1/models", headers={"traceparent": "00-not-a-trace-01"}, timeout=10)
    replica = next(r for r in replicas if r.replica_id == answer.headers["x-replica-id"])
    version, new_trace, _, flags = replica.stats()["last_request"]["headers"]["traceparent"].split("-")
    assert (version, flags) == ("00", "01") and len(new_trace) == 32
    wait_for_trace(receiver, new_trace, {"GET /v1/models"})

    # A failure carries its reason, retries and an error status.
    failed = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10,
                        headers={"x-mock-fault": "die-before-head"})
    assert failed.status_code == 503 and failed.headers["x-serve-reason"] == "replica_unavailable"
    failed_root = wait_until(lambda: [s for s in receiver.spans if s.name == "POST /v1/chat/completions"
                                      and s.attributes.get("gateway.reason") == "replica_unavailable"],
                             deadline_s=20, what="the failed request's span")[0]
    assert failed_root.attributes["http.response.status_code"] == 503
    assert failed_root.attributes["gateway.retries"] == 1
    assert failed_root.status_code == 2 and failed_root.status_message == "replica_unavailable"

    # Spans leave in order, so once the later ones arrived the unsampled request would have too: it did not.
    assert receiver.trace(unsampled_trace) == []


@needs_otel
def test_an_unreachable_collector_costs_no_request(stack) -> None:
    replicas = [stack.replica("r1")]
    router = stack.router(replicas)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # Export every 50 ms instead of 5 s, so the exporter fails (and retries) while requests flow.
    gateway = stack.gateway([router], replicas, "--otlp-endpoint", dead, "--trace-sample-ratio", "1",
                            env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)

    def some_requests() -> None:
        for i in range(20):
            if i % 2:
                stream = client.chat.completions.create(**CHAT, stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                assert client.chat.completions.create(**CHAT).choices[0].message.content

    some_requests()
    wait_until(lambda: "exporting spans" in gateway.log(), deadline_s=20, what="a failed export")
    some_requests()
    # Shutdown does not hang on the spans it cannot send: a clean drain, in time.
    gateway.child.signal(signal.SIGTERM)
    assert gateway.child.proc.wait(timeout=15) == 0


@needs_otel
def test_no_endpoint_exports_nothing_and_forwards_the_client_context(stack, receiver) -> None:
    replicas = [stack.replica("r1")]
    router = stack.router(replicas)
    # Only the traces endpoint (flag or its two env names) turns tracing on; the generic OTLP one does not.
    gateway = stack.gateway([router], replicas, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    header, _, _ = traceparent()
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers={"traceparent": header}, timeout=10)
    assert answer.status_code == 200
    seen = replicas[0].stats()["last_request"]["headers"]
    assert seen["traceparent"] == header  # tracing off: the client's context goes on as it came
    # A gateway that had an exporter would flush it on a clean shutdown: nothing arrives.
    gateway.child.signal(signal.SIGTERM)
    assert gateway.child.proc.wait(timeout=15) == 0
    assert receiver.posts == 0
