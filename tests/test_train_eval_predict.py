"""`train.py` end to end on a small dataset of real JPEGs, then evaluate and predict on what it wrote."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from birdfg import checkpoints

pytestmark = pytest.mark.slow

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
    assert set(meta["trained"]) == {"date", "epochs", "command", "seconds", "pretrained", "bird_box_views"}
    assert meta["trained"]["epochs"] == 3 and meta["trained"]["command"].startswith("python train.py --data ")
    assert meta["trained"]["pretrained"] is True and meta["trained"]["bird_box_views"] is False
    assert set(meta["metrics"]) == {"train_acc", "val_acc", "split", "best_epoch"}
    assert 0.0 <= meta["metrics"]["val_acc"] <= 1.0 and 0 <= meta["metrics"]["best_epoch"] < 3
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


def test_reported_accuracy_is_the_exact_share_of_the_whole_val_set(tmp_path):
    """The val accuracy `fit` reports (and exports) is correct / total over every val item for the
    kept weights, exactly as a Python float: 5/6, not float32's 0.83333331."""
    from birdfg.models import build, preset_specs
    from birdfg.training import FeatureViews, TrainConfig, fit

    torch.manual_seed(0)
    model = build(preset_specs("lite", 3, ("cnn",), img_size=64)["cnn"], pretrained=False)
    features = torch.randn(1, 21, 192, 2, 2)
    train = FeatureViews(features, torch.arange(21) % 3)
    # Seven train photos again, two of them now labelled otherwise: the model cannot get them all.
    val = FeatureViews(features[:, :7], torch.tensor([0, 1, 2, 0, 1, 0, 1]))
    cfg = TrainConfig(preset="lite", epochs=2, batch_size=4, logger="none", workers=0, accelerator="cpu")
    result = fit(model, train, val, cfg, tmp_path / "run")
    with torch.inference_mode():
        predicted = model.eval().tail()(val.features[0].float()).argmax(-1)
    correct = int((predicted == val.labels).sum())
    assert 0 < correct < 7, "test set-up: a share that float32 cannot hold exactly"
    assert result.val_acc == correct / 7


