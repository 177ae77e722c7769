"""Each model's maps as data for the browser, which draws them (birdfg/app/maps.js): every view
its explanation methods offer, for every class, so that choosing another species, a contrast,
another opacity or another attention layer redraws in the page without asking the server.

A method whose map is linear in the class score (`linear_in_class`) sends one grid per class;
the page subtracts two of them for "X rather than Y" (exact); one that costs a backward pass per
class (`cost_per_class`) sends only its own guess's grid in the quick first answer, as a gradient
method does. A gradient method sends one grid per target it was asked for: every class, and every
class rather than each of the `rivals` (the models' top two guesses); a visitor's "rather than"
another species adds that one.
Grids travel as base64 float32 (a part's map, drawn on its own scale, as bytes), the crop box
as fractions of the photo.
"""
from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import numpy as np

from birdfg.data import display_name
from birdfg.explanations import Explanation, Target
from birdfg.inference import Comparison, Engine
from birdfg.overlay import normalise

RUNNER_UP = "@runner-up"  # "rather than" value: each model's own second guess
NOTHING = ""  # "rather than" value: the plain map
SPECIES = "{species}"  # placeholders of the caption templates the page fills in
RATHER = "{rather}"
PARTS_SHOWN = 4  # terms of a map shown under it (e.g. a B-CNN's channel pairs)


def encode(grids: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(grids, dtype="<f4").tobytes()).decode("ascii")


def encode_shape(grid: np.ndarray) -> str:
    """A grid that is only ever drawn on its own scale (a part's map), as base64 bytes 0-255:
    a quarter of the float32 size."""
    return base64.b64encode((normalise(grid) * 255).round().astype(np.uint8).tobytes()).decode("ascii")


def options_key(options: dict[str, Any]) -> str:
    """The name of one combination of a method's options; maps.js builds the same string."""
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def rivals(comparison: Comparison, top: int = 2) -> list[int]:
    """The classes most worth a contrast: every answered model's top `top` guesses."""
    found: list[int] = []
    for key in comparison.answered:
        for c in np.argsort(-comparison.probs(key))[:top]:
            if int(c) not in found:
                found.append(int(c))
    return found


def _views(method: Explanation) -> list[dict[str, Any]]:
    """Every combination of the method's option values (one empty one without options)."""
    options = method.options()
    return [dict(zip((o.name for o in options), values))
            for values in itertools.product(*([v for _, v in o.choices] for o in options))]


def _targets(comparison: Comparison, key: str, against: list[int], every_class: bool) -> list[Target]:
    """What a gradient method answers for: the classes (all, or the model's own guess and the
    rivals), each plainly and rather than each rival."""
    own = comparison.predicted(key)
    classes = range(len(comparison.classes)) if every_class else list(dict.fromkeys([own, *against]))
    return [(x, None) for x in classes] + [(x, y) for x in classes for y in against if y != x]


def _method_data(engine: Engine, comparison: Comparison, key: str, method: Explanation, against: list[int],
                 every_class: bool) -> dict[str, Any]:
    own = comparison.predicted(key)
    classes = list(range(len(comparison.classes)))
    # A linear method that pays per class answers the quick first answer like a gradient method
    # (the model's own guess only); the complete answer sends every class.
    linear = method.linear_in_class and (every_class or not method.cost_per_class)
    views: dict[str, Any] = {}
    for options in _views(method):
        if not method.class_specific:
            grid = engine.explain_all(comparison, key, [(own, None)], method.name, **options)[0]
            views[options_key(options)] = {"map": encode(grid),
                                           "caption": method.caption("", True, **options)}
        elif linear:
            grids = engine.explain_all(comparison, key, [(c, None) for c in classes], method.name, **options)
            views[options_key(options)] = {"all": encode(grids)}
        else:
            targets = _targets(comparison, key, against, every_class)
            grids = engine.explain_all(comparison, key, targets, method.name, **options)
            views[options_key(options)] = {"maps": {f"{x}" if y is None else f"{x}-{y}": encode(g)
                                                    for (x, y), g in zip(targets, grids)}}
    data: dict[str, Any] = {"class_specific": method.class_specific, "linear": linear,
                            "defaults": method.resolve({}), "views": views}
    if method.class_specific:
        data["captions"] = {"plain": method.caption(SPECIES, False), "own": method.caption(SPECIES, True),
                            "rather": method.caption(SPECIES, False, RATHER),
                            "own_rather": method.caption(SPECIES, True, RATHER)}
    return data


def model_maps(engine: Engine, comparison: Comparison | None, key: str, against: list[int] | None = None,
               every_class: bool = True) -> dict[str, Any] | None:
    """Everything the page needs to draw model `key`'s maps for this comparison (None when the
    model has no result). `every_class` False: the quick first answer, the default method only,
    and a gradient method for the model's own guess only (the rest follows; every target more
    is one more backward pass before the first maps are drawn)."""
    if comparison is None or key not in comparison.answered:
        return None
    if not every_class:
        against = []
    elif against is None:
        against = rivals(comparison)
    methods = engine.methods[key]
    evidence = comparison.results[key].evidence
    probs = comparison.probs(key)
    width, height = comparison.display_size
    left, top, right, bottom = comparison.boxes[key]
    data: dict[str, Any] = {
        "key": key, "classes": comparison.classes, "names": [display_name(c) for c in comparison.classes],
        "own": comparison.predicted(key), "runner_up": int(np.argsort(-probs)[1]) if len(probs) > 1 else None,
        "rivals": against, "complete": every_class,
        # Which comparison and which answer of it: the page draws the same data only once.
        "stamp": f"{id(comparison)}:{int(every_class)}:{','.join(map(str, against))}",
        "grid": list(evidence.features.shape[-2:]) if evidence.features.dim() == 4 else None,
        "box": [left / width, top / height, right / width, bottom / height],
        "default": methods[0].name,
        "methods": {m.name: _method_data(engine, comparison, key, m, against, every_class)
                    for m in (methods if every_class else methods[:1])},
    }
    first = methods[0]
    if type(first).parts is not Explanation.parts:  # the default method breaks its map into terms
        every = first.parts_of_classes(evidence, list(range(len(comparison.classes))), PARTS_SHOWN)
        data["parts"] = {str(c): [[caption, encode_shape(grid)] for caption, grid in terms]
                         for c, terms in enumerate(every)}
    return data


def needs_more(engine: Engine, comparison: Comparison | None, key: str) -> bool:
    """Whether the quick first answer of model `key` left something out (other methods, or
    classes of a gradient method)."""
    if comparison is None or key not in comparison.answered:
        return False
    methods = engine.methods[key]
    return len(methods) > 1 or any(m.class_specific and (m.cost_per_class or not m.linear_in_class) for m in methods)


def rather_index(comparison: Comparison, rather: str | None) -> int | None:
    """The class a "rather than" value names (None for nothing or each model's runner-up)."""
    if not rather or rather == RUNNER_UP or rather not in comparison.classes:
        return None
    return comparison.classes.index(rather)


def rather_choices(comparison: Comparison | None, classes: list[str]) -> list[tuple[str, str]]:
    """The "rather than" menu: the plain map, each model's runner-up, the rivals, then the rest."""
    choices = [("nothing (the plain map)", NOTHING), ("each model's runner-up", RUNNER_UP)]
    first = [classes[c] for c in rivals(comparison)] if comparison is not None else []
    rest = sorted((c for c in classes if c not in first), key=display_name)
    return choices + [(display_name(c), c) for c in first + rest]
