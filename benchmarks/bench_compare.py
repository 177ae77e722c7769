"""How fast is one comparison on this machine, and how far from what the hardware allows?

    python benchmarks/bench_compare.py --json OUT [--sets lite full] [--repeats 5] [--no-app]

Model sets: lite is the shipped checkpoints/lite (or, while it is incomplete, an exported lite set
with untrained heads); full is the full preset's three architectures with random weights, exported
to a temp folder so that they load the way the app loads them. Each set's ONNX graphs are cached
under its folder's `.onnx/` (the full set's: the temp folder's, so its first load always exports
them). For each set, in one run:

- optimized_ms: median wall time of one comparison as the app does it: Engine.compare on a photo
  file (runtime "auto": ONNX Runtime) + every model's overlay (Engine.overlay), after warm-up;
  overlays_ms is the overlays alone; runtimes says where each model ran;
- torch_ms: the same with Engine(model_set, runtime="torch"), torch eager: what ONNX Runtime gains;
- naive_ms: the same answer computed the usual way: each model's own fp32 eager forward, its
  explanation by pytorch-grad-cam's GradCAM (CNN: last feature layer; B-CNN: the 1x1 reduction
  before bilinear pooling) or by a second hooked forward for attention rollout (ViT), overlays
  by grad-cam's show_cam_on_image; no shared backbone. Every model's top-1 must equal the
  engine's on every timed photo (naive_top1_mismatches; any makes the script exit 1);
  speedup = naive_ms / optimized_ms;
- flop_limit_ms: the forwards' FLOPs (torch.utils.flop_counter; a shared trunk counted once, with
  the first model of its group: gflops) divided by this machine's fp32 matmul rate (2048x2048
  products, timed between the timed comparisons: matmul_gflops); limit_ratio = optimized / limit;
- batch_ips: photos per second through Engine.run (what the app's batch mode and birdfg.predict
  call), one photo per call vs batch_size photos per call (medians of alternating passes; ratio =
  batched / one at a time); flop_limit_ms: the same FLOPs over the matmul rate timed between those
  passes; flop_ceiling_ratio = a photo's ms one at a time / that limit (the most any batching
  could gain); limit_ratio = a batched photo's ms / that limit;
- agreement: top-1 of Engine.run, one photo at a time (ratio) and in batches (batched_ratio), vs
  plain fp32 eager models on every val photo (per_model; val_accuracy is the engine's);
  agreement_ratio is the lower of the two ratios;
- cold start and peak_rss_mb: a fresh Python process that imports, loads the set (load_s), builds
  the engine (graphs_s: exporting the ONNX graphs, or reading them from the cache, and opening
  the sessions), warms it up (warm_up_s) and answers two comparisons; cold_start_inprocess_s is
  its wall time; graphs_cached_before says whether the set's graph cache held graphs when it
  started;
- unless --no-app, through gradio_client against `python app.py --checkpoints SET` in a fresh
  process: cold_start_s (process start to the first answered /compare, on a copy of the set without its
  graph cache, so the ONNX export counts; app_graphs_cached_before),
  api_ms (median /compare round trip, the three overlays downloaded; api_no_download_ms without),
  gradio_floor_ms (the same round trip against an app that does no work: Gradio's own cost) and
  app_peak_rss_mb.

Timings are medians. The engine, the torch engine, the naive path and the matmul yardstick take
turns within each repeat, so that a change of load on a shared machine touches all of them alike;
the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import results_file  # noqa: E402  benchmarks/results_file.py (this folder is on sys.path when a script runs)
from birdfg import process  # noqa: E402

process.configure()  # the app's process settings, before torch is imported: they change the timings

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from birdfg import checkpoints, layout  # noqa: E402
from birdfg.app.batch import BATCH_SIZE  # noqa: E402
from birdfg.data import build_transform, class_names  # noqa: E402
from birdfg.explanations import attention_rollout  # noqa: E402
from birdfg.heads import BilinearHead, LinearHead  # noqa: E402
from birdfg.images import open_rgb  # noqa: E402
from birdfg.inference import Comparison, Engine  # noqa: E402
from birdfg.inference.threads import usable_cpus  # noqa: E402
from birdfg.models import MODEL_KEYS, build, preprocess_config, preset_specs  # noqa: E402

DEFAULT_DATA = (ROOT.parent / "shared" / "bird_dataset").resolve()
SHIPPED_LITE = ROOT / "checkpoints" / "lite"


# --- timing helpers --------------------------------------------------------------------------------

def median_ms(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn(i) over `repeats` calls after `warmup` calls, in ms (and all times)."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), times


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """This machine's fp32 matmul rate now (GFLOP/s): the yardstick of the FLOP limit."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms, _ = median_ms(lambda _: a @ b, repeats, warmup=2)
    return 2 * n ** 3 / (ms / 1000) / 1e9


