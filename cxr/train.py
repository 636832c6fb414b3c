"""The training loop shared by both tasks: selection and early stopping on validation only."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from tqdm import tqdm

from cxr.config import AugmentParams, TrainParams
from cxr.data import augment_batch, epoch_order, partial_label_loss, sample_weights, to_input
from cxr.infer import autocast, pick_device, predict_proba
from cxr.models import CXRNet

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    images_per_second: float


@dataclass
class TrainResult:
    best_epoch: int
    best: EpochResult
    history: list[EpochResult] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_images_per_second: float = 0.0
    stopped_early: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
            "stopped_early": self.stopped_early,
            "val": {
                "loss": self.best.val_loss,
                "accuracy": self.best.val_accuracy,
                "macro_f1": self.best.val_macro_f1,
            },
            "wall_seconds": round(self.wall_seconds, 1),
            "train_images_per_second": round(self.train_images_per_second, 2),
        }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only, as torchvision's references and timm do.

    Decaying BatchNorm's scale and shift and the biases only pulls them towards zero (a
    BatchNorm weight of 0 switches a channel off); they do not overfit the way kernels do.
    One-dimensional parameters are exactly those.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """SGD or AdamW with the fused kernels: the default per-tensor AdamW step took 0.42 s per
    batch for resnet152 on 2 cores (a quarter of the batch), the fused one 0.04 s."""
    groups = param_groups(model, p.weight_decay)
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=p.lr, fused=True)


def make_scheduler(
    optimizer: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch, so milestones (in epochs) are converted to steps."""
    if p.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p.lr, total_steps=p.epochs * steps_per_epoch
        )
    if p.schedule == "multistep":
        milestones = [m * steps_per_epoch for m in p.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=p.gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """N int labels -> N x K boolean allowed-class mask (a row of -1 allows nothing)."""
    labels = np.asarray(labels)
    return labels[:, None] == np.arange(num_classes)[None, :]


def known_labels(allowed: np.ndarray) -> np.ndarray:
    """The class of rows that allow exactly one, -1 for rows of unknown type."""
    return np.where(allowed.sum(1) == 1, allowed.argmax(1), -1)


def _evaluate(
    model: nn.Module, images: np.ndarray, allowed: np.ndarray, batch_size: int
) -> tuple[float, float, float]:
    """Validation loss (partial-label NLL over every row), accuracy and macro-F1 (known rows)."""
    prob = predict_proba(model, images, batch_size=batch_size)
    log_p = torch.log(torch.as_tensor(prob).clamp_min(1e-7))
    # log of a probability is a valid logit: log_softmax of it gives it back.
    loss = float(partial_label_loss(log_p, torch.as_tensor(allowed)))
    labels = known_labels(allowed)
    known = labels >= 0
    pred = prob.argmax(1)[known]
    accuracy = float((pred == labels[known]).mean())
    macro_f1 = float(f1_score(labels[known], pred, average="macro", zero_division=0))
    return loss, accuracy, macro_f1


def train_epoch(
    model: nn.Module,
    batches: torch.Tensor,
    images: torch.Tensor,
    allowed: torch.Tensor,
    *,
    weights: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    aug: AugmentParams | None,
    generator: torch.Generator,
    desc: str = "train",
) -> tuple[float, int, int]:
    """One pass over `batches` (rows of indices); returns summed loss, correct and seen counts.

    Batches are gathered from the uint8 array in memory and augmented as a whole, so the
    CPU spends its time in the model (see `python -m cxr bench`).
    """
    device = next(model.parameters()).device
    model.train()
    total_loss, correct, count = 0.0, 0, 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False)
    for idx in bar:
        x = to_input(images[idx])
        if aug is not None:
            x = augment_batch(x, aug, generator)
        x, y = x.to(device, non_blocking=True), allowed[idx].to(device, non_blocking=True)
        w = weights[idx].to(device, non_blocking=True) if weights is not None else None
        with autocast(device):
            logits = model(x)
            loss = partial_label_loss(logits.float(), y, w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(idx)
        # correct = the top class is one the label allows
        correct += int(y.gather(1, logits.detach().argmax(1, keepdim=True)).sum())
        count += len(idx)
        bar.set_postfix(loss=f"{total_loss / count:.3f}")
    return total_loss, correct, count


def _is_better(result: EpochResult, best: EpochResult | None, metric: str) -> bool:
    if best is None:
        return True
    if metric == "loss":
        return result.val_loss < best.val_loss
    return result.val_macro_f1 > best.val_macro_f1


def train_model(
    model: CXRNet,
    p: TrainParams,
    *,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    generator: torch.Generator,
    on_epoch: Callable[[EpochResult], None] | None = None,
    train_allowed: np.ndarray | None = None,
    train_strata: np.ndarray | None = None,
    val_allowed: np.ndarray | None = None,
) -> TrainResult:
    """Train, select the best epoch on validation, and load those weights back into `model`.

    `*_allowed` (N x K, default: one-hot of the labels) are the classes each image may be:
    more than one for an image of unknown type, trained with the partial-label loss.
    `train_strata` (default: the labels) are what `balance` evens out.
    The test split is not an argument: training cannot read it.
    """
    device = pick_device()
    num_classes = model.backbone.fc.out_features
    model.to(device).to(memory_format=torch.channels_last)
    if train_allowed is None:
        train_allowed = one_hot(train_labels, num_classes)
    if val_allowed is None:
        val_allowed = one_hot(val_labels, num_classes)
    strata = np.asarray(train_labels if train_strata is None else train_strata)
    weights = sample_weights(strata) if p.balance == "weighted_loss" else None
    steps = max(1, len(train_images) // p.batch_size)
    optimizer = make_optimizer(model, p)
    scheduler = make_scheduler(optimizer, p, steps)
    aug = p.augmentation()
    images_t = torch.from_numpy(np.ascontiguousarray(train_images))
    allowed_t = torch.from_numpy(np.asarray(train_allowed, dtype=bool))

    best_state, best, result = None, None, TrainResult(best_epoch=0, best=None)  # type: ignore[arg-type]
    seen, train_time, since_best = 0, 0.0, 0
    start = time.perf_counter()
    for epoch in range(1, p.epochs + 1):
        t0 = time.perf_counter()
        order = epoch_order(strata, oversample=p.balance == "oversample", generator=generator)
        # drop_last: a final batch of 1 breaks BatchNorm and adds noise for no gain.
        batches = order[: steps * p.batch_size].view(steps, -1)
        total_loss, correct, count = train_epoch(
            model,
            batches,
            images_t,
            allowed_t,
            weights=weights,
            optimizer=optimizer,
            scheduler=scheduler,
            aug=aug,
            generator=generator,
            desc=f"{p.task} epoch {epoch}/{p.epochs}",
        )
        epoch_train_time = time.perf_counter() - t0
        train_time += epoch_train_time
        seen += count
        val_loss, val_acc, val_f1 = _evaluate(model, val_images, val_allowed, 32)
        res = EpochResult(
            epoch=epoch,
            train_loss=total_loss / count,
            train_accuracy=correct / count,
            val_loss=val_loss,
            val_accuracy=val_acc,
            val_macro_f1=val_f1,
            seconds=time.perf_counter() - t0,
            images_per_second=count / epoch_train_time,
        )
        result.history.append(res)
        log.info("%s epoch %d: %s", p.task, epoch, {k: round(v, 4) for k, v in asdict(res).items()})
        if on_epoch:
            on_epoch(res)
        if _is_better(res, best, p.select_metric):
            best, since_best = res, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            since_best += 1
            if p.patience and since_best >= p.patience:
                log.info("early stop: no validation improvement for %d epochs", since_best)
                result.stopped_early = True
                break

    model.load_state_dict(best_state)
    model.to("cpu").eval()
    result.best, result.best_epoch = best, best.epoch
    result.wall_seconds = time.perf_counter() - start
    result.train_images_per_second = seen / train_time if train_time else 0.0
    return result
