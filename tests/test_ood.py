"""The out-of-distribution gate (cxr/ood.py), its probes (cxr/ood_probes.py), the ood stage and
`python -m cxr ood-report`, on hand-made masks, known Gaussians and tiny random checkpoints.

Each behaviour was broken by hand once to see its test fail, then restored (named per test).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr import lung_shape, ood, ood_probes
from cxr.arrays import save_split
from cxr.images import Preprocessing
from cxr.models import CheckpointError, build_model, save_checkpoint
from cxr.params import ParamsError
from cxr.segmenter import UNet, save_segmenter
from tests.conftest import PARAMS, write_params

pytestmark = pytest.mark.usefixtures("one_thread")
P = ood.load_ood_params(PARAMS)  # the repository's limits: the ones predict will apply


# --- hand-made masks --------------------------------------------------------------------------


def teardrop(size: int, centre: float, top: float = 0.2, bottom: float = 0.8) -> np.ndarray:
    """One upright lung: a narrow apex widening to a broad base (as on a frontal film)."""
    mask = np.zeros((size, size), dtype=bool)
    rows = range(int(top * size), int(bottom * size))
    for k, r in enumerate(rows):
        half = (0.02 + 0.11 * k / len(rows)) * size
        mask[r, int(centre * size - half) : int(centre * size + half) + 1] = True
    return mask


def two_lungs(size: int = 64) -> np.ndarray:
    return teardrop(size, 0.3) | teardrop(size, 0.7)


def test_two_upright_lungs_pass() -> None:
    """Watched red with the sides test reversed (right lung left of the midline)."""
    assert lung_shape.lung_reasons(two_lungs(), P) == []
    assert lung_shape.lung_reasons(two_lungs(112), P) == []


def test_one_blob_one_side_and_rotations_are_flagged() -> None:
    """Watched red: without the `len(found) < 2` test one blob raised (no second lung), and
    without the taper rule the upside-down pair passed."""
    size = 64
    blob = np.zeros((size, size), dtype=bool)
    blob[15:50, 20:44] = True
    one_side = teardrop(size, 0.3)
    both_left = teardrop(size, 0.15) | teardrop(size, 0.4)
    for mask in (blob, one_side, both_left, np.zeros((size, size), dtype=bool)):
        assert lung_shape.lung_reasons(mask, P) == [
            "lungs not found on both sides of the midline (rotated, lateral or cropped?)"
        ]
    rotated = lung_shape.lung_reasons(np.rot90(two_lungs(size)), P)
    assert rotated and rotated[0].startswith("lungs not found on both sides"), rotated
    # Rotated by 90 degrees about a point that keeps one lung on each side: wide, tilted lungs.
    turned = np.rot90(two_lungs(size))
    turned = np.roll(turned, size // 2 - int(np.flatnonzero(turned.any(0)).mean()), axis=1)
    kinds = {ood.reason_kind(r) for r in lung_shape.lung_reasons(turned, P)}
    assert "lungs not upright" in kinds or "lungs not found on both sides of the midline" in kinds
    upside = lung_shape.lung_reasons(two_lungs(size)[::-1], P)
    assert [ood.reason_kind(r) for r in upside] == ["lung apices not at the top"], upside


def test_each_lung_rule_names_its_numbers() -> None:
    """Watched red with the tilt taken as the row offset alone (not over the column distance)."""
    size = 64
    small = teardrop(size, 0.3, 0.45, 0.6) | teardrop(size, 0.7, 0.45, 0.6)
    (reason,) = [r for r in lung_shape.lung_reasons(small, P) if "size" in r]
    assert reason.startswith("lungs of implausible size (") and "% and " in reason
    # rows 0.25 apart over columns 0.4 apart: tilt 0.6 (the row offset alone, 0.25, would pass)
    tilted = teardrop(size, 0.3, 0.1, 0.55) | teardrop(size, 0.7, 0.35, 0.8)
    assert any(
        r.startswith("lungs not at one level (tilt ") for r in lung_shape.lung_reasons(tilted, P)
    )
    shifted = teardrop(size, 0.45) | teardrop(size, 0.85)  # midpoint 0.15 off the centre
    strict = dataclasses.replace(P, max_offset=0.1)
    assert any(r.startswith("lungs off the image's centre (15% of its width > 10%")
               for r in lung_shape.lung_reasons(shifted, strict))  # fmt: skip
    thin = teardrop(size, 0.3, 0.0, 1.0) | teardrop(size, 0.7, 0.0, 1.0)
    thin[:, ::2] = False  # squashed: each lung broken into columns, the largest pieces thin
    reasons = lung_shape.lung_reasons(thin, P)
    assert reasons and lung_shape.lung_reasons(two_lungs(size), P) == []


# --- feature space ----------------------------------------------------------------------------


def test_mahalanobis_known_answer() -> None:
    """Known answers under a given precision, and a fit on points along one axis: off the axis
    is far, along it near. Watched red with the squared distance returned."""
    mean, precision = np.zeros(2), np.linalg.inv(np.diag([4.0, 1.0]))
    got = ood.mahalanobis(np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]), mean, precision)
    np.testing.assert_allclose(got, [1.0, 2.0, np.sqrt(5.0)])
    rng = np.random.default_rng(0)
    along = np.zeros((500, 5))
    along[:, 0] = rng.normal(0, 1, 500)
    along[:, 1:] = rng.normal(0, 0.05, (500, 4))
    m, prec = ood.fit_gaussian(along)
    on_axis, off_axis = ood.mahalanobis(np.array([[2.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0]]), m, prec)
    assert 1.5 < on_axis < 2.5 and off_axis > 10 * on_axis, (on_axis, off_axis)
    # Isotropic unit Gaussian: the fitted distance of 3 e1 is about 3.
    m, prec = ood.fit_gaussian(rng.normal(0, 1, (4000, 3)))
    assert abs(ood.mahalanobis(np.array([[3.0, 0, 0]]), m, prec)[0] - 3.0) < 0.2


def test_fit_uses_shrinkage_where_the_sample_covariance_is_singular() -> None:
    """10 points in 50 dimensions: a plain inverse does not exist; Ledoit-Wolf gives finite
    distances that still rank a far point above the training points. Watched red with
    np.linalg.inv(np.cov(...)) in place of Ledoit-Wolf (the far point scored 0)."""
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, (10, 50))
    mean, precision = ood.fit_gaussian(train)
    near, far = ood.mahalanobis(train, mean, precision), ood.mahalanobis(train[:1] * 10, mean,
                                                                         precision)  # fmt: skip
    assert np.all(np.isfinite(near)) and far[0] > near.max()


def test_threshold_is_the_val_percentile_and_flags_that_share() -> None:
    """Watched red with np.percentile(scores, 100 - percentile)."""
    assert ood.threshold_at(np.arange(101.0), 99.0) == 99.0
    rng = np.random.default_rng(2)
    train, val = rng.normal(0, 1, (400, 4)), rng.normal(0, 1, (300, 4))
    at_99 = dataclasses.replace(P, percentile=99.0)  # a known answer, whatever params.yaml says
    state = ood.fit_state(train, val, at_99, "0" * 64)
    flagged = sum(bool(ood.gate(state, f, None)) for f in val)
    assert flagged == 3  # 1% of 300 distinct scores lie above their 99th percentile
    assert state.meta["n_train"] == 400 and state.meta["n_val"] == 300


def test_gate_reason_and_none_inputs() -> None:
    """Watched red with `score > threshold` in place of `not score <= threshold` (nan passed)."""
    state = ood.OodState(np.zeros(2), np.eye(2), 23.0, P, "0" * 64, {})
    (reason,) = ood.gate(state, np.array([41.2, 0.0]), None)
    assert reason == (
        "not a frontal chest radiograph: features unlike the training films (score 41.2 > 23.0)"
    )
    assert ood.gate(state, np.array([1.0, 1.0]), None) == []
    assert ood.gate(state, np.array([np.nan, 0.0]), None)
    assert ood.gate(state, None, two_lungs()) == []
    assert ood.gate(state, None, None) == []
    flags = ood.gate_batch(state, np.array([[41.2, 0.0], [0.0, 0.0]]), np.stack([two_lungs()] * 2))
    assert [len(f) for f in flags] == [1, 0]


def tiny_binary(path: Path, size: int = 32, crop: str = "none") -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", 2, zero_init_residual=False)
    prep = {"image_size": size, "harmonise": True, "harmonise_size": 224, "jpeg_quality": 75,
            "intensity": "equalize", "crop": crop, "crop_margin": 0.1}  # fmt: skip
    meta = {"task": "binary", "arch": "resnet18", "class_names": ["non_covid", "covid"],
            "image_size": size, "preprocessing": prep}  # fmt: skip
    save_checkpoint(path, model, meta)
    return path


def tiny_segmenter(path: Path) -> Path:
    torch.manual_seed(0)
    meta = {"arch": "unet", "channels": 2, "depth": 2, "input_size": 16, "array_size": 32,
            "threshold": 0.5, "min_component": 0.005}  # fmt: skip
    save_segmenter(path, UNet(2, 2), meta)
    return path


def test_penultimate_features_are_the_pooled_backbone_output(tmp_path: Path) -> None:
    """The fc layer's input: the backbone up to its global average pool. Watched red with the
    hook on the fc's output (2 numbers, not 512)."""
    from cxr.models import load_checkpoint

    model, _ = load_checkpoint(tiny_binary(tmp_path / "b.pt"), "binary")
    images = np.random.default_rng(3).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    got = ood.penultimate_features(model, images, batch_size=2)
    b = model.backbone
    with torch.no_grad():
        x = (torch.from_numpy(images).float()[:, None] / 255 - model.mean) / model.std
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        want = torch.flatten(b.avgpool(x), 1).numpy()
    assert got.shape == (5, 512)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- the saved state --------------------------------------------------------------------------


