"""The engine of whichever birdfg is importable, behind one small interface: this tree's
`birdfg.inference.Engine`, or the `birdfg.compare.Comparator` it replaced (so that a benchmark
or an answer check can run against a revision from before the engine)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class AnyEngine:
    def __init__(self, folder: Path):
        from birdfg.checkpoints import load_set

        try:
            from birdfg.inference import Engine
        except ImportError:
            from birdfg.compare import Comparator

            self.engine, self.new = Comparator(load_set(folder)), False
        else:
            self.engine, self.new = Engine(load_set(folder)), True
        self.keys = list(self.engine.models)

    def compare(self, path: Path):
        return self.engine.compare(path)

    def overlays(self, comparison) -> list:
        """Every answering model's default map drawn on the photo, as the app shows them."""
        if self.new:
            return [self.engine.overlay(comparison, key) for key in comparison.answered]
        return [comparison.overlay(key) for key, r in comparison.results.items() if r.ok]

    def first_answer(self, path: Path) -> None:
        """The page's first update: the comparison and every model's quick map data (none before
        the maps were drawn in the page: such a revision compares only)."""
        comparison = self.engine.compare(path)
        try:
            from birdfg.app.map_data import model_maps
        except ImportError:
            return
        for key in comparison.answered:
            model_maps(self.engine, comparison, key, every_class=False)

    def every_map(self, comparison) -> list[np.ndarray]:
        """Every answering model's default map for every class, (classes, H, W) each."""
        if not self.new:
            raise NotImplementedError("the Comparator from before the engine has no maps for many classes at once")
        every = [(c, None) for c in range(len(self.engine.classes))]
        return [self.engine.explain_all(comparison, key, every) for key in comparison.answered]

    def grid(self, comparison, key: str, cls: int | None = None, **view) -> np.ndarray:
        if self.new:
            return self.engine.explain(comparison, key, cls, "layer" if view else None, **view)
        return comparison.class_map(key, cls, **view)

    def pairs(self, comparison, key: str) -> list:
        import torch

        result = comparison.results[key]
        features = result.evidence.features if self.new else result.features
        with torch.inference_mode():
            return self.engine.models[key].model.head.top_pairs(features, comparison.predicted(key), 4)

    def batch_top1(self, photos: list) -> dict[str, list[int]]:
        if self.new:
            comparisons = self.engine.run(photos)
            return {k: [c.predicted(k) for c in comparisons] for k in self.keys}
        probs = self.engine.classify(photos)
        return {k: probs[k].argmax(-1).tolist() for k in self.keys}
