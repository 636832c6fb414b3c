"""Decode once, never per epoch: preprocessed images stored as uint8 arrays with a manifest.

A split on disk is `<name>.npy` (N x H x W uint8) plus `<name>.csv` whose row i describes
array row i (source path, sha256, label, group, dataset, ...).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.images import Preprocessing, preprocess_file

log = logging.getLogger(__name__)


def _preprocess_one(args: tuple[str, bool, Preprocessing]) -> np.ndarray:
    path, already_harmonised, spec = args
    return preprocess_file(path, spec, already_harmonised)


def preprocess_files(
    files: list[Path],
    already_harmonised: list[bool],
    spec: Preprocessing,
    *,
    workers: int = 0,
    desc: str = "preprocess",
) -> np.ndarray:
    """Preprocess many files (in parallel processes) into one N x S x S uint8 array."""
    size = spec.image_size
    out = np.empty((len(files), size, size), dtype=np.uint8)
    jobs = [(str(f), h, spec) for f, h in zip(files, already_harmonised, strict=True)]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=desc, unit="img", leave=False)
    if workers == 1 or len(jobs) < 32:
        for i, job in enumerate(jobs):
            out[i] = _preprocess_one(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, arr in enumerate(pool.map(_preprocess_one, jobs, chunksize=16)):
                out[i] = arr
                bar.update()
    bar.close()
    return out


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def save_split(directory: Path, name: str, array: np.ndarray, table: pd.DataFrame) -> None:
    """Write `<name>.npy` and `<name>.csv` (row i of one is row i of the other)."""
    if len(array) != len(table):
        raise ValueError(f"split {name}: {len(array)} images but {len(table)} manifest rows")
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(directory / f"{name}.npy", array)
    tmp = directory / f"{name}.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, directory / f"{name}.csv")


def load_split(directory: str | Path, name: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Read one split written by `save_split`, checking that array and manifest agree."""
    directory = Path(directory)
    npy, csv = directory / f"{name}.npy", directory / f"{name}.csv"
    for path in (npy, csv):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: run the split stage first (dvc repro split)"
            )
    array = np.load(npy, allow_pickle=False)
    table = pd.read_csv(csv, keep_default_na=False)
    if array.ndim != 3 or array.dtype != np.uint8 or len(array) != len(table):
        raise ValueError(
            f"{npy}: expected an N x H x W uint8 array matching {csv} ({len(table)} rows), "
            f"got {array.dtype} {array.shape}"
        )
    return array, table
