"""Explanations and overlays: attention capture + rollout for ViTs, and rendering any location
map onto the photo. (CAM and the bilinear decomposition live with their heads in heads.py,
because each is a property of how that head scores a class.)
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import Attention
from torch import nn


class AttentionRecorder:
    """Keeps the softmaxed attention matrices of every timm `Attention` in a module.

    timm's fused attention (scaled_dot_product_attention) never materialises the matrix, so the
    recorder switches fusion off for the recorded modules and hooks `attn_drop`, which receives
    the softmax output; the forward pass is otherwise unchanged, so the prediction and the
    explanation come from the same run. With `keeping` False it records nothing and fusion is
    back on (batches that only want class probabilities).
    """

    def __init__(self, module: nn.Module):
        self.attentions: list[torch.Tensor] = []
        self.layers = [m for m in module.modules() if isinstance(m, Attention)]
        for layer in self.layers:
            layer.attn_drop.register_forward_hook(self._keep)
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
        if self._keeping:
            self.attentions.append(output.detach())

    def take(self) -> list[torch.Tensor]:
        """The matrices recorded since the last call, one (B, heads, N, N) per layer, in order."""
        taken, self.attentions = self.attentions, []
        return taken

    def __bool__(self) -> bool:
        return bool(self.layers)


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


def normalise(heat: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a flat map becomes zeros rather than NaN."""
    heat = np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)


def _turbo_lut() -> np.ndarray:
    """Google's Turbo colormap, polynomial approximation (Mikhailov 2019): 256 x 3 uint8."""
    t = np.linspace(0, 1, 256)[:, None]
    coeffs = np.array([
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ])
    powers = t ** np.arange(6)
    return (np.clip(powers @ coeffs.T, 0, 1) * 255).astype(np.uint8)


TURBO = _turbo_lut()
_TURBO_PALETTE = TURBO.tobytes()


def crop_box(image_size: tuple[int, int], preprocess: dict) -> tuple[float, float, float, float]:
    """The part of the photo the model saw after resize + centre crop: (left, top, right, bottom)
    in photo pixels. Maps live in this box."""
    width, height = image_size
    crop_pct = preprocess.get("crop_pct", 1.0)
    # The shorter side is resized to size / crop_pct and the centre size x size kept.
    side = min(width, height) * crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def peak_location(heat: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, float]:
    """The map's maximum, in photo pixels (x, y) (the centre of the winning cell)."""
    rows, cols = heat.shape
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    left, top, right, bottom = box
    return left + (c + 0.5) * (right - left) / cols, top + (r + 0.5) * (bottom - top) / rows


def overlay(image: Image.Image, heat: np.ndarray, box: tuple[float, float, float, float],
            opacity: float = 0.5) -> Image.Image:
    """The photo with `heat` (any grid, any scale) coloured over `box`; outside the box (what the
    model did not see) the photo is dimmed. Same size as `image`."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    left, top, right, bottom = (int(round(v)) for v in box)
    width, height = max(right - left, 1), max(bottom - top, 1)
    scaled = Image.fromarray((normalise(heat) * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    scaled.putpalette(_TURBO_PALETTE)  # greyscale -> Turbo colours as a palette lookup in C (10x numpy's)
    coloured = scaled.convert("RGB")
    canvas = image.point(_DIM_LUT)  # one table lookup instead of blending with a black image
    region = Image.blend(image.crop((left, top, right, bottom)), coloured, float(np.clip(opacity, 0, 1)))
    canvas.paste(region, (left, top))
    return canvas


# What the model did not see is dimmed to 65 %: the same values as Image.blend with black at 0.35.
_DIM_LUT = [int(v * 0.65) for v in range(256)] * 3
