"""cxr.cam and stages/gradcam.py on tiny random models and synthetic images (no pipeline data).

Sizes: a ResNet's last block sees S/32 x S/32, so 64 px gives a 2 x 2 map (32 px would give a
single cell, i.e. a flat map, and test nothing).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxr import cam, cam_figures, faithfulness, zone_scores
from cxr.models import CXRNet, build_model, save_checkpoint
from tests.conftest import write_params

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["covid", "viral", "bacterial", "normal"]
SIZE = 64
RUN = {"batch_size": 2, "layer": "layer4"}  # compute_cams' settings (params.yaml's in the stage)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs (tests/conftest.py)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 4, weights="none", zero_init_residual=False).eval()


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


# ---- maps ------------------------------------------------------------------------------------


class PatchDetector(nn.Module):
    """A two-class network built by hand with a ResNet's `layer3` / `layer4` / `fc` names:
    class 0's logit is the mean brightness above the normalisation mean, class 1's the mean
    darkness below it. layer3 ends on a 16 x 16 grid at 64 px, layer4 on 8 x 8. The correct
    map for class 0 is the bright patch, for class 1 everything but the patch."""

    def __init__(self) -> None:
        super().__init__()
        signs = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            signs.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        self.layer3 = nn.Sequential(signs, nn.ReLU(), nn.AvgPool2d(4))
        self.layer4 = nn.Sequential(nn.AvgPool2d(2))
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer4(self.layer3(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam", "xgradcam"])
def test_the_map_marks_the_planted_patch_of_its_target_class(method: str, layer: str) -> None:
    """A bright 16 x 16 patch top right (image 0) and bottom left (image 1) on a dark film: the
    class-0 map peaks on the patch, the class-1 map off it, at the image's size in [0, 1].
    A map transposed or flipped, not upsampled to the image, or drawn for the predicted class
    instead of the target fails. Watched red with compute_cams wrapped to pass targets=None
    (every map the predicted class's) and wrapped to transpose its maps."""
    model = CXRNet(PatchDetector()).eval()
    x = np.full((2, SIZE, SIZE), 20, dtype=np.uint8)
    patch = np.zeros_like(x, dtype=bool)
    patch[0, 8:24, 40:56] = True
    patch[1, 40:56, 8:24] = True
    x[patch] = 230
    bright = cam.compute_cams(model, x, [0, 0], method=method, batch_size=2, layer=layer)
    dark = cam.compute_cams(model, x, [1, 1], method=method, batch_size=2, layer=layer)
    for maps in (bright, dark):
        assert maps.shape == x.shape and maps.dtype == np.float32
        assert maps.min() >= 0.0 and maps.max() <= 1.0
    for i in range(2):
        assert patch[i].flat[bright[i].argmax()] and not patch[i].flat[dark[i].argmax()]
        assert bright[i][patch[i]].mean() > 0.5 > bright[i][~patch[i]].mean()
        assert dark[i][patch[i]].mean() < 0.5 < dark[i][~patch[i]].mean()


def test_cams_under_no_grad_and_with_frozen_weights(model: nn.Module) -> None:
    x = images(2)
    expected = cam.compute_cams(model, x, [1, 1], **RUN)
    frozen = build_model("resnet18", 4, zero_init_residual=False)
    frozen.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)
    with torch.no_grad():
        got = cam.compute_cams(frozen, x, [1, 1], **RUN)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_layer3_gives_a_finer_map_than_layer4(model: nn.Module) -> None:
    # 64 px: layer4 is a 2 x 2 grid, layer3 a 4 x 4 one. Bilinear upsampling puts each grid
    # cell's value at its centre, so the maps at the cell centres are the grids themselves.
    assert cam.target_layer(model, "layer3") is model.backbone.layer3[-1]
    assert cam.target_layer(model, "layer4") is model.cam_layer
    x = images(2)
    coarse = cam.compute_cams(model, x, None, batch_size=2, layer="layer4")  # None: predicted
    fine = cam.compute_cams(model, x, None, batch_size=2, layer="layer3")
    assert coarse.shape == fine.shape == (2, SIZE, SIZE)
    for c, f in zip(coarse, fine, strict=True):
        grid4, grid3 = c[16::32, 16::32], f[8::16, 8::16]
        assert len(np.unique(np.round(grid3, 4))) > len(np.unique(np.round(grid4, 4))) > 1
    with pytest.raises(ValueError, match="layer4"):
        cam.compute_cams(model, x, None, batch_size=2, layer="layer2")