def cached_graphs(folder: Path) -> list[str]:
    """The ONNX graphs in a set folder's cache."""
    return sorted(p.name for p in layout.graph_cache_dir(folder).glob("*.onnx"))


# --- model sets ------------------------------------------------------------------------------------

def export_set(preset: str, folder: Path, classes: list[str], seed: int = 0) -> Path:
    """A real set on disk, as train.py would write it: lite = pretrained Lite0 backbone (pip
    package) + untrained heads; full = random weights everywhere (`--no-pretrained`)."""
    torch.manual_seed(seed)
    shared = None
    for key, spec in preset_specs(preset, len(classes)).items():
        if spec.frozen_backbone:
            model = build(spec, pretrained=True, backbone=shared)
            shared = model.backbone
        else:
            model = build(spec, pretrained=False)
        checkpoints.export(model.eval(), layout.checkpoint_path(folder, key), classes, preprocess_config(spec),
                           {"train_acc": 0.0, "val_acc": 0.0},
                           {"epochs": 0, "command": f"benchmarks/bench_compare.py ({preset}, untrained)"})
    return folder


def lite_folder(args, classes: list[str], tmp: Path) -> tuple[Path, str]:
    if layout.is_complete(args.lite_checkpoints):
        return args.lite_checkpoints, f"shipped weights ({args.lite_checkpoints})"
    print(f"{args.lite_checkpoints} is not complete: benchmarking an exported lite set with untrained heads")
    return export_set("lite", tmp / "lite", classes), "untrained heads (checkpoints/lite incomplete)"


# --- the naive path --------------------------------------------------------------------------------

