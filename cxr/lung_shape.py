"""Lung-shape plausibility: is a predicted lung mask the two lungs of an upright frontal film?

One of the out-of-distribution gate's two checks (cxr/ood.py): a lateral film, a rotated or
upside-down one, a crop to one lung or two films side by side give lung masks of the wrong
number, size, shape or place. The limits are params.yaml `ood:` (chosen on the validation films'
masks, docs/ood.md); this module only measures the pieces and compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from cxr.ood import OodParams


@dataclass(frozen=True)
class Lung:
    """One connected piece of a lung mask, in image fractions (rows down, columns right)."""

    share: float  # area / image area
    row: float  # centroid
    col: float
    aspect: float  # box height / box width
    taper: float  # mean width over the lower third of its rows / over the upper third


def describe_lung(piece: np.ndarray) -> Lung:
    h, w = piece.shape
    rows = np.flatnonzero(piece.any(1))
    cols = np.flatnonzero(piece.any(0))
    height, width = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    widths = piece[rows[0] : rows[-1] + 1].sum(1).astype(np.float64)
    third = max(1, len(widths) // 3)
    upper, lower = widths[:third].mean(), widths[-third:].mean()
    r, c = ndimage.center_of_mass(piece)
    return Lung(
        share=float(piece.mean()),
        row=float((r + 0.5) / h),
        col=float((c + 0.5) / w),
        aspect=float(height / width),
        taper=float(lower / upper) if upper > 0 else float("inf"),
    )


def lungs_of(mask: np.ndarray) -> list[Lung]:
    """The two largest pieces of a mask (fewer when there are fewer), left to right."""
    mask = np.asarray(mask) > 0
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    largest = np.argsort(-sizes, kind="stable")[:2]
    return sorted((describe_lung(labels == i + 1) for i in largest), key=lambda lung: lung.col)


def lung_reasons(mask: np.ndarray, p: OodParams) -> list[str]:
    """Why a predicted lung mask is not the two lungs of a frontal film ([] when it is)."""
    found = lungs_of(mask)
    if len(found) < 2 or not found[0].col < 0.5 < found[1].col:
        return ["lungs not found on both sides of the midline (rotated, lateral or cropped?)"]
    left, right = found
    reasons = []
    shares = (left.share, right.share)
    balance = min(shares) / max(shares)
    if min(shares) < p.min_lung_share or max(shares) > p.max_lung_share or balance < p.min_balance:
        reasons.append(
            f"lungs of implausible size ({left.share:.0%} and {right.share:.0%} of the image; "
            f"expected {p.min_lung_share:.0%}-{p.max_lung_share:.0%} each, the smaller at least "
            f"{p.min_balance:.0%} of the larger)"
        )
    aspects = (left.aspect, right.aspect)
    if min(aspects) < p.min_aspect or max(aspects) > p.max_aspect:
        reasons.append(
            f"lungs not upright (height/width {left.aspect:.2f} and {right.aspect:.2f}, expected "
            f"{p.min_aspect:.2f}-{p.max_aspect:.2f}; rotated, squashed or side by side?)"
        )
    tilt = abs(left.row - right.row) / (right.col - left.col)
    if tilt > p.max_tilt:
        reasons.append(f"lungs not at one level (tilt {tilt:.2f} > {p.max_tilt:.2f}; rotated?)")
    if min(left.taper, right.taper) < p.min_taper:
        reasons.append(
            f"lung apices not at the top (base/apex width {left.taper:.2f} and "
            f"{right.taper:.2f}, expected >= {p.min_taper:.2f}; upside down?)"
        )
    offset = abs((left.col + right.col) / 2 - 0.5)
    if offset > p.max_offset:
        reasons.append(
            f"lungs off the image's centre ({offset:.0%} of its width > {p.max_offset:.0%}; "
            "cropped, or part of a larger picture?)"
        )
    return reasons
