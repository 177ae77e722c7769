"""`ModelSpec` (plain data that says what a model is), `build(spec)`, and the two presets.

A bird model is a backbone from the registry plus one of the heads; nothing else differs
between the CNN, the ViT and the B-CNN.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from birdfg.backbones import backbone_cfg, create_backbone, data_config, feature_dim, split
from birdfg.heads import HEADS, grid_size

MODEL_KEYS = ("cnn", "vit", "bcnn")
ENSEMBLE_KEY = "ensemble"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    display_name: str
    backbone: str
    head: str
    num_classes: int
    img_size: int
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    # A frozen backbone is not trained; its weights come from the registry at load time and
    # one copy can serve every model of a set that shares it.
    frozen_backbone: bool = False
    # With a frozen backbone: the stage from which on each model trains its own copy (None: none).
    train_from: str | None = None
    # A feature-map backbone's stride (timm's `output_stride`): 16 dilates the last stride-2
    # stage instead of downsampling, a grid twice as fine on the same ImageNet weights.
    output_stride: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Model spec has unknown fields {sorted(unknown)}.")
        return cls(**data)


class BirdModel(nn.Module):
    """backbone -> top -> head. `backbone` is the part a set may share (frozen) or the whole
    trained backbone; `top` holds the stages a model with a frozen backbone trains on its own
    (Identity when none). A shared backbone runs once per photo for every model of a set."""

    def __init__(self, spec: ModelSpec, backbone: nn.Module, head: nn.Module, top: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.top = top if top is not None else nn.Identity()
        self.head = head
        if spec.frozen_backbone:
            self.backbone.requires_grad_(False)

    def shared_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map (or tokens) the head sees, and its explanation uses."""
        return self.top(self.shared_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def tail(self) -> nn.Module:
        """What trains on cached shared features: top + head."""
        return nn.Sequential(self.top, self.head)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that start from ImageNet weights (they learn at a lower rate)."""
        parts = [self.top] if self.spec.frozen_backbone else [self.backbone, self.top]
        return [p for part in parts for p in part.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "BirdModel":
        super().train(mode)
        if self.spec.frozen_backbone:
            self.backbone.eval()  # frozen BatchNorm statistics stay ImageNet's
        return self


def build_head(spec: ModelSpec, in_features: int) -> nn.Module:
    kwargs = dict(spec.head_kwargs)
    if spec.head in ("transformer", "bilinear_transformer"):
        kwargs.setdefault("grid", grid_size(spec.img_size, spec.output_stride or 32))
    return HEADS[spec.head](in_features, spec.num_classes, **kwargs)


def build(spec: ModelSpec, pretrained: bool = True, backbone: nn.Module | None = None) -> BirdModel:
    """Build the model a spec describes. `pretrained=False` downloads nothing; `backbone` lets a
    model set share one already-built frozen backbone."""
    if spec.head not in HEADS:
        raise ValueError(f"Unknown head {spec.head!r}; choose one of {sorted(HEADS)}.")
    needs_tokens = spec.head == "token"
    if needs_tokens != (backbone_cfg(spec.backbone).features == "tokens"):
        raise ValueError(f"Head {spec.head!r} does not fit backbone {spec.backbone!r} (feature map vs tokens).")
    if spec.train_from and not spec.frozen_backbone:
        raise ValueError("train_from needs frozen_backbone=True (it says which stages stay trainable).")
    top = None
    if backbone is None:
        backbone = create_backbone(spec.backbone, pretrained, spec.img_size, spec.output_stride)
        if spec.train_from:
            backbone, top = split(backbone, spec.backbone, spec.train_from)
    elif spec.train_from:
        # A shared trunk is given: this model still needs its own top, with pretrained weights.
        _, top = split(create_backbone(spec.backbone, pretrained, spec.img_size, spec.output_stride), spec.backbone,
                       spec.train_from)
    in_features = feature_dim(top) if top is not None else feature_dim(backbone)
    return BirdModel(spec, backbone, build_head(spec, in_features), top)


def shared_backbone_key(spec: ModelSpec) -> str:
    """Models whose specs give the same key can share one frozen backbone object."""
    return f"{spec.backbone}|{spec.train_from or ''}|{spec.output_stride or ''}"


def preprocess_config(spec: ModelSpec) -> dict:
    return data_config(spec.backbone, spec.img_size)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The reference report's three models; fine-tuned end to end on a GPU.
    "full": {
        "cnn": dict(display_name="ResNet-152", backbone="resnet152", head="linear", img_size=224,
                    head_kwargs={"dropout": 0.3}),
        "vit": dict(display_name="ViT-B/16", backbone="vit_base_patch16_224", head="token", img_size=224),
        "bcnn": dict(display_name="B-CNN (ResNet-152)", backbone="resnet152", head="bilinear", img_size=224,
                     head_kwargs={"dim": 512, "dropout": 0.3}),
    },
    # Offline CPU set: one frozen ImageNet EfficientNet-Lite0 trunk shared by the three models;
    # each fine-tunes its own copy of the last stage and 1x1 head conv ("blocks.6" on) and its head.
    "lite": {
        "cnn": dict(display_name="EfficientNet-Lite0 CNN", backbone="tf_efficientnet_lite0", head="linear",
                    img_size=320, frozen_backbone=True, train_from="blocks.6", head_kwargs={"dropout": 0.5}),
        "vit": dict(display_name="Hybrid ViT (Lite0 tokens)", backbone="tf_efficientnet_lite0", head="transformer",
                    img_size=320, frozen_backbone=True, train_from="blocks.6",
                    head_kwargs={"dim": 256, "depth": 2, "heads": 4}),
        "bcnn": dict(display_name="B-CNN (Lite0)", backbone="tf_efficientnet_lite0", head="bilinear",
                     img_size=320, frozen_backbone=True, train_from="blocks.6", head_kwargs={"dim": 64, "dropout": 0.5}),
        # Not in the default three (`--models bvit`): the report's "B-CNN extended with
        # transformers", bilinear pooling over the hybrid ViT's output tokens (README, Table I).
        "bvit": dict(display_name="Bilinear ViT (Lite0 tokens)", backbone="tf_efficientnet_lite0",
                     head="bilinear_transformer", img_size=320, frozen_backbone=True, train_from="blocks.6",
                     head_kwargs={"dim": 256, "depth": 2, "heads": 4, "bilinear_dim": 64, "dropout": 0.5}),
    },
}


# How each preset is trained by default (train.py's flags override them). The lite B-CNN gets
# more epochs: its bilinear head on cached features was still improving at 15 (CUB split test
# accuracy 0.856 at 15 epochs, 0.868 at 25, 0.879 at 35; the others peak well before 15).
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"epochs": 10, "lr": 3e-4, "backbone_lr_scale": 0.1},
    "lite": {"epochs": 15, "lr": 1e-3, "backbone_lr_scale": 0.3, "epochs_of": {"bcnn": 35, "bvit": 35}},
}


def default_epochs(preset: str, key: str) -> int:
    defaults = TRAINING_DEFAULTS[preset]
    return defaults.get("epochs_of", {}).get(key, defaults["epochs"])


def preset_specs(
    preset: str, num_classes: int, keys: tuple[str, ...] = MODEL_KEYS, img_size: int | None = None,
    backbone: str | None = None, train_from: str | None = None, output_stride: int | None = None,
) -> dict[str, ModelSpec]:
    """The preset's specs for `keys`; `img_size`, `backbone` (every model's trunk, e.g.
    tf_efficientnet_lite1), `train_from` (a frozen-trunk model's first own stage, e.g.
    blocks.5) and `output_stride` (a feature-map trunk's, e.g. 16) replace the preset's, and
    a display name that names the preset's trunk names the new one."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    unknown = set(keys) - set(PRESETS[preset])
    if unknown:
        raise ValueError(f"Unknown model keys {sorted(unknown)} for preset {preset!r}; choose from {list(PRESETS[preset])}.")
    specs = {}
    for key in keys:
        row = dict(PRESETS[preset][key])
        if img_size:
            row["img_size"] = img_size
        if backbone and backbone != row["backbone"]:
            old, new = trunk_label(row["backbone"]), trunk_label(backbone)
            name = row["display_name"]
            row["display_name"] = name.replace(old, new) if old in name else f"{name} on {new}"
            row["backbone"] = backbone
        if train_from:
            if not row.get("frozen_backbone"):
                raise ValueError(f"train_from {train_from!r}: the {preset} preset's {key} fine-tunes its whole "
                                 "backbone; only a frozen-trunk preset (lite) can move the split.")
            if train_from not in (stages := backbone_cfg(row["backbone"]).stages):
                raise ValueError(f"train_from {train_from!r}: {row['backbone']} has the stages {', '.join(stages)}.")
            row["train_from"] = train_from
        if output_stride:
            if backbone_cfg(row["backbone"]).features != "map":
                raise ValueError(f"output_stride {output_stride}: the {preset} preset's {key} has a token backbone "
                                 f"({row['backbone']}), no feature map to make finer.")
            row["output_stride"] = output_stride
            row["display_name"] = f"{row['display_name']} at stride {output_stride}"
        specs[key] = ModelSpec(key=key, num_classes=num_classes, **row)
    return specs


def trunk_label(backbone: str) -> str:
    """How a display name calls a trunk: "Lite1" for tf_efficientnet_lite1, else the timm name."""
    found = re.fullmatch(r"tf_efficientnet_lite(\d)", backbone)
    return f"Lite{found.group(1)}" if found else backbone
