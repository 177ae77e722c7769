"""Load test of the comparison app: many clients at once, real photos mixed with bad uploads.

    python benchmarks/load_test.py --json OUT [--checkpoints checkpoints/lite] [--clients 16] [--requests 400]

Starts `python app.py` on a free localhost port, then `--clients` threads, each with its own
`gradio_client.Client`, share a fixed list of `--requests` calls to `/compare` (every fourth one
a bad or odd file from tests/malformed.py, the rest real photos) and stop when it is used up.
Every call has a deadline, so nothing can hang the run. It reports:

- valid_ok / valid_total: real photos that got the full answer (target: all of them);
- busy: calls the bounded queue turned away ("Queue is full" from Gradio), never a hang;
- bad_inputs: per kind of bad file, how it was answered (ok / error message / busy / failed);
- p50_ms / p95_ms: latency of the answered real photos, as a client sees it (queueing included);
- rss_before_mb / rss_after_mb: the server's resident memory after warm-up (one real photo from
  each client, so that bounded caches and per-thread state exist) and after the run (target:
  growth <= 10 %), and whether the server was still up at the end;
- identical_burst: after the run, `--clients` clients send the same photo at once (48 calls):
  identical answers must not break each other's downloads.

The set served is `--checkpoints`; when it is not a complete set (checkpoints/lite before the
trained set is shipped) an exported lite set with untrained heads stands in and the JSON says so.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from malformed import OK, generate  # noqa: E402

SHARED_VAL = ROOT.parent / "shared" / "bird_dataset" / "val_images"
KEYS = {"cnn", "vit", "bcnn"}
CALL_TIMEOUT_S = 300  # one call, queueing included; only a stuck server gets near it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def model_set(folder: Path, tmp: Path) -> tuple[Path, str]:
    from birdfg.checkpoints import load_set

    if load_set(folder).complete:
        return folder, str(folder)
    from conftest import TINY_CLASSES, export_lite_set

    classes = sorted(p.name for p in SHARED_VAL.iterdir() if p.is_dir()) if SHARED_VAL.is_dir() else TINY_CLASSES
    print(f"{folder} is not a complete set: serving an exported lite set with untrained heads", flush=True)
    return export_lite_set(tmp / "lite", classes), "exported lite set, untrained heads (checkpoints/lite missing)"


def real_photos(tmp: Path, count: int = 40) -> list[Path]:
    """Real val photos (a few per class) when ../shared is there, else generated JPEGs."""
    if SHARED_VAL.is_dir():
        per_class = [sorted(d.glob("*.jpg"))[:3] for d in sorted(SHARED_VAL.iterdir()) if d.is_dir()]
        photos = [p for group in itertools.zip_longest(*per_class) for p in group if p is not None]
        return photos[:count]
    from conftest import synthetic_photo

    folder = tmp / "photos"
    folder.mkdir()
    for i in range(count):
        synthetic_photo(i % 3, 300 + i, (480, 360)).save(folder / f"photo_{i}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def start_app(folder: Path, log_path: Path, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_SERVER_NAME", None)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--checkpoints", str(folder), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if is_up(url):
            return proc, url
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def is_up(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def classify(answer) -> tuple[str, str]:
    """(outcome, detail) of one /compare answer: ok, error (with its message) or wrong."""
    if isinstance(answer, dict) and set(answer) == {"error"}:
        return "error", answer["error"]
    if isinstance(answer, dict) and set(answer.get("models", {})) == KEYS \
            and all(m.get("top5") and "error" not in m for m in answer["models"].values()):
        return "ok", ""
    return "wrong", json.dumps(answer)[:300]


def call(client, path: Path) -> tuple[str, str, float]:
    """One /compare call with a deadline: (outcome, detail, milliseconds)."""
    from gradio_client import handle_file

    start = time.perf_counter()
    job = client.submit(handle_file(str(path)), api_name="/compare")
    try:
        answer, *_ = job.result(timeout=CALL_TIMEOUT_S)
        outcome, detail = classify(answer)
    except Exception as exc:  # noqa: BLE001 - every way a call can end is counted
        text = f"{type(exc).__name__}: {exc}"
        if "queue is full" in text.lower():
            outcome, detail = "busy", text
        elif isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
            outcome, detail = "timeout", text
        else:
            outcome, detail = "failed", text
    return outcome, detail, (time.perf_counter() - start) * 1000


def run(url: str, plan: list[tuple[str, Path]], clients: int) -> list[dict]:
    """`clients` threads take calls from the shared plan until it is used up."""
    from gradio_client import Client

    results: list[dict] = []
    lock = threading.Lock()
    todo = iter(enumerate(plan))

    def worker() -> None:
        client = Client(url, verbose=False)
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            i, (kind, path) = item
            outcome, detail, ms = call(client, path)
            with lock:
                results.append({"i": i, "kind": kind, "file": path.name, "outcome": outcome, "detail": detail,
                                "ms": ms})

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r["i"])


def make_plan(photos: list[Path], bad_dir: Path, requests: int, bad_every: int) -> list[tuple[str, Path]]:
    """Real photos, and every `bad_every`-th call a malformed file, cycling through the kinds so
    that each kind is sent."""
    cases = generate(bad_dir)
    by_kind: dict[str, list] = defaultdict(list)
    for case in cases:
        by_kind[case.kind].append(case)
    # Round robin over kinds, then over files within a kind.
    bad = [c for group in itertools.zip_longest(*by_kind.values()) for c in group if c is not None]
    bad_cycle, photo_cycle = itertools.cycle(bad), itertools.cycle(photos)
    plan = []
    for i in range(requests):
        if i % bad_every == bad_every - 1:
            case = next(bad_cycle)
            plan.append((f"bad:{case.kind}" if case.expect != OK else f"odd:{case.kind}", bad_dir / case.name))
        else:
            plan.append(("valid", next(photo_cycle)))
    return plan


def summarise(results: list[dict], rss_before: float, rss_after: float, alive: bool, extra: dict) -> dict:
    valid = [r for r in results if r["kind"] == "valid"]
    valid_ms = sorted(r["ms"] for r in valid if r["outcome"] == "ok")
    bad_inputs: dict[str, dict] = {}
    for r in results:
        if r["kind"] == "valid":
            continue
        kind = r["kind"].split(":", 1)[1]
        entry = bad_inputs.setdefault(kind, {"sent": 0, "answers": Counter(), "examples": {}})
        entry["sent"] += 1
        entry["answers"][r["outcome"]] += 1
        entry["examples"].setdefault(r["outcome"], f"{r['file']}: {r['detail']}"[:240])
    for entry in bad_inputs.values():
        entry["answers"] = dict(entry["answers"])

    def pct(q: float) -> float | None:
        if not valid_ms:
            return None
        return round(valid_ms[min(len(valid_ms) - 1, int(q * len(valid_ms)))], 1)

    outcomes = Counter(r["outcome"] for r in results)
    return {
        "valid_ok": sum(r["outcome"] == "ok" for r in valid),
        "valid_total": len(valid),
        "busy": outcomes.get("busy", 0),
        "bad_inputs": bad_inputs,
        "p50_ms": round(statistics.median(valid_ms), 1) if valid_ms else None,
        "p95_ms": pct(0.95),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 1),
        "server_up_after": alive,
        "outcomes": dict(outcomes),
        "valid_failures": [f"{r['file']}: {r['outcome']} {r['detail']}"[:240] for r in valid if r["outcome"] != "ok"][:10],
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/load_test.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="write the report here")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints" / "lite")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--bad-every", type=int, default=4, help="every N-th call sends a malformed file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="birdfg_load_") as tmp_name:
        tmp = Path(tmp_name)
        folder, served = model_set(args.checkpoints, tmp)
        photos = real_photos(tmp)
        plan = make_plan(photos, tmp / "bad", args.requests, args.bad_every)
        proc, url = start_app(folder, tmp / "app.log")
        try:
            from gradio_client import Client

            warm = Client(url, verbose=False)
            outcome, detail, _ = call(warm, photos[0])
            if outcome != "ok":
                raise RuntimeError(f"warm-up call failed: {outcome} {detail}")
            # One photo per client: lazy set-up, per-thread state and the bounded result cache
            # exist before memory is measured.
            warm_up = run(url, [("valid", p) for p in photos[1:args.clients + 1]], args.clients)
            if any(r["outcome"] != "ok" for r in warm_up):
                raise RuntimeError(f"warm-up failed: {[r for r in warm_up if r['outcome'] != 'ok'][:3]}")
            rss_before = rss_mb(proc.pid)
            print(f"app up at {url}; {len(plan)} calls from {args.clients} clients", flush=True)
            start = time.perf_counter()
            results = run(url, plan, args.clients)
            wall = time.perf_counter() - start
            time.sleep(2)
            alive = proc.poll() is None and is_up(url)
            rss_after = rss_mb(proc.pid) if proc.poll() is None else float("nan")
            burst = run(url, [("valid", photos[0])] * 48, args.clients) if alive else []
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        extra = {"clients": args.clients, "requests": len(plan), "wall_s": round(wall, 1),
                 "throughput_rps": round(len(plan) / wall, 2), "model_set": served,
                 "photos": "shared/bird_dataset val" if SHARED_VAL.is_dir() else "generated JPEGs",
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": list(os.getloadavg())}
        report = summarise(results, rss_before, rss_after, alive, extra)
        burst_outcomes = Counter(r["outcome"] for r in burst)
        report["identical_burst"] = {
            "calls": len(burst), "ok": burst_outcomes.get("ok", 0), "outcomes": dict(burst_outcomes),
            "examples": sorted({f"{r['outcome']}: {r['detail']}"[:200] for r in burst if r["outcome"] != "ok"})[:3]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "bad_inputs"}, indent=1))
    print(f"wrote {args.json}")
    ok = report["valid_ok"] == report["valid_total"] and alive and report["rss_growth_pct"] <= 10
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
