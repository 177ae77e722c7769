"""What the engine returns: plain data (arrays and tensors), no models."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from birdfg.data import display_name
from birdfg.explanations import Evidence
from birdfg.models import ENSEMBLE_KEY
from birdfg.overlay import Box


DISPLAY_SIDE = 512  # maps are drawn on a copy of the photo this large (longer side)


def display_size(size: tuple[int, int], side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """The size of `Image.thumbnail((side, side))` of an image of `size`, without resizing it:
    PIL's rounding, the whole side that keeps the aspect ratio closest (tests check it against
    PIL's own)."""
    width, height = size
    if side >= width and side >= height:
        return width, height
    aspect = width / height

    def closest(number: float, error) -> int:
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    if aspect <= 1:  # portrait or square: as tall as `side`
        return closest(side * aspect, lambda n: abs(aspect - n / side)), side
    return side, closest(side / aspect, lambda n: 0 if n == 0 else abs(aspect - side / n))


@dataclass
class ModelResult:
    key: str
    name: str
    probs: np.ndarray | None = None  # (classes,)
    latency_ms: float = 0.0
    error: str | None = None
    evidence: Evidence | None = None  # from the pass that made `probs` (when asked for)

    @property
    def ok(self) -> bool:
        return self.error is None


def ensemble(probs: list[np.ndarray]) -> np.ndarray | None:
    """The ensemble's probabilities: the mean of the models' softmaxes (None without any)."""
    return np.mean(probs, axis=0) if probs else None


@dataclass
class Comparison:
    """Every model's answer for one photo."""

    classes: list[str]
    results: dict[str, ModelResult]
    source: Image.Image | None = None  # the photo the models were given (set by the engine's compare; <= 1024 px)
    boxes: dict[str, Box] = field(default_factory=dict)  # per model: the part of `photo` it saw
    _shown: Image.Image | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def display_size(self) -> tuple[int, int] | None:
        """The size of `photo`, known without making it."""
        return display_size(self.source.size) if self.source is not None else None

    @property
    def photo(self) -> Image.Image | None:
        """The photo as shown (longer side <= DISPLAY_SIDE), made when first asked for: only maps
        drawn on the server need it (the page draws on its own copy of the photo), and it costs a
        resize of every photo larger than DISPLAY_SIDE (benchmarks/README.md, "Browser")."""
        if self._shown is None and self.source is not None:
            shown = self.source.copy()
            shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
            self._shown = shown
        return self._shown

    @property
    def ensemble_probs(self) -> np.ndarray | None:
        return ensemble([r.probs for r in self.results.values() if r.ok])

    def probs(self, key: str) -> np.ndarray | None:
        """A model's (or the ensemble's) probabilities; None when it has none."""
        if key == ENSEMBLE_KEY:
            return self.ensemble_probs
        result = self.results.get(key)
        return result.probs if result is not None and result.ok else None

    def top(self, probs: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-probs)[:k]
        return [(display_name(self.classes[i]), float(probs[i])) for i in order]

    def predicted(self, key: str) -> int:
        return int(np.argmax(self.probs(key)))

    @property
    def answered(self) -> dict[str, ModelResult]:
        return {k: r for k, r in self.results.items() if r.ok}

    @property
    def agree(self) -> bool:
        """Every model answered, with the same top-1."""
        tops = {self.predicted(k) for k in self.answered}
        return len(tops) == 1 and len(self.answered) == len(self.results)

    def to_json(self) -> dict[str, Any]:
        """The `/compare` API contract."""
        models = {}
        for key, r in self.results.items():
            entry: dict[str, Any] = {"name": r.name, "top5": self.top(r.probs) if r.ok else [],
                                     "latency_ms": round(r.latency_ms, 1)}
            if not r.ok:
                entry["error"] = r.error
            models[key] = entry
        ensemble_probs = self.ensemble_probs
        return {"models": models, "ensemble": {"top5": self.top(ensemble_probs) if ensemble_probs is not None else []},
                "agree": self.agree}
