"""split stage: harmonise every image once and write patient-disjoint train/val/test arrays."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import pandas as pd

from cxr.arrays import preprocess_files, save_split
from cxr.cli import setup_logging, user_errors
from cxr.config import load_base, load_split_params, preprocessing
from cxr.splits import check_no_leakage, split_table
from cxr.summary import split_counts

log = logging.getLogger("split")


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        base, params = load_base(args.params), load_split_params(args.params)
        spec = preprocessing(base, params)
        sources = read_manifest(args.raw / "manifest.csv")
        cases = read_manifest(args.raw / "cases.csv").assign(cohort="cases")

        main_pool = sources[sources["cohort"] == "main"].copy()
        main_pool["split"] = split_table(
            main_pool,
            group_by=params.group_by,
            val_fraction=params.val_fraction,
            test_fraction=params.test_fraction,
            seed=base.seed,
        )
        check_no_leakage(main_pool, check_groups=params.group_by == "patient")
        adult_check = sources[sources["cohort"] == "adult_check"].assign(split="adult_check")
        cases = cases.assign(split="cases")

        tables = {name: main_pool[main_pool["split"] == name] for name in ("train", "val", "test")}
        tables |= {"adult_check": adult_check, "cases": cases}
        for name, table in tables.items():
            table = table.reset_index(drop=True)
            files = [args.raw / f for f in table["file"]]
            done = table.get("dataset", pd.Series([""] * len(table))).isin(params.pre_harmonised)
            array = preprocess_files(
                files, done.tolist(), spec, workers=args.workers, desc=f"split {name}"
            )
            save_split(args.out, name, array, table)
            log.info("%s: %d images -> %s", name, len(table), args.out / f"{name}.npy")

        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        counts = split_counts(pd.concat([main_pool, adult_check]))
        args.metrics.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
