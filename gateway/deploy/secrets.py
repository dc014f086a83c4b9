"""The secrets of `gateway ray deploy`: kept off every command line.

A flag's value is in the process's argv, which `ps` shows to every user of the machine, and `gateway ray deploy`
used to pass the gateway's options as flags to every node (its `status` showed them too). The secret options
(`--api-key`, `--upstream-api-key`, `--cluster-secret`) therefore travel apart: the deployer reads them from a file
(`--api-key-file`, `--upstream-api-key-file`: the first line) or from its environment (GATEWAY_API_KEY,
GATEWAY_UPSTREAM_API_KEY), and each node's gateway gets them in its environment (gateway.deploy.node builds
that environment; /proc/PID/environ is readable by its owner only). Given as flags they still work, with a
warning, and are moved out of the flags the same way.

They are still part of the detached actors' creation arguments, which Ray keeps in its GCS: anyone who can run
code on the cluster can read them, as they could read any file on its nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from gateway.config import ConfigError

# serve flag -> the gateway's env var for it (gateway/config.py OPTIONS)
SECRET_FLAGS = {"--api-key": "GATEWAY_API_KEY", "--upstream-api-key": "GATEWAY_UPSTREAM_API_KEY",
                "--cluster-secret": "GATEWAY_CLUSTER_SECRET"}
# Shared by every node's gateway so that a Responses API id one makes, another reads (dataplane/responses.py):
# drawn once by the first deploy when none is given, and kept by later ones (a new one would strand every id).
CLUSTER_SECRET = "GATEWAY_CLUSTER_SECRET"


def read_secret_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.readline().strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{flag} {path}: the first line is empty")
    return value


def split_secrets(serve_args: Sequence[str], files: Mapping[str, str | None],
                  environ: Mapping[str, str]) -> tuple[list[str], dict[str, str], list[str]]:
    """(serve args without the secret flags, {env var: secret}, warnings).

    `files` maps a secret flag (--api-key) to the file given for it (--api-key-file) or None. Precedence, as for
    every option: a flag (file or value) wins over the environment.
    """
    args: list[str] = []
    secrets: dict[str, str] = {}
    warnings: list[str] = []
    items = iter(serve_args)
    for item in items:
        flag, sep, value = item.partition("=")
        flag = _secret_flag(flag)
        if flag is None:
            args.append(item)
            continue
        if not sep:
            value = next(items, "")
        if not value:
            raise ConfigError(f"{flag} needs a value")
        secrets[SECRET_FLAGS[flag]] = value
        warnings.append(f"{flag} on the command line is visible to every user (ps); give {flag}-file FILE or "
                        f"{SECRET_FLAGS[flag]} in the environment instead. It is passed to the gateways in their "
                        "environment, not as a flag")
    for flag, env_name in SECRET_FLAGS.items():
        path = files.get(flag)
        if path:
            if env_name in secrets:
                raise ConfigError(f"give {flag} or {flag}-file, not both")
            secrets[env_name] = read_secret_file(path, flag + "-file")
        elif env_name not in secrets and environ.get(env_name):
            secrets[env_name] = environ[env_name]
    return args, secrets, warnings


def _secret_flag(flag: str) -> str | None:
    """The secret flag `flag` names, abbreviations included (argparse takes `--upstream-api` for
    `--upstream-api-key` when no other option starts so), or None."""
    if flag in SECRET_FLAGS:
        return flag
    if not flag.startswith("--") or len(flag) < 3:
        return None
    from gateway.config import OPTIONS

    named = {option.cli_flag for option in OPTIONS if option.cli_flag.startswith(flag)}
    return next(iter(named)) if len(named) == 1 and named <= SECRET_FLAGS.keys() else None


def digest(secrets: Mapping[str, str]) -> str:
    """What tells two sets of secrets apart without showing them (a roll is due when it changes)."""
    text = "\n".join(f"{name}={value}" for name, value in sorted(secrets.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
