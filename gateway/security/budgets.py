"""Token budgets per key: `tokens_per_minute` and `tokens_per_day` (prompt + completion).

Admission reserves a request's worst case (its prompt estimate plus the completion it allows:
`max_tokens`, `max_completion_tokens`, or --token-default-max-tokens) and the end of the request
settles the reservation with the replica's own count. So a burst of long requests can overshoot a
budget by no more than the estimates of the requests already admitted, and a short answer gives
back what it did not use.

* per minute: a sliding window of `SLOTS` slots over --token-minute-s (60 s): at most the budget in
  any window, to one slot's precision (a token bucket of the same size would let twice the budget
  through in the first minute). Retry-After: when the oldest slots have freed enough.
* per day: the UTC calendar day (what "used today" means); Retry-After: UTC midnight. What a key
  used today is read back from the usage state file at start, so a restart does not reset it.

These are the numbers of one gateway process. With Ray, the cluster's quota ledger
(controlplane/ledger.py) lends each process slices of the cluster's budget instead (`Lease`).
"""

from __future__ import annotations

import math
import time
from typing import Any

SLOTS = 60


class Reservation:
    __slots__ = ("slot", "amount", "day", "leased")

    def __init__(self, slot: int, amount: int, day: int, leased: bool):
        self.slot, self.amount, self.day, self.leased = slot, amount, day, leased


class Lease:
    """Tokens of the cluster's budget this process may spend without asking (lent by the ledger)."""

    __slots__ = ("minute", "day", "wanted", "largest", "retry_at", "day_retry")

    def __init__(self) -> None:
        self.minute = 0  # tokens left of what the ledger lent for the minute window (< 0: debt, reported)
        self.day = 0
        self.wanted = 0  # tokens asked for by reservations since the last sync, granted or not
        self.largest = 0  # the largest of those reservations (a lease must fit one)
        self.retry_at = 0.0  # the ledger's word on when its window frees up (monotonic), when out
        self.day_retry = 0.0


class TokenBudget:
    """One key name's token budgets; kept across reloads with the rest of its KeyState."""

    def __init__(self, per_minute: int, per_day: int, minute_s: float = 60.0, day_used: int = 0,
                 clock: Any = time.monotonic, wall: Any = time.time):
        self.clock, self.wall = clock, wall
        self.per_minute = per_minute
        self.per_day = per_day
        self.slot_s = minute_s / SLOTS
        self.slots = [0] * SLOTS
        self.newest = int(clock() // self.slot_s)
        self.window = 0  # tokens in the window's slots
        self.day_index = int(wall() // 86400)
        self.day_used = day_used
        self.day_reserved = 0
        self.lease: Lease | None = None  # set while the cluster ledger hands out this key's budget

    def configure(self, per_minute: int, per_day: int) -> None:
        self.per_minute, self.per_day = per_minute, per_day

    def _advance(self, now: float) -> int:
        index = int(now // self.slot_s)
        newest = self.newest
        if index != newest:
            slots = self.slots
            for step in range(newest + 1, min(index, newest + SLOTS) + 1):
                position = step % SLOTS
                self.window -= slots[position]
                slots[position] = 0
            self.newest = index
        return index

    def _roll_day(self) -> int:
        day = int(self.wall() // 86400)
        if day != self.day_index:
            self.day_index = day
            self.day_used = 0
        return day

    def reserve(self, worst_case: int) -> tuple[Reservation | None, float, str]:
        """Reserve `worst_case` tokens: (the reservation, 0, "") or (None, seconds to wait, which budget)."""
        now = self.clock()
        slot = self._advance(now)
        day = self._roll_day()
        lease = self.lease
        need_minute = min(worst_case, self.per_minute) if self.per_minute else 0
        need_day = min(worst_case, self.per_day) if self.per_day else 0
        if lease is not None:
            lease.wanted += worst_case
            if worst_case > lease.largest:
                lease.largest = worst_case
            if need_minute and lease.minute < need_minute:
                return None, max(0.25, lease.retry_at - now), "minute"
            if need_day and lease.day < need_day:
                return None, lease.day_retry or 1.0, "day"
            lease.minute -= need_minute
            lease.day -= need_day
            return Reservation(slot, worst_case, day, True), 0.0, ""
        if need_minute and self.window + need_minute > self.per_minute:
            return None, self._minute_wait(now, self.window + need_minute - self.per_minute), "minute"
        if need_day and self.day_used + self.day_reserved + need_day > self.per_day:
            if self.day_used + need_day > self.per_day:
                return None, self._to_midnight(), "day"
            return None, 1.0, "day"  # requests in flight hold the rest: they settle soon
        self.slots[slot % SLOTS] += worst_case
        self.window += worst_case
        self.day_reserved += worst_case
        return Reservation(slot, worst_case, day, False), 0.0, ""

    def settle(self, reservation: Reservation, used: int) -> None:
        """The request ended having used `used` tokens: give back the rest of its reservation (or take more)."""
        now = self.clock()
        slot = self._advance(now)
        day = self._roll_day()
        if reservation.leased:
            lease = self.lease
            if lease is not None:
                need_minute = min(reservation.amount, self.per_minute) if self.per_minute else 0
                need_day = min(reservation.amount, self.per_day) if self.per_day else 0
                # The unused part of the reservation goes back to the lease; going over takes from it.
                lease.minute += need_minute - (used if self.per_minute else 0)
                lease.day += need_day - (used if self.per_day else 0)
            if day == self.day_index:
                self.day_used += used
            # Kept in the local window too: should the ledger become unreachable, this process's share starts
            # from what it used in the last minute, not from an empty window.
            self.slots[slot % SLOTS] += used
            self.window += used
            return
        if slot - reservation.slot < SLOTS:
            self.slots[reservation.slot % SLOTS] += used - reservation.amount
            self.window += used - reservation.amount
        else:
            self.slots[slot % SLOTS] += used  # the reservation's slot has left the window: count it now
            self.window += used
        if reservation.day == self.day_index:
            self.day_reserved -= reservation.amount
        self.day_used += used

    def _minute_wait(self, now: float, excess: int) -> float:
        """Seconds until the oldest slots have freed `excess` tokens."""
        freed = 0
        for age in range(SLOTS - 1, -1, -1):
            step = self.newest - age
            freed += self.slots[step % SLOTS]
            if freed >= excess:
                return max(0.0, (step + SLOTS) * self.slot_s - now)
        return SLOTS * self.slot_s  # reservations in flight hold it: at most one window

    def _to_midnight(self) -> float:
        now = self.wall()
        return (math.floor(now / 86400) + 1) * 86400 - now

    def describe(self) -> dict[str, Any]:
        self._advance(self.clock())
        self._roll_day()
        return {"tokens_per_minute": self.per_minute, "minute_used": self.window,
                "tokens_per_day": self.per_day, "day_used": self.day_used, "day_reserved": self.day_reserved,
                "leased": self.lease is not None}
