"""Perceptual near-duplicates: the same picture saved twice with different bytes.

Hashes and group ids miss a picture that two sources re-encoded (7 of the 19 Grad-CAM cases are
ieee8023 images with another sha256). Pictures are compared instead: each preprocessed image is
shrunk to a THUMBNAIL x THUMBNAIL grayscale thumbnail (area average, which washes out JPEG noise
and small resampling differences), centred and scaled to unit length, and two images whose
thumbnails correlate at >= THRESHOLD are the same picture.

Threshold, measured on the full mirror (7,301 images + 19 cases, 112 px, harmonised): the known
duplicates (the 7 case twins, and one NIH image listed both as `nih` pneumonia and `rsna` normal)
correlate at 1.000; the highest correlation between two different pictures is 0.976 (two Kermany
children of one hospital, same age, same positioning). 0.99 sits in that gap. A cropped,
rotated or contrast-stretched copy may fall below it: this finds re-encodings, not edits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

THUMBNAIL = 32
THRESHOLD = 0.99


@dataclass(frozen=True)
class Pair:
    """Rows i < j of one table whose pictures are near-duplicates."""

    i: int
    j: int
    correlation: float


def thumbnails(images: np.ndarray, size: int = THUMBNAIL) -> torch.Tensor:
    """N x H x W uint8 -> N x size*size float rows, zero-mean and unit-length (flat ones: zero)."""
    x = torch.as_tensor(images).float().unsqueeze(1)
    x = F.adaptive_avg_pool2d(x, size).flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    # A constant image has no pattern to compare; a zero row correlates 0 with everything.
    return torch.where(norm > 1e-6, x / norm.clamp_min(1e-6), torch.zeros_like(x))


def near_duplicate_pairs(
    images: np.ndarray, *, threshold: float = THRESHOLD, block: int = 2048
) -> list[Pair]:
    """Every pair of rows whose thumbnails correlate at >= threshold (blockwise, O(N) memory)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    thumbs = thumbnails(images)
    pairs = []
    for start in range(0, len(thumbs), block):
        corr = thumbs[start : start + block] @ thumbs.T
        rows, cols = torch.nonzero(corr >= threshold - 1e-6, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if i < c:  # each unordered pair once, never an image with itself
                pairs.append(Pair(i, c, round(float(corr[r, c]), 4)))
    return pairs
