"""The page: every component, laid out, with its first values (the default set's). No events:
birdfg/app/ui.py wires these components to the handlers."""
from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd

from birdfg.app.batch import MAX_BATCH
from birdfg.app.examples import example_credits, example_gallery
from birdfg.app.presentation import PREDICTED, blurb, column_header, set_status, species_choices
from birdfg.app.report import NO_SET, Report
from birdfg.app.sets import ModelSets
from birdfg.app.map_data import NOTHING, RUNNER_UP, rather_choices
from birdfg.app.view import DEFAULT_OPACITY, Menu, map_menus
from birdfg.inference import Engine
from birdfg.models import MODEL_KEYS
from birdfg.overlay import TURBO

TITLE = "birdfg — three bird classifiers, side by side"
INTRO = """# birdfg: which bird is it, and why does each model think so?
Drop a bird photo (or paste one, or use the webcam). A **CNN**, a **vision transformer** and a
**bilinear CNN** each name the species and show where on the photo they looked."""
HOWTO = """**How to read the maps.** Warm colours mark the places that pushed the model towards the
species named under the map; the dimmed border is the part of the photo the model never saw
(centre crop). Pick another species to ask *"why this one?"*, or a species to contrast with
(*"why X rather than Y?"*); clicking a species in a model's top 5 shows its maps too. The maps
are redrawn in your browser: the models do not run again."""
MAPS_JS = (Path(__file__).with_name("maps.js")).read_text()
# The colour map as 768 bytes in base64: one string to hold in the page's state, not 256 lists
TURBO_BYTES = base64.b64encode(TURBO.tobytes()).decode("ascii")
MAP_SIDE = 512  # longer side of a drawn map, in canvas pixels
PARTS_SIDE = 160
MAP_TEMPLATE = """<div class="birdmap" id="map-${model}" data-rendered="0">
<canvas class="birdmap-canvas" role="img" hidden></canvas>
<div class="birdmap-buttons"><button type="button" data-act="download" title="Download this map as a PNG">Download</button>
<button type="button" data-act="fullscreen" title="Show this map full screen">Fullscreen</button></div>
<p class="birdmap-caption" aria-live="polite"></p>
<div class="birdmap-parts" hidden aria-label="What adds most to the species (the map's largest terms)"></div>
</div>"""
MAP_CSS = """
.birdmap canvas.birdmap-canvas { width: 100%; height: auto; max-height: 340px; object-fit: contain;
  border-radius: 8px; display: block; margin: 0 auto; }
.birdmap-buttons { display: flex; gap: 0.5em; justify-content: flex-end; margin-top: 0.3em; }
.birdmap-canvas[hidden] + .birdmap-buttons { display: none; }  /* no map yet: nothing to download */
.birdmap-buttons button { font-size: 0.8em; padding: 0.1em 0.6em; border-radius: 6px;
  border: 1px solid var(--border-color-primary); background: var(--block-background-fill); cursor: pointer; }
.birdmap-caption { min-height: 2.6em; font-size: 0.92em; margin: 0.3em 0; }
.birdmap-parts { display: grid; grid-template-columns: repeat(4, 1fr); gap: 0.3em; }  /* one row: the top 5 stays in view */
.birdmap-parts figure { margin: 0; }
.birdmap-parts canvas { width: 100%; height: auto; border-radius: 6px; }
.birdmap-parts figcaption { font-size: 0.7em; text-align: center; overflow-wrap: anywhere; }
"""
CSS = """
.bird-col { border-radius: 14px !important; }
.bird-col .prose h3 { margin-bottom: 0.1em; }
#agree { font-size: 1.05em; padding: 0.8em 1em; border-radius: 12px;
         background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.map-note { min-height: 2.6em; font-size: 0.92em; }
#intro h1 { margin-bottom: 0.2em; }
"""


@dataclass
class ModelColumn:
    """One model's column. `menus` choose its map (view menu first; see birdfg/app/view.py);
    `parts` shows its map's largest terms when its default method has any."""

    key: str
    header: gr.Markdown
    blurb: gr.Markdown
    maps: gr.HTML  # the map, drawn in the browser from data (birdfg/app/maps.js)
    overlay: gr.Image  # the map drawn on the server, for `/compare` (hidden: clients that are not browsers)
    label: gr.Label
    menus: list[gr.Dropdown] = field(default_factory=list)