_DDP_PROBE = """
import json, os, sys
from pathlib import Path
import torch
from birdfg.models import build, preset_specs
from birdfg.training import FeatureViews, TrainConfig, fit

torch.manual_seed(0)
model = build(preset_specs("lite", 3, ("cnn",), img_size=64)["cnn"], pretrained=False)
features = torch.randn(1, 24, 192, 2, 2, generator=torch.Generator().manual_seed(1))
train = FeatureViews(features, torch.arange(24) % 3)
# Eight val items, no sampler padding. Rank 0 gets the even ones (labelled as in train), rank 1
# the odd ones (labelled otherwise): each rank alone would report a very different accuracy.
labels = torch.arange(8) % 3
labels[1::2] = (labels[1::2] + 1) % 3
val = FeatureViews(features[:, :8], labels)
cfg = TrainConfig(preset="lite", epochs=4, batch_size=4, lr=3e-2, logger="none", workers=0, accelerator="cpu",
                  devices=2, strategy="ddp")
result = fit(model, train, val, cfg, Path(sys.argv[1]))
with torch.inference_mode():
    right = model.eval().tail()(val.features[0].float()).argmax(-1) == labels
# One file per rank: the two ranks share stdout, where their lines can interleave.
(Path(sys.argv[2]) / f"{os.getpid()}.json").write_text(json.dumps({
    "reported": result.val_acc, "whole": right.double().mean().item(), "even_half": right[0::2].double().mean().item()}))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_accuracy_counts_every_rank_under_ddp(tmp_path):
    """Two CPU ranks (gloo), each validating half of the val set: both report the accuracy of the
    whole set, not of their own half."""
    script = tmp_path / "ddp_probe.py"
    script.write_text(_DDP_PROBE)
    # Lightning's DDP launcher starts rank 1 by running this same script again.
    found = tmp_path / "reports"
    found.mkdir()
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(found)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(f.read_text()) for f in sorted(found.glob("*.json"))]
    assert len(reports) == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert reports[0]["whole"] != reports[0]["even_half"], "test set-up: the halves must score differently"
    assert [r["reported"] for r in reports] == [reports[0]["whole"]] * 2, reports


def test_every_flag_reaches_the_config():
    """train.py maps each flag onto TrainConfig: flags all set away from their defaults give a
    config that differs from the default one in every field."""
    import dataclasses
    import importlib.util

    from birdfg.train_config import TrainConfig

    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    cfg = train_cli.to_config(train_cli.parse_args([
        "--data", "d", "--preset", "lite", "--models", "vit", "--epochs", "3", "--batch-size", "5", "--lr", "0.1",
        "--backbone-lr-scale", "0.5", "--weight-decay", "0.2", "--label-smoothing", "0.0", "--mixup", "0.4",
        "--img-size", "96", "--backbone", "tf_efficientnet_lite1",
        "--train-from", "blocks.5", "--output-stride", "16", "--seed", "7", "--output", "o",
        "--split-file", "s.csv", "--views", "2", "--boxes", "b.csv", "--no-boxes", "--pseudo-labels", "t",
        "--pseudo-threshold", "0.9", "--no-pretrained", "--resume",
        "--force", "--accelerator", "cpu", "--devices", "2", "--num-nodes", "2", "--strategy", "ddp",
        "--precision", "16-mixed", "--logger", "none", "--workers", "0", "--push-to-hub", "me/birds",
    ]))
    default = TrainConfig()
    same = [f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) == getattr(default, f.name)]
    assert not same, f"flags that do not reach TrainConfig: {same}"
    assert cfg.devices == 2 and cfg.models == ("vit",) and cfg.data == Path("d")
    assert cfg.for_model("vit").epochs == 3 and TrainConfig(preset="lite").for_model("bcnn").epochs == 35


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a task outside a Trainer
def test_mixup_mixes_train_batches_only():
    """--mixup: the net sees each train photo blended with another of the batch, the blend the
    loss weighs by (the larger weight on the photo's own label); val batches and mixup 0 leave
    the photos as they are."""
    from torch import nn
    from torch.nn.functional import cross_entropy

    from birdfg.training import BirdTask

    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.arange(6)
    for mixup, seed in [(0.0, 0), *((0.4, seed) for seed in range(5))]:
        torch.manual_seed(seed)
        net = nn.Linear(4, 6)
        seen = []
        net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        task = BirdTask(net, num_classes=6, mixup=mixup, label_smoothing=0.0)
        train_loss = task._step((x, y, None), "train")
        task._step((x, y, None), "val")
        assert torch.equal(seen[1], x), "a val batch was changed"
        if mixup == 0:
            assert torch.equal(seen[0], x)
            continue
        # Each row is lam * x_i + (1 - lam) * x_j, one lam >= 0.5 for the whole batch.
        mixed = seen[0]
        assert not torch.equal(mixed, x)
        partners = [min(range(6), key=lambda j, i=i: (round(_off_segment(mixed[i], x[i], x[j]), 5), j != i))
                    for i in range(6)]
        lams = [_lam(mixed[i], x[i], x[j]) for i, j in enumerate(partners) if j != i]  # j == i: unmixed
        assert lams and all(0.5 <= lam <= 1 for lam in lams) and max(lams) - min(lams) < 1e-4, (seed, lams)
        lam, logits = lams[0], net(mixed)
        expected = lam * cross_entropy(logits, y) + (1 - lam) * cross_entropy(logits, y[partners])
        assert torch.allclose(train_loss, expected, atol=1e-4), (seed, train_loss, expected)


def _lam(point: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.equal(a, b):
        return 1.0
    return float(torch.dot(point - b, a - b) / torch.dot(a - b, a - b))


def _off_segment(point: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    lam = _lam(point, a, b)
    return float((point - (lam * a + (1 - lam) * b)).norm())


def test_full_preset_trains_on_images_end_to_end(tiny_dataset, tmp_path):
    result = run("train.py", "--data", str(tiny_dataset), "--preset", "full", "--models", "cnn", "--no-pretrained",
                 "--img-size", "32", "--epochs", "1", "--batch-size", "6", "--workers", "0",
                 "--output", str(tmp_path), "--logger", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = checkpoints.load(tmp_path / "full" / "cnn.safetensors")
    assert any(k.startswith("backbone.") for k in loaded.model.state_dict())
    assert loaded.meta["preprocess"]["input_size"] == [3, 32, 32]


def test_pseudo_labels_join_the_train_photos_with_the_teachers_answers(trained_lite, tiny_dataset, tmp_path):
    """--pseudo-labels: the unlabelled photos (test_images) the teacher set's ensemble is sure of
    are cached and trained on as photos of the species it names (its answers as predict writes
    them); a threshold no answer reaches adds none; the checkpoint says how many joined."""
    from safetensors.torch import load_file

    out, _ = trained_lite
    teacher = out / "lite"
    kaggle = tmp_path / "teacher.csv"
    done = run("-m", "birdfg.predict", "--data", str(tiny_dataset), "--checkpoints", str(teacher), "--out", str(kaggle),
               "--workers", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [int(r["Category"]) for r in sorted(csv.DictReader(open(kaggle)), key=lambda r: r["Id"])]
    labelled = len(list((tiny_dataset / "train_images").rglob("*.jpg")))
    common = ("train.py", "--data", str(tiny_dataset), "--preset", "lite", "--img-size", "64", "--epochs", "1",
              "--views", "1", "--models", "cnn", "--workers", "0", "--logger", "none")
    for threshold, joined in (("1e-6", len(answers)), ("1.0", 0)):
        student = tmp_path / f"student-{threshold}"
        result = run(*common, "--pseudo-labels", str(teacher), "--pseudo-threshold", threshold, "--output", str(student))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{joined} of the {len(answers)} unlabelled photos" in result.stdout, result.stdout
        (cache,) = (student / ".runs" / "lite" / "cache").glob("features-*.safetensors")
        assert load_file(str(cache))["train_labels"].tolist()[labelled:] == answers[:joined]
        meta = checkpoints.read_metadata(student / "lite" / "cnn.safetensors")
        assert meta["trained"]["pseudo_labels"] == {"photos": joined, "of": len(answers), "threshold": float(threshold)}
    result = run(*common, "--pseudo-labels", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "--pseudo-labels" in result.stderr and "no usable checkpoint" in result.stderr


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
    result = run("train.py", "--data", str(tmp_path), "--preset", "lite", "--label-smoothing", "1.5")
    assert result.returncode == 2 and "--label-smoothing 1.5: must be at least 0 and below 1" in result.stderr
    result = run("train.py", "--data", str(tmp_path), "--preset", "lite", "--mixup", "-1")
    assert result.returncode == 2 and "--mixup -1.0: must be 0 (off) or more" in result.stderr
    result = run("train.py", "--data", str(tmp_path), "--preset", "lite", "--pseudo-threshold", "0")
    assert result.returncode == 2 and "--pseudo-threshold 0.0: must be above 0 and at most 1" in result.stderr
    result = run("-m", "birdfg.evaluate", "--data", str(tmp_path), "--checkpoints", str(tmp_path / "none"))
    assert result.returncode == 2 and "no usable checkpoint" in result.stderr
