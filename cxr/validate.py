"""Validate the models on a site's own labelled films: what evaluate reports for test, for them.

    python -m cxr validate labels.csv [--out DIR] [--force] [--models DIR] [--threshold T] \
        [--site FILE] [--bootstrap 1000] [--batch-size 16] [--threads N]

labels.csv has a header with the columns `file` and `label` (any order, more columns allowed):
`file` is a film's path, relative ones against the CSV's folder; `label` is one of covid, viral,
bacterial, normal, pneumonia (viral or bacterial, type unknown) or non_covid (COVID-19 or not,
nothing more known). Optional columns: `patient` (films of one patient are resampled together
by the bootstrap) and `age_group` (adult, pediatric or unknown: call rates are also given per
group, and predict's caveat on a viral/bacterial call is given as for --age-group).

Every film goes through predict's own path: cxr.predict resolves the models and the threshold
(bundle, site calibration, --threshold) and predict_chunk reads, checks, crops and scores the
films, so a validated number is a number predict gives. The binary model's p(covid) is
scored as ROC AUC, and as sensitivity and specificity at each threshold that applies: the
committed one (the bundle's), the site's (`site.json`, `python -m cxr calibrate`) and
--threshold, each with its counts and a bootstrap 95% CI (films resampled, or patients when a
`patient` column is given). The four-class model's argmax is scored on the rows with a
four-class label; a `pneumonia` row counts as right when called viral or bacterial.

Written to --out (default: `validation/` beside the CSV): validation.json, validation.md,
predictions.csv (predict's columns for every row of the CSV, with `line`, `label` and the
optional columns) and PNGs: roc.png, calibration.png, confusion_binary_<source>.png,
confusion_four_class.png. A row that cannot be scored (a label that is not one of the six, a
missing, unreadable or repeated file) is named with its line on stderr, listed in the report
and left out; the rest is scored. --out is only replaced when it is empty or an earlier output
of validate (else --force); all files are made in a hidden folder inside it and moved in place
at the end, so an interruption leaves the earlier report as it was.

Exit status: 0 every row scored (a class absent is not an error: what it leaves undefined
is said), 1 some rows left out or with an unknown age_group (the report lists them) or the
report could not be written, 2 bad usage (no such CSV, no `file`/`label` column, no rows,
models, bundle, threshold, --out), 130 interrupted (Ctrl-C; --out left as it was).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score

from cxr import metrics
from cxr.api import NOT_FRONTAL, predict_chunk
from cxr.atomic import temporary_name
from cxr.bundle import BUNDLE_NAME, SITE_NAME, Bundle, sha256_of, site_threshold
from cxr.cli import setup_logging
from cxr.errors import BundleError
from cxr.infer import configure_cpu
from cxr.inputs import Input, UsageError, printable, stat_path
from cxr.loading import Models, Threshold, choose_threshold, load_models, model_files
from cxr.models import CheckpointError
from cxr.outputs import check_writable_folder, columns, error_record
from cxr.params import non_negative_int
from cxr.predict import add_model_options
from cxr.report import pct, with_ci

log = logging.getLogger(__name__)

EXIT_OK, EXIT_LEFT_OUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FORMAT = "cxr-validation/1"
LABELS = ("covid", "viral", "bacterial", "normal", "pneumonia", "non_covid")
FOUR_CLASS_ROWS = ("covid", "viral", "bacterial", "normal", "pneumonia")  # labels it can score
PNEUMONIA_TYPES = ("viral", "bacterial")
AGE_GROUPS = {"adult": "adult", "pediatric": "pediatric", "paediatric": "pediatric",
              "unknown": "unknown"}  # fmt: skip
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
JSON_NAME, MD_NAME, CSV_NAME = "validation.json", "validation.md", "predictions.csv"
FIXED_NAMES = (JSON_NAME, MD_NAME, CSV_NAME, "roc.png", "calibration.png",
               "confusion_four_class.png")  # fmt: skip
OWN_NAMES = {*FIXED_NAMES, *(f"confusion_binary_{s}.png" for s in SOURCES)}
MAX_PRINTED_PROBLEMS = 20


@dataclass(frozen=True)
class Row:
    """One data row of labels.csv; `problem` says why it cannot be scored (label, path)."""

    line: int
    file: str  # as written in the CSV
    path: Path  # resolved against the CSV's folder
    label: str | None  # one of LABELS, else None
    written_label: str  # as written in the CSV
    patient: str
    age_group: str | None
    problem: str | None = None
    note: str | None = None  # a problem that does not stop scoring (an unknown age group)


@dataclass(frozen=True)
class Labels:
    path: Path
    rows: list[Row]
    has_patient: bool
    has_age_group: bool


# --- arguments, labels, --out -----------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr validate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("labels", type=Path, help="CSV with the columns file,label")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: validation/ beside the CSV)"
    )
    parser.add_argument(
        "--force", action="store_true", help="write into an --out that validate did not write"
    )
    add_model_options(parser)
    parser.add_argument(
        "--site", type=Path, default=None,
        help=f"site calibration (default: {SITE_NAME} in --models, when present)",
    )  # fmt: skip
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="a COVID-19 threshold to report besides the bundle's and the site's (predict's rule)",
    )  # fmt: skip
    parser.add_argument(
        "--bootstrap", type=non_negative_int, default=1000,
        help="bootstrap resamples for the 95%% CIs (0: no CIs; default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    args.out = args.out or args.labels.parent / "validation"
    return args


def normalise_label(text: str) -> str:
    return re.sub(r"[\s-]+", "_", text.strip().lower())


def label_problem(raw: str) -> str:
    """Why a label is not one of LABELS, with the nearest one when there is one."""
    if not raw.strip():
        return f"no label (one of {', '.join(LABELS)} expected)"
    near = difflib.get_close_matches(normalise_label(raw), LABELS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"label {raw!r} is not one of {', '.join(LABELS)}{hint}"


def read_labels(path: Path) -> Labels:
    """The rows of labels.csv, each checked; a CSV without its columns or rows is refused."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            missing = [c for c in ("file", "label") if c not in header]
            if not header:
                raise UsageError(
                    f"{path} is empty: expected a header line `file,label` and a row per film"
                )
            if missing:
                found = ", ".join(repr(n) for n in reader.fieldnames or [])
                hint = " (columns separated by ';'? use commas)" if ";" in found else ""
                raise UsageError(
                    f"{path} has no {' or '.join(repr(m) for m in missing)} column (found {found})"
                    f"{hint}: the header must name the columns file,label"
                )
            rows = [parse_row(record, header, reader.line_num, path.parent)
                    for record in reader if any((v or "").strip() for v in record.values()
                                                if isinstance(v, str))]  # fmt: skip
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: not a readable CSV ({exc})") from exc
    if not rows:
        raise UsageError(f"{path} has a header but no rows: add a row file,label per film")
    return Labels(path, mark_repeats(rows), "patient" in header, "age_group" in header)


