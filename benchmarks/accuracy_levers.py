"""Inference-time accuracy levers on a trained set, and how good each free trunk is for these birds.

    python benchmarks/accuracy_levers.py --checkpoints runs/cub/lite --split-file ../shared/bird_dataset/annotations.csv --json OUT
    python benchmarks/accuracy_levers.py --trunks tf_efficientnet_lite0 tf_efficientnet_lite1 tf_efficientnet_lite2 --split-file ...
    python benchmarks/accuracy_levers.py --mix runs/cub/lite runs/cub-lite1/lite --split-file ...

Levers (each model's top-1 accuracy and the ensemble's, on the test photos of `--split-file`'s
`cub_split`, or on val_images without it), every pass through the set's own `Engine`:
- `plain`: the photo as the app sees it;
- `flip`: the mean of the photo's and its mirror image's probabilities (test-time flip);
- `look_closer`: a second look, RA-CNN style: a square crop around where the maps are (the mean
  of the three models' normalised default maps for the ensemble's top class; cells >= half the
  maximum; 1.3x margin; at least 35 % of the photo's short side), classified again, and the two
  looks' probabilities averaged; `look_closer_bcnn`: the same with the B-CNN's map alone;
  `crop_only`: the second look alone;
- `box_oracle`: the same with CUB's own bird box (1.3x margin) as the crop: what a perfect bird
  detector would add; `box_crop_only`: that crop alone.

`--trunks`: a linear probe per frozen trunk (pooled features of the train photos and their
mirror images, logistic regression with label smoothing 0.1, AdamW 300 steps, weight decay
1e-4 / 1e-3 / 1e-2 all reported): how much each trunk's ImageNet features already separate these
species, before any fine-tuning.

`--mix SET SET ...`: sets trained with the same recipe on different trunks (`train.py --backbone`).
Each model's plain probabilities in each set; then every ensemble that takes each model (cnn, vit,
bcnn) from one of the sets (a set whose models do not share one trunk: do different trunks buy the
diversity the ensemble needs?), and the ensemble of every model of every set. `trunks` says how
many trunks a photo then goes through in the app (its cost grows with them).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import results_file  # benchmarks/results_file.py (this folder is on sys.path when a script runs)

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "bird_dataset"
MARGIN = 1.3
MIN_SIDE = 0.35  # of the photo's shorter side
MAP_THRESHOLD = 0.5


def test_rows(data: Path, split_file: Path | None) -> list[dict]:
    rows = list(csv.DictReader(open(split_file or data / "annotations.csv")))
    return [r for r in rows if (r["cub_split"] == "test" if split_file else r["split"] == "val")]


def square_crop(photo: Image.Image, x0: float, y0: float, x1: float, y1: float) -> Image.Image:
    """A square around (x0, y0, x1, y1) with MARGIN, at least MIN_SIDE, inside the photo."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = min(max(max(x1 - x0, y1 - y0) * MARGIN, MIN_SIDE * min(photo.size)), min(photo.size))
    left = min(max(cx - side / 2, 0), photo.size[0] - side)
    top = min(max(cy - side / 2, 0), photo.size[1] - side)
    return photo.crop((int(left), int(top), int(left + side), int(top + side)))


def map_crop(photo: Image.Image, grid: np.ndarray, box: tuple[float, float, float, float]) -> Image.Image:
    rows, cols = np.nonzero(grid >= MAP_THRESHOLD)
    left, top, right, bottom = box
    cw, ch = (right - left) / grid.shape[1], (bottom - top) / grid.shape[0]
    return square_crop(photo, left + cols.min() * cw, top + rows.min() * ch,
                       left + (cols.max() + 1) * cw, top + (rows.max() + 1) * ch)


def unit(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid, np.float32)
    return (grid - grid.min()) / (grid.max() - grid.min() + 1e-9)


def model_probs(engine, photos: list[Image.Image], keys: list[str], evidence: bool = False) -> tuple[list, np.ndarray]:
    """One batched pass: the comparisons and every model's probabilities, (photos, models, classes)."""
    found = engine.run(photos, evidence=evidence)
    return found, np.stack([[c.probs(k) for k in keys] for c in found])


