"""`python -m birdfg.evaluate --data DIR --checkpoints checkpoints/lite [--split val] [--json OUT]
[--pointing-game]`: accuracy per model and for the ensemble (mean of the softmaxes), per-class
accuracy, a confusion-matrix PNG per model, and optionally the pointing game (is the peak of the
explanation for the true class inside the CUB bird box?). The report is also stored beside the
checkpoints (`<checkpoints>/report/`), where the app's Models tab reads it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix
from tqdm.auto import tqdm

from birdfg import layout
from birdfg.checkpoints import load_set
from birdfg.data import Box, DatasetError, Sample, boxes_for, display_name, samples
from birdfg.images import ImageError, open_rgb
from birdfg.inference import Comparison, Engine
from birdfg.models import ENSEMBLE_KEY
from birdfg.overlay import crop_box, peak_location

log = logging.getLogger("birdfg.evaluate")


def _hit(peak: tuple[float, float], box: Box, photo_size: tuple[int, int]) -> bool:
    left, top, right, bottom = box.scaled_to(photo_size)  # the photo may have been downscaled
    return left <= peak[0] <= right and top <= peak[1] <= bottom


def evaluate(engine: Engine, items: list[Sample], data_dir: Path, batch_size: int = 16,
             boxes: dict | None = None) -> dict:
    """Accuracy, per-class accuracy, confusion matrices and (with `boxes`) pointing game."""
    classes = engine.classes
    keys = list(engine.models) + [ENSEMBLE_KEY]
    confusion = {k: MulticlassConfusionMatrix(num_classes=len(classes)) for k in keys}
    hits = {k: [0, 0] for k in engine.models}
    skipped = []
    for start in tqdm(range(0, len(items), batch_size), desc="evaluating", unit="batch"):
        batch, photos = [], []
        for item in items[start:start + batch_size]:
            try:
                photos.append(open_rgb(item.path))
                batch.append(item)
            except ImageError as exc:
                log.warning("skipping %s", exc)
                skipped.append(str(item.path))
        if not batch:
            continue
        comparisons = engine.run(photos, evidence=boxes is not None)
        labels = torch.tensor([s.label for s in batch])
        for key in keys:
            failed = [c.results[key].error for c in comparisons if key in c.results and not c.results[key].ok]
            if failed:
                raise RuntimeError(f"model {key} failed: {failed[0]}")
            confusion[key].update(torch.tensor(np.stack([c.probs(key) for c in comparisons])), labels)
        if boxes is not None:
            for key in engine.models:
                _pointing(engine, key, comparisons, batch, photos, boxes, hits[key])
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d", len(skipped), len(items))
    report = {}
    for key in keys:
        cm = confusion[key].compute().numpy()
        per_class = {classes[i]: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i in range(len(classes))}
        report[key] = {"accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "correct": int(np.trace(cm)),
                       "total": int(cm.sum()), "per_class": per_class, "confusion": cm.tolist()}
        if key in hits and hits[key][1]:
            report[key]["pointing_game"] = hits[key][0] / hits[key][1]
            report[key]["pointing_total"] = hits[key][1]
    report["_skipped"] = skipped
    return report


def _pointing(engine: Engine, key: str, comparisons: list[Comparison], batch: list[Sample], photos: list,
              boxes: dict, tally: list[int]) -> None:
    """Count the photos whose map for the true class peaks inside the bird box."""
    preprocess = engine.models[key].preprocess
    for comparison, item, photo in zip(comparisons, batch, photos):
        box = boxes.get(item.path.resolve())
        if box is None:
            continue
        heat = engine.explain(comparison, key, item.label)
        peak = peak_location(heat, crop_box(photo.size, preprocess))
        tally[0] += _hit(peak, box, photo.size)
        tally[1] += 1


def save_confusion_png(cm: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [display_name(c) for c in classes]
    fig, ax = plt.subplots(figsize=(8, 7), dpi=90)
    ax.imshow(np.asarray(cm), cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_report(report: dict, engine: Engine) -> None:
    print(f"\n{'model':<30} {'accuracy':>9} {'correct':>8} {'pointing':>9}")
    for key, r in report.items():
        if key.startswith("_"):
            continue
        name = engine.models[key].display_name if key in engine.models else "Ensemble (mean softmax)"
        pg = f"{r['pointing_game']:.3f}" if "pointing_game" in r else "-"
        print(f"{name:<30} {r['accuracy']:>9.3f} {r['correct']:>4}/{r['total']:<4} {pg:>8}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m birdfg.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints/lite"))
    p.add_argument("--split", choices=["train", "val"], default="val")
    p.add_argument("--split-file", type=Path, default=None,
                   help="CSV such as annotations.csv; its cub_split column picks the photos (val = CUB test)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--pointing-game", action="store_true", help="needs DATA/annotations.csv (bird boxes)")
    p.add_argument("--no-save", action="store_true", help="do not store the report beside the checkpoints")
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    model_set = load_set(args.checkpoints)
    if not model_set.models:
        print(f"error: no usable checkpoint in {args.checkpoints}: " + "; ".join(model_set.errors.values()),
              file=sys.stderr)
        return 2
    engine = Engine(model_set)
    try:
        items = samples(args.data, args.split, engine.classes, args.split_file)
        if not items:
            raise DatasetError(f"{args.split_file or args.data}: no {args.split} photos to evaluate.")
        boxes = None
        if args.pointing_game:
            annotations = args.data / "annotations.csv"
            if not annotations.exists():
                raise DatasetError(f"--pointing-game needs {annotations} (bird boxes)")
            boxes = boxes_for(items, annotations, args.data)
    except (DatasetError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = evaluate(engine, items, args.data, args.batch_size, boxes)
    report["_meta"] = {"split": args.split, "split_file": str(args.split_file) if args.split_file else None,
                       "data": str(args.data), "checkpoints": str(args.checkpoints)}
    print_report(report, engine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if not args.no_save:
        tag = f"{args.split}-{args.split_file.stem}" if args.split_file else args.split
        layout.report_dir(args.checkpoints).mkdir(exist_ok=True)
        for key in engine.models:
            save_confusion_png(report[key]["confusion"], engine.classes,
                               f"{engine.models[key].display_name} ({tag})", layout.confusion_png(args.checkpoints, key, tag))
        layout.report_path(args.checkpoints, tag).write_text(json.dumps(report, indent=1))
        print(f"stored report and confusion matrices in {layout.report_dir(args.checkpoints)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
