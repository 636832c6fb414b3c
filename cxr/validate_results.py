"""validate's numbers: the scored films as arrays, and from them what the report says (ROC AUC,
sensitivity and specificity at each threshold with bootstrap CIs, calibration, the four-class
confusion, call rates per label and age group, predict's warnings counted, the rows left out).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score

from cxr import metrics
from cxr.api import NOT_FRONTAL
from cxr.inputs import printable
from cxr.loading import Models, Threshold
from cxr.validate_labels import LABELS, Labels, Row

FORMAT = "cxr-validation/1"
FOUR_CLASS_ROWS = ("covid", "viral", "bacterial", "normal", "pneumonia")  # labels it can score
PNEUMONIA_TYPES = ("viral", "bacterial")
REPORTED_AGE_GROUPS = ("adult", "pediatric")
SOURCES = ("bundle", "site", "argument")  # the order operating points are reported in
SEED = 0  # bootstrap resamples: the same report for the same films
LEVEL = 0.95
CALIBRATION_BINS = 10
# What the training data can and cannot support (issue 18, point 5): said next to every
# four-class result, since the model gives a type for every pneumonia it sees.
CHILDREN_ONLY = (
    "Viral vs bacterial pneumonia is validated on children only: the training data holds 46 "
    "typed adult films, so a 'viral' or 'bacterial' call on an adult film is not a validated "
    "pneumonia type (read it as 'pneumonia')."
)


@dataclass(frozen=True)
class Setup:
    """The models and thresholds a validation runs with (cxr.validate.load_setup)."""

    models: Models
    threshold: Threshold  # predict's: what predictions.csv's covid_positive applies
    points: list[Threshold]  # every threshold reported: bundle, site, argument
    info: dict[str, Any]  # the models and thresholds, for the report
    notes: list[str]


def problems(rows: list[Row], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row left out or scored with a caveat: line, file as written, what was wrong."""
    found = []
    for row, record in zip(rows, records, strict=True):
        if record["status"] != "ok":
            message = record["message"]
            short = message.removeprefix(f"{printable(str(row.path))}: ")
            found.append({"line": row.line, "file": row.file, "message": short, "scored": False})
        elif row.note is not None:
            found.append({"line": row.line, "file": row.file, "message": row.note, "scored": True})
    return found


@dataclass(frozen=True)
class Scored:
    """The films scored, as arrays in row order."""

    labels: np.ndarray  # str
    p_covid: np.ndarray
    predicted: np.ndarray  # the four-class argmax, str
    probs: np.ndarray  # N x K four-class probabilities
    groups: np.ndarray
    age_groups: np.ndarray  # str, "" when not given
    lines: np.ndarray

    @property
    def covid(self) -> np.ndarray:
        return self.labels == "covid"


def scored_arrays(records: list[dict[str, Any]], names: list[str]) -> Scored:
    ok = [r for r in records if r["status"] == "ok"]
    return Scored(
        labels=np.array([r["label"] for r in ok], dtype=object),
        p_covid=np.array([r["binary_p_covid"] for r in ok], dtype=float),
        predicted=np.array([r["predicted"] for r in ok], dtype=object),
        probs=np.array([[r[f"p_{n}"] for n in names] for r in ok], dtype=float).reshape(
            len(ok), len(names)
        ),
        groups=np.array([r["patient"] for r in ok], dtype=object),
        age_groups=np.array([r["age_group"] or "" for r in ok], dtype=object),
        lines=np.array([r["line"] for r in ok], dtype=int),
    )


def binary_results(s: Scored, points: list[Threshold], resamples: int) -> dict[str, Any]:
    """ROC AUC, and sensitivity/specificity with counts at each threshold, with bootstrap CIs."""
    y = s.covid.astype(int)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    undefined = []
    if n_pos == 0:
        undefined.append("no COVID-19 films: ROC AUC and sensitivity are undefined")
    if n_neg == 0:
        undefined.append("no COVID-19-negative films: ROC AUC and specificity are undefined")
    cis = bootstrap(s, points, resamples)
    auc = float(roc_auc_score(y, s.p_covid)) if n_pos and n_neg else None
    result: dict[str, Any] = {
        "n_covid": n_pos,
        "n_non_covid": n_neg,
        "roc_auc": auc,
        "roc_auc_ci95": interval(cis.get("roc_auc")) if auc is not None else None,
        "operating_points": {p.source: operating_point(y, s.p_covid, p, cis) for p in points},
        "calibration": calibration(y, s.p_covid) if len(y) else None,
        "undefined": undefined,
    }
    return result


