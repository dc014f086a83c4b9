"""What a key has used, kept per key *name*: requests in flight, its request bucket, its token budgets.

The keys file says what a key may do (keys.py, re-read on SIGHUP); this says what it has
done, and outlives every reload. A request holds the `KeyState` it was counted against and
gives back to that same object when it ends, so a SIGHUP in the middle of a stream can
neither strand a count on a key object nobody looks at any more nor refill a bucket.

Three ways to hold a key's limits (`KeyStates.lend`):
* the whole limits, in this process (no Ray: limits hold per gateway process);
* a share of them (1/N of each, while the cluster's quota ledger is unreachable);
* leases from the ledger (controlplane/ledger.py): requests, request slots and tokens this process
  may spend, settled with the ledger every few hundred milliseconds (`lease_report`, `lease_granted`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.security.budgets import Lease, TokenBudget

if TYPE_CHECKING:
    from gateway.security.keys import ApiKey

LEASE_HORIZON_S = 0.5  # a lease covers about this long of the recent demand (two ledger syncs)


class KeyLease:
    """Requests and request slots lent to this process by the ledger."""

    __slots__ = ("requests", "spent", "refused", "retry_at", "slots", "slots_refused", "started", "owed")

    def __init__(self) -> None:
        self.requests = 0.0
        self.spent = 0
        self.refused = 0
        self.retry_at = 0.0
        self.slots = 0
        self.slots_refused = 0
        self.started = 0
        self.owed = 0  # slots to give back to the ledger as requests end (more was held than the limit)


class KeyState:
    """The live counters of one key name. `configure` takes new limits from a reload, keeping the counts."""

    __slots__ = ("name", "in_flight", "rps", "burst", "max_in_flight", "level", "updated", "tokens", "lease")

    def __init__(self, name: str):
        self.name = name
        self.in_flight = 0
        self.rps = 0.0
        self.burst = 0.0
        self.max_in_flight = 0
        self.level = 0.0  # requests left in the bucket
        self.updated = time.monotonic()
        self.tokens: TokenBudget | None = None  # tokens_per_minute / tokens_per_day, when the key has either
        self.lease: KeyLease | None = None  # set while the cluster's ledger lends this key's limits

    def configure(self, key: "ApiKey", share: float = 1.0) -> None:
        rps = key.rps * share
        burst = max(1.0, key.burst * share) if rps else 0.0
        if rps and not self.rps:
            self.level = burst  # a bucket that starts now starts full
            self.updated = time.monotonic()
        self.rps, self.burst = rps, burst
        self.max_in_flight = max(1, int(key.max_in_flight * share)) if key.max_in_flight else 0
        if self.level > self.burst:
            self.level = self.burst  # a smaller burst applies at once; a larger one fills at the rate

    def in_flight_full(self) -> bool:
        """True when one more request would be over the key's limit of requests in flight."""
        lease = self.lease
        if lease is not None and self.max_in_flight:
            if self.in_flight >= lease.slots:
                lease.slots_refused += 1
                return True
            lease.started += 1
            return False
        return bool(self.max_in_flight) and self.in_flight >= self.max_in_flight

    def finished(self) -> None:
        """A request counted here ended."""
        self.in_flight -= 1
        lease = self.lease
        if lease is not None and lease.owed > 0:
            lease.owed -= 1
            lease.slots -= 1

    def take_request(self, now: float) -> float:
        """Take one request from the bucket: 0 when granted, else the seconds until one is there."""
        rps = self.rps
        if not rps:
            return 0.0
        lease = self.lease
        if lease is not None:
            if lease.requests >= 1.0:
                lease.requests -= 1.0
                lease.spent += 1
                return 0.0
            lease.refused += 1
            return max(0.25, lease.retry_at - now)
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
        self.leased = False
        self.share = 1.0

    def attach(self, keys: "list[ApiKey]") -> None:
        """Point each key of a freshly loaded file at its name's state, with the file's limits."""
        for key in keys:
            state = self.by_name.get(key.name)
            if state is None:
                state = self.by_name[key.name] = KeyState(key.name)
            state.configure(key, self.share)
            if key.tokens_per_minute or key.tokens_per_day:
                per_minute, per_day = int(key.tokens_per_minute * self.share), int(key.tokens_per_day * self.share)
                if state.tokens is None:
                    state.tokens = TokenBudget(per_minute, per_day, self.minute_s, self.day_used(key.name))
                else:
                    state.tokens.configure(per_minute, per_day)
                if self.leased and state.tokens.lease is None:
                    state.tokens.lease = Lease()
            else:
                state.tokens = None  # reservations in flight settle on the budget object they hold
            if self.leased and state.lease is None:
                state.lease = KeyLease()
            key.state = state

    # -- the cluster's ledger (controlplane/ledger.py)
    def lend(self, keys: "list[ApiKey]", leases: dict | None, share_of: int) -> None:
        """Switch how the limits are held: leases from the ledger ({}), or 1/share_of of each here (None)."""
        self.leased = leases is not None
        self.share = 1.0 if self.leased else 1.0 / max(1, share_of)
        for state in self.by_name.values():
            state.lease = None
            if state.tokens is not None:
                state.tokens.lease = None
        self.attach(keys)
        if self.leased:  # requests already in flight hold slots the ledger must count
            for state in self.by_name.values():
                if state.lease is not None:
                    state.lease.slots = state.in_flight

    def lease_report(self, keys: "list[ApiKey]", period: float) -> dict[str, dict[str, Any]]:
        """Per key: what this process spent, gives back and wants, since the last sync."""
        report: dict[str, dict[str, Any]] = {}
        for key in keys:
            state = key.state
            lease = state.lease
            if lease is None:
                continue
            entry: dict[str, Any] = {}
            if state.rps:
                rate = (lease.spent + lease.refused) / period
                target = min(key.burst, max(1.0, rate * LEASE_HORIZON_S))
                back = max(0.0, lease.requests - 2 * target)
                lease.requests -= back
                entry["requests_back"] = back
                entry["requests_want"] = max(0.0, target - lease.requests)
                lease.spent = lease.refused = 0
            if state.max_in_flight:
                # One slot spare beyond those in use, so the next request need not wait for a sync; the ledger
                # asks for spares back when another gateway is refused one (slots_spare_back).
                held = max(lease.slots, state.in_flight)
                target = state.in_flight + 1
                lease.slots = min(held, target)
                entry["slots_held"] = lease.slots
                entry["slots_in_flight"] = state.in_flight
                entry["slots_busy"] = bool(lease.slots_refused or lease.started or state.in_flight)
                entry["slots_want"] = max(0, target - lease.slots)
                lease.slots_refused = lease.started = 0
            budget = state.tokens
            tokens = budget.lease if budget is not None else None
            if budget is not None and tokens is not None:
                wanted = tokens.wanted / period
                target_tokens = max(tokens.largest, wanted * LEASE_HORIZON_S)
                for kind, limit in (("minute", budget.per_minute), ("day", budget.per_day)):
                    if not limit:
                        continue
                    balance = getattr(tokens, kind)
                    if balance < 0:
                        entry[kind + "_debt"] = -balance
                        balance = 0
                    target = min(limit, target_tokens)
                    back = max(0, balance - 2 * target) if tokens.wanted or balance > target else 0
                    balance -= back
                    setattr(tokens, kind, balance)
                    entry[kind + "_back"] = back
                    entry[kind + "_want"] = max(0, target - balance)
                tokens.wanted = 0
                tokens.largest = 0
            report[key.name] = entry
        return report

    def lease_granted(self, grants: dict[str, dict[str, Any]]) -> None:
        now = time.monotonic()
        for name, grant in grants.items():
            state = self.by_name.get(name)
            if state is None or state.lease is None:
                continue
            lease = state.lease
            lease.requests += grant.get("requests", 0.0)
            lease.retry_at = now + grant.get("requests_retry", 0.0)
            lease.slots += int(grant.get("slots", 0))
            if grant.get("slots_spare_back"):
                lease.slots = min(lease.slots, state.in_flight)  # reported at the next sync, then the ledger lends it
            owed = int(grant.get("slots_owed", 0))
            spare = min(owed, max(0, lease.slots - state.in_flight))
            lease.slots -= spare
            lease.owed = owed - spare
            tokens = state.tokens.lease if state.tokens is not None else None
            if tokens is not None:
                tokens.minute += int(grant.get("minute", 0))
                tokens.day += int(grant.get("day", 0))
                tokens.retry_at = now + max(grant.get("minute_retry", 0.0), 0.25)
                tokens.day_retry = grant.get("day_retry", 0.0)
