"""The one thread that runs the app's model work (see TorchThread).

App handlers that run models are decorated with `on_torch_thread`: each hands its whole event's
work over at once. The inference engine itself is not decorated; scripts and tests call it on
whatever thread they are.
"""
from __future__ import annotations

import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

Result = TypeVar("Result")

_STOP = object()


class TorchThread:
    """Runs torch work on one thread of the process: the main one.

    libgomp (PyTorch's OpenMP) keeps a team of worker threads for every thread that has run a
    parallel torch op, and once it manages more threads than there are CPUs it stops spin-waiting
    between parallel regions; a server that ran its models on its pool of request threads got a
    team per request thread, and every comparison slowed down (benchmarks/README.md, server
    settings). So the app's request threads hand model work (preprocessing, ONNX Runtime, maps)
    to the main thread, which does nothing else once the server is up (`serve_forever`): one
    comparison at a time, on all cores. Until then (scripts, tests) a call runs where it is made.
    Each hand-over costs a thread switch, a few ms on a busy machine: hand over a whole event's
    work at once (the app's handlers are decorated), not each small step.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._serving = threading.Event()
        self._handing_in = threading.Lock()  # no job is queued after the loop has stopped
        self._queued = 0  # jobs handed in and not finished

    @property
    def serving(self) -> bool:
        return self._serving.is_set()

    def call(self, fn: Callable[..., Result], /, *args, **kwargs) -> Result:
        job = self.submit(fn, *args, **kwargs)
        return fn(*args, **kwargs) if job is None else job.result()

    def submit(self, fn: Callable[..., Result], /, *args, **kwargs) -> Future | None:
        """Hand `fn` in without waiting: its Future, or None where the loop is not running (or
        this is its own thread), and the caller must run `fn` itself."""
        with self._handing_in:
            if not self.serving or threading.current_thread() is threading.main_thread():
                return None
            job = Future()  # run with the caller's context variables (Gradio finds its request in them)
            self._jobs.put((job, functools.partial(contextvars.copy_context().run, fn), args, kwargs))
            self._queued += 1
            return job

    @property
    def idle(self) -> bool:
        """No job running or waiting."""
        return self._queued == 0

    def serve_forever(self, start: Callable[[], object] = lambda: None, poll_s: float = 0.5) -> None:
        """Call `start` (e.g. start the server), then run the jobs other threads hand in, until
        `stop()` or KeyboardInterrupt (re-raised). Calls made once `start` begins are queued."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("TorchThread.serve_forever must run on the main thread.")
        self._serving.set()
        try:
            start()
            while True:
                try:
                    job = self._jobs.get(timeout=poll_s)  # a timeout, so that Ctrl-C gets through
                except queue.Empty:
                    continue
                if job is _STOP:
                    return
                self._run(*job)
        finally:
            with self._handing_in:
                self._serving.clear()
            while not self._jobs.empty():  # handed in while stopping: run, so no caller hangs
                job = self._jobs.get()
                if job is not _STOP:
                    self._run(*job)

    def stop(self) -> None:
        """Make `serve_forever` return once the jobs handed in before are done (from any thread)."""
        self._jobs.put(_STOP)

    def _run(self, job: Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        try:
            if not job.set_running_or_notify_cancel():
                return
            try:
                job.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # the caller re-raises it
                job.set_exception(exc)
                if isinstance(exc, KeyboardInterrupt):  # Ctrl-C during a job still stops the server
                    raise
        finally:
            with self._handing_in:
                self._queued -= 1


TORCH_THREAD = TorchThread()


def on_torch_thread(fn: Callable[..., Result]) -> Callable[..., Result]:
    """Decorator: the function always runs on TORCH_THREAD's thread (see TorchThread)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return TORCH_THREAD.call(fn, *args, **kwargs)
    return wrapper
