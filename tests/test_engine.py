"""The inference engine: ONNX Runtime gives the answers and maps of plain torch eager (one photo
and batched), its exported graphs are cached beside the checkpoints and rebuilt or refused when
they do not match, a model that cannot run in ONNX still answers in torch, and the overlay draws
the pixels of the straightforward way. (Timings live in benchmarks/, never here.)"""
from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, TINY_CLASSES, export_lite_set, synthetic_photo
from PIL import Image

from birdfg import layout
from birdfg.checkpoints import load_set
from birdfg.images import open_rgb
from birdfg.inference import DISPLAY_SIDE, Engine, runtime
from birdfg.inference.results import display_size
from birdfg.inference.threads import limit_threads, usable_cpus
from birdfg.overlay import TURBO, crop_box, normalise, overlay


def test_threads_never_exceed_usable_cpus():
    before = torch.get_num_threads()
    try:
        assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
        torch.set_num_threads(usable_cpus() + 3)
        assert limit_threads() == usable_cpus()
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Image.Image]:
    """Four real bird photos when the shared dataset is here, else four generated ones."""
    paths = sorted((SHARED_DATA / "val_images").rglob("*.jpg"))
    if paths:
        return [open_rgb(p) for p in paths[:: max(1, len(paths) // 4)][:4]]
    return [synthetic_photo(i % 3, 100 + i, (400, 300)) for i in range(4)]


@pytest.fixture(scope="module")
def lite_set(tmp_path_factory):
    """A set at the shipped input size whose graphs this module exports itself."""
    return export_lite_set(tmp_path_factory.mktemp("engine_set"), TINY_CLASSES, seed=3,
                           img_sizes={"cnn": 320, "vit": 320, "bcnn": 320})


def _views(engine: Engine, key: str) -> list[tuple[str, dict]]:
    """Every method of a model with every value of each of its options."""
    views = []
    for method in engine.methods[key]:
        views.append((method.name, {}))
        for option in method.options():
            views += [(method.name, {option.name: value}) for _, value in option.choices]
    return views


def test_onnx_answers_and_maps_equal_torch_eager(lite_set, photos):
    fast = Engine(load_set(lite_set), runtime="onnx")
    plain = Engine(load_set(lite_set), runtime="torch")
    assert set(fast.runtimes.values()) == {"onnx"} and set(plain.runtimes.values()) == {"torch"}
    batched = fast.run(photos)
    for photo, in_batch in zip(photos, batched):
        a, b = fast.compare(photo), plain.compare(photo)
        for key in plain.models:
            assert a.predicted(key) == b.predicted(key) == in_batch.predicted(key), key
            np.testing.assert_allclose(a.results[key].probs, b.results[key].probs, atol=1e-5)
            np.testing.assert_allclose(in_batch.results[key].probs, b.results[key].probs, atol=1e-5)
            for method, options in _views(plain, key):
                for cls in (None, 1):
                    heat = normalise(fast.explain(a, key, cls, method, **options))
                    reference = normalise(plain.explain(b, key, cls, method, **options))
                    assert np.abs(heat - reference).max() < 1e-4, (key, method, options, cls)
        pairs = [caption for caption, _ in fast.parts_of(a, "bcnn")]
        assert pairs == [caption for caption, _ in plain.parts_of(b, "bcnn")] and len(pairs) == 4


def test_a_model_at_a_finer_stride_runs_its_own_trunk_and_gives_finer_maps(tmp_path, photos):
    folder = export_lite_set(tmp_path, TINY_CLASSES, img_sizes={"cnn": 128, "vit": 128, "bcnn": 128},
                             output_strides={"vit": 16})
    fast = Engine(load_set(folder), runtime="onnx", warm_up=False)
    plain = Engine(load_set(folder), runtime="torch", warm_up=False)
    assert sorted(g.keys for g in fast.groups) == [["cnn", "bcnn"], ["vit"]]
    assert set(fast.runtimes.values()) == {"onnx"}
    a, b = fast.compare(photos[0]), plain.compare(photos[0])
    for key, grid in (("cnn", (4, 4)), ("vit", (8, 8)), ("bcnn", (4, 4))):
        np.testing.assert_allclose(a.results[key].probs, b.results[key].probs, atol=1e-5)
        heat, reference = fast.explain(a, key), plain.explain(b, key)  # each model's default map
        assert heat.shape == reference.shape == grid, key
        assert np.abs(normalise(heat) - normalise(reference)).max() < 1e-4, key


def test_exported_graphs_pad_by_constants(lite_set):
    """The trunk's TF-style padding is exported as numbers of the graph's input size, not as
    arithmetic on the tensor's shape, so ONNX Runtime can merge it into the convolutions."""
    import onnx

    Engine(load_set(lite_set), warm_up=False)
    (path,) = layout.graph_cache_dir(lite_set).glob("*.onnx")
    graph = onnx.load(str(path)).graph
    made_by = {output: node for node in graph.node for output in node.output}

    @functools.cache
    def reads_the_photo(name: str) -> bool:  # computed, however indirectly, from the graph's input
        node = made_by.get(name)
        return name == "x" if node is None else any(reads_the_photo(i) for i in node.input if i)

    pads = [n for n in graph.node if n.op_type == "Pad"]
    assert pads, "the Lite0 trunk pads before its strided convolutions"
    assert not [n.name for n in pads if reads_the_photo(n.input[1])]


def test_evidence_is_kept_only_when_asked_for(lite_set, photos):
    engine = Engine(load_set(lite_set), warm_up=False)
    without, = engine.run(photos[:1])
    assert all(r.evidence is None for r in without.results.values())
    with pytest.raises(ValueError, match="without evidence"):
        engine.explain(without, "cnn")
    kept, = engine.run(photos[:1], evidence=True)
    assert len(kept.results["vit"].evidence.attentions) == 2 and not kept.results["cnn"].evidence.attentions


@pytest.mark.parametrize("size", [(512, 512), (513, 512), (512, 513), (300, 200), (1024, 768), (768, 1024),
                                  (1024, 683), (1000, 50), (50, 1000), (1023, 7), (7, 1023), (999, 1000),
                                  (641, 480), (480, 641), (1024, 1023), (2, 1024),
                                  (521, 29), (534, 85), (513, 530)])  # neither round() nor floor() gives these
def test_the_display_size_is_pil_thumbnails(size):
    shown = Image.new("L", size)
    shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    assert display_size(size) == shown.size


def test_the_photo_as_shown_is_made_only_when_asked_for(lite_set):
    """The page draws its maps on its own photo: a comparison and its map data make no display
    copy; an overlay drawn on the server makes it, the same picture as before."""
    from birdfg.app.map_data import model_maps

    engine = Engine(load_set(lite_set), warm_up=False)
    photo = synthetic_photo(0, 3, size=(900, 600))
    comparison = engine.compare(photo)
    data = model_maps(engine, comparison, "cnn", every_class=False)
    assert comparison._shown is None
    expected = photo.copy()
    expected.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    assert comparison.display_size == expected.size == (512, 341)
    left, top, right, bottom = crop_box(expected.size, engine.models["cnn"].preprocess)
    assert data["box"] == [left / 512, top / 341, right / 512, bottom / 341]
    assert engine.overlay(comparison, "cnn").size == expected.size
    assert np.array_equal(np.asarray(comparison.photo), np.asarray(expected))


def _graphs(folder) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in layout.graph_cache_dir(folder).glob("*.onnx")}


def test_graphs_are_cached_and_rebuilt_when_a_checkpoint_changes(tmp_path, photos):
    folder = export_lite_set(tmp_path / "set", TINY_CLASSES, seed=4)
    first = Engine(load_set(folder), warm_up=False)
    cached = _graphs(folder)
    assert len(cached) == 1 and first.runtimes == {"cnn": "onnx", "vit": "onnx", "bcnn": "onnx"}
    Engine(load_set(folder), warm_up=False)
    assert _graphs(folder) == cached  # reused, not exported again
    export_lite_set(tmp_path / "other", TINY_CLASSES, seed=5)
    shutil.copy(tmp_path / "other" / "bcnn.safetensors", folder / "bcnn.safetensors")
    changed = Engine(load_set(folder), warm_up=False)
    assert set(_graphs(folder)) - set(cached), "a new checkpoint must get a new graph"
    reference = Engine(load_set(folder), runtime="torch", warm_up=False)
    a, b = changed.run(photos[:1])[0], reference.run(photos[:1])[0]
    np.testing.assert_allclose(a.results["bcnn"].probs, b.results["bcnn"].probs, atol=1e-5)


def test_a_cache_file_that_does_not_match_is_refused_and_rebuilt(tmp_path, photos):
    folder = export_lite_set(tmp_path / "set", TINY_CLASSES, seed=6)
    other = export_lite_set(tmp_path / "other", TINY_CLASSES, seed=7)
    Engine(load_set(folder), warm_up=False)
    Engine(load_set(other), warm_up=False)
    (graph,) = layout.graph_cache_dir(folder).glob("*.onnx")
    (foreign,) = layout.graph_cache_dir(other).glob("*.onnx")
    shutil.copy(foreign, graph)  # a valid graph, but of other weights, under this set's name
    engine = Engine(load_set(folder), warm_up=False)
    reference = Engine(load_set(folder), runtime="torch", warm_up=False)
    np.testing.assert_allclose(engine.run(photos[:1])[0].results["cnn"].probs,
                               reference.run(photos[:1])[0].results["cnn"].probs, atol=1e-5)
    graph.write_bytes(b"not a graph")  # damaged: rebuilt as well
    engine = Engine(load_set(folder), warm_up=False)
    assert engine.runtimes["cnn"] == "onnx" and graph.stat().st_size > 1000


def test_a_set_folder_that_cannot_hold_the_cache_uses_the_user_cache(tmp_path, monkeypatch):
    folder = export_lite_set(tmp_path / "set", TINY_CLASSES, seed=8)
    monkeypatch.setattr(runtime, "USER_CACHE", tmp_path / "user-cache")
    layout.graph_cache_dir(folder).write_text("a file where the cache folder would go")  # as unwritable as read-only
    engine = Engine(load_set(folder), warm_up=False)
    assert engine.runtimes["cnn"] == "onnx" and list((tmp_path / "user-cache").glob("*.onnx"))
    assert layout.graph_cache_dir(folder).is_file()


def test_a_model_that_cannot_be_exported_answers_in_torch(lite_set, photos):
    from birdfg.heads import TransformerHead

    class Unexportable(torch.nn.Module):  # an operator ONNX has no translation for
        explanations = TransformerHead.explanations

        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, features):
            corner = features[:, :2, 0, :2]
            nothing = torch.linalg.eigvalsh(corner @ corner.transpose(1, 2)).sum(-1, keepdim=True) * 0
            return self.head(features) + nothing

    model_set = load_set(lite_set)
    plain = Engine(load_set(lite_set), runtime="torch", warm_up=False).run(photos[:1])[0]
    vit = model_set.models["vit"].model
    vit.head = Unexportable(vit.head)
    engine = Engine(model_set, warm_up=False)
    assert set(engine.runtimes.values()) == {"torch"}  # the whole group: it shares one graph
    answer = engine.run(photos[:1])[0]
    for key in plain.results:
        np.testing.assert_allclose(answer.results[key].probs, plain.results[key].probs, atol=1e-5)


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


def test_a_crop_box_without_crop_pct_uses_the_preprocessing_default():
    from birdfg.data import build_transform

    size = 320
    transform = build_transform({"input_size": [3, size, size], "mean": [0.5] * 3, "std": [0.5] * 3}, train=False)
    resize = transform.transforms[0].size
    photo = (640, 480)
    left, top, right, bottom = crop_box(photo, {})
    assert right - left == pytest.approx(min(photo) * size / resize, rel=1e-2)
