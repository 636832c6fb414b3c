"""Shared fixtures: where the real mirror is, and whether its absence is a failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def mirror_path() -> Path | None:
    """The local chest X-ray mirror: $CXR_MIRROR, else ../shared/cxr-mirror beside the repo."""
    env = os.environ.get("CXR_MIRROR")
    path = Path(env) if env else REPO.parent / "shared" / "cxr-mirror"
    return path if (path / "sources.csv").exists() else None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The mirror, or skip; in CI (CI=true) a missing mirror is a failure, never a skip."""
    path = mirror_path()
    if path is None:
        message = (
            "the chest X-ray mirror is missing (set CXR_MIRROR or put it at ../shared/cxr-mirror)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny convs: a second thread only adds sync cost (10x slower on a busy 2-core box).
    Use per module: pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quadrant_set(
    n: int, size: int = 32, seed: int = 0, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Class k = a bright square in quadrant k of an otherwise noisy image: learnable in a few
    steps. `labels` default: 0, 1, 2, 3, 0, ... (balanced)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4 if labels is None else np.asarray(labels)
    images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    half = size // 2
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, r * half : (r + 1) * half, c * half : (c + 1) * half] = 230
    return images, labels
