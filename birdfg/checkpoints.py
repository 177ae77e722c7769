"""Checkpoints: `<key>.safetensors` with JSON metadata; export, load, model sets, the Hub.

Never unpickles: weights are safetensors, everything else is JSON in the safetensors header.
A frozen backbone's weights are not stored (they come from the backbone registry at load time,
and one copy serves the whole set); a trained backbone's are.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from birdfg import layout
from birdfg.backbones import create_backbone, split
from birdfg.models import MODEL_KEYS, BirdModel, ModelSpec, build, shared_backbone_key

log = logging.getLogger(__name__)

FORMAT = "birdfg/1"
REQUIRED_METADATA = ("format", "spec", "classes", "preprocess", "metrics", "display_name", "trained")
# Input sizes a checkpoint may ask for: a tampered size would turn every photo into a huge tensor.
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 1024
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


@dataclass
class LoadedModel:
    model: BirdModel
    meta: dict[str, Any]
    path: Path

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def preprocess(self) -> dict:
        return self.meta["preprocess"]

    @property
    def display_name(self) -> str:
        return self.meta["display_name"]

    @property
    def val_accuracy(self) -> float | None:
        return self.meta["metrics"].get("val_acc")


@dataclass
class ModelSet:
    """The models found in one folder, and a message for every file that was refused."""

    folder: Path
    models: dict[str, LoadedModel] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(k in self.models for k in MODEL_KEYS)


def stored_state(model: BirdModel) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: all of them, less a frozen backbone's (those come from the
    backbone registry at load time and are shared by the set)."""
    frozen = model.spec.frozen_backbone
    return {k: v for k, v in model.state_dict().items() if not (frozen and k.startswith("backbone."))}


