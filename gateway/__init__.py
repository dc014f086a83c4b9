"""gateway: an async gateway that replaces HAProxy+Lua in front of LLM replicas."""

__version__ = "0.1.0"
