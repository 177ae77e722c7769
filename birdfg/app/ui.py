"""The app: the page (page.py) wired to the handlers (handlers.py), and the server.

Events
- `/compare` (API): one image (filepath) -> the JSON answer
  `{"models": {key: {"name", "top5", "latency_ms"[, "error"]}}, "ensemble": {"top5"}, "agree"}`,
  then one overlay per model in `MODEL_KEYS` order (None for a model that failed), drawn on the
  server. Bad input never raises: the JSON is `{"error": "<what is wrong and what to do>"}`, the
  overlays are None, and the browser shows the same message as a warning toast.
- The browser's comparison is a private event of its own: the same answer, every widget, and
  each model's maps as data, which birdfg/app/maps.js draws on a canvas over the photo. Species,
  "rather than", opacity and each model's map menus then redraw in the page with no request.
  The page asks for the first maps itself too, by the photo's SHA-256, as the photo is sent
  (`first_maps`, a server function of the map components: the head start's answer, drawn before
  the event's).
- `/faithfulness` (API): photo and species -> the deletion test of each model's map (a plot
  and one sentence). `/batch` (API): photos -> a table and its CSV. The model-set selector and
  the Models tab (the stored evaluation report) are private.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from birdfg.app.examples import Credits, offered_examples
from birdfg.app.files import OutputFiles
from birdfg.app.handlers import Handlers
from birdfg.app.head_start import HeadStart, UploadWatch
from birdfg.app.mcp_server import fix_gradio_mcp, require_mcp
from birdfg.app.page import CSS, TITLE, Page, build_page, theme
from birdfg.app.report import read_report
from birdfg.app.session import ResultCache
from birdfg.app.sets import ModelSets, SetError
from birdfg.app.worker import TORCH_THREAD

log = logging.getLogger("birdfg.app")

QUEUE_SIZE = 16  # waiting requests beyond this are told the app is busy
MAX_FILE_SIZE = "20mb"
MODELS = "models"  # the concurrency group of events that run a model pass: one at a time


def build(sets: ModelSets, examples: list[Path] | None = None, cache: ResultCache | None = None,
          output_files: OutputFiles | None = None, head_start: HeadStart | None = None) -> gr.Blocks:
    """The app's Blocks for the sets on offer (the default set is loaded here, once). Maps and CSVs
    are written to `output_files` and, like uploads, leave Gradio's cache after its `keep_s` seconds.
    `head_start`: the comparisons started as photos arrive (fed by `UploadWatch` in the server)."""
    cache = cache or ResultCache()
    output_files = output_files or OutputFiles()
    sets.on_evict.append(cache.drop_set)
    engine, problem = None, None
    try:
        engine = sets.get(sets.default)
    except SetError as exc:
        problem = str(exc)
        log.error(problem)
    report = read_report(sets.sources[sets.default].folder, engine.models) if engine else None
    # Uploaded photos and the API's drawn maps pile up in Gradio's cache: drop the old ones regularly.
    keep_s = max(int(output_files.keep_s), 1)

    # maps.js's call (a gr.HTML server function), by the photo's SHA-256, for its first maps before
    # its event answers. A plain function that finds the handlers when called: the page that
    # offers it is built before them, and Gradio marks a server function with an attribute.
    async def first_maps(digest: str, request: gr.Request) -> dict | None:
        return await handlers.first_maps(digest, request)

    with gr.Blocks(title=TITLE, delete_cache=(min(keep_s, 600), keep_s)) as demo:
        page = build_page(sets, engine, problem, report, examples or [],
                          server_functions=[first_maps] if head_start is not None else [])
        handlers = Handlers(sets, cache, output_files, page, problem, Credits(examples or []), head_start)
        if head_start is not None:
            head_start.prepare = handlers.first_answer
        wire(demo, page, handlers)
    return demo


def wire(demo: gr.Blocks, page: Page, handlers: Handlers) -> None:
    """Connect the page's events to the handlers."""
    columns = page.columns.values()
    # The API: one photo in, the JSON answer and one server-drawn overlay per model out.
    page.api_compare.click(handlers.compare, inputs=[page.photo, page.set_state], outputs=[page.answer, *page.overlays],
                           api_name="compare", preprocess=False,  # the handler opens the file: clear messages
                           concurrency_id=MODELS, concurrency_limit=1)
    # The browser: one event per comparison; the maps come as data and are drawn in the page. It
    # also says whose photo it is (an example's credit): a change event of its own would hold the
    # comparison back, as Gradio's front end sends an upload's second event once the first is done.
    credit = [page.photo_credit] if page.photo_credit is not None else []
    show = dict(fn=handlers.show, inputs=[page.photo, page.set_state],
                outputs=[page.answer, page.species, page.rather, page.ensemble, page.agree, page.test_verdict,
                         page.test_plot, *page.maps, *(c.header for c in columns), *(c.label for c in columns),
                         *credit],
                preprocess=False, api_visibility="private", concurrency_id=MODELS, concurrency_limit=1,
                show_progress="minimal", show_progress_on=page.maps)
    gr.on([page.photo.upload, page.compare_button.click], **show)
    if page.examples is not None:
        page.examples.load_input_event.then(**show)
    cleared = ["null"] * len(page.maps) + ['""'] * len(credit)  # no maps, no credit
    page.photo.clear(None, outputs=[*page.maps, *credit],
                     js=f"() => {{ window.birdfg?.forget?.(); return [{', '.join(cleared)}]; }}")

    # Species, contrast, opacity and map menus redraw in the browser, without a request.
    gr.on([control.change for control in page.view_controls], None, inputs=page.view_controls,
          js=f"(...values) => {{ window.birdfg?.setControls({page.view_layout()}, values); return []; }}")
    # A contrast the gradient maps were not sent for: maps.js asks the server to add it (the rest
    # is drawn at once). Only then: an event on every "rather than" change slowed the page's
    # redraw (benchmarks/README.md, "Browser").
    page.fetch_contrast.click(handlers.contrast, [page.rather, page.set_state], page.maps, api_visibility="private",
                              show_progress="hidden", concurrency_id=MODELS, concurrency_limit=1)
    for column in columns:
        column.label.select(handlers.pick_species, [page.set_state], [page.species], api_visibility="private",
                            show_progress="hidden")
    page.test_button.click(handlers.test_maps, [page.photo, page.species, page.set_state],
                           [page.test_plot, page.test_verdict], api_name="faithfulness", preprocess=False,
                           concurrency_id=MODELS, concurrency_limit=1)

    set_outputs = [page.set_selector, page.set_state, page.status, page.species, page.rather, *page.menus,
                   *(c.header for c in columns), *(c.blurb for c in columns), *(c.label for c in columns),
                   *page.overlays, *page.maps, page.ensemble, page.agree, page.answer, page.test_verdict,
                   page.test_plot, page.report, page.per_class, page.confusion, page.curves]
    page.set_selector.input(handlers.select_set, [page.set_selector, page.set_state], set_outputs,
                            api_visibility="private", concurrency_id=MODELS, concurrency_limit=1)
    page.batch_button.click(handlers.batch, [page.batch_files, page.set_state], [page.batch_table, page.batch_csv],
                            api_name="batch", concurrency_id=MODELS, concurrency_limit=1)
    demo.unload(handlers.forget)


