"""`python -m birdfg.data fetch --out DIR`: CUB-200-2011 from its official archive, laid out the
way this project trains on it: `train_images/<class>/`, `val_images/<class>/` and `annotations.csv`
(the columns of `birdfg.data.ANNOTATION_COLUMNS`).

The default builds the reference report's 20 species with its 1082 / 103 train/val split, the
photos and file names of bird_dataset: `resources/report_split.csv` lists each of those CUB image
ids with its class and split (metadata only; `report_split_from_annotations` made it from
bird_dataset's annotations.csv). `--classes all` builds the 200 species with CUB's own split
(train_images = CUB train, val_images = CUB test). A photo's path is `<split>_images/<name>`, where
`<name>` is its `images.txt` entry (`<class>/<Name>_<nnnn>_<n>.jpg`), and its bytes are copied as they
are. bird_dataset's `test_images/` (the Kaggle set) are not CUB photos and are not in the archive.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import http.client
import logging
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from birdfg.data import ANNOTATION_COLUMNS, SPLIT_DIRS, DatasetError

log = logging.getLogger(__name__)

# CUB-200-2011's home is CaltechDATA (record 65de6-vp158, https://data.caltech.edu/records/65de6-vp158,
# "Caltech-UCSD Birds-200-2011"); the Visipedia address it used to have
# (www.vision.caltech.edu/visipedia-data/CUB-200-2011/) no longer serves it. The MD5 is the one
# published for the archive, the digest that the usual CUB loaders check (torchvision-style `Cub2011`
# datasets, `tgz_md5`). Neither was re-checked from this machine, which has no internet: `--url`
# and `--md5` override them should the record move.
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
ARCHIVE_NAME = "CUB_200_2011.tgz"

ROOT_IN_ARCHIVE = "CUB_200_2011/"
IMAGES_IN_ARCHIVE = "images/"
METADATA = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
CLASS_CHOICES = ("report", "all")

DOWNLOAD_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_ATTEMPTS = 4  # a dropped connection is resumed this many times before giving up
BY_HAND = "download the archive by hand and pass `--archive FILE`"


class FetchError(DatasetError):
    """The archive cannot be downloaded, is not the published one, or cannot be laid out."""


class _Dropped(Exception):
    """The connection ended before the whole file arrived (what is in the .part file stays)."""


# --- the report's split -----------------------------------------------------------------------

def report_split_path() -> Path:
    return Path(str(resources.files("birdfg") / "resources" / "report_split.csv"))


def read_report_split() -> dict[int, tuple[str, str]]:
    """CUB image id -> (class folder, "train" or "val") of the reference report's 1185 photos."""
    with open(report_split_path(), newline="") as f:
        return {int(r["cub_image_id"]): (r["label"], r["split"]) for r in csv.DictReader(f)}


def report_split_from_annotations(annotations: Path) -> list[dict[str, str]]:
    """The rows of `resources/report_split.csv` (cub_image_id, label, split), from bird_dataset's
    annotations.csv; how the shipped file was made, and what its test checks it against."""
    with open(annotations, newline="") as f:
        rows = [{k: r[k] for k in ("cub_image_id", "label", "split")} for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: int(r["cub_image_id"]))


def layout_path(image_name: str, split: str) -> str:
    """Where a CUB photo (its images.txt name) goes in the built folder: `train_images/<name>`."""
    return f"{SPLIT_DIRS[split]}/{image_name}"


# --- the archive's metadata -------------------------------------------------------------------

@dataclass(frozen=True)
class CubImage:
    id: int
    name: str  # images.txt: "<class>/<file>.jpg", relative to CUB_200_2011/images/
    is_train: bool  # train_test_split.txt: CUB's own split
    bbox: tuple[float, float, float, float]  # bounding_boxes.txt: x, y, w, h in pixels

    @property
    def label(self) -> str:
        return self.name.split("/")[0]