def test_unknown_method_lists_the_choices(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="gradcam\\+\\+.*eigencam"):
        cam.compute_cams(model, images(1), None, method="gradcam3000", **RUN)


# ---- border share ----------------------------------------------------------------------------


def test_border_share_extremes_and_uniform() -> None:
    f = 0.1  # 100 px: a 10 px band on each side, centre 80 x 80
    border_only = np.ones((100, 100))
    border_only[10:90, 10:90] = 0
    centre_only = 1.0 - border_only
    assert faithfulness.border_share(border_only, f) == pytest.approx(1.0)
    assert faithfulness.border_share(centre_only, f) == pytest.approx(0.0)
    assert faithfulness.border_share(np.ones((100, 100)), f) == pytest.approx(
        1 - (1 - 2 * f) ** 2
    )  # .36


def test_border_share_hand_example() -> None:
    # 10 x 10, f = 0.1: the band is the outer ring of 1 px. Mass 3 in a corner (border) and
    # 1 in the middle (centre) -> 3 / 4. A band of round(0.12 * 10) = 1 px too.
    m = np.zeros((10, 10))
    m[0, 0], m[5, 5] = 3.0, 1.0
    assert faithfulness.border_share(m, 0.1) == pytest.approx(0.75)
    assert faithfulness.border_share(m, 0.12) == pytest.approx(0.75)
    # A band of round(0.25 * 10) = 3 px (2.5 rounds up) reaches (2, 7) but not (3, 3).
    m = np.zeros((10, 10))
    m[2, 7], m[3, 3] = 1.0, 4.0
    assert faithfulness.border_share(m, 0.25) == pytest.approx(0.2)
    # A stack: mean over maps; an empty map is left out.
    stack = np.stack([m, np.zeros((10, 10)), np.ones((10, 10))])
    assert faithfulness.border_share(stack, 0.25) == pytest.approx((0.2 + (1 - 0.4**2)) / 2)
    assert np.isnan(faithfulness.border_share(np.zeros((10, 10)), 0.1))


def test_border_fraction_out_of_range() -> None:
    with pytest.raises(ValueError, match="fraction"):
        faithfulness.border_share(np.ones((4, 4)), 0.5)


# ---- faithfulness and randomisation -----------------------------------------------------------


