"""The Space (`python -m birdfg.space`): which files it gets, what the dry run checks, what the
upload sends, and, for real, that those files alone install into a fresh venv and answer `/compare`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import app_server
from conftest import ROOT, SHIPPED_LITE
from test_app import check_answer, compare

SPACE_README = """---
sdk: gradio
sdk_version: 6.31.0
app_file: app.py
---
# a Space
"""


def touch(path: Path, text: str = "", size: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if size:
        os.truncate(path, size)
    return path


def fake_repository(root: Path) -> Path:
    """A repository laid out like this one, with everything a Space must not get beside what it needs."""
    touch(root / "app.py", "print('app')\n")
    touch(root / "README.md", SPACE_README)
    touch(root / "requirements.txt", "gradio[mcp]==6.31.0\n")
    touch(root / "pyproject.toml")
    touch(root / "train.py")
    touch(root / "birdfg" / "__init__.py")
    touch(root / "birdfg" / "app" / "ui.py")
    touch(root / "birdfg" / "splits" / "val_ids.csv", "id\n1\n")  # package data travels too
    touch(root / "birdfg" / "__pycache__" / "ui.cpython-311.pyc")
    touch(root / "birdfg" / "app" / "ui.pyc")
    for key in ("cnn", "vit", "bcnn"):
        touch(root / "checkpoints" / "lite" / f"{key}.safetensors", size=100)
        touch(root / "checkpoints" / "other" / f"{key}.safetensors", size=100)
    touch(root / "checkpoints" / "lite" / "report" / "evaluation_val.json", "{}")
    touch(root / "checkpoints" / "lite" / ".onnx" / "cnn-vit-bcnn-320px-0123.onnx")
    touch(root / "checkpoints" / "lite" / "last.ckpt")
    touch(root / "checkpoints" / ".runs" / "features.safetensors")
    touch(root / "examples" / "bird.jpg", "jpeg")
    touch(root / "examples" / "CREDITS.csv", "file,species,author,licence,original,changes\n"
                                             "bird.jpg,A Bird,Someone,CC BY 4.0,https://example.org/bird,none\n")
    touch(root / "tests" / "test_app.py")
    touch(root / "benchmarks" / "results" / "bench.json")
    touch(root / ".venv" / "bin" / "python")
    return root


def test_the_space_gets_what_the_app_needs_and_nothing_else(tmp_path):
    from birdfg.space import space_files

    root = fake_repository(tmp_path)
    assert [f.path for f in space_files(root)] == [
        "README.md", "app.py", "birdfg/__init__.py", "birdfg/app/ui.py", "birdfg/splits/val_ids.csv",
        "checkpoints/lite/bcnn.safetensors", "checkpoints/lite/cnn.safetensors",
        "checkpoints/lite/report/evaluation_val.json", "checkpoints/lite/vit.safetensors",
        "examples/CREDITS.csv", "examples/bird.jpg", "requirements.txt"]
    touch(root / "LICENSE", "Apache-2.0")
    chosen = [f.path for f in space_files(root, "other")]
    assert "LICENSE" in chosen and "checkpoints/other/cnn.safetensors" in chosen
    assert not any(p.startswith("checkpoints/lite/") for p in chosen)


def test_the_dry_run_checks_sizes_versions_and_credits(tmp_path):
    from birdfg.space import check, space_files

    root = fake_repository(tmp_path)
    assert check(space_files(root), root) == []
    touch(root / "checkpoints" / "lite" / "vit.safetensors", size=50_000_000)  # a large file: allowed
    touch(root / "birdfg" / "blob.bin", size=10_000_001)
    touch(root / "examples" / "cub_photo.jpg", "jpeg")
    (root / "requirements.txt").write_text("gradio==6.32.0\n")
    problems = check(space_files(root), root)
    assert len(problems) == 3, problems
    assert problems[0].startswith("birdfg/blob.bin is 10.0 MB: the Hub takes plain files up to 10 MB")
    assert "sdk_version (6.31.0) differs from requirements.txt's gradio pin (6.32.0)" in problems[1]
    assert problems[2].startswith("examples/cub_photo.jpg has no row in examples/CREDITS.csv")


def test_this_repository_is_ready_for_a_space():
    from birdfg.space import SHORT_DESCRIPTION_MAX, check, front_matter, gradio_pin, space_files

    meta = front_matter(ROOT / "README.md")
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio_pin(ROOT / "requirements.txt")
    assert meta["suggested_hardware"] == "cpu-basic" and meta["python_version"].startswith("3.")
    assert 0 < len(meta["short_description"]) <= SHORT_DESCRIPTION_MAX
    files = space_files(ROOT, "lite")
    assert check(files, ROOT) == []
    paths = [f.path for f in files]
    assert not any(p.startswith(("tests/", "benchmarks/")) or "__pycache__" in p or "/.onnx/" in p for p in paths)


def test_the_upload_sends_exactly_the_listed_files(tmp_path):
    from birdfg.space import deploy, space_files

    class FakeHub:  # records what HfApi would be asked
        def create_repo(self, repo_id, **kwargs):
            self.created = (repo_id, kwargs)
            return repo_id

        def upload_folder(self, *, folder_path, **kwargs):
            self.uploaded = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*")
                                   if p.is_file())
            self.upload_kwargs = kwargs

    root = fake_repository(tmp_path / "repo")
    files = space_files(root)
    hub = FakeHub()
    assert deploy("someone/birdfg", files, root, private=True, api=hub) == "https://huggingface.co/spaces/someone/birdfg"
    assert hub.created == ("someone/birdfg", {"repo_type": "space", "space_sdk": "gradio", "private": True,
                                              "exist_ok": True})
    assert hub.uploaded == [f.path for f in files]
    assert hub.upload_kwargs["repo_type"] == "space" and hub.upload_kwargs["delete_patterns"] == "*"


def test_without_a_token_the_upload_says_how_to_log_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(tmp_path)  # no stored token there
    done = subprocess.run([sys.executable, "-m", "birdfg.space", "--repo", "someone/birdfg"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error: no Hugging Face token: run `hf auth login`" in done.stderr and "HF_TOKEN" in done.stderr


@pytest.fixture
def fresh_venv(tmp_path) -> Iterator[Path]:
    """A fresh venv's python. The venv is removed afterwards, whatever the outcome: it is gigabytes
    (torch and its CUDA wheels), and the test's log and assertion tell a failure."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    yield venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a fresh venv installs torch and its CUDA wheels from this machine's disk
