"""A folder and boxes file of one's own: what can be derived is (a photo's size, a class from its
folder), anything else is a one-line error that names the file and what is missing, from train.py
and birdfg.evaluate, never a traceback."""
from __future__ import annotations

import csv
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from birdfg import data
from birdfg.data import DatasetError
from conftest import ROOT, TINY_CLASSES, make_dataset

TINY_TRAINING = ("--preset", "lite", "--no-pretrained", "--epochs", "1", "--views", "1", "--img-size", "64",
                 "--models", "cnn", "--batch-size", "8", "--logger", "none", "--workers", "0")


@pytest.fixture
def folder(tmp_path) -> Path:
    """bird_dataset's layout: 3 classes, 2 train and 1 val photo each (160 x 120 JPEGs)."""
    return make_dataset(tmp_path / "birds", train_per_class=2, val_per_class=1, test=0)


def photos(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def boxes_without_size(root: Path, name: str = "annotations.csv", prefix: str = "") -> Path:
    """annotations.csv as another CUB subset has it: path and box, no width/height."""
    return write_csv(root / name, ["path", "label", "bbox_x", "bbox_y", "bbox_w", "bbox_h"],
                     [[prefix + p, p.split("/")[1], 10, 12, 40, 30] for p in photos(root)])


def split_file(root: Path, header: list[str], value=lambda i, path: "train" if i % 2 else "test") -> Path:
    """A split file over every photo; columns from `header` (path, label, cub_split or fewer)."""
    rows = []
    for i, p in enumerate(photos(root)):
        row = {"path": p, "label": p.split("/")[1], "cub_split": value(i, p)}
        rows.append([row[c] for c in header])
    return write_csv(root.parent / "split.csv", header, rows)


@pytest.fixture(scope="module")
def train_cli():
    """train.py's own main(), in this process (the checks run before anything heavy)."""
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train(train_cli, tmp_path, capsys):
    """Run train.py's main on a folder: (exit code, the one error line). Nothing may be written."""
    def run(data_dir: Path, *extra: str) -> tuple[int, str]:
        out = tmp_path / "out"
        code = train_cli.main(["--data", str(data_dir), *TINY_TRAINING, "--output", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
        assert not out.exists(), "nothing may be written before the data is checked"
        return code, err[0]
    return run


# --- boxes -------------------------------------------------------------------------------------

def test_width_and_height_are_read_from_the_photos(folder, caplog):
    csv_path = boxes_without_size(folder)
    with caplog.at_level(logging.INFO, logger="birdfg.data"):
        boxes = data.read_boxes(csv_path)
    assert len(boxes) == 9 and {(b.width, b.height) for b in boxes.values()} == {(160, 120)}
    assert "size was read from the photo" in caplog.text
    box = boxes[(folder / photos(folder)[0]).resolve()]
    assert (box.x, box.y, box.w, box.h) == (10, 12, 40, 30)


def test_sizes_given_in_the_file_are_used(folder):
    header = ["path", "width", "height", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
    csv_path = write_csv(folder / "annotations.csv", header, [[p, 320, 240, 1, 2, 3, 4] for p in photos(folder)])
    assert {(b.width, b.height) for b in data.read_boxes(csv_path).values()} == {(320, 240)}


def test_a_spreadsheet_csv_with_a_byte_order_mark_and_spaces_is_read(folder):
    path = folder / "annotations.csv"
    rows = "".join(f"{p}, 1, 2, 3, 4\n" for p in photos(folder))
    path.write_text("\ufeffpath, bbox_x, bbox_y, bbox_w, bbox_h\n" + rows, encoding="utf-8")
    assert len(data.read_boxes(path)) == 9


def test_boxes_without_box_columns_name_the_file_and_the_columns(folder, train):
    boxes = write_csv(folder.parent / "boxes.csv", ["path", "label", "width"], [[p, "x", 160] for p in photos(folder)])
    code, err = train(folder, "--boxes", str(boxes))
    assert code == 2 and str(boxes) in err and "no bbox_x, bbox_y, bbox_w, bbox_h columns" in err
    assert "its columns: path, label, width" in err


def test_a_box_value_that_is_no_number_is_named_by_line_and_column(folder, train):
    path = boxes_without_size(folder)
    text = path.read_text().splitlines()
    text[3] = text[3].replace(",40,", ",forty,")
    path.write_text("\n".join(text) + "\n")
    code, err = train(folder)
    assert f"{path} line 4: bbox_w is 'forty', not a number" in err


def test_a_boxes_file_that_matches_no_photo_says_how_many_matched(folder, train):
    boxes = boxes_without_size(folder, prefix="images/")
    code, err = train(folder)
    assert f"{boxes}: 0 of its 9 box paths match one of the 6 photos" in err
    assert f"the file has 'images/{photos(folder)[0]}'" in err and "a photo is 'train_images/" in err
    assert "--no-boxes" in err


def test_a_missing_boxes_file_is_named(folder, train):
    code, err = train(folder, "--boxes", str(folder / "nope.csv"))
    assert f"--boxes {folder / 'nope.csv'}: no such file" in err


def test_boxes_are_matched_relative_to_the_data_folder_too(folder, tmp_path):
    """A boxes file kept elsewhere, its paths relative to --data; partly matching is fine."""
    boxes = boxes_without_size(folder, name="../boxes-elsewhere.csv")
    classes = data.class_names(folder)
    train_items = data.samples(folder, "train", classes)
    matched = data.boxes_for(train_items, boxes, folder)
    assert set(matched) == {s.path.resolve() for s in train_items}  # 6 of the file's 9 rows


def test_an_annotations_csv_without_boxes_is_passed_over_with_a_warning(folder, caplog):
    from birdfg.train_config import TrainConfig
    from birdfg.train_set import _boxes

    write_csv(folder / "annotations.csv", ["path", "label"], [[p, p.split("/")[1]] for p in photos(folder)])
    items = data.samples(folder, "train", data.class_names(folder))
    with caplog.at_level(logging.WARNING):
        assert _boxes(TrainConfig(data=folder), items) is None
    assert "annotations.csv has no bbox_x, bbox_y, bbox_w, bbox_h column: training without bird boxes" in caplog.text


# --- split files -------------------------------------------------------------------------------

def test_a_split_file_without_its_split_column_names_file_column_and_values(folder, train):
    path = split_file(folder, ["path", "label"])
    code, err = train(folder, "--split-file", str(path))
    assert f"{path}: no cub_split column (its columns: path, label)" in err
    assert "train, or test / val for the held-out photos" in err


def test_a_split_file_with_other_split_values_lists_them(folder, train):
    path = split_file(folder, ["path", "label", "cub_split"], value=lambda i, p: str(i % 2))  # CUB's 1/0
    code, err = train(folder, "--split-file", str(path))
    assert f"{path} line 2: cub_split is '0'; expected train, or test / val" in err and "'0', '1'" in err


def test_a_split_file_naming_an_unknown_class_is_named(folder, train):
    path = split_file(folder, ["path", "label", "cub_split"])
    path.write_text(path.read_text().replace(TINY_CLASSES[1] + ",", "999.Dodo,", 1))
    code, err = train(folder, "--split-file", str(path))
    assert "class '999.Dodo' is not one of the 3 classes" in err and str(folder / "train_images") in err


def test_a_split_file_without_labels_takes_the_class_folder(folder):
    path = split_file(folder, ["path", "cub_split"])
    classes = data.class_names(folder)
    train = data.samples(folder, "train", classes, path)
    assert train and all(classes[s.label] == s.path.parent.name for s in train)


# --- class folders -----------------------------------------------------------------------------

def test_class_folders_without_photos_are_named_with_what_they_hold(folder, train):
    for name in TINY_CLASSES[1:]:
        for p in (folder / "train_images" / name).iterdir():
            p.unlink()
    (folder / "train_images" / TINY_CLASSES[2] / "bird.heic").write_bytes(b"not for us")
    code, err = train(folder)
    assert "2 of the 3 class folders have no readable photo" in err
    assert f"{TINY_CLASSES[1]} (empty)" in err and f"{TINY_CLASSES[2]} (1 file, none an image: .heic" in err


def test_classes_without_a_train_row_in_the_split_file_are_named(folder, train):
    path = split_file(folder, ["path", "label", "cub_split"],
                      value=lambda i, p: "test" if TINY_CLASSES[0] in p else "train")
    code, err = train(folder, "--split-file", str(path))
    assert f"{path}: no readable train photo for 1 of the 3 classes: {TINY_CLASSES[0]}" in err


def test_empty_val_folders_are_a_warning(folder, caplog):
    for p in (folder / "val_images" / TINY_CLASSES[0]).iterdir():
        p.unlink()
    classes = data.class_names(folder)
    with caplog.at_level(logging.WARNING):
        data.check_every_class_has_photos(folder, data.samples(folder, "train", classes),
                                          data.samples(folder, "val", classes), classes)
    assert f"no val photos for 1 class(es), whose accuracy is not measured: {TINY_CLASSES[0]}" in caplog.text


def test_read_csv_errors_are_dataset_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(DatasetError, match="not a readable CSV file"):
        data.read_boxes(bad)
    with pytest.raises(DatasetError, match="no such file"):
        data.read_boxes(tmp_path / "none.csv")


# --- the real command lines --------------------------------------------------------------------

def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_py_trains_with_an_annotations_csv_without_width_and_height(folder, tmp_path):
    """The case that stopped with KeyError: 'width'."""
    boxes_without_size(folder)
    result = run("train.py", "--data", str(folder), *TINY_TRAINING, "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"bird boxes from {folder / 'annotations.csv'}: 6 of 6 train photos" in result.stdout
    assert (tmp_path / "out" / "lite" / "cnn.safetensors").is_file()


@pytest.mark.slow
def test_train_py_prints_one_line_and_no_traceback(folder, tmp_path):
    path = split_file(folder, ["path", "label"])
    result = run("train.py", "--data", str(folder), *TINY_TRAINING, "--split-file", str(path),
                 "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: no cub_split column")


@pytest.mark.slow
def test_evaluate_pointing_game_on_own_boxes(folder, untrained_lite_set, tmp_path):
    common = ("-m", "birdfg.evaluate", "--data", str(folder), "--checkpoints", str(untrained_lite_set), "--no-save",
              "--pointing-game")
    boxes = boxes_without_size(folder, prefix="elsewhere/")
    result = run(*common)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {boxes}: 0 of its 9 box paths match one of the 3")
    boxes_without_size(folder)  # no width/height: read from the photos
    result = run(*common, "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pointing_game" in (tmp_path / "report.json").read_text()
