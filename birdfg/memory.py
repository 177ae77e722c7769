"""Keep a long-running server's resident memory flat (glibc malloc settings).

Without this, RSS of the app grew by about 40 % over a few hundred concurrent requests and kept
rising, with no Python objects kept alive: glibc gives each thread that allocates its own arena
(up to 8 per core) and keeps freed tensor buffers of a few MB in them instead of returning them.
Fewer arenas, plus mmap for large blocks (returned to the OS on free), plus a trim after each
request keep it within a few per cent. No effect (and no error) on a libc that is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

ARENAS = 2  # one per core on a free Space; the model work itself runs one request at a time
MMAP_THRESHOLD = 4 << 20  # blocks >= 4 MB (activations, decoded photos) go straight back to the OS
TRIM_THRESHOLD = 8 << 20


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - missing on musl/macOS
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError, TypeError):
        return None


_LIBC = _glibc()


def tune_malloc() -> bool:
    """Limit malloc arenas and return large blocks to the OS. Call first thing in the process,
    before any thread starts (arenas made earlier stay). Returns whether the settings applied."""
    if _LIBC is None:
        log.info("not glibc: malloc settings left as they are")
        return False
    ok = all(_LIBC.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, ARENAS), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not ok:
        log.warning("glibc refused a malloc setting; memory may grow under load")
    return ok


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (cheap: about a millisecond after one comparison)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
