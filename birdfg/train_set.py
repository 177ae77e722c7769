"""Training a model set: the chosen models of a preset one after another, each exported to
`OUTPUT/<preset>/<key>.safetensors`, then a table shaped like the report's Table I.
`train.py` parses the command line and calls `train_set`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path


from birdfg import checkpoints
from birdfg.data import DatasetError, check_class_folders, class_names, drop_unreadable, read_boxes, samples
from birdfg.models import (TRAINING_DEFAULTS, build, default_epochs, preprocess_config, preset_specs,
                           shared_backbone_key)
from birdfg.training import TrainConfig, build_feature_cache, fit, image_loaders

log = logging.getLogger("birdfg.train")


def _devices(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def train_set(args: argparse.Namespace, command: str) -> int:
    """Train, export and tabulate; returns the process exit code."""
    try:
        check_class_folders(args.data)
        classes = class_names(args.data)
        train_items = drop_unreadable(samples(args.data, "train", classes, args.split_file), "train")
        val_items = drop_unreadable(samples(args.data, "val", classes, args.split_file), "val")
    except (DatasetError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not train_items or not val_items:
        print(f"error: {args.data}: need train and val photos (found {len(train_items)} / {len(val_items)}).",
              file=sys.stderr)
        return 2
    boxes = _boxes(args)
    defaults = TRAINING_DEFAULTS[args.preset]
    cfg = TrainConfig(
        epochs=args.epochs or defaults["epochs"], batch_size=args.batch_size,
        lr=args.lr or defaults["lr"], weight_decay=args.weight_decay, seed=args.seed,
        backbone_lr_scale=args.backbone_lr_scale or defaults["backbone_lr_scale"],
        accelerator=args.accelerator, devices=_devices(args.devices), num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, logger=args.logger, workers=args.workers,
        resume=args.resume,
    )
    split_name = f"{args.split_file.name}:cub_split" if args.split_file else "train_images/val_images"
    specs = preset_specs(args.preset, len(classes), tuple(args.models), args.img_size)
    out_dir = args.output / args.preset
    runs_dir = args.output / ".runs" / args.preset
    shared_backbones: dict = {}
    caches: dict = {}
    rows = []
    total_start = time.perf_counter()
    for key, spec in specs.items():
        print(f"\n== {key}: {spec.display_name} ({spec.backbone} + {spec.head} head) ==", flush=True)
        shared_key = shared_backbone_key(spec)
        backbone = shared_backbones.get(shared_key) if spec.frozen_backbone else None
        model = build(spec, pretrained=not args.no_pretrained, backbone=backbone)
        if spec.frozen_backbone:
            shared_backbones[shared_key] = model.backbone
        preprocess = preprocess_config(spec)
        if spec.frozen_backbone:
            cache_key = (shared_key, spec.img_size)
            if cache_key not in caches:
                caches[cache_key] = build_feature_cache(model, preprocess, train_items, val_items, args.views,
                                                        args.seed, runs_dir / "cache", boxes=boxes)
            train_data, val_data = caches[cache_key].train, caches[cache_key].val
        else:
            train_data, val_data = image_loaders(train_items, val_items, preprocess, cfg)
        try:
            epochs = args.epochs or default_epochs(args.preset, key)
            result = fit(model, train_data, val_data, dataclasses.replace(cfg, epochs=epochs), runs_dir / key)
        except checkpoints.CheckpointError as exc:  # --resume found a last.ckpt it must not trust
            print(f"error: {exc}", file=sys.stderr)
            return 2
        metrics = {"train_acc": result.train_acc, "val_acc": result.val_acc, "split": split_name,
                   "best_epoch": result.best_epoch}
        trained = {"epochs": result.epochs_run, "command": command, "seconds": round(result.seconds, 1),
                   "pretrained": not args.no_pretrained, "bird_box_views": bool(boxes and spec.frozen_backbone)}
        status = _export_if_better(model, out_dir / f"{key}.safetensors", classes, preprocess, metrics, trained,
                                   args.force)
        rows.append((key, spec.display_name, result, status))
    print(_table(rows, time.perf_counter() - total_start))
    if args.push_to_hub:
        url = checkpoints.push_set(out_dir, args.push_to_hub, command)
        print(f"published {out_dir} to {url}")
    return 0


def _boxes(args: argparse.Namespace) -> dict | None:
    """Bird boxes for zoomed training views: --boxes CSV, else DATA/annotations.csv when present."""
    if args.no_boxes:
        return None
    path = args.boxes or (args.data / "annotations.csv")
    if not path.exists():
        if args.boxes:
            raise SystemExit(f"error: --boxes {path}: no such file")
        return None
    boxes = read_boxes(path)
    print(f"bird boxes from {path}: {len(boxes)} photos get zoomed-in training views")
    return boxes


def _export_if_better(model, path: Path, classes, preprocess, metrics, trained, force: bool) -> str:
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


def _table(rows, seconds: float) -> str:
    lines = ["", "Table I - accuracy", f"{'model':<28} {'train acc':>9} {'val acc':>8}  {'epoch':>5}  checkpoint",
             "-" * 72]
    for _key, name, r, status in rows:
        lines.append(f"{name:<28} {r.train_acc:>9.3f} {r.val_acc:>8.3f}  {r.best_epoch:>5}  {status}")
    lines.append(f"total time {seconds / 60:.1f} min")
    return "\n".join(lines)