def parse_row(record: dict[str, Any], header: dict[str, str], line: int, folder: Path) -> Row:
    def cell(name: str) -> str:
        value = record.get(header[name]) if name in header else None
        return value.strip() if isinstance(value, str) else ""

    file, raw_label = cell("file"), cell("label")
    label = normalise_label(raw_label)
    path = folder / file
    problem = None
    if not file:
        problem = "no file named"
    elif label not in LABELS:
        problem = label_problem(raw_label)
    else:
        st, why = stat_path(path)
        if st is None:
            problem = why
        elif os.path.isdir(path):
            problem = "a folder, not a film: name one file per row"
    age, note = cell("age_group"), None
    age_group = AGE_GROUPS.get(age.lower()) if age else None
    if age and age_group is None:
        note = f"age_group {age!r} is not adult, pediatric or unknown; scored as unknown"
    return Row(line, file, path, label if label in LABELS else None, raw_label,
               cell("patient") or f"line {line}", age_group, problem, note)  # fmt: skip


def mark_repeats(rows: list[Row]) -> list[Row]:
    """A film named twice is scored once, under its first row: twice would weigh it double."""
    first: dict[str, int] = {}
    marked = []
    for row in rows:
        if row.problem is None:
            key = os.path.realpath(row.path)
            if key in first:
                row = dataclasses.replace(row, problem=f"the same film as line {first[key]}")
            else:
                first[key] = row.line
        marked.append(row)
    return marked


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a folder holding what validate did not write."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force and not written_by_validate(out):
        raise UsageError(
            f"--out {out} holds files that validate did not write (no {JSON_NAME} of "
            f"{FORMAT}); refusing to write into it: choose another folder, or pass --force"
        )
    check_writable_folder(out, f"--out {out}")


