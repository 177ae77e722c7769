"""The project's example photos (examples/): offered by the running app next to an `--examples`
folder, each credited (author, licence, source, changes) under the gallery and under the photo
once clicked, and `/compare` answers on them."""
from __future__ import annotations

import csv
import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from test_app import check_answer, compare
from test_browser import browser  # noqa: F401 - the headless Chromium fixture

EXAMPLES = ROOT / "examples"


def credit_rows() -> list[dict[str, str]]:
    with open(EXAMPLES / "CREDITS.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plain(name: str) -> str:
    """A species name without case, spaces or hyphens ("Red-winged Blackbird" = "Red_winged_Blackbird")."""
    return re.sub(r"[^a-z]", "", name.lower())


def test_every_example_photo_has_a_credit_and_no_credit_lacks_a_photo():
    rows = credit_rows()
    photos = sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert sorted(r["file"] for r in rows) == photos and len(photos) == 9
    for row in rows:
        assert all(row[c].strip() for c in ("species", "author", "licence", "original", "changes")), row


@pytest.fixture(scope="module")
def config(app_url) -> dict:
    with urllib.request.urlopen(app_url + "config", timeout=10) as response:
        return json.load(response)


def by_elem_id(config: dict, elem_id: str) -> dict:
    return next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def test_the_app_offers_the_examples_then_the_examples_folder(config):
    gallery = next(c["props"] for c in config["components"] if c.get("type") == "dataset")
    names = [sample[0]["orig_name"] for sample in gallery["samples"]]
    ours = sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert names[:len(ours)] == ours
    assert len(names) > len(ours), "the --examples folder given to the app is missing from the gallery"


def test_the_gallery_credits_every_example(config):
    credits = by_elem_id(config, "example-credits")["value"]
    lines = [line for line in credits.splitlines() if line.startswith("- ")]
    rows = credit_rows()
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):  # in the gallery's order
        assert row["species"] in line and row["author"] in line and row["licence"] in line, line
        assert row["original"] in line
        if row["changes"].startswith("none"):
            assert "changed" not in line, line
        else:
            assert f"changed: {row['changes']}" in line, line
    assert "creativecommons.org/licenses/by-sa/3.0/" in credits


@pytest.mark.parametrize("photo", ["american_crow__1.jpg", "red_winged_blackbird__2.jpg"])
def test_compare_answers_on_an_example_and_names_its_species(client, photo):
    answer, *overlays = compare(client, EXAMPLES / photo)
    check_answer(answer)
    assert all(Path(p).is_file() for p in overlays)
    species = next(r["species"] for r in credit_rows() if r["file"] == photo)
    # The shipped lite set knows these two (a sanity check that the photos are what CREDITS.csv says).
    assert plain(answer["ensemble"]["top5"][0][0]) == plain(species), answer["ensemble"]


def test_the_credit_line_follows_the_photo_not_its_name(tmp_path):
    from birdfg.app.examples import Credits, offered_examples

    photos = offered_examples(None)
    credits = Credits(photos)
    copy = tmp_path / "upload.jpg"  # an example as Gradio hands it over: a copy, renamed
    shutil.copy(EXAMPLES / "gray_catbird__1.jpg", copy)
    line = credits.for_payload({"path": str(copy)})
    assert line.startswith("Gray Catbird — photo by Hari Krishnan, [CC BY-SA 4.0]"), line
    assert "resized and padded" in line and "the maps are drawn over it" in line
    impostor = tmp_path / "gray_catbird__1.jpg"  # an example's name, another photo
    impostor.write_bytes(copy.read_bytes()[:-1] + b"\0")
    assert credits.credit_text(impostor) == ""
    assert credits.for_payload(None) == "" and credits.credit_text(tmp_path) == ""


def test_offered_examples_add_the_own_folder_after_the_projects(tmp_path):
    from birdfg.app.examples import offered_examples
    from conftest import synthetic_photo

    synthetic_photo(0, 1).save(tmp_path / "mine.jpg")
    photos = offered_examples(tmp_path)
    assert [p.name for p in photos[:-1]] == sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert photos[-1] == tmp_path / "mine.jpg"
    assert offered_examples(tmp_path, defaults=None) == [tmp_path / "mine.jpg"]


def test_a_credits_file_without_its_columns_names_the_file(tmp_path):
    from birdfg.app.examples import read_credits

    (tmp_path / "CREDITS.csv").write_text("file,author\nx.jpg,Someone\n")
    with pytest.raises(ValueError, match=r"CREDITS.csv: missing column\(s\) species, licence, original, changes"):
        read_credits(tmp_path)


@pytest.mark.browser
def test_one_click_on_an_example_compares_and_credits_it(browser, app_url, sample_photo):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(90_000)
    try:
        page.goto(app_url)
        page.wait_for_selector("#photo input[type=file]", state="attached")
        page.click("button.gallery-item img[src$='/american_crow__1.jpg']")
        page.wait_for_function("document.querySelector('#photo-credit').innerText.includes('Mdf')")
        for key in ("cnn", "vit", "bcnn"):
            page.wait_for_selector(f"#label-{key} .output-class")
        assert "CC BY-SA 3.0" in page.inner_text("#photo-credit")
        # The visitor's own photo is nobody's example: the credit goes.
        page.locator("#photo input[type=file]").set_input_files(str(sample_photo))
        page.wait_for_function("document.querySelector('#photo-credit').innerText.trim() === ''")
    finally:
        page.close()