def _safe_image_name(name: str) -> bool:
    """`<class>/<file>` and nothing that could climb out of the folder it is written into."""
    parts = name.split("/")
    return len(parts) == 2 and all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def _table(text: str, file: str, fields: int) -> dict[int, list[str]]:
    """`<id> <value>...` lines of one of CUB's metadata files."""
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        values = line.split()
        if len(values) != fields + 1 or not values[0].isdigit():
            raise FetchError(f"{ROOT_IN_ARCHIVE}{file} line {number}: expected '<id>' and {fields} value(s), got "
                             f"{line!r}; the archive is damaged: download it again.")
        table[int(values[0])] = values[1:]
    return table


def parse_metadata(texts: dict[str, str]) -> dict[int, CubImage]:
    """CUB's five metadata files (name -> text) as images by id, cross-checked: an image's class
    folder must be the class image_class_labels.txt gives it."""
    missing = [name for name in METADATA if name not in texts]
    if missing:
        raise FetchError(f"not the CUB-200-2011 archive: it lacks {', '.join(ROOT_IN_ARCHIVE + m for m in missing)}; "
                         f"use the published {ARCHIVE_NAME} ({CUB_URL}).")
    names = _table(texts["images.txt"], "images.txt", 1)
    classes = _table(texts["classes.txt"], "classes.txt", 1)
    labels = _table(texts["image_class_labels.txt"], "image_class_labels.txt", 1)
    splits = _table(texts["train_test_split.txt"], "train_test_split.txt", 1)
    boxes = _table(texts["bounding_boxes.txt"], "bounding_boxes.txt", 4)
    images = {}
    for image_id, (name,) in names.items():
        try:
            label = classes[int(labels[image_id][0])][0]
            image = CubImage(image_id, name, splits[image_id][0] == "1", tuple(float(v) for v in boxes[image_id]))
        except (KeyError, ValueError) as exc:
            raise FetchError(f"image {image_id} ({name}) has no valid class, split or box in the archive's metadata "
                             f"({type(exc).__name__}: {exc}); the archive is damaged: download it again.") from exc
        if not _safe_image_name(name) or image.label != label:
            raise FetchError(f"images.txt: image {image_id} is {name!r}, not '{label}/<file>'; "
                             "the archive is damaged: download it again.")
        images[image_id] = image
    return images


def plan_layout(images: dict[int, CubImage], classes: str) -> list[tuple[CubImage, str]]:
    """(image, "train" or "val") for every photo to build, sorted by its path in the built folder."""
    if classes == "all":
        chosen = [(image, "train" if image.is_train else "val") for image in images.values()]
    elif classes == "report":
        chosen, wrong = [], []
        for image_id, (label, split) in read_report_split().items():
            image = images.get(image_id)
            if image is None or image.label != label:
                wrong.append(f"id {image_id}: {label}, found {image.name if image else 'nothing'}")
            else:
                chosen.append((image, split))
        if wrong:
            raise FetchError(f"the archive does not hold the report's photos as CUB-200-2011 publishes them: "
                             f"{len(wrong)} of {len(chosen) + len(wrong)} differ (e.g. {wrong[0]}); use the published "
                             f"{ARCHIVE_NAME}.")
    else:
        raise ValueError(f"classes must be one of {CLASS_CHOICES}, not {classes!r}")
    return sorted(chosen, key=lambda c: layout_path(c[0].name, c[1]))


# --- download ---------------------------------------------------------------------------------

