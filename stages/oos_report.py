"""oos_report stage: pool the out-of-source folds; per-fold and pooled results, the operating point.

Writes `<out>/results.json` (per fold and pooled: adult ROC AUC with patient-bootstrap CIs,
sensitivity at 90% specificity, specificity at 90% sensitivity, four-class call rates on held-out
adult normals) and `<out>/operating_point.json`, the COVID-19 threshold the evaluate stage commits.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import pandas as pd

from cxr.cli import setup_logging, user_errors
from cxr.config import load_base
from cxr.errors import InputError
from cxr.oos_params import load_oos_params, recipe
from cxr.oos_report import fold_file, markdown, pack, report
from cxr.params import load_params

log = logging.getLogger("oos_report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--folds", type=Path, default=Path("reports/oos/folds"))
    parser.add_argument("--out", type=Path, default=Path("reports/oos"))
    parser.add_argument(
        "--sources",
        type=Path,
        default=Path("data/sources/sources.csv"),
        help="for each held-out film's finding (the by-finding table)",
    )
    parser.add_argument("--pack", action="store_true",
                        help="then gzip the fold files (<fold>.csv.gz), as committed runs keep "
                             "theirs; not for the DVC pipeline's own outputs")  # fmt: skip
    return parser.parse_args(argv)


def with_findings(frame: pd.DataFrame, sources: Path) -> pd.DataFrame:
    """The folds' predictions with each film's sources.csv `finding` (by path)."""
    findings = pd.read_csv(sources, usecols=["path", "finding"], keep_default_na=False)
    frame = frame.merge(findings.drop_duplicates("path"), on="path", how="left", validate="m:1")
    unknown = frame["finding"].isna()
    if unknown.any():
        raise InputError(f"{sources}: {unknown.sum()} predicted film(s) are not in it, e.g. "
                         f"{frame.loc[unknown, 'path'].iloc[0]}")  # fmt: skip
    return frame


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        oos = load_oos_params(args.params)
        folds = oos.folds
        files = [fold_file(args.folds, f.name) for f in folds]
        missing = [f.name for f, path in zip(folds, files, strict=True) if not path.exists()]
        if missing:
            raise FileNotFoundError(f"{args.folds}: no predictions for fold(s) {missing}; "
                                    "run `dvc repro oos/dvc.yaml`")  # fmt: skip
        frame = pd.concat([pd.read_csv(path, keep_default_na=False) for path in files],
                          ignore_index=True)  # fmt: skip
        frame = with_findings(frame, args.sources)
        result = report(frame, oos.specificity, oos.bootstrap, load_base(args.params).seed)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "results.md").write_text(
            markdown(result, {"tasks": oos.tasks, "epochs": oos.epochs})
        )
        if args.pack:
            for path in files:
                if path.suffix == ".csv":
                    pack(path)
        if result["operating_point"] is None:  # four-class folds only: no COVID-19 threshold
            log.info("four-class calls on held-out adult films: %s", result["pooled"]["four_class"])
            return
        point = result["operating_point"] | {"recipe": recipe(load_params(args.params), oos.epochs)}
        (args.out / "operating_point.json").write_text(json.dumps(point, indent=2) + "\n")
        pooled = result["pooled"]["binary"]
        log.info("pooled adult AUC %s, threshold %.4f", pooled.get("roc_auc"),
                 result["operating_point"]["threshold"])  # fmt: skip


if __name__ == "__main__":
    main()
