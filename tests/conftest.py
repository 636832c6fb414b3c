"""Shared fixtures: where the real mirror is, and whether its absence is a failure."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def mirror_path() -> Path | None:
    """The local chest X-ray mirror, found as `dvc repro` finds it (cxr.fetch.find_mirror):
    $CXR_MIRROR, else `shared/cxr-mirror` beside the repository or in any folder above it."""
    from cxr.errors import InputError
    from cxr.fetch import find_mirror

    try:
        path = find_mirror(os.environ, [REPO]).path
    except InputError:  # $CXR_MIRROR set to something that is not a folder
        return None
    return path if path is not None and (path / "sources.csv").exists() else None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The mirror, or skip; in CI (CI=true) a missing mirror is a failure, never a skip."""
    path = mirror_path()
    if path is None:
        message = (
            "the chest X-ray mirror is missing (set CXR_MIRROR or put it at shared/cxr-mirror "
            "beside the repository or in a folder above it)"
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


def one_batch_of_quadrants() -> tuple[np.ndarray, torch.Tensor, torch.nn.Module, torch.nn.Module]:
    """What the one-step tests of train_epoch start from, on one thread: 8 quadrant_set films,
    their one-hot allowed classes, a ResNet-18 drawn with torch seed 0 and an untouched copy of
    it (the twin the expected loss is computed with)."""
    from cxr.models import build_model

    torch.set_num_threads(1)
    images, labels = quadrant_set(8)
    allowed = torch.from_numpy(np.eye(4, dtype=bool)[labels])
    torch.manual_seed(0)
    model = build_model("resnet18", 4)
    return images, allowed, model, copy.deepcopy(model)


# --- params: the repository's params.yaml is the one source of values, in tests too ----------


def repo_params(section: str, **changes: Any) -> Any:
    """Section `section` of the repository's params.yaml as its dataclass (cxr.config), with
    `changes` made: the values every stage would run with, but for the ones a test sets (a
    dict such as `augment` is merged key by key)."""
    from cxr import config

    if section.startswith("train_"):
        params = config.load_train_params(PARAMS, section)
    else:
        loaders = {"base": config.load_base, "split": config.load_split_params,
                   "evaluate": config.load_evaluate_params,
                   "gradcam": config.load_gradcam_params,
                   "segment": config.load_segment_params}  # fmt: skip
        params = loaders[section](PARAMS)
    for key, value in changes.items():  # a dict (train_*.augment) changes key by key
        if isinstance(value, dict) and isinstance(getattr(params, key), dict):
            changes[key] = {**getattr(params, key), **value}
    return dataclasses.replace(params, **changes)


PHOTOMETRIC_OFF = {"gamma": 0.0, "contrast": 0.0, "brightness": 0.0, "sharpen": 0.0,
                   "noise": 0.0, "cutout": 0.0}  # fmt: skip
NO_AUG = {"hflip": False, "degrees": 0.0, "translate": 0.0, "scale": [1.0, 1.0],
          "jpeg": 0.0} | PHOTOMETRIC_OFF  # fmt: skip


def toy_params(**changes: Any) -> Any:
    """The four-class train params the training tests start from: a ResNet-18 on quadrant_set
    images, 2 epochs of batch 8 at a constant 3e-3, no augmentation, one thread."""
    toy = dict(arch="resnet18", epochs=2, batch_size=8, lr=3.0e-3, augment=NO_AUG,
               schedule="constant", threads=1)  # fmt: skip
    return repo_params("train_four_class", **(toy | changes))


def write_params(path: Path, **sections: dict[str, Any]) -> Path:
    """The repository's params.yaml with the keys of `sections` changed, written to `path`
    (a nested dict, e.g. `augment`, is merged key by key). A changed base.image_size makes
    each task's network see the arrays' size (input_size null) unless `sections` sets it:
    tests use small arrays, which a 112 px four-class input cannot come from."""
    params = yaml.safe_load(PARAMS.read_text())
    if "image_size" in sections.get("base", {}):
        for task in ("train_binary", "train_four_class"):
            params[task]["input_size"] = None
    for name, changes in sections.items():
        target = params.setdefault(name, {})
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **copy.deepcopy(value)}
            else:
                target[key] = copy.deepcopy(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def augment_params(**changes: Any) -> Any:
    """The repository's augmentation (train_four_class.augment) with `changes`."""
    return dataclasses.replace(repo_params("train_four_class").augmentation(), **changes)
