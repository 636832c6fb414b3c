"""Metrics against values worked out by hand on tiny fixed arrays (arithmetic in comments)."""

import json
import math

import numpy as np
import pytest

from cxr import metrics

# Three-class example used by several tests. Rows: (true, argmax prediction).
# Confusion (rows true, columns predicted):
#   true 0: [3, 1, 0]   true 1: [0, 2, 1]   true 2: [2, 0, 1]
# column sums (predicted counts) 5, 3, 2; diagonal 3, 2, 1 -> accuracy 6/10.
Y3 = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
P3 = np.array(
    [
        [0.8, 0.1, 0.1],  # 0 -> 0
        [0.7, 0.2, 0.1],  # 0 -> 0
        [0.6, 0.3, 0.1],  # 0 -> 0
        [0.3, 0.6, 0.1],  # 0 -> 1
        [0.1, 0.8, 0.1],  # 1 -> 1
        [0.2, 0.5, 0.3],  # 1 -> 1
        [0.1, 0.3, 0.6],  # 1 -> 2
        [0.1, 0.1, 0.8],  # 2 -> 2
        [0.5, 0.1, 0.4],  # 2 -> 0
        [0.5, 0.35, 0.15],  # 2 -> 0
    ]
)
NAMES3 = ["a", "b", "c"]

# Per class (TP, FP, FN, TN):
#   a: TP 3, FP 2, FN 1, TN 4 -> precision 3/5, sensitivity 3/4, specificity 4/6, f1 6/9
#   b: TP 2, FP 1, FN 1, TN 6 -> precision 2/3, sensitivity 2/3, specificity 6/7, f1 4/6
#   c: TP 1, FP 1, FN 2, TN 6 -> precision 1/2, sensitivity 1/3, specificity 6/7, f1 2/5
# One-vs-rest AUC = P(score_pos > score_neg) + 0.5 P(tie):
#   a: pos 0.8 0.7 0.6 0.3 vs neg 0.1 0.2 0.1 0.1 0.5 0.5: 6+6+6+4 = 22 of 24 pairs -> 11/12
#   b: pos 0.8 0.5 0.3 vs neg 0.1 0.2 0.3 0.6 0.1 0.1 0.35: 7 + 6 + (4 + 0.5 tie) -> 17.5/21 = 5/6
#   c: pos 0.8 0.4 0.15 vs neg 0.1 x5, 0.3, 0.6: 7 + 6 + 5 = 18/21 = 6/7
EXPECTED3 = {
    "a": {"precision": 3 / 5, "sensitivity": 3 / 4, "specificity": 2 / 3, "f1": 2 / 3},
    "b": {"precision": 2 / 3, "sensitivity": 2 / 3, "specificity": 6 / 7, "f1": 2 / 3},
    "c": {"precision": 1 / 2, "sensitivity": 1 / 3, "specificity": 6 / 7, "f1": 2 / 5},
}
AUC3 = {"a": 11 / 12, "b": 5 / 6, "c": 6 / 7}


def test_confusion_counts_by_hand():
    pred = P3.argmax(axis=1)
    assert metrics.confusion(Y3, pred, 3) == [[3, 1, 0], [0, 2, 1], [2, 0, 1]]
    # An absent fourth class keeps its zero row and column.
    assert metrics.confusion(Y3, pred, 4)[3] == [0, 0, 0, 0]
    assert [row[3] for row in metrics.confusion(Y3, pred, 4)] == [0, 0, 0, 0]


def test_classification_report_per_class_by_hand():
    report = metrics.classification_report(Y3, P3, NAMES3)
    assert report["n"] == 10
    assert report["accuracy"] == pytest.approx(6 / 10)
    # balanced accuracy = mean sensitivity = (3/4 + 2/3 + 1/3) / 3 = 7/12
    assert report["balanced_accuracy"] == pytest.approx(7 / 12)
    for name, expected in EXPECTED3.items():
        row = report["per_class"][name]
        for key, value in expected.items():
            assert row[key] == pytest.approx(value), (name, key)
        assert row["roc_auc"] == pytest.approx(AUC3[name]), name
    assert [report["per_class"][c]["support"] for c in NAMES3] == [4, 3, 3]


