"""What each event does. Every handler returns a dict keyed by the page's components (those it
leaves out keep their value); the ones that run models hand their whole event to the worker
thread at once (birdfg/app/worker.py)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
from gradio.blocks import Block

from birdfg.app.batch import MAX_BATCH, classify_files, display_table
from birdfg.app.examples import Credits
from birdfg.app.files import OutputFiles
from birdfg.app.head_start import HeadStart
from birdfg.app.map_data import NOTHING, model_maps, needs_more, rather_choices, rather_index, rivals
from birdfg.app.page import Page, menu_update, per_class_table
from birdfg.app.presentation import (PREDICTED, agreement, blurb, column_header, faithfulness_verdict, set_status,
                                     species_choices, top5)
from birdfg.app.report import NO_SET, read_report
from birdfg.app.session import ResultCache, session_of
from birdfg.app.sets import ModelSets, SetError
from birdfg.app.view import DEFAULT_OPACITY, map_menus
from birdfg.app.worker import TORCH_THREAD, on_torch_thread
from birdfg.data import display_name
from birdfg.images import ImageError, open_rgb
from birdfg.inference import Comparison, Engine
from birdfg.memory import GrowthGuard
from birdfg.models import ENSEMBLE_KEY

log = logging.getLogger("birdfg.app")

# Gradio resolves the handlers' annotations to find `gr.Request`: every name in them must exist
# at run time, or it silently passes no request.
Updates = dict[Block, Any]
# Between the first and the second update of a comparison: the browser draws the first one
# meanwhile, on the same two cores the second one would otherwise take.
DRAW_FIRST_S = 0.15
NO_PHOTO = "No photo received: upload, paste or take a photo of a bird first."


def error_answer(message: str) -> dict[str, str]:
    """The `/compare` answer for input it cannot use; the browser shows it as a warning too."""
    log.info("answered with an error: %s", message)
    gr.Warning(message)
    return {"error": message}


@dataclass
class FirstAnswer:
    """A photo's comparison and each model's maps for the page's first update (model_maps'
    quick answer, as the map component's value), and the photo's path on the server."""
    comparison: Comparison
    maps: dict[str, str | None]
    path: str


class Handlers:
    def __init__(self, sets: ModelSets, cache: ResultCache, files: OutputFiles, page: Page,
                 default_problem: str | None = None, credits: Credits | None = None,
                 head_start: HeadStart | None = None):
        self.sets, self.cache, self.files, self.page = sets, cache, files, page
        self.head_start = head_start  # comparisons started when their photo arrived
        self.credits = credits  # the examples' attributions, shown under the photo when it is one
        self.default_problem = default_problem  # why the default set did not load, if it did not
        self.memory_guard = GrowthGuard()
        self.chosen_sets: dict[str, str] = {}  # the sessions that switched away from the default set

    def set_of(self, request: gr.Request) -> str:
        """The set the visitor's page uses (its set_state, which a page-side call does not carry)."""
        return self.chosen_sets.get(session_of(request), self.sets.default)

    # --- compare -----------------------------------------------------------------------------------

    def first_answer(self, set_name: str, path: str) -> FirstAnswer:
        """The photo's comparison and the maps of the page's first update (the head start's job,
        on the model thread)."""
        engine = self.sets.get(set_name)
        comparison = engine.compare(path)
        return FirstAnswer(comparison, {key: self._model_maps(engine, comparison, key, every_class=False)
                                        for key in self.page.columns}, str(path))

    async def first_maps(self, digest: str, request: gr.Request) -> dict[str, Any] | None:
        """Each model's first maps of the photo whose SHA-256 is `digest`, as soon as its head start
        has made them (maps.js asks while the photo is still on its way; the event answers the rest
        as before): {"path": the upload on the server, "maps": {key: the map component's value}}.
        None where there is no head start for it with the visitor's set."""
        if self.head_start is None or not isinstance(digest, str):
            return None
        answer = await self.head_start.finished(digest.lower(), self.set_of(request))
        return {"path": answer.path, "maps": answer.maps} if isinstance(answer, FirstAnswer) else None

    def _started(self, image: Any, set_name: str) -> FirstAnswer | None:
        """The head start's answer for this photo and set, if it has one ready."""
        path = image.get("path") if isinstance(image, dict) else image
        return self.head_start.take(set_name, path) if self.head_start and path else None

    def _comparison(self, image: Any, set_name: str, session: str,
                    started: FirstAnswer | None = None) -> tuple[Engine | None, Comparison | None, str | None]:
        """Compare the photo with every model of the set (or take `started`'s comparison) and keep
        the result for the session; (engine, comparison, None), or (None, None, what is wrong and
        what to do)."""
        self.cache.drop(session)
        if not image:
            return None, None, NO_PHOTO
        path = image.get("path") if isinstance(image, dict) else image  # the upload, unprocessed
        try:
            engine = self.sets.get(set_name)
            comparison = started.comparison if started else engine.compare(path)
        except (ImageError, SetError) as exc:
            return None, None, str(exc).replace(str(path), "Your photo")
        except Exception as exc:  # noqa: BLE001 - a request must never take the app down
            log.exception("compare failed")
            return None, None, f"Something went wrong while comparing ({type(exc).__name__}: {exc})."
        finally:
            self.memory_guard.check()
        self.cache.put(session, set_name, comparison)
        return engine, comparison, None

    @on_torch_thread
    def compare(self, image: Any, set_name: str, request: gr.Request) -> Updates:
        """Name the bird species in one photo with three classifiers side by side (a CNN, a vision
        transformer and a bilinear CNN) and their ensemble, and show where on the photo each model looked.
        The shipped models know 20 North American species of CUB-200-2011 (crows, blackbirds, buntings,
        cuckoos and others); any other bird still gets the closest of these.

        Args:
            image: the bird photo (JPEG, PNG, WebP, GIF, BMP or TIFF; at most 20 MB); best with one bird, large in the frame.
            set_name: (session state, not an input of the API) the model set in use.
            request: (from Gradio, not an input of the API) the caller's session.

        Returns:
            first a JSON object: {"models": {"cnn": M, "vit": M, "bcnn": M}, "ensemble": {"top5": T}, "agree": true when the three top species are the same}
            where M is {"name": the model's name, "top5": T, "latency_ms": its time} and T is [[species, probability], ...], most likely first, probabilities from 0 to 1
            a model that failed has "error" (a sentence) and an empty top5; a photo that cannot be used gives only {"error": what is wrong and what to do}
            then three images (cnn, vit, bcnn): the photo with the model's explanation map over it (warm colours pushed it towards its top species), or none where a model has no result
        """
        page = self.page
        updates: Updates = {page.answer: None, **dict.fromkeys(page.overlays)}
        engine, comparison, problem = self._comparison(image, set_name, session_of(request), self._started(image, set_name))
        if problem:
            return {**updates, page.answer: error_answer(problem)}
        for key, column in page.columns.items():
            try:
                drawn = engine.overlay(comparison, key, opacity=DEFAULT_OPACITY) if key in comparison.answered else None
                updates[column.overlay] = self.files.image(drawn) if drawn is not None else None
            except Exception:  # noqa: BLE001 - one broken map must not hide the others
                log.exception("overlay of %s failed", key)
                updates[column.overlay] = None
        return {**updates, page.answer: comparison.to_json()}

    def show(self, image: Any, set_name: str, request: gr.Request):
        """The browser's comparison, one event: the answer, every widget, and each model's maps as
        data (maps.js draws them). A gradient map answers first for the model's own guess; the
        rest follows in a second update of the same event."""
        first, engine, comparison = TORCH_THREAD.call(self._show, image, set_name, session_of(request))
        yield first
        if comparison is not None and any(needs_more(engine, comparison, key) for key in self.page.columns):
            time.sleep(DRAW_FIRST_S)
            yield TORCH_THREAD.call(self._complete_maps, engine, comparison)

    def _show(self, image: Any, set_name: str, session: str) -> tuple[Updates, Engine | None, Comparison | None]:
        page = self.page
        started = self._started(image, set_name)
        engine, comparison, problem = self._comparison(image, set_name, session, started)
        updates: Updates = {page.species: gr.update(value=PREDICTED), page.test_verdict: "", page.test_plot: None}
        if page.photo_credit is not None and self.credits:
            updates[page.photo_credit] = self.credits.for_payload(image)
        if problem:
            error_answer(problem)
            return {**updates, page.answer: {"error": problem}, **dict.fromkeys(page.maps),
                    **{c.label: None for c in page.columns.values()}, page.ensemble: None, page.agree: ""}, None, None
        updates |= {page.answer: comparison.to_json(), page.ensemble: top5(comparison, ENSEMBLE_KEY),
                    page.agree: agreement(comparison),
                    page.rather: gr.update(choices=rather_choices(comparison, engine.classes), value=NOTHING)}
        for key, column in page.columns.items():
            updates[column.header] = column_header(engine, key, comparison)
            updates[column.label] = top5(comparison, key)
            updates[column.maps] = (started.maps[key] if started else
                                    self._model_maps(engine, comparison, key, every_class=False))
        return updates, engine, comparison

    def _model_maps(self, engine: Engine, comparison: Comparison, key: str, **kwargs: Any) -> str | None:
        """The map component's value: `model_maps` as one JSON string. The page keeps every value
        in reactive state and copies it on each status message of an event; a string is one
        value to copy, a nested object thousands (measured: ~100 ms of the drop's time)."""
        try:
            data = model_maps(engine, comparison, key, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one broken map must not hide the others
            log.exception("maps of %s failed", key)
            data = {"error": f"This map could not be drawn ({type(exc).__name__})."}
        return None if data is None else json.dumps(data, separators=(",", ":"))

    def _complete_maps(self, engine: Engine, comparison: Comparison, extra: int | None = None) -> Updates:
        """The maps of every model whose first answer left classes out, for every class (and
        rather than class `extra` too)."""
        against = rivals(comparison)
        if extra is not None and extra not in against:
            against.append(extra)
        return {column.maps: self._model_maps(engine, comparison, key, against=against)
                for key, column in self.page.columns.items() if needs_more(engine, comparison, key)}

    @on_torch_thread
    def contrast(self, rather: str, set_name: str, request: gr.Request) -> Updates:
        """A "rather than" species that the maps have no contrast for yet: the gradient maps for it
        (the linear ones are drawn in the browser at once)."""
        comparison = self.cache.get(session_of(request), set_name)
        index = rather_index(comparison, rather) if comparison is not None else None
        if index is None or index in rivals(comparison):
            return gr.skip()
        return self._complete_maps(self.sets.get(set_name), comparison, extra=index)

    def pick_species(self, choice: gr.SelectData, set_name: str) -> Updates:
        """A click on a species in a model's top 5: show the maps for it."""
        engine = self._engine(set_name)
        by_name = {display_name(c): c for c in engine.classes} if engine else {}
        value = choice.value if isinstance(choice.value, str) else None
        return {self.page.species: gr.update(value=by_name[value])} if value in by_name else gr.skip()

    @on_torch_thread
    def test_maps(self, image: Any, species: str, set_name: str, request: gr.Request) -> Updates:
        """Test how faithful each model's explanation map is on a photo (the deletion test:
        remove the pixels the map marks as most important, 10 % at a time, and watch the model's
        probability of the species fall; the faster it falls, the more faithful the map).

        Args:
            image: a photo of one bird (a file path or URL).
            species: the species to test the maps for, as a class folder name; "" for each
                model's own top guess.

        Returns:
            A table of the probability curves (columns removed, probability, model) and one
            sentence saying which map held up best (the lowest area under its curve).
        """
        from birdfg.faithfulness import deletion_test

        page = self.page
        session = session_of(request)
        comparison = self.cache.get(session, set_name)
        engine = self._engine(set_name)
        if comparison is None or engine is None or not image:  # the API, or a forgotten session
            engine, comparison, problem = self._comparison(image, set_name, session, self._started(image, set_name))
            if problem:
                gr.Warning(problem)
                return {page.test_plot: None, page.test_verdict: f"⚠ {problem}"}
        path = image.get("path") if isinstance(image, dict) else image
        asked = comparison.classes.index(species) if species in comparison.classes else None
        classes = {key: comparison.predicted(key) if asked is None else asked for key in comparison.answered}
        curves = deletion_test(engine, comparison, open_rgb(path), classes)
        rows = [(f, p, engine.models[key].display_name) for key, curve in curves.items()
                for f, p in zip(curve["fractions"], curve["probs"])]
        return {page.test_plot: pd.DataFrame(rows, columns=["removed", "probability", "model"]),
                page.test_verdict: faithfulness_verdict(engine, comparison, curves, classes)}

    # --- model sets -----------------------------------------------------------------------------

    @on_torch_thread
    def select_set(self, name: str, current: str, request: gr.Request) -> Updates:
        """Switch the session to set `name` (loading it if needed); results are cleared."""
        page = self.page
        try:
            engine = self.sets.get(name)
        except SetError as exc:
            gr.Warning(str(exc))
            return {page.set_selector: gr.update(value=current), page.set_state: current}
        session = session_of(request)
        self.cache.drop(session)
        if name == self.sets.default:
            self.chosen_sets.pop(session, None)
        else:
            self.chosen_sets[session] = name
        return {page.set_selector: gr.update(value=name), page.set_state: name, **self.set_view(name, engine)}

    def set_view(self, name: str, engine: Engine | None) -> Updates:
        """Everything that shows which set is in use, at its defaults and without results."""
        page = self.page
        problem = self.default_problem if engine is None else None
        updates: Updates = {
            page.status: set_status(self.sets, name, engine, problem),
            page.species: gr.update(choices=species_choices(engine.classes) if engine else [], value=PREDICTED),
            page.rather: gr.update(choices=rather_choices(None, engine.classes) if engine else [], value=NOTHING),
            page.ensemble: None, page.agree: "", page.answer: None, page.test_verdict: "", page.test_plot: None,
        }
        for key, column in page.columns.items():
            menus = map_menus(engine.methods.get(key, [])) if engine else []
            updates |= {column.header: column_header(engine, key), column.blurb: blurb(engine, key),
                        column.label: None, column.overlay: None, column.maps: None}
            # The page has the menus of the default set's model; another set's fill them in order.
            updates |= {menu: menu_update(menus[i] if i < len(menus) else None) for i, menu in enumerate(column.menus)}
        report = read_report(self.sets.sources[name].folder, engine.models) if engine else None
        updates[page.report] = report.summary if report else NO_SET
        updates[page.per_class] = gr.update(value=per_class_table(report), visible=bool(report and report.per_class_rows))
        updates[page.confusion] = gr.update(value=report.confusion if report else [],
                                            visible=bool(report and report.confusion))
        updates[page.curves] = gr.update(value=report.curves if report else [], visible=bool(report and report.curves))
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
        self.chosen_sets.pop(session_of(request), None)
