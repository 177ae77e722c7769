"""The heads. The models differ only here: each head turns backbone features into logits
and knows how to spread a class score back over image locations (its explanation).

Feature maps are (B, C, H, W); token features are (B, 1 + N, D) with the class token first.
`class_maps(features, classes)` returns (B, K, H, W): for each image, one map per requested class,
computed from the features of the same forward pass that produced the prediction. Each head
lists the explanation methods it offers in `explanations` (see explanations.py).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from birdfg.attention import attention_layers
from birdfg.explanations import (AttentionRelevance, AttentionRollout, BilinearSplit, ClassActivationMap,
                                 LayerAttention, TokenContributions)


class LinearHead(nn.Module):
    """Global average pool + dropout + linear: the CNN head. Its CAM is exact:
    mean_l(CAM_c(l)) + b_c equals the logit, because pooling and the linear layer commute."""

    explanations = (ClassActivationMap,)

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(fmap.mean(dim=(2, 3))))

    def class_maps(self, fmap: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """CAM_c(l) = w_c . f(l)."""
        return torch.einsum("kc,bchw->bkhw", self.fc.weight[classes].to(fmap.dtype), fmap)


class TokenHead(nn.Module):
    """Linear classifier on the class token of a ViT backbone (the full preset's ViT-B/16).
    Its explanations are attention over the backbone's blocks."""

    explanations = (AttentionRelevance, AttentionRollout, LayerAttention)

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(tokens[:, 0]))


class TransformerHead(nn.Module):
    """A hybrid ViT on top of a CNN feature map: each location becomes a patch token, a class
    token and learned position embeddings are added, and a small transformer encoder (timm's own
    `Block`, so attention is real ViT attention) feeds a linear classifier on the class token."""

    explanations = (TokenContributions, AttentionRelevance, AttentionRollout, LayerAttention)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        grid: int,
        dim: int = 256,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(in_features, dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=2.0, qkv_bias=True, proj_drop=dropout, attn_drop=0.0) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self._tokens(fmap)))
        return self.fc(self.drop(x[:, 0]))

    def class_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """The logits of `forward`, with the last block computed for the class token only, the one
        token the classifier reads: what a gradient method differentiates (AttentionRelevance).
        Its backward pass then skips the other tokens' MLP and projections in the last block,
        ~40 % of the relevance's time when it is asked for every class."""
        return self.fc(self.drop(self._class_token(self._tokens(fmap))))

    def class_maps(self, fmap: torch.Tensor, classes: torch.Tensor,
                   reference: torch.Tensor | None = None) -> torch.Tensor:
        """Each class score split exactly over the patch tokens as they enter the transformer,
        (B, K, H, W), in the manner of DecompX (Modarressi et al., ACL 2023): with this pass's
        attention weights, LayerNorm scales and GELU slopes (GELU(z) / z) held fixed, the class
        token's output is linear in the tokens plus the biases, so gradient x input of that
        linearised pass splits it exactly; the class token's own share and the biases' make up
        the rest of the score. One batched backward pass for every class asked about.
        `reference`: another feature map (e.g. of a grey photo) whose tokens the split is measured
        from instead of from zero, gradient x (tokens - reference tokens), DeepLIFT's reference:
        it then splits the difference of the linearised scores of the two."""
        classes = torch.as_tensor(classes).tolist()
        # Autograd inside a caller's inference mode: the clone is an ordinary tensor.
        with torch.inference_mode(False), torch.enable_grad():
            tokens = self._tokens(fmap.detach().clone().float()).detach().requires_grad_()
            scores = self._linearised_class_token(tokens) @ self.fc.weight[classes].T  # (B, K)
            onehot = torch.eye(len(classes), dtype=scores.dtype, device=scores.device)[:, None]
            onehot = onehot.expand(-1, len(scores), -1)  # (K, B, K): one backward per class, batched
            (grads,) = torch.autograd.grad(scores, tokens, grad_outputs=onehot, is_grads_batched=True)
            inputs = tokens.detach()
            if reference is not None:
                inputs = inputs - self._tokens(reference.detach().clone().float()).detach()
            shares = (grads * inputs).sum(-1)[..., 1:]  # (K, B, N): patch tokens only
        return shares.transpose(0, 1).reshape(fmap.shape[0], len(classes), *fmap.shape[-2:]).detach()

    def _linearised_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's output before the classifier, (B, D): the same values as `forward`,
        with every non-linear factor detached (see `class_maps`)."""
        with _held_fixed(self):
            return self._class_token(x)

    def _class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's output before the classifier, (B, D), from the tokens: the last
        block computed for the class token only (see `class_logits`)."""
        for block in self.blocks[:-1]:
            x = block(x)
        return self.norm(class_token_block(self.blocks[-1], x))[:, 0]

    def _tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(fmap).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self._pos_embed(fmap.shape[-2:])

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        return torch.cat([self.pos_embed[:, :1], patch_positions(self.pos_embed[:, 1:], self.grid, hw)], dim=1)


