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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.arrays import load_split
from cxr.config import BaseParams, TrainParams
from cxr.data import allowed_classes, labels_for, seed_everything, strata_for
from cxr.infer import predict_proba
from cxr.lungs import load_lung_masks
from cxr.models import CXRNet, build_model
from cxr.params import ParamsError
from cxr.splits import close_over_groups
from cxr.train import train_model

log = logging.getLogger(__name__)

POOL = ("train", "val", "test")  # the default split's main pool, re-partitioned per fold


@dataclass(frozen=True)
class Fold:
    name: str
    countries: list[str]  # `country` values held out
    locations: list[str]  # `location` values held out (where a country also holds a training
    # source: ieee8023's "China" is a location, while Kermany's hospital is in China too)
    datasets: list[str]  # whole datasets held out (e.g. rsna: a source of adult normals)


def folds_from_params(raw: dict) -> list[Fold]:
    """`oos.folds` of params.yaml: [{name, countries, locations, datasets}, ...], names unique."""
    folds, keys = [], ("countries", "locations", "datasets")
    for i, item in enumerate(raw or []):
        unknown = set(item) - {"name", *keys}
        if unknown or "name" not in item:
            raise ParamsError(f"oos.folds[{i}]: keys are name, {', '.join(keys)}; "
                              f"got {sorted(item)}")  # fmt: skip
        folds.append(Fold(str(item["name"]), *(list(item.get(k) or []) for k in keys)))
    names = [f.name for f in folds]
    if not folds or len(set(names)) != len(names):
        raise ParamsError(f"oos.folds must name at least one fold, each once; got {names}")
    return folds


@dataclass(frozen=True)
class OosParams:
    specificity: float
    bootstrap: int
    tasks: list[str]
    epochs: int | None
    folds: list[Fold]


def load_oos_params(path: str | Path) -> OosParams:
    """params.yaml `oos`, every key required and checked (one line naming the bad key)."""
    import yaml

    raw = (yaml.safe_load(Path(path).read_text()) or {}).get("oos")
    keys = ("specificity", "bootstrap", "tasks", "epochs", "folds")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: oos missing")
    for key in keys:
        if key not in raw:
            raise ParamsError(f"{path}: oos.{key} missing")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ParamsError(f"{path}: oos.{unknown[0]} unknown (oos takes {', '.join(keys)})")
    spec, boot, tasks, epochs = raw["specificity"], raw["bootstrap"], raw["tasks"], raw["epochs"]
    if not isinstance(spec, (int, float)) or not 0 < spec < 1:
        raise ParamsError(f"oos.specificity must be a fraction in (0, 1), got {spec!r}")
    if not isinstance(boot, int) or boot < 1:
        raise ParamsError(f"oos.bootstrap must be a positive integer, got {boot!r}")
    if not isinstance(tasks, list) or not tasks or set(tasks) - {"binary", "four_class"}:
        raise ParamsError(f"oos.tasks must list binary and/or four_class, got {tasks!r}")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool)
                               or epochs < 1):  # fmt: skip
        raise ParamsError(f"oos.epochs must be a positive integer or null, got {epochs!r}")
    return OosParams(float(spec), boot, list(tasks), epochs, folds_from_params(raw["folds"]))


def recipe(params: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    """The training recipe the binary fold models had: params.yaml's `base`, `split` and
    `train_binary`, with `oos.epochs` in place of the section's own when set. It goes beside the operating point
    so that evaluate can refuse to give it to a model trained otherwise: a threshold is a point
    on one recipe's score scale (a 2-epoch model's 0.73 is not an 8-epoch model's)."""
    train = dict(params["train_binary"])
    if epochs is not None:
        train["epochs"] = epochs
    return {"base": dict(params["base"]), "split": dict(params["split"]), "train_binary": train}


def pool_table(data: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """train + val + test of the default split, one array, with `origin` = the split it came from."""
    arrays, tables = [], []
    for name in POOL:
        x, t = load_split(data, name)
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
) -> tuple[CXRNet, dict]:
    """Train one task on rows `train`, choosing the epoch on rows `val` (as the train stage does)."""
    generator = seed_everything(base.seed, p.deterministic)
    tr, va = table[train].reset_index(drop=True), table[val].reset_index(drop=True)
    if not p.partial_labels and p.task != "binary":
        keep = labels_for(tr, p.task) >= 0
        tr, train = tr[keep].reset_index(drop=True), np.flatnonzero(train)[keep]
    model = build_model(p.arch, len(p.class_names), weights=p.weights,
                        zero_init_residual=p.zero_init_residual)  # fmt: skip
    start = time.perf_counter()
    result = train_model(
        model, p,
        train_images=images[train], train_labels=labels_for(tr, p.task),
        train_allowed=allowed_classes(tr, p.task), train_strata=strata_for(tr, p.task, p.balance_by),
        val_images=images[val], val_labels=labels_for(va, p.task),
        val_allowed=allowed_classes(va, p.task), generator=generator,
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


def run_fold(
    images: np.ndarray,
    table: pd.DataFrame,
    fold: Fold,
    tasks: dict[str, TrainParams],
    base: BaseParams,
) -> tuple[pd.DataFrame, dict]:
    """Train both tasks without the fold's films; their predictions on those films + a summary."""
    out = held_out(table, fold)
    train = (~out) & (table["origin"] == "train").to_numpy()
    val = (~out) & (table["origin"] == "val").to_numpy()
    # Held-out films of the default test split are neither trained on nor scored: choices made
    # here must not see the films the committed models are finally tested on.
    out &= (table["origin"] != "test").to_numpy()
    log.info("fold %s: %d held out, training on %d, epoch chosen on %d", fold.name, out.sum(),
             train.sum(), val.sum())  # fmt: skip
    probs, summary = {}, {"held_out": int(out.sum()), "held_out_by_dataset":
                          table[out]["dataset"].value_counts().to_dict()}  # fmt: skip
    # The fold's own validation films (same sources as its training) are scored too, so the
    # report shows the in-distribution estimate beside the out-of-source one, same models.
    scored = out | val
    for task, p in tasks.items():
        model, summary[task] = fit(images, table, train, val, p, base)
        probs[task] = predict_proba(model, images[scored], batch_size=64)
    frame = predictions(table[scored], probs.get("binary"), probs.get("four_class"),
                        tasks["four_class"].class_names if "four_class" in tasks else [])  # fmt: skip
    frame["scored_as"] = np.where(out[scored], "held_out", "internal_val")
    return frame.assign(fold=fold.name), summary
