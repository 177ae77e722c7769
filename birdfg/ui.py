"""The Gradio Blocks comparison app: layout and wiring only (the logic is in app_state.py).

Events
- `/compare` (API, `api_name="compare"`): one image (filepath) -> the JSON answer
  `{"models": {key: {"name", "top5", "latency_ms"[, "error"]}}, "ensemble": {"top5"}, "agree"}`,
  then the three overlays (cnn, vit, bcnn; None for a model that failed).
  Bad input never raises: the JSON is `{"error": "<what is wrong and what to do>"}`, the overlays
  are None, and the browser shows the same message as a warning toast.
- Species / opacity / ViT layer+head re-render the maps from the session's last comparison
  (kept server-side, see `ResultCache`); no model runs again.
- Model-set selector, batch mode (table + CSV) and the Models tab (stored evaluation report).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from birdfg import speed
from birdfg.app_state import (DEFAULT_OPACITY, MAX_BATCH, MEAN_HEADS, PREDICTED, ROLLOUT, ModelSets, ResultCache,
                              SetError, View, agreement, attention_choices, classify_files, display_table,
                              OutputFiles, find_examples, map_caption, model_header, read_report, render_overlay,
                              render_pairs, species_choices, top5)
from birdfg.compare import Comparator, Comparison
from birdfg.images import ImageError
from birdfg.memory import GrowthGuard
from birdfg.models import ENSEMBLE_KEY, MODEL_KEYS

log = logging.getLogger("birdfg.app")

TITLE = "birdfg — three bird classifiers, side by side"
INTRO = """# birdfg: which bird is it, and why does each model think so?
Drop a bird photo (or paste one, or use the webcam). A **CNN**, a **vision transformer** and a
**bilinear CNN** each name the species and show where on the photo they looked."""
HOWTO = """**How to read the maps.** Warm colours mark the places that pushed the model towards the
species named above the map; the dimmed border is the part of the photo the model never saw
(centre crop). Pick another species below to ask *"why not this one?"* — the maps change, the
models do not run again."""
MODEL_BLURB = {
    "cnn": "Class activation map: the classifier's weights for the species applied at every location.",
    "vit": "Attention rollout: how much the class token draws on each patch, through all layers.",
    "bcnn": "The species' bilinear score split exactly over locations; below, the channel pairs that weigh most.",
}
CSS = """
.bird-col { border-radius: 14px !important; }
.bird-col .prose h3 { margin-bottom: 0.1em; }
#agree { font-size: 1.05em; padding: 0.8em 1em; border-radius: 12px;
         background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.map-note { min-height: 2.6em; font-size: 0.92em; }
