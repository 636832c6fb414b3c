"""The logit penalty (train_<task>.logit_penalty: spectral decoupling, cxr.train.logit_penalty_of).

Checked by hand (each bug made in the code, this file went red, then the code was restored):
- the penalty on the logits' mean instead of their squares' mean: test_the_penalty_is_*;
- train_epoch stepping on the task's loss alone (the penalty left out of the objective):
  test_train_epoch_steps_on_the_penalised_loss;
- train_model not passing it on: test_the_penalty_trains_otherwise_*.
Off by default, recorded only when on, one process only: tests/test_train_keys.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cxr.data import partial_label_loss, to_input
from cxr.params import ParamsError
from cxr.train import logit_penalty_of, train_epoch
from tests.conftest import one_batch_of_quadrants, toy_params
from tests.test_mixstyle import run

params = toy_params


def test_the_penalty_is_the_mean_squared_logit():
    logits = torch.tensor([[2.0, -2.0], [1.0, 3.0]])
    assert float(logit_penalty_of(logits)) == pytest.approx((4 + 4 + 1 + 9) / 4)
    # A shift of every logit leaves the softmax alone but not the penalty: it is the scale
    # (and offset) of the logits it holds down, not the probabilities.
    assert float(logit_penalty_of(logits + 5)) > float(logit_penalty_of(logits))


def one_step(penalty: float, lr: float = 0.5):
    """One SGD step of a fresh ResNet-18 on 8 quadrant films with this logit penalty: the
    weights after it and the loss train_epoch reports."""
    images, allowed, model, start = one_batch_of_quadrants()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    total, _, count = train_epoch(model, torch.arange(8).view(1, 8), images, allowed,
                                  weights=None, optimizer=optimizer, scheduler=None, aug=None,
                                  generator=torch.Generator(),
                                  logit_penalty=penalty)  # fmt: skip
    return model, start, images, allowed, total / count


def test_train_epoch_steps_on_the_penalised_loss():
    """The step follows the gradient of the task's loss plus the penalty; the loss it reports
    is the task's alone."""
    model, start, images, allowed, reported = one_step(10.0)
    twin = copy.deepcopy(start)
    twin.train()
    logits = twin(to_input(torch.from_numpy(images)))
    task = partial_label_loss(logits.float(), allowed, None)
    assert reported == pytest.approx(float(task.detach()), rel=1e-4)
    (task + 10.0 * logit_penalty_of(logits)).backward()
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.5 * p.grad
    fc = "backbone.fc.weight"
    torch.testing.assert_close(model.state_dict()[fc], twin.state_dict()[fc], rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    plain, *_ = one_step(0.0)
    assert not torch.allclose(plain.state_dict()[fc], model.state_dict()[fc], atol=1e-5)


def test_the_penalty_trains_otherwise_and_adds_nothing_to_the_checkpoint():
    plain, plain_result = run(params())
    held, held_result = run(params(logit_penalty=1.0))
    assert plain.state_dict().keys() == held.state_dict().keys()
    assert plain_result.history[-1].train_loss != held_result.history[-1].train_loss
    assert any(not torch.equal(a, b)
               for a, b in zip(plain.state_dict().values(), held.state_dict().values(),
                               strict=True))  # fmt: skip


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_a_logit_penalty_outside_its_range_is_named(value):
    with pytest.raises(ParamsError, match="logit_penalty"):
        params(logit_penalty=value).validate()
