"""Faithfulness metrics (birdfg/faithfulness.py): deletion / insertion on a tiny model whose answer
is one known patch, the pointing games on known maps and boxes, GradCAM against CAM and the
deletion test on the shipped set, `python -m birdfg.evaluate --faithfulness` end to end, where its
report may be stored, and the Models tab's table."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birdfg import faithfulness as fm
from conftest import ROOT, SHARED_DATA, SHIPPED_LITE, synthetic_photo

SIDE, CELL = 32, 8  # a 32 x 32 input, a 4 x 4 map grid
PATCH = (slice(24, 32), slice(0, 8))  # the bottom-left cell: all the tiny model looks at


def patch_model(batch: torch.Tensor) -> np.ndarray:
    """Two classes; class 0's logit is 8 x (the patch's mean - 0.5): it needs the bright patch."""
    logit = 8 * (batch[:, :, PATCH[0], PATCH[1]].mean(dim=(1, 2, 3)) - 0.5)
    return torch.stack([logit, torch.zeros_like(logit)], 1).softmax(1).numpy()


def patch_photo(seed: int = 0) -> torch.Tensor:
    """Background noise the model ignores, the patch at 1.0."""
    x = torch.randn(3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 0.5
    x[:, PATCH[0], PATCH[1]] = 1.0
    return x


def patch_map() -> np.ndarray:
    grid = np.zeros((SIDE // CELL, SIDE // CELL), np.float32)
    grid[3, 0] = 1.0
    return grid


def test_deletion_ranks_the_map_on_the_patch_above_random_and_the_centre_prior():
    x = patch_photo()
    assert patch_model(x[None])[0, 0] > 0.95  # the set-up: the model sees its class
    on_patch = fm.deletion_curve(patch_model, x, patch_map(), 0).auc
    centre = fm.deletion_curve(patch_model, x, fm.centre_prior((SIDE, SIDE)), 0).auc
    randoms = [fm.deletion_curve(patch_model, x, fm.random_map((4, 4), seed), 0, seed=seed).auc for seed in range(5)]
    assert on_patch < 0.15  # the class is gone once 1/16 of the pixels are
    assert on_patch < min(randoms) and on_patch < centre, (on_patch, randoms, centre)
    assert centre > np.mean(randoms)  # the patch is in a corner: the centre prior deletes it last


def test_insertion_ranks_the_map_on_the_patch_above_random_and_the_centre_prior():
    x = patch_photo(1)
    sigma = 6.0  # a blur that wipes the patch out, so that the start says "not class 0"
    fracs = fm.fractions(fm.DEFAULT_STEPS)

    def insertion(saliency, seed=0):
        p = fm.plan(x, {"m": saliency}, modes=(fm.INSERTION,), seed=seed, sigma=sigma)
        return fm.auc(fracs, p.curves(patch_model(p.inputs))[("m", fm.INSERTION)][:, 0])

    on_patch = insertion(patch_map())
    assert on_patch > 0.85
    assert on_patch > insertion(fm.centre_prior((SIDE, SIDE)))
    assert on_patch > max(insertion(fm.random_map((4, 4), s), s) for s in range(5))


def test_a_plan_removes_exactly_the_ranked_pixels_and_shares_its_endpoints():
    x = torch.rand(3, 8, 10) + 0.5  # no zero anywhere
    ranked = np.arange(80, dtype=np.float32).reshape(8, 10)  # pixel 79 first, then 78, ...
    p = fm.plan(x, {"a": ranked, "b": -ranked}, steps=4, sigma=1.5)
    # x, grey, blur once; 3 inner points per map and mode
    assert len(p.inputs) == 3 + 2 * 2 * 3
    a_del, b_del = p.rows[("a", fm.DELETION)], p.rows[("b", fm.DELETION)]
    assert a_del[0] == b_del[0] and a_del[-1] == b_del[-1]
    assert (p.inputs[a_del[0]] == x).all() and (p.inputs[a_del[-1]] == 0).all()
    assert p.rows[("a", fm.INSERTION)][-1] == a_del[0]  # insertion ends at the input itself
    for k, fraction in enumerate(p.fractions):
        removed = (p.inputs[a_del[k]] == 0).all(0).flatten()
        count = round(fraction * 80)
        assert int(removed.sum()) == count
        assert removed[80 - count:].all()  # the highest-ranked pixels, and only those
    blur = p.inputs[p.rows[("b", fm.INSERTION)][0]]
    assert torch.allclose(blur, fm.blurred(x, 1.5)) and not torch.allclose(blur, x, atol=0.05)
    restored = (p.inputs[p.rows[("b", fm.INSERTION)][1]] == x).all(0).flatten()
    assert restored[:20].all() and not restored[20:].any()  # map b ranks pixel 0 first


def test_auc_is_the_trapezoid_rule_over_fractions():
    assert fm.auc([0, 0.5, 1], [1, 0.5, 0]) == pytest.approx(0.5)
    assert fm.auc([0, 0.5, 1], [1, 0, 0]) == pytest.approx(0.25)
    assert fm.auc(fm.fractions(20), np.ones(21)) == pytest.approx(1.0)


def test_curves_need_one_call_of_the_model_for_many_maps():
    calls = []

    def counted(batch):
        calls.append(len(batch))
        return patch_model(batch)

    found = fm.curves(counted, patch_photo(), {"patch": patch_map(), "centre": fm.centre_prior((SIDE, SIDE))}, 0,
                      steps=10)
    assert len(calls) == 1 and set(found) == {(n, m) for n in ("patch", "centre") for m in fm.MODES}
    assert all(len(c.probs) == 11 for c in found.values())


def test_pointing_game_on_known_maps_and_boxes():
    grid = np.zeros((4, 4))
    grid[0, 3] = 5.0  # peak cell centre at (0.875, 0.125)
    assert fm.peak(grid) == (0.875, 0.125)
    assert fm.pointing_hit(grid, (0.75, 0.0, 1.0, 0.25))
    assert not fm.pointing_hit(grid, (0.0, 0.0, 0.5, 0.5))
    assert fm.centre_hit((0.4, 0.4, 0.6, 0.6)) and not fm.centre_hit((0.0, 0.0, 0.3, 0.3))
    # a box in photo pixels, as shares of the crop it is clipped to
    assert fm.unit_box((60, 50, 200, 100), (10, 0, 110, 100)) == (0.5, 0.5, 1.0, 1.0)


def test_energy_pointing_game_on_known_maps_and_boxes():
    box = (0.0, 0.0, 0.5, 0.5)  # the top-left quarter
    inside = np.zeros((4, 4))
    inside[:2, :2] = 1.0
    assert fm.energy_inside(inside, box) == pytest.approx(1.0)
    assert fm.energy_inside(np.ones((4, 4)), box) == pytest.approx(fm.box_share(box)) == pytest.approx(0.25)
    negative_outside = inside - 3 * (1 - inside)  # negative mass does not count
    assert fm.energy_inside(negative_outside, box) == pytest.approx(1.0)
    assert fm.energy_inside(-np.ones((4, 4)), box) == 0.0
    half = np.zeros((4, 4))
    half[0, :] = 1.0  # the top row: half of it in the box
    assert fm.energy_inside(half, box) == pytest.approx(0.5)
    # upsampled to the input size first: a flat map still scores the box's share
    assert fm.energy_inside(np.ones((10, 10)), (0.1, 0.2, 0.6, 0.7), (320, 320)) == pytest.approx(0.25, abs=0.01)


def test_baseline_maps():
    prior = fm.centre_prior((20, 20))
    assert np.unravel_index(prior.argmax(), prior.shape) in {(9, 9), (9, 10), (10, 9), (10, 10)}
    assert np.allclose(prior, prior.T) and np.allclose(prior, prior[::-1])
    assert (fm.random_map((10, 10), 3) == fm.random_map((10, 10), 3)).all()
    assert not (fm.random_map((10, 10), 3) == fm.random_map((10, 10), 4)).all()


# --- on the shipped set ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(app_checkpoints):
    from birdfg.checkpoints import load_set
    from birdfg.inference import Engine

    return Engine(load_set(app_checkpoints))


@pytest.fixture(scope="module")
def comparison(engine):
    photo = synthetic_photo(0, 3, (420, 300))
    return photo, engine.compare(photo)


def test_gradcam_on_the_linear_head_is_cam_without_its_negative_part(engine, comparison):
    if fm.gradcam_missing():
        pytest.skip(fm.gradcam_missing())
    from birdfg.overlay import normalise

    _, c = comparison
    for key in ("cnn", "bcnn"):
        model = engine.models[key].model
        grid = fm.gradcam_map(model, c.results[key].evidence.shared, 1)
        own = engine.explain(c, key, 1)
        assert grid.shape == own.shape
        gap = np.abs(normalise(np.clip(own, 0, None)) - grid).max()
        if key == "cnn":  # theory: GAP + linear -> GradCAM = ReLU(CAM), scaled
            assert gap < 1e-4, gap
        else:  # the bilinear head is not linear in the features: GradCAM is another map
            assert gap > 1e-2, gap


def test_deletion_test_is_one_batched_pass_per_group(engine, comparison, monkeypatch):
    photo, c = comparison
    calls = []
    original = engine.probabilities

    def counted(key, x, batch_size=32):
        calls.append((key, len(x), batch_size))
        return original(key, x, batch_size)

    monkeypatch.setattr(engine, "probabilities", counted)
    classes = {"cnn": 2, "vit": 5}
    found = fm.deletion_test(engine, c, photo, classes, steps=10)
    assert len(calls) == len(engine.groups)
    assert all(n <= size for _, n, size in calls)  # one runtime call each
    assert set(found) == set(engine.models)
    for key, r in found.items():
        chosen = classes.get(key, c.predicted(key))
        assert r["method"] == engine.methods[key][0].name and r["class_index"] == chosen
        assert len(r["fractions"]) == len(r["probs"]) == 11
        assert r["probs"][0] == pytest.approx(float(c.probs(key)[chosen]))
        assert 0.0 <= r["auc"] <= 1.0 and r["auc"] == pytest.approx(fm.auc(r["fractions"], r["probs"]))


def test_the_default_report_folder_is_only_for_the_data_the_set_was_trained_on(tmp_path):
    from birdfg.checkpoints import load_set
    from birdfg.evaluate import trained_elsewhere

    if not all((SHIPPED_LITE / f"{k}.safetensors").exists() for k in ("cnn", "vit", "bcnn")):
        pytest.skip("needs the shipped lite set")
    shipped = load_set(SHIPPED_LITE)
    assert trained_elsewhere(shipped, SHARED_DATA, None) is None
    assert "trained on" in trained_elsewhere(shipped, tmp_path, None)
    assert "split" in trained_elsewhere(shipped, SHARED_DATA, SHARED_DATA / "annotations.csv")

    # The command line refuses before any work, and writes nothing into the set.
    copy = tmp_path / "set" / "lite"
    copy.mkdir(parents=True)
    for key in ("cnn", "vit", "bcnn"):
        shutil.copy(SHIPPED_LITE / f"{key}.safetensors", copy)
    (tmp_path / "other" / "val_images").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "birdfg.evaluate", "--data", str(tmp_path / "other"),
                             "--checkpoints", str(copy), "--faithfulness"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--report-dir" in result.stderr and "--no-save" in result.stderr and "trained on" in result.stderr
    assert not (copy / "report").exists()


@pytest.mark.slow
def test_evaluate_faithfulness_on_real_val_photos(tmp_path, bird_data):
    if not all((SHIPPED_LITE / f"{k}.safetensors").exists() for k in ("cnn", "vit", "bcnn")):
        pytest.skip("needs the shipped lite set")
    stored = sorted((SHIPPED_LITE / "report").glob("*"))
    before = {p: p.stat().st_mtime_ns for p in stored}
    out = tmp_path / "faith.json"
    result = subprocess.run([sys.executable, "-m", "birdfg.evaluate", "--data", str(bird_data), "--checkpoints",
                             str(SHIPPED_LITE), "--faithfulness", "--limit", "3", "--faithfulness-steps", "4",
                             "--no-save", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cnn"]["total"] == 103 and "pointing_game" in report["cnn"]  # the existing keys stay
    section = report["faithfulness"]
    assert section["meta"]["photos"] == 3 and section["meta"]["points"] == 5 and "3 of 103" in section["meta"]["subset"]
    assert len(section["fractions"]) == 5 and len(section["per_photo"]) == 3
    expected = {"cnn": {"cam", "gradcam"}, "vit": {"contributions", "relevance", "rollout", "layer", "gradcam"},
                "bcnn": {"bilinear", "gradcam"}}
    for key, names in expected.items():
        model = section["models"][key]
        if fm.gradcam_missing():
            names = names - {"gradcam"}
        assert set(model["methods"]) == names | {"centre", "random"}
        assert model["default"] == {"cnn": "cam", "vit": "contributions", "bcnn": "bilinear"}[key]
        assert 0 <= model["centre_point_baseline"] <= 1 and 0 < model["box_share_baseline"] <= 1
        for name, m in model["methods"].items():
            assert 0 <= m["deletion_auc"] <= 1 and 0 <= m["insertion_auc"] <= 1
            assert len(m["deletion_curve"]) == len(m["insertion_curve"]) == 5
            assert 0 <= m["pointing_game"] <= 1 and 0 <= m["energy_pointing"] <= 1
            if name != "centre":
                assert m["wins_vs_centre"]["deletion"]["photos"] == 3
    assert all(section["models"]["vit"]["methods"][name]["peaks_differ_runner_up"] is not None
               for name in ("contributions", "relevance"))
    assert "faithfulness" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in stored} == before  # --no-save: the set's report untouched


# --- the Models tab ---------------------------------------------------------------------------------

def _method(label, kind, deletion, insertion, wins=(0.9, 0.9), pointing=0.95, energy=0.6):
    entry = {"label": label, "kind": kind, "class_specific": True, "deletion_auc": deletion,
             "insertion_auc": insertion, "pointing_game": pointing, "energy_pointing": energy}
    if wins is not None:
        entry["wins_vs_centre"] = {"deletion": {"share": wins[0]}, "insertion": {"share": wins[1]}}
    return entry


def test_models_tab_shows_the_faithfulness_table_and_says_where_a_map_loses(tmp_path, app_checkpoints):
    from birdfg.app.report import read_report
    from birdfg.checkpoints import load_set
    from birdfg.layout import faithfulness_png, report_path

    models = load_set(app_checkpoints).models
    folder = tmp_path / "lite"
    report_path(folder).parent.mkdir(parents=True)
    section = {"meta": {"subset": "all 103 photos", "points": 21}, "fractions": [0, 1], "models": {
        "cnn": {"default": "cam", "centre_point_baseline": 0.97, "box_share_baseline": 0.4,
                "gradcam_vs_relu_default_max": 7e-6, "methods": {
            "cam": _method("Class activation map", "method", 0.15, 0.63),
            "centre": _method("centre prior (Gaussian)", "baseline", 0.23, 0.55, wins=None, pointing=0.97),
            "random": _method("random map", "baseline", 0.31, 0.38)}},
        "vit": {"default": "relevance", "centre_point_baseline": 0.97, "box_share_baseline": 0.4, "methods": {
            "relevance": {**_method("Relevance for the species", "method", 0.18, 0.70), "peaks_differ_runner_up": 0.8},
            "rollout": _method("Rollout (all layers)", "method", 0.25, 0.72, wins=(0.4, 0.8)),
            "centre": _method("centre prior (Gaussian)", "baseline", 0.24, 0.65, wins=None, pointing=0.97),
            "random": _method("random map", "baseline", 0.39, 0.46)}},
    }}
    report_path(folder).write_text(json.dumps({"_meta": {"split": "val", "data": "birds"}, "faithfulness": section}))
    report = read_report(folder, models)
    assert "| Class activation map" in report.summary or "**Class activation map** (default)" in report.summary
    assert "0.150 | 0.630 | 90% / 90%" in report.summary
    assert "differs from the peak for the runner-up on 80%" in report.summary
    assert "GradCAM on " + models["cnn"].display_name + " is its Class activation map with the negative part" in report.summary
    lost = report.summary.split("Where a map loses")[1]
    assert "Rollout (all layers)** loses to the centre prior (Gaussian) on deletion (0.250 vs 0.240" in lost
    assert "only 40% of photos (deletion)" in lost
    assert "pointing game (95%) is no better than pointing at the photo centre (97%)" in lost
    assert "the default, loses to the same model's Rollout (all layers) on insertion (0.700 vs 0.720; higher" in lost
    assert "on deletion (0.180" not in lost  # relevance beats rollout on deletion
    assert "Class activation map** loses" not in lost
    assert report.curves == []  # no PNG yet
    Image.new("RGB", (40, 40)).save(faithfulness_png(folder))
    assert [Path(p).name for p, _ in read_report(folder, models).curves] == ["faithfulness_val.png"]

    for name, m in section["models"]["vit"]["methods"].items():  # nothing loses: the text says so
        m["deletion_auc"], m["insertion_auc"] = (0.1, 0.9) if m["kind"] == "method" else (0.3, 0.5)
        if name == "relevance":  # the default beats the model's other maps too
            m["deletion_auc"], m["insertion_auc"] = 0.09, 0.91
        m["pointing_game"], m["wins_vs_centre"] = 0.99, {"deletion": {"share": 0.9}, "insertion": {"share": 0.9}}
    for model in section["models"].values():
        model["centre_point_baseline"] = 0.5
    report_path(folder).write_text(json.dumps({"_meta": {"split": "val", "data": "birds"}, "faithfulness": section}))
    summary = read_report(folder, models).summary
    assert "Where a map loses" not in summary and "No model's own map loses" in summary
