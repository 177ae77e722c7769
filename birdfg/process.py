"""Settings the app's process applies first thing, before torch is imported and threads start.

- malloc: see birdfg/memory.py.
- OpenMP spin: after each parallel region libgomp's threads spin 300,000 times before they sleep.
  That wins for one visitor and loses under a crowd, where the spinning thread burns the CPU that
  Gradio needs. Measured on 2 cores (`benchmarks/results/server_settings.json` and the load test):
  default: 35 ms per comparison, 4.5-4.7 answers/s for 16 clients; 3,000: 37 ms, 6.2 answers/s;
  100: 50 ms, 6.8 answers/s. The model work itself runs on one thread (birdfg/app/worker.py).
"""
from __future__ import annotations

import logging
import os
import sys

from birdfg.memory import tune_malloc

log = logging.getLogger(__name__)

GOMP_SPIN_COUNT = 3000


def configure() -> None:
    """Spin count (unless GOMP_SPINCOUNT is set) and malloc settings."""
    if "torch" in sys.modules:
        log.warning("torch was imported before birdfg.process.configure(): the OpenMP spin count is not applied")
    if not os.environ.get("GOMP_SPINCOUNT"):
        os.environ["GOMP_SPINCOUNT"] = str(GOMP_SPIN_COUNT)
    tune_malloc()
