"""The birdfg comparison app: `python app.py [--checkpoints DIR] [--hub-repo ID] [--examples DIR] [--port N] [--mcp]`.

Three bird classifiers side by side (CNN, ViT, B-CNN), with where each one looked. Serves on
127.0.0.1 unless GRADIO_SERVER_NAME is set (a Hugging Face Space sets 0.0.0.0).
API: `gradio_client.Client(url).predict(handle_file(photo), api_name="/compare")` returns the JSON
answer and three overlays; bad input gives `{"error": "..."}` instead of an exception.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="a model set folder, or a folder of sets (default: checkpoints/, using full/ when "
                        "complete, else lite/)")
    p.add_argument("--hub-repo", default=os.environ.get("BIRDFG_HUB_REPO") or None, metavar="ID",
                   help="Hugging Face Hub repo of a published set (env BIRDFG_HUB_REPO); falls back to disk offline")
    p.add_argument("--examples", type=Path, default=None, metavar="DIR",
                   help="also offer up to 12 photos of this folder as examples, after the project's own (examples/); "
                        "a CREDITS.csv beside the photos (columns as in examples/CREDITS.csv) is shown as their credits")
    p.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT, else 7860")
    p.add_argument("--mcp", action="store_true", default=os.environ.get("BIRDFG_MCP", "").lower() in ("1", "true"),
                   help="also serve /compare and /batch as MCP tools at /gradio_api/mcp/ (env BIRDFG_MCP=1, "
                        "e.g. a Space variable)")
    p.add_argument("--max-loaded-sets", type=int, default=2, help="model sets kept in memory at once")
    p.add_argument("--keep-files-s", type=float, default=float(os.environ.get("BIRDFG_KEEP_FILES_S", "3600")),
                   metavar="S", help="delete uploaded photos and drawn maps this long after they were written "
                                     "(env BIRDFG_KEEP_FILES_S; default: 3600)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from birdfg import process

    process.configure()  # before torch is imported and the server starts its threads
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from birdfg.app.ui import serve  # heavy imports after --help

    serve(args.checkpoints, args.hub_repo, args.examples, args.port, args.max_loaded_sets, args.keep_files_s,
          mcp_server=args.mcp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
