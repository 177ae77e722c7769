"""Inference settings for a small CPU (a free Hugging Face Space has 2 vCPUs).

Kept here are only the settings that were measured to pay on such a machine and that leave the
answers alone (benchmarks/bench_compare.py checks top-1 agreement with plain fp32 eager models
on every val photo); benchmarks/README.md lists what was tried and what each one gave.
"""
from __future__ import annotations

import contextvars
import functools
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

Result = TypeVar("Result")


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota. A
    container limited to 2 CPUs by quota still *sees* every host core, and one torch thread per
    host core on 2 CPUs' worth of time makes oneDNN's threads wait on each other (measured here:
    5x slower with 2 threads on a busy 2-core machine than with 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota)) if quota else cpus


def _cgroup_quota() -> int | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return math.ceil(int(limit) / int(period)) if limit != "max" else None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return math.ceil(limit / period) if limit > 0 else None
    except (OSError, ValueError):
        return None


def configure_threads(threads: int | None = None) -> int:
    """One intra-op thread per usable CPU (or `threads`, or $BIRDFG_THREADS); returns the count."""
    if threads is None:
        threads = int(os.environ.get("BIRDFG_THREADS", "0") or 0) or usable_cpus()
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def tune_backbone(backbone: nn.Module, example: torch.Tensor, feature_map: bool) -> dict[str, int | bool]:
    """Make a convolutional backbone (or a model's own top stages: anything with
    `forward_features`) faster for inference, in place; a ViT is left alone.

    - channels-last (NHWC) memory format: oneDNN's convolutions, the depthwise ones above all,
      run faster on it, with the same arithmetic;
    - BatchNorm folded into the convolution before it (exact algebra; float rounding differs in
      the last bits): one pass less over every activation;
    - 1x1 convolutions as matrix products (see PointwiseConv).
    `example` is one input batch of the right size, used to find the conv -> BN pairs and to
    check the folded model against the original."""
    if not feature_map:
        return {"channels_last": False, "folded_batchnorms": 0, "pointwise_matmuls": 0}
    backbone.to(memory_format=torch.channels_last)
    example = example.contiguous(memory_format=torch.channels_last)
    folded = fold_batchnorm(backbone, example, backbone.forward_features)
    backbone.to(memory_format=torch.channels_last)  # the folded weights are new tensors
    return {"channels_last": True, "folded_batchnorms": folded, "pointwise_matmuls": pointwise_as_matmul(backbone)}


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (stride 1, no padding, no groups) that multiplies channels-last input as
    the (pixels x channels) matrix it already is.

    torch sends a 1x1 convolution on one thread with fewer than 16 images to its own im2col
    code, which wants NCHW: channels-last activations were copied there and back at every such
    layer, and those are all of them in a single-threaded worker (speed.PerCore). As a matrix
    product nothing is copied: ResNet-152 took 359 instead of 389 ms for one photo on one
    thread, 293 instead of 303 per photo in chunks of 8; the full set's forward of one photo 742
    instead of 753 ms and its batches 592 instead of 604 ms per photo; the Lite0 trunk gains 1-3 % (throwaway
    A/B runs, taking turns in one process). Same weights and state dict as the nn.Conv2d it
    replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        out = nn.functional.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
        return out.permute(0, 3, 1, 2)  # a channels-last view: no copy


def pointwise_as_matmul(module: nn.Module) -> int:
    """Turn every plain 1x1 convolution in `module` into a PointwiseConv, in place; returns how many."""
    swapped = 0
    for conv in module.modules():
        if (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros"):
            conv.__class__ = PointwiseConv  # same parameters and buffers: only forward differs
            swapped += 1
    return swapped


def _bn_replacement(bn: nn.Module) -> nn.Module | None:
    """What is left of a BatchNorm once its affine map lives in the convolution before it."""
    from timm.layers import BatchNormAct2d

    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn) is BatchNormAct2d:  # timm's BN + activation in one module: keep the activation
        kept = [m for m in (bn.drop, bn.act) if not isinstance(m, nn.Identity)]
        return nn.Sequential(*kept) if len(kept) > 1 else (kept[0] if kept else nn.Identity())
    return None


