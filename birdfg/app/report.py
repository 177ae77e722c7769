"""The Models tab: checkpoint metadata, plus the evaluation `python -m birdfg.evaluate` stored
with the set (never recomputed by the app: evaluating takes minutes), the faithfulness of the
maps among it when it was run with `--faithfulness`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from birdfg.app.presentation import percent
from birdfg.checkpoints import LoadedModel
from birdfg.data import display_name
from birdfg.layout import confusion_png, faithfulness_png, report_path, report_tag, stored_reports
from birdfg.models import ENSEMBLE_KEY, MODEL_KEYS

NO_SET = "No model set loaded."


@dataclass
class Report:
    summary: str  # markdown
    per_class_headers: list[str] = field(default_factory=list)
    per_class_rows: list[list] = field(default_factory=list)
    confusion: list[tuple[str, str]] = field(default_factory=list)  # (png path, caption)
    # The mean deletion / insertion curves per model (one PNG), when the report has faithfulness.
    curves: list[tuple[str, str]] = field(default_factory=list)  # (png path, caption)


def report_file(folder: Path) -> Path | None:
    """The default report (the val split) when there is one, else the newest other stored report
    (e.g. one made on an annotated split)."""
    preferred = report_path(folder)
    if preferred.is_file():
        return preferred
    others = stored_reports(folder)
    return others[0] if others else None


def _auc_losses(loses: str, mine: dict, theirs: dict) -> list[str]:
    """The sentences saying where a map's mean AUCs are no better than another's."""
    lost = []
    if mine["deletion_auc"] >= theirs["deletion_auc"]:
        lost.append(f"{loses} on deletion ({mine['deletion_auc']:.3f} vs {theirs['deletion_auc']:.3f}; lower is better).")
    if mine["insertion_auc"] <= theirs["insertion_auc"]:
        lost.append(f"{loses} on insertion ({mine['insertion_auc']:.3f} vs {theirs['insertion_auc']:.3f}; "
                    "higher is better).")
    return lost


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
    command = (f"`python -m birdfg.evaluate --data ../shared/bird_dataset --checkpoints {folder} "
               "--pointing-game --faithfulness`")
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
    if data.get("faithfulness"):
        parts.append(faithfulness_markdown(data["faithfulness"], models))
    report = Report("\n\n".join(parts))
    if data:
        tag = report_tag(path)
        png = faithfulness_png(folder, tag)
        if data.get("faithfulness") and png.is_file():
            report.curves.append((str(png), "Mean deletion (top) and insertion (bottom) curves, true class"))
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


def _name(key: str, models: dict[str, LoadedModel]) -> str:
    return models[key].display_name if key in models else key


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def faithfulness_markdown(section: dict, models: dict[str, LoadedModel]) -> str:
    """The faithfulness table of a stored report, and plainly where a map loses."""
    meta = section.get("meta", {})
    rows = [f"### Are the maps faithful? ({meta.get('subset', '?')}, true class, {meta.get('points', '?')} points)",
            "Deletion removes the pixels a map ranks highest (set to grey), 5 % at a time, and records the model's "
            "probability of the true species: the faster it falls, the lower the area (AUC) and the more faithful "
            "the map. Insertion restores them into a blurred photo: higher is better. *Beats the centre prior* is "
            "the share of photos where the map's AUC beats a Gaussian at the photo centre (deletion / insertion). "
            "The pointing game (map peak in the bird box) and the energy pointing game (share of the map's mass in "
            "the box) come with their baselines: the photo centre in the box, the box's share of the crop.",
            "",
            "| model | map | deletion ↓ | insertion ↑ | beats centre prior (del / ins) | pointing game | "
            "energy in box |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, model in section.get("models", {}).items():
        for name, m in model["methods"].items():
            wins = m.get("wins_vs_centre")
            won = f"{_share(wins['deletion']['share'])} / {_share(wins['insertion']['share'])}" if wins else "—"
            label = f"**{m['label']}** (default)" if name == model.get("default") else m["label"]
            if m["kind"] == "baseline":
                label = f"*{m['label']}*"
            rows.append(f"| {_name(key, models)} | {label} | {m['deletion_auc']:.3f} | {m['insertion_auc']:.3f} | "
                        f"{won} | {_share(m.get('pointing_game'))} | {_share(m.get('energy_pointing'))} |")
        rows.append(f"| {_name(key, models)} | *baselines: centre point in box, box share of crop* | | | | "
                    f"{_share(model.get('centre_point_baseline'))} | {_share(model.get('box_share_baseline'))} |")
    text = "\n".join(rows)
    peaks = _notes(section, models)
    if peaks:
        text += "\n\n" + "\n".join(f"- {line}" for line in peaks)
    lost = _losses(section, models)
    if lost:
        return text + "\n\n**Where a map loses:**\n\n" + "\n".join(f"- {line}" for line in lost)
    return text + ("\n\nNo model's own map loses to a baseline here (mean deletion and insertion AUC against the "
                   "centre prior, the random map and GradCAM where measured; per-photo wins against the centre prior; "
                   "both pointing games).")


def _notes(section: dict, models: dict[str, LoadedModel]) -> list[str]:
    """GradCAM against CAM, and how often a class-specific map's peak moves with the class."""
    found = []
    for key, model in section.get("models", {}).items():
        gap, default = model.get("gradcam_vs_relu_default_max"), model["methods"].get(model.get("default"), {})
        if gap is not None and gap < 1e-3:
            found.append(f"pytorch-grad-cam's GradCAM on {_name(key, models)} is its {default.get('label', 'map')} "
                         f"with the negative part cut, scaled to [0, 1] (largest difference {gap:.1g}), as theory says "
                         "for a linear head on pooled features: the two differ only in how the cut part is ordered.")
    for key, model in section.get("models", {}).items():
        for m in model["methods"].values():
            if m.get("peaks_differ_runner_up") is not None:
                found.append(f"{_name(key, models)}'s {m['label']}: the peak for the true species differs from the "
                             f"peak for the runner-up on {_share(m['peaks_differ_runner_up'])} of photos.")
    return found


