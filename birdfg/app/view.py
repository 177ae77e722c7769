"""The menus that choose a model's map (its explanation method and options).

A model's menus come from its explanation methods, never from which model it is: one "view" menu
lists every method, with the first option of a method that has options spread over it (the ViT's
"Rollout (all layers)", "Layer 1 only", ...); each further option of a method gets a menu of its
own (the ViT's head). A model with one method and no options gets no menu. The page reads the
menus' values in the browser (birdfg/app/maps.js parses them as `_value` writes them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from birdfg.explanations import Explanation, Option

DEFAULT_OPACITY = 0.5
VIEW_MENU_LABEL = "Map view"


# --- menus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Menu:
    label: str
    choices: list[tuple[str, str]]  # (label, value); values encode method and option, see _value

    @property
    def default(self) -> str:
        return self.choices[0][1]


def _value(method: Explanation, option: Option | None = None, value: Any = None) -> str:
    # A menu value names its method, so a value alone says which map it asks for: "rollout",
    # "layer:layer=0", "layer:head=null". Option values are JSON (they may be None).
    return method.name if option is None else f"{method.name}:{option.name}={json.dumps(value)}"


def map_menus(methods: list[Explanation]) -> list[Menu]:
    """The menus of a model with these methods: the view menu first, then one per further
    option; none when there is nothing to choose."""
    views: list[tuple[str, str]] = []
    extras: list[Menu] = []
    for method in methods:
        options = method.options()
        if not options:
            views.append((method.label, _value(method)))
            continue
        first, *rest = options
        views += [(label, _value(method, first, value)) for label, value in first.choices]
        extras += [Menu(f"{o.label} ({method.label})", [(label, _value(method, o, v)) for label, v in o.choices])
                   for o in rest]
    if len(views) < 2 and not extras:
        return []
    return [Menu(VIEW_MENU_LABEL, views), *extras]
