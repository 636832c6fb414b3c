"""validate's report: the figures, validation.md, predictions.csv and validation.json, made in a
hidden folder inside --out and moved in place (Ctrl-C held for the moves), and the summary
printed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cxr.atomic import temporary_name
from cxr.outputs import columns
from cxr.report import pct, with_ci
from cxr.validate_labels import Labels
from cxr.validate_results import (
    CALIBRATION_BINS,
    CHILDREN_ONLY,
    FORMAT,
    SOURCES,
    Scored,
    scored_arrays,
)

JSON_NAME, MD_NAME, CSV_NAME = "validation.json", "validation.md", "predictions.csv"
FIXED_NAMES = (JSON_NAME, MD_NAME, CSV_NAME, "roc.png", "calibration.png",
               "confusion_four_class.png")  # fmt: skip
OWN_NAMES = {*FIXED_NAMES, *(f"confusion_binary_{s}.png" for s in SOURCES)}


def earlier_report(out: Path) -> dict[str, Any] | None:
    try:
        blob = json.loads((out / JSON_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return blob if isinstance(blob, dict) and blob.get("format") == FORMAT else None


def written_by_validate(out: Path) -> bool:
    return earlier_report(out) is not None


# --- figures ----------------------------------------------------------------------------------


def draw_figures(folder: Path, s: Scored, result: dict[str, Any]) -> list[str]:
    """The PNGs this set allows, written to `folder`; their names."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    def save(fig: Any, name: str) -> str:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        return name

    written, binary, n = [], result["binary"], len(s.labels)
    y = s.covid.astype(int)
    if binary["roc_auc"] is not None:
        fig, ax = plt.subplots(figsize=(5, 4.6))
        RocCurveDisplay.from_predictions(y, s.p_covid, ax=ax, name="p(covid)",
                                         plot_chance_level=True)  # fmt: skip
        for source, point in binary["operating_points"].items():
            sens, spec = point["sensitivity"]["value"], point["specificity"]["value"]
            ax.plot(1 - spec, sens, "o", label=f"{source} threshold {point['threshold']:.3f}")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"Binary COVID-19: ROC on {n} site films")
        ax.legend(loc="lower right", fontsize=8)
        written.append(save(fig, "roc.png"))
    if n:
        fig, ax = plt.subplots(figsize=(5, 4.6))
        CalibrationDisplay.from_predictions(y, s.p_covid, n_bins=CALIBRATION_BINS, ax=ax,
                                            name="p(covid)", pos_label=1)  # fmt: skip
        ax.set_title(f"Binary COVID-19: calibration on {n} site films")
        written.append(save(fig, "calibration.png"))
        for source, point in binary["operating_points"].items():
            fig, ax = plt.subplots(figsize=(4.2, 3.6))
            counts = np.asarray(point["confusion"]["counts"])
            ConfusionMatrixDisplay(counts, display_labels=["non_covid", "covid"]).plot(
                ax=ax, cmap="Blues", colorbar=False, values_format="d"
            )
            ax.set_xlabel(f"called COVID-19 at p >= {point['threshold']:.3f} ({source})")
            ax.set_title(f"Binary at the {source} threshold (n={n})")
            written.append(save(fig, f"confusion_binary_{source}.png"))
    four = result["four_class"]["confusion"]
    if four["rows"]:
        written.append(save(four_class_figure(plt, four), "confusion_four_class.png"))
    return written


def four_class_figure(plt: Any, confusion: dict[str, Any]) -> Any:
    """Rows: the labels present (pneumonia included), columns: the four classes; counts."""
    counts = np.asarray(confusion["counts"])
    rows, cols = confusion["rows"], confusion["columns"]
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(cols), 1.6 + 0.6 * len(rows)))
    ax.imshow(counts, cmap="Blues", aspect="auto")
    for (r, c), value in np.ndenumerate(counts):
        shade = "white" if value > counts.max() / 2 else "black"
        ax.text(c, r, str(value), ha="center", va="center", color=shade)
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("called (four-class argmax)")
    ax.set_ylabel("label")
    ax.set_title(f"Four-class (n={counts.sum()}); viral vs bacterial: children only", fontsize=9)
    return fig


