"""Dataset discovery, class names, split files, transforms, robust image opening."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from PIL import Image

from birdfg import data
from birdfg.data import DatasetError, display_name
from birdfg.images import ImageError, open_rgb


def test_display_names_drop_number_and_underscores():
    assert display_name("004.Groove_billed_Ani") == "Groove billed Ani"
    assert display_name("Plain") == "Plain"


def test_classes_and_samples_come_from_folders(tiny_dataset):
    classes = data.class_names(tiny_dataset)
    assert classes == sorted(classes) and len(classes) == 3
    train = data.samples(tiny_dataset, "train", classes)
    assert len(train) == 18 and {s.label for s in train} == {0, 1, 2}
    test = data.samples(tiny_dataset, "test", classes)
    assert len(test) == 3 and {s.label for s in test} == {-1}


def test_split_file_defines_train_and_val(tiny_dataset, tmp_path):
    classes = data.class_names(tiny_dataset)
    split_file = tmp_path / "split.csv"
    rows = [s for split in ("train", "val") for s in data.samples(tiny_dataset, split, classes)]
    with open(split_file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "cub_split"])
        for i, s in enumerate(rows):
            w.writerow([s.path.relative_to(tiny_dataset).as_posix(), classes[s.label], "train" if i % 2 else "test"])
    train = data.samples(tiny_dataset, "train", classes, split_file)
    val = data.samples(tiny_dataset, "val", classes, split_file)
    assert len(train) + len(val) == len(rows) and not {s.path for s in train} & {s.path for s in val}


def test_mismatched_class_folders_are_reported(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    shutil.rmtree(next((copy / "val_images").iterdir()))
    with pytest.raises(DatasetError, match="different class folders"):
        data.check_class_folders(copy)


def test_unreadable_files_are_skipped_by_name(tiny_dataset, tmp_path, caplog):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    bad = copy / "train_images" / "001.Red_square_bird" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    classes = data.class_names(copy)
    items = data.samples(copy, "train", classes)
    with caplog.at_level(logging.WARNING):
        kept = data.drop_unreadable(items, "train")
    assert len(kept) == len(items) - 1
    assert "broken.jpg" in caplog.text and "skipped 1 unreadable" in caplog.text
    # The Dataset itself also survives a file that breaks after the scan.
    ds = data.ImageDataset(items, data.build_transform({"input_size": [3, 32, 32], "mean": [0.5] * 3,
                                                         "std": [0.5] * 3}, train=True))
    batch = data.collate([ds[i] for i in range(len(ds))])
    assert batch[0].shape[0] == len(items) - 1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.{'png' if mode not in ('CMYK',) else 'jpg'}"
    Image.new(mode, (40, 30)).save(path)
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 60)


def test_large_photos_are_downscaled_and_bad_ones_explained(tmp_path):
    Image.new("RGB", (4000, 3000)).save(tmp_path / "big.jpg")
    assert max(open_rgb(tmp_path / "big.jpg").size) == 1024
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        open_rgb(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageError, match="not a recognised image"):
        open_rgb(tmp_path / "text.jpg")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ImageError, match="too small"):
        open_rgb(tmp_path / "dot.png")


def test_bird_boxes_give_zoomed_training_views(tiny_dataset, tmp_path):
    classes = data.class_names(tiny_dataset)
    items = data.samples(tiny_dataset, "train", classes)[:2]
    csv_path = tiny_dataset / "annotations.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "width", "height", "bbox_x", "bbox_y", "bbox_w", "bbox_h"])
        for s in items:
            w.writerow([s.path.relative_to(tiny_dataset).as_posix(), classes[s.label], 160, 120, 40, 30, 40, 30])
    try:
        boxes = data.read_boxes(csv_path)
        assert set(boxes) == {s.path.resolve() for s in items}
        box = boxes[items[0].path.resolve()]
        crop = data.bird_crop(open_rgb(items[0].path), box)
        # A square around the 40x30 bird, 1.2-1.8 times its longer side, inside the photo.
        assert 48 <= crop.width <= 72 and crop.width == crop.height
        ds = data.ImageDataset(items, lambda img: img.size, boxes)
        assert max(ds[1][0]) <= 72
    finally:
        csv_path.unlink()


PREPROCESS = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def test_data_module_batches_photos_in_a_seeded_order(tiny_dataset):
    from birdfg.datamodule import BirdDataModule

    classes = data.class_names(tiny_dataset)
    train, val = data.samples(tiny_dataset, "train", classes), data.samples(tiny_dataset, "val", classes)

    def order(seed: int) -> list[int]:
        dm = BirdDataModule(train, val, batch_size=4, preprocess=PREPROCESS, workers=0, seed=seed)
        return [int(i) for _, _, idx in dm.train_dataloader() for i in idx]

    assert sorted(order(0)) == list(range(len(train))), "every train photo once an epoch"
    assert order(0) == order(0) and order(0) != order(1), "the shuffle depends on the seed alone"
    dm = BirdDataModule(train, val, batch_size=4, preprocess=PREPROCESS, workers=0, seed=0)
    assert not dm.on_features
    x, y, idx = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and idx.tolist() == [0, 1, 2, 3], "val in file order"
    assert y.tolist() == [s.label for s in val[:4]]


def test_data_module_batches_cached_features():
    import torch

    from birdfg.datamodule import BirdDataModule, FeatureViews

    train = FeatureViews(torch.randn(2, 10, 8, 2, 2).half(), torch.arange(10) % 3)
    val = FeatureViews(torch.randn(1, 5, 8, 2, 2).half(), torch.arange(5) % 3)
    dm = BirdDataModule(train, val, batch_size=4)
    assert dm.on_features
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [4, 4], "the short last batch is dropped"
    x, y, idx = next(iter(dm.val_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (5, 8, 2, 2) and idx.tolist() == list(range(5))
    with pytest.raises(TypeError, match="both"):
        BirdDataModule(train, [data.Sample(Path("a.jpg"), 0)], batch_size=4, preprocess=PREPROCESS)


def test_the_feature_cache_is_not_reused_for_relabelled_photos(tiny_dataset, tmp_path):
    """The same photos with other labels (a new teacher's pseudo-labels, an edited split file)
    get their own cache: the labels a run trains on are always its own."""
    from birdfg.datamodule import build_feature_cache
    from birdfg.models import build, preprocess_config, preset_specs

    spec = preset_specs("lite", 3, ("cnn",), img_size=64)["cnn"]
    model = build(spec, pretrained=False)
    classes = data.class_names(tiny_dataset)
    train = data.samples(tiny_dataset, "train", classes)[:4]
    val = data.samples(tiny_dataset, "val", classes)[:2]
    relabelled = [data.Sample(s.path, (s.label + 1) % 3) for s in train]
    for items in (train, relabelled, train):
        cache = build_feature_cache(model, preprocess_config(spec), items, val, views=1, seed=0, cache_dir=tmp_path)
        assert cache.train.labels.tolist() == [s.label for s in items]
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2
