"""A Gradio app that does no work: the floor under bench_browser.py's figures.

    python benchmarks/floor_app.py --port P [--events text|images|both]

A photo dropped into `gr.Image(elem_id="photo")` starts an event that returns a text (a
Markdown, elem_id "floor-text": "received <file name>") and/or one that returns three small fixed
PNG files (gr.Image elem_ids "floor-img-0", "floor-img-1", "floor-img-2"), drawn once at start
into a temporary folder. Neither opens the photo: what is left is Gradio itself (the upload, the
queue, the event's messages, and for the images the files cached, served and loaded by the
browser). bench_browser.py runs one process per event: in one page, Gradio's front end sends the
second event of an upload only once the first has finished, so `both` times the images after
the text.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

IMAGE_SIDE = 256  # pixels; three distinct PNGs of a few kB


def fixed_images(folder: Path) -> list[str]:
    """Three small PNGs (a gradient in a different colour each), written once."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, IMAGE_SIDE, dtype=np.float32)
    paths = []
    for i in range(3):
        pixels = np.zeros((IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        pixels[..., i] = ramp[None, :].astype(np.uint8)
        pixels[..., (i + 1) % 3] = ramp[:, None].astype(np.uint8)
        path = folder / f"floor-{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def build(images: list[str], events: str = "both"):
    import gradio as gr

    def text(photo) -> str:
        path = photo.get("path") if isinstance(photo, dict) else photo
        return f"received {Path(str(path)).name}"

    def three_images(_photo) -> tuple[str, str, str]:
        return tuple(images)

    with gr.Blocks(title="birdfg floor") as demo:
        photo = gr.Image(type="filepath", sources=["upload"], label="Photo", height=330, elem_id="photo")
        shown = gr.Markdown(elem_id="floor-text")
        with gr.Row():
            outputs = [gr.Image(type="filepath", label=f"image {i}", elem_id=f"floor-img-{i}") for i in range(3)]
        if events in ("text", "both"):
            photo.upload(text, photo, shown, preprocess=False, api_name="text")
        if events in ("images", "both"):
            photo.upload(three_images, photo, outputs, preprocess=False, api_name="images")
    return demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--events", choices=["text", "images", "both"], default="both",
                   help="which event a photo upload starts (default: both)")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="birdfg_floor_"))
    atexit.register(shutil.rmtree, folder, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the folder goes too
    demo = build(fixed_images(folder), args.events)
    demo.queue().launch(server_name="127.0.0.1", server_port=args.port, ssr_mode=False, show_error=False,
                        allowed_paths=[str(folder)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
