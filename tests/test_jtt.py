"""Just train twice (train_<task>.jtt_epochs; cxr.train.jtt_errors, cxr.data.epoch_order).

A first run of the same recipe, cut short, finds the training films it calls wrongly; the final
run draws those JTT_UPWEIGHT times as often. Off by default, recorded only when on, one process
only: tests/test_train_keys.py; a resume keeps the first run's films (tests/test_distributed.py).

Checked by hand (each bug made in the code, a test went red, then the code was restored): the
first run's films left out of the resume file (the resume test, jtt_epochs); the films weighted
1 instead of JTT_UPWEIGHT (test_the_final_run_*); the first run not trained (both train tests).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from cxr import train as train_module
from cxr.data import epoch_order, seed_everything
from cxr.infer import predict_proba
from cxr.models import build_model
from cxr.params import ParamsError
from cxr.train import JTT_UPWEIGHT, jtt_errors, train_model
from tests.conftest import quadrant_set, toy_params

N = 32


def test_upweighted_rows_are_drawn_that_much_more_often_within_their_stratum():
    strata = np.array([0] * 40 + [1] * 10)
    weights = np.ones(50)
    weights[[0, 1, 40]] = JTT_UPWEIGHT
    gen = torch.Generator().manual_seed(0)
    drawn = np.concatenate([epoch_order(strata, oversample=True, generator=gen,
                                        row_weights=weights).numpy() for _ in range(2000)])  # fmt: skip
    counts = np.bincount(drawn, minlength=50) / 2000
    # Stratum 0: 38 rows of weight 1 and 2 of weight 6 share 1/2 of each draw's probability.
    plain0, plain1 = counts[2:40].mean(), counts[41:].mean()
    assert counts[:2].mean() / plain0 == pytest.approx(JTT_UPWEIGHT, rel=0.05)
    assert counts[40] / plain1 == pytest.approx(JTT_UPWEIGHT, rel=0.05)
    # Without weights the default draw is what it was; without oversampling, weights alone.
    assert torch.equal(epoch_order(strata, oversample=False, generator=torch.Generator()),
                       torch.randperm(50, generator=torch.Generator()))  # fmt: skip
    flat = np.concatenate([epoch_order(strata, oversample=False, generator=gen,
                                       row_weights=weights).numpy() for _ in range(2000)])  # fmt: skip
    flat_counts = np.bincount(flat, minlength=50)
    assert flat_counts[[0, 1, 40]].mean() / flat_counts[2:40].mean() == pytest.approx(
        JTT_UPWEIGHT, rel=0.05)  # fmt: skip


def data():
    images, labels = quadrant_set(N)
    return dict(train_images=images, train_labels=labels, val_images=images[:8],
                val_labels=labels[:8])  # fmt: skip


def test_the_first_run_is_the_recipe_cut_short_and_finds_its_wrong_calls():
    torch.set_num_threads(1)
    p = toy_params(epochs=3, jtt_epochs=1, lr=1e-2)
    allowed = np.eye(4, dtype=bool)[data()["train_labels"]]
    model = build_model("resnet18", 4)
    probe, twin = copy.deepcopy(model), copy.deepcopy(model)
    errors = jtt_errors(probe, p, train_allowed=allowed, generator=seed_everything(3, True),
                        **data())  # fmt: skip
    # The same recipe, one epoch, same start and draws: the same weights.
    train_model(twin, replace(p, epochs=1, jtt_epochs=0), generator=seed_everything(3, True),
                **data())  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(),
                                                 twin.state_dict().values(), strict=True))  # fmt: skip
    calls = predict_proba(probe, data()["train_images"]).argmax(axis=1)
    assert errors == np.flatnonzero(calls != data()["train_labels"]).tolist()
    assert (
        0 < len(errors) < N
    )  # the toy leaves some wrong after one epoch: the test means something


def test_the_final_run_draws_the_first_runs_errors_more_often(monkeypatch):
    torch.set_num_threads(1)
    seen = []
    real = train_module.epoch_order

    def spy(strata, *, oversample, generator, row_weights=None):
        seen.append(None if row_weights is None else row_weights.copy())
        return real(strata, oversample=oversample, generator=generator, row_weights=row_weights)

    monkeypatch.setattr(train_module, "epoch_order", spy)
    p = toy_params(epochs=2, jtt_epochs=1, lr=1e-2)
    result = train_model(build_model("resnet18", 4), p, generator=seed_everything(3, True),
                         **data())  # fmt: skip
    first, *final = seen  # the first run's one epoch, then the final run's two
    assert first is None and len(final) == 2
    for weights in final:
        assert set(np.unique(weights)) <= {1.0, JTT_UPWEIGHT}
        assert int((weights == JTT_UPWEIGHT).sum()) == result.jtt_errors > 0
    assert result.summary()["jtt_error_films"] == result.jtt_errors
    seen.clear()
    plain = train_model(build_model("resnet18", 4), replace(p, jtt_epochs=0),
                        generator=seed_everything(3, True), **data())  # fmt: skip
    assert seen == [None, None] and plain.jtt_errors is None
    assert "jtt_error_films" not in plain.summary()


@pytest.mark.parametrize("value", [-1, 3])
def test_jtt_epochs_outside_0_to_epochs_is_named(value):
    with pytest.raises(ParamsError, match="jtt_epochs"):
        toy_params(epochs=2, jtt_epochs=value).validate()
