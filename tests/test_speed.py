"""The inference speed-ups change no answer: a tuned Comparator (channels-last, BatchNorm folded,
warmed up) gives the same top-1 and the same maps as plain fp32 eager models on real photos, and
the faster overlay draws the same pixels as the straightforward one. (Timings live in
benchmarks/bench_compare.py, never here.)"""
from __future__ import annotations

import itertools
import operator
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, export_lite_set
from PIL import Image
from torch import nn

from birdfg import memory, process, schedule, speed
from birdfg.backbones import chain
from birdfg.checkpoints import load_set
from birdfg.compare import Comparator
from birdfg.explain import TURBO, crop_box, normalise, overlay


def test_folded_batchnorm_gives_the_same_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8)).eval()
    for bn in (model[1], model[4]):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert speed.fold_batchnorm(model, x) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class _ConvUsedTwice(nn.Module):
    """The convolution's raw output is used after the BN too: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_folding_is_undone_when_it_would_change_the_output():
    torch.manual_seed(0)
    model = _ConvUsedTwice().eval()
    model.bn.running_var.fill_(4.0)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert speed.fold_batchnorm(model, x) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_threads_never_exceed_usable_cpus():
    before = torch.get_num_threads()
    try:
        assert 1 <= speed.usable_cpus() <= (len(__import__("os").sched_getaffinity(0)))
        torch.set_num_threads(speed.usable_cpus() + 3)
        assert speed.limit_threads() == speed.usable_cpus()
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos(bird_data):
    paths = sorted((bird_data / "val_images").rglob("*.jpg"))
    return paths[:: max(1, len(paths) // 4)][:4]


def test_tuned_comparator_answers_like_plain_fp32_eager(untrained_lite_set, photos):
    tuned = Comparator(load_set(untrained_lite_set))
    plain = Comparator(load_set(untrained_lite_set), tune=False)
    assert any(t.get("folded_batchnorms") for t in tuned.tuning.values()), tuned.tuning
    assert any(t.get("pointwise_matmuls") for t in tuned.tuning.values()), tuned.tuning
    assert not plain.tuning
    for photo in photos:
        fast, slow = tuned.compare(photo), plain.compare(photo)
        for key in plain.models:
            assert fast.predicted(key) == slow.predicted(key), (photo.name, key)
            np.testing.assert_allclose(fast.results[key].probs, slow.results[key].probs, atol=1e-4)
            heat, reference = fast.class_map(key), slow.class_map(key)
            np.testing.assert_allclose(heat, reference, atol=1e-3 * float(np.abs(reference).max()) + 1e-6)
        batch = tuned.classify([Image.open(photo).convert("RGB")])
        for key in plain.models:
            assert int(batch[key].argmax(-1)) == slow.predicted(key)


def test_micro_batch_tries_each_size_then_keeps_the_fastest_per_photo():
    micro = speed.MicroBatch(candidates=(1, 2, 4), trials=2)
    assert not micro.settled(8)
    # This fake model costs 3 s per photo in chunks of 1, 1 s in chunks of 2, 2 s in chunks of 4.
    cost_per_photo = {1: 3.0, 2: 1.0, 4: 2.0}
    sizes = []
    for _ in range(8):
        size = micro.next_size(8)
        sizes.append(size)
        micro.record(size, cost_per_photo[size] * 8, 8)
    assert sizes == [1, 2, 4, 1, 2, 4, 2, 2]  # each size in turn, then the fastest
    assert micro.settled(8)
    assert micro.next_size(8) == micro.fastest(8) == 2
    assert micro.next_size(1) == 1  # never chunks bigger than asked


def test_micro_batch_tries_every_size_again_now_and_then():
    micro = speed.MicroBatch(candidates=(1, 2), trials=1, revisit_every=10)
    micro.record(1, 5.0, 1)  # timed while the machine was busy
    micro.record(2, 2.0, 1)
    sizes = []
    for _ in range(12):
        size = micro.next_size(2)
        sizes.append(size)
        micro.record(size, 0.5 if size == 1 else 1.0, 1)  # quiet now: 1 is the faster
    assert sizes[:8] == [2] * 8 and 1 in sizes[8:]
    assert micro.next_size(2) == 1


def test_batches_answer_like_one_photo_at_a_time(untrained_lite_set, photos):
    tuned = Comparator(load_set(untrained_lite_set))
    tuned.cores = speed.PerCore(2)  # split across two workers even where the machine has one CPU
    tuned.micro_batches = {k: speed.MicroBatch(trials=1) for k in tuned.micro_batches}
    opened = [Image.open(p).convert("RGB") for p in photos]
    singles = [tuned.classify([photo]) for photo in opened]
    head_batches: list[tuple[int, int, int]] = []  # (photos, thread, torch threads) of each head call
    for loaded in tuned.models.values():
        loaded.model.head.register_forward_pre_hook(
            lambda _, args: head_batches.append((len(args[0]), threading.get_ident(), torch.get_num_threads())))
    for _ in range(4):  # chunks of 1, 2, 4 and 8
        head_batches.clear()
        batched = tuned.classify(opened * 5)
        # Whatever the backbone's chunks, each worker runs the heads on its whole share at once.
        assert sorted(n for n, _, _ in head_batches) == [10] * 2 * len(tuned.models), head_batches
        assert len({ident for _, ident, _ in head_batches}) == 2 and {t for _, _, t in head_batches} == {1}
        for key in tuned.models:
            assert len(batched[key]) == len(opened) * 5
            for j in range(len(opened) * 5):
                torch.testing.assert_close(batched[key][j], singles[j % 4][key][0], atol=1e-4, rtol=0)
    assert set(next(iter(tuned.micro_batches.values())).runs.values()) == {1}
    assert not any(r.attentions for r in tuned.recorders.values())  # a batch keeps no attention
    assert all(layer.fused_attn for r in tuned.recorders.values() for layer in r.layers)
    assert tuned.compare(photos[0]).results["vit"].attentions  # a comparison records it again


def test_one_photo_runs_its_backbone_passes_and_heads_side_by_side(tmp_path, photos):
    # The CNN at another input size than the others: two backbone passes per photo.
    folder = export_lite_set(tmp_path, TINY_CLASSES, img_sizes={"cnn": 192})
    comparator = Comparator(load_set(folder))
    comparator.cores = speed.PerCore(2)  # two workers even where the machine has one CPU
    assert len(comparator.groups) == 2
    threads = torch.get_num_threads()
    ran_on: dict[str, set[tuple[int, int]]] = {"backbone": set(), "head": set()}  # (thread, torch threads)

    def note(stage: str) -> None:
        ran_on[stage].add((threading.get_ident(), torch.get_num_threads()))

    shared_pass = comparator._shared_pass

    def noting_shared_pass(*args):  # the real pass, and where it ran
        note("backbone")
        return shared_pass(*args)

    comparator._shared_pass = noting_shared_pass
    for loaded in comparator.models.values():
        loaded.model.head.register_forward_pre_hook(lambda *_: note("head"))
    photo = Image.open(photos[0]).convert("RGB")
    side_by_side = comparator.classify([photo])
    for key, probs in comparator.classify([photo]).items():  # each model always on one thread: same bits
        assert torch.equal(probs, side_by_side[key]), key
    for stage, workers in ran_on.items():  # both workers, each single-threaded
        assert len({ident for ident, _ in workers}) == 2 and {n for _, n in workers} == {1}, stage
    assert torch.get_num_threads() == threads
    one_group_after_another = {key: out.probs for keys in comparator.groups
                               for key, out in comparator.forward_group([photo], keys).items()}
    comparison = comparator.compare(photos[0])
    assert list(comparison.results) == list(comparator.models)
    assert comparison.results["vit"].attentions  # evidence comes back from either worker's pass
    for key in comparator.models:
        torch.testing.assert_close(side_by_side[key], one_group_after_another[key], atol=1e-4, rtol=0)
        np.testing.assert_allclose(comparison.results[key].probs, side_by_side[key][0].numpy(), atol=1e-4)


def test_cut_backbones_keep_both_cores_busy_and_multi_model_groups_whole():
    # The full set's shape: a ViT-B (one block, 440 ms) and two ResNet-152s (54 blocks, 360 ms).
    resnet = schedule.GroupCost([0.36 / 54] * 54, [0.002])
    full = [schedule.GroupCost([0.44], [0.001]), resnet, resnet]
    cuts = schedule.best_cuts(full, workers=2)
    assert cuts[0] == 1 and 0 < cuts[1] < 54 and 0 < cuts[2] < 54, cuts
    assert schedule.rounds_s(full, [1, 54, 54], 2) == pytest.approx(0.723)  # one core runs both ResNets
    assert schedule.rounds_s(full, cuts, 2) < 0.59  # (0.44 + 0.72) / 2 = 0.58, plus a block at most
    # A trunk that several models share feeds their heads in the second round: it stays whole.
    lite = [schedule.GroupCost([0.001] * 50, [0.003, 0.008, 0.004]), schedule.GroupCost([0.001] * 50, [0.003])]
    assert schedule.best_cuts(lite, 2)[0] == 50
    assert schedule.best_cuts(full, workers=1) == [1, 54, 54]
    assert schedule.busy_s([3, 2, 2, 1], 2) == 4


def test_a_cut_backbone_gives_the_same_bits(tmp_path, photos):
    folder = export_lite_set(tmp_path, TINY_CLASSES, img_sizes={"cnn": 192})
    comparator = Comparator(load_set(folder))
    comparator.cores = speed.PerCore(2)
    rounds = comparator.tuning["rounds"]
    assert rounds["estimated_ms"] <= rounds["estimated_uncut_ms"], rounds
    cnn = comparator.models["cnn"]
    blocks = chain(cnn.model.backbone, cnn.spec.backbone)
    x = comparator._prepare([Image.open(photos[0]).convert("RGB")], "cnn")
    with torch.inference_mode():
        assert torch.equal(nn.Sequential(*blocks)(x), cnn.model.shared_features(x))
    photo = Image.open(photos[1]).convert("RGB")
    comparator.cuts = {}
    whole = comparator.classify([photo])
    for cut in (1, len(blocks) // 2, len(blocks) - 1):
        comparator.cuts = {"cnn": (nn.Sequential(*blocks[:cut]), nn.Sequential(*blocks[cut:]))}
        for key, probs in comparator.classify([photo]).items():
            assert torch.equal(probs, whole[key]), (cut, key)
    assert comparator.compare(photos[1]).results["cnn"].features is not None


def test_per_core_covers_the_batch_in_order_and_restores_the_thread_count():
    cores = speed.PerCore(3)
    micro = speed.MicroBatch(candidates=(1, 2, 4), trials=1)
    threads = torch.get_num_threads()
    seen = []

    def work(chunk):
        seen.append((threading.get_ident(), torch.get_num_threads(), len(chunk)))
        return [x * 2 for x in chunk]

    for size in (1, 2, 4):  # every size once: the first three runs try them in turn
        assert list(itertools.chain(*cores.run(work, list(range(13)), micro))) == [x * 2 for x in range(13)]
        assert {n for _, _, n in seen} == {size, 13 % size or size}
        seen.clear()
    assert set(micro.best_s_per_photo) == {1, 2, 4}
    cores.run(work, list(range(13)), micro)
    assert {n for _, n, _ in seen} == {1}  # every worker runs torch single-threaded
    assert threading.get_ident() in {ident for ident, _, _ in seen}  # the caller is one of them
    assert torch.get_num_threads() == threads
    assert cores.run(work, [7], micro) == [[14]] and cores.run(work, [], micro) == []

    def fail(chunk):
        raise ValueError(chunk)

    with pytest.raises(ValueError):
        cores.run(fail, [1, 2, 3], micro)
    assert torch.get_num_threads() == threads
    fresh = []  # a thread started later still gets the process's count, not a worker's
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [threads]


def test_growth_guard_trims_only_past_the_first_requests_rss():
    guard = memory.GrowthGuard(growth=10.0)
    assert memory.rss_bytes() > 0
    assert not guard.check()  # the first request sets the baseline
    assert not guard.check()
    guard.growth = -1.0  # any RSS is now "grown"
    assert guard.check()


def test_torch_thread_runs_other_threads_work_on_the_main_thread():
    runner = speed.TorchThread()
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


def _reference_overlay(image, heat, box, opacity=0.5):
    """The plain way to draw it: dim everything by blending with black, colour by numpy lookup."""
    image = image.convert("RGB")
    left, top, right, bottom = (int(round(v)) for v in box)
    width, height = max(right - left, 1), max(bottom - top, 1)
    scaled = Image.fromarray((normalise(heat) * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    coloured = Image.fromarray(TURBO[np.asarray(scaled)])
    canvas = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), 0.35)
    canvas.paste(image.crop((left, top, right, bottom)), (left, top))
    region = Image.blend(canvas.crop((left, top, right, bottom)), coloured, float(np.clip(opacity, 0, 1)))
    canvas.paste(region, (left, top))
    return canvas


@pytest.mark.parametrize("mode,size,crop_pct,opacity", [("RGB", (512, 384), 0.875, 0.5), ("L", (300, 420), 0.95, 0.3),
                                                         ("RGBA", (64, 64), 1.0, 1.0)])
def test_fast_overlay_draws_the_same_pixels(mode, size, crop_pct, opacity):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    heat = rng.random((10, 10)).astype(np.float32)
    box = crop_box(image.size, {"crop_pct": crop_pct})
    fast = np.asarray(overlay(image, heat, box, opacity))
    np.testing.assert_array_equal(fast, np.asarray(_reference_overlay(image, heat, box, opacity)))
