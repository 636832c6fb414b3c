"""Arrays to tensors, batched augmentation, labels and class balancing."""

from __future__ import annotations

import math
import os
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import WeightedRandomSampler

from cxr.config import (
    ADVERSARY_WITHIN,
    BALANCE_BY,
    BINARY_CLASSES,
    FOUR_CLASSES,
    LABELS,
    PARTIAL_LABELS,
    AugmentParams,
    TrainParams,
)
from cxr.images import jpeg_round_trip

if TYPE_CHECKING:  # annotations only: pandas is imported where a table is read
    import pandas as pd

UNKNOWN = -1  # label index of a row whose class is only known as a set (see allowed_classes)


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator for sampling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for repeatable GEMMs; read when CUDA first starts, so
        # it has to be set before any GPU work (a user's own setting wins).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def _check_labels(table: pd.DataFrame) -> None:
    unknown = sorted(set(table["label"]) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown label(s) {unknown} in manifest; expected {LABELS}")


def labels_for(table: pd.DataFrame, task: str) -> np.ndarray:
    """Integer labels of a split manifest for a task (binary: 1 = COVID-19).

    Four-class rows whose type is unknown (`pneumonia`) get UNKNOWN (-1): they have no single
    class, so metrics that need one leave them out and training uses `allowed_classes`.
    """
    _check_labels(table)
    if task == "binary":
        return (table["label"] == "covid").to_numpy(dtype=np.int64)
    index = {name: i for i, name in enumerate(FOUR_CLASSES)}
    return table["label"].map(index).fillna(UNKNOWN).to_numpy(dtype=np.int64)


def allowed_classes(table: pd.DataFrame, task: str) -> np.ndarray:
    """N x K boolean mask of the classes each row may belong to (one True for a known label).

    The target of the partial-label loss: a `pneumonia` row allows viral and bacterial.
    """
    _check_labels(table)
    names = BINARY_CLASSES if task == "binary" else FOUR_CLASSES
    if task == "binary":
        covid = (table["label"] == "covid").to_numpy()
        return np.stack([~covid, covid], axis=1)
    mask = np.zeros((len(table), len(names)), dtype=bool)
    for i, label in enumerate(table["label"]):
        for name in PARTIAL_LABELS.get(label, (label,)):
            mask[i, names.index(name)] = True
    return mask


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W -> float N x 1 x H x W in [0, 1], channels_last (faster convs on CPU).

    A tensor stays on its device, so a batch copied to the GPU as uint8 is converted there.
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = np.array(images)  # a slice of a read-only memory map: copy just these rows
    x = torch.as_tensor(images)
    x = x.unsqueeze(1).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def gather(
    images: np.ndarray | torch.Tensor, idx: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Rows `idx` of a uint8 N x H x W array as a uint8 tensor on `device`.

    Only the batch's rows are read, so a memory-mapped split is never loaded whole. On a GPU the
    batch goes through pinned memory with a non-blocking copy: the host gathers the next batch
    while the device is still busy with this one.
    """
    if isinstance(images, torch.Tensor):
        batch = images[idx]
    else:
        batch = torch.from_numpy(np.asarray(images[idx.numpy()]))  # fancy indexing copies
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def draw_affine(n: int, aug: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """n x 2 x 3 affine matrices: one random flip, rotation, scale and shift per image.

    Drawn on the CPU from `generator` (the same stream whatever device trains), in a fixed order:
    angle, scale, shift x, shift y, then flip.
    """

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-aug.degrees, aug.degrees) * (math.pi / 180.0)
    scale = uniform(aug.scale[0], aug.scale[1])
    tx, ty = uniform(-aug.translate, aug.translate), uniform(-aug.translate, aug.translate)
    flip = torch.ones(n)
    if aug.hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output coords to input coords; translate is a fraction of the image,
    # and normalised coordinates span 2, hence the factor 2.
    return torch.stack(
        [
            torch.stack([cos * flip, -sin, 2 * tx], dim=1),
            torch.stack([sin * flip, cos, 2 * ty], dim=1),
        ],
        dim=1,
    )


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp a batch N x C x H x W by per-image matrices in one grid_sample, on x's device."""
    theta = theta.to(device=x.device, dtype=x.dtype, non_blocking=True)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


def augment_batch(x: torch.Tensor, aug: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Random flip + affine (rotation, translation, scale) for a whole batch in one grid_sample.

    The study's augmentation, done on the batch instead of image by image: a per-image Python
    loop cost ~20% of training throughput on 2 cores.
    """
    return apply_affine(x, draw_affine(x.shape[0], aug, generator))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def draw_photometric(
    n: int, size: int, aug: AugmentParams, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per-image parameters of the acquisition-robust augmentation, drawn on the CPU from
    `generator` in a fixed order (the same stream on every rank and device): log-gamma, contrast,
    brightness, sharpen amount, noise sd, noise field, cut-out (on/off, box, grey).

    What it imitates: another hospital's tone curve and windowing (gamma, contrast, brightness),
    detector sharpness and processing (unsharp mask or blur), quantum noise, and burned-in text or
    markers (a box of random grey) - the cues a model can use to tell a source instead of disease.
    """
    u = lambda low, high: _uniform(n, low, high, generator)  # noqa: E731
    box = torch.rand(n, 4, generator=generator)
    return {
        "gamma": torch.exp(u(-aug.gamma, aug.gamma)),
        "contrast": u(1 - aug.contrast, 1 + aug.contrast),
        "brightness": u(-aug.brightness, aug.brightness),
        "sharpen": u(-aug.sharpen, aug.sharpen),
        "noise_sd": u(0.0, aug.noise),
        "noise": torch.randn(n, 1, size, size, generator=generator),
        "cutout": torch.rand(n, generator=generator) < aug.cutout,
        "box": box,  # centre x, centre y, width, height in [0, 1) before scaling
        "grey": torch.rand(n, generator=generator),
    }


# Qualities another source may have saved its films at: from figures compressed hard for a
# paper (about 20) to near-lossless exports (95); Kermany's films are q75 (split.jpeg_quality).
JPEG_QUALITY = (20, 95)


def draw_jpeg(n: int, aug: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Per image, the quality of its JPEG round trip (0: none), drawn on the CPU from
    `generator` in a fixed order: whether (probability `aug.jpeg`), then the quality."""
    on = torch.rand(n, generator=generator) < aug.jpeg
    quality = torch.randint(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, (n,), generator=generator)
    return torch.where(on, quality, 0)


def apply_jpeg(batch: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """A uint8 batch N x H x W with image i sent through a JPEG round trip at `quality[i]` (0:
    left as it is). Applied to the stored film, before the flips, warps and tone changes, as a
    source's compression came before everything else; PIL encodes on the host, so a batch on a
    GPU goes there and back."""
    rows = torch.nonzero(quality > 0).flatten().tolist()
    if not rows:
        return batch
    host = batch.cpu().numpy().copy()
    for i in rows:
        host[i] = jpeg_round_trip(host[i], int(quality[i]))
    return torch.from_numpy(host).to(batch.device)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur (sigma about 0.7 px), edges replicated."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16.0).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)


def _cutout_mask(p: dict[str, torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """N x 1 x H x W boolean: one box per selected image, side 5-20% of the image."""
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    box = p["box"].to(device)
    cx, cy = box[:, 0], box[:, 1]
    half_w, half_h = (0.05 + 0.15 * box[:, 2]) / 2, (0.05 + 0.15 * box[:, 3]) / 2
    in_x = (coords[None, :] - cx[:, None]).abs() <= half_w[:, None]
    in_y = (coords[None, :] - cy[:, None]).abs() <= half_h[:, None]
    mask = in_y[:, :, None] & in_x[:, None, :] & p["cutout"].to(device)[:, None, None]
    return mask[:, None]


def apply_photometric(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply drawn photometric parameters to a batch N x 1 x H x W in [0, 1], on x's device."""
    view = lambda key: p[key].to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)  # noqa: E731
    x = x.clamp(0.0, 1.0).pow(view("gamma"))
    x = (x - 0.5) * view("contrast") + 0.5 + view("brightness")
    x = x + view("sharpen") * (x - _blur(x))  # > 0 sharpens (unsharp mask), < 0 blurs
    x = x + view("noise_sd") * p["noise"].to(device=x.device, dtype=x.dtype)
    grey = view("grey").expand_as(x)
    x = torch.where(_cutout_mask(p, x.shape[-1], x.device), grey, x)
    return x.clamp(0.0, 1.0).contiguous(memory_format=torch.channels_last)


def strata_for(table: pd.DataFrame, task: str, by: list[str],
               allowed: tuple[str, ...] = BALANCE_BY) -> np.ndarray:  # fmt: skip
    """Integer stratum per row for class balancing: the combination of the `by` columns.

    `class` is the task's class (binary: covid / non_covid), except that a row of unknown type
    (`pneumonia`) is a stratum of its own in the four-class task: it belongs to no single class.
    With `age_group` added, adult and pediatric images of one class are balanced separately, so
    the few adult non-COVID images are drawn as often as the adult COVID-19 ones (binary).
    `pneumonia` splits each of those by finding, normal or not (any other label), so that the
    adult non-COVID pneumonia films are drawn as often as the adult normals they are outnumbered
    by. Any other key of `allowed` is a column of the table.
    """
    unknown = sorted(set(by) - set(allowed))
    if unknown or not by:
        raise ValueError(f"strata must list some of {list(allowed)}, got {by}")
    columns = []
    for key in by:
        if key == "class":
            labels = labels_for(table, task)
            names = np.array(BINARY_CLASSES if task == "binary" else FOUR_CLASSES)
            columns.append(np.where(labels >= 0, names[labels.clip(0)], table["label"]))
        elif key == "pneumonia":
            columns.append(np.where(table["label"] == "normal", "normal", "pneumonia"))
        else:
            columns.append(table[key].astype(str).to_numpy())
    keys = ["/".join(parts) for parts in zip(*columns, strict=True)]
    return np.unique(keys, return_inverse=True)[1].astype(np.int64)


def adversary_targets(table: pd.DataFrame, task: str, by: str, within: list[str]
                      ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per row, what the source-adversarial head (cxr.adversary) conditions on, its stratum of
    the `within` columns (`class` as in `strata_for`: a row of unknown type is a class of its
    own), and what it predicts: its source, the `by` column's value (an empty one is a source of
    its own)."""
    sources = table[by].fillna("unknown").astype(str).to_numpy()
    codes = np.unique(sources, return_inverse=True)[1].astype(np.int64)
    return strata_for(table, task, within, ADVERSARY_WITHIN), codes


def head_targets(table: pd.DataFrame, p: TrainParams) -> tuple[np.ndarray, np.ndarray] | None:
    """adversary_targets as `p` asks for them, for train_model's `train_sources`: None when `p`
    trains no source-adversarial head."""
    if not p.adversary:
        return None
    return adversary_targets(table, p.task, p.adversary_by, p.adversary_within)


def sample_weights(strata: np.ndarray) -> torch.Tensor:
    """Per-row loss weights 1/count(stratum), scaled so a balanced set has weight 1 everywhere."""
    counts = np.bincount(strata).astype(np.float64)
    n_strata = int((counts > 0).sum())
    return torch.tensor(len(strata) / (n_strata * counts[strata]), dtype=torch.float32)


def partial_label_nll(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per row: -log(sum of p(k) over the row's allowed classes k)."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=1)


def partial_label_loss(
    logits: torch.Tensor, allowed: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy on a set of allowed classes: mean of -log(sum of p(k) over allowed k).

    With one allowed class per row this is ordinary cross-entropy. A `pneumonia` image (viral or
    bacterial, type unknown) allows two: the model is asked only for p(viral) + p(bacterial),
    neither guessing its type nor throwing it away. `weight` (per row) gives a weighted mean,
    as nn.CrossEntropyLoss does with class weights.
    """
    nll = partial_label_nll(logits, allowed)
    if weight is None:
        return nll.mean()
    return (nll * weight).sum() / weight.sum()


def epoch_order(
    strata: np.ndarray,
    *,
    oversample: bool,
    generator: torch.Generator,
    row_weights: np.ndarray | None = None,
) -> torch.Tensor:
    """Indices for one epoch: a permutation, or (oversample) a stratum-balanced draw of equal length.

    Oversampling draws with replacement with probability 1/count(stratum), so every stratum
    (a class, or class x age group) fills the same share of the epoch, as the study did for
    COVID-19; the epoch keeps the data set's length so epochs cost the same either way.
    `row_weights` (just train twice) multiply each row's chance of being drawn, so an epoch is
    then always a draw with replacement (its length unchanged).
    """
    n = len(strata)
    if not oversample and row_weights is None:
        return torch.randperm(n, generator=generator)
    weights = 1.0 / np.bincount(strata)[strata] if oversample else np.ones(n)
    if row_weights is not None:
        weights = weights * np.asarray(row_weights, dtype=np.float64)
    sampler = WeightedRandomSampler(torch.tensor(weights, dtype=torch.double), n,
                                    replacement=True, generator=generator)  # fmt: skip
    return torch.tensor(list(sampler), dtype=torch.long)
