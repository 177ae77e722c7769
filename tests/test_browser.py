"""The app in a real headless Chromium (Debian's, driven by Playwright): upload a photo, wait for
three answers and three drawn maps, ask for another species, a contrast, another opacity and
another view (redrawn in the page, no request), download a map, see the maps drawn while the
event is held back (the page's own call for them), see a large photo's maps drawn while the photo
box's own download is held back (the page's copy of the file), remove the photo and its maps, test
the maps, use a phone-sized page, look at the Models tab, switch sets. Saves
tests/artifacts/compare.png."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

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


def rendered(page) -> list[str]:
    """Each model's map counter (the contract: it changes whenever that map has been drawn)."""
    return page.evaluate("keys => keys.map(k => document.querySelector('#map-' + k)?.dataset.rendered)", list(KEYS))


def redrawn(page, before: list[str]) -> None:
    page.wait_for_function("([keys, old]) => keys.every((k, i) => document.querySelector('#map-' + k).dataset.rendered !== old[i])",
                           arg=[list(KEYS), before])


def pixels(page) -> list[str]:
    return page.evaluate("keys => keys.map(k => document.querySelector('#map-' + k + ' canvas').toDataURL())", list(KEYS))


def caption(page, key: str) -> str:
    return page.inner_text(f"#map-{key} .birdmap-caption")


def drop_photo(page, photo) -> None:
    page.locator("#photo input[type=file]").set_input_files(str(photo))
    page.wait_for_function("keys => keys.every(k => { const m = document.querySelector('#map-' + k); "
                           "return m && m.dataset.rendered > 0 && !m.querySelector('canvas').hidden; })", arg=list(KEYS))


def labels_shown(page, keys=KEYS) -> None:
    """Until each model's top-5 label has an answer; a timeout says what the page showed instead
    (its toasts: an error or a busy queue)."""
    try:
        for key in keys:
            page.wait_for_selector(f"#label-{key} .output-class")
    except Exception as exc:
        toasts = page.locator(".toast-body").all_inner_texts()
        raise AssertionError(f"no answer in the labels; the page's toasts: {toasts}") from exc


def test_upload_compare_and_ask_about_another_species(page, sample_photo):
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    hidden_maps(page)  # before any photo: no map, and nothing to download
    drop_photo(page, sample_photo)
    labels_shown(page)
    page.wait_for_function("document.querySelector('#agree').innerText.trim().length > 0")
    top = {k: page.inner_text(f"#label-{k} .output-class").strip() for k in KEYS}
    assert top["cnn"] in caption(page, "cnn")
    agree = page.inner_text("#agree")
    assert all(name in agree for name in top.values()), agree
    if len(set(top.values())) == 1:  # the sentence says what the three labels show
        assert agree.startswith("✓ All three agree"), agree
    else:
        assert "disagree" in agree.lower() and not agree.startswith("✓"), agree
    page.wait_for_timeout(1000)  # the ViT's remaining classes arrive in the same event
    # The second update of the same event: each column's header gives its time on this photo.
    page.wait_for_function("keys => keys.every(k => document.querySelector('#col-' + k).innerText"
                           ".includes('ms on this photo'))", arg=list(KEYS))

    # "Why this one?": maps for another species, drawn in the page without any request.
    other = next(o for o in option_labels(page, "#species")[1:] if o not in top.values())
    before, drawn, sent = rendered(page), pixels(page), len(requests)
    choose(page, "#species", other)
    redrawn(page, before)
    assert all(other in caption(page, k) for k in KEYS), [caption(page, k) for k in KEYS]
    assert all(a != b for a, b in zip(drawn, pixels(page)))  # every map changed, the ViT's too
    assert not [u for u in requests[sent:] if "/queue/join" in u]  # no event reached the server
    assert page.inner_text("#label-cnn .output-class").strip() == top["cnn"]  # answers unchanged

    # "...rather than": a contrast changes the maps again; the runner-up's came with the answer.
    before, drawn, sent = rendered(page), pixels(page), len(requests)
    choose(page, "#rather", "each model's runner-up")
    redrawn(page, before)
    assert any("rather than" in caption(page, k) for k in KEYS)
    assert any(a != b for a, b in zip(drawn, pixels(page)))
    page.wait_for_timeout(300)
    assert not [u for u in requests[sent:] if "/queue/join" in u]
    # A species none of the models has in its top two (the menu's last): the three default maps
    # are exact splits, so the page subtracts; the ViT's relevance (a gradient map) came with the
    # contrasts with the rivals only, so for it the page asks the server and draws the answer.
    far, sent = option_labels(page, "#rather")[-1], len(requests)
    choose(page, "#rather", far)
    arrived = ("([sel, name]) => { const t = document.querySelector(sel).innerText; "
               "return t.includes(name) && !t.includes('on its way'); }")
    page.wait_for_function(arrived, arg=["#map-vit .birdmap-caption", far])
    assert all(far in caption(page, k) for k in KEYS), [caption(page, k) for k in KEYS]
    choose(page, "#view-vit", "Relevance for the species")
    page.wait_for_function(arrived, arg=["#map-vit .birdmap-caption", far])
    assert [u for u in requests[sent:] if "/queue/join" in u]

    # Opacity: redrawn in the page too.
    before = rendered(page)
    page.locator("#opacity input[type=number]").fill("0.9")
    page.locator("#opacity input[type=number]").press("Enter")
    redrawn(page, before)

    # A click on a species in a top 5 shows the maps for it.
    choose(page, "#rather", "nothing (the plain map)")
    species = set(option_labels(page, "#species"))
    listed = [t.strip() for t in page.locator("#label-cnn").inner_text().splitlines()]
    runner_up = next(t for t in listed if t in species and t != top["cnn"])
    page.locator("#label-cnn").get_by_text(runner_up, exact=True).last.click()
    page.wait_for_function("([sel, name]) => document.querySelector(sel).innerText.includes(name)",
                           arg=["#map-vit .birdmap-caption", runner_up])

    # The ViT's attention of one layer (its menus come from its explanation methods).
    assert "Layer 1 only" in option_labels(page, "#view-vit")
    choose(page, "#view-vit", "Layer 1 only")
    page.wait_for_function("document.querySelector('#map-vit .birdmap-caption').innerText.includes('layer 1')")
    assert page.locator("#map-bcnn .birdmap-parts canvas").count() == 4  # B-CNN channel pairs
    assert page.locator("#col-cnn .map-view").count() == 0  # one method, no options: nothing to choose

    # Download a drawn map as a PNG.
    with page.expect_download() as download:
        page.locator("#map-cnn button[data-act=download]").click()
    saved = Path(download.value.path())
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.locator(".toast-body.error").count() == 0

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)


