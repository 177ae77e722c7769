"""Every malformed file of tests/malformed.py through the running app's `/compare` API (the real
`python app.py` on localhost, the one server the app tests share): each gets the JSON answer
or `{"error": ...}` with a clear message, an upload over the size limit is turned away, and the
server stays up and keeps answering real photos."""
from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

import app_server
from conftest import SHARED_DATA
from malformed import OK, generate

pytestmark = pytest.mark.slow

KEYS = {"cnn", "vit", "bcnn"}
WAVE = 8  # calls in flight at once; the app's queue holds 16
CALL_TIMEOUT_S = 300  # queueing included; only a stuck server gets near it


def _compare(client, path: Path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/compare")


def test_every_malformed_file_gets_an_answer_and_the_server_stays_up(client, app_url, tmp_path, sample_photo):
    from gradio_client import handle_file

    from birdfg.images import ImageError, open_rgb

    cases = _interleaved(generate(tmp_path))
    problems, answered, refused = [], 0, 0
    # A few calls in flight at once (fewer than the queue holds): the server still runs one model
    # pass at a time, but uploads, queueing and downloads overlap.
    for start in range(0, len(cases), WAVE):
        wave = [(case, client.submit(handle_file(str(tmp_path / case.name)), api_name="/compare"))
                for case in cases[start:start + WAVE]]
        for case, job in wave:
            try:
                open_rgb(tmp_path / case.name)
                readable = True
            except ImageError:
                readable = False
            try:
                answer, *overlays = job.result(timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - collect every failure, then report them all
                problems.append(f"{case.name}: the API call failed: {type(exc).__name__}: {exc}")
                continue
            problems += _check(case.name, readable, answer, overlays, tmp_path)
            answered += readable
            refused += not readable
    print(f"\napp /compare: {answered} answered, {refused} refused, {len(cases)} malformed files")
    assert not problems, "\n".join(problems)
    assert answered + refused == len(cases) and answered >= sum(1 for c in cases if c.expect == OK)
    assert app_server.is_alive(app_url)
    answer, *_ = _compare(client, sample_photo)
    assert set(answer["models"]) == KEYS and all(m["top5"] for m in answer["models"].values())


def test_the_same_photo_from_many_clients_at_once_gets_every_map(client, app_url, sample_photo):
    """Identical requests make identical maps; each must still arrive whole (Gradio's cache once
    rewrote an identical image in place while another client was downloading it)."""
    from gradio_client import handle_file

    jobs = [client.submit(handle_file(str(sample_photo)), api_name="/compare") for _ in range(12)]
    results = [job.result(timeout=CALL_TIMEOUT_S) for job in jobs]
    problems = [p for i, (answer, *overlays) in enumerate(results)
                for p in _check(f"client {i}", True, answer, overlays, Path("."))]
    assert not problems, "\n".join(problems)
    for _, *overlays in results:
        for path in overlays:
            with Image.open(path) as image:
                image.load()  # a half-written file fails here
    top5s = {json.dumps({k: m["top5"] for k, m in answer["models"].items()}) for answer, *_ in results}
    assert len(top5s) == 1, "the same photo got different answers"


def test_uploads_and_maps_are_deleted_after_keep_files_s(app_checkpoints, pytestconfig, tmp_path, sample_photo):
    """`--keep-files-s` (here 3 s): a visitor's upload, the maps drawn for it (our copies and
    Gradio's) and batch CSVs leave the disk; files the page itself needs stay."""
    from gradio_client import Client, handle_file

    gradio_dir, temp_dir = tmp_path / "gradio", tmp_path / "tmp"
    temp_dir.mkdir()
    env = {"BIRDFG_KEEP_FILES_S": "3", "GRADIO_TEMP_DIR": str(gradio_dir), "TMPDIR": str(temp_dir)}
    url = app_server.app_url(app_checkpoints, app_server.example_folder(SHARED_DATA, tmp_path), pytestconfig,
                             tmp_path, env=env)
    client = Client(url, verbose=False)

    def files() -> set[Path]:
        # Gradio's upload parser now and then leaves an empty tmpXXXX file behind: no bytes, not ours.
        return {p for folder in (gradio_dir, temp_dir) for p in folder.rglob("*") if _size(p) > 0}

    at_start = files()
    photo = tmp_path / "visitor_photo.jpg"  # not one of the example photos, which the page keeps
    with Image.open(sample_photo) as image:
        image.save(photo, quality=80)
    answer, *overlays = client.predict(handle_file(str(photo)), api_name="/compare")
    assert set(answer["models"]) == KEYS and all(overlays)
    client.predict([handle_file(str(photo))], api_name="/batch")
    written = files() - at_start
    names = " ".join(p.name for p in written)
    assert photo.name in names and names.count("map_") >= 3 and ".csv" in names, sorted(written)
    deadline = time.monotonic() + 60
    while files() & written and time.monotonic() < deadline:
        time.sleep(1)
        client.predict(handle_file(str(sample_photo)), api_name="/compare")  # new files prune old ones
    assert not files() & written, f"still there: {sorted(files() & written)}"
    assert at_start <= files(), f"deleted files the page needs: {sorted(at_start - files())}"
    assert app_server.is_alive(url)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:  # deleted by the server while we looked
        return 0


def _interleaved(cases: list) -> list:
    by_kind: dict[str, list] = {}
    for case in cases:
        by_kind.setdefault(case.kind, []).append(case)
    return [c for group in itertools.zip_longest(*by_kind.values()) for c in group if c is not None]


def _check(name: str, readable: bool, answer, overlays: list, tmp_path: Path) -> list[str]:
    if readable:
        if not isinstance(answer, dict) or set(answer) != {"models", "ensemble", "agree"} \
                or set(answer["models"]) != KEYS:
            return [f"{name}: no result for a readable image: {answer}"]
        if any("error" in m or not m["top5"] for m in answer["models"].values()):
            return [f"{name}: a model failed: {answer['models']}"]
        if not all(p and Path(p).is_file() for p in overlays):
            return [f"{name}: missing overlays {overlays}"]
        return []
    message = answer.get("error", "") if isinstance(answer, dict) else ""
    if set(answer) != {"error"} or len(message) < 20:
        return [f"{name}: expected a clear error, got {answer}"]
    if str(tmp_path) in message or "/tmp/" in message or "gradio" in message.lower():
        return [f"{name}: the message shows a server path: {message!r}"]
    if overlays != [None, None, None]:
        return [f"{name}: overlays for a refused file: {overlays}"]
    return []


def test_an_upload_over_the_size_limit_is_turned_away(client, app_url, tmp_path, sample_photo):
    """The client is told before sending, and the server itself refuses a raw upload over the
    limit (413) without falling over."""
    import httpx

    from birdfg.app.ui import MAX_FILE_SIZE

    limit = int(MAX_FILE_SIZE.lower().removesuffix("mb")) * 1024 * 1024
    big = tmp_path / "huge_upload.jpg"
    big.write_bytes(sample_photo.read_bytes() + os.urandom(1024) * ((limit + 1024 * 1024) // 1024))
    with pytest.raises(ValueError, match="maximum file size"):
        _compare(client, big)
    with open(big, "rb") as f:
        response = httpx.post(app_url + "gradio_api/upload", files={"files": (big.name, f, "image/jpeg")}, timeout=120)
    assert response.status_code == 413, (response.status_code, response.text[:300])
    assert "size" in response.text.lower()
    assert app_server.is_alive(app_url)
    answer, *_ = _compare(client, sample_photo)
    assert set(answer["models"]) == KEYS
