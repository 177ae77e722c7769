"""Explanation methods: one interface, one class per method (the shape of pytorch-grad-cam).

Every head names the methods it offers (`explanations` on the head class, see heads.py); each
method turns the evidence of the prediction's own forward pass into a location grid for a
class. The app asks a model what it can show (`explanations_of`) and never which model it is.

Every method answers for a list of targets, each a class or a contrast "class X rather than
class Y" (the map of logit_X - logit_Y). A method whose map is linear in the class score
(`linear_in_class`: CAM, the bilinear split, the ViT's token contributions) gives contrasts
exactly as a difference of two class maps, so one map per class is all a viewer needs. A
gradient method runs the part of the model that holds what it differentiates once more with
autograd on, then one batched backward pass for all its targets: the lite ViT's head from
`Evidence.features` (nothing before the head runs again); a model whose attention sits in its
backbone (the full preset's ViT-B/16) runs again from `Evidence.inputs`. The ViT's token
contributions run its head the same way, their backward pass through it with the attention held
fixed (`TransformerHead.class_maps`).
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from birdfg.attention import AttentionRecorder, attention_layers


@dataclass
class Evidence:
    """What one model's forward pass of one photo leaves for its explanations."""

    features: torch.Tensor  # (1, C, H, W): the feature map the head scored
    attentions: list[torch.Tensor] = field(default_factory=list)  # per layer (1, heads, N, N), softmaxed
    shared: torch.Tensor | None = None  # the shared trunk's output (input of the model's own top)
    inputs: torch.Tensor | None = None  # (1, 3, H, W): the preprocessed photo


Target = tuple[int, "int | None"]  # (class, the class it is contrasted with, or None)


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
    linear_in_class: ClassVar[bool] = False  # True: map(X rather than Y) == map(X) - map(Y) exactly
    # True: every class asked about costs a backward pass, so a quick first answer asks for the
    # model's own guess only (birdfg/app/map_data.py); False: every class comes at once.
    cost_per_class: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    def options(self) -> list[Option]:
        return []

    @abstractmethod
    def grids(self, evidence: Evidence, targets: list[Target], **options: Any) -> np.ndarray:
        """One map per target: (len(targets), H, W) float32, any scale (overlays normalise it)."""

    def grid(self, evidence: Evidence, class_index: int, rather: int | None = None, **options: Any) -> np.ndarray:
        """The map for `class_index` (rather than class `rather`, when given): (H, W)."""
        return self.grids(evidence, [(class_index, rather)], **options)[0]

    def parts(self, evidence: Evidence, class_index: int, k: int = 4) -> list[tuple[str, np.ndarray]]:
        """A finer breakdown of the map into its k largest terms, each (caption, grid); most
        methods have none."""
        return []

    def parts_of_classes(self, evidence: Evidence, classes: list[int], k: int = 4) -> list[list[tuple[str, np.ndarray]]]:
        """`parts` for several classes."""
        return [self.parts(evidence, c, k) for c in classes]

    def caption(self, species: str, own: bool, rather: str | None = None, **options: Any) -> str:
        """Text shown with the map, for a reader who cannot see it."""
        guess = " (its top guess)" if own else ""
        if rather:
            return f"Map: what makes it say **{species}**{guess} rather than **{rather}**."
        return f"Map: where it sees **{species}**{guess}."

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """The method's own options from `options` (others ignored), defaults filled in."""
        return {o.name: options.get(o.name, o.default) for o in self.options()}


class _HeadClassMap(Explanation):
    """A map the head computes exactly from the pass's features (`head.class_maps`); it sums to
    the class score, so a contrast is the difference of two class maps."""

    linear_in_class = True

    def grids(self, evidence: Evidence, targets: list[Target], **options: Any) -> np.ndarray:
        asked = sorted({c for target in targets for c in target if c is not None})
        with torch.inference_mode():
            maps = self.model.head.class_maps(evidence.features, torch.tensor(asked))[0].float().numpy()
        row = {c: i for i, c in enumerate(asked)}
        return np.stack([maps[row[x]] - (maps[row[y]] if y is not None else 0) for x, y in targets])


class ClassActivationMap(_HeadClassMap):
    """CAM (Zhou et al. 2016) of a linear head on pooled features: exact, no gradient."""

    name = "cam"
    label = "Class activation map"
    description = "Class activation map: the classifier's weights for the species applied at every location."


