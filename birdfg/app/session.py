"""The last comparison of each visitor, so that changing how the maps are drawn never runs a
model again."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from birdfg.inference import Comparison

API_SESSION = "api"  # the session of a call that comes without a browser session


def session_of(request: Any) -> str:
    """The visitor's Gradio session hash (a `gr.Request`), or API_SESSION."""
    return getattr(request, "session_hash", None) or API_SESSION


class ResultCache:
    """The last comparison of each session, with the name of the set that made it.

    Kept server-side because gr.State deep-copies its value on every event, and a comparison
    holds feature maps and attention matrices. A small LRU: a forgotten session simply has to
    compare again."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, Comparison]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, session: str, set_name: str, comparison: Comparison) -> None:
        with self._lock:
            self._items[session] = (set_name, comparison)
            self._items.move_to_end(session)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, session: str, set_name: str) -> Comparison | None:
        """The session's comparison, if it was made by set `set_name` (a result belongs to its set)."""
        with self._lock:
            item = self._items.get(session)
            if item is None or item[0] != set_name:
                return None
            self._items.move_to_end(session)
            return item[1]

    def drop(self, session: str) -> None:
        with self._lock:
            self._items.pop(session, None)

    def drop_set(self, set_name: str) -> None:
        """Forget every result of a set (it left memory: its maps could not be drawn any more)."""
        with self._lock:
            for session in [s for s, (name, _) in self._items.items() if name == set_name]:
                del self._items[session]

    def __len__(self) -> int:
        return len(self._items)
