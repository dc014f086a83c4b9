"""File descriptors: the gateway's one resource limit it can see coming.

A pumped stream holds 4 descriptors: the client socket, the replica socket, and the C pump's dup() of each
(gateway/dataplane/_pump.c, "Ownership"). Most systems start a process with a soft RLIMIT_NOFILE of 1024 and a
much higher hard limit, which any process may raise its soft limit to (setrlimit(2)); nginx (worker_rlimit_nofile)
and HAProxy (which sets it from maxconn) raise it the same way.

At start the soft limit goes up to the hard limit, and the client connections accepted at once are capped to what
the limit can hold: past the cap a new client gets the ordinary 503 `overloaded` answer from the server state,
instead of an accept(2) failing with EMFILE (libuv then accepts and closes the connection with nothing said:
src/unix/stream.c, uv__emfile_trick) or a replica connect failing mid-request.
"""

from __future__ import annotations

import logging
import os
import resource

from gateway.config import ConfigError

log = logging.getLogger("gateway")

FDS_PER_CONNECTION = 4
# Beyond what is open at start: health checks (one per replica at a time), router and discovery connections,
# idle pooled replica connections of connections already closed, log files, a TLS reload.
FDS_HEADROOM = 64


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. above fs.nr_open: keep what we have, say so below
            log.warning("file descriptors: could not raise the soft limit %d to %d: %s", soft, target, exc)
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft, now, hard


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs: assume a freshly started process
        return 32


def connection_cap(max_connections: int) -> int:
    """Raise the fd limit, then the client connections this process can hold at once (<= max_connections).

    A limit that cannot hold a single stream is a configuration that cannot work: ConfigError.
    """
    before, soft, hard = raise_fd_limit()
    reserve = open_fds() + FDS_HEADROOM
    if soft == resource.RLIM_INFINITY:
        room = max_connections
    else:
        room = (soft - reserve) // FDS_PER_CONNECTION
    raised = f" (raised from {before})" if soft != before else ""
    if room < 1:
        raise ConfigError(f"the file descriptor limit ({soft}, hard {hard}) cannot hold one connection: "
                          f"{reserve} are needed before the first one, {FDS_PER_CONNECTION} per connection; "
                          "raise it (ulimit -n, LimitNOFILE=, docker --ulimit nofile=)")
    if room < max_connections:
        log.warning("file descriptors: limit %d%s holds %d connections at %d each, not max_connections %d: "
                    "clients past %d get 503 overloaded; raise the hard limit (ulimit -Hn) to %d for all",
                    soft, raised, room, FDS_PER_CONNECTION, max_connections, room,
                    reserve + FDS_PER_CONNECTION * max_connections)
        return room
    log.info("file descriptors: limit %d%s, room for max_connections %d at %d each", soft, raised, max_connections,
             FDS_PER_CONNECTION)
    return max_connections
