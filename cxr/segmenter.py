"""The lung segmenter: a small U-Net trained from scratch on the V7 lung masks, its training
loop, mask prediction for whole splits, scores, and its checkpoint.

Input contract, as for the classifiers: uint8 N x H x W arrays (the split arrays); the network
sees them at `size` px (area-downsampled, default 64: a 112 px image has no lung detail a
64 px mask needs) and its logits are upsampled back to the array size before thresholding.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from cxr.config import SegmentParams
from cxr.errors import InputError
from cxr.lungs import IGNORE, LUNG, dice_iou, keep_largest
from cxr.models import load_weights, read_state, save_state

if TYPE_CHECKING:  # annotations only: pandas is imported where a table is read
    import pandas as pd

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cxr-segmenter/1"


# --- the network ------------------------------------------------------------------------------


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with `depth` levels, `channels` at the top, doubling down.

    Input N x 1 x S x S in [0, 1] (S divisible by 2^(depth-1)); output N x 1 x S x S logits.
    Normalises inside itself, so callers feed uint8 / 255 as for the classifiers.
    """

    def __init__(self, channels: int = 8, depth: int = 4):
        super().__init__()
        widths = [channels * 2**i for i in range(depth)]
        self.down = nn.ModuleList(
            [_block(1 if i == 0 else widths[i - 1], w) for i, w in enumerate(widths)]
        )
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth - 1)]
        )
        self.merge = nn.ModuleList([_block(2 * widths[i], widths[i]) for i in range(depth - 1)])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.merge[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.head(x)


# --- data -------------------------------------------------------------------------------------


def load_masks(directory: Path, table: pd.DataFrame, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices of `table` that have a mask, their uint8 masks at size x size).

    Rows are matched by `path` == the manifest's `image_path`. The stored masks are 224 px on
    the harmonised image; nearest-neighbour keeps the values 0 / 127 / 255 (no blended ignore).
    """
    manifest_path = directory / "manifest.csv"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path} not found: run the fetch_masks stage first (dvc repro fetch_masks)"
        )
    import pandas as pd  # training only: predict loads this module and never reads masks

    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    by_path = dict(zip(manifest["image_path"], manifest["file"], strict=True))
    rows = [i for i, p in enumerate(table["path"]) if p in by_path]
    masks = np.empty((len(rows), size, size), dtype=np.uint8)
    for j, i in enumerate(rows):
        with Image.open(directory / by_path[table["path"].iloc[i]]) as img:
            masks[j] = np.asarray(img.convert("L").resize((size, size), Image.Resampling.NEAREST))
    return np.asarray(rows, dtype=np.int64), masks


def to_net_input(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x H x W -> float N x 1 x size x size in [0, 1] (area average: no aliasing)."""
    x = torch.as_tensor(np.array(images, dtype=np.uint8)).unsqueeze(1).float().div_(255.0)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def to_targets(masks: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets and pixel weights at `size` from stored masks (255 lung, 127 ignore).

    Area-averaged: a 64 px pixel half on the lung edge gets target 0.5, not a coin flip, and a
    pixel mostly under a device gets little weight.
    """
    m = torch.as_tensor(np.asarray(masks)).unsqueeze(1)
    lung, valid = (m == LUNG).float(), (m != IGNORE).float()
    if m.shape[-1] != size:
        lung = F.interpolate(lung, size=(size, size), mode="area")
        valid = F.interpolate(valid, size=(size, size), mode="area")
    return lung / valid.clamp_min(1e-6), valid


def augment_pair(
    x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random flip + rotation (±10°) + scale (0.9-1.1) + shift (±5%) per image, applied to
    the image, its target and its weights by the same grid (one grid_sample for the batch)."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-10.0, 10.0) * math.pi / 180.0
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    tx, ty = uniform(-0.1, 0.1), uniform(-0.1, 0.1)  # grid units: ±0.1 = ±5% of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )
    stacked = torch.cat([x, target, weight], dim=1)
    grid = F.affine_grid(theta, list(stacked.shape), align_corners=False)
    # Outside the image: black image, background target, and full weight (it is background).
    out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    outside = F.grid_sample(
        torch.ones_like(x), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[:, :1], out[:, 1:2], out[:, 2:3] + (1.0 - outside)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted BCE + (1 - soft Dice) over the batch; ignored pixels (weight 0) count nowhere.

    Dice keeps the small lungs of a child's film from being swamped by background pixels.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp_min(1.0)
    p = torch.sigmoid(logits) * weight
    t = target * weight
    dice = (2 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return bce + (1.0 - dice)


# --- training ---------------------------------------------------------------------------------


@torch.inference_mode()
def predict_prob(
    model: nn.Module, images: np.ndarray, *, size: int, batch_size: int = 64, desc: str = ""
) -> np.ndarray:
    """float32 N x H x W lung probabilities at the images' own size (logits upsampled
    bilinearly before the sigmoid, so the edge is placed between the coarse pixels)."""
    model.eval()
    n, h, w = images.shape
    out = np.empty((n, h, w), dtype=np.float32)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc or "segment", leave=False, disable=not desc):
        logits = model(to_net_input(images[start : start + batch_size], size))
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        out[start : start + batch_size] = torch.sigmoid(logits)[:, 0].numpy()
    return out


def binarise(prob: np.ndarray, *, threshold: float, min_fraction: float) -> np.ndarray:
    """bool N x H x W masks: threshold, then the two largest components, holes filled."""
    return np.stack(
        [keep_largest(p >= threshold, n=2, min_fraction=min_fraction) for p in prob]
    ) if len(prob) else np.zeros(prob.shape, dtype=bool)  # fmt: skip


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-image Dice (ignore pixels excluded)."""
    return float(np.mean([dice_iou(p, t)[0] for p, t in zip(pred, truth, strict=True)]))


def train_segmenter(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    p: SegmentParams,
    generator: torch.Generator,
) -> tuple[UNet, dict[str, Any]]:
    """Train on (images, masks) of the train split; keep the epoch with the best val Dice.

    Val Dice here is on raw thresholded masks at the array size (post-processing changes
    little and costs time every epoch). Returns the best model and a summary with the
    per-epoch history: no timings, since the summary goes into the checkpoint, whose bytes must
    depend on the data, params and seed alone (a re-run that learns the same weights must not
    re-run evaluate and ood).
    """
    (x_img, x_mask), (v_img, v_mask) = train, val
    if len(x_img) == 0 or len(v_img) == 0:
        raise InputError(
            f"no masked images to train ({len(x_img)}) or validate ({len(v_img)}) the segmenter: "
            "do the split's paths match lung_masks.csv image_path?"
        )
    x = to_net_input(x_img, p.size)
    target, weight = to_targets(x_mask, p.size)
    # Initial weights from `generator` too, so the run depends on it alone, not on whatever
    # else drew from torch's global generator before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = UNet(p.channels, p.depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps = math.ceil(len(x) / p.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=p.lr, epochs=p.epochs, steps_per_epoch=steps
    )
    best, best_state, history = -1.0, None, []
    for epoch in tqdm(range(1, p.epochs + 1), desc="segmenter", unit="epoch"):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(steps):
            idx = order[i * p.batch_size : (i + 1) * p.batch_size]
            xb, tb, wb = x[idx], target[idx], weight[idx]
            if p.augment:
                xb, tb, wb = augment_pair(xb, tb, wb, generator)
            loss = seg_loss(model(xb), tb, wb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        prob = predict_prob(model, v_img, size=p.size)
        dice = mean_dice(prob >= p.threshold, v_mask)
        history.append({"epoch": epoch, "train_loss": total / len(x), "val_dice": dice})
        log.info("epoch %d: train loss %.4f, val Dice %.4f", epoch, total / len(x), dice)
        if dice > best:
            best, best_epoch = dice, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    summary = {
        "best_epoch": best_epoch,
        "val_dice_raw": best,
        "n_train": len(x_img),
        "n_val": len(v_img),
        "history": history,
    }
    return model, summary


# --- scores -----------------------------------------------------------------------------------


def scores_by_dataset(pred: np.ndarray, truth: np.ndarray, datasets: np.ndarray) -> dict:
    """Mean (and median) per-image Dice and IoU, for all images and per dataset."""
    pairs = np.array([dice_iou(p, t) for p, t in zip(pred, truth, strict=True)]).reshape(-1, 2)
    datasets = np.asarray(datasets)

    def summary(keep: np.ndarray) -> dict[str, float | int]:
        d, j = pairs[keep, 0], pairs[keep, 1]
        return {"n": int(keep.sum()), "dice": float(d.mean()), "iou": float(j.mean()),
                "dice_median": float(np.median(d)), "dice_min": float(d.min())}  # fmt: skip

    out = {"all": summary(np.ones(len(pairs), dtype=bool))}
    for name in sorted(set(datasets)):
        out[str(name)] = summary(datasets == name)
    return out


def describe_masks(masks: np.ndarray, datasets: np.ndarray) -> dict[str, dict[str, float | int]]:
    """Per dataset: how many masks, their mean lung area share, and how many are empty or
    not two pieces: a check on images without ground truth (NIH, RSNA, Hannover, the cases),
    where a segmenter trained on two sources may fail silently."""
    datasets = np.asarray(datasets)
    pieces = np.array([ndimage.label(m)[1] for m in masks], dtype=int)
    out = {}
    for name in sorted(set(datasets.tolist())):
        keep = datasets == name
        out[str(name)] = {
            "n": int(keep.sum()),
            "lung_area_share": float(masks[keep].mean()),
            "empty": int((pieces[keep] == 0).sum()),
            "not_two_pieces": int((pieces[keep] != 2).sum()),
        }
    return out


# --- checkpoint -------------------------------------------------------------------------------


def save_segmenter(path: Path, model: UNet, meta: dict[str, Any]) -> None:
    """state_dict + plain metadata (channels, depth, size, ...), written atomically."""
    save_state(path, model, meta, CHECKPOINT_FORMAT)


def load_segmenter(path: str | Path) -> tuple[UNet, dict[str, Any]]:
    """Rebuild the U-Net a checkpoint describes (torch.load with weights_only=True)."""
    how = "train one with dvc repro segment"
    state, meta = read_state(path, CHECKPOINT_FORMAT, "lung segmenter checkpoint", how)
    model = UNet(int(meta["channels"]), int(meta["depth"]))
    return load_weights(model, state, path, "the U-Net in its metadata"), meta
