"""Every malformed file of tests/malformed.py through the running app's `/compare` API (the real
`python app.py` on localhost, the one server the app tests share): each gets the JSON answer
or `{"error": ...}` with a clear message, an upload over the size limit is turned away, and the
server stays up and keeps answering real photos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import app_server
from conftest import SHARED_DATA
from malformed import OK, generate

KEYS = {"cnn", "vit", "bcnn"}


@pytest.fixture(scope="module")
def server(app_checkpoints, pytestconfig, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("hostile_app")
    return app_server.app_url(app_checkpoints, app_server.example_folder(SHARED_DATA, tmp), pytestconfig, tmp)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def _compare(client, path: Path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/compare")


def test_every_malformed_file_gets_an_answer_and_the_server_stays_up(client, server, tmp_path, sample_photo):
    from birdfg.images import ImageError, open_rgb

    cases = generate(tmp_path)
    problems, answered, refused = [], 0, 0
    for case in cases:
        path = tmp_path / case.name
        try:
            open_rgb(path)
            readable = True
        except ImageError:
            readable = False
        try:
            answer, *overlays = _compare(client, path)
        except Exception as exc:  # noqa: BLE001 - collect every failure, then report them all
            problems.append(f"{case.name}: the API call failed: {type(exc).__name__}: {exc}")
            continue
        if readable:
            if set(answer) != {"models", "ensemble", "agree"} or set(answer["models"]) != KEYS:
                problems.append(f"{case.name}: no result for a readable image: {answer}")
            elif any("error" in m or not m["top5"] for m in answer["models"].values()):
                problems.append(f"{case.name}: a model failed: {answer['models']}")
            elif not all(p and Path(p).is_file() for p in overlays):
                problems.append(f"{case.name}: missing overlays {overlays}")
            answered += 1
        else:
            message = answer.get("error", "") if isinstance(answer, dict) else ""
            if set(answer) != {"error"} or len(message) < 20:
                problems.append(f"{case.name}: expected a clear error, got {answer}")
            elif str(tmp_path) in message or "/tmp/" in message or "gradio" in message.lower():
                problems.append(f"{case.name}: the message shows a server path: {message!r}")
            if overlays != [None, None, None]:
                problems.append(f"{case.name}: overlays for a refused file: {overlays}")
            refused += 1
    print(f"\napp /compare: {answered} answered, {refused} refused, {len(cases)} malformed files")
    assert not problems, "\n".join(problems)
    assert answered + refused == len(cases) and answered >= sum(1 for c in cases if c.expect == OK)
    assert app_server.is_alive(server)
    answer, *_ = _compare(client, sample_photo)
    assert set(answer["models"]) == KEYS and all(m["top5"] for m in answer["models"].values())


def test_an_upload_over_the_size_limit_is_turned_away(client, server, tmp_path, sample_photo):
    from birdfg.ui import MAX_FILE_SIZE

    limit = int(MAX_FILE_SIZE.lower().removesuffix("mb")) * 1024 * 1024
    big = tmp_path / "huge_upload.jpg"
    with open(big, "wb") as f:  # a valid JPEG start, then padding past the limit
        f.write(sample_photo.read_bytes())
        f.write(os.urandom(1024) * ((limit + 2 * 1024 * 1024) // 1024))
    with pytest.raises(Exception) as info:
        _compare(client, big)
    assert "size" in str(info.value).lower() or "413" in str(info.value) or "large" in str(info.value).lower(), info.value
    assert app_server.is_alive(server)
    answer, *_ = _compare(client, sample_photo)
    assert set(answer["models"]) == KEYS
