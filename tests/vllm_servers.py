"""Real vLLM CPU servers shared by the vLLM test modules: each model's servers start once per session.

A vLLM server takes 30-60 s to start on the 2-core CI machine, which used to be paid once per module. Now a
module says what it needs with `pytest.mark.vllm_servers(MODEL, COUNT)` and takes the servers from the
`vllm_servers` fixture (tests/conftest.py); the pool behind it:

  * starts a model's servers on the first module that asks (as many as the largest user in the session needs,
    so a later, larger user does not start more), Workers alternating on CPU 0 and CPU 1 as start_vllm_pair does;
  * before handing them to the next module, replaces any server a test killed or stopped (test_vllm_resume
    SIGKILLs the serving one) and waits until no request is running or waiting in any of them, so a module
    never sees another's requests in vLLM's gauges; what the modules read from vLLM's counters
    (vllm:generation_tokens_total, vllm:prompt_tokens_total, vllm:request_success_total) is always the growth
    over their own requests, and what they look for in vLLM's logs is their own request ids;
  * stops a model's servers after the last test that needs them (conftest.py groups the modules by model, so
    only one model's servers run at a time, as before: at most 3), and everything at the end of the session.

The tiny model's servers are started with what every user of them needs, each harmless to the others:
  * VLLM_ENABLE_RESPONSES_API_STORE=1 (test_vllm_responses): it only makes /v1/responses keep what it made
    (vllm/entrypoints/openai/responses/serving.py, vLLM 0.32; no other endpoint reads it);
  * `--otlp-traces-endpoint` to one OTLP/HTTP receiver for the session (test_tracing_vllm): vLLM then exports
    one `llm_request` span when a request finishes (OutputProcessor.do_tracing in
    vllm/v1/engine/output_processor.py, vLLM 0.32) and changes nothing in what it answers; the tracing test
    looks up only its own random trace id in the receiver.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.stacks.procs import free_port

MARKER = "vllm_servers"
REPLICA_IDS = ("vllm-a", "vllm-b", "vllm-c", "vllm-d")


def need(node: Any) -> tuple[str, int] | None:
    """(model, count) from the node's `vllm_servers` marker, or None."""
    marker = node.get_closest_marker(MARKER)
    if marker is None:
        return None
    model, count = marker.args
    return model, count


@dataclass
class VllmPool:
    bench_vllm: Any  # scripts/bench_vllm.py, loaded by tests/conftest.py
    log_dir: str
    sizes: dict[str, int]  # model -> servers the largest user in this session takes
    servers: dict[str, list] = field(default_factory=dict)  # model -> [bench_vllm.VllmServer]
    receiver: Any = None  # tests/otlp_receiver.Receiver, for the tiny model's spans
    started: int = 0  # vLLM servers started in this session, for the report

    def model_dir(self, model: str):
        return {"tiny": self.bench_vllm.MODEL_DIR, "varied": self.bench_vllm.VARIED_MODEL_DIR}[model]

    def _options(self, model: str) -> tuple[list[str], dict[str, str]]:
        if model != "tiny":
            return [], {}
        env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
        try:
            from tests.otlp_receiver import Receiver
        except ImportError:  # no otel extra: test_tracing_vllm skips itself, the servers export nothing
            return [], env
        if self.receiver is None:
            self.receiver = Receiver().start()
        # vLLM exports over gRPC unless told otherwise; the receiver speaks OTLP/HTTP.
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
        return ["--otlp-traces-endpoint", f"{self.receiver.url}/v1/traces"], env

    def take(self, model: str, count: int) -> list:
        """`count` live, idle servers of the model (the same ones each time unless one died)."""
        servers = self.servers.setdefault(model, [])
        size = max(count, self.sizes.get(model, 0), len(servers))
        extra_args, env = self._options(model)
        fresh = []
        for index in range(size):
            if index < len(servers) and servers[index].proc is not None and servers[index].proc.poll() is None:
                continue
            if index < len(servers):
                servers[index].stop()  # reap it, end what it left behind, close its log
            port = free_port()
            server = self.bench_vllm.VllmServer(
                REPLICA_IDS[index], port, cpu=index % 2, model_dir=self.model_dir(model), extra_args=extra_args,
                env=env, log_path=os.path.join(self.log_dir, f"vllm-{model}-{REPLICA_IDS[index]}-{port}.log"))
            if index < len(servers):
                servers[index] = server
            else:
                servers.append(server)
            fresh.append(server.start())
        try:
            started = time.monotonic()
            for server in fresh:
                server.wait_ready(self.bench_vllm.STARTUP_DEADLINE_S)
            self.started += len(fresh)
            if fresh:
                print(f"\nvLLM {model}: started {', '.join(s.replica_id for s in fresh)} in "
                      f"{time.monotonic() - started:.0f}s (shared by the modules that need it)")
        except BaseException:
            self.release(model)
            raise
        for server in servers[:count]:
            self._wait_idle(server)
        return list(servers[:count])

    def _wait_idle(self, server: Any, deadline_s: float = 60.0) -> None:
        """No request running or waiting: what the previous module sent has finished or been aborted."""
        busy = ("vllm:num_requests_running", "vllm:num_requests_waiting")
        deadline = time.monotonic() + deadline_s
        while True:
            text = server.metrics()
            load = sum(self.bench_vllm.metric(text, name) for name in busy)
            if load == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM {server.replica_id} still has {load:.0f} requests after {deadline_s}s")
            time.sleep(0.1)

    def release(self, model: str) -> None:
        for server in self.servers.pop(model, []):
            server.stop()

    def close(self) -> None:
        for model in list(self.servers):
            self.release(model)
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None
