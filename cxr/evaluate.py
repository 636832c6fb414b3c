"""Evaluate one checkpoint: test metrics with patient-bootstrap CIs, operating point, calibration,
subgroups, adult-only metrics and the shortcut probes (adult_check, pneumonia, external).

The validation split chooses the COVID-19 threshold (for both tasks) and is summarised in a
`validation` section (point estimates, no CIs) so that defaults can be compared on it with
`dvc exp show`; test, adult_check and external are used for nothing but reporting.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr import metrics
from cxr.config import BINARY_CLASSES, FOUR_CLASSES, EvaluateParams, as_recipe
from cxr.data import allowed_classes, labels_for
from cxr.infer import predict_proba
from cxr.models import CheckpointError
from cxr.params import ParamsError

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One split's ground truth and the model's probabilities.

    ``y`` is -1 (cxr.data.UNKNOWN) for four-class rows whose class is only known as a set.
    """

    name: str
    table: pd.DataFrame
    y: np.ndarray
    prob: np.ndarray

    def subset(self, mask: np.ndarray) -> Scored:
        mask = np.asarray(mask, dtype=bool)
        return Scored(self.name, self.table[mask].reset_index(drop=True), self.y[mask],
                      self.prob[mask])  # fmt: skip


def score_split(model, name: str, images: np.ndarray, table: pd.DataFrame, task: str) -> Scored:
    log.info("scoring %s (%d images)", name, len(images))
    return Scored(name, table, labels_for(table, task), predict_proba(model, images, batch_size=32))


def check_class_order(task: str, class_names: list[str], where: str = "checkpoint") -> None:
    """Refuse a model whose classes are not the task's, in the task's order.

    `labels_for` numbers the labels in the task's order (cxr.config) and the probability columns
    come in the checkpoint's: if the two orders differed, every metric would pair a label with
    another class's probability and still look plausible.
    """
    expected = list(BINARY_CLASSES if task == "binary" else FOUR_CLASSES)
    if list(class_names) != expected:
        raise CheckpointError(
            f"{where}: class order {list(class_names)} is not the {task} task's {expected} "
            "(labels are numbered in the task's order); retrain it with this code"
        )


def covid_index(class_names: list[str]) -> int:
    return class_names.index("covid")


def known_class(s: Scored) -> Scored:
    """Rows with one known class: the only ones a K-class report, CI or figure can score."""
    return s.subset(s.y >= 0)


def covid_truth(s: Scored, positive: int) -> np.ndarray:
    """1 for COVID-19, 0 for everything else (pneumonia of unknown type included)."""
    return (s.y == positive).astype(int)


def operating_point(val: Scored, p: EvaluateParams, positive: int) -> dict:
    """The COVID-19-vs-rest threshold on p(covid), chosen on validation and frozen for test,
    adult_check, external and predict.

    `threshold_on: adult` chooses it on adult validation images only. Pediatric non-COVID
    images are easy negatives (p(covid) near 0); with them in, Youden's J is high at a
    threshold low enough to call many adult non-COVID films COVID-19, and adults are whom a
    user of `predict` will show it.
    """
    rows = np.ones(len(val.y), dtype=bool)
    if p.threshold_on == "adult":
        rows = val.table["age_group"].to_numpy() == "adult"
    score, truth = val.prob[rows, positive], covid_truth(val, positive)[rows]
    if p.threshold == "youden":
        value = metrics.youden_threshold(truth, score)
    else:
        value = metrics.threshold_for_sensitivity(truth, score, p.target_sensitivity)
    return {
        "value": float(value),
        "method": p.threshold,
        "chosen_on": "val" if p.threshold_on == "all" else "val (adult images)",
        "n": int(rows.sum()),
        "val": metrics.binary_at_threshold(truth, score, value),
    }


