"""The replica-picking policies of the standalone router, mirroring Ray 2.60's.

Each policy gets the live candidates (healthy replicas, or all of them when
none looks healthy), the session id and, for body-aware policies, the parsed
request body; it returns one candidate or raises ValueError on a payload it
cannot read (Ray answers that with 400).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson


@dataclass(eq=False)
class Replica:
    id: str
    host: str
    port: int
    healthy: bool = True  # until its first failed check, as Ray's view assumes
    # The flat answer is fixed per replica, so it is rendered once.
    answer: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.answer = orjson.dumps({"host": self.host, "port": self.port, "replica_id": self.id})


class LoadTracker:
    """Requests routed to each replica within the last `window_s` seconds:
    what "least loaded" means for a router that never sees responses end."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._stamps: dict[str, deque[float]] = {}

    def record(self, replica_id: str) -> None:
        self._stamps.setdefault(replica_id, deque()).append(time.monotonic())

    def recent(self, replica_id: str) -> int:
        stamps = self._stamps.get(replica_id)
        if not stamps:
            return 0
        horizon = time.monotonic() - self.window_s
        while stamps and stamps[0] < horizon:
            stamps.popleft()
        return len(stamps)

    def least_loaded(self, candidates: Sequence[Replica]) -> Replica:
        # Ties go to the earliest candidate, which keeps tests deterministic.
        return min(candidates, key=lambda r: self.recent(r.id))


class Policy(Protocol):
    uses_body: bool

    def pick(self, candidates: Sequence[Replica], session: str | None, payload: dict | None) -> Replica: ...


class RoundRobin:
    """Ray's RoundRobinRouter: a cursor starting at a random place."""

    uses_body = False

    def __init__(self) -> None:
        self._cursor = random.randrange(1 << 16)

    def pick(self, candidates: Sequence[Replica], session: str | None, payload: dict | None) -> Replica:
        self._cursor += 1
        return candidates[self._cursor % len(candidates)]


def _hash64(key: str) -> int:
    # Stable across processes (unlike hash()), so a restarted router keeps sessions where they were.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ConsistentHash:
    """Ray's ConsistentHashRouter: a ring of `virtual_nodes` points per replica,
    keyed on the session id. A replica leaving moves only its own sessions (to
    the next point clockwise); requests without a session go round robin."""

    uses_body = False

    def __init__(self, replicas: Sequence[Replica], virtual_nodes: int = 100) -> None:
        points = sorted((_hash64(f"{r.id}#{i}"), r.id) for r in replicas for i in range(virtual_nodes))
        self._hashes = [h for h, _ in points]
        self._owners = [rid for _, rid in points]
        self._fallback = RoundRobin()

    def pick(self, candidates: Sequence[Replica], session: str | None, payload: dict | None) -> Replica:
        if not session or not self._hashes:
            return self._fallback.pick(candidates, session, payload)
        live = {r.id: r for r in candidates}
        start = bisect.bisect(self._hashes, _hash64(session))
        count = len(self._owners)
        for step in range(count):
            replica = live.get(self._owners[(start + step) % count])
            if replica is not None:
                return replica
        return self._fallback.pick(candidates, session, payload)  # candidates not on the ring


def prompt_text(payload: dict) -> str:
    """The text a prefix cache would see: `messages` contents joined, or `prompt`."""
    messages = payload.get("messages")
    if messages:
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                raise ValueError("each message must be an object")
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            elif content is not None:
                raise ValueError("message content must be a string or a list of parts")
        return "".join(parts)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt):
            return "".join(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return ",".join(map(str, prompt))
    raise ValueError("'prompt' must be a string, a list of strings or a list of token ids")


class PrefixAffinity:
    """Ray's PrefixCacheAffinityRouter, approximated without a shared tree actor.

    Prompts are remembered as chained hashes of their prefixes at every
    `block` characters (plus the full length), each mapped to the replicas that
    served it. The longest remembered prefix wins if it covers at least
    `match_rate_threshold` of the prompt; otherwise the least loaded replica
    gets the prompt. Memory is bounded by evicting the oldest prefixes.
    """

    uses_body = True

    def __init__(self, load: LoadTracker, match_rate_threshold: float = 0.1, block: int = 16,
                 max_prefixes: int = 200_000) -> None:
        self._load = load
        self._threshold = match_rate_threshold
        self._block = block
        self._max = max_prefixes
        self._owners: OrderedDict[int, list[str]] = OrderedDict()

    def _prefix_keys(self, text: str) -> list[tuple[int, int]]:
        block, keys, h = self._block, [], 0
        end = len(text) - len(text) % block
        for i in range(block, end + 1, block):
            h = hash((h, text[i - block:i]))
            keys.append((i, h))
        if end != len(text):
            keys.append((len(text), hash((h, text[end:]))))
        return keys

    def pick(self, candidates: Sequence[Replica], session: str | None, payload: dict | None) -> Replica:
        if payload is None:
            return self._load.least_loaded(candidates)
        text = prompt_text(payload)
        if not text:
            return self._load.least_loaded(candidates)
        keys = self._prefix_keys(text)
        live = {r.id: r for r in candidates}
        chosen = None
        for length, key in reversed(keys):
            owners = self._owners.get(key)
            hits = [live[rid] for rid in owners if rid in live] if owners else None
            if hits:
                if length >= self._threshold * len(text):
                    chosen = self._load.least_loaded(hits)
                break
        if chosen is None:
            chosen = self._load.least_loaded(candidates)
        self._remember(keys, chosen.id)
        return chosen

    def _remember(self, keys: list[tuple[int, int]], replica_id: str) -> None:
        owners_by_key = self._owners
        for _, key in keys:
            owners = owners_by_key.get(key)
            if owners is None:
                owners_by_key[key] = [replica_id]
            else:
                if replica_id not in owners:
                    owners.append(replica_id)
                owners_by_key.move_to_end(key)
        while len(owners_by_key) > self._max:
            owners_by_key.popitem(last=False)


POLICIES = ("round_robin", "consistent_hash", "prefix_affinity")


def make_policy(name: str, replicas: Sequence[Replica], load: LoadTracker) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "consistent_hash":
        return ConsistentHash(replicas)
    if name == "prefix_affinity":
        return PrefixAffinity(load)
    raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}")
