"""Speed A/Bs of the inference engine on the shipped lite set, each measured in one run with the
variants taking turns, so that a change of load on a shared machine touches them alike.

    # this tree against another revision (e.g. the one before a change), in two worker processes
    python benchmarks/ab_engine.py revisions --against /tmp/before --json out.json
    # two model sets on this tree (e.g. another trunk): --against . with --against-checkpoints
    python benchmarks/ab_engine.py revisions --against . --checkpoints runs/cub-lite1/lite --against-checkpoints runs/cub/lite
    # the engine's own mechanisms, with and without, in one process
    python benchmarks/ab_engine.py mechanisms --json out.json

`revisions`: a comparison as the app makes it (one photo file -> every model's answer and map
drawn on the photo, in-process), the page's first update (the comparison and every model's quick
map data, no overlay drawn), photos/s of batches of 16, and every model's default map for
every class of a compared photo (what the page's second update holds), for this tree and the
revision checked out at --against (`git worktree add /tmp/before <rev>`); ratio = this tree / that one.
`mechanisms`: the same two figures for the engine with each mechanism switched off in turn:
ONNX Runtime (off: torch eager), its full graph optimisation (off: basic), its idle threads
sleeping (off: spinning, ONNX Runtime's default), the whole batch in one runtime call (off: one
photo per call).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import results_file  # benchmarks/results_file.py (this folder is on sys.path when a script runs)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "bird_dataset"
BATCH = 16


def _photo_paths(data: Path, n: int) -> list[Path]:
    paths = sorted((data / "val_images").glob("*/*"))
    return paths[:: max(1, len(paths) // n)][:n]


class Timer:
    """Times comparisons and batches of one engine on fixed photos."""

    def __init__(self, engine, paths: list[Path]):
        from birdfg.images import open_rgb

        self.engine, self.paths = engine, paths
        self.photos = [open_rgb(p) for p in (paths * BATCH)[:BATCH]]
        self.turn = 0

    def _each_photo_ms(self, n: int, work) -> list[float]:
        """Ms of `work(path)` for the next `n` photos in turn."""
        times = []
        for _ in range(n):
            path = self.paths[self.turn % len(self.paths)]
            self.turn += 1
            start = time.perf_counter()
            work(path)
            times.append((time.perf_counter() - start) * 1000)
        return times

    def compare_ms(self, n: int) -> list[float]:
        """Ms per photo for a comparison with every model's map drawn on the photo."""
        return self._each_photo_ms(n, lambda path: self.engine.overlays(self.engine.compare(path)))

    def first_ms(self, n: int) -> list[float]:
        """Ms per photo for the page's first update: the comparison and each model's quick map
        data (no overlay drawn: the page draws its own)."""
        return self._each_photo_ms(n, self.engine.first_answer)

    def maps_ms(self, n: int) -> list[float]:
        """Ms per photo for every model's default map of every class (the photo compared first);
        none for a revision from before the engine, which has no such call."""
        times = []
        if not self.engine.new:
            return times
        for _ in range(n):
            path = self.paths[self.turn % len(self.paths)]
            self.turn += 1
            comparison = self.engine.compare(path)
            start = time.perf_counter()
            self.engine.every_map(comparison)
            times.append((time.perf_counter() - start) * 1000)
        return times

    def batch_ips(self, n: int, per_photo: bool = False) -> list[float]:
        """Photos/s of a batch in one call (or, with `per_photo`, one call per photo)."""
        rates = []
        for _ in range(n):
            start = time.perf_counter()
            for chunk in ([[p] for p in self.photos] if per_photo else [self.photos]):
                self.engine.batch_top1(chunk)
            rates.append(BATCH / (time.perf_counter() - start))
        return rates


def worker(args: argparse.Namespace) -> int:
    """One side of `revisions`: load the engine, then answer the driver's requests on stdin."""
    try:
        from birdfg import process
    except ImportError:
        pass
    else:
        process.configure()  # the app's process settings, before torch loads
    sys.path.insert(0, str(Path(__file__).parent))
    from any_engine import AnyEngine

    timer = Timer(AnyEngine(args.checkpoints), _photo_paths(args.data, args.photos))
    timer.compare_ms(3)
    timer.batch_ips(1)  # warm
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        what, n = line.split()
        values = {"compare": timer.compare_ms, "first": timer.first_ms, "maps": timer.maps_ms,
                  "batch": timer.batch_ips}[what](int(n))
        print(json.dumps(values), flush=True)
    return 0


def _summary(values: dict[str, list[float]]) -> dict[str, float | None]:
    return {name: round(statistics.median(v), 2) if v else None for name, v in values.items()}


def _ratio(figure: dict[str, float | None]) -> float | None:
    return round(figure["this"] / figure["against"], 3) if None not in figure.values() else None