@contextmanager
def _held_fixed(head: nn.Module) -> Iterator[None]:
    """Within it, the head's transformer runs timm's own code with every non-linear factor of the
    pass detached: the attention weights (as they leave the softmax, at `attn_drop`), each
    LayerNorm's scale 1 / std and each GELU's slope GELU(z) / z. The values are unchanged, only
    the gradients see a pass that is linear in the tokens plus the biases. Hooks on the head's own
    modules: a gradient method on another thread at the same time would see them too (the app runs
    all model work on one thread)."""
    def fixed_weights(_module, _inputs, weights: torch.Tensor) -> torch.Tensor:
        return weights.detach()

    def fixed_scale(layer: nn.LayerNorm, inputs: tuple[torch.Tensor], _output) -> torch.Tensor:
        t = inputs[0]
        scale = (t.var(-1, unbiased=False, keepdim=True) + layer.eps).rsqrt().detach()
        return (t - t.mean(-1, keepdim=True)) * scale * layer.weight + layer.bias

    def fixed_slope(act: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        z = inputs[0]
        nonzero = z.abs() > 1e-6
        return z * torch.where(nonzero, output / z.where(nonzero, 1.0), 0.5).detach()

    attentions = attention_layers(head)
    fused = [layer.fused_attn for layer in attentions]
    hooks = [layer.attn_drop.register_forward_hook(fixed_weights) for layer in attentions]
    hooks += [m.register_forward_hook(fixed_scale) for m in head.modules() if isinstance(m, nn.LayerNorm)]
    hooks += [m.mlp.act.register_forward_hook(fixed_slope) for m in head.modules() if isinstance(m, Block)]
    try:
        for layer in attentions:
            layer.fused_attn = False  # the fused kernel never hands the weights to `attn_drop`
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer, was in zip(attentions, fused):
            layer.fused_attn = was


def class_token_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """What timm's `Block` gives the class token (the first of `x`), (B, 1, D): attention with the
    class token as the only query, then the MLP on that token alone. Its attention passes through
    `attn_drop` as in timm, so an AttentionRecorder sees the class token's row, (B, heads, 1, N)."""
    attn = block.attn
    if getattr(attn, "gate", None) is not None:  # a gated attention (not the one these heads build)
        return block(x)[:, :1]
    b, n, _ = x.shape
    q, k, v = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    weights = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1))
    out = attn.norm((weights @ v).transpose(1, 2).reshape(b, 1, attn.attn_dim))
    y = x[:, :1] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def patch_positions(positions: torch.Tensor, grid: int, hw: tuple[int, int]) -> torch.Tensor:
    """Learned position embeddings of a grid x grid token map, (1, grid^2, D), for an input whose
    map is `hw`: as they are, or interpolated for another input size as timm does for ViTs."""
    if hw == (grid, grid):
        return positions
    grid_first = positions.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid_first, size=hw, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)


