"""What the widgets say: column headers, top-5 labels, the agreement sentence, the status line,
the species menu. Plain text and numbers, no Gradio."""
from __future__ import annotations

from birdfg.app.sets import ModelSets
from birdfg.checkpoints import LoadedModel
from birdfg.data import display_name
from birdfg.inference import Comparison, Engine
from birdfg.layout import checkpoint_name

PREDICTED = ""  # species menu value meaning "each model's own top guess"
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def species_choices(classes: list[str]) -> list[tuple[str, str]]:
    """The species menu: each model's own guess first, then every class by name."""
    return [("Each model's own top guess", PREDICTED)] + sorted((display_name(c), c) for c in classes)


def missing(engine: Engine | None, key: str) -> str | None:
    """Why model `key` is not in the loaded set (its checkpoint's problem), if it is known."""
    if engine is None:
        return None
    return engine.model_set.errors.get(checkpoint_name(key))


def blurb(engine: Engine | None, key: str) -> str:
    """One sentence on how to read model `key`'s map: its default explanation's description."""
    if engine is None or key not in engine.methods:
        return ""
    return engine.methods[key][0].description


def model_header(key: str, loaded: LoadedModel | None, comparison: Comparison | None = None,
                 problem: str | None = None) -> str:
    """Markdown above a column: name, val accuracy from the checkpoint, latency or error."""
    if loaded is None:
        return f"### {key.upper()}\n⚠ Not in this set. {problem or ''}".strip()
    lines = [f"### {loaded.display_name}", f"val accuracy **{percent(loaded.val_accuracy)}** (checkpoint metadata)"]
    result = comparison.results.get(key) if comparison else None
    if result is not None:
        if result.ok:
            lines[-1] += f" · **{result.latency_ms:.0f} ms** on this photo"
        else:
            lines.append(f"⚠ This model failed on the photo: {result.error}")
    return "\n\n".join(lines)


def column_header(engine: Engine | None, key: str, comparison: Comparison | None = None) -> str:
    return model_header(key, engine.models.get(key) if engine else None, comparison, missing(engine, key))


def top5(comparison: Comparison | None, key: str) -> dict[str, float] | None:
    """A gr.Label value: species -> probability of a model (or the ensemble); None without one."""
    probs = comparison.probs(key) if comparison is not None else None
    return None if probs is None else dict(comparison.top(probs))


def agreement(comparison: Comparison | None) -> str:
    """The sentence under the columns. It claims agreement exactly when `Comparison.agree` does
    (the `/compare` answer's "agree"): every model answered, with the same top-1."""
    if comparison is None:
        return ""
    answered = comparison.answered
    if not answered:
        return "⚠ No model could classify this photo."
    names = {k: display_name(comparison.classes[comparison.predicted(k)]) for k in answered}
    failed = [r.name for k, r in comparison.results.items() if k not in answered]
    if comparison.agree:
        count = len(answered)
        who = "The only model says" if count == 1 else f"All {NUMBER_WORDS.get(count, count)} agree"
        return f"✓ **{who}: {next(iter(names.values()))}**."
    said = " · ".join(f"{comparison.results[k].name}: **{n}**" for k, n in names.items())
    tail = f" ({', '.join(failed)} failed)" if failed else ""
    verdict = "They disagree" if len(set(names.values())) > 1 else "Not every model answered"
    return f"**{verdict}** — {said}{tail}. The ensemble averages their probabilities."


def set_status(sets: ModelSets, name: str | None, engine: Engine | None, problem: str | None = None) -> str:
    """The status line: which set is in use and from where, what is missing, and the notes of
    set discovery (e.g. the Hub was offline)."""
    lines = list(sets.notes)
    if engine is not None:
        source = sets.sources[name]
        names = " · ".join(m.display_name for m in engine.models.values())
        where = f"Hugging Face Hub (cached in `{source.folder}`)" if source.origin == "hub" else f"`{source.folder}`"
        lines.insert(0, f"Model set **{name}** from {where}: {names}.")
        if engine.model_set.errors:
            lines.append("⚠ " + " ".join(engine.model_set.errors.values()))
    if problem:
        lines.append(f"⚠ {problem}")
    return "\n\n".join(lines)


def faithfulness_verdict(engine: Engine, comparison: Comparison, curves: dict[str, dict], classes: dict[str, int]) -> str:
    """One sentence on a photo's deletion test: whose map held up best (the lowest area under
    the probability curve), with every model's area."""
    if not curves:
        return "⚠ No model could be tested on this photo."
    ranked = sorted(curves, key=lambda key: curves[key]["auc"])
    best = ranked[0]
    areas = " · ".join(f"{engine.models[k].display_name} ({display_name(comparison.classes[classes[k]])}): "
                       f"{curves[k]['auc']:.3f}" for k in ranked)
    return (f"**{engine.models[best].display_name}'s map held up best**: removing what it marks as important "
            f"lowered its belief fastest. Area under each curve (lower = more faithful): {areas}.")