def revisions(args: argparse.Namespace) -> dict:
    sides = {"this": ROOT, "against": args.against.resolve()}
    sets = {"this": args.checkpoints.resolve(), "against": (args.against_checkpoints or args.checkpoints).resolve()}
    procs = {}
    for name, tree in sides.items():
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "worker", "--checkpoints", str(sets[name]), "--data", str(args.data),
             "--photos", str(args.photos)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=tree)
        ready = procs[name].stdout.readline()
        if not ready.strip().startswith('{"ready"'):
            raise RuntimeError(f"the {name} worker ({tree}) did not start: {ready!r}")
    figures = {what: {name: [] for name in sides} for what in ("compare", "first", "maps", "batch")}

    def ask(name: str, what: str, n: int) -> None:
        procs[name].stdin.write(f"{what} {n}\n")
        procs[name].stdin.flush()
        figures[what][name] += json.loads(procs[name].stdout.readline())

    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))  # neither always goes first
        for name in order:
            ask(name, "compare", args.photos)
            ask(name, "first", args.photos)
            ask(name, "maps", args.photos)
            ask(name, "batch", 1)
        print(f"round {round_ + 1}/{args.rounds}: compare ms {_summary(figures['compare'])}, first answer ms "
              f"{_summary(figures['first'])}, every map ms "
              f"{_summary(figures['maps'])}, batch photos/s {_summary(figures['batch'])}", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    c, f, m, b = (_summary(figures[what]) for what in ("compare", "first", "maps", "batch"))
    shown_sets = {"this": str(args.checkpoints), "against": str(args.against_checkpoints or args.checkpoints)}
    return {"against": str(args.against), "sets": shown_sets, "compare_ms": c, "first_answer_ms": f,
            "every_map_ms": m, "batch_ips": b, "compare_ratio": _ratio(c), "first_answer_ratio": _ratio(f),
            "every_map_ratio": _ratio(m), "batch_ratio": _ratio(b),
            "samples": {what: len(figures[what]["this"]) for what in figures}}


def mechanisms(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).parent))
    from birdfg import process

    process.configure()
    import onnxruntime as ort

    from any_engine import AnyEngine
    from birdfg.inference import engine as engine_module
    from birdfg.inference import runtime

    shipped = runtime.session_options

    def options(level=None, spinning=False):
        def make(threads=None):
            made = shipped(threads)
            if level is not None:
                made.graph_optimization_level = level
            if spinning:
                made.add_session_config_entry("session.intra_op.allow_spinning", "1")
            return made
        return make

    # (name, session options, runtime, one call per photo in a batch)
    variants = [("engine as shipped", shipped, "auto", False),
                ("without ONNX Runtime (torch eager)", shipped, "torch", False),
                ("without full graph optimisation (basic)", options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), "auto",
                 False),
                ("without idle threads sleeping (spinning)", options(spinning=True), "auto", False),
                ("without the whole batch in one call (one call per photo)", shipped, "auto", True)]
    timers = {}
    for name, make, rt, per_photo in variants:
        runtime.session_options = make
        engine = AnyEngine.__new__(AnyEngine)  # the same interface, with this variant's engine
        from birdfg.checkpoints import load_set

        engine.engine, engine.new = engine_module.Engine(load_set(args.checkpoints), runtime=rt), True
        engine.keys = list(engine.engine.models)
        timers[name] = (Timer(engine, _photo_paths(args.data, args.photos)), per_photo)
    runtime.session_options = shipped
    compare = {name: [] for name in timers}
    batch = {name: [] for name in timers}
    for round_ in range(args.rounds):
        names = list(timers) if round_ % 2 == 0 else list(reversed(timers))
        for name in names:
            timer, per_photo = timers[name]
            compare[name] += timer.compare_ms(args.photos)
            batch[name] += timer.batch_ips(1, per_photo)
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
    c, b = _summary(compare), _summary(batch)
    base = variants[0][0]
    rows = {name: {"compare_ms": c[name], "batch_ips": b[name],
                   "shipped_compare_gain": round(c[name] / c[base] - 1, 3),
                   "shipped_batch_gain": round(b[base] / b[name] - 1, 3)} for name in timers}
    return {"variants": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("revisions", "mechanisms", "worker"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "lite")
        s.add_argument("--data", type=Path, default=DATA)
        s.add_argument("--photos", type=int, default=10, help="photos compared per round")
        s.add_argument("--rounds", type=int, default=6)
        s.add_argument("--json", type=Path)
        if name == "revisions":
            s.add_argument("--against", type=Path, required=True, help="a checkout of the other revision")
            s.add_argument("--against-checkpoints", type=Path, default=None,
                           help="the other side's model set (default: --checkpoints)")
    args = p.parse_args(argv)
    if args.command == "worker":
        return worker(args)
    result = revisions(args) if args.command == "revisions" else mechanisms(args)
    result["load_average"] = os.getloadavg()
    result["cpu"] = results_file.cpu_model()
    print(json.dumps(result, indent=1))
    if args.json:
        results_file.write(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
