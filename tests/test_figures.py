"""The evaluate stage's figures draw the same numbers as its plot CSVs and metrics JSON."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr import figures, metrics


def test_the_reliability_png_draws_the_csv_bins_behind_the_ece(tmp_path, monkeypatch):
    """One binning (metrics.reliability_bins) feeds the CSV, the JSON's ECE and the PNG.

    Watched red with the PNG binning again by itself (CalibrationDisplay.from_predictions with
    strategy="quantile"): its points were not the CSV's."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    prob = rng.dirichlet(np.ones(4), 60)
    drawn = {}

    def keep(fig, path):
        drawn[path.name] = fig

    monkeypatch.setattr(figures, "_save", keep)
    names = ["covid", "viral", "bacterial", "normal"]
    report = {"confusion": metrics.confusion(y, prob.argmax(1), 4),
              "calibration": {"ece": metrics.expected_calibration_error(y, prob, 5)}}  # fmt: skip
    figures.write_task_figures(tmp_path, "four_class", y, prob, names, report, bins=5)
    csv = pd.read_csv(tmp_path / "four_class_reliability.csv")
    assert len(csv) >= 3  # several bins, so a different binning would show
    ax = drawn["four_class_reliability.png"].axes[0]
    (line,) = [x for x in ax.get_lines() if x.get_label() == "top class"]
    np.testing.assert_array_equal(line.get_xdata(), csv["confidence"])
    np.testing.assert_array_equal(line.get_ydata(), csv["accuracy"])
    gap = (csv["count"] * (csv["accuracy"] - csv["confidence"]).abs()).sum() / csv["count"].sum()
    assert gap == report["calibration"]["ece"]
