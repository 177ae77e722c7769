"""Where a benchmark's JSON goes: `write(path, report)` (folders made, indented, one final newline)."""
from __future__ import annotations

import json
from pathlib import Path


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