class BilinearHead(nn.Module):
    """Bilinear CNN pooling (Lin, RoyChowdhury & Maji 2015), symmetric form (a = b):
    B = (1/L) sum_l a(l) a(l)^T, then signed square root, L2 normalisation, dropout, linear.

    An optional 1x1 convolution reduces the channels first (documented deviation from the
    paper): 2048^2 x classes weights for ResNet-152 would be 84M parameters per 20 classes.
    """

    explanations = (BilinearSplit,)

    def __init__(self, in_features: int, num_classes: int, dim: int | None = 256, dropout: float = 0.2):
        super().__init__()
        self.reduce = (
            nn.Sequential(nn.Conv2d(in_features, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
            if dim
            else nn.Identity()
        )
        self.dim = dim or in_features
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.dim * self.dim, num_classes)

    def pooled(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reduced features a: (B, L, d), bilinear matrix B: (B, d, d))."""
        a = self.reduce(fmap).flatten(2).transpose(1, 2).float()
        return a, a.transpose(1, 2) @ a / a.shape[1]

    @staticmethod
    def normalise(bilinear: torch.Tensor) -> torch.Tensor:
        x = bilinear.flatten(1)
        x = torch.sign(x) * torch.sqrt(x.abs() + 1e-10)
        return F.normalize(x, dim=1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        _, bilinear = self.pooled(fmap)
        return self.fc(self.drop(self.normalise(bilinear)).to(self.fc.weight.dtype))

    def effective_weights(self, bilinear: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """W'_c = W_c * S with S = g(B) / B elementwise, so that <W_c, g(B)> = <W'_c, B> exactly.

        The signed-sqrt + L2 step is a per-entry rescaling of B for this image; folding it into
        the weights makes the score linear in B, hence a sum over locations. (B, K, d, d)."""
        scale = self.normalise(bilinear) / torch.where(bilinear.flatten(1).abs() > 1e-12, bilinear.flatten(1), 1.0)
        scale = torch.where(bilinear.flatten(1).abs() > 1e-12, scale, torch.zeros_like(scale))
        w = self.fc.weight[classes].float()  # (K, d*d)
        return (w[None] * scale[:, None]).view(bilinear.shape[0], len(classes), self.dim, self.dim)

    def class_maps(self, fmap: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """m_c(l) = a(l)^T W'_c a(l) / L; summing over l gives the class score minus its bias."""
        a, bilinear = self.pooled(fmap)
        w = self.effective_weights(bilinear, classes)
        maps = torch.einsum("bld,bkde,ble->bkl", a, w, a) / a.shape[1]
        return maps.view(fmap.shape[0], len(classes), *fmap.shape[-2:])

    def top_pairs(self, fmap: torch.Tensor, cls: int | list[int], k: int = 4
                  ) -> list[tuple[int, int, float, torch.Tensor]] | list[list[tuple[int, int, float, torch.Tensor]]]:
        """The k channel pairs (i, j) that add most to class `cls` for the first image, with their
        contribution W'_c[i, j] B[i, j] and their location map a_i(l) a_j(l); for a list of
        classes, one such list per class (one pooling for all)."""
        classes = [cls] if isinstance(cls, int) else list(cls)
        a, bilinear = self.pooled(fmap[:1])
        w = self.effective_weights(bilinear, torch.tensor(classes, device=fmap.device))[0]  # (K, d, d)
        values, flat = (w * bilinear[0]).flatten(1).topk(k, dim=1)
        h, wd = fmap.shape[-2:]
        found = []
        for row_values, row_flat in zip(values.tolist(), flat.tolist()):
            pairs = []
            for value, index in zip(row_values, row_flat):
                i, j = divmod(index, self.dim)
                pairs.append((i, j, value, (a[0, :, i] * a[0, :, j]).view(h, wd)))
            found.append(pairs)
        return found[0] if isinstance(cls, int) else found


class BilinearTransformerHead(nn.Module):
    """The reference report's closing idea, a B-CNN extended with a transformer: the hybrid ViT's
    encoder (as TransformerHead: each location a token, learned positions, timm `Block`s; no class
    token) and bilinear pooling over its output tokens (as BilinearHead: channel reduction, signed
    square root, L2). Its explanation is the bilinear location split over the output tokens."""

    explanations = (BilinearSplit,)

    def __init__(self, in_features: int, num_classes: int, grid: int, dim: int = 256, depth: int = 2,
                 heads: int = 4, bilinear_dim: int = 64, dropout: float = 0.5, token_dropout: float = 0.1):
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(in_features, dim, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=2.0, qkv_bias=True, proj_drop=token_dropout, attn_drop=0.0)
              for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.bilinear = BilinearHead(dim, num_classes, bilinear_dim, dropout)
        trunc_normal_(self.pos_embed, std=0.02)

    def encode(self, fmap: torch.Tensor) -> torch.Tensor:
        """The encoder's output tokens as a feature map (B, dim, H, W): what the bilinear pooling sees."""
        b, _, h, w = fmap.shape
        tokens = self.proj(fmap).flatten(2).transpose(1, 2) + patch_positions(self.pos_embed, self.grid, (h, w))
        return self.norm(self.blocks(tokens)).transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.bilinear(self.encode(fmap))

    def class_maps(self, fmap: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.bilinear.class_maps(self.encode(fmap), classes)

    def top_pairs(self, fmap: torch.Tensor, cls: int | list[int], k: int = 4):
        return self.bilinear.top_pairs(self.encode(fmap), cls, k)


HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "token": TokenHead,
    "transformer": TransformerHead,
    "bilinear": BilinearHead,
    "bilinear_transformer": BilinearTransformerHead,
}


def grid_size(img_size: int, stride: int = 32) -> int:
    return math.ceil(img_size / stride)
