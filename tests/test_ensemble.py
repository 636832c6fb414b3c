"""Tests for cxr.ensemble: a model that is a list of checkpoints (+ test-time-augmentation views),
used the same way by predict, validate, evaluate and gradcam."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import api, cam, ensemble, loading, ood
from cxr.data import to_input
from cxr.ensemble import Ensemble, load_model, write_manifest
from cxr.infer import predict_proba
from cxr.models import CheckpointError, CXRNet
from tests.test_predict import FOUR, PREP, THREADS, make_checkpoint, radiograph, run, save

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("members")
    return {task: [make_checkpoint(d / f"{task}_{seed}.pt", task, seed=seed) for seed in (3, 4)]
            for task in ("binary", "four_class")}  # fmt: skip


def images(n: int = 6) -> np.ndarray:
    return np.stack([radiograph(32, seed=k) for k in range(n)])


def mean_of(paths: list[Path], x: np.ndarray, views: list = (lambda t: t,)) -> np.ndarray:
    """What an ensemble must give: the members' softmax, averaged over members and views."""
    probs = []
    for path in paths:
        model, _ = ensemble.load_checkpoint(path)
        for view in views:
            with torch.no_grad():
                probs.append(torch.softmax(model(view(to_input(x))), dim=1).numpy())
    return np.mean(probs, axis=0)


def test_an_ensemble_is_the_mean_of_its_members(tmp_path: Path, members: dict) -> None:
    manifest = tmp_path / "binary.json"
    write_manifest(manifest, members["binary"], [])
    model, meta = load_model(manifest, "binary")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert meta["class_names"] == ["non_covid", "covid"] and len(meta["ensemble"]["members"]) == 2
    x = images()
    got = predict_proba(model, x)
    np.testing.assert_allclose(got, mean_of(members["binary"], x), atol=1e-6)
    single = predict_proba(load_model(members["binary"][0], "binary")[0], x)
    assert not np.allclose(got, single, atol=1e-4)  # the second member counts


def test_test_time_views_are_averaged_too(tmp_path: Path, members: dict) -> None:
    manifest = tmp_path / "tta.json"
    write_manifest(manifest, members["four_class"][:1], ["gamma_0.8", "zoom_0.9"])
    model, meta = load_model(manifest, "four_class")
    assert model.view_names == ["identity", "gamma_0.8", "zoom_0.9"]
    views = [ensemble.view_fn(v) for v in model.view_names]
    x = images()
    np.testing.assert_allclose(predict_proba(model, x), mean_of(members["four_class"][:1], x, views),
                               atol=1e-6)  # fmt: skip
    zoomed = views[2](to_input(x))
    assert zoomed.shape == to_input(x).shape and not torch.equal(zoomed, to_input(x))


def test_the_flip_view_mirrors_the_film_left_to_right(tmp_path: Path, members: dict) -> None:
    x = to_input(images())
    flipped = ensemble.view_fn("hflip")(x)
    assert torch.equal(flipped[..., :, 0], x[..., :, -1]) and torch.equal(flipped.flip(-1), x)
    manifest = tmp_path / "flip.json"
    write_manifest(manifest, members["binary"][:1], ["hflip"])
    model, _ = load_model(manifest, "binary")
    assert model.view_names == ["identity", "hflip"]
    plain = load_model(members["binary"][0], "binary")[0]
    with torch.no_grad():
        both = (plain(x).softmax(1) + plain(x.flip(-1)).softmax(1)) / 2
    np.testing.assert_allclose(predict_proba(model, images()), both.numpy(), atol=1e-6)


def test_one_member_without_views_is_exactly_that_checkpoint(tmp_path: Path, members: dict) -> None:
    manifest = tmp_path / "one.json"
    write_manifest(manifest, members["binary"][:1], [])
    model, _ = load_model(manifest, "binary")
    assert isinstance(model, CXRNet)
    x = images()
    plain = predict_proba(load_model(members["binary"][0])[0], x)
    assert np.array_equal(predict_proba(model, x), plain)


def test_manifest_paths_are_relative_and_travel_with_the_folder(
    tmp_path: Path, members: dict
) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    copies = [Path(shutil.copy(p, folder)) for p in members["binary"]]
    write_manifest(folder / "ens.json", copies, [])
    assert [m["path"] for m in json.loads((folder / "ens.json").read_text())["members"]] == [
        p.name for p in copies
    ]
    moved = tmp_path / "b"
    shutil.move(folder, moved)
    assert isinstance(load_model(moved / "ens.json")[0], Ensemble)


