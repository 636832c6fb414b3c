"""Counts of what went where, for metrics/data.json."""

from __future__ import annotations

import pandas as pd


def split_counts(table: pd.DataFrame) -> dict:
    """Nested counts split -> label -> dataset -> age_group, plus per-split totals.

    DVC flattens the nesting, so `dvc metrics show` lists e.g. `test.covid.hannover.adult`.
    """
    counts: dict = {}
    keys = ["split", "label", "dataset", "age_group"]
    for (split, label, dataset, age), n in table.groupby(keys).size().items():
        counts.setdefault(split, {}).setdefault(label, {}).setdefault(dataset, {})[age] = int(n)
    for split, n in table.groupby("split").size().items():
        counts[split]["total"] = int(n)
    counts["groups"] = {s: int(n) for s, n in table.groupby("split")["group_id"].nunique().items()}
    return counts
