"""Weight averaging (train_<task>.average_epochs, cxr.train.weight_average).

Checked by hand (each bug made in the code, this file went red, then the code was restored):
- the average updated once an epoch instead of every step: test_the_kept_weights_*;
- BatchNorm's running statistics left out of the average: test_the_kept_weights_*;
- the plain weights scored in the averaging epochs: test_the_epochs_before_*;
- the average left out of the resume file: the average_epochs case of
  tests/test_distributed.py::test_an_interrupted_run_resumes_to_bit_identical_weights;
- average_epochs recorded when off: test_off_it_is_not_recorded_*.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from cxr.config import as_recipe
from cxr.data import seed_everything
from cxr.models import build_model
from cxr.params import ParamsError
from cxr.train import train_model
from tests.conftest import quadrant_set, toy_params

params = toy_params


def run(p, n: int = 32):
    torch.set_num_threads(1)
    images, labels = quadrant_set(n)
    gen = seed_everything(0, p.deterministic)
    model = build_model(p.arch, 4)
    result = train_model(model, p, train_images=images, train_labels=labels,
                         val_images=images[:8], val_labels=labels[:8], generator=gen)  # fmt: skip
    return model, result


def test_the_kept_weights_are_the_mean_of_every_steps_weights_and_statistics(monkeypatch):
    seen: list[dict[str, torch.Tensor]] = []
    update = AveragedModel.update_parameters

    def spy(self, model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return update(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", spy)
    model, result = run(params(epochs=1, average_epochs=1))
    assert len(seen) == 32 // 8  # every step of the one epoch
    kept = model.state_dict()
    floats = [k for k, v in kept.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floats)  # BatchNorm's statistics are averaged too
    for key in floats:
        mean = torch.stack([s[key].float() for s in seen]).mean(0)
        torch.testing.assert_close(kept[key].float(), mean, rtol=1e-4, atol=1e-6, msg=key)
    assert not all(torch.equal(kept[k], seen[-1][k]) for k in floats)  # not the last step's


def test_the_epochs_before_the_average_are_scored_plain_and_training_is_unchanged():
    _, plain = run(params(epochs=2))
    _, averaged = run(params(epochs=2, average_epochs=1))

    def fields(h, *names):
        return {k: v for k, v in asdict(h).items() if k in names}

    every = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1")
    assert fields(plain.history[0], *every) == fields(averaged.history[0], *every)
    # The average only watches: the network trains exactly as without it ...
    assert plain.history[1].train_loss == averaged.history[1].train_loss
    # ... and in its epochs the average, not the network, is what validation scores.
    assert plain.history[1].val_loss != averaged.history[1].val_loss


@pytest.mark.parametrize("value", [-1, 3])
def test_average_epochs_outside_0_to_epochs_is_named(value):
    with pytest.raises(ParamsError, match="average_epochs"):
        params(epochs=2, average_epochs=value).validate()


def test_a_recipe_recorded_without_it_meant_no_averaging():
    # Off by default and recorded only when on: tests/test_train_keys.py.
    assert as_recipe("train_binary", {"lr": 1e-3})["average_epochs"] == 0
