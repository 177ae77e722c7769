"""A generator of malformed and awkward image files, for the hostile-input tests and the load test.

`generate(folder)` writes every case into `folder` (deterministic: fixed seeds) and returns a
list of `Case`s. Each says what a careful image opener must do with it:

- "ok":      a valid but unusual image (EXIF rotation, CMYK, 16-bit, animated, ...): it must open,
             and `size` / `red_corner` say what the RGB result must look like;
- "refused": it must be refused with a clear message (`birdfg.images.ImageError`);
- "either":  a damaged file a decoder may or may not salvage (random byte flips, a missing end
             marker): any outcome but a crash, a hang or a huge allocation is fine.

Run `python tests/malformed.py OUT_DIR` to write the files and print a summary, and
`python tests/malformed.py OUT_DIR --probe --json report.json` to open each with `open_rgb`, and
`python tests/malformed.py OUT_DIR --fuzz 3000` for a byte-mutation fuzz of the opener.
"""
from __future__ import annotations

import io
import random
import struct
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

OK, REFUSED, EITHER = "ok", "refused", "either"


@dataclass(frozen=True)
class Case:
    name: str  # file name inside the folder
    kind: str  # family, e.g. "truncated-jpeg"; the load test reports answers per kind
    expect: str  # OK | REFUSED | EITHER
    size: tuple[int, int] | None = None  # RGB size open_rgb must return (max_side=1024), for OK cases
    red_corner: bool = False  # OK cases: the top-left corner must be red after EXIF rotation


# --- valid images to start from ---------------------------------------------------------------------

def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """A noisy photo-like RGB image with a red block in the top-left corner."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(60, 200, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    draw.ellipse((size[0] // 3, size[1] // 4, 2 * size[0] // 3, 3 * size[1] // 4), fill=(90, 120, 40))
    draw.rectangle((0, 0, size[0] // 5, size[1] // 5), fill=(255, 0, 0))
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, row: bytes,
            extra_chunks: list[bytes] = (), rows: int | None = None) -> bytes:
    """A PNG built by hand: `rows` (default: all) copies of one filtered scanline (`row` includes
    the filter byte). Fewer rows than the height make a header that claims more than it holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(row * (height if rows is None else rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(extra_chunks)
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the frame header (SOF0/SOF2) of a JPEG to claim another size."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at > 0:
            return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]
    raise ValueError("no SOF marker")


def _exif_jpeg(display: Image.Image, orientation: int) -> bytes:
    """A JPEG whose stored pixels, rotated as EXIF `orientation` says, show `display`."""
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
    op = inverse.get(orientation)
    stored = display.transpose(op) if op is not None else display
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=92, exif=exif.tobytes())


def _frames(n: int, size=(96, 72)) -> list[Image.Image]:
    return [photo(size, seed=i) for i in range(n)]


# --- the cases ---------------------------------------------------------------------------------------

