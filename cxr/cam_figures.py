"""Which maps to show and how: the seeded gallery sample, the case figures with the
radiologist's zones drawn, the galleries and the Markdown cases page (reports/gradcam/).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from cxr import lungs
from cxr.cam import DPI, ORIENTATION_NOTE, overlay
from cxr.errors import InputError

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