def test_classification_report_averages_by_hand():
    report = metrics.classification_report(Y3, P3, NAMES3)
    macro, weighted = report["macro"], report["weighted"]
    # macro precision (3/5 + 2/3 + 1/2)/3 = (18 + 20 + 15)/90 = 53/90
    assert macro["precision"] == pytest.approx(53 / 90)
    assert macro["sensitivity"] == pytest.approx(7 / 12)
    # macro specificity (2/3 + 6/7 + 6/7)/3 = (14 + 18 + 18)/63 = 50/63
    assert macro["specificity"] == pytest.approx(50 / 63)
    # macro f1 (2/3 + 2/3 + 2/5)/3 = (10 + 10 + 6)/45 = 26/45
    assert macro["f1"] == pytest.approx(26 / 45)
    # macro AUC (11/12 + 5/6 + 6/7)/3 = (77 + 70 + 72)/252 = 73/84
    assert macro["roc_auc"] == pytest.approx(73 / 84)
    # weighted by support 4, 3, 3 over 10:
    # precision (4*3/5 + 3*2/3 + 3*1/2)/10 = (2.4 + 2 + 1.5)/10 = 0.59
    assert weighted["precision"] == pytest.approx(0.59)
    # weighted sensitivity is always the accuracy: (3 + 2 + 1)/10
    assert weighted["sensitivity"] == pytest.approx(0.6)
    # specificity (4*2/3 + 3*6/7 + 3*6/7)/10 = (56 + 108)/210 = 82/105
    assert weighted["specificity"] == pytest.approx(82 / 105)
    # f1 (4*2/3 + 3*2/3 + 3*2/5)/10 = (40 + 30 + 18)/150 = 44/75
    assert weighted["f1"] == pytest.approx(44 / 75)
    assert "roc_auc" not in weighted


def test_classification_report_uses_given_predictions():
    # Predict everything as class "a": TP 4, FP 6 -> precision 0.4; b and c never predicted.
    report = metrics.classification_report(Y3, P3, NAMES3, y_pred=np.zeros(10, dtype=int))
    assert report["accuracy"] == pytest.approx(0.4)
    assert report["per_class"]["a"]["precision"] == pytest.approx(0.4)
    assert report["per_class"]["a"]["specificity"] == 0.0  # TN 0 of 6 negatives
    # b: never predicted -> precision 0.0 by convention; specificity 7/7
    assert report["per_class"]["b"]["precision"] == 0.0
    assert report["per_class"]["b"]["specificity"] == 1.0
    # AUC comes from prob, not from y_pred
    assert report["per_class"]["a"]["roc_auc"] == pytest.approx(11 / 12)


def test_undefined_auc_is_null_and_report_is_json_ready():
    y = np.array([0, 0, 1, 1])  # class "c" absent
    prob = np.array([[0.6, 0.3, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2]])
    report = metrics.classification_report(y, prob, NAMES3)
    # a: pos 0.6 0.4 vs neg 0.2 0.5 -> 2 + 1 = 3/4
    # b: pos 0.7 0.3 vs neg 0.3 0.5 -> 2 + 0.5 (tie) = 2.5/4 = 5/8
    assert report["per_class"]["a"]["roc_auc"] == pytest.approx(3 / 4)
    assert report["per_class"]["b"]["roc_auc"] == pytest.approx(5 / 8)
    assert report["per_class"]["c"]["roc_auc"] is None
    # macro AUC averages only the defined ones: (3/4 + 5/8)/2 = 11/16
    assert report["macro"]["roc_auc"] == pytest.approx(11 / 16)
    # c is never predicted (argmax 0 1 1 0): precision 0.0, specificity 4/4
    assert report["per_class"]["c"]["precision"] == 0.0
    assert report["per_class"]["c"]["specificity"] == 1.0
    # plain Python types only: allow_nan=False also rejects any nan that slipped through
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    assert type(report["n"]) is int
    assert type(report["per_class"]["a"]["support"]) is int
    assert type(report["accuracy"]) is float


