"""Lung fields as geometry: post-processing a predicted mask, cropping to the lungs, lung zones,
and where a class activation map lies relative to them.

Pure functions on NumPy arrays. A mask is H x W, true (or > 0) on lung; the value 127 in a
stored mask means "ignore" (a device or markup over the lung) and is handled by the callers
that score masks (`dice_iou`). Orientation: images are stored as radiographs are read, so the
patient's right lung is on the image's LEFT; zone names use the patient's side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from cxr.arrays import load_split
from cxr.errors import InputError
from cxr.images import resize

if TYPE_CHECKING:  # annotations only: pandas is imported where a table is read
    import pandas as pd

LUNG, IGNORE = 255, 127  # values in a stored mask; everything else is background
# Label i + 1 of a zone map is ZONES[i]; 0 is outside the lungs.
ZONES = ("R-upper", "R-mid", "R-lower", "L-upper", "L-mid", "L-lower")


# --- masks ----------------------------------------------------------------------------------


def keep_largest(mask: np.ndarray, *, n: int = 2, min_fraction: float = 0.005) -> np.ndarray:
    """The `n` largest connected components of a boolean mask, holes filled.

    Two lungs, so two components; stray islands (a bright shoulder, a marker) go. A component
    smaller than `min_fraction` of the image is noise even if it is among the two largest (one
    lung of a pair that touch is not a second component, it is part of the first).
    """
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")[:n]
    keep = [i + 1 for i in order if sizes[i] >= min_fraction * mask.size]
    kept = np.isin(labels, keep)
    # Holes: the heart shadow and lesions inside the lung field are lung for these masks.
    return ndimage.binary_fill_holes(kept)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of a predicted boolean mask against a stored mask (255 lung, 127 ignore).

    Ignored pixels count neither way. Both empty: (1, 1), a correct "no lung".
    """
    truth = np.asarray(truth)
    valid = truth != IGNORE
    p, t = np.asarray(pred, dtype=bool) & valid, (truth == LUNG) & valid
    inter, total, union = (p & t).sum(), p.sum() + t.sum(), (p | t).sum()
    if union == 0:
        return 1.0, 1.0
    return float(2 * inter / total), float(inter / union)


# --- cropping -------------------------------------------------------------------------------


def lung_box(
    mask: np.ndarray, *, margin: float = 0.1, min_area: float = 0.05, min_side: float = 0.25
) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), end-exclusive: the lungs' bounding box grown by `margin` of
    its height and width on each side and clipped to the image; None when the mask is empty or
    implausible (lungs under `min_area` of the image, or a box under `min_side` of a side),
    where cropping to it would throw the chest away."""
    mask = np.asarray(mask) > 0
    h, w = mask.shape
    if mask.sum() < min_area * mask.size:
        return None
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if bottom - top < min_side * h or right - left < min_side * w:
        return None
    dy, dx = int(round(margin * (bottom - top))), int(round(margin * (right - left)))
    return max(0, top - dy), min(h, bottom + dy), max(0, left - dx), min(w, right + dx)


def crop_to_lungs(
    image: np.ndarray, mask: np.ndarray, *, margin: float = 0.1, size: int | None = None
) -> np.ndarray:
    """uint8 image(s) cropped to the lungs' box (`lung_box`) and squashed to size x size.

    One H x W image with one mask, or N x H x W with N masks. Where the box is None the whole
    image is resized: no crop beats a crop to a wrong box. `size` None: the input's size.
    Squashed, not padded, because the whole pipeline squashes (see cxr.images).
    """
    image, mask = np.asarray(image), np.asarray(mask)
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    if image.ndim == 3:
        return np.stack(
            [
                crop_to_lungs(x, m, margin=margin, size=size)
                for x, m in zip(image, mask, strict=True)
            ]
        )
    if image.ndim != 2:
        raise ValueError(f"expected H x W or N x H x W, got shape {image.shape}")
    size = size or image.shape[0]
    box = lung_box(mask, margin=margin)
    if box is not None:
        top, bottom, left, right = box
        image = image[top:bottom, left:right]
    return resize(np.ascontiguousarray(image, dtype=np.uint8), size)


def mask_to_lungs(image: np.ndarray, mask: np.ndarray, *, margin: float = 0.1) -> np.ndarray:
    """uint8 image(s) with every pixel farther than `margin` of the image side from the lungs
    set to 0: the framing and scale stay, whatever lies outside the chest's lungs (text, markers,
    shoulders, the body's outline) goes. One H x W image with one mask, or N x H x W with N
    masks. Where the lungs are implausible (`lung_box` None) the image is left whole, as
    `crop_to_lungs` leaves it: no mask beats a mask of the wrong thing."""
    image, mask = np.asarray(image), np.asarray(mask) > 0
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    if image.ndim == 3:
        return np.stack(
            [mask_to_lungs(x, m, margin=margin) for x, m in zip(image, mask, strict=True)]
        )
    if image.ndim != 2:
        raise ValueError(f"expected H x W or N x H x W, got shape {image.shape}")
    if lung_box(mask) is None:
        return np.asarray(image, dtype=np.uint8).copy()
    # Euclidean distance to the nearest lung pixel: a round margin, not a square one.
    keep = ndimage.distance_transform_edt(~mask) <= margin * image.shape[0]
    return np.where(keep, image, 0).astype(np.uint8)


# Plausible lung area, as a share of the image. Over the 7,318 predicted masks of the full data
# (every source, children and adults) the share ran from 0.091 to 0.654: the limits sit outside
# that range, so real frontal radiographs pass and a blank, a hand or a text page does not.
LUNG_AREA_RANGE = (0.05, 0.75)


def implausible_lungs(mask: np.ndarray) -> str:
    """Why a predicted mask is not a plausible pair of lungs ("" when it is): too little or
    too much lung, or a lung region too small to crop to (`lung_box`)."""
    mask = np.asarray(mask) > 0
    share = float(mask.mean())
    low, high = LUNG_AREA_RANGE
    if not low <= share <= high:
        return (
            f"no plausible pair of lungs (lung area {share:.0%} of the image, expected "
            f"{low:.0%}-{high:.0%}): not a frontal chest radiograph?"
        )
    if lung_box(mask) is None:
        return "no plausible pair of lungs (lung region too small): not a frontal chest radiograph?"
    return ""


def load_lung_masks(directory: Path, name: str, table: pd.DataFrame) -> np.ndarray:
    """The segment stage's boolean lung masks for split `name`, checked row by row."""
    masks, lung_table = load_split(directory, name)
    if list(lung_table["path"]) != list(table["path"]):
        raise InputError(f"{directory}/{name}.csv rows are not those of the split: re-run segment")
    return masks > 0


