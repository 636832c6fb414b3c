"""The training loop's contracts, each written to fail for a specific plausible bug.

Checked by hand (each bug made in the code, this file went red, then the code was restored):
- deleting `model.load_state_dict(best_state)` in cxr.train.train_model (the last epoch is
  kept): test_best_epoch_weights_are_restored fails;
- drawing one angle/scale/shift for the whole batch in cxr.data.augment_batch:
  test_every_image_gets_its_own_augmentation fails;
- `patience` ignored: test_patience_stops_early fails; `select_metric: loss` treated as
  macro_f1: test_select_metric_loss_picks_the_lowest_validation_loss fails;
- weights not passed to the loss under `weighted_loss`: test_weighted_loss_* fails;
- one parameter group with weight decay: test_no_weight_decay_on_norms_and_biases fails;
- group DRO's weights not updated, or the plain mean loss used under `group_dro`:
  test_group_dro_* fail.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from cxr import train as train_module
from cxr.config import TrainParams
from cxr.data import augment_batch, seed_everything, to_input
from cxr.models import build_model
from cxr.params import ParamsError
from cxr.train import GroupDRO, make_optimizer, make_scheduler, param_groups, train_model
from tests.conftest import (
    NO_AUG,
    PHOTOMETRIC_OFF,
    augment_params,
    quadrant_set,
    toy_params,
    write_params,
)


def params(**kw) -> TrainParams:
    return toy_params(**({"epochs": 3} | kw))


def run(p: TrainParams, images, labels, val_images, val_labels, seed=0, snapshots=None):
    torch.set_num_threads(1)
    gen = seed_everything(seed, p.deterministic)
    model = build_model(p.arch, len(p.class_names))

    def on_epoch(res):
        if snapshots is not None:
            snapshots[res.epoch] = copy.deepcopy(model.state_dict())

    result = train_model(model, p, train_images=images, train_labels=labels,
                         val_images=val_images, val_labels=val_labels, generator=gen,
                         on_epoch=on_epoch)  # fmt: skip
    return model, result


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_best_epoch_weights_are_restored():
    """Validation labels are a permutation of the true ones, so learning the training set makes
    validation worse: the best epoch is early and the final weights must be that epoch's."""
    images, labels = quadrant_set(48)
    wrong = (labels + 1) % 4
    snaps: dict[int, dict] = {}
    p = params(epochs=4, select_metric="loss")
    model, result = run(p, images, labels, images[:24], wrong[:24], snapshots=snaps)
    assert result.best_epoch < 4, "the scenario must make an early epoch best"
    final = model.state_dict()
    assert same_weights(final, snaps[result.best_epoch])
    assert not same_weights(final, snaps[4])


