"""Checkpoint export/load: identical logits, metadata that rebuilds the model, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import export_lite_set
from safetensors import safe_open

from birdfg import checkpoints
from birdfg.checkpoints import CheckpointError
from birdfg.models import MODEL_KEYS, build, preprocess_config, preset_specs

CLASSES = ["001.A_bird", "002.B_bird", "003.C_bird"]


@pytest.fixture(scope="module")
def full_cnn_file(tmp_path_factory):
    spec = preset_specs("full", 3, ("bcnn",), img_size=64)["bcnn"]
    torch.manual_seed(0)
    model = build(spec, pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "bcnn.safetensors"
    checkpoints.export(model, path, CLASSES, preprocess_config(spec),
                       {"train_acc": 0.9, "val_acc": 0.8}, {"epochs": 3, "command": "test"})
    return model, path


def test_round_trip_gives_identical_logits(full_cnn_file):
    model, path = full_cnn_file
    loaded = checkpoints.load(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))


def test_metadata_carries_everything_needed(full_cnn_file):
    _, path = full_cnn_file
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    meta = {k: json.loads(v) for k, v in raw.items()}
    assert meta["classes"] == CLASSES
    assert meta["spec"]["backbone"] == "resnet152" and meta["spec"]["head"] == "bilinear"
    assert meta["preprocess"]["input_size"] == [3, 64, 64]
    assert set(meta["preprocess"]) >= {"mean", "std", "interpolation", "crop_pct"}
    assert meta["metrics"]["val_acc"] == 0.8
    assert meta["display_name"] == "B-CNN (ResNet-152)"
    assert meta["trained"]["epochs"] == 3 and "date" in meta["trained"]


def test_frozen_backbone_is_not_stored(untrained_lite_set):
    with safe_open(str(untrained_lite_set / "cnn.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.split(".")[0] in ("head", "top") for k in keys)
    size_mb = sum((untrained_lite_set / f"{k}.safetensors").stat().st_size for k in ("cnn", "vit", "bcnn")) / 2**20
    assert size_mb < 40


def test_a_set_shares_one_frozen_backbone(untrained_lite_set):
    model_set = checkpoints.load_set(untrained_lite_set)
    assert model_set.complete and not model_set.errors
    backbones = {id(m.model.backbone) for m in model_set.models.values()}
    assert len(backbones) == 1


def test_missing_truncated_and_foreign_files_are_named(tmp_path, full_cnn_file):
    _, path = full_cnn_file
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoints.load(tmp_path / "cnn.safetensors")
    truncated = tmp_path / "cnn.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(truncated)):
        checkpoints.load(truncated)
    foreign = tmp_path / "vit.safetensors"
    foreign.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="vit.safetensors"):
        checkpoints.load(foreign)
    pickle_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickle_file)
    with pytest.raises(CheckpointError, match="only safetensors"):
        checkpoints.load(pickle_file)


def test_export_refuses_a_wrong_class_count_before_writing_anything(tmp_path, full_cnn_file):
    # (That a crash mid-export leaves the old file: tests/test_interrupted_training.py kills one.)
    model, path = full_cnn_file
    target = tmp_path / "bcnn.safetensors"
    target.write_bytes(path.read_bytes())
    before = checkpoints.read_metadata(target)
    with pytest.raises(ValueError):  # wrong class count: nothing is written
        checkpoints.export(model, target, CLASSES[:2], {}, {}, {})
    assert checkpoints.read_metadata(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bcnn.safetensors"]


def test_model_card_lists_metrics_classes_and_command(untrained_lite_set):
    card = checkpoints.model_card(checkpoints.load_set(untrained_lite_set), "python train.py --preset lite")
    assert card.startswith("---") and "library_name: birdfg" in card
    assert "| `vit` | Hybrid ViT (Lite0 tokens) |" in card
    assert "Red square bird" in card and "`python train.py --preset lite`" in card


def test_a_finer_stride_survives_the_round_trip_with_its_own_trunk(tmp_path):
    """A set whose ViT runs at stride 16 beside stride-32 models: it loads its own trunk."""
    folder = export_lite_set(tmp_path, CLASSES, img_sizes=dict.fromkeys(MODEL_KEYS, 96), output_strides={"vit": 16})
    loaded = checkpoints.load_set(folder).models
    assert loaded["vit"].model.spec.output_stride == 16 and loaded["cnn"].model.spec.output_stride is None
    assert loaded["vit"].model.backbone is not loaded["cnn"].model.backbone
    assert loaded["bcnn"].model.backbone is loaded["cnn"].model.backbone
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert loaded["vit"].model.features(x).shape[-2:] == (6, 6)
        assert loaded["cnn"].model.features(x).shape[-2:] == (3, 3)
