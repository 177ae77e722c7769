"""Explanation methods: one interface, one class per method (the shape of pytorch-grad-cam).

Every head names the methods it offers (`explanations` on the head class, see heads.py); each
method turns the evidence of the prediction's own forward pass into a location grid for a
class. The app asks a model what it can show (`explanations_of`) and never which model it is.

A method that needs a gradient can run the model's own top and head again from
`Evidence.shared` (the shared trunk's output) with autograd on; the trunk never runs again.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


@dataclass
class Evidence:
    """What one model's forward pass of one photo leaves for its explanations."""

    features: torch.Tensor  # (1, C, H, W): the feature map the head scored
    attentions: list[torch.Tensor] = field(default_factory=list)  # per layer (1, heads, N, N), softmaxed
    shared: torch.Tensor | None = None  # the shared trunk's output (input of the model's own top)


@dataclass(frozen=True)
class Option:
    """A setting of a method besides the class, e.g. which attention layer."""

    name: str
    label: str
    choices: tuple[tuple[str, Any], ...]  # (label, value)

    @property
    def default(self) -> Any:
        return self.choices[0][1]


class Explanation(ABC):
    """Where a model looked when it scored a class. Built for one model (`model` is a BirdModel)."""

    name: ClassVar[str]  # stable identifier, e.g. "cam"
    label: ClassVar[str]  # what a menu calls it
    description: ClassVar[str]  # one sentence for a reader of the map
    class_specific: ClassVar[bool] = True  # False: the same map whatever class is asked about

    def __init__(self, model: nn.Module):
        self.model = model

    def options(self) -> list[Option]:
        return []

    @abstractmethod
    def grid(self, evidence: Evidence, class_index: int, **options: Any) -> np.ndarray:
        """The map for `class_index`: (H, W) float32, any scale (overlays normalise it)."""

    def parts(self, evidence: Evidence, class_index: int, k: int = 4) -> list[tuple[str, np.ndarray]]:
        """A finer breakdown of the map into its k largest terms, each (caption, grid); most
        methods have none."""
        return []

    def caption(self, species: str, own: bool, **options: Any) -> str:
        """Text shown with the map, for a reader who cannot see it."""
        return f"Map: where it sees **{species}**{' (its top guess)' if own else ''}."

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """The method's own options from `options` (others ignored), defaults filled in."""
        return {o.name: options.get(o.name, o.default) for o in self.options()}


class _HeadClassMap(Explanation):
    """A map the head computes exactly from the pass's features (`head.class_maps`)."""

    def grid(self, evidence: Evidence, class_index: int, **options: Any) -> np.ndarray:
        with torch.inference_mode():
            maps = self.model.head.class_maps(evidence.features, torch.tensor([class_index]))
        return maps[0, 0].float().numpy()


class ClassActivationMap(_HeadClassMap):
    """CAM (Zhou et al. 2016) of a linear head on pooled features: exact, no gradient."""

    name = "cam"
    label = "Class activation map"
    description = "Class activation map: the classifier's weights for the species applied at every location."


class BilinearSplit(_HeadClassMap):
    """The bilinear class score split exactly over locations; its parts are channel pairs."""

    name = "bilinear"
    label = "Bilinear location split"
    description = "The species' bilinear score split exactly over locations; below, the channel pairs that weigh most."

    def parts(self, evidence: Evidence, class_index: int, k: int = 4) -> list[tuple[str, np.ndarray]]:
        with torch.inference_mode():
            pairs = self.model.head.top_pairs(evidence.features, class_index, k)
        return [(f"{i}x{j}: {value:+.3g}", grid.float().numpy()) for i, j, value, grid in pairs]


def attention_rollout(attentions: list[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): fuse heads, add the residual as (A + I) / 2,
    renormalise rows, multiply through the layers; returns the class token's row without itself,
    (B, N - 1)."""
    result = None
    for attn in attentions:
        fused = attn.float().amax(dim=1) if head_fusion == "max" else attn.float().mean(dim=1)
        eye = torch.eye(fused.shape[-1], device=fused.device)
        fused = (fused + eye) / 2
        fused = fused / fused.sum(dim=-1, keepdim=True)
        result = fused if result is None else fused @ result
    return result[:, 0, 1:]


def class_token_attention(attention: torch.Tensor) -> torch.Tensor:
    """What the class token attends to in one layer, per head: (B, heads, N - 1)."""
    return attention[:, :, 0, 1:]


def _as_grid(row: torch.Tensor) -> np.ndarray:
    """A class token's row over N patch tokens as its square grid."""
    n = row.shape[-1]
    side = int(round(n ** 0.5))
    return row.float().reshape(side, n // side).numpy()


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    from timm.models.vision_transformer import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


class _AttentionMethod(Explanation):
    class_specific = False

    def _recorded(self, evidence: Evidence) -> list[torch.Tensor]:
        if not evidence.attentions:
            raise ValueError("no attention was recorded for this model")
        return evidence.attentions


class AttentionRollout(_AttentionMethod):
    name = "rollout"
    label = "Rollout (all layers)"
    description = "Attention rollout: how much the class token draws on each patch, through all layers."

    def grid(self, evidence: Evidence, class_index: int, **options: Any) -> np.ndarray:
        return _as_grid(attention_rollout(self._recorded(evidence))[0])

    def caption(self, species: str, own: bool, **options: Any) -> str:
        return "Map: attention rollout through all layers (attention is the same for every species)."


class LayerAttention(_AttentionMethod):
    """One layer's class-token attention, mean of heads or one head."""

    name = "layer"
    label = "One layer's attention"
    description = "One layer's class-token attention, mean of its heads or a single head."

    def options(self) -> list[Option]:
        layers = _attention_layers(self.model)
        heads = layers[0].num_heads if layers else 0
        return [Option("layer", "Layer", tuple((f"Layer {i + 1} only", i) for i in range(len(layers)))),
                Option("head", "Head", (("Mean of heads", None), *((f"Head {h + 1}", h) for h in range(heads))))]

    def grid(self, evidence: Evidence, class_index: int, layer: int = 0, head: int | None = None,
             **options: Any) -> np.ndarray:
        per_head = class_token_attention(self._recorded(evidence)[layer])[0]
        return _as_grid(per_head.mean(0) if head is None else per_head[head])

    def caption(self, species: str, own: bool, layer: int = 0, head: int | None = None, **options: Any) -> str:
        which = "mean of heads" if head is None else f"head {head + 1}"
        return f"Map: layer {layer + 1}'s class-token attention, {which} (attention is the same for every species)."


def explanations_of(model: nn.Module) -> list[Explanation]:
    """The methods `model`'s head offers, its default first."""
    return [method(model) for method in type(model.head).explanations]
