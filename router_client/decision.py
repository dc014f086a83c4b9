"""A routing decision, validated before anything trusts it."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from router_client.errors import MALFORMED_DECISION, RouterError


@dataclass(frozen=True, slots=True)
class Decision:
    host: str
    port: int
    replica_id: str
    # Extra headers the router asks to be set on the replica request (LoRA model id, KV-aware token key).
    request_headers: dict[str, str] = field(default_factory=dict)


def parse_decision(body: bytes) -> Decision:
    """Ray 2.60's LLMRouter answer: {"host": str, "port": int, "replica_id": str[, "request_headers": {str: str}]}."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RouterError(MALFORMED_DECISION, "router answer is not JSON") from None
    if not isinstance(data, dict):
        raise RouterError(MALFORMED_DECISION, "router answer is not a JSON object")
    host, port, replica_id = data.get("host"), data.get("port"), data.get("replica_id")
    if not isinstance(host, str) or not host:
        raise RouterError(MALFORMED_DECISION, "'host' must be a non-empty string")
    # bool is an int in Python; a router saying "port": true is broken, not port 1.
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise RouterError(MALFORMED_DECISION, "'port' must be an integer port number")
    if not isinstance(replica_id, str) or not replica_id:
        raise RouterError(MALFORMED_DECISION, "'replica_id' must be a non-empty string")
    headers = data.get("request_headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise RouterError(MALFORMED_DECISION, "'request_headers' must map strings to strings")
    for key, value in headers.items():
        if any(ch in key or ch in value for ch in "\r\n\0") or not key or ":" in key:
            raise RouterError(MALFORMED_DECISION, "'request_headers' holds an unsafe header")
    return Decision(host, port, replica_id, headers)
