"""Out-of-source validation: hold out whole places, train on the rest, score what was held out.

The in-distribution validation split shares hospitals with training, so it overstates what a
new hospital sees (internal adult AUC 0.98 vs 0.87 on unseen sources). A fold here holds out
every film of some places (`location` or `country` in sources.csv) and of some datasets, with
their whole patient groups, from the default split's pool; both classifiers are trained with the
pipeline's own params on what remains (train rows to learn, val rows to pick the epoch) and score
the held-out films of train and val (never the test split's: choices are made on these scores).
cxr/oos_report.py pools the folds' held-out predictions: the estimate of new-hospital
performance and the committed COVID-19 operating point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.arrays import load_split
from cxr.config import BaseParams, TrainParams, network_input
from cxr.data import allowed_classes, head_targets, labels_for, seed_everything, strata_for
from cxr.errors import InputError
from cxr.infer import predict_proba
from cxr.lungs import load_lung_masks
from cxr.models import CXRNet, build_model
from cxr.oos_params import Fold
from cxr.params import ParamsError
from cxr.splits import close_over_groups
from cxr.train import EpochResult, train_model

log = logging.getLogger(__name__)

POOL = ("train", "val", "test")  # the default split's main pool, re-partitioned per fold


def pool_table(data: Path, image_size: int) -> tuple[np.ndarray, pd.DataFrame]:
    """train + val + test of the default split, one array, with `origin` = the split it came from.

    The arrays must have the params' size: a run whose params say 128 px on a 112 px split
    would train and score at 112 px under a 128 px name (RULE.md thirteenth amendment)."""
    arrays, tables = [], []
    for name in POOL:
        x, t = load_split(data, name)
        if len(x) and x.shape[1:] != (image_size, image_size):
            raise InputError(
                f"{data}/{name}.npy holds {x.shape[1]} px arrays but base.image_size is "
                f"{image_size}: make a split with these params (python stages/split.py --params "
                "PARAMS --raw data/raw --out DIR --metrics M) and pass it with --data DIR"
            )
        arrays.append(np.asarray(x))
        tables.append(t.assign(origin=name))
    table = pd.concat(tables, ignore_index=True)
    if "location" not in table:
        raise ValueError(f"{data}: split tables have no `location` column; re-run fetch and split "
                         "with a sources.csv that has location/country")  # fmt: skip
    return np.concatenate(arrays), table


def pool_masks(lungs: Path, table: pd.DataFrame) -> np.ndarray:
    """The segment stage's masks for the pool rows, in the pool's order (crop: lungs only)."""
    parts = [load_lung_masks(lungs, name, table[table["origin"] == name].reset_index(drop=True))
             for name in POOL]  # fmt: skip
    return np.concatenate(parts)


def held_out(table: pd.DataFrame, fold: Fold) -> np.ndarray:
    """Boolean per pool row: the fold's places and datasets, extended to whole patient groups."""
    missing = {f"country {c}" for c in set(fold.countries) - set(table["country"])}
    missing |= {f"location {c}" for c in set(fold.locations) - set(table["location"])}
    missing |= {f"dataset {d}" for d in set(fold.datasets) - set(table["dataset"])}
    if missing:
        raise ParamsError(f"oos fold {fold.name}: {sorted(missing)} match no film of the pool")
    main = table.assign(cohort="main")
    mask = (main["dataset"].isin(fold.datasets) | main["country"].isin(fold.countries)
            | main["location"].isin(fold.locations))  # fmt: skip
    return np.array(close_over_groups(main, mask), dtype=bool)  # writable (pandas CoW)


def with_epochs(p: TrainParams, epochs: int | None) -> TrainParams:
    """The task's params with `oos.epochs` in place of its own (None: unchanged)."""
    return p if epochs is None else replace(p, epochs=int(epochs))