def _losses(section: dict, models: dict[str, LoadedModel]) -> list[str]:
    """Every place a model's own map does no better than a baseline, in words."""
    lost = []
    for key, model in section.get("models", {}).items():
        methods = model["methods"]
        for name, m in methods.items():
            if m["kind"] != "method":
                continue
            who = f"**{_name(key, models)}'s {m['label']}**"
            for rival in ("centre", "random", "gradcam"):
                if rival not in methods:
                    continue
                lost += _auc_losses(f"{who} loses to the {methods[rival]['label']}", m, methods[rival])
            for mode, wins in (m.get("wins_vs_centre") or {}).items():
                if wins["share"] < 0.5:
                    lost.append(f"{who} beats the centre prior on only {_share(wins['share'])} of photos ({mode}).")
            if name == model.get("default"):  # the default against the model's other maps
                for other, o in methods.items():
                    if other == name or o["kind"] != "method":
                        continue
                    lost += _auc_losses(f"{who}, the default, loses to the same model's {o['label']}", m, o)
            centre, share = model.get("centre_point_baseline"), model.get("box_share_baseline")
            if m.get("pointing_game") is not None and centre is not None and m["pointing_game"] <= centre:
                lost.append(f"{who}: its pointing game ({_share(m['pointing_game'])}) is no better than pointing at "
                            f"the photo centre ({_share(centre)}).")
            if m.get("energy_pointing") is not None and share is not None and m["energy_pointing"] <= share:
                lost.append(f"{who} puts no more of its mass in the bird box ({_share(m['energy_pointing'])}) than "
                            f"a flat map ({_share(share)}).")
    return lost