# --- Markdown ---------------------------------------------------------------------------------


def count_text(k: int, n: int) -> str:
    return f"{k}/{n}"


def rate_cell(rate: dict[str, Any]) -> str:
    """`x% [low, high]`, or n/a where undefined."""
    return with_ci(rate["value"], rate["ci95"])


def markdown(result: dict[str, Any]) -> list[str]:
    m, b = result["models"], result["binary"]
    boot = result["bootstrap"]
    lines = [
        f"# Validation on {result['labels']}",
        "",
        f"Written by `python -m cxr validate` on {result['date']}. Binary model "
        f"`{m['binary']['file']}` (sha256 {m['binary']['sha256'][:12]}), four-class model "
        f"`{m['four_class']['file']}`, lung segmenter {m['segmenter'] or 'none'}.",
        "",
        f"{result['scored']} of {result['rows']} rows scored, {result['left_out']} left out"
        + (" (see Problems)." if result["left_out"] else "."),
        "Films by label: "
        + (", ".join(f"{k} {v}" for k, v in result["films_by_label"].items()) or "none")
        + ".",  # fmt: skip
        f"95% CIs: percentile bootstrap over {boot['groups']} {boot['unit']}s, "
        f"{boot['resamples']} resamples (none when 0).",
        *(f"Note: {note}." for note in result["notes"]),
        "",
        "## Binary: COVID-19 vs not",
        "",
    ]
    if b["roc_auc"] is None:
        lines.append("ROC AUC: undefined (" + "; ".join(b["undefined"]) + ").")
    else:
        ci = b["roc_auc_ci95"]
        span = f" (95% CI {ci['low']:.3f}-{ci['high']:.3f})" if ci else ""
        lines.append(f"ROC AUC {b['roc_auc']:.3f}{span} on {b['n_covid']} COVID-19 and "
                     f"{b['n_non_covid']} other films.")  # fmt: skip
    if b["calibration"]:
        lines.append(f"Brier score {b['calibration']['brier']:.3f} (calibration.png).")
    lines += ["", "| threshold | value | sensitivity | called COVID-19 / COVID-19 films | "
              "specificity | called negative / other films |", "|---|---|---|---|---|---|"]  # fmt: skip
    for source, point in b["operating_points"].items():
        sens, spec = point["sensitivity"], point["specificity"]
        lines.append(
            f"| {source} | {point['threshold']:.4f} | {rate_cell(sens)} | "
            f"{count_text(sens['called_covid'], sens['of_covid'])} | {rate_cell(spec)} | "
            f"{count_text(spec['called_negative'], spec['of_non_covid'])} |"
        )
    lines += ["", *four_class_markdown(result["four_class"]), ""]
    lines += call_rate_markdown("## Call rates per label", result["call_rates"], m)
    for group, rates in result.get("call_rates_by_age_group", {}).items():
        lines += call_rate_markdown(f"### {group} films", rates["call_rates"], m)
        if group == "adult":
            lines += [f"{rates['called_viral_or_bacterial']} of {rates['n']} adult films were "
                      f"called viral or bacterial. {CHILDREN_ONLY}", ""]  # fmt: skip
    gate = result["not_frontal"]
    lines += ["## Warnings predict gave", "",
              f"The out-of-distribution gate flagged {gate['flagged']} of {gate['of']} films as "
              "not a frontal chest radiograph (docs/ood.md).", ""]  # fmt: skip
    lines += [f"- {w['films']} films: {w['warning']} (lines {', '.join(map(str, w['lines']))})"
              for w in result["warnings"]] or ["None."]  # fmt: skip
    lines += ["", "## Problems", ""]
    lines += [
        f"- line {p['line']} ({p['file'] or 'no file'}), {'scored' if p['scored'] else 'left out'}: "
        f"{p['message']}"
        for p in result["problems"]
    ] or ["None."]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in result["files"]) + "."]
    return lines


