"""What each event does. Every handler returns a dict keyed by the page's components (those it
leaves out keep their value); the ones that run models hand their whole event to the worker
thread at once (birdfg/app/worker.py)."""
from __future__ import annotations

import logging
from typing import Any

import gradio as gr
import pandas as pd
from gradio.blocks import Block

from birdfg.app.batch import MAX_BATCH, classify_files, display_table
from birdfg.app.files import OutputFiles
from birdfg.app.page import Page, menu_update, per_class_table
from birdfg.app.presentation import PREDICTED, agreement, blurb, column_header, set_status, species_choices, top5
from birdfg.app.report import NO_SET, read_report
from birdfg.app.session import ResultCache, session_of
from birdfg.app.sets import ModelSets, SetError
from birdfg.app.view import View, draw_overlay, map_caption, map_menus, map_parts
from birdfg.app.worker import on_torch_thread
from birdfg.images import ImageError
from birdfg.inference import Comparison, Engine
from birdfg.memory import GrowthGuard
from birdfg.models import ENSEMBLE_KEY

log = logging.getLogger("birdfg.app")

# Gradio resolves the handlers' annotations to find `gr.Request`: every name in them must exist
# at run time, or it silently passes no request.
Updates = dict[Block, Any]
NO_PHOTO = "No photo received: upload, paste or take a photo of a bird first."


def error_answer(message: str) -> dict[str, str]:
    """The `/compare` answer for input it cannot use; the browser shows it as a warning too."""
    log.info("answered with an error: %s", message)
    gr.Warning(message)
    return {"error": message}


