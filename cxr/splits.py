"""Patient-grouped, stratified train/val/test splitting and the leakage guard."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GROUP_BY = ("patient", "image")


class LeakageError(RuntimeError):
    """A patient group or an identical file sits in two of train/val/test."""


def _first_fold(strata: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of one stratified, grouped fold holding about `fraction` of the rows.

    StratifiedGroupKFold makes k folds of ~1/k each, so a fraction is realised as 1/round(1/f):
    0.2 -> 5 folds, 0.25 -> 4 folds. Exact sizes also depend on group sizes.
    """
    n_splits = max(2, round(1.0 / fraction))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Strata rarer than n_splits (e.g. 8 adult normals) cannot be in every fold; they are
        # still spread as well as their count allows, which is all one can ask.
        warnings.filterwarnings("ignore", message="The least populated class in y")
        _, held_out = next(folds.split(np.zeros(len(strata)), strata, groups))
    mask = np.zeros(len(strata), dtype=bool)
    mask[held_out] = True
    return mask


def assign_splits(
    strata: np.ndarray,
    groups: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """Return 'train' / 'val' / 'test' per row; rows sharing a group always share a split."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"split fractions must be in (0, 1) and sum below 1, got val={val_fraction}, "
            f"test={test_fraction}"
        )
    strata = np.asarray(strata)
    groups = np.asarray(groups)
    out = np.full(len(strata), "train", dtype=object)
    test = _first_fold(strata, groups, test_fraction, seed)
    out[test] = "test"
    rest = np.flatnonzero(~test)
    # val is a fraction of the whole pool, so of what is left after test it is larger.
    val_of_rest = val_fraction / (1.0 - test_fraction)
    val = _first_fold(strata[rest], groups[rest], val_of_rest, seed + 1)
    out[rest[val]] = "val"
    return out


def split_table(
    table: pd.DataFrame,
    *,
    group_by: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> pd.Series:
    """Split the `main` cohort rows of a manifest; returns the split name per row.

    Strata combine label and dataset, so the few adult non-COVID images (ieee8023) are spread
    over the splits instead of landing all in one by chance.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"split.group_by must be one of {GROUP_BY}, got {group_by!r}")
    strata = (table["label"] + "/" + table["dataset"]).to_numpy()
    if group_by == "patient":
        groups = table["group_id"].to_numpy()
    else:
        # The original study's protocol: every image on its own, so one patient's images (and
        # duplicate copies of one picture) can land in train and test. For comparison only.
        log.warning("split.group_by=image: patients may cross splits (the study's leaky protocol)")
        groups = np.arange(len(table))
    splits = assign_splits(
        strata, groups, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    return pd.Series(splits, index=table.index, name="split")


def check_no_leakage(table: pd.DataFrame, *, check_groups: bool = True) -> None:
    """Fail if a sha256 (or, with check_groups, a group_id) appears in two splits."""
    columns = ["sha256", "group_id"] if check_groups else ["sha256"]
    for column in columns:
        per_value = table.groupby(column)["split"].nunique()
        crossing = per_value[per_value > 1]
        if len(crossing):
            examples = ", ".join(map(str, crossing.index[:5]))
            raise LeakageError(
                f"{len(crossing)} {column} value(s) appear in more than one of train/val/test "
                f"(e.g. {examples}); the split would leak patients between training and test."
            )
