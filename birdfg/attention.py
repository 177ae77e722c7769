"""Recording the attention matrices of timm's `Attention` layers during a forward pass."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention
from torch import nn


def attention_layers(module: nn.Module) -> list[Attention]:
    return [m for m in module.modules() if isinstance(m, Attention)]


class AttentionRecorder:
    """Keeps the softmaxed attention matrices of every timm `Attention` in a module.

    timm's fused attention (scaled_dot_product_attention) never materialises the matrix, so the
    recorder switches fusion off for the recorded modules and hooks `attn_drop`, which receives
    the softmax output; the forward pass is otherwise unchanged, so the prediction and the
    explanation come from the same run. With `keeping` False it records nothing and fusion is
    back on (batches that only want class probabilities). With `keep_graph` the matrices stay in
    autograd's graph (a gradient method differentiates through them); `remove()` unhooks.
    """

    def __init__(self, module: nn.Module, keep_graph: bool = False):
        self.attentions: list[torch.Tensor] = []
        self.layers = attention_layers(module)
        self.keep_graph = keep_graph
        self.armed = True  # False: ignore passes (an owner arms it only for its own forward)
        self._fused_before = [layer.fused_attn for layer in self.layers]
        self._hooks = [layer.attn_drop.register_forward_hook(self._keep) for layer in self.layers]
        self.keeping = True

    @property
    def keeping(self) -> bool:
        return self._keeping

    @keeping.setter
    def keeping(self, keeping: bool) -> None:
        self._keeping = keeping
        for layer in self.layers:
            layer.fused_attn = not keeping

    def _keep(self, _module, _inputs, output: torch.Tensor) -> None:
        if self._keeping and self.armed:
            self.attentions.append(output if self.keep_graph else output.detach())

    def take(self) -> list[torch.Tensor]:
        """The matrices recorded since the last call, one (B, heads, N, N) per layer, in order."""
        taken, self.attentions = self.attentions, []
        return taken

    def remove(self) -> None:
        """Unhook, and give the layers the fusion setting they had before."""
        for hook in self._hooks:
            hook.remove()
        for layer, fused in zip(self.layers, self._fused_before):
            layer.fused_attn = fused
        self.attentions = []

    def __bool__(self) -> bool:
        return bool(self.layers)
