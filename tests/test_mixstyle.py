"""MixStyle (train_<task>.mixstyle, cxr.mixstyle).

Checked by hand (each bug made in the code, this file went red, then the code was restored):
- the partner's statistics ignored (lam forced to 1): test_mixing_keeps_the_content_*;
- the normalised maps not kept (mixed means added to the raw maps): test_mixing_keeps_*;
- the hooks left mixing in evaluation mode: test_nothing_changes_in_evaluation_*;
- the hooks never registered by train_model: test_mixstyle_trains_otherwise_*;
- MixStyle's draws left out of the resume file (a private generator): the mixstyle case of
  tests/test_distributed.py::test_an_interrupted_run_resumes_to_bit_identical_weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cxr.data import seed_everything
from cxr.mixstyle import MixStyle, mix_styles
from cxr.models import build_model
from cxr.params import ParamsError
from cxr.train import train_model
from tests.conftest import quadrant_set, toy_params

params = toy_params


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean((2, 3)), x.std((2, 3), unbiased=True)


def test_mixing_keeps_the_content_and_mixes_the_statistics():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    x = x + torch.arange(4.0).view(4, 1, 1, 1)
    lam = torch.tensor([0.25, 1.0, 0.5, 0.0])
    partner = torch.tensor([1, 0, 3, 2])
    out = mix_styles(x, lam, partner)
    mu, sig = stats(x)
    out_mu, out_sig = stats(out)
    for i, j in enumerate(partner.tolist()):
        w = float(lam[i])
        torch.testing.assert_close(out_mu[i], w * mu[i] + (1 - w) * mu[j], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_sig[i], w * sig[i] + (1 - w) * sig[j], atol=1e-4, rtol=1e-4)
    # The normalised maps, the content, are the film's own.
    norm = (x - mu[..., None, None]) / sig[..., None, None]
    out_norm = (out - out_mu[..., None, None]) / out_sig[..., None, None]
    torch.testing.assert_close(out_norm, norm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], x[1], atol=1e-5, rtol=1e-5)  # lam 1: untouched


def test_nothing_changes_in_evaluation_mode_and_after_close():
    torch.manual_seed(0)
    model = build_model("resnet18", 2)
    twin = copy.deepcopy(model)  # never hooked
    x = torch.rand(4, 1, 32, 32)
    mix = MixStyle(model, 1.0)

    def same_pass(train: bool) -> bool:
        outs = []
        for m in (model, twin):
            m.train(train)
            torch.manual_seed(1)
            with torch.no_grad():
                outs.append(m(x))
        return torch.allclose(*outs)

    assert same_pass(train=False)  # evaluation: the hooks do nothing
    assert not same_pass(train=True)  # p = 1: every training pass is mixed
    mix.close()
    assert same_pass(train=True)  # closed: a plain network again


def run(p):
    torch.set_num_threads(1)
    images, labels = quadrant_set(32)
    gen = seed_everything(0, p.deterministic)
    model = build_model(p.arch, 4)
    result = train_model(model, p, train_images=images, train_labels=labels,
                         val_images=images[:8], val_labels=labels[:8], generator=gen)  # fmt: skip
    return model, result


def test_mixstyle_trains_otherwise_and_adds_nothing_to_the_checkpoint():
    plain, plain_result = run(params())
    mixed, mixed_result = run(params(mixstyle=1.0))
    assert plain.state_dict().keys() == mixed.state_dict().keys()
    assert plain_result.history[0].train_loss != mixed_result.history[0].train_loss
    # No hooks are left on the returned model: it predicts as a plain network.
    assert not any(m._forward_hooks for m in mixed.modules())


def test_mixstyle_is_a_probability():
    # Off by default, recorded only when on, one process only: tests/test_train_keys.py.
    with pytest.raises(ParamsError, match="mixstyle"):
        params(mixstyle=1.5).validate()
