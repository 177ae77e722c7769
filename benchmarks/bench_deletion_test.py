"""How long the Compare tab's "Test the maps" takes: `birdfg.faithfulness.deletion_test` on a
comparison the tab already has (each model's default map for its own top guess, 10 steps), median
over N val photos, after one untimed call.

    python benchmarks/bench_deletion_test.py [--photos 5] [--steps 10] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from birdfg.checkpoints import load_set  # noqa: E402
from birdfg.faithfulness import deletion_test  # noqa: E402
from birdfg.images import open_rgb  # noqa: E402
from birdfg.inference import Engine  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "lite")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "bird_dataset")
    p.add_argument("--photos", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    engine = Engine(load_set(args.checkpoints))
    paths = sorted((args.data / "val_images").rglob("*.jpg"))
    paths = [paths[round(i * (len(paths) - 1) / max(args.photos - 1, 1))] for i in range(args.photos)]
    first = engine.compare(open_rgb(paths[0]))
    deletion_test(engine, first, None, None, args.steps)  # untimed: first-call set-up
    times, inputs = [], None
    for path in paths:
        comparison = engine.compare(open_rgb(path))
        began = time.perf_counter()
        result = deletion_test(engine, comparison, None, None, args.steps)
        times.append(time.perf_counter() - began)
        inputs = sum(len(r["probs"]) for r in result.values())
        print(f"{path.name}: {times[-1] * 1000:.0f} ms, AUC " + ", ".join(f"{k} {r['auc']:.3f}" for k, r in result.items()))
    median = statistics.median(times)
    print(f"deletion_test, {args.steps} steps, {len(engine.models)} models: median {median * 1000:.0f} ms over "
          f"{len(times)} photos (runtimes {engine.runtimes})")
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python benchmarks/bench_deletion_test.py " + " ".join(sys.argv[1:]),
            "median_ms": round(median * 1000, 1), "times_ms": [round(t * 1000, 1) for t in times],
            "steps": args.steps, "curve_points": inputs, "runtimes": engine.runtimes,
            "load_average": os.getloadavg(),
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