def crop_inputs(
    images: np.ndarray,
    masks: np.ndarray | Callable[[], np.ndarray] | None,
    preprocessing: dict,
) -> np.ndarray:
    """A checkpoint's model input from preprocessed images: unchanged, (`crop: lungs`) cropped
    to each image's lungs, or (`crop: mask`) blanked outside them. Training, evaluate, gradcam,
    the out-of-source folds and predict all call this, so "crop when asked" is decided in one
    place. `masks` may be a function that reads them: it is called only when the model crops,
    so a model without the crop needs no segment stage output."""
    if preprocessing.get("crop", "none") == "none" or len(images) == 0:
        return images
    if callable(masks):
        masks = masks()
    if masks is None:
        crop = preprocessing["crop"]
        raise InputError(f"this model crops to the lungs (crop: {crop}) but got no lung masks")
    margin = float(preprocessing["crop_margin"])  # written with crop in every checkpoint
    masks = (np.asarray(masks) > 0).astype(np.uint8)
    if preprocessing["crop"] == "mask":
        return mask_to_lungs(images, masks, margin=margin)
    return crop_to_lungs(images, masks, margin=margin)


# --- zones ----------------------------------------------------------------------------------


def _sides(mask: np.ndarray) -> np.ndarray:
    """0 outside, 1 on the patient's right lung (image left), 2 on the left lung.

    Two or more components: the two largest are the lungs, by their centroids' columns; any
    other piece goes to the side of the nearer centroid. One component (the lungs touch): the
    split is the middle column of the mask's bounding box.
    """
    labels, count = ndimage.label(mask)
    side = np.zeros(mask.shape, dtype=np.int8)
    cols = np.broadcast_to(np.arange(mask.shape[1])[None, :], mask.shape)
    if count >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        a, b = np.argsort(-sizes, kind="stable")[:2]
        cx = np.array([c for _, c in ndimage.center_of_mass(mask, labels, range(1, count + 1))])
        split = (cx[a] + cx[b]) / 2.0
        for k in range(count):
            side[labels == k + 1] = 1 if cx[k] < split else 2
        return side
    if count == 1:
        columns = np.flatnonzero(mask.any(0))
        split = (columns[0] + columns[-1] + 1) / 2.0  # pixel centres left of it: image left
        side[mask & (cols + 0.5 < split)] = 1
        side[mask & (cols + 0.5 >= split)] = 2
    return side