def four_class_markdown(four: dict[str, Any]) -> list[str]:
    lines = ["## Four-class", "", f"**{four['note']}**", ""]
    if not four["n"]:
        return [*lines, "No film with a four-class label (covid, viral, bacterial, normal, "
                "pneumonia)."]  # fmt: skip
    lines.append(f"Accuracy {pct(four['accuracy'])} ({four['correct']}/{four['n']}; a pneumonia "
                 "film counts as right when called viral or bacterial).")  # fmt: skip
    cols = four["confusion"]["columns"]
    lines += ["", "| label \\ called | " + " | ".join(cols) + " |",
              "|---|" + "---|" * len(cols)]  # fmt: skip
    for label, row in zip(four["confusion"]["rows"], four["confusion"]["counts"], strict=True):
        lines.append(f"| {label} | " + " | ".join(map(str, row)) + " |")
    return lines


def call_rate_markdown(title: str, rates: dict[str, Any], models: dict[str, Any]) -> list[str]:
    names = models["class_names"]
    sources = [t["source"] for t in models["thresholds"]]
    head = ["label", "films", *(f"called {c}" for c in names),
            *(f"COVID-19 at {s}" for s in sources)]  # fmt: skip
    lines = [title, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, r in rates.items():
        cells = [label, str(r["n"]), *(pct(r["called"][c]) for c in names),
                 *(pct(r["called_covid_19"][s]) for s in sources)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


# --- output -----------------------------------------------------------------------------------


class InterruptedAfterWriting(KeyboardInterrupt):
    """Ctrl-C came while the finished report was being moved in place: it is complete."""


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[list[bool]]:
    """Hold Ctrl-C while files are moved in place (a few renames), then raise it."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    before = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, before)
    if pressed:
        raise InterruptedAfterWriting


def write_csv(path: Path, records: list[dict[str, Any]], names: list[str], labels: Labels) -> None:
    extra = ["label"] + ["patient"] * labels.has_patient  # age_group: one of predict's columns
    fields = ["line", *columns(names), *extra]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def write_report(
    out: Path, result: dict[str, Any], records: list[dict[str, Any]], labels: Labels,
    names: list[str],
) -> None:  # fmt: skip
    """Everything made in a hidden folder inside `out`, then moved in (validation.json last)
    and the earlier report's files this one does not have removed: an interruption before the
    moves leaves `out` as it was."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(out / "report")
    try:
        staging.mkdir()
        figures = draw_figures(staging, scored_arrays(records, names), result)
        result["files"] = [JSON_NAME, MD_NAME, CSV_NAME, *figures]
        write_csv(staging / CSV_NAME, records, names, labels)
        (staging / MD_NAME).write_text("\n".join(markdown(result)) + "\n", encoding="utf-8")
        (staging / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        stale = set(OWN_NAMES) & set((earlier_report(out) or {}).get("files", [])) - set(
            result["files"]
        )
        with ctrl_c_held():
            for name in [*result["files"][1:], JSON_NAME]:
                os.replace(staging / name, out / name)
            for name in stale:
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
    except BaseException:
        if created and not any(p for p in out.iterdir() if p != staging):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summary(result: dict[str, Any], out: Path) -> str:
    b = result["binary"]
    parts = [f"{result['scored']} of {result['rows']} rows scored"]
    if b["roc_auc"] is not None:
        ci = b["roc_auc_ci95"]
        span = f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""
        parts.append(f"ROC AUC {b['roc_auc']:.3f}{span}")
    else:
        parts.append("ROC AUC undefined (" + "; ".join(b["undefined"]) + ")")
    for source, point in b["operating_points"].items():
        sens, spec = point["sensitivity"], point["specificity"]
        parts.append(
            f"{source} threshold {point['threshold']:.4f}: sensitivity "
            f"{value_text(sens['value'])} ({sens['called_covid']}/{sens['of_covid']}), "
            f"specificity {value_text(spec['value'])} "
            f"({spec['called_negative']}/{spec['of_non_covid']})"
        )
    adult = result.get("call_rates_by_age_group", {}).get("adult")
    if adult:  # issue 18.5: the type is not validated on adults; say how often it was given
        parts.append(f"adult films called viral or bacterial: {adult['called_viral_or_bacterial']}"
                     f" of {adult['n']} (the pneumonia type is validated on children only)")  # fmt: skip
    return "\n".join(parts) + f"\nreport in {out / MD_NAME}"


def value_text(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
