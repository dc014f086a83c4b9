"""What a key has used, kept per key *name*: requests in flight and its request bucket.

The keys file says what a key may do (keys.py, re-read on SIGHUP); this says what it has
done, and outlives every reload. A request holds the `KeyState` it was counted against and
gives back to that same object when it ends, so a SIGHUP in the middle of a stream can
neither strand a count on a key object nobody looks at any more nor refill a bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.security.budgets import TokenBudget

if TYPE_CHECKING:
    from gateway.security.keys import ApiKey


class KeyState:
    """The live counters of one key name. `configure` takes new limits from a reload, keeping the counts."""

    __slots__ = ("name", "in_flight", "rps", "burst", "max_in_flight", "level", "updated", "tokens")

    def __init__(self, name: str):
        self.name = name
        self.in_flight = 0
        self.rps = 0.0
        self.burst = 0.0
        self.max_in_flight = 0
        self.level = 0.0  # requests left in the bucket
        self.updated = time.monotonic()
        self.tokens: TokenBudget | None = None  # tokens_per_minute / tokens_per_day, when the key has either

    def configure(self, key: "ApiKey") -> None:
        if key.rps and not self.rps:
            self.level = key.burst  # a bucket that starts now starts full
            self.updated = time.monotonic()
        self.rps, self.burst, self.max_in_flight = key.rps, key.burst, key.max_in_flight
        if self.level > self.burst:
            self.level = self.burst  # a smaller burst applies at once; a larger one fills at the rate

    def take_request(self, now: float) -> float:
        """Take one request from the bucket: 0 when granted, else the seconds until one is there."""
        rps = self.rps
        if not rps:
            return 0.0
        level = min(self.burst, self.level + (now - self.updated) * rps)
        self.updated = now
        if level >= 1.0:
            self.level = level - 1.0
            return 0.0
        self.level = level
        return (1.0 - level) / rps


class KeyStates:
    """Every key name seen since start, and its state: a name that leaves the keys file and comes back keeps it."""

    def __init__(self, minute_s: float = 60.0, day_used: Callable[[str], int] = lambda name: 0):
        self.by_name: dict[str, KeyState] = {}
        self.minute_s = minute_s
        self.day_used = day_used  # what a key used earlier today (the usage state file), for a new budget

    def attach(self, keys: "list[ApiKey]") -> None:
        """Point each key of a freshly loaded file at its name's state, with the file's limits."""
        for key in keys:
            state = self.by_name.get(key.name)
            if state is None:
                state = self.by_name[key.name] = KeyState(key.name)
            state.configure(key)
            if key.tokens_per_minute or key.tokens_per_day:
                if state.tokens is None:
                    state.tokens = TokenBudget(key.tokens_per_minute, key.tokens_per_day, self.minute_s,
                                               self.day_used(key.name))
                else:
                    state.tokens.configure(key.tokens_per_minute, key.tokens_per_day)
            else:
                state.tokens = None  # reservations in flight settle on the budget object they hold
            key.state = state
