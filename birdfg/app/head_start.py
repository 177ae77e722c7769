"""A photo's comparison starts when the photo reaches the server, not when the page asks for it.

Gradio's front end starts a photo's event only once the upload's progress stream has reported
the upload done (the server checks every 50 ms) and the page has marked the event's outputs as
loading: some 80 ms after the file is on the server, in the bare Gradio app as in this one
(benchmarks/README.md, "In a browser"). The server spends them comparing: the upload of one photo,
on an idle server, is compared at once with the default set on the model thread, and the event
that asks for it takes the finished comparison. Nothing changes for the caller: a photo whose
head start failed, was not taken in time, or belongs to another set is compared as before.

The page need not wait for that event either: it knows the photo it sent, so it can ask for the
head start's answer by the photo's SHA-256 (`finished`), while its upload is still on the way,
and draw the maps as soon as they are made (birdfg/app/maps.js). Only a visitor who has the
photo's bytes can name it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from birdfg.app.worker import TORCH_THREAD, TorchThread
from birdfg.data import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

UPLOAD_PATH = "/gradio_api/upload"
# How long `finished` waits for its photo's upload to land (a large photo on a slow link takes a
# while; the wait costs the server nothing but an idle coroutine).
UPLOAD_WAIT_S = 60.0
# Pages waiting that way at once, at most: anyone may ask for any digest, and a flood of asks for
# photos never sent must not pile up coroutines for a minute each. One more is answered None at
# once (its page waits for its event, as without a head start).
MAX_WAITING = 64
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a photo's name for `finished` (maps.js makes it)


def file_digest(path: str | Path) -> str:
    """The file's SHA-256, in hex: the name the page gives a photo it has sent (maps.js)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class HeadStart:
    """The answers started for uploaded photos, by (set name, file path): `prepare(set name, path)`
    run on the model thread (the set: `set_name()`, the default). At most `capacity` kept (a photo
    uploaded and never compared is dropped in time). `worker`: the thread that runs model work.
    `max_waiting`: how many pages may wait for their photo's upload at once (`finished`)."""

    def __init__(self, set_name: Callable[[], str], capacity: int = 4, worker: TorchThread = TORCH_THREAD,
                 max_waiting: int = MAX_WAITING):
        self._set_name, self.capacity, self._worker, self.max_waiting = set_name, capacity, worker, max_waiting
        self.prepare: Callable[[str, str], object] | None = None  # set by the app's handlers
        self._started: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        # By the photo's SHA-256: (set name, its job or None when none was started). Used on the
        # server's event loop only (`uploaded` from the upload route, `finished` from the page).
        self._digests: OrderedDict[str, tuple[str, Future | None]] = OrderedDict()
        self._waiting: dict[str, list[asyncio.Future]] = {}

    @property
    def waiting(self) -> int:
        """How many pages wait for their photo's upload to land (`finished`)."""
        return sum(map(len, self._waiting.values()))

    def uploaded(self, paths: list[str]) -> None:
        """Gradio has stored an upload: start comparing it if it is one photo and nothing else
        waits for the model thread (a head start must never delay another visitor). Any one file
        is registered by its digest, so that the page asking for it is answered at once."""
        if len(paths) != 1:
            return
        key = (self._set_name(), paths[0])
        photo = self.prepare is not None and Path(paths[0]).suffix.lower() in IMAGE_SUFFIXES
        job = self._worker.submit(self.prepare, *key) if photo and self._worker.idle else None
        if job is not None:
            with self._lock:
                self._started[key] = job
                while len(self._started) > self.capacity:
                    self._started.popitem(last=False)[1].cancel()
        try:
            digest = file_digest(paths[0])  # ~1 ms a megabyte, on the event loop: a photo is small
        except OSError:
            return
        self._digests[digest] = (key[0], job)
        while len(self._digests) > self.capacity:
            self._digests.popitem(last=False)
        for waiter in self._waiting.pop(digest, []):
            waiter.get_loop().call_soon_threadsafe(_settle, waiter, (key[0], job))

    async def finished(self, digest: str, set_name: str, wait_s: float = UPLOAD_WAIT_S):
        """What `prepare` gave for the uploaded photo whose SHA-256 is `digest`, once it has
        finished, if it was made with set `set_name`; else None. Waits up to `wait_s` seconds for
        the upload to land (the page asks as it starts sending it), unless `max_waiting` pages
        wait already; None at once for a `digest` that is no SHA-256 in lower-case hex (no upload
        has that name). The job stays for `take`."""
        if not SHA256_HEX.fullmatch(digest):
            return None
        entry = self._digests.get(digest)
        if entry is None:
            if self.waiting >= self.max_waiting:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(digest, []).append(waiter)
            try:
                entry = await asyncio.wait_for(waiter, wait_s)
            except TimeoutError:
                return None
            finally:  # `uploaded` took the list when it settled it; else this waiter leaves it
                waiting = self._waiting.get(digest, [])
                if waiter in waiting:
                    waiting.remove(waiter)
                    if not waiting:
                        del self._waiting[digest]
        started_with, job = entry
        if job is None or started_with != set_name:
            return None
        try:  # shielded: a page that goes away must not cancel the job its event will take
            return await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            if job.cancelled():  # `take` found it still waiting: the event compares itself
                return None
            raise
        except Exception:  # noqa: BLE001 - failed: the event compares again and says what is wrong
            return None

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


def _settle(waiter: asyncio.Future, entry) -> None:
    if not waiter.done():
        waiter.set_result(entry)


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
