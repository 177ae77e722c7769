"""The example photos offered under the upload box, and their credits.

The project's own photos (`examples/`, free licences) are always offered; `--examples DIR` adds
a folder of one's own after them. A folder's `CREDITS.csv` (columns `file, species, author,
licence, original, changes`) names each photo's author, licence, source and what was changed: CC BY
and CC BY-SA need all four shown wherever the photo is shown, so the gallery lists them and the
photo box says whose photo it is once an example was clicked.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from birdfg.data import IMAGE_SUFFIXES

log = logging.getLogger("birdfg.app")

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"  # the project's photos, committed with it
CREDITS_FILE = "CREDITS.csv"
CREDIT_COLUMNS = ("file", "species", "author", "licence", "original", "changes")
GALLERY_LABEL = "Example photos (click one to compare; their credits are at the foot of this tab)"
CREDITS_TITLE = "Credits of the example photos"
_CC = re.compile(r"CC (BY(?:-SA)?) (\d\.\d)")


@dataclass(frozen=True)
class Credit:
    """One photo's row of CREDITS.csv."""

    file: str
    species: str
    author: str
    licence: str
    original: str
    changes: str

    @property
    def licence_link(self) -> str:
        """The licence, linked to its deed when it is a Creative Commons one."""
        match = _CC.fullmatch(self.licence.strip())
        if not match:
            return self.licence
        kind, version = match.groups()
        return f"[{self.licence}](https://creativecommons.org/licenses/{kind.lower()}/{version}/)"

    @property
    def changed(self) -> bool:
        return bool(self.changes.strip()) and not self.changes.lower().startswith("none")

    def text(self, maps_drawn: bool = False) -> str:
        """The attribution in Markdown: species, author, licence, source, changes. `maps_drawn`:
        the app's maps are drawn over this photo, which is a change too."""
        changes = [self.changes] if self.changed else []
        if maps_drawn:
            changes.append("the maps are drawn over it")
        changed = f"; changed: {'; '.join(changes)}" if changes else ""
        return f"{self.species} — photo by {self.author}, {self.licence_link} ([source]({self.original})){changed}"


def read_credits(folder: Path) -> dict[str, Credit]:
    """`folder`'s CREDITS.csv by file name ({} without one). A file with other columns is an error
    that names it: shown photos without their credits would break their licences."""
    path = Path(folder) / CREDITS_FILE
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CREDIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; its header must be "
                             f"{','.join(CREDIT_COLUMNS)}")
        return {row["file"]: Credit(**{c: (row[c] or "").strip() for c in CREDIT_COLUMNS}) for row in reader}


def find_examples(folder: Path | None, limit: int = 12) -> list[Path]:
    """Up to `limit` photos from `folder`: one per sub-folder first (a class each in the
    bird_dataset layout), so the gallery shows different species."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        log.warning("--examples %s: no such folder; no examples shown", folder)
        return []
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    first_per_folder: dict[Path, Path] = {}
    for p in photos:
        first_per_folder.setdefault(p.parent, p)
    picked = list(first_per_folder.values())[:limit]
    picked += [p for p in photos if p not in picked][: limit - len(picked)]
    return picked


def offered_examples(own: Path | None = None, defaults: Path | None = EXAMPLES_DIR) -> list[Path]:
    """The gallery: the project's example photos, then up to 12 from `own` (`--examples DIR`)."""
    photos = sorted(p for p in Path(defaults).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) \
        if defaults is not None and Path(defaults).is_dir() else []
    return photos + [p for p in find_examples(own) if p not in photos]


def credit_of(photo: Path) -> Credit | None:
    """The credit of an example photo, from the CREDITS.csv beside it."""
    photo = Path(photo)
    return _credits_in(photo.parent.resolve()).get(photo.name)


@functools.lru_cache(maxsize=8)
def _credits_in(folder: Path) -> dict[str, Credit]:
    return read_credits(folder)


class Credits:
    """The credits of the photos on offer, found by content: an example the visitor clicked arrives
    as Gradio's copy under another folder, and an upload that merely has an example's name is not it."""

    def __init__(self, photos: list[Path]):
        self._by_digest: dict[str, Credit] = {}
        self._sizes: set[int] = set()
        for photo in map(Path, photos):
            if (credit := credit_of(photo)) is not None:
                self._by_digest[_digest(photo)] = credit
                self._sizes.add(photo.stat().st_size)

    def __len__(self) -> int:
        return len(self._by_digest)

    def credit_text(self, path: str | Path | None) -> str:
        """The attribution of the photo at `path` when it is one of the credited examples, else ""."""
        if not path:
            return ""
        path = Path(path)
        try:
            # A size check first: most uploads are no example, and a path that is no regular
            # file (a device, a folder) is never read.
            if not path.is_file() or path.stat().st_size not in self._sizes:
                return ""
            credit = self._by_digest.get(_digest(path))
        except OSError:
            return ""
        return credit.text(maps_drawn=True) if credit else ""

    def for_payload(self, image: Any) -> str:
        """`credit_text` of an image component's raw value (a file dict, a path or None)."""
        return self.credit_text(image.get("path") if isinstance(image, dict) else image)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gallery_credits(photos: list[Path]) -> str:
    """The Markdown under the gallery: the credit of every credited photo, in the gallery's order."""
    return "\n".join(f"- {c.text()}" for c in map(credit_of, photos) if c is not None)


def example_gallery(photos: list[Path], photo: gr.Image) -> gr.Examples | None:
    """The clickable examples for `photo` (inside an open gr.Blocks); their credits: `example_credits`."""
    if not photos:
        return None
    return gr.Examples([[str(p)] for p in photos], inputs=[photo], label=GALLERY_LABEL, examples_per_page=12)


def example_credits(photos: list[Path]) -> None:
    """The credits of the gallery's photos, open, on the tab that shows the photos (inside an open
    gr.Blocks): the licences ask for credit where the photos are shown. A clicked photo's own
    credit shows under it too (`Credits`)."""
    if text := gallery_credits(photos):
        with gr.Accordion(CREDITS_TITLE, open=True):
            gr.Markdown(text, elem_id="example-credits")
