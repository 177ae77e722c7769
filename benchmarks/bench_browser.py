"""What a visitor waits for: the app in a real headless Chromium, against a bare Gradio app.

    python benchmarks/bench_browser.py [--photos 10] [--json OUT] [--checkpoints DIR] [--baseline DIR] [--rtt-ms N]

Starts `python app.py --port P` and the floor, `python benchmarks/floor_app.py --port Q --events
text` and `... --events images` (Gradio apps that do no work: a photo upload starts one event that
returns a text, or one that returns three small fixed PNGs; one process each, since in one page
Gradio sends an upload's second event only after the first has finished), on free local ports,
and drives them with Playwright and Debian's chromium (/usr/bin/chromium, headless). One warm-up
photo, then N val photos; the app and the two floors take turns photo by photo, each photo in a
fresh browser context (an empty HTTP cache, a new session, the page at its defaults, as a new
visitor), dropped --page-settle-ms (1000) after the page's photo box appeared: a visitor drops a
photo onto a page that has finished loading, not into its first frames (with 0, the drop also
pays for whatever the page still does then, more in the app's page than in the floor's).
Figures, in ms, median and every sample:

- app `drop_to_maps`: from just before the photo is handed to the page (`set_input_files`) until
  every model's map (`#map-<key>`) has changed its `data-rendered` counter with its canvas shown;
- app `drop_to_labels`: until the three top-1 labels (`#label-<key> .output-class`) and the
  agreement (`#agree`) have text;
- app `drop_to_vit_complete`: until the ViT's map was drawn the second time, from the event's
  second update (its maps for the less likely classes), where there was one; `draws` in each
  sample lists every map's draws after the drop;
- app `species_switch`, `rather_switch`, `opacity_switch`: from the moment the new value is chosen
  until all three maps have been redrawn. A dropdown's moment is the Enter keydown that picks the
  option (a capture listener on window, so before Gradio's own handler): Playwright's click and
  typing into the filter happen before it and are not in the figure. The opacity's moment is the
  `input` event of its number box (the slider takes its value on `input`; the Enter that follows
  changes nothing). The species is one none of the models has in its top 5; "rather than" is
  "each model's runner-up"; the opacity alternates 0.8 / 0.3;
- floor `drop_to_text`: until the returned text is shown; `drop_to_images`: until the three
  returned images are loaded (`naturalWidth > 0`);
- app `cpu_during_drop` (Linux): CPU time spent from just before the drop until this script saw the
  three maps drawn (`window_ms`, some 30-50 ms longer than `drop_to_maps`: Playwright's hand-over
  and polling), by whom: the app's server process, and how long its threads waited for a core
  while they could run (the scheduler's run delay, summed over its threads); every Chromium
  process; this script and Playwright's driver; the whole machine;
- with `--long-side N`, each photo is dropped as a JPEG N pixels on its longer side (4032: a
  12 MP phone photo), upscaled from the val photo in a temporary folder;
- `inprocess_ms`: after the browser probes, with the servers stopped, in this process:
  `Engine(load_set(checkpoints)).compare(photo)` plus `map_data.model_maps(..., every_class=False)`
  for every model (what the page's first update needs), over the same photos; `inprocess_complete_ms`:
  the second update's maps (`model_maps` for every class of the models whose first answer left
  classes out).

`--baseline DIR`: another checkout of birdfg (e.g. `git worktree add ../birdfg-main main`) runs
its own `app.py` too, with the same checkpoints, and takes its turn on every photo (before the app
on odd photos, after it on even ones): figures `baseline` beside `app`, for an A/B in one run.

`--rtt-ms N`: the pages reach every server through a proxy in this process that holds each
chunk of bytes N/2 ms in each direction (unlimited bandwidth; connections open at once): a
visitor N ms of round trip away. The browser still shares the server's cores.

Every time is the page's own clock (performance.now()): marks are taken in the page by a
MutationObserver and load/keydown/input listeners, so Playwright's polling is not in them.
Before the switches the page settles: until the ViT's second update has been drawn (or 5 s after
the drop) and then no map redrawn for --settle-ms (300); a switch's sample is flagged `pending`
when a map still said "the rest of this map is on its way" when it was redrawn.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import results_file  # benchmarks/results_file.py (this folder is on sys.path when a script runs)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_NAMES = ("chromium", "chrome")  # its processes' names in /proc
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
DEFAULT_DATA = ROOT.parent / "shared" / "bird_dataset"
KEYS = ("cnn", "vit", "bcnn")
TIMEOUT_MS = 90_000  # a busy two-core machine
SECOND_UPDATE_WAIT_MS = 5000
RUNNER_UP_LABEL = "each model's runner-up"
OPACITIES = (0.8, 0.3)
TARGET_ABOVE_FLOOR_MS = 80  # issue 17: drop -> three maps within 80 ms of the floor's text event...
TARGET_DROP_MS = 160  # ... and at most 160 ms
TARGET_SWITCH_MS = 50  # species / "rather than" / opacity -> redrawn

# In every page, before its own scripts: marks on the page's clock. `arm(names, trigger)` starts
# a probe: at once (trigger null) or at the first matching keydown / input event; each condition
# in `names` is marked (ms after the start) the first time it holds, checked on every DOM
# mutation and every load event.
RECORDER = r"""
(() => {
  if (window.__bench) return;
  const KEYS = ["cnn", "vit", "bcnn"];
  const now = () => performance.now();
  const b = window.__bench = { t0: null, names: [], trigger: null, marks: {}, flags: {}, draws: {}, last: {},
                               base: {}, baseSrc: [] };
  const counter = (k) => { const m = document.getElementById("map-" + k); return m ? m.dataset.rendered ?? null : null; };
  // textContent, not innerText: innerText lays the page out, on every mutation
  const text = (sel) => ((document.querySelector(sel) || {}).textContent || "").trim();
  const floorImg = (i) => document.querySelector("#floor-img-" + i + " img");
  const conditions = {
    map: (k) => {
      const c = document.querySelector("#map-" + k + " canvas.birdmap-canvas");
      return counter(k) !== b.base[k] && !!c && !c.hidden;
    },
    labels: () => KEYS.every((k) => text("#label-" + k + " .output-class")) && !!text("#agree"),
    text: () => text("#floor-text").includes("received"),
    img: (i) => { const img = floorImg(i); return !!img && !!img.src && !b.baseSrc.includes(img.src) && img.complete && img.naturalWidth > 0; },
  };
  const holds = (name) => { const [kind, arg] = name.split(":"); return conditions[kind](arg); };
  const check = () => {
    if (b.t0 === null) return;
    for (const name of b.names) {
      if (name in b.marks || !holds(name)) continue;
      b.marks[name] = now() - b.t0;
      if (name.startsWith("map:")) {
        const caption = text("#map-" + name.slice(4) + " .birdmap-caption");
        if (caption.includes("on its way")) b.flags.pending = true;
      }
    }
  };
  const start = () => {
    b.t0 = now();
    for (const k of KEYS) { b.base[k] = counter(k); b.draws[k] = []; }
    b.baseSrc = [0, 1, 2].map((i) => (floorImg(i) || {}).src).filter(Boolean);
    check();
  };
  b.arm = (names, trigger) => {
    b.t0 = null; b.names = names; b.trigger = trigger; b.marks = {}; b.flags = {};
    if (!trigger) start();
  };
  b.done = () => b.t0 !== null && b.names.every((n) => n in b.marks);
  b.result = () => ({ marks: b.marks, flags: b.flags, draws: b.draws });
  b.quiet = () => now() - Math.max(0, ...KEYS.map((k) => b.last[k] || 0));
  b.since = () => (b.t0 === null ? 0 : now() - b.t0);
  const fire = (type, event) => {
    const t = b.trigger;
    if (!t || b.t0 !== null || t.type !== type || (t.key && event.key !== t.key)) return;
    if (event.target && event.target.closest && event.target.closest(t.within)) start();
  };
  window.addEventListener("keydown", (e) => fire("keydown", e), true);
  window.addEventListener("input", (e) => fire("input", e), true);
  window.addEventListener("change", (e) => {
    if (b.t0 !== null && e.target && e.target.matches && e.target.matches("#photo input[type=file]")
        && !("file_event" in b.marks)) b.marks.file_event = now() - b.t0;
  }, true);
  document.addEventListener("load", check, true);
  const observer = new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === "attributes" && r.attributeName === "data-rendered" && r.target.id && r.target.id.startsWith("map-")) {
        const k = r.target.id.slice(4);
        b.last[k] = now();
        if (b.t0 !== null && b.draws[k]) b.draws[k].push(Math.round((now() - b.t0) * 10) / 10);
      }
    }
    check();
  });
  const observe = () => observer.observe(document.documentElement,
    { subtree: true, childList: true, attributes: true, characterData: true });
  if (document.documentElement) observe(); else document.addEventListener("DOMContentLoaded", observe);
})();
"""


class BenchError(RuntimeError):
    pass


# --- servers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(NamedTuple):
    url: str
    pid: int


@contextmanager
def delayed(served: Served, rtt_ms: float) -> Iterator[Served]:
    """`served` behind a TCP proxy on a free local port that holds every chunk of bytes rtt_ms / 2
    in each direction, in order (a network round trip; no bandwidth limit, no handshake cost)."""
    delay = rtt_ms / 2000
    target = urllib.parse.urlsplit(served.url)
    loop = asyncio.new_event_loop()

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        due: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await due.get()
                await asyncio.sleep(max(0.0, at - loop.time()))
                if not data:
                    sink.close()
                    return
                sink.write(data)
                await sink.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await source.read(1 << 16):
                due.put_nowait((loop.time() + delay, data))
        except ConnectionError:
            pass
        due.put_nowait((loop.time() + delay, b""))
        await delivering

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(target.hostname, target.port)
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        except ConnectionError:
            writer.close()

    port = free_port()
    listening = loop.run_until_complete(asyncio.start_server(connection, "127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, name="rtt-proxy", daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{port}/", served.pid)
    finally:
        loop.call_soon_threadsafe(listening.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@contextmanager
def server(name: str, args: list[str], timeout: float = 300, cwd: Path = ROOT):
    """`python ARGS --port P` in `cwd` (the repository root); yields its URL and process id once it
    answers HTTP."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # drain its output
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{''.join(lines[-30:])}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > timeout:
                raise BenchError(f"{name} did not answer within {timeout:.0f} s:\n{''.join(lines[-30:])}")
            time.sleep(0.25)
        print(f"{name} answers after {time.perf_counter() - started:.1f} s", flush=True)
        yield Served(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- who has the cores while a visitor waits ------------------------------------------------------

class CpuShare:
    """CPU time spent on this machine between two snapshots, by whom (Linux /proc; `available` is
    False elsewhere): the app's server process (`server_ms`) and how long its threads waited for a
    core while they could run (`server_waited_ms`, the scheduler's run delay), every Chromium
    process (`chromium_ms`), this script and Playwright's driver (`driver_ms`), and all the
    machine's CPUs together (`machine_busy_ms`, out of `cores` x the window)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.available = Path("/proc/self/task").is_dir() and Path("/proc/stat").is_file()

    @staticmethod
    def _threads(pid: int | str) -> dict[str, tuple[int, int]]:
        """Each thread's (ns run, ns waited for a core) so far."""
        found = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return found
        for tid in tids:
            try:
                run, wait = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2]
            except (OSError, ValueError):
                continue  # the thread ended
            found[f"{pid}/{tid}"] = (int(run), int(wait))
        return found

    @staticmethod
    def _processes() -> Iterator[tuple[str, str, int]]:
        """(pid, name, parent pid) of every process still there."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            yield pid, stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])

    def snapshot(self) -> dict:
        me = os.getpid()
        chromium, driver = {}, {}
        for pid, name, parent in self._processes():
            if name.startswith(CHROMIUM_NAMES):
                chromium |= self._threads(pid)
            elif int(pid) == me or (parent == me and name.startswith("node")):
                driver |= self._threads(pid)
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return {"wall_ns": time.perf_counter_ns(), "server": self._threads(self.server_pid), "chromium": chromium,
                "driver": driver, "busy_ns": (sum(fields) - idle) * 1e9 / os.sysconf("SC_CLK_TCK")}

    @staticmethod
    def between(before: dict, after: dict) -> dict:
        """Milliseconds between two snapshots. A thread that ended in between is left out (its
        last moments are lost), one that started counts whole."""
        def used(key: str, field: int = 0) -> float:
            old = before[key]
            return sum(v[field] - old.get(t, (0, 0))[field] for t, v in after[key].items()) / 1e6

        return {"window_ms": (after["wall_ns"] - before["wall_ns"]) / 1e6, "server_ms": used("server"),
                "server_waited_ms": used("server", 1), "chromium_ms": used("chromium"), "driver_ms": used("driver"),
                "machine_busy_ms": (after["busy_ns"] - before["busy_ns"]) / 1e6}

    def groups(self) -> dict:
        """The kernel's scheduler groups: with autogroup scheduling on, the CPU is shared fairly
        between sessions first, and Chromium runs in sessions of its own (Playwright starts it as a
        session leader, and its zygotes start more), so `nice` on Chromium weighs it only against
        its own processes, not against the server."""
        def group(pid) -> str | None:
            try:
                return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
            except (OSError, IndexError):
                return None
        try:
            enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        except OSError:
            enabled = None
        chromium = {found for pid, name, _ in self._processes()
                    if name.startswith(CHROMIUM_NAMES) and (found := group(pid))}
        server = group(self.server_pid)
        return {"autogroup": enabled, "server_group": server, "chromium_groups": len(chromium),
                "chromium_shares_server_group": server in chromium}


# --- the page --------------------------------------------------------------------------------------

WINDOW = {"width": 1400, "height": 1000}  # the page's viewport: a laptop's browser window
# Whether every model's map lies whole in the window (after the drop, outside the timed path):
# a map drawn out of view is not painted, so its time would leave that out.
MAPS_IN_VIEW = """keys => keys.every(k => {
  const r = document.querySelector('#map-' + k + ' canvas.birdmap-canvas').getBoundingClientRect();
  return r.top >= 0 && r.bottom <= innerHeight && r.height > 0;
})"""


def fresh_page(browser, url: str, page_settle_ms: float):
    """A new visitor's page, `page_settle_ms` after its photo box appeared (see --page-settle-ms)."""
    context = browser.new_context(viewport=WINDOW)
    context.add_init_script(RECORDER)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#photo input[type=file]", state="attached")
    if page_settle_ms > 0:
        page.wait_for_timeout(page_settle_ms)
    return context, page


