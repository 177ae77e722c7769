"""`python -m birdfg.evaluate --data DIR --checkpoints checkpoints/lite [--split val] [--json OUT]
[--pointing-game] [--faithfulness]`: accuracy per model and for the ensemble (mean of the softmaxes),
per-class accuracy, a confusion-matrix PNG per model, and optionally the pointing game (is the peak of the
explanation for the true class inside the CUB bird box?).

`--faithfulness` adds, for every model and every explanation method it offers (options at their
defaults), for the true class: deletion and insertion AUC (birdfg/faithfulness.py says how), the same
for a random map, a centre prior and pytorch-grad-cam's GradCAM (on the CNN and the B-CNN), per-photo
win rates against the centre prior, the pointing game beside its centre-point baseline and the
energy pointing game beside the box's share of the crop; plus a PNG of the mean curves per model.
`--limit N` measures faithfulness on N evenly spaced photos of the split (accuracy stays on all).

The report is stored beside the checkpoints (`<checkpoints>/report/`, where the app's Models tab
reads it) only when DIR and the split scheme are the ones the set was trained on (its checkpoints'
metadata records the training command and split); otherwise pass `--report-dir DIR` (where to store
it; the set's own report folder replaces its report) or `--no-save`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix
from tqdm.auto import tqdm

from birdfg import faithfulness as fm
from birdfg import layout
from birdfg.checkpoints import ModelSet, load_set
from birdfg.data import Box, DatasetError, Sample, boxes_for, display_name, samples
from birdfg.images import ImageError, open_rgb
from birdfg.inference import Comparison, Engine
from birdfg.models import ENSEMBLE_KEY, MODEL_KEYS
from birdfg.overlay import crop_box, peak_location

log = logging.getLogger("birdfg.evaluate")


def _hit(peak: tuple[float, float], box: Box, photo_size: tuple[int, int]) -> bool:
    left, top, right, bottom = box.scaled_to(photo_size)  # the photo may have been downscaled
    return left <= peak[0] <= right and top <= peak[1] <= bottom


def opened_batches(items: list[Sample], batch_size: int, skipped: list[str]):
    """(samples, photos) of `items` in chunks of `batch_size`, the unreadable ones left out (with a
    warning, their paths appended to `skipped`); a chunk may come out empty."""
    for start in range(0, len(items), batch_size):
        batch, photos = [], []
        for item in items[start:start + batch_size]:
            try:
                photos.append(open_rgb(item.path))
                batch.append(item)
            except ImageError as exc:
                log.warning("skipping %s", exc)
                skipped.append(str(item.path))
        yield batch, photos


def evaluate(engine: Engine, items: list[Sample], data_dir: Path, batch_size: int = 16,
             boxes: dict | None = None) -> dict:
    """Accuracy, per-class accuracy, confusion matrices and (with `boxes`) pointing game."""
    classes = engine.classes
    keys = list(engine.models) + [ENSEMBLE_KEY]
    confusion = {k: MulticlassConfusionMatrix(num_classes=len(classes)) for k in keys}
    hits = {k: [0, 0] for k in engine.models}
    skipped = []
    chunks = -(-len(items) // batch_size)
    for batch, photos in tqdm(opened_batches(items, batch_size, skipped), total=chunks, desc="evaluating", unit="batch"):
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


# --- faithfulness ---------------------------------------------------------------------------------

def evenly_spaced(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over `items` (first and last included); all when no limit."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, not {limit}")
    picks = sorted({int(round(i)) for i in np.linspace(0, len(items) - 1, limit)})
    return [items[i] for i in picks]


def photo_seed(item: Sample) -> int:
    """The random map's seed for a photo: its file name's CRC-32 (the same photo, the same map)."""
    return zlib.crc32(item.path.name.encode())


def faithfulness(engine: Engine, items: list[Sample], boxes: dict | None, steps: int = fm.DEFAULT_STEPS,
                 batch_size: int = 8, gradcam: bool = True, data_dir: Path | None = None) -> dict:
    """Deletion / insertion AUC, win rates, pointing and energy pointing of every model's methods
    and of the baselines, over `items` (true classes); see birdfg/faithfulness.py."""
    gradcam_note = fm.gradcam_missing() if gradcam else "GradCAM not asked for"
    use_gradcam = gradcam_note is None
    per_photo, names, skipped = [], [], []
    began = time.perf_counter()
    with tqdm(total=len(items), desc="faithfulness", unit="photo") as bar:
        for start, (batch, photos) in zip(range(0, len(items), batch_size), opened_batches(items, batch_size, skipped)):
            if batch:
                for comparison, item, photo in zip(engine.run(photos, evidence=True), batch, photos):
                    box = boxes.get(item.path.resolve()) if boxes is not None else None
                    target = fm.PhotoTarget(item.label, photo.size, box.scaled_to(photo.size) if box else None,
                                            photo_seed(item))
                    per_photo.append(fm.measure_photo(engine, comparison, target, steps, use_gradcam))
                    names.append(_relative(item.path, data_dir))
            bar.update(len(items[start:start + batch_size]))
    seconds = time.perf_counter() - began
    summary = summarise_faithfulness(engine, per_photo, fm.fractions(steps))
    summary["meta"] = {
        "steps": steps, "points": steps + 1, "photos": len(per_photo), "skipped": skipped,
        "seconds": round(seconds, 1), "seconds_per_photo": round(seconds / max(len(per_photo), 1), 2),
        "class": "the true class", "probability": "softmax probability of the class",
        "deletion": "most salient pixels set to 0 after normalisation (the normalisation's mean colour: grey)",
        "insertion": f"start: Gaussian blur of the input (sigma {fm.BLUR_SIGMA_AT_224:g} px at 224 px, scaled with "
                     "the input side); the most salient pixels restored",
        "ranking": "map upsampled bilinearly to the input size; ties in a seeded random order",
        "auc": "trapezoid rule over the fraction axis (0..1)",
        "random": "uniform noise on the model's map grid, seeded per photo (CRC-32 of the file name)",
        "centre": f"Gaussian at the crop centre, sigma {fm.CENTRE_SIGMA:g} of the side",
        "gradcam": gradcam_note or "pytorch-grad-cam GradCAM on the model's own top + head from the shared "
                                   "trunk features (target: the top's last module), for the models whose maps "
                                   "split the score exactly (CNN, B-CNN)",
        "pointing": "peak cell centre inside the bird box; baseline: the photo centre inside the box",
        "energy": "share of the map's positive mass inside the box; baseline: the box's share of the crop",
        "wins": "share of photos where the method's AUC is strictly better than the centre prior's "
                "(deletion: lower, insertion: higher)",
    }
    summary["per_photo"] = [
        {"path": name, **{k: {m: [round(v["deletion"], 5), round(v["insertion"], 5)] for m, v in r["methods"].items()}
                          for k, r in photo.items()}}
        for name, photo in zip(names, per_photo)
    ]
    return summary


def _relative(path: Path, root: Path | None) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) if root is not None else path.name
    except ValueError:
        return path.name


def _share(values: list) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _wins(mine: np.ndarray, other: np.ndarray, mode: str) -> dict:
    better = mine < other if mode == fm.DELETION else mine > other
    return {"share": float(better.mean()), "wins": int(better.sum()), "ties": int((mine == other).sum()),
            "photos": int(len(mine))}


def summarise_faithfulness(engine: Engine, per_photo: list[dict], fracs: np.ndarray) -> dict:
    """Means over photos of `measure_photo`'s figures, and win rates, per model and method."""
    models = {}
    for key in engine.models:
        rows = [photo[key] for photo in per_photo if key in photo]
        if not rows:
            continue
        own = {m.name: m for m in engine.methods[key]}
        auc = {name: {mode: np.array([r["methods"][name][mode] for r in rows]) for mode in fm.MODES}
               for name in rows[0]["methods"]}
        methods = {}
        for name in rows[0]["methods"]:
            values = [r["methods"][name] for r in rows]
            entry = {
                "label": own[name].label if name in own else fm.BASELINE_LABELS[name],
                "kind": "method" if name in own else "baseline",
                "class_specific": own[name].class_specific if name in own else name == fm.GRADCAM,
            }
            for mode in fm.MODES:
                entry[f"{mode}_auc"] = float(auc[name][mode].mean())
                entry[f"{mode}_auc_sd"] = float(auc[name][mode].std())
                entry[f"{mode}_curve"] = np.mean([v[f"{mode}_curve"] for v in values], axis=0).round(5).tolist()
            for rival in (fm.CENTRE, fm.RANDOM, fm.GRADCAM):
                if rival != name and rival in auc and not (rival == fm.GRADCAM and name not in own):
                    entry[f"wins_vs_{rival}"] = {mode: _wins(auc[name][mode], auc[rival][mode], mode)
                                                 for mode in fm.MODES}
            entry["pointing_game"] = _share([v["hit"] for v in values])
            entry["energy_pointing"] = _share([v["energy"] for v in values])
            if entry["class_specific"] and name in own:
                entry["peaks_differ_runner_up"] = _share([v["peaks_differ"] for v in values])
            methods[name] = entry
        gaps = [r["gradcam_vs_relu_default"] for r in rows if r.get("gradcam_vs_relu_default") is not None]
        models[key] = {
            "default": engine.methods[key][0].name, "photos": len(rows), "methods": methods,
            "boxed_photos": sum(r["box_share"] is not None for r in rows),
            "centre_point_baseline": _share([r["centre_hit"] for r in rows]),
            "box_share_baseline": _share([r["box_share"] for r in rows]),
            "gradcam_vs_relu_default_max": max(gaps) if gaps else None,
        }
    return {"fractions": fracs.round(5).tolist(), "models": models}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def print_faithfulness(summary: dict, engine: Engine) -> None:
    meta = summary.get("meta", {})
    print(f"\nfaithfulness, true class, {meta.get('photos', '?')} photos, {meta.get('points', '?')} points "
          f"({meta.get('seconds_per_photo', '?')} s per photo); deletion lower / insertion higher is better")
    print(f"{'model: map':<46} {'del':>6} {'ins':>6} {'win del':>8} {'win ins':>8} {'point':>6} {'energy':>7}")
    for key, model in summary["models"].items():
        for name, m in model["methods"].items():
            wins = m.get("wins_vs_centre", {})
            print(f"{engine.models[key].display_name + ': ' + m['label']:<46.46} {m['deletion_auc']:>6.3f} "
                  f"{m['insertion_auc']:>6.3f} {_pct(wins.get('deletion', {}).get('share')):>8} "
                  f"{_pct(wins.get('insertion', {}).get('share')):>8} {_pct(m['pointing_game']):>6} "
                  f"{_pct(m['energy_pointing']):>7}")
        print(f"{'  baselines: centre point in box / box share of crop':<46} {'':>6} {'':>6} {'':>8} {'':>8} "
              f"{_pct(model['centre_point_baseline']):>6} {_pct(model['box_share_baseline']):>7}")


