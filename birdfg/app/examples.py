"""The example photos offered under the upload box (`--examples DIR`)."""
from __future__ import annotations

import logging
from pathlib import Path

from birdfg.data import IMAGE_SUFFIXES

log = logging.getLogger("birdfg.app")


def find_examples(folder: Path | None, limit: int = 12) -> list[Path]:
    """Up to `limit` photos from `folder`: one per sub-folder first (a class each in the
    bird_dataset layout), so the gallery shows different species."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        log.warning("--examples %s: no such folder; no examples shown", folder)
        return []
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    first_per_folder: dict[Path, Path] = {}
    for p in photos:
        first_per_folder.setdefault(p.parent, p)
    picked = list(first_per_folder.values())[:limit]
    picked += [p for p in photos if p not in picked][: limit - len(picked)]
    return picked
