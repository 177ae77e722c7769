"""Dataset discovery, class names, transforms, bird boxes, and the photo Dataset that training
and feature caching read (their DataModule is birdfg/datamodule.py; this module stays free of
Lightning, since the app imports it).

Layout: `DIR/train_images/<class>/*.jpg`, `DIR/val_images/<class>/*.jpg`, optional
`DIR/test_images/<anything>/*.jpg`. Class names are the train folder names, sorted; the label of
a class is its index in that list. A split file (CSV with `path`, `label` and a split column)
can define train/val instead, so CUB's own split needs no copied photos.

`python -m birdfg.data fetch --out DIR` builds such a folder from the CUB-200-2011 archive
(birdfg/fetch.py).
"""
from __future__ import annotations

import argparse
import csv
import logging
import re
import sys
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
# annotations.csv, as bird_dataset has it and `fetch` writes it: `path` relative to the dataset
# folder, `split` train/val (the folder), `cub_split` train/test (CUB's own), the photo's size and
# the bird box in its pixels.
ANNOTATION_COLUMNS = ("path", "split", "label", "cub_image_id", "cub_split", "width", "height",
                      "bbox_x", "bbox_y", "bbox_w", "bbox_h")


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


def csv_columns(path: Path) -> list[str]:
    """The header of a CSV file (names stripped; a spreadsheet's byte-order mark dropped)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({exc}).") from exc


def read_csv(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    """The rows of a CSV that must have the `required` columns (values stripped, '' where a short
    row has none). `what` says what the file is for and what it needs, for the error that names
    the file and the missing columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
            columns = reader.fieldnames
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such file; {what}.") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV file ({exc}); {what}.") from exc
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(f"{path}: no {', '.join(missing)} column{'s' if len(missing) > 1 else ''} "
                           f"(its columns: {', '.join(columns) or 'none'}); {what}.")
    return rows


SPLIT_VALUES = {"train": {"train"}, "val": {"val", "test"}}  # 'test': CUB's name for its held-out half


def split_file_samples(data_dir: Path, split_file: Path, split: str, classes: list[str],
                       column: str = "cub_split") -> list[Sample]:
    """Samples whose `column` is `split` in a CSV like annotations.csv ('val' also matches 'test').
    Paths are relative to `data_dir`; without a `label` column, a photo's class is its folder."""
    what = (f"--split-file needs the columns path and {column} (train, or test / val for the held-out photos) "
            "and may have label (else the photo's class folder), like annotations.csv")
    rows = read_csv(split_file, ("path", column), what)
    index = {name: i for i, name in enumerate(classes)}
    known = SPLIT_VALUES["train"] | SPLIT_VALUES["val"]
    items = []
    for line, r in enumerate(rows, 2):
        value, path = r[column].lower(), r["path"]
        label = r.get("label") or Path(path).parent.name
        if value not in known:
            found = sorted({x[column] for x in rows if x[column].lower() not in known})
            raise DatasetError(f"{split_file} line {line}: {column} is {r[column]!r}; expected train, or test / val "
                               f"for the held-out photos (values found: {', '.join(map(repr, found[:5]))}).")
        if not path:
            raise DatasetError(f"{split_file} line {line}: empty path; {what}.")
        if label not in index:
            raise DatasetError(f"{split_file} line {line}: class {label!r} is not one of the {len(classes)} classes "
                               f"(the class folders of {Path(data_dir) / SPLIT_DIRS['train']}, e.g. {classes[0]!r}).")
        if value in SPLIT_VALUES[split]:
            items.append(Sample(Path(data_dir) / path, index[label]))
    return items


def classes_without_photos(items: list[Sample], classes: list[str]) -> list[str]:
    have = {s.label for s in items}
    return [name for i, name in enumerate(classes) if i not in have]


def check_every_class_has_photos(data_dir: Path, train: list[Sample], val: list[Sample], classes: list[str],
                                 split_file: Path | None = None) -> None:
    """A class without a train photo cannot be learnt: name each one (and what its folder holds).
    Without val photos only its accuracy is not measured, which is worth a warning."""
    if empty := classes_without_photos(train, classes):
        more = ", ..." if len(empty) > 6 else ""
        if split_file is not None:
            raise DatasetError(f"{split_file}: no readable train photo for {len(empty)} of the {len(classes)} classes: "
                               f"{', '.join(empty[:6])}{more}; give each of them rows whose split column is train, or "
                               f"delete its folder from {SPLIT_DIRS['train']}.")
        train_dir = Path(data_dir) / SPLIT_DIRS["train"]
        raise DatasetError(f"{train_dir}: {len(empty)} of the {len(classes)} class folders have no readable photo: "
                           f"{'; '.join(_describe_folder(train_dir / c) for c in empty[:6])}{more}. Add photos, or "
                           f"delete those folders (from {SPLIT_DIRS['train']} and {SPLIT_DIRS['val']}).")
    if empty := classes_without_photos(val, classes):
        log.warning("no val photos for %d class(es), whose accuracy is not measured: %s", len(empty), ", ".join(empty))