def test_select_metric_loss_picks_the_lowest_validation_loss():
    images, labels = quadrant_set(48)
    wrong = (labels + 1) % 4
    _, result = run(params(epochs=4, select_metric="loss"), images, labels, images[:24], wrong[:24])
    losses = [e.val_loss for e in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1


def test_select_metric_macro_f1_picks_the_highest_validation_f1():
    images, labels = quadrant_set(48)
    _, result = run(params(epochs=3), images, labels, images[:24], labels[:24])
    f1 = [e.val_macro_f1 for e in result.history]
    assert result.best.val_macro_f1 == max(f1)
    assert result.best_epoch == int(np.argmax(f1)) + 1  # first of ties


def test_patience_stops_early():
    """Validation gets worse every epoch (permuted labels): with patience 1 the loop stops after
    the first epoch that does not improve, with patience 0 it runs every epoch."""
    images, labels = quadrant_set(48)
    wrong = (labels + 1) % 4
    p = params(epochs=6, select_metric="loss", patience=1)
    _, stopped = run(p, images, labels, images[:24], wrong[:24])
    assert stopped.stopped_early and len(stopped.history) == stopped.best_epoch + 1
    _, full = run(params(epochs=6, select_metric="loss"), images, labels, images[:24], wrong[:24])
    assert not full.stopped_early and len(full.history) == 6


def test_every_image_gets_its_own_augmentation():
    """Eight copies of one image must come out as eight different images (one draw each)."""
    one = np.random.default_rng(0).integers(0, 255, (1, 32, 32), dtype=np.uint8)
    x = to_input(np.repeat(one, 8, axis=0))
    for aug in (augment_params(**NO_AUG | {"degrees": 15.0}),
                augment_params(**NO_AUG | {"translate": 0.1}),
                augment_params(**NO_AUG | {"scale": [0.8, 1.2]})):  # fmt: skip
        out = augment_batch(x, aug, torch.Generator().manual_seed(0))
        flat = out.reshape(8, -1)
        distinct = {tuple(torch.round(r * 1e4).int().tolist()) for r in flat}
        assert len(distinct) == 8, aug


def test_weighted_loss_passes_inverse_frequency_weights(monkeypatch):
    seen = []
    real = train_module.partial_label_loss

    def spy(logits, allowed, weight=None):
        seen.append(None if weight is None else weight.clone())
        return real(logits, allowed, weight)

    monkeypatch.setattr(train_module, "partial_label_loss", spy)
    images, labels = quadrant_set(40)
    labels = np.where(np.arange(40) < 30, 0, labels)  # class 0 common, others rare
    p = params(epochs=1, balance="weighted_loss", task="four_class")
    run(p, images, labels, images[:8], labels[:8])
    weights = [w for w in seen if w is not None]
    assert weights, "weighted_loss must pass per-image weights to the loss"
    w = torch.cat(weights)
    # class 0 holds 30 + (10 of the rest) ... its images must weigh less than the rare ones
    assert w.min() < 1.0 < w.max()
    seen.clear()
    run(params(epochs=1, balance="none"), images, labels, images[:8], labels[:8])
    assert all(w is None for w in seen)


def one_epoch_each(*balances: str) -> list[tuple]:
    """(model, result) after one epoch with each `balance`, on 40 images with class 0 common."""
    images, labels = quadrant_set(40)
    labels = np.where(np.arange(40) < 30, 0, labels)
    return [run(params(epochs=1, balance=b), images, labels, images[:8], labels[:8])
            for b in balances]  # fmt: skip


def test_weighted_loss_changes_training_versus_none():
    (a, _), (b, _) = one_epoch_each("weighted_loss", "none")
    assert not same_weights(a.state_dict(), b.state_dict())


def test_multistep_sgd_lowers_the_rate_at_each_milestone():
    model = build_model("resnet18", 4)
    p = params(optimizer="sgd", schedule="multistep", milestones=[1, 2], gamma=0.1, lr=0.5)
    opt = make_optimizer(model, p)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    sched = make_scheduler(opt, p, steps_per_epoch=3)
    rates = []
    for _ in range(9):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(rates, [0.5] * 3 + [0.05] * 3 + [0.005] * 3, rtol=1e-6)


def test_multistep_sgd_trains():
    images, labels = quadrant_set(48)
    p = params(epochs=4, optimizer="sgd", schedule="multistep", milestones=[3], lr=0.05)
    _, result = run(p, images, labels, images[:24], labels[:24])
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_no_weight_decay_on_norms_and_biases():
    model = build_model("resnet18", 4)
    decay, no_decay = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(".bn" in names[id(p)] or "bias" in names[id(p)] or "downsample.1" in names[id(p)]
               for p in no_decay["params"])  # fmt: skip
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = make_optimizer(model, params(weight_decay=1e-4))
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    # a BatchNorm scale with zero gradient is left alone by a step; a conv kernel decays
    bn, conv = model.backbone.bn1.weight, model.backbone.conv1.weight
    before_bn, before_conv = bn.detach().clone(), conv.detach().clone()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    assert torch.equal(bn.detach(), before_bn)
    assert not torch.equal(conv.detach(), before_conv)


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_training_is_bit_identical(threads):
    """Same inputs, seed and thread count: identical checkpoints (augmentation and oversampling
    on, so every random draw is covered)."""
    images, labels = quadrant_set(32)
    aug = dataclasses.asdict(augment_params())  # the repository's: every draw is covered
    p = params(epochs=2, deterministic=True, augment=aug, balance="oversample", threads=threads)

    def once():
        torch.set_num_threads(threads)
        gen = seed_everything(7, True)
        model = build_model(p.arch, 4)
        train_model(model, p, train_images=images, train_labels=labels,
                    val_images=images[:8], val_labels=labels[:8], generator=gen)  # fmt: skip
        return model.state_dict()

    assert same_weights(once(), once())


def test_training_stage_twice_gives_bit_identical_checkpoints(tmp_path):
    """The whole stage (loading, seeding, threads from params, oversampling, augmentation,
    training, best-epoch selection) run twice: identical weights."""
    import pandas as pd

    from cxr.arrays import save_split
    from cxr.models import load_checkpoint
    from stages import train as stage

    images, labels = quadrant_set(48)
    names = ["covid", "viral", "bacterial", "normal"]
    table = pd.DataFrame({"label": [names[k] for k in labels],
                          "group_id": [f"g{i}" for i in range(48)]})  # fmt: skip
    for name, rows in (("train", slice(0, 32)), ("val", slice(32, 48))):
        save_split(tmp_path / "split", name, images[rows], table[rows].reset_index(drop=True))
    write_params(tmp_path / "params.yaml", base={"seed": 5, "image_size": 32},
                 train_four_class={"arch": "resnet18", "epochs": 2, "batch_size": 8,
                                   "threads": 2, "deterministic": True})  # fmt: skip

    def once(tag: str) -> dict:
        stage.main(["--section", "train_four_class", "--params", str(tmp_path / "params.yaml"),
                    "--data", str(tmp_path / "split"), "--model", str(tmp_path / f"{tag}.pt"),
                    "--metrics", str(tmp_path / f"{tag}.json"),
                    "--plots", str(tmp_path / f"live-{tag}")])  # fmt: skip
        model, meta = load_checkpoint(tmp_path / f"{tag}.pt", task="four_class")
        assert meta["training"]["threads"] == 2
        return model.state_dict()

    assert same_weights(once("a"), once("b"))


def test_deterministic_sets_the_cublas_workspace_and_keeps_a_users_own(monkeypatch):
    """Made by hand: the os.environ.setdefault line deleted -> the first assertion fails."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=False)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        seed_everything(0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        seed_everything(0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before)


def test_photometric_augmentation_is_identity_when_off_and_reproducible_when_on():
    """Watched red with the contrast term dropped from apply_photometric (the 'on' draw no longer
    changed the mid-grey contrast), and with the cut-out box ignored."""
    import torch

    from cxr.data import apply_photometric, draw_photometric

    x = torch.linspace(0.05, 0.95, 16 * 16).view(1, 1, 16, 16).repeat(4, 1, 1, 1)
    off = draw_photometric(
        4, 16, augment_params(**PHOTOMETRIC_OFF), torch.Generator().manual_seed(0)
    )
    assert torch.allclose(apply_photometric(x, off), x, atol=1e-6)

    on = augment_params(gamma=0.4, contrast=0.3, brightness=0.1, sharpen=1.0, noise=0.02,
                        cutout=1.0)  # fmt: skip
    a = apply_photometric(x, draw_photometric(4, 16, on, torch.Generator().manual_seed(1)))
    b = apply_photometric(x, draw_photometric(4, 16, on, torch.Generator().manual_seed(1)))
    assert torch.equal(a, b)  # same seed, same draw
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.02  # it changed the images
    p = draw_photometric(4, 16, on, torch.Generator().manual_seed(1))
    p["gamma"][:] = 1.0
    p["contrast"][:] = 1.0
    p["brightness"][:] = 0.0
    p["sharpen"][:] = 0.0
    p["noise_sd"][:] = 0.0
    p["grey"][:] = 0.0
    out = apply_photometric(x, p)
    moved = (out - x).abs() > 1e-4  # the identity terms may round in the last bits
    changed = moved.flatten(1).float().mean(1)  # only the box differs: 5-20% of the side
    assert ((changed > 0) & (changed <= 0.1)).all()
    assert (out[moved] == 0).all()  # filled with the drawn grey


def test_contrast_draw_changes_contrast():
    import torch

    from cxr.data import apply_photometric, draw_photometric

    x = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2).expand(8, 1, 2, 2).contiguous()
    contrast = augment_params(**PHOTOMETRIC_OFF | {"contrast": 0.5})
    p = draw_photometric(8, 2, contrast, torch.Generator().manual_seed(0))
    out = apply_photometric(x, p)
    spread = out[:, 0, 0, 1] - out[:, 0, 0, 0]
    assert torch.allclose(spread, 0.5 * p["contrast"], atol=1e-5)


def test_group_dro_loss_weighs_groups_and_moves_towards_the_worst():
    dro = GroupDRO(torch.tensor([0, 0, 1, 1, 2]))  # five training rows in three groups
    nll = torch.tensor([1.0, 3.0, 2.0, 2.0])  # rows 0-3: groups 0 and 1 mean 2; group 2 absent
    loss = dro.loss(nll, torch.tensor([0, 1, 2, 3]))
    q = torch.exp(torch.tensor([0.02, 0.02, 0.0], dtype=torch.float64))
    q = q / q.sum()
    torch.testing.assert_close(dro.weights, q)
    assert loss.item() == pytest.approx(float(q[0] * 2 + q[1] * 2))
    for _ in range(200):  # group 1 keeps losing more: its weight grows, the others' shrink
        dro.loss(torch.tensor([0.1, 5.0]), torch.tensor([0, 2]))
    assert dro.weights[1] > 0.9 and dro.weights.sum().item() == pytest.approx(1.0)
    saved = GroupDRO(torch.tensor([0, 0, 1, 1, 2]), dro.weights.tolist())  # as a resume restores
    torch.testing.assert_close(saved.weights, dro.weights)


def test_group_dro_trains_otherwise_than_oversample_and_reports_its_weights():
    (a, ra), (b, rb) = one_epoch_each("group_dro", "oversample")
    assert not same_weights(a.state_dict(), b.state_dict())
    weights = ra.summary()["group_dro_weights"]
    assert len(weights) == 4 and sum(weights) == pytest.approx(1.0, abs=1e-3)
    assert len(set(weights)) > 1  # moved from uniform
    assert "group_dro_weights" not in rb.summary()  # other runs' metrics unchanged


def test_group_dro_needs_one_process():
    with pytest.raises(ParamsError, match="group_dro runs in one process"):
        params(balance="group_dro", processes=2, batch_size=8).validate()
