"""Is this a frontal chest radiograph? An out-of-distribution gate in front of the classifiers.

The classifiers give a confident answer for anything: a lateral film, a CT slice, a photograph,
a film upside down. Two independent checks say when an input is unlike what they were trained on:

- Feature space: the Mahalanobis distance of the binary classifier's penultimate features (its
  global-average-pooled backbone output) from those of the training films, under one Gaussian
  with a Ledoit-Wolf shrunk covariance (512 features from a few thousand films: the plain sample
  covariance is near singular). The flag threshold is a percentile of the validation films'
  distances (`ood.percentile`: 99 flags 1% of real validation radiographs by construction).
- Lung shape: the lung segmenter's mask must be two lungs, one on each side of the midline,
  upright (taller than wide, narrow apex above the wide base), at one level and of plausible
  size. Limits in params.yaml (`ood:`), chosen on the validation films' masks (docs/ood.md).

`gate(state, features, mask)` returns the reasons an input is flagged (empty: it passes).
The fitted state is saved with the sha256 of the binary checkpoint it was fitted for and
refused for any other: the features of another network mean nothing to it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr.atomic import atomic_open
from cxr.bundle import sha256_of  # the bundle's own check: one way to hash a checkpoint
from cxr.config import finite, require
from cxr.infer import predict_proba
from cxr.lung_shape import lung_reasons, lungs_of
from cxr.lungs import crop_inputs
from cxr.models import CheckpointError, read_state
from cxr.params import from_section, load_params, section

log = logging.getLogger(__name__)

FORMAT = "cxr-ood/1"
NOT_FRONTAL = "not a frontal chest radiograph"


# --- params -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OodParams:
    """params.yaml `ood:`; every key required (cxr.params.from_section)."""

    percentile: float  # of the val films' feature distances: the flag threshold
    min_lung_share: float  # each lung's share of the image area, at least
    max_lung_share: float  # ... and at most
    min_balance: float  # smaller lung's area / larger lung's area, at least
    min_aspect: float  # each lung's box height / width, at least (rotated 90: wide lungs)
    max_aspect: float  # ... and at most (two films squashed side by side: thin lungs)
    max_tilt: float  # |row difference| / column distance of the two lungs' centres, at most
    min_taper: float  # each lung's mean width, lower third of its rows / upper third, at least
    max_offset: float  # the lungs' midpoint from the image's vertical midline, share of width

    def validate(self) -> None:
        require(
            finite(self.percentile) and 50 <= self.percentile < 100,
            "ood.percentile",
            "a percentile in [50, 100)",
            self.percentile,
        )
        for key in ("min_lung_share", "max_lung_share", "min_balance", "max_offset"):
            value = getattr(self, key)
            require(finite(value) and 0 <= value <= 1, f"ood.{key}", "a fraction in [0, 1]", value)
        require(
            self.min_lung_share < self.max_lung_share,
            "ood.max_lung_share",
            f"above ood.min_lung_share ({self.min_lung_share})",
            self.max_lung_share,
        )
        require(
            finite(self.min_aspect) and 0 < self.min_aspect < self.max_aspect,
            "ood.min_aspect",
            f"a number > 0 below ood.max_aspect ({self.max_aspect})",
            self.min_aspect,
        )
        require(finite(self.max_aspect), "ood.max_aspect", "a finite number", self.max_aspect)
        require(finite(self.max_tilt) and self.max_tilt >= 0, "ood.max_tilt", "a number >= 0",
                self.max_tilt)  # fmt: skip
        require(finite(self.min_taper) and self.min_taper >= 0, "ood.min_taper",
                "a number >= 0", self.min_taper)  # fmt: skip


def load_ood_params(path: str | Path) -> OodParams:
    """Section `ood` of the params file; a missing or unknown key is an error naming it."""
    return from_section(OodParams, section(load_params(path), "ood"), "ood", source=str(path))


# --- feature space ----------------------------------------------------------------------------


@contextlib.contextmanager
def captured_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the penultimate features (global-average-pooled backbone output, the input of
    the final linear layer) of every forward pass of `model` inside the block.

    A hook, not a second network: predict can take the features from the very pass that gives
    its probabilities."""
    found: list[torch.Tensor] = []
    head = model.backbone.fc

    def keep(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        found.append(inputs[0].detach().float().cpu())

    handle = head.register_forward_pre_hook(keep)
    try:
        yield found
    finally:
        handle.remove()


def penultimate_features(model: nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """float64 N x D features of uint8 model inputs (already cropped where the model crops)."""
    with captured_features(model) as found:
        predict_proba(model, images, batch_size=batch_size)
    if not found:
        return np.zeros((0, model.backbone.fc.in_features))
    return torch.cat(found).numpy().astype(np.float64)


def fit_gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of one Gaussian with a Ledoit-Wolf shrunk covariance."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need N >= 2 feature rows to fit, got shape {features.shape}")
    # Fitting only (the ood stage): predict reads the fitted gate and skips sklearn's 1 s import.
    from sklearn.covariance import LedoitWolf

    fit = LedoitWolf().fit(features)
    return fit.location_, fit.precision_


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance (not squared) of each row from `mean` under `precision`."""
    d = np.atleast_2d(np.asarray(features, dtype=np.float64)) - mean
    squared = np.einsum("ij,jk,ik->i", d, precision, d)
    return np.sqrt(np.maximum(squared, 0.0))


def threshold_at(scores: np.ndarray, percentile: float) -> float:
    """The `percentile` of the validation scores: above it an input is flagged."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("no validation scores to set the threshold on")
    return float(np.percentile(scores, percentile))


# --- the fitted state -------------------------------------------------------------------------


@dataclass(frozen=True)
class OodState:
    """What the gate needs: the training films' Gaussian, the threshold and the lung limits."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    params: OodParams
    binary_sha256: str
    meta: dict[str, Any]  # counts and where the threshold came from

    def scores(self, features: np.ndarray) -> np.ndarray:
        return mahalanobis(features, self.mean, self.precision)


def lungs_only_state(p: OodParams) -> OodState:
    """A gate with the lung-shape rules alone (no feature check can pass it features)."""
    return OodState(np.zeros(0), np.zeros((0, 0)), float("inf"), p, "", {"checks": "lungs only"})


def fit_state(
    train_features: np.ndarray,
    val_features: np.ndarray,
    p: OodParams,
    binary_sha256: str,
    meta: dict[str, Any] | None = None,
) -> OodState:
    """Fit the Gaussian on the training films and set the threshold on the validation films."""
    mean, precision = fit_gaussian(train_features)
    val_scores = mahalanobis(val_features, mean, precision)
    threshold = threshold_at(val_scores, p.percentile)
    info = {"n_train": int(len(train_features)), "n_val": int(len(val_features)),
            "threshold_from": f"{p.percentile:g}th percentile of the val films' distances",
            **(meta or {})}  # fmt: skip
    return OodState(mean, precision, threshold, p, binary_sha256, info)


def save_state(path: Path, state: OodState) -> None:
    """Tensors + plain metadata, loadable with torch.load(weights_only=True); atomic."""
    blob = {
        "format": FORMAT,
        "state_dict": {
            "mean": torch.from_numpy(state.mean.copy()),
            "precision": torch.from_numpy(state.precision.copy()),
        },  # fmt: skip
        "meta": {
            "threshold": state.threshold,
            "params": asdict(state.params),
            "binary_sha256": state.binary_sha256,
            **state.meta,
        },  # fmt: skip
    }
    with atomic_open(path, binary=True) as fh:
        torch.save(blob, fh)


def load_state(path: str | Path, binary: str | Path | None = None) -> OodState:
    """The gate saved by `save_state`; with `binary`, refused unless fitted for that checkpoint."""
    how = "fit one with python stages/ood.py (the ood stage)"
    tensors, meta = read_state(path, FORMAT, "out-of-distribution gate", how)
    if binary is not None:
        actual = sha256_of(binary)
        if actual != meta["binary_sha256"]:
            raise CheckpointError(
                f"{path} was fitted for a binary checkpoint with sha256 "
                f"{meta['binary_sha256'][:12]}..., not {binary} ({actual[:12]}...): "
                "re-fit it for this checkpoint (the ood stage)"
            )
    params = from_section(OodParams, meta["params"], "ood", source=str(path))
    rest = {k: v for k, v in meta.items() if k not in ("threshold", "params", "binary_sha256")}
    return OodState(
        mean=tensors["mean"].numpy(),
        precision=tensors["precision"].numpy(),
        threshold=float(meta["threshold"]),
        params=params,
        binary_sha256=meta["binary_sha256"],
        meta=rest,
    )


# --- the gate ---------------------------------------------------------------------------------


def feature_reason(score: float, threshold: float) -> str:
    return (
        f"{NOT_FRONTAL}: features unlike the training films (score {score:.1f} > {threshold:.1f})"
    )


def gate(state: OodState, features: np.ndarray | None, mask: np.ndarray | None) -> list[str]:
    """Warnings for one input: its penultimate features (D,) and/or its boolean lung mask
    (H x W, the segmenter's, as predict makes it); either may be None (no model, no
    segmenter) and is then not checked. [] means it looks like a frontal chest radiograph."""
    if features is None and mask is None:
        return []
    score = None if features is None else state.scores(np.asarray(features).reshape(1, -1))
    return gate_scored(state, score, None if mask is None else mask[None])[0]


def gate_batch(
    state: OodState, features: np.ndarray | None, masks: np.ndarray | None
) -> list[list[str]]:
    """`gate` for N inputs (features N x D, masks N x H x W; either may be None)."""
    return gate_scored(state, None if features is None else state.scores(features), masks)


def gate_scored(
    state: OodState, scores: np.ndarray | None, masks: np.ndarray | None
) -> list[list[str]]:
    """`gate` for N inputs whose feature distances (`state.scores`, N) are already known: a
    caller that reports the distances too computes them once."""
    n = len(scores) if scores is not None else len(masks) if masks is not None else 0
    out = []
    for i in range(n):
        reasons = []
        if scores is not None and not float(scores[i]) <= state.threshold:
            reasons.append(feature_reason(float(scores[i]), state.threshold))  # nan flagged too
        if masks is not None:
            reasons += lung_reasons(masks[i], state.params)
        out.append(reasons)
    return out


def reason_kind(reason: str) -> str:
    """A reason without its numbers: what the counts in a report group by."""
    return reason.split(" (", 1)[0]


def flag_summary(flags: list[list[str]], datasets: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per dataset and over all inputs: n, how many flagged (any reason), their rate, and
    counts by reason kind (one input may have several)."""
    datasets = np.asarray(datasets, dtype=str)

    def summary(rows: np.ndarray) -> dict[str, Any]:
        picked = [flags[i] for i in rows]
        kinds: dict[str, int] = {}
        for reasons in picked:
            for kind in {reason_kind(r) for r in reasons}:
                kinds[kind] = kinds.get(kind, 0) + 1
        flagged = sum(1 for reasons in picked if reasons)
        return {"n": len(picked), "flagged": flagged,
                "flagged_rate": flagged / len(picked) if picked else None,
                "by_reason": dict(sorted(kinds.items()))}  # fmt: skip

    out = {"all": summary(np.arange(len(flags)))}
    for name in sorted(set(datasets.tolist())):
        out[name] = summary(np.flatnonzero(datasets == name))
    return out


# --- inputs as predict makes them -------------------------------------------------------------


def segment(segmenter: tuple[nn.Module, dict[str, Any]], images: np.ndarray) -> np.ndarray:
    """Boolean lung masks, post-processed as the segment stage and predict do."""
    from cxr.segmenter import binarise, predict_prob

    model, meta = segmenter
    prob = predict_prob(model, images, size=int(meta["input_size"]))
    return binarise(
        prob, threshold=float(meta["threshold"]), min_fraction=float(meta["min_component"])
    )


def model_inputs(
    images: np.ndarray,
    binary_meta: dict[str, Any],
    segmenter: tuple[nn.Module, dict[str, Any]],
) -> tuple[np.ndarray, np.ndarray]:
    """(the binary model's inputs, the lung masks) for preprocessed uint8 images: segmented,
    then cropped to the lungs where the checkpoint was trained on crops, as predict does."""
    images = np.asarray(images)
    masks = segment(segmenter, images)
    return crop_inputs(images, masks, binary_meta.get("preprocessing", {})), masks


def lung_shape_quantiles(
    masks: np.ndarray,
    quantiles: tuple[float, ...] = (0.0, 0.001, 0.005, 0.01, 0.99, 0.995, 0.999, 1.0),
) -> dict[str, Any]:
    """What the lung limits are chosen from: per measured quantity, its quantiles over the
    masks with two pieces (and how many masks have fewer)."""
    rows = []
    for mask in masks:
        found = lungs_of(mask)
        if len(found) == 2:
            left, right = found
            shares = (left.share, right.share)
            rows.append((min(shares), max(shares), min(shares) / max(shares),
                         min(left.aspect, right.aspect), max(left.aspect, right.aspect),
                         abs(left.row - right.row) / max(right.col - left.col, 1e-9),
                         min(left.taper, right.taper), abs((left.col + right.col) / 2 - 0.5),
                         float(left.col < 0.5 < right.col)))  # fmt: skip
    names = ("min_lung_share", "max_lung_share", "balance", "min_aspect", "max_aspect", "tilt",
             "taper", "offset")  # fmt: skip
    table = np.array(rows, dtype=np.float64).reshape(-1, len(names) + 1)
    out: dict[str, Any] = {"n": int(len(masks)), "fewer_than_two_pieces": int(len(masks) - len(rows)),
                           "not_one_each_side": int((table[:, -1] == 0).sum())}  # fmt: skip
    for j, name in enumerate(names):
        values = np.quantile(table[:, j], quantiles) if len(table) else [None] * len(quantiles)
        out[name] = {f"q{q:g}": (None if v is None else round(float(v), 4))
                     for q, v in zip(quantiles, values, strict=True)}  # fmt: skip
    return out
