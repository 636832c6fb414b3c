"""Class activation maps and checks on them: where the map lies, whether it is faithful, whether
it depends on the learned weights at all. pytorch-grad-cam computes the maps.

A map here is H x W float32 in [0, 1] at the input image's size, upsampled from the target
layer's grid (S/32 x S/32 for a ResNet: 4 x 4 at 112 px), so it is coarse by construction.
Orientation: images are stored as radiographs are read, so the patient's right is on the
image's LEFT.
"""

from __future__ import annotations

import logging
import textwrap
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
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy.stats import spearmanr
from tqdm import tqdm

from cxr.config import GradcamParams
from cxr.data import to_input
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
DPI = 100  # figures live in git: keep each PNG well under ~150 kB
ORIENTATION_NOTE = "R = patient's right, shown on the image's left (radiological convention)"


# --- maps -------------------------------------------------------------------------------------


def cam_class(method: str) -> type[BaseCAM]:
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {list(METHODS)}")
    return METHODS[method]


def compute_cams(
    model: CXRNet,
    images: np.ndarray,
    targets: list[int] | None = None,
    *,
    method: str = "gradcam",
    batch_size: int = 8,
) -> np.ndarray:
    """N x H x W maps in [0, 1] for uint8 N x H x W images, on `model.cam_layer`.

    `targets` are class indices (None: each image's predicted class). Every map is min-max
    scaled by pytorch-grad-cam, so maps show where, not how much; compare them by rank or share.
    """
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    cam = cam_class(method)(model=model, target_layers=[model.cam_layer])  # also sets eval()
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


def border_mask(shape: tuple[int, int], fraction: float = 0.12) -> np.ndarray:
    """True in the outer band: round(fraction * side) pixels on each of the four sides."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"border fraction must be in (0, 0.5), got {fraction}")
    h, w = shape
    bh, bw = int(fraction * h + 0.5), int(fraction * w + 0.5)
    mask = np.ones((h, w), dtype=bool)
    mask[bh : h - bh, bw : w - bw] = False
    return mask


def border_share(cam: np.ndarray, fraction: float = 0.12) -> float:
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
    top_percent: float = 20.0,
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
    method: str = "gradcam",
    batch_size: int = 8,
    trained_cams: np.ndarray | None = None,
) -> float:
    """Mean Spearman correlation between the trained and the random network's maps for the same
    images and targets (Adebayo et al. 2018). Near 1: the map does not depend on what the model
    learned (an edge detector would pass); low: it does. None targets: the trained model's
    predicted classes, for both networks. `trained_cams`: the trained model's maps for these
    images and targets, if already computed.
    """
    if targets is None:
        targets = predict_proba(model_trained, images).argmax(1).tolist()
    trained = trained_cams
    if trained is None:
        trained = compute_cams(model_trained, images, targets, method=method, batch_size=batch_size)
    rand = compute_cams(model_random, images, targets, method=method, batch_size=batch_size)
    return float(np.mean([_spearman(a, b) for a, b in zip(trained, rand, strict=True)]))


def border_share_by_class(
    cams: np.ndarray, labels: np.ndarray, class_names: list[str], fraction: float = 0.12
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
) -> dict[str, Any]:
    """The gradcam metrics: faithfulness and border share on test images and cases, model
    randomisation on the test images; border share per true class of the test images."""
    (x, cams, pred), (case_x, case_cams, case_pred) = test, cases
    f = p.border_fraction
    drop = {"top_percent": p.faithfulness_top_percent, "seed": seed}
    rho = randomisation_correlation(
        model, model_random, x, pred.tolist(), method=p.method, batch_size=p.batch_size,
        trained_cams=cams,
    )  # fmt: skip
    by_class = border_share_by_class(cams, test_labels, class_names, f)
    return {
        "method": p.method,
        "n_test_images": len(x),
        "faithfulness": {
            "test": confidence_drop(model, x, cams, pred, **drop),
            "cases": confidence_drop(model, case_x, case_cams, case_pred, **drop),
        },
        "randomisation": {"spearman": rho},
        "border_share": {
            "fraction": f,
            "cases": _plain(border_share(case_cams, f)),
            "test": {name: _plain(share) for name, share in by_class.items()},
            "uniform_reference": border_share(np.ones(x.shape[1:]), f),
        },
    }


# --- choosing images --------------------------------------------------------------------------


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


def case_figure(
    image: np.ndarray,
    cam: np.ndarray,
    predicted: int,
    prob: float,
    class_names: list[str],
    probs: np.ndarray,
    comment: str,
    title: str,
    path: Path,
) -> None:
    """Radiograph | overlay, the prediction in the title, the radiologist's comment below."""
    fig = Figure(figsize=(7.2, 5.1))
    axes = fig.subplots(1, 2, gridspec_kw={"wspace": 0.05})
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("radiograph", fontsize=9)
    axes[1].imshow(overlay(image, cam))
    axes[1].set_title("class activation map", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        _side_markers(ax)
    fig.suptitle(f"{title}: predicted {class_names[predicted]} (p = {prob:.2f})", fontsize=12)
    all_probs = "   ".join(f"{n} {p:.2f}" for n, p in zip(class_names, probs, strict=True))
    caption = textwrap.fill(f"Radiologist: {comment}", width=95)
    fig.text(0.5, 0.19, all_probs, ha="center", va="top", fontsize=8, color="0.3")
    fig.text(0.5, 0.15, caption, ha="center", va="top", fontsize=8.5)
    fig.text(0.01, 0.01, ORIENTATION_NOTE, ha="left", va="bottom", fontsize=7, color="0.4")
    fig.subplots_adjust(left=0.02, right=0.91, top=0.89, bottom=0.21)
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
) -> list[dict[str, Any]]:
    """`cases/<case>.png` for each case (the map's target is the predicted class); returns
    the rows `write_cases_page` lays out."""
    rows = []
    for i, case in enumerate(cases.to_dict("records")):
        k = int(probs[i].argmax())
        image = f"cases/{case['case']}.png"
        comment = str(case["radiologist_comment"])
        case_figure(images[i], cams[i], k, float(probs[i, k]), class_names, probs[i], comment,
                    str(case["case"]), out_dir / image)  # fmt: skip
        rows.append({**case, "image": image, "predicted": class_names[k],
                     "prob": float(probs[i, k]), "comment": comment})  # fmt: skip
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
    method: str = "gradcam",
    galleries: dict[str, str] | None = None,
) -> None:
    """One Markdown page with every case: figure, prediction, comment, zones, credit.

    `rows[i]` keys: case, image (path relative to the page), label, predicted, prob, comment,
    zones (';'-separated), case_url, license.
    """
    lines = [
        f"# Class activation maps ({method}): {len(rows)} case studies",
        "",
        "COVID-19 radiographs from Radiopaedia, each shown with the four-class model's prediction",
        "and the radiologist's comment. The map is upsampled from the last residual block's",
        "coarse grid (image size / 32), so it marks regions, not lesions, and it shows where the",
        "model looked, not whether it was right. The zones are from the patient's point of view;",
        "on every image the patient's right (R) is on the image's **left**.",
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
            f"- Radiologist: {row['comment']}",
            f"- Zones named (patient's view): {zones}",
            f"- Source: [{row['case_url']}]({row['case_url']}), licence: {row['license']}",
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
