"""Opening any uploaded or dataset image safely as an RGB PIL image.

Uploads are untrusted: the file may be empty, truncated, not an image, a decompression
bomb, animated, CMYK, palette-based, or rotated through EXIF. Everything funnels through
`open_rgb`, which either returns a sane RGB image or raises `ImageError` with a message a
person can act on.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Larger images are refused before decoding; 50 MP covers any camera photo.
MAX_PIXELS = 50_000_000
# Models see at most a few hundred pixels; decoding more only costs time and memory.
MAX_SIDE = 1024
MIN_SIDE = 8
# A longer thin strip is not a photo, and the eval resize (shorter side -> crop size) would blow it
# up to a huge intermediate image (a 4000x8 strip becomes 131072x256 pixels).
MAX_ASPECT = 20
# The decoders an upload may reach: photo formats only. Pillow can open ~40 formats, some through
# external programs (EPS runs Ghostscript); a bird photo never needs them, so they are refused.
# (Multi-picture JPEGs from cameras open through "JPEG".)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

ImageSource = Union[str, Path, bytes, Image.Image]


class ImageError(ValueError):
    """An input that cannot be turned into a usable RGB photo."""


def open_rgb(source: ImageSource, max_side: int = MAX_SIDE) -> Image.Image:
    """Open `source` as an RGB image no larger than `max_side` on its longer side.

    Applies EXIF orientation, takes the first frame of animations, flattens transparency
    onto white and converts greyscale/palette/CMYK to RGB. Raises `ImageError`.
    """
    name = _describe(source)
    try:
        img = source if isinstance(source, Image.Image) else _open(source)
        _check_dimensions(img, name)
        if getattr(img, "is_animated", False):
            img.seek(0)
        # JPEG can decode at 1/2, 1/4, 1/8 scale: much faster for large photos.
        if img.format == "JPEG" and max(img.size) > 2 * max_side:
            img.draft("RGB", (max_side, max_side))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img) or img
        img = _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own message quotes its limit (twice ours), which would only confuse.
        raise ImageError(
            f"{name}: the image is more than the {MAX_PIXELS // 1_000_000} MP limit (a decompression bomb?); "
            "resize the photo and try again."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{name}: not a recognised image file (use a JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF photo)."
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: the image is damaged or truncated ({exc}).") from exc
    return _shrink(img, max_side)


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale to `max_side` as a new image (`thumbnail` would also shrink a caller's PIL image
    in place)."""
    if max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _open(source: str | Path | bytes) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("upload: the file is empty.")
        return Image.open(io.BytesIO(source), formats=FORMATS)
    path = Path(source)
    if not path.is_file():  # a folder, a device such as /dev/zero or a FIFO would never end
        raise ImageError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}.")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty.")
    return Image.open(path, formats=FORMATS)


def _check_dimensions(img: Image.Image, name: str) -> None:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {width}x{height} pixels is more than the {MAX_PIXELS // 1_000_000} MP limit; "
            "resize the photo and try again."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name}: {width}x{height} pixels is too small to classify (need {MIN_SIDE}+).")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            f"{name}: {width}x{height} pixels is a thin strip, not a photo (the sides may differ by at most "
            f"{MAX_ASPECT}:1); crop it to the bird and try again."
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "image"
    return "upload"


# A truncated JPEG must fail loudly, never decode as a half-grey photo.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