def test_single_class_subset_has_no_auc():
    # e.g. the adult-normals probe: every image is class 0, so no class has both positives
    # and negatives; class 0 has no negatives (specificity 0/0 -> 0.0 by convention)
    y = np.zeros(3, dtype=int)
    prob = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    report = metrics.classification_report(y, prob, ["normal", "covid"])
    assert [report["per_class"][c]["roc_auc"] for c in ("normal", "covid")] == [None, None]
    assert report["macro"]["roc_auc"] is None
    assert report["per_class"]["normal"]["sensitivity"] == pytest.approx(2 / 3)
    assert report["per_class"]["normal"]["specificity"] == 0.0
    assert report["per_class"]["covid"]["specificity"] == pytest.approx(2 / 3)


def test_binary_report_has_both_classes():
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.8, 0.4])
    prob = np.column_stack([1 - p1, p1])
    report = metrics.classification_report(y, prob, ["non-COVID", "COVID-19"])
    # argmax predicts COVID for 0.6 and 0.8: TP 1, FP 1, FN 1, TN 2
    covid, other = report["per_class"]["COVID-19"], report["per_class"]["non-COVID"]
    assert covid["sensitivity"] == pytest.approx(1 / 2)
    assert covid["specificity"] == pytest.approx(2 / 3)
    assert covid["precision"] == pytest.approx(1 / 2)
    # the other class's view swaps sensitivity and specificity; precision = NPV = 2/3
    assert other["sensitivity"] == pytest.approx(2 / 3)
    assert other["specificity"] == pytest.approx(1 / 2)
    assert other["precision"] == pytest.approx(2 / 3)
    # AUC: pos 0.8 0.4 vs neg 0.1 0.6 0.3 -> 3 + 2 = 5/6, the same from either column
    assert covid["roc_auc"] == pytest.approx(5 / 6)
    assert other["roc_auc"] == pytest.approx(5 / 6)


def test_default_statistics_by_hand():
    stats = metrics.default_statistics(positive_class=2)
    assert stats["accuracy"](Y3, P3) == pytest.approx(0.6)
    assert stats["macro_f1"](Y3, P3) == pytest.approx(26 / 45)
    assert stats["macro_auc"](Y3, P3) == pytest.approx(73 / 84)
    assert stats["sensitivity"](Y3, P3) == pytest.approx(1 / 3)
    assert stats["specificity"](Y3, P3) == pytest.approx(6 / 7)
    # missing class -> macro statistics undefined rather than silently averaged over fewer
    only01 = Y3 < 2
    assert math.isnan(stats["macro_auc"](Y3[only01], P3[only01]))
    assert math.isnan(stats["macro_f1"](Y3[only01], P3[only01]))
    assert math.isnan(stats["sensitivity"](Y3[only01], P3[only01]))


def _noisy_binary(n_groups: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), rng.integers(1, 4, size=n_groups))
    y = (groups % 2).astype(int)
    p1 = np.clip(0.5 * y + 0.25 + rng.normal(0, 0.25, len(y)), 0, 1)
    return y, np.column_stack([1 - p1, p1]), groups


def test_bootstrap_is_seeded():
    y, prob, groups = _noisy_binary()
    stats = metrics.default_statistics(positive_class=1)
    first = metrics.bootstrap_ci(y, prob, groups, stats, n_resamples=25, seed=7)
    again = metrics.bootstrap_ci(y, prob, groups, stats, n_resamples=25, seed=7)
    other = metrics.bootstrap_ci(y, prob, groups, stats, n_resamples=25, seed=8)
    assert first == again
    assert first != other