class TopLeftModel(nn.Module):
    """Class 0's logit is 4 x (mean brightness of the top-left 8 x 8 corner): only that region
    matters, so a map that marks it is faithful and one that marks elsewhere is not."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0, :8, :8].mean(dim=(1, 2)) * self.scale
        return torch.stack([corner, *[torch.zeros_like(corner)] * 3], dim=1)


def test_confidence_drop_rewards_a_faithful_map() -> None:
    x = np.zeros((4, 32, 32), dtype=np.uint8)
    x[:, :8, :8] = 255  # bright corner, dark elsewhere: mean grey fill darkens the corner
    right, wrong = np.zeros((4, 32, 32)), np.zeros((4, 32, 32))
    right[:, :8, :8] = 1.0  # 64 px = 6.25% of the image
    wrong[:, 20:, 20:] = 1.0
    model = TopLeftModel()
    good = faithfulness.confidence_drop(model, x, right, [0] * 4, top_percent=6.25, seed=0)
    bad = faithfulness.confidence_drop(model, x, wrong, [0] * 4, top_percent=6.25, seed=0)
    assert good["n_images"] == 4 and good["top_percent"] == 6.25
    # The corner goes to the mean grey, rint(64 * 255 / 1024) = 16: logit 4 -> 4 * 16 / 255
    # = 0.251, p(class 0) = e^x / (e^x + 3): 0.9479 -> 0.2999, a drop of 0.648. Random pixels
    # hit ~4 of the corner's 64: a drop of ~0.01.
    assert good["cam_drop"] == pytest.approx(0.648, abs=1e-3)
    assert 0 < good["random_drop"] < 0.05
    assert good["difference"] > 0.6 and good["cam_beats_random_share"] == 1.0
    assert bad["cam_drop"] == pytest.approx(0.0, abs=1e-6)
    assert bad["difference"] < 0
    assert good["random_drop"] == pytest.approx(bad["random_drop"])  # same seed, same pixels


def test_road_rewards_a_faithful_map() -> None:
    x = np.full((4, 32, 32), 40, dtype=np.uint8)
    x[:, :8, :8] = 255  # the only region the model reads
    right, wrong = np.zeros((4, 32, 32)), np.zeros((4, 32, 32))
    right[:, :8, :8] = 1.0
    wrong[:, 20:, 20:] = 1.0
    model = TopLeftModel()
    good = faithfulness.road(model, x, right, [0] * 4, percentiles=[80], seed=0)
    bad = faithfulness.road(model, x, wrong, [0] * 4, percentiles=[80], seed=0)
    # Top 20% removed: the faithful map's covers the bright corner (imputed from its dark
    # neighbours): a big drop for MoRF, none for LeRF; the wrong map the other way round.
    assert good["morf"] < -0.3 and abs(good["lerf"]) < 0.05 and good["combined"] > 0.15
    assert bad["combined"] < 0 and abs(bad["morf"]) < 0.05
    assert good == faithfulness.road(model, x, right, [0] * 4, percentiles=[80], seed=0)  # seeded
    assert good["n_images"] == 4 and good["percentiles"] == [80]


def test_case_zone_scores_and_lung_checks() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 4:16] = True  # the patient's right lung (image left)
    mask[5:35, 24:36] = True
    hot = np.zeros((40, 40))
    hot[30:33, 6:9] = 1.0  # in R-lower
    marker = hot * 0.5
    marker[0:2, 0:2] = 1.0  # brightest on a corner marker, off the lungs
    maps = np.stack([hot, np.ones((40, 40)), marker])
    scores = zone_scores.case_zone_scores(maps, np.stack([mask] * 3), ["R-lower", "", "L-upper"])
    assert scores[0]["pointing_hit"] is True and scores[0]["in_lung_share"] == 1.0
    assert scores[0]["zone_lift"] == pytest.approx(6.0) and scores[0]["chance"] == pytest.approx(
        1 / 6
    )
    assert scores[0]["peak_in_lungs"] is True
    assert scores[1]["zone_lift"] is None and scores[1]["pointing_hit"] is None
    assert scores[1]["chance"] is None and scores[1]["peak_in_lungs"] is None  # flat: no peak
    assert scores[1]["in_lung_share"] == pytest.approx(mask.mean())
    # The marker case: its in-lung maximum (R-lower) misses L-upper; the peak off the lungs
    # is counted apart, not as the miss.
    assert scores[2]["pointing_hit"] is False and scores[2]["peak_in_lungs"] is False
    test = (np.stack([hot, np.ones((40, 40))]), np.stack([mask, mask]), np.array([0, 2]))
    out = zone_scores.lung_checks(test, NAMES, scores, ["a", "b", "c"], bootstrap=20, seed=0)
    assert sorted(out["test"]["by_predicted_class"]) == ["bacterial", "covid"]
    assert out["test"]["by_predicted_class"]["covid"]["in_lung_share"] == 1.0
    every = out["cases"]["all_cases"]
    assert every["zone_lift"]["n"] == 2 and every["pointing_hit"]["n"] == 2
    assert every["pointing_hit"]["mean"] == 0.5
    assert every["pointing_chance"] == pytest.approx(1 / 6)  # over the same two cases
    assert every["peak_outside_lungs"] == {"count": 1, "n": 2, "rate": 0.5}
    assert out["cases"]["per_case"]["a"]["zones"] == "R-lower"
    assert "maximum outside the lungs" in cam_figures._score_line(scores[2])
    assert "in-lung maximum miss (chance 0.17)" in cam_figures._score_line(scores[2])


def test_randomisation_correlation_of_a_model_with_itself_is_one(model: nn.Module) -> None:
    x = images(3)
    run = {"method": "gradcam", **RUN}
    assert faithfulness.randomisation_correlation(model, model, x, **run) == pytest.approx(1.0)
    # Against a map with the opposite ranking: -1.
    maps = cam.compute_cams(model, x, **RUN)
    rho = faithfulness.randomisation_correlation(model, model, x, trained_cams=-maps, **run)
    assert rho == pytest.approx(-1)


def test_random_twin_is_seeded_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = cam.random_twin("resnet18", 4, seed=1), cam.random_twin("resnet18", 4, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.backbone.fc.weight, b.backbone.fc.weight)


def test_pick_gallery_groups_and_caps() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 0])
    g = cam_figures.pick_gallery(labels, pred, per_group=2, seed=0)
    assert sorted(g) == [0, 1, 2]
    assert len(g[0]["correct"]) == 2 and set(g[0]["correct"]) <= {0, 1, 2}
    assert g[0]["misclassified"].tolist() == [3]
    assert g[1]["correct"].tolist() == [4] and g[1]["misclassified"].tolist() == [5]
    assert g[2]["correct"].tolist() == [] and g[2]["misclassified"].tolist() == [6]


# ---- stages/gradcam.py -----------------------------------------------------------------------


@pytest.fixture
def stage():
    spec = importlib.util.spec_from_file_location("stage_gradcam", ROOT / "stages" / "gradcam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_lungs(directory: Path, name: str, paths: list[str]) -> None:
    """The segment stage's output for a split: two lung blocks on every image."""
    masks = np.zeros((len(paths), SIZE, SIZE), dtype=np.uint8)
    masks[:, 10:50, 6:28] = 255
    masks[:, 10:50, 36:58] = 255
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"{name}.npy", masks)
    pd.DataFrame({"path": paths}).to_csv(directory / f"{name}.csv", index=False)


