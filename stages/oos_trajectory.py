"""Out-of-source AUC epoch by epoch, a diagnosis (RULE.md thirty-fifth amendment; cxr.oos_trajectory).

    python stages/oos_trajectory.py --params reports/oos/candidates/NAME/params.yaml

Trains every fold's binary model as stages/oos.py does and scores the fold's films after each
epoch. Writes `<out>/<fold>.csv` (one row per held-out film, one score column per epoch),
`<out>/<fold>.json` (the fold's summary with each epoch's validation loss and macro-F1) and
`<out>/trajectory.{json,md}`; `<out>` defaults to `trajectory/` beside the params file. A fold
whose two files exist is not trained again, so an interrupted run goes on where it stopped
(delete `<out>` to trace other params into it). It never chooses anything: choosing an epoch on
held-out films would train on them. Weight averaging (`average_epochs`) is refused: its epochs
keep the average, which the trace would not score.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    from cxr.config import load_base, load_split_params, load_train_params, preprocessing
    from cxr.infer import configure_cpu
    from cxr.lungs import crop_inputs
    from cxr.oos import pool_masks, pool_table, with_epochs
    from cxr.oos_params import load_oos_params
    from cxr.oos_trajectory import trace_fold, write_fold_csv, write_report
    from cxr.params import ParamsError

log = logging.getLogger("oos_trajectory")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--lungs", type=Path, default=Path("data/lungs"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default: trajectory/ beside --params")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        out = args.out or args.params.parent / "trajectory"
        oos = load_oos_params(args.params)
        base = load_base(args.params)
        spec = preprocessing(base, load_split_params(args.params))
        p = with_epochs(load_train_params(args.params, "train_binary"), oos.epochs)
        if p.average_epochs:
            raise ParamsError(
                "train_binary.average_epochs: a trace scores each epoch's own weights, but the "
                "averaging epochs keep the average; trace a recipe without it (0)"
            )
        configure_cpu(p.threads)
        images, table = pool_table(args.data, spec.image_size)
        images = crop_inputs(images, lambda: pool_masks(args.lungs, table), spec.to_dict())
        out.mkdir(parents=True, exist_ok=True)
        for fold in oos.folds:
            csv, summary = out / f"{fold.name}.csv", out / f"{fold.name}.json"
            if csv.exists() and summary.exists():
                log.info("fold %s: already traced in %s", fold.name, out)
                continue
            frame, result = trace_fold(images, table, fold, p, base)
            # The summary last: a fold counts as done only when both files are whole.
            write_fold_csv(frame, csv)
            summary.write_text(json.dumps(result, indent=2) + "\n")
            log.info("fold %s: %d epochs traced -> %s", fold.name, len(result["epochs"]), out)
        write_report(out, [f.name for f in oos.folds], str(args.params))
        log.info("-> %s", out / "trajectory.md")


if __name__ == "__main__":
    main()