def test_the_space_files_alone_install_and_answer(fresh_venv, tmp_path):
    """As a Space does: the dry run's files in a fresh folder, `pip install -r requirements.txt`
    into a fresh venv, `python app.py` on 0.0.0.0, then `/compare` on an example photo."""
    from gradio_client import Client

    from birdfg.space import check, space_files, stage

    if not all((SHIPPED_LITE / f"{k}.safetensors").exists() for k in ("cnn", "vit", "bcnn")):
        pytest.skip("checkpoints/lite is not complete: there is no set to deploy")
    files = space_files(ROOT, "lite")
    assert check(files, ROOT) == []
    space = stage(files, tmp_path / "space")
    timings = {}
    start = time.monotonic()
    install = subprocess.run([str(fresh_venv), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                              "requirements.txt"], cwd=space, capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    timings["pip install -r requirements.txt"] = time.monotonic() - start

    port = app_server.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "GRADIO_"))}
    env |= {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "space.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(fresh_venv), "app.py"], cwd=space, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + app_server.START_TIMEOUT_S
        while not app_server.is_alive(url):
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer on {url}:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        client = Client(url, verbose=False)
        answer, *overlays = compare(client, space / "examples" / "american_crow__1.jpg")
        timings["python app.py to the first /compare answer"] = time.monotonic() - start
        check_answer(answer)
        assert all(Path(p).is_file() for p in overlays)
        # It served the Space's own copy of the set (the venv has no birdfg: the code is the copy's too).
        assert f"`{space / 'checkpoints' / 'lite'}`" in _status(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    for step, seconds in timings.items():
        print(f"{step}: {seconds:.0f} s")


def _status(url: str) -> str:
    """The status line of the page (it names the set folder the app serves)."""
    import json
    import urllib.request

    with urllib.request.urlopen(url + "config", timeout=10) as response:
        config = json.load(response)
    return next(c["props"]["value"] for c in config["components"] if c.get("props", {}).get("elem_id") == "status")