def test_state_round_trip_and_other_checkpoint_refused(tmp_path: Path) -> None:
    """Watched red with the sha256 comparison removed from load_state."""
    binary, other = tmp_path / "binary.pt", tmp_path / "other.pt"
    binary.write_bytes(b"one checkpoint")
    other.write_bytes(b"another checkpoint")
    rng = np.random.default_rng(4)
    state = ood.fit_state(rng.normal(size=(30, 3)), rng.normal(size=(20, 3)), P,
                          ood.sha256_of(binary))  # fmt: skip
    ood.save_state(tmp_path / "ood.pt", state)
    blob = torch.load(tmp_path / "ood.pt", weights_only=True)
    assert blob["meta"]["binary_sha256"] == ood.sha256_of(binary)
    loaded = ood.load_state(tmp_path / "ood.pt", binary=binary)
    assert loaded.threshold == state.threshold and loaded.params == P
    np.testing.assert_array_equal(loaded.precision, state.precision)
    with pytest.raises(
        CheckpointError, match=r"fitted for a binary checkpoint with sha256 .*other\.pt"
    ):
        ood.load_state(tmp_path / "ood.pt", binary=other)


# --- params -----------------------------------------------------------------------------------


def test_missing_unknown_and_bad_ood_keys_are_named(tmp_path: Path) -> None:
    """Watched red with a loader that builds OodParams(**section) itself (a TypeError naming
    no key, and no range check)."""
    params = yaml.safe_load(PARAMS.read_text())
    del params["ood"]["min_taper"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r": ood\.min_taper missing$"):
        ood.load_ood_params(path)
    path = write_params(tmp_path / "p2.yaml", ood={"percentile": 99.0, "min_tapper": 0.5})
    with pytest.raises(ParamsError, match=r"ood\.min_tapper unknown"):
        ood.load_ood_params(path)
    path = write_params(tmp_path / "p3.yaml", ood={"percentile": 100.0})
    with pytest.raises(ParamsError, match=r"^ood\.percentile must be"):
        ood.load_ood_params(path)
    assert dataclasses.fields(ood.OodParams)  # every field required: none has a default
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ood.OodParams))


