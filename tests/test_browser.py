"""The app in a real headless Chromium (Debian's, driven by Playwright): upload a photo, wait for
three answers and three maps, ask for another species, look at the Models tab, switch sets.
Saves tests/artifacts/compare.png."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ARTIFACTS

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
KEYS = ("cnn", "vit", "bcnn")
TIMEOUT_MS = 90_000  # a busy two-core machine


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`) for browser tests"
        print(reason)
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.wait_for_selector("#photo input[type=file]", state="attached")
    yield page
    page.close()


def choose(page, dropdown: str, option: str) -> None:
    """Type the option into the (filterable) dropdown and take the match, as a keyboard user would."""
    page.click(f"{dropdown} input")
    page.fill(f"{dropdown} input", option)
    page.keyboard.press("Enter")


def option_labels(page, dropdown: str) -> list[str]:
    page.click(f"{dropdown} input")
    page.wait_for_selector("[role=option]")
    labels = [o.replace("✓", "").strip() for o in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    return labels


def overlay_src(page, key: str) -> str:
    return page.locator(f"#overlay-{key} img").first.get_attribute("src")


def test_upload_compare_and_ask_about_another_species(page, sample_photo):
    page.locator("#photo input[type=file]").set_input_files(str(sample_photo))
    for key in KEYS:
        page.wait_for_selector(f"#label-{key} .output-class")
        page.wait_for_selector(f"#overlay-{key} img")
    page.wait_for_function("document.querySelector('#agree').innerText.trim().length > 0")
    top = {k: page.inner_text(f"#label-{k} .output-class").strip() for k in KEYS}
    assert top["cnn"] in page.inner_text("#col-cnn .map-note")
    agree = page.inner_text("#agree")
    assert all(name in agree for name in top.values()), agree
    if len(set(top.values())) == 1:  # the sentence says what the three labels show
        assert agree.startswith("✓ All three agree"), agree
    else:
        assert "disagree" in agree.lower() and not agree.startswith("✓"), agree

    # "Why not this one?": maps for another species, without running the models again.
    other = next(o for o in option_labels(page, "#species")[1:] if o != top["cnn"])
    before = overlay_src(page, "cnn")
    choose(page, "#species", other)
    page.wait_for_function(
        "([sel, name]) => document.querySelector(sel).innerText.includes(name)", arg=["#col-cnn .map-note", other])
    page.wait_for_function("([sel, old]) => document.querySelector(sel).getAttribute('src') !== old",
                           arg=["#overlay-cnn img", before])
    assert other in page.inner_text("#col-bcnn .map-note")
    assert page.inner_text("#label-cnn .output-class").strip() == top["cnn"]  # answers unchanged

    # The ViT's attention of one layer instead of the rollout (its menus come from its explanation methods).
    assert "Layer 1 only" in option_labels(page, "#view-vit")
    choose(page, "#view-vit", "Layer 1 only")
    page.wait_for_function("document.querySelector('#col-vit .map-note').innerText.includes('layer 1')")
    assert page.locator("#parts-bcnn img").count() >= 1  # B-CNN channel pairs
    assert page.locator("#col-cnn .map-view").count() == 0  # one method, no options: nothing to choose
    assert page.locator(".toast-body.error").count() == 0

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)


def test_models_tab_and_switching_sets(page, app_checkpoints):
    page.get_by_role("tab", name="Models").click()
    report = page.inner_text("#report")
    from birdfg.layout import report_path

    has_report = report_path(app_checkpoints).is_file()
    assert ("Report:" in report) if has_report else ("No evaluation report" in report)

    page.get_by_role("tab", name="Compare").click()
    choose(page, "#set-selector", next(t for t in option_labels(page, "#set-selector") if t.startswith("lite-copy")))
    page.wait_for_function("document.querySelector('#status').innerText.includes('lite-copy')")
    assert page.locator(".toast-body.error").count() == 0

