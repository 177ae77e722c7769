"""Training a model set: the chosen models of a preset one after another, each exported to
`OUTPUT/<preset>/<key>.safetensors`, then a table shaped like the report's Table I.
`train.py` turns its command line into a `TrainConfig` and calls `train_set`."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from torch import nn

from birdfg import checkpoints, layout
from birdfg.data import (BOX_COLUMNS, Box, DatasetError, Sample, boxes_for, check_class_folders,
                         check_every_class_has_photos, class_names, csv_columns, drop_unreadable, samples)
from birdfg.datamodule import FeatureCache, build_feature_cache
from birdfg.models import BirdModel, build, preprocess_config, preset_specs, shared_backbone_key
from birdfg.pseudo_labels import pseudo_label
from birdfg.train_config import TrainConfig
from birdfg.training import TrainResult, fit

log = logging.getLogger("birdfg.train")


def train_set(cfg: TrainConfig, command: str) -> int:
    """Train, export and tabulate the models `cfg` names; returns the process exit code.
    `command` is recorded in each exported checkpoint's metadata ("trained")."""
    try:  # every problem of the data, before anything heavy and before anything is written
        check_class_folders(cfg.data)
        classes = class_names(cfg.data)
        train_items = drop_unreadable(samples(cfg.data, "train", classes, cfg.split_file), "train")
        val_items = drop_unreadable(samples(cfg.data, "val", classes, cfg.split_file), "val")
        check_every_class_has_photos(cfg.data, train_items, val_items, classes, cfg.split_file)
        if not val_items:
            raise DatasetError(f"{cfg.split_file or cfg.data}: need train and val photos "
                               f"(found {len(train_items)} / {len(val_items)}).")
        boxes = _boxes(cfg, train_items)
    except (DatasetError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    split_name = f"{cfg.split_file.name}:cub_split" if cfg.split_file else "train_images/val_images"
    try:
        specs = preset_specs(cfg.preset, len(classes), tuple(cfg.models), cfg.img_size, cfg.backbone, cfg.train_from,
                             cfg.output_stride)
    except ValueError as exc:  # a --backbone, --train-from or --output-stride the preset cannot take
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pseudo = None
    if cfg.pseudo_labels is not None:  # the teacher's pass, once every flag has been checked
        try:
            pseudo = pseudo_label(cfg.pseudo_labels, cfg.data, classes, cfg.pseudo_threshold)
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"pseudo-labels from {cfg.pseudo_labels}: {len(pseudo.samples)} of the {pseudo.unlabelled} "
              f"unlabelled photos (ensemble probability >= {cfg.pseudo_threshold}) join the "
              f"{len(train_items)} train photos")
        train_items = train_items + pseudo.samples
    out_dir = cfg.output / cfg.preset
    runs_dir = cfg.output / ".runs" / cfg.preset
    # Models with a frozen backbone share one backbone object and, per input size, one feature cache.
    shared_backbones: dict[str, nn.Module] = {}
    caches: dict[tuple[str, int], FeatureCache] = {}
    rows = []
    total_start = time.perf_counter()
    for key, spec in specs.items():
        print(f"\n== {key}: {spec.display_name} ({spec.backbone} + {spec.head} head) ==", flush=True)
        shared_key = shared_backbone_key(spec)
        backbone = shared_backbones.get(shared_key) if spec.frozen_backbone else None
        model = build(spec, pretrained=cfg.pretrained, backbone=backbone)
        preprocess = preprocess_config(spec)
        if spec.frozen_backbone:
            shared_backbones[shared_key] = model.backbone
            cache_key = (shared_key, spec.img_size)
            if cache_key not in caches:
                caches[cache_key] = build_feature_cache(model, preprocess, train_items, val_items, cfg.views,
                                                        cfg.seed, runs_dir / "cache", boxes=boxes)
            train_data, val_data = caches[cache_key].train, caches[cache_key].val
        else:
            train_data, val_data = train_items, val_items
        try:
            result = fit(model, train_data, val_data, cfg, runs_dir / key)
        except checkpoints.CheckpointError as exc:  # --resume found a last.ckpt it must not trust
            print(f"error: {exc}", file=sys.stderr)
            return 2
        metrics = {"train_acc": result.train_acc, "val_acc": result.val_acc, "split": split_name,
                   "best_epoch": result.best_epoch}
        trained = {"epochs": result.epochs_run, "command": command, "seconds": round(result.seconds, 1),
                   "pretrained": cfg.pretrained, "bird_box_views": bool(boxes and spec.frozen_backbone)}
        if pseudo is not None:
            trained["pseudo_labels"] = pseudo.summary()
        status = _export_if_better(model, layout.checkpoint_path(out_dir, key), classes, preprocess, metrics, trained,
                                   cfg.force)
        rows.append((key, spec.display_name, result, status))
    print(_table(rows, time.perf_counter() - total_start))
    if cfg.push_to_hub:
        url = checkpoints.push_set(out_dir, cfg.push_to_hub, command)
        print(f"published {out_dir} to {url}")
    return 0


