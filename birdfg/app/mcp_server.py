"""The app as MCP tools (`python app.py --mcp`, or BIRDFG_MCP=1 on a Space).

Gradio's own MCP server does the work (`demo.launch(mcp_server=True)`): every public API event is
a tool named after its function (`compare`, `batch`; on a Space, prefixed with the Space's name),
described by its docstring, at `/gradio_api/mcp/` (streamable HTTP; SSE at `/gradio_api/mcp/sse`).
Private events are no tools. A file goes in as an http(s) URL or a `data:` URL with base64.

Two fixes to gradio 6.31.0's server, for tools with several outputs like ours (JSON + three maps):
- a call without a progress token (most clients send none) got the outputs as one tuple, which
  then failed with "pop index out of range" on the State output;
- a JSON output came back as Python's repr of a dict (single quotes, True/None), not JSON.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import gradio as gr

log = logging.getLogger("birdfg.app")

FIXED_GRADIO = "6.31.0"  # the version these fixes were written against; others are left alone


def require_mcp() -> None:
    """Fail early, with what to do, when the `mcp` package is missing (Gradio would only log it)."""
    try:
        import mcp  # noqa: F401
    except ImportError as exc:
        raise SystemExit("--mcp needs the `mcp` package: `pip install -r requirements.txt` "
                         "(it pins gradio[mcp] and mcp)") from exc


def fix_gradio_mcp() -> bool:
    """Apply the two fixes to gradio's MCP server class (once); False where this gradio is not the
    version they were written for (its tests then show whether they are still needed)."""
    from gradio.mcp import GradioMCPServer

    if gr.__version__ != FIXED_GRADIO:
        log.warning("gradio %s: the MCP fixes for %s are not applied", gr.__version__, FIXED_GRADIO)
        return False
    if getattr(GradioMCPServer, "_birdfg_fixed", False):
        return True
    from anyio.to_thread import run_sync
    from gradio_client.utils import is_file_obj_with_meta

    async def outputs_without_progress(self: Any, job: Any) -> list[Any]:
        # gradio_client returns a tuple for an event with several outputs: keep one entry per
        # output, as the progress path does, so that the State output can be dropped by position.
        result = await run_sync(job.result)
        return list(result) if isinstance(result, tuple) else [result]

    postprocess = GradioMCPServer.postprocess_output_data

    def json_outputs(self: Any, data: Any, root_url: str) -> Any:
        data = [json.dumps(value) if isinstance(value, dict) and not is_file_obj_with_meta(value) else value
                for value in data]
        return postprocess(self, data, root_url)

    GradioMCPServer._execute_tool_without_progress = outputs_without_progress
    GradioMCPServer.postprocess_output_data = json_outputs
    GradioMCPServer._birdfg_fixed = True
    return True