def earlier_report(out: Path) -> dict[str, Any] | None:
    try:
        blob = json.loads((out / JSON_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return blob if isinstance(blob, dict) and blob.get("format") == FORMAT else None


def written_by_validate(out: Path) -> bool:
    return earlier_report(out) is not None


# --- models and thresholds --------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    models: Models
    threshold: Threshold  # predict's: what predictions.csv's covid_positive applies
    points: list[Threshold]  # every threshold reported: bundle, site, argument
    info: dict[str, Any]  # the models and thresholds, for the report
    notes: list[str]


def load_setup(args: argparse.Namespace) -> Setup:
    """predict's models and threshold, and the other thresholds that apply to this binary model.

    The bundle is read whenever there is one, so the committed threshold is reported even when
    --threshold is given."""
    need_bundle = args.threshold is None or (args.models / BUNDLE_NAME).exists()
    files, bundle = model_files(args, need_bundle=need_bundle)
    threshold = choose_threshold(args, bundle, files["binary"])
    models = load_models(files["four_class"], files["binary"], files["segmenter"])
    digest = sha256_of(files["binary"])
    points, notes = other_thresholds(args, bundle, files["binary"], digest, threshold)
    info = {
        "binary": {"file": str(files["binary"]), "sha256": digest},
        "four_class": {"file": str(files["four_class"]), "sha256": sha256_of(files["four_class"])},
        "segmenter": None if models.segmenter is None else str(files["segmenter"]),
        "class_names": models.class_names,
        "preprocessing": models.spec.to_dict(),
        "bundle": None if bundle is None else str(bundle.path),
        "thresholds": [{"source": p.source, "value": p.value} for p in points],
        "predictions_threshold": {"source": threshold.source, "value": threshold.value},
    }
    if bundle is not None and any(p.source == "bundle" for p in points):
        info["bundle_threshold_chosen_on"] = bundle.threshold_source
    return Setup(models, threshold, points, info, notes)


def other_thresholds(
    args: argparse.Namespace, bundle: Bundle | None, binary: Path, digest: str, chosen: Threshold
) -> tuple[list[Threshold], list[str]]:
    """predict's threshold, plus the bundle's and the site's where they belong to `binary`."""
    points, notes = {chosen.source: chosen}, []
    if bundle is not None and "bundle" not in points:
        if bundle.sha256["binary"] == digest:
            points["bundle"] = Threshold(bundle.threshold, "bundle")
        else:
            notes.append(f"the bundle's threshold is not reported: {bundle.path} was written for "
                         "another binary model")  # fmt: skip
    site = args.site or args.models / SITE_NAME
    if "site" not in points and (args.site is not None or site.exists()):
        try:  # only with --threshold: predict itself would have taken the site's otherwise
            points["site"] = Threshold(site_threshold(site, binary, digest).threshold, "site")
        except BundleError as exc:
            notes.append(f"the site threshold is not reported: {exc}")
    return [points[s] for s in SOURCES if s in points], notes


# --- scoring ----------------------------------------------------------------------------------


def score(rows: list[Row], setup: Setup, batch_size: int) -> list[dict[str, Any]]:
    """predict's record for every row, in order: the films through predict_chunk, the rows
    left out as error records that say why."""
    from tqdm import tqdm

    names = setup.models.class_names
    records: dict[int, dict[str, Any]] = {
        i: error_record(row.path, f"{row.path}: {row.problem}", names)
        for i, row in enumerate(rows) if row.problem is not None
    }  # fmt: skip
    todo = [i for i, row in enumerate(rows) if row.problem is None]
    with tqdm(total=len(todo), desc="validate", unit="film", disable=None, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            done, _ = predict_chunk(
                [Input(rows[i].path) for i in chunk],
                setup.models,
                setup.threshold,
                batch_size,
                age_group=[rows[i].age_group or "unknown" for i in chunk],
            )
            records.update(zip(chunk, done, strict=True))
            bar.update(len(chunk))
    return [with_label(records[i], row) for i, row in enumerate(rows)]


def with_label(record: dict[str, Any], row: Row) -> dict[str, Any]:
    label = row.label if row.label is not None else row.written_label
    return {"line": row.line, **record, "label": label, "patient": row.patient,
            "age_group": row.age_group or "unknown"}  # fmt: skip


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


# --- results ----------------------------------------------------------------------------------


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


def print_problems(labels: Labels, records: list[dict[str, Any]]) -> None:
    found = problems(labels.rows, records)
    for p in found[:MAX_PRINTED_PROBLEMS]:
        where = f"{labels.path} line {p['line']} ({p['file'] or 'no file'})"
        fate = "scored" if p["scored"] else "left out"
        print(f"problem: {where}, {fate}: {p['message']}", file=sys.stderr)
    if len(found) > MAX_PRINTED_PROBLEMS:
        print(f"problem: ... and {len(found) - MAX_PRINTED_PROBLEMS} more, all listed in the "
              "report", file=sys.stderr)  # fmt: skip


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    configure_cpu(args.threads)
    try:
        labels = read_labels(args.labels)
        check_out(args.out, args.force)
        setup = load_setup(args)
        records = score(labels.rows, setup, args.batch_size)
        result = results(labels, records, setup, args.bootstrap)
        print_problems(labels, records)
        try:
            write_report(args.out, result, records, labels, setup.models.class_names)
        except OSError as exc:
            fail(f"could not write the report in {args.out} ({exc.strerror or exc}); nothing "
                 "was written", EXIT_LEFT_OUT)  # fmt: skip
    except (UsageError, CheckpointError, BundleError) as exc:
        fail(str(exc))
    except InterruptedAfterWriting:
        fail(f"interrupted (Ctrl-C) after the report was written in full to {args.out}", 130)
    except KeyboardInterrupt:
        fail(f"interrupted (Ctrl-C); {args.out} was left as it was", EXIT_INTERRUPTED)
    for line in result["binary"]["undefined"]:
        print(f"note: {line}", file=sys.stderr)
    print(summary(result, args.out))
    sys.exit(EXIT_LEFT_OUT if result["problems"] else EXIT_OK)


if __name__ == "__main__":
    main()
