"""Hostile input: 170 malformed, awkward or malicious image files (tests/malformed.py) through the
image opener, the engine and the predict/evaluate command lines. Every file gets a result or
an ImageError that names it; nothing crashes, hangs or allocates without bound; valid photos in
the same folder are still scored."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_CLASSES, make_dataset
from malformed import EITHER, OK, REFUSED, Case, generate

# Generous: the whole probe takes a few seconds; only a hang gets near this.
PROBE_TIMEOUT_S = 120
CLI_TIMEOUT_S = 300
# The largest legal image (just under 50 MP) costs ~250 MB to decode and convert; a bomb that got
# through would cost gigabytes.
PEAK_RSS_GROWTH_LIMIT_MB = 600


@pytest.fixture(scope="module")
def malformed(tmp_path_factory) -> tuple[Path, list[Case]]:
    folder = tmp_path_factory.mktemp("malformed")
    return folder, generate(folder)


@pytest.fixture(scope="module")
def special(tmp_path_factory) -> Path:
    """Entries that are not regular files: reading a device or a FIFO would never end."""
    folder = tmp_path_factory.mktemp("special")
    (folder / "folder.jpg").mkdir()
    (folder / "broken_link.jpg").symlink_to(folder / "missing.jpg")
    (folder / "dev_zero.jpg").symlink_to("/dev/zero")
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo.jpg")
    return folder


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def probe(malformed, special, tmp_path_factory) -> dict:
    """open_rgb on every file, in a child process (a hang becomes a timeout; memory is its own)."""
    folder, _ = malformed
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    subprocess.run([sys.executable, str(ROOT / "tests" / "malformed.py"), str(folder), "--probe", str(special),
                    "--json", str(out)], check=True, timeout=PROBE_TIMEOUT_S, env=_env(), cwd=ROOT)
    report = json.loads(out.read_text())
    print(f"\nopen_rgb probe: peak RSS {report['peak_rss_mb']} MB (baseline {report['baseline_rss_mb']} MB), "
          f"slowest {max(r['path']['seconds'] for r in report['results'].values()):.2f} s")
    return report


def test_at_least_100_malformed_files(malformed):
    folder, cases = malformed
    assert len(cases) >= 100
    assert len({Path(c.name).stem for c in cases}) == len(cases), "stems must be unique (predict names rows by stem)"
    assert {c.expect for c in cases} == {OK, REFUSED, EITHER}
    kinds = {c.kind for c in cases}
    for kind in ("empty", "random-bytes", "truncated-jpeg", "truncated-png", "huge-dimensions",
                 "decompression-bomb", "animated", "renamed-non-image", "exif-orientation", "colour-mode"):
        assert kind in kinds
    assert sum(1 for p in folder.iterdir()) == len(cases)


def test_open_rgb_answers_every_file(malformed, probe):
    _, cases = malformed
    problems = []
    for case in cases:
        for source, got in probe["results"][case.name].items():
            where = f"{case.name} ({source})"
            if got["outcome"] == "crash":
                problems.append(f"{where}: raised {got['message']}")
            elif case.expect == OK:
                if got["outcome"] != OK:
                    problems.append(f"{where}: refused a valid image: {got.get('message')}")
                elif tuple(got["size"]) != case.size or got["mode"] != "RGB":
                    problems.append(f"{where}: {got['mode']} {got['size']}, expected RGB {case.size}")
                elif case.red_corner and not got["red_corner"]:
                    problems.append(f"{where}: EXIF orientation not applied (red corner not top-left)")
            elif case.expect == REFUSED and got["outcome"] != REFUSED:
                problems.append(f"{where}: accepted a file that must be refused ({got.get('size')})")
            if got["outcome"] == REFUSED:
                name = case.name if source == "path" else "upload"
                if name not in got["message"] or len(got["message"]) < len(name) + 15:
                    problems.append(f"{where}: message does not name the file or say why: {got['message']!r}")
    assert not problems, "\n".join(problems)


def test_open_rgb_refuses_entries_that_are_not_files(special, probe):
    for entry in special.iterdir():
        got = probe["results"][entry.name]["path"]
        assert got["outcome"] == REFUSED, (entry.name, got)
        assert entry.name in got["message"] and ("not a regular file" in got["message"] or "no such file" in got["message"])


def test_open_rgb_memory_is_bounded_and_no_file_stays_open(probe):
    assert probe["peak_rss_mb"] - probe["baseline_rss_mb"] < PEAK_RSS_GROWTH_LIMIT_MB, probe["peak_rss_mb"]
    assert probe["fds_after"] <= probe["fds_before"]


def test_the_engine_answers_every_file(malformed, probe, untrained_lite_set):
    """Every file through the engine the app uses: a full result (all models, explanations
    drawable at the photo's odd size) or an ImageError, never anything else."""
    from birdfg.checkpoints import load_set
    from birdfg.inference import Engine
    from birdfg.images import ImageError

    folder, cases = malformed
    engine = Engine(load_set(untrained_lite_set))
    answered, refused = 0, 0
    for case in cases:
        path = folder / case.name
        expected = probe["results"][case.name]["path"]["outcome"]
        try:
            result = engine.compare(path)
        except ImageError as exc:
            assert expected == REFUSED, f"{case.name}: open_rgb accepted it, compare refused it: {exc}"
            assert case.name in str(exc)
            refused += 1
            continue
        assert expected == OK, f"{case.name}: open_rgb refused it, compare accepted it"
        payload = json.loads(json.dumps(result.to_json()))
        assert set(payload["models"]) == {"cnn", "vit", "bcnn"}
        for key, entry in payload["models"].items():
            assert "error" not in entry, f"{case.name}: {key} failed: {entry['error']}"
            assert len(entry["top5"]) == len(TINY_CLASSES)
            assert abs(sum(p for _, p in entry["top5"]) - 1) < 1e-3
            assert engine.overlay(result, key).size == result.photo.size
        assert np.isfinite(result.ensemble_probs).all()
        answered += 1
    print(f"\ncompare: {answered} answered, {refused} refused, {len(cases)} files")
    assert answered + refused == len(cases)


@pytest.fixture(scope="module")
def hostile_dataset(malformed, special, tmp_path_factory) -> Path:
    """The tiny dataset (6 val photos, 3 test photos) with every malformed file dropped into the
    val class folders (round robin) and into test_images, plus entries that are not files."""
    folder, cases = malformed
    root = make_dataset(tmp_path_factory.mktemp("hostile_ds"), train_per_class=1, val_per_class=2, test=3)
    test_dir = root / "test_images" / "mistery_category"
    for i, case in enumerate(cases):
        shutil.copyfile(folder / case.name, root / "val_images" / TINY_CLASSES[i % 3] / case.name)
        shutil.copyfile(folder / case.name, test_dir / case.name)
    for target in (root / "val_images" / TINY_CLASSES[0], test_dir):
        for entry in special.iterdir():
            link = target / entry.name
            if entry.is_symlink():
                link.symlink_to(os.readlink(entry))
            elif entry.is_dir():
                link.mkdir()
            elif hasattr(os, "mkfifo"):
                os.mkfifo(link)
    return root


def test_predict_and_evaluate_skip_bad_files_and_score_the_rest(hostile_dataset, malformed, probe,
                                                                untrained_lite_set, tmp_path):
    _, cases = malformed
    readable = {c.name for c in cases if probe["results"][c.name]["path"]["outcome"] == OK}
    unreadable = {c.name for c in cases} - readable
    kaggle, report = tmp_path / "kaggle.csv", tmp_path / "eval.json"
    commands = {
        "predict": [sys.executable, "-m", "birdfg.predict", "--data", str(hostile_dataset),
                    "--checkpoints", str(untrained_lite_set), "--out", str(kaggle)],
        "evaluate": [sys.executable, "-m", "birdfg.evaluate", "--data", str(hostile_dataset),
                     "--checkpoints", str(untrained_lite_set), "--json", str(report), "--no-save"],
    }
    # Both at once: two cores, and each spends most of its time starting up.
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                    cwd=ROOT) for name, cmd in commands.items()}
    logs = {}
    for name, proc in procs.items():
        logs[name], _ = proc.communicate(timeout=CLI_TIMEOUT_S)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name][-3000:]}"

    # predict: one row per readable photo (3 valid + the readable odd ones); every other file named.
    with open(kaggle, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Id", "Category"]
    ids = {r[0] for r in rows[1:]}
    assert ids == {f"test{i:03d}" for i in range(3)} | {Path(n).stem for n in readable}
    assert all(0 <= int(r[1]) < len(TINY_CLASSES) for r in rows[1:])
    assert f"skipped {len(unreadable)} unreadable file(s)" in logs["predict"]
    missing = [n for n in unreadable if n not in logs["predict"]]
    assert not missing, f"predict did not name these skipped files: {missing}"

    # evaluate: the 6 valid val photos and the readable odd ones are scored; the rest are named.
    result = json.loads(report.read_text())
    for key in ("cnn", "vit", "bcnn", "ensemble"):
        assert result[key]["total"] == 6 + len(readable), (key, result[key]["total"])
    assert {Path(p).name for p in result["_skipped"]} == unreadable
    missing = [n for n in unreadable if n not in logs["evaluate"]]
    assert not missing, f"evaluate did not name these skipped files: {missing}"
    print(f"\npredict: {len(rows) - 1} rows, {len(unreadable)} skipped; evaluate: total {result['cnn']['total']}")
