"""Tests for the Python API (cxr.api.Predictor) on tiny random checkpoints: the same numbers as
the CLI, every kind of image it takes, clear errors, and Grad-CAM maps that depend on the image."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr import Predictor, api
from cxr.errors import InputError
from cxr.inputs import UsageError
from tests.test_predict import FOUR, PREP, make_checkpoint, make_models, radiograph, run

THREADS = ["--threads", "1"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One thread on the 2 shared cores (as predict's tests run), the defaults restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models(tmp_path_factory.mktemp("api") / "models", threshold=0.4)["models"]


def films() -> dict[str, np.ndarray]:
    """Arrays of each kind the API takes, each with a PNG that holds the same pixels."""
    grey = radiograph(96, seed=11)
    wide = radiograph(210, seed=12)[:, :64]  # 3.3:1, so it also gets a warning
    deep = (radiograph(80, seed=13).astype(np.uint16) * 257 + 7).astype(np.uint16)  # 16-bit
    rgb = np.stack([radiograph(72, seed=s) for s in (14, 15, 16)], axis=-1)
    return {"grey": grey, "wide": wide, "deep": deep, "rgb": rgb}


PROBS = ["p_covid", "p_viral", "p_bacterial", "p_normal", "binary_p_covid", "p_predicted"]


def test_api_on_arrays_gives_the_cli_csv_numbers(
    tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same pixels as arrays through Predictor.predict and as PNG files through
    `python -m cxr predict`: the same columns, probabilities, calls, threshold and warnings.
    Watched red with array_gray keeping the high byte of a 16-bit array instead of stretching
    it as a 16-bit PNG is read (the 16-bit film's probabilities differed)."""
    arrays = films()
    paths = []
    for name, array in arrays.items():
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(array).save(paths[-1])
    out = tmp_path / "cli.csv"
    code, _, err = run(capsys, [*map(str, paths), "--models", str(models), *THREADS,
                                "--out", str(out)])  # fmt: skip
    assert code == 0, err
    cli = pd.read_csv(out, keep_default_na=False)
    table = Predictor.load(models).predict(list(arrays.values()), names=[str(p) for p in paths])
    assert list(table.columns) == list(cli.columns)
    cli = cli.set_index("file").loc[[str(p) for p in paths]]
    for column in PROBS:
        assert table[column].tolist() == cli[column].astype(float).tolist(), column
    assert table["predicted"].tolist() == cli["predicted"].tolist()
    assert table["covid_positive"].tolist() == cli["covid_positive"].tolist()
    assert set(table["threshold_source"]) == {"bundle"} and set(table["threshold"]) == {0.4}
    assert table["warning"].tolist() == cli["warning"].tolist()
    assert "extreme aspect ratio" in table["warning"][1]  # the check ran on the API's path


def test_pil_images_arrays_and_paths_agree(tmp_path: Path, models: Path) -> None:
    """One film as a uint8 array, a PIL image, a float array of the same grey levels (stretched
    from its own min..max, like a float TIFF), an RGB image of equal channels and a file path: one set of probabilities.
    Watched red with as_gray passing a PIL image's pixels on without to_grayscale (the RGB
    image failed in the preprocessing: "Invalid mode for data type")."""
    grey = radiograph(90, seed=21)
    stretched = np.round((grey - grey.min()) / (grey.max() - grey.min()) * 255).astype(np.uint8)
    path = tmp_path / "film.png"
    Image.fromarray(stretched).save(path)
    predictor = Predictor.load(models)
    rgb = Image.fromarray(np.repeat(stretched[..., None], 3, axis=2))
    table = predictor.predict(
        [stretched, Image.fromarray(stretched), rgb, stretched.astype(np.float32), str(path)]
    )
    assert table["status"].tolist() == ["ok"] * 5
    assert table["file"].tolist() == ["image 0", "image 1", "image 2", "image 3", str(path)]
    # Within 1e-6, not bit for bit: a batch of 1 and of 5 may take other kernels, which sum in
    # another order (seen under ONEDNN_MAX_CPU_ISA=SSE41: 6e-8); a wrong input differs by far more.
    for column in PROBS:
        assert np.ptp(table[column].to_numpy()) < 1e-6, table[column].tolist()
    one = predictor.predict(stretched)  # a single image needs no list
    assert one["binary_p_covid"][0] == pytest.approx(table["binary_p_covid"][0], abs=1e-6)