def file_md5(path: Path, desc: str | None = None) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as raw, \
            tqdm.wrapattr(raw, "read", total=path.stat().st_size, desc=desc or f"checking {path.name}", unit="B",
                          unit_scale=True, unit_divisor=1024, leave=False) as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, attempts: int = DOWNLOAD_ATTEMPTS) -> Path:
    """`url` to `dest`, through `dest.part`: a partial file (this run's dropped connection, or an
    earlier run's) is resumed with an HTTP Range request. The whole file must have the MD5 `md5`,
    or it is deleted. A `dest` already there with that MD5 is used as it is."""
    if dest.exists():
        if file_md5(dest) == md5:
            print(f"using {dest} (already downloaded, checksum verified)")
            return dest
        log.warning("%s does not have the expected MD5: downloading it again", dest)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _download_into(url, part)
            break
        except _Dropped as exc:
            size = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                raise FetchError(f"the download of {url} stopped {attempts} times (last: {exc}, at {size:,} bytes); "
                                 f"run the same command again to resume from {part}, or {BY_HAND}.") from exc
            log.warning("download stopped at %s bytes (%s); resuming (attempt %d of %d)", f"{size:,}", exc, attempt + 1,
                        attempts)
    digest = file_md5(part)
    if digest != md5:
        part.unlink()  # a corrupt archive must not be resumed or reused
        raise FetchError(f"the file downloaded from {url} has MD5 {digest}, not the published {md5}: it was damaged "
                         f"on the way or is not {ARCHIVE_NAME}. It was deleted; run the command again to download it "
                         f"afresh, or {BY_HAND}.")
    part.replace(dest)
    return dest