def last_feature_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the feature map the head sees: the last of the model's own top
    stages, else the backbone's last feature module (timm's feature_info)."""
    if not isinstance(model.top, torch.nn.Identity):
        return list(model.top.children())[-1]
    return model.backbone.get_submodule(model.backbone.feature_info[-1]["module"])


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from timm.models.vision_transformer import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


class NaiveModel:
    """One model as a tutorial would run it: its own copy of everything, fp32, eager, every
    parameter trainable (GradCAM needs gradients), no shared backbone, no reuse between the
    prediction and the explanation."""

    def __init__(self, path: Path):
        from pytorch_grad_cam import GradCAM

        loaded = checkpoints.load(path)  # no shared_backbones: a private backbone copy
        self.key = loaded.spec.key
        self.model = loaded.model.eval().requires_grad_(True)
        self.transform = build_transform(loaded.preprocess, train=False)
        self.crop = build_transform({**loaded.preprocess, "mean": [0, 0, 0], "std": [1, 1, 1]}, train=False)
        self.size = loaded.preprocess["input_size"][-1]
        head = self.model.head
        self.cam = None
        if isinstance(head, LinearHead):
            self.cam = GradCAM(model=self.model, target_layers=[last_feature_layer(self.model)])
        elif isinstance(head, BilinearHead):
            self.cam = GradCAM(model=self.model, target_layers=[head.reduce])  # before bilinear pooling

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).softmax(-1)

    def rollout(self, x: torch.Tensor) -> np.ndarray:
        """A second forward with hooks that keep each layer's attention (unfused), then rollout."""
        attentions: list[torch.Tensor] = []
        layers = attention_modules(self.model)
        hooks = [m.attn_drop.register_forward_hook(lambda _m, _i, out: attentions.append(out.detach()))
                 for m in layers]
        fused = [m.fused_attn for m in layers]
        try:
            for m in layers:
                m.fused_attn = False
            with torch.no_grad():
                self.model(x)
        finally:
            for m, f in zip(layers, fused):
                m.fused_attn = f
            for h in hooks:
                h.remove()
        heat = attention_rollout(attentions)[0]
        side = int(round(heat.numel() ** 0.5))
        return heat.reshape(side, -1).numpy()

    def explain(self, x: torch.Tensor, top1: int) -> np.ndarray:
        import cv2
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self.cam is not None:
            return self.cam(input_tensor=x, targets=[ClassifierOutputTarget(top1)])[0]
        heat = cv2.resize(self.rollout(x), (self.size, self.size))
        return (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)

    def run(self, photo_path: Path) -> tuple[int, np.ndarray]:
        """Prediction + explanation + overlay of one photo file; returns (top-1, overlay)."""
        from pytorch_grad_cam.utils.image import show_cam_on_image

        img = Image.open(photo_path).convert("RGB")
        x = self.transform(img)[None]
        top1 = int(self.predict(x).argmax(-1))
        mask = self.explain(x, top1)
        rgb = self.crop(img).permute(1, 2, 0).numpy().clip(0, 1).astype(np.float32)
        return top1, show_cam_on_image(rgb, mask, use_rgb=True)


# --- measurements ----------------------------------------------------------------------------------

def app_like(engine: Engine, photo: Path) -> tuple[Comparison, list[Image.Image]]:
    """One comparison as the app serves it: predictions + every answering model's overlay."""
    comparison = engine.compare(photo)
    overlays = [engine.overlay(comparison, k) for k in comparison.answered]
    return comparison, overlays


def forward_flops(engine: Engine) -> dict[str, float]:
    """GFLOPs of each model's forward for one photo as the engine runs them: a shared trunk
    counted once (with the first model of its group), then each model's top and head."""
    flops = {}
    for group in engine.groups:
        first = engine.models[group.keys[0]]
        x = torch.zeros(1, *first.preprocess["input_size"])
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                shared = first.model.shared_features(x)
            shared_flops = counter.get_total_flops()
            for i, key in enumerate(group.keys):
                model = engine.models[key].model
                with FlopCounterMode(display=False) as counter:
                    model.head(model.top(shared))
                flops[key] = (counter.get_total_flops() + (shared_flops if i == 0 else 0)) / 1e9
        for part in group.torch_runner.group.parts.values():
            part.recorder.take()  # the engine's attention hooks saw these forwards too
    return flops


def batch_rate(engine: Engine, photos: list[Image.Image], batch_size: int, passes: int = 3,
               budget_s: float = 60.0) -> dict:
    """Photos per second through Engine.run: one photo per call vs `batch_size` photos per call.
    After one warm-up batch, the two take turns (`passes` of each, fewer when a pair takes over
    `budget_s`), with the matmul yardstick beside each pair, and the medians are compared."""
    def one_pass(size: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(photos), size):
            engine.run(photos[i:i + size])
        return len(photos) / (time.perf_counter() - start)

    engine.run(photos[:batch_size])
    single, batched, rates = [], [], []
    started = time.perf_counter()
    while len(single) < passes and (not single or time.perf_counter() - started < budget_s):
        single.append(one_pass(1))
        batched.append(one_pass(batch_size))
        rates.append(matmul_gflops(repeats=3))
    single_ips, batched_ips = statistics.median(single), statistics.median(batched)
    return {"photos": len(photos), "batch_size": batch_size, "passes": len(single),
            "one_at_a_time_ips": round(single_ips, 2), "batched_ips": round(batched_ips, 2),
            "ratio": round(batched_ips / single_ips, 2), "matmul_gflops": round(statistics.median(rates), 1)}


