"""What the benchmark reads from /proc: a process tree's CPU seconds and RSS, and the machine's other load."""

from __future__ import annotations

import os

from gateway.stacks.procs import descendants

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_tree(root: int) -> list[int]:
    """root and all its descendants (workers forked by a master)."""
    return [root, *descendants(root)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def busy_seconds() -> float:
    """CPU time all cores spent busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def foreign_probe() -> tuple[float, float]:
    """(all busy CPU, CPU of this process tree): their difference is load from processes not ours."""
    return busy_seconds(), cpu_seconds(proc_tree(os.getpid()))


def rss_bytes(pids: list[int]) -> dict[int, int]:
    out = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                out[p] = int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return out