BASELINE_STYLES = {fm.CENTRE: ("tab:gray", "--"), fm.RANDOM: ("tab:red", ":"), fm.GRADCAM: ("tab:orange", "--")}
METHOD_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:brown")


def save_faithfulness_png(summary: dict, names: dict[str, str], title: str, path: Path) -> None:
    """The mean deletion (top row) and insertion (bottom row) curves, one column per model
    (`names`: model key -> display name); the default map thickest, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary["models"])
    fracs = np.asarray(summary["fractions"]) * 100
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.4), dpi=90, sharey=True, squeeze=False)
    for col, key in enumerate(keys):
        model = summary["models"][key]
        for row, mode in enumerate(fm.MODES):
            ax = axes[row][col]
            own = iter(METHOD_COLOURS)
            for name, m in model["methods"].items():
                colour, line = BASELINE_STYLES.get(name) or (next(own, None), "-")
                width = 2.8 if name == model["default"] else 1.3 if m["kind"] == "baseline" else 1.8
                ax.plot(fracs, m[f"{mode}_curve"], color=colour, linestyle=line, linewidth=width,
                        label=f"{m['label']} ({m[f'{mode}_auc']:.3f})")
            ax.set_title(f"{names.get(key, key)}: {mode}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="upper right" if mode == fm.DELETION else "lower right")
            ax.set_xlabel(f"% of pixels {'removed' if mode == fm.DELETION else 'restored'}, most salient first",
                          fontsize=8)
        axes[0][0].set_ylabel("mean probability of the true class")
        axes[1][0].set_ylabel("mean probability of the true class")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def faithfulness_title(tag: str, meta: dict) -> str:
    return (f"Mean deletion and insertion curves, true class ({tag}, {meta['photos']} photos, {meta['points']} "
            "points); AUC in brackets")


# --- where the report goes --------------------------------------------------------------------------

FOLDER_SPLIT = "train_images/val_images"  # what train.py records for the folder split


def _recorded_data(command: str) -> str | None:
    """The --data argument of a recorded training command."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "--data" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--data="):
            return word.split("=", 1)[1]
    return None


