"""Patient-grouped, stratified train/val/test splitting and the leakage guard."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from cxr.errors import LeakageError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GROUP_BY = ("patient", "image")


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
    """Fail if a sha256 (or, with check_groups, a group_id) appears in two splits.

    `table` holds train/val/test and, when some are held out, `external`: a held-out hospital's
    patient must not also sit in train or val.
    """
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


# Datasets added to give the non-COVID classes adults (see README "Data"); `split.adult_controls:
# false` keeps them out of train and val, which is the data the study trained on.
ADULT_CONTROL_DATASETS = ("rsna", "nih")
TRAINING_SPLITS = ("train", "val")  # what a model learns from or is selected on


def _component_representatives(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Map each group id in `pairs` to the smallest id of its connected component.

    scipy's connected_components does the graph work (it replaced a hand-written union-find);
    the smallest id, not scipy's arbitrary component label, names the merged group, so the
    split does not depend on the order the pairs were found in.
    """
    if not pairs:
        return {}
    ids, codes = np.unique(np.asarray(pairs, dtype=object).ravel(), return_inverse=True)
    codes = codes.reshape(-1, 2)
    edges = coo_matrix(
        (np.ones(len(codes), dtype=np.int8), (codes[:, 0], codes[:, 1])), shape=(len(ids),) * 2
    )
    _, component = connected_components(edges, directed=False)
    # ids are sorted, so a component's smallest id is the one with its smallest index
    smallest = np.full(component.max() + 1, len(ids))
    np.minimum.at(smallest, component, np.arange(len(ids)))
    return dict(zip(ids.tolist(), ids[smallest[component]].tolist(), strict=True))


def resolve_duplicates(
    table: pd.DataFrame, pairs: list, twin_groups: set[str]
) -> tuple[pd.DataFrame, set[str], dict]:
    """Make near-duplicate pictures unable to cross a split boundary, before splitting.

    `table` holds every row (cohorts main, adult_check, cases), `pairs` its near-duplicates.
    - Two `main` rows, same label, different groups: one picture under two patient ids, so the
      groups are merged (`group_id` becomes the component's smallest id; the source's own id
      stays in `source_group_id`).
    - Two `main` rows with conflicting labels: the picture's label is unknown, both are dropped.
    - A `main` row that is a picture of adult_check or of a case, and every group in
      `twin_groups` (cases.csv `twin_group_id`): the group is forced into test, so that every
      case and adult_check picture is one no model was trained or selected on.
    Returns the new table, the forced groups, and counts for metrics/data.json.
    """
    table = table.copy()
    table["source_group_id"] = table["group_id"]
    # Held-out (external) rows are pool rows too: a picture of theirs elsewhere in `main` merges
    # into their group, which is then held out whole (stages/split.py `assign`).
    main = table["cohort"].isin(["main", "external"]).to_numpy()
    label, group = table["label"].to_numpy(), table["group_id"].to_numpy()
    merge, drop, forced = [], set(), set(twin_groups)
    for pair in pairs:
        i, j = pair.i, pair.j
        if main[i] and main[j]:
            if label[i] != label[j]:
                log.warning(
                    "near-duplicate pictures with conflicting labels, both dropped: %s (%s) = %s "
                    "(%s), r=%.3f", table.at[i, "path"], label[i], table.at[j, "path"], label[j],
                    pair.correlation,
                )  # fmt: skip
                drop |= {i, j}
            elif group[i] != group[j]:
                merge.append((group[i], group[j]))
        elif main[i] or main[j]:
            forced.add(group[i] if main[i] else group[j])
    rename = _component_representatives(merge)
    table["group_id"] = table["group_id"].map(lambda g: rename.get(g, g))
    forced = {rename.get(g, g) for g in forced}
    table = table.drop(index=sorted(drop))
    report = {
        "pairs": len(pairs),
        "groups_merged": sum(1 for g, r in rename.items() if g != r),
        "rows_dropped_conflicting_labels": len(drop),
        "groups_forced_to_test": len(
            forced & set(table.loc[table["cohort"] == "main", "group_id"])
        ),
    }
    return table, forced, report


def check_near_duplicates(table: pd.DataFrame, pairs: list) -> None:
    """Fail, naming the pair, if one picture is in train/val and again in another split.

    `table` is indexed like the array the pairs were found in (dropped rows simply absent) and
    has a `split` column covering every cohort (train, val, test, adult_check, cases, external).
    """
    split = table["split"]
    for pair in pairs:
        if pair.i not in split.index or pair.j not in split.index:
            continue
        a, b = split[pair.i], split[pair.j]
        if a != b and (a in TRAINING_SPLITS or b in TRAINING_SPLITS):
            raise LeakageError(
                f"near-duplicate pictures in {a} and {b} (thumbnail correlation "
                f"{pair.correlation:.3f} >= threshold): {table.at[pair.i, 'path']} and "
                f"{table.at[pair.j, 'path']}; a model would be trained or selected on a picture "
                "it is then tested on."
            )


def external_rows(table: pd.DataFrame, datasets: list[str], places: list[str]) -> pd.Series:
    """Rows held out as `external`: a named dataset, or a place named as `location` or `country`.

    A place, not a dataset name, is what "a hospital never seen" means (27 ieee8023 films were
    taken at Hannover Medical School, the `hannover` dataset's hospital), so both columns count.
    """
    held = table["dataset"].isin(datasets)
    for column in ("location", "country"):
        if column in table:
            held |= table[column].fillna("").isin(places)
    return held & (table["cohort"] == "main")


def close_over_groups(table: pd.DataFrame, held: pd.Series) -> pd.Series:
    """Extend a held-out selection to whole patient groups (after near-duplicate merging).

    Without it a patient with one film from a held-out place and one from elsewhere would be
    trained on and tested on as "never seen".
    """
    groups = set(table.loc[held, "group_id"])
    return held | ((table["cohort"] == "main") & table["group_id"].isin(groups))


def force_to_test(splits: pd.Series, groups: pd.Series, forced: set[str]) -> pd.Series:
    """Move whole groups to test (twins of the cases, pictures also in adult_check)."""
    return splits.where(~groups.isin(forced), "test")


def drop_adult_controls(pool: pd.DataFrame) -> pd.DataFrame:
    """The study's training data: no rsna/nih rows in train or val (test stays the same)."""
    keep = ~(pool["dataset"].isin(ADULT_CONTROL_DATASETS) & pool["split"].isin(TRAINING_SPLITS))
    return pool[keep]
