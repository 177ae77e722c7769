"""The Models tab: checkpoint metadata, plus the evaluation `python -m birdfg.evaluate` stored
with the set (never recomputed by the app: evaluating takes minutes)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from birdfg.app.presentation import percent
from birdfg.checkpoints import LoadedModel
from birdfg.data import display_name
from birdfg.layout import confusion_png, report_path, report_tag, stored_reports
from birdfg.models import ENSEMBLE_KEY, MODEL_KEYS

NO_SET = "No model set loaded."


@dataclass
class Report:
    summary: str  # markdown
    per_class_headers: list[str] = field(default_factory=list)
    per_class_rows: list[list] = field(default_factory=list)
    confusion: list[tuple[str, str]] = field(default_factory=list)  # (png path, caption)


def report_file(folder: Path) -> Path | None:
    """The default report (the val split) when there is one, else the newest other stored report
    (e.g. one made on an annotated split)."""
    preferred = report_path(folder)
    if preferred.is_file():
        return preferred
    others = stored_reports(folder)
    return others[0] if others else None


def read_report(folder: Path, models: dict[str, LoadedModel]) -> Report:
    """The Models tab of the set in `folder` whose loaded models are `models`."""
    folder = Path(folder)
    path = report_file(folder)
    data: dict = {}
    problem = None
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problem = f"⚠ `{path}` could not be read ({exc})."
    keys = [k for k in MODEL_KEYS if k in models]
    parts = [_summary_table(keys, models, data)]
    command = f"`python -m birdfg.evaluate --data ../shared/bird_dataset --checkpoints {folder} --pointing-game`"
    if problem:
        parts.append(problem)
    elif path is None:
        parts.append(f"**No evaluation report for this set yet.** Per-class accuracy, confusion matrices and "
                     f"pointing-game scores appear here after running {command}.")
    else:
        meta = data.get("_meta", {})
        parts.append(f"Report: `{path.name}` ({meta.get('split', '?')} split of `{meta.get('data', '?')}`). "
                     f"The pointing game counts photos whose explanation peak for the true species falls inside "
                     f"the CUB bird box. Refresh it with {command}.")
    report = Report("\n\n".join(parts))
    if data:
        tag = report_tag(path)
        report_keys = [k for k in [*keys, ENSEMBLE_KEY] if k in data]
        classes = list(data[report_keys[0]]["per_class"]) if report_keys else []
        report.per_class_headers = ["species"] + [models[k].display_name if k in models else "Ensemble"
                                                  for k in report_keys]
        report.per_class_rows = [
            [display_name(c)] + [percent(data[k]["per_class"].get(c)) for k in report_keys] for c in classes
        ]
        for key in keys:
            png = confusion_png(folder, key, tag)
            if png.is_file():
                report.confusion.append((str(png), models[key].display_name))
    return report


def _summary_table(keys: list[str], models: dict[str, LoadedModel], data: dict) -> str:
    rows = ["| model | val acc (checkpoint) | val acc (report) | pointing game | trained |",
            "| --- | --- | --- | --- | --- |"]
    for key in keys:
        m, r = models[key], data.get(key, {})
        trained = m.meta.get("trained", {})
        when = f"{str(trained.get('date', '?'))[:10]}, {trained.get('epochs', '?')} epochs"
        pointing = (f"{percent(r['pointing_game'])} of {r.get('pointing_total', '?')}"
                    if "pointing_game" in r else "—")
        accuracy = f"{percent(r['accuracy'])} ({r['correct']}/{r['total']})" if "accuracy" in r else "—"
        rows.append(f"| **{m.display_name}** | {percent(m.val_accuracy)} | {accuracy} | {pointing} | {when} |")
    if ENSEMBLE_KEY in data:
        r = data[ENSEMBLE_KEY]
        rows.append(f"| **Ensemble** (mean softmax) | — | {percent(r['accuracy'])} ({r['correct']}/{r['total']}) "
                    "| — | — |")
    return "\n".join(rows)
