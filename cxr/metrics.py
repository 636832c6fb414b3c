"""Evaluation metrics for the chest X-ray classifiers.

Pure functions on NumPy arrays: ``y_true`` holds int labels ``0..K-1``, ``prob`` is an ``N x K``
matrix of class probabilities, ``groups`` holds one patient id per image. Every function returns
plain Python floats/ints/lists/dicts so results go straight into ``json.dump`` for DVC metrics.
scikit-learn does the counting; this module adds what it lacks (specificity, patient-level
bootstrap, operating points, calibration) and makes the undefined cases explicit.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from cxr.errors import InputError

log = logging.getLogger(__name__)

Statistic = Callable[[np.ndarray, np.ndarray], float]

_AVERAGED = ("precision", "sensitivity", "specificity", "f1")


def _check(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and label range once, so later errors are not cryptic index errors."""
    y_true = np.asarray(y_true).astype(int, copy=False)
    prob = np.asarray(prob, dtype=float)
    if prob.ndim != 2 or y_true.ndim != 1 or len(y_true) != len(prob):
        raise ValueError(
            f"expected y_true of shape (N,) and prob of shape (N, K); got {y_true.shape} "
            f"and {prob.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if y_true.min() < 0 or y_true.max() >= prob.shape[1]:
        raise ValueError(f"labels must lie in 0..{prob.shape[1] - 1}; got {np.unique(y_true)}")
    return y_true, prob


def _div(num: float, den: float) -> float:
    # Same convention as sklearn's zero_division=0: an empty denominator scores 0.0, not nan.
    return float(num / den) if den else 0.0


def _ovr_auc(is_pos: np.ndarray, score: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC, or None when positives or negatives are missing (AUC undefined)."""
    n_pos = int(is_pos.sum())
    if n_pos == 0 or n_pos == len(is_pos):
        return None
    return float(roc_auc_score(is_pos, score))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, K: int) -> list[list[int]]:
    """K x K counts, rows = true class, columns = predicted class; absent classes stay as zeros."""
    cm = confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=list(range(K)))
    return [[int(c) for c in row] for row in cm]


def classification_report(
    y_true: np.ndarray,
    prob: np.ndarray,
    class_names: list[str],
    y_pred: np.ndarray | None = None,
) -> dict:
    """Accuracy, per-class one-vs-rest metrics (incl. specificity and AUC) and their averages.

    Computed per class for K=2 as well, so the binary and four-class reports share one schema.
    """
    y_true, prob = _check(y_true, prob)
    K = prob.shape[1]
    if len(class_names) != K:
        raise ValueError(f"{len(class_names)} class names for {K} probability columns")
    y_pred = prob.argmax(axis=1) if y_pred is None else np.asarray(y_pred).astype(int)
    labels = list(range(K))
    # zero_division=0: a class never predicted gets precision 0.0 (and a class absent from
    # y_true gets sensitivity 0.0) instead of nan, matching sklearn's macro averages.
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    # One 2 x 2 one-vs-rest matrix per class, [[tn, fp], [fn, tp]]: specificity = tn / (tn + fp).
    ovr = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    specificity = [_div(ovr[k, 0, 0], ovr[k, 0, 0] + ovr[k, 0, 1]) for k in labels]
    n = len(y_true)
    aucs = [_ovr_auc(y_true == k, prob[:, k]) for k in labels]

    per_class = {
        name: {
            "precision": float(precision[k]),
            "sensitivity": float(recall[k]),
            "specificity": specificity[k],
            "f1": float(f1[k]),
            "roc_auc": aucs[k],
            "support": int(support[k]),
        }
        for k, name in enumerate(class_names)
    }
    columns = {key: np.array([per_class[c][key] for c in class_names]) for key in _AVERAGED}
    defined_aucs = [a for a in aucs if a is not None]
    macro = {key: float(columns[key].mean()) for key in _AVERAGED}
    macro["roc_auc"] = float(np.mean(defined_aucs)) if defined_aucs else None
    weighted = {key: float(np.average(columns[key], weights=support)) for key in _AVERAGED}
    with warnings.catch_warnings():
        # Expected on single-class subsets (e.g. the adult-normals probe), not a problem.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        # Mean recall over the classes present in y_true, so it can differ from
        # macro.sensitivity when a class is absent from this subset.
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced,
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "n": n,
    }


def default_statistics(positive_class: int) -> dict[str, Statistic]:
    """Statistics for bootstrap_ci; each returns nan where undefined so the resample is skipped.

    The macro statistics are undefined when a class is missing from a resample: averaging over
    fewer classes, or scoring the missing one as 0, would change what is being measured.
    """

    def accuracy(y: np.ndarray, p: np.ndarray) -> float:
        return float(np.mean(p.argmax(axis=1) == y))

    def macro_f1(y: np.ndarray, p: np.ndarray) -> float:
        K = p.shape[1]
        if len(np.unique(y)) < K:
            return float("nan")
        return float(f1_score(y, p.argmax(axis=1), labels=list(range(K)), average="macro"))

    def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
        aucs = [_ovr_auc(y == k, p[:, k]) for k in range(p.shape[1])]
        return float("nan") if None in aucs else float(np.mean(aucs))

    def sensitivity(y: np.ndarray, p: np.ndarray) -> float:
        pos = y == positive_class
        hit = p.argmax(axis=1) == positive_class
        return float(hit[pos].mean()) if pos.any() else float("nan")

    def specificity(y: np.ndarray, p: np.ndarray) -> float:
        neg = y != positive_class
        miss = p.argmax(axis=1) != positive_class
        return float(miss[neg].mean()) if neg.any() else float("nan")

    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "macro_auc": macro_auc,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def covid_call_statistics(positive_class: int, threshold: float | None) -> dict[str, Statistic]:
    """Statistics of the call "COVID-19" for bootstrap_ci, where ``y`` is 1 for COVID-19, else 0.

    The call is ``p[:, positive_class] >= threshold`` (an operating point frozen on validation)
    or, with ``threshold=None``, the argmax. ``p`` keeps all K columns so that a four-class
    model's argmax call stays its own (p(covid) = 0.4 can be the top class). Each statistic is
    nan where undefined (e.g. sensitivity on a set without COVID-19), so resamples are skipped.
    """

    def called(p: np.ndarray) -> np.ndarray:
        if threshold is None:
            return p.argmax(axis=1) == positive_class
        return p[:, positive_class] >= threshold

    def sensitivity(y: np.ndarray, p: np.ndarray) -> float:
        pos = y == 1
        return float(called(p)[pos].mean()) if pos.any() else float("nan")

    def specificity(y: np.ndarray, p: np.ndarray) -> float:
        neg = y == 0
        return float(1.0 - called(p)[neg].mean()) if neg.any() else float("nan")

    def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
        return (sensitivity(y, p) + specificity(y, p)) / 2  # nan if either is

    return {
        "accuracy": lambda y, p: float(np.mean(called(p) == (y == 1))),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": balanced_accuracy,
        "call_rate": lambda y, p: float(np.mean(called(p))),
    }


def covid_auc_statistic(positive_class: int) -> Statistic:
    """ROC AUC of ``p[:, positive_class]`` for ``y`` 1 = COVID-19; nan without both classes."""

    def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
        auc = _ovr_auc(y == 1, p[:, positive_class])
        return float("nan") if auc is None else auc

    return roc_auc


def argmax_in_statistic(classes: list[int]) -> Statistic:
    """Fraction of samples whose argmax is one of ``classes`` (labels are not used).

    For rows whose class is known only as a set, e.g. NIH "pneumonia" = viral or bacterial.
    """
    return lambda y, p: float(np.isin(p.argmax(axis=1), classes).mean())


def _group_members(groups: np.ndarray) -> list[np.ndarray]:
    """Sample indices of each patient group, in order of the sorted group ids."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    return np.split(order, bounds)


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    groups: np.ndarray,
    statistic_fns: dict[str, Statistic],
    n_resamples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, dict]:
    """Percentile confidence intervals from a patient-level (cluster) bootstrap.

    Images of one patient are correlated, so whole groups are resampled with replacement: a
    group drawn twice contributes all its images twice. Resamples where a statistic is nan
    (undefined) are skipped for that statistic; ``n_valid`` says how many were used.
    Returns ``{name: {"point", "low", "high", "n_valid"}}``; values are None when undefined.
    """
    y_true, prob = _check(y_true, prob)
    if len(groups) != len(y_true):
        raise ValueError(f"{len(groups)} group ids for {len(y_true)} samples")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    members = _group_members(groups)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in statistic_fns}
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[g] for g in chosen])
        for name, fn in statistic_fns.items():
            value = fn(y_true[idx], prob[idx])
            if not np.isnan(value):
                samples[name].append(value)

    tail = 100 * (1 - level) / 2
    result = {}
    for name, fn in statistic_fns.items():
        point = fn(y_true, prob)
        values = samples[name]
        low, high = np.percentile(values, [tail, 100 - tail]) if values else (None, None)
        result[name] = {
            "point": None if np.isnan(point) else float(point),
            "low": None if low is None else float(low),
            "high": None if high is None else float(high),
            "n_valid": len(values),
        }
    return result


