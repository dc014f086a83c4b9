"""Client for the LLM router's `POST /internal/route`: keep-alive pool, failover, timeouts, decision validation."""

from router_client.client import RouterClient
from router_client.decision import Decision, parse_decision
from router_client.errors import RouterError

__all__ = ["Decision", "RouterClient", "RouterError", "parse_decision"]