def fit(
    images: np.ndarray,
    table: pd.DataFrame,
    train: np.ndarray,
    val: np.ndarray,
    p: TrainParams,
    base: BaseParams,
    on_epoch: Callable[[CXRNet, EpochResult], None] | None = None,
) -> tuple[CXRNet, dict]:
    """Train one task on rows `train`, choosing the epoch on rows `val` (as the train stage does).
    `on_epoch(model, result)` sees the model after every epoch (cxr.oos_trajectory)."""
    generator = seed_everything(base.seed, p.deterministic)
    tr, va = table[train].reset_index(drop=True), table[val].reset_index(drop=True)
    if not p.partial_labels and p.task != "binary":
        keep = labels_for(tr, p.task) >= 0
        tr, train = tr[keep].reset_index(drop=True), np.flatnonzero(train)[keep]
    model = build_model(p.arch, len(p.class_names), weights=p.weights,
                        zero_init_residual=p.zero_init_residual,
                        input_size=network_input(base, p))  # fmt: skip
    start = time.perf_counter()
    result = train_model(
        model, p,
        train_images=images[train], train_labels=labels_for(tr, p.task),
        train_allowed=allowed_classes(tr, p.task), train_strata=strata_for(tr, p.task, p.balance_by),
        val_images=images[val], val_labels=labels_for(va, p.task),
        val_allowed=allowed_classes(va, p.task), generator=generator,
        train_sources=head_targets(tr, p),
        on_epoch=(lambda res: on_epoch(model, res)) if on_epoch is not None else None,
    )  # fmt: skip
    summary = result.summary() | {"train_images": len(tr), "val_images": len(va),
                                  "wall_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    return model, summary


def predictions(table: pd.DataFrame, binary: np.ndarray | None, four: np.ndarray | None,
                names: list[str]) -> pd.DataFrame:  # fmt: skip
    """The held-out rows with the models' probabilities (p_covid: binary; p4_<class>: four-class)."""
    keep = ["path", "dataset", "location", "country", "label", "age_group", "group_id", "origin"]
    out = table[[c for c in keep if c in table]].copy()
    if binary is not None:
        out["p_covid"] = binary[:, 1]
    if four is not None:
        for k, name in enumerate(names):
            out[f"p4_{name}"] = four[:, k]
        out["call4"] = np.asarray(names)[four.argmax(axis=1)]
    return out


def fold_rows(table: pd.DataFrame, fold: Fold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean rows (train, val, scored held-out) of a fold: the fold's places are held out of
    training and validation, and scored unless they sit in the default test split."""
    out = held_out(table, fold)
    train = (~out) & (table["origin"] == "train").to_numpy()
    val = (~out) & (table["origin"] == "val").to_numpy()
    # Held-out films of the default test split are neither trained on nor scored: choices made
    # here must not see the films the committed models are finally tested on.
    out &= (table["origin"] != "test").to_numpy()
    return train, val, out


def scored_frame(table: pd.DataFrame, out: np.ndarray, val: np.ndarray, probs: dict,
                 names: list[str], fold: str) -> pd.DataFrame:  # fmt: skip
    """The fold's predictions file: held-out and internal-validation rows with the models'
    probabilities (`probs` by task, rows of `out | val` in table order)."""
    scored = out | val
    frame = predictions(table[scored], probs.get("binary"), probs.get("four_class"), names)
    frame["scored_as"] = np.where(out[scored], "held_out", "internal_val")
    return frame.assign(fold=fold)


def run_fold(
    images: np.ndarray,
    table: pd.DataFrame,
    fold: Fold,
    tasks: dict[str, TrainParams],
    base: BaseParams,
    on_model: Callable[[str, CXRNet, dict], None] | None = None,
    on_epoch: Callable[[str, CXRNet, EpochResult], None] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Train both tasks without the fold's films; their predictions on those films + a summary.
    `on_model(task, model, summary)` receives each trained model (to keep it: stages/oos.py --models);
    `on_epoch(task, model, result)` each model after every epoch (cxr.oos_trajectory)."""
    train, val, out = fold_rows(table, fold)
    log.info("fold %s: %d held out, training on %d, epoch chosen on %d", fold.name, out.sum(),
             train.sum(), val.sum())  # fmt: skip
    probs, summary = {}, {"held_out": int(out.sum()), "held_out_by_dataset":
                          table[out]["dataset"].value_counts().to_dict()}  # fmt: skip
    # The fold's own validation films (same sources as its training) are scored too, so the
    # report shows the in-distribution estimate beside the out-of-source one, same models.
    scored = out | val
    for task, p in tasks.items():
        traced = partial(on_epoch, task) if on_epoch is not None else None
        model, summary[task] = fit(images, table, train, val, p, base, on_epoch=traced)
        if on_model is not None:
            on_model(task, model, summary[task])
        probs[task] = predict_proba(model, images[scored], batch_size=64)
    names = tasks["four_class"].class_names if "four_class" in tasks else []
    return scored_frame(table, out, val, probs, names, fold.name), summary
