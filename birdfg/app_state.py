"""Everything the comparison app knows besides its layout: which model sets exist (on disk, on
the Hub), loading each set once, the last comparison of every browser session, the stored
evaluation report, batch tables, and turning results into what the widgets show.
`birdfg/ui.py` only wires these functions to Gradio components.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from birdfg import speed
from birdfg.checkpoints import CheckpointError, LoadedModel, ModelSet, download_set, find_sets, load_set
from birdfg.compare import Comparator, Comparison
from birdfg.data import IMAGE_SUFFIXES, display_name
from birdfg.evaluate import REPORT_DIR
from birdfg.images import ImageError, open_rgb
from birdfg.models import ENSEMBLE_KEY, MODEL_KEYS

log = logging.getLogger("birdfg.app")

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "checkpoints"
PREFERRED_SETS = ("full", "lite")  # the default set: the first of these that is complete
TRAIN_HINT = ("train a set with `python train.py --data ../shared/bird_dataset --preset lite`, "
              "or start the app with `--checkpoints DIR` or `--hub-repo ID`")
PREDICTED = ""  # species selector value meaning "each model's own top-1"
ROLLOUT = "rollout"  # ViT layer selector value for attention rollout
MEAN_HEADS = "mean"
DEFAULT_OPACITY = 0.5
MAX_BATCH = 64  # photos per batch request: ~0.3 s each on two cores
BATCH_SIZE = 16  # photos per Comparator.classify call: enough chunks to keep every core busy


class SetError(RuntimeError):
    """A model set that cannot serve requests; the message says what to do."""


# --- model sets ---------------------------------------------------------------------------------


@dataclass
class SetSource:
    name: str  # the selector's value, e.g. "lite" or "hub:user/birdfg-full"
    folder: Path
    origin: str  # "disk" or "hub"

    @property
    def label(self) -> str:
        return self.name if self.origin == "disk" else f"{self.name} (Hugging Face Hub)"


def _holds_models(folder: Path) -> bool:
    return any((folder / f"{k}.safetensors").exists() for k in MODEL_KEYS)


def _complete(folder: Path) -> bool:
    return all((folder / f"{k}.safetensors").exists() for k in MODEL_KEYS)


def discover(checkpoints: Path | None = None,
             hub_repo: str | None = None) -> tuple[list[SetSource], str | None, list[str]]:
    """The sets the app can offer, the default one, and notes for the user (e.g. hub offline).

    `checkpoints` is either one set folder or a folder of sets (default: the repository's
    `checkpoints/`). A Hub set, when it downloads (or is cached), becomes the default."""
    notes: list[str] = []
    root = Path(checkpoints) if checkpoints else DEFAULT_ROOT
    sources: list[SetSource] = []
    if _holds_models(root):
        sources.append(SetSource(root.name or str(root), root, "disk"))
    sources += [SetSource(name, path, "disk") for name, path in find_sets(root).items()]
    default = _pick_default(sources, explicit=checkpoints is not None and _holds_models(root))
    if hub_repo:
        try:
            folder = download_set(hub_repo)
            if not _holds_models(folder):
                raise CheckpointError(f"Hub repo {hub_repo!r} holds no birdfg checkpoint.")
            sources.insert(0, SetSource(f"hub:{hub_repo}", folder, "hub"))
            default = sources[0].name
        except CheckpointError as exc:
            log.warning("%s", exc)
            fallback = f"using the local set `{default}`" if default else "and there is no local set either"
            from huggingface_hub import constants

            reason = ("offline (HF_HUB_OFFLINE) and not in the local cache" if constants.HF_HUB_OFFLINE
                      else "not published, private, or no network")
            notes.append(f"⚠ Could not download the Hub set `{hub_repo}` ({reason}); {fallback}.")
    if not sources:
        notes.append(f"No model checkpoints found in `{root}`: {TRAIN_HINT}.")
    return sources, default, notes


def _pick_default(sources: list[SetSource], explicit: bool) -> str | None:
    if not sources:
        return None
    if explicit:  # --checkpoints pointed at one set folder
        return sources[0].name
    by_name = {s.name: s for s in sources}
    for name in PREFERRED_SETS:
        if name in by_name and _complete(by_name[name].folder):
            return name
    for name in PREFERRED_SETS:
        if name in by_name:
            return name
    return sources[0].name


class ModelSets:
    """The sets on offer, each loaded once on first use and shared by every request. At most
    `max_loaded` sets stay in memory (least recently used goes first): a full set is ~1 GB."""

    def __init__(self, sources: list[SetSource], default: str | None, notes: list[str] | None = None,
                 max_loaded: int = 2):
        self.sources = {s.name: s for s in sources}
        self.default = default
        self.notes = list(notes or [])
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[str, Comparator] = OrderedDict()
        self._lock = threading.Lock()
        self.on_evict: list = []  # callbacks(name) run when a set leaves memory

    @classmethod
    def discover(cls, checkpoints: Path | None = None, hub_repo: str | None = None, max_loaded: int = 2) -> "ModelSets":
        return cls(*discover(checkpoints, hub_repo), max_loaded=max_loaded)

    @property
    def choices(self) -> list[tuple[str, str]]:
        return [(s.label, s.name) for s in self.sources.values()]

    def get(self, name: str | None) -> Comparator:
        """The comparator of set `name` (default set when None), loading it on first use."""
        name = name or self.default
        if name is None:
            raise SetError(f"No model set is available: {TRAIN_HINT}.")
        if name not in self.sources:
            raise SetError(f"Unknown model set {name!r}; choose one of {list(self.sources)}.")
        with self._lock:  # two sessions asking for a new set load it once
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            comparator = self._load(self.sources[name])
            self._loaded[name] = comparator
            while len(self._loaded) > self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("unloaded model set %s (keeping at most %d in memory)", evicted, self.max_loaded)
                for callback in self.on_evict:
                    callback(evicted)
            return comparator

    @staticmethod
    @speed.on_torch_thread
    def _load(source: SetSource) -> Comparator:
        start = time.perf_counter()
        model_set: ModelSet = load_set(source.folder)
        if not model_set.models:
            problems = "; ".join(model_set.errors.values()) or "no checkpoint files"
            raise SetError(f"Model set `{source.name}` has no usable model ({problems}); {TRAIN_HINT}.")
        log.info("loaded model set %s (%s) in %.1f s", source.name, ", ".join(model_set.models),
                 time.perf_counter() - start)
        return Comparator(model_set)


# --- per-session results ------------------------------------------------------------------------


class ResultCache:
    """The last comparison of each session (keyed by Gradio's session hash), so that the species
    selector, the opacity and the ViT view re-render maps without running a model again. Kept
    server-side because gr.State deep-copies its value, and a comparison holds feature maps and
    attention matrices. Small LRU: a forgotten session simply has to compare again."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, Comparison]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, session: str, set_name: str, comparison: Comparison) -> None:
        with self._lock:
            self._items[session] = (set_name, comparison)
            self._items.move_to_end(session)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, session: str, set_name: str) -> Comparison | None:
        with self._lock:
            item = self._items.get(session)
            if item is None or item[0] != set_name:
                return None
            self._items.move_to_end(session)
            return item[1]

    def drop(self, session: str) -> None:
        with self._lock:
            self._items.pop(session, None)

    def drop_set(self, set_name: str) -> None:
        with self._lock:
            for session in [s for s, (name, _) in self._items.items() if name == set_name]:
                del self._items[session]

    def __len__(self) -> int:
        return len(self._items)


