"""The app's process: model work handed to one worker thread, OpenMP and malloc settings applied
before torch loads, and the heap trimmed only once RSS has grown."""
from __future__ import annotations

import operator
import os
import subprocess
import sys
import threading
from pathlib import Path

from birdfg import memory, process
from birdfg.app.worker import TorchThread


def test_growth_guard_trims_only_past_the_first_requests_rss():
    guard = memory.GrowthGuard(growth=10.0)
    assert memory.rss_bytes() > 0
    assert not guard.check()  # the first request sets the baseline
    assert not guard.check()
    guard.growth = -1.0  # any RSS is now "grown"
    assert guard.check()


def test_torch_thread_runs_other_threads_work_on_the_main_thread():
    runner = TorchThread()
    main = threading.get_ident()
    seen = []

    def request_thread():
        seen.append(runner.call(threading.get_ident))
        try:
            runner.call(operator.truediv, 1, 0)
        except ZeroDivisionError:
            seen.append("raised here")
        runner.stop()

    runner.serve_forever(start=threading.Thread(target=request_thread).start, poll_s=0.05)
    assert seen == [main, "raised here"]
    assert not runner.serving
    elsewhere = []  # not serving: a call runs where it is made
    thread = threading.Thread(target=lambda: elsewhere.append(runner.call(threading.get_ident)))
    thread.start()
    thread.join()
    assert elsewhere == [thread.ident]


def test_process_settings_reach_openmp_before_torch_loads():
    code = ("from birdfg import process; process.configure(); import os, torch; "
            "print(os.environ['GOMP_SPINCOUNT'], torch.get_num_threads() >= 1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "GOMP_SPINCOUNT": ""})
    assert out.stdout.split() == [str(process.GOMP_SPIN_COUNT), "True"], out.stderr
    assert "imported before" not in out.stderr