class BilinearSplit(_HeadClassMap):
    """The bilinear class score split exactly over locations; its parts are channel pairs."""

    name = "bilinear"
    label = "Bilinear location split"
    description = "The species' bilinear score split exactly over locations; under the map, the channel pairs that weigh most."

    def parts(self, evidence: Evidence, class_index: int, k: int = 4) -> list[tuple[str, np.ndarray]]:
        return self.parts_of_classes(evidence, [class_index], k)[0]

    def parts_of_classes(self, evidence: Evidence, classes: list[int], k: int = 4) -> list[list[tuple[str, np.ndarray]]]:
        with torch.inference_mode():
            per_class = self.model.head.top_pairs(evidence.features, list(classes), k)
        return [[(f"{i}x{j}: {value:+.3g}", grid.float().numpy()) for i, j, value, grid in pairs]
                for pairs in per_class]


class TokenContributions(_HeadClassMap):
    """The hybrid ViT's class score split exactly over its patch tokens, with the photo's own
    attention held fixed (`TransformerHead.class_maps`): class-specific, and a contrast is the
    difference of two class maps, like CAM."""

    cost_per_class = True
    name = "contributions"
    label = "Token contributions"
    description = ("Token contributions: the species' score split exactly over the patches, with this photo's "
                   "attention held fixed (as in DecompX, Modarressi et al. 2023).")


def rollout_matrix(fused: list[torch.Tensor]) -> torch.Tensor:
    """Rollout of each layer's head-fused attention (B, N, N): add the residual as (A + I) / 2,
    renormalise rows, multiply through the layers; (B, N, N)."""
    result = None
    for layer in fused:
        layer = (layer.float() + torch.eye(layer.shape[-1], device=layer.device)) / 2
        layer = layer / layer.sum(dim=-1, keepdim=True)
        result = layer if result is None else layer @ result
    return result