def levers(checkpoints: Path, data: Path, split_file: Path | None, batch: int = 16) -> dict:
    from birdfg.checkpoints import load_set
    from birdfg.images import open_rgb
    from birdfg.inference import Engine
    from birdfg.overlay import crop_box

    engine = Engine(load_set(checkpoints))
    keys = list(engine.models)
    rows = test_rows(data, split_file)
    labels = np.array([engine.classes.index(r["label"]) for r in rows])
    passes: dict[str, list[np.ndarray]] = {k: [] for k in ("plain", "flip", "look", "look_bcnn", "box")}

    def probs(photos: list[Image.Image], evidence: bool = False):
        return model_probs(engine, photos, keys, evidence)

    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        photos = [open_rgb(data / r["path"]) for r in chunk]
        comparisons, plain = probs(photos, evidence=True)
        passes["plain"].append(plain)
        passes["flip"].append(probs([ImageOps.mirror(p) for p in photos])[1])
        looks, looks_bcnn, boxes = [], [], []
        for photo, comparison, ensemble, row in zip(photos, comparisons, plain.mean(1), chunk):
            top = int(ensemble.argmax())
            maps = {k: unit(engine.explain(comparison, k, top)) for k in keys}
            box = crop_box(photo.size, engine.models[keys[0]].preprocess)
            looks.append(map_crop(photo, np.mean(list(maps.values()), axis=0), box))
            looks_bcnn.append(map_crop(photo, maps["bcnn"], box) if "bcnn" in maps else looks[-1])
            x, y, w, h = (float(row[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            boxes.append(square_crop(photo, x, y, x + w, y + h))
        passes["look"].append(probs(looks)[1])
        passes["look_bcnn"].append(probs(looks_bcnn)[1])
        passes["box"].append(probs(boxes)[1])
        print(f"{min(i + batch, len(rows))}/{len(rows)} photos, {time.perf_counter() - started:.0f} s", flush=True)
    p = {k: np.concatenate(v) for k, v in passes.items()}  # (photos, models, classes)

    def accuracy(probs: np.ndarray) -> dict[str, float]:
        out = {k: round(float((probs[:, m].argmax(-1) == labels).mean()), 3) for m, k in enumerate(keys)}
        out["ensemble"] = round(float((probs.mean(1).argmax(-1) == labels).mean()), 3)
        return out

    return {
        "photos": len(rows), "models": keys,
        "accuracy": {
            "plain": accuracy(p["plain"]),
            "flip": accuracy((p["plain"] + p["flip"]) / 2),
            "look_closer": accuracy((p["plain"] + p["look"]) / 2),
            "look_closer_bcnn": accuracy((p["plain"] + p["look_bcnn"]) / 2),
            "look_closer_and_flip": accuracy((p["plain"] + p["look"] + p["flip"]) / 3),
            "crop_only": accuracy(p["look"]),
            "box_oracle": accuracy((p["plain"] + p["box"]) / 2),
            "box_crop_only": accuracy(p["box"]),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def mixed_trunks(sets: list[Path], data: Path, split_file: Path | None, batch: int = 16) -> dict:
    import itertools

    from birdfg.checkpoints import load_set
    from birdfg.images import open_rgb
    from birdfg.inference import Engine

    rows = test_rows(data, split_file)
    probs: dict[str, dict[str, np.ndarray]] = {}  # set -> model -> (photos, classes)
    trunk_of: dict[str, str] = {}
    classes = None
    for folder in sets:
        engine = Engine(load_set(folder))
        if classes is not None and engine.classes != classes:
            raise SystemExit(f"error: {folder} knows other classes than {sets[0]}: mix sets trained on the same data")
        classes = engine.classes
        models = list(engine.models)
        found = np.concatenate([model_probs(engine, [open_rgb(data / r["path"]) for r in rows[i:i + batch]], models)[1]
                                for i in range(0, len(rows), batch)])
        probs[str(folder)] = {k: found[:, m] for m, k in enumerate(models)}
        trunk_of[str(folder)] = next(iter(engine.models.values())).spec.backbone
        print(f"{folder}: {len(rows)} photos", flush=True)
    labels = np.array([classes.index(r["label"]) for r in rows])
    acc = lambda p: round(float((p.argmax(-1) == labels).mean()), 3)  # noqa: E731
    keys = [k for k in probs[str(sets[0])] if all(k in found for found in probs.values())]
    mixes = []
    for choice in itertools.product(list(probs), repeat=len(keys)):
        mixes.append({"models": dict(zip(keys, choice)), "trunks": len(set(choice)),
                      "ensemble": acc(np.mean([probs[s][k] for k, s in zip(keys, choice)], axis=0))})
    mixes.sort(key=lambda m: -m["ensemble"])
    every = np.mean([p for found in probs.values() for p in found.values()], axis=0)
    return {"photos": len(rows), "trunk_of_set": trunk_of,
            "models": {s: {k: acc(p) for k, p in found.items()} for s, found in probs.items()},
            "mixes": mixes, "every_model": {"models": sum(len(f) for f in probs.values()), "trunks": len(probs),
                                            "ensemble": acc(every)}}


def trunk_probe(trunks: list[str], data: Path, split_file: Path | None, img_size: int = 320) -> dict:
    import torch

    from birdfg.backbones import create_backbone, data_config
    from birdfg.data import build_transform
    from birdfg.images import open_rgb

    rows = list(csv.DictReader(open(split_file or data / "annotations.csv")))
    train = [r for r in rows if (r["cub_split"] == "train" if split_file else r["split"] == "train")]
    test = test_rows(data, split_file)
    classes = sorted({r["label"] for r in rows})
    photos = {r["path"]: open_rgb(data / r["path"]) for r in train + test}
    y_train = torch.tensor([classes.index(r["label"]) for r in train] * 2)
    y_test = torch.tensor([classes.index(r["label"]) for r in test])
    found = {}
    for name in trunks:
        torch.manual_seed(0)
        model = create_backbone(name).eval()
        transform = build_transform(data_config(name, img_size), train=False)

        def pooled(chosen: list[dict], mirror: bool = False) -> torch.Tensor:
            out = []
            with torch.inference_mode():
                for i in range(0, len(chosen), 32):
                    x = torch.stack([transform(ImageOps.mirror(photos[r["path"]]) if mirror else photos[r["path"]])
                                     for r in chosen[i:i + 32]])
                    out.append(model.forward_features(x).mean((2, 3)))
            return torch.cat(out)

        a, b = torch.cat([pooled(train), pooled(train, mirror=True)]), pooled(test)
        mean, std = a.mean(0), a.std(0) + 1e-6
        a, b = (a - mean) / std, (b - mean) / std
        found[name] = {}
        for decay in (1e-4, 1e-3, 1e-2):
            linear = torch.nn.Linear(a.shape[1], len(classes))
            opt = torch.optim.AdamW(linear.parameters(), 1e-3, weight_decay=decay)
            for _ in range(300):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(linear(a), y_train, label_smoothing=0.1).backward()
                opt.step()
            with torch.no_grad():
                found[name][str(decay)] = round(float((linear(b).argmax(1) == y_test).float().mean()), 3)
        print(f"{name}: linear probe {found[name]}", flush=True)
    return {"img_size": img_size, "train_photos": len(train), "test_photos": len(test), "linear_probe": found}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=None, help="a trained set: time the inference levers on it")
    p.add_argument("--trunks", nargs="+", default=None, metavar="TIMM_NAME", help="linear-probe these frozen trunks")
    p.add_argument("--mix", nargs="+", type=Path, default=None, metavar="SET",
                   help="trained sets on different trunks: every ensemble taking each model from one of them")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split-file", type=Path, default=None, help="annotations.csv: CUB's test split (else val_images)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.checkpoints and not args.trunks and not args.mix:
        p.error("give --checkpoints, --trunks or --mix")
    report: dict = {"command": " ".join(["python", "benchmarks/accuracy_levers.py", *(argv or sys.argv[1:])]),
                    "split": "cub_split=test" if args.split_file else "val_images"}
    if args.checkpoints:
        report["levers"] = levers(args.checkpoints, args.data, args.split_file)
        for name, acc in report["levers"]["accuracy"].items():
            print(f"{name:22} " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    if args.trunks:
        report["trunks"] = trunk_probe(args.trunks, args.data, args.split_file)
    if args.mix:
        report["mix"] = mixed_trunks(args.mix, args.data, args.split_file)
        for mix in report["mix"]["mixes"]:
            print(f"ensemble {mix['ensemble']:.3f}  trunks {mix['trunks']}  " +
                  "  ".join(f"{k}: {s}" for k, s in mix["models"].items()))
        print(f"every model of every set: {report['mix']['every_model']}")
    if args.json:
        results_file.write(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
