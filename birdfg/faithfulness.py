"""How faithful is a map? Deletion and insertion curves, pointing games, and their baselines.

**Deletion and insertion** (Petsiuk, Das & Saenko, BMVC 2018, "RISE"). The map (a grid over the
model's centre crop) is upsampled bilinearly to the model's input size and its pixels ranked,
most salient first (ties in a seeded random order, so that a map with flat regions, e.g. a
ReLU'd GradCAM, is not favoured or hurt by a scan order). Then, in `steps` equal steps from 0 to
100 % of the pixels (default 20 steps of 5 %: 21 points):

- *deletion* starts from the input and sets the most salient pixels to **0 after
  normalisation**, i.e. the normalisation's mean colour (grey for the lite set, whose mean is
  0.5): a removed pixel carries no contrast, and "grey" is the same for every photo;
- *insertion* starts from a **Gaussian-blurred copy of the input** (sigma 5 px at 224 px, scaled
  with the input side: 7.1 px at 320 px; reflected borders) and restores the most salient
  pixels to their true values: a blurred photo keeps the colours and the layout but not the
  detail, so insertion asks whether the map finds the detail the model needs.

At each point the model's probability (softmax) of the class is recorded; the AUC is the
trapezoid rule over the fraction axis (0..1), so it lies in [0, 1]. A faithful map gives a
**low deletion AUC** (the class vanishes as soon as its evidence does) and a **high insertion
AUC**. The perturbed inputs replace single pixels of the model's own input tensor, after
resizing and cropping, so the model sees exactly the pixels the map ranked.

**Baselines.** A *random map* (uniform noise on the same grid as the model's maps, seeded per
photo, upsampled the same way: a map that points at random blobs of the same size) and a
*centre prior* (a Gaussian at the crop centre, sigma a quarter of the side): a map must beat
the random map to mean anything, and the centre prior to be worth more than "birds are in the
middle of the photo".

**Pointing games.** The pointing game asks whether the map's peak (the centre of its highest
grid cell) lies inside the bird box; its baseline is the *centre point* (is the photo centre
inside the box? the centre crop is centred, so that is the crop centre too). The energy-based
pointing game (Wang et al. 2020, Score-CAM) is the share of the map's positive mass inside the
box; its baseline is the box's share of the crop area (the score of a flat map).

Everything here is plain functions of tensors, arrays and a `probs_fn(batch) -> (B, classes)`;
the functions at the end (`deletion_test`, `measure_photo`) run them on an `Engine`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

if TYPE_CHECKING:
    from PIL import Image

    from birdfg.inference import Comparison, Engine

DELETION, INSERTION = "deletion", "insertion"
MODES = (DELETION, INSERTION)
DEFAULT_STEPS = 20  # 5 % steps: 21 points
BLUR_SIGMA_AT_224 = 5.0  # px, Petsiuk et al.'s insertion blur; scaled with the input side
CENTRE_SIGMA = 0.25  # the centre prior's sigma, as a share of the crop side
# Names of the maps that are not a model's own method.
RANDOM, CENTRE, GRADCAM = "random", "centre", "gradcam"
BASELINE_LABELS = {RANDOM: "random map", CENTRE: "centre prior (Gaussian)", GRADCAM: "pytorch-grad-cam GradCAM"}

ProbsFn = Callable[[torch.Tensor], np.ndarray]  # (B, 3, H, W) -> (B, classes)
UnitBox = tuple[float, float, float, float]  # (left, top, right, bottom) as shares of the crop side


# --- curves ------------------------------------------------------------------------------------

def fractions(steps: int = DEFAULT_STEPS) -> np.ndarray:
    """The fractions of pixels removed / restored: steps + 1 points from 0 to 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    return np.linspace(0.0, 1.0, steps + 1)


def auc(fracs: Sequence[float], probs: Sequence[float]) -> float:
    """Area under a curve by the trapezoid rule over the fraction axis."""
    return float(np.trapezoid(np.asarray(probs, dtype=np.float64), np.asarray(fracs, dtype=np.float64)))


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map resized bilinearly to `size` (H, W), as float32."""
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) == tuple(size):
        return t[0, 0].numpy()
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def pixel_order(saliency: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat pixel indices of an (H, W) map, most salient first; equal values in a random order
    drawn from `seed`."""
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    tiebreak = np.random.default_rng(seed).random(flat.size)
    return np.lexsort((tiebreak, -flat))


