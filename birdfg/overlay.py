"""Drawing a location map onto the photo: pure image functions, no model in sight."""
from __future__ import annotations

import numpy as np
from PIL import Image

from birdfg.layout import CROP_PCT

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in photo pixels


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
# What the model did not see is dimmed to 65 %: the same values as Image.blend with black at 0.35.
_DIM_LUT = [int(v * 0.65) for v in range(256)] * 3


def crop_box(image_size: tuple[int, int], preprocess: dict) -> Box:
    """The part of the photo the model saw after resize + centre crop. Maps live in this box."""
    width, height = image_size
    # The shorter side is resized to size / crop_pct and the centre size x size kept.
    side = min(width, height) * preprocess.get("crop_pct", CROP_PCT)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def peak_location(heat: np.ndarray, box: Box) -> tuple[float, float]:
    """The map's maximum, in photo pixels (x, y) (the centre of the winning cell)."""
    rows, cols = heat.shape
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    left, top, right, bottom = box
    return left + (c + 0.5) * (right - left) / cols, top + (r + 0.5) * (bottom - top) / rows


def overlay(image: Image.Image, heat: np.ndarray, box: Box, opacity: float = 0.5) -> Image.Image:
    """The photo with `heat` (any grid, any scale) coloured over `box`; outside the box (what the
    model did not see) the photo is dimmed. Same size as `image`."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    left, top, right, bottom = (int(round(v)) for v in box)
    width, height = max(right - left, 1), max(bottom - top, 1)
    scaled = Image.fromarray((normalise(heat) * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    scaled.putpalette(_TURBO_PALETTE)  # greyscale -> Turbo colours as a palette lookup in C
    coloured = scaled.convert("RGB")
    canvas = image.point(_DIM_LUT)  # one table lookup instead of blending with a black image
    region = Image.blend(image.crop((left, top, right, bottom)), coloured, float(np.clip(opacity, 0, 1)))
    canvas.paste(region, (left, top))
    return canvas
