"""What the server's process settings cost a comparison: where the model work runs, and malloc.

    python benchmarks/bench_server_settings.py --json OUT [--requests 40]

The app answers each request on one of Gradio's worker threads. This replays that without
Gradio: the shipped lite set, one comparison at a time (photo file -> three predictions and
maps), each sent from the next thread of a pool of 8 (as Gradio's pool hands them out), and
reports the median time per comparison, in a fresh process per variant:

- `pool_threads` + `trim_each`: the app before: models run on whichever request thread, malloc
  returns blocks >= 4 MB to the OS and the heap is trimmed after every request;
- `pool_threads` + `guard`: malloc keeps activations in the heap and trims only when RSS grew
  (birdfg.memory today);
- `torch_thread` + `trim_each`, `torch_thread` + `guard` (the app today): request threads hand
  the model work to the main thread (birdfg.app.worker.TorchThread).
Also `main_only`: every comparison from the main thread itself (no pool), for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "bird_dataset"
VARIANTS = [("main_only", "guard"), ("pool_threads", "trim_each"), ("pool_threads", "guard"),
            ("torch_thread", "trim_each"), ("torch_thread", "guard")]


def request_photos(data: Path) -> list[Path]:
    """Every tenth val photo: the requests cycle through these."""
    return sorted((data / "val_images").rglob("*.jpg"))[::10]


def run_variant(where: str, malloc: str, photos: list[Path], requests: int) -> dict:
    """One variant, in this (fresh) process."""
    from birdfg import memory, process

    if malloc == "trim_each":  # the settings before this change
        memory.MMAP_THRESHOLD, memory.TRIM_THRESHOLD = 4 << 20, 8 << 20
    process.configure()
    from birdfg.app.worker import TORCH_THREAD, on_torch_thread
    from birdfg.checkpoints import load_set
    from birdfg.inference import Engine
    from birdfg.inference.threads import configure_threads

    configure_threads()
    engine = Engine(load_set(ROOT / "checkpoints" / "lite"))
    compare = on_torch_thread(engine.compare)  # as the app's handlers do (the engine itself is not decorated)
    guard = memory.GrowthGuard()
    after_request = memory.release_free_memory if malloc == "trim_each" else guard.check
    times: list[float] = []

    def request(i: int) -> None:
        start = time.perf_counter()
        compare(photos[i % len(photos)])
        after_request()
        times.append((time.perf_counter() - start) * 1000)

    def send_all() -> None:
        if where == "main_only":
            for i in range(requests):
                request(i)
            return
        with ThreadPoolExecutor(8) as pool:  # one request at a time, each on the pool's next thread
            for i in range(requests):
                pool.submit(request, i).result()

    if where == "torch_thread":
        def client() -> None:
            try:
                send_all()
            finally:
                TORCH_THREAD.stop()
        TORCH_THREAD.serve_forever(start=threading.Thread(target=client).start, poll_s=0.05)
    else:
        send_all()
    steady = times[len(times) // 4:]  # the first requests build each thread's state
    return {"where": where, "malloc": malloc, "requests": len(times), "median_ms": round(statistics.median(steady), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--requests", type=int, default=40)
    args = p.parse_args(argv)
    photos = request_photos(args.data)
    if not photos:
        print(f"error: no photos under {args.data / 'val_images'}; pass --data", file=sys.stderr)
        return 2
    results = []
    for where, malloc in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", where, malloc, str(args.data), str(args.requests)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(["python", "benchmarks/bench_server_settings.py",
                                                          *(argv or sys.argv[1:])]),
                                     "load_average": os.getloadavg(), "variants": results}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--variant":
        print(json.dumps(run_variant(sys.argv[2], sys.argv[3], request_photos(Path(sys.argv[4])), int(sys.argv[5]))))
        raise SystemExit(0)
    raise SystemExit(main())