def bootstrap(s: Scored, points: list[Threshold], resamples: int) -> dict[str, dict]:
    """Percentile CIs by metrics.bootstrap_ci, resampling patients (or films)."""
    if resamples == 0 or len(s.labels) == 0:
        return {}
    stats = {"roc_auc": metrics.covid_auc_statistic(1)}
    for p in points:
        calls = metrics.covid_call_statistics(1, p.value)
        stats[f"{p.source}.sensitivity"] = calls["sensitivity"]
        stats[f"{p.source}.specificity"] = calls["specificity"]
    prob = np.column_stack([1.0 - s.p_covid, s.p_covid])
    return metrics.bootstrap_ci(
        s.covid.astype(int), prob, s.groups, stats, n_resamples=resamples, seed=SEED, level=LEVEL
    )


def interval(ci: dict | None) -> dict[str, Any] | None:
    if ci is None or ci["low"] is None:
        return None
    return {"low": ci["low"], "high": ci["high"], "resamples_used": ci["n_valid"]}


def operating_point(
    y: np.ndarray, p_covid: np.ndarray, point: Threshold, cis: dict[str, dict]
) -> dict[str, Any]:
    """Counts and rates at `point` (p >= threshold is called COVID-19, as predict does)."""
    at = metrics.binary_at_threshold(y, p_covid, point.value) if len(y) else None
    (tn, fp), (fn, tp) = at["confusion"] if at else ((0, 0), (0, 0))
    return {
        "threshold": point.value,
        "sensitivity": {
            "value": tp / (tp + fn) if tp + fn else None,
            "called_covid": tp, "of_covid": tp + fn,
            "ci95": interval(cis.get(f"{point.source}.sensitivity")) if tp + fn else None,
        },
        "specificity": {
            "value": tn / (tn + fp) if tn + fp else None,
            "called_negative": tn, "of_non_covid": tn + fp,
            "ci95": interval(cis.get(f"{point.source}.specificity")) if tn + fp else None,
        },
        "confusion": {"rows": ["non_covid", "covid"], "columns": ["negative", "COVID-19"],
                      "counts": [[tn, fp], [fn, tp]]},
    }  # fmt: skip


