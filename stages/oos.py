"""oos stage: one out-of-source fold: hold out its places, train both tasks on the rest, score them.

Writes `<out>/<fold>.csv` (the held-out films with both models' probabilities) and
`<out>/<fold>.json` (counts, chosen epochs, time). See cxr/oos.py and docs/validation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    from cxr.config import (
        TrainParams,
        load_base,
        load_split_params,
        load_train_params,
        preprocessing,
    )
    from cxr.infer import configure_cpu
    from cxr.lungs import crop_inputs
    from cxr.models import CXRNet, classifier_meta, save_checkpoint
    from cxr.oos import pool_masks, pool_table, run_fold, with_epochs
    from cxr.oos_params import load_oos_params
    from cxr.params import ParamsError

log = logging.getLogger("oos")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fold", required=True, help="a name from oos.folds in params.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--lungs", type=Path, default=Path("data/lungs"))
    parser.add_argument("--out", type=Path, default=Path("reports/oos/folds"))
    parser.add_argument("--models", type=Path, default=None,
                        help="also keep the fold's checkpoints here (<fold>_<task>.pt), e.g. to "
                        "score test-time augmentation on its held-out films later")  # fmt: skip
    return parser.parse_args(argv)


def keep_model(
    folder: Path,
    fold: str,
    preprocessing: dict,
    tasks: dict[str, TrainParams],
    seed: int,
    task: str,
    model: CXRNet,
    summary: dict,
) -> None:
    """Save one fold model as a classifier checkpoint (loadable by predict, evaluate, ...)."""
    training = {k: v for k, v in summary.items() if k != "wall_seconds"}
    meta = classifier_meta(tasks[task], preprocessing, model, seed, training) | {"oos_fold": fold}
    save_checkpoint(folder / f"{fold}_{task}.pt", model, meta)
    log.info("fold %s: %s model -> %s", fold, task, folder / f"{fold}_{task}.pt")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        oos = load_oos_params(args.params)
        folds = {f.name: f for f in oos.folds}
        if args.fold not in folds:
            raise ParamsError(f"--fold {args.fold!r} is not in oos.folds ({sorted(folds)})")
        base = load_base(args.params)
        spec = preprocessing(base, load_split_params(args.params))
        tasks = {task: with_epochs(load_train_params(args.params, f"train_{task}"), oos.epochs)
                 for task in oos.tasks}  # fmt: skip
        configure_cpu(next(iter(tasks.values())).threads)  # oos.tasks may omit binary
        images, table = pool_table(args.data, spec.image_size)
        images = crop_inputs(images, lambda: pool_masks(args.lungs, table), spec.to_dict())
        keep = (
            None
            if args.models is None
            else partial(keep_model, args.models, args.fold, spec.to_dict(), tasks, base.seed)
        )
        frame, summary = run_fold(images, table, folds[args.fold], tasks, base, on_model=keep)
        args.out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out / f"{args.fold}.csv", index=False, float_format="%.6f")
        (args.out / f"{args.fold}.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("fold %s: %d held-out films scored -> %s", args.fold, len(frame), args.out)


if __name__ == "__main__":
    main()
