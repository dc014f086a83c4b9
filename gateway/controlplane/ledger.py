"""Keys' limits for a whole Ray cluster: one quota ledger actor lends each gateway slices of every key's limits.

Without a ledger every gateway process holds a key's full limits, so N nodes with W workers give a
key N x W times its rps, max_in_flight and token budgets. With --ray-address (and --quota-ledger, on
by default) a detached actor, `gateway-quota-ledger` in namespace `gateway`, holds each key's limits
for the cluster:

* requests (rps, burst): one token bucket;
* requests in flight (max_in_flight): slots;
* tokens per minute: a sliding window of what was lent (budgets.py's window, in wall-clock slots);
* tokens per day: what was lent this UTC day.

Each gateway process syncs every `SYNC_S` in the background (`LeaseClient`): it reports what it
spent and how much it was asked for, gives back what it holds beyond what it will need soon, and
is lent more, at most an equal share of what is left among the gateways asking. Admission only
spends the local lease, so no request waits on a round trip; a gateway out of lease answers 429
at once (Retry-After: when the ledger expects to have more).

The ledger keeps its state in Ray's GCS key-value store (`ray.experimental.internal_kv`, Ray 2.60),
so a ledger that Ray restarts (max_restarts=-1) picks up where it stopped. While a gateway cannot
reach the ledger it falls back to an equal share of every limit (1/N, N = the gateways the ledger
last counted, or the alive nodes x workers), sets `gateway_quota_ledger_up` to 0 and logs it once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from typing import Any

log = logging.getLogger("gateway.ledger")

NAMESPACE = "gateway"
LEDGER = "gateway-quota-ledger"
KV_KEY = b"gateway-quota-ledger/state"
KV_NAMESPACE = b"gateway"
SYNC_S = 0.25  # how often each gateway settles with the ledger
CALL_TIMEOUT_S = 1.0  # a sync slower than this counts as a failure
FAILURES_TO_FALLBACK = 2
GATEWAY_EXPIRY_S = 10.0  # a gateway silent this long is gone: its slots are free again
SAVE_S = 0.5
SETTLE_S = 4 * SYNC_S  # a new ledger hears from every gateway before it lends request slots
USAGE_EVERY = 8  # syncs between two usage reports to the ledger (for `gateway keys usage --ray-address`)
SLOTS = 60


# --------------------------------------------------------------------------- the ledger (pure logic)
class _Key:
    """The cluster's counters of one key name."""

    def __init__(self) -> None:
        self.limits: dict[str, float] = {}
        self.level = 0.0  # requests left in the cluster's bucket
        self.updated = 0.0
        self.window: dict[int, float] = {}  # minute-window slot (wall clock) -> tokens lent in it
        self.day = 0
        self.day_lent = 0.0
        self.slots: dict[str, int] = {}  # gateway -> request slots it holds
        self.contended = 0.0  # until when a gateway was refused a slot (the others give back their spares)

    def as_json(self) -> dict[str, Any]:
        return {"limits": self.limits, "level": self.level, "updated": self.updated,
                "window": {str(k): v for k, v in self.window.items()}, "day": self.day, "day_lent": self.day_lent,
                "slots": self.slots}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "_Key":
        key = cls()
        key.limits = dict(data.get("limits", {}))
        key.level = float(data.get("level", 0.0))
        key.updated = float(data.get("updated", 0.0))
        key.window = {int(k): float(v) for k, v in data.get("window", {}).items()}
        key.day = int(data.get("day", 0))
        key.day_lent = float(data.get("day_lent", 0.0))
        key.slots = {str(k): int(v) for k, v in data.get("slots", {}).items()}
        return key


