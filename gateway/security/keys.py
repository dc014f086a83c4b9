"""API keys: who may call the gateway, and how much.

A key is never stored in clear: the keys file holds the SHA-256 of each key, and a
presented key is hashed and looked up by digest. The lookup is a dict probe on the
digest followed by `hmac.compare_digest`, so its timing depends on the digest of
what the caller sent, never on how many leading characters of a real key they got
right. Limits are per key: a token bucket (rps, burst) and a cap on requests in flight; their
counters live per key name in limits.py, so a reload changes the limits and keeps the counts.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import tomllib
from dataclasses import dataclass, field
from typing import Any

# Names a key may carry: they reach logs and metric labels, so keep them plain.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class KeysError(ValueError):
    """A keys file the gateway cannot use; the message names the file and the entry, never a key."""


@dataclass
class ApiKey:
    """One key as the keys file describes it. What it has used lives in `state`, shared by every
    ApiKey of the same name across reloads (limits.py)."""
    name: str
    digest: bytes
    rps: float = 0.0  # 0 = no rate limit
    burst: float = 0.0
    max_in_flight: int = 0  # 0 = no limit
    models: frozenset[str] | None = None  # None = every model
    tokens_per_minute: int = 0  # prompt + completion tokens; 0 = no budget (budgets.py)
    tokens_per_day: int = 0
    # Admission under overload (gateway/dataplane/admission.py): the band (higher goes first), the share of
    # the band's replicas against other keys, and whether the key's `x-priority` header picks the band.
    priority: int = 0
    weight: float = 1.0
    may_set_priority: bool = False
    state: Any = field(default=None, repr=False, compare=False)  # limits.KeyState, set by KeyStates.attach

    def __post_init__(self) -> None:
        if self.rps and not self.burst:
            self.burst = max(1.0, self.rps)


def digest_of(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe (it travels in a header and in shell variables)."""
    return "sk-gw-" + secrets.token_urlsafe(32)


def toml_entry(name: str, key: str) -> str:
    return (f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key).hex()}"\n'
            f'# rps = 5            # requests per second (token bucket)\n'
            f'# burst = 10         # bucket size\n'
            f'# max_in_flight = 4  # requests at once\n'
            f'# tokens_per_minute = 100000  # prompt + completion tokens\n'
            f'# tokens_per_day = 5000000\n'
            f'# models = ["my-model"]\n'
            f'# priority = 0       # admission band under overload: higher goes first\n'
            f'# weight = 1         # share against other keys of its band\n')


class KeyRing:
    """The configured keys, looked up by the digest of a presented key."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = keys
        self._by_digest = {key.digest: key for key in keys}

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, presented: bytes) -> ApiKey | None:
        digest = digest_of(presented)
        key = self._by_digest.get(digest)
        if key is not None and hmac.compare_digest(key.digest, digest):
            return key
        return None


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS or len(name) > 64:
        raise KeysError(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 - _ .")
    return name


def _number(entry: dict, field_name: str, where: str, kind: type) -> float:
    value = entry.get(field_name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or (kind is int and not isinstance(value, int)) or not math.isfinite(value):
        raise KeysError(f"{where}: {field_name} must be a non-negative {'integer' if kind is int else 'number'}")
    return kind(value)


def parse_keys(data: dict, source: str) -> list[ApiKey]:
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeysError(f"{source}: no [[keys]] entries")
    keys: list[ApiKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for index, entry in enumerate(entries):
        where = f"{source}, keys[{index}]"
        if not isinstance(entry, dict):
            raise KeysError(f"{where}: not a table")
        unknown = set(entry) - {"name", "sha256", "rps", "burst", "max_in_flight", "models", "tokens_per_minute",
                                "tokens_per_day", "priority", "weight", "may_set_priority"}
        if unknown:
            raise KeysError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        name = check_name(entry.get("name"), where)
        where = f"{source}, key {name!r}"
        text = entry.get("sha256")
        try:
            digest = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise KeysError(f"{where}: sha256 must be the 64 hex digits of the key's SHA-256 "
                            "(`gateway keys new NAME` prints it)")
        if name in names:
            raise KeysError(f"{where}: two keys share this name")
        if digest in digests:
            raise KeysError(f"{where}: two entries share one key")
        models = entry.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise KeysError(f"{where}: models must be a list of model names")
        rps = _number(entry, "rps", where, float)
        burst = _number(entry, "burst", where, float)
        if burst and not rps:
            raise KeysError(f"{where}: burst needs rps")
        if rps and burst and burst < 1:
            raise KeysError(f"{where}: burst must be at least 1")
        priority, weight = entry.get("priority", 0), entry.get("weight", 1.0)
        may_set = entry.get("may_set_priority", False)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise KeysError(f"{where}: priority must be an integer (higher goes first)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise KeysError(f"{where}: weight must be a positive number")
        if not isinstance(may_set, bool):
            raise KeysError(f"{where}: may_set_priority must be true or false")
        names.add(name)
        digests.add(digest)
        keys.append(ApiKey(name, digest, rps, burst, int(_number(entry, "max_in_flight", where, int)),
                           frozenset(models) if models is not None else None,
                           tokens_per_minute=int(_number(entry, "tokens_per_minute", where, int)),
                           tokens_per_day=int(_number(entry, "tokens_per_day", where, int)),
                           priority=priority, weight=float(weight), may_set_priority=may_set))
    return keys


def load_keys(api_key: str, keys_file: str) -> KeyRing:
    """The single --api-key (named 'default') plus the keys file's entries."""
    keys: list[ApiKey] = []
    if api_key:
        keys.append(ApiKey("default", digest_of(api_key)))
    if keys_file:
        try:
            with open(keys_file, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise KeysError(f"keys file {keys_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise KeysError(f"keys file {keys_file}: {exc}") from None
        for key in parse_keys(data, f"keys file {keys_file}"):
            if keys and key.name == "default" and api_key:
                raise KeysError(f"keys file {keys_file}: the name 'default' is taken by --api-key")
            keys.append(key)
    return KeyRing(keys)
