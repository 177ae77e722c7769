"""The app's process: model work handed to one worker thread, OpenMP and malloc settings applied
before torch loads, and the heap trimmed only once RSS has grown."""
from __future__ import annotations

import operator
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from birdfg import memory, process
from birdfg.app.worker import TorchThread


def test_growth_guard_trims_only_past_the_first_requests_rss():
    guard = memory.GrowthGuard(growth=10.0)
    assert memory.rss_bytes() > 0
    assert not guard.check()  # the first request sets the baseline
    assert not guard.check()
    guard.growth = -1.0  # any RSS is now "grown"
    assert guard.check()


def test_torch_thread_runs_other_threads_work_on_the_main_thread():
    runner = TorchThread()
    main = threading.get_ident()
    seen = []

    def request_thread():
        seen.append(runner.call(threading.get_ident))
        try:
            runner.call(operator.truediv, 1, 0)
        except ZeroDivisionError:
            seen.append("raised here")
        runner.stop()

    runner.serve_forever(start=threading.Thread(target=request_thread).start, poll_s=0.05)
    assert seen == [main, "raised here"]
    assert not runner.serving
    elsewhere = []  # not serving: a call runs where it is made
    thread = threading.Thread(target=lambda: elsewhere.append(runner.call(threading.get_ident)))
    thread.start()
    thread.join()
    assert elsewhere == [thread.ident]


def test_process_settings_reach_openmp_before_torch_loads():
    code = ("from birdfg import process; process.configure(); import os, torch; "
            "print(os.environ['GOMP_SPINCOUNT'], torch.get_num_threads() >= 1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "GOMP_SPINCOUNT": ""})
    assert out.stdout.split() == [str(process.GOMP_SPIN_COUNT), "True"], out.stderr
    assert "imported before" not in out.stderr


def serve_head_start(demo, head, runner: TorchThread, visitor) -> None:
    """Serve `demo` behind the head start's UploadWatch and run `visitor(url)` on a thread of its
    own while this thread serves the model work; then close the server."""
    from starlette.middleware import Middleware

    from birdfg.app.head_start import UploadWatch

    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                            app_kwargs={"middleware": [Middleware(UploadWatch, on_upload=head.uploaded)]})

    def visit():
        try:
            visitor(url)
        finally:
            runner.stop()

    try:
        runner.serve_forever(start=threading.Thread(target=visit).start, poll_s=0.05)
    finally:
        demo.close()


def test_an_uploaded_photo_is_prepared_before_its_event_asks(tmp_path):
    """The head start (birdfg/app/head_start.py) in a real Gradio server: gradio_client uploads a
    photo, the upload route's answer starts `prepare` on the model thread, and the event that asks
    for the photo takes what it made; another set's event, and a file that is no photo, get nothing."""
    import gradio as gr
    from gradio_client import Client, handle_file
    from PIL import Image
    from birdfg.app.head_start import HeadStart

    runner = TorchThread()
    head = HeadStart(lambda: "lite", worker=runner)
    head.prepare = lambda set_name, path: f"{set_name}:{Path(path).stat().st_size}:{threading.get_ident()}"
    photo = tmp_path / "bird.jpg"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(photo)
    (tmp_path / "notes.txt").write_text("not a photo")

    def asked(file: str, set_name: str) -> str:
        return str(runner.call(head.take, set_name, file))

    with gr.Blocks() as demo:
        file, set_name, answer = gr.File(type="filepath"), gr.Textbox(), gr.Textbox()
        gr.Button().click(asked, [file, set_name], answer, api_name="asked")
    answers = []

    def visitor(url: str):
        client = Client(url, verbose=False)
        answers.append(client.predict(handle_file(str(photo)), "lite", api_name="/asked"))
        answers.append(client.predict(handle_file(str(photo)), "other", api_name="/asked"))
        answers.append(client.predict(handle_file(str(tmp_path / "notes.txt")), "lite", api_name="/asked"))

    serve_head_start(demo, head, runner, visitor)
    assert answers[0] == f"lite:{photo.stat().st_size}:{threading.get_ident()}"  # made on the model thread
    assert answers[1:] == ["None", "None"]


def test_the_page_gets_a_photos_head_start_by_its_digest(tmp_path):
    """`HeadStart.finished` behind a real Gradio server, called as maps.js calls it (a gr.HTML
    server function over HTTP): asked before the photo has landed, it waits for the upload and
    answers with what `prepare` made for it; asked again, at once; for another set, for a
    digest no upload has, or for a name that is no SHA-256, nothing. Two pages may wait at once
    here: a third is answered at once."""
    import hashlib
    import json
    import urllib.request

    import gradio as gr
    from PIL import Image
    from birdfg.app.head_start import HeadStart

    runner = TorchThread()
    head = HeadStart(lambda: "lite", worker=runner, max_waiting=2)
    head.prepare = lambda set_name, path: f"{set_name}:{Path(path).name}"
    photo = tmp_path / "bird.png"
    Image.new("RGB", (64, 48), (30, 160, 90)).save(photo)
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")

    async def first(asked: list) -> str | None:
        found_digest, set_name, *wait_s = asked
        return await head.finished(found_digest, set_name, wait_s=wait_s[0] if wait_s else 3)

    with gr.Blocks() as demo:
        html = gr.HTML("", server_functions=[first])

    def call(url: str, asked: list, timeout: float = 30):
        body = json.dumps({"data": asked, "fn_name": "first", "component_id": html._id, "session_hash": "t"})
        request = urllib.request.Request(f"{url}gradio_api/component_server/", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())

    def upload(url: str, file: Path = photo) -> str:
        boundary = "birdfgtest"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{file.name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + file.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{url}gradio_api/upload", body,
                                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())[0]

    answers = {}

    def visitor(url: str):
        early = threading.Thread(target=lambda: answers.update(early=call(url, [digest, "lite"])))
        early.start()  # asks before the upload
        answers["path"] = upload(url)
        early.join()
        answers["again"] = call(url, [digest, "lite"])
        answers["other set"] = call(url, [digest, "other"])
        answers["unknown"] = call(url, ["0" * 64, "lite"])
        upload(url, notes)  # asked with a wait longer than the client's: only an answer at once passes
        answers["no photo"] = call(url, [hashlib.sha256(notes.read_bytes()).hexdigest(), "lite", 60], timeout=20)
        answers["no digest"] = call(url, ["", "lite", 60], timeout=20)  # no upload can have that name
        waiting = [threading.Thread(target=call, args=(url, [f"{i}" * 64, "lite", 5])) for i in (1, 2)]
        for page in waiting:
            page.start()
        while head.waiting < 2:
            time.sleep(0.02)
        answers["third waiting"] = call(url, ["3" * 64, "lite", 60], timeout=20)  # else a timeout error
        for page in waiting:
            page.join()

    serve_head_start(demo, head, runner, visitor)
    made = f"lite:{Path(answers['path']).name}"
    assert answers["early"] == made
    assert answers["again"] == made
    assert answers["other set"] is None and answers["unknown"] is None and answers["no photo"] is None
    assert answers["no digest"] is None
    assert answers["third waiting"] is None
