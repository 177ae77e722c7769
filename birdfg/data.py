"""Dataset discovery, class names, transforms, bird boxes, and the photo Dataset that training
and feature caching read (their DataModule is birdfg/datamodule.py; this module stays free of
Lightning, since the app imports it).

Layout: `DIR/train_images/<class>/*.jpg`, `DIR/val_images/<class>/*.jpg`, optional
`DIR/test_images/<anything>/*.jpg`. Class names are the train folder names, sorted; the label of
a class is its index in that list. A split file (CSV with `path`, `label` and a split column)
can define train/val instead, so CUB's own split needs no copied photos.
"""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from birdfg.images import ImageError, open_rgb
from birdfg.layout import CROP_PCT

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_DIRS = {"train": "train_images", "val": "val_images", "test": "test_images"}


class DatasetError(ValueError):
    """A dataset folder that cannot be used as it is."""


def display_name(folder: str) -> str:
    """'004.Groove_billed_Ani' -> 'Groove billed Ani'."""
    return re.sub(r"^\d+[._ -]*", "", folder).replace("_", " ").strip() or folder


@dataclass
class Sample:
    path: Path
    label: int  # -1 when unknown (test images)


def class_names(data_dir: Path) -> list[str]:
    """Sorted class folder names of `train_images` (or of `val_images` when there is no train)."""
    for split in ("train", "val"):
        folder = Path(data_dir) / SPLIT_DIRS[split]
        if folder.is_dir():
            names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            if names:
                return names
    raise DatasetError(
        f"{data_dir}: no class folders found; expected {data_dir}/train_images/<class>/*.jpg "
        "(the bird_dataset layout)."
    )


def check_class_folders(data_dir: Path) -> None:
    """Train and val must name the same classes, or labels would silently mean different birds."""
    folders = {}
    for split in ("train", "val"):
        root = Path(data_dir) / SPLIT_DIRS[split]
        if root.is_dir():
            folders[split] = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if len(folders) == 2 and folders["train"] != folders["val"]:
        only_train = sorted(folders["train"] - folders["val"])
        only_val = sorted(folders["val"] - folders["train"])
        raise DatasetError(
            f"{data_dir}: train_images and val_images have different class folders "
            f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'}). "
            "Give both splits the same class folders (an empty folder is fine)."
        )


def images_under(folder: Path) -> list[Path]:
    """Every image file under `folder` (any depth), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_samples(data_dir: Path, split: str, classes: list[str]) -> list[Sample]:
    root = Path(data_dir) / SPLIT_DIRS[split]
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found (expected the bird_dataset layout).")
    if split == "test":
        return [Sample(p, -1) for p in images_under(root)]
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if class_dir.name not in index:
            raise DatasetError(f"{class_dir}: class {class_dir.name!r} is not one of the {len(classes)} known classes.")
        samples += [Sample(p, index[class_dir.name]) for p in images_under(class_dir)]
    return samples


def split_file_samples(data_dir: Path, split_file: Path, split: str, classes: list[str],
                       column: str = "cub_split") -> list[Sample]:
    """Samples whose `column` equals `split` in a CSV like annotations.csv. 'val' also matches
    'test', CUB's name for its held-out half."""
    wanted = {"val": {"val", "test"}}.get(split, {split})
    index = {name: i for i, name in enumerate(classes)}
    with open(split_file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0] or "path" not in rows[0] or "label" not in rows[0]:
        raise DatasetError(f"{split_file}: needs the columns path, label and {column}.")
    return [Sample(Path(data_dir) / r["path"], index[r["label"]]) for r in rows if r[column] in wanted]


def samples(data_dir: Path, split: str, classes: list[str], split_file: Path | None = None) -> list[Sample]:
    if split_file is not None and split != "test":
        return split_file_samples(data_dir, split_file, split, classes)
    return folder_samples(data_dir, split, classes)


