"""Shared fixtures: real JPEG datasets made on the fly, the shared bird dataset when present,
and real model sets on disk (the shipped lite set, or a freshly exported one)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "bird_dataset").resolve()
SHIPPED_LITE = ROOT / "checkpoints" / "lite"
ARTIFACTS = ROOT / "tests" / "artifacts"

TINY_CLASSES = ["001.Red_square_bird", "002.Green_disc_bird", "003.Blue_bar_bird"]
_COLOURS = [(200, 40, 40), (40, 170, 60), (40, 60, 200)]


def synthetic_photo(label: int, seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A small photo whose class is visible (a coloured shape on a noisy background)."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed).integers(90, 170, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    x, y = rng.randint(10, size[0] // 2), rng.randint(10, size[1] // 2)
    w, h = size[0] // 3, size[1] // 3
    shape = [draw.rectangle, draw.ellipse, draw.rectangle][label]
    box = (x, y, x + w, y + (h // 3 if label == 2 else h))
    shape(box, fill=_COLOURS[label])
    return img


def make_dataset(root: Path, train_per_class: int = 6, val_per_class: int = 2, test: int = 3) -> Path:
    """bird_dataset layout with real JPEG files."""
    for split, count in (("train_images", train_per_class), ("val_images", val_per_class)):
        for label, name in enumerate(TINY_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                synthetic_photo(label, hash((split, label, i)) % 10_000).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    test_dir = root / "test_images" / "mistery_category"
    test_dir.mkdir(parents=True, exist_ok=True)
    for i in range(test):
        synthetic_photo(i % 3, 5000 + i).save(test_dir / f"test{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny_birds"))


@pytest.fixture(scope="session")
def bird_data() -> Path:
    if not (SHARED_DATA / "val_images").is_dir():
        pytest.skip(f"../shared/bird_dataset not found at {SHARED_DATA}: this test needs the real photos")
    return SHARED_DATA


def export_lite_set(folder: Path, classes: list[str], seed: int = 0, img_sizes: dict[str, int] | None = None,
                    output_strides: dict[str, int] | None = None) -> Path:
    """A real lite model set on disk: pretrained Lite0 backbone (pip package), untrained heads;
    each model at 224 px and stride 32 unless `img_sizes` / `output_strides` say otherwise."""
    from birdfg import checkpoints
    from birdfg.models import MODEL_KEYS, build, preprocess_config, preset_specs, shared_backbone_key

    torch.manual_seed(seed)
    shared: dict[str, torch.nn.Module] = {}
    for key in MODEL_KEYS:
        spec = preset_specs("lite", len(classes), (key,), (img_sizes or {}).get(key, 224),
                            output_stride=(output_strides or {}).get(key))[key]
        model = build(spec, pretrained=True, backbone=shared.get(shared_backbone_key(spec)))
        shared[shared_backbone_key(spec)] = model.backbone
        checkpoints.export(model.eval(), folder / f"{key}.safetensors", classes,
                           preprocess_config(spec), {"train_acc": 0.0, "val_acc": 0.0},
                           {"epochs": 0, "command": "tests/conftest.py export_lite_set"})
    return folder


@pytest.fixture(scope="session")
def untrained_lite_set(tmp_path_factory) -> Path:
    return export_lite_set(tmp_path_factory.mktemp("lite_set"), TINY_CLASSES)


@pytest.fixture(scope="session")
def app_checkpoints(tmp_path_factory) -> Path:
    """What the app serves in tests: the shipped lite set when it is complete, else a fresh one."""
    if all((SHIPPED_LITE / f"{k}.safetensors").exists() for k in ("cnn", "vit", "bcnn")):
        return SHIPPED_LITE
    print("checkpoints/lite is not complete: tests use an untrained lite set")
    return export_lite_set(tmp_path_factory.mktemp("app_set"), TINY_CLASSES)


@pytest.fixture(scope="session")
def sample_photo(tmp_path_factory) -> Path:
    """A real bird photo from the shared dataset when present, else a generated JPEG."""
    if (SHARED_DATA / "val_images").is_dir():
        return sorted((SHARED_DATA / "val_images").rglob("*.jpg"))[0]
    path = tmp_path_factory.mktemp("photo") / "bird.jpg"
    synthetic_photo(0, 1, (400, 300)).save(path)
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that talked to a running app gets the end of that app's log in its report."""
    report = yield
    url = getattr(item, "funcargs", {}).get("app_url")
    if report.failed and isinstance(url, str):
        import app_server

        tail = app_server.log_tail(url)
        if tail:
            report.sections.append(("app.py log (end)", tail))
    return report


@pytest.fixture(scope="session")
def app_url(app_checkpoints, pytestconfig, tmp_path_factory) -> str:
    """The real `python app.py` on localhost, started once and shared by the app tests (tests/app_server.py)."""
    import app_server

    tmp = tmp_path_factory.mktemp("app")
    return app_server.app_url(app_checkpoints, app_server.example_folder(SHARED_DATA, tmp), pytestconfig, tmp)


@pytest.fixture(scope="module")
def client(app_url):
    """A gradio_client Client of that app."""
    from gradio_client import Client

    return Client(app_url, verbose=False)