def _describe_folder(folder: Path) -> str:
    """What a class folder without a usable photo holds: '003.Blue (empty)', '003.Blue (2 files,
    none an image: .heic; ...)' or '003.Blue (its images cannot be read)'."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    if not files:
        return f"{folder.name} (empty)"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return f"{folder.name} (its images cannot be read)"
    suffixes = sorted({p.suffix.lower() or "no suffix" for p in files})
    return (f"{folder.name} ({len(files)} file{'s' if len(files) > 1 else ''}, none an image: {', '.join(suffixes)}; "
            f"photos are {', '.join(sorted(IMAGE_SUFFIXES))})")


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


BOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
BOXES_FORMAT = ("a boxes file needs the columns path, bbox_x, bbox_y, bbox_w, bbox_h (pixels, top-left origin) "
                "and may have width, height (else read from the photos), like annotations.csv")


@dataclass(frozen=True)
class _BoxRow:
    path: str  # as written in the file
    box: tuple[float, float, float, float]
    size: tuple[int, int] | None  # None: not in the file, read from the photo when needed


def _box_rows(annotations: Path) -> list[_BoxRow]:
    rows = read_csv(annotations, ("path", *BOX_COLUMNS), BOXES_FORMAT)

    def number(r: dict[str, str], line: int, column: str) -> float:
        try:
            return float(r[column])
        except ValueError:
            raise DatasetError(f"{annotations} line {line}: {column} is {r[column]!r}, not a number; "
                               f"{BOXES_FORMAT}.") from None

    out = []
    for line, r in enumerate(rows, 2):
        size = None
        if r.get("width") and r.get("height"):
            size = (int(number(r, line, "width")), int(number(r, line, "height")))
            if min(size) <= 0:
                raise DatasetError(f"{annotations} line {line}: width x height is {size[0]} x {size[1]}; give the "
                                   "photo's size in pixels, or leave both cells empty to read it from the photo.")
        out.append(_BoxRow(r["path"], tuple(number(r, line, c) for c in BOX_COLUMNS), size))
    return out


def _photo_size(path: Path) -> tuple[int, int] | None:
    """The stored size from the file's header (nothing decoded); None if it cannot be opened."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - missing or unreadable: the photo is skipped elsewhere, by name
        return None


def _boxes_under(rows: list[_BoxRow], root: Path) -> dict[Path, Box]:
    boxes, derived = {}, 0
    for row in rows:
        path = (root / row.path).resolve()
        size = row.size or _photo_size(path)
        derived += row.size is None
        if size is not None:
            boxes[path] = Box(*row.box, *size)
    if derived:
        log.info("%d box row(s) give no width/height: the size was read from the photo", derived)
    return boxes


def read_boxes(annotations: Path, root: Path | None = None) -> dict[Path, Box]:
    """Bird boxes of annotations.csv (columns path, bbox_x/y/w/h; width, height or the photo's own
    size), keyed by the resolved path of the photo under `root` (default: the CSV's folder)."""
    return _boxes_under(_box_rows(annotations), Path(root or Path(annotations).parent).resolve())


def boxes_for(items: list[Sample], boxes_file: Path, data_dir: Path) -> dict[Path, Box]:
    """The boxes of `boxes_file` for the photos `items`. Its paths are relative to the folder that
    holds it or, if none matches there, to `data_dir`; a file that matches no photo is an error
    (how many of how many matched, with an example path from each side)."""
    rows = _box_rows(boxes_file)
    photos = {s.path.resolve(): s for s in items}
    roots = list(dict.fromkeys([Path(boxes_file).resolve().parent, Path(data_dir).resolve()]))
    for root in roots:
        matched = [row for row in rows if (root / row.path).resolve() in photos]
        if matched:
            return _boxes_under(matched, root)
    example = next(iter(photos.values())).path if photos else None
    if example is not None and example.resolve().is_relative_to(Path(data_dir).resolve()):
        example = example.resolve().relative_to(Path(data_dir).resolve())
    raise DatasetError(
        f"{boxes_file}: 0 of its {len(rows)} box paths match one of the {len(photos)} photos "
        f"(e.g. the file has {rows[0].path if rows else 'no rows'!r}, a photo is {str(example)!r}); its paths are "
        f"read relative to {' or '.join(map(str, roots))}. Fix the paths, or pass --no-boxes."
    )


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


def main(argv: list[str] | None = None) -> int:
    """`python -m birdfg.data fetch ...`: dataset tools, one sub-command each."""
    from birdfg import fetch  # it imports this module

    parser = argparse.ArgumentParser(prog="python -m birdfg.data", description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as `python -m`, this file is `__main__`, a second copy of the module: its DatasetError would
    # not be the one birdfg.fetch raises. The real module's main catches the right class.
    from birdfg.data import main as _main

    raise SystemExit(_main())