def choose(page, dropdown: str, option: str) -> None:
    """Type the option into the (filterable) dropdown and take the match, as a keyboard user would."""
    page.click(f"{dropdown} input")
    page.fill(f"{dropdown} input", option)
    page.keyboard.press("Enter")


def option_labels(page, dropdown: str) -> list[str]:
    page.click(f"{dropdown} input")
    page.wait_for_selector("[role=option]")
    labels = [o.replace("✓", "").strip() for o in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    return labels


def probe(page, names: list[str], act, trigger: dict | None = None) -> dict:
    """Arm the page's recorder, do `act()`, wait until every condition held; the page's marks."""
    page.evaluate("([names, trigger]) => window.__bench.arm(names, trigger)", [names, trigger])
    act()
    page.wait_for_function("() => window.__bench.done()", polling=20)
    return page.evaluate("() => window.__bench.result()")


def quiet(page, ms: float, second_update: bool = False) -> None:
    """Until no map has been redrawn for `ms` (after the drop: and the ViT's second update drawn,
    or SECOND_UPDATE_WAIT_MS passed)."""
    wait = ("b.draws.vit.length >= 2 || b.since() > " + str(SECOND_UPDATE_WAIT_MS)) if second_update else "true"
    page.wait_for_function(f"() => {{ const b = window.__bench; return ({wait}) && b.quiet() >= {ms}; }}", polling=50)


def app_photo(browser, app: Served, photo: Path, settle_ms: float, opacity: float, page_settle_ms: float) -> dict:
    context, page = fresh_page(browser, app.url, page_settle_ms)
    cpu = CpuShare(app.pid)
    try:
        page.wait_for_function("keys => keys.every(k => document.querySelector('#map-' + k)?.dataset.rendered)",
                               arg=list(KEYS))
        window = [cpu.snapshot()] if cpu.available else []

        def drop_photo() -> None:
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            if window:  # the CPU window closes once the three maps are drawn (polled: up to ~20 ms later)
                page.wait_for_function("keys => keys.every(k => ('map:' + k) in window.__bench.marks)",
                                       arg=list(KEYS), polling=20)
                window.append(cpu.snapshot())

        drop = probe(page, [f"map:{k}" for k in KEYS] + ["labels"], drop_photo)
        used = CpuShare.between(*window) if len(window) == 2 else None
        in_view = page.evaluate(MAPS_IN_VIEW, list(KEYS))
        quiet(page, settle_ms, second_update=True)
        draws = page.evaluate("() => window.__bench.draws")
        marks = drop["marks"]
        sample = {"photo": f"{photo.parent.name}/{photo.name}",
                  "drop_to_maps": max(marks[f"map:{k}"] for k in KEYS),
                  "drop_to_labels": marks["labels"],
                  "file_event": marks.get("file_event"),
                  "maps": {k: marks[f"map:{k}"] for k in KEYS},
                  "draws": draws,
                  # its second draw: the second update's maps (a third, of the same maps, follows
                  # when the event completes: Gradio sends the outputs again)
                  "drop_to_vit_complete": draws["vit"][1] if len(draws["vit"]) >= 2 else None,
                  "status": page.inner_text("#status").strip(),
                  "maps_in_view": in_view,
                  "cpu_during_drop": used}

        listed = " ".join(page.inner_text(f"#label-{k}") for k in KEYS)
        species = next(o for o in option_labels(page, "#species")[1:] if o not in listed)
        redraw = [f"map:{k}" for k in KEYS]
        switches = {
            "species_switch": (lambda: choose(page, "#species", species), {"type": "keydown", "key": "Enter", "within": "#species"}),
            "rather_switch": (lambda: choose(page, "#rather", RUNNER_UP_LABEL), {"type": "keydown", "key": "Enter", "within": "#rather"}),
            "opacity_switch": (lambda: (page.locator("#opacity input[type=number]").fill(str(opacity)),
                                        page.locator("#opacity input[type=number]").press("Enter")),
                               {"type": "input", "within": "#opacity"}),
        }
        sample["species"] = species
        sample["opacity"] = opacity
        sample["pending"] = []
        for name, (act, trigger) in switches.items():
            result = probe(page, redraw, act, trigger)
            sample[name] = max(result["marks"].values())
            if result["flags"].get("pending"):
                sample["pending"].append(name)
            quiet(page, settle_ms)
        errors = page.locator(".toast-body.error").count()
        if errors:
            raise BenchError(f"the app showed {errors} error toast(s) on {sample['photo']}")
        return sample
    finally:
        context.close()


def floor_photo(browser, url: str, photo: Path, names: list[str], page_settle_ms: float) -> dict:
    context, page = fresh_page(browser, url, page_settle_ms)
    try:
        return probe(page, names, lambda: page.locator("#photo input[type=file]").set_input_files(str(photo)))["marks"]
    finally:
        context.close()


def floor_photos(browser, urls: dict[str, str], photo: Path, page_settle_ms: float) -> dict:
    """The text floor and the image floor, each its own app and page (see floor_app.py)."""
    text = floor_photo(browser, urls["text"], photo, ["text"], page_settle_ms)
    images = floor_photo(browser, urls["images"], photo, ["img:0", "img:1", "img:2"], page_settle_ms)
    return {"photo": f"{photo.parent.name}/{photo.name}", "drop_to_text": text["text"],
            "drop_to_images": max(images[f"img:{i}"] for i in range(3)),
            "file_event": statistics.mean(m["file_event"] for m in (text, images) if "file_event" in m)}


# --- in-process --------------------------------------------------------------------------------------

def inprocess(checkpoints: Path, warm_up: Path, photos: list[Path]) -> dict:
    sys.path.insert(0, str(ROOT))
    from birdfg import process

    process.configure()  # the app's process settings, before torch is imported
    from birdfg.app import map_data
    from birdfg.checkpoints import load_set
    from birdfg.inference import Engine

    engine = Engine(load_set(checkpoints))

    def first(photo: Path):
        comparison = engine.compare(photo)
        for key in comparison.answered:
            map_data.model_maps(engine, comparison, key, every_class=False)
        return comparison

    def complete(comparison) -> None:
        for key in comparison.answered:
            if map_data.needs_more(engine, comparison, key):
                map_data.model_maps(engine, comparison, key)

    complete(first(warm_up))
    firsts, completes = [], []
    for photo in photos:
        start = time.perf_counter()
        comparison = first(photo)
        firsts.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        complete(comparison)
        completes.append((time.perf_counter() - start) * 1000)
    return {"inprocess_ms": firsts, "inprocess_complete_ms": completes, "runtimes": engine.runtimes}


def resaved(photos: list[Path], long_side: int, folder: Path) -> list[Path]:
    """Each photo as a JPEG `long_side` pixels on its longer side (bicubic), as a phone takes
    them: the same class folder and name under `folder`."""
    from PIL import Image

    out = []
    for photo in photos:
        with Image.open(photo) as image:
            scale = long_side / max(image.size)
            image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                                Image.Resampling.BICUBIC)
        target = folder / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, quality=90)
        out.append(target)
    return out


