"""`python -m birdfg.predict --data DIR --checkpoints checkpoints/lite --out kaggle.csv`: the
course's submission file (`Id,Category`: file stem, class index) for `DIR/test_images/`, from one
model or the ensemble (mean of the softmaxes)."""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from birdfg.checkpoints import load_set
from birdfg.data import DatasetError, samples
from birdfg.images import ImageError, open_rgb
from birdfg.inference import Engine
from birdfg.models import ENSEMBLE_KEY, MODEL_KEYS

log = logging.getLogger("birdfg.predict")


def predict(engine: Engine, paths: list[Path], model: str = ENSEMBLE_KEY,
            batch_size: int = 16) -> tuple[list[tuple[str, int]], list[str]]:
    """[(file stem, class index)] for the readable photos, and a message per unreadable one."""
    rows, problems = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="predicting", unit="batch"):
        kept, photos = [], []
        for path in paths[start:start + batch_size]:
            try:
                photos.append(open_rgb(path))
                kept.append(path)
            except ImageError as exc:
                problems.append(str(exc))
        if not photos:
            continue
        comparisons = engine.run(photos)
        failed = {k: r.error for c in comparisons for k, r in c.results.items() if not r.ok}
        if failed:
            raise RuntimeError(f"model(s) failed: {failed}")
        rows += [(p.stem, c.predicted(model)) for p, c in zip(kept, comparisons)]
    return rows, problems


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m birdfg.predict", description=__doc__)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints/lite"))
    p.add_argument("--out", type=Path, default=Path("kaggle.csv"))
    p.add_argument("--model", choices=[*MODEL_KEYS, ENSEMBLE_KEY], default=ENSEMBLE_KEY)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    model_set = load_set(args.checkpoints, MODEL_KEYS if args.model == ENSEMBLE_KEY else (args.model,))
    if not model_set.models:
        print(f"error: no usable checkpoint in {args.checkpoints}: " + "; ".join(model_set.errors.values()),
              file=sys.stderr)
        return 2
    try:
        paths = [s.path for s in samples(args.data, "test", [])]
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, problems = predict(Engine(model_set), paths, args.model, args.batch_size)
    for message in problems:
        log.warning("skipped %s", message)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Id", "Category"])
        writer.writerows(rows)
    tmp.replace(args.out)
    print(f"wrote {len(rows)} predictions to {args.out}" + (f"; skipped {len(problems)} unreadable file(s)" if problems else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