def cases() -> list[tuple[Case, Callable[[], bytes]]]:
    """Every case with a function making its bytes."""
    out: list[tuple[Case, Callable[[], bytes]]] = []

    def add(name: str, kind: str, expect: str, make: Callable[[], bytes], size=None, red_corner=False):
        out.append((Case(name, kind, expect, size, red_corner), make))

    base = photo()
    jpeg = encode(base, "JPEG", quality=90)
    jpeg_prog = encode(base, "JPEG", quality=90, progressive=True)
    png = encode(base, "PNG")
    gif = encode(base.convert("P"), "GIF")
    webp = encode(base, "WEBP", quality=80)
    bmp = encode(base, "BMP")
    tiff = encode(base, "TIFF")

    # Empty and random files.
    for ext in ("jpg", "jpeg", "png", "gif", "webp"):
        add(f"empty.{ext}", "empty", REFUSED, lambda: b"")
    for i, (n, ext) in enumerate([(1, "jpg"), (2, "png"), (100, "jpg"), (4096, "jpg"), (4096, "png"),
                                  (65536, "jpg"), (65536, "webp"), (300_000, "png"), (777, "gif"), (12, "bmp")]):
        add(f"random_{n}b_{i}.{ext}", "random-bytes", REFUSED, lambda n=n, i=i: random.Random(i).randbytes(n))
    # Right magic number, random body: the parsers get further before failing.
    magics = {"jpg": b"\xff\xd8\xff\xe0", "png": b"\x89PNG\r\n\x1a\n", "gif": b"GIF89a", "bmp": b"BM",
              "tif": b"II*\x00", "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 "}
    for i, (ext, magic) in enumerate(magics.items()):
        add(f"magic_random_{ext}.{ext}", "magic+random", EITHER,
            lambda m=magic, i=i: m + random.Random(100 + i).randbytes(5000))

    # Other files renamed as images.
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="4000" height="4000">' \
          b'<script>alert(1)</script><circle cx="50" cy="50" r="40" fill="red"/></svg>'
    html = b"<!doctype html><html><body><img src=x onerror=alert(1)><h1>not a bird</h1></body></html>"
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
           b"(/etc/passwd) (r) file 100 string readstring pop print\nshowpage\n%%EOF\n")
    xpm = b'/* XPM */\nstatic char *x[] = {\n"8 8 1 1",\n"a c #ff0000",\n' + b'"aaaaaaaa",\n' * 8 + b"};\n"
    xbm = b"#define im_width 16\n#define im_height 16\nstatic char im_bits[] = {\n" + b"0xff," * 31 + b"0xff};\n"
    renamed = {
        "svg_as.jpg": svg, "svg_as.png": svg, "html_as.jpg": html, "html_as.png": html,
        "php_as.jpg": b"<?php system($_GET['c']); ?>", "json_as.png": b'{"not": "an image"}',
        "whitespace_as.jpg": b" \n\t \n", "bom_text_as.jpg": "\ufeffhello bird".encode(),
        "pdf_as.jpg": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
        "zip_as.png": b"PK\x03\x04" + bytes(26) + b"bird.jpg", "gzip_as.jpg": zlib.compress(b"x" * 1000),
        "pickle_as.jpg": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93.",
        "elf_as.png": b"\x7fELF\x02\x01\x01" + bytes(57),
        # Image formats a photo app has no reason to decode (and some decoders run external
        # programs, e.g. EPS -> Ghostscript): refused, not decoded.
        "eps_as.jpg": eps, "xpm_as.jpg": xpm, "xbm_as.png": xbm,
    }
    for name, data in renamed.items():
        add(name, "renamed-non-image", REFUSED, lambda d=data: d)
    for fmt, ext in (("PPM", "jpg"), ("PCX", "png"), ("TGA", "jpg"), ("ICO", "png"), ("SGI", "jpg"),
                     ("JPEG2000", "jpg"), ("IM", "png")):
        add(f"{fmt.lower()}_as.{ext}", "renamed-other-format", REFUSED,
            lambda f=fmt: encode(photo((64, 64)), f))

    # Truncated files at several cut points.
    for label, data in (("jpeg", jpeg), ("jpeg_progressive", jpeg_prog), ("png", png)):
        ext = "png" if label == "png" else "jpg"
        for cut in (0.005, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
            add(f"truncated_{label}_{int(cut * 1000):03d}.{ext}", f"truncated-{label.split('_')[0]}", REFUSED,
                lambda d=data, c=cut: d[:max(2, int(len(d) * c))])
    add("truncated_jpeg_no_eoi.jpg", "truncated-jpeg", EITHER, lambda: jpeg[:-2])
    add("truncated_png_no_iend.png", "truncated-png", EITHER, lambda: png[:-12])
    for label, data, ext in (("gif", gif, "gif"), ("webp", webp, "webp"), ("bmp", bmp, "bmp"), ("tiff", tiff, "tif")):
        for cut in (0.3, 0.7):
            add(f"truncated_{label}_{int(cut * 100):02d}.{ext}", f"truncated-{label}", REFUSED,
                lambda d=data, c=cut: d[:int(len(d) * c)])

    # Headers that claim a huge image (the data is tiny): refused before any decoding.
    row = b"\x00" + bytes(3 * 16)
    add("huge_png_100000x100000.png", "huge-dimensions", REFUSED, lambda: png_raw(100_000, 100_000, 8, 2, row, rows=16))
    add("huge_png_1x100000000.png", "huge-dimensions", REFUSED, lambda: png_raw(1, 100_000_000, 8, 0, b"\x00\x00", rows=16))
    add("huge_png_65535x65535_16bit.png", "huge-dimensions", REFUSED, lambda: png_raw(65535, 65535, 16, 6, row, rows=16))
    add("huge_jpeg_65000x65000.jpg", "huge-dimensions", REFUSED, lambda: _jpeg_with_size(jpeg, 65000, 65000))
    add("huge_jpeg_progressive_60000x40000.jpg", "huge-dimensions", REFUSED,
        lambda: _jpeg_with_size(jpeg_prog, 60000, 40000))
    # Under the pixel limit: the decoder runs out of data and may fill the rest with grey.
    add("huge_jpeg_7000x7000_no_data.jpg", "huge-dimensions", EITHER, lambda: _jpeg_with_size(jpeg, 7000, 7000))
    add("huge_gif_65535x65535.gif", "huge-dimensions", REFUSED, lambda: gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:])
    add("huge_bmp_50000x50000.bmp", "huge-dimensions", REFUSED,
        lambda: bmp[:18] + struct.pack("<ii", 50000, 50000) + bmp[26:])
    add("huge_tiff_100000x100000.tif", "huge-dimensions", REFUSED, lambda: _tiff_with_size(tiff, 100_000, 100_000))
    add("huge_webp_16383x16383.webp", "huge-dimensions", REFUSED, _webp_vp8x_canvas)

    # Decompression bombs: tiny files that decode to a huge image.
    add("bomb_png_1bit_16000x16000.png", "decompression-bomb", REFUSED,
        lambda: png_raw(16000, 16000, 1, 0, b"\x00" + bytes(2000)))
    add("bomb_png_1bit_60000x60000.png", "decompression-bomb", REFUSED,
        lambda: png_raw(60000, 60000, 1, 0, b"\x00" + bytes(7500), rows=64))
    # Just under the 50 MP limit: a legitimate (if silly) image, decoded and downscaled.
    add("bomb_png_1bit_7000x7000_under_limit.png", "decompression-bomb", OK,
        lambda: png_raw(7000, 7000, 1, 0, b"\x00" + bytes(875)), size=(1024, 1024))
    add("bomb_png_ztxt_16mb.png", "decompression-bomb", EITHER, lambda: _png_with_chunk(
        png, b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(16_000_000), 9)))
    add("bomb_gif_500_frames.gif", "decompression-bomb", OK, lambda: encode(
        _frames(1)[0].convert("P"), "GIF", save_all=True, append_images=[
            Image.new("P", (96, 72), i % 256) for i in range(499)], duration=10), size=(96, 72))

    # Animations: the first frame is used.
    frames = _frames(3)
    add("animated.gif", "animated", OK, lambda: encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                                       duration=100, loop=0), size=(96, 72))
    add("animated_apng.png", "animated", OK, lambda: encode(frames[0], "PNG", save_all=True, append_images=frames[1:],
                                                            duration=100), size=(96, 72))
    add("animated.webp", "animated", OK, lambda: encode(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                                                        duration=100), size=(96, 72))

    # EXIF orientation: every value, plus nonsense values and a broken EXIF block.
    display = photo((96, 64), seed=7)
    for o in range(1, 9):
        add(f"exif_orientation_{o}.jpg", "exif-orientation", OK, lambda o=o: _exif_jpeg(display, o),
            size=(96, 64), red_corner=True)
    for o in (0, 9, 65535):
        add(f"exif_orientation_invalid_{o}.jpg", "exif-orientation", OK, lambda o=o: _exif_jpeg(display, o),
            size=(96, 64), red_corner=True)
    add("exif_garbage.jpg", "exif-orientation", EITHER, lambda: _with_app1(jpeg, b"Exif\x00\x00" + random.Random(5).randbytes(300)))
    add("exif_loop_ifd.jpg", "exif-orientation", EITHER, lambda: _with_app1(
        jpeg, b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00\x08\x00\x00\x00"))

    # Colour modes and bit depths.
    small = photo((80, 60), seed=3)
    modes = {
        "cmyk.jpg": lambda: encode(small.convert("CMYK"), "JPEG"),
        "cmyk.tif": lambda: encode(small.convert("CMYK"), "TIFF"),
        "grey.jpg": lambda: encode(small.convert("L"), "JPEG"),
        "grey.png": lambda: encode(small.convert("L"), "PNG"),
        "grey_alpha.png": lambda: encode(small.convert("LA"), "PNG"),
        "rgba.png": lambda: encode(_with_alpha(small), "PNG"),
        "rgba.webp": lambda: encode(_with_alpha(small), "WEBP"),
        "palette.png": lambda: encode(small.convert("P"), "PNG"),
        "palette_transparency.png": lambda: encode(small.convert("P"), "PNG", transparency=0),
        "palette_transparency.gif": lambda: encode(small.convert("P"), "GIF", transparency=0),
        "bilevel.png": lambda: encode(small.convert("1"), "PNG"),
        "grey16.png": lambda: png_raw(80, 60, 16, 0, b"\x00" + bytes(range(160)) * 1),
        "rgb48.png": lambda: png_raw(80, 60, 16, 2, b"\x00" + bytes([120, 0]) * 240),
        "rgba64.png": lambda: png_raw(80, 60, 16, 6, b"\x00" + bytes([200, 0, 10, 0, 10, 0, 255, 255]) * 80),
        "interlaced.png": lambda: _interlaced_png(small),
        "int32.tif": lambda: encode(Image.fromarray(np.full((60, 80), 70_000, dtype=np.int32)), "TIFF"),
        "float32.tif": lambda: encode(Image.fromarray(np.linspace(0, 1, 4800, dtype=np.float32).reshape(60, 80)), "TIFF"),
        "lab.tif": lambda: encode(small.convert("LAB"), "TIFF"),
        "progressive.jpg": lambda: encode(small, "JPEG", progressive=True),
        "bmp_rgb.bmp": lambda: encode(small, "BMP"),
        "icc_profile.jpg": lambda: encode(small, "JPEG", icc_profile=_srgb_icc()),
    }
    for name, make in modes.items():
        add(name, "colour-mode", OK, make, size=(80, 60))

    # Tiny images and strips.
    add("one_pixel.png", "tiny", REFUSED, lambda: encode(Image.new("RGB", (1, 1), "red"), "PNG"))
    add("one_pixel.jpg", "tiny", REFUSED, lambda: encode(Image.new("RGB", (1, 1), "red"), "JPEG"))
    add("seven_pixels.png", "tiny", REFUSED, lambda: encode(Image.new("RGB", (7, 7), "red"), "PNG"))
    add("eight_pixels.png", "tiny", OK, lambda: encode(Image.new("RGB", (8, 8), "red"), "PNG"), size=(8, 8))
    add("strip_4000x8.png", "strip", REFUSED, lambda: encode(Image.new("RGB", (4000, 8), "red"), "PNG"))
    add("strip_8x4000.png", "strip", REFUSED, lambda: encode(Image.new("RGB", (8, 4000), "red"), "PNG"))
    add("strip_1x5000000.png", "strip", REFUSED, lambda: png_raw(1, 5_000_000, 8, 0, b"\x00\x00"))
    add("panorama_2000x400.jpg", "strip", OK, lambda: encode(photo((2000, 400)), "JPEG"), size=(1024, 205))
    add("large_6000x4000.jpg", "large", OK, lambda: encode(photo((600, 400)).resize((6000, 4000)), "JPEG", quality=70), size=(1024, 683))

    # Valid images with the wrong or odd name.
    add("png_named.jpg", "wrong-extension", OK, lambda: png, size=(320, 240), red_corner=True)
    add("jpeg_named.png", "wrong-extension", OK, lambda: jpeg, size=(320, 240), red_corner=True)
    add("UPPER_CASE.JPG", "wrong-extension", OK, lambda: jpeg, size=(320, 240), red_corner=True)
    add("spaces and ünïcödé 鳥.jpeg", "wrong-extension", OK, lambda: jpeg, size=(320, 240), red_corner=True)
    add("dash-leading-name.jpg", "wrong-extension", OK, lambda: jpeg, size=(320, 240), red_corner=True)

    # Random byte flips in valid files of every format (a small, fixed-seed fuzz).
    for label, data, ext in (("jpeg", jpeg, "jpg"), ("png", png, "png"), ("gif", gif, "gif"),
                             ("webp", webp, "webp"), ("bmp", bmp, "bmp"), ("tiff", tiff, "tif")):
        for seed in range(5):
            add(f"flipped_{label}_{seed}.{ext}", "byte-flips", EITHER, lambda d=data, s=seed: _flip(d, s))
    return _unique_stems(out)


def _unique_stems(items: list[tuple[Case, Callable[[], bytes]]]) -> list[tuple[Case, Callable[[], bytes]]]:
    """predict.py names rows by file stem: give "grey.jpg" and "grey.png" distinct stems."""
    stems: dict[str, int] = {}
    for case, _ in items:
        stem = Path(case.name).stem
        stems[stem] = stems.get(stem, 0) + 1
    renamed = []
    for case, make in items:
        path = Path(case.name)
        if stems[path.stem] > 1:
            case = replace(case, name=f"{path.stem}_{path.suffix[1:].lower()}{path.suffix}")
        renamed.append((case, make))
    return renamed


def generate(folder: Path) -> list[Case]:
    """Write every case into `folder`; returns the cases in a fixed order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for case, make in cases():
        (folder / case.name).write_bytes(make())
        result.append(case)
    return result


# --- helpers -----------------------------------------------------------------------------------------

def _flip(data: bytes, seed: int, count: int = 12) -> bytes:
    rng = random.Random(seed)
    buf = bytearray(data)
    for _ in range(count):
        i = rng.randrange(16, len(buf))  # past the signature, so the format is still recognised
        buf[i] = rng.randrange(256)
    return bytes(buf)


def _with_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    return rgba


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _png_with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    at = png.find(b"IDAT") - 4
    return png[:at] + _png_chunk(kind, data) + png[at:]


def _interlaced_png(img: Image.Image) -> bytes:
    """Adam7 interlacing (Pillow writes none): build it by hand with a constant colour."""
    w, h = img.size
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        cols = len(range(x0, w, dx))
        for _ in range(y0, h, dy):
            if cols:
                raw += b"\x00" + bytes([30, 140, 60]) * cols
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def _tiff_with_size(tiff: bytes, width: int, height: int) -> bytes:
    """Rewrite the ImageWidth/ImageLength entries of a little-endian TIFF's first IFD."""
    buf = bytearray(tiff)
    ifd = struct.unpack_from("<I", buf, 4)[0]
    count = struct.unpack_from("<H", buf, ifd)[0]
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", buf, at)
        if tag in (256, 257):
            value = width if tag == 256 else height
            if typ == 3:  # SHORT: switch to LONG to fit the value
                struct.pack_into("<HHII", buf, at, tag, 4, 1, value)
            else:
                struct.pack_into("<I", buf, at + 8, value)
    return bytes(buf)


def _webp_vp8x_canvas() -> bytes:
    """An extended WebP header claiming a 16383x16383 canvas, followed by a tiny frame."""
    small = encode(Image.new("RGB", (16, 16), "red"), "WEBP")
    vp8 = small[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (16382).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + vp8
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# --- probing an image opener with the files ------------------------------------------------------------

def probe(folders: list[Path]) -> dict:
    """Open every entry of `folders` with `birdfg.images.open_rgb`, from its path and (regular files)
    from its bytes. Meant to run in a child process (a hang is then a timeout, and its memory
    high-water mark is its own): per entry and source the outcome ("ok", "refused" or "crash",
    the last being any exception other than ImageError), the message, the RGB size, whether the
    top-left corner is red, the seconds taken; plus the process's peak RSS and open descriptors."""
    import gc
    import os
    import resource
    import time
    import warnings

    from birdfg.images import ImageError, open_rgb

    warnings.simplefilter("ignore")  # Pillow's own warnings about the damaged files are expected

    def rss_mb() -> float:
        """Peak RSS of this process. Linux's ru_maxrss survives exec (a child of a big pytest
        would report its parent's peak); VmHWM belongs to this program alone."""
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def attempt(source) -> dict:
        start = time.perf_counter()
        try:
            img = open_rgb(source)
            r, g, b = img.getpixel((1, 1))
            result = {"outcome": OK, "size": list(img.size), "mode": img.mode,
                      "red_corner": r > 180 and g < 80 and b < 80}
        except ImageError as exc:
            result = {"outcome": REFUSED, "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - exactly what the tests look for
            result = {"outcome": "crash", "message": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - start, 4)
        return result

    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
    baseline = rss_mb()
    results = {}
    for folder in folders:
        for entry in sorted(Path(folder).iterdir()):
            row = {"path": attempt(entry)}
            if entry.is_file():
                row["bytes"] = attempt(entry.read_bytes())
            results[entry.name] = row
    gc.collect()
    fds_after = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
    return {"baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(rss_mb(), 1),
            "fds_before": fds_before, "fds_after": fds_after, "results": results}


def fuzz(mutants_per_file: int, seed: int = 0) -> dict:
    """Random byte changes (1 to 64, mostly in the headers) in valid files of every format,
    through `open_rgb` from bytes: how many opened, were refused, or raised anything else."""
    import time
    import warnings

    from birdfg.images import ImageError, open_rgb

    warnings.simplefilter("ignore")
    base = photo((120, 90))
    sources = {
        "jpeg": encode(base, "JPEG"), "jpeg_progressive": encode(base, "JPEG", progressive=True),
        "jpeg_exif": _exif_jpeg(base, 6), "jpeg_cmyk": encode(base.convert("CMYK"), "JPEG"),
        "png": encode(base, "PNG"), "apng": encode(base, "PNG", save_all=True, append_images=[base]),
        "gif": encode(base.convert("P"), "GIF"), "webp": encode(base, "WEBP"), "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"), "tiff_deflate": encode(base, "TIFF", compression="tiff_deflate"),
    }
    counts = {"ok": 0, "refused": 0, "crash": 0}
    crashes, slowest = [], 0.0
    for label, data in sources.items():
        for i in range(mutants_per_file):
            rng = random.Random(f"{seed}-{label}-{i}")
            buf = bytearray(data)
            for _ in range(rng.choice([1, 2, 4, 16, 64])):
                end = min(len(buf), 400) if rng.random() < 0.5 else len(buf)
                buf[rng.randrange(8, end)] = rng.randrange(256)
            start = time.perf_counter()
            try:
                open_rgb(bytes(buf))
                counts["ok"] += 1
            except ImageError:
                counts["refused"] += 1
            except Exception as exc:  # noqa: BLE001 - exactly what this looks for
                counts["crash"] += 1
                crashes.append(f"{label} #{i}: {type(exc).__name__}: {exc}"[:200])
            slowest = max(slowest, time.perf_counter() - start)
    return {"mutants": sum(counts.values()), **counts, "slowest_s": round(slowest, 3), "crashes": crashes[:20]}


def main(argv: list[str]) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python tests/malformed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="where to write the files")
    p.add_argument("--probe", nargs="*", type=Path, metavar="DIR", default=None,
                   help="instead of writing files, open every file of these folders with open_rgb")
    p.add_argument("--json", type=Path, default=None, help="with --probe: write the results here")
    p.add_argument("--fuzz", type=int, default=None, metavar="N",
                   help="instead, open N byte-mutated copies of each of 11 valid files and count the outcomes")
    args = p.parse_args(argv)
    if args.fuzz is not None:
        print(json.dumps(fuzz(args.fuzz), indent=1))
        return 0
    if args.probe is not None:
        report = probe([args.folder, *args.probe])
        text = json.dumps(report, indent=1)
        args.json.write_text(text) if args.json else print(text)
        return 0
    written = generate(args.folder)
    kinds: dict[str, int] = {}
    for c in written:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    print(f"wrote {len(written)} files to {args.folder}")
    for kind, n in sorted(kinds.items()):
        print(f"  {kind:<22} {n}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find the birdfg package
    raise SystemExit(main(sys.argv[1:]))