#intro h1 { margin-bottom: 0.2em; }
"""
QUEUE_SIZE = 16  # waiting requests beyond this are told the app is busy
MAX_FILE_SIZE = "20mb"


def _error_answer(message: str, warn: bool = True) -> dict[str, str]:
    log.info("answered with an error: %s", message)
    if warn:
        gr.Warning(message)
    return {"error": message}


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "api"


def _set_status(sets: ModelSets, name: str | None, comparator: Comparator | None, problem: str | None = None) -> str:
    lines = list(sets.notes)
    if comparator is not None:
        source = sets.sources[name]
        names = " · ".join(m.display_name for m in comparator.models.values())
        where = f"Hugging Face Hub (cached in `{source.folder}`)" if source.origin == "hub" else f"`{source.folder}`"
        lines.insert(0, f"Model set **{name}** from {where}: {names}.")
        missing = comparator.model_set.errors
        if missing:
            lines.append("⚠ " + " ".join(missing.values()))
    if problem:
        lines.append(f"⚠ {problem}")
    return "\n\n".join(lines)


def build(sets: ModelSets, examples: list[Path] | None = None, cache: ResultCache | None = None,
          output_files: OutputFiles | None = None) -> gr.Blocks:
    """The app's Blocks for the sets on offer (the default set is loaded here, once). Maps and CSVs
    are written to `output_files` and, like uploads, leave Gradio's cache after its `keep_s` seconds."""
    cache = cache or ResultCache()
    output_files = output_files or OutputFiles()
    memory_guard = GrowthGuard()
    sets.on_evict.append(cache.drop_set)
    comparator, problem = None, None
    try:
        comparator = sets.get(sets.default)
    except SetError as exc:
        problem = str(exc)
        log.error(problem)

    def comparator_for(name: str | None) -> Comparator:
        return sets.get(name)

    # --- handlers (thin: app_state does the work) ----------------------------------------------
    # Those that run models run on the torch thread, each as one job (see speed.TorchThread).

    @speed.on_torch_thread
    def compare(image: Any, set_name: str, view: View, request: gr.Request):
        """The API event: JSON answer + three overlays (+ the session's view, reset to predicted)."""
        view = View(PREDICTED, view.opacity, view.layer, view.head)
        none = [None] * len(MODEL_KEYS)
        cache.drop(_session(request))
        if not image:
            return _error_answer("No photo received: upload, paste or take a photo of a bird first."), *none, view
        path = image.get("path") if isinstance(image, dict) else image
        try:
            comparison = comparator_for(set_name).compare(path)
        except (ImageError, SetError) as exc:
            return _error_answer(str(exc).replace(str(path), "Your photo")), *none, view
        except Exception as exc:  # noqa: BLE001 - a request must never take the app down
            log.exception("compare failed")
            message = f"Something went wrong while comparing ({type(exc).__name__}: {exc})."
            return _error_answer(message), *none, view
        finally:
            memory_guard.check()
        cache.put(_session(request), set_name, comparison)
        return comparison.to_json(), *[draw(comparison, key, view) for key in MODEL_KEYS], view

    def draw(comparison: Comparison, key: str, view: View) -> str | None:
        """One overlay's file (None when that model has no result or its map fails)."""
        if key not in comparison.results:
            return None
        try:
            return output_files.image(render_overlay(comparison, key, view))
        except Exception:  # noqa: BLE001 - one broken map must not hide the others
            log.exception("overlay of %s failed", key)
            return None

    def captions(comparison: Comparison | None, view: View) -> list[str]:
        return [map_caption(comparison, key, view) if comparison else "" for key in MODEL_KEYS]

    @speed.on_torch_thread
    def details(set_name: str, view: View, request: gr.Request):
        """After a comparison: headers, top-5 labels, channel pairs, ensemble and agreement."""
        comparison = cache.get(_session(request), set_name)
        try:
            current = comparator_for(set_name)
        except SetError:
            current = None
        headers = [model_header(k, current.models.get(k) if current else None, comparison,
                                _missing(current, k)) for k in MODEL_KEYS]
        labels = [top5(comparison, k) for k in MODEL_KEYS]
        return (*headers, *labels, *captions(comparison, view), pair_files(comparison, view),
                top5(comparison, ENSEMBLE_KEY), agreement(comparison), gr.update(value=PREDICTED))

    @speed.on_torch_thread
    def rerender(species: str, opacity: float, layer: str, head: str, set_name: str, request: gr.Request):
        view = View(species or PREDICTED, float(opacity), layer or ROLLOUT, head or MEAN_HEADS)
        comparison = cache.get(_session(request), set_name)
        if comparison is None:  # nothing compared yet (or forgotten): just remember the view
            return *[gr.skip()] * (2 * len(MODEL_KEYS) + 1), view
        images = [draw(comparison, k, view) for k in MODEL_KEYS]
        return *images, *captions(comparison, view), pair_files(comparison, view), view

    def pair_files(comparison: Comparison | None, view: View) -> list[tuple[str, str]]:
        return [(output_files.image(image, "pair_"), caption) for image, caption in render_pairs(comparison, view)]

    @speed.on_torch_thread
    def select_set(name: str, current_name: str, request: gr.Request):
        try:
            chosen = comparator_for(name)
        except SetError as exc:
            gr.Warning(str(exc))
            return (gr.update(value=current_name), current_name, *[gr.skip()] * (len(set_outputs) - 2))
        cache.drop(_session(request))
        return (gr.update(value=name), name, *set_view(name, chosen))

    def set_view(name: str, chosen: Comparator | None) -> list:
        """Everything that depends on which set is in use (results are cleared)."""
        layers, heads = attention_choices(chosen)
        report = read_report(sets.sources[name].folder, chosen.models) if chosen else None
        values = [_set_status(sets, name, chosen, problem if chosen is None else None),
                  gr.update(choices=species_choices(chosen.classes) if chosen else [], value=PREDICTED),
                  gr.update(choices=layers, value=ROLLOUT), gr.update(choices=heads, value=MEAN_HEADS)]
        values += [model_header(k, chosen.models.get(k) if chosen else None, None, _missing(chosen, k))
                   for k in MODEL_KEYS]
        values += [None] * len(MODEL_KEYS)  # labels
        values += [None] * len(MODEL_KEYS) + [""] * len(MODEL_KEYS)  # overlays, map notes
        values += [[], None, "", None]  # pairs, ensemble, agreement, JSON
        values += _report_values(report)
        return values

    @speed.on_torch_thread
    def batch(files: list[str] | None, set_name: str):
        if not files:
            gr.Warning("Add some photos first (several files at once).")
            return gr.skip(), gr.skip()
        if len(files) > MAX_BATCH:
            gr.Warning(f"{len(files)} files: classifying the first {MAX_BATCH}. Split larger folders into several "
                       "runs, or use `python -m birdfg.predict` for a whole folder.")
            files = files[:MAX_BATCH]
        try:
            headers, rows = classify_files(comparator_for(set_name), files)
        except SetError as exc:
            gr.Warning(str(exc))
            return gr.skip(), gr.skip()
        shown_headers, shown = display_table(headers, rows)
        return pd.DataFrame(shown, columns=shown_headers), str(output_files.csv(headers, rows))

    def forget(request: gr.Request):
        cache.drop(_session(request))

    # --- layout --------------------------------------------------------------------------------

    layers, heads = attention_choices(comparator)
    report = read_report(sets.sources[sets.default].folder, comparator.models) if comparator else None
    # Uploaded photos and drawn maps pile up in Gradio's cache: drop the old ones regularly.
    keep_s = max(int(output_files.keep_s), 1)
    with gr.Blocks(title=TITLE, delete_cache=(min(keep_s, 600), keep_s)) as demo:
        set_state = gr.State(sets.default)
        view_state = gr.State(View())
        with gr.Row(equal_height=True):
            with gr.Column(scale=4):
                gr.Markdown(INTRO, elem_id="intro")
            with gr.Column(scale=2, min_width=240):
                set_selector = gr.Dropdown(sets.choices, value=sets.default, label="Model set",
                                           visible=len(sets.choices) > 1, interactive=True,
                                           elem_id="set-selector")
        status = gr.Markdown(_set_status(sets, sets.default, comparator, problem), elem_id="status")

        with gr.Tab("Compare"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=300):
                    image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"],
                                     label="Your bird photo", height=330, elem_id="photo")
                    compare_button = gr.Button("Compare again", variant="primary")
                with gr.Column(scale=3, min_width=300):
                    gr.Markdown(HOWTO)
                    species = gr.Dropdown(species_choices(comparator.classes) if comparator else [], value=PREDICTED,
                                          label="Show the maps for", interactive=True, elem_id="species",
                                          info="Each model's own top guess, or any species you choose.")
                    opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Map opacity")
                    example_set = None
                    if examples:
                        example_set = gr.Examples([[str(p)] for p in examples], inputs=[image],
                                                  label="Example photos (click one)", examples_per_page=12)
            headers, overlays, notes, labels = {}, {}, {}, {}
            with gr.Row(equal_height=False):
                for key in MODEL_KEYS:
                    loaded = comparator.models.get(key) if comparator else None
                    with gr.Column(variant="panel", elem_classes=["bird-col"], min_width=260, elem_id=f"col-{key}"):
                        headers[key] = gr.Markdown(model_header(key, loaded, None, _missing(comparator, key)))
                        gr.Markdown(MODEL_BLURB[key], elem_classes=["blurb"])
                        overlays[key] = gr.Image(label=f"{key} explanation", show_label=False, type="filepath",
                                                 interactive=False, height=300,
                                                 elem_id=f"overlay-{key}", buttons=["download", "fullscreen"])
                        notes[key] = gr.Markdown(elem_classes=["map-note"])
                        labels[key] = gr.Label(num_top_classes=5, label="Top 5", elem_id=f"label-{key}")
                        if key == "vit":
                            with gr.Row():
                                layer = gr.Dropdown(layers, value=ROLLOUT, label="Attention view", interactive=True,
                                                    min_width=120, elem_classes=["attention-layer"])
                                head = gr.Dropdown(heads, value=MEAN_HEADS, label="Head (single layer)",
                                                   interactive=True, min_width=100)
                        if key == "bcnn":
                            pairs = gr.Gallery(label="Channel pairs that add most to the species", columns=2,
                                               height="auto", object_fit="contain", elem_id="pairs")
            with gr.Row(equal_height=True):
                ensemble = gr.Label(num_top_classes=5, label="Ensemble (mean of the three softmaxes)", scale=2,
                                    elem_id="label-ensemble")
                agree = gr.Markdown(elem_id="agree")
            with gr.Accordion("API answer (JSON, as `/compare` returns it)", open=False):
                answer = gr.JSON(label="/compare", elem_id="answer")

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
            report_md = gr.Markdown(report.summary if report else "No model set loaded.", elem_id="report")
            per_class = gr.Dataframe(_per_class(report), label="Per-class accuracy (val)", interactive=False,
                                     visible=bool(report and report.per_class_rows))
            confusion = gr.Gallery(report.confusion if report else [], label="Confusion matrices (val)", columns=3,
                                   height=420, object_fit="contain", visible=bool(report and report.confusion))

        # --- wiring ------------------------------------------------------------------------------
        overlay_list = [overlays[k] for k in MODEL_KEYS]
        note_list = [notes[k] for k in MODEL_KEYS]
        compare_io = dict(fn=compare, inputs=[image, set_state, view_state],
                          outputs=[answer, *overlay_list, view_state],  # gr.State is not part of the API
                          preprocess=False,  # we open the file ourselves: bad uploads get a clear message
                          concurrency_id="models", concurrency_limit=1)
        details_io = dict(fn=details, inputs=[set_state, view_state],
                          outputs=[*headers.values(), *labels.values(), *note_list, pairs, ensemble, agree, species],
                          api_visibility="private", show_progress="hidden")
        gr.on([image.upload, compare_button.click], api_name="compare", **compare_io).then(**details_io)
        if example_set is not None:
            example_set.load_input_event.then(api_visibility="private", **compare_io).then(**details_io)
        gr.on([species.input, opacity.release, layer.input, head.input], rerender,
              inputs=[species, opacity, layer, head, set_state],
              outputs=[*overlay_list, *note_list, pairs, view_state], api_visibility="private",
              show_progress="minimal")
        set_outputs = [set_selector, set_state, status, species, layer, head, *headers.values(), *labels.values(),
                       *overlay_list, *note_list, pairs, ensemble, agree, answer, report_md, per_class, confusion]
        set_selector.input(select_set, [set_selector, set_state], set_outputs, api_visibility="private",
                           concurrency_id="models", concurrency_limit=1)
        batch_button.click(batch, [batch_files, set_state], [batch_table, batch_csv], api_name="batch",
                           concurrency_id="models", concurrency_limit=1)
        demo.unload(forget)
    return demo