def test_bootstrap_interval_is_the_binomial_one_for_whole_patient_groups():
    """A known answer: 200 patients with 2 films each, both right for 140 of them. Resampling
    patients, the bootstrap accuracy is Binomial(200, 0.7) / 200, so its 95% percentile
    interval is that distribution's 2.5% and 97.5% quantiles (0.635, 0.76), up to one step
    (1/200) and the Monte Carlo error of 4000 resamples (~0.0015). Resampling films instead
    (Binomial(400, 0.7) / 400: low 0.655) or taking 5% tails (low 0.645) misses it.
    Watched red with the resampling done per film and with the tails at (1 - level)."""
    from scipy.stats import binom

    groups = np.repeat(np.arange(200), 2)
    right = np.repeat(np.arange(200) < 140, 2)
    y = np.zeros(400, dtype=int)
    prob = np.where(right[:, None], [[0.9, 0.1]], [[0.1, 0.9]])
    stats = {"accuracy": metrics.default_statistics(positive_class=1)["accuracy"]}
    ci = metrics.bootstrap_ci(y, prob, groups, stats, n_resamples=4000, seed=0)["accuracy"]
    assert ci["point"] == pytest.approx(0.7) and ci["n_valid"] == 4000
    low, high = binom.ppf([0.025, 0.975], 200, 0.7) / 200
    assert abs(ci["low"] - low) <= 0.007 and abs(ci["high"] - high) <= 0.007, (ci, low, high)
    assert json.loads(json.dumps(ci, allow_nan=False)) == ci


def test_bootstrap_interval_narrows_with_level():
    y, prob, groups = _noisy_binary()
    stats = metrics.default_statistics(positive_class=1)
    cheap = {name: stats[name] for name in ("accuracy", "sensitivity", "specificity")}
    wide = metrics.bootstrap_ci(y, prob, groups, cheap, n_resamples=300, seed=1)
    narrow = metrics.bootstrap_ci(y, prob, groups, cheap, n_resamples=300, seed=1, level=0.5)
    for name, ci in wide.items():
        # same seed -> same resamples, so the 50% interval nests strictly inside the 95% one
        assert ci["low"] < narrow[name]["low"] <= narrow[name]["high"] < ci["high"], name


def test_bootstrap_perfect_classifier_gives_one():
    y = np.array([0, 0, 1, 1, 0, 1, 2, 2, 2])
    prob = np.eye(3)[y] * 0.8 + 0.2 / 3
    groups = np.array([0, 0, 1, 1, 2, 3, 4, 4, 5])
    stats = metrics.default_statistics(positive_class=2)
    result = metrics.bootstrap_ci(y, prob, groups, stats, n_resamples=40, seed=0)
    assert result["accuracy"] == {"point": 1.0, "low": 1.0, "high": 1.0, "n_valid": 40}
    for name in ("sensitivity", "specificity", "macro_f1", "macro_auc"):
        assert (result[name]["point"], result[name]["low"], result[name]["high"]) == (1, 1, 1)
        # 6 groups: some resamples miss a class (here P(no class-2 group) = (4/6)^6 ~ 9%) and
        # are skipped for the statistics that need it, but not all of them
        assert 20 < result[name]["n_valid"] <= 40, name
    assert result["macro_auc"]["n_valid"] < 40


def test_bootstrap_resamples_whole_groups():
    # Group 0: 1 image, right. Group 1: 9 images, all wrong. Drawing 2 groups with replacement
    # can only give {0,0}: 2 images acc 1; {0,1}: 10 images acc 1/10; {1,1}: 18 images acc 0.
    # Resampling single images instead would give many other accuracies and sizes.
    # The lone image sits mid-array so that members must be found by id, not by position.
    y = np.ones(10, dtype=int)
    prob = np.array([[0.9, 0.1]] * 4 + [[0.1, 0.9]] + [[0.9, 0.1]] * 5)
    groups = np.array(["p1"] * 4 + ["p0"] + ["p1"] * 5)
    seen: list[tuple[int, float]] = []

    def record(yt: np.ndarray, p: np.ndarray) -> float:
        acc = float(np.mean(p.argmax(axis=1) == yt))
        seen.append((len(yt), acc))
        return acc

    result = metrics.bootstrap_ci(y, prob, groups, {"acc": record}, n_resamples=200, seed=3)
    assert seen[-1] == (10, 0.1)  # the point estimate on the full data comes last
    resampled = seen[:-1]
    assert len(resampled) == 200
    assert set(resampled) == {(2, 1.0), (10, 0.1), (18, 0.0)}
    # P({0,0}) = 1/4, P({0,1}) = 1/2, P({1,1}) = 1/4: the 2.5th/97.5th percentiles are 0 and 1
    assert (result["acc"]["low"], result["acc"]["high"]) == (0.0, 1.0)
    assert result["acc"]["point"] == pytest.approx(0.1)