def blur_sigma(side: int) -> float:
    return BLUR_SIGMA_AT_224 * side / 224


def blurred(x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """The insertion start: a Gaussian blur of the (3, H, W) input (reflected borders)."""
    sigma = blur_sigma(x.shape[-1]) if sigma is None else sigma
    radius = min(math.ceil(3 * sigma), min(x.shape[-2:]) - 1)  # reflected padding needs radius < side
    kernel = 2 * radius + 1
    return gaussian_blur(x[None], [kernel, kernel], [sigma, sigma])[0]


def deleted(x: torch.Tensor) -> torch.Tensor:
    """What a deleted pixel becomes: 0 after normalisation, the dataset mean colour."""
    return torch.zeros_like(x)


def steps_of(start: torch.Tensor, finish: torch.Tensor, order: np.ndarray, counts: Iterable[int]) -> torch.Tensor:
    """One input per count: `start` with its first `count` pixels of `order` taken from `finish`.
    (n, 3, H, W)."""
    _, h, w = start.shape
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    masks = torch.from_numpy(rank[None] < np.asarray(list(counts))[:, None]).view(-1, 1, h, w)
    return torch.where(masks, finish[None], start[None])


@dataclass
class Plan:
    """Every perturbed input of one photo for several maps and modes, each input once: the
    endpoints (the input itself, all grey, all blurred) are shared by every map. `rows[(map,
    mode)]` indexes `inputs` for each fraction; -1 stands for the unperturbed input when the
    caller already has its probabilities (`include_unperturbed=False`)."""

    fractions: np.ndarray
    inputs: torch.Tensor  # (N, 3, H, W)
    rows: dict[tuple[str, str], np.ndarray]

    def curves(self, probs: np.ndarray, unperturbed: np.ndarray | None = None) -> dict[tuple[str, str], np.ndarray]:
        """Each (map, mode)'s probabilities at every fraction, (points, classes), from `probs`
        (N, classes) of `inputs` (and `unperturbed`, (classes,), for the rows at -1)."""
        probs = np.asarray(probs)
        if unperturbed is not None:
            probs = np.concatenate([probs, np.asarray(unperturbed)[None]])  # row -1
        elif any((r < 0).any() for r in self.rows.values()):
            raise ValueError("this plan left the unperturbed input out: pass its probabilities")
        return {name: probs[r] for name, r in self.rows.items()}


def plan(x: torch.Tensor, saliencies: dict[str, np.ndarray], steps: int = DEFAULT_STEPS,
         modes: Sequence[str] = MODES, seed: int = 0, sigma: float | None = None,
         include_unperturbed: bool = True) -> Plan:
    """The perturbed inputs of `x` (3, H, W) for every map in `saliencies` (any grid; upsampled
    to H x W) and every mode."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    fracs = fractions(steps)
    _, h, w = x.shape
    counts = np.round(fracs * h * w).astype(np.int64)
    grey = deleted(x)
    blur = blurred(x, sigma) if INSERTION in modes else None
    endpoints = {"input": x, "grey": grey, "blur": blur}
    inputs: list[torch.Tensor] = []
    shared_rows: dict[str, int] = {}

    def shared(name: str) -> int:
        if name == "input" and not include_unperturbed:
            return -1
        if name not in shared_rows:
            shared_rows[name] = sum(len(t) for t in inputs)
            inputs.append(endpoints[name][None])
        return shared_rows[name]

    rows = {}
    inner = counts[1:-1]
    for name, grid in saliencies.items():
        order = pixel_order(upsample(grid, (h, w)), seed)
        for mode in modes:
            start, finish = ("input", "grey") if mode == DELETION else ("blur", "input")
            first, last = shared(start), shared(finish)
            begin = sum(len(t) for t in inputs)
            if len(inner):
                inputs.append(steps_of(endpoints[start], endpoints[finish], order, inner))
            rows[(name, mode)] = np.array([first, *range(begin, begin + len(inner)), last], dtype=np.int64)
    return Plan(fracs, torch.cat(inputs) if inputs else x[:0], rows)


@dataclass
class Curve:
    fractions: np.ndarray
    probs: np.ndarray  # the class's probability at each fraction

    @property
    def auc(self) -> float:
        return auc(self.fractions, self.probs)


def curves(probs_fn: ProbsFn, x: torch.Tensor, saliencies: dict[str, np.ndarray], class_index: int,
           steps: int = DEFAULT_STEPS, modes: Sequence[str] = MODES, seed: int = 0) -> dict[tuple[str, str], Curve]:
    """Deletion / insertion curves of class `class_index` for several maps of one input, from one
    call of `probs_fn` on every perturbed input."""
    p = plan(x, saliencies, steps, modes, seed)
    found = p.curves(np.asarray(probs_fn(p.inputs)))
    return {name: Curve(p.fractions, c[:, class_index]) for name, c in found.items()}


def deletion_curve(probs_fn: ProbsFn, x: torch.Tensor, saliency: np.ndarray, class_index: int,
                   steps: int = DEFAULT_STEPS, seed: int = 0) -> Curve:
    return curves(probs_fn, x, {"map": saliency}, class_index, steps, (DELETION,), seed)[("map", DELETION)]


def insertion_curve(probs_fn: ProbsFn, x: torch.Tensor, saliency: np.ndarray, class_index: int,
                    steps: int = DEFAULT_STEPS, seed: int = 0) -> Curve:
    return curves(probs_fn, x, {"map": saliency}, class_index, steps, (INSERTION,), seed)[("map", INSERTION)]


# --- baseline maps -------------------------------------------------------------------------------

def random_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Uniform noise on a grid of `shape`: the random baseline."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def centre_prior(size: tuple[int, int], sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """A Gaussian at the centre of an (H, W) crop, sigma a share of the side."""
    h, w = size
    ys = (np.arange(h) + 0.5) / h - 0.5
    xs = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / (2 * sigma ** 2)).astype(np.float32)


# --- pointing games -------------------------------------------------------------------------------

def unit_box(box: tuple[float, float, float, float], crop: tuple[float, float, float, float]) -> UnitBox:
    """A box in photo pixels as shares of the crop (the part of the photo the map covers),
    clipped to it."""
    left, top, right, bottom = crop
    sx, sy = right - left, bottom - top
    values = ((box[0] - left) / sx, (box[1] - top) / sy, (box[2] - left) / sx, (box[3] - top) / sy)
    return tuple(float(np.clip(v, 0.0, 1.0)) for v in values)  # type: ignore[return-value]


def inside(point: tuple[float, float], box: UnitBox) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def peak(grid: np.ndarray) -> tuple[float, float]:
    """The centre of the map's highest cell, (x, y) as shares of the crop."""
    rows, cols = grid.shape
    r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return (c + 0.5) / cols, (r + 0.5) / rows


def pointing_hit(grid: np.ndarray, box: UnitBox) -> bool:
    """The pointing game: is the map's peak inside the box?"""
    return inside(peak(np.asarray(grid)), box)


def centre_hit(box: UnitBox) -> bool:
    """The pointing game's centre-point baseline."""
    return inside((0.5, 0.5), box)


def box_mask(box: UnitBox, size: tuple[int, int]) -> np.ndarray:
    """Which pixels (by their centres) of an (H, W) crop lie inside the box."""
    h, w = size
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    return ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None]


