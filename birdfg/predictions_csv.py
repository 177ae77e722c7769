"""The predictions CSV (`Id,Category`: file stem, class index) as a file that a long run can be
killed in and resumed from.

While a run goes, rank 0 appends to the output file itself and every other rank to its own part
file beside it (`OUT.part<rank>`). Rows go in batch by batch, each batch flushed and fsynced, so
a killed run loses at most the batch it was writing. A SIGKILL can leave a half-written last
record: readers ignore it and the next appender cuts it off before writing. At the end `merge`
writes the output file once more with every row, each Id once, in the folder's order, and
removes the parts. Several nodes must see the output folder as one shared filesystem.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

HEADER = ["Id", "Category"]
# File names need not be valid UTF-8 on Linux; their undecodable bytes round-trip unchanged.
_ENCODING = ("utf-8", "surrogateescape")
_PART = re.compile(r"\.part\d+")


class PredictionsFileError(ValueError):
    """An output path that holds something other than a predictions CSV."""


def part_path(out: Path, rank: int) -> Path:
    """Where rank `rank` (> 0) writes while a run goes."""
    return out.with_name(f"{out.name}.part{rank}")


def part_paths(out: Path) -> list[Path]:
    """Every part file of `out` left by any run, whatever its number of ranks."""
    candidates = out.parent.glob(glob.escape(out.name) + ".part*")
    return sorted(p for p in candidates if _PART.fullmatch(p.name[len(out.name):]) and p.is_file())


def _complete_length(data: bytes) -> int:
    """How many bytes at the start of `data` are whole records: up to the last newline outside
    quotes (csv quotes a field that holds a newline; an escaped quote is doubled, so the count
    of quotes before a record's end is even)."""
    end = len(data)
    while (end := data.rfind(b"\n", 0, end)) >= 0:
        if data.count(b'"', 0, end) % 2 == 0:
            return end + 1
    return 0


def _encode(rows: Iterable[Sequence[object]]) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode(*_ENCODING)


def read(path: Path) -> dict[str, str]:
    """Id -> Category of the whole records of a predictions file; {} when there is none."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise PredictionsFileError(f"{path} is not a file; pass --out the path of a CSV file.")
    data = path.read_bytes()
    text = data[:_complete_length(data)].decode(*_ENCODING)
    records = list(csv.reader(io.StringIO(text, newline="")))
    if not records:
        return {}
    if records[0] != HEADER:
        raise PredictionsFileError(
            f"{path} is not a predictions CSV (its first line is {','.join(records[0])!r}, not "
            f"{','.join(HEADER)!r}); pass another --out, or move the file away."
        )
    rows = {}
    for line, record in enumerate(records[1:], start=2):
        if len(record) != len(HEADER):
            raise PredictionsFileError(
                f"{path}, record {line}: {record!r} is not an Id and a Category; fix or delete that line "
                "(its photo is then predicted again)."
            )
        rows.setdefault(record[0], record[1])
    return rows


def collect(out: Path) -> dict[str, str]:
    """Every row already written for `out`: its own and its part files' (the output file's row wins
    where an Id is in both)."""
    rows = read(out)
    for part in part_paths(out):
        for key, category in read(part).items():
            rows.setdefault(key, category)
    return rows


class Appender:
    """Appends rows to a predictions file, a batch at a time, each batch on disk before `write`
    returns. Opening cuts off a half-written last record and writes the header into a new or
    empty file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab")
        with open(path, "rb") as existing:
            keep = _complete_length(existing.read())
        self._file.truncate(keep)
        if keep == 0:
            self._write([HEADER])

    def write(self, rows: Sequence[tuple[str, int]]) -> None:
        if rows:
            self._write(rows)

    def _write(self, rows: Iterable[Sequence[object]]) -> None:
        self._file.write(_encode(rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def merge(out: Path, order: Sequence[str]) -> int:
    """Rewrite `out` with its rows and its part files', each Id once, ordered as in `order` (Ids
    that are not in it last, as they were), then remove the parts; returns the number of rows.
    A run killed here leaves either the old file or the merged one, and the parts until the
    merged file is in place (their rows are then in both: the next run keeps each once)."""
    rows = collect(out)
    position = {key: i for i, key in enumerate(order)}
    ids = sorted(rows, key=lambda key: position.get(key, len(position)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_encode([HEADER, *((key, rows[key]) for key in ids)]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    _fsync_folder(out.parent)
    for part in part_paths(out):
        part.unlink()
    return len(ids)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
