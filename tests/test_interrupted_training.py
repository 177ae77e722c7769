"""Interrupted training: `train.py` killed with SIGKILL mid-run resumes with `--resume` (reusing
the cached backbone features and the epochs already trained) and exports a loadable checkpoint;
last.ckpt is always the latest epoch; killed while exporting, it leaves the previous checkpoint
intact; a dataset whose train and val class folders differ is refused before any training starts."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_CLASSES, make_dataset, synthetic_photo

EPOCHS = 4
START_TIMEOUT_S = 240  # from launch to the first epoch's checkpoint; only a broken run gets near it
RUN_TIMEOUT_S = 300

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]


def _launch(data: Path, out: Path, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """train.py on the lite preset at 64 px, one cached view, batches of 8 (15 steps an epoch).
    Output goes to a file: an unread pipe would fill up and stall the run."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--preset", "lite", "--models", "cnn",
           "--img-size", "64", "--views", "1", "--workers", "0", "--batch-size", "8", "--output", str(out),
           "--logger", "none", *extra]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})})


def _tail(log: Path) -> str:
    # The progress bar writes multi-byte characters: a read can end inside one.
    return log.read_bytes()[-3000:].decode("utf-8", "replace")


def _wait_for(proc: subprocess.Popen, ready, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {START_TIMEOUT_S} s:\n{_tail(log)}")
        time.sleep(0.05)


def _complete_checkpoint(path: Path) -> bool:
    """True once `path` is a whole checkpoint. Lightning writes it to a temporary file and renames
    it, but that is a copy when the temporary folder is on another file system."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated, half-copied: not yet
        return False
    return True


def _kill(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself ({proc.returncode}):\n{_tail(log)}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Big enough for 15 training steps an epoch (120 photos), small enough to cache in seconds."""
    return make_dataset(tmp_path_factory.mktemp("interrupt_ds"), train_per_class=40, val_per_class=4, test=0)


@pytest.fixture(scope="module")
def resumed(data, tmp_path_factory) -> dict:
    """Kill a run as soon as its first epoch's checkpoint is complete on disk (epochs later than
    that, and the export, are left to do), look at what is there, then `--resume` it to the end."""
    out = tmp_path_factory.mktemp("interrupt_out")
    run_dir, cache_dir = out / ".runs" / "lite" / "cnn", out / ".runs" / "lite" / "cache"
    killed_log, resumed_log = out / "killed.log", out / "resumed.log"

    proc = _launch(data, out, killed_log, "--epochs", str(EPOCHS))
    _wait_for(proc, lambda: _complete_checkpoint(run_dir / "last.ckpt"), "a complete last.ckpt", killed_log)
    _kill(proc, killed_log)
    state = {
        "killed_epoch": torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["epoch"],
        "exported_before_resume": (out / "lite" / "cnn.safetensors").exists(),
        "cache_files": sorted(cache_dir.glob("*.safetensors")),
    }
    state["cache_stat"] = [(p.stat().st_mtime_ns, p.stat().st_ino) for p in state["cache_files"]]

    start = time.monotonic()
    proc = _launch(data, out, resumed_log, "--epochs", str(EPOCHS), "--resume")
    proc.wait(timeout=RUN_TIMEOUT_S)
    state.update(out=out, resumed_rc=proc.returncode, resumed_log=resumed_log.read_bytes().decode("utf-8", "replace"),
                 resumed_seconds=time.monotonic() - start)
    if (run_dir / "last.ckpt").exists():
        state["final_ckpt"] = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    return state


def test_kill_mid_run_leaves_a_resumable_checkpoint_and_no_export(resumed):
    assert resumed["killed_epoch"] < EPOCHS - 1, "the run was killed too late to test resuming"
    assert not resumed["exported_before_resume"], "a killed run must not export"
    assert len(resumed["cache_files"]) == 1, "the backbone features are cached before training"


def test_resume_finishes_the_run_and_exports_a_loadable_checkpoint(resumed):
    from birdfg import checkpoints

    log = resumed["resumed_log"]
    assert resumed["resumed_rc"] == 0, log[-3000:]
    assert "Restoring states from the checkpoint path" in log and "last.ckpt" in log, log[-3000:]
    assert "reusing cached backbone features" in log
    cache_files = resumed["cache_files"]
    assert [(p.stat().st_mtime_ns, p.stat().st_ino) for p in cache_files] == resumed["cache_stat"], \
        "resume recomputed the feature cache"

    model_set = checkpoints.load_set(resumed["out"] / "lite", keys=("cnn",))
    assert not model_set.errors and set(model_set.models) == {"cnn"}
    loaded = model_set.models["cnn"]
    assert loaded.meta["trained"]["epochs"] == EPOCHS
    assert loaded.classes == TINY_CLASSES
    # The epochs before the kill count too: their accuracies came through the run checkpoint, and
    # the exported best epoch is the best of all of them.
    history = resumed["final_ckpt"]["birdfg_history"]
    assert [row["epoch"] for row in history] == list(range(EPOCHS)), history
    best = max(history, key=lambda row: row["val_acc"])
    assert loaded.meta["metrics"]["best_epoch"] == best["epoch"]
    assert loaded.meta["metrics"]["val_acc"] == best["val_acc"]
    print(f"\nresumed from epoch {resumed['killed_epoch']} and finished in {resumed['resumed_seconds']:.1f} s")


def test_last_ckpt_is_the_latest_epoch_even_when_val_accuracy_falls(tmp_path):
    """`--resume` continues from last.ckpt, so it must be the latest epoch's, not the best one's.
    Val here is the train features with shifted labels: the better the model learns, the worse
    val gets, so the best epoch comes first."""
    from birdfg.models import build, preset_specs
    from birdfg.training import FeatureViews, TrainConfig, fit

    torch.manual_seed(0)
    model = build(preset_specs("lite", 3, ("cnn",), img_size=64)["cnn"], pretrained=False)
    features, labels = torch.randn(1, 24, 192, 2, 2), torch.arange(24) % 3
    train, val = FeatureViews(features, labels), FeatureViews(features, (labels + 1) % 3)
    epochs = 4
    cfg = TrainConfig(preset="lite", epochs=epochs, batch_size=8, lr=3e-2, logger="none", workers=0,
                      accelerator="cpu", seed=0)
    result = fit(model, train, val, cfg, tmp_path / "run")
    best = torch.load(tmp_path / "run" / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == result.best_epoch < epochs - 1, "test set-up: val accuracy must peak early"
    assert last["epoch"] == epochs - 1
    assert [row["epoch"] for row in last["birdfg_history"]] == list(range(epochs))


def test_kill_during_export_keeps_the_previous_checkpoint(resumed, data):
    """A second run is killed between writing its new file and renaming it over the old one
    (BIRDFG_TEST_PAUSE_EXPORT holds it there): the old checkpoint loads, byte for byte the same."""
    from birdfg import checkpoints
    from birdfg.inference import Engine

    out = resumed["out"]
    target = out / "lite" / "cnn.safetensors"
    digest, meta = _sha256(target), checkpoints.read_metadata(target)
    log = out / "export_kill.log"
    proc = _launch(data, out, log, "--epochs", "1", "--force", env={"BIRDFG_TEST_PAUSE_EXPORT": "120"})
    _wait_for(proc, lambda: b"BIRDFG_TEST_PAUSE_EXPORT" in log.read_bytes(), "export pause", log)
    _kill(proc, log)

    strays = list(target.parent.glob(".cnn.safetensors.*.tmp"))
    assert strays, "the kill did not land between writing the new file and renaming it"
    assert _sha256(target) == digest
    assert checkpoints.read_metadata(target) == meta
    model_set = checkpoints.load_set(out / "lite", keys=("cnn",))
    assert not model_set.errors and model_set.models["cnn"].meta == meta
    assert checkpoints.find_sets(out) == {"lite": out / "lite"}
    # The stray temp file does not disturb the next user of the folder.
    result = Engine(model_set, runtime="torch").compare(synthetic_photo(2, 9, (160, 120)))
    assert result.results["cnn"].ok


def test_train_and_val_class_folders_that_differ_are_refused_before_training(tmp_path, capsys, monkeypatch):
    """train.py's own main(), in this process: the check runs before anything heavy."""
    import importlib.util

    data = make_dataset(tmp_path / "ds", train_per_class=2, val_per_class=1, test=0)
    shutil.rmtree(data / "val_images" / TINY_CLASSES[2])
    extra = data / "val_images" / "004.Extra_bird"
    extra.mkdir()
    synthetic_photo(0, 77).save(extra / "extra.jpg")
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = train_cli.main(["--data", str(data), "--preset", "lite", "--epochs", "1", "--output", str(out),
                           "--logger", "none", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "different class folders" in err and TINY_CLASSES[2] in err and "004.Extra_bird" in err, err
    assert not out.exists(), "nothing may be written before the check"