def build_transform(preprocess: dict, train: bool) -> T.Compose:
    """Eval: resize + centre crop. Train: mild random resized crop (birds fill part of the frame
    and must stay in it), flip, colour jitter (plumage colour matters, so only a little)."""
    size = preprocess["input_size"][-1]
    interpolation = T.InterpolationMode(preprocess.get("interpolation", "bicubic"))
    normalise = T.Normalize(preprocess["mean"], preprocess["std"])
    if train:
        return T.Compose([
            T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.2, 0.2, 0.1, 0.02),
            T.ToTensor(),
            normalise,
        ])
    resize = int(round(size / preprocess.get("crop_pct", CROP_PCT)))
    return T.Compose([T.Resize(resize, interpolation=interpolation), T.CenterCrop(size), T.ToTensor(), normalise])


@dataclass(frozen=True)
class Box:
    """A bird's bounding box in the pixels of the original photo (width x height)."""

    x: float
    y: float
    w: float
    h: float
    width: int
    height: int

    def scaled_to(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in a copy of the photo resized to `size`."""
        sx, sy = size[0] / self.width, size[1] / self.height
        return self.x * sx, self.y * sy, (self.x + self.w) * sx, (self.y + self.h) * sy


def read_boxes(annotations: Path) -> dict[Path, Box]:
    """Bird boxes of annotations.csv (columns path, width, height, bbox_x/y/w/h), keyed by the
    resolved path of the photo under the dataset folder that holds the CSV."""
    root = Path(annotations).resolve().parent
    with open(annotations, newline="") as f:
        return {
            root / r["path"]: Box(*(float(r[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")),
                                  int(r["width"]), int(r["height"]))
            for r in csv.DictReader(f)
        }


def bird_crop(img: Image.Image, box: Box, generator: torch.Generator | None = None) -> Image.Image:
    """A square crop around the bird with a random margin (1.2-1.8x its longer side), clipped to
    the photo: a zoomed-in training view that keeps the bird whole."""
    left, top, right, bottom = box.scaled_to(img.size)
    margin = 1.2 + 0.6 * float(torch.rand((), generator=generator))
    side = max(right - left, bottom - top) * margin
    cx, cy = (left + right) / 2, (top + bottom) / 2
    crop = (max(0.0, cx - side / 2), max(0.0, cy - side / 2), min(img.width, cx + side / 2),
            min(img.height, cy + side / 2))
    return img.crop(tuple(int(round(v)) for v in crop))


class ImageDataset(Dataset):
    """Images with labels; a file that cannot be decoded yields None (dropped by `collate`) and is
    reported once by name, so one bad file never stops a run. With `boxes`, photos that have a
    bird box are first cropped around the bird (training views only)."""

    def __init__(self, items: list[Sample], transform: Callable[[Image.Image], Any],
                 boxes: dict[Path, Box] | None = None):
        self.items = items
        self.transform = transform
        self.boxes = boxes or {}
        self.bad: set[Path] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int, int] | None:
        item = self.items[i]
        try:
            img = open_rgb(item.path)
        except ImageError as exc:
            if item.path not in self.bad:
                self.bad.add(item.path)
                log.warning("skipping unreadable image %s", exc)
            return None
        box = self.boxes.get(item.path.resolve()) if self.boxes else None
        if box is not None:
            img = bird_crop(img, box)
        return self.transform(img), item.label, i


def collate(batch: list[tuple[Any, int, int] | None]) -> list[torch.Tensor] | None:
    """default_collate without the files that failed to decode; None when a whole batch failed."""
    kept = [b for b in batch if b is not None]
    return default_collate(kept) if kept else None


def scan_unreadable(items: list[Sample]) -> list[tuple[Path, str]]:
    """Headers-only check of every file (fast): which ones cannot be opened, and why."""
    bad = []
    for item in items:
        try:
            with Image.open(item.path) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - any decoder error means "skip this file"
            bad.append((item.path, f"{type(exc).__name__}: {exc}"))
    return bad


def drop_unreadable(items: list[Sample], what: str) -> list[Sample]:
    """`items` less the files `scan_unreadable` rejects, each logged by name (`what` names the split)."""
    bad = scan_unreadable(items)
    for path, why in bad:
        log.warning("skipping unreadable image %s (%s)", path, why)
    if bad:
        log.warning("%s: skipped %d unreadable file(s) of %d", what, len(bad), len(items))
    bad_paths = {p for p, _ in bad}
    return [s for s in items if s.path not in bad_paths]

