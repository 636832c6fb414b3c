"""segment stage: train a small U-Net on the lung masks of the train split (epoch chosen on val),
score it on test and val by dataset, and predict a lung mask for every image of every split."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    import numpy as np
    import pandas as pd

    from cxr import segmenter as seg
    from cxr.arrays import load_split, save_split
    from cxr.config import load_base, load_segment_params
    from cxr.data import seed_everything
    from cxr.infer import configure_cpu

log = logging.getLogger("segment")
SPLITS = ("train", "val", "test", "adult_check", "cases", "external")  # as the split stage writes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--masks", type=Path, default=Path("data/lung_masks"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/lungs"))
    parser.add_argument("--model", type=Path, default=Path("models/segmenter.pt"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/segment.json"))
    return parser.parse_args(argv)


def datasets(table: pd.DataFrame, name: str) -> np.ndarray:
    """Each row's dataset; the split's name where the manifest has none (the cases)."""
    if "dataset" in table:
        return table["dataset"].to_numpy(dtype=str)
    return np.full(len(table), name)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        base, p = load_base(args.params), load_segment_params(args.params)
        generator = seed_everything(base.seed)
        configure_cpu(p.threads)
        splits = {name: load_split(args.data, name) for name in SPLITS}
        size = splits["train"][0].shape[1]
        # Ground truth for the three main splits only; val and test masks never train.
        truth = {}
        for name in ("train", "val", "test"):
            x, table = splits[name]
            rows, masks = seg.load_masks(args.masks, table, size)
            truth[name] = (rows, x[rows], masks)
            log.info("%s: %d of %d images have a lung mask", name, len(rows), len(x))

        start = time.monotonic()
        model, summary = seg.train_segmenter(truth["train"][1:], truth["val"][1:], p, generator)
        # Timings go to the metrics, never into the checkpoint (see train_segmenter).
        seconds = {"train": round(time.monotonic() - start, 1)}
        start, predicted, raw = time.monotonic(), {}, {}
        for name, (x, table) in splits.items():
            prob = seg.predict_prob(model, x, size=p.size, desc=name)
            predicted[name] = seg.binarise(
                prob, threshold=p.threshold, min_fraction=p.min_component
            )
            if name in ("val", "test"):  # scored below with and without post-processing
                raw[name] = prob[truth[name][0]] >= p.threshold
            manifest = table[["path"]].assign(
                dataset=datasets(table, name), lung_area_share=predicted[name].mean(axis=(1, 2))
            )
            save_split(args.out, name, predicted[name].astype(np.uint8) * 255, manifest)
        seconds["predict"] = round(time.monotonic() - start, 1)
        log.info("trained in %.0f s, predicted %d images in %.0f s", seconds["train"],
                 sum(len(x) for x, _ in splits.values()), seconds["predict"])  # fmt: skip

        metrics = {"best_epoch": summary["best_epoch"], "n_train": summary["n_train"],
                   "seconds": seconds}  # fmt: skip
        for name in ("test", "val"):
            rows, _, truth_masks = truth[name]
            by = datasets(splits[name][1], name)[rows]
            metrics[name] = seg.scores_by_dataset(predicted[name][rows], truth_masks, by)
            # Without the post-processing, to show what it adds.
            metrics[name]["all"]["dice_raw"] = seg.mean_dice(raw[name], truth_masks)
        metrics["predicted"] = {
            name: seg.describe_masks(masks, datasets(splits[name][1], name))
            for name, masks in predicted.items()
        }
        meta = {"arch": "unet", "channels": p.channels, "depth": p.depth, "input_size": p.size,
                "array_size": size, "threshold": p.threshold, "min_component": p.min_component,
                "seed": base.seed, "params": dataclasses.asdict(p), "summary": summary}  # fmt: skip
        seg.save_segmenter(args.model, model, meta)
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("test Dice %.3f; masks -> %s, model -> %s", metrics["test"]["all"]["dice"],
                 args.out, args.model)  # fmt: skip


if __name__ == "__main__":
    main()
