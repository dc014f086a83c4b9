"""The systems and workloads a benchmark run compares, and how they are labelled."""

WORKLOADS = {
    # name: (stream, max_tokens)
    "unary": (False, 16),
    "stream50": (True, 50),
    "stream200": (True, 200),
}
SLA_MS = {"unary": 200.0, "stream50": 700.0, "stream200": 700.0}
COLORS = {"direct": "tab:blue", "haproxy": "tab:orange", "gateway": "tab:green", "gateway2": "tab:red",
          "gateway-resume": "tab:purple", "gateway-py": "tab:olive", "gateway-tokens": "tab:brown",
          "gateway-py-tokens": "tab:pink", "gateway-both": "tab:cyan", "gateway-old": "tab:gray"}
SYSTEM_LABEL = {
    "direct": "direct",
    "haproxy": "HAProxy+Lua",
    "gateway": "gateway 1w",
    "gateway2": "gateway 2w",
    "gateway-resume": "gateway 1w, resume on",
    "gateway-py": "gateway 1w, Python relay",
    "gateway-tokens": "gateway 1w, token accounting on",
    "gateway-py-tokens": "gateway 1w, Python relay, token accounting on",
    "gateway-both": "gateway 1w, resume and token accounting on",
    "gateway-old": "gateway 1w, --old-tree",
}
# The extra flags of a system that is the gateway with a feature on (its CPU cost, side by side).
SYSTEM_ARGS = {"gateway-resume": ["--resume-limit", "2"], "gateway-py": ["--no-native-relay"],
               "gateway-tokens": ["--token-accounting"], "gateway-py-tokens": ["--token-accounting", "--no-native-relay"],
               # gateway up's defaults, and any gateway with API keys and --resume-limit
               "gateway-both": ["--resume-limit", "2", "--token-accounting"]}
# gateway-old: the same `gateway serve` from another source tree (bench.py --old-tree), e.g. a commit before a
# change, side by side in one run (a regression is a ratio of one run, not of two runs on a shared machine).
GATEWAY_SYSTEMS = ("gateway", "gateway2", *SYSTEM_ARGS, "gateway-old")
