"""The training loop shared by both tasks: selection and early stopping on validation only.

One process or several (torchrun; see cxr.distributed): every rank draws the same global epoch
order and augmentation from one shared generator and trains on its part of each global batch,
DDP averages the gradients, rank 0 validates and every rank follows its decision. With a
ResumeFile the loop saves its whole state after every epoch and continues from there.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from cxr import distributed
from cxr import resume as resume_state
from cxr.adversary import AdversaryRun, SourceAdversary
from cxr.config import AugmentParams, TrainParams
from cxr.data import (
    apply_affine,
    apply_jpeg,
    apply_photometric,
    draw_affine,
    draw_jpeg,
    draw_photometric,
    epoch_order,
    gather,
    partial_label_loss,
    partial_label_nll,
    sample_weights,
    to_input,
)
from cxr.distributed import World
from cxr.infer import autocast, predict_proba
from cxr.mixstyle import MixStyle
from cxr.models import CXRNet
from cxr.resume import ResumeFile

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


# Sagawa et al.'s exponentiated-gradient step for the group weights (their code's default).
GROUP_DRO_STEP = 0.01


class GroupDRO:
    """Online group DRO (Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural
    Networks for Group Shifts", ICLR 2020): the loss is a weighted mean of each group's mean
    loss in the batch, and after every batch the weights move towards the groups that lose the
    most (q_g <- q_g exp(step * loss_g), normalised). Groups here are the balancing strata, so a
    model that leans on "adult means COVID-19" pays for it in the adult non-COVID group's weight.
    The weights stay on the device: no host sync per step.
    """

    def __init__(self, groups: torch.Tensor, weights: list[float] | None = None,
                 step: float = GROUP_DRO_STEP, device: torch.device | str = "cpu") -> None:  # fmt: skip
        """`groups`: every training row's group; `weights`: saved ones (default: uniform)."""
        self.groups = groups.to(device)
        n = int(groups.max()) + 1
        self.weights = (torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
                        if weights is None
                        else torch.tensor(weights, dtype=torch.float64, device=device))  # fmt: skip
        self.step = step

    def loss(self, nll: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The batch's loss from per-row losses `nll` of training rows `rows`; updates the
        weights."""
        group = self.groups[rows]
        n = len(self.weights)
        sums = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, group, nll)
        counts = torch.bincount(group, minlength=n).to(nll.dtype)
        means = sums / counts.clamp_min(1)  # a group absent from the batch: 0, its factor 1
        q = self.weights * torch.exp(self.step * means.detach().double())
        self.weights = q / q.sum()
        return (self.weights.to(nll.dtype) * means).sum()


# Just train twice: how much more often the final run draws a film the first run called wrongly
# (set before the run, not tuned: reports/oos/RULE.md fifty-second amendment).
JTT_UPWEIGHT = 6.0


@dataclass
class TrainResult:
    best_epoch: int
    best: EpochResult
    history: list[EpochResult] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_images_per_second: float = 0.0
    stopped_early: bool = False
    resumed_from: int = 0  # the last epoch a resume file had finished (0: a fresh start)
    group_weights: list[float] | None = None  # balance group_dro: the final weight per stratum
    # adversary > 0: per epoch, the share of scored rows whose source the head told apart
    adversary_accuracy: list[float | None] | None = None
    jtt_errors: int | None = None  # jtt_epochs > 0: training films the first run called wrongly

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
            "stopped_early": self.stopped_early,
            "resumed_from_epoch": self.resumed_from,
            "val": {
                "loss": self.best.val_loss,
                "accuracy": self.best.val_accuracy,
                "macro_f1": self.best.val_macro_f1,
            },
            "wall_seconds": round(self.wall_seconds, 1),
            "train_images_per_second": round(self.train_images_per_second, 2),
        } | ({"group_dro_weights": [round(w, 4) for w in self.group_weights]}
             if self.group_weights is not None else {}) | (
            {"adversary_source_accuracy": [None if a is None else round(a, 4)
                                           for a in self.adversary_accuracy]}
            if self.adversary_accuracy is not None else {}) | (
            {"jtt_error_films": self.jtt_errors} if self.jtt_errors is not None else {})  # fmt: skip


@dataclass
class LoopState:
    """What the loop carries from one epoch to the next: exactly what a resume file restores."""

    epoch: int = 0
    history: list[EpochResult] = field(default_factory=list)
    best: EpochResult | None = None
    best_state: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    stopped_early: bool = False
    seen: int = 0
    train_time: float = 0.0
    wall_seconds: float = 0.0
    dro_weights: list[float] | None = None  # balance group_dro: the group weights so far
    adversary_accuracy: list[float | None] | None = None  # adversary > 0: per epoch
    jtt_errors: list[int] | None = None  # jtt_epochs > 0: the first run's wrongly called rows

    def to_dict(self) -> dict[str, Any]:
        """Plain data for torch.save (weights_only-loadable)."""
        return {
            "epoch": self.epoch,
            "history": [asdict(h) for h in self.history],
            "best_epoch": self.best.epoch if self.best else 0,
            "best_state": self.best_state,
            "since_best": self.since_best,
            "stopped_early": self.stopped_early,
            "seen": self.seen,
            "train_time": self.train_time,
            "wall_seconds": self.wall_seconds,
            "dro_weights": self.dro_weights,
            "adversary_accuracy": self.adversary_accuracy,
            "jtt_errors": self.jtt_errors,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        history = [EpochResult(**h) for h in d["history"]]
        best = next((h for h in history if h.epoch == d["best_epoch"]), None)
        keys = ("epoch", "best_state", "since_best", "stopped_early", "seen", "train_time",
                "wall_seconds")  # fmt: skip
        return cls(history=history, best=best, dro_weights=d.get("dro_weights"),
                   adversary_accuracy=d.get("adversary_accuracy"), jtt_errors=d.get("jtt_errors"),
                   **{k: d[k] for k in keys})  # fmt: skip


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


def adversary_head(model: CXRNet, p: TrainParams,
                   sources: tuple[np.ndarray, np.ndarray] | None,
                   device: torch.device | str) -> SourceAdversary | None:  # fmt: skip
    """The source-adversarial head `p` asks for, on `device` (None when `p.adversary` is 0);
    `sources`: every training row's stratum and source (cxr.data.adversary_targets)."""
    if p.adversary == 0:
        return None
    if sources is None:
        raise ValueError(f"train_{p.task}.adversary > 0 needs every training row's source")
    return SourceAdversary(model.backbone.fc.in_features, *sources).to(device)


def trained_modules(model: nn.Module, head: SourceAdversary | None) -> nn.Module:
    """What the optimizer and the resume file hold: the network, and the head beside it (it
    trains with the same optimizer and schedule, and never goes into the checkpoint)."""
    return model if head is None else nn.ModuleList([model, head])


def weight_average(model: nn.Module, p: TrainParams) -> AveragedModel | None:
    """The running mean of the weights `p` asks for (None when `p.average_epochs` is 0), taken
    after every step of the last `average_epochs` epochs: stochastic weight averaging (Izmailov
    et al., UAI 2018), densely, every step, as SWAD does against domain shift (Cha et al.,
    NeurIPS 2021). BatchNorm's running statistics are averaged beside the weights (use_buffers)
    instead of being recomputed by a pass over the training set."""
    if p.average_epochs == 0:
        return None
    return AveragedModel(model, use_buffers=True)


def average_step(averaged: AveragedModel | None, model: nn.Module) -> Callable[[], None] | None:
    """What train_epoch calls after every step to take `model`'s weights into the running mean
    `averaged` (None without one)."""
    return None if averaged is None else (lambda: averaged.update_parameters(model))


def style_mixing(model: nn.Module, p: TrainParams) -> MixStyle | None:
    """MixStyle's hooks on `model` as `p` asks (None when `p.mixstyle` is 0); close them after."""
    return MixStyle(model, p.mixstyle) if p.mixstyle > 0 else None


def mix_batch(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """mixup (Zhang, Cisse, Dauphin & Lopez-Paz, ICLR 2018): the batch blended with a shuffled
    copy of itself, lam * x + (1 - lam) * x[partner], one lam ~ Beta(alpha, alpha) per batch;
    returns the blend, lam and the partners. train_epoch blends the loss the same way, so a film
    counts lam towards its own label and 1 - lam towards its partner's. A batch mixes the
    sources, so most blends are films no one place took. Drawn from torch's global generator
    (as MixStyle's), which the resume file restores."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(x)).to(x.device)
    return lam * x + (1 - lam) * x[partner], lam, partner


def mixed_nll(logits: torch.Tensor, allowed: torch.Tensor, lam: float,
              partner: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per row of a mixup batch: lam times the partial-label NLL of the row's own label plus
    1 - lam times that of its partner's."""
    own = partial_label_nll(logits, allowed)
    return lam * own + (1 - lam) * partial_label_nll(logits, allowed[partner])


def logit_penalty_of(logits: torch.Tensor) -> torch.Tensor:
    """Spectral decoupling's penalty (Pezeshki et al., "Gradient Starvation", NeurIPS 2021): the
    mean of the squared logits. Cross-entropy keeps rewarding a larger margin on films already
    right, so the feature that wins first (a source's look) is pushed ever further and the others
    starve; with this penalty a film's logits stop growing at a modest margin and the gradient
    goes to the films still wrong. As DomainBed's SD, over every row and class."""
    return logits.float().pow(2).mean()


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
    images: np.ndarray | torch.Tensor,
    allowed: torch.Tensor,
    *,
    weights: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    aug: AugmentParams | None,
    generator: torch.Generator,
    world: World | None = None,
    desc: str = "train",
    dro: GroupDRO | None = None,
    adversary: AdversaryRun | None = None,
    average: Callable[[], None] | None = None,
    mixup: float = 0.0,
    logit_penalty: float = 0.0,
) -> tuple[float, int, int]:
    """One pass over `batches` (rows of global batch indices); returns this rank's summed loss,
    correct and seen counts.

    Each batch is gathered from the uint8 array (in memory or memory-mapped: only its rows are
    read), sent to the device as uint8 and converted and augmented there. Every rank draws the
    augmentation of the whole global batch and keeps its part, so the shared generator advances
    alike on every rank and N processes draw exactly what one process draws. Loss and counts stay
    on the device: no host sync per step, only every few steps for the progress bar.
    `dro`: the loss is group DRO's over its groups of the rows (one process only).
    `adversary`: its head's loss on the batch's pooled features is added (one process only);
    the returned loss is the task's alone.
    `average`: called after every optimizer step (the weight average's update).
    `mixup` > 0: every batch blended with a shuffled copy (mix_batch; one process only); the
    loss and weights blended alike, group DRO's rows kept in their own groups. The training
    accuracy then counts each blend's top class against its own film's label.
    `logit_penalty` > 0: that weight times the mean squared logit is added to what is minimised
    (logit_penalty_of; one process only); the returned loss is the task's alone.
    """
    device = next(model.parameters()).device
    world = world or World(device=device)
    part = world.part
    model.train()
    allowed = allowed.to(device)
    weights = weights.to(device) if weights is not None else None
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not world.is_main)
    for step, idx in enumerate(bar, 1):
        theta = draw_affine(len(idx), aug, generator)[part] if aug is not None else None
        photo = quality = None
        if aug is not None and aug.photometric:  # drawn for the global batch, like theta
            photo = draw_photometric(len(idx), images.shape[-1], aug, generator)
            photo = {k: v[part] for k, v in photo.items()}
        if aug is not None and aug.jpeg:  # after the others: their draws stay what they were
            quality = draw_jpeg(len(idx), aug, generator)[part]
        mine = idx[part]
        batch = gather(images, mine, device)
        x = to_input(apply_jpeg(batch, quality) if quality is not None else batch)
        if theta is not None:
            x = apply_affine(x, theta)
        if photo is not None:
            x = apply_photometric(x, photo)
        rows = mine.to(device, non_blocking=True)
        y = allowed[rows]
        w = weights[rows] if weights is not None else None
        blend = None
        if mixup > 0:
            x, lam, partner = mix_batch(x, mixup)
            blend = (lam, partner)
            w = lam * w + (1 - lam) * w[partner] if w is not None else None
        with autocast(device):
            logits = model(x)
            if blend is not None:
                nll = mixed_nll(logits, y, *blend)
                if dro is not None:
                    loss = dro.loss(nll, rows)
                else:
                    loss = nll.mean() if w is None else (nll * w).sum() / w.sum()
            elif dro is not None:
                loss = dro.loss(partial_label_nll(logits, y), rows)
            else:
                loss = partial_label_loss(logits.float(), y, w)
            # The head learns its loss; the reversal gives the features the opposite.
            objective = loss + adversary.loss(rows) if adversary is not None else loss
        if w is not None and world.distributed:
            # DDP averages the ranks' gradients; scaling each rank's weighted mean by its share
            # of the global batch's weight makes that average the global batch's weighted mean.
            objective = loss = loss * (w.sum() * world.size / weights[idx.to(device)].sum())
        if logit_penalty > 0:
            objective = objective + logit_penalty * logit_penalty_of(logits)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average()
        total_loss += loss.detach().double() * len(mine)
        # correct = the top class is one the label allows
        correct += y.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
        count += len(mine)
        if step % 10 == 0 or step == len(batches):
            bar.set_postfix(loss=f"{total_loss.item() / count:.3f}")
    return total_loss.item(), int(correct.item()), count


def jtt_errors(
    probe: CXRNet,
    p: TrainParams,
    *,
    train_images: np.ndarray,
    train_allowed: np.ndarray,
    **data: Any,
) -> list[int]:
    """Just train twice's first run (Liu et al., "Just Train Twice: Improving Group Robustness
    without Training Group Information", ICML 2021): `probe`, an untouched copy of the model
    that the final run trains (same initial weights), trained with `p`'s recipe for
    `p.jtt_epochs` epochs (its own schedule); then the training rows it calls as a class they
    may not be, scored without augmentation, which the final run draws more often. The paper's
    hope is that those are the films the easiest feature misleads; out of source here they were
    mostly adult non-COVID pneumonia and hard COVID-19 films (docs/candidates.md, "Just train
    twice"). `data`: train_model's other data arguments, passed on."""
    first = replace(p, epochs=p.jtt_epochs, jtt_epochs=0, average_epochs=0, patience=0)
    log.info("just train twice: a first run of %d epochs", first.epochs)
    train_model(probe, first, train_images=train_images, train_allowed=train_allowed, **data)
    # train_model hands its model back on the CPU; the films are scored where it trained.
    device = (data.get("world") or World()).device
    calls = predict_proba(probe.to(device), train_images).argmax(axis=1)
    wrong = ~np.asarray(train_allowed, dtype=bool)[np.arange(len(calls)), calls]
    log.info("just train twice: %d of %d training films called wrongly, drawn %g times as often",
             int(wrong.sum()), len(wrong), JTT_UPWEIGHT)  # fmt: skip
    return np.flatnonzero(wrong).tolist()


def jtt_row_weights(errors: list[int] | None, n: int) -> np.ndarray | None:
    """epoch_order's row weights: JTT_UPWEIGHT for the first run's errors, 1 elsewhere (None:
    no first run)."""
    if errors is None:
        return None
    weights = np.ones(n)
    weights[errors] = JTT_UPWEIGHT
    return weights


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
    world: World | None = None,
    resume: ResumeFile | None = None,
    train_sources: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainResult:
    """Train, select the best epoch on validation, and load those weights back into `model`.

    `*_allowed` (N x K, default: one-hot of the labels) are the classes each image may be:
    more than one for an image of unknown type, trained with the partial-label loss.
    `train_strata` (default: the labels) are what `balance` evens out.
    `world` (default: one process) says which rank this is; `p.batch_size` is the global batch.
    `resume`: save the loop's state there after every epoch and continue from a saved one;
    `on_epoch` then also sees the epochs restored from it, in order, before the new ones.
    `train_sources` (needed when `p.adversary` > 0): every training row's stratum and source
    (cxr.data.adversary_targets), what the source-adversarial head conditions on and predicts.
    `p.average_epochs` > 0: in those last epochs the weight average is what validation scores
    and what is kept (weight_average); `p.mixstyle` > 0: MixStyle's hooks while it trains;
    `p.mixup` > 0: every batch blended (mix_batch); `p.logit_penalty` > 0: the squared logits
    penalised (logit_penalty_of); `p.jtt_epochs` > 0: a first run finds the films to draw more
    often (jtt_errors), once, kept in the resume file.
    The test split is not an argument: training cannot read it.
    """
    world = world or World()
    device = world.device
    probe = copy.deepcopy(model) if p.jtt_epochs else None  # before anything hooks or moves it
    distributed.check_batch(p.batch_size, world, f"train_{p.task}.batch_size")
    num_classes = model.backbone.fc.out_features
    model.to(device).to(memory_format=torch.channels_last)
    averaged = weight_average(model, p)  # a copy of plain modules, before any wrapping
    if train_allowed is None:
        train_allowed = one_hot(train_labels, num_classes)
    if val_allowed is None:
        val_allowed = one_hot(val_labels, num_classes)
    strata = np.asarray(train_labels if train_strata is None else train_strata)
    weights = sample_weights(strata) if p.balance == "weighted_loss" else None
    steps = max(1, len(train_images) // p.batch_size)
    net = distributed.wrap(model, world, sync_batchnorm=p.sync_batchnorm)
    head = adversary_head(model, p, train_sources, device)
    trained = trained_modules(model, head)  # without a head, exactly the network as before
    mix = style_mixing(model, p)
    optimizer = make_optimizer(trained, p)
    scheduler = make_scheduler(optimizer, p, steps)
    aug = p.augmentation()
    allowed_t = torch.from_numpy(np.asarray(train_allowed, dtype=bool))

    start = time.perf_counter()
    loop = LoopState()
    # The average travels in the resume file beside what trains (without one: as before).
    saved_modules = trained if averaged is None else nn.ModuleList([trained, averaged])
    state = resume_state.TrainingState(saved_modules, optimizer, scheduler, generator)
    if resume is not None and (saved := resume_state.restore_training(resume, world, state)):
        loop = LoopState.from_dict(saved)
        log.info("%s: resuming after epoch %d (best so far: epoch %s)", resume.path, loop.epoch,
                 loop.best.epoch if loop.best else "none")  # fmt: skip
    resumed_from, wall_before = loop.epoch, loop.wall_seconds
    if p.jtt_epochs and loop.jtt_errors is None:
        loop.jtt_errors = jtt_errors(
            probe, p, train_images=train_images, train_labels=train_labels,
            train_allowed=train_allowed, train_strata=strata, val_images=val_images,
            val_labels=val_labels, val_allowed=val_allowed, generator=generator, world=world,
            train_sources=train_sources,
        )  # fmt: skip
    draw_weights = jtt_row_weights(loop.jtt_errors, len(strata))
    dro = None
    if p.balance == "group_dro":  # the groups are the balancing strata
        dro = GroupDRO(torch.from_numpy(strata.astype(np.int64)), loop.dro_weights, device=device)
    adversary = None
    if head is not None:
        adversary = AdversaryRun(head, model.backbone.fc, p.adversary, p.epochs * steps,
                                 step=loop.epoch * steps)  # fmt: skip
        loop.adversary_accuracy = loop.adversary_accuracy or []
    if on_epoch:
        for res in loop.history:
            on_epoch(res)
    if p.compile:
        net = torch.compile(net)
    first = p.epochs + 1 if loop.stopped_early else loop.epoch + 1
    for epoch in range(first, p.epochs + 1):
        t0 = time.perf_counter()
        order = epoch_order(strata, oversample=p.oversamples, generator=generator,
                            row_weights=draw_weights)  # fmt: skip
        # drop_last: a final batch of 1 breaks BatchNorm and adds noise for no gain.
        batches = order[: steps * p.batch_size].view(steps, -1)
        # In the averaging epochs the average is what is scored on validation and kept.
        averaging = averaged is not None and epoch > p.epochs - p.average_epochs
        scored = averaged.module if averaging else model
        sums = train_epoch(
            net,
            batches,
            train_images,
            allowed_t,
            weights=weights,
            optimizer=optimizer,
            scheduler=scheduler,
            aug=aug,
            generator=generator,
            world=world,
            desc=f"{p.task} epoch {epoch}/{p.epochs}",
            dro=dro,
            adversary=adversary,
            average=average_step(averaged, model) if averaging else None,
            mixup=p.mixup,
            logit_penalty=p.logit_penalty,
        )
        total_loss, correct, count = distributed.sum_across(list(sums), world)
        distributed.sync_buffers(model, world)
        epoch_train_time = time.perf_counter() - t0
        val = _evaluate(scored, val_images, val_allowed, 32) if world.is_main else (0.0,) * 3
        val_loss, val_acc, val_f1 = distributed.from_main(list(val), world)
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
        loop.epoch, loop.seen = epoch, loop.seen + int(count)
        if dro is not None:
            loop.dro_weights = dro.weights.cpu().tolist()
        if adversary is not None:
            loop.adversary_accuracy.append(adversary.epoch_accuracy())
        loop.train_time += epoch_train_time
        loop.history.append(res)
        log.info("%s epoch %d: %s", p.task, epoch, {k: round(v, 4) for k, v in asdict(res).items()})
        if _is_better(res, loop.best, p.select_metric):
            loop.best, loop.since_best = res, 0
            loop.best_state = copy.deepcopy(
                {k: v.detach().cpu() for k, v in scored.state_dict().items()}
            )
        else:
            loop.since_best += 1
            if p.patience and loop.since_best >= p.patience:
                log.info("early stop: no validation improvement for %d epochs", loop.since_best)
                loop.stopped_early = True
        loop.wall_seconds = wall_before + time.perf_counter() - start
        # Saved before on_epoch: a crash while logging this epoch does not lose it.
        if resume is not None and world.is_main:
            resume_state.save_training(resume, loop.to_dict(), state)
        if on_epoch:
            on_epoch(res)
        if loop.stopped_early:
            break

    if adversary is not None:
        adversary.close()
    if mix is not None:
        mix.close()
    model.load_state_dict(loop.best_state)
    distributed.plain_batchnorm(model)
    model.to("cpu").eval()
    return TrainResult(
        best_epoch=loop.best.epoch,
        best=loop.best,
        history=loop.history,
        wall_seconds=wall_before + time.perf_counter() - start,
        train_images_per_second=loop.seen / loop.train_time if loop.train_time else 0.0,
        stopped_early=loop.stopped_early,
        resumed_from=resumed_from,
        group_weights=loop.dro_weights,
        adversary_accuracy=loop.adversary_accuracy,
        jtt_errors=None if loop.jtt_errors is None else len(loop.jtt_errors),
    )
