"""Admission's queue and policy, in process: ordering, fairness, bounds and deadlines, with a made-up clock.

Pure logic (gateway/dataplane/admission.py): no sockets, no sleeps. The end-to-end behaviour through real
processes is in tests/test_admission.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.controlplane.apps import App
from gateway.controlplane.targets import TargetSet
from gateway.config import ReplicaSpec
from gateway.dataplane.admission import DROPPED, Admission, FairQueue, Ticket, estimated_tokens, priority_of
from gateway.dataplane.reasons import Reason
from gateway.dataplane.request import Request


def ticket(name: str, band: int = 0, flow: str = "", cost: float = 1.0, at: float = 0.0) -> Ticket:
    return Ticket(name, band, flow, cost, at, at + 10.0)


def drain(queue: FairQueue) -> list[str]:
    out = []
    while (t := queue.pop()) is not None:
        out.append(t.item)
    return out


def test_bands_are_strict_and_fifo_inside_one_flow():
    q = FairQueue(100)
    for name, band in [("low1", 0), ("high1", 5), ("low2", 0), ("mid", 2), ("high2", 5)]:
        assert q.push(ticket(name, band)) == []
    assert drain(q) == ["high1", "high2", "mid", "low1", "low2"]
    assert len(q) == 0


def test_a_flooding_key_cannot_starve_another_in_its_band():
    q = FairQueue(1000)
    for i in range(100):
        q.push(ticket(f"A{i}", flow="A"))
    # B arrives after A queued 100: it goes next, not after A's hundred.
    q.push(ticket("B0", flow="B"))
    q.push(ticket("B1", flow="B"))
    order = drain(q)
    assert order.index("B0") <= 1 and order.index("B1") <= 3
    assert [x for x in order if x.startswith("A")] == [f"A{i}" for i in range(100)]


def test_two_backlogged_keys_share_by_weight_and_by_tokens():
    q = FairQueue(1000)
    for i in range(60):
        q.push(ticket(f"A{i}", flow="A"), weight=1.0)
        q.push(ticket(f"B{i}", flow="B"), weight=2.0)
    first = drain(q)[:30]
    # B's weight is twice A's: about two of B's for each of A's while both wait.
    assert sum(x.startswith("B") for x in first) == 20
    q = FairQueue(1000)
    for i in range(40):
        q.push(ticket(f"big{i}", flow="big", cost=400))
        q.push(ticket(f"small{i}", flow="small", cost=100))
    first = drain(q)[:25]
    # Fair in estimated tokens, not in requests: four small requests per big one.
    assert sum(x.startswith("small") for x in first) == 20


def test_an_idle_key_banks_no_credit():
    q = FairQueue(1000)
    for i in range(50):
        q.push(ticket(f"A{i}", flow="A"))
    assert drain(q) == [f"A{i}" for i in range(50)]  # A alone: virtual time moves on with it
    for i in range(50, 60):
        q.push(ticket(f"A{i}", flow="A"))
    for i in range(3):
        q.push(ticket(f"B{i}", flow="B"))
    # B was idle while A was served alone: it starts at the present virtual time and interleaves with A,
    # it does not jump A fifty times on credit from the past.
    assert drain(q)[:7] == ["B0", "A50", "B1", "A51", "B2", "A52", "A53"]


def test_full_queue_drops_the_flooders_newest_never_the_other_key():
    q = FairQueue(5)
    for i in range(5):
        assert q.push(ticket(f"A{i}", flow="A")) == []
    dropped = q.push(ticket("B0", flow="B"))
    assert [t.item for t in dropped] == ["A4"] and dropped[0].state == DROPPED
    # A's own newcomer is the one furthest behind: it is refused, the queue is unchanged.
    newcomer = ticket("A5", flow="A")
    assert q.push(newcomer) == [newcomer] and newcomer.state == DROPPED
    assert drain(q) == ["A0", "B0", "A1", "A2", "A3"]


def test_full_queue_drops_the_lowest_band_first_and_refuses_a_low_newcomer():
    q = FairQueue(3)
    q.push(ticket("high0", band=1, flow="H"))
    q.push(ticket("low0", band=0, flow="L"))
    q.push(ticket("low1", band=0, flow="L"))
    assert [t.item for t in q.push(ticket("high1", band=1, flow="H"))] == ["low1"]
    low = ticket("low2", band=0, flow="X")
    assert q.push(low) == [low]
    assert drain(q) == ["high0", "high1", "low0"]


def test_remove_takes_a_ticket_out_wherever_it_is():
    q = FairQueue(10)
    tickets = [ticket(f"A{i}", flow="A") for i in range(3)] + [ticket("B0", flow="B")]
    for t in tickets:
        q.push(t)
    assert q.remove(tickets[0]) and q.remove(tickets[3]) and not q.remove(tickets[3])
    assert len(q) == 2 and drain(q) == ["A1", "A2"]


def test_estimated_tokens_reads_max_tokens_and_the_prompt_size():
    assert estimated_tokens(b'{"max_tokens": 10, "prompt": "' + b"x" * 400 + b'"}') > 100
    assert estimated_tokens(b'{"max_tokens": 10}') < estimated_tokens(b'{"max_tokens": 1000}')
    assert estimated_tokens(b"not json") > 0


# -- the glue: apps, targets and clients -------------------------------------------------------------------

@dataclass
class Key:
    name: str
    priority: int = 0
    weight: float = 1.0
    may_set_priority: bool = False


@dataclass
class FakeClient:
    """Records what admission answers (the real client writes it to a socket)."""
    answers: list[tuple[Reason, int | None, int | None]] = field(default_factory=list)

    def respond_error(self, reason, message=None, *, status=None, retry_after_s=None, close=False):
        self.answers.append((reason, status, retry_after_s))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(target_in_flight: int = 2, replicas: int = 2, queue_size: int = 100, timeout_s: float = 5.0, burst: int = 0):
    app = App("llm", "/", TargetSet([ReplicaSpec(f"r{i}", "127.0.0.1", 9000 + i) for i in range(replicas)]))
    routed: list[Request] = []
    clock = Clock()

    def go(client, request, app_):
        # What the relay does: put it on the least loaded replica (exchange started).
        target = app_.targets.least_loaded()
        target.in_flight += 1
        request.replica_id = target.replica_id
        routed.append(request)

    adm = Admission(target_in_flight=target_in_flight, queue_size=queue_size, queue_timeout_s=timeout_s, go=go,
                    burst_in_flight=burst, clock=clock)
    return adm, app, routed, clock


def req(name: str, key: Key | None = None, headers=(), body: bytes = b'{"max_tokens": 16}') -> Request:
    r = Request(b"POST", b"/v1/completions", "1.1", list(headers), body, True, name.encode(), None, None, True)
    r.key = key
    return r


def send(adm: Admission, app: App, r: Request, client: FakeClient | None = None) -> bool:
    ok = adm.admit(client or FakeClient(), r, app)
    if ok:
        adm.go(None, r, app)
    return ok


def end(adm: Admission, app: App, r: Request) -> None:
    app.targets.get(r.replica_id).in_flight -= 1
    adm.finished(r)


def test_requests_go_at_once_until_every_replica_is_at_its_target_then_wait():
    adm, app, routed, _ = make(target_in_flight=2, replicas=2)
    a = Key("A")
    first = [req(f"a{i}", a) for i in range(4)]
    assert all(send(adm, app, r) for r in first)
    later = req("a4", a)
    assert not send(adm, app, later) and adm.depth(app) == 1
    end(adm, app, first[0])
    # A place freed: the waiting request is routed now (the router is called as it leaves the queue).
    assert routed[-1] is later and adm.depth(app) == 0 and later.queued_s == 0.0


def test_admitted_requests_not_yet_on_a_replica_hold_their_place():
    adm, app, _, _ = make(target_in_flight=1, replicas=2)
    # Two admitted, their router calls still out (no exchange started): a third must wait.
    assert adm.admit(FakeClient(), req("x"), app) and adm.admit(FakeClient(), req("y"), app)
    assert not adm.admit(FakeClient(), req("z"), app)


def test_engine_saturation_holds_a_replica_at_its_count_then_one_completion_lets_one_go():
    adm, app, routed, _ = make(target_in_flight=0, replicas=1)
    target = app.targets.targets[0]
    running = [req(f"r{i}") for i in range(3)]
    assert all(send(adm, app, r) for r in running)
    target.saturated_at = target.in_flight  # the health loop's scrape: vLLM has requests waiting
    waiting = [req(f"w{i}") for i in range(2)]
    assert not any(send(adm, app, r) for r in waiting)
    end(adm, app, running[0])
    assert routed[-1] is waiting[0] and adm.depth(app) == 1
    target.saturated_at = None  # the next scrape: the engine queue is empty again
    adm.wake_all()
    assert routed[-1] is waiting[1] and adm.depth(app) == 0


def test_high_band_overtakes_the_low_band_and_b_overtakes_a_flood():
    adm, app, routed, _ = make(target_in_flight=1, replicas=1)
    low, high = Key("batch", priority=0), Key("chat", priority=10)
    busy = req("busy", low)
    assert send(adm, app, busy)
    flood = [req(f"low{i}", low) for i in range(5)]
    for r in flood:
        send(adm, app, r)
    urgent = req("urgent", high)
    send(adm, app, urgent)
    end(adm, app, busy)
    assert routed[-1] is urgent


def test_x_priority_only_for_keys_that_may_set_it():
    header = [(b"X-Priority", b"7")]
    assert priority_of(req("a", Key("a", priority=1), header)) == 1
    assert priority_of(req("b", Key("b", priority=1, may_set_priority=True), header)) == 7
    assert priority_of(req("c", None, header)) == 0


def test_timeout_answers_429_queue_timeout_with_retry_after():
    adm, app, _, clock = make(target_in_flight=1, replicas=1, timeout_s=2.0)
    assert send(adm, app, req("busy"))
    client = FakeClient()
    waiting = req("w")
    assert not send(adm, app, waiting, client)
    clock.now += 1.9
    adm.expire(clock.now)
    assert client.answers == [] and adm.depth(app) == 1
    clock.now += 0.2
    adm.expire(clock.now)
    assert client.answers == [(Reason.QUEUE_TIMEOUT, 429, 2)] and adm.depth(app) == 0
    assert waiting.admission is None and abs(waiting.queued_s - 2.1) < 1e-9


def test_full_queue_answers_the_flooder_429_queue_full():
    adm, app, _, _ = make(target_in_flight=1, replicas=1, queue_size=2)
    assert send(adm, app, req("busy", Key("A")))
    clients = [FakeClient() for _ in range(3)]
    for i, client in enumerate(clients):
        send(adm, app, req(f"a{i}", Key("A")), client)
    assert [c.answers for c in clients] == [[], [], [(Reason.QUEUE_FULL, 429, 5)]]
    b = FakeClient()
    send(adm, app, req("b", Key("B")), b)
    assert b.answers == [] and clients[1].answers == [(Reason.QUEUE_FULL, 429, 5)]


def test_a_client_that_leaves_while_waiting_leaves_the_queue_at_once():
    adm, app, routed, _ = make(target_in_flight=1, replicas=1)
    busy = req("busy")
    assert send(adm, app, busy)
    gone, stays = req("gone"), req("stays")
    send(adm, app, gone)
    send(adm, app, stays)
    assert adm.depth(app) == 2
    adm.finished(gone)  # what the server calls when the connection is lost
    assert adm.depth(app) == 1 and gone.admission is None
    end(adm, app, busy)
    assert routed[-1] is stays


def test_a_request_that_fails_at_once_on_release_frees_its_place_without_recursion():
    app = App("llm", "/", TargetSet([ReplicaSpec("r0", "127.0.0.1", 9000)]))
    adm: Admission

    def go(client, request, app_):
        adm.finished(request)  # no replica could take it: answered at once, its place freed

    adm = Admission(target_in_flight=1, queue_size=5000, queue_timeout_s=5, go=go)
    app.targets.targets[0].in_flight = 1
    waiting = [req(f"w{i}") for i in range(3000)]
    for r in waiting:
        adm.admit(FakeClient(), r, app)
    app.targets.targets[0].in_flight = 0
    adm.wake(app)
    assert adm.depth(app) == 0 and all(r.admission is None for r in waiting)


def test_headroom_lets_a_key_below_its_share_go_at_once_never_the_flooding_key():
    adm, app, routed, _ = make(target_in_flight=4, replicas=1, burst=2)
    a, b = Key("A"), Key("B")
    flood = [req(f"a{i}", a) for i in range(10)]
    admitted = [send(adm, app, r) for r in flood]
    assert admitted == [True] * 4 + [False] * 6  # A alone: its share is the whole target, then it waits
    quiet = [req("b0", b), req("b1", b)]
    # B holds nothing of its share (half the target): it goes at once, past the target, ahead of A's queue.
    assert send(adm, app, quiet[0]) and send(adm, app, quiet[1])
    assert adm.depth(app) == 6 and app.targets.targets[0].in_flight == 6
    # The headroom is used up: B waits now, like anyone.
    assert not send(adm, app, req("b2", b))
    # Completions refill up to the target only: A's finishing request lets nothing go while past it.
    end(adm, app, flood[0])
    assert app.targets.targets[0].in_flight == 5 and adm.depth(app) == 7
    end(adm, app, quiet[0])
    end(adm, app, quiet[1])
    # Back under the target: the queue goes on; B's waiting request ties A's head (both start at the present
    # virtual time), and goes before the rest of A's backlog.
    assert routed[-1].request_id == b"a4" and app.targets.targets[0].in_flight == 4
    end(adm, app, flood[1])
    assert routed[-1].request_id == b"b2"


def test_a_higher_key_weight_is_a_larger_share():
    adm, app, _, _ = make(target_in_flight=6, replicas=1, burst=6)
    heavy, light = Key("heavy", weight=2.0), Key("light")
    assert all(send(adm, app, req(f"l{i}", light)) for i in range(6))
    # heavy's share is 2/3 of 6 = 4: four go through the headroom, the fifth waits.
    assert [send(adm, app, req(f"h{i}", heavy)) for i in range(5)] == [True] * 4 + [False]


def test_vllm_metrics_are_read_and_a_queueing_engine_holds_its_replica():
    from gateway.controlplane.health import EngineScraper, parse_engine_metrics
    from gateway.controlplane.targets import Target

    page = (b'# HELP vllm:num_requests_running Number of requests in model execution batches.\n'
            b'vllm:num_requests_running{engine="0",model_name="m"} 7.0\n'
            b'vllm:num_requests_running{engine="1",model_name="m"} 5.0\n'
            b'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
            b'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42\n'
            b'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.61\n'
            b'vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0\n')
    assert parse_engine_metrics(page) == (12.0, 3.0, 0.61)
    assert parse_engine_metrics(b"process_cpu_seconds_total 3.0\n") is None
    scraper = EngineScraper(lambda: [], 1.0, 1.0, 0.9, lambda: None)
    target = Target("r0", "127.0.0.1", 9000, in_flight=15)
    scraper.update(target, 12, 3, 0.5)
    # The engine queues 3 of the gateway's 15: the replica is held at 12 until a scrape finds no queue.
    assert target.saturated_at == 12
    scraper.update(target, 12, 0, 0.95)
    assert target.saturated_at == 15  # KV cache past the limit: no more than now
    scraper.update(target, 10, 0, 0.5)
    assert target.saturated_at is None