# --- probes -----------------------------------------------------------------------------------

PLAIN = Preprocessing(image_size=32, harmonise=False, intensity="none")


def asymmetric_film(size: int = 32, seed: int = 5) -> np.ndarray:
    film = np.random.default_rng(seed).integers(60, 120, (size, size), dtype=np.uint8)
    film[:4, :] = 250  # a bright top
    film[:, :6] = 10  # a dark left edge
    return film


def test_probes_transform_the_film_as_named() -> None:
    """Through a preprocessing that changes nothing, each geometric probe is its transform.
    Watched red with upside_down flipping left-right."""
    films = np.stack([asymmetric_film(seed=5), asymmetric_film(seed=6)])
    want = {"identity": films[0], "rotated_90": np.rot90(films[0]),
            "rotated_180": films[0][::-1, ::-1], "upside_down": films[0][::-1],
            "inverted": 255 - films[0]}  # fmt: skip
    for kind, expected in want.items():
        np.testing.assert_array_equal(ood_probes.build_probes(films, kind, PLAIN)[0], expected)
    half = ood_probes.build_probes(films, "one_lung", PLAIN)[0]
    assert half[:, :4].mean() < 30  # the dark left edge, stretched over twice the width
    pair = ood_probes.build_probes(films, "side_by_side", PLAIN)[0]
    assert pair[:, :2].mean() < 30 and pair[:, 16:18].mean() < 30  # both films' dark edges