def serve(checkpoints: Path | None = None, hub_repo: str | None = None, examples_dir: Path | None = None,
          port: int | None = None, max_loaded: int = 2, keep_files_s: float = 3600, mcp_server: bool = False) -> None:
    """Discover sets, load the default one, and serve until interrupted. Binds 127.0.0.1 unless
    GRADIO_SERVER_NAME says otherwise (a Space sets 0.0.0.0); port: `port`, GRADIO_SERVER_PORT, 7860.
    Uploads and drawn maps are deleted `keep_files_s` seconds after they were written. `mcp_server`:
    the public events (/compare, /batch) are MCP tools too, at /gradio_api/mcp/ (birdfg/app/mcp_server.py)."""
    if mcp_server:
        require_mcp()  # before the models load
        fix_gradio_mcp()
    sets = ModelSets.discover(checkpoints, hub_repo, max_loaded=max_loaded)
    examples = offered_examples(examples_dir)  # the project's photos, then the folder's
    head_start = HeadStart(lambda: sets.default)
    demo = build(sets, examples, output_files=OutputFiles(keep_s=keep_files_s, prune_every_s=min(keep_files_s, 60)),
                 head_start=head_start)
    # Two CPU cores: one model pass at a time (concurrency group MODELS), two cheap re-renders.
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
        mcp_server=mcp_server,
        app_kwargs={"middleware": [Middleware(UploadWatch, on_upload=head_start.uploaded)]},
    )
    try:
        # This thread runs the requests' model work from here on (see worker.TorchThread).
        TORCH_THREAD.serve_forever(start=launch)
    except KeyboardInterrupt:
        log.info("interrupted: closing the server")
    finally:
        demo.close()
