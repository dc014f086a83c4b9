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
    """CPU time pids' threads have run, exactly: the scheduler's own clock (/proc/PID/task/TID/schedstat, first field,
    ns). utime+stime are sampled at each 10 ms tick instead: a paced point's proxy runs in bursts of tens of µs and
    uses ~0.1 core, so a 6-s window holds ~60 samples (±13 % by counting alone). What remains is the point's own
    variation from slice to slice (~10 %, see report.paired), which only many slices average out."""
    total = 0
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def tick_seconds(pids: list[int], kernel_only: bool = False) -> float:
    """utime+stime of pids (10 ms samples, as /proc/stat counts the machine's busy time); with kernel_only, stime
    alone: the kernel's share of a relayed event (syscalls, wake-ups, loopback delivery)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(b")") + 2:].split()
        total += (0 if kernel_only else int(fields[11])) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def busy_seconds() -> float:
    """CPU time all cores spent busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def foreign_probe() -> tuple[float, float]:
    """(all busy CPU, CPU of this process tree): their difference is load from processes not ours."""
    return busy_seconds(), tick_seconds(proc_tree(os.getpid()))


def rss_bytes(pids: list[int]) -> dict[int, int]:
    out = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                out[p] = int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return out
