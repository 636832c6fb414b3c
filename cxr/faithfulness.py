"""Checks on class activation maps: how much of a map lies on the image's border, whether
removing what it points at changes the prediction (grey-fill and ROAD), and whether it depends on
the learned weights at all (model randomisation). The maps come from cxr.cam.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import (
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirstAverage,
)
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
)
from scipy.stats import spearmanr
from tqdm import tqdm

from cxr.cam import compute_cams
from cxr.config import GradcamParams
from cxr.data import to_input
from cxr.infer import predict_proba
from cxr.models import CXRNet

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


def finite_or_none(value: float) -> float | None:
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
            "cases": finite_or_none(border_share(case_cams, f)),
            "test": {name: finite_or_none(share) for name, share in by_class.items()},
            "uniform_reference": border_share(np.ones(x.shape[1:]), f),
        },
    }
