"""Which model sets the app can offer (folders on disk, a set on the Hugging Face Hub), and each
one's engine, loaded on first use and shared by every visitor."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from birdfg.checkpoints import CheckpointError, ModelSet, download_set, find_sets, load_set
from birdfg.inference import Engine
from birdfg.layout import holds_models, is_complete

log = logging.getLogger("birdfg.app")

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "checkpoints"
PREFERRED_SETS = ("full", "lite")  # the default set: the first of these that is complete
TRAIN_HINT = ("train a set with `python train.py --data ../shared/bird_dataset --preset lite`, "
              "or start the app with `--checkpoints DIR` or `--hub-repo ID`")


class SetError(RuntimeError):
    """A model set that cannot serve requests; the message says what to do."""


@dataclass
class SetSource:
    name: str  # the selector's value, e.g. "lite" or "hub:user/birdfg-full"
    folder: Path
    origin: str  # "disk" or "hub"

    @property
    def label(self) -> str:
        return self.name if self.origin == "disk" else f"{self.name} (Hugging Face Hub)"


def discover(checkpoints: Path | None = None,
             hub_repo: str | None = None) -> tuple[list[SetSource], str | None, list[str]]:
    """The sets the app can offer, the default one, and notes for the user (e.g. hub offline).

    `checkpoints` is either one set folder or a folder of sets (default: the repository's
    `checkpoints/`). A Hub set, when it downloads (or is cached), becomes the default."""
    notes: list[str] = []
    root = Path(checkpoints) if checkpoints else DEFAULT_ROOT
    sources: list[SetSource] = []
    if holds_models(root):
        sources.append(SetSource(root.name or str(root), root, "disk"))
    sources += [SetSource(name, path, "disk") for name, path in find_sets(root).items()]
    default = _pick_default(sources, explicit=checkpoints is not None and holds_models(root))
    if hub_repo:
        try:
            folder = download_set(hub_repo)
            if not holds_models(folder):
                raise CheckpointError(f"Hub repo {hub_repo!r} holds no birdfg checkpoint.")
            sources.insert(0, SetSource(f"hub:{hub_repo}", folder, "hub"))
            default = sources[0].name
        except CheckpointError as exc:
            log.warning("%s", exc)
            notes.append(_hub_note(hub_repo, default))
    if not sources:
        notes.append(f"No model checkpoints found in `{root}`: {TRAIN_HINT}.")
    return sources, default, notes


def _hub_note(hub_repo: str, default: str | None) -> str:
    from huggingface_hub import constants  # read at call time: tests and users switch offline mode

    fallback = f"using the local set `{default}`" if default else "and there is no local set either"
    reason = ("offline (HF_HUB_OFFLINE) and not in the local cache" if constants.HF_HUB_OFFLINE
              else "not published, private, or no network")
    return f"⚠ Could not download the Hub set `{hub_repo}` ({reason}); {fallback}."


def _pick_default(sources: list[SetSource], explicit: bool) -> str | None:
    if not sources:
        return None
    if explicit:  # --checkpoints pointed at one set folder
        return sources[0].name
    by_name = {s.name: s for s in sources}
    for name in PREFERRED_SETS:
        if name in by_name and is_complete(by_name[name].folder):
            return name
    for name in PREFERRED_SETS:
        if name in by_name:
            return name
    return sources[0].name


class ModelSets:
    """The sets on offer, each loaded once on first use and shared by every request. At most
    `max_loaded` sets stay in memory (least recently used goes first): a full set is ~1 GB.

    Loading runs the models (the engine warms up), so call `get` from a handler on the worker
    thread (birdfg/app/worker.py), or before the server starts."""

    def __init__(self, sources: list[SetSource], default: str | None, notes: list[str] | None = None,
                 max_loaded: int = 2):
        self.sources = {s.name: s for s in sources}
        self.default = default
        self.notes = list(notes or [])
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self.on_evict: list[Callable[[str], object]] = []  # called with a set's name when it leaves memory

    @classmethod
    def discover(cls, checkpoints: Path | None = None, hub_repo: str | None = None,
                 max_loaded: int = 2) -> ModelSets:
        return cls(*discover(checkpoints, hub_repo), max_loaded=max_loaded)

    @property
    def choices(self) -> list[tuple[str, str]]:
        """(label, name) of every set, for the selector."""
        return [(s.label, s.name) for s in self.sources.values()]

    @property
    def loaded(self) -> list[str]:
        """Names of the sets in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def get(self, name: str | None) -> Engine:
        """The engine of set `name` (the default set when None), loading it on first use."""
        name = name or self.default
        if name is None:
            raise SetError(f"No model set is available: {TRAIN_HINT}.")
        if name not in self.sources:
            raise SetError(f"Unknown model set {name!r}; choose one of {list(self.sources)}.")
        with self._lock:  # two sessions asking for a new set load it once
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            engine = _load(self.sources[name])
            self._loaded[name] = engine
            while len(self._loaded) > self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("unloaded model set %s (keeping at most %d in memory)", evicted, self.max_loaded)
                for callback in self.on_evict:
                    callback(evicted)
            return engine


def _load(source: SetSource) -> Engine:
    start = time.perf_counter()
    model_set: ModelSet = load_set(source.folder)
    if not model_set.models:
        problems = "; ".join(model_set.errors.values()) or "no checkpoint files"
        raise SetError(f"Model set `{source.name}` has no usable model ({problems}); {TRAIN_HINT}.")
    engine = Engine(model_set)
    log.info("loaded model set %s (%s) in %.1f s", source.name, ", ".join(model_set.models),
             time.perf_counter() - start)
    return engine
