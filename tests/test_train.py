"""Models, checkpoints, augmentation, balancing and the training loop on tiny inputs."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from cxr.config import AugmentParams, TrainParams
from cxr.data import augment_batch, epoch_order, sample_weights, seed_everything, to_input
from cxr.infer import predict_proba
from cxr.models import CheckpointError, build_model, load_checkpoint, save_checkpoint
from cxr.params import ParamsError, from_section
from cxr.train import train_model
from tests.conftest import quadrant_set, repo_params, write_params


def tiny_params(**kw) -> TrainParams:
    base = dict(arch="resnet18", epochs=2, batch_size=8, lr=3.0e-3)
    return repo_params("train_four_class", **(base | kw))


def section_values(name: str, **changes) -> dict:
    """Section `name` of the repository's params.yaml as a plain dict, with `changes`."""
    return dataclasses.asdict(repo_params(name)) | changes


def augment(**changes) -> AugmentParams:
    """The repository's augmentation (train_four_class.augment) with `changes`."""
    return dataclasses.replace(repo_params("train_four_class").augmentation(), **changes)


separable_set = quadrant_set  # the shared toy set (tests/conftest.py)


def test_model_contract_one_channel_in_n_classes_out():
    model = build_model("resnet18", 4).eval()
    assert model.backbone.conv1.in_channels == 1
    out = model(to_input(np.zeros((2, 48, 48), dtype=np.uint8)))
    assert out.shape == (2, 4)


def test_unknown_arch_and_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="unknown arch 'vgg16'"):
        build_model("vgg16", 4)
    with pytest.raises(CheckpointError, match="file not found"):
        build_model("resnet18", 4, weights=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        build_model("resnet18", 4, weights=str(junk))
    wrong = tmp_path / "resnet34.pt"
    torch.save(build_model("resnet34", 4).backbone.state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit a resnet18"):
        build_model("resnet18", 4, weights=str(wrong))
    with pytest.raises(ParamsError, match="unknown arch"):
        tiny_params(arch="resnet9").validate()


def test_weights_from_a_state_dict_file_are_used(tmp_path):
    source = build_model("resnet18", 4, zero_init_residual=False)
    path = tmp_path / "weights.pt"
    torch.save(source.backbone.state_dict(), path)
    model = build_model("resnet18", 2, weights=str(path))
    assert torch.equal(
        model.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight
    )
    assert model.backbone.fc.out_features == 2  # the head is new


def test_pickled_objects_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "cxr-checkpoint/1", "x": Evil()}, fh, protocol=2)  # torch.save's
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_params_reject_unknown_and_mistyped_keys():
    with pytest.raises(ParamsError, match=r"params.yaml: train_binary\.epoch unknown"):
        from_section(TrainParams, section_values("train_binary", epoch=3), "train_binary")
    with pytest.raises(ParamsError, match="write 1.0e-3"):
        from_section(TrainParams, section_values("train_binary", lr="1e-3"), "train_binary")
    with pytest.raises(ParamsError, match="balance must be one of"):
        from_section(TrainParams, section_values("train_binary", balance="smote"), "train_binary")
    p = from_section(TrainParams, section_values("train_binary", lr=1), "train_binary")
    assert p.lr == 1.0 and isinstance(p.lr, float)


def test_augmentation_is_batched_seeded_and_identity_when_off():
    x = to_input(np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8))
    off = augment(hflip=False, degrees=0.0, translate=0.0, scale=[1.0, 1.0])
    same = augment_batch(x, off, torch.Generator().manual_seed(0))
    assert torch.allclose(same, x, atol=1e-5)
    on = augment()
    a = augment_batch(x, on, torch.Generator().manual_seed(1))
    b = augment_batch(x, on, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)


