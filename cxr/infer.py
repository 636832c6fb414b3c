"""Inference helpers every stage shares: device, CPU threads, batched probabilities.

Kept apart from the training loop (cxr/train.py) so that editing the loop re-runs only the
training stages, not evaluate and gradcam (see the deps in dvc.yaml).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from cxr.data import to_input
from cxr.errors import InputError


def pick_device() -> torch.device:
    """CUDA when present (never required), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_threads(threads: int = 0, env: dict[str, str] | None = None) -> int:
    """The torch thread count: `threads` if set, else this process's share of the cores.

    The share is cores // CXR_JOBS (default 1 job). Experiments run side by side
    (`CXR_JOBS=2 dvc queue start -j 2`) then take one core each instead of each claiming every
    core: two processes with two OpenMP threads on two cores spin against each other and run
    several times slower than one thread each. A fixed value keeps runs bit-identical: thread
    counts change the order of floating-point sums.
    """
    if threads < 0:
        raise InputError(f"threads must be >= 0 (0 = automatic), got {threads}")
    if threads:
        return threads
    env = os.environ if env is None else env
    raw = env.get("CXR_JOBS", "1").strip() or "1"
    try:
        jobs = int(raw)
    except ValueError:
        raise InputError(f"CXR_JOBS must be a whole number of parallel jobs, got {raw!r}") from None
    if jobs < 1:
        raise InputError(f"CXR_JOBS must be >= 1, got {jobs}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // jobs)


def configure_cpu(threads: int) -> int:
    """Threads and denormals for fast CPU training; returns the thread count used.

    Flushing denormals to zero matters: after a few optimizer steps, zero-initialised weights
    and tiny gradients become denormal floats, and a CPU computes those ~10x slower (measured
    on resnet50 here: 27 img/s before the first step, 3.5 img/s after, 25 img/s with flushing).
    """
    n = cpu_threads(threads)
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    return n


def autocast(device: torch.device) -> torch.autocast:
    """bfloat16 autocast on a GPU; on the CPU plain float32 (CPU autocast is slower here)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
) -> np.ndarray:
    """Softmax probabilities for uint8 images, batched."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size]).to(device)
        with autocast(device):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    num_classes = model.backbone.fc.out_features if hasattr(model, "backbone") else 0
    return np.concatenate(out) if out else np.zeros((0, num_classes), dtype=np.float32)
