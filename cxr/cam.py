"""Class activation maps and checks on them: where the map lies, whether it is faithful, whether
it depends on the learned weights at all. pytorch-grad-cam computes the maps.

A map here is H x W float32 in [0, 1] at the input image's size, upsampled from the target
layer's grid (the last block of `layer4`: S/32 x S/32 for a ResNet, 4 x 4 at 112 px; of
`layer3`: S/16, 7 x 7), so it is coarse by construction. Orientation: images are stored as
radiographs are read, so the patient's right is on the image's LEFT.
"""

from __future__ import annotations

import logging
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.metrics.road import (
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirstAverage,
)
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from scipy.stats import spearmanr
from torch import nn
from tqdm import tqdm

from cxr import lungs
from cxr.config import GradcamParams
from cxr.data import to_input
from cxr.errors import InputError
from cxr.infer import predict_proba
from cxr.models import CXRNet, build_model

log = logging.getLogger(__name__)

METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "scorecam": ScoreCAM,
    "xgradcam": XGradCAM,
    "eigencam": EigenCAM,
}
TARGET_LAYERS = ("layer4", "layer3")
DPI = 100  # figures live in git: keep each PNG well under ~150 kB
ORIENTATION_NOTE = "R = patient's right, shown on the image's left (radiological convention)"


# --- maps -------------------------------------------------------------------------------------


def cam_class(method: str) -> type[BaseCAM]:
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {list(METHODS)}")
    return METHODS[method]


def target_layer(model: CXRNet, name: str) -> nn.Module:
    """The last residual block of ResNet stage `name` (layer4 = `model.cam_layer`)."""
    if name not in TARGET_LAYERS:
        raise ValueError(f"unknown target layer {name!r}; choose one of {list(TARGET_LAYERS)}")
    return getattr(model.backbone, name)[-1]


def compute_cams(
    model: CXRNet,
    images: np.ndarray,
    targets: list[int] | None = None,
    *,
    method: str = "gradcam",
    batch_size: int,
    layer: str,
) -> np.ndarray:
    """N x H x W maps in [0, 1] for uint8 N x H x W images, on the last block of `layer`.

    `layer` and `batch_size` have no default: the pipeline's come from params.yaml (gradcam), so
    a second value here could only contradict them.

    `targets` are class indices (None: each image's predicted class). Every map is min-max
    scaled by pytorch-grad-cam, so maps show where, not how much; compare them by rank or share.
    """
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    layers = [target_layer(model, layer)]
    cam = cam_class(method)(model=model, target_layers=layers)  # also sets eval()
    cam.batch_size = batch_size  # ScoreCAM's masked forward passes per batch
    device = next(model.parameters()).device
    out = np.zeros(images.shape, dtype=np.float32)
    try:
        # The hooks need a graph even if the caller is in no_grad/inference mode or froze the
        # weights: an input that requires grad guarantees the target layer's output has one.
        with torch.inference_mode(False), torch.enable_grad():
            for start in tqdm(range(0, len(images), batch_size), desc=method, leave=False):
                stop = start + batch_size
                x = to_input(images[start:stop]).to(device).requires_grad_(True)
                batch_targets = None
                if targets is not None:
                    batch_targets = [ClassifierOutputTarget(int(t)) for t in targets[start:stop]]
                out[start:stop] = cam(input_tensor=x, targets=batch_targets)
    finally:
        cam.activations_and_grads.release()  # not `with cam:`, whose exit swallows IndexError
        model.zero_grad(set_to_none=True)
    return np.clip(out, 0.0, 1.0)


def random_twin(arch: str, num_classes: int, seed: int) -> CXRNet:
    """A same-architecture network with random weights (the model-randomisation baseline).

    zero_init_residual=False: with zeroed last BNs every residual block starts as the identity,
    a degenerate network rather than a random one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes, weights="none", zero_init_residual=False)
    return model.eval()


# --- where the map lies -----------------------------------------------------------------------


def border_mask(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """True in the outer band: round(fraction * side) pixels on each of the four sides."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"border fraction must be in (0, 0.5), got {fraction}")
    h, w = shape
    bh, bw = int(fraction * h + 0.5), int(fraction * w + 0.5)
    mask = np.ones((h, w), dtype=bool)
    mask[bh : h - bh, bw : w - bw] = False
    return mask