def energy_inside(grid: np.ndarray, box: UnitBox, size: tuple[int, int] | None = None) -> float:
    """The energy-based pointing game: the share of the map's positive mass inside the box (the
    map upsampled bilinearly to `size` first, when given). A map with no positive mass scores 0."""
    heat = upsample(grid, size) if size is not None else np.asarray(grid, dtype=np.float32)
    positive = np.clip(heat, 0, None)
    total = float(positive.sum())
    return float(positive[box_mask(box, heat.shape)].sum()) / total if total > 0 else 0.0


def box_share(box: UnitBox) -> float:
    """The energy pointing game's baseline: the box's share of the crop (a flat map's score)."""
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


# --- pytorch-grad-cam ------------------------------------------------------------------------------

def gradcam_missing() -> str | None:
    """Why pytorch-grad-cam cannot be used here (None when it can)."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return "pytorch-grad-cam is not installed (`pip install grad-cam`, a dev dependency): GradCAM skipped"
    return None


def gradcam_target(model: nn.Module) -> nn.Module | None:
    """The last module of the model's own top: the feature map its head scores (None when the
    model has no top of its own)."""
    children = list(model.top.children()) if not isinstance(model.top, nn.Identity) else []
    return children[-1] if children else None


def gradcam_applies(engine: "Engine", key: str) -> bool:
    """GradCAM is the baseline for the maps that split a score exactly over the feature grid (the
    CNN's CAM, the B-CNN's bilinear split, the hybrid ViT's token contributions:
    `linear_in_class`), on a model with its own top: there, at the convolutional map the head
    scores (for the hybrid ViT, the one it turns into tokens)."""
    return engine.methods[key][0].linear_in_class and gradcam_target(engine.models[key].model) is not None


def gradcam_map(model: nn.Module, shared: torch.Tensor, class_index: int) -> np.ndarray:
    """pytorch-grad-cam's `GradCAM` of `class_index`, run on the model's own top + head from the
    shared trunk's output (1, C, h, w), target layer the top's last module: a map on the feature
    grid the head scores, with no backward pass through the trunk. For a linear head on average-
    pooled features it is CAM with its negative part cut, scaled to [0, 1] (the gradient of the
    logit is the class weight at every location)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    target = gradcam_target(model)
    if target is None:
        raise ValueError("GradCAM here needs a model with its own top (train_from)")
    with torch.enable_grad(), GradCAM(model=model.tail(), target_layers=[target]) as cam:
        grid = cam(input_tensor=shared.detach().clone(), targets=[ClassifierOutputTarget(class_index)])[0]
    return np.asarray(grid, dtype=np.float32)


