"""Training throughput (images/s) of the full trio on a GPU, random weights, the way train.py
trains a trainable backbone (birdfg.training.BirdTask under a Lightning Trainer, AdamW, batch 32):

    python benchmarks/bench_train_gpu.py --json OUT [--steps 30] [--warmup 10] [--batch-size 32]

Configurations: fp32 eager (precision "32-true", NCHW) vs bf16-mixed + channels_last (what
train.py uses on a GPU with bf16) vs the same + torch.compile. Images are random tensors already
on the GPU, so this is the models' training rate; JPEG decoding in train.py's data loader is not
in it (with --workers N it runs beside the GPU work).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from birdfg.models import MODEL_KEYS, build, preset_specs  # noqa: E402
from birdfg.training import BirdTask  # noqa: E402

CONFIGS = {
    "fp32": dict(precision="32-true", channels_last=False, compile=False),
    "bf16-mixed+channels_last": dict(precision="bf16-mixed", channels_last=True, compile=False),
    "bf16-mixed+channels_last+compile": dict(precision="bf16-mixed", channels_last=True, compile=True),
}


class RandomImages(Dataset):
    """`length` batches' worth of random images, built once on the device (no loader cost)."""

    def __init__(self, n: int, size: int, classes: int, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g).to(device)
        self.y = torch.randint(0, classes, (n,), generator=g).to(device)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Timer(L.Callback):
    """Images/s over the steps after `warmup` (device synchronised at both ends)."""

    def __init__(self, warmup: int, batch_size: int):
        self.warmup, self.batch_size = warmup, batch_size
        self.start = self.end = None
        self.steps = 0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.steps += 1
            self._sync()
            self.end = time.perf_counter()

    @property
    def images_per_second(self) -> float:
        return self.steps * self.batch_size / (self.end - self.start)


def measure(key: str, config: dict, steps: int, warmup: int, batch_size: int, classes: int = 20) -> dict:
    torch.manual_seed(0)
    spec = preset_specs("full", classes, (key,))[key]
    model = build(spec, pretrained=False)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    task = BirdTask(model, lr=3e-4)
    if config["compile"]:
        task.net = torch.compile(model)
    data = RandomImages(batch_size * (warmup + steps), spec.img_size, classes,
                        "cuda" if torch.cuda.is_available() else "cpu")
    timer = Timer(warmup, batch_size)
    trainer = L.Trainer(max_epochs=1, precision=config["precision"], callbacks=[timer], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(task, DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True))
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return {"images_per_s": round(timer.images_per_second, 1), "wall_s_incl_compile": round(total, 1),
            "peak_gpu_gib": round(peak, 2) if peak else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", nargs="+", choices=MODEL_KEYS, default=list(MODEL_KEYS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "batch_size": args.batch_size, "steps_timed": args.steps, "results": {}}
    for name in args.configs:  # compile last: if time runs out, the eager figures are in
        for key in args.models:
            try:
                result = measure(key, CONFIGS[name], args.steps, args.warmup, args.batch_size)
            except Exception as exc:  # noqa: BLE001 - record it, measure the rest
                result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            report["results"].setdefault(key, {})[name] = result
            print(key, name, result, flush=True)
            args.json.write_text(json.dumps(report, indent=2))
    print("\nimages/s (batch %d)" % args.batch_size)
    print("model  " + "  ".join(f"{n:>34}" for n in args.configs))
    for key, row in report["results"].items():
        print(f"{key:<6} " + "  ".join(f"{row.get(n, {}).get('images_per_s', 'error')!s:>34}" for n in args.configs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