def test_wrong_inputs_raise_a_clear_error(models: Path) -> None:
    """The caller's mistakes are InputError naming the image and what was expected; an
    unreadable file is an error row, as in predict's CSV. Watched red with array_gray's shape
    check removed (the 4 x 64 x 64 stack reached PIL: TypeError "Cannot handle this data
    type")."""
    predictor = Predictor.load(models)
    good = radiograph(64)
    cases = {
        "is not an image: expected 2-D grey": np.zeros((4, 64, 64), np.uint8),
        "for several images pass a list": np.zeros((2, 3, 64, 64), np.uint8),
        "shape (0, 64)": np.zeros((0, 64), np.uint8),
        "colour array must be uint8": np.zeros((64, 64, 3), np.float32),
        "NaN or infinite": np.full((64, 64), np.nan),
        "array of complex128 is not an image": np.zeros((64, 64), complex),
        "a dict is not an image": {"pixels": good},
    }
    for message, bad in cases.items():
        with pytest.raises(InputError, match=re.escape(message)) as info:
            predictor.predict([good, bad])
        assert str(info.value).startswith("image 1: "), info.value
    with pytest.raises(InputError, match="2 names for 1 images"):
        predictor.predict([good], names=["a", "b"])
    table = predictor.predict([good, "/no/such/film.png"])
    assert table["status"].tolist() == ["ok", "error"]
    assert table["message"][1] == "/no/such/film.png: cannot read file (No such file or directory)"


def test_load_takes_the_threshold_and_checkpoints_as_predict_does(
    tmp_path: Path, models: Path
) -> None:
    """threshold= wins over the bundle's (source 'argument'); a checkpoint given by path
    replaces the bundle's; the bundle's threshold is refused for another binary model; out of
    range is a UsageError. Watched red with Predictor.load ignoring threshold=."""
    film = radiograph(64, seed=3)
    row = Predictor.load(models, threshold=0.0).predict([film]).iloc[0]
    assert (row["threshold"], row["threshold_source"], row["covid_positive"]) == (
        0.0, "argument", True,
    )  # fmt: skip
    other = make_checkpoint(tmp_path / "other.pt", "binary", seed=9)
    with pytest.raises(UsageError, match="is not the binary model"):
        Predictor.load(models, binary=other)
    mine = Predictor.load(models, binary=other, threshold=0.5).predict([film])
    bundled = Predictor.load(models).predict([film])
    assert mine["binary_p_covid"][0] != bundled["binary_p_covid"][0]  # the other model ran
    assert mine["p_covid"][0] == bundled["p_covid"][0]  # the bundle's four-class model
    with pytest.raises(UsageError, match=r"threshold must be in \[0, 1\]"):
        Predictor.load(models, threshold=1.5)


def test_explain_is_the_covid_class_map_and_depends_on_the_image(tmp_path: Path) -> None:
    """A size x size float32 map in [0, 1]; the map of the COVID-19 class (what compute_cams
    gives for that target on the model input), not of another class; and a different film
    gives a different map. The COVID-19 output's weights are made positive so that its layer4
    map is not all zero (a random network's often is, after Grad-CAM's ReLU). Watched red with
    explain targeting class 1 instead of covid (not the COVID-19 map)."""
    from cxr.cam import compute_cams

    folder = make_models(tmp_path / "models", prep=PREP | {"image_size": 64})["models"]
    loaded = Predictor.load(folder)
    four = copy.deepcopy(loaded.models.four_class)
    covid = FOUR.index("covid")
    with torch.no_grad():
        four.backbone.fc.weight[covid] = four.backbone.fc.weight[covid].abs()
    predictor = Predictor(dataclasses.replace(loaded.models, four_class=four), loaded.threshold)
    a, b = radiograph(96, seed=31), radiograph(96, seed=32)[::-1].copy()
    heat_a, heat_b = predictor.explain(a, layer="layer4"), predictor.explain(b, layer="layer4")
    assert heat_a.shape == (64, 64) and heat_a.dtype == np.float32
    assert heat_a.min() >= 0.0 and heat_a.max() <= 1.0 and heat_a.max() > heat_a.min()
    assert not np.allclose(heat_a, heat_b, atol=1e-3)
    x = api.with_lungs(predictor.models, [api.model_pixels(a, [], predictor.models.spec)[0]],
                       [[]]).images  # fmt: skip
    by_class = [compute_cams(four, x, [k], batch_size=1, layer="layer4")[0] for k in range(4)]
    assert np.array_equal(heat_a, by_class[covid])
    assert all(not np.allclose(heat_a, m, atol=1e-3) for k, m in enumerate(by_class) if k != covid)
    default = predictor.explain(a)  # layer3, predict --cam's default
    assert default.shape == (64, 64) and 0.0 <= default.min() <= default.max() <= 1.0