def _binary_roc(y_true_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, ...]:
    """Full ROC (every distinct score is a threshold, positive when score >= threshold)."""
    y = np.asarray(y_true_binary).astype(int)
    if y.min() == y.max():
        raise InputError("threshold selection needs both positives and negatives in y_true")
    # drop_intermediate=False keeps collinear points, so ties are resolved over all thresholds.
    fpr, tpr, thresholds = roc_curve(y, np.asarray(score, dtype=float), drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn prepends +inf ("predict nothing positive")
    return fpr[finite], tpr[finite], thresholds[finite]


def youden_threshold(y_true_binary: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (= TPR - FPR).

    Ties: the highest threshold among those with maximal J wins (fewest positive calls). Choose
    it on validation data, never on the test set.
    """
    fpr, tpr, thresholds = _binary_roc(y_true_binary, score)
    # Thresholds are decreasing and argmax returns the first maximum, i.e. the highest one.
    return float(thresholds[np.argmax(tpr - fpr)])


def threshold_for_sensitivity(y_true_binary: np.ndarray, score: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity is at least ``target`` (e.g. a screening operating point)."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1]; got {target}")
    _, tpr, thresholds = _binary_roc(y_true_binary, score)
    # tpr is a ratio of counts: 4/5 can land one ulp below the literal 0.8, so allow that slack.
    reached = np.flatnonzero(tpr >= target - 1e-12)
    return float(thresholds[reached[0]])  # tpr reaches 1 at the lowest threshold, so never empty


def binary_at_threshold(y_true_binary: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """Binary metrics when predicting positive for ``score >= threshold``.

    ``confusion`` is ``[[TN, FP], [FN, TP]]`` (rows true 0/1, columns predicted 0/1).
    """
    y = np.asarray(y_true_binary).astype(int)
    pred = (np.asarray(score, dtype=float) >= threshold).astype(int)
    (tn, fp), (fn, tp) = confusion(y, pred, 2)
    sensitivity = _div(tp, tp + fn)
    specificity = _div(tn, tn + fp)
    return {
        "threshold": float(threshold),
        "accuracy": _div(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _div(tp, tp + fp),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "confusion": [[tn, fp], [fn, tp]],
    }


def reliability_bins(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Top-label confidence vs accuracy in equal-width bins over [0, 1]; empty bins omitted.

    Bins are right-closed, ``(low, high]`` (the first also takes 0), with edges from
    ``np.linspace``: a confidence lying exactly on an edge goes to the lower bin.
    """
    y_true, prob = _check(y_true, prob)
    conf = prob.max(axis=1)
    correct = prob.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        in_bin = which == b
        if in_bin.any():
            rows.append(
                {
                    "bin_low": float(edges[b]),
                    "bin_high": float(edges[b + 1]),
                    "confidence": float(conf[in_bin].mean()),
                    "accuracy": float(correct[in_bin].mean()),
                    "count": int(in_bin.sum()),
                }
            )
    return rows


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE: mean |accuracy - confidence| over the reliability bins, weighted by bin count."""
    rows = reliability_bins(y_true, prob, n_bins)
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / n)


def roc_points(y_true: np.ndarray, prob: np.ndarray, class_names: list[str]) -> list[dict]:
    """One-vs-rest ROC curves in long format (``class, fpr, tpr, threshold``) for DVC plots.

    Classes without both positives and negatives have no curve and are left out (logged).
    """
    y_true, prob = _check(y_true, prob)
    rows = []
    for k, name in enumerate(class_names):
        is_pos = y_true == k
        if is_pos.all() or not is_pos.any():
            log.warning("no ROC curve for class %r: it needs positives and negatives", name)
            continue
        fpr, tpr, thresholds = roc_curve(is_pos, prob[:, k])
        # sklearn's first threshold is +inf (nothing predicted positive), which JSON/CSV cannot
        # hold; the next float above the top score has the same meaning and stays finite.
        top = np.nextafter(thresholds[np.isfinite(thresholds)].max(), np.inf)
        thresholds = np.where(np.isfinite(thresholds), thresholds, top)
        rows.extend(
            {"class": name, "fpr": float(f), "tpr": float(t), "threshold": float(h)}
            for f, t, h in zip(fpr, tpr, thresholds, strict=True)
        )
    return rows


def positive_rate(prob: np.ndarray, positive_class: int) -> float:
    """Fraction of samples whose argmax is ``positive_class``.

    On adult normals this probes the "adult means COVID" shortcut: it should be near zero.
    """
    prob = np.asarray(prob, dtype=float)
    if prob.ndim != 2 or len(prob) == 0:
        raise ValueError(f"expected a non-empty (N, K) probability matrix; got shape {prob.shape}")
    return float(np.mean(prob.argmax(axis=1) == positive_class))
