"""The class-conditional source-adversarial head (train_<task>.adversary, cxr.adversary).

Checked by hand (each bug made in the code, this file went red, then the code was restored):
- the reversal's minus sign dropped (the features then help the head): test_reversal_is_*
  and test_the_reversal_takes_* (the head reads the marker);
- a class with a single source scored anyway: test_head_loss_*;
- the head's loss not added to the objective: test_adversary_trains_otherwise_*;
- the head left out of the resume file: the adversary case of
  tests/test_distributed.py::test_an_interrupted_run_resumes_to_bit_identical_weights.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.adversary import SourceAdversary, ramp, reverse_grad
from cxr.config import load_train_params
from cxr.data import adversary_targets, seed_everything
from cxr.models import build_model
from cxr.params import ParamsError
from cxr.train import train_model
from tests.conftest import quadrant_set, toy_params, write_params

params = toy_params


def test_reversal_is_the_identity_forward_and_the_scaled_negative_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = reverse_grad(x, 0.5)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_ramp_starts_at_zero_and_rises_to_the_weight():
    assert ramp(0.0, 0.3) == 0.0
    assert ramp(0.5, 0.3) == pytest.approx(0.3 * (2 / (1 + math.exp(-5)) - 1))
    assert 0.2999 < ramp(1.0, 0.3) <= 0.3
    steps = [ramp(p / 10, 1.0) for p in range(11)]
    assert steps == sorted(steps)


def test_head_loss_is_cross_entropy_over_the_sources_each_class_holds():
    # Class 0 has sources 0 and 1, class 1 only source 2: it is not scored.
    head = SourceAdversary(4, conditions=np.array([0, 0, 1, 1]), sources=np.array([0, 1, 2, 2]))
    features = torch.randn(4, 4)
    loss, n, right = head.loss(features, torch.arange(4), scale=1.0)
    assert int(n) == 2
    logits = head.net(features).view(4, 2, 3)
    class0 = logits[:2, 0, :2]  # class 0's logits for its own two sources
    expected = torch.nn.functional.cross_entropy(class0, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, expected)
    assert int(right) == int((class0.argmax(1) == torch.tensor([0, 1])).sum())
    # A batch of the single-source class alone: nothing to learn, a zero loss.
    loss, n, _ = head.loss(features[2:], torch.tensor([2, 3]), scale=1.0)
    assert int(n) == 0 and loss.item() == 0.0


def test_adversary_targets_condition_on_the_strata_and_code_the_source():
    table = pd.DataFrame({"label": ["covid", "normal", "pneumonia", "normal", "normal"],
                          "age_group": ["adult", "adult", "adult", "adult", "pediatric"],
                          "dataset": ["a", "b", "b", None, "c"]})  # fmt: skip
    classes, sources = adversary_targets(table, "four_class", "dataset", ["class"])
    assert classes[1] == classes[3] == classes[4] != classes[2]  # pneumonia: a class of its own
    assert list(sources) == [0, 1, 1, 3, 2]  # an empty source is one of its own ("unknown")
    strata, _ = adversary_targets(table, "binary", "dataset", ["label", "age_group"])
    assert strata[1] == strata[3] != strata[4]  # adult and pediatric normals apart
    assert len({strata[0], strata[1], strata[2]}) == 3  # binary classes split by finding


def run(p, images, labels, sources):
    torch.set_num_threads(1)
    gen = seed_everything(0, p.deterministic)
    model = build_model(p.arch, 4)
    result = train_model(model, p, train_images=images, train_labels=labels,
                         val_images=images[:8], val_labels=labels[:8], generator=gen,
                         train_sources=(labels, sources))  # fmt: skip
    return model, result


def test_adversary_trains_otherwise_and_stays_out_of_the_checkpoint():
    images, labels = quadrant_set(32)
    sources = np.arange(32) // 4 % 2  # two sources within every class (labels cycle 0-3)
    plain, plain_result = run(params(), images, labels, sources)
    adv, adv_result = run(params(adversary=1.0), images, labels, sources)
    assert plain.state_dict().keys() == adv.state_dict().keys()  # the head is not saved
    assert any(not torch.equal(plain.state_dict()[k], v) for k, v in adv.state_dict().items())
    accuracy = adv_result.summary()["adversary_source_accuracy"]
    assert len(accuracy) == 2 and all(a is not None and 0.0 <= a <= 1.0 for a in accuracy)
    assert "adversary_source_accuracy" not in plain_result.summary()


def test_adversary_needs_sources_one_process_and_a_sane_weight():
    images, labels = quadrant_set(16)
    with pytest.raises(ValueError, match="needs every training row's source"):
        train_model(build_model("resnet18", 4), params(adversary=1.0, epochs=1),
                    train_images=images, train_labels=labels, val_images=images[:8],
                    val_labels=labels[:8], generator=seed_everything(0))  # fmt: skip
    with pytest.raises(ParamsError, match="head runs in one process"):
        params(adversary=1.0, processes=2).validate()
    with pytest.raises(ParamsError, match="adversary"):
        params(adversary=-1.0).validate()


@pytest.mark.parametrize(
    "key, value",
    [
        ("adversary_by", "hospital"),
        ("adversary_within", ["class", "dataset"]),
        ("adversary_within", []),
    ],
)
def test_a_source_or_stratum_the_head_cannot_use_is_named(tmp_path, key, value):
    path = write_params(tmp_path / "params.yaml", train_four_class={key: value})
    with pytest.raises(ParamsError, match=key):
        load_train_params(path, "train_four_class")


def test_the_reversal_takes_a_source_marker_out_of_the_features():
    # Half of each class carries a bright corner, its source's mark. With a reversal too weak
    # to matter the head learns to read it; at weight 1 the features stop carrying it.
    images, labels = quadrant_set(64)
    sources = np.arange(64) // 4 % 2
    images[sources == 1, :4, :4] = 255
    p = dict(epochs=6, schedule="onecycle")
    _, free = run(params(adversary=1e-6, **p), images, labels, sources)
    _, reversed_ = run(params(adversary=1.0, **p), images, labels, sources)
    assert free.adversary_accuracy[-1] > 0.8
    assert reversed_.adversary_accuracy[-1] < 0.6
