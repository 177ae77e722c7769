"""How a visitor wants the maps drawn (species, opacity, each model's explanation method and its
options), the menus that choose a method, and drawing a map that way through the engine.

A model's menus come from its explanation methods, never from which model it is: one "view" menu
lists every method, with the first option of a method that has options spread over it (the ViT's
"Rollout (all layers)", "Layer 1 only", ...); each further option of a method gets a menu of its
own (the ViT's head). A model with one method and no options gets no menu.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from birdfg.app.presentation import PREDICTED
from birdfg.explanations import Explanation, Option
from birdfg.inference import Comparison, Engine

DEFAULT_OPACITY = 0.5
VIEW_MENU_LABEL = "Map view"
PARTS_SHOWN = 4  # terms of a map shown under it (e.g. a B-CNN's channel pairs)


@dataclass
class MapChoice:
    """Which explanation of one model, with which options."""

    method: str | None = None  # None: the model's default method
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class View:
    """How one session's maps are drawn; the compare API uses the defaults."""

    species: str = PREDICTED  # class folder name, or PREDICTED
    opacity: float = DEFAULT_OPACITY
    maps: dict[str, MapChoice] = field(default_factory=dict)  # model key -> its choice (default: none)

    def for_new_photo(self) -> View:
        """A new photo is first shown for each model's own guess; the rest of the view stays."""
        return View(PREDICTED, self.opacity, dict(self.maps))


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


def _parse(value: str | None) -> tuple[str | None, str | None, Any]:
    """(method, option name or None, option value) of a menu value; (None, None, None) if malformed."""
    if not value:
        return None, None, None
    method, _, setting = value.partition(":")
    if not setting:
        return method, None, None
    name, _, raw = setting.partition("=")
    try:
        return method, name, json.loads(raw)
    except json.JSONDecodeError:
        return None, None, None


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


def choice_of(values: list[str | None]) -> MapChoice:
    """The map that a model's menus ask for, given their values (view menu first)."""
    if not values:
        return MapChoice()
    method, name, value = _parse(values[0])
    options = {name: value} if name else {}
    for extra in values[1:]:
        of, name, value = _parse(extra)
        if of == method and name:  # a further menu only counts for its own method
            options[name] = value
    return MapChoice(method, options)


# --- drawing ----------------------------------------------------------------------------------


def class_index(comparison: Comparison, species: str | None) -> int | None:
    if not species or species not in comparison.classes:
        return None
    return comparison.classes.index(species)


def has_parts(method: Explanation) -> bool:
    """Whether the method breaks its map into terms (Explanation.parts is overridden)."""
    return type(method).parts is not Explanation.parts


def _choice(engine: Engine, key: str, view: View) -> MapChoice:
    choice = view.maps.get(key, MapChoice())
    if choice.method is not None and choice.method not in {m.name for m in engine.methods[key]}:
        return MapChoice()  # a choice made for another set's model: draw this one's default
    return choice


def _answered(comparison: Comparison | None, key: str) -> bool:
    return comparison is not None and key in comparison.answered


def draw_overlay(engine: Engine, comparison: Comparison, key: str, view: View) -> Image.Image | None:
    """Model `key`'s map drawn on the photo, or None when that model has no result."""
    if not _answered(comparison, key):
        return None
    choice = _choice(engine, key, view)
    return engine.overlay(comparison, key, class_index(comparison, view.species), view.opacity,
                          choice.method, **choice.options)


def map_caption(engine: Engine, comparison: Comparison | None, key: str, view: View) -> str:
    """The note under model `key`'s map ("" when there is no map)."""
    if not _answered(comparison, key):
        return ""
    choice = _choice(engine, key, view)
    return engine.caption(comparison, key, class_index(comparison, view.species), choice.method, **choice.options)


def map_parts(engine: Engine, comparison: Comparison | None, key: str, view: View,
              k: int = PARTS_SHOWN) -> list[tuple[str, Image.Image]]:
    """The map's largest terms as (caption, small overlay); [] when its method has none."""
    if not _answered(comparison, key):
        return []
    return engine.parts_of(comparison, key, class_index(comparison, view.species), _choice(engine, key, view).method, k)