@dataclass
class Page:
    set_state: gr.State
    set_selector: gr.Dropdown
    status: gr.Markdown
    photo: gr.Image
    compare_button: gr.Button
    api_compare: gr.Button  # hidden: the trigger of the `/compare` API event
    species: gr.Dropdown
    rather: gr.Dropdown
    fetch_contrast: gr.Button  # in the page, not seen: maps.js clicks it for a contrast the maps lack
    opacity: gr.Slider
    test_button: gr.Button
    test_plot: gr.LinePlot
    test_verdict: gr.Markdown
    examples: gr.Examples | None
    columns: dict[str, ModelColumn]
    ensemble: gr.Label
    agree: gr.Markdown
    answer: gr.JSON
    batch_files: gr.File
    batch_button: gr.Button
    batch_csv: gr.File
    batch_table: gr.Dataframe
    report: gr.Markdown
    per_class: gr.Dataframe
    confusion: gr.Gallery
    curves: gr.Gallery
    photo_credit: gr.Markdown | None = None  # whose photo is shown (an example's credit)

    @property
    def overlays(self) -> list[gr.Image]:
        return [c.overlay for c in self.columns.values()]

    @property
    def maps(self) -> list[gr.HTML]:
        return [c.maps for c in self.columns.values()]

    @property
    def menus(self) -> list[gr.Dropdown]:
        return [menu for c in self.columns.values() for menu in c.menus]

    @property
    def view_controls(self) -> list[gr.components.Component]:
        """Everything that changes how the maps are drawn (in the browser), in `view_layout`'s order."""
        return [self.species, self.rather, self.opacity, *self.menus]

    def view_layout(self) -> str:
        """Where maps.js finds each setting in the values of `view_controls` (JSON)."""
        menus, at = {}, 3
        for key, column in self.columns.items():
            menus[key] = list(range(at, at + len(column.menus)))
            at += len(column.menus)
        return json.dumps({"species": 0, "rather": 1, "opacity": 2, "menus": menus})


TEST_INTRO = """Removes the pixels each model's map marks as most important, 10 % at a time (grey, the
dataset's mean colour), and records how fast the model's belief in the species drops: a faithful
map makes it drop fast (the deletion test of RISE, Petsiuk et al. 2018). Each model's default map,
for the species shown above."""


def menu_update(menu: Menu | None) -> dict:
    """A menu component showing `menu` at its default (hidden when the set has no such menu)."""
    if menu is None:
        return gr.update(visible=False)
    return gr.update(choices=menu.choices, value=menu.default, label=menu.label, visible=True)


def per_class_table(report: Report | None) -> pd.DataFrame | None:
    if not report or not report.per_class_rows:
        return None
    return pd.DataFrame(report.per_class_rows, columns=report.per_class_headers)