def write_split(directory: Path) -> None:
    """test (8 images, two of each class), val (5) and cases (3) arrays and manifests, and lung
    masks for test and cases in `<directory>/../lungs`."""
    directory.mkdir(parents=True)
    np.save(directory / "val.npy", images(5, seed=4))
    pd.DataFrame({"path": [f"v{i}.png" for i in range(5)], "label": "normal"}).to_csv(
        directory / "val.csv", index=False
    )
    write_lungs(directory.parent / "lungs", "test", [f"t{i}.png" for i in range(8)])
    write_lungs(directory.parent / "lungs", "cases", ["a.jpeg", "b.jpeg", "c.jpeg"])
    np.save(directory / "test.npy", images(8, seed=1))
    pd.DataFrame(
        {"path": [f"t{i}.png" for i in range(8)], "label": NAMES * 2, "dataset": "fake"}
    ).to_csv(directory / "test.csv", index=False)
    np.save(directory / "cases.npy", images(3, seed=2))
    pd.DataFrame({
        "case": ["case00", "case01", "case02"],
        "path": ["a.jpeg", "b.jpeg", "c.jpeg"],
        "sha256": ["0" * 64] * 3,
        "label": "covid",
        "radiologist_comment": ["Opacity in the right lower lobe.", "Bilateral.", "Left apex."],
        "case_url": [f"https://radiopaedia.org/cases/x-{i}" for i in range(3)],
        "license": "CC BY-NC-SA 3.0 (Radiopaedia)",
        "zones": ["R-lower", "R-upper;R-mid;R-lower;L-upper;L-mid;L-lower", "L-upper"],
        "file": ["images/a.jpeg", "images/b.jpeg", "images/c.jpeg"],
    }).to_csv(directory / "cases.csv", index=False)  # fmt: skip