@torch.no_grad()
def fold_batchnorm(module: nn.Module, example: torch.Tensor, forward=None, rtol: float = 1e-3) -> int:
    """Fold every eval-mode BatchNorm that directly consumes a convolution's output into that
    convolution (s * conv(x; W, b) + t = conv(x; s W, s b + t)). Which BN follows which
    convolution is read from one forward of `example` through `forward` (default: `module`); the
    folded output is checked against the original and the folding undone if they differ.
    Returns the number of BatchNorms folded."""
    forward = forward or module
    if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        return 0
    producers: dict[int, tuple[torch.Tensor, nn.Module]] = {}
    pairs: list[tuple[nn.Conv2d, nn.Module]] = []
    calls: dict[int, int] = {}

    def after_conv(conv, _inputs, out):
        calls[id(conv)] = calls.get(id(conv), 0) + 1
        producers[id(out)] = (out, conv)  # keep the tensor alive so its id stays unique

    def after_bn(bn, inputs, _out):
        calls[id(bn)] = calls.get(id(bn), 0) + 1
        found = producers.get(id(inputs[0]))
        if found is not None and found[0] is inputs[0]:
            pairs.append((found[1], bn))

    hooks = [m.register_forward_hook(after_conv) for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(after_bn) for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        reference = forward(example)
    finally:
        for h in hooks:
            h.remove()
        producers.clear()
    parents = {id(child): (parent, name) for parent in module.modules() for name, child in parent.named_children()}
    undo = []
    for conv, bn in pairs:
        replacement = _bn_replacement(bn)
        if (replacement is None or bn.training or bn.running_var is None or calls[id(conv)] != 1
                or calls[id(bn)] != 1 or id(bn) not in parents):
            continue  # reused modules or BN variants: leave them as they are
        scale = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        old_weight, old_bias = conv.weight, conv.bias
        trainable = old_weight.requires_grad
        conv.weight = nn.Parameter(old_weight * scale.reshape(-1, 1, 1, 1), requires_grad=trainable)
        conv.bias = nn.Parameter(shift if old_bias is None else old_bias * scale + shift, requires_grad=trainable)
        parent, name = parents[id(bn)]
        setattr(parent, name, replacement)
        undo.append((conv, old_weight, old_bias, parent, name, bn))
    if undo:
        folded = forward(example)
        if not torch.allclose(folded, reference, rtol=rtol, atol=rtol * float(reference.abs().max())):
            for conv, old_weight, old_bias, parent, name, bn in reversed(undo):
                conv.weight, conv.bias = old_weight, old_bias
                setattr(parent, name, bn)
            return 0
    return len(undo)


def limit_threads() -> int:
    """Never more torch threads than usable CPUs (a quota-limited container reports the host's
    cores, and torch would start one thread per core); a lower setting is left as it is."""
    if torch.get_num_threads() > usable_cpus():
        torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()


class MicroBatch:
    """The chunk size a model's backbone runs batches fastest in on this machine, learnt from the
    batches it runs (see PerCore: each core's worker takes one chunk at a time; the heads then
    take each core's whole share, see Comparator._classify_group).

    Bigger chunks are not always faster on a CPU. The EfficientNet-Lite0 trunk at 320 px is
    fastest with two photos in flight in all (one per core): more than two photos' 160x160
    activations, 9.8 MB each, no longer stay in the 32 MB cache. ResNet-152 keeps gaining up to
    eight. Rather than guess per model and machine, the first batches each run at one candidate
    size (every size `trials` times), timed as a whole, and later ones use the size with the best
    time per photo. Any size gives the same answers (up to float rounding)."""

    def __init__(self, candidates: tuple[int, ...] = (1, 2, 4, 8), trials: int = 2, revisit_every: int = 50):
        self.candidates = candidates
        self.trials = trials  # the first batch at a new size also builds its oneDNN kernels
        # Every `revisit_every` batches each size gets one more try: a size first timed while
        # the machine was busy is not written off for good.
        self.revisit_every = revisit_every
        self.runs = {size: 0 for size in candidates}
        self.best_s_per_photo: dict[int, float] = {}

    def next_size(self, at_most: int) -> int:
        """The chunk size for the next batch, given that chunks of more than `at_most` photos
        would leave a core idle."""
        fitting = [size for size in self.candidates if size <= at_most]
        wanted = self.trials + sum(self.runs.values()) // self.revisit_every
        untried = [size for size in fitting if self.runs[size] < wanted]
        # In turns (1, 2, 4, 8, 1, 2, ...): a slow spell of the host then spoils one trial of
        # several sizes rather than every trial of one.
        return min(untried, key=self.runs.__getitem__) if untried else self.fastest(at_most)

    def settled(self, at_most: int) -> bool:
        """Whether every size up to `at_most` has had its first trials."""
        return all(self.runs[size] >= self.trials for size in self.candidates if size <= at_most)

    def fastest(self, at_most: int) -> int:
        """The timed size up to `at_most` with the best time per photo (`at_most` if none is)."""
        timed = [size for size in self.best_s_per_photo if size <= at_most]
        return min(timed, key=self.best_s_per_photo.__getitem__) if timed else at_most

    def record(self, size: int, seconds: float, photos: int) -> None:
        """A batch of `photos` took `seconds` in chunks of `size`."""
        if size not in self.runs:
            return
        per_photo = seconds / photos
        self.runs[size] += 1
        self.best_s_per_photo[size] = min(per_photo, self.best_s_per_photo.get(size, per_photo))


class PerCore:
    """Runs work items on every usable CPU at once: one single-threaded torch worker per CPU (the
    calling thread is one of them), each taking the next chunk of items when done with its last.
    The items are a batch's photos, or the models (backbone groups) one photo goes through.

    Two threads inside each operator (torch's usual way) pay off for big matrix products but
    little for the many small, memory-bound layers of a small CNN: the Lite0 trunk ran one photo
    in 33.8 ms on two threads and 39.7 ms on one here, and two threads wait on each other at
    every operator when the host slows one of them. Independent workers keep both cores busy,
    and a core that the host slows simply takes fewer chunks. This holds for big models too: the
    full set's three models compared one photo in 724-798 ms side by side, one per core, against
    826-922 ms one after the other on two threads each (same runs, on this machine). A
    single-threaded worker never starts an OpenMP team, so it does not slow the main thread's
    (see TorchThread)."""

    def __init__(self, cpus: int | None = None):
        self.cpus = cpus or usable_cpus()
        self._helpers = (ThreadPoolExecutor(self.cpus - 1, thread_name_prefix="birdfg-core",
                                            initializer=_one_torch_thread) if self.cpus > 1 else None)

    def per_worker(self, photos: int) -> int:
        """Photos per worker when `photos` are shared out evenly: the biggest chunk that leaves
        no core idle."""
        return math.ceil(photos / max(1, min(self.cpus, photos)))

    def run(self, fn: Callable[[list], Result], items: list, micro: MicroBatch | None = None) -> list[Result]:
        """`fn(chunk)` for consecutive chunks of `items`, of the size `micro` picks (and learns
        from: the whole run is timed), or of one item each without `micro`; the results in the
        items' order. A single item runs on the calling thread as it is (all its threads)."""
        if len(items) < 2:
            return [fn(items)] if items else []
        workers = min(self.cpus, len(items))
        size = micro.next_size(self.per_worker(len(items))) if micro else 1
        chunks = _Chunks(items, size, fn)
        began = time.perf_counter()
        if workers <= 1:
            done = chunks.work()
        else:
            helpers = [self._helpers.submit(chunks.work) for _ in range(workers - 1)]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                done = chunks.work() + [chunk for helper in helpers for chunk in helper.result()]
            finally:
                chunks.stop()
                wait(helpers)  # the helpers' start-up sets torch's default too: restore it after them
                torch.set_num_threads(threads)
        if micro and len(items) >= workers * size:  # no core sat idle for want of a chunk: a fair time
            micro.record(size, time.perf_counter() - began, len(items))
        return [result for _, result in sorted(done, key=lambda pair: pair[0])]


@functools.cache
def cores() -> PerCore:
    """The process's PerCore: every Comparator shares its helper threads (all torch work goes
    through one thread anyway, see TorchThread, so two sets never run at once)."""
    return PerCore()


class _Chunks:
    """The chunks of one PerCore.run, handed out to its workers one at a time."""

    def __init__(self, items: list, size: int, fn: Callable[[list], Result]):
        self.items, self.size, self.fn = items, size, fn
        self._starts = iter(range(0, len(items), size))
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Hand out no more chunks (a worker failed: the others finish theirs, then return)."""
        with self._lock:
            self._starts = iter(())

    def work(self) -> list[tuple[int, Result]]:
        """Runs chunks until none is left; (start, result) of each."""
        done = []
        while True:
            with self._lock:
                start = next(self._starts, None)
            if start is None:
                return done
            done.append((start, self.fn(self.items[start:start + self.size])))


def _one_torch_thread() -> None:
    torch.get_num_threads()  # torch sets a new thread's count on first use: let that happen first
    torch.set_num_threads(1)


_STOP = object()


class TorchThread:
    """Runs torch work on one thread of the process: the main one.

    libgomp (PyTorch's OpenMP) keeps a team of worker threads for every thread that has run a
    parallel torch op, and once it manages more threads than there are CPUs it stops spin-waiting
    between parallel regions. A server that runs its models on its pool of request threads gets a
    team per request thread: on this 2-core machine a lite comparison took 35 ms before requests
    from a pool of threads and 49.5 ms after (the Lite0 trunk 15.7 -> 21.4 ms per photo pair).
    So the app's request threads hand model work to the main thread, which does nothing else once
    the server is up (`serve_forever`). (PerCore's helpers run torch too, but single-threaded: a
    thread that never runs a parallel region has no team.) Until then (scripts, tests) a call
    runs where it is made.
    Each hand-over costs a thread switch, a few ms on a busy machine: hand over a whole event's
    work at once (the app's handlers are decorated), not each small step.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._serving = threading.Event()
        self._handing_in = threading.Lock()  # no job is queued after the loop has stopped

    @property
    def serving(self) -> bool:
        return self._serving.is_set()

    def call(self, fn: Callable[..., Result], /, *args, **kwargs) -> Result:
        with self._handing_in:
            if not self.serving or threading.current_thread() is threading.main_thread():
                job = None
            else:  # with the caller's context variables (Gradio finds its request in them)
                job = Future()
                self._jobs.put((job, functools.partial(contextvars.copy_context().run, fn), args, kwargs))
        return fn(*args, **kwargs) if job is None else job.result()

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

    @staticmethod
    def _run(job: Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        if not job.set_running_or_notify_cancel():
            return
        try:
            job.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the caller re-raises it
            job.set_exception(exc)
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C during a job still stops the server
                raise


TORCH_THREAD = TorchThread()


def on_torch_thread(fn: Callable[..., Result]) -> Callable[..., Result]:
    """Decorator: the function always runs on TORCH_THREAD's thread (see TorchThread)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return TORCH_THREAD.call(fn, *args, **kwargs)
    return wrapper
