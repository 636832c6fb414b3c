"""A conditional source-adversarial head (train_<task>.adversary), for training only.

Domain-adversarial training (Ganin & Lempitsky, "Unsupervised Domain Adaptation by
Backpropagation", ICML 2015; Ganin et al., JMLR 2016): a small head learns to tell the sources
apart from the network's pooled features, and a gradient-reversal layer hands the feature
extractor the opposite of the head's gradient, so the features lose what tells the sources apart.
Here the sources and the classes are confounded (every COVID-19 film is an adult's, most normals
are Kermany's children), so an unconditional head would also strip the class; the head is
therefore conditioned on a stratum, the class by default (one set of source logits per
stratum, as in Li et al., "Deep Domain Generalization via Conditional Invariant Adversarial
Networks", ECCV 2018; `adversary_within` may add the age group or use the finding): within a
stratum, a film's source should not show. Strata with a single source teach it nothing and are
left out of its loss.

The head is not part of the saved model: predict, evaluate and Grad-CAM never see it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

HIDDEN = 256  # the head's hidden width (Ganin et al. used 1024 on 2048-d features; ours are 512)


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient times -scale backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ReverseGrad.apply(x, scale)


def ramp(progress: float, weight: float) -> float:
    """Ganin et al.'s schedule for the reversal's scale: 0 at the start of training, rising to
    `weight` (2 / (1 + exp(-10 p)) - 1 of it), so the head learns before it pushes back."""
    return weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


class SourceAdversary(nn.Module):
    """The head, with every training row's stratum (`conditions`) and source (`sources`)."""

    def __init__(self, features: int, conditions: np.ndarray, sources: np.ndarray) -> None:
        super().__init__()
        cond = torch.as_tensor(np.asarray(conditions, dtype=np.int64))
        src = torch.as_tensor(np.asarray(sources, dtype=np.int64))
        self.n_cond, self.n_src = int(cond.max()) + 1, int(src.max()) + 1
        present = torch.zeros(self.n_cond, self.n_src, dtype=torch.bool)
        present[cond, src] = True
        # Buffers: they move with the head, and the state_dict checks their shapes on resume.
        self.register_buffer("conditions", cond, persistent=False)
        self.register_buffer("sources", src, persistent=False)
        self.register_buffer("present", present, persistent=False)
        self.net = nn.Sequential(
            nn.Linear(features, HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, self.n_cond * self.n_src),
        )  # fmt: skip

    def loss(self, features: torch.Tensor, rows: torch.Tensor, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The head's cross-entropy on training rows `rows`, over the sources its stratum holds,
        behind a reversal of `scale`; with the number of rows it scored and how many it got
        right (its accuracy says how much source the features still carry)."""
        cond, src = self.conditions[rows], self.sources[rows]
        allowed = self.present[cond]
        scored = allowed.sum(1) > 1  # a stratum with one source: nothing to tell apart
        logits = self.net(reverse_grad(features.float(), scale))
        logits = logits.view(len(rows), self.n_cond, self.n_src)
        logits = logits[torch.arange(len(rows), device=logits.device), cond]
        logits = logits.masked_fill(~allowed, -1e4)
        nll = nn.functional.cross_entropy(logits, src, reduction="none")
        n = scored.sum()
        loss = (nll * scored).sum() / n.clamp_min(1)
        right = ((logits.argmax(1) == src) & scored).sum()
        return loss, n, right


class PooledFeatures:
    """Catches the input of a model's final linear layer (the pooled features) on each forward."""

    def __init__(self, fc: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._handle = fc.register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.value = args[0]

    def close(self) -> None:
        self._handle.remove()
        self.value = None


class AdversaryRun:
    """The head in a training loop: its features hook, the reversal's ramp over all the run's
    steps, and this epoch's counts of rows scored and sources told (on the device)."""

    def __init__(self, head: SourceAdversary, fc: nn.Module, weight: float, total_steps: int,
                 step: int = 0) -> None:  # fmt: skip
        self.head, self.features = head, PooledFeatures(fc)
        self.weight, self.total_steps, self.step = weight, max(1, total_steps), step
        self.scored = self.right = None

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """The head's loss on the last forward's features; advances the ramp by one step."""
        if self.features.value is None:
            raise RuntimeError("the source-adversarial head saw no features: no forward ran")
        scale = ramp(self.step / self.total_steps, self.weight)
        loss, n, right = self.head.loss(self.features.value, rows, scale)
        self.features.value = None
        self.step += 1
        self.scored = n if self.scored is None else self.scored + n
        self.right = right if self.right is None else self.right + right
        return loss

    def epoch_accuracy(self) -> float | None:
        """The share of this epoch's scored rows whose source the head told (None: none
        scored); resets the counts."""
        n, right = self.scored, self.right
        self.scored = self.right = None
        if n is None or int(n) == 0:
            return None
        return float(right) / float(n)

    def close(self) -> None:
        self.features.close()
