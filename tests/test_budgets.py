"""Token budgets in-process, on a fake clock: the sliding minute, the UTC day, reservations and Retry-After."""

from __future__ import annotations

from gateway.security.budgets import TokenBudget


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_retry_after_is_when_the_window_has_room_again() -> None:
    mono, wall = Clock(1000.0), Clock(86400 * 20000 + 3600.0)
    budget = TokenBudget(100, 0, 60.0, clock=mono, wall=wall)
    first, _, _ = budget.reserve(60)  # settles at 50: 50 in the window from t=1000
    budget.settle(first, 50)
    mono.now += 20
    second, _, _ = budget.reserve(40)  # 90 in the window
    budget.settle(second, 40)
    refused, wait, which = budget.reserve(30)
    assert refused is None and which == "minute"
    assert 39 < wait <= 41  # the first request's 50 leave the window 60 s after t=1000: 40 s from now
    mono.now += wait - 1.5
    assert budget.reserve(30)[0] is None  # not before
    mono.now += 1.5
    assert budget.reserve(30)[0] is not None  # and right then


def test_a_reservation_holds_its_worst_case_and_settles_to_the_real_count() -> None:
    mono, wall = Clock(50.0), Clock(86400 * 20000.0)
    budget = TokenBudget(100, 0, 60.0, clock=mono, wall=wall)
    held, _, _ = budget.reserve(80)
    assert budget.reserve(30)[0] is None  # 80 reserved: no room for 30 more
    budget.settle(held, 10)  # it used 10
    assert budget.reserve(30)[0] is not None and budget.window == 40
    big, _, _ = budget.reserve(500)  # larger than the whole budget: only into an empty window
    assert big is None
    mono.now += 61
    big, _, _ = budget.reserve(500)  # an empty window takes a request larger than the budget (it would never pass)
    assert big is not None and budget.window == 500


def test_the_day_resets_at_utc_midnight_and_retry_after_says_when() -> None:
    mono, wall = Clock(0.0), Clock(86400 * 20000 + 86400 - 100.0)  # 100 s before midnight UTC
    budget = TokenBudget(0, 1000, 60.0, day_used=990, clock=mono, wall=wall)
    refused, wait, which = budget.reserve(20)
    assert refused is None and which == "day" and 99 <= wait <= 100
    wall.now += 100
    assert budget.reserve(20)[0] is not None and budget.day_used == 0
