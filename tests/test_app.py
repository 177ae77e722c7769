"""The comparison app, for real: `python app.py` on localhost, called through `gradio_client`
with real photos and with every kind of bad upload; plus the app's own logic (set discovery,
hub fallback, the per-session cache, the stored report, batch tables) on real files."""
from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app_server
from conftest import synthetic_photo

KEYS = ("cnn", "vit", "bcnn")


def compare(client, path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)) if path is not None else None, api_name="/compare")


def check_answer(answer: dict) -> None:
    """The /compare contract."""
    assert set(answer) == {"models", "ensemble", "agree"}, answer
    assert set(answer["models"]) == set(KEYS)
    for key, entry in answer["models"].items():
        assert isinstance(entry["name"], str) and entry["name"], key
        assert entry["latency_ms"] > 0
        top5 = entry["top5"]
        assert len(top5) == min(5, len(top5)) > 0
        species, probs = zip(*top5)
        assert all(isinstance(s, str) and s for s in species)
        assert all(0.0 <= p <= 1.0 for p in probs) and list(probs) == sorted(probs, reverse=True)
    assert len(answer["ensemble"]["top5"]) == len(answer["models"]["cnn"]["top5"])
    tops = {entry["top5"][0][0] for entry in answer["models"].values()}
    assert answer["agree"] == (len(tops) == 1)


def test_compare_returns_the_contract_and_three_overlays(client, sample_photo):
    answer, *overlays = compare(client, sample_photo)
    check_answer(answer)
    assert len(overlays) == 3
    width, height = Image.open(sample_photo).size
    for path in overlays:
        with Image.open(path) as overlay:
            assert max(overlay.size) <= 512
            assert abs(overlay.width / overlay.height - width / height) < 0.02, (overlay.size, (width, height))


def test_the_api_is_documented_as_one_image_in(client):
    info = client.view_api(return_format="dict", print_info=False)
    compare_api = info["named_endpoints"]["/compare"]
    assert [p["component"] for p in compare_api["parameters"]] == ["Image"]
    assert [r["component"] for r in compare_api["returns"]] == ["Json", "Image", "Image", "Image"]