def _download_into(url: str, part: Path) -> None:
    """One request: the rest of `url` appended to `part` (or all of it, if the server ignores Range).
    Raises `_Dropped` when the body ends early, FetchError when the server cannot be used."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "birdfg-fetch", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return  # nothing past `have`: the .part file is whole (its checksum decides)
        raise FetchError(f"{url} answered HTTP {exc.code} ({exc.reason}); {BY_HAND}.") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        resume = f" (the {have:,} bytes in {part} are kept for the next run)" if have else ""
        raise FetchError(f"could not reach {url} ({reason}){resume}; {BY_HAND}.") from exc
    with response:
        if response.headers.get_content_type() == "text/html":
            raise FetchError(f"{url} sent a web page, not the archive; {BY_HAND}.")
        resumed = response.status == 206
        start = have if resumed else 0  # 200: the server sends the whole file again
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name) as bar:
            try:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as exc:  # reset, timeout, IncompleteRead
                raise _Dropped(f"{type(exc).__name__}: {exc}") from exc
    # http.client returns b"" rather than raising when the connection closes before Content-Length.
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Dropped(f"connection closed at {size:,} of {total:,} bytes")


# --- building the folder ----------------------------------------------------------------------

OUTPUTS = (SPLIT_DIRS["train"], SPLIT_DIRS["val"], "annotations.csv")


def _refuse_existing(out: Path) -> None:
    there = [name for name in OUTPUTS if (out / name).exists()]
    if there:
        raise FetchError(f"{out} already holds {', '.join(there)}; pass another --out, or delete them to build again.")


def _unpack(archive: Path, staging: Path, wanted: set[str] | None) -> tuple[dict[str, str], dict[str, Path]]:
    """One pass over the .tgz (it is read as a stream: a gzip file has no index, and the metadata
    may come after the photos): the metadata texts, and every photo of the `wanted` class folders
    (all, when None) copied to `staging/images/<name>`."""
    texts: dict[str, str] = {}
    staged: dict[str, Path] = {}
    try:
        with open(archive, "rb") as raw, \
                tqdm.wrapattr(raw, "read", total=archive.stat().st_size, desc=f"reading {archive.name}", unit="B",
                              unit_scale=True, unit_divisor=1024) as f, \
                tarfile.open(fileobj=f, mode="r|gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile() or not name.startswith(ROOT_IN_ARCHIVE):
                    continue
                inner = name[len(ROOT_IN_ARCHIVE):]
                if inner in METADATA:
                    texts[inner] = tar.extractfile(member).read().decode("utf-8")
                elif inner.startswith(IMAGES_IN_ARCHIVE):
                    image_name = inner[len(IMAGES_IN_ARCHIVE):]
                    if not _safe_image_name(image_name):
                        continue
                    if wanted is not None and image_name.split("/")[0] not in wanted:
                        continue
                    dest = staging / "images" / image_name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    staged[image_name] = dest
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError, UnicodeDecodeError) as exc:
        # (an OSError writing the photos, e.g. a full disk, is not the archive's fault: it goes up as it is)
        raise FetchError(f"{archive}: not a readable .tgz archive ({type(exc).__name__}: {exc}); download it again, "
                         "or pass the published CUB_200_2011.tgz.") from exc
    return texts, staged


def build(archive: Path, out: Path, classes: str = "report") -> dict[str, int]:
    """Lay `archive` (CUB_200_2011.tgz) out in `out`; returns the photo count per split. The folder
    is assembled in `out/.cub-build` and moved into place only when complete."""
    _refuse_existing(out)
    staging = out / ".cub-build"
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted build left
    wanted = None if classes == "all" else {label for label, _ in read_report_split().values()}
    try:
        texts, staged = _unpack(archive, staging, wanted)
        plan = plan_layout(parse_metadata(texts), classes)
        absent = [image.name for image, _ in plan if image.name not in staged]
        if absent:
            raise FetchError(f"{archive}: {len(absent)} of the {len(plan)} photos to build are not in the archive "
                             f"(e.g. {ROOT_IN_ARCHIVE}{IMAGES_IN_ARCHIVE}{absent[0]}); download the archive again.")
        rows, counts = [], {"train": 0, "val": 0}
        for image, split in plan:
            path = layout_path(image.name, split)
            dest = staging / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            staged[image.name].replace(dest)
            with Image.open(dest) as img:  # the header only
                width, height = img.size
            rows.append([path, split, image.label, image.id, "train" if image.is_train else "test", width, height,
                         *image.bbox])
            counts[split] += 1
        with open(staging / "annotations.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ANNOTATION_COLUMNS)
            writer.writerows(rows)
        for name in OUTPUTS:
            (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def fetch(out: Path, classes: str = "report", archive: Path | None = None, url: str = CUB_URL,
          md5: str = CUB_MD5) -> dict[str, int]:
    """Download (unless `archive` is given), verify and build; returns the photo count per split."""
    out.mkdir(parents=True, exist_ok=True)
    _refuse_existing(out)  # before a download of 1.1 GB, not after
    if archive is None:
        archive = download(url, out / ARCHIVE_NAME, md5)
    else:
        if not archive.is_file():
            raise FetchError(f"--archive {archive}: no such file.")
        digest = file_md5(archive)
        if digest != md5:
            raise FetchError(f"{archive} has MD5 {digest}, not the published {md5} of {ARCHIVE_NAME}: it is damaged or "
                             f"another file. Download it again (or run without --archive); if it is a copy you trust, "
                             f"pass --md5 {digest}.")
    counts = build(archive, out, classes)
    print(f"built {out}: {counts['train']} train and {counts['val']} val photos "
          f"({'CUB split, 200 species' if classes == 'all' else 'the report split, 20 species'}) and annotations.csv")
    if archive.parent.resolve() == out.resolve():
        print(f"the archive stays at {archive} for another build (--archive); delete it to free the space.")
    return counts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fetch", help="download CUB-200-2011 and build the dataset folder",
        description="Download CUB-200-2011 (CUB_200_2011.tgz, 1.1 GB, from CaltechDATA; resumed if interrupted, "
                    "checksum verified) and build DIR/train_images/<class>/, DIR/val_images/<class>/ and "
                    "DIR/annotations.csv (bird boxes, CUB's split), ready for `train.py --data DIR`.")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder to build (created if needed); the downloaded archive is kept there")
    p.add_argument("--classes", choices=CLASS_CHOICES, default="report",
                   help="report (default): the reference report's 20 species, 1082 train / 103 val photos, "
                        "the files of bird_dataset; all: the 200 CUB species with CUB's official split "
                        "(train_images = CUB train, val_images = CUB test)")
    p.add_argument("--archive", type=Path, default=None, metavar="FILE",
                   help="build from this CUB_200_2011.tgz, already on disk (no download)")
    p.add_argument("--url", default=CUB_URL, help=f"where to download the archive from (default {CUB_URL})")
    p.add_argument("--md5", default=CUB_MD5, help=f"the archive's expected MD5 (default: the published {CUB_MD5})")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        fetch(args.out, args.classes, args.archive, args.url, args.md5.lower())
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume the download", file=sys.stderr)
        return 130
    return 0
