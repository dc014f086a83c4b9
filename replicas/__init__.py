"""What stands behind the gateway in tests and benchmarks.

`mock_engine` is an OpenAI-compatible stand-in for a vLLM replica, `router` a
stand-in for Ray Serve's `LLMRouter` (`POST /internal/route`). Both run on
`http_server`, a raw asyncio/httptools server, because they are the fake
upstreams of a benchmark that measures a proxy's CPU per request and must never
be the bottleneck themselves.
"""
