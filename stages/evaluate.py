"""evaluate stage: both checkpoints on val, test, adult_check and external; metrics, plots, bundle.

The Markdown reports are the report stage's (stages/report.py): evaluating a model does not
depend on other experiments' results.
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
    from cxr import figures
    from cxr.arrays import load_split
    from cxr.bundle import BUNDLE_NAME, write_bundle
    from cxr.config import load_base, load_evaluate_params
    from cxr.ensemble import load_model
    from cxr.errors import BundleError, InputError
    from cxr.evaluate import (
        check_class_order,
        evaluate_task,
        known_class,
        load_oos_point,
        score_split,
    )
    from cxr.infer import configure_cpu
    from cxr.lungs import crop_inputs, load_lung_masks
    from cxr.params import load_params

log = logging.getLogger("evaluate")
TASKS = ("binary", "four_class")
SPLITS = ("val", "test", "adult_check")
OPTIONAL_SPLITS = ("external",)  # absent from data dirs written before it existed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", type=Path, required=True, help="binary checkpoint")
    parser.add_argument("--four-class", type=Path, required=True, help="four-class checkpoint")
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument(
        "--lungs", type=Path, default=Path("data/lungs"), help="segment stage masks (crop: lungs)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--segmenter", type=Path, default=None,
        help="lung segmenter named in the bundle (default: segmenter.pt beside --binary, if any)",
    )  # fmt: skip
    parser.add_argument(
        "--bundle", type=Path, default=None,
        help=f"model bundle to write beside the checkpoints (default: {BUNDLE_NAME} beside --binary)",
    )  # fmt: skip
    parser.add_argument(
        "--operating-point", type=Path, default=Path("reports/oos/operating_point.json"),
        help="the out-of-source threshold, used when evaluate.operating_point is oos",
    )  # fmt: skip
    parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="writes <task>.json")
    parser.add_argument("--plots", type=Path, default=Path("plots/evaluate"))
    return parser.parse_args(argv)


def evaluate_checkpoint(
    task: str, path: Path, splits: dict, args, p, seed: int, oos_point: dict | None = None
) -> dict:
    """Score every split with one checkpoint; write its metrics JSON and figures."""
    model, meta = load_model(path, task=task)  # a checkpoint or an ensemble manifest
    size = next(iter(splits.values()))[0].shape[1]
    if meta["image_size"] != size:
        raise InputError(
            f"{path} expects {meta['image_size']} px images, {args.data} has {size} px"
        )
    names = meta["class_names"]
    check_class_order(task, names, str(path))  # before minutes of scoring, naming the file
    prep = meta.get("preprocessing", {})
    splits = {  # cropped to the lungs when the model was trained on lung crops
        name: (crop_inputs(x, partial(load_lung_masks, args.lungs, name, table), prep), table)
        for name, (x, table) in splits.items()
    }
    scored = {name: score_split(model, name, x, table, task) for name, (x, table) in splits.items()}
    result = evaluate_task(task, names, scored, p, seed, oos_point)
    out = args.metrics / f"{task}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    test = known_class(scored["test"])  # the K-class figures need one class per row
    figures.write_task_figures(
        args.plots, task, test.y, test.prob, names, result["test"], p.calibration_bins
    )
    log.info("%s: test accuracy %.3f, macro-F1 %.3f -> %s", task, result["test"]["accuracy"],
             result["test"]["macro"]["f1"], out)  # fmt: skip
    return result


def load_splits(directory: Path) -> dict:
    """The splits to score; an optional split is skipped where missing (it may have 0 rows)."""
    names = [*SPLITS, *(n for n in OPTIONAL_SPLITS if (directory / f"{n}.npy").exists())]
    return {name: load_split(directory, name) for name in names}


def write_model_bundle(args: argparse.Namespace, threshold: dict) -> None:
    """bundle.json beside the checkpoints: the models and the threshold chosen here travel
    together, so predict never pairs a model with another model's threshold."""
    bundle = args.bundle or args.binary.parent / BUNDLE_NAME
    if bundle.name != BUNDLE_NAME:
        raise BundleError(
            f"--bundle must be named {BUNDLE_NAME} (predict looks for it), got {bundle}"
        )
    segmenter = args.segmenter or args.binary.parent / "segmenter.pt"
    if args.segmenter is None and not segmenter.exists():
        segmenter = None  # models without the lung crop may do without one
    source = f"{threshold['method']} on {threshold['chosen_on']}"
    write_bundle(bundle.parent, args.binary, args.four_class, segmenter, threshold["value"], source)
    log.info("model bundle -> %s (threshold %.4f, %s)", bundle, threshold["value"], source)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        base, p = load_base(args.params), load_evaluate_params(args.params)
        # Checked before minutes of scoring. Only the binary model's threshold can come from the
        # out-of-source folds: the four-class folds are not run by default (oos.tasks).
        oos_point = None
        if p.operating_point == "oos":
            oos_point = load_oos_point(args.operating_point, load_params(args.params))
        configure_cpu(0)
        splits = load_splits(args.data)
        args.metrics.mkdir(parents=True, exist_ok=True)
        results = {}
        for task, path in zip(TASKS, (args.binary, args.four_class), strict=True):
            point = oos_point if task == "binary" else None
            results[task] = evaluate_checkpoint(task, path, splits, args, p, base.seed, point)
        write_model_bundle(args, results["binary"]["threshold"])


if __name__ == "__main__":
    main()
