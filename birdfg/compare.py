"""The `Comparator`: a loaded model set -> per-photo results (top-5, explanation evidence,
latency) for every model, plus the ensemble. Models that share a frozen backbone and input size
share one backbone pass; every explanation comes from the pass that made the prediction.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from birdfg import schedule, speed
from birdfg.backbones import backbone_cfg, chain
from birdfg.checkpoints import LoadedModel, ModelSet
from birdfg.data import build_transform, display_name
from birdfg.explain import (
    AttentionRecorder,
    attention_rollout,
    class_token_attention,
    crop_box,
    overlay,
)
from birdfg.heads import BilinearHead, LinearHead
from birdfg.images import ImageSource, open_rgb
from birdfg.models import ENSEMBLE_KEY

DISPLAY_SIDE = 512  # overlays are drawn on a copy of the photo this large (longer side)


@dataclass
class ModelResult:
    key: str
    name: str
    probs: np.ndarray | None = None
    latency_ms: float = 0.0
    error: str | None = None
    # Evidence for maps of any class, from the prediction's own forward pass.
    features: torch.Tensor | None = None
    attentions: list[torch.Tensor] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Comparison:
    photo: Image.Image  # the photo as shown (longer side <= DISPLAY_SIDE)
    classes: list[str]
    results: dict[str, ModelResult]
    ensemble_probs: np.ndarray | None
    models: dict[str, LoadedModel]

    def top(self, probs: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-probs)[:k]
        return [(display_name(self.classes[i]), float(probs[i])) for i in order]

    def predicted(self, key: str) -> int:
        probs = self.ensemble_probs if key == ENSEMBLE_KEY else self.results[key].probs
        return int(np.argmax(probs))

    @property
    def agree(self) -> bool:
        tops = {self.predicted(k) for k, r in self.results.items() if r.ok}
        return len(tops) == 1 and all(r.ok for r in self.results.values())

    def to_json(self) -> dict[str, Any]:
        """The `/compare` API contract."""
        models = {}
        for key, r in self.results.items():
            entry: dict[str, Any] = {"name": r.name, "top5": self.top(r.probs) if r.ok else [],
                                     "latency_ms": round(r.latency_ms, 1)}
            if not r.ok:
                entry["error"] = r.error
            models[key] = entry
        ensemble = {"top5": self.top(self.ensemble_probs) if self.ensemble_probs is not None else []}
        return {"models": models, "ensemble": ensemble, "agree": self.agree}

    @speed.on_torch_thread
    def class_map(self, key: str, class_index: int | None = None, layer: int | None = None,
                  head: int | None = None) -> np.ndarray:
        """The explanation grid of model `key` for `class_index` (default: its prediction)."""
        r = self.results[key]
        if not r.ok:
            raise ValueError(f"{key}: no result ({r.error})")
        c = self.predicted(key) if class_index is None else class_index
        return explanation(self.models[key].model.head, r.features, r.attentions, c, layer, head)

    def overlay(self, key: str, class_index: int | None = None, opacity: float = 0.5, **kw) -> Image.Image:
        box = crop_box(self.photo.size, self.models[key].preprocess)
        return overlay(self.photo, self.class_map(key, class_index, **kw), box, opacity)

    @speed.on_torch_thread
    def pair_maps(self, key: str, class_index: int | None = None, k: int = 4) -> list[tuple[str, Image.Image]]:
        """B-CNN only: the k channel pairs that add most to the class, each as a small overlay."""
        head_module = self.models[key].model.head
        if not isinstance(head_module, BilinearHead):
            return []
        c = self.predicted(key) if class_index is None else class_index
        box = crop_box(self.photo.size, self.models[key].preprocess)
        small = self.photo.copy()
        small.thumbnail((160, 160))
        small_box = tuple(v * small.width / self.photo.width for v in box)
        with torch.inference_mode():
            pairs = head_module.top_pairs(self.results[key].features, c, k)
        return [(f"channels {i}x{j}: {value:+.3g}", overlay(small, m.numpy(), small_box, 0.6))
                for i, j, value, m in pairs]


def explanation(head_module: torch.nn.Module, features: torch.Tensor, attentions: list[torch.Tensor],
                class_index: int, layer: int | None = None, head: int | None = None) -> np.ndarray:
    """One image's explanation grid (features and attentions of a batch of one).

    CNN: class activation map. B-CNN: the class score decomposed over locations. ViT: attention
    rollout, or with `layer` (and `head`) that layer's class-token attention; attention does not
    depend on the class asked about."""
    if isinstance(head_module, (LinearHead, BilinearHead)):
        with torch.inference_mode():
            return head_module.class_maps(features, torch.tensor([class_index]))[0, 0].float().numpy()
    if not attentions:
        raise ValueError("no attention was recorded for this model")
    n = attentions[0].shape[-1] - 1
    side = int(round(n ** 0.5))
    if layer is None:
        heat = attention_rollout(attentions)[0]
    else:
        per_head = class_token_attention(attentions[layer])[0]
        heat = per_head.mean(0) if head is None else per_head[head]
    return heat.float().reshape(side, n // side).numpy()


class Comparator:
    """Runs a model set on photos. Build once at start-up and share: calls from several threads
    are serialised around the forward pass (the attention recorders hold per-call state, and a
    pass already keeps every core busy: a batch is split across them, and one photo's models run
    side by side, see speed.PerCore).

    With `tune` (the default) the models are made faster for inference in place (they belong to
    the Comparator from then on: channels-last convolutional backbones with BatchNorm folded into
    the convolutions, see birdfg/speed.py) and one synthetic comparison warms everything up, so
    that the first visitor does not wait for oneDNN's kernel generation. Answers are the same
    (top-1 checked against plain fp32 eager by benchmarks/bench_compare.py)."""

    def __init__(self, model_set: ModelSet, tune: bool = True):
        if not model_set.models:
            raise ValueError(f"{model_set.folder}: no usable model ({'; '.join(model_set.errors.values())}).")
        self.model_set = model_set
        self.models = model_set.models
        self.classes = next(iter(self.models.values())).classes
        self.recorders = {k: AttentionRecorder(m.model) for k, m in self.models.items()}
        # Each model's eval transform as (PIL steps, tensor steps): see _prepare.
        self.transforms = {k: _split_at_to_tensor(build_transform(m.preprocess, train=False))
                           for k, m in self.models.items()}
        self.groups = self._group_by_backbone()
        self.micro_batches = {keys[0]: speed.MicroBatch() for keys in self.groups}
        self.cores = speed.cores()
        self._lock = threading.Lock()
        self._channels_last: set[int] = set()  # id() of backbones tuned to take NHWC input
        # One photo's two rounds (see _forward_one): the groups, then the models, longest first;
        # a backbone cut in two runs (first part, rest) in them, keyed by its model.
        self.first_round, self.second_round = self.groups, list(self.models)
        self.cuts: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}
        self.tuning: dict[str, dict] = {}
        if tune:
            self.tuning = self._tune()
            self.warm_up()
            self.tuning["rounds"] = self._plan_rounds()  # timed on warm kernels

    def _tune(self) -> dict[str, dict]:
        """Inference settings of each shared backbone (once) and each model's own top stages,
        keyed "<model key>.backbone" / "<model key>.top"."""
        speed.limit_threads()
        tuning: dict[str, dict] = {}
        shared_out: dict[int, torch.Tensor] = {}  # a backbone's output for the example: its top's input
        for key, loaded in self.models.items():
            model = loaded.model
            feature_map = backbone_cfg(loaded.spec.backbone).features == "map"
            if id(model.backbone) not in shared_out:
                example = torch.randn(1, *loaded.preprocess["input_size"], generator=torch.Generator().manual_seed(0))
                tuning[f"{key}.backbone"] = speed.tune_backbone(model.backbone, example, feature_map)
                if tuning[f"{key}.backbone"]["channels_last"]:
                    self._channels_last.add(id(model.backbone))
                    example = example.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    shared_out[id(model.backbone)] = model.shared_features(example)
            if not isinstance(model.top, torch.nn.Identity):
                tuning[f"{key}.top"] = speed.tune_backbone(model.top, shared_out[id(model.backbone)], feature_map)
            tuning[f"{key}.head"] = {"pointwise_matmuls": speed.pointwise_as_matmul(model.head)}
        return tuning

    def _plan_rounds(self) -> dict[str, Any]:
        """Cut backbones and order both rounds of one photo so that every core stays busy, from
        each part's time on one thread (see birdfg/schedule.py); what was decided, for the record."""
        if self.cores.cpus < 2 or len(self.groups) < 2:
            return {}
        costs, chains = self._time_groups()
        cuts = schedule.best_cuts(costs, self.cores.cpus)
        whole = [len(c.backbone_s) for c in costs]
        for keys, blocks, cut, n in zip(self.groups, chains, cuts, whole):
            if cut < n:
                self.cuts[keys[0]] = (torch.nn.Sequential(*blocks[:cut]), torch.nn.Sequential(*blocks[cut:]))
        # Longest first in each round, as schedule.busy_s assumes.
        first = {keys[0]: sum(c.backbone_s[:cut]) for keys, c, cut in zip(self.groups, costs, cuts)}
        second = {key: sum(c.backbone_s[cut:]) + head for keys, c, cut in zip(self.groups, costs, cuts)
                  for key, head in zip(keys, c.heads_s)}
        self.first_round = sorted(self.groups, key=lambda keys: -first[keys[0]])
        self.second_round = sorted(self.models, key=lambda key: -second[key])
        return {"cut": {keys[0]: f"before block {cut} of {n}" for keys, cut, n in zip(self.groups, cuts, whole) if cut < n},
                "one_thread_ms": {keys[0]: round(sum(c.backbone_s) * 1000, 1) for keys, c in zip(self.groups, costs)},
                "estimated_ms": round(schedule.rounds_s(costs, cuts, self.cores.cpus) * 1000, 1),
                "estimated_uncut_ms": round(schedule.rounds_s(costs, whole, self.cores.cpus) * 1000, 1)}

    def _time_groups(self) -> tuple[list[schedule.GroupCost], list[list[torch.nn.Module] | None]]:
        """Each group's costs for a synthetic photo on one thread: its backbone block by block
        where it could be cut (a single model's backbone whose chain of blocks is known), else as
        a whole, and each model's top + head; and those chains of blocks (None: not cuttable)."""
        costs, chains = [], []
        for keys in self.groups:
            loaded = self.models[keys[0]]
            model = loaded.model
            x = self._prepare([_noise_photo()], keys[0])
            blocks = chain(model.backbone, loaded.spec.backbone) if len(keys) == 1 else None
            seconds, out = schedule.seconds_each(blocks or [model.shared_features], x)
            if blocks and not torch.equal(out, schedule.seconds_each([model.shared_features], x)[1]):
                blocks, seconds = None, [sum(seconds)]  # the chain is not what forward_features does
            heads = [schedule.seconds_each([lambda f, m=self.models[k].model: m.head(m.top(f))], out)[0][0]
                     for k in keys]
            costs.append(schedule.GroupCost(seconds, heads))
            chains.append(blocks)
        return costs, chains

    def warm_up(self) -> float:
        """One comparison (maps and overlays too) of a synthetic photo; returns its seconds."""
        start = time.perf_counter()
        comparison = self.compare(_noise_photo())
        for key, result in comparison.results.items():
            if result.ok:
                comparison.overlay(key)
        return time.perf_counter() - start

    def _group_by_backbone(self) -> list[list[str]]:
        """Keys whose models share one backbone object and one preprocessing: one pass serves all."""
        groups: dict[tuple, list[str]] = {}
        for key, m in self.models.items():
            signature = (id(m.model.backbone), repr(sorted(m.preprocess.items())))
            groups.setdefault(signature, []).append(key)
        return list(groups.values())

    def compare(self, source: ImageSource) -> Comparison:
        """Classify and explain one photo with every model. Raises ImageError for bad input."""
        photo = open_rgb(source)  # decoding stays on the caller's thread, beside the model work
        shown = photo.copy()
        shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        results = self._run_models(photo)
        ok = [r.probs for r in results.values() if r.ok]
        ensemble = np.mean(ok, axis=0) if ok else None
        return Comparison(shown, self.classes, results, ensemble, self.models)

    @speed.on_torch_thread
    def _run_models(self, photo: Image.Image) -> dict[str, ModelResult]:
        results = {}
        with self._lock:
            outputs = self._forward_one(photo, evidence=True)
        for key, out in outputs.items():
            loaded = self.models[key]
            if isinstance(out, Exception):
                results[key] = ModelResult(key, loaded.display_name, error=f"{type(out).__name__}: {out}")
            else:
                results[key] = ModelResult(key, loaded.display_name, out.probs[0].numpy(), out.latency_ms,
                                           features=out.features, attentions=out.attentions)
        return results

    def _forward_one(self, photo: Image.Image, evidence: bool) -> dict[str, BatchOutput | Exception]:
        """One photo through every model in two rounds, each round's items side by side (one per
        core, see speed.PerCore): the backbone groups' passes (of a cut backbone, its first part),
        then every model's own top and head (after the rest of its cut backbone); in the models'
        order."""
        for keys in self.groups:
            self._record_attention(keys, evidence)
        # PerCore hands out chunks of one item: [group] in the first run, [key] in the second.
        passes = self.cores.run(lambda chunk: self._shared_pass([photo], chunk[0][0], self._cut(chunk[0][0])[0]),
                                self.first_round)
        shared = {key: out for keys, out in zip(self.first_round, passes) for key in keys}
        outputs = self.cores.run(lambda chunk: self._head_pass(shared[chunk[0]], chunk[0], self._cut(chunk[0])[1]),
                                 self.second_round)
        done = dict(zip(self.second_round, outputs))
        return {key: done[key] for key in self.models}

    def _cut(self, key: str) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        """(first part, rest) of the backbone of `key` if _plan_rounds cut it."""
        return self.cuts.get(key, (None, None))

    @speed.on_torch_thread
    def classify(self, photos: list[Image.Image]) -> dict[str, torch.Tensor | Exception]:
        """Class probabilities (B, classes) of each model for already-opened photos, the batch
        split across the CPUs (one photo: the models side by side); a model that fails gives its
        exception instead."""
        if not photos:
            raise ValueError("No photos to classify.")
        probs: dict[str, torch.Tensor | Exception] = {}
        with self._lock:
            if len(photos) == 1:
                return {k: out if isinstance(out, Exception) else out.probs
                        for k, out in self._forward_one(photos[0], evidence=False).items()}
            for keys in self.groups:
                self._record_attention(keys, False)  # a ViT-B's maps for 16 photos: 360 MB
                probs.update(self._classify_group(photos, keys))
        return {k: probs[k] for k in self.models}

    def _classify_group(self, photos: list[Image.Image], keys: list[str]) -> dict[str, torch.Tensor | Exception]:
        """A batch through one backbone group on every core: the backbone in chunks of the size
        learnt for it (speed.MicroBatch), then the models' tops and heads on each core's whole
        share of the photos at once. The backbone's output is small, and the heads' matrix
        products gain from more rows: the lite heads took 13.3 instead of 16.6 ms per photo in
        chunks of 8 instead of 1 on one thread (a throwaway timing script, not kept)."""
        passes = self.cores.run(lambda chunk: self._shared_pass(chunk, keys[0]), photos, self.micro_batches[keys[0]])
        failed = _first_error([out for out, _ in passes])
        if failed is not None:
            return {key: failed for key in keys}
        shared = torch.cat([out for out, _ in passes])
        share = self.cores.per_worker(len(photos))
        # One item per core: the start of its share.
        parts = self.cores.run(lambda chunk: {key: self._head_pass((shared[chunk[0]:chunk[0] + share], 0.0), key)
                                              for key in keys}, list(range(0, len(photos), share)))
        probs: dict[str, torch.Tensor | Exception] = {}
        for key in keys:
            outs = [part[key] for part in parts]
            failed = _first_error(outs)
            probs[key] = failed if failed is not None else torch.cat([out.probs for out in outs])
        return probs

    def forward_group(self, photos: list[Image.Image], keys: list[str],
                      evidence: bool = True) -> dict[str, BatchOutput | Exception]:
        """One backbone pass for the models in `keys` (they share it), then each head. With
        `evidence`, what an explanation needs (attention) is kept from this same pass."""
        with self._lock:
            self._record_attention(keys, evidence)
            shared = self._shared_pass(photos, keys[0])
            return {key: self._head_pass(shared, key) for key in keys}

    def _record_attention(self, keys: list[str], keeping: bool) -> None:
        for key in keys:
            self.recorders[key].take()  # drop anything a failed earlier call left behind
            self.recorders[key].keeping = keeping

    def _prepare(self, photos: list[Image.Image], key: str) -> torch.Tensor:
        """The photos as one input batch for model `key`, in the memory format its backbone takes."""
        pil_steps, tensor_steps = self.transforms[key]
        x = torch.stack([tensor_steps(pil_steps(photo)) for photo in photos])
        backbone = self.models[key].model.backbone
        return x.contiguous(memory_format=torch.channels_last) if id(backbone) in self._channels_last else x

    def _shared_pass(self, photos: list[Image.Image], key: str,
                     part: torch.nn.Module | None = None) -> tuple[torch.Tensor | Exception, float]:
        """The photos through the backbone of `key` (and of every model in its group), or through
        only `part` of it: its output, or the exception it raised, and the ms it took."""
        start = time.perf_counter()
        with torch.inference_mode():
            try:
                out = (part or self.models[key].model.shared_features)(self._prepare(photos, key))
            except Exception as exc:  # noqa: BLE001 - one failing model must not take the others down
                out = exc
        return out, (time.perf_counter() - start) * 1000

    def _head_pass(self, shared: tuple[torch.Tensor | Exception, float], key: str,
                   rest: torch.nn.Module | None = None) -> BatchOutput | Exception:
        """Model `key`'s own top stages and head on its backbone's output (see _shared_pass),
        after the `rest` of its backbone if that pass ran only its first part."""
        shared_out, shared_ms = shared
        if isinstance(shared_out, Exception):
            return shared_out
        start = time.perf_counter()
        model = self.models[key].model
        with torch.inference_mode():
            try:
                backbone_out = rest(shared_out) if rest is not None else shared_out
                features = model.top(backbone_out)  # Identity unless the model trains a top
                probs = model.head(features).float().softmax(-1)
            except Exception as exc:  # noqa: BLE001
                return exc
        latency_ms = shared_ms + (time.perf_counter() - start) * 1000
        return BatchOutput(probs, features, self.recorders[key].take(), latency_ms)


def _first_error(outputs: list) -> Exception | None:
    """The first exception among the outputs of a batch's parts, if any part failed."""
    return next((out for out in outputs if isinstance(out, Exception)), None)


def _noise_photo() -> Image.Image:
    """A synthetic photo for warming up and timing."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8))


def _split_at_to_tensor(transform: T.Compose) -> tuple[T.Compose, T.Compose]:
    steps = transform.transforms
    split = next(i for i, step in enumerate(steps) if isinstance(step, T.ToTensor))
    return T.Compose(steps[:split]), T.Compose(steps[split:])


@dataclass
class BatchOutput:
    probs: torch.Tensor
    features: torch.Tensor
    attentions: list[torch.Tensor]
    latency_ms: float = 0.0
