"""Evaluation figures: DVC plot data (CSV) and PNGs a person reads at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from cxr import metrics  # noqa: E402

TITLES = {"binary": "Binary (COVID-19 vs non-COVID)", "four_class": "Four-class"}


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_task_figures(
    out: Path, task: str, y: np.ndarray, prob: np.ndarray, names: list[str], report: dict, bins: int
) -> None:
    """Everything `dvc plots` and a reader need for one task's test split, in `out`:
    CSVs (confusion pairs, one ROC file per class, reliability bins) and the matching PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = pd.DataFrame(
        {"actual": np.array(names)[y], "predicted": np.array(names)[prob.argmax(1)]}
    )
    pairs.to_csv(out / f"{task}_confusion.csv", index=False)
    roc = pd.DataFrame(metrics.roc_points(y, prob, names))
    roc_dir = out / f"{task}_roc"
    roc_dir.mkdir(exist_ok=True)
    for name in _curve_classes(roc, names):
        roc[roc["class"] == name][["fpr", "tpr", "threshold"]].to_csv(
            roc_dir / f"{name}.csv", index=False
        )
    rel = pd.DataFrame(metrics.reliability_bins(y, prob, bins))
    rel.to_csv(out / f"{task}_reliability.csv", index=False)
    confusion_png(report["confusion"], names, task, out / f"{task}_confusion.png")
    roc_png(y, prob, names, report, task, out / f"{task}_roc.png")
    ece = report["calibration"]["ece"]
    reliability_png(prob, rel, ece, task, out / f"{task}_reliability.png")


def _curve_classes(roc: pd.DataFrame, names: list[str]) -> list[str]:
    """Classes with a ROC curve; non_covid's would mirror covid's in the binary task."""
    present = set(roc["class"]) if len(roc) else set()
    return [n for n in names if n != "non_covid" and n in present]


def confusion_png(cm: list[list[int]], names: list[str], task: str, path: Path) -> None:
    """scikit-learn's ConfusionMatrixDisplay of the test confusion matrix."""
    counts = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.2 + 0.4 * len(names), 3.6 + 0.3 * len(names)))
    display = ConfusionMatrixDisplay(confusion_matrix=counts, display_labels=names)
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=30, values_format="d")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{TITLES[task]}: test confusion (n={counts.sum()})")
    _save(fig, path)


def roc_png(
    y: np.ndarray, prob: np.ndarray, names: list[str], report: dict, task: str, path: Path
) -> None:
    """One-vs-rest ROC curves with scikit-learn's RocCurveDisplay (it prints each AUC)."""
    fig, ax = plt.subplots(figsize=(5, 4.6))
    shown = [k for k, n in enumerate(names) if n != "non_covid" and 0 < (y == k).sum() < len(y)]
    for i, k in enumerate(shown):
        RocCurveDisplay.from_predictions(
            y == k, prob[:, k], ax=ax, name=names[k], plot_chance_level=i == len(shown) - 1
        )
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"{TITLES[task]}: one-vs-rest ROC, test")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def reliability_png(prob: np.ndarray, rel: pd.DataFrame, ece: float, task: str, path: Path) -> None:
    """Top-class reliability drawn by scikit-learn's CalibrationDisplay: "is the top class right"
    against the top-class probability. It draws `rel`, the bins of the CSV and the JSON's ECE
    (metrics.reliability_bins), instead of binning again, so the three cannot disagree."""
    fig, ax = plt.subplots(figsize=(5, 4.6))
    if len(rel):
        display = CalibrationDisplay(rel["accuracy"], rel["confidence"], prob.max(1))
        display.plot(ax=ax, name="top class")
        for _, r in rel.iterrows():
            ax.annotate(str(int(r["count"])), (r["confidence"], r["accuracy"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{TITLES[task]}: reliability, test (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