class Ledger:
    """What the actor does, without Ray (tested in-process): `sync` is the whole protocol."""

    def __init__(self, state: dict[str, Any] | None = None, clock: Any = time.time):
        self.clock = clock
        self.keys: dict[str, _Key] = {}
        self.seen: dict[str, float] = {}  # gateway -> last sync (wall clock)
        self.asking: dict[tuple[str, str, str], float] = {}  # (key, kind, gateway) -> when it last wanted more
        self.usage: dict[str, dict[str, Any]] = {}  # gateway -> its last usage report (for `gateway keys usage`)
        self.dirty = False
        self.started = clock()
        if state:
            self.keys = {name: _Key.from_json(data) for name, data in state.get("keys", {}).items()}
            self.seen = {name: float(when) for name, when in state.get("seen", {}).items()}
            self.usage = dict(state.get("usage", {}))

    def state(self) -> dict[str, Any]:
        return {"keys": {name: key.as_json() for name, key in self.keys.items()}, "seen": self.seen,
                "usage": self.usage}

    def _active(self, now: float) -> list[str]:
        for gateway in [g for g, when in self.seen.items() if now - when > GATEWAY_EXPIRY_S]:
            del self.seen[gateway]
            self.usage.pop(gateway, None)
            for asked in [a for a in self.asking if a[2] == gateway]:
                del self.asking[asked]
            for key in self.keys.values():
                key.slots.pop(gateway, None)  # its streams are gone with it
        return list(self.seen)

    def _share(self, name: str, kind: str, gateway: str, now: float, available: float) -> float:
        """An equal share of what is left among the gateways that asked for more lately."""
        self.asking[(name, kind, gateway)] = now
        asking = sum(1 for (n, k, g), when in self.asking.items()
                     if n == name and k == kind and now - when < 4 * SYNC_S and g in self.seen)
        return available / max(1, asking)

    def sync(self, gateway: str, limits: dict[str, dict[str, float]], report: dict[str, dict[str, Any]],
             usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """One gateway's settlement: its keys' limits, per key what it spent, gave back and wants; returns
        per key what it is lent now, and the retry hints for what it could not get."""
        now = self.clock()
        self.seen[gateway] = now
        if usage is not None:
            self.usage[gateway] = usage
        gateways = self._active(now)
        self.dirty = True
        reply: dict[str, Any] = {"gateways": len(gateways), "keys": {}}
        for name, key_limits in limits.items():
            key = self.keys.get(name)
            if key is None:
                key = self.keys[name] = _Key()
                key.updated = now
                key.level = float(key_limits.get("burst", 0.0))
            key.limits = dict(key_limits)
            reply["keys"][name] = self._settle(name, key, gateway, report.get(name, {}), now)
        return reply

    def _settle(self, name: str, key: _Key, gateway: str, report: dict[str, Any], now: float) -> dict[str, Any]:
        limits = key.limits
        out: dict[str, Any] = {}
        rps, burst = limits.get("rps", 0.0), limits.get("burst", 0.0)
        if rps:
            key.level = min(burst, key.level + (now - key.updated) * rps + report.get("requests_back", 0.0))
            key.updated = now
            want = report.get("requests_want", 0.0)
            grant = min(want, self._share(name, "requests", gateway, now, key.level)) if want > 0 else 0.0
            grant = math.floor(grant) if grant >= 1 else (grant if key.level >= 1 else 0.0)
            key.level -= grant
            out["requests"] = grant
            out["requests_retry"] = max(0.0, (1.0 - key.level) / rps) if key.level < 1 else 0.0
        else:
            key.level, key.updated = burst, now
        slots = int(limits.get("max_in_flight", 0))
        if slots:
            held = max(0, int(report.get("slots_held", 0)))
            key.slots[gateway] = held
            want = int(report.get("slots_want", 0))
            if not report.get("slots_busy") and now < key.contended:
                want = 0  # an idle gateway's spare waits while a busy one is refused
            free = slots - sum(key.slots.values())
            # A ledger that just started (or restarted) lends no slot until every gateway has said what it holds.
            grant = min(want, free) if want > 0 and free > 0 and now - self.started >= SETTLE_S else 0
            key.slots[gateway] = held + grant
            out["slots"] = grant
            if grant < want and report.get("slots_busy"):
                key.contended = now + 4 * SYNC_S  # a gateway with traffic waits: idle spares go back
            elif now < key.contended and held > int(report.get("slots_in_flight", held)):
                out["slots_spare_back"] = True
            if free < 0:
                # More is held than the limit (gateways back from an equal share hold the slots of what they admitted
                # then): this gateway gives slots back as its requests end, instead of starting new ones on them.
                out["slots_owed"] = min(-free, held)
        else:
            key.slots.clear()
        minute = limits.get("tokens_per_minute", 0.0)
        slot_s = limits.get("minute_s", 60.0) / SLOTS
        slot = int(now // slot_s)
        for old in [s for s in key.window if s <= slot - SLOTS]:
            del key.window[old]
        if minute:
            self._give_back(key.window, report.get("minute_back", 0.0) + 0.0)
            debt = report.get("minute_debt", 0.0)
            if debt > 0:
                key.window[slot] = key.window.get(slot, 0.0) + debt
            lent = sum(key.window.values())
            want = report.get("minute_want", 0.0)
            grant = max(0.0, min(want, self._share(name, "minute", gateway, now, minute - lent))) if want > 0 else 0.0
            grant = math.floor(grant)
            if grant:
                key.window[slot] = key.window.get(slot, 0.0) + grant
            out["minute"] = grant
            if minute - lent - grant < want - grant:
                out["minute_retry"] = _window_wait(key.window, slot, slot_s, now, want - grant - (minute - lent - grant))
        day_limit = limits.get("tokens_per_day", 0.0)
        day = int(now // 86400)
        if day != key.day:
            key.day, key.day_lent = day, 0.0
        if day_limit:
            key.day_lent = max(0.0, key.day_lent - report.get("day_back", 0.0)) + max(0.0, report.get("day_debt", 0.0))
            want = report.get("day_want", 0.0)
            grant = math.floor(max(0.0, min(want, self._share(name, "day", gateway, now, day_limit - key.day_lent)))) \
                if want > 0 else 0.0
            key.day_lent += grant
            out["day"] = grant
            if grant < want:
                out["day_retry"] = (day + 1) * 86400 - now
        return out

    @staticmethod
    def _give_back(window: dict[int, float], amount: float) -> None:
        """Unused tokens come back out of the newest slots (where they were lent)."""
        for slot in sorted(window, reverse=True):
            if amount <= 0:
                break
            taken = min(amount, window[slot])
            window[slot] -= taken
            amount -= taken

    def report(self) -> dict[str, Any]:
        """Every gateway's usage report, for `gateway keys usage --ray-address`."""
        now = self.clock()
        self._active(now)
        return {"gateways": dict(self.usage), "keys": {name: {"limits": key.limits, "minute_lent": sum(
            key.window.values()), "day_lent": key.day_lent, "slots_held": sum(key.slots.values())}
            for name, key in self.keys.items()}}


def _window_wait(window: dict[int, float], slot: int, slot_s: float, now: float, excess: float) -> float:
    freed = 0.0
    for old in sorted(window):
        freed += window[old]
        if freed >= excess:
            return max(0.0, (old + SLOTS) * slot_s - now)
    return SLOTS * slot_s


# --------------------------------------------------------------------------- the actor
class LedgerActor:
    """The detached actor's body: the Ledger, saved to the GCS key-value store (and read back on a restart)."""

    def __init__(self) -> None:
        from ray.experimental import internal_kv

        self.kv = internal_kv
        state = None
        try:
            raw = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
            state = json.loads(raw) if raw else None
        except Exception as exc:  # noqa: BLE001 - a broken record must not keep the ledger down
            log.warning("quota ledger state unreadable, starting empty: %s", exc)
        self.ledger = Ledger(state)
        self.restored = state is not None
        self.saved = 0.0
        self.started = time.time()

    def sync(self, gateway: str, limits: dict, report: dict, usage: dict | None = None) -> dict:
        reply = self.ledger.sync(gateway, limits, report, usage)
        now = time.monotonic()
        if now - self.saved >= SAVE_S:
            self.save()
            self.saved = now
        reply["restored"] = self.restored
        return reply

    def save(self) -> None:
        self.kv._internal_kv_put(KV_KEY, json.dumps(self.ledger.state()).encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)

    def report(self) -> dict:
        return self.ledger.report()

    def info(self) -> dict:
        return {"pid": os.getpid(), "restored": self.restored, "started": self.started}


def ledger_actor(ray: Any) -> Any:
    """The cluster's ledger, started by the first gateway that looks for it."""
    cls = ray.remote(LedgerActor)
    return cls.options(name=LEDGER, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                       max_restarts=-1, max_task_retries=0, max_concurrency=1).remote()


# --------------------------------------------------------------------------- the gateway's side
class LeaseClient:
    """Runs on the gateway's event loop: every SYNC_S, settle the keys' leases with the ledger."""

    def __init__(self, door: Any, metrics: Any, gateway_id: str, usage: Any = None, fallback_n: int = 1):
        self.door = door
        self.metrics = metrics
        self.gateway_id = gateway_id
        self.usage = usage
        self.fallback_n = max(1, fallback_n)
        self.actor: Any = None
        self.up = False
        self.failures = 0
        self._task: asyncio.Task | None = None
        self._ray: Any = None
        self.last_sync = time.monotonic()
        self.syncs = 0
        self.ever_up = False

    async def start(self, workers: int = 1) -> None:
        import ray

        self._ray = ray
        try:  # until the ledger answers, an equal share among every node's gateways
            alive = await asyncio.wait_for(asyncio.to_thread(
                lambda: sum(1 for node in ray.nodes() if node["Alive"])), CALL_TIMEOUT_S * 5)
            self.fallback_n = max(1, alive * workers)
        except Exception:  # noqa: BLE001 - keep the default share
            pass
        self.metrics.ledger_up.set(0)
        self.door.states.lend(self.door.keys.keys, None, self.fallback_n)  # until the first sync: an equal share
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is "ledger unreachable"
                self._failed(exc)
            await asyncio.sleep(SYNC_S)

    async def _call(self, ref: Any) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), CALL_TIMEOUT_S)

    async def sync_once(self) -> None:
        if self.actor is None:
            self.actor = await asyncio.wait_for(asyncio.to_thread(ledger_actor, self._ray), CALL_TIMEOUT_S * 5)
        states = self.door.states
        keys = self.door.keys.keys
        now = time.monotonic()
        period = max(SYNC_S, now - self.last_sync)
        self.last_sync = now
        limits = {key.name: {"rps": key.rps, "burst": key.burst, "max_in_flight": key.max_in_flight,
                             "tokens_per_minute": key.tokens_per_minute, "tokens_per_day": key.tokens_per_day,
                             "minute_s": self.door.config.token_minute_s} for key in keys}
        if not self.up:
            # A first call with nothing to settle: only once it answers do the leases replace the equal share.
            reply = await self._call(self.actor.sync.remote(self.gateway_id, limits, {}, None))
            self.up = self.ever_up = True
            self.failures = 0
            log.warning("quota ledger reached: keys' limits hold for the cluster (%d gateways)", reply["gateways"])
            self.metrics.ledger_up.set(1)
            states.lend(keys, {}, 1)
        self.syncs += 1
        usage = self.usage.report() if self.usage is not None and self.syncs % USAGE_EVERY == 0 else None
        report = states.lease_report(keys, period)
        reply = await self._call(self.actor.sync.remote(self.gateway_id, limits, report, usage))
        self.fallback_n = max(1, int(reply.get("gateways", 1)))
        states.lease_granted(reply.get("keys", {}))
        self.failures = 0

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.actor = None if self.failures >= FAILURES_TO_FALLBACK else self.actor
        if not self.up and self.failures == FAILURES_TO_FALLBACK and not self.ever_up:
            log.warning("quota ledger not reachable yet (%s: %s): each of %d gateways holds 1/%d of every key's "
                        "limits until it is", type(exc).__name__, exc, self.fallback_n, self.fallback_n)
        if self.up and self.failures >= FAILURES_TO_FALLBACK:
            self.up = False
            self.metrics.ledger_up.set(0)
            log.warning("quota ledger unreachable (%s: %s): each of %d gateways holds 1/%d of every key's limits "
                        "until it is back", type(exc).__name__, exc, self.fallback_n, self.fallback_n)
            self.door.states.lend(self.door.keys.keys, None, self.fallback_n)
