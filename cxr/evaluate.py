"""Evaluate one checkpoint: test metrics with patient-bootstrap CIs, operating point, calibration,
subgroups and the adult_check shortcut probe.

The validation split is used for one thing only, the binary threshold; the test split and
adult_check are used for nothing but reporting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr import metrics
from cxr.config import EvaluateParams
from cxr.data import labels_for
from cxr.train import predict_proba

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One split's ground truth and the model's probabilities."""

    name: str
    table: pd.DataFrame
    y: np.ndarray
    prob: np.ndarray


def score_split(model, name: str, images: np.ndarray, table: pd.DataFrame, task: str) -> Scored:
    log.info("scoring %s (%d images)", name, len(images))
    return Scored(name, table, labels_for(table, task), predict_proba(model, images, batch_size=32))


def covid_index(class_names: list[str]) -> int:
    return class_names.index("covid")


def operating_point(val: Scored, p: EvaluateParams, positive: int) -> dict:
    """The binary threshold, chosen on validation and frozen for test and predict."""
    score, truth = val.prob[:, positive], (val.y == positive).astype(int)
    if p.threshold == "youden":
        value = metrics.youden_threshold(truth, score)
    else:
        value = metrics.threshold_for_sensitivity(truth, score, p.target_sensitivity)
    return {
        "value": float(value),
        "method": p.threshold,
        "chosen_on": "val",
        "val": metrics.binary_at_threshold(truth, score, value),
    }


def subgroups(s: Scored, class_names: list[str]) -> dict:
    """Accuracy and COVID-19 call rate per label x dataset x age group.

    Where a class comes from two sources (adult ieee8023 vs pediatric Kermany), a model that
    learned age or source instead of disease shows it here: e.g. adult non-COVID images called
    COVID-19 far more often than pediatric ones.
    """
    pred = s.prob.argmax(1)
    covid = covid_index(class_names) if "covid" in class_names else 1
    out: dict = {}
    keys = ["label", "dataset", "age_group"]
    for (label, dataset, age), rows in s.table.groupby(keys).indices.items():
        out.setdefault(label, {})[f"{dataset}_{age}"] = {
            "n": len(rows),
            "accuracy": float((pred[rows] == s.y[rows]).mean()),
            "covid_call_rate": float((pred[rows] == covid).mean()),
        }
    return out


def split_report(s: Scored, class_names: list[str], p: EvaluateParams, seed: int) -> dict:
    """Everything reported for one labelled split (test)."""
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
    report["subgroups"] = subgroups(s, class_names)
    return report


def adult_check_report(s: Scored, class_names: list[str]) -> dict:
    """Adult normal radiographs from a hospital never trained on: how many are called COVID-19?

    Every training COVID-19 image is adult and almost every non-COVID one pediatric, so a high
    rate here means the model learned "adult" rather than "COVID-19".
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
    }


def evaluate_task(
    task: str,
    class_names: list[str],
    scored: dict[str, Scored],
    p: EvaluateParams,
    seed: int,
) -> dict:
    """The metrics file for one task (metrics/<task>.json)."""
    positive = covid_index(class_names)
    test = scored["test"]
    result: dict = {
        "task": task,
        "classes": class_names,
        "test": split_report(test, class_names, p, seed),
    }
    if task == "binary":
        result["threshold"] = operating_point(scored["val"], p, positive)
        truth = (test.y == positive).astype(int)
        result["test"]["at_threshold"] = metrics.binary_at_threshold(
            truth, test.prob[:, positive], result["threshold"]["value"]
        )
        adult = scored["adult_check"]
        result["adult_check_at_threshold"] = {
            "covid_call_rate": float(
                (adult.prob[:, positive] >= result["threshold"]["value"]).mean()
            )
        }
    result["adult_check"] = adult_check_report(scored["adult_check"], class_names)
    return result