# --- on an engine ----------------------------------------------------------------------------------

def _group_of(engine: "Engine", key: str) -> list[str]:
    return next(g.keys for g in engine.groups if key in g.keys)


def _inputs(comparison: "Comparison", key: str, engine: "Engine", photo: "Image.Image | None") -> torch.Tensor:
    """The input the prediction's pass saw (its evidence keeps it), else the photo preprocessed."""
    evidence = comparison.results[key].evidence
    if evidence is not None and evidence.inputs is not None:
        return evidence.inputs[0]
    if photo is None:
        photo = comparison.photo
    if photo is None:
        raise ValueError("no input: run with evidence=True or pass the photo")
    return engine.preprocess(key, photo)


def deletion_test(engine: "Engine", comparison: "Comparison", photo: "Image.Image | None" = None,
                  classes: dict[str, int] | None = None, steps: int = 10) -> dict[str, dict]:
    """The deletion test of each model's default map for `classes[key]` (default: the model's
    own top guess) on one photo (a comparison with evidence, e.g. `Engine.compare`'s): per model
    {"method", "label", "class_index", "fractions", "probs", "auc"}. The perturbed inputs come
    from the input tensor the comparison's own pass saw (its evidence keeps it); `photo` is used
    only when it does not. One batched pass per group of models (the lite set: one pass for all
    three); the unperturbed point is the comparison's own probability."""
    classes = classes or {}
    answered = [k for k in engine.models if k in comparison.results and comparison.results[k].ok]
    out: dict[str, dict] = {}
    done: set[str] = set()
    for first in answered:
        if first in done:
            continue
        keys = [k for k in _group_of(engine, first) if k in answered]
        done.update(keys)
        x = _inputs(comparison, first, engine, photo)
        chosen = {k: classes.get(k, comparison.predicted(k)) for k in keys}
        maps = {k: engine.explain(comparison, k, chosen[k]) for k in keys}
        p = plan(x, maps, steps, (DELETION,), include_unperturbed=False)
        probs = engine.probabilities(first, p.inputs, batch_size=max(len(p.inputs), 1))
        for k in keys:
            curve = p.curves(probs[k], comparison.probs(k))[(k, DELETION)][:, chosen[k]]
            method = engine.method(k)
            out[k] = {"method": method.name, "label": method.label, "class_index": int(chosen[k]),
                      "fractions": p.fractions.round(4).tolist(), "probs": curve.astype(float).tolist(),
                      "auc": auc(p.fractions, curve)}
    return out


@dataclass
class PhotoTarget:
    """What `measure_photo` needs besides the comparison: the true class, the bird box (photo
    pixels, in the photo the comparison saw) and the photo's size, and the random map's seed."""

    label: int
    photo_size: tuple[int, int]
    box: tuple[float, float, float, float] | None = None
    seed: int = 0


