"""The real app (`python app.py ...`) started once per test session on a free localhost port and
shared by test_app.py and test_browser.py (each asks through its own session fixture; the first
one starts it). It serves a folder of two sets — the app's lite set and a second name for the
same files — so the set selector has something to switch to."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600  # imports + loading the set; a two-core machine shared with training can be very slow
_running: dict[str, tuple[subprocess.Popen, str]] = {}
_logs: dict[str, Path] = {}  # each started app's URL -> its log (stdout and stderr)


def log_tail(url: str, chars: int = 6000) -> str | None:
    """The end of the log of the app serving `url`, if a test started it (for failed tests' reports)."""
    path = _logs.get(url)
    return path.read_text(errors="replace")[-chars:] if path and path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets_root(checkpoints: Path, folder: Path) -> Path:
    """`folder/lite` and `folder/lite-copy`, both the given set (symlinks, nothing copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("lite", "lite-copy"):
        link = folder / name
        if not link.exists():
            link.symlink_to(Path(checkpoints).resolve(), target_is_directory=True)
    return folder


def app_url(checkpoints: Path, examples: Path, config: pytest.Config, tmp: Path,
            env: dict[str, str] | None = None, args: list[str] | None = None) -> str:
    """Start `python app.py` once (per checkpoints folder, extra environment and extra flags) and return its URL."""
    extra_env = env or {}
    key = str((str(checkpoints), sorted(extra_env.items()), args or []))
    if key in _running:
        return _running[key][1]
    port = free_port()
    root = sets_root(checkpoints, tmp / "sets")
    log_path = tmp / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           **extra_env}
    env.pop("GRADIO_SERVER_NAME", None)  # the default (127.0.0.1) is part of what is tested
    command = [sys.executable, "app.py", "--checkpoints", str(root), "--examples", str(examples), "--port", str(port),
               *(args or [])]
    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    _logs[url] = log_path

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    config.add_cleanup(stop)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    _running[key] = (proc, url)
                    return url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"app.py did not answer on {url} within {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def is_alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def example_folder(shared_data: Path, tmp: Path) -> Path:
    """Real val photos when ../shared is present, else a few generated JPEGs."""
    if (shared_data / "val_images").is_dir():
        return shared_data / "val_images"
    from conftest import synthetic_photo

    folder = tmp / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    for label in range(3):
        synthetic_photo(label, 100 + label, (320, 240)).save(folder / f"example_{label}.jpg")
    return folder