def calibration(y: np.ndarray, p_covid: np.ndarray) -> dict[str, Any]:
    """Brier score and the share of COVID-19 films per p(covid) bin (equal width, as the
    calibration plot draws them: sklearn's calibration_curve bins)."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    which = np.searchsorted(edges[1:-1], p_covid)  # calibration_curve's own binning
    bins = [
        {"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "count": int(m.sum()),
         "mean_p_covid": float(p_covid[m].mean()), "share_covid": float(y[m].mean())}
        for b in range(CALIBRATION_BINS) if (m := which == b).any()
    ]  # fmt: skip
    return {"brier": float(brier_score_loss(y, p_covid, pos_label=1)), "bins": bins}


def four_class_results(s: Scored, names: list[str]) -> dict[str, Any]:
    """The four-class argmax on rows with a four-class label; pneumonia right if viral or
    bacterial was called."""
    rows = [label for label in FOUR_CLASS_ROWS if label == "pneumonia" or label in names]
    keep = np.isin(s.labels, rows)
    labels, predicted = s.labels[keep], s.predicted[keep]
    right = (predicted == labels) | ((labels == "pneumonia") & np.isin(predicted, PNEUMONIA_TYPES))
    present = [label for label in rows if (labels == label).any()]
    counts = [[int(((labels == t) & (predicted == c)).sum()) for c in names] for t in present]
    typed = np.isin(s.labels, names)
    report = None
    if typed.any():
        y = np.array([names.index(label) for label in s.labels[typed]])
        report = metrics.classification_report(y, s.probs[typed], names)
    return {
        "n": int(keep.sum()),
        "accuracy": float(right.mean()) if keep.any() else None,
        "correct": int(right.sum()),
        "confusion": {"rows": present, "columns": names, "counts": counts},
        "per_class": report["per_class"] if report else None,
        "note": CHILDREN_ONLY,
    }


def call_rates(s: Scored, names: list[str], points: list[Threshold]) -> dict[str, Any]:
    """For each label: films, the share called each four-class class, and the share called
    COVID-19 at each threshold."""
    rates = {}
    for label in LABELS:
        films = s.labels == label
        if not films.any():
            continue
        rates[label] = {
            "n": int(films.sum()),
            "called": {c: float((s.predicted[films] == c).mean()) for c in names},
            "called_covid_19": {
                p.source: float((s.p_covid[films] >= p.value).mean()) for p in points
            },  # fmt: skip
        }
    return rates


def age_group_results(s: Scored, names: list[str], points: list[Threshold]) -> dict[str, Any]:
    """Call rates per age group, and how many films of each were given a pneumonia type."""
    groups = {}
    for group in REPORTED_AGE_GROUPS:
        mask = s.age_groups == group
        if mask.any():
            groups[group] = {
                "n": int(mask.sum()),
                "called_viral_or_bacterial": int(np.isin(s.predicted[mask], PNEUMONIA_TYPES).sum()),
                "call_rates": call_rates(subset(s, mask), names, points),
            }
    return groups


def subset(s: Scored, mask: np.ndarray) -> Scored:
    return Scored(*(getattr(s, f)[mask] for f in Scored.__dataclass_fields__))


def warning_kind(text: str) -> str:
    """A warning without its per-film details (sizes, shares, counts), so films group by kind."""
    return re.sub(r"\s*\([^)]*\)", "", text).strip()


def not_frontal_count(records: list[dict[str, Any]]) -> dict[str, int]:
    """Films the out-of-distribution gate flagged (not a frontal chest radiograph), of those
    predicted."""
    ok = [r for r in records if r["status"] == "ok"]
    return {"flagged": sum(NOT_FRONTAL in (r["warning"] or "") for r in ok), "of": len(ok)}


def warning_counts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Films with each of predict's warnings, most frequent first, with their CSV lines."""
    lines: dict[str, list[int]] = {}
    for r in records:
        if r["status"] == "ok" and r["warning"]:
            for kind in dict.fromkeys(warning_kind(w) for w in r["warning"].split("; ")):
                lines.setdefault(kind, []).append(r["line"])
    return [{"warning": k, "films": len(v), "lines": v}
            for k, v in sorted(lines.items(), key=lambda kv: -len(kv[1]))]  # fmt: skip


def results(
    labels: Labels, records: list[dict[str, Any]], setup: Setup, resamples: int
) -> dict[str, Any]:
    names = setup.models.class_names
    s = scored_arrays(records, names)
    found = problems(labels.rows, records)
    blob: dict[str, Any] = {
        "format": FORMAT,
        "labels": str(labels.path),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": setup.info,
        "notes": setup.notes,
        "rows": len(labels.rows),
        "scored": len(s.labels),
        "left_out": sum(not p["scored"] for p in found),
        "films_by_label": dict(Counter(s.labels.tolist())),
        "bootstrap": {"resamples": resamples, "unit": "patient" if labels.has_patient else "film",
                      "groups": len(set(s.groups.tolist())), "level": LEVEL, "seed": SEED},
        "binary": binary_results(s, setup.points, resamples),
        "four_class": four_class_results(s, names),
        "call_rates": call_rates(s, names, setup.points),
        "warnings": warning_counts(records),
        "not_frontal": not_frontal_count(records),
        "problems": found,
    }  # fmt: skip
    if labels.has_age_group:
        blob["call_rates_by_age_group"] = age_group_results(s, names, setup.points)
    return blob