def test_bad_ensembles_are_refused_with_the_reason(tmp_path: Path, members: dict) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    copies = [Path(shutil.copy(p, folder)) for p in members["binary"]]
    manifest = folder / "ens.json"
    write_manifest(manifest, copies, [])
    with pytest.raises(CheckpointError, match="a 'binary' checkpoint, expected 'four_class'"):
        load_model(manifest, "four_class")
    make_checkpoint(copies[1], "binary", seed=9)  # retrained after the manifest was written
    with pytest.raises(CheckpointError, match="has changed since the manifest"):
        load_model(manifest)
    copies[1].unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_model(manifest)
    other = make_checkpoint(folder / "big.pt", "binary", prep=PREP | {"image_size": 64})
    with pytest.raises(CheckpointError, match="disagree on image_size"):
        write_manifest(folder / "mixed.json", [copies[0], other], [])
    with pytest.raises(ValueError, match="unknown TTA view 'flip'"):
        write_manifest(folder / "v.json", copies[:1], ["flip"])
    with pytest.raises(ValueError, match="unknown TTA view 'gamma_3'"):
        ensemble.parse_view("gamma_3")
    (folder / "junk.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not an ensemble manifest"):
        load_model(folder / "junk.json")


def test_predict_takes_a_manifest_wherever_a_checkpoint_goes(
    tmp_path: Path, members: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    four, binary = tmp_path / "four.json", tmp_path / "binary.json"
    write_manifest(four, members["four_class"], ["gamma_1.25"])
    write_manifest(binary, members["binary"], [])
    x = radiograph(32, seed=11)
    image = save(Image.fromarray(x), tmp_path / "x.png")
    out = tmp_path / "p.json"
    argv = [str(a) for a in (image, "--models", tmp_path, "--four-class", four, "--binary", binary,
                             "--threshold", 0.5, "--segmenter", tmp_path / "none.pt", *THREADS,
                             "--out", out)]  # fmt: skip
    code, _, err = run(capsys, argv)
    assert code == 0, err
    record = json.loads(out.read_text())[0]
    from cxr.images import Preprocessing, preprocess

    batch = np.stack([preprocess(Image.open(image), Preprocessing(**PREP))])
    views = [lambda t: t, ensemble.view_fn("gamma_1.25")]
    np.testing.assert_allclose([record[f"p_{c}"] for c in FOUR],
                               mean_of(members["four_class"], batch, views)[0], atol=1e-5)  # fmt: skip
    assert record["binary_p_covid"] == pytest.approx(
        mean_of(members["binary"], batch)[0, 1], abs=1e-5
    )


def test_the_gate_reads_the_first_members_features(tmp_path: Path, members: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    write_manifest(tmp_path / "b.json", members["binary"], ["gamma_0.8"])
    binary, _ = load_model(tmp_path / "b.json", "binary")
    four, _ = load_model(members["four_class"][0], "four_class")
    seen = {}

    def gate_batch(state: object, features: np.ndarray, masks: object) -> list[list[str]]:
        seen["features"] = features
        return [[] for _ in range(len(features))]

    monkeypatch.setattr(ood, "gate_batch", gate_batch)
    models = loading.Models(four, binary, FOUR, 1, loading.checkpoint_spec({"preprocessing": PREP}, tmp_path),
                            ood=object())  # fmt: skip
    x = images(3)
    covid, reasons = api.covid_and_gate(models, api.Prepared(x, [[] for _ in x], None), 2)
    np.testing.assert_allclose(covid, predict_proba(binary, x)[:, 1], atol=1e-5)
    first = ood.penultimate_features(binary.members[0], x)
    np.testing.assert_allclose(seen["features"], first, atol=1e-4)  # batch sizes differ
    assert not np.allclose(
        seen["features"], ood.penultimate_features(binary.members[1], x), atol=1e-2
    )
    assert seen["features"].shape == (3, binary.members[0].backbone.fc.in_features)
    assert reasons == [[], [], []]


def test_grad_cam_of_an_ensemble_is_the_mean_of_its_members_maps(
    tmp_path: Path, members: dict
) -> None:
    write_manifest(tmp_path / "f.json", members["four_class"], ["gamma_0.8"])
    model, _ = load_model(tmp_path / "f.json", "four_class")
    x = np.stack([radiograph(64, seed=k) for k in range(3)])  # layer3 of 64 px: 4 x 4 maps
    run = {"method": "gradcam", "batch_size": 2, "layer": "layer3"}
    maps = cam.compute_cams(model, x, [0, 1, 2], **run)
    each = [cam.compute_cams(m, x, [0, 1, 2], **run) for m in model.members]
    np.testing.assert_allclose(maps, np.mean(each, axis=0), atol=1e-6)
    assert maps.shape == x.shape and maps.max() > 0 and not np.allclose(each[0], each[1])


def test_the_command_writes_a_manifest_and_refuses_bad_input(
    tmp_path: Path, members: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ens.json"
    ensemble.main([str(out), *map(str, members["binary"]), "--tta", "gamma_0.8"])
    assert (
        "binary ensemble of 2 checkpoint(s), views identity, gamma_0.8" in capsys.readouterr().out
    )
    assert json.loads(out.read_text())["tta"] == ["gamma_0.8"]
    for argv, message in (([str(tmp_path / "e.pt"), str(members["binary"][0])], "must end in .json"),
                          ([str(out), str(tmp_path / "nothere.pt")], "nothere.pt"),
                          ([str(out), str(members["binary"][0]), "--tta", "zoom_2"], "unknown TTA view")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            ensemble.main(argv)
        assert info.value.code != 0
        assert message in capsys.readouterr().err
