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
        raise ImageError(f"{name}: image is too large to decode safely ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image file (try a JPEG or PNG photo).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: the image is damaged or truncated ({exc}).") from exc
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return img


def _open(source: str | Path | bytes) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("upload: the file is empty.")
        return Image.open(io.BytesIO(source))
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty.")
    return Image.open(path)


def _check_dimensions(img: Image.Image, name: str) -> None:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {width}x{height} pixels is more than the {MAX_PIXELS // 1_000_000} MP limit; "
            "resize the photo and try again."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name}: {width}x{height} pixels is too small to classify (need {MIN_SIDE}+).")


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