def write_checkpoint(path: Path, model: nn.Module, task: str) -> None:
    names = NAMES if task == "four_class" else ["non_covid", "covid"]
    meta = {"task": task, "arch": "resnet18", "class_names": names, "image_size": SIZE}
    save_checkpoint(path, model, meta)


def argv(tmp_path: Path, checkpoint: Path) -> list[str]:
    write_params(tmp_path / "params.yaml", base={"seed": 3, "image_size": 64},
                 gradcam={"method": "gradcam", "gallery_per_group": 1, "border_fraction": 0.12,
                          "batch_size": 4, "target_layer": "layer3"})  # fmt: skip
    return ["--model", str(checkpoint), "--data", str(tmp_path / "split"),
            "--lungs", str(tmp_path / "lungs"),
            "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "plots"),
            "--metrics", str(tmp_path / "metrics" / "gradcam.json")]  # fmt: skip


def viral_model(model: nn.Module) -> nn.Module:
    """The random model with its head pushed to `viral`: every image is predicted viral. The
    covid and viral rows of the head made positive, so that both classes' maps have mass."""
    out = build_model("resnet18", 4, zero_init_residual=False)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        out.backbone.fc.weight[:2].abs_()
        out.backbone.fc.bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))
    return out.eval()


def test_stage_end_to_end(
    tmp_path: Path, stage, model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: the case maps are for the COVID-19 class, not the predicted one (the cases are
    COVID-19 films scored against COVID-19 findings), and say so when the prediction differs.
    Watched red before the fix: the cases' maps were computed for their predicted class."""
    write_split(tmp_path / "split")
    write_checkpoint(tmp_path / "four.pt", viral_model(model), "four_class")
    calls, real = [], cam.compute_cams

    def recording(model, images, targets=None, **kw):
        calls.append(None if targets is None else list(targets))
        return real(model, images, targets, **kw)

    monkeypatch.setattr(cam, "compute_cams", recording)
    stage.main(argv(tmp_path, tmp_path / "four.pt"))
    assert calls[0] == [NAMES.index("covid")] * 3  # the cases, first
    assert all(c == [NAMES.index("viral")] * len(c) for c in calls[1:2])  # test: predicted

    out = tmp_path / "plots"
    for i in range(3):
        png = out / "cases" / f"case0{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 150_000
    galleries = sorted(p.name for p in (out / "gallery").glob("*.png"))
    assert galleries == sorted(f"{n}.png" for n in NAMES)  # every class has test images
    page = (out / "index.md").read_text()
    assert [line for line in page.splitlines() if line.startswith("## ")] == [
        "## case00",
        "## case01",
        "## case02",
    ]
    assert "](cases/case00.png)" in page and "R-upper, R-mid" in page
    assert "https://radiopaedia.org/cases/x-2" in page and "CC BY-NC-SA 3.0" in page
    assert "Opacity in the right lower lobe." in page
    assert "- Prediction: **viral** (p = 1.00)" in page
    assert "- Map for: **covid** (p = 0.00), not the predicted class" in page

    metrics = json.loads((tmp_path / "metrics" / "gradcam.json").read_text())
    assert metrics["method"] == "gradcam" and metrics["n_test_images"] == 8
    for where in ("test", "cases"):
        drop = metrics["faithfulness"][where]
        assert set(drop) >= {"cam_drop", "random_drop", "difference"}
        assert drop["difference"] == pytest.approx(drop["cam_drop"] - drop["random_drop"])
    assert -1.0 <= metrics["randomisation"]["spearman"] <= 1.0
    share = metrics["border_share"]
    assert share["uniform_reference"] == pytest.approx(1 - (1 - 2 * 8 / 64) ** 2)  # 8 px band
    assert sorted(share["test"]) == sorted(NAMES)
    assert all(0.0 <= v <= 1.0 for v in [share["cases"], *share["test"].values()])
    assert metrics["target_layer"] == "layer3"  # the params file's, the only source
    assert metrics["faithfulness"]["val"]["n_images"] == 5
    assert metrics["road"]["val"]["n_images"] == 5 and metrics["road"]["cases"]["n_images"] == 3
    lung = metrics["lungs"]
    assert lung["test"]["all"]["n"] == 8
    assert lung["test"]["all"]["lung_area_share"] == pytest.approx(2 * 40 * 22 / 64**2)
    assert sorted(lung["cases"]["per_case"]) == ["case00", "case01", "case02"]
    assert lung["cases"]["per_case"]["case01"]["all_zones"] is True
    assert metrics["cases_map_class"] == "covid"
    assert {c["predicted"] for c in lung["cases"]["per_case"].values()} == {"viral"}
    assert lung["cases"]["per_case"]["case01"]["zone_lift"] == pytest.approx(1.0)
    assert lung["cases"]["cases_naming_some_zones"]["zone_lift"]["n"] == 2
    assert "Map vs lungs: map mass in lungs" in page


def test_stage_refuses_a_binary_checkpoint(
    tmp_path: Path, stage, capsys: pytest.CaptureFixture
) -> None:
    write_split(tmp_path / "split")
    binary = build_model("resnet18", 2)
    write_checkpoint(tmp_path / "binary.pt", binary, "binary")
    with pytest.raises(SystemExit) as exc:
        stage.main(argv(tmp_path, tmp_path / "binary.pt"))
    assert exc.value.code == 1
    assert "'binary' checkpoint, expected 'four_class'" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_stage_refuses_lungs_of_other_rows(tmp_path: Path, stage, model: nn.Module,
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    write_split(tmp_path / "split")
    write_lungs(tmp_path / "lungs", "test", [f"other{i}.png" for i in range(8)])
    write_checkpoint(tmp_path / "four.pt", model, "four_class")
    with pytest.raises(SystemExit):
        stage.main(argv(tmp_path, tmp_path / "four.pt"))
    assert "test.csv rows are not those of the split" in capsys.readouterr().err


def test_stage_takes_an_ensemble_manifest(
    tmp_path: Path, stage, model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradcam --model accepts a model that is a list of checkpoints (cxr.ensemble): its maps are
    the mean of the members' maps. Watched red with the stage loading checkpoints only."""
    from cxr.ensemble import Ensemble, write_manifest

    write_split(tmp_path / "split")
    write_checkpoint(tmp_path / "a.pt", model, "four_class")
    write_checkpoint(tmp_path / "b.pt", viral_model(model), "four_class")
    write_manifest(tmp_path / "ens.json", [tmp_path / "a.pt", tmp_path / "b.pt"], ["gamma_0.8"])
    seen, real = [], cam.compute_cams

    def recording(model, images, targets=None, **kw):
        seen.append(type(model))
        return real(model, images, targets, **kw)

    monkeypatch.setattr(cam, "compute_cams", recording)
    stage.main(argv(tmp_path, tmp_path / "ens.json"))
    assert seen[0] is Ensemble  # the stage's own calls get the ensemble (members follow inside)
    metrics = json.loads((tmp_path / "metrics" / "gradcam.json").read_text())
    assert metrics["n_test_images"] == 8
    assert (tmp_path / "plots" / "cases" / "case00.png").exists()