def test_bootstrap_skips_undefined_resamples():
    # Group "n" holds only negatives, group "p" only positives: AUC is defined only when both
    # groups are drawn (probability 1/2), and then it is 1 (perfect separation).
    y = np.array([0, 0, 0, 1, 1])
    prob = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    groups = np.array(["n", "n", "n", "p", "p"])
    both_present = []

    def mixed(yt: np.ndarray, p: np.ndarray) -> float:
        both_present.append(len(np.unique(yt)) == 2)
        return 0.0

    stats = {"auc": metrics.default_statistics(1)["macro_auc"], "mixed": mixed}
    result = metrics.bootstrap_ci(y, prob, groups, stats, n_resamples=100, seed=0)
    expected_valid = sum(both_present[:100])  # last call is the point estimate
    assert 20 < expected_valid < 80
    assert result["auc"] == {"point": 1.0, "low": 1.0, "high": 1.0, "n_valid": expected_valid}
    assert result["mixed"]["n_valid"] == 100


# Binary operating-point example: negatives score 0.1 0.2 0.5, positives 0.3 0.6 0.7 0.8 0.9.
# threshold: TPR  FPR   J
#   0.9      1/5  0    0.2
#   0.8      2/5  0    0.4
#   0.7      3/5  0    0.6
#   0.6      4/5  0    0.8   <- unique maximum
#   0.5      4/5  1/3  0.47
#   0.3      5/5  1/3  0.67
#   0.2      5/5  2/3  0.33
YB = np.array([0, 0, 0, 1, 1, 1, 1, 1])
SB = np.array([0.1, 0.2, 0.5, 0.3, 0.6, 0.7, 0.8, 0.9])


def test_youden_threshold_by_hand():
    assert metrics.youden_threshold(YB, SB) == 0.6


def test_youden_threshold_ties_take_highest():
    # negatives 0.1 0.2 0.3 0.6, positives 0.4 0.7 0.8 0.9:
    # at 0.7 TPR 3/4, FPR 0 -> J 0.75; at 0.4 TPR 1, FPR 1/4 -> J 0.75; tie -> 0.7
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert metrics.youden_threshold(y, s) == 0.7


def test_threshold_for_sensitivity_by_hand():
    assert metrics.threshold_for_sensitivity(YB, SB, 0.8) == 0.6  # 4/5 exactly reaches 0.8
    assert metrics.threshold_for_sensitivity(YB, SB, 0.81) == 0.3  # 0.5 still gives 4/5
    assert metrics.threshold_for_sensitivity(YB, SB, 1.0) == 0.3
    assert metrics.threshold_for_sensitivity(YB, SB, 0.2) == 0.9
    assert metrics.threshold_for_sensitivity(YB, SB, 0.5) == 0.7  # 3/5 is the first >= 0.5
    with pytest.raises(ValueError, match="both positives and negatives"):
        metrics.threshold_for_sensitivity(np.ones(3), np.array([0.1, 0.2, 0.3]), 0.9)