# --- bad input --------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_bad_inputs(folder: Path, photo: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def path(name: str) -> Path:
        files[name] = folder / name
        return files[name]

    path("notes.jpg").write_text("this is a shopping list, not a photo")
    path("empty.png").write_bytes(b"")
    raw = photo.read_bytes()
    path("truncated.jpg").write_bytes(raw[: len(raw) // 3])
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path("one_pixel.png"))
    # A 20000 x 20000 PNG header over a few bytes of data: must be refused before decoding.
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path("bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                 + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))
    image = Image.open(photo).convert("RGB")
    rgba = image.convert("RGBA")
    rgba.putalpha(100)
    rgba.save(path("transparent.png"))
    image.convert("CMYK").save(path("cmyk.jpg"))
    image.convert("L").save(path("grey.jpg"))
    frames = [image.resize((240, 180)), image.resize((240, 180)).rotate(15)]
    frames[0].save(path("animated.gif"), save_all=True, append_images=frames[1:], duration=80, loop=0)
    return files


REFUSED = {"notes.jpg": "not a recognised image", "empty.png": "empty", "truncated.jpg": "truncated",
           "one_pixel.png": "too small", "bomb.png": "MP limit"}
ACCEPTED = ("transparent.png", "cmyk.jpg", "grey.jpg", "animated.gif")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, sample_photo) -> dict[str, Path]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad"), sample_photo)


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_upload_gets_a_clear_message(client, app_url, bad_inputs, name):
    answer, *overlays = compare(client, bad_inputs[name])
    assert set(answer) == {"error"}, answer
    assert REFUSED[name].lower() in answer["error"].lower(), answer["error"]
    assert str(bad_inputs[name].parent) not in answer["error"]  # no server paths in messages
    assert overlays == [None, None, None]
    assert app_server.is_alive(app_url)


@pytest.mark.parametrize("name", ACCEPTED)
def test_unusual_but_valid_images_get_a_result(client, bad_inputs, name):
    answer, *overlays = compare(client, bad_inputs[name])
    check_answer(answer)
    assert all(Path(p).is_file() for p in overlays)


def test_no_image_gets_a_clear_message_and_the_app_still_answers(client, app_url, sample_photo):
    answer, *overlays = compare(client, None)
    assert "no photo" in answer["error"].lower()
    assert overlays == [None, None, None]
    check_answer(compare(client, sample_photo)[0])


def test_batch_gives_a_table_and_a_csv(client, sample_photo, bad_inputs):
    from gradio_client import handle_file

    files = [handle_file(str(sample_photo)), handle_file(str(bad_inputs["notes.jpg"])),
             handle_file(str(bad_inputs["grey.jpg"]))]
    table, csv_path = client.predict(files, api_name="/batch")
    headers, rows = table["headers"], table["data"]
    assert headers == ["photo", "cnn", "vit", "bcnn", "ensemble", "note"]
    assert [r[0] for r in rows] == [sample_photo.name, "notes.jpg", "grey.jpg"]
    assert rows[1][1:5] == ["", "", "", ""] and "unreadable" in rows[1][-1] and "/" not in rows[1][-1]
    assert all(r[4].endswith("%)") and r[-1] == "" for r in (rows[0], rows[2]))
    with open(csv_path, newline="") as f:
        saved = list(csv.reader(f))
    assert saved[0][:3] == ["photo", "cnn top-1", "cnn conf"]
    assert saved[0][-3:] == ["ensemble top-1", "ensemble conf", "note"]
    assert len(saved) == 4 and 0 <= float(saved[3][saved[0].index("ensemble conf")]) <= 1


def test_the_page_is_served_on_localhost_with_examples(app_url):
    import urllib.request

    assert app_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(app_url + "config", timeout=10) as response:
        config = json.load(response)
    kinds = [c.get("type") for c in config["components"]]
    assert "dataset" in kinds, "the --examples gallery is missing"
    selector = next(c for c in config["components"] if c.get("props", {}).get("label") == "Model set")
    assert [choice[1] for choice in selector["props"]["choices"]] == ["lite", "lite-copy"]


# --- the app's logic, in process --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_set(app_checkpoints):
    """The app's set loaded in this process once (tests that change a model put it back)."""
    from birdfg.checkpoints import load_set

    return load_set(app_checkpoints)


def fake_set(folder: Path, keys=KEYS) -> Path:
    from birdfg.layout import checkpoint_path

    folder.mkdir(parents=True, exist_ok=True)
    for key in keys:
        checkpoint_path(folder, key).write_bytes(b"")
    return folder


def test_default_set_is_full_only_when_complete(tmp_path):
    from birdfg.app.sets import discover

    fake_set(tmp_path / "lite")
    fake_set(tmp_path / "full", keys=("cnn", "vit"))
    sources, default, notes = discover(tmp_path)
    assert [s.name for s in sources] == ["full", "lite"] and default == "lite" and not notes
    fake_set(tmp_path / "full")
    assert discover(tmp_path)[1] == "full"
    assert discover(tmp_path / "lite")[1] == "lite"  # --checkpoints pointing at one set


def test_no_checkpoints_says_what_to_do(tmp_path):
    from birdfg.app.sets import ModelSets, SetError

    sets = ModelSets.discover(tmp_path / "nothing")
    assert sets.default is None and "train.py" in sets.notes[0]
    with pytest.raises(SetError, match="train.py"):
        sets.get(None)


def test_hub_set_is_used_when_cached_and_offline_falls_back_to_disk(tmp_path, monkeypatch, app_checkpoints):
    from huggingface_hub import constants

    from birdfg.app.sets import discover
    from birdfg.layout import checkpoint_path

    fake_set(tmp_path / "sets" / "lite")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sources, default, notes = discover(tmp_path / "sets", hub_repo="birdfg/never-published")
    assert default == "lite" and "birdfg/never-published" in notes[0] and "using the local set `lite`" in notes[0]
    assert "offline" in notes[0]

    # A set downloaded earlier sits in the hub cache: offline, it is used from there.
    repo = tmp_path / "hub" / "models--birdfg--demo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for key in KEYS:
        checkpoint_path(snapshot, key).symlink_to(checkpoint_path(app_checkpoints, key).resolve())
    sources, default, notes = discover(tmp_path / "sets", hub_repo="birdfg/demo")
    assert default == "hub:birdfg/demo" and sources[0].folder == snapshot and not notes


def test_the_status_line_shows_notes_even_without_models(tmp_path):
    from birdfg.app.presentation import set_status
    from birdfg.app.sets import ModelSets

    sets = ModelSets.discover(tmp_path / "empty", hub_repo=None)
    status = set_status(sets, None, None, "No model set is available")
    assert "No model checkpoints found" in status and "No model set is available" in status


def test_sets_load_once_and_at_most_max_loaded_stay(app_checkpoints, tmp_path):
    from birdfg.app.session import ResultCache
    from birdfg.app.sets import ModelSets, discover

    root = app_server.sets_root(app_checkpoints, tmp_path)
    sets = ModelSets(*discover(root), max_loaded=1)
    cache = ResultCache()
    sets.on_evict.append(cache.drop_set)
    first = sets.get("lite")
    assert sets.get("lite") is first  # loaded once, shared
    cache.put("session-a", "lite", object())
    second = sets.get("lite-copy")
    assert second is not first and cache.get("session-a", "lite") is None  # evicted with its results
    assert sets.loaded == ["lite-copy"]


def test_one_failing_model_shows_its_error_and_the_others_answer(model_set, sample_photo):
    import torch

    from birdfg.app.map_data import model_maps
    from birdfg.app.presentation import agreement, column_header, top5
    from birdfg.inference import Engine

    bcnn = model_set.models["bcnn"].model

    class BrokenHead(torch.nn.Module):  # a head that fails at run time, as a corrupt one would
        explanations = type(bcnn.head).explanations  # it still offers the same maps

        def forward(self, features):
            raise RuntimeError("the head's weights are NaN")

    working_head, bcnn.head = bcnn.head, BrokenHead()
    try:
        engine = Engine(model_set, runtime="torch")
        comparison = engine.compare(sample_photo)
    finally:
        bcnn.head = working_head
    answer = comparison.to_json()
    assert "NaN" in answer["models"]["bcnn"]["error"] and answer["models"]["bcnn"]["top5"] == []
    assert answer["models"]["cnn"]["top5"] and answer["models"]["vit"]["top5"] and answer["ensemble"]["top5"]
    assert answer["agree"] is False
    assert "failed" in column_header(engine, "bcnn", comparison)
    assert model_maps(engine, comparison, "bcnn") is None  # no result, no map
    assert model_maps(engine, comparison, "cnn")["methods"]["cam"]["views"]
    assert engine.overlay(comparison, "cnn").size == comparison.photo.size
    assert top5(comparison, "bcnn") is None
    sentence = agreement(comparison)
    # One rule: the JSON says they do not agree, so neither does the sentence (even when the two
    # models that answered name the same species).
    assert f"{engine.models['bcnn'].display_name} failed" in sentence and not sentence.startswith("✓")


def test_the_agreement_sentence_follows_the_answer(model_set, sample_photo):
    """The sentence claims agreement exactly when the `/compare` answer's "agree" does."""
    from birdfg.app.presentation import agreement
    from birdfg.inference import Comparison, ModelResult

    classes = model_set.models["cnn"].classes

    def result(key, top):
        probs = np.full(len(classes), 0.1 / (len(classes) - 1), dtype=np.float32)
        probs[top] = 0.9
        return ModelResult(key, key.upper(), probs, 1.0)

    same = Comparison(classes, {k: result(k, 0) for k in KEYS})
    assert same.to_json()["agree"] and agreement(same).startswith("✓ **All three agree")
    split = Comparison(classes, {"cnn": result("cnn", 0), "vit": result("vit", 1), "bcnn": result("bcnn", 0)})
    assert not split.to_json()["agree"] and agreement(split).startswith("**They disagree**")
    one_failed = Comparison(classes, {**same.results, "bcnn": ModelResult("bcnn", "BCNN", error="broken")})
    assert not one_failed.to_json()["agree"] and not agreement(one_failed).startswith("✓")
    assert "BCNN failed" in agreement(one_failed)


def test_map_menus_come_from_the_explanation_methods(model_set):
    """The ViT's methods (token contributions, relevance, rollout, one layer with a head) become a
    view menu and a head menu whose values name the method and option (maps.js reads them); the
    CNN gets none."""
    from birdfg.app.view import map_menus
    from birdfg.explanations import explanations_of

    vit = explanations_of(model_set.models["vit"].model)
    view_menu, head_menu = map_menus(vit)
    labels = dict(view_menu.choices)
    assert view_menu.choices[0] == ("Token contributions", "contributions")
    assert labels["Relevance for the species"] == "relevance"
    assert labels["Rollout (all layers)"] == "rollout" and labels["Layer 1 only"] == "layer:layer=0"
    assert head_menu.choices[0] == ("Mean of heads", "layer:head=null") and dict(head_menu.choices)["Head 2"] == "layer:head=1"
    assert map_menus(explanations_of(model_set.models["cnn"].model)) == []


def test_map_data_has_every_view_and_exact_contrasts(model_set, sample_photo):
    """What the browser draws from: every class for the linear maps (a contrast is their
    difference; the ViT's token contributions, which cost a backward pass per class, for its own
    guess only in the quick first answer), every class and each rival for the ViT's relevance,
    every option combination of the per-layer view, and the B-CNN's channel pairs for every class."""
    import base64

    from birdfg.app.map_data import model_maps, options_key, rivals
    from birdfg.inference import Engine

    engine = Engine(model_set, warm_up=False)
    comparison = engine.compare(sample_photo)
    classes = len(engine.classes)

    def grids(encoded):
        return np.frombuffer(base64.b64decode(encoded), dtype="<f4")

    cnn = model_maps(engine, comparison, "cnn")
    cam = grids(cnn["methods"]["cam"]["views"][options_key({})]["all"]).reshape(classes, *cnn["grid"])
    np.testing.assert_allclose(cam[3] - cam[5], engine.explain(comparison, "cnn", 3, rather=5), rtol=1e-5, atol=1e-6)
    vit = model_maps(engine, comparison, "vit")
    assert vit["default"] == "contributions" and vit["methods"]["contributions"]["linear"]
    split = grids(vit["methods"]["contributions"]["views"][options_key({})]["all"]).reshape(classes, *vit["grid"])
    np.testing.assert_allclose(split[3] - split[5], engine.explain(comparison, "vit", 3, rather=5),
                               rtol=1e-5, atol=1e-6)
    relevance = vit["methods"]["relevance"]["views"][options_key({})]["maps"]
    against = rivals(comparison)
    assert {str(c) for c in range(classes)} <= set(relevance) and f"{vit['own']}-{against[-1]}" in relevance
    np.testing.assert_allclose(grids(relevance[f"2-{against[0]}"]).reshape(vit["grid"]),
                               engine.explain(comparison, "vit", 2, "relevance", rather=against[0]),
                               rtol=1e-5, atol=1e-7)
    assert len(vit["methods"]["layer"]["views"]) == 2 * 5  # layers x (mean + 4 heads)
    first = model_maps(engine, comparison, "vit", every_class=False)
    assert list(first["methods"]) == ["contributions"] and not first["methods"]["contributions"]["linear"]
    quick = first["methods"]["contributions"]["views"][options_key({})]
    assert set(quick["maps"]) == {str(vit["own"])}  # the first answer: the model's own guess only
    np.testing.assert_allclose(grids(quick["maps"][str(vit["own"])]).reshape(vit["grid"]), split[vit["own"]],
                               rtol=1e-5, atol=1e-6)
    bcnn = model_maps(engine, comparison, "bcnn")
    assert set(bcnn["parts"]) == {str(c) for c in range(classes)} and len(bcnn["parts"]["0"]) == 4
    left, top, right, bottom = bcnn["box"]
    assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1


def test_result_cache_is_a_small_lru_per_session():
    from birdfg.app.session import ResultCache

    cache = ResultCache(capacity=2)
    cache.put("a", "lite", "A")
    cache.put("b", "lite", "B")
    assert cache.get("a", "lite") == "A"  # a is now the most recent
    cache.put("c", "lite", "C")
    assert cache.get("b", "lite") is None and cache.get("a", "lite") == "A" and len(cache) == 2
    assert cache.get("a", "full") is None  # a result belongs to the set that made it


def test_models_tab_reads_the_stored_report(tmp_path, model_set):
    from birdfg.app.report import read_report
    from birdfg.layout import confusion_png, report_path

    folder, models = tmp_path / "lite", model_set.models
    folder.mkdir()
    empty = read_report(folder, models)
    assert "No evaluation report" in empty.summary and "--pointing-game" in empty.summary
    assert not empty.per_class_rows and not empty.confusion

    classes = models["cnn"].classes
    entry = {"accuracy": 0.5, "correct": 1, "total": 2, "per_class": {c: 0.5 for c in classes},
             "pointing_game": 0.75, "pointing_total": 4}
    report_path(folder).parent.mkdir()
    report_path(folder).write_text(json.dumps(
        {**{k: entry for k in (*KEYS, "ensemble")}, "_meta": {"split": "val", "data": "birds"}}))
    Image.new("RGB", (40, 40)).save(confusion_png(folder, "cnn"))
    report = read_report(folder, models)
    assert "75.0% of 4" in report.summary and "50.0% (1/2)" in report.summary
    assert report.per_class_headers[0] == "species" and len(report.per_class_headers) == 5
    assert len(report.per_class_rows) == len(classes)
    assert [caption for _, caption in report.confusion] == [models["cnn"].display_name]


def test_examples_take_one_photo_per_class_folder(tmp_path):
    from birdfg.app.examples import find_examples

    for label, name in enumerate(("001.A", "002.B", "003.C")):
        (tmp_path / name).mkdir()
        for i in range(3):
            synthetic_photo(label, i).save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "readme.txt").write_text("not a photo")
    picked = find_examples(tmp_path, limit=4)
    assert [p.parent.name for p in picked[:3]] == ["001.A", "002.B", "003.C"] and len(picked) == 4
    assert find_examples(tmp_path / "missing") == [] and find_examples(None) == []


def test_the_faithfulness_endpoint_answers_through_gradio_client(client, sample_photo):
    """`/faithfulness`: the deletion test of each model's map on a photo, for a species."""
    from gradio_client import handle_file

    plot, verdict = client.predict(handle_file(str(sample_photo)), "", api_name="/faithfulness")
    assert "held up best" in verdict
    rows = plot["value"]["data"] if "value" in plot else plot["data"]
    models = {row[-1] for row in rows}
    assert len(models) == 3 and all(0.0 <= row[1] <= 1.0 for row in rows)
    removed = sorted({row[0] for row in rows})
    assert removed[0] == 0.0 and removed[-1] == 1.0 and len(removed) == 11  # 10 % steps