# --- report ------------------------------------------------------------------------------------------

def rounded(value):
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def summary(values: list[float | None]) -> dict:
    kept = [round(v, 1) for v in values if v is not None]
    return {"median_ms": round(statistics.median(kept), 1) if kept else None, "samples_ms": kept}


def table(report: dict) -> str:
    f = report["figures"]
    floor_text = f["floor"]["drop_to_text"]["median_ms"]
    drop_target = min(TARGET_DROP_MS, floor_text + TARGET_ABOVE_FLOOR_MS) if floor_text is not None else TARGET_DROP_MS

    def verdict(value, limit):
        return "" if value is None or limit is None else ("ok" if value <= limit else "MISSED")

    rows = [
        ("app: drop -> three maps drawn", f["app"]["drop_to_maps"],
         f"<= {drop_target:.0f} (floor text +{TARGET_ABOVE_FLOOR_MS}, <={TARGET_DROP_MS})", drop_target),
        ("app: drop -> labels + agreement", f["app"]["drop_to_labels"], "", None),
        ("app: drop -> ViT complete (2nd update)", f["app"]["drop_to_vit_complete"], "", None),
        ("app: species switch -> redrawn", f["app"]["species_switch"], f"<= {TARGET_SWITCH_MS}", TARGET_SWITCH_MS),
        ('app: "rather than" switch -> redrawn', f["app"]["rather_switch"], f"<= {TARGET_SWITCH_MS}", TARGET_SWITCH_MS),
        ("app: opacity change -> redrawn", f["app"]["opacity_switch"], f"<= {TARGET_SWITCH_MS}", TARGET_SWITCH_MS),
        *([("baseline: drop -> three maps drawn", f["baseline"]["drop_to_maps"], "", None),
           ("baseline: drop -> labels + agreement", f["baseline"]["drop_to_labels"], "", None),
           ("baseline: species switch -> redrawn", f["baseline"]["species_switch"], "", None),
           ('baseline: "rather than" switch -> redrawn', f["baseline"]["rather_switch"], "", None),
           ("baseline: opacity change -> redrawn", f["baseline"]["opacity_switch"], "", None),
           ("app - baseline, same photo: drop -> maps", f["app_minus_baseline"]["drop_to_maps"], "", None),
           ('app - baseline, same photo: "rather"', f["app_minus_baseline"]["rather_switch"], "", None)]
          if "baseline" in f else []),
        ("floor: drop -> text shown", f["floor"]["drop_to_text"], "", None),
        ("floor: drop -> three images loaded", f["floor"]["drop_to_images"], "", None),
        ("in-process: compare + first maps", f["inprocess"]["inprocess_ms"], "", None),
        ("in-process: the 2nd update's maps", f["inprocess"]["inprocess_complete_ms"], "", None),
    ]
    lines = [f"{'figure':40} {'median ms':>9}  {'target':34} {'':6}  samples"]
    for label, fig, target, limit in rows:
        median = fig["median_ms"]
        shown = f"{median:9.1f}" if median is not None else f"{'-':>9}"
        lines.append(f"{label:40} {shown}  {target:34} {verdict(median, limit):6}  {fig['samples_ms']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=10, help="timed photos, after one warm-up photo (default: 10)")
    p.add_argument("--json", type=Path, default=None, help="write every sample and median here")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="bird_dataset folder (val_images/ is used)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="model set for the app (passed as --checkpoints) and the in-process run "
                        "(default: the app's own choice; in-process checkpoints/lite)")
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="another birdfg checkout whose app.py is timed too, photo by photo (an A/B in one run)")
    p.add_argument("--long-side", type=int, default=None, metavar="N",
                   help="drop each photo re-saved as a JPEG N pixels on its longer side (e.g. 4032: a 12 MP phone "
                        "photo, upscaled), in a temporary folder; the in-process figures use the same files")
    p.add_argument("--settle-ms", type=float, default=300,
                   help="before each switch: no map redrawn for this long (default: 300)")
    p.add_argument("--page-settle-ms", type=float, default=1000,
                   help="after each page's photo box appears, wait this long before the drop, app and floor "
                        "alike: a visitor drops a photo onto a page that has finished loading (default: 1000; "
                        "0: at once, while the page may still be loading)")
    p.add_argument("--rtt-ms", type=float, default=0,
                   help="the pages reach the servers through a local proxy that adds this round trip (half each "
                        "way): a visitor on a network; the cores are still shared (default: 0, localhost)")
    args = p.parse_args(argv)
    if args.photos < 1:
        p.error("--photos must be at least 1")
    if args.page_settle_ms < 0 or args.rtt_ms < 0:
        p.error("--page-settle-ms and --rtt-ms cannot be negative")

    if not CHROMIUM.exists():
        print(f"error: {CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`)", file=sys.stderr)
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("error: the playwright package is not installed (`pip install playwright`; its own browsers are "
              "not needed, Debian's chromium is used)", file=sys.stderr)
        return 2
    val_root = args.data / "val_images"
    all_photos = sorted(val_root.glob("*/*.jpg"))
    if len(all_photos) < args.photos + 1:
        print(f"error: {val_root}: {len(all_photos)} photos found, {args.photos + 1} needed", file=sys.stderr)
        return 2
    step = max(1, len(all_photos) // (args.photos + 1))
    chosen = all_photos[::step][:args.photos + 1]  # spread over the classes
    if args.long_side:
        resized = tempfile.TemporaryDirectory(prefix="bench_browser_")  # removed when the script ends
        chosen = resaved(chosen, args.long_side, Path(resized.name))
    warm_up, photos = chosen[0], chosen[1:]

    started = time.perf_counter()
    report: dict = {
        "command": " ".join(["python", "benchmarks/bench_browser.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpu": results_file.cpu_model(), "cores": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "load_average_start": results_file.load_average()},
        "photos": [f"{x.parent.name}/{x.name}" for x in photos], "warm_up": f"{warm_up.parent.name}/{warm_up.name}",
        "settle": (f"before the switches: until the ViT's map was drawn twice (its second update) or "
                   f"{SECOND_UPDATE_WAIT_MS} ms after the drop, then no map redrawn for {args.settle_ms:.0f} ms; "
                   f"the same quiet between switches"),
        "each_photo": ("a fresh browser context and page per photo and app; app, text floor and image floor take "
                       "turns photo by photo"),
        "page_settle_ms": args.page_settle_ms, "window": WINDOW,
        "rtt_ms": args.rtt_ms,
        "long_side": args.long_side,
    }
    if args.baseline and not (args.baseline / "app.py").is_file():
        p.error(f"--baseline {args.baseline}: no app.py there (a birdfg checkout is needed)")
    app_args = ["app.py"] + (["--checkpoints", str(args.checkpoints)] if args.checkpoints else [])
    app_samples, floor_samples, baseline_samples = [], [], []
    try:
        floor = str(Path("benchmarks") / "floor_app.py")
        with ExitStack() as stack:
            def serve(name: str, server_args: list[str], **kwargs) -> Served:
                served = stack.enter_context(server(name, server_args, **kwargs))
                return stack.enter_context(delayed(served, args.rtt_ms)) if args.rtt_ms else served

            app = serve("app.py", app_args)
            baseline = None
            if args.baseline:
                checkpoints = (args.checkpoints or ROOT / "checkpoints" / "lite").resolve()
                baseline = serve("baseline app.py", ["app.py", "--checkpoints", str(checkpoints)],
                                 cwd=args.baseline.resolve())
                report["baseline"] = "another checkout's app.py (--baseline), same checkpoints"
            text_url = serve("floor_app.py --events text", [floor, "--events", "text"]).url
            images_url = serve("floor_app.py --events images", [floor, "--events", "images"]).url
            playwright = stack.enter_context(sync_playwright())
            floor_urls = {"text": text_url, "images": images_url}
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            import gradio

            report["machine"].update(chromium=browser.version, gradio=gradio.__version__)
            if CpuShare(app.pid).available:
                report["machine"]["scheduler"] = CpuShare(app.pid).groups()
            for i, photo in enumerate([warm_up, *photos]):
                opacity = OPACITIES[i % len(OPACITIES)]
                base = None
                if baseline and i % 2:
                    base = app_photo(browser, baseline, photo, args.settle_ms, opacity, args.page_settle_ms)
                a = app_photo(browser, app, photo, args.settle_ms, opacity, args.page_settle_ms)
                if baseline and not i % 2:
                    base = app_photo(browser, baseline, photo, args.settle_ms, opacity, args.page_settle_ms)
                f = floor_photos(browser, floor_urls, photo, args.page_settle_ms)
                label = "warm-up" if i == 0 else f"{i}/{len(photos)}"
                print(f"[{label}] {a['photo']}: app maps {a['drop_to_maps']:.0f} labels {a['drop_to_labels']:.0f} "
                      f"species {a['species_switch']:.0f} rather {a['rather_switch']:.0f} "
                      f"opacity {a['opacity_switch']:.0f} ms; floor text {f['drop_to_text']:.0f} "
                      f"images {f['drop_to_images']:.0f} ms" + (f"; pending: {a['pending']}" if a["pending"] else "")
                      + (f"; baseline maps {base['drop_to_maps']:.0f} labels {base['drop_to_labels']:.0f}" if base else ""),
                      flush=True)
                if i:
                    app_samples.append(a)
                    floor_samples.append(f)
                    if base:
                        baseline_samples.append(base)
                else:
                    report["app_set"] = a["status"].replace(str(ROOT), ".")  # no local paths in the output
            browser.close()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    checkpoints = args.checkpoints or ROOT / "checkpoints" / "lite"
    print(f"in-process: {checkpoints.relative_to(ROOT) if checkpoints.is_relative_to(ROOT) else checkpoints}",
          flush=True)
    measured = inprocess(checkpoints.resolve(), warm_up, photos)
    app_keys = ("drop_to_maps", "drop_to_labels", "drop_to_vit_complete", "species_switch", "rather_switch",
                "opacity_switch", "file_event")
    report["figures"] = {
        "app": {k: summary([s[k] for s in app_samples]) for k in app_keys},
        **({"baseline": {k: summary([s[k] for s in baseline_samples]) for k in app_keys},
            # app minus baseline on the same photo: what the host's drift disturbs least
            "app_minus_baseline": {k: summary([a[k] - b[k] if a[k] is not None and b[k] is not None else None
                                               for a, b in zip(app_samples, baseline_samples)])
                                   for k in app_keys if k != "file_event"}} if baseline_samples else {}),
        "floor": {k: summary([s[k] for s in floor_samples]) for k in ("drop_to_text", "drop_to_images", "file_event")},
        "inprocess": {k: summary(measured[k]) for k in ("inprocess_ms", "inprocess_complete_ms")},
    }
    report["figures"]["app"]["per_model_maps"] = {k: summary([s["maps"][k] for s in app_samples]) for k in KEYS}
    used = [s["cpu_during_drop"] for s in app_samples if s["cpu_during_drop"]]
    if used:  # see CpuShare: who had the cores between the drop and the three maps
        report["figures"]["app"]["cpu_during_drop"] = {k: summary([u[k] for u in used]) for k in used[0]}
    report["runtimes"] = measured["runtimes"]
    report["app_samples"] = [rounded({k: v for k, v in s.items() if k != "status"}) for s in app_samples]
    report["floor_samples"] = [rounded(s) for s in floor_samples]
    if baseline_samples:
        report["baseline_samples"] = [rounded({k: v for k, v in s.items() if k != "status"}) for s in baseline_samples]
    report["pending_switches"] = sum(len(s["pending"]) for s in app_samples)
    report["maps_out_of_view"] = sum(not s["maps_in_view"] for s in app_samples)
    report["machine"]["load_average_end"] = results_file.load_average()
    report["seconds"] = round(time.perf_counter() - started, 1)
    floor_text = report["figures"]["floor"]["drop_to_text"]["median_ms"]
    report["targets"] = {
        "drop_to_maps_ms": min(TARGET_DROP_MS, floor_text + TARGET_ABOVE_FLOOR_MS) if floor_text is not None else TARGET_DROP_MS,
        "rule": f"drop -> three maps within {TARGET_ABOVE_FLOOR_MS} ms of the floor's drop -> text and <= "
                f"{TARGET_DROP_MS} ms; switches <= {TARGET_SWITCH_MS} ms (medians; issue 17)",
        "switch_ms": TARGET_SWITCH_MS,
    }
    print()
    print(table(report))
    if "cpu_during_drop" in report["figures"]["app"]:
        c = {k: v["median_ms"] for k, v in report["figures"]["app"]["cpu_during_drop"].items()}
        print(f"\nCPU from the drop to the three maps (medians, ms; window {c['window_ms']:.0f} ms on "
              f"{os.cpu_count()} cores): the app's server {c['server_ms']:.0f} (its threads waited "
              f"{c['server_waited_ms']:.0f} for a core), Chromium {c['chromium_ms']:.0f}, this script and "
              f"Playwright {c['driver_ms']:.0f}; the machine in all {c['machine_busy_ms']:.0f}")
        groups = report["machine"].get("scheduler")
        if groups and groups["autogroup"]:
            print(f"scheduler: autogroup on; Chromium in {groups['chromium_groups']} session group(s)"
                  f"{' with' if groups['chromium_shares_server_group'] else ' apart from'} the server's")
    print(f"\nsettle: {report['settle']}; switches flagged pending: {report['pending_switches']}")
    window = f"{WINDOW['width']} x {WINDOW['height']}"
    print(f"the three maps lay in the {window} window after every drop" if not report["maps_out_of_view"] else
          f"WARNING: in {report['maps_out_of_view']} of {len(app_samples)} drops a map lay outside the {window} "
          "window: Chromium does not paint it there, so drop -> maps leaves its painting out")
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, load average "
          f"{report['machine']['load_average_start']} -> {report['machine']['load_average_end']}; "
          f"{report['seconds']:.0f} s")
    if args.json:
        results_file.write(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
