"""How many CPUs inference may use (a free Hugging Face Space has 2 vCPUs)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota. A
    container limited to 2 CPUs by quota still *sees* every host core, and one thread per host
    core on 2 CPUs' worth of time makes the threads wait on each other."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota)) if quota else cpus


def _cgroup_quota() -> int | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return math.ceil(int(limit) / int(period)) if limit != "max" else None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return math.ceil(limit / period) if limit > 0 else None
    except (OSError, ValueError):
        return None


def configure_threads(threads: int | None = None) -> int:
    """One intra-op thread per usable CPU (or `threads`, or $BIRDFG_THREADS); returns the count."""
    if threads is None:
        threads = int(os.environ.get("BIRDFG_THREADS", "0") or 0) or usable_cpus()
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def limit_threads() -> int:
    """Never more torch threads than usable CPUs; a lower setting is left as it is."""
    if torch.get_num_threads() > usable_cpus():
        torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()
