"""MixStyle (train_<task>.mixstyle), for training only.

Zhou, Yang, Qiao & Xiang, "Domain Generalization with MixStyle", ICLR 2021: the channel-wise
mean and standard deviation of a CNN's early feature maps carry an image's "style" (for us the
acquisition: exposure, processing, detector noise), the normalised maps its content. Mixing the
statistics of two films of a batch, at random, shows the network the same anatomy under styles
in between the sources it trains on, so it leans less on any one source's look. As in the paper:
after the first two residual stages, with probability `p` per stage and batch, a mixing weight
from Beta(0.1, 0.1) per film, a random partner within the batch, statistics detached from the
gradient. Nothing changes in evaluation mode, and nothing is added to the model's weights:
predict, evaluate and Grad-CAM never see it. Its draws come from torch's global generator, which
a resume file restores.
"""

from __future__ import annotations

import torch
from torch import nn

ALPHA = 0.1  # Beta(alpha, alpha): the paper's value, mostly near-0 or near-1 weights
LAYERS = ("layer1", "layer2")  # the paper's choice for ResNets: early, style-rich stages
EPS = 1e-6


def mix_styles(x: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """x (N x C x H x W) with each film's channel statistics replaced by `lam` (N) times its
    own plus 1 - `lam` times those of film `partner` (N indices); its normalised maps kept."""
    x32 = x.float()
    mu = x32.mean((2, 3), keepdim=True).detach()
    sig = (x32.var((2, 3), keepdim=True) + EPS).sqrt().detach()
    lam = lam.view(-1, 1, 1, 1).to(x32)
    mixed_mu = lam * mu + (1 - lam) * mu[partner]
    mixed_sig = lam * sig + (1 - lam) * sig[partner]
    return (((x32 - mu) / sig) * mixed_sig + mixed_mu).to(x.dtype)


class MixStyle:
    """Forward hooks on `model.backbone`'s LAYERS that mix styles while the model trains."""

    def __init__(self, model: nn.Module, p: float):
        self.p = p
        self.beta = torch.distributions.Beta(torch.tensor(ALPHA), torch.tensor(ALPHA))
        self._handles = [getattr(model.backbone, name).register_forward_hook(self._hook)
                         for name in LAYERS]  # fmt: skip

    def _hook(self, module: nn.Module, _inputs: object, x: torch.Tensor) -> torch.Tensor | None:
        if not module.training or len(x) < 2 or float(torch.rand(())) >= self.p:
            return None  # None: the stage's output as it was
        lam = self.beta.sample((len(x),))
        partner = torch.randperm(len(x))
        return mix_styles(x, lam.to(x.device), partner.to(x.device))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