def test_predictor_is_exported_from_the_package_without_importing_torch_eagerly() -> None:
    """`from cxr import Predictor` works, and `import cxr` alone stays light (the stages and
    commands import the package; torch takes seconds). Watched red with a plain import in
    cxr/__init__.py."""
    import subprocess
    import sys

    assert Predictor is api.Predictor
    code = "import sys, cxr; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == "False"


# --- the age group (issue 18, point 5) ----------------------------------------------------------


def forced_four_class(model: torch.nn.Module, call: str) -> torch.nn.Module:
    """A copy of `model` whose four-class call is always `call` (its output bias dominates)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.backbone.fc.bias.fill_(-50.0)
        model.backbone.fc.bias[FOUR.index(call)] = 50.0
    return model


def test_age_group_caveat_follows_the_call_and_the_age_group(models: Path) -> None:
    """A viral or bacterial call gets the adult caveat for an adult film, the unknown-age one
    for a film of unknown age, none for a child's; a covid or normal call none at all. The
    age_group column says which was given; an unknown value is refused. Watched red with
    age_warning ignoring the call (covid rows got the caveat)."""
    loaded = Predictor.load(models)
    film, ages = radiograph(80, seed=41), ["adult", "pediatric", "unknown"]
    for call in FOUR:
        four = forced_four_class(loaded.models.four_class, call)
        predictor = Predictor(dataclasses.replace(loaded.models, four_class=four), loaded.threshold)
        table = predictor.predict([film] * 3, age_group=ages)
        assert table["predicted"].tolist() == [call] * 3
        assert table["age_group"].tolist() == ages
        typed = call in ("viral", "bacterial")
        want = [api.ADULT_TYPE_WARNING, "", api.UNKNOWN_AGE_TYPE_WARNING] if typed else [""] * 3
        assert table["warning"].tolist() == want, call
    assert predictor.predict(film)["age_group"].tolist() == ["unknown"]  # the default
    with pytest.raises(InputError, match="age_group 'child' is not one of adult, pediatric"):
        predictor.predict(film, age_group="child")
    with pytest.raises(InputError, match="2 age groups for 1 images"):
        predictor.predict([film], age_group=["adult", "adult"])


def test_age_group_option_of_predict_and_strict(
    tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`predict --age-group` fills the column and the caveat (unknown by default); --strict
    fails on warnings about the image, not on this caveat. Watched red with exit_code counting
    every warning (exit 1 for a clean film called viral)."""
    from cxr.models import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(models / "four_class.pt", "four_class")
    viral = tmp_path / "viral.pt"
    save_checkpoint(viral, forced_four_class(model, "viral"), meta)
    film = tmp_path / "film.png"
    Image.fromarray(radiograph(80, seed=42)).save(film)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(radiograph(40, seed=43)).save(tiny)
    base = [str(film), "--models", str(models), "--four-class", str(viral), *THREADS, "--strict"]
    out = tmp_path / "p.csv"
    expected = {"adult": api.ADULT_TYPE_WARNING, "pediatric": "",
                "unknown": api.UNKNOWN_AGE_TYPE_WARNING}  # fmt: skip
    for age, warning in expected.items():
        given = [] if age == "unknown" else ["--age-group", age]
        code, _, err = run(capsys, [*base, *given, "--out", str(out)])
        row = pd.read_csv(out, keep_default_na=False).iloc[0]
        assert (code, row["predicted"], row["age_group"], row["warning"]) == (
            0, "viral", age, warning,
        ), err  # fmt: skip
    code, _, err = run(capsys, [str(tiny), *base, "--age-group", "adult"])
    assert code == 1, err  # a tiny image is still a warning about the image
    with pytest.raises(SystemExit) as bad:
        from cxr import predict

        predict.parse_args(["x.png", "--age-group", "child"])
    assert bad.value.code == 2


