"""What the engine returns: plain data (arrays and tensors), no models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from birdfg.data import display_name
from birdfg.explanations import Evidence
from birdfg.models import ENSEMBLE_KEY
from birdfg.overlay import Box


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
    photo: Image.Image | None = None  # the photo as shown (longer side <= DISPLAY_SIDE), with evidence
    boxes: dict[str, Box] = field(default_factory=dict)  # per model: the part of `photo` it saw

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
