"""Files the app hands to Gradio (drawn maps, batch CSVs), and their lifetime on disk."""
from __future__ import annotations

import csv
import os
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image


class OutputFiles:
    """Each file under a name of its own, in one temp folder; files older than `keep_s` go as
    new ones come.

    Why not return PIL images: Gradio caches those under their content hash and rewrites an identical
    file in place, so two visitors sending the same photo at once could be served a half-written map.
    A path is copied into Gradio's cache atomically, and Gradio's `delete_cache` ages that copy."""

    def __init__(self, name: str = "birdfg_files", keep_s: float = 3600, prune_every_s: float = 60):
        self.folder = Path(tempfile.gettempdir()) / name
        self.keep_s, self.prune_every_s = keep_s, prune_every_s
        self._pruned = 0.0
        self._lock = threading.Lock()

    def new_path(self, prefix: str, suffix: str) -> Path:
        self.folder.mkdir(exist_ok=True)
        self.prune()
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=self.folder)
        os.close(fd)
        return Path(name)

    def prune(self) -> None:
        """Delete files older than `keep_s` (at most once per `prune_every_s`)."""
        now = time.time()
        with self._lock:
            if now - self._pruned < self.prune_every_s:
                return
            self._pruned = now
        for old in self.folder.glob("*"):
            try:
                if now - old.stat().st_mtime > self.keep_s:
                    old.unlink()
            except FileNotFoundError:
                continue  # another request pruned it first

    def image(self, image: Image.Image | None, prefix: str = "map_") -> str | None:
        """`image` saved as a JPEG of its own; None for None."""
        if image is None:
            return None
        path = self.new_path(prefix, ".jpg")
        image.save(path, format="JPEG", quality=90)
        return str(path)

    def csv(self, headers: list[str], rows: list[list]) -> Path:
        path = self.new_path(f"birdfg_batch_{time.strftime('%Y%m%d-%H%M%S')}_", ".csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(headers)
            writer.writerows(rows)
        return path