def test_drawn_probes_are_model_inputs_and_unlike_a_film() -> None:
    """Colour photo, CT slice, lateral film: square uint8 of the model size, varied, seeded.
    Watched red with the CT's lungs drawn bright (their dark pixels gone)."""
    spec = Preprocessing(image_size=32, harmonise=True, intensity="equalize")
    films = np.stack([asymmetric_film(64, s) for s in range(3)])
    for kind in ("colour_photo", "ct_slice", "lateral_like"):
        a = ood_probes.build_probes(films, kind, spec, seed=1)
        assert a.shape == (3, 32, 32) and a.dtype == np.uint8
        assert a.std() > 20 and not np.array_equal(a[0], a[1]), kind
        np.testing.assert_array_equal(a, ood_probes.build_probes(films, kind, spec, seed=1))
    ct = ood_probes.ct_slice(films[0], films[1], np.random.default_rng(0))
    pixels = np.asarray(ct)
    centre_row = pixels[pixels.shape[0] // 2]
    assert centre_row[: len(centre_row) // 10].mean() < 40  # air outside the body
    assert (centre_row < 40).sum() > len(centre_row) // 4  # and the two dark lungs
    assert ood_probes.colour_photo(films[0], films[1], np.random.default_rng(0)).mode == "RGB"
    with pytest.raises(ValueError, match="unknown probe kind"):
        ood_probes.build_probes(films, "sagittal", spec)


# --- the stage and the report -----------------------------------------------------------------


def tiny_split(folder: Path, size: int = 32) -> None:
    rng = np.random.default_rng(6)
    for name, n in (("train", 24), ("val", 12), ("test", 8), ("adult_check", 4), ("cases", 2),
                    ("external", 0)):  # fmt: skip
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        table = pd.DataFrame({"path": [f"{name}{i}.png" for i in range(n)],
                              "dataset": ["kermany", "rsna"] * (n // 2)})  # fmt: skip
        if name == "cases":  # as cases.csv: no dataset column, a cohort
            table = table.drop(columns="dataset").assign(cohort="cases")
        save_split(folder, name, images, table)


def test_stage_fits_for_the_checkpoint_and_writes_metrics(tmp_path: Path) -> None:
    """stages/ood.py on tiny random models: the gate loads for that checkpoint only, its
    threshold flags at most 1 of the 12 val films by features, and the metrics count by dataset,
    on every split of real films. Watched red with the threshold set on the train films'
    distances (val flagged 12 of 12), with only val and test counted (KeyError 'train'), and
    with the cases read by a `dataset` column they do not have (KeyError, as the real stage hit)."""
    import stages.ood as stage

    binary, seg = tiny_binary(tmp_path / "binary.pt"), tiny_segmenter(tmp_path / "segmenter.pt")
    tiny_split(tmp_path / "split")
    out, metrics = tmp_path / "models" / "ood.pt", tmp_path / "metrics" / "ood.json"
    stage.main(["--binary", str(binary), "--segmenter", str(seg), "--data",
                str(tmp_path / "split"), "--params", str(PARAMS), "--out", str(out),
                "--metrics", str(metrics)])  # fmt: skip
    state = ood.load_state(out, binary=binary)
    m = json.loads(metrics.read_text())
    assert m["n_train"] == 24 and m["n_val"] == 12 and m["threshold"] == state.threshold
    features = m["val"]["all"]["by_reason"].get(
        "not a frontal chest radiograph: features unlike the training films", 0
    )
    assert features <= 1
    assert m["val"]["kermany"]["n"] == 6 and m["test"]["all"]["n"] == 8
    # every real film is counted: train (in-sample), adult_check and cases; no empty external
    assert [m[k]["all"]["n"] for k in ("train", "adult_check", "cases")] == [24, 4, 2]
    assert "external" not in m and m["cases"]["cases"]["n"] == 2
    # each dataset's median feature distance, as the gate scores the films
    from cxr.arrays import load_split
    from cxr.models import load_checkpoint
    from cxr.segmenter import load_segmenter

    model, meta = load_checkpoint(binary, "binary")
    images, table = load_split(tmp_path / "split", "test")
    inputs, _ = ood.model_inputs(images, meta, load_segmenter(seg))
    scores = state.scores(ood.penultimate_features(model, inputs))
    rsna = scores[table["dataset"].to_numpy() == "rsna"]
    assert m["test"]["rsna"]["median_distance"] == pytest.approx(np.median(rsna), abs=0.01)
    other = tiny_binary(tmp_path / "other.pt", crop="lungs")
    with pytest.raises(CheckpointError):
        ood.load_state(out, binary=other)


def test_report_counts_every_kind_and_real_film(tmp_path: Path) -> None:
    """A gate that flags everything detects every probe and flags every real film; one that
    flags nothing, none. Watched red with the probes built from the first film only."""
    from cxr.models import load_checkpoint
    from cxr.ood_report import report
    from cxr.segmenter import load_segmenter

    binary, meta = load_checkpoint(tiny_binary(tmp_path / "binary.pt"), "binary")
    segmenter = load_segmenter(tiny_segmenter(tmp_path / "segmenter.pt"))
    films = np.random.default_rng(7).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    datasets = np.array(["a", "a", "b", "b"])
    lenient = dataclasses.replace(P, min_lung_share=0.0, max_lung_share=1.0, min_balance=0.0,
                                  min_aspect=1e-6, max_aspect=1e6, max_tilt=1e6, min_taper=0.0,
                                  max_offset=1.0)  # fmt: skip
    state = ood.OodState(np.zeros(512), np.eye(512), -1.0, lenient, "0" * 64, {})
    got = report(state, films, datasets, binary, meta, segmenter, limit=3)
    assert set(got["probes"]) == set(ood_probes.KINDS)
    assert got["real_films"]["all"]["flagged"] == 4 and got["real_films"]["b"]["n"] == 2
    assert all(v["n"] == 3 for v in got["probes"].values())
    assert got["probes"]["ct_slice"]["detection_rate"] == 1.0
    assert got["probes"]["identity"]["flagged_rate"] == 1.0
    state = dataclasses.replace(state, threshold=np.inf)
    got = report(state, films, datasets, binary, meta, segmenter, limit=2)
    # the lenient lung rules still want two pieces, one each side: count only the features
    assert all("not a frontal chest radiograph: features unlike the training films"
               not in v["by_reason"] for v in got["probes"].values())  # fmt: skip


def test_ood_report_is_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Watched red before cxr/__main__.py listed it (usage, exit 2)."""
    from cxr.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["ood-report", "--help"])
    assert exit_.value.code == 0 and "--models" in capsys.readouterr().out
