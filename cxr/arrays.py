"""Decode once, never per epoch: preprocessed images stored as uint8 arrays with a manifest.

A split on disk is `<name>.npy` (N x H x W uint8) plus `<name>.csv` whose row i describes
array row i (source path, sha256, label, group, dataset, ...).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from cxr.errors import InputError
from cxr.images import Preprocessing, preprocess_file

if TYPE_CHECKING:  # annotations only: pandas is imported where a table is read
    import pandas as pd

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


def _atomic_save_npy(path: Path, array: np.ndarray, chunk_rows: int = 256) -> None:
    """Write `array` as a plain .npy through a memory map, a block of rows at a time.

    np.lib.format.open_memmap writes the ordinary .npy header, so every reader (np.load, with or
    without mmap_mode) still works; copying in blocks never holds a second full copy in memory,
    and `array` may itself be memory-mapped.
    """
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
    for start in range(0, len(array), chunk_rows):
        out[start : start + chunk_rows] = array[start : start + chunk_rows]
    out.flush()
    del out  # closes the map before the rename
    os.replace(tmp, path)


def save_split(directory: Path, name: str, array: np.ndarray, table: pd.DataFrame) -> None:
    """Write `<name>.npy` and `<name>.csv` (row i of one is row i of the other)."""
    if len(array) != len(table):
        raise InputError(f"split {name}: {len(array)} images but {len(table)} manifest rows")
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(directory / f"{name}.npy", array)
    tmp = directory / f"{name}.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, directory / f"{name}.csv")


def load_split(
    directory: str | Path, name: str, *, in_memory: bool = False
) -> tuple[np.ndarray, pd.DataFrame]:
    """Read one split written by `save_split`, checking that array and manifest agree.

    The array is memory-mapped read-only (np.load's mmap_mode="r") unless `in_memory`: pages are
    read when a batch touches them, a split larger than RAM still trains, and the processes of a
    multi-process run share one copy through the page cache. Writing into it is an error.
    """
    directory = Path(directory)
    npy, csv = directory / f"{name}.npy", directory / f"{name}.csv"
    for path in (npy, csv):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: run the split stage first (dvc repro split)"
            )
    array = np.load(npy, mmap_mode=None if in_memory else "r", allow_pickle=False)
    import pandas as pd  # not at the top: predict reaches this module and never reads a split

    table = pd.read_csv(csv, keep_default_na=False)
    if array.ndim != 3 or array.dtype != np.uint8 or len(array) != len(table):
        raise InputError(
            f"{npy}: expected an N x H x W uint8 array matching {csv} ({len(table)} rows), "
            f"got {array.dtype} {array.shape}"
        )
    return array, table