def attention_rollout(attentions: list[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of attentions (B, heads, N, N), heads fused by
    their mean or max; returns the class token's row without itself, (B, N - 1)."""
    fuse = (lambda a: a.float().amax(dim=1)) if head_fusion == "max" else (lambda a: a.float().mean(dim=1))
    return rollout_matrix([fuse(a) for a in attentions])[:, 0, 1:]


def class_token_attention(attention: torch.Tensor) -> torch.Tensor:
    """What the class token attends to in one layer, per head: (B, heads, N - 1)."""
    return attention[:, :, 0, 1:]


def _as_grid(row: torch.Tensor) -> np.ndarray:
    """A class token's row over N patch tokens as its square grid."""
    n = row.shape[-1]
    side = int(round(n ** 0.5))
    return row.float().reshape(side, n // side).numpy()


def gradient_relevance(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021, "Generic
    Attention-model Explainability"): R = I, then per layer R <- R + mean_heads((dA * A)+) R;
    returns the class token's row without itself, (B, N - 1). Only that row of the last layer
    matters, so the last layer's matrices may come as that row alone, (B, heads, 1, N).
    Attention may have batch 1 for gradients of batch B (one pass, many targets)."""
    *earlier, last = list(zip(attentions, gradients))
    n, batch = attentions[0].shape[-1], gradients[0].shape[0]
    relevance = torch.eye(n, device=attentions[0].device).expand(batch, n, n)
    for i, (attn, grad) in enumerate(earlier):
        cam = (grad * attn).clamp(min=0).mean(dim=1).float()
        relevance = relevance + (cam if i == 0 else cam @ relevance)  # the first: cam @ I
    attn, grad = last
    cam = (grad[:, :, :1] * attn[:, :, :1]).clamp(min=0).mean(dim=1).float()  # (B, 1, N)
    return (relevance[:, :1] + cam @ relevance)[:, 0, 1:]


class _AttentionMethod(Explanation):
    class_specific = False

    def _recorded(self, evidence: Evidence) -> list[torch.Tensor]:
        if not evidence.attentions:
            raise ValueError("no attention was recorded for this model")
        return evidence.attentions

    def grids(self, evidence: Evidence, targets: list[Target], **options: Any) -> np.ndarray:
        # The same map for every class: computed once.
        return np.repeat(self._map(evidence, **options)[None], len(targets), axis=0)

    @abstractmethod
    def _map(self, evidence: Evidence, **options: Any) -> np.ndarray: ...

    def caption(self, species: str, own: bool, rather: str | None = None, **options: Any) -> str:
        return f"Map: {self._what(**options)} (attention is the same for every species)."

    @abstractmethod
    def _what(self, **options: Any) -> str: ...


class AttentionRollout(_AttentionMethod):
    name = "rollout"
    label = "Rollout (all layers)"
    description = "Attention rollout: how much the class token draws on each patch, through all layers."

    def _map(self, evidence: Evidence, **options: Any) -> np.ndarray:
        return _as_grid(attention_rollout(self._recorded(evidence))[0])

    def _what(self, **options: Any) -> str:
        return "attention rollout through all layers"


class LayerAttention(_AttentionMethod):
    """One layer's class-token attention, mean of heads or one head."""

    name = "layer"
    label = "One layer's attention"
    description = "One layer's class-token attention, mean of its heads or a single head."

    @functools.cached_property
    def _options(self) -> list[Option]:
        layers = attention_layers(self.model)
        heads = layers[0].num_heads if layers else 0
        return [Option("layer", "Layer", tuple((f"Layer {i + 1} only", i) for i in range(len(layers)))),
                Option("head", "Head", (("Mean of heads", None), *((f"Head {h + 1}", h) for h in range(heads))))]

    def options(self) -> list[Option]:
        return self._options

    def _map(self, evidence: Evidence, layer: int = 0, head: int | None = None, **options: Any) -> np.ndarray:
        per_head = class_token_attention(self._recorded(evidence)[layer])[0]
        return _as_grid(per_head.mean(0) if head is None else per_head[head])

    def _what(self, layer: int = 0, head: int | None = None, **options: Any) -> str:
        which = "mean of heads" if head is None else f"head {head + 1}"
        return f"layer {layer + 1}'s class-token attention, {which}"


class AttentionRelevance(Explanation):
    """Chefer et al.'s gradient-weighted relevance for a class (or a contrast of two): the part
    of the model that holds the attention runs again in torch with autograd (the lite ViT: its
    head, from the features it scored), and one batched backward pass gives every target's
    attention gradients."""

    cost_per_class = True
    name = "relevance"
    label = "Relevance for the species"
    description = ("Relevance: attention weighted by how much it raises the species' score "
                   "(Chefer et al. 2021), through every layer.")

    def grids(self, evidence: Evidence, targets: list[Target], **options: Any) -> np.ndarray:
        asked = sorted({c for target in targets for c in target if c is not None})
        recorder = AttentionRecorder(self.model if self._attention_in_backbone else self.model.head, keep_graph=True)
        try:
            with torch.enable_grad():
                logits = self._logits(evidence)  # (1, classes): one forward for every target
                attentions = recorder.take()
                # One batched backward pass (vmap over one-hot output gradients) gives dA for
                # every class asked about. Backpropagation is linear in the output gradient, so
                # the gradient of logit_x - logit_y is dA_x - dA_y: contrasts cost no extra pass.
                onehot = torch.eye(logits.shape[-1], dtype=logits.dtype)[asked][:, None]
                per_class = torch.autograd.grad(logits, attentions, grad_outputs=onehot, is_grads_batched=True)
        finally:
            recorder.remove()
        row = {c: i for i, c in enumerate(asked)}
        x = torch.tensor([row[c] for c, _ in targets])
        y = torch.tensor([row[r] if r is not None else -1 for _, r in targets])
        rival = (y >= 0)[:, None, None, None]
        # Only the class token's row of the last layer counts (see gradient_relevance).
        per_class = [*per_class[:-1], per_class[-1][:, :, :, :1]]
        gradients = [g[x, 0] - torch.where(rival, g[y.clamp(min=0), 0], 0) for g in per_class]
        attentions = [*attentions[:-1], attentions[-1][:, :, :1]]
        with torch.no_grad():
            relevance = gradient_relevance([a.detach() for a in attentions], gradients)
        return np.stack([_as_grid(r) for r in relevance])

    @functools.cached_property
    def _attention_in_backbone(self) -> bool:
        return bool(attention_layers(self.model.backbone))

    def _logits(self, evidence: Evidence) -> torch.Tensor:
        model = self.model
        if self._attention_in_backbone:  # the attention is in the backbone: run it from the photo
            if evidence.inputs is None:
                raise ValueError("this model's relevance needs the photo's input tensor (Evidence.inputs)")
            return model(evidence.inputs.clone())
        # The attention is in the head: it runs again from the features the head scored (the
        # gradient stops at the attention matrices, so nothing before the head is needed), and
        # only as far as the logits need (`class_logits`, where the head has it). A clone: the
        # torch runner's tensors come from inference mode, which autograd refuses.
        return getattr(model.head, "class_logits", model.head)(evidence.features.clone())


def explanations_of(model: nn.Module) -> list[Explanation]:
    """The methods `model`'s head offers, its default first."""
    return [method(model) for method in type(model.head).explanations]