def export(model: BirdModel, path: Path, classes: list[str], preprocess: dict, metrics: dict,
           trained: dict, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` to `path` atomically (temp file + rename): a crash leaves the old file."""
    spec = model.spec
    if len(classes) != spec.num_classes:
        raise ValueError(f"{len(classes)} class names for a {spec.num_classes}-class model.")
    tensors = {
        name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        for name, t in stored_state(model).items()
    }
    metadata = {
        "format": FORMAT,
        "spec": spec.to_dict(),
        "classes": classes,
        "preprocess": preprocess,
        "metrics": metrics,
        "display_name": spec.display_name,
        "trained": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **trained},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is meant to be shared
        _test_pause(tmp, path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _test_pause(tmp: str, path: Path) -> None:
    """Test hook, unset in normal use: with BIRDFG_TEST_PAUSE_EXPORT=<seconds>, wait between writing
    the new file and renaming it over the old one, so that tests/test_interrupted_training.py can
    kill the process at the worst moment and check that the old checkpoint survives."""
    seconds = os.environ.get("BIRDFG_TEST_PAUSE_EXPORT")
    if seconds:
        print(f"BIRDFG_TEST_PAUSE_EXPORT: wrote {tmp}, pausing {seconds} s before replacing {path}", flush=True)
        time.sleep(float(seconds))


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a birdfg checkpoint (reads the header only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    if path.suffix != layout.CHECKPOINT_SUFFIX:
        raise CheckpointError(f"{path}: not a .safetensors file; birdfg loads only safetensors (never pickles).")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}).") from exc
    missing = [k for k in REQUIRED_METADATA if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: not a birdfg checkpoint (metadata lacks {missing}).")
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc}).") from exc
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{path}: format {meta['format']!r}, this birdfg reads {FORMAT!r}.")
    problems = _metadata_problems(meta)
    if problems:
        raise CheckpointError(f"{path}: metadata is not valid ({'; '.join(problems)}).")
    return meta


def _metadata_problems(meta: dict[str, Any]) -> list[str]:
    """Types and ranges of everything the loader, the engine and the app read from the
    metadata, so that a tampered file fails here, with its name, and not later in a transform."""
    problems = []
    for key in ("spec", "preprocess", "metrics", "trained"):
        if not isinstance(meta[key], dict):
            problems.append(f"{key} is not an object")
    if not isinstance(meta["display_name"], str):
        problems.append("display_name is not text")
    classes = meta["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        problems.append("classes is not a list of class names")
    elif len(set(classes)) != len(classes):
        problems.append("classes has duplicate names")
    if isinstance(meta["preprocess"], dict) and isinstance(meta["spec"], dict):
        problems += _preprocess_problems(meta["preprocess"], meta["spec"].get("img_size"))
    return problems


def _preprocess_problems(pre: dict, img_size: Any) -> list[str]:
    problems = []
    size = pre.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and size[0] == 3 and all(type(v) is int for v in size)
            and size[1] == size[2]):
        problems.append(f"preprocess input_size {size!r} is not [3, S, S]")
    elif not MIN_IMG_SIZE <= size[2] <= MAX_IMG_SIZE:
        problems.append(f"input size {size[2]} is outside {MIN_IMG_SIZE}..{MAX_IMG_SIZE} pixels")
    elif size[2] != img_size:
        problems.append(f"preprocess input size {size[2]} differs from the spec's img_size {img_size!r}")
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            problems.append(f"preprocess {key} is not 3 numbers")
        elif key == "std" and min(values) <= 0:
            problems.append("preprocess std must be positive")
    crop = pre.get("crop_pct", layout.CROP_PCT)
    if not (isinstance(crop, (int, float)) and 0 < crop <= 1):
        problems.append(f"preprocess crop_pct {crop!r} is not in (0, 1]")
    if pre.get("interpolation", "bicubic") not in INTERPOLATIONS:
        problems.append(f"preprocess interpolation {pre.get('interpolation')!r} is not one of {list(INTERPOLATIONS)}")
    return problems


def load(path: Path, shared_backbones: dict[str, nn.Module] | None = None) -> LoadedModel:
    """Rebuild a model from the safetensors file alone. `shared_backbones` (name -> module) lets
    the models of one set share a frozen backbone instead of holding a copy each."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        spec = ModelSpec.from_dict(meta["spec"])
        if len(meta["classes"]) != spec.num_classes:
            raise ValueError(f"{len(meta['classes'])} class names for {spec.num_classes} classes")
        # Shapes first, on the meta device: a tampered spec (a huge head, a giant backbone)
        # costs no memory here and is refused before anything real is allocated.
        with torch.device("meta"):
            skeleton = build(spec, pretrained=False)
    except Exception as exc:  # noqa: BLE001 - whatever building the spec raises, it is not a model we can load
        raise CheckpointError(f"{path}: metadata does not describe a buildable model ({type(exc).__name__}: {exc}).") from exc
    expected = {k: tuple(v.shape) for k, v in stored_state(skeleton).items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the weights ({exc}); the file may be truncated.") from exc
    _check_shapes(path, expected, shapes)

    backbone = None
    if spec.frozen_backbone:
        cache = shared_backbones if shared_backbones is not None else {}
        shared_key = shared_backbone_key(spec)
        if shared_key not in cache:
            full = create_backbone(spec.backbone, pretrained=True, img_size=spec.img_size,
                                   output_stride=spec.output_stride)
            cache[shared_key] = (split(full, spec.backbone, spec.train_from)[0] if spec.train_from else full).eval()
        backbone = cache[shared_key]
    model = build(spec, pretrained=False, backbone=backbone)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the weights ({exc}); the file may be truncated.") from exc
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {k!r} holds NaN or infinite values; the file is damaged.")
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=False)
    return LoadedModel(model.eval(), meta, path)


def _check_shapes(path: Path, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """The file must hold exactly the tensors the spec's model has, with the same shapes."""
    if set(found) != set(expected):
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        raise CheckpointError(f"{path}: weights do not match the spec (missing {missing}, unexpected {extra}).")
    wrong = [k for k in expected if found[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: tensor {k!r} has shape {found[k]}, the spec needs {expected[k]}.")


def load_set(folder: Path, keys: tuple[str, ...] = MODEL_KEYS) -> ModelSet:
    """Load each key's checkpoint (see layout.py) in `folder`. Anything refused is logged and kept in
    `errors` (file -> message); the set holds whatever did load."""
    folder = Path(folder)
    result = ModelSet(folder)
    if not folder.is_dir():
        result.errors[str(folder)] = f"{folder}: no such checkpoint folder."
        return result
    for other in sorted(folder.iterdir()):
        if other.is_file() and other.suffix in {".pt", ".pth", ".ckpt", ".pkl", ".bin"}:
            result.errors[other.name] = f"{other}: ignored; birdfg never unpickles, use .safetensors checkpoints."
    shared: dict[str, nn.Module] = {}
    for key in keys:
        path = layout.checkpoint_path(folder, key)
        if not path.exists():
            result.errors[path.name] = f"{path}: missing (train it with `python train.py --models {key}`)."
            continue
        try:
            loaded = load(path, shared)
            if loaded.spec.key != key:
                raise CheckpointError(f"{path}: holds model {loaded.spec.key!r}, not {key!r}.")
            result.models[key] = loaded
        except CheckpointError as exc:
            result.errors[path.name] = str(exc)
    _check_same_classes(result)
    for message in result.errors.values():
        log.warning(message)
    return result


def _check_same_classes(model_set: ModelSet) -> None:
    """Models of one set must share class names in the same order, or an ensemble is nonsense."""
    reference = None
    for key, loaded in list(model_set.models.items()):
        if reference is None:
            reference = loaded.classes
        elif loaded.classes != reference:
            del model_set.models[key]
            model_set.errors[loaded.path.name] = f"{loaded.path}: its class list differs from the rest of the set."


def find_sets(root: Path) -> dict[str, Path]:
    """Sub-folders of `root` holding at least one model checkpoint: {folder name: path}."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {
        d.name: d for d in sorted(root.iterdir())
        if d.is_dir() and layout.holds_models(d)
    }


# --- Hugging Face Hub ---------------------------------------------------------------------------

HUB_PATTERNS = ["*.safetensors", "*.json", "README.md"]


def download_set(repo_id: str, cache_dir: Path | None = None) -> Path:
    """Download a published set (safetensors and JSON only) and return its local folder.
    Uses the local cache when offline; raises CheckpointError when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"Hub model set {repo_id!r} is not available ({type(exc).__name__}: {exc}).") from exc


def model_card(model_set: ModelSet, command: str) -> str:
    rows = [
        f"| `{k}` | {m.display_name} | {m.meta['metrics'].get('train_acc', float('nan')):.3f} | "
        f"{m.meta['metrics'].get('val_acc', float('nan')):.3f} |"
        for k, m in model_set.models.items()
    ]
    any_model = next(iter(model_set.models.values()))
    from birdfg.data import display_name

    return "\n".join([
        "---", "library_name: birdfg", "tags: [image-classification, fine-grained, birds, cub-200]", "---",
        "# birdfg model set", "",
        "Three fine-grained bird classifiers (CNN, ViT, B-CNN) for the birdfg comparison app.",
        "Weights are safetensors; metadata in each file carries the spec, classes and preprocessing.", "",
        "| key | model | train acc | val acc |", "| --- | --- | --- | --- |", *rows, "",
        f"Classes ({len(any_model.classes)}): " + ", ".join(display_name(c) for c in any_model.classes), "",
        f"Trained with: `{command}`", "",
    ])


def push_set(folder: Path, repo_id: str, command: str) -> str:
    """Publish a set's safetensors files with a model card; returns the repo URL."""
    from huggingface_hub import HfApi

    model_set = load_set(folder)
    if not model_set.models:
        raise CheckpointError(f"{folder}: nothing to publish ({'; '.join(model_set.errors.values())}).")
    (Path(folder) / "README.md").write_text(model_card(model_set, command))
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=HUB_PATTERNS)
    return f"https://huggingface.co/{repo_id}"
