"""CPU time of a process tree — the benchmark, the tritonserver it started, the server's backend stubs — and
what it says about a concurrency sweep's gain.

A level's throughput is the cores its processes kept busy over the CPU time one request costs, so a gain over
the one-client level splits exactly into two factors:

    gain = (cores busy at N ÷ cores busy at 1) × (CPU per request at 1 ÷ CPU per request at N)

The first is what more clients found idle, the second what batching (or contention) did to each request.
With every core busy, the first is at most cores ÷ (cores busy at 1): the gain's bound at that level's CPU
cost. The clients run on the same machine and count too; their share is split out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or not Linux
        return None
    return text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces


def process_tree(root: int) -> dict[int, list[str]]:
    """`root` and its live descendants, each with its /proc stat fields after the command name; empty when `root`
    is gone or there is no /proc."""
    children: dict[int, list[int]] = {}
    fields: dict[int, list[str]] = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        stat = _stat_fields(pid)
        if stat is None:
            continue
        children.setdefault(int(stat[1]), []).append(int(pid))  # fields after the name: state ppid ...
        fields[int(pid)] = stat
    if root not in fields:
        return {}
    tree: dict[int, list[str]] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        tree[pid] = fields[pid]
        stack.extend(children.get(pid, ()))
    return tree


def tree_cpu_s(root: int | None = None) -> float | None:
    """User + system CPU seconds of `root` (default: this process) and its live descendants; None without /proc.

    A process that exits between two readings takes its time with it: the trees measured here (the server and
    its stubs) live across a level."""
    tree = process_tree(os.getpid() if root is None else root)
    if not tree:
        return None
    return sum(int(stat[11]) + int(stat[12]) for stat in tree.values()) / _TICKS  # utime, stime: 14th, 15th


def own_cpu_s() -> float:
    """This process's own CPU seconds (its client threads, and an in-process backend's engines)."""
    times = os.times()
    return times.user + times.system


def cpu_figures(tree_s: float | None, own_s: float, requests: int, elapsed_s: float) -> dict[str, Any]:
    """A level's CPU over `elapsed_s`: seconds in all, the benchmark process's own share (its clients, or an
    in-process backend), ms per request, cores busy."""
    if tree_s is None or not requests or not elapsed_s > 0:
        return {}
    return {"tree_s": tree_s, "own_s": own_s, "elapsed_s": elapsed_s, "ms_per_request": 1000 * tree_s / requests,
            "own_ms_per_request": 1000 * own_s / requests, "cores_busy": tree_s / elapsed_s}


def gain_factors(level: dict[str, Any], single: dict[str, Any], cores: int) -> dict[str, Any]:
    """The level's gain as (cores-busy ratio) × (CPU-per-request ratio) over the one-client level, and the bound
    with every core busy."""
    cpu, one = level.get("cpu") or {}, single.get("cpu") or {}
    if not cpu or not one:
        return {}
    busy = cpu["cores_busy"] / one["cores_busy"]
    cheaper = one["ms_per_request"] / cpu["ms_per_request"]
    return {"busy_ratio": busy, "cpu_ratio": cheaper, "bound_all_cores": cores / one["cores_busy"] * cheaper}