class Handlers:
    def __init__(self, sets: ModelSets, cache: ResultCache, files: OutputFiles, page: Page,
                 default_problem: str | None = None):
        self.sets, self.cache, self.files, self.page = sets, cache, files, page
        self.default_problem = default_problem  # why the default set did not load, if it did not
        self.memory_guard = GrowthGuard()

    # --- compare and its details ----------------------------------------------------------------

    @on_torch_thread
    def compare(self, image: Any, set_name: str, view: View, request: gr.Request) -> Updates:
        """Name the bird species in one photo with three classifiers side by side (a CNN, a vision
        transformer and a bilinear CNN) and their ensemble, and show where on the photo each model looked.
        The models know 20 North American species of CUB-200-2011, named in the answer as: Groove billed
        Ani, Brewer Blackbird, Red winged Blackbird, Rusty Blackbird, Yellow headed Blackbird, Bobolink,
        Indigo Bunting, Lazuli Bunting, Painted Bunting, Gray Catbird, Yellow breasted Chat, Eastern Towhee,
        Brandt Cormorant, Bronzed Cowbird, Brown Creeper, American Crow, Fish Crow, Black billed Cuckoo,
        Yellow billed Cuckoo, Gray crowned Rosy Finch. Any other bird still gets the closest of these.

        Args:
            image: the bird photo (JPEG, PNG, WebP, GIF, BMP or TIFF; at most 20 MB); best with one bird, large in the frame.
            set_name: (session state, not an input of the API) the model set in use.
            view: (session state, not an input of the API) how the maps are drawn.
            request: (from Gradio, not an input of the API) the caller's session.

        Returns:
            first a JSON object: {"models": {"cnn": M, "vit": M, "bcnn": M}, "ensemble": {"top5": T}, "agree": true when the three top species are the same}
            where M is {"name": the model's name, "top5": T, "latency_ms": its time} and T is [[species, probability], ...], most likely first, probabilities from 0 to 1
            a model that failed has "error" (a sentence) and an empty top5; a photo that cannot be used gives only {"error": what is wrong and what to do}
            then three images (cnn, vit, bcnn): the photo with the model's explanation map over it (warm colours pushed it towards its top species), or none where a model has no result
        """
        page, session = self.page, session_of(request)
        view = view.for_new_photo()
        self.cache.drop(session)
        updates: Updates = {page.answer: None, **dict.fromkeys(page.overlays), page.view_state: view}
        if not image:
            return {**updates, page.answer: error_answer(NO_PHOTO)}
        path = image.get("path") if isinstance(image, dict) else image  # the upload, unprocessed
        try:
            engine = self.sets.get(set_name)
            comparison = engine.compare(path)
        except (ImageError, SetError) as exc:
            return {**updates, page.answer: error_answer(str(exc).replace(str(path), "Your photo"))}
        except Exception as exc:  # noqa: BLE001 - a request must never take the app down
            log.exception("compare failed")
            message = f"Something went wrong while comparing ({type(exc).__name__}: {exc})."
            return {**updates, page.answer: error_answer(message)}
        finally:
            self.memory_guard.check()
        self.cache.put(session, set_name, comparison)
        return {**updates, page.answer: comparison.to_json(), **self._maps(engine, comparison, view)}

    @on_torch_thread
    def details(self, set_name: str, view: View, request: gr.Request) -> Updates:
        """After a comparison: headers, top-5 labels, map notes and parts, ensemble, agreement."""
        page = self.page
        comparison = self.cache.get(session_of(request), set_name)
        engine = self._engine(set_name)
        updates: Updates = {page.species: gr.update(value=PREDICTED), page.ensemble: top5(comparison, ENSEMBLE_KEY),
                            page.agree: agreement(comparison)}
        for key, column in page.columns.items():
            updates[column.header] = column_header(engine, key, comparison)
            updates[column.label] = top5(comparison, key)
        return {**updates, **self._notes(engine, comparison, view)}

    @on_torch_thread
    def rerender(self, values: dict[Block, Any], request: gr.Request) -> Updates:
        """The maps again for another species, opacity or method (from the session's comparison;
        no model runs). `values`: the view controls and the set, by component."""
        page = self.page
        view = page.view_from(values)
        set_name = values[page.set_state]
        comparison = self.cache.get(session_of(request), set_name)
        if comparison is None:  # nothing compared yet (or forgotten): just remember the view
            return {page.view_state: view}
        engine = self.sets.get(set_name)  # loaded: a set's results are forgotten when it leaves memory
        return {**self._maps(engine, comparison, view), **self._notes(engine, comparison, view), page.view_state: view}

    def _maps(self, engine: Engine, comparison: Comparison, view: View) -> Updates:
        """Every model's overlay file (None when it has no result or its map fails)."""
        updates: Updates = {}
        for key, column in self.page.columns.items():
            try:
                updates[column.overlay] = self.files.image(draw_overlay(engine, comparison, key, view))
            except Exception:  # noqa: BLE001 - one broken map must not hide the others
                log.exception("overlay of %s failed", key)
                updates[column.overlay] = None
        return updates

    def _notes(self, engine: Engine | None, comparison: Comparison | None, view: View) -> Updates:
        """The note under every map and every parts gallery ("" and [] without a comparison)."""
        updates: Updates = {}
        for key, column in self.page.columns.items():
            updates[column.note] = map_caption(engine, comparison, key, view) if engine else ""
            if column.parts is not None:
                parts = map_parts(engine, comparison, key, view) if engine else []
                updates[column.parts] = [(self.files.image(image, "pair_"), caption) for caption, image in parts]
        return updates

    # --- model sets -----------------------------------------------------------------------------

    @on_torch_thread
    def select_set(self, name: str, current: str, view: View, request: gr.Request) -> Updates:
        """Switch the session to set `name` (loading it if needed); results are cleared."""
        page = self.page
        try:
            engine = self.sets.get(name)
        except SetError as exc:
            gr.Warning(str(exc))
            return {page.set_selector: gr.update(value=current), page.set_state: current}
        self.cache.drop(session_of(request))
        return {page.set_selector: gr.update(value=name), page.set_state: name,
                page.view_state: View(opacity=view.opacity), **self.set_view(name, engine)}

    def set_view(self, name: str, engine: Engine | None) -> Updates:
        """Everything that shows which set is in use, at its defaults and without results."""
        page = self.page
        problem = self.default_problem if engine is None else None
        updates: Updates = {
            page.status: set_status(self.sets, name, engine, problem),
            page.species: gr.update(choices=species_choices(engine.classes) if engine else [], value=PREDICTED),
            page.ensemble: None, page.agree: "", page.answer: None,
        }
        for key, column in page.columns.items():
            menus = map_menus(engine.methods.get(key, [])) if engine else []
            updates |= {column.header: column_header(engine, key), column.blurb: blurb(engine, key),
                        column.label: None, column.overlay: None, column.note: ""}
            # The page has the menus of the default set's model; another set's fill them in order.
            updates |= {menu: menu_update(menus[i] if i < len(menus) else None) for i, menu in enumerate(column.menus)}
            if column.parts is not None:
                updates[column.parts] = []
        report = read_report(self.sets.sources[name].folder, engine.models) if engine else None
        updates[page.report] = report.summary if report else NO_SET
        updates[page.per_class] = gr.update(value=per_class_table(report), visible=bool(report and report.per_class_rows))
        updates[page.confusion] = gr.update(value=report.confusion if report else [],
                                            visible=bool(report and report.confusion))
        return updates

    def _engine(self, name: str | None) -> Engine | None:
        try:
            return self.sets.get(name)
        except SetError:
            return None

    # --- batch and leaving ------------------------------------------------------------------------

    @on_torch_thread
    def batch(self, files: list[str] | None, set_name: str) -> Updates:
        """Classify several bird photos at once (up to 64) with the same three classifiers as compare
        (a CNN, a vision transformer and a bilinear CNN) and their ensemble: one row per photo, no maps.

        Args:
            files: the photos (JPEG, PNG, WebP, GIF, BMP or TIFF; at most 20 MB each); past the first 64 they are left out.
            set_name: (session state, not an input of the API) the model set in use.

        Returns:
            first a table {"headers": ["photo", "cnn", "vit", "bcnn", "ensemble", "note"], "data": [[file name, "Species (87%)", ...], ...]}: each model's top species with its probability, and a note for a photo that could not be read (its model cells empty)
            then a CSV file of the same rows with the top species and probability in separate columns ("cnn top-1", "cnn conf", ..., "ensemble top-1", "ensemble conf", "note")
        """
        if not files:
            gr.Warning("Add some photos first (several files at once).")
            return gr.skip()
        if len(files) > MAX_BATCH:
            gr.Warning(f"{len(files)} files: classifying the first {MAX_BATCH}. Split larger folders into several "
                       "runs, or use `python -m birdfg.predict` for a whole folder.")
            files = files[:MAX_BATCH]
        try:
            headers, rows = classify_files(self.sets.get(set_name), files)
        except SetError as exc:
            gr.Warning(str(exc))
            return gr.skip()
        shown_headers, shown = display_table(headers, rows)
        return {self.page.batch_table: pd.DataFrame(shown, columns=shown_headers),
                self.page.batch_csv: str(self.files.csv(headers, rows))}

    def forget(self, request: gr.Request) -> None:
        """The visitor left: drop their comparison."""
        self.cache.drop(session_of(request))