def trained_elsewhere(model_set: ModelSet, data: Path, split_file: Path | None) -> str | None:
    """Why the set's own report folder is not the place for a report on `data` (with `split_file`):
    None when every model of the set was trained on that folder with that split scheme, per its
    checkpoint's metadata (trained.command's --data, metrics.split). A relative --data is read
    from the current folder and from the folder above the set's parent (the repository root of
    `checkpoints/<set>`)."""
    wanted = Path(data).resolve()
    scheme = f"{split_file.name}:cub_split" if split_file else FOLDER_SPLIT
    folder = Path(model_set.folder).resolve()
    for key, m in model_set.models.items():
        recorded = _recorded_data(str(m.meta.get("trained", {}).get("command", "")))
        if recorded is None:
            return f"{key}'s checkpoint does not record the data it was trained on"
        candidates = [Path(recorded)] if Path(recorded).is_absolute() else [Path.cwd() / recorded,
                                                                             folder.parent.parent / recorded]
        if not any(c.resolve() == wanted for c in candidates):
            return f"{key} was trained on {recorded}, not {data}"
        split = m.meta.get("metrics", {}).get("split")
        if split != scheme:
            return (f"{key} was trained on the split {split!r}, and this run evaluates the split {scheme!r} "
                    "(its photos may include the set's training photos)")
    return None


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
    for key in [*engine.models, ENSEMBLE_KEY]:
        r = report.get(key)
        if r is None:
            continue
        name = engine.models[key].display_name if key in engine.models else "Ensemble (mean softmax)"
        pg = f"{r['pointing_game']:.3f}" if "pointing_game" in r else "-"
        print(f"{name:<30} {r['accuracy']:>9.3f} {r['correct']:>4}/{r['total']:<4} {pg:>8}")
    if "faithfulness" in report:
        print_faithfulness(report["faithfulness"], engine)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m birdfg.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints/lite"))
    p.add_argument("--models", nargs="+", default=list(MODEL_KEYS), metavar="KEY",
                   help="which of the folder's models (default: cnn vit bcnn; e.g. add bvit); the ensemble is their mean")
    p.add_argument("--split", choices=["train", "val"], default="val")
    p.add_argument("--split-file", type=Path, default=None,
                   help="CSV such as annotations.csv; its cub_split column picks the photos (val = CUB test)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--pointing-game", action="store_true", help="needs DATA/annotations.csv (bird boxes)")
    p.add_argument("--faithfulness", action="store_true",
                   help="deletion / insertion AUC of every map and of the baselines, win rates, pointing games "
                        "(with DATA/annotations.csv)")
    p.add_argument("--faithfulness-steps", type=int, default=fm.DEFAULT_STEPS,
                   help=f"steps from 0 to 100 %% of the pixels (default {fm.DEFAULT_STEPS}: 5 %% steps)")
    p.add_argument("--limit", type=int, default=None,
                   help="faithfulness on this many evenly spaced photos of the split (accuracy: all of them)")
    p.add_argument("--no-gradcam", action="store_true", help="leave pytorch-grad-cam's GradCAM out")
    p.add_argument("--report-dir", type=Path, default=None,
                   help="store the report here (default: the set's report folder, only for the data and split "
                        "scheme the set was trained on)")
    p.add_argument("--no-save", action="store_true", help="do not store the report anywhere (--json still writes)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.faithfulness_steps < 1:
        p.error("--faithfulness-steps must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if args.no_save and args.report_dir:
        p.error("--no-save and --report-dir contradict each other")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model_set = load_set(args.checkpoints, tuple(args.models))
    if not model_set.models:
        print(f"error: no usable checkpoint in {args.checkpoints}: " + "; ".join(model_set.errors.values()),
              file=sys.stderr)
        return 2
    store = None
    if args.report_dir is not None:
        store = args.report_dir
    elif not args.no_save:
        why = trained_elsewhere(model_set, args.data, args.split_file)
        if why:
            own = layout.report_dir(args.checkpoints)
            print(f"error: not storing this report in the set's report folder {own}: {why}. Its Models tab "
                  f"would show another dataset's figures. Pass --report-dir DIR to store it elsewhere "
                  f"(--report-dir {own} replaces the set's own report) or --no-save.", file=sys.stderr)
            return 2
        store = layout.report_dir(args.checkpoints)
    engine = Engine(model_set)
    try:
        items = samples(args.data, args.split, engine.classes, args.split_file)
        if not items:
            raise DatasetError(f"{args.split_file or args.data}: no {args.split} photos to evaluate.")
        boxes = None
        annotations = args.data / "annotations.csv"
        if args.pointing_game or args.faithfulness:
            if annotations.exists():
                boxes = boxes_for(items, annotations, args.data)
            elif args.pointing_game:
                raise DatasetError(f"--pointing-game needs {annotations} (bird boxes)")
            else:
                log.warning("no %s: faithfulness without the pointing games", annotations)
    except (DatasetError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = evaluate(engine, items, args.data, args.batch_size, boxes)
    report["_meta"] = {"split": args.split, "split_file": str(args.split_file) if args.split_file else None,
                       "data": str(args.data), "checkpoints": str(args.checkpoints),
                       "command": "python -m birdfg.evaluate " + " ".join(shlex.quote(a) for a in argv),
                       "trained": {k: {"command": m.meta.get("trained", {}).get("command"),
                                       "split": m.meta.get("metrics", {}).get("split")}
                                   for k, m in model_set.models.items()}}
    if args.faithfulness:
        chosen = evenly_spaced(items, args.limit)
        result = faithfulness(engine, chosen, boxes, args.faithfulness_steps, gradcam=not args.no_gradcam,
                              data_dir=args.data)
        result["meta"].update({
            "split_photos": len(items), "limit": args.limit,
            "subset": (f"{len(chosen)} of {len(items)} photos, evenly spaced in the split's order (indices "
                       f"round(linspace(0, {len(items) - 1}, {len(chosen)})))") if len(chosen) < len(items)
                      else f"all {len(items)} photos",
        })
        report["faithfulness"] = result
    print_report(report, engine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if store is not None:
        tag = f"{args.split}-{args.split_file.stem}" if args.split_file else args.split
        store.mkdir(parents=True, exist_ok=True)
        for key in engine.models:
            save_confusion_png(report[key]["confusion"], engine.classes,
                               f"{engine.models[key].display_name} ({tag})", store / layout.confusion_name(key, tag))
        if "faithfulness" in report:
            meta = report["faithfulness"]["meta"]
            save_faithfulness_png(report["faithfulness"], {k: m.display_name for k, m in engine.models.items()},
                                  faithfulness_title(tag, meta), store / layout.faithfulness_name(tag))
        (store / layout.report_name(tag)).write_text(json.dumps(report, indent=1))
        print(f"stored the report in {store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
