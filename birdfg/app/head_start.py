"""A photo's comparison starts when the photo reaches the server, not when the page asks for it.

Gradio's front end starts a photo's event only once the upload's progress stream has reported
the upload done (the server checks every 50 ms) and the page has marked the event's outputs as
loading: some 80 ms after the file is on the server, in the bare Gradio app as in this one
(benchmarks/README.md, "In a browser"). The server spends them comparing: the upload of one photo,
on an idle server, is compared at once with the default set on the model thread, and the event
that asks for it takes the finished comparison. Nothing changes for the caller: a photo whose
head start failed, was not taken in time, or belongs to another set is compared as before.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from birdfg.app.worker import TORCH_THREAD, TorchThread
from birdfg.data import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

UPLOAD_PATH = "/gradio_api/upload"


class HeadStart:
    """The answers started for uploaded photos, by (set name, file path): `prepare(set name, path)`
    run on the model thread (the set: `set_name()`, the default). At most `capacity` kept (a photo
    uploaded and never compared is dropped in time). `worker`: the thread that runs model work."""

    def __init__(self, set_name: Callable[[], str], capacity: int = 4, worker: TorchThread = TORCH_THREAD):
        self._set_name, self.capacity, self._worker = set_name, capacity, worker
        self.prepare: Callable[[str, str], object] | None = None  # set by the app's handlers
        self._started: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()

    def uploaded(self, paths: list[str]) -> None:
        """Gradio has stored an upload: start comparing it if it is one photo and nothing else
        waits for the model thread (a head start must never delay another visitor)."""
        if (self.prepare is None or len(paths) != 1 or Path(paths[0]).suffix.lower() not in IMAGE_SUFFIXES
                or not self._worker.idle):
            return
        key = (self._set_name(), paths[0])
        job = self._worker.submit(self.prepare, *key)
        if job is None:
            return
        with self._lock:
            self._started[key] = job
            while len(self._started) > self.capacity:
                self._started.popitem(last=False)[1].cancel()

    def take(self, set_name: str, path: str):
        """What `prepare` gave for `path` with set `set_name`, if it has finished (called on
        the model thread: a job still waiting there is cancelled, not waited for)."""
        with self._lock:
            job = self._started.pop((set_name, str(path)), None)
        if job is None or job.cancel() or not job.done():
            return None
        if job.exception() is not None:  # the event compares again and reports the problem itself
            return None
        return job.result()


class UploadWatch:
    """ASGI middleware: after each answered POST to Gradio's upload route, `on_upload(paths)` with
    the stored files' paths (Gradio's answer; the files are in place by then, as Gradio moves them
    in a background task of the same request)."""

    def __init__(self, app, on_upload: Callable[[list[str]], None]):
        self.app, self.on_upload = app, on_upload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(UPLOAD_PATH):
            return await self.app(scope, receive, send)
        answer = {"status": None, "body": bytearray()}

        async def watched(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and answer["status"] == 200:
                answer["body"] += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, watched)
        if answer["status"] != 200:
            return
        try:
            paths = json.loads(bytes(answer["body"]))
            if isinstance(paths, list) and all(isinstance(p, str) for p in paths):
                self.on_upload(paths)
        except Exception:  # noqa: BLE001 - a head start is never worth a failed upload
            log.exception("head start after an upload failed")
