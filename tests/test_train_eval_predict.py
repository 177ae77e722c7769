"""`train.py` end to end on a small dataset of real JPEGs, then evaluate and predict on what it wrote."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from birdfg import checkpoints

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_lite(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_out")
    result = run("train.py", "--data", str(tiny_dataset), "--preset", "lite", "--img-size", "64", "--epochs", "3",
                 "--views", "2", "--batch-size", "8", "--workers", "0", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_train_writes_loadable_checkpoints_and_table(trained_lite):
    out, result = trained_lite
    assert "Table I" in result.stdout
    for name in ("EfficientNet-Lite0 CNN", "Hybrid ViT", "B-CNN (Lite0)"):
        assert name in result.stdout
    model_set = checkpoints.load_set(out / "lite")
    assert model_set.complete, model_set.errors
    meta = model_set.models["vit"].meta
    assert meta["trained"]["epochs"] == 3 and "train.py" in meta["trained"]["command"]
    assert 0.0 <= meta["metrics"]["val_acc"] <= 1.0
    with torch.inference_mode():
        assert model_set.models["bcnn"].model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_a_worse_run_does_not_replace_a_better_checkpoint(trained_lite, tiny_dataset):
    out, _ = trained_lite
    path = out / "lite" / "cnn.safetensors"
    meta = checkpoints.read_metadata(path)
    # Pretend the exported file scored perfectly: a new run cannot beat it without --force.
    model = checkpoints.load(path)
    checkpoints.export(model.model, path, model.classes, model.preprocess, {**meta["metrics"], "val_acc": 1.01},
                       meta["trained"])
    args = ("train.py", "--data", str(tiny_dataset), "--preset", "lite", "--img-size", "64", "--epochs", "1",
            "--views", "1", "--models", "cnn", "--workers", "0", "--output", str(out), "--logger", "none")
    kept = run(*args)
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert "use --force" in kept.stdout and checkpoints.read_metadata(path)["metrics"]["val_acc"] == 1.01
    forced = run(*args, "--force")
    assert forced.returncode == 0 and checkpoints.read_metadata(path)["metrics"]["val_acc"] <= 1.0


def test_full_preset_trains_on_images_end_to_end(tiny_dataset, tmp_path):
    result = run("train.py", "--data", str(tiny_dataset), "--preset", "full", "--models", "cnn", "--no-pretrained",
                 "--img-size", "32", "--epochs", "1", "--batch-size", "6", "--workers", "0",
                 "--output", str(tmp_path), "--logger", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = checkpoints.load(tmp_path / "full" / "cnn.safetensors")
    assert any(k.startswith("backbone.") for k in loaded.model.state_dict())
    assert loaded.meta["preprocess"]["input_size"] == [3, 32, 32]


def test_evaluate_writes_json_and_confusion_matrices(trained_lite, tiny_dataset, tmp_path):
    out, _ = trained_lite
    report_json = tmp_path / "eval.json"
    result = run("-m", "birdfg.evaluate", "--data", str(tiny_dataset), "--checkpoints", str(out / "lite"),
                 "--json", str(report_json))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_json.read_text())
    for key in ("cnn", "vit", "bcnn", "ensemble"):
        assert report[key]["total"] == 6
        assert report[key]["correct"] == round(report[key]["accuracy"] * 6)
        assert set(report[key]["per_class"]) == {p.name for p in (tiny_dataset / "val_images").iterdir()}
        if key != "ensemble":
            assert (out / "lite" / "report" / f"{key}_confusion_val.png").stat().st_size > 1000
    assert "Ensemble" in result.stdout


def test_predict_writes_the_kaggle_format(trained_lite, tiny_dataset, tmp_path):
    out, _ = trained_lite
    csv_path = tmp_path / "kaggle.csv"
    result = run("-m", "birdfg.predict", "--data", str(tiny_dataset), "--checkpoints", str(out / "lite"),
                 "--out", str(csv_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["Id", "Category"]
    assert sorted(r[0] for r in rows[1:]) == ["test000", "test001", "test002"]
    assert all(0 <= int(r[1]) < 3 for r in rows[1:])


def test_bad_arguments_fail_with_a_message(tmp_path):
    result = run("train.py", "--data", str(tmp_path), "--preset", "lite")
    assert result.returncode == 2 and "no class folders" in result.stderr
    result = run("-m", "birdfg.evaluate", "--data", str(tmp_path), "--checkpoints", str(tmp_path / "none"))
    assert result.returncode == 2 and "no usable checkpoint" in result.stderr
