"""`python -m birdfg.predict` on folders larger than one run: rows on disk after every batch, a
killed run resumed, the photos shared out over DDP ranks (two CPU processes, gloo), one merged
CSV. The command-line runs use the shipped lite set."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHIPPED_LITE, synthetic_photo

from birdfg import predictions_csv
from birdfg.data import DatasetError
from birdfg.predict import PhotoFiles, collate, scan

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 60  # enough batches that a kill lands mid-run
# Not photos, one on each rank's share (the folder's sorted order is dealt out in turn).
UNREADABLE = ["garden/truncated.jpg", "lake/broken.jpg"]
FILES = PHOTOS + len(UNREADABLE)
CLI_TIMEOUT_S = 600


# --- the CSV file on its own -------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_half_written_last_record_is_ignored_then_cut_off(tmp_path):
    path = _write(tmp_path / "out.csv", b"Id,Category\r\na,1\r\nb,2\r\nc,1")  # killed while writing "c,17"
    assert predictions_csv.read(path) == {"a": "1", "b": "2"}
    appender = predictions_csv.Appender(path)
    appender.write([("c", 17), ("d", 3)])
    appender.close()
    assert path.read_bytes() == b"Id,Category\r\na,1\r\nb,2\r\nc,17\r\nd,3\r\n"


def test_the_header_is_written_once(tmp_path):
    path = tmp_path / "sub" / "out.csv"
    for rows in ([("a", 1)], [("b", 2)]):
        appender = predictions_csv.Appender(path)
        appender.write(rows)
        appender.close()
    assert path.read_bytes() == b"Id,Category\r\na,1\r\nb,2\r\n"
    _write(path, b"Id,Cat")  # killed while writing the header
    predictions_csv.Appender(path).close()
    assert path.read_bytes() == b"Id,Category\r\n"


def test_odd_file_names_round_trip_and_a_cut_inside_quotes_is_not_a_record(tmp_path):
    names = ['comma, "quoted"', "new\nline", "ünïcödé 鳥", "raw\udcff byte"]
    path = tmp_path / "out.csv"
    appender = predictions_csv.Appender(path)
    appender.write([(name, i) for i, name in enumerate(names)])
    appender.close()
    assert predictions_csv.read(path) == {name: str(i) for i, name in enumerate(names)}
    # Killed inside a quoted name, just after its newline: the line end is not a record's end.
    data = path.read_bytes() + '"half\nway'.encode()
    assert predictions_csv.read(_write(path, data)) == {name: str(i) for i, name in enumerate(names)}


def test_a_file_that_is_not_a_predictions_csv_is_refused(tmp_path):
    path = _write(tmp_path / "notes.csv", b"name,age\r\nbob,3\r\n")
    with pytest.raises(predictions_csv.PredictionsFileError, match="pass another --out"):
        predictions_csv.read(path)
    with pytest.raises(predictions_csv.PredictionsFileError, match="record 3"):
        predictions_csv.read(_write(path, b"Id,Category\r\na,1\r\nb\r\n"))
    with pytest.raises(predictions_csv.PredictionsFileError, match="not a file"):
        predictions_csv.read(tmp_path)


def test_merge_keeps_each_id_once_in_the_folders_order_and_removes_the_parts(tmp_path):
    out = _write(tmp_path / "out.csv", b"Id,Category\r\nc,3\r\nkept,0\r\na,1\r\n")
    _write(predictions_csv.part_path(out, 1), b"Id,Category\r\nb,2\r\na,1\r\nd,")
    _write(predictions_csv.part_path(out, 3), b"Id,Category\r\ne,5\r\n")
    _write(tmp_path / "out.csv.partial", b"not a part")
    assert predictions_csv.merge(out, ["a", "b", "c", "d", "e"]) == 5
    assert out.read_bytes() == b"Id,Category\r\na,1\r\nb,2\r\nc,3\r\ne,5\r\nkept,0\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "out.csv.partial"]


# --- which photos a run predicts ---------------------------------------------------------------------------


def make_photos(root: Path, count: int = PHOTOS) -> Path:
    """`count` small JPEGs in two sub-folders, and the UNREADABLE files."""
    for i in range(count):
        folder = root / ("garden" if i % 2 else "lake")
        folder.mkdir(parents=True, exist_ok=True)
        synthetic_photo(i % 3, 300 + i, (128, 96)).save(folder / f"photo{i:03d}.jpg", quality=85)
    truncated, broken = (root / name for name in UNREADABLE)
    truncated.write_bytes((root / "garden" / "photo001.jpg").read_bytes()[:300])
    broken.write_bytes(b"not a photo")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("survey"))


def expected_ids(count: int = PHOTOS) -> list[str]:
    return sorted(f"photo{i:03d}" for i in range(count))


def test_a_rerun_predicts_only_what_the_csv_and_its_parts_lack(photos, tmp_path):
    out = _write(tmp_path / "out.csv", b"Id,Category\r\nphoto000,1\r\nphoto001,2\r\nphoto002,")
    _write(predictions_csv.part_path(out, 1), b"Id,Category\r\nphoto003,0\r\n")
    found = scan(photos, out)
    assert len(found.paths) == FILES and set(found.done) == {"photo000", "photo001", "photo003"}
    assert sorted(p.stem for p in found.pending) == ["broken"] + [i for i in expected_ids() if i not in found.done] + [
        "truncated"]
    # A dataset folder: its test_images/ only.
    (tmp_path / "ds" / "train_images" / "001.A").mkdir(parents=True)
    synthetic_photo(0, 1).save(tmp_path / "ds" / "train_images" / "001.A" / "train.jpg")
    (tmp_path / "ds" / "test_images" / "x").mkdir(parents=True)
    synthetic_photo(0, 2).save(tmp_path / "ds" / "test_images" / "x" / "test.jpg")
    assert [p.name for p in scan(tmp_path / "ds", tmp_path / "none.csv").paths] == ["test.jpg"]


def test_two_photos_with_one_id_are_refused_with_what_to_do(tmp_path):
    for folder in ("card1", "card2"):
        (tmp_path / folder).mkdir()
        synthetic_photo(0, 1).save(tmp_path / folder / "IMG_0001.jpg")
    with pytest.raises(DatasetError, match=r"IMG_0001.jpg and .*card2/IMG_0001.jpg.*rename"):
        scan(tmp_path, tmp_path / "out.csv")
    with pytest.raises(DatasetError, match="no such folder"):
        scan(tmp_path / "missing", tmp_path / "out.csv")


def test_photos_are_decoded_per_item_and_unreadable_ones_become_messages(photos):
    paths = [photos / "lake" / "photo000.jpg", photos / "lake" / "broken.jpg"]
    batch = collate([PhotoFiles(paths)[i] for i in range(2)])
    assert batch.paths == paths[:1] and batch.photos[0].mode == "RGB"
    assert len(batch.problems) == 1 and "broken.jpg" in batch.problems[0]


# --- the command line: DDP, kill, resume ----------------------------------------------------------------------


def predict_command(photos: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "birdfg.predict", "--data", str(photos), "--checkpoints", str(SHIPPED_LITE),
            "--out", str(out), "--accelerator", "cpu", "--batch-size", "4", *extra]


DDP = ("--devices", "2", "--strategy", "ddp")


def run_predict(photos: Path, out: Path, *extra: str) -> str:
    result = subprocess.run(predict_command(photos, out, *extra), cwd=ROOT, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def rows_of(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def per_rank(log: str) -> dict[int, int]:
    """Photos predicted by each rank, from the line each rank logs at its end."""
    return {int(rank): int(n) for rank, n in re.findall(r"rank (\d+) of \d+: (\d+) photo\(s\) predicted", log)}


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> tuple[bytes, str]:
    """An uninterrupted two-rank run: its CSV and its log."""
    out = tmp_path_factory.mktemp("reference") / "survey.csv"
    log = run_predict(photos, out, *DDP)
    return out.read_bytes(), log


@pytest.mark.slow
def test_two_ranks_predict_every_photo_once(reference, tmp_path):
    data, log = reference
    out = _write(tmp_path / "survey.csv", data)
    rows = rows_of(out)
    assert rows[0] == ["Id", "Category"] and all(r != ["Id", "Category"] for r in rows[1:])
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == len(set(ids)) and sorted(ids) == expected_ids(), "every photo once, none twice"
    assert all(0 <= int(r[1]) < 20 for r in rows[1:])
    counts = per_rank(log)
    assert sorted(counts) == [0, 1] and sum(counts.values()) == PHOTOS, counts
    assert abs(counts[0] - counts[1]) <= 1, f"the ranks did not share the photos out: {counts}"
    assert f"skipped {len(UNREADABLE)} unreadable file(s)" in log, "every rank's unreadable files count"
    assert all(name in log for name in UNREADABLE)
    assert not predictions_csv.part_paths(out.parent / "survey.csv") and "photo/s" in log


def _whole_rows(out: Path) -> int:
    try:
        return len(predictions_csv.collect(out))
    except (OSError, predictions_csv.PredictionsFileError):
        return 0


def _living_members(pgid: int) -> list[str]:
    """Processes of group `pgid` that are not zombies (a container's init may never reap those)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            alive.append(stat.parent.name)
    return alive


def _wait_for_group_to_die(pgid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (alive := _living_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes {alive} of group {pgid} outlived SIGKILL"


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_same_csv(photos, reference, tmp_path):
    out = tmp_path / "survey.csv"
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen(predict_command(photos, out, *DDP), cwd=ROOT, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + CLI_TIMEOUT_S
            while _whole_rows(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # every rank and DataLoader worker: one process group
            proc.wait()
    _wait_for_group_to_die(proc.pid)
    kept = predictions_csv.collect(out)
    assert 0 < len(kept) < PHOTOS, f"the kill did not land mid-run ({len(kept)} rows):\n" + \
        (tmp_path / "killed.log").read_text()[-3000:]
    print(f"\nkilled with {len(kept)} of {PHOTOS} rows on disk")
    # A kill inside a write leaves a half record; make one (it would be a wrong row if read).
    reference_rows = dict(r for r in rows_of(_write(tmp_path / "ref.csv", reference[0]))[1:])
    missing = next(i for i in expected_ids() if i not in kept)
    with open(out, "ab") as f:
        f.write(f"{missing},{(int(reference_rows[missing]) + 1) % 20}".encode())

    log = run_predict(photos, out, *DDP)
    assert f"already holds {len(kept)} of the {FILES} photos" in log, log[-3000:]
    assert sum(per_rank(log).values()) == PHOTOS - len(kept), "the resumed run predicted photos it had"
    assert out.read_bytes() == reference[0], "the resumed CSV differs from an uninterrupted run's"
    assert not predictions_csv.part_paths(out)


@pytest.mark.slow
def test_one_process_resumes_from_the_part_files_of_a_two_rank_run(photos, reference, tmp_path):
    """The rows of a killed run may sit in --out and in part files of any number of ranks, each
    with a half-written last record; one process finishes the job, to the same CSV."""
    rows = rows_of(_write(tmp_path / "ref.csv", reference[0]))[1:]
    out = tmp_path / "survey.csv"

    def lines(chosen: list[list[str]], cut: str) -> bytes:
        return ("Id,Category\r\n" + "".join(f"{i},{c}\r\n" for i, c in chosen) + cut).encode()

    # Half records of photos still to predict: read as rows, they would be wrong ones.
    _write(out, lines(rows[0:20:3], f"{rows[20][0]},{(int(rows[20][1]) + 1) % 20}"))
    _write(predictions_csv.part_path(out, 1), lines(rows[1:20:3], f'"{rows[21][0]}'))
    _write(predictions_csv.part_path(out, 2), lines(rows[2:20:3], ""))
    log = run_predict(photos, out, "--devices", "1")
    assert f"already holds 20 of the {FILES} photos" in log and per_rank(log) == {0: PHOTOS - 20}, log[-3000:]
    assert out.read_bytes() == reference[0]
    assert not predictions_csv.part_paths(out)
    again = run_predict(photos, out)
    # The unreadable files are tried again (they may have been copied in half-way).
    assert f"already holds {PHOTOS} of the {FILES} photos: predicting the other {len(UNREADABLE)}" in again
    assert out.read_bytes() == reference[0]
