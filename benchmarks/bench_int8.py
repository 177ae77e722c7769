"""Would an int8 trunk make the comparison cheaper? The lite set's graph in ONNX Runtime, as the
engine runs it (fp32), against the same graph quantised to int8, taking turns on the same photos.

    python benchmarks/bench_int8.py --json benchmarks/results/int8.json

The int8 graph: ONNX Runtime's static quantisation (`quantize_static`: QDQ format, weights int8
per channel, activations uint8, MinMax calibration on `--calibration` evenly spaced train photos),
of the convolutions only (the trunk and each model's own stage; the heads' matrix products and the
attention stay fp32), after `quant_pre_process`. Printed: median ms per photo of each graph (one
photo per call, as the app runs it, the two alternating) and how many val photos each model
(and the ensemble) answers the same with both. Nothing here is used by the app.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import results_file  # benchmarks/results_file.py (this folder is on sys.path when a script runs)

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "bird_dataset"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "lite")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--calibration", type=int, default=40, help="train photos to calibrate on (default 40)")
    p.add_argument("--runs", type=int, default=40, help="timed calls of each graph (default 40)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        print("error: needs onnxruntime (pip install -r requirements.txt)", file=sys.stderr)
        return 2
    from birdfg.checkpoints import load_set
    from birdfg.data import samples
    from birdfg.evaluate import evenly_spaced
    from birdfg.images import open_rgb
    from birdfg.inference import Engine
    from birdfg.inference.runtime import session_options
    from birdfg.layout import graph_cache_dir

    engine = Engine(load_set(args.checkpoints), runtime="onnx", warm_up=False)
    group = engine.groups[0]
    graphs = sorted(graph_cache_dir(args.checkpoints).glob(f"{'-'.join(group.keys)}-*.onnx"))
    if not graphs:
        print(f"error: no exported graph of {group.keys} under {graph_cache_dir(args.checkpoints)}", file=sys.stderr)
        return 2
    source = max(graphs, key=lambda path: path.stat().st_mtime)  # the one the engine just opened
    transform = engine._transforms[group.keys[0]]

    def tensor(path: Path) -> np.ndarray:
        return transform(open_rgb(path))[None].numpy()

    calibration = [tensor(s.path) for s in evenly_spaced(samples(args.data, "train", engine.classes), args.calibration)]

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.left = iter(calibration)

        def get_next(self):
            x = next(self.left, None)
            return None if x is None else {"x": x}

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantised = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        began = time.perf_counter()
        quantize_static(str(prepared), str(quantised), Photos(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        quantise_s = time.perf_counter() - began
        sessions = {name: ort.InferenceSession(str(path), session_options(None), providers=["CPUExecutionProvider"])
                    for name, path in (("fp32", source), ("int8", quantised))}

    probs = [n for n in (o.name for o in sessions["fp32"].get_outputs()) if n.endswith(".probs")]
    val = [tensor(s.path) for s in samples(args.data, "val", engine.classes)]
    same = {name: 0 for name in [*probs, "ensemble"]}
    for x in val:
        a, b = (sessions[name].run(probs, {"x": x}) for name in ("fp32", "int8"))
        for name, u, v in zip(probs, a, b):
            same[name] += int(u.argmax() == v.argmax())
        same["ensemble"] += int(np.mean(a, 0).argmax() == np.mean(b, 0).argmax())

    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for x in val[:3]:  # first calls set up the kernels
        for session in sessions.values():
            session.run(None, {"x": x})
    for i in range(args.runs):
        x = val[i % len(val)]
        for name in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
            start = time.perf_counter()
            sessions[name].run(None, {"x": x})
            times[name].append((time.perf_counter() - start) * 1000)
    median = {name: round(statistics.median(t), 2) for name, t in times.items()}

    print(f"{source.name}: fp32 {median['fp32']:.1f} ms, int8 {median['int8']:.1f} ms per photo "
          f"(int8 / fp32 {median['int8'] / median['fp32']:.2f}; medians of {args.runs}, taking turns)")
    print(f"same answer as fp32 on the {len(val)} val photos: "
          + ", ".join(f"{name.removesuffix('.probs')} {n}" for name, n in same.items()))
    if args.json:
        results_file.write(args.json, {
            "command": "python benchmarks/bench_int8.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "graph": source.name, "calibration_photos": len(calibration), "quantise_s": round(quantise_s, 1),
            "median_ms": median, "int8_over_fp32": round(median["int8"] / median["fp32"], 3),
            "same_answer": {name.removesuffix(".probs"): n for name, n in same.items()}, "val_photos": len(val),
            "samples_ms": {name: [round(t, 2) for t in ts] for name, ts in times.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