# --- docs/api.md runs as written ----------------------------------------------------------------


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_docs_api_example_runs(
    tmp_path: Path,
    models: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every python block of docs/api.md, run in a folder with a tiny models/ bundle and a
    chest.png, as a notebook would run it. Watched red with the page's explain call given
    layer="layer5" (the page raised ValueError)."""
    import shutil

    blocks = python_blocks((ROOT / "docs" / "api.md").read_text(encoding="utf-8"))
    assert blocks, "docs/api.md has no python block"
    shutil.copytree(models, tmp_path / "models")
    Image.fromarray(radiograph(96, seed=51)).save(tmp_path / "chest.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 (our own page)
    table = namespace["table"]
    assert isinstance(table, pd.DataFrame) and len(table) == 3
    assert table["binary_p_covid"].nunique() == 1  # array, PIL image and path: one film
    assert "Threshold(value=0.4, source='bundle')" in capsys.readouterr().out


# --- the out-of-distribution gate in the model path (issue 22) ---------------------------------


def gated_models(folder: Path, *, flag_all: bool, fitted_for: str = "binary.pt") -> Path:
    """Tiny models with an ood.pt beside them: its Gaussian fitted on features of a few
    radiograph-like films, its threshold below (flag_all) or far above every film's distance."""
    from cxr import ood
    from tests.conftest import PARAMS

    make_models(folder)
    p = ood.load_ood_params(PARAMS)
    model = api.load_models(folder / "four_class.pt", folder / "binary.pt").binary
    x = np.stack([radiograph(32, seed=s) for s in range(40)])
    feats = ood.penultimate_features(model, x)
    state = ood.fit_state(feats[:30], feats[30:], p, ood.sha256_of(folder / fitted_for))
    threshold = -1.0 if flag_all else 1e12
    ood.save_state(folder / "ood.pt", dataclasses.replace(state, threshold=threshold))
    return folder


def test_gate_beside_the_models_warns_on_every_row_it_flags(tmp_path: Path) -> None:
    """A gate whose threshold every film exceeds: each row's warning says 'not a frontal chest
    radiograph'; a gate that flags nothing adds no warning. Watched red with score() not
    calling the gate (no warning) and with the gate's reasons dropped from image_warnings."""
    film = radiograph(96, seed=3)
    flagged = Predictor.load(gated_models(tmp_path / "a", flag_all=True)).predict([film, film])
    assert all(api.NOT_FRONTAL in w for w in flagged["warning"])
    assert all("features unlike the training films" in w for w in flagged["warning"])
    passed = Predictor.load(gated_models(tmp_path / "b", flag_all=False)).predict([film])
    assert api.NOT_FRONTAL not in (passed["warning"][0] or "")
    # the probabilities do not depend on the gate: the same forward pass gives both
    assert np.allclose(flagged["binary_p_covid"][0], passed["binary_p_covid"][0])


def test_gate_fitted_for_another_checkpoint_is_refused(tmp_path: Path) -> None:
    """ood.pt records the sha256 of the binary checkpoint it was fitted for: beside another
    one it is a usage error naming both. Watched red with load_gate passing binary=None."""
    folder = gated_models(tmp_path / "m", flag_all=True, fitted_for="four_class.pt")
    with pytest.raises(UsageError, match="was fitted for a binary checkpoint"):
        Predictor.load(folder)


def test_api_prefix_matches_the_gate_module() -> None:
    """validate counts the gate's films by this prefix: it must be the gate's own."""
    from cxr import ood

    assert api.NOT_FRONTAL == ood.NOT_FRONTAL
