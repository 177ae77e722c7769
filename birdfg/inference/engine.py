"""The inference engine: a loaded model set -> one `Comparison` per photo.

Models that share a frozen trunk and preprocessing form a group: the trunk runs once per photo
batch for all of them, then each model's own part (its top stages and head) on the trunk's
output. Each part runs in ONNX Runtime when it is installed (see runtime.py), else in torch.
Every explanation comes from the evidence of the pass that made the prediction.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from birdfg.checkpoints import LoadedModel, ModelSet
from birdfg.data import build_transform
from birdfg.explanations import Evidence, Explanation, explanations_of
from birdfg.images import ImageSource, open_rgb
from birdfg.inference.parts import GroupPart, ModelPart, Outputs
from birdfg.inference.results import Comparison, ModelResult
from birdfg.inference.runtime import OnnxRunner, TorchRunner, runner
from birdfg.inference.threads import limit_threads
from birdfg.overlay import crop_box, overlay

log = logging.getLogger("birdfg.inference")


@dataclass
class Group:
    """Models that share one trunk pass and one preprocessing (a group of one runs its whole
    model), and where the group runs."""

    keys: list[str]
    runner: TorchRunner | OnnxRunner
    torch_runner: TorchRunner  # the reference, and the fallback when the runner fails


class Engine:
    """Runs a model set on photos. Build once and share: calls from several threads are
    serialised (a pass already keeps every core busy).

    `runtime`: "auto" (ONNX Runtime when installed, else torch), "onnx" or "torch". `threads`:
    ONNX Runtime's threads per session (default: one per usable CPU; several processes sharing a
    machine give each its share). With `warm_up`, one synthetic comparison (maps too) runs at once, so that the first visitor
    does not pay for the runtime's first-call set-up."""

    def __init__(self, model_set: ModelSet, runtime: str = "auto", warm_up: bool = True,
                 threads: int | None = None):
        if not model_set.models:
            raise ValueError(f"{model_set.folder}: no usable model ({'; '.join(model_set.errors.values())}).")
        limit_threads()
        self.model_set = model_set
        self.models: dict[str, LoadedModel] = model_set.models
        self.classes = next(iter(self.models.values())).classes
        self.methods: dict[str, list[Explanation]] = {k: explanations_of(m.model) for k, m in self.models.items()}
        self._transforms = {k: build_transform(m.preprocess, train=False) for k, m in self.models.items()}
        self._lock = threading.Lock()
        self.groups = self._build_groups(runtime, threads)
        if warm_up:
            self.warm_up()

    @property
    def runtimes(self) -> dict[str, str]:
        """Where each model runs ("onnx" or "torch")."""
        return {key: group.runner.runtime for group in self.groups for key in group.keys}

    def _build_groups(self, runtime: str, threads: int | None) -> list[Group]:
        by_signature: dict[tuple, list[str]] = {}
        for key, m in self.models.items():
            signature = (id(m.model.backbone), repr(sorted(m.preprocess.items())))
            by_signature.setdefault(signature, []).append(key)
        groups = []
        for keys in by_signature.values():
            first = self.models[keys[0]]
            shared = len(keys) > 1  # one trunk pass for several models
            part = GroupPart(first.model.backbone if shared else None,
                             {key: ModelPart(self.models[key].model, from_photos=not shared) for key in keys}).eval()
            size = first.preprocess["input_size"]
            example = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
            name = "-".join(keys) + f"-{size[-1]}px"
            torch_runner = TorchRunner(part)
            chosen = runner(part, name, example, self.model_set.folder, runtime, torch_runner, threads)
            groups.append(Group(keys, chosen, torch_runner))
        return groups

    def warm_up(self) -> float:
        """One comparison (maps and overlays too) of a synthetic photo; returns its seconds."""
        start = time.perf_counter()
        comparison = self.compare(_noise_photo())
        for key in comparison.answered:
            self.overlay(comparison, key)
        return time.perf_counter() - start

    # --- the one path ----------------------------------------------------------------------------

    def run(self, photos: list[Image.Image], evidence: bool = False) -> list[Comparison]:
        """Every model's answer for already-opened photos; with `evidence`, what the explanations
        need too. A model that fails gives its error in its result; the others still answer."""
        if not photos:
            raise ValueError("No photos to classify.")
        with self._lock:
            per_model: dict[str, list] = {}
            for group in self.groups:
                per_model.update(self._run_group(group, photos, evidence))
        return [Comparison(self.classes, {key: per_model[key][i] for key in self.models}) for i in range(len(photos))]

    def _run_group(self, group: Group, photos: list[Image.Image], evidence: bool) -> dict[str, list[ModelResult]]:
        """The group's models on the photos, in one runtime call (callers size the batches)."""
        began = time.perf_counter()
        transform = self._transforms[group.keys[0]]
        x = torch.stack([transform(photo) for photo in photos])
        try:
            outputs = group.runner(x, evidence)
        except Exception as exc:  # noqa: BLE001 - the torch path still answers, model by model
            if group.runner is group.torch_runner:
                raise
            log.warning("%s failed in %s (%s: %s); answering in torch", group.keys, group.runner.runtime,
                        type(exc).__name__, exc)
            outputs = group.torch_runner(x, evidence)
        latency_ms = (time.perf_counter() - began) * 1000
        return {key: self._results(key, outputs[key], x, evidence, latency_ms) for key in group.keys}

    def _results(self, key: str, out: Outputs | Exception, x: torch.Tensor, evidence: bool,
                 latency_ms: float) -> list[ModelResult]:
        """One model's results for a chunk of photos (`x`, preprocessed), from its part's outputs."""
        name = self.models[key].display_name
        photos = len(x)
        if isinstance(out, Exception):
            return [ModelResult(key, name, error=f"{type(out).__name__}: {out}") for _ in range(photos)]
        layers = sorted((n for n in out if n.startswith("attention.")), key=lambda n: int(n.split(".")[1]))
        results = []
        for i in range(photos):
            kept = None
            if evidence:
                kept = Evidence(out["features"][i:i + 1], [out[n][i:i + 1] for n in layers], out["shared"][i:i + 1],
                                x[i:i + 1])
            results.append(ModelResult(key, name, out["probs"][i].float().numpy(), latency_ms, evidence=kept))
        return results

    def preprocess(self, key: str, photo: Image.Image) -> torch.Tensor:
        """Model `key`'s input tensor for a photo: (3, H, W), as `run` feeds it."""
        return self._transforms[key](photo)

    def probabilities(self, key: str, x: torch.Tensor, batch_size: int = 32) -> dict[str, np.ndarray]:
        """Class probabilities (B, classes) for already-preprocessed inputs `x` (B, 3, H, W) of
        model `key` and of every model that shares its group (and so its input), e.g. perturbed
        copies of a photo (the faithfulness tests); in batches of `batch_size`."""
        group = next(g for g in self.groups if key in g.keys)
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in group.keys}
        with self._lock:
            for start in range(0, len(x), batch_size):
                chunk = x[start:start + batch_size]
                try:
                    out = group.runner(chunk, False)
                except Exception:  # noqa: BLE001 - as in _run_group: torch still answers
                    if group.runner is group.torch_runner:
                        raise
                    out = group.torch_runner(chunk, False)
                for k in group.keys:
                    if isinstance(out[k], Exception):
                        raise out[k]
                    chunks[k].append(out[k]["probs"].float().numpy())
        return {k: np.concatenate(c) for k, c in chunks.items()}

    def compare(self, source: ImageSource) -> Comparison:
        """Classify and explain one photo with every model. Raises ImageError for bad input."""
        photo = open_rgb(source)
        comparison = self.run([photo], evidence=True)[0]
        # The display copy is made later, from this (results.Comparison.photo): never from an
        # image the caller may still change.
        comparison.source = photo.copy() if photo is source else photo
        comparison.boxes = {key: crop_box(comparison.display_size, m.preprocess) for key, m in self.models.items()}
        return comparison

    # --- explanations ------------------------------------------------------------------------------

    def method(self, key: str, name: str | None = None) -> Explanation:
        """Model `key`'s explanation method `name` (default: its first)."""
        methods = self.methods[key]
        if name is None:
            return methods[0]
        for method in methods:
            if method.name == name:
                return method
        raise ValueError(f"{key} offers no {name!r} map; it offers {[m.name for m in methods]}.")

    def explain(self, comparison: Comparison, key: str, class_index: int | None = None,
                method: str | None = None, rather: int | None = None, **options: Any) -> np.ndarray:
        """The map of model `key` for `class_index` (default: its own top guess), rather than
        class `rather` when given (the map of the difference of their logits)."""
        evidence = _evidence(comparison, key)
        chosen = self.method(key, method)
        c = comparison.predicted(key) if class_index is None else class_index
        return chosen.grid(evidence, c, None if rather == c else rather, **chosen.resolve(options))

    def explain_all(self, comparison: Comparison, key: str, targets: list, method: str | None = None,
                    **options: Any) -> np.ndarray:
        """Model `key`'s maps for many (class, rather-than class or None) targets at once: (T, H, W)."""
        chosen = self.method(key, method)
        return chosen.grids(_evidence(comparison, key), targets, **chosen.resolve(options))

    def overlay(self, comparison: Comparison, key: str, class_index: int | None = None, opacity: float = 0.5,
                method: str | None = None, rather: int | None = None, **options: Any) -> Image.Image:
        """That map drawn on the photo (the part the model did not see dimmed)."""
        grid = self.explain(comparison, key, class_index, method, rather, **options)
        return overlay(comparison.photo, grid, comparison.boxes[key], opacity)

    def parts_of(self, comparison: Comparison, key: str, class_index: int | None = None, method: str | None = None,
                 k: int = 4, side: int = 160) -> list[tuple[str, Image.Image]]:
        """The map's largest terms (e.g. a B-CNN's channel pairs) as small overlays; [] when the
        method has none."""
        chosen = self.method(key, method)
        c = comparison.predicted(key) if class_index is None else class_index
        terms = chosen.parts(_evidence(comparison, key), c, k)
        if not terms:
            return []
        small = comparison.photo.copy()
        small.thumbnail((side, side))
        scale = small.width / comparison.photo.width
        box = tuple(v * scale for v in comparison.boxes[key])
        return [(caption, overlay(small, grid, box, 0.6)) for caption, grid in terms]



def _evidence(comparison: Comparison, key: str) -> Evidence:
    result = comparison.results[key]
    if not result.ok:
        raise ValueError(f"{key}: no result ({result.error})")
    if result.evidence is None:
        raise ValueError(f"{key}: this result was computed without evidence (run with evidence=True)")
    return result.evidence


def _noise_photo() -> Image.Image:
    """A synthetic photo for warming up."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8))