def agreement(engine: Engine, naive: dict[str, NaiveModel], items: list[tuple[Path, int]],
              batch_size: int) -> dict:
    """Top-1 of the engine against the plain fp32 eager models, on the same decoded photos: one
    photo at a time (as the app's compare runs) and in batches (its batch mode)."""
    same = {k: 0 for k in naive}
    same_batched = {k: 0 for k in naive}
    correct = {k: 0 for k in naive}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        photos = [open_rgb(path) for path, _ in chunk]
        batched = engine.run(photos)
        for photo, (_, label), in_batch in zip(photos, chunk, batched):
            alone = engine.run([photo])[0]
            for key, model in naive.items():
                ref = int(model.predict(model.transform(photo)[None]).argmax(-1))
                top1 = alone.predicted(key)
                same[key] += top1 == ref
                same_batched[key] += in_batch.predicted(key) == ref
                correct[key] += top1 == label
    n = len(items)
    return {"photos": n, "ratio": round(sum(same.values()) / (n * len(naive)), 4),
            "batched_ratio": round(sum(same_batched.values()) / (n * len(naive)), 4),
            "per_model": {k: round(v / n, 4) for k, v in same.items()},
            "val_accuracy": {k: round(v / n, 4) for k, v in correct.items()}}


def fresh_process_probe(folder: Path, photo: Path) -> dict:
    """A new Python process: imports, loads the set, builds the engine, answers two comparisons;
    its peak RSS and how long that took from process start."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--probe", str(folder), str(photo)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"the probe process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"cold_start_inprocess_s": round(wall, 2), **result}


def probe_main(folder: str, photo: str) -> None:
    start = time.perf_counter()
    cached_before = bool(cached_graphs(Path(folder)))
    model_set = checkpoints.load_set(Path(folder))
    loaded = time.perf_counter()
    engine = Engine(model_set, warm_up=False)  # the ONNX graphs: exported, or read from the cache
    built = time.perf_counter()
    engine.warm_up()
    ready = time.perf_counter()
    app_like(engine, Path(photo))
    first = time.perf_counter()
    app_like(engine, Path(photo))
    second = time.perf_counter()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"load_s": round(loaded - start, 2), "graphs_s": round(built - loaded, 2),
                      "warm_up_s": round(ready - built, 2), "first_compare_ms": round((first - ready) * 1000, 1),
                      "second_compare_ms": round((second - first) * 1000, 1),
                      "peak_rss_mb": round(peak_kb / 1024, 1), "graphs_cached_before": cached_before}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(args: list[str], timeout: float = 300):
    """A Gradio server started as `python ARGS` on a free local port; yields (url, start time, process)."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"(https?://[\w.\-]+:\d+)", line)
            if found and not url:
                url.append(found.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(timeout) or not url:
            raise RuntimeError(f"{args[0]} did not start within {timeout:.0f} s:\n{''.join(lines[-20:])}")
        yield url[0], start, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def connect(url: str, start: float, **kwargs):
    from gradio_client import Client

    while True:  # the URL is printed just before the server accepts connections
        try:
            return Client(url, verbose=False, **kwargs)
        except Exception:  # noqa: BLE001 - not up yet
            if time.perf_counter() - start > 300:
                raise
            time.sleep(0.2)


def api_round_trips(url: str, start: float, api_name: str, photos: list[Path], repeats: int) -> dict:
    """Median round trip of `api_name` with the default client (downloads the returned images,
    as an API user gets them) and without downloading them."""
    from gradio_client import handle_file

    out = {}
    for download in (True, False):
        client = connect(url, start, download_files=download)
        ms, times = median_ms(lambda i: client.predict(handle_file(str(photos[i % len(photos)])), api_name=api_name),
                              repeats)
        out["ms" if download else "no_download_ms"] = round(ms, 1)
        if download:
            out["times_ms"] = [round(t, 1) for t in times]
    return out


def api_timings(folder: Path, photos: list[Path], repeats: int) -> dict:
    """Cold start (process start to the first answered /compare) and /compare round trips through
    gradio_client; then the same round trips against an app that does no work (Gradio's floor)."""
    import shutil

    # The app starts on a copy of the set without its graph cache, as a fresh clone or a new
    # Space does: its cold start includes the ONNX export.
    fresh = Path(tempfile.mkdtemp(prefix="bench_cold_")) / folder.name
    shutil.copytree(folder, fresh, ignore=shutil.ignore_patterns(".onnx"))
    cached_before = bool(cached_graphs(fresh))
    try:
        return _api_timings(fresh, photos, repeats, cached_before)
    finally:
        shutil.rmtree(fresh.parent, ignore_errors=True)


def _api_timings(folder: Path, photos: list[Path], repeats: int, cached_before: bool) -> dict:
    from gradio_client import handle_file

    with server_process([str(ROOT / "app.py"), "--checkpoints", str(folder)]) as (url, start, proc):
        answer = connect(url, start).predict(handle_file(str(photos[0])), api_name="/compare")
        cold = time.perf_counter() - start
        if isinstance(answer, (list, tuple)) and isinstance(answer[0], dict) and "error" in answer[0]:
            raise RuntimeError(f"/compare answered an error: {answer[0]['error']}")
        trips = api_round_trips(url, start, "/compare", photos, repeats)
        rss = _vm_hwm_mb(proc.pid)
    with server_process([__file__, "--echo-app"]) as (url, start, _):
        connect(url, start).predict(handle_file(str(photos[0])), api_name="/echo")
        floor = api_round_trips(url, start, "/echo", photos, repeats)
    return {"cold_start_s": round(cold, 2), "app_graphs_cached_before": cached_before, "api_ms": trips["ms"],
            "api_times_ms": trips["times_ms"], "api_no_download_ms": trips["no_download_ms"],
            "gradio_floor_ms": floor["ms"], "gradio_floor_no_download_ms": floor["no_download_ms"],
            "app_peak_rss_mb": rss}


def echo_app() -> None:
    """Gradio's own cost of one /compare-shaped call: photo in, JSON and three JPEG images out,
    no model (the photo itself, downscaled like the overlays)."""
    import gradio as gr

    def echo(path: str):
        photo = open_rgb(path)
        photo.thumbnail((512, 512))
        return {"models": {}}, photo, photo, photo

    with gr.Blocks() as demo:
        image = gr.Image(type="filepath")
        outputs = [gr.JSON()] + [gr.Image(type="pil", format="jpeg") for _ in MODEL_KEYS]
        gr.Button().click(echo, image, outputs, api_name="echo")
    demo.queue().launch(server_name="127.0.0.1", server_port=int(os.environ["GRADIO_SERVER_PORT"]))


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return round(int(found.group(1)) / 1024, 1) if found else None


def bench_set(name: str, folder: Path, source: str, args, timing_photos: list[Path],
              val_items: list[tuple[Path, int]]) -> dict:
    print(f"\n== {name}: {folder} ({source}) ==", flush=True)
    result: dict = {"checkpoints": str(folder), "weights": source}
    repeats = args.repeats

    if args.no_app:
        result.update({"cold_start_s": None, "api_ms": None, "api_error": "--no-app"})
    else:
        try:
            result.update(api_timings(folder, timing_photos, repeats))
        except Exception as exc:  # noqa: BLE001 - record why, keep the rest of the run
            result.update({"cold_start_s": None, "api_ms": None, "api_error": f"{type(exc).__name__}: {exc}"})
        print(f"app: { {k: v for k, v in result.items() if k.startswith(('api', 'app', 'cold', 'gradio'))} }", flush=True)
    probe = fresh_process_probe(folder, timing_photos[0])
    result.update(probe)
    print(f"fresh process: {probe}", flush=True)

    engine = Engine(checkpoints.load_set(folder))
    result["runtimes"] = engine.runtimes
    # Its own copy of the set: an engine hooks its models' attention layers.
    eager = Engine(checkpoints.load_set(folder), runtime="torch")
    keys = list(engine.models)
    naive = {k: NaiveModel(layout.checkpoint_path(folder, k)) for k in keys}
    engine_top1: dict[int, dict[str, int]] = {}
    mismatches: list[list] = []

    def optimized(i: int) -> None:
        j = i % len(timing_photos)
        comparison, _ = app_like(engine, timing_photos[j])
        engine_top1[j] = {k: comparison.predicted(k) for k in keys}

    def naive_run(i: int) -> None:
        j = i % len(timing_photos)
        for key, model in naive.items():
            top1, _ = model.run(timing_photos[j])
            if engine_top1[j][key] != top1 and [timing_photos[j].name, key, engine_top1[j][key], top1] not in mismatches:
                mismatches.append([timing_photos[j].name, key, engine_top1[j][key], top1])

    paths = {"optimized": optimized, "torch": lambda i: app_like(eager, timing_photos[i % len(timing_photos)]),
             "naive": naive_run}
    for i in range(2):
        for fn in paths.values():
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in paths}
    rates = []
    for i in range(repeats):
        rates.append(matmul_gflops(repeats=3))
        for path, fn in paths.items():
            start = time.perf_counter()
            fn(i)
            times[path].append((time.perf_counter() - start) * 1000)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ms = medians["optimized"]
    for path in paths:
        result[f"{path}_ms"] = round(medians[path], 1)
        result[f"{path}_times_ms"] = [round(t, 1) for t in times[path]]
    result["speedup"] = round(medians["naive"] / ms, 2)
    result["naive_top1_mismatches"] = mismatches  # [photo, model, engine's top-1, naive top-1]
    print(f"optimized {ms:.1f} ms, torch {medians['torch']:.1f} ms, naive {medians['naive']:.1f} ms "
          f"-> speedup {result['speedup']:.2f}", flush=True)
    if mismatches:
        print(f"WARNING {name}: naive and engine top-1 differ: {mismatches}", flush=True)
    del eager

    comparison = engine.compare(timing_photos[0])
    overlays_ms, _ = median_ms(lambda i: [engine.overlay(comparison, k) for k in comparison.answered], 2 * repeats)
    result["overlays_ms"] = round(overlays_ms, 2)  # the overlays alone (part of optimized_ms)

    flops = forward_flops(engine)
    rate = statistics.median(rates)
    limit = sum(flops.values()) / rate * 1000
    result.update(gflops={k: round(v, 2) for k, v in flops.items()}, matmul_gflops=round(rate, 1),
                  flop_limit_ms=round(limit, 1), limit_ratio=round(ms / limit, 2))
    print(f"FLOPs {flops} at {rate:.1f} GFLOP/s -> limit {limit:.1f} ms, ratio {ms / limit:.2f}", flush=True)

    step = max(1, len(val_items) // args.batch_photos)
    batch_photos = [open_rgb(p) for p, _ in val_items[::step][:args.batch_photos]]
    result["batch_ips"] = batch = batch_rate(engine, batch_photos, args.batch_size)
    batch_limit_ms = sum(flops.values()) / batch["matmul_gflops"] * 1000
    batch["flop_limit_ms"] = round(batch_limit_ms, 1)
    batch["flop_ceiling_ratio"] = round(1000 / batch["one_at_a_time_ips"] / batch_limit_ms, 2)
    batch["limit_ratio"] = round(1000 / batch["batched_ips"] / batch_limit_ms, 2)
    print(f"batch {batch}", flush=True)

    agree_items = (val_items if args.agreement_photos is None
                   else val_items[::max(1, len(val_items) // args.agreement_photos)][:args.agreement_photos])
    result["agreement"] = agreement(engine, naive, agree_items, args.batch_size)
    result["agreement_ratio"] = min(result["agreement"]["ratio"], result["agreement"]["batched_ratio"])
    print(f"agreement {result['agreement']}", flush=True)
    result["load_average_end"] = results_file.load_average()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--sets", nargs="+", choices=["lite", "full"], default=["lite", "full"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="bird_dataset folder (val_images/ is used)")
    p.add_argument("--lite-checkpoints", type=Path, default=SHIPPED_LITE)
    p.add_argument("--repeats", type=int, default=5, help="timed comparisons per path (median)")
    p.add_argument("--photos", type=int, default=5, help="distinct val photos the timed runs cycle through")
    p.add_argument("--batch-photos", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="photos per batch (the app's batch mode uses %(default)s)")
    p.add_argument("--agreement-photos", type=int, default=None, help="default: every val photo")
    p.add_argument("--no-app", action="store_true", help="skip the gradio_client measurements")
    args = p.parse_args(argv)

    val_root = args.data / "val_images"
    if not val_root.is_dir():
        print(f"error: {val_root} not found; pass --data pointing at bird_dataset", file=sys.stderr)
        return 2
    classes = class_names(args.data)
    val_items = [(path, label) for label, c in enumerate(classes) for path in sorted((val_root / c).glob("*.jpg"))]
    step = max(1, len(val_items) // args.photos)
    timing_photos = [path for path, _ in val_items[::step][:args.photos]]

    started = time.perf_counter()
    gflops = matmul_gflops()
    report: dict = {"machine": {"cpu": results_file.cpu_model(), "cores": os.cpu_count(),
                                "usable_cpus": usable_cpus(), "torch": torch.__version__,
                                "matmul_fp32_gflops": round(gflops, 1), "load_average_start": results_file.load_average()},
                    "command": " ".join(["python", "benchmarks/bench_compare.py", *(argv or sys.argv[1:])])}
    print(f"matmul {gflops:.1f} GFLOP/s, load average {results_file.load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_compare_") as tmp:
        tmp = Path(tmp)
        for name in args.sets:
            if name == "lite":
                folder, source = lite_folder(args, classes, tmp)
            else:
                folder, source = export_set("full", tmp / "full", classes), "random weights (--no-pretrained)"
            report[name] = bench_set(name, folder, source, args, timing_photos, val_items)
            report["machine"]["torch_threads"] = torch.get_num_threads()  # as the engine leaves them
            results_file.write(args.json, report)  # what is done so far, should a later set fail
    report["machine"]["load_average_end"] = results_file.load_average()
    report["seconds"] = round(time.perf_counter() - started, 1)
    results_file.write(args.json, report)
    summary = ("optimized_ms", "torch_ms", "naive_ms", "speedup", "flop_limit_ms", "limit_ratio", "agreement_ratio",
               "peak_rss_mb", "cold_start_inprocess_s", "cold_start_s", "api_ms", "gradio_floor_ms")
    batch_summary = ("ratio", "flop_ceiling_ratio", "limit_ratio")
    sets = {k: v for k, v in report.items() if k in ("lite", "full")}
    print(json.dumps({k: {**{m: v.get(m) for m in summary}, **{f"batch_{m}": v["batch_ips"][m] for m in batch_summary}}
                      for k, v in sets.items()}, indent=1))
    mismatched = {k: v["naive_top1_mismatches"] for k, v in sets.items() if v["naive_top1_mismatches"]}
    if mismatched:
        print(f"error: the naive path's top-1 differs from the engine's: {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--echo-app"]:
        echo_app()
        raise SystemExit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        probe_main(sys.argv[2], sys.argv[3])
        raise SystemExit(0)
    raise SystemExit(main())