def border_share(cam: np.ndarray, fraction: float) -> float:
    """Share of a map's total mass in the outer band; the centre's share is 1 minus this.

    A uniform map gives the band's area share, 1 - (1 - 2f)^2 (0.4224 for f = 0.12; exactly
    `border_share(np.ones(shape), f)` after rounding the band to whole pixels). Much more than
    that means the model looks at the edges (labels, markers, collimation), not the lungs.
    For a stack of maps, the mean over maps; maps with no mass at all are left out (NaN if all).
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim == 3:
        shares = [border_share(c, fraction) for c in cam]
        finite = [s for s in shares if np.isfinite(s)]
        return float(np.mean(finite)) if finite else float("nan")
    total = cam.sum()
    if total <= 0:
        return float("nan")
    return float(cam[border_mask(cam.shape, fraction)].sum() / total)


# --- faithfulness and the model-randomisation check -------------------------------------------


def _top_pixels(cam: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the k highest pixels; ties (flat regions of zero) broken at random,
    not in raster order, which would always pick the top rows."""
    perm = rng.permutation(cam.size)
    return perm[np.argsort(-cam.ravel()[perm], kind="stable")[:k]]


def confidence_drop(
    model: CXRNet,
    images: np.ndarray,
    cams: np.ndarray,
    targets: list[int] | np.ndarray,
    *,
    top_percent: float,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """Drop in target-class probability when the top `top_percent`% CAM pixels are replaced by
    the image's mean grey, against replacing as many random pixels.

    A faithful map hurts more than random: `difference` = cam_drop - random_drop > 0. Both
    perturbations are off-distribution (the ROAD paper's caveat), the random one as scattered
    pixels, so the difference is evidence, not proof.
    """
    if not 0.0 < top_percent < 100.0:
        raise ValueError(f"top_percent must be in (0, 100), got {top_percent}")
    n, h, w = images.shape
    k = max(1, int(round(top_percent / 100.0 * h * w)))
    rng = np.random.default_rng(seed)
    flat = images.reshape(n, -1)
    by_cam, by_random = flat.copy(), flat.copy()
    for i in range(n):
        fill = np.uint8(np.rint(flat[i].mean()))
        by_cam[i, _top_pixels(cams[i], k, rng)] = fill
        by_random[i, rng.choice(h * w, size=k, replace=False)] = fill
    rows, t = np.arange(n), np.asarray(targets, dtype=np.int64)

    def target_prob(x: np.ndarray) -> np.ndarray:
        return predict_proba(model, x.reshape(n, h, w), batch_size=batch_size)[rows, t]

    base = target_prob(flat)
    cam_drop, random_drop = base - target_prob(by_cam), base - target_prob(by_random)
    return {
        "top_percent": float(top_percent),
        "n_images": int(n),
        "cam_drop": float(cam_drop.mean()),
        "random_drop": float(random_drop.mean()),
        "difference": float(cam_drop.mean() - random_drop.mean()),
        "cam_beats_random_share": float((cam_drop > random_drop).mean()),
    }


def _ranks(cam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The map's pixel ranks scaled to [0, 1], ties broken at random.

    ROAD thresholds a map at percentiles. A Grad-CAM map is often exactly 0 over a large area,
    and at a tied threshold ROAD removes far more or fewer pixels than the percentile says
    (all of them, when the 20th percentile is 0). Ranks keep the order and make every
    percentile exact.
    """
    perm = rng.permutation(cam.size)
    order = perm[np.argsort(cam.ravel()[perm], kind="stable")]
    ranks = np.empty(cam.size, dtype=np.float32)
    ranks[order] = np.arange(cam.size, dtype=np.float32) / max(cam.size - 1, 1)
    return ranks.reshape(cam.shape)


def road(
    model: CXRNet,
    images: np.ndarray,
    cams: np.ndarray,
    targets: list[int] | np.ndarray,
    *,
    percentiles: list[int] | tuple[int, ...],
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """ROAD (Rong et al. 2022; pytorch-grad-cam's implementation): the change in target-class
    probability when the most relevant pixels (MoRF) or the least relevant (LeRF) are filled
    by noisy linear imputation from their neighbours, averaged over the removal percentiles.

    Faithful: MoRF lowers the probability much more than LeRF, so `combined` =
    (LeRF - MoRF) / 2 > 0. Imputation avoids the artefact of `confidence_drop` (a patch of
    flat grey is itself a feature the model can react to), which is why both are reported.
    """
    rng = np.random.default_rng(seed)
    ranked = np.stack([_ranks(c, rng) for c in cams]) if len(cams) else np.asarray(cams)
    morf = ROADMostRelevantFirstAverage(list(percentiles))
    lerf = ROADLeastRelevantFirstAverage(list(percentiles))
    device = next(model.parameters()).device
    targets = np.asarray(targets, dtype=np.int64)
    model.eval()
    by_morf, by_lerf = [], []
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # the imputer's noise
        # pytorch-grad-cam's imputer passes a torch tensor to np.argwhere: NumPy 2 warns.
        warnings.filterwarnings("ignore", "__array_wrap__ must accept", DeprecationWarning)
        for start in tqdm(range(0, len(images), batch_size), desc="ROAD", leave=False):
            sl = slice(start, start + batch_size)
            x = to_input(images[sl]).to(device)
            t = [ClassifierOutputSoftmaxTarget(int(k)) for k in targets[sl]]
            by_morf.append(morf(x, ranked[sl], t, model))
            by_lerf.append(lerf(x, ranked[sl], t, model))
    m, lr = np.concatenate(by_morf), np.concatenate(by_lerf)
    return {
        "percentiles": [int(q) for q in percentiles],
        "n_images": int(len(m)),
        "morf": float(m.mean()),
        "lerf": float(lr.mean()),
        "combined": float(((lr - m) / 2).mean()),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if a.min() == a.max() or b.min() == b.max():
        # A flat map has no ranking: it agrees with another map only if that one is flat too.
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(spearmanr(a, b).statistic)


def randomisation_correlation(
    model_trained: CXRNet,
    model_random: CXRNet,
    images: np.ndarray,
    targets: list[int] | None = None,
    *,
    method: str,
    batch_size: int,
    trained_cams: np.ndarray | None = None,
    layer: str,
) -> float:
    """Mean Spearman correlation between the trained and the random network's maps for the same
    images and targets (Adebayo et al. 2018). Near 1: the map does not depend on what the model
    learned (an edge detector would pass); low: it does. None targets: the trained model's
    predicted classes, for both networks. `trained_cams`: the trained model's maps for these
    images and targets, if already computed.
    """
    if targets is None:
        targets = predict_proba(model_trained, images).argmax(1).tolist()
    run = {"method": method, "batch_size": batch_size, "layer": layer}
    trained = trained_cams
    if trained is None:
        trained = compute_cams(model_trained, images, targets, **run)
    rand = compute_cams(model_random, images, targets, **run)
    return float(np.mean([_spearman(a, b) for a, b in zip(trained, rand, strict=True)]))


def border_share_by_class(
    cams: np.ndarray, labels: np.ndarray, class_names: list[str], fraction: float
) -> dict[str, float]:
    """Mean border share of the maps of each class present in `labels` (indices)."""
    return {
        name: border_share(cams[labels == c], fraction)
        for c, name in enumerate(class_names)
        if (labels == c).any()
    }


Maps = tuple[np.ndarray, np.ndarray, np.ndarray]  # uint8 images, their maps, the maps' targets


def _plain(value: float) -> float | None:
    """JSON has no NaN: an undefined share (every map empty) becomes null."""
    return float(value) if np.isfinite(value) else None


def map_checks(
    model: CXRNet,
    model_random: CXRNet,
    test: Maps,
    cases: Maps,
    test_labels: np.ndarray,
    class_names: list[str],
    p: GradcamParams,
    *,
    seed: int,
    val: Maps,
) -> dict[str, Any]:
    """The gradcam metrics: faithfulness (grey-fill check on val, test and cases; ROAD on val
    and cases) and border share on test images and cases, model randomisation on the test
    images; border share per true class of the test images. Validation, not test, is what
    `target_layer` may be chosen on."""
    (x, cams, pred), (case_x, case_cams, case_targets) = test, cases
    f = p.border_fraction
    drop = {"top_percent": p.faithfulness_top_percent, "seed": seed}
    imputed = {"percentiles": p.road_percentiles, "seed": seed}
    rho = randomisation_correlation(
        model, model_random, x, pred.tolist(), method=p.method, batch_size=p.batch_size,
        trained_cams=cams, layer=p.target_layer,
    )  # fmt: skip
    by_class = border_share_by_class(cams, test_labels, class_names, f)
    return {
        "method": p.method,
        "target_layer": p.target_layer,
        "n_test_images": len(x),
        "faithfulness": {
            "val": confidence_drop(model, *val, **drop),
            "test": confidence_drop(model, x, cams, pred, **drop),
            "cases": confidence_drop(model, case_x, case_cams, case_targets, **drop),
        },
        "road": {
            "val": road(model, *val, **imputed),
            "cases": road(model, case_x, case_cams, case_targets, **imputed),
        },
        "randomisation": {"spearman": rho},
        "border_share": {
            "fraction": f,
            "cases": _plain(border_share(case_cams, f)),
            "test": {name: _plain(share) for name, share in by_class.items()},
            "uniform_reference": border_share(np.ones(x.shape[1:]), f),
        },
    }


# --- where the map lies relative to the lungs ------------------------------------------------


def case_zone_scores(cams: np.ndarray, masks: np.ndarray, named: list[str]) -> list[dict[str, Any]]:
    """Per case: in-lung share of the map, the lungs' area share, and agreement with the
    zones the radiologist named (`zones` strings like "R-upper;L-lower", patient's side).

    `pointing_hit`: the map's maximum within the lungs lies in a named zone; `chance` is the
    named zones' share of the lung area, the hit rate of a maximum dropped at random inside the
    lungs (and the in-lung mass share a flat map gives them). Whether the map's overall maximum
    lies inside the lungs at all is `peak_in_lungs`, scored for every case with lungs.
    Zone scores are None for a case naming no zone; a case naming all six scores lift 1, hit
    and chance 1 by construction (flagged `all_zones`).
    """
    out = []
    for cam, mask, zones_text in zip(cams, masks, named, strict=True):
        ids = lungs.zone_ids(str(zones_text))
        zones = lungs.lung_zones(mask)
        row: dict[str, Any] = {
            "in_lung_share": _plain(lungs.in_lung_share(cam, mask)),
            "lung_area_share": float(lungs.lung_area_share(mask)),
            "zones": ";".join(lungs.ZONES[i - 1] for i in ids),
            "all_zones": len(set(ids)) == len(lungs.ZONES),
            "peak_in_lungs": None, "zone_lift": None, "pointing_hit": None, "chance": None,
        }  # fmt: skip
        if (zones > 0).any():
            row["peak_in_lungs"] = lungs.peak_in_lungs(cam, zones)
        if ids and (zones > 0).any():
            row["zone_lift"] = _plain(lungs.zone_lift(cam, zones, row["zones"]))
            row["pointing_hit"] = lungs.pointing_hit(cam, zones, row["zones"])
        if row["pointing_hit"] is not None:  # the baseline of exactly the cases scored
            row["chance"] = float(np.isin(zones, ids).sum() / (zones > 0).sum())
        out.append(row)
    return out


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(finite)) if finite else None


def lung_checks(
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    class_names: list[str],
    case_scores: list[dict[str, Any]],
    case_names: list[str],
    *,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """The lung part of metrics/gradcam.json.

    `test` = (maps, predicted lung masks, predicted classes) of test images: in-lung share of
    the maps per predicted class, next to the lungs' area share (what a flat map would score).
    Cases: the same, plus zone lift and pointing hit per case and their means with bootstrap
    CIs, over all cases and over the cases that name only some zones (the informative ones);
    the hit rate (maximum within the lungs) beside its chance over the same cases, and apart
    from it how many maps peak outside the lungs.
    """
    cams, masks, pred = test
    shares, areas = lungs.in_lung_share(cams, masks), lungs.lung_area_share(masks)

    def summary(keep: np.ndarray) -> dict[str, Any]:
        return {"n": int(keep.sum()), "in_lung_share": _mean(list(shares[keep])),
                "lung_area_share": _mean(list(areas[keep]))}  # fmt: skip

    by_class = {name: summary(pred == c) for c, name in enumerate(class_names) if (pred == c).any()}
    ci = {"n_resamples": bootstrap, "seed": seed}
    specific = [r for r in case_scores if not r["all_zones"]]

    def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
        lift = [np.nan if r["zone_lift"] is None else r["zone_lift"] for r in rows]
        hits = [float(r["pointing_hit"]) for r in rows if r["pointing_hit"] is not None]
        outside = [not r["peak_in_lungs"] for r in rows if r["peak_in_lungs"] is not None]
        return {
            "zone_lift": lungs.mean_ci(np.array(lift, dtype=float), **ci),
            "pointing_hit": lungs.mean_ci(np.array(hits, dtype=float), **ci),
            "pointing_chance": _mean([r["chance"] for r in rows]),
            "peak_outside_lungs": {
                "count": int(sum(outside)),
                "n": len(outside),
                "rate": _mean([float(o) for o in outside]),
            },
        }

    return {
        "test": {"all": summary(np.ones(len(pred), dtype=bool)), "by_predicted_class": by_class},
        "cases": {
            "in_lung_share": _mean([r["in_lung_share"] for r in case_scores]),
            "lung_area_share": _mean([r["lung_area_share"] for r in case_scores]),
            "all_cases": agreement(case_scores),
            "cases_naming_some_zones": agreement(specific),
            "per_case": dict(zip(case_names, case_scores, strict=True)),
        },
    }


# --- choosing images --------------------------------------------------------------------------


CASE_CLASS = "covid"


def case_target(class_names: list[str]) -> int:
    """The class every case map explains: COVID-19, which all the case studies show.

    Not each case's predicted class: a COVID-19 film predicted viral would show where the model
    looks for viral pneumonia, then be scored against the radiologist's COVID-19 findings.
    """
    if CASE_CLASS not in class_names:
        raise InputError(f"the case maps need a {CASE_CLASS!r} class; the model has {class_names}")
    return class_names.index(CASE_CLASS)


def sample_indices(n: int, cap: int, seed: int) -> np.ndarray:
    """All of 0..n-1 if n <= cap, else a seeded sorted sample of `cap` of them."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def pick_gallery(
    labels: np.ndarray, predicted: np.ndarray, per_group: int, seed: int
) -> dict[int, dict[str, np.ndarray]]:
    """Per true class, up to `per_group` correct and `per_group` misclassified image indices,
    drawn at random (seeded) so the gallery is not a hand-picked best case."""
    rng = np.random.default_rng(seed)
    out: dict[int, dict[str, np.ndarray]] = {}
    for c in np.unique(labels):
        groups = {
            "correct": np.flatnonzero((labels == c) & (predicted == c)),
            "misclassified": np.flatnonzero((labels == c) & (predicted != c)),
        }
        out[int(c)] = {
            name: np.sort(rng.choice(idx, size=min(per_group, len(idx)), replace=False))
            for name, idx in groups.items()
        }
    return out


# --- figures and the cases page ---------------------------------------------------------------


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """uint8 H x W x 3: the radiograph under a jet-coloured map."""
    gray = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return show_cam_on_image(gray, cam, use_rgb=True, image_weight=image_weight)


def _side_markers(ax: Any, fontsize: float = 11) -> None:
    """'R' at the image's left edge, 'L' at its right: the patient's sides."""
    box = {"facecolor": "black", "alpha": 0.6, "pad": 1.0, "edgecolor": "none"}
    for x, ha, text in ((0.02, "left", "R"), (0.98, "right", "L")):
        ax.text(x, 0.98, text, transform=ax.transAxes, ha=ha, va="top", color="white",
                fontsize=fontsize, fontweight="bold", bbox=box)  # fmt: skip


def _save(fig: Figure, path: Path) -> None:
    """A dithered 256-colour PNG: half the bytes of RGB; undithered palettes band the maps."""
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(DPI)
    canvas.draw()
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    palette = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)


NAMED_COLOUR = "#39ff14"  # the radiologist's zones: bright green, apart from jet's colours
ZONE_LEGEND = (
    "white: predicted lung outline (dotted: zone thirds); green: zones the radiologist named"
)


def _draw_lungs(ax: Any, mask: np.ndarray, named: str) -> None:
    """Lung outline (white), the six zones (dotted white) and the named zones (green, with
    their names) on an image axis. Contours run through pixel centres, as imshow places them."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        ax.text(0.5, 0.04, "no lungs found", transform=ax.transAxes, ha="center",
                color="white", fontsize=7)  # fmt: skip
        return
    zones, ids = lungs.lung_zones(mask), set(lungs.zone_ids(named))
    ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)
    for k, name in enumerate(lungs.ZONES, start=1):
        region = zones == k
        if not region.any():
            continue
        if k in ids:
            ax.contour(region.astype(float), levels=[0.5], colors=NAMED_COLOUR, linewidths=1.4)
            y, x = np.argwhere(region).mean(axis=0)
            ax.text(x, y, name, ha="center", va="center", fontsize=6.5, color="black",
                    bbox={"facecolor": NAMED_COLOUR, "alpha": 0.75, "pad": 0.6,
                          "edgecolor": "none"})  # fmt: skip
        else:
            ax.contour(region.astype(float), levels=[0.5], colors="white", linewidths=0.9,
                       linestyles="dotted")  # fmt: skip


def _score_line(score: dict[str, Any]) -> str:
    """One line of numbers for a case: where its map lies against its lungs and zones."""
    parts = []
    if score.get("in_lung_share") is not None:
        parts.append(f"map mass in lungs {score['in_lung_share']:.2f} "
                     f"(lungs {score['lung_area_share']:.2f} of the image)")  # fmt: skip
    if score.get("zone_lift") is not None:
        parts.append(f"named zones: lift {score['zone_lift']:.2f}")
    if score.get("pointing_hit") is not None:
        hit = "hit" if score["pointing_hit"] else "miss"
        parts.append(f"in-lung maximum {hit} (chance {score['chance']:.2f})")
    if score.get("peak_in_lungs") is False:
        parts.append("maximum outside the lungs")
    return ";  ".join(parts)


def case_figure(
    image: np.ndarray,
    cam: np.ndarray,
    target: int,
    class_names: list[str],
    probs: np.ndarray,
    comment: str,
    title: str,
    path: Path,
    *,
    lung_mask: np.ndarray | None = None,
    zones: str = "",
    score: dict[str, Any] | None = None,
) -> None:
    """Radiograph | overlay of the map for class `target`, the prediction in the title (and the
    map's class beside it when they differ), the radiologist's comment below.

    With `lung_mask`, the overlay also shows the lung outline, the zone thirds and the zones
    the radiologist named (`zones`, patient's side), and `score` (from `case_zone_scores`)
    adds a line of numbers.
    """
    predicted = int(np.argmax(probs))
    fig = Figure(figsize=(7.2, 5.4))
    axes = fig.subplots(1, 2, gridspec_kw={"wspace": 0.05})
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("radiograph", fontsize=9)
    axes[1].imshow(overlay(image, cam))
    axes[1].set_title(
        f"class activation map for {class_names[target]} (p = {probs[target]:.2f})", fontsize=9
    )
    if lung_mask is not None:
        _draw_lungs(axes[1], lung_mask, zones)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        _side_markers(ax)
    heading = f"{title}: predicted {class_names[predicted]} (p = {probs[predicted]:.2f})"
    if predicted != target:
        heading += f"; map for {class_names[target]}"
    fig.suptitle(heading, fontsize=12)
    all_probs = "   ".join(f"{n} {p:.2f}" for n, p in zip(class_names, probs, strict=True))
    caption = textwrap.fill(f"Radiologist: {comment}", width=95)
    lines = [all_probs]
    if lung_mask is not None:
        lines += [ZONE_LEGEND, _score_line(score or {})]
    for i, line in enumerate(lines):
        fig.text(0.5, 0.245 - 0.03 * i, line, ha="center", va="top", fontsize=7.5, color="0.3")
    fig.text(0.5, 0.245 - 0.03 * len(lines) - 0.01, caption, ha="center", va="top", fontsize=8.5)
    fig.text(0.01, 0.01, ORIENTATION_NOTE, ha="left", va="bottom", fontsize=7, color="0.4")
    fig.subplots_adjust(left=0.02, right=0.91, top=0.9, bottom=0.26)
    box = axes[1].get_position()
    cax = fig.add_axes((box.x1 + 0.01, box.y0, 0.015, box.height))
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps["jet"]), cax=cax)
    cax.tick_params(labelsize=7)
    _save(fig, path)


def gallery_figure(
    images: np.ndarray,
    cams: np.ndarray,
    rows_info: list[dict[str, Any]],
    path: Path,
    *,
    title: str = "",
) -> None:
    """Overlays in two rows, correct then misclassified; each tile titled true/pred/prob.

    `rows_info[i]` describes tile i: keys true, pred (class names), prob (of pred).
    """
    groups = {"correct": [], "misclassified": []}
    for i, info in enumerate(rows_info):
        groups["correct" if info["true"] == info["pred"] else "misclassified"].append(i)
    ncols = max(1, *(len(g) for g in groups.values()))
    fig = Figure(figsize=(1.9 * ncols + 0.4, 4.6))
    axes = np.asarray(fig.subplots(2, ncols, squeeze=False))
    for r, (name, members) in enumerate(groups.items()):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{name} ({len(members)})", fontsize=9)
            if c >= len(members):
                ax.set_frame_on(False)
                if c == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=9)
                continue
            i = members[c]
            ax.imshow(overlay(images[i], cams[i]))
            _side_markers(ax, fontsize=7)
            info = rows_info[i]
            ax.set_title(
                f"true {info['true']}\npred {info['pred']} ({info['prob']:.2f})", fontsize=8
            )
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, ORIENTATION_NOTE, fontsize=6.5, color="0.4")
    fig.subplots_adjust(left=0.08, right=0.99, top=0.84, bottom=0.06, hspace=0.35, wspace=0.08)
    _save(fig, path)


def write_case_figures(
    images: np.ndarray,
    cams: np.ndarray,
    probs: np.ndarray,
    cases: pd.DataFrame,
    class_names: list[str],
    out_dir: Path,
    *,
    target: int,
    lung_masks: np.ndarray | None = None,
    scores: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """`cases/<case>.png` for each case, its map for class `target` (see `case_target`), with
    the lungs and named zones drawn when `lung_masks` are given; returns the rows
    `write_cases_page` lays out (with the case's `score`, if any)."""
    rows = []
    for i, case in enumerate(cases.to_dict("records")):
        k = int(probs[i].argmax())
        image = f"cases/{case['case']}.png"
        comment = str(case["radiologist_comment"])
        score = scores[i] if scores is not None else None
        lung = {} if lung_masks is None else {
            "lung_mask": lung_masks[i], "zones": str(case.get("zones", "")), "score": score,
        }  # fmt: skip
        case_figure(images[i], cams[i], target, class_names, probs[i], comment,
                    str(case["case"]), out_dir / image, **lung)  # fmt: skip
        rows.append({**case, "image": image, "predicted": class_names[k],
                     "prob": float(probs[i, k]), "map_class": class_names[target],
                     "map_prob": float(probs[i, target]), "comment": comment,
                     "score": score})  # fmt: skip
    return rows


def write_galleries(
    images: np.ndarray,
    cams: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    gallery: dict[int, dict[str, np.ndarray]],
    class_names: list[str],
    out_dir: Path,
    *,
    method: str,
) -> dict[str, str]:
    """`gallery/<class>.png` per true class from `pick_gallery`; returns {class: relative path}."""
    links = {}
    for c, groups in gallery.items():
        idx = np.concatenate([groups["correct"], groups["misclassified"]]).astype(int)
        info = [
            {
                "true": class_names[labels[j]],
                "pred": class_names[probs[j].argmax()],
                "prob": float(probs[j].max()),
            }
            for j in idx
        ]
        links[class_names[c]] = f"gallery/{class_names[c]}.png"
        title = f"true class {class_names[c]}: test images ({method})"
        gallery_figure(images[idx], cams[idx], info, out_dir / links[class_names[c]], title=title)
    return links


def write_cases_page(
    rows: list[dict[str, Any]],
    path: Path,
    *,
    method: str,
    galleries: dict[str, str] | None = None,
    layer: str,
) -> None:
    """One Markdown page with every case: figure, prediction, comment, zones, credit.

    `rows[i]` keys: case, image (path relative to the page), label, predicted, prob, comment,
    zones (';'-separated), case_url, license, and optionally score (`case_zone_scores`).
    """
    grid = "image size / 32" if layer == "layer4" else "image size / 16"
    lines = [
        f"# Class activation maps ({method}): {len(rows)} case studies",
        "",
        "COVID-19 radiographs from Radiopaedia, each shown with the four-class model's prediction",
        "and the radiologist's comment. Every map is the one for the COVID-19 class, whatever the",
        "model predicted, so that it is scored against the COVID-19 findings the radiologist",
        f"described. The map is upsampled from the last block of `{layer}`,",
        f"a coarse grid ({grid}), so it marks regions, not lesions, and it shows where the",
        "model looked, not whether it was right. The zones are from the patient's point of view;",
        "on every image the patient's right (R) is on the image's **left**.",
        "",
        "On the overlay, white is the lung outline predicted by the segmenter (dotted: each",
        "lung's upper, mid and lower thirds) and green the zones the radiologist named. Zone",
        "lift = share of the in-lung map mass in the named zones / their share of the lung area",
        "(1 = no preference; exactly 1 when all six zones are named); pointing hit = the map's",
        "maximum within the lungs lies in a named zone (chance = the named zones' share of the",
        "lung area); a map whose overall maximum lies outside the lungs is noted on its own.",
        "",
    ]
    if galleries:
        links = ", ".join(f"[{name}]({link})" for name, link in galleries.items())
        lines += [f"Test-set galleries (correct and misclassified, per true class): {links}.", ""]
    for row in rows:
        zones = ", ".join(z for z in str(row["zones"]).split(";") if z) or "none given"
        lines += [
            f"## {row['case']}",
            "",
            f"![{row['case']}: {method} overlay]({row['image']})",
            "",
            f"- Prediction: **{row['predicted']}** (p = {row['prob']:.2f}); label: {row['label']}",
            f"- Map for: **{row['map_class']}** (p = {row['map_prob']:.2f})"
            + ("" if row["map_class"] == row["predicted"] else ", not the predicted class"),
            f"- Radiologist: {row['comment']}",
            f"- Zones named (patient's view): {zones}",
        ]
        if row.get("score"):
            lines.append(f"- Map vs lungs: {_score_line(row['score'])}")
        lines += [
            f"- Source: [{row['case_url']}]({row['case_url']}), licence: {row['license']}",
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