class Held(list):
    """The page's requests to `pattern` held back, until `released`."""
    released = False

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern


def hold(page, pattern: str) -> Held:
    """Hold back the page's requests to `pattern`: kept, unanswered, until release(). A request
    that reaches the handler once released (one can still be on its way to it while release()
    runs) goes on at once: none may be left waiting for good."""
    held = Held(pattern)

    def keep(route) -> None:
        if held.released:
            route.continue_()
        else:
            held.append(route)

    page.route(pattern, keep)
    return held


def hold_the_event(page) -> Held:
    """Hold back the page's event (its queue/join requests)."""
    return hold(page, "**/queue/join*")


def wait_until_held(page, held: Held, timeout_s: float = 30) -> None:
    """Until the page has asked for its event (the page's own call for the maps may answer first)."""
    for _ in range(int(timeout_s / 0.02)):
        if held:
            return
        page.wait_for_timeout(20)
    raise AssertionError("the photo's event never asked to join the queue")


def release(page, held: Held) -> None:
    held.released = True
    while held:
        held.pop(0).continue_()
    page.unroute(held.pattern)


def test_the_maps_come_before_the_events_answer(page, sample_photo):
    """maps.js asks for the photo's first maps by its SHA-256 as the upload starts
    (server.first_maps, the head start's answer) and draws them: here the page's event is held
    back (its queue/join request kept waiting) and the three maps are drawn all the same, while
    no label has come. Let go, the event's answer carries the same maps: the CNN's looks the same."""
    answered = []
    held = hold_the_event(page)
    page.on("response", lambda r: "component_server" in r.url and answered.append(r))
    before = rendered(page)
    drop_photo(page, sample_photo)
    wait_until_held(page, held)
    assert page.locator("#label-cnn .output-class").count() == 0  # the event has not answered
    assert len(answered) == 1 and answered[0].ok
    first = answered[0].json()
    assert {key for key, value in first["maps"].items() if value} == set(KEYS)
    early = rendered(page)
    assert all(int(now) == int(old) + 1 for now, old in zip(early, before)), (before, early)
    drawn = pixels(page)
    release(page, held)
    labels_shown(page)
    page.wait_for_timeout(1000)  # the ViT's second update
    assert pixels(page)[0] == drawn[0]


