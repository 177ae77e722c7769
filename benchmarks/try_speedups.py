"""What each CPU inference option gives on this machine, one backbone at a time:

    python benchmarks/try_speedups.py --json OUT [--repeats 7] [--no-compile]

For the lite set's backbone (EfficientNet-Lite0 with its ImageNet weights from the pip package,
320 px) and the full set's ResNet-152 and ViT-B/16 (224 px, random weights: speed does not depend
on the values), each as a 1000-class ImageNet classifier, it times one photo's forward (median of
`--repeats` after warm-up) under each option and checks that the logits stay those of plain fp32
eager (top-1 agreement and largest difference on a few val photos):

- eager: fp32, `torch.inference_mode` (the reference);
- channels_last + folded BatchNorm: what birdfg.speed does for convolutional backbones (ships);
- bf16 autocast;
- torch.compile (inductor; its compile time is reported, and would count in a Space's cold start);
- dynamic int8 Linear layers (torch.ao.quantization.quantize_dynamic): the ViT's FLOPs are in them.

benchmarks/README.md's "What was tried" quotes this script's output.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402

from birdfg import speed  # noqa: E402
from birdfg.backbones import backbone_cfg  # noqa: E402
from birdfg.data import build_transform  # noqa: E402
from birdfg.images import open_rgb  # noqa: E402

DEFAULT_DATA = (ROOT.parent / "shared" / "bird_dataset").resolve()


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def subjects() -> dict[str, tuple[torch.nn.Module, int, bool]]:
    """name -> (ImageNet classifier in eval mode, input side, convolutional?)."""
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    lite.load_state_dict(backbone_cfg("tf_efficientnet_lite0").local_weights())  # ImageNet, from the pip package
    return {
        "lite0_320": (lite.eval(), 320, True),
        "resnet152_224": (timm.create_model("resnet152", pretrained=False).eval(), 224, True),
        "vit_b16_224": (timm.create_model("vit_base_patch16_224", pretrained=False).eval(), 224, False),
    }


def photos(data: Path, side: int, n: int = 8) -> torch.Tensor:
    files = sorted((data / "val_images").rglob("*.jpg"))[:: 13][:n]
    if not files:  # no dataset here: random images still show whether the logits move
        return torch.rand(n, 3, side, side)
    transform = build_transform({"input_size": [3, side, side], "mean": [0.5] * 3, "std": [0.5] * 3,
                                 "interpolation": "bicubic", "crop_pct": 0.875}, train=False)
    return torch.stack([transform(open_rgb(f)) for f in files])


def compare_outputs(reference: torch.Tensor, other: torch.Tensor) -> dict:
    scale = float(reference.abs().max())
    return {"top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
            "max_rel_diff": round(float((reference - other.float()).abs().max()) / max(scale, 1e-12), 5)}


def options(model: torch.nn.Module, conv: bool, example: torch.Tensor, with_compile: bool) -> dict:
    """option -> (callable on a batch, setup seconds)."""
    out = {"eager_fp32": (model, 0.0)}
    if conv:
        start = time.perf_counter()
        tuned = copy.deepcopy(model)
        info = speed.tune_backbone(tuned, example, feature_map=True)
        out["channels_last_fold_bn"] = (lambda x: tuned(x.contiguous(memory_format=torch.channels_last)),
                                        time.perf_counter() - start)
        out["channels_last_fold_bn"] += (info,)
    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    out["bf16_autocast"] = (bf16, 0.0)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    out["dynamic_int8_linear"] = (quantized, 0.0)
    if with_compile:
        compiled = torch.compile(copy.deepcopy(model))
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(example)
        out["torch_compile"] = (compiled, time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compiling)")
    args = p.parse_args(argv)
    threads = speed.configure_threads()
    report: dict = {"torch": torch.__version__, "threads": threads,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "models": {}}
    for name, (model, side, conv) in subjects().items():
        batch = photos(args.data, side)
        one = batch[:1]
        with torch.inference_mode():
            reference = model(batch)
        rows = {}
        for option, (fn, setup_s, *info) in options(model, conv, one, not args.no_compile).items():
            with torch.inference_mode():
                ms = median_ms(lambda: fn(one), args.repeats)
                outputs = fn(batch)
            rows[option] = {"ms": round(ms, 1), "setup_s": round(setup_s, 1), **compare_outputs(reference, outputs),
                            **({"tuning": info[0]} if info else {})}
            print(f"{name:16s} {option:22s} {ms:8.1f} ms  {rows[option]}", flush=True)
        base = rows["eager_fp32"]["ms"]
        for row in rows.values():
            row["speedup"] = round(base / row["ms"], 2)
        report["models"][name] = rows
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
