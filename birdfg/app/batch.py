"""Batch mode: many photos -> one row each (every model's top-1 and confidence, the ensemble's,
and a note), shown as a table and saved as a CSV."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from birdfg.data import display_name
from birdfg.images import ImageError, open_rgb
from birdfg.inference import Comparison, Engine
from birdfg.models import ENSEMBLE_KEY

MAX_BATCH = 64  # photos per batch request: ~0.3 s each on two cores
BATCH_SIZE = 16  # photos opened and run at once: bounds the memory of a big request


def batch_headers(keys: list[str]) -> list[str]:
    """The CSV's columns: two per model and the ensemble (top-1, conf), then the note."""
    return ["photo"] + [f"{k} {what}" for k in [*keys, ENSEMBLE_KEY] for what in ("top-1", "conf")] + ["note"]


def classify_files(engine: Engine, paths: list[str | Path], names: list[str] | None = None,
                   batch_size: int = BATCH_SIZE) -> tuple[list[str], list[list]]:
    """Headers and one row per file: each model's top-1 species and probability, the ensemble's,
    and a note: why a file is unreadable (its other cells empty), or which model failed on it."""
    keys = list(engine.models)
    names = names or [Path(p).name for p in paths]
    rows: dict[int, list] = {}
    for start in range(0, len(paths), batch_size):
        photos, kept = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                photos.append(open_rgb(paths[i]))
                kept.append(i)
            except ImageError as exc:  # the message without the server-side upload path
                message = str(exc).replace(str(paths[i]), "").lstrip(": ")
                rows[i] = [names[i]] + [None] * (2 * len(keys) + 2) + [f"unreadable: {message}"]
        if photos:
            for i, comparison in zip(kept, engine.run(photos)):
                rows[i] = [names[i], *_cells(comparison, keys)]
    return batch_headers(keys), [rows[i] for i in sorted(rows)]


def _cells(comparison: Comparison, keys: list[str]) -> list:
    cells: list = []
    for key in [*keys, ENSEMBLE_KEY]:
        probs = comparison.probs(key)
        cells += [None, None] if probs is None else _top1(comparison.classes, probs)
    failed = [f"{k} failed: {r.error}" for k, r in comparison.results.items() if not r.ok]
    return cells + ["; ".join(failed)]


def _top1(classes: list[str], probs: np.ndarray) -> list:
    i = int(np.argmax(probs))
    return [display_name(classes[i]), round(float(probs[i]), 4)]


def display_table(headers: list[str], rows: list[list]) -> tuple[list[str], list[list]]:
    """The batch table as shown: one "species (37%)" cell per model (the CSV keeps two columns)."""
    keys = [h.removesuffix(" top-1") for h in headers[1:-1:2]]
    shown = []
    for row in rows:
        cells = [row[1 + 2 * i: 3 + 2 * i] for i in range(len(keys))]
        shown.append([row[0]] + [f"{s} ({100 * c:.0f}%)" if s is not None else "" for s, c in cells] + [row[-1]])
    return ["photo", *keys, "note"], shown