def test_a_large_photos_maps_are_drawn_over_the_pages_own_copy(page, sample_photo, tmp_path):
    """maps.js draws a photo larger than a map over a copy at a map's size, made from the file as
    it is chosen, not over the photo box's <img>, which shows the photo only once the upload has
    come back from the server (and for a phone photo costs a decode of its own after the maps
    came). Here the photo box's download is held back: the first maps, the event's answer and a
    species switch are drawn all the same, at the map's size, and upright: the photo is stored on
    its side with an EXIF orientation, as phones do."""
    large = tmp_path / "large.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show it
    with Image.open(sample_photo) as image:
        image.convert("RGB").resize((2016, 1344)).save(large, quality=90, exif=exif.tobytes())
    answered = []
    page.on("response", lambda r: "component_server" in r.url and answered.append(r))
    preview = hold(page, "**/gradio_api/file=**")
    drop_photo(page, large)
    labels_shown(page)
    assert answered and answered[0].json()["maps"]  # the first maps came from the page's own call
    page.wait_for_timeout(1000)  # the ViT's second update
    other = option_labels(page, "#species")[-1]
    before = rendered(page)
    choose(page, "#species", other)
    redrawn(page, before)
    assert all(other in caption(page, k) for k in KEYS)
    assert preview and page.evaluate("() => !document.querySelector('#photo img')?.naturalWidth")
    sizes = page.evaluate("keys => keys.map(k => { const c = document.querySelector('#map-' + k + ' canvas'); "
                          "return [c.width, c.height]; })", list(KEYS))
    assert sizes == [[341, 512]] * 3, sizes  # 1344 x 2016 upright, at most 512 pixels
    release(page, preview)


def hidden_maps(page) -> None:
    page.wait_for_function("keys => keys.every(k => document.querySelector('#map-' + k + ' canvas').hidden)",
                           arg=list(KEYS))
    assert all(page.locator(f"#map-{k} button[data-act=download]").is_hidden() for k in KEYS)  # nothing to save


def test_removing_the_photo_removes_its_maps(page, sample_photo):
    """The photo box emptied ("Remove Image") takes the maps with it: once the event has
    answered, and while it is still held back (maps drawn from the page's own call: the emptied
    value equals the one they stood in for, so only maps.js can tell)."""
    remove = page.locator("#photo").get_by_role("button", name="Remove Image")
    drop_photo(page, sample_photo)
    labels_shown(page, ["cnn"])
    page.wait_for_timeout(1000)  # the ViT's second update: the model thread idle again
    remove.click()
    hidden_maps(page)

    held = hold_the_event(page)
    drop_photo(page, sample_photo)  # drawn while the event is held: the maps the page asked for
    wait_until_held(page, held)
    remove.click()
    hidden_maps(page)
    release(page, held)


def test_test_the_maps_draws_the_deletion_curves(page, sample_photo):
    drop_photo(page, sample_photo)
    page.locator("#test-maps").get_by_text("Test the maps on this photo").click()
    page.locator("#test-button").click()
    page.wait_for_function("document.querySelector('#test-verdict').innerText.includes('held up best')")
    page.wait_for_selector("#test-plot canvas, #test-plot svg")


def test_a_phone_sized_page_still_shows_the_maps(browser, app_url, sample_photo):
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        phone.set_default_timeout(TIMEOUT_MS)
        phone.goto(app_url)
        phone.wait_for_selector("#photo input[type=file]", state="attached")
        drop_photo(phone, sample_photo)
        widths = phone.evaluate("keys => keys.map(k => document.querySelector('#map-' + k + ' canvas').getBoundingClientRect().width)",
                                list(KEYS))
        assert all(100 < w <= 390 for w in widths), widths
        assert phone.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scrolling
        assert all(caption(phone, k) for k in KEYS)
    finally:
        phone.close()


def test_a_laptop_sized_page_shows_the_answer_where_the_photo_was_dropped(browser, app_url, sample_photo):
    """No scrolling to see what the models say: in a 1366 x 768 window the three maps lie whole
    within the window once drawn, and in a 1400 x 1000 one each model's top guess too."""
    inside = ("([sel, bottom]) => [...document.querySelectorAll(sel)].map(e => e.getBoundingClientRect())"
              ".map(r => [Math.round(r.top), Math.round(r.bottom), r.top >= 0 && r.bottom <= bottom])")
    for width, height, shown in ((1366, 768, "#maps-cnn canvas.birdmap-canvas, #maps-vit canvas.birdmap-canvas, "
                                               "#maps-bcnn canvas.birdmap-canvas"),
                                 (1400, 1000, "#label-cnn .output-class, #label-vit .output-class, "
                                              "#label-bcnn .output-class")):
        laptop = browser.new_page(viewport={"width": width, "height": height})
        try:
            laptop.set_default_timeout(TIMEOUT_MS)
            laptop.goto(app_url)
            laptop.wait_for_selector("#photo input[type=file]", state="attached")
            drop_photo(laptop, sample_photo)
            labels_shown(laptop)
            where = laptop.evaluate(inside, [shown, height])
            assert len(where) >= 3 and all(fits for *_, fits in where), (width, height, shown, where)
        finally:
            laptop.close()


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

