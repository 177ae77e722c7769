"""The on-disk contract of a model set folder, in one place.

    <set>/
      <key>.safetensors            one model per key (cnn, vit, bcnn): weights + JSON metadata
      report/evaluation_<tag>.json what `python -m birdfg.evaluate` measured (<tag>: split name)
      report/<key>_confusion_<tag>.png
      report/faithfulness_<tag>.png  mean deletion / insertion curves (`--faithfulness`)
      .onnx/                       the inference engine's exported graphs (rebuilt when stale)
"""
from __future__ import annotations

from pathlib import Path

from timm.data import DEFAULT_CROP_PCT

from birdfg.models import MODEL_KEYS

CHECKPOINT_SUFFIX = ".safetensors"
REPORT_DIR = "report"
DEFAULT_REPORT_TAG = "val"
GRAPH_CACHE_DIR = ".onnx"
# The fallback when a checkpoint's preprocessing does not say how much of the photo was kept:
# timm's own default, the same one every timm pretrained config starts from.
CROP_PCT = DEFAULT_CROP_PCT


def checkpoint_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"{key}{CHECKPOINT_SUFFIX}"


def checkpoint_name(key: str) -> str:
    return f"{key}{CHECKPOINT_SUFFIX}"


def holds_models(folder: Path) -> bool:
    """Whether `folder` holds at least one model checkpoint."""
    return any(checkpoint_path(folder, k).exists() for k in MODEL_KEYS)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds every model of a set."""
    return all(checkpoint_path(folder, k).exists() for k in MODEL_KEYS)


def report_dir(folder: Path) -> Path:
    return Path(folder) / REPORT_DIR


def report_name(tag: str = DEFAULT_REPORT_TAG) -> str:
    return f"evaluation_{tag}.json"


def report_path(folder: Path, tag: str = DEFAULT_REPORT_TAG) -> Path:
    return report_dir(folder) / report_name(tag)


def report_tag(path: Path) -> str:
    """The tag of a stored report file (inverse of `report_path`)."""
    return Path(path).stem.removeprefix("evaluation_")


def stored_reports(folder: Path) -> list[Path]:
    """Every stored report of a set, newest first."""
    return sorted(report_dir(folder).glob("evaluation_*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


def confusion_name(key: str, tag: str = DEFAULT_REPORT_TAG) -> str:
    return f"{key}_confusion_{tag}.png"


def confusion_png(folder: Path, key: str, tag: str = DEFAULT_REPORT_TAG) -> Path:
    return report_dir(folder) / confusion_name(key, tag)


def faithfulness_name(tag: str = DEFAULT_REPORT_TAG) -> str:
    return f"faithfulness_{tag}.png"


def faithfulness_png(folder: Path, tag: str = DEFAULT_REPORT_TAG) -> Path:
    """The plot of the mean deletion and insertion curves per model."""
    return report_dir(folder) / faithfulness_name(tag)


def graph_cache_dir(folder: Path) -> Path:
    return Path(folder) / GRAPH_CACHE_DIR
