"""Labels of unknown type, the partial-label loss, and balancing by class x age group."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cxr.data import (
    allowed_classes,
    epoch_order,
    labels_for,
    partial_label_loss,
    sample_weights,
    strata_for,
)
from cxr.params import ParamsError
from cxr.splits import drop_adult_controls
from stages.train import training_rows
from tests.conftest import repo_params

ROWS = pd.DataFrame({
    "label": ["covid", "viral", "bacterial", "normal", "pneumonia", "normal"],
    "age_group": ["adult", "pediatric", "pediatric", "pediatric", "adult", "adult"],
    "dataset": ["ieee8023", "kermany", "kermany", "kermany", "nih", "rsna"],
})  # fmt: skip


def test_pneumonia_is_non_covid_for_binary_and_viral_or_bacterial_for_four_class():
    assert labels_for(ROWS, "binary").tolist() == [1, 0, 0, 0, 0, 0]
    assert labels_for(ROWS, "four_class").tolist() == [0, 1, 2, 3, -1, 3]
    allowed = allowed_classes(ROWS, "four_class")
    assert allowed[4].tolist() == [False, True, True, False]
    assert allowed.sum(1).tolist() == [1, 1, 1, 1, 2, 1]
    assert allowed_classes(ROWS, "binary")[4].tolist() == [True, False]
    with pytest.raises(ValueError, match="unknown label"):
        labels_for(ROWS.assign(label="flu"), "binary")


def test_partial_label_loss_by_hand():
    # softmax of log([1, 2, 3, 1]) is [1, 2, 3, 1] / 7
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 1.0], [1.0, 2.0, 3.0, 1.0]]))
    viral_or_bacterial = torch.tensor([[False, True, True, False]] * 2)
    assert partial_label_loss(logits, viral_or_bacterial).item() == pytest.approx(-math.log(5 / 7))
    covid = torch.tensor([[True, False, False, False], [False, False, False, True]])
    assert partial_label_loss(logits, covid).item() == pytest.approx(-math.log(1 / 7))
    # weighted mean: (1 * -log 5/7 + 3 * -log 1/7) / 4
    mixed = torch.tensor([[False, True, True, False], [True, False, False, False]])
    expected = (-math.log(5 / 7) + 3 * -math.log(1 / 7)) / 4
    got = partial_label_loss(logits, mixed, torch.tensor([1.0, 3.0])).item()
    assert got == pytest.approx(expected)


def test_one_allowed_class_is_ordinary_cross_entropy_with_its_gradient():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    allowed = F.one_hot(y, 4).bool()
    ours = partial_label_loss(logits, allowed)
    ref = F.cross_entropy(logits, y)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_balancing_by_class_and_age_draws_adult_controls_as_often_as_covid():
    rows = pd.DataFrame({
        "label": ["covid"] * 20 + ["normal"] * 5 + ["normal"] * 75,
        "age_group": ["adult"] * 25 + ["pediatric"] * 75,
    })  # fmt: skip
    by_class = strata_for(rows, "binary", ["class"])
    by_age = strata_for(rows, "binary", ["class", "age_group"])
    assert len(set(by_class)) == 2 and len(set(by_age)) == 3
    gen = torch.Generator().manual_seed(0)
    adult_normal = np.arange(20, 25)
    drawn = epoch_order(by_age, oversample=True, generator=gen).numpy()
    drawn = np.concatenate([drawn, epoch_order(by_age, oversample=True, generator=gen).numpy()])
    covid_share, adult_normal_share = (drawn < 20).mean(), np.isin(drawn, adult_normal).mean()
    assert abs(covid_share - 1 / 3) < 0.1 and abs(adult_normal_share - 1 / 3) < 0.1
    # by class alone the 5 adult normals are 5 of 80 non-COVID rows: ~3% of draws
    drawn = epoch_order(by_class, oversample=True, generator=gen).numpy()
    assert np.isin(drawn, adult_normal).mean() < 0.12
    w = sample_weights(by_age)  # 100 rows / (3 strata x count)
    assert w[0].item() == pytest.approx(100 / 60) and w[20].item() == pytest.approx(100 / 15)


def test_balancing_by_pneumonia_draws_adult_pneumonia_as_often_as_adult_normals():
    rows = pd.DataFrame({
        "label": ["covid"] * 20 + ["normal"] * 40 + ["pneumonia"] * 4 + ["bacterial"] * 4
        + ["normal"] * 30 + ["viral"] * 30,
        "age_group": ["adult"] * 68 + ["pediatric"] * 60,
    })  # fmt: skip
    strata = strata_for(rows, "binary", ["class", "age_group", "pneumonia"])
    # COVID-19, adult normal, adult non-COVID pneumonia, pediatric normal, pediatric pneumonia
    assert len(set(strata)) == 5
    adult_pneumonia = strata[60:68]
    assert len(set(adult_pneumonia)) == 1 and adult_pneumonia[0] not in strata[:60]
    assert strata[0] != strata[68] and len(set(strata[98:])) == 1 and strata[98] != strata[68]
    w = sample_weights(strata).numpy()
    # each stratum a fifth of the draws: 8 adult pneumonia films weigh what 40 adult normals do
    assert w[60:68].sum() == pytest.approx(w[20:60].sum()) == pytest.approx(len(rows) / 5)
    by_age = strata_for(rows, "binary", ["class", "age_group"])
    assert by_age[60] == by_age[20]  # without it adult pneumonia and normals are one stratum


def test_pneumonia_is_its_own_stratum_for_four_class_only():
    four = strata_for(ROWS, "four_class", ["class"])
    assert len(set(four)) == 5 and four[4] not in four[[0, 1, 2, 3, 5]]
    binary = strata_for(ROWS, "binary", ["class"])
    assert binary[4] == binary[1]  # pneumonia is just non-COVID
    with pytest.raises(ParamsError, match="balance_by"):
        repo_params("train_binary", balance_by=["hospital"]).validate()


def test_partial_labels_off_leaves_unknown_type_out_of_four_class_training_only():
    images = np.arange(len(ROWS))[:, None, None] * np.ones((1, 2, 2), dtype=np.uint8)
    off = repo_params("train_four_class", partial_labels=False)
    x, t = training_rows(images, ROWS, off)
    assert "pneumonia" not in set(t["label"]) and len(x) == len(t) == 5 and x[4, 0, 0] == 5
    x, t = training_rows(images, ROWS, repo_params("train_four_class", partial_labels=True))
    assert len(t) == 6
    x, t = training_rows(images, ROWS, repo_params("train_binary", partial_labels=False))
    assert len(t) == 6


def test_adult_controls_off_removes_rsna_and_nih_from_train_and_val_not_test():
    pool = ROWS.assign(split=["train", "train", "val", "test", "val", "test"])
    kept = drop_adult_controls(pool.assign(split=["train"] * 3 + ["val"] * 3))
    assert set(kept["dataset"]) == {"ieee8023", "kermany"}
    kept = drop_adult_controls(pool)
    assert kept["dataset"].tolist() == ["ieee8023", "kermany", "kermany", "kermany", "rsna"]
