"""BatchNorm statistics re-estimated on a site's own films (AdaBN), without labels.

Li, Wang, Shi, Liu & Hou, "Revisiting batch normalization for practical domain adaptation"
(Pattern Recognition 2018): a network's BatchNorm layers normalise each channel with the mean and
variance of the training films; films from another scanner or processing chain arrive with other
statistics, and re-estimating them on the new films alone (no labels, no gradient) re-centres the
features where the layers above expect them. `torch.optim.swa_utils.update_bn` does the pass.
Out-of-source, `stages/oos_score.py --adapt-bn` measures it on each fold's held-out films.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from cxr.data import to_input


def adapt_batchnorm(model: nn.Module, images: np.ndarray, batch_size: int = 32) -> nn.Module:
    """A copy of `model` (left untouched) whose BatchNorm running statistics are the mean of
    those of `images` (uint8 N x H x W, the model's arrays) taken in batches of `batch_size`."""
    if len(images) == 0:
        raise ValueError("adapting BatchNorm needs at least one film")
    adapted = copy.deepcopy(model)
    device = next(adapted.parameters()).device
    batches = (to_input(images[i : i + batch_size]).to(device)
               for i in range(0, len(images), batch_size))  # fmt: skip
    with torch.no_grad():
        update_bn(batches, adapted)
    return adapted.eval()