def lung_zones(mask: np.ndarray) -> np.ndarray:
    """int8 H x W label map: 0 outside, i + 1 in zone ZONES[i] (R-upper .. L-lower).

    Each lung (see `_sides`) is cut into upper, mid and lower thirds of its own height (rows
    from its top to its bottom pixel), so a lung lower on the film still has three zones.
    "R" is the patient's right: the lung on the image's LEFT.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"lung_zones takes one H x W mask, got shape {mask.shape}")
    side = _sides(mask)
    zones = np.zeros(mask.shape, dtype=np.int8)
    rows = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)
    for s in (1, 2):
        here = side == s
        if not here.any():
            continue
        r = rows[here]
        top, height = r.min(), r.max() + 1 - r.min()
        third = np.minimum(3 * (r - top) // height, 2)  # 0, 1, 2 = upper, mid, lower
        zones[here] = 3 * (s - 1) + third + 1
    return zones


def zone_ids(named: str | list[str]) -> list[int]:
    """Zone labels for names such as "R-upper;L-lower" (cases.csv `zones`) or a list of them."""
    names = [z.strip() for z in named.split(";")] if isinstance(named, str) else list(named)
    names = [z for z in names if z]
    unknown = sorted(set(names) - set(ZONES))
    if unknown:
        raise InputError(f"unknown lung zone(s) {unknown}; zones are {list(ZONES)}")
    return [ZONES.index(z) + 1 for z in names]


# --- where the map lies ----------------------------------------------------------------------


def _share(cam: np.ndarray, region: np.ndarray) -> float:
    cam = np.asarray(cam, dtype=np.float64)
    total = cam.sum()
    return float(cam[np.asarray(region, dtype=bool)].sum() / total) if total > 0 else float("nan")


def in_lung_share(cam: np.ndarray, mask: np.ndarray) -> float | np.ndarray:
    """Share of a map's mass inside the lungs: a float, or one per map for N x H x W stacks.

    Compare with `lung_area_share`: a map that ignores the lungs entirely still puts that much
    of its mass on them if it is flat. NaN for a map with no mass.
    """
    cam, mask = np.asarray(cam), np.asarray(mask) > 0
    if cam.shape != mask.shape:
        raise ValueError(f"map {cam.shape} and mask {mask.shape} differ in shape")
    if cam.ndim == 3:
        return np.array([_share(c, m) for c, m in zip(cam, mask, strict=True)])
    return _share(cam, mask)


def lung_area_share(mask: np.ndarray) -> float | np.ndarray:
    """The lungs' share of the image area (one per mask for N x H x W)."""
    mask = np.asarray(mask) > 0
    return mask.mean(axis=(-2, -1)) if mask.ndim == 3 else float(mask.mean())


def zone_lift(cam: np.ndarray, zones: np.ndarray, named: str | list[str]) -> float:
    """(share of the in-lung map mass in the named zones) / (their share of the lung area).

    1 is what a flat map scores, > 1 means the map favours the zones the radiologist named.
    Naming all six zones gives exactly 1 whatever the map: such cases carry no information
    here. NaN when the lungs hold no map mass or the named zones are empty.
    """
    cam, zones = np.asarray(cam, dtype=np.float64), np.asarray(zones)
    lung = zones > 0
    inside = np.isin(zones, zone_ids(named))
    mass, area = cam[lung].sum(), lung.sum()
    if mass <= 0 or not inside.any():
        return float("nan")
    return float((cam[inside].sum() / mass) / (inside.sum() / area))


def _plateau(cam: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The pixels of `where` at the map's maximum over `where`, up to float rounding.

    Maps are max-normalised, so a plateau at the top can hold several pixels: callers take a
    majority of it rather than whichever pixel comes first in raster order.
    """
    return where & (cam >= cam[where].max() - 1e-6)


def peak_in_lungs(cam: np.ndarray, zones: np.ndarray) -> bool | None:
    """True when the map's maximum (at least half of its plateau) lies inside the lungs; None
    for a flat map, which has no maximum to place."""
    cam = np.asarray(cam, dtype=np.float64)
    if cam.max() <= cam.min():
        return None
    lung = np.asarray(zones) > 0
    return bool(lung[_plateau(cam, np.ones(cam.shape, dtype=bool))].mean() >= 0.5)


def pointing_hit(cam: np.ndarray, zones: np.ndarray, named: str | list[str]) -> bool | None:
    """True when the map's maximum within the lungs lies in a named zone (the pointing game).

    Scored inside the lungs so that it matches its chance baseline, the named zones' share of
    the lung area (what a maximum dropped at random inside the lungs scores): a peak off the
    lungs is not a miss here but counted on its own (`peak_in_lungs`). Mixing the two made "5 of
    19 hits vs chance 0.60" compare a rate lowered by off-lung peaks with a baseline that
    assumed none. At least half of the in-lung plateau must lie in the named zones. None when
    the map is flat inside the lungs (nothing there to point with; all zero, say).
    """
    cam = np.asarray(cam, dtype=np.float64)
    zones = np.asarray(zones)
    lung = zones > 0
    if not lung.any() or cam[lung].max() <= cam[lung].min():
        return None
    inside = np.isin(zones, zone_ids(named))
    return bool(inside[_plateau(cam, lung)].mean() >= 0.5)


def mean_ci(
    values: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float | int | None]:
    """Mean of the finite values with a percentile bootstrap CI: {mean, low, high, n}.

    Each value is its own group (one per case), so scipy.stats.bootstrap's plain resampling is
    the patient bootstrap here. Percentile intervals, as cxr.metrics.bootstrap_ci gives
    elsewhere; all values equal gives the degenerate interval [mean, mean].
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(values.mean())
    if np.all(values == values[0]):  # scipy warns and gives NaN bounds for a degenerate sample
        return {"mean": mean, "low": mean, "high": mean, "n": int(len(values))}
    from scipy import stats  # 0.5 s of imports a one-film predict does not need

    ci = stats.bootstrap(
        (values,), np.mean, n_resamples=n_resamples, confidence_level=level,
        method="percentile", rng=np.random.default_rng(seed),
    ).confidence_interval  # fmt: skip
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high), "n": int(len(values))}