# --- what the widgets show ----------------------------------------------------------------------


@dataclass
class View:
    """How maps are drawn for a session; the compare API uses the defaults."""

    species: str = PREDICTED  # class folder name, or PREDICTED
    opacity: float = DEFAULT_OPACITY
    layer: str = ROLLOUT  # ROLLOUT or a 1-based layer number
    head: str = MEAN_HEADS  # MEAN_HEADS or a 1-based head number

    def attention_args(self) -> dict:
        if self.layer in (ROLLOUT, "", None):
            return {}
        head = None if self.head in (MEAN_HEADS, "", None) else int(self.head) - 1
        return {"layer": int(self.layer) - 1, "head": head}


def species_choices(classes: list[str]) -> list[tuple[str, str]]:
    return [("Each model's own top guess", PREDICTED)] + sorted(((display_name(c), c) for c in classes))


def class_index(comparison: Comparison, species: str | None) -> int | None:
    if not species or species not in comparison.classes:
        return None
    return comparison.classes.index(species)


def attention_choices(comparator: Comparator | None,
                      key: str = "vit") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Layer and head selector choices for a model whose attention is recorded."""
    layers: list[tuple[str, str]] = [("Rollout (all layers)", ROLLOUT)]
    heads: list[tuple[str, str]] = [("Mean of heads", MEAN_HEADS)]
    recorder = comparator.recorders.get(key) if comparator else None
    if recorder:
        layers += [(f"Layer {i} only", str(i)) for i in range(1, len(recorder.layers) + 1)]
        heads += [(f"Head {h}", str(h)) for h in range(1, recorder.layers[0].num_heads + 1)]
    return layers, heads


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def model_header(key: str, loaded: LoadedModel | None, comparison: Comparison | None = None,
                 problem: str | None = None) -> str:
    """Markdown above a column: name, val accuracy from the checkpoint, latency or error."""
    if loaded is None:
        return f"### {key.upper()}\n⚠ Not in this set. {problem or ''}".strip()
    lines = [f"### {loaded.display_name}", f"val accuracy **{_percent(loaded.val_accuracy)}** (checkpoint metadata)"]
    result = comparison.results.get(key) if comparison else None
    if result is not None:
        lines[-1] += f" · **{result.latency_ms:.0f} ms** on this photo" if result.ok else ""
        if not result.ok:
            lines.append(f"⚠ This model failed on the photo: {result.error}")
    return "\n\n".join(lines)


def top5(comparison: Comparison | None, key: str) -> dict[str, float] | None:
    if comparison is None:
        return None
    if key == ENSEMBLE_KEY:
        probs = comparison.ensemble_probs
    else:
        result = comparison.results.get(key)
        probs = result.probs if result is not None and result.ok else None
    return None if probs is None else dict(comparison.top(probs))


def agreement(comparison: Comparison | None) -> str:
    if comparison is None:
        return ""
    ok = {k: r for k, r in comparison.results.items() if r.ok}
    if not ok:
        return "⚠ No model could classify this photo."
    names = {k: comparison.top(r.probs, 1)[0][0] for k, r in ok.items()}
    failed = [comparison.results[k].name for k in comparison.results if k not in ok]
    tail = f" ({', '.join(failed)} failed)" if failed else ""
    if len(set(names.values())) == 1:
        who = {1: "Only one model answered", 3: "All three agree"}.get(len(ok), "The models that answered agree")
        return f"✓ **{who}: {next(iter(names.values()))}**{tail}."
    said = " · ".join(f"{comparison.results[k].name}: **{n}**" for k, n in names.items())
    return f"**They disagree** — {said}{tail}. The ensemble averages their probabilities."


def map_caption(comparison: Comparison, key: str, view: View) -> str:
    index = class_index(comparison, view.species)
    result = comparison.results.get(key)
    if result is None or not result.ok:
        return ""
    species = display_name(comparison.classes[comparison.predicted(key) if index is None else index])
    own = " (its top guess)" if index is None or index == comparison.predicted(key) else ""
    if result.attentions and view.attention_args():
        head = "mean of heads" if view.head in (MEAN_HEADS, "", None) else f"head {view.head}"
        return f"Map: layer {view.layer}'s class-token attention, {head} (attention is the same for every species)."
    if result.attentions:
        return "Map: attention rollout through all layers (attention is the same for every species)."
    return f"Map: where it sees **{species}**{own}."


def render_overlay(comparison: Comparison, key: str, view: View) -> Image.Image | None:
    """The explanation of `key` drawn on the photo, or None when that model has no result."""
    result = comparison.results.get(key)
    if result is None or not result.ok:
        return None
    extra = view.attention_args() if result.attentions else {}  # layer/head only mean something for a ViT
    return comparison.overlay(key, class_index(comparison, view.species), view.opacity, **extra)


def render_pairs(comparison: Comparison | None, view: View, key: str = "bcnn",
                 k: int = 4) -> list[tuple[Image.Image, str]]:
    if comparison is None or key not in comparison.results or not comparison.results[key].ok:
        return []
    pairs = comparison.pair_maps(key, class_index(comparison, view.species), k)
    return [(image, caption.removeprefix("channels ")) for caption, image in pairs]


# --- stored evaluation report -------------------------------------------------------------------


@dataclass
class Report:
    summary: str  # markdown
    per_class_headers: list[str] = field(default_factory=list)
    per_class_rows: list[list] = field(default_factory=list)
    confusion: list[tuple[str, str]] = field(default_factory=list)  # (png path, caption)


def report_file(folder: Path) -> Path | None:
    """`report/evaluation_val.json` as `python -m birdfg.evaluate` stores it; else the newest
    other stored report (e.g. `evaluation_val-annotations.json`)."""
    report_dir = Path(folder) / REPORT_DIR
    preferred = report_dir / "evaluation_val.json"
    if preferred.is_file():
        return preferred
    others = sorted(report_dir.glob("evaluation_*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return others[0] if others else None


def read_report(folder: Path, models: dict[str, LoadedModel]) -> Report:
    """The Models tab: checkpoint metadata always, plus the stored evaluation when there is one
    (never recomputed at start-up: evaluating takes minutes)."""
    folder = Path(folder)
    path = report_file(folder)
    data: dict = {}
    problem = None
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problem = f"⚠ `{path}` could not be read ({exc})."
    keys = [k for k in MODEL_KEYS if k in models]
    rows = ["| model | val acc (checkpoint) | val acc (report) | pointing game | trained |",
            "| --- | --- | --- | --- | --- |"]
    for key in keys:
        m, r = models[key], data.get(key, {})
        trained = m.meta.get("trained", {})
        when = f"{str(trained.get('date', '?'))[:10]}, {trained.get('epochs', '?')} epochs"
        pointing = (f"{_percent(r['pointing_game'])} of {r.get('pointing_total', '?')}"
                    if "pointing_game" in r else "—")
        accuracy = f"{_percent(r['accuracy'])} ({r['correct']}/{r['total']})" if "accuracy" in r else "—"
        rows.append(f"| **{m.display_name}** | {_percent(m.val_accuracy)} | {accuracy} | {pointing} | {when} |")
    if ENSEMBLE_KEY in data:
        r = data[ENSEMBLE_KEY]
        accuracy = f"{_percent(r['accuracy'])} ({r['correct']}/{r['total']})"
        rows.append(f"| **Ensemble** (mean softmax) | — | {accuracy} | — | — |")
    parts = ["\n".join(rows)]
    command = (f"`python -m birdfg.evaluate --data ../shared/bird_dataset --checkpoints {folder} --pointing-game`")
    if problem:
        parts.append(problem)
    elif path is None:
        parts.append(f"**No evaluation report for this set yet.** Per-class accuracy, confusion matrices and "
                     f"pointing-game scores appear here after running {command}.")
    else:
        meta = data.get("_meta", {})
        parts.append(f"Report: `{path.name}` ({meta.get('split', '?')} split of `{meta.get('data', '?')}`). "
                     f"The pointing game counts photos whose explanation peak for the true species falls inside "
                     f"the CUB bird box. Refresh it with {command}.")
    report = Report("\n\n".join(parts))
    if data:
        tag = path.stem.removeprefix("evaluation_")
        report_keys = [k for k in [*keys, ENSEMBLE_KEY] if k in data]
        classes = list(data[report_keys[0]]["per_class"]) if report_keys else []
        report.per_class_headers = ["species"] + [models[k].display_name if k in models else "Ensemble"
                                                  for k in report_keys]
        report.per_class_rows = [
            [display_name(c)] + [_percent(data[k]["per_class"].get(c)) for k in report_keys] for c in classes
        ]
        for key in keys:
            png = folder / REPORT_DIR / f"{key}_confusion_{tag}.png"
            if png.is_file():
                report.confusion.append((str(png), models[key].display_name))
    return report


# --- batch mode ---------------------------------------------------------------------------------


def batch_headers(keys: list[str]) -> list[str]:
    return ["photo"] + [f"{k} {what}" for k in [*keys, ENSEMBLE_KEY] for what in ("top-1", "conf")] + ["note"]


def classify_files(comparator: Comparator, paths: list[str | Path], names: list[str] | None = None,
                   batch_size: int = BATCH_SIZE) -> tuple[list[str], list[list]]:
    """One row per file: each model's top-1 species and probability, the ensemble's, and a note:
    why a file is unreadable (its other cells empty), or which model failed on it."""
    keys = list(comparator.models)
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
        if not photos:
            continue
        probs = comparator.classify(photos)
        good = [p.numpy() for p in probs.values() if not isinstance(p, Exception)]
        ensemble = np.mean(good, axis=0) if good else None
        for row_in_batch, i in enumerate(kept):
            row: list = [names[i]]
            for key in keys:
                p = probs[key]
                row += [None, None] if isinstance(p, Exception) else _top1(comparator, p.numpy()[row_in_batch])
            row += _top1(comparator, ensemble[row_in_batch]) if ensemble is not None else [None, None]
            failed = [f"{k} failed: {p}" for k, p in probs.items() if isinstance(p, Exception)]
            rows[i] = row + ["; ".join(failed)]
    return batch_headers(keys), [rows[i] for i in sorted(rows)]


def _top1(comparator: Comparator, probs: np.ndarray) -> list:
    i = int(np.argmax(probs))
    return [display_name(comparator.classes[i]), round(float(probs[i]), 4)]


def display_table(headers: list[str], rows: list[list]) -> tuple[list[str], list[list]]:
    """The batch table as shown: one "species (37%)" cell per model (the CSV keeps two columns)."""
    keys = [h.removesuffix(" top-1") for h in headers[1:-1:2]]
    shown = []
    for row in rows:
        cells = [row[1 + 2 * i: 3 + 2 * i] for i in range(len(keys))]
        shown.append([row[0]] + [f"{s} ({100 * c:.0f}%)" if s is not None else "" for s, c in cells] + [row[-1]])
    return ["photo", *keys, "note"], shown


class OutputFiles:
    """Files the app hands to Gradio (drawn maps, batch CSVs), each under a name of its own, in one
    temp folder; files older than `keep_s` go as new ones come.

    Why not return PIL images: Gradio caches those under their content hash and rewrites an identical
    file in place, so two visitors sending the same photo at once could be served a half-written map.
    A path is copied into Gradio's cache atomically, and Gradio's `delete_cache` ages that copy."""

    def __init__(self, name: str = "birdfg_files", keep_s: float = 3600, prune_every_s: float = 60):
        self.folder = Path(tempfile.gettempdir()) / name
        self.keep_s, self.prune_every_s = keep_s, prune_every_s
        self._pruned = 0.0
        self._lock = threading.Lock()

    def new_path(self, prefix: str, suffix: str) -> Path:
        self.folder.mkdir(exist_ok=True)
        self.prune()
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=self.folder)
        os.close(fd)
        return Path(name)

    def prune(self) -> None:
        """Delete files older than `keep_s` (at most once per `prune_every_s`)."""
        now = time.time()
        with self._lock:
            if now - self._pruned < self.prune_every_s:
                return
            self._pruned = now
        for old in self.folder.glob("*"):
            try:
                if now - old.stat().st_mtime > self.keep_s:
                    old.unlink()
            except FileNotFoundError:
                continue  # another request pruned it first

    def image(self, image: Image.Image | None, prefix: str = "map_") -> str | None:
        if image is None:
            return None
        path = self.new_path(prefix, ".jpg")
        image.save(path, format="JPEG", quality=90)
        return str(path)

    def csv(self, headers: list[str], rows: list[list]) -> Path:
        path = self.new_path(f"birdfg_batch_{time.strftime('%Y%m%d-%H%M%S')}_", ".csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(headers)
            writer.writerows(rows)
        return path


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
