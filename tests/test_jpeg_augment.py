"""The JPEG round trip as augmentation (`train_*.augment.jpeg`, cxr.data.draw_jpeg/apply_jpeg).

Watched red:
- apply_jpeg saving every chosen film at one fixed quality: test_each_chosen_film_*;
- train_epoch drawing the qualities but training on the stored films: test_train_epoch_*;
- recorded_params keeping `augment.jpeg` when off: test_jpeg_is_recorded_only_when_on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr.config import as_recipe, recorded_params
from cxr.data import (
    JPEG_QUALITY,
    apply_affine,
    apply_jpeg,
    draw_affine,
    draw_jpeg,
    partial_label_loss,
    to_input,
)
from cxr.images import jpeg_round_trip
from cxr.params import ParamsError
from cxr.train import train_epoch
from tests.conftest import (
    NO_AUG,
    augment_params,
    one_batch_of_quadrants,
    repo_params,
    toy_params,
)


def films(n: int = 6, size: int = 32) -> torch.Tensor:
    """Smooth gradients with a bright disc: JPEG changes them, but not beyond recognition."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = (xx * 4 + yy * 2) % 256
    disc = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 4) ** 2) * 60
    return torch.from_numpy(
        np.stack([(base + disc + 9 * i) % 256 for i in range(n)]).astype(np.uint8)
    )


def test_the_draw_is_a_share_of_films_at_qualities_in_range_and_repeats():
    half = augment_params(jpeg=0.5)
    q = draw_jpeg(2000, half, torch.Generator().manual_seed(0))
    chosen = q[q > 0]
    assert 0.45 < len(chosen) / len(q) < 0.55
    assert chosen.min() >= JPEG_QUALITY[0] and chosen.max() <= JPEG_QUALITY[1]
    assert len(chosen.unique()) > 50  # qualities spread over the range, not one value
    assert torch.equal(q, draw_jpeg(2000, half, torch.Generator().manual_seed(0)))
    assert (draw_jpeg(50, augment_params(jpeg=1.0), torch.Generator()) > 0).all()


def test_each_chosen_film_is_saved_at_its_quality_and_the_rest_kept():
    batch = films()
    before = batch.clone()
    quality = torch.tensor([0, 20, 95, 0, 50, 30])
    out = apply_jpeg(batch, quality)
    assert torch.equal(batch, before)  # the caller's batch is not written to
    for i, q in enumerate(quality.tolist()):
        if q == 0:
            assert torch.equal(out[i], batch[i])
        else:
            expected = jpeg_round_trip(batch[i].numpy(), q)
            np.testing.assert_array_equal(out[i].numpy(), expected)
            assert not torch.equal(out[i], batch[i])
    # Harder compression moves a film further from what was stored.
    err = (out.float() - batch.float()).abs().mean(dim=(1, 2))
    assert err[1] > err[4] > err[2]
    assert apply_jpeg(batch, torch.zeros(6, dtype=torch.long)) is batch  # nothing chosen


def test_train_epoch_takes_its_step_on_the_round_tripped_films():
    """The loss train_epoch reports for one batch is that of the films after their round trip,
    qualities drawn from the training generator after the affine draw."""
    images, allowed, model, twin = one_batch_of_quadrants()
    aug = augment_params(**(NO_AUG | {"jpeg": 1.0}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    total, _, count = train_epoch(model, torch.arange(8).view(1, 8), images, allowed,
                                  weights=None, optimizer=optimizer, scheduler=None, aug=aug,
                                  generator=torch.Generator().manual_seed(3))  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    theta = draw_affine(8, aug, gen)
    quality = draw_jpeg(8, aug, gen)
    stored = torch.from_numpy(images)
    twin.train()
    with torch.no_grad():
        seen = apply_affine(to_input(apply_jpeg(stored, quality)), theta)
        expected = partial_label_loss(twin(seen).float(), allowed, None)
        plain = partial_label_loss(twin(apply_affine(to_input(stored), theta)).float(), allowed,
                                   None)  # fmt: skip
    assert total / count == pytest.approx(float(expected), rel=1e-4)
    assert float(plain) != pytest.approx(float(expected), rel=1e-4)  # the test tells them apart


def test_jpeg_is_recorded_only_when_on():
    params = toy_params(augment=NO_AUG)
    assert "jpeg" not in recorded_params(params)["augment"]
    assert "jpeg" in params.augment  # the run's own params keep it
    on = toy_params(augment=NO_AUG | {"jpeg": 0.5})
    assert recorded_params(on)["augment"]["jpeg"] == 0.5
    # A recipe recorded before the key existed reads as today's default: off.
    old = {"augment": {k: v for k, v in NO_AUG.items() if k != "jpeg"}}
    assert as_recipe("train_binary", old)["augment"] == NO_AUG
    assert "jpeg" not in old["augment"]  # the record itself untouched
    assert repo_params("train_binary").augmentation().jpeg == 0  # the default: off
    assert repo_params("train_four_class").augmentation().jpeg == 0


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_jpeg_outside_its_range_is_named(value):
    with pytest.raises(ParamsError, match="augment.jpeg"):
        toy_params(augment=NO_AUG | {"jpeg": value}).validate()