def load_oos_point(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """reports/oos/operating_point.json, refused unless its folds were trained with the recipe
    in `params` (base, split, train_binary): its threshold is a point on that recipe's score scale."""
    if not path.exists():
        raise ParamsError(
            f"evaluate.operating_point is oos but {path} does not exist: run "
            "`dvc repro oos/dvc.yaml`, or set evaluate.operating_point: val"
        )
    point = json.loads(path.read_text())
    # The recipe as cxr.oos_params.recipe recorded it: params sections, with oos.epochs applied.
    measured = {s: as_recipe(s, v) for s, v in (point.get("recipe") or {}).items()}
    differs = [f"{s}.{k}: {measured[s].get(k)!r} there, {params.get(s, {}).get(k)!r} here"
               for s in measured for k in sorted({*measured[s], *params.get(s, {})})
               if measured[s].get(k) != params.get(s, {}).get(k)]  # fmt: skip
    if not measured or differs:
        differs = differs or ["no recipe recorded"]
        raise ParamsError(
            f"evaluate.operating_point is oos but {path} was measured with another recipe "
            f"({'; '.join(differs[:3])}): re-run `dvc repro oos/dvc.yaml` with this "
            "params.yaml, or set evaluate.operating_point: val"
        )
    return point


def oos_threshold(point: dict[str, Any], val: Scored, p: EvaluateParams, positive: int) -> dict:
    """The out-of-source operating point as this task's threshold, with where it lands on the
    validation images that would otherwise have chosen it (reported, not used)."""
    rows = np.ones(len(val.y), dtype=bool)
    if p.threshold_on == "adult":
        rows = val.table["age_group"].to_numpy() == "adult"
    value = float(point["threshold"])
    score, truth = val.prob[rows, positive], covid_truth(val, positive)[rows]
    return {
        "value": value,
        "method": "oos",
        "chosen_on": f"out-of-source folds ({point['rule']}; n={point['n_negatives']})",
        "n": int(point["n_negatives"]),
        "val": metrics.binary_at_threshold(truth, score, value),
    }


def covid_bootstrap(s: Scored, positive: int, stats: dict, p: EvaluateParams, seed: int) -> dict:
    """Patient-group bootstrap CIs of statistics of (COVID-19 truth, probabilities)."""
    return metrics.bootstrap_ci(
        covid_truth(s, positive),
        s.prob,
        s.table["group_id"].to_numpy(),
        stats,
        n_resamples=p.bootstrap,
        seed=seed,
        level=p.ci_level,
    )


def covid_calls(s: Scored, positive: int, threshold: float, p: EvaluateParams, seed: int) -> dict:
    """COVID-19-vs-rest accuracy, sensitivity, specificity, balanced accuracy and call rate,
    each with a CI, at the frozen threshold and at argmax (side by side, same resamples)."""
    return {
        "at_threshold": covid_bootstrap(
            s, positive, metrics.covid_call_statistics(positive, threshold), p, seed
        ),
        "argmax": covid_bootstrap(
            s, positive, metrics.covid_call_statistics(positive, None), p, seed
        ),
    }


def counts(table: pd.DataFrame, by: list[str]) -> dict:
    """Row counts nested by the given columns, e.g. {label: {dataset: n}}."""
    out: dict = {}
    for key, n in table.groupby(by).size().items():
        keys = key if isinstance(key, tuple) else (key,)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(str(k), {})
        node[str(keys[-1])] = int(n)
    return out


def subgroups(s: Scored, task: str, class_names: list[str], threshold: float) -> dict:
    """Accuracy and COVID-19 call rate (argmax and at threshold) per label x dataset x age group.

    Where a class comes from two sources (adult ieee8023 vs pediatric Kermany), a model that
    learned age or source instead of disease shows it here: e.g. adult non-COVID images called
    COVID-19 far more often than pediatric ones. A `pneumonia` row counts as correct when its
    argmax is an allowed class (viral or bacterial; non_covid for the binary model).
    """
    pred = s.prob.argmax(1)
    covid = covid_index(class_names)
    correct = allowed_classes(s.table, task)[np.arange(len(pred)), pred]
    at_threshold = s.prob[:, covid] >= threshold
    out: dict = {}
    keys = ["label", "dataset", "age_group"]
    for (label, dataset, age), rows in s.table.groupby(keys).indices.items():
        out.setdefault(label, {})[f"{dataset}_{age}"] = {
            "n": len(rows),
            "accuracy": float(correct[rows].mean()),
            "covid_call_rate": float((pred[rows] == covid).mean()),
            "covid_call_rate_at_threshold": float(at_threshold[rows].mean()),
        }
    return out


def split_report(s: Scored, class_names: list[str], p: EvaluateParams, seed: int) -> dict:
    """The K-class report of a split whose rows all have a known class."""
    positive = covid_index(class_names)
    report = metrics.classification_report(s.y, s.prob, class_names)
    report["confusion"] = metrics.confusion(s.y, s.prob.argmax(1), len(class_names))
    report["ci"] = metrics.bootstrap_ci(
        s.y,
        s.prob,
        s.table["group_id"].to_numpy(),
        metrics.default_statistics(positive),
        n_resamples=p.bootstrap,
        seed=seed,
        level=p.ci_level,
    )
    report["calibration"] = {
        "ece": metrics.expected_calibration_error(s.y, s.prob, p.calibration_bins),
        "bins": p.calibration_bins,
    }
    return report


def adult_only_report(
    s: Scored, class_names: list[str], threshold: float, p: EvaluateParams, seed: int
) -> dict:
    """COVID-19 vs adult non-COVID among adult images only.

    Every COVID-19 image is adult; on the full test set a model scores well by telling adults
    from children. Among adults alone age cannot help, so this AUC and these sensitivity and
    specificity say whether the model detects COVID-19. (Source can still help: compare the
    counts by dataset.)
    """
    adult = s.subset(s.table["age_group"].to_numpy() == "adult")
    positive = covid_index(class_names)
    truth = covid_truth(adult, positive)
    out: dict = {
        "n": len(adult.y),
        "n_by_class": {"covid": int(truth.sum()), "non_covid": int(len(truth) - truth.sum())},
        "n_by_source": counts(adult.table, ["label", "dataset"]),
    }
    if len(adult.y) == 0:
        return out
    auc = {"roc_auc": metrics.covid_auc_statistic(positive)}
    out["roc_auc"] = covid_bootstrap(adult, positive, auc, p, seed)["roc_auc"]
    return out | covid_calls(adult, positive, threshold, p, seed)


def pneumonia_report(
    s: Scored, class_names: list[str], threshold: float, p: EvaluateParams, seed: int
) -> dict:
    """Adult NIH pneumonia of unknown type: should be called neither COVID-19 nor normal.

    They count as non-COVID in every COVID-19-vs-rest metric; here on their own, with the
    four-class model's rate of an allowed call (viral or bacterial).
    """
    rows = s.subset(s.table["label"].to_numpy() == "pneumonia")
    out: dict = {"n": len(rows.y), "n_by_dataset": counts(rows.table, ["dataset"])}
    if len(rows.y) == 0:
        return out
    positive = covid_index(class_names)
    out |= covid_calls(rows, positive, threshold, p, seed)
    if "viral" in class_names:
        allowed = [class_names.index("viral"), class_names.index("bacterial")]
        stat = {"viral_or_bacterial": metrics.argmax_in_statistic(allowed)}
        out["viral_or_bacterial_rate"] = covid_bootstrap(rows, positive, stat, p, seed)[
            "viral_or_bacterial"
        ]
    return out


def evaluate_test_split(
    s: Scored, task: str, class_names: list[str], threshold: float, p: EvaluateParams, seed: int
) -> dict:
    """Everything reported for the test split.

    The K-class report covers rows of known class only (`n_unknown` says how many were left
    out); every COVID-19-vs-rest number covers all rows.
    """
    positive = covid_index(class_names)
    known = known_class(s)
    report = split_report(known, class_names, p, seed)
    report["n_unknown"] = int(len(s.y) - len(known.y))
    report["subgroups"] = subgroups(s, task, class_names, threshold)
    report["at_threshold"] = metrics.binary_at_threshold(
        covid_truth(s, positive), s.prob[:, positive], threshold
    )
    report["covid_vs_rest"] = covid_calls(s, positive, threshold, p, seed)
    report["adult_only"] = adult_only_report(s, class_names, threshold, p, seed)
    report["pneumonia"] = pneumonia_report(s, class_names, threshold, p, seed)
    return report


def adult_check_report(
    s: Scored, class_names: list[str], threshold: float, p: EvaluateParams, seed: int
) -> dict:
    """Adult NIH normals never trained on: how many are called COVID-19?

    They are unseen patients from the same NIH pool as the adult non-COVID training rows, not
    an unseen hospital; a high rate still means the model calls adults COVID-19.
    """
    positive = covid_index(class_names)
    pred = s.prob.argmax(1)
    normal = class_names.index("normal") if "normal" in class_names else None
    return {
        "n": len(s.y),
        "covid_call_rate": metrics.positive_rate(s.prob, positive),
        "mean_covid_probability": float(s.prob[:, positive].mean()),
        "correct_rate": float((pred == s.y).mean()),
        **({"normal_call_rate": float((pred == normal).mean())} if normal is not None else {}),
        **covid_calls(s, positive, threshold, p, seed),
    }


def external_report(
    s: Scored, class_names: list[str], threshold: float, p: EvaluateParams, seed: int
) -> dict:
    """Whole datasets held out of training, per dataset: COVID-19 calls and, where the dataset
    has them, sensitivity on its COVID-19 rows and specificity on its other rows."""
    positive = covid_index(class_names)
    out: dict = {"n": len(s.y), "by_dataset": {}}
    for dataset in sorted(s.table["dataset"].unique()):
        part = s.subset(s.table["dataset"].to_numpy() == dataset)
        truth = covid_truth(part, positive)
        out["by_dataset"][str(dataset)] = {
            "n": len(truth),
            "n_covid": int(truth.sum()),
            "n_non_covid": int(len(truth) - truth.sum()),
            **covid_calls(part, positive, threshold, p, seed),
        }
    return out


def validation_summary(val: Scored, class_names: list[str]) -> dict:
    """The validation numbers defaults are chosen on (README "How the defaults were chosen"):
    macro-F1 over known-class rows and the adult-only COVID-19 ROC AUC (age cannot help there).
    Point estimates: these choose, they are not reported as results."""
    known = known_class(val)
    report = metrics.classification_report(known.y, known.prob, class_names)
    adult = val.subset(val.table["age_group"].to_numpy() == "adult")
    positive = covid_index(class_names)
    auc = metrics.covid_auc_statistic(positive)(covid_truth(adult, positive), adult.prob)
    return {
        "n": len(val.y),
        "accuracy": report["accuracy"],
        "macro_f1": report["macro"]["f1"],
        "adult_n": len(adult.y),
        "adult_roc_auc": auc,
    }


def evaluate_task(
    task: str,
    class_names: list[str],
    scored: dict[str, Scored],
    p: EvaluateParams,
    seed: int,
    oos_point: dict[str, Any] | None = None,
) -> dict:
    """The metrics file for one task (metrics/<task>.json); `oos_point` (load_oos_point) sets
    the threshold instead of validation."""
    check_class_order(task, class_names)
    positive = covid_index(class_names)
    if oos_point is None:
        threshold = operating_point(scored["val"], p, positive)
    else:
        threshold = oos_threshold(oos_point, scored["val"], p, positive)
    value = threshold["value"]
    result: dict = {
        "task": task,
        "classes": class_names,
        "threshold": threshold,
        "validation": validation_summary(scored["val"], class_names),
        "test": evaluate_test_split(scored["test"], task, class_names, value, p, seed),
        "adult_check": adult_check_report(scored["adult_check"], class_names, value, p, seed),
    }
    external = scored.get("external")
    if external is not None and len(external.y):
        result["external"] = external_report(external, class_names, value, p, seed)
    return result