def test_binary_at_threshold_by_hand():
    # threshold 0.5 (score == threshold counts as positive): predicted positive 0.5 (a
    # negative), 0.6 0.7 0.8 0.9 -> TP 4, FP 1, FN 1 (0.3), TN 2 (0.1, 0.2)
    result = metrics.binary_at_threshold(YB, SB, 0.5)
    assert result["confusion"] == [[2, 1], [1, 4]]
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["sensitivity"] == pytest.approx(4 / 5)
    assert result["specificity"] == pytest.approx(2 / 3)
    assert result["precision"] == pytest.approx(4 / 5)
    assert result["f1"] == pytest.approx(8 / 10)  # 2TP / (2TP + FP + FN)
    assert result["balanced_accuracy"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    # above every score: nothing predicted positive, precision falls back to 0.0
    none = metrics.binary_at_threshold(YB, SB, 0.95)
    assert none["confusion"] == [[3, 0], [5, 0]]
    assert (none["precision"], none["sensitivity"], none["specificity"]) == (0.0, 0.0, 1.0)


# Calibration example, 5 bins of width 0.2. (top-label confidence, correct?):
#   (0.4, 0.6]: 0.55 right                 -> conf 0.55, acc 1,   |gap| 0.45, n 1
#   (0.6, 0.8]: 0.65 wrong, 0.75 right     -> conf 0.70, acc 1/2, |gap| 0.20, n 2
#   (0.8, 1.0]: 0.9 wrong, 0.95 right, 0.85 right -> conf 0.9, acc 2/3, |gap| 0.7/3, n 3
# ECE = (1*0.45 + 2*0.2 + 3*0.7/3) / 6 = 1.55 / 6
YC = np.array([1, 1, 1, 0, 0, 1])
PC = np.array([[0.45, 0.55], [0.65, 0.35], [0.25, 0.75], [0.1, 0.9], [0.95, 0.05], [0.15, 0.85]])


def test_expected_calibration_error_by_hand():
    assert metrics.expected_calibration_error(YC, PC, n_bins=5) == pytest.approx(1.55 / 6)
    # all confident (1.0 lands in the last bin) and right -> perfectly calibrated
    assert metrics.expected_calibration_error(np.array([0, 1]), np.eye(2), n_bins=10) == 0.0


def test_reliability_bins_by_hand():
    rows = metrics.reliability_bins(YC, PC, n_bins=5)
    assert [(r["bin_low"], r["bin_high"], r["count"]) for r in rows] == [
        (0.4, 0.6000000000000001, 1),  # np.linspace edge
        (0.6000000000000001, 0.8, 2),
        (0.8, 1.0, 3),
    ]
    assert [r["confidence"] for r in rows] == pytest.approx([0.55, 0.7, 0.9])
    assert [r["accuracy"] for r in rows] == pytest.approx([1.0, 0.5, 2 / 3])
    # bins are right-closed: a confidence of exactly 0.8 belongs to (0.6, 0.8], not (0.8, 1.0]
    (edge,) = metrics.reliability_bins(np.array([1]), np.array([[0.2, 0.8]]), n_bins=5)
    assert (edge["bin_low"], edge["bin_high"]) == (0.6000000000000001, 0.8)


def test_roc_points_long_format_and_finite():
    # sklearn's documented example: scores 0.1 0.4 0.35 0.8 for labels 0 0 1 1
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    prob = np.column_stack([1 - p1, p1])
    rows = metrics.roc_points(y, prob, ["neg", "pos"])
    pos = [r for r in rows if r["class"] == "pos"]
    assert [(r["fpr"], r["tpr"]) for r in pos] == [
        (0.0, 0.0),
        (0.0, 0.5),
        (0.5, 0.5),
        (0.5, 1.0),
        (1.0, 1.0),
    ]
    assert [r["threshold"] for r in pos[1:]] == [0.8, 0.4, 0.35, 0.1]
    # the "+inf" threshold is replaced by a finite one above the top score
    assert 0.8 < pos[0]["threshold"] < 0.8 + 1e-9
    assert {r["class"] for r in rows} == {"neg", "pos"}
    json.dumps(rows, allow_nan=False)


def test_roc_points_skips_class_without_positives():
    y = np.array([0, 0, 1, 1])
    prob = np.array([[0.6, 0.3, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2]])
    rows = metrics.roc_points(y, prob, NAMES3)
    assert {r["class"] for r in rows} == {"a", "b"}


def test_positive_rate():
    # argmax: 2, 0, 2, 1, 0 -> class 2 chosen for 2 of 5
    prob = np.array(
        [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [0.2, 0.6, 0.2], [0.9, 0.05, 0.05]]
    )
    assert metrics.positive_rate(prob, positive_class=2) == pytest.approx(0.4)
    assert metrics.positive_rate(prob, positive_class=1) == pytest.approx(0.2)
    assert metrics.positive_rate(prob, positive_class=3) == 0.0


# COVID-19 calls of a four-class model (covid = column 0), threshold 0.5. y: 1 = COVID-19.
#   row  p(covid)  argmax   >= 0.5   truth
#   0    0.7       covid    yes      1
#   1    0.4       covid    no       1   (0.4 is still the top class)
#   2    0.2       viral    no       1
#   3    0.6       covid    yes      0
#   4    0.1       normal   no       0
#   5    0.45      covid    no       0
YK = np.array([1, 1, 1, 0, 0, 0])
PK = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],
        [0.4, 0.3, 0.2, 0.1],
        [0.2, 0.5, 0.2, 0.1],
        [0.6, 0.1, 0.1, 0.2],
        [0.1, 0.1, 0.1, 0.7],
        [0.45, 0.1, 0.4, 0.05],
    ]
)