def build_page(sets: ModelSets, engine: Engine | None, problem: str | None, report: Report | None,
               examples: list[Path], server_functions: list[Callable] | None = None) -> Page:
    """The page's components, inside an open gr.Blocks, showing the default set (`engine`; None
    when it could not load, `problem` says why). `server_functions`: what maps.js may call on the
    server (`server.<name>(...)`)."""
    set_state = gr.State(sets.default)
    with gr.Row(equal_height=True):
        with gr.Column(scale=4):
            gr.Markdown(INTRO, elem_id="intro")
        # One set: no menu, and no empty column beside the title (it wrapped the title).
        several = len(sets.choices) > 1
        with gr.Column(scale=2, min_width=240, visible=several):
            set_selector = gr.Dropdown(sets.choices, value=sets.default, label="Model set",
                                       visible=several, interactive=True, elem_id="set-selector")
    status = gr.Markdown(set_status(sets, sets.default, engine, problem), elem_id="status")

    # The photo beside the three models, the controls over the maps they change: a visitor sees the
    # maps and top 5s where they drop a photo, without scrolling (tests/test_browser.py).
    with gr.Tab("Compare"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                photo = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"],
                                 label="Your bird photo", height=280, elem_id="photo")
                compare_button = gr.Button("Compare again", variant="primary")
                api_compare = gr.Button(visible=False)
                photo_credit = gr.Markdown(elem_id="photo-credit")
                example_set = example_gallery(examples, photo)
            with gr.Column(scale=3, min_width=300):
                with gr.Row():
                    species = gr.Dropdown(species_choices(engine.classes) if engine else [], value=PREDICTED,
                                          label="Show the maps for", interactive=True, elem_id="species",
                                          info="Each model's own top guess, or any species you choose.",
                                          min_width=200)  # on a phone, one under the other: readable
                    rather = gr.Dropdown(rather_choices(None, engine.classes) if engine else [], value=NOTHING,
                                         label="…rather than", interactive=True, elem_id="rather",
                                         info="Contrast: what favours the species above over this one.",
                                         min_width=200)
                    fetch_contrast = gr.Button(visible="hidden", elem_id="fetch-contrast")
                    opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Map opacity",
                                        elem_id="opacity", min_width=180)
                with gr.Row(equal_height=False):
                    columns = {key: _model_column(key, engine, server_functions) for key in MODEL_KEYS}
        gr.Markdown(HOWTO, elem_id="howto")
        with gr.Row(equal_height=True):
            ensemble = gr.Label(num_top_classes=5, label="Ensemble (mean of the three softmaxes)", scale=2,
                                elem_id="label-ensemble")
            agree = gr.Markdown(elem_id="agree")
        with gr.Accordion("Test the maps on this photo", open=False, elem_id="test-maps"):
            gr.Markdown(TEST_INTRO)
            test_button = gr.Button("Test the maps", elem_id="test-button")
            test_verdict = gr.Markdown(elem_id="test-verdict")
            test_plot = gr.LinePlot(x="removed", y="probability", color="model", x_title="share of the photo removed",
                                    y_title="probability of the species", elem_id="test-plot", height=260)
        with gr.Accordion("API answer (JSON, as `/compare` returns it)", open=False):
            answer = gr.JSON(label="/compare", elem_id="answer")
        example_credits(examples)

    with gr.Tab("Batch"):
        gr.Markdown(f"Classify several photos at once (up to {MAX_BATCH}); the table is also a CSV download.")
        with gr.Row():
            batch_files = gr.File(file_count="multiple", file_types=["image"], label="Photos", scale=2)
            with gr.Column(scale=1):
                batch_button = gr.Button("Classify all", variant="primary")
                batch_csv = gr.File(label="Download CSV", interactive=False)
        batch_table = gr.Dataframe(label="Results", interactive=False, wrap=True,
                                   column_widths=["20%", "15%", "15%", "15%", "15%", "20%"])

    with gr.Tab("Models"):
        report_md = gr.Markdown(report.summary if report else NO_SET, elem_id="report")
        per_class = gr.Dataframe(per_class_table(report), label="Per-class accuracy (val)", interactive=False,
                                 visible=bool(report and report.per_class_rows))
        confusion = gr.Gallery(report.confusion if report else [], label="Confusion matrices (val)", columns=3,
                               height=420, object_fit="contain", visible=bool(report and report.confusion))
        curves = gr.Gallery(report.curves if report else [], label="Faithfulness: mean deletion and insertion curves",
                            columns=1, height=520, object_fit="contain", visible=bool(report and report.curves),
                            elem_id="faithfulness-curves")

    return Page(set_state, set_selector, status, photo, compare_button, api_compare, species, rather, fetch_contrast,
                opacity, test_button, test_plot, test_verdict, example_set, columns, ensemble, agree, answer,
                batch_files, batch_button, batch_csv, batch_table, report_md, per_class, confusion, curves, photo_credit)


def _model_column(key: str, engine: Engine | None, server_functions: list[Callable] | None = None) -> ModelColumn:
    """A model's column, offering what its explanation methods offer (in the default set)."""
    methods = engine.methods.get(key, []) if engine else []
    with gr.Column(variant="panel", elem_classes=["bird-col"], min_width=200, elem_id=f"col-{key}"):
        # The answer first: name, map and top 5; what the map shows (and its menus) under them.
        header = gr.Markdown(column_header(engine, key))
        maps = gr.HTML(None, html_template=MAP_TEMPLATE, css_template=MAP_CSS, js_on_load=MAPS_JS,
                       model=key, turbo=TURBO_BYTES, opacity=DEFAULT_OPACITY, runner_up_value=RUNNER_UP,
                       side=MAP_SIDE, parts_side=PARTS_SIDE, elem_id=f"maps-{key}", apply_default_css=False,
                       server_functions=server_functions or None)
        overlay = gr.Image(label=f"{key} explanation", type="filepath", interactive=False, visible=False,
                           elem_id=f"overlay-{key}")
        label = gr.Label(num_top_classes=5, label="Top 5 (click for its maps)", elem_id=f"label-{key}")
        text = gr.Markdown(blurb(engine, key), elem_classes=["blurb"])
        menus = []
        if menu_specs := map_menus(methods):
            with gr.Row():
                view_menu, *extras = menu_specs
                # Side by side where the column is wide, one under the other in a narrow one (the
                # names of the views and heads stay readable).
                menus.append(gr.Dropdown(view_menu.choices, value=view_menu.default, label=view_menu.label,
                                         interactive=True, min_width=200, elem_id=f"view-{key}",
                                         elem_classes=["map-view"]))
                menus += [gr.Dropdown(m.choices, value=m.default, label=m.label, interactive=True, min_width=200,
                                      elem_classes=["map-option"]) for m in extras]
    return ModelColumn(key, header, text, maps, overlay, label, menus)


def theme() -> gr.themes.Base:
    # System fonts: a Space or an offline laptop must not wait for Google Fonts.
    return gr.themes.Soft(primary_hue="teal", secondary_hue="amber", neutral_hue="slate",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])
