"""The quota ledger's protocol in-process: three gateways' KeyStates settling with one Ledger on a simulated clock.

What the three-node Ray test checks over a real minute (tests/test_multinode.py), here in milliseconds: a key
driven through every gateway at once is served at most its limit for the cluster, not per gateway.
"""

from __future__ import annotations

from gateway.controlplane.ledger import SYNC_S, Ledger
from gateway.security.keys import ApiKey
from gateway.security.limits import KeyStates


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def gateways(n: int, **limits: float) -> tuple[list[KeyStates], list[list[ApiKey]]]:
    states, keys = [], []
    for _ in range(n):
        key = ApiKey("k", b"\0" * 32, **limits)  # type: ignore[arg-type]
        s = KeyStates()
        s.attach([key])
        s.lend([key], {}, 1)
        states.append(s)
        keys.append([key])
    return states, keys


def limits_of(key: ApiKey) -> dict:
    return {"k": {"rps": key.rps, "burst": key.burst, "max_in_flight": key.max_in_flight,
                  "tokens_per_minute": key.tokens_per_minute, "tokens_per_day": key.tokens_per_day,
                  "minute_s": 60.0}}


def run(ledger: Ledger, clock: Clock, states: list[KeyStates], keys: list[list[ApiKey]], seconds: float,
        each_tick: callable) -> None:
    steps = int(seconds / SYNC_S)
    for step in range(steps):
        for index, (s, k) in enumerate(zip(states, keys)):
            reply = ledger.sync(f"g{index}", limits_of(k[0]), s.lease_report(k, SYNC_S))
            s.lease_granted(reply["keys"])
            each_tick(index, s, k[0])
        clock.now += SYNC_S


def test_tokens_per_minute_hold_for_the_cluster() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    states, keys = gateways(3, tokens_per_minute=3000)
    served = [0]

    def drive(index: int, s: KeyStates, key: ApiKey) -> None:
        budget = key.state.tokens
        for _ in range(20):  # far more than the budget allows
            reservation, wait, _ = budget.reserve(60)
            if reservation is None:
                assert wait > 0
                break
            budget.settle(reservation, 50)
            served[0] += 50

    run(ledger, clock, states, keys, 60.0, drive)
    print("tokens served", served[0]); assert 3000 * 0.8 <= served[0] <= 3000 * 1.1, served[0]


def test_rps_and_max_in_flight_hold_for_the_cluster() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    states, keys = gateways(3, rps=4.0, burst=4.0, max_in_flight=2)
    served = [0]
    peak = [0]
    held: list[list[object]] = [[], [], []]

    def drive(index: int, s: KeyStates, key: ApiKey) -> None:
        state = key.state
        for request in held[index][:1]:  # one stream per gateway ends each tick
            held[index].remove(request)
            state.finished()
        for _ in range(10):
            if state.in_flight_full() or state.take_request(clock.now):
                break
            state.in_flight += 1
            held[index].append(object())
            served[0] += 1
        peak[0] = max(peak[0], sum(len(h) for h in held))

    run(ledger, clock, states, keys, 60.0, drive)
    print("requests", served[0], "peak", peak[0]); assert peak[0] <= 2
    assert served[0] <= 4 * 60 * 1.1 + 4, served[0]


def test_the_ledger_restarts_from_its_saved_state() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    states, keys = gateways(1, tokens_per_minute=1000)
    reply = ledger.sync("g0", limits_of(keys[0][0]), {"k": {"minute_want": 800}})
    assert reply["keys"]["k"]["minute"] == 800
    again = Ledger(ledger.state(), clock=clock)  # what the actor reads back from the GCS store
    reply = again.sync("g0", limits_of(keys[0][0]), {"k": {"minute_want": 800}})
    assert reply["keys"]["k"]["minute"] == 200 and reply["keys"]["k"]["minute_retry"] > 0


def test_idle_gateways_give_their_spare_slot_to_the_one_with_traffic() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    states, keys = gateways(3, max_in_flight=1)
    served = [0]

    def drive(index: int, s: KeyStates, key: ApiKey) -> None:
        state = key.state
        if index == 2 and not state.in_flight_full():  # only the last gateway has traffic: one-tick requests
            state.in_flight += 1
            served[0] += 1
        elif index == 2 and state.in_flight:
            state.finished()

    run(ledger, clock, states, keys, 10.0, drive)
    assert served[0] >= 10  # the idle gateways' spare slot came over
    assert sum(ledger.keys["k"].slots.values()) <= 1


def test_slots_held_beyond_the_limit_shrink_back_to_it() -> None:
    """Gateways back from an equal share (1 slot each, 3 gateways, max_in_flight 2) hold 3: spares go back."""
    clock = Clock()
    ledger = Ledger(clock=clock)
    states, keys = gateways(3, max_in_flight=2)
    for s, k in zip(states, keys):
        k[0].state.in_flight = 1  # a stream each, admitted on the equal share
        s.lend(k, {}, 1)

    def drive(index: int, s: KeyStates, key: ApiKey) -> None:
        state = key.state
        if state.in_flight and clock.now > 1_000_001.0:
            state.finished()  # the streams end after a second; new ones come as slots allow
        if not state.in_flight_full():
            state.in_flight += 1
        assert sum(k[0].state.in_flight for k in keys) <= 3

    run(ledger, clock, states, keys, 3.0, drive)
    peak = [0]

    def steady(index: int, s: KeyStates, key: ApiKey) -> None:
        state = key.state
        if state.in_flight:
            state.finished()
        if not state.in_flight_full():
            state.in_flight += 1
        peak[0] = max(peak[0], sum(k[0].state.in_flight for k in keys))

    run(ledger, clock, states, keys, 5.0, steady)
    assert peak[0] <= 2