def test_covid_call_statistics_at_threshold_by_hand():
    stats = metrics.covid_call_statistics(positive_class=0, threshold=0.5)
    # calls rows 0 and 3: TP 1, FN 2, FP 1, TN 2
    assert stats["sensitivity"](YK, PK) == pytest.approx(1 / 3)
    assert stats["specificity"](YK, PK) == pytest.approx(2 / 3)
    assert stats["accuracy"](YK, PK) == pytest.approx(3 / 6)
    assert stats["balanced_accuracy"](YK, PK) == pytest.approx(1 / 2)
    assert stats["call_rate"](YK, PK) == pytest.approx(2 / 6)
    # a score exactly at the threshold is a COVID-19 call
    assert stats["call_rate"](np.array([0]), np.array([[0.5, 0.5, 0, 0]])) == 1.0


def test_covid_call_statistics_at_argmax_by_hand():
    stats = metrics.covid_call_statistics(positive_class=0, threshold=None)
    # argmax calls rows 0, 1, 3, 5: TP 2, FN 1, FP 2, TN 1
    assert stats["sensitivity"](YK, PK) == pytest.approx(2 / 3)
    assert stats["specificity"](YK, PK) == pytest.approx(1 / 3)
    assert stats["accuracy"](YK, PK) == pytest.approx(3 / 6)
    assert stats["call_rate"](YK, PK) == pytest.approx(4 / 6)
    # undefined without positives (sensitivity, balanced accuracy); specificity still defined
    neg = YK == 0
    assert math.isnan(stats["sensitivity"](YK[neg], PK[neg]))
    assert math.isnan(stats["balanced_accuracy"](YK[neg], PK[neg]))
    assert stats["specificity"](YK[neg], PK[neg]) == pytest.approx(1 / 3)


def test_covid_auc_statistic_by_hand():
    auc = metrics.covid_auc_statistic(positive_class=0)
    # pos 0.7 0.4 0.2 vs neg 0.6 0.1 0.45: 3 + 1 + 1 = 5 of 9 pairs
    assert auc(YK, PK) == pytest.approx(5 / 9)
    assert math.isnan(auc(YK[:3], PK[:3]))  # positives only


def test_argmax_in_statistic_by_hand():
    # argmax: covid, covid, viral, covid, normal, covid -> viral or bacterial 1 of 6
    assert metrics.argmax_in_statistic([1, 2])(YK, PK) == pytest.approx(1 / 6)
    assert metrics.argmax_in_statistic([2, 1])(YK, PK) == pytest.approx(1 / 6)  # any order
    assert metrics.argmax_in_statistic([0])(YK, PK) == pytest.approx(4 / 6)
