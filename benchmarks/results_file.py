"""Where a benchmark's JSON goes: `write(path, report)` (folders made, indented, one final newline),
and what it records of the machine it ran on (`cpu_model`, `load_average`)."""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def cpu_model() -> str:
    """The CPU's model name (Linux), e.g. "AMD EPYC"; else what Python's platform module says."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or platform.machine())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
