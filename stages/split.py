"""split stage: harmonise every image once and write patient-disjoint train/val/test arrays."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    import numpy as np
    import pandas as pd

    from cxr.arrays import preprocess_files, save_split
    from cxr.config import SplitParams, load_base, load_split_params, preprocessing
    from cxr.duplicates import near_duplicate_pairs
    from cxr.images import Preprocessing
    from cxr.params import ParamsError
    from cxr.split_counts import split_counts
    from cxr.splits import (
        check_near_duplicates,
        check_no_leakage,
        close_over_groups,
        drop_adult_controls,
        external_rows,
        force_to_test,
        resolve_duplicates,
        split_table,
    )

log = logging.getLogger("split")
OUTPUT_SPLITS = ("train", "val", "test", "adult_check", "cases", "external")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="fetch stage output")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/split"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"))
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0 = cores)")
    return parser.parse_args(argv)


def read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the fetch stage first (dvc repro fetch)")
    return pd.read_csv(path, keep_default_na=False)


def check_external(sources: pd.DataFrame, params: SplitParams) -> None:
    """A held-out dataset or place that matches nothing is a typo, not an empty hold-out."""
    unknown = sorted(set(params.external) - set(sources["dataset"]))
    if unknown:
        raise ParamsError(
            f"split.external names dataset(s) {unknown} not in the fetched data "
            f"(datasets: {sorted(set(sources['dataset']))})"
        )
    places = set()
    for column in ("location", "country"):
        if column in sources:
            places |= set(sources[column])
    unknown = sorted(set(params.external_places) - places)
    if unknown:
        raise ParamsError(
            f"split.external_places names place(s) {unknown} that are no `location` or `country` "
            "in the fetched data (data/sources/sources.csv lists them)"
        )


def all_rows(raw: Path, params: SplitParams) -> pd.DataFrame:
    """Every image in one table: cohorts main, adult_check, cases, and external (held out).

    Held-out rows are marked here and extended to their whole patient groups in `assign`, after
    near-duplicate pictures have merged groups.
    """
    sources = read_manifest(raw / "manifest.csv")
    check_external(sources, params)
    held_out = external_rows(sources, params.external, params.external_places)
    sources.loc[held_out, "cohort"] = "external"
    cases = read_manifest(raw / "cases.csv").assign(cohort="cases")
    return pd.concat([sources, cases], ignore_index=True)


def assign(table: pd.DataFrame, forced: set[str], params: SplitParams, seed: int) -> pd.DataFrame:
    """The `split` of every row: main -> train/val/test by patient group, others by cohort."""
    if params.external or params.external_places:
        # A patient (or a picture merged into one group) with any held-out film is held out whole.
        held = close_over_groups(table, table["cohort"] == "external")
        table = table.assign(cohort=table["cohort"].mask(held, "external"))
    table = table.assign(split=table["cohort"])
    main = table["cohort"] == "main"
    pool = table[main]
    splits = split_table(
        pool,
        group_by=params.group_by,
        val_fraction=params.val_fraction,
        test_fraction=params.test_fraction,
        seed=seed,
    )
    table.loc[main, "split"] = force_to_test(splits, pool["group_id"], forced)
    if not params.adult_controls:
        table = drop_adult_controls(table)
    return table


def check_leakage(table: pd.DataFrame, pairs: list, params: SplitParams) -> None:
    """No patient, file or picture in two of train/val/test/external (external: never seen)."""
    pool = table[table["split"].isin(["train", "val", "test", "external"])]
    check_no_leakage(pool, check_groups=params.group_by == "patient")
    check_near_duplicates(table, pairs)


def preprocess_rows(
    table: pd.DataFrame, raw: Path, params: SplitParams, spec: Preprocessing, workers: int
) -> np.ndarray:
    """Every row's image through the one preprocessing definition.

    Datasets in `split.pre_harmonised` (Kermany's) skip the 224 px JPEG round trip: their
    publisher already did it, and a second one would blur them more than every other source.
    """
    done = table["dataset"].fillna("").isin(params.pre_harmonised).tolist()
    files = [raw / f for f in table["file"]]
    return preprocess_files(files, done, spec, workers=workers, desc="split")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        base, params = load_base(args.params), load_split_params(args.params)
        spec = preprocessing(base, params)
        table = all_rows(args.raw, params)
        images = preprocess_rows(table, args.raw, params, spec, args.workers)

        pairs = near_duplicate_pairs(images, threshold=params.near_duplicate_threshold)
        twins = set(table["twin_group_id"]) - {""} if "twin_group_id" in table else set()
        table, forced, duplicates = resolve_duplicates(table, pairs, twins)
        table = assign(table, forced, params, base.seed)
        check_leakage(table, pairs, params)

        for name in OUTPUT_SPLITS:
            rows = table[table["split"] == name]
            if len(rows):  # the cases have no dataset/group columns, the sources no case ones
                rows = rows.dropna(axis=1, how="all")
            save_split(args.out, name, images[rows.index.to_numpy()], rows.reset_index(drop=True))
            log.info("%s: %d images -> %s", name, len(rows), args.out / f"{name}.npy")

        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        counts = split_counts(table[table["cohort"] != "cases"])
        counts["near_duplicates"] = duplicates | {"threshold": params.near_duplicate_threshold}
        args.metrics.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
