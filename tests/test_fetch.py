"""`python -m birdfg.data fetch`: an archive in CUB-200-2011's exact format (the report's real image
ids and classes, generated JPEGs) served by a real HTTP server on 127.0.0.1 with Range support:
download, resume, checksum, offline, `--archive`, and the built layout. The last tests check the
shipped split against ../shared/bird_dataset where it exists."""
from __future__ import annotations

import csv
import hashlib
import http.server
import io
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from birdfg import data, fetch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "bird_dataset").resolve()
COLUMNS = ["path", "split", "label", "cub_image_id", "cub_split", "width", "height",
           "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
# Photos of a species outside the report's 20 (CUB's first class): only `--classes all` builds them.
OTHER_CLASS = "001.Black_footed_Albatross"
OTHER_IDS = (1, 2, 3, 4)


@dataclass
class FakeCub:
    """What the test archive holds, written down independently of birdfg.fetch."""

    path: Path
    md5: str
    names: dict[int, str]  # id -> images.txt name
    is_train: dict[int, bool]
    boxes: dict[int, tuple[float, float, float, float]]
    sizes: dict[int, tuple[int, int]]
    photos: dict[str, bytes]  # images.txt name -> JPEG bytes
    report: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (class, split)


def _jpeg(image_id: int) -> tuple[bytes, tuple[int, int]]:
    size = (16 + image_id % 9, 12 + image_id % 5)  # every photo its own size and colour
    buf = io.BytesIO()
    Image.new("RGB", size, (image_id % 251, (image_id * 7) % 251, (image_id * 13) % 251)).save(buf, "JPEG")
    return buf.getvalue(), size


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_cub_archive(path: Path, report: dict[int, tuple[str, str]]) -> FakeCub:
    """CUB_200_2011.tgz as Caltech ships it (CUB_200_2011/ with images/<class>/<file>.jpg and the
    five metadata files, attributes.txt beside it), for every photo of the report's split plus a
    species outside it. The photos come first and the metadata last, the harder order to read."""
    labels = {**{i: label for i, (label, _) in report.items()}, **{i: OTHER_CLASS for i in OTHER_IDS}}
    fake = FakeCub(path, "", {}, {}, {}, {}, {}, dict(report))
    for image_id, label in sorted(labels.items()):
        name = f"{label}/{label.split('.', 1)[1]}_{image_id % 97:04d}_{image_id * 31}.jpg"
        photo, size = _jpeg(image_id)
        fake.names[image_id], fake.photos[name], fake.sizes[image_id] = name, photo, size
        fake.is_train[image_id] = image_id % 3 != 0
        fake.boxes[image_id] = (float(image_id % 5), 1.0, 7.0 + image_id % 3, 5.5)
    class_ids = {label: int(label.split(".")[0]) for label in set(labels.values())}
    lines = {
        "images.txt": [f"{i} {n}" for i, n in fake.names.items()],
        "classes.txt": [f"{c} {label}" for label, c in sorted(class_ids.items(), key=lambda x: x[1])],
        "image_class_labels.txt": [f"{i} {class_ids[labels[i]]}" for i in fake.names],
        "train_test_split.txt": [f"{i} {int(t)}" for i, t in fake.is_train.items()],
        "bounding_boxes.txt": [f"{i} {' '.join(str(v) for v in b)}" for i, b in fake.boxes.items()],
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, photo in fake.photos.items():
            _add(tar, f"CUB_200_2011/images/{name}", photo)
        for name, text in lines.items():
            _add(tar, f"CUB_200_2011/{name}", ("\n".join(text) + "\n").encode())
        _add(tar, "CUB_200_2011/README", b"The Caltech-UCSD Birds-200-2011 Dataset\n")
        _add(tar, "attributes.txt", b"1 has_bill_shape::curved_(up_or_down)\n")
    fake.md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return fake


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> FakeCub:
    return make_cub_archive(tmp_path_factory.mktemp("cub") / "CUB_200_2011.tgz", fetch.read_report_split())


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves one file at /CUB_200_2011.tgz with HTTP Range support. `drops` lists how many body
    bytes each of the next requests gets before the connection is cut; every Range header asked
    for is kept in `ranges`."""

    daemon_threads = True

    def __init__(self, payload: bytes):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.payload, self.drops, self.ranges, self.ignore_range = payload, [], [], False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/CUB_200_2011.tgz"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/CUB_200_2011.tgz":
            self.send_error(404)
            return
        payload, asked = self.server.payload, self.headers.get("Range")
        self.server.ranges.append(asked)
        start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1]) if asked and not self.server.ignore_range else 0
        if start >= len(payload) > 0 and asked:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(payload)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(payload) - start))
        self.end_headers()
        body = payload[start:]
        if self.server.drops:
            body = body[:self.server.drops.pop(0)]  # then the connection closes: HTTP/1.0
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(cub):
    srv = ArchiveServer(cub.path.read_bytes())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def expected_files(cub: FakeCub, classes: str) -> dict[str, int]:
    """Built path -> CUB id: `<train|val>_images/<images.txt name>`; the report's split, or CUB's."""
    if classes == "report":
        return {f"{split}_images/{cub.names[i]}": i for i, (_, split) in cub.report.items()}
    return {f"{'train' if cub.is_train[i] else 'val'}_images/{n}": i for i, n in cub.names.items()}


def check_layout(out: Path, cub: FakeCub, classes: str = "report") -> None:
    want = expected_files(cub, classes)
    built = {p.relative_to(out).as_posix() for split in ("train_images", "val_images")
             for p in (out / split).rglob("*") if p.is_file()}
    assert built == set(want)
    if classes == "report":
        assert sum(p.startswith("train_images/") for p in built) == 1082
        assert sum(p.startswith("val_images/") for p in built) == 103
        assert len({p.split("/")[1] for p in built}) == 20
    for path, image_id in want.items():  # the photos' bytes, as they were in the archive
        assert (out / path).read_bytes() == cub.photos[cub.names[image_id]], path
    with open(out / "annotations.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == COLUMNS
        rows = list(reader)
    assert [r[0] for r in rows] == sorted(want)
    for path, split, label, image_id, cub_split, width, height, *box in rows:
        i = want[path]
        assert (split, label, int(image_id)) == (path.split("_images/")[0], cub.names[i].split("/")[0], i)
        assert cub_split == ("train" if cub.is_train[i] else "test")
        assert (int(width), int(height)) == cub.sizes[i]
        assert tuple(float(v) for v in box) == cub.boxes[i]
    assert not (out / ".cub-build").exists()
    # The folder is what train.py reads: every class in both splits, boxes for every photo.
    data.check_class_folders(out)
    classes_found = data.class_names(out)
    assert len(data.samples(out, "train", classes_found)) + len(data.samples(out, "val", classes_found)) == len(want)
    assert len(data.read_boxes(out / "annotations.csv")) == len(want)


def run_fetch(*args: str) -> int:
    return data.main(["fetch", *args])


def one_line_error(capsys) -> str:
    """The error: one line, the last one (above it, stderr has only the progress bars)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_download_verifies_and_builds_the_report_layout(cub, server, tmp_path):
    out = tmp_path / "birds"
    assert run_fetch("--out", str(out), "--url", server.url, "--md5", cub.md5) == 0
    assert server.ranges == [None]
    check_layout(out, cub)
    assert (out / "CUB_200_2011.tgz").read_bytes() == server.payload  # kept for --archive
    assert not (out / "CUB_200_2011.tgz.part").exists()
    # Built again into the same folder: the archive there is checked and used, not downloaded.
    shutil.rmtree(out / "train_images")
    shutil.rmtree(out / "val_images")
    (out / "annotations.csv").unlink()
    assert run_fetch("--out", str(out), "--url", server.url, "--md5", cub.md5) == 0
    assert server.ranges == [None]
    check_layout(out, cub)


def test_a_dropped_connection_is_resumed_with_a_range_request(cub, server, tmp_path):
    first, second = len(server.payload) // 5, len(server.payload) // 3
    server.drops = [first, second]
    out = tmp_path / "birds"
    assert run_fetch("--out", str(out), "--url", server.url, "--md5", cub.md5) == 0
    assert server.ranges == [None, f"bytes={first}-", f"bytes={first + second}-"]
    check_layout(out, cub)


def test_a_partial_download_from_an_earlier_run_is_resumed(cub, server, tmp_path, capsys):
    out = tmp_path / "birds"
    got = len(server.payload) // 2
    server.drops = [got] + [0] * (fetch.DOWNLOAD_ATTEMPTS - 1)  # the connection keeps dying
    assert run_fetch("--out", str(out), "--url", server.url, "--md5", cub.md5) == 2
    message = one_line_error(capsys)
    assert "stopped" in message and "run the same command again to resume" in message and "--archive FILE" in message
    part = out / "CUB_200_2011.tgz.part"
    assert part.read_bytes() == server.payload[:got]
    server.ranges.clear()
    assert run_fetch("--out", str(out), "--url", server.url, "--md5", cub.md5) == 0
    assert server.ranges == [f"bytes={got}-"]
    check_layout(out, cub)


def test_a_server_that_ignores_range_restarts_the_file(cub, server, tmp_path):
    out = tmp_path / "birds"
    out.mkdir()
    (out / "CUB_200_2011.tgz.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    server.ignore_range = True
    assert run_fetch("--out", str(out), "--url", server.url, "--md5", cub.md5) == 0
    check_layout(out, cub)


def test_a_checksum_mismatch_is_refused_and_nothing_corrupt_is_kept(cub, server, tmp_path, capsys):
    damaged = bytearray(server.payload)
    damaged[len(damaged) // 2] ^= 0xFF
    server.payload = bytes(damaged)
    out = tmp_path / "birds"
    assert run_fetch("--out", str(out), "--url", server.url, "--md5", cub.md5) == 2
    message = one_line_error(capsys)
    assert f"not the published {cub.md5}" in message and "deleted" in message and "--archive FILE" in message
    assert sorted(p.name for p in out.iterdir()) == []


def test_offline_says_what_to_do(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/CUB_200_2011.tgz"
    assert run_fetch("--out", str(tmp_path / "birds"), "--url", url) == 2
    message = one_line_error(capsys)
    assert f"could not reach {url}" in message and "download the archive by hand and pass `--archive FILE`" in message


def test_an_http_error_says_what_to_do(server, tmp_path, capsys):
    assert run_fetch("--out", str(tmp_path / "birds"), "--url", server.url + ".missing") == 2
    message = one_line_error(capsys)
    assert "HTTP 404" in message and "--archive FILE" in message


def test_archive_on_disk_builds_without_a_download(cub, tmp_path, capsys):
    out = tmp_path / "birds"
    assert run_fetch("--out", str(out), "--archive", str(cub.path), "--md5", cub.md5) == 0
    check_layout(out, cub)
    assert not (out / "CUB_200_2011.tgz").exists()
    capsys.readouterr()
    # A second build into the same folder is refused rather than mixed with the first.
    assert run_fetch("--out", str(out), "--archive", str(cub.path), "--md5", cub.md5) == 2
    assert "already holds train_images, val_images, annotations.csv" in one_line_error(capsys)


def test_all_classes_use_cubs_own_split(cub, tmp_path):
    out = tmp_path / "birds"
    assert run_fetch("--out", str(out), "--archive", str(cub.path), "--md5", cub.md5, "--classes", "all") == 0
    check_layout(out, cub, "all")
    assert (out / "train_images" / OTHER_CLASS).is_dir()


def test_an_archive_with_another_checksum_is_refused(cub, tmp_path, capsys):
    assert run_fetch("--out", str(tmp_path / "birds"), "--archive", str(cub.path)) == 2
    message = one_line_error(capsys)
    assert f"MD5 {cub.md5}, not the published {fetch.CUB_MD5}" in message and f"--md5 {cub.md5}" in message


@pytest.mark.parametrize("kind", ["not gzip", "truncated", "not CUB"])
def test_an_unusable_archive_is_explained(cub, tmp_path, capsys, kind):
    archive = tmp_path / "CUB_200_2011.tgz"
    if kind == "not gzip":
        archive.write_bytes(b"<html>not an archive</html>")
    elif kind == "truncated":
        archive.write_bytes(cub.path.read_bytes()[: cub.path.stat().st_size // 2])
    else:
        with tarfile.open(archive, "w:gz") as tar:
            _add(tar, "photos/bird.jpg", cub.photos[cub.names[1]])
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    out = tmp_path / "birds"
    assert run_fetch("--out", str(out), "--archive", str(archive), "--md5", md5) == 2
    message = one_line_error(capsys)
    if kind == "not CUB":
        assert "lacks CUB_200_2011/images.txt" in message
    else:
        assert "not a readable .tgz archive" in message and "download it again" in message
    assert sorted(p.name for p in out.iterdir()) == []


def test_the_command_line_runs_as_a_module(cub, tmp_path):
    out = tmp_path / "birds"
    result = subprocess.run([sys.executable, "-m", "birdfg.data", "fetch", "--out", str(out), "--archive",
                             str(cub.path), "--md5", cub.md5], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "built" in result.stdout and "1082 train and 103 val photos" in result.stdout
    check_layout(out, cub)


def test_the_split_file_ships_as_package_data():
    assert fetch.report_split_path().is_file()
    assert fetch.report_split_path().parent == Path(fetch.__file__).parent / "resources"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*(#.*\s*)*birdfg = \["resources/\*\.csv"\]', pyproject)


# --- against ../shared/bird_dataset -----------------------------------------------------------

@pytest.fixture(scope="module")
def shared_rows() -> list[dict[str, str]]:
    if not (SHARED_DATA / "annotations.csv").is_file():
        pytest.skip(f"../shared/bird_dataset not found at {SHARED_DATA}")
    with open(SHARED_DATA / "annotations.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_shipped_split_gives_exactly_bird_datasets_files(shared_rows):
    """bird_dataset's photos keep CUB's names (`<class>/<Name>_<nnnn>_<n>.jpg` of images.txt) under
    their split's folder: the shipped split, laid out, is its file list, and nothing else."""
    with open(fetch.report_split_path(), newline="") as f:
        shipped = list(csv.reader(f))
    derived = fetch.report_split_from_annotations(SHARED_DATA / "annotations.csv")
    assert shipped == [["cub_image_id", "label", "split"]] + [list(r.values()) for r in derived]
    report = fetch.read_report_split()
    assert len(report) == len(shared_rows) == 1185
    laid_out = set()
    for r in shared_rows:
        cub_name = r["path"].split("/", 1)[1]
        assert re.fullmatch(re.escape(r["label"]) + r"/[A-Za-z_]+_\d{4}_\d+\.jpg", cub_name), r["path"]
        label, split = report[int(r["cub_image_id"])]
        assert label == r["label"]
        laid_out.add(fetch.layout_path(cub_name, split))
    on_disk = {p.relative_to(SHARED_DATA).as_posix() for split in ("train_images", "val_images")
               for p in (SHARED_DATA / split).rglob("*") if p.is_file()}
    assert laid_out == on_disk == {r["path"] for r in shared_rows}
    assert list(shared_rows[0]) == COLUMNS == list(data.ANNOTATION_COLUMNS)


@pytest.mark.slow
def test_an_archive_of_bird_datasets_photos_rebuilds_it_byte_for_byte(shared_rows, tmp_path):
    """bird_dataset's photos and CUB metadata derived from its annotations.csv, packed as
    CUB_200_2011.tgz: the build gives back the same files and the same annotations.csv."""
    archive = tmp_path / "CUB_200_2011.tgz"
    meta = {name: [] for name in fetch.METADATA}
    classes = sorted({r["label"] for r in shared_rows})
    meta["classes.txt"] = [f"{int(c.split('.')[0])} {c}" for c in classes]
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for r in shared_rows:
            i, name = r["cub_image_id"], r["path"].split("/", 1)[1]
            tar.add(SHARED_DATA / r["path"], f"CUB_200_2011/images/{name}")
            meta["images.txt"].append(f"{i} {name}")
            meta["image_class_labels.txt"].append(f"{i} {int(r['label'].split('.')[0])}")
            meta["train_test_split.txt"].append(f"{i} {int(r['cub_split'] == 'train')}")
            meta["bounding_boxes.txt"].append(f"{i} {r['bbox_x']} {r['bbox_y']} {r['bbox_w']} {r['bbox_h']}")
        for name, lines in meta.items():
            _add(tar, f"CUB_200_2011/{name}", ("\n".join(lines) + "\n").encode())
    out = tmp_path / "birds"
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    assert run_fetch("--out", str(out), "--archive", str(archive), "--md5", md5) == 0
    assert (out / "annotations.csv").read_bytes() == (SHARED_DATA / "annotations.csv").read_bytes()
    for r in shared_rows:
        assert (out / r["path"]).read_bytes() == (SHARED_DATA / r["path"]).read_bytes(), r["path"]
    shutil.rmtree(out)