def _missing(comparator: Comparator | None, key: str) -> str | None:
    if comparator is None:
        return None
    return comparator.model_set.errors.get(f"{key}.safetensors")


def _per_class(report) -> pd.DataFrame | None:
    if not report or not report.per_class_rows:
        return None
    return pd.DataFrame(report.per_class_rows, columns=report.per_class_headers)


def _report_values(report) -> list:
    if report is None:
        return ["No model set loaded.", gr.update(value=None, visible=False), gr.update(value=[], visible=False)]
    return [report.summary, gr.update(value=_per_class(report), visible=bool(report.per_class_rows)),
            gr.update(value=report.confusion, visible=bool(report.confusion))]


def theme() -> gr.themes.Base:
    # System fonts: a Space or an offline laptop must not wait for Google Fonts.
    return gr.themes.Soft(primary_hue="teal", secondary_hue="amber", neutral_hue="slate",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def serve(checkpoints: Path | None = None, hub_repo: str | None = None, examples_dir: Path | None = None,
          port: int | None = None, max_loaded: int = 2, keep_files_s: float = 3600) -> None:
    """Discover sets, load the default one, and serve until interrupted. Binds 127.0.0.1 unless
    GRADIO_SERVER_NAME says otherwise (a Space sets 0.0.0.0); port: `port`, GRADIO_SERVER_PORT, 7860.
    Uploads and drawn maps are deleted `keep_files_s` seconds after they were written."""
    sets = ModelSets.discover(checkpoints, hub_repo, max_loaded=max_loaded)
    examples = find_examples(examples_dir)
    demo = build(sets, examples, output_files=OutputFiles(keep_s=keep_files_s, prune_every_s=min(keep_files_s, 60)))
    # Two CPU cores: one model pass at a time (concurrency_id "models"), two cheap re-renders.
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=2)
    launch = functools.partial(
        demo.launch,
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=port or int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_FILE_SIZE,
        theme=theme(),
        css=CSS,
        footer_links=["api"],
        ssr_mode=False,
        show_error=False,
        prevent_thread_lock=True,
    )
    try:
        # This thread runs the requests' model work from here on (see speed.TorchThread).
        speed.TORCH_THREAD.serve_forever(start=launch)
    except KeyboardInterrupt:
        log.info("interrupted: closing the server")
    finally:
        demo.close()
