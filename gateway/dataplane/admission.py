"""Admission under overload: a queue in the gateway per app, in priority bands, fair between keys.

Why here and not in the engines: vLLM queues what it cannot run in its own FIFO, where one
key's flood delays every other key's first token. The gateway knows the tenant (its API key),
so it holds requests back itself once every replica of an app is saturated, and lets them go
in an order of its choosing (the approach of Gateway API Inference Extension's flow control).

* Saturation (`room`): a replica has room while its requests in flight are below a target
  (--saturation-in-flight), and, for vLLM replicas whose /metrics the health loop reads
  (gateway/controlplane/health.py, never on the request path), while the engine reported no
  waiting requests and a KV cache below --saturation-kv at the last scrape. A replica the engine
  reported saturated keeps the in-flight count it had then, less what the engine queues, as its limit
  until the next scrape, so a completion still lets one request go. Requests admitted but not yet on a
  replica (routing, connecting) count against the room too.
* Headroom (--saturation-burst): a waiting request can only take the place of one that finishes, so
  even at the head of the queue it waits for the next completion. A key below its weighted share of
  the app's target (every key with requests in flight or waiting shares it) may instead go up to that
  many requests per replica past the target at once: a key that is not flooding does not wait at all,
  as long as the engines have that room (vLLM's max_num_seqs and KV cache above the target).
* Order (`FairQueue`): strict priority between bands (a key's `priority`, or its `x-priority`
  header when the key may set it), and inside a band start-time fair queuing (SFQ, Goyal, Vin and
  Cheng, SIGCOMM 1996) across keys: each request gets a virtual start tag max(V, the key's last
  finish tag) and a finish tag start + estimated tokens / key weight; the smallest start tag goes
  first and V moves to it. A key that floods gets tags far ahead; a key that was idle starts at V
  and banks no credit.
* Bounds: a full queue drops the request furthest behind (lowest band, latest start tag: the
  flooding key's newest), which may be the newcomer; a request waiting longer than
  --queue-timeout-s gets 429 `queue_timeout`; both carry Retry-After. A client that disconnects
  while waiting leaves the queue at once (`finished`).
* The router is called when a request leaves the queue (the caller's `go`), so the router still
  makes every placement decision, on the replicas' state at that moment.

`FairQueue` is pure logic with no clock of its own (tests drive it with made-up times);
`Admission` is the glue to apps, targets, clients and metrics.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.dataplane.reasons import Reason

if TYPE_CHECKING:
    from gateway.controlplane.apps import App
    from gateway.dataplane.request import Request

log = logging.getLogger("gateway.admission")

# Ticket states.
WAITING, RELEASED, DROPPED = 0, 1, 2
INF = math.inf
# Estimated tokens of a request whose body names no max_tokens (vLLM's default is up to the context length;
# this only weighs requests against each other).
DEFAULT_MAX_TOKENS = 256


class Ticket:
    """One request in (or through) the queue."""
    __slots__ = ("item", "band", "flow", "cost", "start", "finish", "enqueued", "deadline", "state", "seq",
                 "released_at", "weight")

    def __init__(self, item: Any, band: int, flow: str, cost: float, enqueued: float, deadline: float):
        self.item = item
        self.band = band
        self.flow = flow
        self.cost = cost
        self.start = 0.0
        self.finish = 0.0
        self.enqueued = enqueued
        self.deadline = deadline
        self.state = WAITING
        self.seq = 0
        self.released_at = 0.0
        self.weight = 1.0

    def __repr__(self) -> str:
        return f"Ticket({self.item!r}, band={self.band}, flow={self.flow!r}, start={self.start:g})"


class _Flow:
    __slots__ = ("name", "waiting", "last_finish")

    def __init__(self, name: str):
        self.name = name
        self.waiting: deque[Ticket] = deque()
        self.last_finish = 0.0


class _Band:
    __slots__ = ("priority", "flows", "heads", "vtime", "size")

    def __init__(self, priority: int):
        self.priority = priority
        self.flows: dict[str, _Flow] = {}
        # (start tag, seq, flow, ticket) of each flow's first waiting ticket; stale entries are skipped.
        self.heads: list[tuple[float, int, _Flow, Ticket]] = []
        self.vtime = 0.0
        self.size = 0


class FairQueue:
    """Priority bands; start-time fair queuing across flows (keys) inside a band; bounded; deadlines.

    Deterministic: no clock, no randomness; ties go to the earlier arrival.
    """

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.bands: dict[int, _Band] = {}
        self._order: list[_Band] = []  # highest priority first
        self.size = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self.size

    def _band(self, priority: int) -> _Band:
        band = self.bands.get(priority)
        if band is None:
            band = self.bands[priority] = _Band(priority)
            self._order = sorted(self.bands.values(), key=lambda b: -b.priority)
        return band

    def _tags(self, band: _Band, flow: _Flow | None, cost: float, weight: float) -> tuple[float, float]:
        start = max(band.vtime, flow.last_finish if flow is not None else 0.0)
        return start, start + cost / max(weight, 1e-9)

    def push(self, ticket: Ticket, weight: float = 1.0) -> list[Ticket]:
        """Queue `ticket`. Returns the tickets dropped to make room: [] or one ticket, which may be `ticket`
        itself (then nothing changed). The dropped ticket's state is DROPPED."""
        band = self._band(ticket.band)
        flow = band.flows.get(ticket.flow)
        ticket.start, ticket.finish = self._tags(band, flow, ticket.cost, weight)
        ticket.seq = next(self._seq)
        dropped: list[Ticket] = []
        if self.size >= self.max_size:
            victim = self._furthest_behind()
            if victim is None or (victim.band, -victim.start, -victim.seq) > (ticket.band, -ticket.start, -ticket.seq):
                ticket.state = DROPPED
                return [ticket]
            self.remove(victim)
            victim.state = DROPPED
            dropped.append(victim)
            flow = band.flows.get(ticket.flow)  # the victim's removal may have emptied and rewound this flow
            ticket.start, ticket.finish = self._tags(band, flow, ticket.cost, weight)
        if flow is None:
            flow = band.flows[ticket.flow] = _Flow(ticket.flow)
        flow.last_finish = ticket.finish
        flow.waiting.append(ticket)
        if len(flow.waiting) == 1:
            heapq.heappush(band.heads, (ticket.start, ticket.seq, flow, ticket))
        band.size += 1
        self.size += 1
        ticket.state = WAITING
        return dropped

    def _furthest_behind(self) -> Ticket | None:
        """The lowest band's ticket with the latest start tag (the flow most over its share, its newest)."""
        for band in reversed(self._order):
            if band.size:
                tails = [flow.waiting[-1] for flow in band.flows.values() if flow.waiting]
                return max(tails, key=lambda t: (t.start, t.seq))
        return None

    def pop(self) -> Ticket | None:
        """The next ticket to serve: the highest band's smallest start tag."""
        for band in self._order:
            heads = band.heads
            while heads:
                _, _, flow, ticket = heapq.heappop(heads)
                if ticket.state != WAITING or not flow.waiting or flow.waiting[0] is not ticket:
                    continue  # stale: removed, or no longer the head
                flow.waiting.popleft()
                band.vtime = max(band.vtime, ticket.start)
                if flow.waiting:
                    nxt = flow.waiting[0]
                    heapq.heappush(heads, (nxt.start, nxt.seq, flow, nxt))
                else:
                    self._maybe_forget(band, flow)
                band.size -= 1
                self.size -= 1
                ticket.state = RELEASED
                return ticket
        return None

    def peek_band(self) -> int | None:
        for band in self._order:
            if band.size:
                return band.priority
        return None

    def remove(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out (its client left, it timed out, it was dropped). True if it was waiting."""
        if ticket.state != WAITING:
            return False
        band = self.bands[ticket.band]
        flow = band.flows[ticket.flow]
        was_head = flow.waiting[0] is ticket
        was_tail = flow.waiting[-1] is ticket
        flow.waiting.remove(ticket)
        if was_tail:
            # Its share was never used: the flow's next request starts where this one would have.
            flow.last_finish = flow.waiting[-1].finish if flow.waiting else ticket.start
        if was_head and flow.waiting:
            nxt = flow.waiting[0]
            heapq.heappush(band.heads, (nxt.start, nxt.seq, flow, nxt))
        if not flow.waiting:
            self._maybe_forget(band, flow)
        band.size -= 1
        self.size -= 1
        ticket.state = DROPPED
        return True

    def _maybe_forget(self, band: _Band, flow: _Flow) -> None:
        # An empty flow whose tags V has passed carries nothing forward: forget it (keys come and go).
        if not flow.waiting and flow.last_finish <= band.vtime:
            del band.flows[flow.name]

    def waiting(self) -> Iterable[Ticket]:
        for band in self._order:
            for flow in band.flows.values():
                yield from flow.waiting


def estimated_tokens(body: bytes) -> float:
    """Prompt plus completion tokens, roughly: prompt bytes / 4 and the body's max_tokens. Parsed only for a
    request that waits (never on the unsaturated path)."""
    max_tokens = DEFAULT_MAX_TOKENS
    try:
        document = orjson.loads(body) if body[:64].lstrip()[:1] == b"{" else None
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict):
        value = document.get("max_tokens", document.get("max_completion_tokens"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            max_tokens = value
    return len(body) / 4 + max_tokens


class _AppState:
    """One app's queue and the requests admitted to it but not yet on a replica."""
    __slots__ = ("queue", "held", "flows", "rate", "rate_at")

    def __init__(self, max_size: int):
        self.queue = FairQueue(max_size)
        self.held = 0  # admitted and not finished
        # Per key (flow) with requests in flight or waiting: [admitted and not finished, waiting, weight].
        self.flows: dict[str, list] = {}
        self.rate = 0.0  # requests finishing per second (EWMA), for Retry-After
        self.rate_at = 0.0


class Admission:
    """The gateway's admission control; `admit` is called for every POST once its app is known."""

    def __init__(self, *, target_in_flight: int, queue_size: int, queue_timeout_s: float,
                 go: Callable[[Any, "Request", "App"], None], burst_in_flight: int = 0, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        self.target = target_in_flight or INF
        # Headroom per replica past the target, only for keys below their share (needs a target to share).
        self.burst = burst_in_flight if target_in_flight else 0
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.go = go  # route a request that leaves the queue: (client, request, app)
        self.metrics = metrics
        self.clock = clock
        self.apps: dict[int, _AppState] = {}
        # Every waiting ticket in arrival order: equal timeouts make this deadline order too.
        self._by_deadline: deque[Ticket] = deque()
        self._waking = False
        self._again = False

    def _state(self, app: "App") -> _AppState:
        state = self.apps.get(id(app))
        if state is None:
            state = self.apps[id(app)] = _AppState(self.queue_size)
        return state

    # -- saturation
    def room(self, app: "App", over: float = 0) -> float:
        """Requests the app can take now without any replica past its target + `over` (inf: no limit known)."""
        room = 0.0
        started = 0
        for target in app.targets.targets:
            started += target.in_flight
            if not target.healthy or target.ejected:
                continue
            limit = self.target + over
            cap = target.saturated_at  # the engine itself queues: a hard limit, no headroom past it
            if cap is not None and cap < limit:
                limit = cap
            if limit > target.in_flight:
                room += limit - target.in_flight
        if room == INF:
            return INF
        if not app.targets.targets and app.targets.fallback is not None:
            return INF  # scaled to zero: the fallback proxy wakes the app; nothing to measure
        # Admitted requests still being routed or connected hold a place too.
        state = self.apps.get(id(app))
        pending = state.held - started if state is not None else 0
        return room - max(0, pending)

    def under_share(self, app: "App", state: "_AppState", flow: str, weight: float) -> bool:
        """Whether `flow` (a key) holds less than its weighted share of the app's target, counting every key
        that has requests in flight or waiting: such a key may use the headroom (--saturation-burst)."""
        usable = sum(1 for t in app.targets.targets if t.healthy and not t.ejected)
        mine = state.flows.get(flow)
        total = sum(entry[2] for entry in state.flows.values()) + (weight if mine is None else 0.0)
        held = mine[0] if mine is not None else 0
        return held + 1 <= usable * self.target * weight / total

    def _flow(self, state: "_AppState", flow: str, weight: float, held: int, waiting: int) -> None:
        entry = state.flows.get(flow)
        if entry is None:
            entry = state.flows[flow] = [0, 0, weight]
        entry[0] += held
        entry[1] += waiting
        if entry[0] <= 0 and entry[1] <= 0:
            del state.flows[flow]

    # -- per request
    def admit(self, client: Any, request: "Request", app: "App") -> bool:
        """True: route it now. False: it waits (or was answered: dropped from a full queue)."""
        state = self._state(app)
        key = request.key
        flow = key.name if key is not None else ""
        weight = getattr(key, "weight", 1.0) if key is not None else 1.0
        if (not state.queue.size and self.room(app) >= 1) or (
                self.burst and self.room(app, self.burst) >= 1 and self.under_share(app, state, flow, weight)):
            # Room, or headroom for a key below its share (it is not the one flooding): go now.
            state.held += 1
            self._flow(state, flow, weight, 1, 0)
            ticket = Ticket((client, request, app), 0, flow, 0.0, 0.0, 0.0)
            ticket.state = RELEASED
            request.admission = ticket
            return True
        now = self.clock()
        band = priority_of(request)
        ticket = Ticket((client, request, app), band, flow, estimated_tokens(request.body), now,
                        now + self.queue_timeout_s)
        ticket.weight = weight
        request.admission = ticket
        self._flow(state, flow, weight, 0, 1)
        for dropped in state.queue.push(ticket, weight):
            self._drop(app, state, dropped, Reason.QUEUE_FULL, "the queue of this app is full",
                       counted=dropped is not ticket)
        if ticket.state == WAITING:
            self._by_deadline.append(ticket)
            self._count(app, ticket, +1)
            self.wake(app)
        return False

    def finished(self, request: "Request") -> None:
        """The request ended (answered, failed, or its client left): free its place, or leave the queue."""
        held = request.admission
        request.admission = None
        if held is None:
            return
        app = held.item[2]
        state = self._state(app)
        if held.state == WAITING:  # its client left while it waited: out of the queue at once
            state.queue.remove(held)
            self._count(app, held, -1)
            self._flow(state, held.flow, held.weight, 0, -1)
            return
        if held.state != RELEASED:
            return
        state.held -= 1
        self._flow(state, held.flow, held.weight, -1, 0)
        now = self.clock()
        # The finishing rate, for Retry-After: an EWMA over about a second.
        elapsed = now - state.rate_at
        if elapsed > 0:
            weight = min(1.0, elapsed)
            state.rate = state.rate * (1 - weight) + weight / elapsed
            state.rate_at = now
        if state.queue.size:
            self.wake(app)

    def wake(self, app: "App") -> None:
        """Let waiting requests go while the app has room: highest band first, fair inside a band."""
        state = self.apps.get(id(app))
        if state is None or not state.queue.size:
            return
        if self._waking:
            # Called back from inside `go` (a request that failed at once freed its place): the loop below
            # looks again, instead of a recursion as deep as the queue.
            self._again = True
            return
        self._waking = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._release(app, state)
        finally:
            self._waking = False

    def _release(self, app: "App", state: _AppState) -> None:
        room = self.room(app)
        now = self.clock()
        while room >= 1 and state.queue.size:
            ticket = state.queue.pop()
            if ticket is None:
                break
            room -= 1
            state.held += 1
            self._flow(state, ticket.flow, ticket.weight, 1, -1)
            self._count(app, ticket, -1)
            ticket.released_at = now
            client, request, _ = ticket.item
            request.queued_s = now - ticket.enqueued
            if self.metrics is not None:
                self.metrics.queue_waited(app.name, ticket.band, ticket.flow, request.queued_s)
            try:
                self.go(client, request, app)
            except Exception:  # a bug must cost this one request, never the others waiting
                log.exception("request %s failed leaving the queue", request.request_id.decode("latin-1"))
                client.respond_error(Reason.REPLICA_UNAVAILABLE, "internal gateway error", status=500)

    def wake_all(self) -> None:
        """Re-check every app with waiting requests (replica states changed: health, a scrape, discovery)."""
        for state in list(self.apps.values()):
            if state.queue.size:
                self.wake(next(iter(state.queue.waiting())).item[2])

    def expire(self, now: float) -> None:
        """Answer 429 queue_timeout to every request whose wait passed its deadline (the sweeper calls this)."""
        by_deadline = self._by_deadline
        while by_deadline and (by_deadline[0].state != WAITING or by_deadline[0].deadline <= now):
            ticket = by_deadline.popleft()
            if ticket.state != WAITING:
                continue
            app = ticket.item[2]
            state = self._state(app)
            state.queue.remove(ticket)
            self._drop(app, state, ticket, Reason.QUEUE_TIMEOUT,
                       f"waited {self.queue_timeout_s:g} s for a replica of a saturated app", counted=True)

    # -- helpers
    def _drop(self, app: "App", state: _AppState, ticket: Ticket, reason: Reason, message: str,
              counted: bool = False) -> None:
        client, request, _ = ticket.item
        self._flow(state, ticket.flow, ticket.weight, 0, -1)
        if counted:
            self._count(app, ticket, -1)
        request.admission = None
        request.queued_s = self.clock() - ticket.enqueued
        if self.metrics is not None:
            self.metrics.queue_shed(app.name, ticket.band, ticket.flow, reason.value)
        client.respond_error(reason, message, status=429, retry_after_s=self.retry_after(state))

    def retry_after(self, state: _AppState) -> int:
        """Seconds until the queue ahead would have drained at the recent finishing rate (1..60)."""
        if state.rate <= 0:
            return max(1, math.ceil(self.queue_timeout_s))
        return min(60, max(1, math.ceil(state.queue.size / state.rate)))

    def _count(self, app: "App", ticket: Ticket, delta: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth(app.name, ticket.band, ticket.flow, delta)

    def depth(self, app: "App") -> int:
        state = self.apps.get(id(app))
        return state.queue.size if state is not None else 0


def priority_of(request: "Request") -> int:
    """The request's band: its key's priority, or the key's `x-priority` header when the key may set it."""
    key = request.key
    if key is None:
        return 0
    priority = getattr(key, "priority", 0)
    if getattr(key, "may_set_priority", False):
        for name, value in request.headers:
            if len(name) == 10 and name.lower() == b"x-priority":
                try:
                    priority = int(value)
                except ValueError:
                    pass
                break
    return priority
