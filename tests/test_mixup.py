"""mixup (train_<task>.mixup, cxr.train.mix_batch and mixed_nll).

Checked by hand (each bug made in the code, this file went red, then the code was restored):
- the partner's film left out of the blend (lam forced to 1 in mix_batch): test_a_batch_is_*;
- the loss on each film's own label only: test_the_loss_is_blended_* (in mixed_nll),
  test_train_epoch_takes_its_step_on_the_blend (in train_epoch);
- train_epoch never blending (mixup not passed on by train_model): test_mixup_trains_*;
- mixup's draws left out of the resume file (a private generator): the mixup case of
  tests/test_distributed.py::test_an_interrupted_run_resumes_to_bit_identical_weights.
"""

from __future__ import annotations

import pytest
import torch

import cxr.train
from cxr.data import partial_label_nll, to_input
from cxr.params import ParamsError
from cxr.train import mix_batch, mixed_nll, train_epoch
from tests.conftest import one_batch_of_quadrants, toy_params
from tests.test_mixstyle import run

params = toy_params


def test_a_batch_is_blended_with_a_shuffled_copy_of_itself():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    lams = []
    for _ in range(20):
        out, lam, partner = mix_batch(x, 0.2)
        assert sorted(partner.tolist()) == list(range(6))  # a permutation of the batch
        torch.testing.assert_close(out, lam * x + (1 - lam) * x[partner])
        lams.append(lam)
    assert all(0 <= lam <= 1 for lam in lams)
    # Beta(0.2, 0.2) puts most weights near 0 or 1, but not all of them: the blends are blends.
    assert any(0.1 < lam < 0.9 for lam in lams) and len(set(lams)) == 20


def test_the_loss_is_blended_with_the_same_weight():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    allowed = torch.tensor([[True, False], [False, True], [True, False]])
    partner = torch.tensor([1, 2, 0])
    own = partial_label_nll(logits, allowed)
    other = partial_label_nll(logits, allowed[partner])
    torch.testing.assert_close(mixed_nll(logits, allowed, 0.3, partner), 0.3 * own + 0.7 * other)
    torch.testing.assert_close(mixed_nll(logits, allowed, 1.0, partner), own)


def test_train_epoch_takes_its_step_on_the_blend():
    """The loss train_epoch reports for one batch is the blended loss of the blended films,
    drawn as mix_batch draws them from torch's global generator."""
    images, allowed, model, twin = one_batch_of_quadrants()
    batch = torch.arange(8).view(1, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(7)
    total, _, count = train_epoch(model, batch, images, allowed, weights=None,
                                  optimizer=optimizer, scheduler=None, aug=None,
                                  generator=torch.Generator(), mixup=1.0)  # fmt: skip
    torch.manual_seed(7)
    x, lam, partner = mix_batch(to_input(torch.from_numpy(images)), 1.0)
    twin.train()
    with torch.no_grad():
        expected = mixed_nll(twin(x), allowed, lam, partner).mean()
    assert 0.1 < lam < 0.9  # this seed's blend is one: the test tells blended from plain
    assert total / count == pytest.approx(float(expected), rel=1e-4)


def test_mixup_trains_otherwise_and_adds_nothing_to_the_checkpoint(monkeypatch):
    plain, plain_result = run(params())
    mixed, mixed_result = run(params(mixup=0.2))
    assert plain.state_dict().keys() == mixed.state_dict().keys()
    assert plain_result.history[0].train_loss != mixed_result.history[0].train_loss
    # With a blend that keeps every film itself, mixup's path trains exactly the plain run.
    monkeypatch.setattr(cxr.train, "mix_batch",
                        lambda x, alpha: (x, 1.0, torch.arange(len(x))))  # fmt: skip
    kept, kept_result = run(params(mixup=0.2))
    assert kept_result.history[0].train_loss == plain_result.history[0].train_loss
    assert all(
        torch.equal(a, b)
        for a, b in zip(kept.state_dict().values(), plain.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_mixup_outside_its_range_is_named(value):
    with pytest.raises(ParamsError, match="mixup"):
        params(mixup=value).validate()