def _boxes(cfg: TrainConfig, train_items: list[Sample]) -> dict[Path, Box] | None:
    """Bird boxes for zoomed training views: cfg.boxes, else DATA/annotations.csv when present and
    a boxes file (a CSV of another kind there was not asked for, so it is passed over, with a word)."""
    if not cfg.use_boxes:
        return None
    if cfg.boxes is not None:
        if not cfg.boxes.is_file():
            raise DatasetError(f"--boxes {cfg.boxes}: no such file (or pass --no-boxes to train without bird boxes).")
        path = cfg.boxes
    else:
        path = cfg.data / "annotations.csv"
        if not path.is_file():
            return None
        missing = [c for c in ("path", *BOX_COLUMNS) if c not in csv_columns(path)]
        if missing:
            log.warning("%s has no %s column: training without bird boxes (--boxes CSV names a boxes file)",
                        path, ", ".join(missing))
            return None
    boxes = boxes_for(train_items, path, cfg.data)
    print(f"bird boxes from {path}: {len(boxes)} of {len(train_items)} train photos get zoomed-in training views")
    return boxes


def _export_if_better(model: BirdModel, path: Path, classes: list[str], preprocess: dict, metrics: dict,
                      trained: dict, force: bool) -> str:
    """Export unless the file already there scored a higher val accuracy (a worse run must not
    replace a better model without --force); returns the table's status text."""
    if path.exists() and not force:
        try:
            old = checkpoints.read_metadata(path)["metrics"].get("val_acc", -1.0)
        except checkpoints.CheckpointError as exc:
            log.warning("replacing unreadable %s (%s)", path, exc)
            old = -1.0
        if old is not None and old > metrics["val_acc"]:
            print(f"kept {path}: its val accuracy {old:.3f} beats this run's {metrics['val_acc']:.3f} "
                  "(use --force to replace it)")
            return f"kept existing ({old:.3f})"
    checkpoints.export(model, path, classes, preprocess, metrics, trained)
    print(f"exported {path}")
    return "exported"


def _table(rows: list[tuple[str, str, TrainResult, str]], seconds: float) -> str:
    width = max([28, *(len(name) for _, name, _, _ in rows)])  # a long display name keeps the columns
    lines = ["", "Table I - accuracy", f"{'model':<{width}} {'train acc':>9} {'val acc':>8}  {'epoch':>5}  checkpoint",
             "-" * (width + 44)]
    for _key, name, r, status in rows:
        lines.append(f"{name:<{width}} {r.train_acc:>9.3f} {r.val_acc:>8.3f}  {r.best_epoch:>5}  {status}")
    lines.append(f"total time {seconds / 60:.1f} min")
    return "\n".join(lines)
