"""Are two engines' answers the same? Top-1 of every model on every val photo (one at a time and
batched) and the maps of the first photos, dumped by one engine and compared with another's.

    # the engine of another revision (e.g. before a redesign) and this one, on the same set
    git worktree add /tmp/before <rev>
    PYTHONPATH=/tmp/before python benchmarks/check_answers.py dump --out before.npz
    python benchmarks/check_answers.py dump --out after.npz
    python benchmarks/check_answers.py compare before.npz after.npz

`compare` prints the number of differing top-1 answers per model and path and the largest
difference of any map after normalisation to [0, 1]; it exits 1 when a top-1 differs or a map
differs by more than --map-tol (default 1e-4).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after $PYTHONPATH, so that another revision's birdfg can be dumped
DATA = ROOT.parent / "shared" / "bird_dataset"
MAP_PHOTOS = 10  # photos whose maps are compared
BATCH = 16


def dump(out: Path, folder: Path, data: Path) -> None:
    from birdfg.images import open_rgb

    def normalise(heat) -> np.ndarray:
        heat = np.asarray(heat, dtype=np.float64)
        lo, hi = heat.min(), heat.max()
        return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)

    photos = sorted((data / "val_images").glob("*/*"))
    from any_engine import AnyEngine

    engine = AnyEngine(folder)
    saved: dict[str, np.ndarray] = {}
    one: dict[str, list[int]] = {k: [] for k in engine.keys}
    for i, path in enumerate(photos):
        comparison = engine.compare(path)
        for key in engine.keys:
            one[key].append(comparison.predicted(key))
            if i < MAP_PHOTOS:
                saved[f"map/{i}/{key}/own"] = normalise(engine.grid(comparison, key))
                saved[f"map/{i}/{key}/class3"] = normalise(engine.grid(comparison, key, 3))
                if key == "bcnn":
                    for j, (a, b, value, grid) in enumerate(engine.pairs(comparison, key)):
                        saved[f"pair/{i}/{key}/{j}"] = np.array([a, b])
                        saved[f"map/{i}/{key}/pair{j}"] = normalise(grid.numpy())
                if key == "vit":
                    saved[f"map/{i}/{key}/layer0"] = normalise(engine.grid(comparison, key, None, layer=0))
                    saved[f"map/{i}/{key}/layer1head2"] = normalise(engine.grid(comparison, key, None, layer=1, head=2))
    batched: dict[str, list[int]] = {k: [] for k in engine.keys}
    for start in range(0, len(photos), BATCH):
        for key, top1 in engine.batch_top1([open_rgb(p) for p in photos[start:start + BATCH]]).items():
            batched[key] += top1
    for key in engine.keys:
        saved[f"top1/one/{key}"] = np.array(one[key])
        saved[f"top1/batch/{key}"] = np.array(batched[key])
    np.savez(out, **saved)
    print(f"{out}: {len(photos)} photos, maps of {MAP_PHOTOS}")


def compare(a: Path, b: Path, map_tol: float) -> int:
    first, second = np.load(a), np.load(b)
    bad = 0
    for name in sorted(k for k in first.files if k.startswith(("top1/", "pair/"))):
        differ = int((first[name] != second[name]).sum())
        if name.startswith("top1/"):
            print(f"{name}: {differ} of {len(first[name])} differ")
        bad += differ
    worst = max(((float(np.abs(first[k] - second[k]).max()), k) for k in first.files if k.startswith("map/")))
    print(f"largest map difference after normalisation: {worst[0]:.2e} ({worst[1]}), "
          f"over {sum(k.startswith('map/') for k in first.files)} maps")
    return 1 if bad or worst[0] > map_tol else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "lite")
    d.add_argument("--data", type=Path, default=DATA)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--map-tol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if args.command == "dump":
        dump(args.out, args.checkpoints, args.data)
        return 0
    return compare(args.a, args.b, args.map_tol)


if __name__ == "__main__":
    sys.exit(main())