def measure_photo(engine: "Engine", comparison: "Comparison", target: PhotoTarget, steps: int = DEFAULT_STEPS,
                  gradcam: bool = True) -> dict[str, dict]:
    """Deletion and insertion AUC (with curves), pointing and energy pointing of every method of
    every model for the true class, and of the baselines (random map, centre prior, GradCAM where
    `gradcam_applies`), on one photo. One `engine.probabilities` call per group of
    models: the baselines' perturbed inputs serve every model of the group.

    Per model: {"methods": {name: {"deletion", "insertion", "deletion_curve", "insertion_curve",
    "hit", "energy", "peaks_differ"}}, "centre_hit", "box_share", "gradcam_vs_relu_default"}."""
    from birdfg.overlay import crop_box, normalise

    label = target.label
    out: dict[str, dict] = {}
    done: set[str] = set()
    for first in engine.models:
        if first in done:
            continue
        keys = _group_of(engine, first)
        done.update(keys)
        failed = [k for k in keys if not comparison.results[k].ok]
        if failed:
            raise RuntimeError(f"model {failed[0]} failed: {comparison.results[failed[0]].error}")
        x = _inputs(comparison, first, engine, None)
        size = tuple(x.shape[-2:])
        maps: dict[str, np.ndarray] = {}
        rivals: dict[str, int] = {}
        extra: dict[str, dict] = {k: {} for k in keys}
        for k in keys:
            probs = comparison.probs(k)
            rivals[k] = int(np.argmax(np.where(np.arange(len(probs)) == label, -np.inf, probs)))
            for method in engine.methods[k]:
                pair = engine.explain_all(comparison, k, [(label, None), (rivals[k], None)], method.name)
                maps[f"{k}/{method.name}"] = pair[0]
                extra[k][method.name] = {"peaks_differ": bool(np.argmax(pair[0]) != np.argmax(pair[1]))
                                         if method.class_specific else None}
            if gradcam and gradcam_applies(engine, k):
                grid = gradcam_map(engine.models[k].model, comparison.results[k].evidence.shared, label)
                maps[f"{k}/{GRADCAM}"] = grid
                own = maps[f"{k}/{engine.methods[k][0].name}"]
                if own.shape == grid.shape:  # GradCAM's own scaling: ReLU, then min-max to [0, 1]
                    extra[k]["_gradcam_gap"] = float(np.abs(normalise(np.clip(own, 0, None)) - grid).max())
        grid_shape = maps[f"{first}/{engine.methods[first][0].name}"].shape
        maps[RANDOM] = random_map(grid_shape, target.seed)
        maps[CENTRE] = centre_prior(size)
        p = plan(x, maps, steps, MODES, seed=target.seed, include_unperturbed=False)
        probs = engine.probabilities(first, p.inputs)
        for k in keys:
            found = p.curves(probs[k], comparison.probs(k))
            crop = crop_box(target.photo_size, engine.models[k].preprocess)
            box = unit_box(target.box, crop) if target.box is not None else None
            names = [m.name for m in engine.methods[k]] + ([GRADCAM] if f"{k}/{GRADCAM}" in maps else [])
            methods = {}
            for name in [*names, CENTRE, RANDOM]:
                source = f"{k}/{name}" if name in names else name
                entry: dict = {}
                for mode in MODES:
                    curve = found[(source, mode)][:, label].astype(float)
                    entry[mode] = auc(p.fractions, curve)
                    entry[f"{mode}_curve"] = curve.tolist()
                entry["hit"] = pointing_hit(maps[source], box) if box is not None else None
                entry["energy"] = energy_inside(maps[source], box, size) if box is not None else None
                entry["peaks_differ"] = extra[k].get(name, {}).get("peaks_differ")
                methods[name] = entry
            if CENTRE in methods and box is not None:
                methods[CENTRE]["hit"] = centre_hit(box)  # the peak of a centred map is the centre
            out[k] = {"methods": methods, "centre_hit": centre_hit(box) if box is not None else None,
                      "box_share": box_share(box) if box is not None else None, "runner_up": rivals[k],
                      "gradcam_vs_relu_default": extra[k].get("_gradcam_gap")}
    return out