def test_flip_only_mirrors_the_image():
    one = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 10
    x = to_input(np.repeat(one, 8, axis=0))
    flip = augment(hflip=True, degrees=0.0, translate=0.0, scale=[1.0, 1.0])
    out = augment_batch(x, flip, torch.Generator().manual_seed(0))
    same = [torch.allclose(o, x[0], atol=1e-5) for o in out]
    mirrored = [torch.allclose(o, x[0].flip(-1), atol=1e-5) for o in out]
    assert all(a or b for a, b in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def test_class_weights_and_oversampling_balance_classes():
    labels = np.array([0] * 30 + [1] * 10)
    w = sample_weights(labels)
    assert torch.allclose(w[[0, 39]], torch.tensor([40 / 60, 40 / 20]))
    order = epoch_order(labels, oversample=True, generator=torch.Generator().manual_seed(0))
    assert len(order) == 40
    drawn = labels[order.numpy()]
    assert 0.3 < drawn.mean() < 0.7  # ~50% of class 1 instead of 25%
    plain = epoch_order(labels, oversample=False, generator=torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(40))


def _train(p: TrainParams, images, labels, seed: int = 0):
    gen = seed_everything(seed)
    model = build_model(p.arch, len(p.class_names))
    result = train_model(
        model, p, train_images=images, train_labels=labels,
        val_images=images[:16], val_labels=labels[:16], generator=gen,
    )  # fmt: skip
    return model, result


def test_loss_falls_on_a_separable_set():
    torch.set_num_threads(2)
    images, labels = separable_set(64)
    p = tiny_params(
        epochs=4, augment={"hflip": False, "degrees": 0.0, "translate": 0.0, "scale": [1.0, 1.0]}
    )
    _, result = _train(p, images, labels)
    losses = [e.train_loss for e in result.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert result.best.val_accuracy >= 0.75


def test_checkpoint_round_trip_reproduces_predictions(tmp_path):
    images, labels = separable_set(32)
    p = tiny_params(epochs=1)
    model, result = _train(p, images, labels)
    meta = {"task": p.task, "arch": p.arch, "class_names": p.class_names, "image_size": 32,
            "params": dataclasses.asdict(p), "training": result.summary()}  # fmt: skip
    path = tmp_path / "four_class.pt"
    save_checkpoint(path, model, meta)
    blob = torch.load(path, weights_only=True)  # plain data only
    assert set(blob) == {"format", "state_dict", "meta"}
    loaded, loaded_meta = load_checkpoint(path, task="four_class")
    assert loaded_meta["class_names"] == ["covid", "viral", "bacterial", "normal"]
    assert loaded_meta["training"]["best_epoch"] == 1
    np.testing.assert_allclose(
        predict_proba(loaded, images), predict_proba(model, images), atol=1e-6
    )
    with pytest.raises(CheckpointError, match="expected 'binary'"):
        load_checkpoint(path, task="binary")


def test_a_network_smaller_than_its_arrays_resizes_them_itself_after_a_round_trip(tmp_path):
    """train_<task>.input_size below base.image_size: the checkpoint says so and the loaded
    model resizes whatever arrays it is fed, so callers (evaluate, gradcam, predict) need not.
    Watched red with load_checkpoint not passing input_size on (the model ran at 32 px)."""
    from cxr.arrays import save_split
    from stages import train as stage

    rng = np.random.default_rng(1)
    table = pd.DataFrame({"label": ["covid", "normal"] * 8,
                          "group_id": [f"g{i}" for i in range(16)]})  # fmt: skip
    for name in ("train", "val"):
        images = rng.integers(0, 255, (16, 32, 32), dtype=np.uint8)
        save_split(tmp_path / "split", name, images, table)
    write_params(tmp_path / "params.yaml", base={"seed": 3, "image_size": 32},
                 train_binary={"arch": "resnet18", "epochs": 1, "batch_size": 8, "threads": 1,
                               "balance_by": ["class"], "input_size": 24})  # fmt: skip
    stage.main(["--section", "train_binary", "--params", str(tmp_path / "params.yaml"),
                "--data", str(tmp_path / "split"), "--model", str(tmp_path / "binary.pt"),
                "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "live")])  # fmt: skip
    model, meta = load_checkpoint(tmp_path / "binary.pt", task="binary")
    assert (meta["image_size"], meta["input_size"], meta["params"]["input_size"]) == (32, 24, 24)
    arrays = rng.integers(0, 255, (6, 32, 32), dtype=np.uint8)
    # the same weights fed arrays resized by hand give the same answer: the model resized them
    plain = build_model("resnet18", 2)
    plain.load_state_dict(model.state_dict())
    by_hand = torch.nn.functional.interpolate(to_input(arrays), size=(24, 24), mode="bilinear",
                                              antialias=True, align_corners=False)  # fmt: skip
    with torch.no_grad():
        expected = torch.softmax(plain.eval()(by_hand), dim=1).numpy()
        unresized = torch.softmax(plain(to_input(arrays)), dim=1).numpy()
    np.testing.assert_allclose(predict_proba(model, arrays), expected, atol=1e-5)
    assert not np.allclose(expected, unresized, atol=1e-3)  # the size makes a difference


def test_an_input_size_above_the_arrays_or_out_of_range_is_refused(tmp_path):
    from cxr.config import load_base, load_train_params, network_input

    params = write_params(tmp_path / "params.yaml", base={"image_size": 64},
                          train_four_class={"input_size": 96})  # fmt: skip
    with pytest.raises(ParamsError, match="input_size 96 is larger than base.image_size 64"):
        network_input(load_base(params), load_train_params(params, "train_four_class"))
    assert network_input(load_base(params), load_train_params(params, "train_binary")) == 64
    write_params(params, train_binary={"input_size": 8})
    with pytest.raises(ParamsError, match="train_binary.input_size must be null"):
        load_train_params(params, "train_binary")


def test_imagenet_weights_offline_is_a_clear_error_not_a_fallback(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="need a network"):
        build_model("resnet18", 4, weights="imagenet")


def test_checkpoint_metadata_is_complete_after_the_training_stage(tmp_path):
    """The training stage's checkpoint carries the whole model contract."""
    from cxr.arrays import save_split
    from stages import train as stage

    rng = np.random.default_rng(0)
    labels = ["covid", "viral", "bacterial", "normal"] * 4
    table = pd.DataFrame({"label": labels, "group_id": [f"g{i}" for i in range(16)]})
    for name in ("train", "val"):
        save_split(
            tmp_path / "split", name, rng.integers(0, 255, (16, 32, 32), dtype=np.uint8), table
        )
    write_params(
        tmp_path / "params.yaml",
        base={"seed": 3, "image_size": 32},
        train_binary={"arch": "resnet18", "epochs": 1, "batch_size": 8, "threads": 1,
                      "balance_by": ["class"]},  # the table has no age_group column
    )  # fmt: skip
    stage.main(["--section", "train_binary", "--params", str(tmp_path / "params.yaml"),
                "--data", str(tmp_path / "split"), "--model", str(tmp_path / "binary.pt"),
                "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "live")])  # fmt: skip
    _, meta = load_checkpoint(tmp_path / "binary.pt", task="binary")
    assert meta["class_names"] == ["non_covid", "covid"]
    assert meta["arch"] == "resnet18" and meta["image_size"] == 32 and meta["seed"] == 3
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["harmonise"] is True
    assert meta["normalisation"]["mean"] == pytest.approx(0.449)
    assert meta["params"]["epochs"] == 1 and meta["params"]["balance"] == "oversample"
    assert meta["training"]["best_epoch"] == 1 and "macro_f1" in meta["training"]["val"]
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["wall_seconds"] > 0 and summary["train_images_per_second"] > 0
    # the same training again writes the same checkpoint bytes: run times are metrics only
    # (watched red while the checkpoint's metadata carried wall_seconds)
    stage.main(["--section", "train_binary", "--params", str(tmp_path / "params.yaml"),
                "--data", str(tmp_path / "split"), "--model", str(tmp_path / "again" / "binary.pt"),
                "--metrics", str(tmp_path / "m2.json"), "--plots", str(tmp_path / "live2")])  # fmt: skip
    again = (tmp_path / "again" / "binary.pt").read_bytes()  # same name: torch.save records it
    assert again == (tmp_path / "binary.pt").read_bytes()
    assert "wall_seconds" not in meta["training"]
    assert (tmp_path / "live" / "plots" / "metrics" / "val" / "macro_f1.tsv").exists()
