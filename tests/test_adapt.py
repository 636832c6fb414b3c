"""BatchNorm statistics re-estimated on a site's films (cxr.adapt, AdaBN).

Checked by hand (each bug made in the code, this file or test_oos went red, then restored):
- the model adapted in place instead of a copy: test_the_statistics_*;
- the statistics left at the training films' (update_bn skipped): test_the_statistics_*;
- every scored film adapted to, internal validation included: tests/test_oos.py::
  test_saved_models_are_scored_on_a_folds_films_like_a_trained_fold.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cxr.adapt import adapt_batchnorm
from cxr.data import to_input
from cxr.models import build_model


def test_the_statistics_are_the_films_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():  # statistics as if trained on other films
        model.backbone.bn1.running_mean.fill_(0.5)
    before = copy.deepcopy(model.state_dict())
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32), dtype=np.uint8)
    adapted = adapt_batchnorm(model, images, batch_size=8)
    # bn1 sees conv1 of the normalised films: its mean is the mean of the three batches' means
    with torch.no_grad():
        x = (to_input(images) - model.mean) / model.std
        features = model.backbone.conv1(x)
    want = torch.stack([features[i : i + 8].mean((0, 2, 3)) for i in (0, 8, 16)]).mean(0)
    torch.testing.assert_close(adapted.backbone.bn1.running_mean, want, atol=1e-5, rtol=1e-4)
    assert not adapted.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="at least one film"):
        adapt_batchnorm(model, images[:0])
